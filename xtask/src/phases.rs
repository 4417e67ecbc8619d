//! Where a boot's time goes, phase by phase. The host-side phases (the image layer,
//! apply, the disk) are timed by the harness around its own steps. The guest-side ones
//! come from the kernel log timestamps the probe reports (`Run /init`, systemd's start
//! on the root filesystem, the probe's own start and end markers), placed on the host
//! clock through the host arrival time of the serial line that carried the probe's end
//! marker; so firmware (QEMU start to the kernel's clock zero) and power-off (the end
//! marker to QEMU's exit) are measured too, and the guest phases add up to the QEMU
//! wall time. Kept per boot: a scenario may one day boot several times.

use std::collections::BTreeMap;
use std::time::Duration;

/// Written to the kernel log by the probe as its first and last acts.
pub const PROBE_START: &str = "vfio-early-probe: start";
pub const PROBE_END: &str = "vfio-early-probe: end";
/// The kernel starts the initramfs's init.
pub const RUN_INIT: &str = "Run /init as init process";
/// systemd starts; its last start is the one on the real root (dracut's initramfs runs
/// systemd too).
pub const SYSTEMD_START: &str = "running in system mode";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Layer,
    Apply,
    Disk,
    Firmware,
    Kernel,
    Initramfs,
    Userspace,
    Probe,
    Poweroff,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Layer,
        Phase::Apply,
        Phase::Disk,
        Phase::Firmware,
        Phase::Kernel,
        Phase::Initramfs,
        Phase::Userspace,
        Phase::Probe,
        Phase::Poweroff,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Layer => "layer",
            Phase::Apply => "apply",
            Phase::Disk => "disk",
            Phase::Firmware => "firmware",
            Phase::Kernel => "kernel",
            Phase::Initramfs => "initramfs",
            Phase::Userspace => "userspace",
            Phase::Probe => "probe",
            Phase::Poweroff => "poweroff",
        }
    }

    /// What the phase spans, for tables.
    pub fn what(self) -> &'static str {
        match self {
            Phase::Layer => "base image (debootstrap unless cached), package, probe",
            Phase::Apply => "tree copied, config, setup, `vfio-early apply`",
            Phase::Disk => "the scenario's root disk",
            Phase::Firmware => {
                "QEMU start to the kernel's clock zero (firmware, loader, decompression)"
            }
            Phase::Kernel => "kernel to `Run /init`",
            Phase::Initramfs => "initramfs stage, to systemd on the root",
            Phase::Userspace => "systemd to the probe's start",
            Phase::Probe => "the probe's report",
            Phase::Poweroff => "report end to QEMU exit",
        }
    }
}

/// One boot's phases (those that could be measured) and notes such as "cached".
#[derive(Debug, Default, Clone)]
pub struct Times {
    pub spans: BTreeMap<Phase, Duration>,
    pub notes: BTreeMap<Phase, String>,
    /// QEMU start to exit.
    pub guest: Duration,
}

impl Times {
    pub fn set(&mut self, p: Phase, d: Duration) {
        self.spans.insert(p, d);
    }

    /// Sets `p` to the span from `from` to `to` seconds, when that is not negative.
    pub fn between(&mut self, p: Phase, from: f64, to: f64) {
        if let Ok(d) = Duration::try_from_secs_f64(to - from) {
            self.set(p, d);
        }
    }

    pub fn note(&mut self, p: Phase, text: &str) {
        self.notes.insert(p, text.to_string());
    }

    /// `layer cached · apply 12.0 · … · probe 6.2 · poweroff 0.3`
    pub fn line(&self) -> String {
        let mut parts = Vec::new();
        for p in Phase::ALL {
            let span = self.spans.get(&p);
            let note = self.notes.get(&p);
            match (span, note) {
                (Some(d), Some(n)) => {
                    parts.push(format!("{} {n} {:.1}", p.name(), d.as_secs_f64()))
                }
                (Some(d), None) => parts.push(format!("{} {:.1}", p.name(), d.as_secs_f64())),
                (None, Some(n)) => parts.push(format!("{} {n}", p.name())),
                (None, None) => {}
            }
        }
        parts.join(" · ")
    }
}

