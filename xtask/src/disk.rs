//! The scenario's root disk, made before and apart from the boot (`qemu` only boots
//! what it is given): an ext4 filesystem holding the prepared tree, with the UUID and
//! label the images' grub.cfg and grub-probe stand-in name (no mount, no loop device);
//! for firmware boots a GPT disk instead, its boot partition before the ext4 root
//! partition: an EFI system partition (FAT, filled with mtools from the tree's
//! `boot/efi` for systemd-boot, empty for GRUB) or a BIOS boot partition (left for
//! grub-install, which `grub` runs on the made disk); and the qcow2 overlay each boot
//! writes to, so the prepared disk stays as made.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use std::io::{Seek, SeekFrom, Write};

use anyhow::{bail, Context};

use crate::command;
use crate::image::{self, ROOT_UUID};
use crate::lvm;
use crate::scenario::{Boot, Root};

/// Where the image keeps its EFI system partition (mounted there in the guest).
pub const ESP_DIR: &str = "boot/efi";
/// The ESP's FAT volume id, as `mkfs.vfat -i` takes it and as fstab names it.
pub const ESP_VOLUME_ID: &str = "7E5A0001";
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// GPT partition types: EFI system partition, BIOS boot partition ("Hah!IdontNeedEFI"),
/// Linux filesystem.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";
const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// The ESP's UUID as `/dev/disk/by-uuid` and fstab spell it (`7E5A-0001`).
pub fn esp_uuid() -> String {
    format!("{}-{}", &ESP_VOLUME_ID[..4], &ESP_VOLUME_ID[4..])
}

/// What a GPT disk's first partition holds: the firmware's way in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootPart {
    /// An EFI system partition (FAT).
    Esp,
    /// A BIOS boot partition: GRUB's core image, written raw by grub-install.
    BiosBoot,
}

/// Where the partitions of a GPT disk sit, in bytes: the boot partition (an ESP or a
/// BIOS boot partition) from 1 MiB, the root right after it, 1 MiB left at the end
/// for the backup GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptLayout {
    pub boot: BootPart,
    pub boot_start: u64,
    pub boot_size: u64,
    pub root_start: u64,
    pub root_size: u64,
    pub total: u64,
}

/// The layout for an ESP holding `esp_used` bytes of files and a root filesystem of
/// `root_mib` MiB: the ESP gets a quarter more than its files plus 32 MiB (FAT's own
/// tables, a kernel more), at least 64 MiB, in whole MiB.
pub fn gpt_layout(esp_used: u64, root_mib: u64) -> GptLayout {
    let esp_size = ((esp_used + esp_used / 4 + 32 * MIB).div_ceil(MIB) * MIB).max(64 * MIB);
    layout(BootPart::Esp, esp_size, root_mib)
}

/// The layout for BIOS and GRUB: a 1 MiB BIOS boot partition (GRUB's core image is
/// some 100 KiB), then the root filesystem of `root_mib` MiB.
pub fn bios_layout(root_mib: u64) -> GptLayout {
    layout(BootPart::BiosBoot, MIB, root_mib)
}

fn layout(boot: BootPart, boot_size: u64, root_mib: u64) -> GptLayout {
    let boot_start = MIB;
    let root_start = boot_start + boot_size;
    let root_size = root_mib * MIB;
    GptLayout {
        boot,
        boot_start,
        boot_size,
        root_start,
        root_size,
        total: root_start + root_size + MIB,
    }
}

/// The `sfdisk` script writing `l`'s partition table (fixed ids, so the same inputs
/// make the same disk).
pub fn sfdisk_script(l: &GptLayout) -> String {
    let s = |bytes: u64| bytes / SECTOR;
    let (boot_type, boot_name) = match l.boot {
        BootPart::Esp => (ESP_TYPE, "ESP"),
        BootPart::BiosBoot => (BIOS_BOOT_TYPE, "BIOS boot"),
    };
    format!(
        "label: gpt\nlabel-id: 6D8F5A3E-0B7C-4C1E-9A57-0FE000000010\nunit: sectors\n\
         start={}, size={}, type={boot_type}, uuid=6D8F5A3E-0B7C-4C1E-9A57-0FE000000011, name=\"{boot_name}\"\n\
         start={}, size={}, type={LINUX_TYPE}, uuid=6D8F5A3E-0B7C-4C1E-9A57-0FE000000012, name=\"root\"\n",
        s(l.boot_start),
        s(l.boot_size),
        s(l.root_start),
        s(l.root_size)
    )
}

