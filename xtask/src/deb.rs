//! `cargo xtask deb [--version V]`: builds `target/debian/vfio-early_<version>_amd64.deb`
//! with the real Debian tooling (dpkg-buildpackage and debhelper) from a copy of the
//! tracked tree, so the checkout stays clean; the Rust build reuses the project's target
//! directory. Then lintian must report no error and no warning.
//!
//! The package is rebuilt only when its inputs changed: a hash of every file that goes
//! into it (the tracked and untracked-but-not-ignored files, less the trees no package
//! file comes from), the version and the Rust toolchain is kept beside the .deb.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use xshell::{cmd, Shell};

use crate::{command, progress, tools};

/// Paths (prefixes) of the tree that put nothing into the package: the harness, its
/// tests and the project's documents. A file outside them counts, so a new input
/// can only cause a rebuild, never a stale package.
const NOT_INPUTS: &[&str] = &[
    "tests/",
    "xtask/",
    ".ci/",
    ".github/",
    "README.md",
    "ARCHITECTURE.md",
    "clippy.toml",
    ".gitignore",
];

/// Builds the package, or reuses the one built from the same inputs; returns its path.
/// `lint` runs lintian on it (once per build: the `deb` task and the package test do;
/// the boot harness, which only installs it, skips it).
pub fn build(sh: &Shell, version: Option<&str>, lint: bool) -> anyhow::Result<PathBuf> {
    tools::ensure_apt(
        sh,
        &[
            ("dpkg-buildpackage", "dpkg-dev"),
            ("dh", "debhelper"),
            ("fakeroot", "fakeroot"),
            ("lintian", "lintian"),
        ],
    )?;
    let top = sh.current_dir();
    let out = top.join("target/debian");
    std::fs::create_dir_all(&out)?;
    let shown_version = version.map(|v| format!(" {v}")).unwrap_or_default();
    let phase = progress::start(
        &format!("deb{shown_version}"),
        "hashing the package's inputs",
    );
    let files = package_files(sh)?;
    let key = inputs_key(&top, &files, version)?;
    let name = deb_name(&top, version)?;
    let deb = out.join(&name);
    let stamp = out.join(format!("{name}.inputs"));
    let fresh = deb.is_file()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.lines().next() == Some(key.as_str()));
    let log = out.join(format!("{name}.log"));
    if !fresh {
        let _ = std::fs::remove_file(&stamp);
        let _ = std::fs::remove_file(&log);
        phase.waiting("dpkg-buildpackage (a release build of the binary; minutes cold)");
        build_now(&top, &out, &files, version, &log)?;
        let built = out.join(&name);
        if !built.is_file() {
            bail!(
                "dpkg-buildpackage made no {}; see {}",
                built.display(),
                log.display()
            );
        }
        std::fs::write(&stamp, format!("{key}\n"))?;
    }
    let linted =
        std::fs::read_to_string(&stamp).is_ok_and(|s| s.lines().any(|l| l == "lintian clean"));
    if lint && !linted {
        phase.waiting("lintian");
        self::lint(&deb, &log)?;
        let mut text = std::fs::read_to_string(&stamp)?;
        text.push_str("lintian clean\n");
        std::fs::write(&stamp, text)?;
    }
    let size = std::fs::metadata(&deb)?.len();
    let how = if fresh {
        "cached (inputs unchanged)"
    } else {
        "built"
    };
    phase.done(&format!(
        "{how}: {name}, {} KiB{}; log {}",
        size / 1024,
        if lint { ", lintian clean" } else { "" },
        log.display()
    ));
    Ok(deb)
}

/// Every file of the tree a package build copies.
fn package_files(sh: &Shell) -> anyhow::Result<Vec<String>> {
    let files = cmd!(sh, "timeout 120 git ls-files -co --exclude-standard").read()?;
    Ok(files
        .lines()
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect())
}

/// The cache key: the inputs' paths and contents, the version override and the
/// toolchain that compiles the binary.
fn inputs_key(top: &Path, files: &[String], version: Option<&str>) -> anyhow::Result<String> {
    let mut h = Fnv::new();
    for f in files.iter().filter(|f| is_input(f)) {
        h.add(f.as_bytes());
        h.add(&[0]);
        match std::fs::read(top.join(f)) {
            Ok(bytes) => h.add(&bytes),
            // Listed but deleted in the work tree: its absence is the input.
            Err(_) => h.add(b"(missing)"),
        }
        h.add(&[0]);
    }
    h.add(version.unwrap_or("").as_bytes());
    let rustc = Command::new("rustc")
        .arg("-V")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    h.add(&rustc);
    Ok(format!("{:016x}", h.0))
}

