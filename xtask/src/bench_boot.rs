//! The boot half of `cargo xtask bench`, from one run of the boot harness:
//! - where a boot's time goes: scenario 1's image booted with vfio-early and with
//!   `vfio_early=off` (`--boots` each; `--matrix` adds every scenario), the phase table
//!   of those boots, and their median guest time (QEMU start to exit) against a bare
//!   reference boot measured in the same run: the same kernel and initramfs, the same
//!   machine, booted only to its first userspace process (`rdinit=` a program that
//!   powers off at once);
//! - what vfio-early costs a boot: the initramfs stage (`Run /init` to the root
//!   filesystem mounted) with and without it, and the early bind's own span (first to
//!   last `vfio-early:` line);
//! - the bytes vfio-early adds to the compressed initramfs: the initramfs before the
//!   package was installed against the one `apply` built, less what the vfio modules
//!   take.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use xshell::Shell;

use crate::matrix::Run;
use crate::phases::{self, Times};
use crate::qemu::Report;
use crate::{progress, qemu, scenario};

/// The bare reference's first userspace process: klibc's `poweroff`, which every
/// initramfs-tools image carries.
const BARE_INIT: &str = "/bin/poweroff";

const SCENARIO: &str = "tests/boot/scenarios/01-intel-nic-by-id.toml";

/// Seconds of the first kernel log line containing `needle`.
fn stamp(report: &Report, needle: &str) -> Option<f64> {
    report
        .section("kmsg")
        .iter()
        .find(|l| l.contains(needle))
        .and_then(|l| kmsg_seconds(l))
}

fn last_stamp(report: &Report, needle: &str) -> Option<f64> {
    report
        .section("kmsg")
        .iter()
        .rev()
        .find(|l| l.contains(needle))
        .and_then(|l| kmsg_seconds(l))
}

fn kmsg_seconds(line: &str) -> Option<f64> {
    phases::kmsg_seconds(line)
}

struct Stage {
    stage: f64,
    bind: Option<f64>,
    /// The part of `bind` spent in `modprobe vfio-pci` (from the line before
    /// `loaded vfio-pci` to it): the module load any vfio host pays.
    modprobe: Option<f64>,
}

/// Seconds between the `vfio-early:` line before `loaded vfio-pci` and that line.
fn modprobe_span(report: &Report) -> Option<f64> {
    let ours: Vec<&String> = report
        .section("kmsg")
        .iter()
        .filter(|l| l.contains("vfio-early:"))
        .collect();
    let i = ours
        .iter()
        .position(|l| l.contains("vfio-early: loaded vfio-pci"))?;
    let before = kmsg_seconds(ours.get(i.checked_sub(1)?)?)?;
    Some(kmsg_seconds(ours[i])? - before)
}

