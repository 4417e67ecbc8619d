//! Running external commands the one way xtask does: under `timeout` (nothing may
//! hang), standard input closed, the output appended to a log file (and streamed to the
//! terminal with `--verbose`), the exit code returned or checked.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// Runs `cmd` (killed after `limit`), its output appended to `log`; fails unless it
/// exits 0, naming the log.
pub fn run(cmd: &mut Command, log: &Path, limit: Duration) -> anyhow::Result<()> {
    match status(cmd, log, limit)? {
        Some(0) => Ok(()),
        code => bail!(
            "`{}` failed (exit {}); see {}",
            shown(cmd),
            exit_text(code, limit),
            log.display()
        ),
    }
}

/// Runs `cmd` like `run`; its exit code, `None` when it was killed at the timeout.
pub fn status(cmd: &mut Command, log: &Path, limit: Duration) -> anyhow::Result<Option<i32>> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(f, "\n### {}", shown(cmd))?;
    let mut wrapped = timed(cmd, limit);
    wrapped.stdin(Stdio::null());
    let status = if crate::progress::verbose() {
        wrapped.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = wrapped
            .spawn()
            .with_context(|| format!("running {:?}", cmd.get_program()))?;
        let out = child.stdout.take();
        let err = child.stderr.take();
        std::thread::scope(|s| {
            for mut pipe in [
                out.map(|o| Box::new(o) as Box<dyn Read + Send>),
                err.map(|e| Box::new(e) as Box<dyn Read + Send>),
            ]
            .into_iter()
            .flatten()
            {
                let mut f = f.try_clone();
                s.spawn(move || {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = pipe.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Ok(f) = f.as_mut() {
                            let _ = f.write_all(&buf[..n]);
                        }
                        crate::progress::raw(&buf[..n]);
                    }
                });
            }
        });
        child.wait()?
    } else {
        wrapped
            .stdout(f.try_clone()?)
            .stderr(f)
            .status()
            .with_context(|| format!("running {:?}", cmd.get_program()))?
    };
    Ok(match status.code() {
        Some(124) | Some(137) | None => None,
        c => c,
    })
}

/// `cmd` under `timeout -k5 LIMIT`, with the same environment changes and directory.
pub fn timed(cmd: &Command, limit: Duration) -> Command {
    let mut wrapped = Command::new("timeout");
    wrapped
        .arg("-k5")
        .arg(limit.as_secs().max(1).to_string())
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

fn exit_text(code: Option<i32>, limit: Duration) -> String {
    match code {
        Some(124) | Some(137) | None => format!("killed after {} s", limit.as_secs()),
        Some(c) => c.to_string(),
    }
}

/// The command as one line, for logs and errors (long scripts cut at their first line).
pub fn shown(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        let first = a.lines().next().unwrap_or("");
        parts.push(if a.contains('\n') {
            format!("{first} ...")
        } else {
            a.into_owned()
        });
    }
    parts.join(" ")
}

/// The last `n` lines of a log file, for failure messages.
pub fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_hangs_is_killed() {
        let dir = std::env::temp_dir().join(format!("xtask-command-{}", std::process::id()));
        let log = dir.join("log");
        let code = status(
            Command::new("sleep").arg("30"),
            &log,
            Duration::from_secs(1),
        )
        .expect("runs");
        assert_eq!(code, None);
        let code = status(
            Command::new("sh").args(["-c", "echo hi; exit 3"]),
            &log,
            Duration::from_secs(10),
        )
        .expect("runs");
        assert_eq!(code, Some(3));
        assert!(tail(&log, 5).contains("hi"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
