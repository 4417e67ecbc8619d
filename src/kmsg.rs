//! Logging for early boot: lines go to `<root>/dev/kmsg` as `vfio-early: ...` with a
//! syslog priority, so they show in `dmesg` and the journal; when `/dev/kmsg` cannot be
//! opened (tests, containers), they go to standard error instead.
//!
//! A log failure never stops the caller: logging is best effort by design. Nothing here
//! panics on a failed write (no `eprintln!`, which panics when standard error is full or
//! a closed pipe): a closed console in early boot must not abort a bind halfway.

use std::io::Write;

use crate::paths;
use crate::root::Root;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error = 3,
    Warning = 4,
    Info = 6,
}

/// A sink for `vfio-early:` lines.
pub struct Log {
    kmsg: Option<std::fs::File>,
    /// Every line logged, for reports and tests.
    pub lines: Vec<(Level, String)>,
    echo_stderr: bool,
}

impl Log {
    /// Logs to `<root>/dev/kmsg` when it opens; otherwise to standard error.
    pub fn kmsg(root: &Root) -> Self {
        let kmsg = root.open_device(paths::DEV_KMSG, true).ok();
        let echo_stderr = kmsg.is_none();
        Log {
            kmsg,
            lines: Vec::new(),
            echo_stderr,
        }
    }

    /// Logs to standard error only (interactive commands).
    pub fn stderr() -> Self {
        Log {
            kmsg: None,
            lines: Vec::new(),
            echo_stderr: true,
        }
    }

    /// Collects lines without printing them (tests).
    pub fn silent() -> Self {
        Log {
            kmsg: None,
            lines: Vec::new(),
            echo_stderr: false,
        }
    }

    pub fn log(&mut self, level: Level, msg: &str) {
        if let Some(f) = self.kmsg.as_mut() {
            // One write per record: /dev/kmsg takes each write as one log line.
            let _ = f.write_all(format!("<{}>vfio-early: {msg}\n", level as u8).as_bytes());
        }
        if self.echo_stderr {
            let tag = match level {
                Level::Error => "error: ",
                Level::Warning => "warning: ",
                Level::Info => "",
            };
            // Ignored on failure (EPIPE, ENOSPC, EBADF): the line is still in `lines`.
            let _ = std::io::stderr().write_all(format!("vfio-early: {tag}{msg}\n").as_bytes());
        }
        self.lines.push((level, msg.to_string()));
    }

    pub fn info(&mut self, msg: &str) {
        self.log(Level::Info, msg)
    }
    pub fn warn(&mut self, msg: &str) {
        self.log(Level::Warning, msg)
    }
    pub fn error(&mut self, msg: &str) {
        self.log(Level::Error, msg)
    }
}

/// The kernel log's messages, oldest first: from the `/dev/kmsg` character device, read
/// record by record without blocking, or from a plain file of that name in a fixture tree
/// (lines either in kmsg's `pri,seq,ts,flags;message` form or `<pri>message`). An
/// unreadable log is an empty one.
pub fn read_log(root: &Root) -> Vec<String> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = root.metadata(paths::DEV_KMSG) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if meta.file_type().is_char_device() {
        // Opened non-blocking: at the end of the buffer a read returns EAGAIN instead
        // of waiting.
        let Ok(mut f) = root.open_device(paths::DEV_KMSG, false) else {
            return out;
        };
        let mut buf = vec![0u8; 8192];
        // Bounded: the ring buffer holds at most a few thousand records.
        for _ in 0..200_000 {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.push(record_message(&String::from_utf8_lossy(&buf[..n]))),
                // EPIPE: a record was overwritten while reading; go on with the next.
                Err(e) if e.raw_os_error() == Some(32) => continue,
                Err(_) => break,
            }
        }
    } else if let Ok(text) = root.read_to_string(paths::DEV_KMSG) {
        out.extend(text.lines().map(record_message));
    }
    out
}

fn record_message(record: &str) -> String {
    let first = record.lines().next().unwrap_or("");
    if let Some((_, msg)) = first.split_once(';') {
        return msg.to_string();
    }
    if let Some(rest) = first.strip_prefix('<') {
        if let Some((_, msg)) = rest.split_once('>') {
            return msg.to_string();
        }
    }
    first.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_lose_their_prefixes() {
        assert_eq!(
            record_message("6,339,5140900,-;DMAR: IOMMU enabled\n"),
            "DMAR: IOMMU enabled"
        );
        assert_eq!(record_message("<4>vfio-early: x"), "vfio-early: x");
        assert_eq!(record_message("plain"), "plain");
    }
}
