//! The outcome of a command, mapped to the exit status contract: 0 ok, 1 a check or
//! action failed, 2 bad usage or bad config.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Usage,
}

impl Outcome {
    /// `Failed` when `failed`, else `Ok`.
    pub fn failed_if(failed: bool) -> Outcome {
        if failed {
            Outcome::Failed
        } else {
            Outcome::Ok
        }
    }
}

impl From<Outcome> for ExitCode {
    fn from(s: Outcome) -> ExitCode {
        match s {
            Outcome::Ok => ExitCode::SUCCESS,
            Outcome::Failed => ExitCode::from(1),
            Outcome::Usage => ExitCode::from(2),
        }
    }
}

/// A failure to write standard output: a closed descriptor, a full disk, or a reader
/// that went away (a broken pipe, which `main` turns into a quiet exit, as coreutils do).
#[derive(Debug, thiserror::Error)]
#[error("writing to standard output: {0}")]
pub struct StdoutError(#[from] pub std::io::Error);

impl StdoutError {
    pub fn is_broken_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Writes all of `text` to standard output, unbuffered. Unlike `print!` it never
/// panics, and unlike Rust's standard streams it reports a closed descriptor (EBADF)
/// instead of dropping the text.
pub fn print(text: &str) -> Result<(), StdoutError> {
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    let fd = stdout.as_fd();
    let mut rest = text.as_bytes();
    while !rest.is_empty() {
        match rustix::io::write(fd, rest) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Ok(n) => rest = &rest[n..],
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    }
    Ok(())
}

/// Writes `text` to standard error; a failure is ignored (there is nowhere left to say
/// it), and never panics.
pub fn eprint(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// `print!` that returns a [`StdoutError`] instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::outcome::print(&format!($($arg)*)) };
}

/// `eprintln!` that never panics.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::outcome::eprint(&format!("{}\n", format_args!($($arg)*))) };
}
