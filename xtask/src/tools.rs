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

/// Bytes free to an unprivileged writer on the file system holding `dir` (`df`).
fn free_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .with_context(|| format!("df {}", dir.display()))?;
    if !out.status.success() {
        bail!(
            "df {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_df_avail(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("reading df's output for {}", dir.display()))
}

/// The number under `df --output=avail`'s header.
fn parse_df_avail(text: &str) -> anyhow::Result<u64> {
    let value = text.lines().nth(1).context("no value line")?.trim();
    value
        .parse()
        .with_context(|| format!("not a number: {value:?}"))
}

pub const GIB: u64 = 1 << 30;

/// Fails before any work when `dir`'s file system has less than `need` bytes free,
/// naming both figures and `what` needs them: a run that fills the disk halfway fails
/// later with a bare "No space left on device" from whichever tool hit it.
pub fn ensure_free_space(dir: &std::path::Path, need: u64, what: &str) -> anyhow::Result<()> {
    let free = free_bytes(dir)?;
    check_free(dir, free, need, what)
}

fn check_free(dir: &std::path::Path, free: u64, need: u64, what: &str) -> anyhow::Result<()> {
    if free >= need {
        return Ok(());
    }
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / GIB as f64);
    bail!(
        "{} has {} free; about {} is needed for {what}. Free some space (old clones of \
         this repository, scenario directories under target/boot-test that are no longer \
         in tests/boot/scenarios) and run again",
        dir.display(),
        gib(free),
        gib(need)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_output_is_read() {
        assert_eq!(
            parse_df_avail("    Avail\n53687091200\n").unwrap(),
            53_687_091_200
        );
        assert!(parse_df_avail("Avail\n").is_err());
        assert!(parse_df_avail("Avail\n12G\n").is_err());
    }

    #[test]
    fn too_little_space_names_both_figures() {
        let dir = std::path::Path::new("/work/target");
        assert!(check_free(dir, 5 * GIB, 5 * GIB, "x").is_ok());
        let e = check_free(dir, GIB, 3 * GIB + GIB / 2, "the boot scenarios")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "/work/target has 1.0 GiB free; about 3.5 GiB is needed for the boot scenarios."
            ),
            "{e}"
        );
    }

    #[test]
    fn free_space_of_this_directory_is_measured() {
        assert!(free_bytes(std::path::Path::new(".")).unwrap() > 0);
    }
}
