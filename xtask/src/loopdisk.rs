//! A made disk file attached as a loop device with its partitions, for an installer
//! that must see real block devices (grub-install writes the MBR and the BIOS boot
//! partition, and probes the filesystems under the directories it is given): mounts
//! onto it (the ext4 root; the ESP through FUSE, `fusefat`, since the build machine's
//! kernel may have no vfat; binds of `/dev`, `/proc`, `/sys` for a chroot). Everything
//! is undone in reverse by `detach`, or on drop after an error. This is the one place
//! the harness mounts anything, and only for a bootloader's installer: the image's
//! commands before it (apply included) never see the build machine's devices.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::command;

const LIMIT: Duration = Duration::from_secs(60);

pub struct Attached {
    device: String,
    /// Mount points, in the order mounted.
    mounts: Vec<PathBuf>,
    /// The FUSE daemons (foreground), waited for after their unmount.
    fuse: Vec<Child>,
    log: PathBuf,
    detached: bool,
}

impl Attached {
    /// `losetup -P` on `disk`, once the kernel shows its partitions.
    pub fn attach(disk: &Path, log: &Path) -> anyhow::Result<Attached> {
        let mut losetup = Command::new("losetup");
        losetup.args(["-P", "--show", "-f"]).arg(disk);
        let out = command::timed(&losetup, LIMIT)
            .stdin(Stdio::null())
            .output()
            .context("running losetup")?;
        if !out.status.success() {
            bail!(
                "`{}` failed: {}",
                command::shown(&losetup),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !device.starts_with("/dev/loop") {
            bail!(
                "losetup named no loop device for {}: `{device}`",
                disk.display()
            );
        }
        let attached = Attached {
            device,
            mounts: Vec::new(),
            fuse: Vec::new(),
            log: log.to_path_buf(),
            detached: false,
        };
        // The kernel reads the partition table itself (`-P`) when it knows the label;
        // a kernel built without GPT support does not, and partx adds the
        // partitions it reads in userspace instead.
        if !attached.wait_for_partitions(Duration::from_secs(2)) {
            command::run(
                Command::new("partx").arg("-a").arg(&attached.device),
                log,
                LIMIT,
            )?;
            if !attached.wait_for_partitions(Duration::from_secs(10)) {
                bail!(
                    "{} shows no partitions after losetup -P and partx -a",
                    attached.device
                );
            }
        }
        Ok(attached)
    }

    fn wait_for_partitions(&self, limit: Duration) -> bool {
        let started = Instant::now();
        while !Path::new(&self.partition(2)).exists() {
            if started.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The device of partition `n`.
    pub fn partition(&self, n: u32) -> String {
        format!("{}p{n}", self.device)
    }

    /// `mount ARGS... TARGET`.
    pub fn mount(&mut self, args: &[&str], target: &Path) -> anyhow::Result<()> {
        command::run(
            Command::new("mount").args(args).arg(target),
            &self.log,
            LIMIT,
        )?;
        self.mounts.push(target.to_path_buf());
        Ok(())
    }

    /// The FAT filesystem on `device` mounted read-write at `target` by fusefat, named
    /// by its device in the mount table (where grub-install looks for it).
    pub fn mount_fat(&mut self, device: &str, target: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("fusefat")
            .args(["-f", "-o", &format!("rw+,fsname={device}"), device])
            .arg(target)
            .stdin(Stdio::null())
            // Its standard output is a trace of every FAT operation, even without -d.
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("running fusefat")?;
        self.fuse.push(child);
        let started = Instant::now();
        while !is_mount_point(target)? {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("fusefat did not mount {device} on {}", target.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.mounts.push(target.to_path_buf());
        Ok(())
    }

    /// Unmounts everything in reverse and detaches the loop device; the first failure.
    pub fn detach(mut self) -> anyhow::Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> anyhow::Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        let mut first = Ok(());
        let _ = Command::new("sync").status();
        while let Some(m) = self.mounts.pop() {
            let r = command::run(Command::new("umount").arg(&m), &self.log, LIMIT);
            if first.is_ok() {
                first = r;
            }
        }
        for mut child in self.fuse.drain(..) {
            // Its mount is gone: the daemon exits once it has written everything back.
            let started = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && started.elapsed() < LIMIT {
                std::thread::sleep(Duration::from_millis(100));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
                if first.is_ok() {
                    first = Err(anyhow::anyhow!("fusefat did not exit after its unmount"));
                }
            }
        }
        // Partitions partx added go with their device; removed first all the same.
        if Path::new(&self.partition(1)).exists() {
            let _ = command::run(
                Command::new("partx").arg("-d").arg(&self.device),
                &self.log,
                LIMIT,
            );
        }
        let r = command::run(
            Command::new("losetup").arg("-d").arg(&self.device),
            &self.log,
            LIMIT,
        );
        first.and(r)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.undo();
    }
}

/// Whether `path` is a mount point (in this process's mount table).
fn is_mount_point(path: &Path) -> anyhow::Result<bool> {
    let table =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(mounted_at(&table, &path.to_string_lossy()))
}

/// Whether a line of `mountinfo` text mounts something at `path` (its fifth field).
fn mounted_at(mountinfo: &str, path: &str) -> bool {
    mountinfo
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_point_is_the_fifth_field_of_mountinfo() {
        let table = "24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw\n\
                     45 27 0:40 / /t/disk.mnt/boot/efi rw,nosuid - fuse /dev/loop0p1 rw\n";
        assert!(mounted_at(table, "/t/disk.mnt/boot/efi"));
        assert!(
            !mounted_at(table, "/t/disk.mnt"),
            "a parent of a mount point is none"
        );
        assert!(
            !mounted_at(table, "/dev/loop0p1"),
            "the source is not the mount point"
        );
    }
}
