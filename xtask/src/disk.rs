//! The scenario's root disk, made before and apart from the boot (`qemu` only boots
//! what it is given): an ext4 filesystem holding the prepared tree, with the UUID and
//! label the images' grub.cfg and grub-probe stand-in name (no mount, no loop device);
//! and the qcow2 overlay each boot writes to, so the prepared disk stays as made.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use std::io::Write;

use crate::command;
use crate::image::ROOT_UUID;
use crate::lvm;
use crate::scenario::Root;

/// Makes a raw disk image holding `tree` in an ext4 filesystem: on the whole disk, or
/// on an LVM volume (`root = "lvm"`: mkfs writes the filesystem at the volume's
/// offset, then LVM's label and metadata go in front of it).
pub fn make(tree: &Path, disk: &Path, root: Root, log: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(disk);
    let used = dir_size(tree);
    let mut size_mib = used / (1024 * 1024) * 13 / 10 + 512;
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
