//! `cargo xtask test`: every check CI runs, in the order that fails fastest: formatting,
//! lints, generated files, shellcheck on every shell script, the unit and integration
//! tests with snapshots checked (no pending, no unreferenced snapshot), a 20 s bounded
//! fuzz run, then the package (built once, linted), and at the same time its life cycle
//! in a chroot (`deb-test`) and every boot scenario (`boot-test`): the chroot's
//! debootstrap and dpkg wait on the network and the disk while the guests take the
//! cores. `--no-boot` stops before the last three, and says so. Without it, `xtask
//! images` makes the boot steps' base images from the start, beside the checks: its
//! debootstraps wait on the network and the disk while the compilers take the cores.
//!
//! Each step runs as its own process (cargo, shellcheck, or this xtask's own task), its
//! output in `target/xtask/test-<step>.log`: one line per step, and the whole log of a
//! step that failed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use xshell::{cmd, Shell};

use crate::{command, progress, tools};

struct Step {
    name: &'static str,
    what: &'static str,
    cmd: Command,
    limit: Duration,
}

pub fn run(sh: &Shell, project: &Path, no_boot: bool) -> anyhow::Result<()> {
    tools::ensure_apt(
        sh,
        &[
            ("shellcheck", "shellcheck"),
            ("grub-script-check", "grub-common"),
        ],
    )?;
    tools::ensure_cargo_tool(sh, "cargo-insta", "cargo-insta")?;
    let scripts = shell_scripts(sh)?;
    if scripts.is_empty() {
        bail!("no shell scripts found to check; the search is broken");
    }
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let own = |args: &[&str]| {
        let mut c = Command::new(&xtask);
        if progress::verbose() {
            c.arg("--verbose");
        }
        c.args(args).current_dir(project);
        c
    };
    let cargo = |args: &[&str]| {
        let mut c = Command::new("cargo");
        c.args(args).current_dir(project);
        c
    };
    let mut steps = vec![
        Step {
            name: "fmt",
            what: "cargo fmt --check",
            cmd: cargo(&["fmt", "--all", "--", "--check"]),
            limit: Duration::from_secs(120),
        },
        Step {
            name: "clippy",
            what: "cargo clippy -D warnings",
            cmd: cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--quiet",
                "--",
                "-D",
                "warnings",
            ]),
            limit: Duration::from_secs(1800),
        },
        Step {
            name: "codegen",
            what: "man pages and completion current",
            cmd: own(&["codegen", "--check"]),
            limit: Duration::from_secs(300),
        },
        Step {
            name: "shellcheck",
            what: "shellcheck on every shell script",
            cmd: {
                let mut c = Command::new("shellcheck");
                c.args(&scripts).current_dir(project);
                c
            },
            limit: Duration::from_secs(300),
        },
        Step {
            name: "tests",
            what: "unit and integration tests, insta snapshots checked",
            cmd: cargo(&[
                "insta",
                "test",
                "--workspace",
                "--check",
                "--unreferenced=reject",
                "--test-runner",
                "cargo-test",
            ]),
            limit: Duration::from_secs(1800),
        },
        Step {
            name: "fuzz",
            what: "20 s of seeded mutation on the initramfs reader and the config parser",
            cmd: own(&["fuzz", "--seconds", "20"]),
            limit: Duration::from_secs(300),
        },
    ];
    let mut together = Vec::new();
    if !no_boot {
        steps.push(Step {
            name: "deb",
            what: "the .deb, built once and linted",
            cmd: own(&["deb"]),
            limit: Duration::from_secs(2400),
        });
        together.push(Step {
            name: "deb-test",
            what: "the package's life cycle in a Debian 12 chroot",
            cmd: own(&["deb-test"]),
            limit: Duration::from_secs(2400),
        });
        together.push(Step {
            name: "boot-test",
            what: "every scenario booted in QEMU",
            cmd: own(&["boot-test"]),
            limit: Duration::from_secs(3600),
        });
    }
    let logs = project.join("target/xtask");
    let total = steps.len() + together.len();
    // The base images' debootstraps (network and disk, mostly) beside the checks.
    let mut images = if no_boot {
        None
    } else {
        tools::ensure_apt(
            sh,
            &[
                ("debootstrap", "debootstrap"),
                ("setsid", "util-linux"),
                ("pkill", "procps"),
            ],
        )?;
        Some(start_images(own(&["images"]), &logs)?)
    };
    let mut passed = 0;
    for step in steps {
        if let Err(e) = run_step(step, &logs, passed) {
            if let Some((child, _)) = &mut images {
                stop(child);
            }
            return Err(e);
        }
        passed += 1;
    }
    // Both at once; each says its line when it ends, a failure after the other ended.
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = together
            .into_iter()
            .map(|step| {
                let logs = &logs;
                scope.spawn(move || run_step(step, logs, passed))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a test step's thread panicked")))
            })
            .collect()
    });
    if let Some((mut child, log)) = images {
        let ok = child.wait().is_ok_and(|s| s.success());
        if !ok {
            progress::line(&format!(
                "test: images: making the base images beside the checks failed (log {}); \
                 deb-test and boot-test made them themselves",
                log.display()
            ));
        }
    }
    for r in results {
        r?;
    }
    if no_boot {
        progress::line(
            "SKIPPED deb, deb-test and boot-test (--no-boot): the package, its life cycle \
             and the boot scenarios were not run",
        );
    }
    progress::line(&format!("test: {total} passed, 0 failed"));
    Ok(())
}