/// Makes a raw disk image holding `tree` in an ext4 filesystem: on the whole disk, or
/// on an LVM volume (`root = "lvm"`: mkfs writes the filesystem at the volume's
/// offset, then LVM's label and metadata go in front of it); for firmware boots a GPT
/// disk (see `make_gpt`; for GRUB, `grub::install_on_disk` fills its boot partition
/// afterwards).
pub fn make(tree: &Path, disk: &Path, root: Root, boot: Boot, log: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(disk);
    match boot {
        Boot::Direct => make_whole(tree, disk, root, log),
        Boot::UefiSystemdBoot | Boot::UefiUki => make_gpt(tree, disk, log),
        Boot::BiosGrub => write_gpt(tree, disk, &bios_layout(root_mib(tree)), None, log),
        Boot::UefiGrub => {
            // An empty ESP: grub-install puts GRUB on it once the disk is attached.
            let layout = gpt_layout(0, root_mib(tree));
            let esp_img = disk.with_extension("esp");
            mkfs_esp(&esp_img, layout.boot_size, log)?;
            write_gpt(tree, disk, &layout, Some(&esp_img), log)
        }
    }
}

fn make_whole(tree: &Path, disk: &Path, root: Root, log: &Path) -> anyhow::Result<()> {
    let mut size_mib = root_mib(tree);
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-U", ROOT_UUID, "-L", "vfe-root", "-d"])
        .arg(tree);
    if root == Root::Lvm {
        size_mib = size_mib.div_ceil(lvm::EXTENT >> 20) * (lvm::EXTENT >> 20);
        mkfs.arg("-E").arg(format!("offset={}", lvm::DATA_OFFSET));
    }
    mkfs.arg(disk).arg(format!("{size_mib}M"));
    command::run(&mut mkfs, log, Duration::from_secs(600))?;
    if root == Root::Lvm {
        let bytes = lvm::DATA_OFFSET + (size_mib << 20);
        let mut f = std::fs::OpenOptions::new().write(true).open(disk)?;
        f.set_len(bytes)?;
        f.write_all(&lvm::header(bytes))?;
        f.sync_all()?;
    }
    Ok(())
}

/// The root filesystem's size for `tree`: its files and 30 % more, plus 512 MiB.
fn root_mib(tree: &Path) -> u64 {
    dir_size(tree) / MIB * 13 / 10 + 512
}

/// A GPT disk for systemd-boot: the tree's `boot/efi` in a FAT ESP (partition 1),
/// the rest of the tree in ext4 (partition 2) with an empty `boot/efi` to mount the
/// ESP on. The tree's `boot/efi` is emptied.
fn make_gpt(tree: &Path, disk: &Path, log: &Path) -> anyhow::Result<()> {
    let esp_tree = tree.join(ESP_DIR);
    let esp_used = dir_size(&esp_tree);
    let esp_img = disk.with_extension("esp");
    make_esp(&esp_tree, &esp_img, gpt_layout(esp_used, 0).boot_size, log)?;
    image::remove_tree(&esp_tree)?;
    std::fs::create_dir_all(&esp_tree)?;
    write_gpt(
        tree,
        disk,
        &gpt_layout(esp_used, root_mib(tree)),
        Some(&esp_img),
        log,
    )
}