fn stage_of(report: &Report) -> anyhow::Result<Stage> {
    let start = stamp(report, "Run /init as init process").context("no `Run /init` line")?;
    let end = stamp(report, "EXT4-fs (vda): mounted").context("no root mount line")?;
    let bind = match (
        stamp(report, "vfio-early:"),
        last_stamp(report, "vfio-early:"),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(Stage {
        stage: end - start,
        bind,
        modprobe: modprobe_span(report),
    })
}

pub fn run(sh: &Shell, project: &Path, boots: usize, matrix: bool) -> anyhow::Result<()> {
    let base = scenario::load(&project.join(SCENARIO))?;
    let mut list = Vec::new();
    for i in 0..boots {
        let mut with = base.clone();
        with.path = project.join(format!("target/bench/boot/with-{i}.toml"));
        let mut without = base.clone();
        without.path = project.join(format!("target/bench/boot/without-{i}.toml"));
        without.setup = Some(
            "sed -i 's/^GRUB_CMDLINE_LINUX=\"/GRUB_CMDLINE_LINUX=\"vfio_early=off /' /etc/default/grub"
                .into(),
        );
        // With the binder off the NIC stays on e1000e.
        without.expect = scenario::Expect {
            cmdline: vec!["vfio_early=off".into()],
            ..Default::default()
        };
        list.push(with);
        list.push(without);
    }
    if matrix {
        list.extend(scenario::load_dir(&project.join("tests/boot/scenarios"))?);
    }
    let runs = crate::matrix::run_scenarios(sh, project, &list, 2, true, Default::default())?;
    for r in &runs {
        if !r.failures.is_empty() {
            anyhow::bail!("bench boot {} failed: {:?}", r.name, r.failures);
        }
    }
    let first = runs
        .iter()
        .find(|r| r.name.starts_with("with-"))
        .context("no boot with vfio-early")?;
    let bare = bare_boots(project, first, boots.max(1))?;
    print_phases(&runs, &bare);
    let with: Vec<Stage> = runs
        .iter()
        .filter(|r| r.name.starts_with("with-"))
        .filter_map(Run::report)
        .map(stage_of)
        .collect::<anyhow::Result<_>>()?;
    let without: Vec<Stage> = runs
        .iter()
        .filter(|r| r.name.starts_with("without-"))
        .filter_map(Run::report)
        .map(stage_of)
        .collect::<anyhow::Result<_>>()?;
    print_overhead(boots, &with, &without);
    print_userspace(&runs);
    // Bytes: the layer's initramfs (the package installed, nothing configured, so no
    // file of ours) against the one apply built, both with the layer's module list.
    let dir = &first.dir;
    let after = std::fs::metadata(dir.join("initrd.img"))?.len();
    let deb = crate::deb::build(sh, None, false)?;
    let layer = crate::layer::ensure(
        project,
        &deb,
        scenario::Distro::Bookworm,
        scenario::Generator::InitramfsTools,
    )?
    .tree;
    let release = crate::image::kernel_release(&layer)?;
    let before_path = layer.join(format!("boot/initrd.img-{release}"));
    let before = std::fs::metadata(&before_path)?.len();
    let vfio_before = vfio_files(&before_path)?;
    let vfio_after = vfio_files(&dir.join("initrd.img"))?;
    progress::line(&format!(
        "  compressed initramfs: {} bytes before apply, {} after: +{} bytes",
        before,
        after,
        after as i64 - before as i64
    ));
    if vfio_before == vfio_after {
        progress::line(&format!(
            "  vfio module files in the image: {vfio_after}, before and after, so all of the \
             growth is vfio-early's (target < 1 MiB)"
        ));
    } else {
        progress::line(&format!(
            "  vfio module files in the image: {vfio_before} before, {vfio_after} after; the \
             growth includes those modules (target for vfio-early's own bytes < 1 MiB)"
        ));
    }
    Ok(())
}

/// Boots the kernel and initramfs of `like` (its machine, devices and command line)
/// `n` times, two at a time like the scenarios, to the first userspace process only.
fn bare_boots(project: &Path, like: &Run, n: usize) -> anyhow::Result<Vec<Duration>> {
    let s = scenario::load(&project.join(SCENARIO))?;
    let append = format!(
        "{} rdinit={BARE_INIT}",
        std::fs::read_to_string(like.dir.join("cmdline"))?.trim()
    );
    let kernel = like.dir.join("vmlinuz");
    let initrd = like.dir.join("initrd.img");
    let dir = project.join("target/bench/boot/bare");
    std::fs::create_dir_all(&dir)?;
    let mut out = Vec::new();
    for pair in (0..n).collect::<Vec<_>>().chunks(2) {
        let results: Vec<anyhow::Result<Duration>> = std::thread::scope(|scope| {
            let handles: Vec<_> = pair
                .iter()
                .map(|i| {
                    let (s, kernel, initrd, append, dir) = (&s, &kernel, &initrd, &append, &dir);
                    scope.spawn(move || {
                        let phase = progress::start(
                            &format!("bare-{i}"),
                            "booting to the first userspace process",
                        );
                        let o = qemu::run(
                            &qemu::Boot {
                                loader: qemu::Loader::Direct {
                                    kernel,
                                    initrd,
                                    append,
                                },
                                disk: None,
                                iommu: s.iommu,
                                devices: &s.devices,
                                extra: &s.qemu_args,
                                serial_log: &dir.join(format!("serial-{i}.log")),
                                timeout: Duration::from_secs(300),
                                memory_mib: 1024,
                            },
                            &dir.join(format!("qemu-{i}.log")),
                            Some(&phase),
                        )?;
                        if o.timed_out {
                            anyhow::bail!("the bare boot did not power off within 300 s");
                        }
                        phase.done("bare reference: QEMU start to exit");
                        Ok(o.elapsed)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a boot thread panicked")))
                })
                .collect()
        });
        for r in results {
            out.push(r?);
        }
    }
    Ok(out)
}

/// The phase table of the boots and their median guest time against the bare one.
fn print_phases(runs: &[Run], bare: &[Duration]) {
    let all: Vec<Times> = runs.iter().map(Run::times).collect();
    progress::line("");
    progress::line(&format!(
        "boot phases (TCG, {} boots, 2 at a time, same run):",
        all.len()
    ));
    for l in phases::table(&all.iter().collect::<Vec<_>>()) {
        progress::line(&format!("  {l}"));
    }
    let secs = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let bare: Vec<f64> = bare.iter().map(Duration::as_secs_f64).collect();
    let bare_median = phases::median(&bare);
    progress::line(&format!(
        "  bare reference (same kernel and initramfs to its first userspace process): median {bare_median:.1} s ({})",
        secs(&bare)
    ));
    for (label, pick) in [
        ("with vfio-early", "with-"),
        ("vfio_early=off", "without-"),
        ("scenarios", ""),
    ] {
        let guests: Vec<f64> = runs
            .iter()
            .filter(|r| {
                if pick.is_empty() {
                    !r.name.starts_with("with") && !r.name.starts_with("without")
                } else {
                    r.name.starts_with(pick)
                }
            })
            .map(|r| r.times().guest.as_secs_f64())
            .collect();
        if guests.is_empty() {
            continue;
        }
        let m = phases::median(&guests);
        progress::line(&format!(
            "  {label:<16} median {m:.1} s = {:.2}x the bare boot (target <= 2x)  ({})",
            m / bare_median.max(1e-9),
            secs(&guests)
        ));
    }
}

fn print_overhead(boots: usize, with: &[Stage], without: &[Stage]) {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let with_stage = mean(&with.iter().map(|s| s.stage).collect::<Vec<_>>());
    let without_stage = mean(&without.iter().map(|s| s.stage).collect::<Vec<_>>());
    let bind = mean(&with.iter().filter_map(|s| s.bind).collect::<Vec<_>>());
    let modprobe = mean(&with.iter().filter_map(|s| s.modprobe).collect::<Vec<_>>());
    let pct = |x: f64| 100.0 * x / with_stage.max(1e-9);
    for l in [
        String::new(),
        format!("vfio-early's cost (TCG, Debian 12, initramfs-tools; {boots} boot(s) each, same run):"),
        format!(
            "  initramfs stage, with vfio-early:     {with_stage:>7.3} s  ({})",
            list_secs(with)
        ),
        format!(
            "  initramfs stage, vfio_early=off:      {without_stage:>7.3} s  ({})",
            list_secs(without)
        ),
        format!(
            "  difference:                           {:>7.3} s  = {:.1}% of the stage (target < 2%)",
            with_stage - without_stage,
            100.0 * (with_stage - without_stage) / without_stage.max(1e-9)
        ),
        format!(
            "  early bind span (first..last line):   {bind:>7.3} s  = {:.1}% of the stage",
            pct(bind)
        ),
        format!(
            "    of which `modprobe vfio-pci`:        {modprobe:>7.3} s  (the module load any vfio host pays)"
        ),
        format!(
            "    the rest, vfio-early's own work:     {:>7.3} s  = {:.1}% of the stage",
            bind - modprobe,
            pct(bind - modprobe)
        ),
    ] {
        progress::line(&l);
    }
}

fn list_secs(v: &[Stage]) -> String {
    v.iter()
        .map(|s| format!("{:.3}", s.stage))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many vfio module files an image holds (our reader).
fn vfio_files(image: &Path) -> anyhow::Result<usize> {
    let mut out = Vec::new();
    vfio_early::initramfs::list::list_image(image, &mut out)
        .with_context(|| format!("listing {}", image.display()))?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| l.contains("/drivers/vfio/") && l.contains(".ko"))
        .count())
}

/// The marks that split the userspace phase (systemd's start on the root to the
/// probe's start), from the root's systemd's own lines in the kernel log, and what
/// each span is.
const USERSPACE_MARKS: [(&str, &str); 4] = [
    (
        "Queued start job for default target",
        "systemd's set-up, generators, loading units",
    ),
    (
        "Started systemd-udevd.service",
        "the early units: modules-load, remount-fs, udevd's start",
    ),
    ("Starting vfio-early-probe.service", "to the probe's unit"),
    (
        "vfio-early-probe: start",
        "udev's replay of the PCI devices, their drivers loaded",
    ),
];

/// Seconds of each span between systemd's start on the root and the marks above, or
/// `None` when a mark is missing.
fn userspace_split(report: &Report) -> Option<Vec<f64>> {
    let mut at = last_stamp(report, phases::SYSTEMD_START)?;
    let mut spans = Vec::new();
    for (mark, _) in USERSPACE_MARKS {
        let t = last_stamp(report, mark)?;
        spans.push(t - at);
        at = t;
    }
    Some(spans)
}

/// Where the userspace phase goes, mean over the boots with vfio-early and with it
/// off: what is left of a boot above the bare reference is mostly this.
fn print_userspace(runs: &[Run]) {
    let splits: Vec<Vec<f64>> = runs
        .iter()
        .filter(|r| r.name.starts_with("with"))
        .filter_map(Run::report)
        .filter_map(userspace_split)
        .collect();
    if splits.is_empty() {
        progress::line("  userspace split: no boot logged all of its marks");
        return;
    }
    progress::line("");
    progress::line(&format!(
        "userspace, systemd's start to the probe's (mean of {} boots with and without vfio-early):",
        splits.len()
    ));
    for (i, (mark, what)) in USERSPACE_MARKS.iter().enumerate() {
        let mean = splits.iter().map(|s| s[i]).sum::<f64>() / splits.len() as f64;
        progress::line(&format!("  {mean:6.3} s  {what} (to `{mark}`)"));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kmsg_timestamps() {
        assert_eq!(
            super::kmsg_seconds("[    6.127671] vfio-early: x"),
            Some(6.127671)
        );
        assert_eq!(super::kmsg_seconds("no stamp"), None);
    }

    #[test]
    fn userspace_is_split_at_systemd_s_own_lines() {
        let report = crate::qemu::parse_report(
            "@@ == kmsg\n\
             @@ [    2.000000] systemd[1]: systemd 252 running in system mode (+PAM)\n\
             @@ [    2.500000] systemd[1]: Queued start job for default target vfio-early-probe.target.\n\
             @@ [    3.250000] systemd[1]: Started systemd-udevd.service - Rule-based Manager.\n\
             @@ [    3.300000] systemd[1]: Starting vfio-early-probe.service - probe...\n\
             @@ [    4.000000] vfio-early-probe: start\n\
             @@ == end\n",
        );
        let spans = super::userspace_split(&report).unwrap();
        let want = [0.5, 0.75, 0.05, 0.7];
        assert_eq!(spans.len(), want.len());
        for (got, want) in spans.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{spans:?}");
        }
        let without_udevd = crate::qemu::parse_report(
            "@@ == kmsg\n@@ [    2.0] systemd[1]: systemd 252 running in system mode\n@@ == end\n",
        );
        assert!(super::userspace_split(&without_udevd).is_none());
    }
}