/// Seconds of a kernel log line: `[    6.127671] text` → 6.127671 (the probe's `@@ `
/// prefix allowed).
pub fn kmsg_seconds(line: &str) -> Option<f64> {
    let line = line.strip_prefix("@@ ").unwrap_or(line);
    // A console line may start with a terminal's escape sequences (OVMF and
    // systemd-boot leave some): the stamp is the first `[ seconds]` in it.
    line.match_indices('[').find_map(|(at, _)| {
        let inner = &line[at + 1..];
        let stamp = inner.split(']').next()?;
        let t = stamp.trim();
        (t.contains('.') && !stamp.contains('[')).then(|| t.parse().ok())?
    })
}

fn first(kmsg: &[String], needle: &str) -> Option<f64> {
    kmsg.iter()
        .find(|l| l.contains(needle))
        .and_then(|l| kmsg_seconds(l))
}

fn last(kmsg: &[String], needle: &str) -> Option<f64> {
    kmsg.iter()
        .rev()
        .find(|l| l.contains(needle))
        .and_then(|l| kmsg_seconds(l))
}

/// The guest phases of one boot from its kernel log (the probe's `kmsg` section), its
/// serial lines with their host arrival times, and QEMU's wall time. A phase whose
/// marker is missing is left out; without systemd (the fast tier) the initramfs stage
/// runs to the probe's start.
pub fn guest(kmsg: &[String], serial: &[(Duration, String)], total: Duration) -> Times {
    let mut t = Times {
        guest: total,
        ..Times::default()
    };
    let init = first(kmsg, RUN_INIT);
    let systemd = last(kmsg, SYSTEMD_START);
    let start = first(kmsg, PROBE_START);
    let end = first(kmsg, PROBE_END);
    if let Some(i) = init {
        t.set(Phase::Kernel, Duration::from_secs_f64(i.max(0.0)));
    }
    match (init, systemd, start) {
        (Some(i), Some(s), Some(p)) => {
            t.between(Phase::Initramfs, i, s);
            t.between(Phase::Userspace, s, p);
        }
        (Some(i), None, Some(p)) => {
            t.between(Phase::Initramfs, i, p);
        }
        _ => {}
    }
    if let (Some(s), Some(e)) = (start, end) {
        t.between(Phase::Probe, s, e);
    }
    // The kernel's clock zero on the host clock, from the earliest serial line that
    // carries a kernel timestamp and a mark (the kernel prints the start mark on the
    // console): it arrived at `host`, `ts` seconds after that zero. The earliest, as a
    // guest clock that lags behind (TCG on a loaded host) errs the least there.
    let stamped = |mark: &str| {
        serial
            .iter()
            .find(|(_, l)| l.contains(mark) && kmsg_seconds(l).is_some())
            .and_then(|(at, l)| Some((at.as_secs_f64(), kmsg_seconds(l)?)))
    };
    if let Some((host, ts)) = stamped(PROBE_START).or_else(|| stamped(PROBE_END)) {
        t.between(Phase::Firmware, 0.0, host - ts);
    }
    // Power-off: from the end mark's line to QEMU's exit, on the host clock.
    if let Some((host, _)) = stamped(PROBE_END) {
        t.between(Phase::Poweroff, host, total.as_secs_f64());
    }
    t
}

