//! Making sure the tools a task needs are on this machine: Debian packages through
//! apt-get (as root, only when missing) and cargo tools through `cargo install`.
//! When installing is impossible, the error says exactly what to install.

use anyhow::{bail, Context};
use xshell::{cmd, Shell};

/// True when `prog` is on PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Installs the Debian packages providing `progs` (pairs of program, package) that are
/// missing.
pub fn ensure_apt(sh: &Shell, progs: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = progs
        .iter()
        .filter(|(prog, _)| !have(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing tools; install them with: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {} with apt-get", missing.join(" "));
    let _env = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    let shown = missing.join(" ");
    let pkgs = &missing;
    let first = cmd!(sh, "timeout 600 apt-get install -y -q {pkgs...}").run();
    first
        .or_else(|_| {
            cmd!(sh, "timeout 600 apt-get update -q").run()?;
            cmd!(sh, "timeout 600 apt-get install -y -q {pkgs...}").run()
        })
        .with_context(|| format!("apt-get install {shown}"))?;
    Ok(())
}

/// Installs a cargo tool (binary `bin` from crate `krate`) when missing.
pub fn ensure_cargo_tool(sh: &Shell, bin: &str, krate: &str) -> anyhow::Result<()> {
    if have(bin) {
        return Ok(());
    }
    eprintln!("xtask: installing {krate} with cargo install (a few minutes, once)");
    cmd!(sh, "timeout 1800 cargo install --locked {krate}")
        .run()
        .with_context(|| format!("timeout 1800 cargo install --locked {krate}"))?;
    Ok(())
}
