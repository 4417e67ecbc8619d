//! `cargo xtask deb [--version V]`: builds `target/debian/vfio-early_<version>_amd64.deb`
//! with the real Debian tooling (dpkg-buildpackage and debhelper) from a copy of the
//! tracked tree, so the checkout stays clean; the Rust build reuses the project's target
//! directory. Then lintian must report no error and no warning. Prints the package and
//! binary sizes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use xshell::{cmd, Shell};

use crate::tools;

/// Builds the package; returns the path of the .deb.
/// Builds the package; `lint` runs lintian on it (the `deb` task and the package test
/// do; the boot harness, which only installs it, skips the half minute).
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
    let src = out.join("src/vfio-early");
    if src.exists() {
        sh.remove_path(&src)?;
    }
    sh.create_dir(&src)?;
    eprintln!(
        "xtask: deb: copying the tracked tree into {}",
        src.display()
    );
    let files = cmd!(sh, "git ls-files -co --exclude-standard").read()?;
    let list = out.join("src/files.txt");
    sh.write_file(&list, files)?;
    let src_s = src.display().to_string();
    let list_s = list.display().to_string();
    cmd!(
        sh,
        "sh -c 'tar -cf - -T \"$1\" | tar -xf - -C \"$2\"' sh {list_s} {src_s}"
    )
    .run()?;
    if let Some(v) = version {
        let changelog = src.join("debian/changelog");
        let text = std::fs::read_to_string(&changelog)?;
        let (first, rest) = text.split_once('\n').context("empty changelog")?;
        let bumped = first.replacen(
            &first[first.find('(').context("changelog")?..=first.find(')').context("changelog")?],
            &format!("({v})"),
            1,
        );
        std::fs::write(&changelog, format!("{bumped}\n{rest}"))?;
    }
    eprintln!("xtask: deb: dpkg-buildpackage -b (release build of the binary; a few minutes cold)");
    {
        let _dir = sh.push_dir(&src);
        let _target = sh.push_env("CARGO_TARGET_DIR", top.join("target"));
        cmd!(sh, "timeout 1800 dpkg-buildpackage -us -uc -b").run()?;
    }
    let parent = out.join("src");
    let mut debs = Vec::new();
    for e in std::fs::read_dir(&parent)?.flatten() {
        let p = e.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".deb") || name.ends_with(".buildinfo") || name.ends_with(".changes") {
            let dest = out.join(&name);
            std::fs::rename(&p, &dest)?;
            if name.ends_with(".deb") {
                debs.push(dest);
            }
        }
    }
    let [deb] = debs.as_slice() else {
        bail!(
            "expected one .deb from dpkg-buildpackage, found {}",
            debs.len()
        );
    };
    if lint {
        self::lint(sh, deb)?;
    }
    report_sizes(sh, deb, &top)?;
    Ok(deb.clone())
}

fn lint(sh: &Shell, deb: &Path) -> anyhow::Result<()> {
    eprintln!("xtask: deb: lintian");
    let out = cmd!(sh, "timeout 600 lintian --tag-display-limit 0 {deb}")
        .ignore_status()
        .read()?;
    let bad: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    for l in out.lines() {
        eprintln!("  {l}");
    }
    if !bad.is_empty() {
        bail!("lintian reports {} error(s)/warning(s)", bad.len());
    }
    eprintln!("xtask: deb: lintian: no errors, no warnings");
    Ok(())
}

fn report_sizes(sh: &Shell, deb: &Path, top: &Path) -> anyhow::Result<()> {
    let deb_size = std::fs::metadata(deb)?.len();
    let bin = top.join("target/release/vfio-early");
    let bin_size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let installed = cmd!(sh, "dpkg-deb -f {deb} Installed-Size").read()?;
    eprintln!(
        "xtask: deb: {} — package {} KiB, binary {} KiB, installed {} KiB",
        deb.display(),
        deb_size / 1024,
        bin_size / 1024,
        installed.trim()
    );
    Ok(())
}
