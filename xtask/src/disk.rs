//! The scenario's root disk, made before and apart from the boot (`qemu` only boots
//! what it is given): an ext4 filesystem holding the prepared tree, with the UUID and
//! label the images' grub.cfg and grub-probe stand-in name (no mount, no loop device);
//! for firmware boots a GPT disk instead, its EFI system partition (FAT, filled with
//! mtools from the tree's `boot/efi`) before the ext4 root partition; and the qcow2
//! overlay each boot writes to, so the prepared disk stays as made.

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
/// GPT partition types: EFI system partition, Linux filesystem.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// The ESP's UUID as `/dev/disk/by-uuid` and fstab spell it (`7E5A-0001`).
pub fn esp_uuid() -> String {
    format!("{}-{}", &ESP_VOLUME_ID[..4], &ESP_VOLUME_ID[4..])
}

/// Where the partitions of a GPT disk sit, in bytes: the ESP from 1 MiB, the root
/// right after it, 1 MiB left at the end for the backup GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptLayout {
    pub esp_start: u64,
    pub esp_size: u64,
    pub root_start: u64,
    pub root_size: u64,
    pub total: u64,
}

/// The layout for an ESP holding `esp_used` bytes of files and a root filesystem of
/// `root_mib` MiB: the ESP gets a quarter more than its files plus 32 MiB (FAT's own
/// tables, a kernel more), at least 64 MiB, in whole MiB.
pub fn gpt_layout(esp_used: u64, root_mib: u64) -> GptLayout {
    let esp_size = ((esp_used + esp_used / 4 + 32 * MIB).div_ceil(MIB) * MIB).max(64 * MIB);
    let esp_start = MIB;
    let root_start = esp_start + esp_size;
    let root_size = root_mib * MIB;
    GptLayout {
        esp_start,
        esp_size,
        root_start,
        root_size,
        total: root_start + root_size + MIB,
    }
}

/// The `sfdisk` script writing `l`'s partition table (fixed ids, so the same inputs
/// make the same disk).
pub fn sfdisk_script(l: &GptLayout) -> String {
    let s = |bytes: u64| bytes / SECTOR;
    format!(
        "label: gpt\nlabel-id: 6D8F5A3E-0B7C-4C1E-9A57-0FE000000010\nunit: sectors\n\
         start={}, size={}, type={ESP_TYPE}, uuid=6D8F5A3E-0B7C-4C1E-9A57-0FE000000011, name=\"ESP\"\n\
         start={}, size={}, type={LINUX_TYPE}, uuid=6D8F5A3E-0B7C-4C1E-9A57-0FE000000012, name=\"root\"\n",
        s(l.esp_start),
        s(l.esp_size),
        s(l.root_start),
        s(l.root_size)
    )
}

/// Makes a raw disk image holding `tree` in an ext4 filesystem: on the whole disk, or
/// on an LVM volume (`root = "lvm"`: mkfs writes the filesystem at the volume's
/// offset, then LVM's label and metadata go in front of it).
pub fn make(tree: &Path, disk: &Path, root: Root, boot: Boot, log: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(disk);
    if boot.is_uefi() {
        return make_gpt(tree, disk, log);
    }
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

/// A GPT disk: the tree's `boot/efi` in a FAT ESP (partition 1), the rest of the tree
/// in ext4 (partition 2) with an empty `boot/efi` to mount the ESP on. The tree's
/// `boot/efi` is emptied.
fn make_gpt(tree: &Path, disk: &Path, log: &Path) -> anyhow::Result<()> {
    let esp_tree = tree.join(ESP_DIR);
    let esp_used = dir_size(&esp_tree);
    let esp_img = disk.with_extension("esp");
    make_esp(&esp_tree, &esp_img, gpt_layout(esp_used, 0).esp_size, log)?;
    image::remove_tree(&esp_tree)?;
    std::fs::create_dir_all(&esp_tree)?;
    let layout = gpt_layout(esp_used, root_mib(tree));
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
    f.seek(SeekFrom::Start(layout.esp_start))?;
    std::io::copy(&mut std::fs::File::open(&esp_img)?, &mut f)?;
    f.sync_all()?;
    drop(f);
    std::fs::remove_file(&esp_img)?;
    let script = disk.with_extension("sfdisk");
    std::fs::write(&script, sfdisk_script(&layout))?;
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

/// A FAT image of `size` bytes holding the files under `dir`.
fn make_esp(dir: &Path, img: &Path, size: u64, log: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(img);
    command::run(
        Command::new("mkfs.vfat")
            .args(["-C", "-i", ESP_VOLUME_ID, "-n", "ESP"])
            .arg(img)
            .arg((size / 1024).to_string()),
        log,
        Duration::from_secs(60),
    )?;
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
        assert_eq!(l.esp_start, MIB, "the ESP starts at 1 MiB (sector 2048)");
        assert_eq!(l.esp_size, 82 * MIB, "40 MiB + 10 MiB + 32 MiB");
        assert_eq!(l.root_start, l.esp_start + l.esp_size);
        assert_eq!(l.root_size, 900 * MIB);
        assert_eq!(l.total, l.root_start + l.root_size + MIB);
        assert_eq!(gpt_layout(0, 1).esp_size, 64 * MIB, "the smallest ESP");
        assert_eq!(gpt_layout(MIB + 1, 1).esp_size % MIB, 0, "whole MiB");
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
