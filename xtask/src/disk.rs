//! The scenario's root disk, made before and apart from the boot (`qemu` only boots
//! what it is given): an ext4 filesystem holding the prepared tree, with the UUID and
//! label the images' grub.cfg and grub-probe stand-in name (no mount, no loop device);
//! and the qcow2 overlay each boot writes to, so the prepared disk stays as made.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::command;
use crate::image::ROOT_UUID;

/// Makes a raw ext4 disk image holding `tree`.
pub fn make(tree: &Path, disk: &Path, log: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(disk);
    let used = dir_size(tree);
    let size_mib = used / (1024 * 1024) * 13 / 10 + 512;
    command::run(
        Command::new("mkfs.ext4")
            .arg("-q")
            .arg("-F")
            .arg("-U")
            .arg(ROOT_UUID)
            .arg("-L")
            .arg("vfe-root")
            .arg("-d")
            .arg(tree)
            .arg(disk)
            .arg(format!("{size_mib}M")),
        log,
        Duration::from_secs(600),
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