/// The table that ends a matrix: each phase summed over the boots, its mean and its
/// longest.
pub fn table(all: &[&Times]) -> Vec<String> {
    let mut out = vec![format!(
        "{:<10} {:>9} {:>7} {:>7}  {}",
        "phase", "total s", "mean s", "max s", "what"
    )];
    for p in Phase::ALL {
        let spans: Vec<f64> = all
            .iter()
            .filter_map(|t| t.spans.get(&p))
            .map(Duration::as_secs_f64)
            .collect();
        if spans.is_empty() {
            continue;
        }
        let sum: f64 = spans.iter().sum();
        let max = spans.iter().cloned().fold(0.0, f64::max);
        out.push(format!(
            "{:<10} {:>9.1} {:>7.1} {:>7.1}  {}",
            p.name(),
            sum,
            sum / spans.len() as f64,
            max,
            p.what()
        ));
    }
    let guests: Vec<f64> = all
        .iter()
        .filter(|t| !t.guest.is_zero())
        .map(|t| t.guest.as_secs_f64())
        .collect();
    if !guests.is_empty() {
        let sum: f64 = guests.iter().sum();
        out.push(format!(
            "{:<10} {:>9.1} {:>7.1} {:>7.1}  QEMU start to exit (median {:.1} s)",
            "guest",
            sum,
            sum / guests.len() as f64,
            guests.iter().cloned().fold(0.0, f64::max),
            median(&guests)
        ));
    }
    out
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_stamp_after_terminal_escapes_is_found() {
        let line = "\u{1b}[!p\u{1b}]104\u{7}\u{1b}[?7h[   31.230010] vfio-early-probe: start";
        assert_eq!(kmsg_seconds(line), Some(31.23001));
        assert_eq!(kmsg_seconds("@@ [    8.500000] x"), Some(8.5));
        assert_eq!(kmsg_seconds("no stamp [here]"), None);
    }

    #[test]
    fn guest_phases_add_up_to_the_wall_time() {
        let kmsg = lines(&[
            "[    3.000000] Run /init as init process",
            "[    6.000000] systemd[1]: systemd 252 running in system mode (+PAM)",
            "[    8.500000] vfio-early-probe: start",
            "[   11.000000] vfio-early-probe: end",
        ]);
        let serial = vec![
            (Duration::from_secs(5), "@@ == cmdline".to_string()),
            (
                Duration::from_secs_f64(10.0),
                "[    8.500000] vfio-early-probe: start".to_string(),
            ),
            (
                Duration::from_secs_f64(12.5),
                "@@ [   11.000000] vfio-early-probe: end".to_string(),
            ),
        ];
        let t = guest(&kmsg, &serial, Duration::from_secs(13));
        let s = |p| t.spans[&p].as_secs_f64();
        assert!((s(Phase::Firmware) - 1.5).abs() < 1e-9);
        assert!((s(Phase::Kernel) - 3.0).abs() < 1e-9);
        assert!((s(Phase::Initramfs) - 3.0).abs() < 1e-9);
        assert!((s(Phase::Userspace) - 2.5).abs() < 1e-9);
        assert!((s(Phase::Probe) - 2.5).abs() < 1e-9);
        assert!((s(Phase::Poweroff) - 0.5).abs() < 1e-9);
        let sum: f64 = t.spans.values().map(Duration::as_secs_f64).sum();
        assert!((sum - 13.0).abs() < 1e-9);
    }

    #[test]
    fn dracut_runs_systemd_twice_and_the_last_start_counts() {
        let kmsg = lines(&[
            "[    2.0] Run /init as init process",
            "[    2.5] systemd[1]: systemd 257 running in system mode",
            "[    5.0] systemd[1]: systemd 257 running in system mode",
            "[    6.0] vfio-early-probe: start",
        ]);
        let t = guest(&kmsg, &[], Duration::from_secs(9));
        assert_eq!(t.spans[&Phase::Initramfs], Duration::from_secs(3));
        assert_eq!(t.spans[&Phase::Userspace], Duration::from_secs(1));
        assert!(!t.spans.contains_key(&Phase::Firmware));
    }

    #[test]
    fn without_systemd_the_initramfs_stage_runs_to_the_probe() {
        let kmsg = lines(&[
            "[ 2.0] Run /init as init process",
            "[ 3.5] vfio-early-probe: start",
        ]);
        let t = guest(&kmsg, &[], Duration::from_secs(5));
        assert_eq!(t.spans[&Phase::Initramfs], Duration::from_millis(1500));
        assert!(!t.spans.contains_key(&Phase::Userspace));
    }

    #[test]
    fn a_line_and_a_table() {
        let mut t = Times::default();
        t.note(Phase::Layer, "cached");
        t.set(Phase::Apply, Duration::from_secs(2));
        t.guest = Duration::from_secs(10);
        assert_eq!(t.line(), "layer cached · apply 2.0");
        let table = table(&[&t, &t]);
        assert!(table[1].starts_with("apply"), "{table:?}");
        assert!(table.last().is_some_and(|l| l.contains("median 10.0 s")));
    }

    #[test]
    fn kmsg_timestamps() {
        assert_eq!(kmsg_seconds("[    6.127671] vfio-early: x"), Some(6.127671));
        assert_eq!(kmsg_seconds("@@ [    1.5] x"), Some(1.5));
        assert_eq!(kmsg_seconds("no stamp"), None);
    }
}
