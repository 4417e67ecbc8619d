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
    install_apt(sh, &missing)
}

/// Installs the Debian packages providing `files` (pairs of absolute path, package)
/// that are missing: for what is no program (firmware images).
pub fn ensure_apt_files(sh: &Shell, files: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = files
        .iter()
        .filter(|(path, _)| !std::path::Path::new(path).is_file())
        .map(|(_, pkg)| *pkg)
        .collect();
    install_apt(sh, &missing)
}

fn install_apt(sh: &Shell, missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing tools; install them with: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    let pkgs = with_matching_qemu_utils(missing);
    eprintln!("xtask: installing {} with apt-get", pkgs.join(" "));
    let _env = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    let shown = pkgs.join(" ");
    let pkgs = &pkgs;
    let first = cmd!(
        sh,
        "timeout 600 apt-get install -y -q --allow-downgrades {pkgs...}"
    )
    .run();
    first
        .or_else(|_| {
            cmd!(sh, "timeout 600 apt-get update -q").run()?;
            cmd!(
                sh,
                "timeout 600 apt-get install -y -q --allow-downgrades {pkgs...}"
            )
            .run()
        })
        .with_context(|| format!("apt-get install {shown}"))?;
    Ok(())
}

/// The packages to ask apt for. `qemu-system-x86` comes with `qemu-utils` from the
/// system's own release: a machine may carry a newer qemu-utils from backports, which
/// breaks the release's qemu-system-common, and apt then refuses the whole install.
fn with_matching_qemu_utils(missing: &[&str]) -> Vec<String> {
    let mut pkgs: Vec<String> = missing
        .iter()
        .filter(|p| **p != "qemu-utils")
        .map(|p| p.to_string())
        .collect();
    if missing.contains(&"qemu-system-x86") || missing.contains(&"qemu-utils") {
        match os_codename() {
            Some(codename) => pkgs.push(format!("qemu-utils/{codename}")),
            None => pkgs.push("qemu-utils".to_string()),
        }
    }
    pkgs
}

/// VERSION_CODENAME from /etc/os-release ("bookworm").
fn os_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
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
