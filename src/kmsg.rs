//! Logging for early boot: lines go to `<root>/dev/kmsg` as `vfio-early: ...` with a
//! syslog priority, so they show in `dmesg` and the journal; when `/dev/kmsg` cannot be
//! opened (tests, containers), they go to standard error instead.
//!
//! A log failure never stops the caller: logging is best effort by design.

use std::fs::OpenOptions;
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
        let kmsg = OpenOptions::new()
            .write(true)
            .open(root.path(paths::DEV_KMSG))
            .ok();
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
            eprintln!("vfio-early: {tag}{msg}");
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