pub fn is_input(path: &str) -> bool {
    !NOT_INPUTS.iter().any(|p| path.starts_with(p))
}

/// FNV-1a, 64 bits: a cache key, not a security boundary.
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf29ce484222325)
    }

    pub fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

/// `vfio-early_<version>_amd64.deb`, the version from debian/changelog or the override.
fn deb_name(top: &Path, version: Option<&str>) -> anyhow::Result<String> {
    let v = match version {
        Some(v) => v.to_string(),
        None => changelog_version(&std::fs::read_to_string(top.join("debian/changelog"))?)
            .context("no version on debian/changelog's first line")?,
    };
    // dpkg drops the epoch from file names.
    let v = v.split_once(':').map(|(_, v)| v).unwrap_or(&v);
    Ok(format!("vfio-early_{v}_amd64.deb"))
}

pub fn changelog_version(text: &str) -> Option<String> {
    let first = text.lines().next()?;
    let open = first.find('(')?;
    let close = first.find(')')?;
    Some(first.get(open + 1..close)?.to_string())
}

fn build_now(
    top: &Path,
    out: &Path,
    files: &[String],
    version: Option<&str>,
    log: &Path,
) -> anyhow::Result<()> {
    let src = out.join("src/vfio-early");
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    std::fs::create_dir_all(&src)?;
    let list = out.join("src/files.txt");
    std::fs::write(&list, files.join("\n"))?;
    command::run(
        Command::new("sh")
            .args(["-c", "tar -cf - -T \"$1\" | tar -xf - -C \"$2\"", "sh"])
            .arg(&list)
            .arg(&src)
            .current_dir(top),
        log,
        Duration::from_secs(300),
    )?;
    if let Some(v) = version {
        let changelog = src.join("debian/changelog");
        let text = std::fs::read_to_string(&changelog)?;
        let (first, rest) = text.split_once('\n').context("empty changelog")?;
        let old = changelog_version(first).context("changelog")?;
        let bumped = first.replacen(&format!("({old})"), &format!("({v})"), 1);
        std::fs::write(&changelog, format!("{bumped}\n{rest}"))?;
    }
    command::run(
        Command::new("dpkg-buildpackage")
            .args(["-us", "-uc", "-b"])
            .env("CARGO_TARGET_DIR", top.join("target"))
            .current_dir(&src),
        log,
        Duration::from_secs(1800),
    )?;
    let parent = out.join("src");
    for e in std::fs::read_dir(&parent)?.flatten() {
        let p = e.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".deb") || name.ends_with(".buildinfo") || name.ends_with(".changes") {
            std::fs::rename(&p, out.join(&name))?;
        }
    }
    Ok(())
}

fn lint(deb: &Path, log: &Path) -> anyhow::Result<()> {
    // lintian's exit status says whether it found tags; its output says which.
    let out = command::timed(
        Command::new("lintian")
            .args(["--tag-display-limit", "0"])
            .arg(deb),
        Duration::from_secs(600),
    )
    .output()
    .context("running lintian")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::OpenOptions::new()
        .append(true)
        .open(log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .ok();
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    if !bad.is_empty() {
        bail!(
            "lintian reports {} error(s)/warning(s):\n{}",
            bad.len(),
            bad.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_and_documents_are_no_package_input() {
        assert!(is_input("src/main.rs"));
        assert!(is_input("debian/rules"));
        assert!(is_input("hooks/00vfio-early"));
        assert!(is_input("Cargo.lock"));
        assert!(!is_input("xtask/src/main.rs"));
        assert!(!is_input("tests/boot/probe.sh"));
        assert!(!is_input("README.md"));
    }

    #[test]
    fn version_from_the_changelog() {
        assert_eq!(
            changelog_version("vfio-early (0.1.0-1) unstable; urgency=medium\n").as_deref(),
            Some("0.1.0-1")
        );
    }
}
