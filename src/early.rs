//! `bind --early`: the early binder, run from the initramfs before udev. It reads the
//! kill switch, the applied config (or, in a trial boot, the trial's: see
//! [`trial_flag`]) and the machine, plans as a live bind, and binds
//! through [`crate::bind`]. It never fails and never panics outward: every problem is a
//! `vfio-early:` line in the kernel log, and the process always exits 0.
//!
//! It is the model path: cli → machine → pci → plan → bind, always downward, each input
//! read once.

use std::path::Path;

use crate::bind::{self, Outcome as BindOutcome};
use crate::config;
use crate::kmsg::Log;
use crate::machine;
use crate::paths;
use crate::plan;
use crate::root::Root;

/// More than any kernel's command line (COMMAND_LINE_SIZE is at most 4 KiB on x86).
const CMDLINE_MAX: u64 = 64 * 1024;

/// Whether the kernel command line turns the early binder off: `vfio_early=off` (or
/// `vfio-early=off`, or either quoted). Read as bytes: a command line that is not UTF-8
/// still has its kill switch.
pub fn kill_switch(cmdline: &[u8]) -> bool {
    has_flag(cmdline, &[b"vfio_early=off", b"vfio-early=off"])
}

/// Whether this is a trial boot (`apply --trial`): `vfio_early.trial` (or
/// `vfio-early.trial`, or either quoted) on the command line, read as bytes like the
/// kill switch. Only then does the early binder take the trial config.
pub fn trial_flag(cmdline: &[u8]) -> bool {
    has_flag(cmdline, &[b"vfio_early.trial", b"vfio-early.trial"])
}

/// Whether one of `flags` is an argument of the command line (quotes ignored).
fn has_flag(cmdline: &[u8], flags: &[&[u8]]) -> bool {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .map(|t| {
            t.iter()
                .copied()
                .filter(|b| *b != b'"')
                .collect::<Vec<u8>>()
        })
        .any(|t| flags.contains(&t.as_slice()))
}

/// Runs the early binder; always returns normally (the caller exits 0).
pub fn run(root: &Root, cfg_path: &Path) {
    let mut log = Log::kmsg(root);
    // Catches for real: the release profile unwinds (a build that aborts is refused).
    bind::run_guarded(&mut log, "the early binder", |log| {
        bind_early(root, cfg_path, log)
    });
}

/// The early binder's steps; every failure is logged and ends the step quietly.
pub fn bind_early(root: &Root, cfg_path: &Path, log: &mut Log) {
    let cmdline = root
        .read_bytes(paths::PROC_CMDLINE, CMDLINE_MAX)
        .unwrap_or_default();
    if kill_switch(&cmdline) {
        log.warn("disabled by vfio_early=off on the kernel command line; nothing done");
        return;
    }
    // A trial boot binds the trial config, every other boot the committed one: a failed
    // trial cannot change what the fallback boot binds.
    let trial = trial_flag(&cmdline);
    let trial_path = root.path(paths::IMAGE_TRIAL_CONFIG);
    let (cfg_path, forced_marker) = if trial {
        log.info("trial boot (vfio_early.trial): binding the trial config");
        (trial_path.as_path(), paths::TRIAL_FORCED)
    } else {
        (cfg_path, paths::FORCED)
    };
    if !cfg_path.exists() {
        if trial {
            log.warn(&format!(
                "no trial config at {} in this initramfs; nothing bound",
                cfg_path.display()
            ));
        } else {
            log.info(&format!(
                "no config at {}; nothing to do",
                cfg_path.display()
            ));
        }
        return;
    }
    let parsed = config::read_text(cfg_path).and_then(|t| config::parse(&t, cfg_path));
    let config = match parsed {
        Ok(c) => c,
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or("invalid config");
            log.error(&format!("config error, nothing bound: {first}"));
            return;
        }
    };
    // apply --force leaves a marker file of its own, which no config text can forge
    // (the trial's own, for the trial config).
    let forced = root.exists(forced_marker);
    let machine = machine::discover(root);
    // `apply` is the gate for interlocks, but it may have run where the devices were not
    // visible (a chroot, before a card was fitted): the interlocks that can be judged
    // this early (bridges, the only display) are judged again, unless apply was forced.
    // The root filesystem is not mounted yet, so that one is apply's alone.
    let opts = plan::Options {
        force: forced,
        live: true,
    };
    let plan = plan::plan(&config, &machine, opts);
    for p in &plan.problems {
        log.warn(&p.message);
    }
    if plan.targets().next().is_none() {
        log.info("the config takes no device on this boot");
        return;
    }
    bind::inject_fault("before-bind");
    let mut sys = bind::RealSysfs::new(root.clone());
    let report = bind::bind_devices(&mut sys, &plan, log);
    let bound = report
        .devices
        .iter()
        .filter(|d| matches!(d.outcome, BindOutcome::Bound | BindOutcome::AlreadyBound))
        .count();
    log.info(&format!(
        "done: {bound} of {} device(s) on vfio-pci",
        report.devices.len()
    ));
}

#[cfg(test)]
mod tests {
    use super::{kill_switch, trial_flag};

    #[test]
    fn the_trial_flag_is_a_whole_token_in_any_bytes() {
        assert!(trial_flag(b"root=/dev/vda ro vfio_early.trial panic=10"));
        assert!(trial_flag(b"\xff \"vfio-early.trial\"\n"));
        assert!(!trial_flag(b"vfio_early.trial=0x vfio_early.trials"));
        assert!(!trial_flag(b"novfio_early.trial"));
        assert!(!trial_flag(b""));
    }

    #[test]
    fn the_kill_switch_is_found_in_any_bytes() {
        assert!(kill_switch(b"root=/dev/vda ro vfio_early=off quiet"));
        assert!(kill_switch(b"vfio-early=off"));
        assert!(kill_switch(b"a=\xff\xfe \"vfio_early=off\"\n"));
        assert!(kill_switch(b"x=\x80\tvfio_early=off"));
        assert!(!kill_switch(b"vfio_early=on"));
        assert!(!kill_switch(b"novfio_early=off"));
        assert!(!kill_switch(b""));
    }
}
