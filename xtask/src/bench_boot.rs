//! The boot half of `cargo xtask bench`: what vfio-early costs a real boot, from one run
//! of the boot harness. Scenario 1's image is booted twice, with vfio-early and with
//! `vfio_early=off` on the command line (the same image, the same run), and the kernel
//! log timestamps give the initramfs stage (`Run /init` to the root filesystem mounted)
//! and the early bind's own span (first to last `vfio-early:` line). The bytes
//! vfio-early adds to the compressed initramfs are measured on the same images: the
//! initramfs before the package was installed against the one `apply` built, less what
//! the vfio modules take.

use std::path::Path;

use anyhow::Context;
use xshell::Shell;

use crate::qemu::Report;
use crate::scenario;

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

/// `[    6.127671] text` → 6.127671
pub fn kmsg_seconds(line: &str) -> Option<f64> {
    let inner = line.trim_start().strip_prefix('[')?;
    inner.split(']').next()?.trim().parse().ok()
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

pub fn run(sh: &Shell, project: &Path, boots: usize) -> anyhow::Result<()> {
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
    let runs = crate::boot_test::run_scenarios(sh, project, &list, 2, true)?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for r in &runs {
        if !r.failures.is_empty() {
            anyhow::bail!("bench boot {} failed: {:?}", r.name, r.failures);
        }
        let s = stage_of(&r.report)?;
        if r.name.starts_with("with-") {
            with.push(s);
        } else {
            without.push(s);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let with_stage = mean(&with.iter().map(|s| s.stage).collect::<Vec<_>>());
    let without_stage = mean(&without.iter().map(|s| s.stage).collect::<Vec<_>>());
    let bind = mean(&with.iter().filter_map(|s| s.bind).collect::<Vec<_>>());
    println!();
    println!("boot (TCG, Debian 12, initramfs-tools; {boots} boot(s) each, same run):");
    println!(
        "  initramfs stage, with vfio-early:     {with_stage:>7.3} s  ({})",
        list_secs(&with)
    );
    println!(
        "  initramfs stage, vfio_early=off:      {without_stage:>7.3} s  ({})",
        list_secs(&without)
    );
    println!(
        "  difference:                           {:>7.3} s  = {:.1}% of the stage (target < 2%)",
        with_stage - without_stage,
        100.0 * (with_stage - without_stage) / without_stage.max(1e-9)
    );
    println!(
        "  early bind span (first..last line):   {bind:>7.3} s  = {:.1}% of the stage",
        100.0 * bind / with_stage.max(1e-9)
    );
    let modprobe = mean(&with.iter().filter_map(|s| s.modprobe).collect::<Vec<_>>());
    println!(
        "    of which `modprobe vfio-pci`:        {modprobe:>7.3} s  (the module load any vfio host pays)"
    );
    println!(
        "    the rest, vfio-early's own work:     {:>7.3} s  = {:.1}% of the stage",
        bind - modprobe,
        100.0 * (bind - modprobe) / with_stage.max(1e-9)
    );

    // Bytes: the base image's initramfs (no package) against the one apply built.
    let first = runs
        .iter()
        .find(|r| r.name.starts_with("with-"))
        .context("no boot with vfio-early")?;
    let dir = project.join("target/boot-test").join(&first.name);
    let after = std::fs::metadata(dir.join("initrd.img"))?.len();
    let base_tree = crate::image::ensure_base(
        project,
        scenario::Distro::Bookworm,
        scenario::Generator::InitramfsTools,
    )?;
    let release = crate::image::kernel_release(&base_tree)?;
    let before_path = base_tree.join(format!("boot/initrd.img-{release}"));
    let before = std::fs::metadata(&before_path)?.len();
    let vfio_before = vfio_files(&before_path)?;
    let vfio_after = vfio_files(&dir.join("initrd.img"))?;
    println!(
        "  compressed initramfs: {} bytes before the package, {} after apply: +{} bytes",
        before,
        after,
        after as i64 - before as i64
    );
    if vfio_before == vfio_after {
        println!(
            "  vfio module files in the image: {vfio_after}, before and after (MODULES=most \
             carries them already), so all of the growth is vfio-early's (target < 1 MiB)"
        );
    } else {
        println!(
            "  vfio module files in the image: {vfio_before} before, {vfio_after} after; the \
             growth includes those modules (target for vfio-early's own bytes < 1 MiB)"
        );
    }
    Ok(())
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
}
