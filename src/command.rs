//! Host commands (`modprobe`, `update-initramfs`, `zpool status`, ...) run with a time
//! limit: one loop for every caller, so nothing vfio-early starts can hang boot or an
//! apply. Only code that has checked [`crate::root::Root::is_host`] calls this.

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most output kept from a captured stream.
const MAX_OUTPUT: u64 = 1 << 20;

/// Where the command's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Shown as it comes (stdout and stderr inherited): long regenerations.
    Stream,
    /// Standard output dropped, standard error kept for the error message: quick
    /// commands whose failure is logged (modprobe in early boot).
    Quiet,
    /// Standard output returned (up to 1 MiB), standard error kept for the error.
    Capture,
}

/// Runs `cmd` with standard input closed, killing it when it outlives `limit`. Returns
/// standard output for [`Output::Capture`] (empty otherwise). The error says what ran,
/// how it ended, and what it printed on standard error.
pub fn run(cmd: &mut Command, limit: Duration, output: Output) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null());
    match output {
        Output::Stream => {}
        Output::Quiet => {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        Output::Capture => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    // Readers on threads, so a full pipe never stalls the child.
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown} took over {}s; killed", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    let text = |h: Option<JoinHandle<Vec<u8>>>| {
        let bytes = h.and_then(|h| h.join().ok()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let (out, err) = (text(out), text(err));
    let err = err.trim();
    match (status.success(), err.is_empty()) {
        (true, _) => Ok(out),
        (false, true) => Err(format!("{shown} failed ({status})")),
        (false, false) => Err(format!("{shown} failed ({status}): {err}")),
    }
}

fn drain(pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.take(MAX_OUTPUT).read_to_end(&mut buf);
        buf
    })
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
        assert!(e.contains("nope") && e.contains('3'), "{e}");
    }

    #[test]
    fn capture_returns_stdout_and_a_full_pipe_does_not_stall() {
        let r = run(
            Command::new("sh").args(["-c", "head -c 300000 /dev/zero; echo; echo done"]),
            Duration::from_secs(10),
            Output::Capture,
        );
        assert!(r.unwrap().ends_with("done\n"));
        let quiet = run(
            &mut Command::new("true"),
            Duration::from_secs(5),
            Output::Quiet,
        );
        assert_eq!(quiet, Ok(String::new()));
    }
}
