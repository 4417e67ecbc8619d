//! One apply at a time: `apply`, `undo` and the trial commands hold an exclusive
//! `flock` on the root directory itself while they read, decide and write, so that two
//! runs never interleave their writes (owned files matching neither config). Locking the
//! directory leaves no file behind, in a chroot or a fixture tree as on the host.
//!
//! A second run waits a bounded time, then gives up naming the holder, found in the
//! kernel's lock table (`/proc/locks` under the root) by the directory's device and
//! inode.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use crate::paths;
use crate::root::Root;

/// Held until dropped (the kernel releases the lock when the descriptor closes).
#[derive(Debug)]
pub struct Lock {
    _dir: File,
}

/// Takes the lock on `root` for `what` ("apply", "undo"), waiting up to `wait`.
pub fn acquire(root: &Root, what: &str, wait: Duration) -> anyhow::Result<Lock> {
    let dir = File::open(root.dir())
        .map_err(|e| anyhow::anyhow!("cannot open {} to lock it: {e}", root.dir().display()))?;
    let start = Instant::now();
    let mut said = false;
    loop {
        match flock(&dir, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(Lock { _dir: dir }),
            Err(rustix::io::Errno::WOULDBLOCK) => {}
            Err(e) => anyhow::bail!("cannot lock {}: {e}", root.dir().display()),
        }
        let holder = holder(root, &dir);
        if start.elapsed() >= wait {
            anyhow::bail!(
                "another vfio-early is changing {} ({holder}); {what} waited {} s and gave \
                 up, nothing was written\nfix: let it finish and run `vfio-early {what}` \
                 again (or wait longer with --wait SECONDS)",
                root.dir().display(),
                wait.as_secs()
            );
        }
        if !said {
            crate::errln!(
                "vfio-early: waiting for another vfio-early ({holder}) to finish with {}",
                root.dir().display()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Who holds the lock on `dir`: "pid 1234: vfio-early apply", or why it is unknown.
fn holder(root: &Root, dir: &File) -> String {
    let Ok(meta) = dir.metadata() else {
        return "holder unknown".to_string();
    };
    let Ok(table) = root.read_to_string(paths::PROC_LOCKS) else {
        return "holder unknown: no lock table to read".to_string();
    };
    match holder_pid(&table, meta.dev(), meta.ino()) {
        Some(pid) => {
            let cmd = root
                .read_bytes(
                    Path::new("proc").join(pid.to_string()).join("cmdline"),
                    4096,
                )
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .split('\0')
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            if cmd.is_empty() {
                format!("pid {pid}")
            } else {
                format!("pid {pid}: {cmd}")
            }
        }
        None => "holder unknown".to_string(),
    }
}

/// The pid of the FLOCK entry for device `dev`, inode `ino` in a `/proc/locks` text:
/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5243 0 EOF` (major and minor in hex).
fn holder_pid(table: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    table.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "N:" FLOCK ADVISORY WRITE PID DEV:INO START END; "->" marks a waiter.
        if f.get(1) != Some(&"FLOCK") || f.contains(&"->") {
            return None;
        }
        let node = f.get(5)?;
        (*node == want).then(|| f.get(4)?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_the_lock_table() {
        let dev = rustix::fs::makedev(0xfd, 1);
        let table = "1: POSIX  ADVISORY  WRITE 99 fd:01:5243 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 fd:01:5243 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 777 fd:01:5243 0 EOF\n";
        assert_eq!(holder_pid(table, dev, 5243), Some(1234));
        assert_eq!(holder_pid(table, dev, 5244), None);
    }

    #[test]
    fn a_second_lock_waits_then_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let first = acquire(&root, "apply", Duration::from_secs(1)).unwrap();
        let meta = std::fs::metadata(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("proc/4242")).unwrap();
        std::fs::write(
            dir.path().join("proc/locks"),
            format!(
                "1: FLOCK  ADVISORY  WRITE 4242 {:02x}:{:02x}:{} 0 EOF\n",
                rustix::fs::major(meta.dev()),
                rustix::fs::minor(meta.dev()),
                meta.ino()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("proc/4242/cmdline"), "vfio-early\0apply\0").unwrap();
        let start = Instant::now();
        let err = acquire(&root, "undo", Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(300));
        let msg = err.to_string();
        assert!(msg.contains("pid 4242: vfio-early apply"), "{msg}");
        assert!(msg.contains("nothing was written"), "{msg}");
        drop(first);
        assert!(acquire(&root, "undo", Duration::from_millis(300)).is_ok());
    }
}