/// Starts `images` (the xtask command line `own` made) in a session of its own, its
/// output in `logs`: each `timeout` it runs makes its own process group, so only the
/// session holds them all for [`stop`].
fn start_images(
    images: Command,
    logs: &Path,
) -> anyhow::Result<(std::process::Child, std::path::PathBuf)> {
    std::fs::create_dir_all(logs)?;
    let log = logs.join("test-images.log");
    let f = std::fs::File::create(&log)?;
    let mut cmd = Command::new("setsid");
    cmd.arg(images.get_program()).args(images.get_args());
    if let Some(dir) = images.get_current_dir() {
        cmd.current_dir(dir);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f);
    let child = cmd.spawn().context("starting `xtask images`")?;
    progress::line(&format!(
        "test: images: the base images' debootstraps run beside the checks (log {})",
        log.display()
    ));
    Ok((child, log))
}

/// Stops the session [`start_images`] started (setsid makes the spawned process its
/// leader: the session id is its pid); each `timeout` in it passes the signal on to
/// its debootstrap. Not a negative pid to kill(1): procps-ng's (Debian 12's 4.0.2)
/// runs `kill -TERM -<pgid>` as `kill(-1, SIGTERM)`, every process there is.
fn stop(child: &mut std::process::Child) {
    let _ = Command::new("pkill")
        .args(["-TERM", "-s", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Runs one step with its log in `logs`; on failure prints the whole log and says how
/// many passed before it.
fn run_step(mut step: Step, logs: &Path, passed: usize) -> anyhow::Result<()> {
    let log = logs.join(format!("test-{}.log", step.name));
    let _ = std::fs::remove_file(&log);
    let phase = progress::start(&format!("test: {}", step.name), step.what);
    let code = command::status(&mut step.cmd, &log, step.limit)?;
    if code != Some(0) {
        drop(phase);
        let text = std::fs::read(&log).unwrap_or_default();
        progress::line(&format!(
            "FAILED {} ({}); its log, {}:",
            step.name,
            step.what,
            log.display()
        ));
        progress::raw(&text);
        progress::line(&format!("test: {passed} passed, 1 failed"));
        bail!(
            "step {} failed (exit {code:?}); log {}",
            step.name,
            log.display()
        );
    }
    let last = command::tail(&log, 1);
    let last = last.trim();
    phase.done(&if last.is_empty() || last.starts_with("###") {
        step.what.to_string()
    } else {
        format!("{}: {last}", step.what)
    });
    Ok(())
}

/// Every tracked file that is a POSIX sh or bash script, by shebang.
fn shell_scripts(sh: &Shell) -> anyhow::Result<Vec<String>> {
    let files = cmd!(
        sh,
        "timeout 120 git ls-files --cached --others --exclude-standard"
    )
    .read()?;
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