/// Writes a GPT disk of `layout`: `tree` in ext4 on the root partition, `esp_img`
/// (removed after) copied onto the boot partition, then the partition table.
fn write_gpt(
    tree: &Path,
    disk: &Path,
    layout: &GptLayout,
    esp_img: Option<&Path>,
    log: &Path,
) -> anyhow::Result<()> {
    command::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-U", ROOT_UUID, "-L", "vfe-root", "-d"])
            .arg(tree)
            .arg("-E")
            .arg(format!("offset={}", layout.root_start))
            .arg(disk)
            .arg(format!("{}M", layout.root_size / MIB)),
        log,
        Duration::from_secs(600),
    )?;
    let mut f = std::fs::OpenOptions::new().write(true).open(disk)?;
    f.set_len(layout.total)?;
    if let Some(img) = esp_img {
        f.seek(SeekFrom::Start(layout.boot_start))?;
        std::io::copy(&mut std::fs::File::open(img)?, &mut f)?;
    }
    f.sync_all()?;
    drop(f);
    if let Some(img) = esp_img {
        std::fs::remove_file(img)?;
    }
    let script = disk.with_extension("sfdisk");
    std::fs::write(&script, sfdisk_script(layout))?;
    // sfdisk reads its script on standard input, which `command` closes.
    command::run(
        Command::new("sh")
            .arg("-ec")
            .arg(r#"sfdisk -q --no-reread --no-tell-kernel --wipe never --wipe-partitions never "$1" < "$2""#)
            .arg("sh")
            .arg(disk)
            .arg(&script),
        log,
        Duration::from_secs(60),
    )?;
    std::fs::remove_file(&script)?;
    Ok(())
}

/// An empty FAT image of `size` bytes with the ESP's volume id.
fn mkfs_esp(img: &Path, size: u64, log: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(img);
    command::run(
        Command::new("mkfs.vfat")
            .args(["-C", "-i", ESP_VOLUME_ID, "-n", "ESP"])
            .arg(img)
            .arg((size / 1024).to_string()),
        log,
        Duration::from_secs(60),
    )
}

/// A FAT image of `size` bytes holding the files under `dir`.
fn make_esp(dir: &Path, img: &Path, size: u64, log: &Path) -> anyhow::Result<()> {
    mkfs_esp(img, size, log)?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the ESP tree {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    if entries.is_empty() {
        bail!("the ESP tree {} is empty: nothing to boot", dir.display());
    }
    command::run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-Q", "-m", "-i"])
            .arg(img)
            .args(&entries)
            .arg("::/"),
        log,
        Duration::from_secs(300),
    )
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(it) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in it.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

/// A copy-on-write overlay for one boot: a qcow2 image whose backing file is the
/// prepared disk, so a boot (and whatever the guest writes) never changes the prepared
/// disk, which can be cached and booted again. Several boots of one scenario chain
/// through the same overlay.
pub fn overlay(base: &Path, overlay: &Path, log: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(overlay);
    command::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(overlay),
        log,
        Duration::from_secs(60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpt_layout_leaves_room_for_both_tables() {
        let l = gpt_layout(40 * MIB, 900);
        assert_eq!(l.boot, BootPart::Esp);
        assert_eq!(l.boot_start, MIB, "the ESP starts at 1 MiB (sector 2048)");
        assert_eq!(l.boot_size, 82 * MIB, "40 MiB + 10 MiB + 32 MiB");
        assert_eq!(l.root_start, l.boot_start + l.boot_size);
        assert_eq!(l.root_size, 900 * MIB);
        assert_eq!(l.total, l.root_start + l.root_size + MIB);
        assert_eq!(gpt_layout(0, 1).boot_size, 64 * MIB, "the smallest ESP");
        assert_eq!(gpt_layout(MIB + 1, 1).boot_size % MIB, 0, "whole MiB");
    }

    #[test]
    fn the_bios_layout_has_a_bios_boot_partition_before_the_root() {
        let l = bios_layout(900);
        assert_eq!(l.boot, BootPart::BiosBoot);
        assert_eq!((l.boot_start, l.boot_size), (MIB, MIB));
        assert_eq!(l.root_start, 2 * MIB, "the root right after it");
        assert_eq!(
            l.total,
            2 * MIB + 900 * MIB + MIB,
            "room for the backup GPT"
        );
        let script = sfdisk_script(&l);
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(
            lines[3],
            "start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, \
             uuid=6D8F5A3E-0B7C-4C1E-9A57-0FE000000011, name=\"BIOS boot\""
        );
        assert!(lines[4].starts_with(&format!("start=4096, size=1843200, type={LINUX_TYPE}")));
    }

    #[test]
    fn the_sfdisk_script_names_the_partitions_in_sectors() {
        let script = sfdisk_script(&gpt_layout(0, 100));
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "label: gpt");
        assert!(lines[3].starts_with(&format!("start=2048, size=131072, type={ESP_TYPE}")));
        assert!(lines[4].starts_with(&format!("start=133120, size=204800, type={LINUX_TYPE}")));
        assert_eq!(esp_uuid(), "7E5A-0001");
    }
}
