//! Host commands (`modprobe`, `update-initramfs`, `update-grub`, ...) run with a time
//! limit: one polling loop for every caller, so nothing vfio-early starts can hang boot
//! or an apply. Only code that has checked [`crate::root::Root::is_host`] calls this.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the command's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Shown as it comes (stdout and stderr inherited): long regenerations.
    Stream,
    /// Standard output dropped, standard error kept for the error message: quick
    /// commands whose failure is logged (modprobe in early boot).
    Quiet,
}

/// Runs `cmd` with standard input closed, killing it when it outlives `limit`. The
/// error says what ran, how it ended, and (quiet mode) what it printed on stderr.
pub fn run(cmd: &mut Command, limit: Duration, output: Output) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null());
    if output == Output::Quiet {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                let err = err.trim();
                return Err(if err.is_empty() {
                    format!("{shown} failed ({status})")
                } else {
                    format!("{shown} failed ({status}): {err}")
                });
            }
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown} took over {}s; killed", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_command_is_killed() {
        let r = run(
            Command::new("sleep").arg("5"),
            Duration::from_millis(200),
            Output::Quiet,
        );
        assert!(r.unwrap_err().contains("killed"));
    }

    #[test]
    fn a_failure_carries_stderr() {
        let r = run(
            Command::new("sh").args(["-c", "echo nope >&2; exit 3"]),
            Duration::from_secs(5),
            Output::Quiet,
        );
        let e = r.unwrap_err();
        assert!(e.contains("nope") && e.contains("3"), "{e}");
    }

    #[test]
    fn success_is_ok() {
        assert!(run(
            &mut Command::new("true"),
            Duration::from_secs(5),
            Output::Quiet
        )
        .is_ok());
    }
}
