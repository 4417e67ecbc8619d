//! `cargo xtask test`: every check CI runs, in the order that fails fastest: formatting,
//! lints, shellcheck on every shell script, the unit and integration tests with
//! snapshots checked (no pending, no unreferenced snapshot), a 20 s bounded fuzz run,
//! then the package's life cycle in a chroot (`deb-test`) and every boot scenario
//! (`boot-test`).
//! `--no-boot` stops before the last two, and says so.

use anyhow::Context;
use xshell::{cmd, Shell};

use crate::tools;

pub fn run(sh: &Shell, project: &std::path::Path, no_boot: bool) -> anyhow::Result<()> {
    tools::ensure_apt(sh, &[("shellcheck", "shellcheck")])?;
    tools::ensure_cargo_tool(sh, "cargo-insta", "cargo-insta")?;

    step("cargo fmt --check");
    cmd!(sh, "cargo fmt --all -- --check").run()?;
    step("cargo clippy");
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --quiet -- -D warnings"
    )
    .run()?;
    step("generated files current");
    crate::codegen::run(true)?;
    step("shellcheck");
    let scripts = shell_scripts(sh)?;
    if scripts.is_empty() {
        anyhow::bail!("no shell scripts found to check; the search is broken");
    }
    let n = scripts.len();
    cmd!(sh, "shellcheck {scripts...}").run()?;
    eprintln!("xtask: shellcheck clean on {n} scripts");
    step("tests (insta snapshots checked)");
    cmd!(
        sh,
        "cargo insta test --workspace --check --unreferenced=reject --test-runner cargo-test"
    )
    .run()
    .context("tests failed")?;
    step("fuzz: 20 s of seeded mutation on the initramfs reader and the config parser");
    crate::fuzz::run(project, 20, u64::MAX, 1)?;
    if no_boot {
        eprintln!(
            "xtask: SKIPPED deb-test and boot-test (--no-boot): the package life cycle \
             and the boot scenarios were not run"
        );
        return Ok(());
    }
    step("deb-test: the package in a Debian 12 chroot");
    crate::deb_test::run(sh, project)?;
    step("boot-test: every scenario booted in QEMU");
    crate::boot_test::run(
        sh,
        project,
        crate::boot_test::Options {
            scenarios: Vec::new(),
            jobs: 2,
            keep: false,
        },
    )
}

fn step(name: &str) {
    eprintln!("xtask: == {name}");
}

/// Every tracked file that is a POSIX sh or bash script, by shebang.
fn shell_scripts(sh: &Shell) -> anyhow::Result<Vec<String>> {
    let files = cmd!(sh, "git ls-files --cached --others --exclude-standard").read()?;
    Ok(files
        .lines()
        .filter(|f| {
            std::fs::read(f)
                .map(|b| {
                    b.starts_with(b"#!/bin/sh")
                        || b.starts_with(b"#!/usr/bin/env bash")
                        || b.starts_with(b"#!/bin/bash")
                })
                .unwrap_or(false)
        })
        .map(str::to_string)
        .collect())
}
