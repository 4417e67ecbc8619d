//! `vfio-early status`: every check the tutorials have people do by hand after a reboot,
//! each with PASS, WARN or FAIL and a one-line fix; exit 1 on any FAIL; `--json` for
//! automation (stable: fields are added, never renamed).
//!
//! Checks read the machine through the root, the kernel log, the manifest of the last
//! apply and the plan; the verdict about which devices should be on vfio-pci is the
//! plan's, never re-decided here.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::apply;
use crate::config::Config;
use crate::machine::{CpuVendor, Machine};
use crate::paths;
use crate::plan::Plan;
use crate::root::Root;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier: `iommu`, `interrupt-remapping`, `cmdline`, `vfio-modules`,
    /// `device`, `iommu-group`, `initramfs`, `applied`, `framebuffer`, `reset-method`.
    pub id: &'static str,
    pub verdict: Verdict,
    /// For per-device checks, the device.
    pub device: Option<String>,
    pub summary: String,
    /// One line saying what to do; null on PASS.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    /// The worst verdict of all checks.
    pub verdict: Verdict,
    pub checks: Vec<Check>,
}

/// Everything a status run looks at, gathered by the caller.
pub struct Inputs<'a> {
    pub root: &'a Root,
    pub config: &'a Config,
    pub config_path: &'a Path,
    pub machine: &'a Machine,
    pub plan: &'a Plan,
    pub kernel_log: &'a [String],
}

fn check(id: &'static str, verdict: Verdict, summary: String, fix: Option<&str>) -> Check {
    Check {
        id,
        verdict,
        device: None,
        summary,
        fix: if verdict == Verdict::Pass {
            None
        } else {
            fix.map(str::to_string)
        },
    }
}

/// Reads the running kernel's initramfs with our own reader (streamed, bounded memory).
fn initramfs_check(root: &Root, kver: &str) -> Check {
    let rebuild = "run `vfio-early apply` (it rebuilds the initramfs), then reboot";
    let candidates = [
        format!("initrd.img-{kver}"),
        format!("initramfs-{kver}.img"),
    ];
    let Some(image) = candidates
        .iter()
        .map(|n| Path::new(paths::BOOT).join(n))
        .find(|p| root.exists(p))
    else {
        return check(
            "initramfs",
            Verdict::Warn,
            format!("no initramfs for {kver} in /boot (initrd.img-{kver} or initramfs-{kver}.img)"),
            Some("check where the bootloader loads the initramfs from"),
        );
    };
    let shown = Path::new("/").join(&image);
    let want_modprobe = root.exists(crate::apply::MODPROBE);
    // A vfio module built into this kernel (or absent from its tree) needs no file in
    // the image: the kernel's own module lists decide, where they can be read.
    let host = crate::kmod::KernelModules::read(root, kver);
    let needed = |item: &str| match item.strip_prefix("module ") {
        Some(m) if !host.loadable.is_empty() => host.loadable.contains(&crate::kmod::normalize(m)),
        _ => true,
    };
    match crate::initramfs::verify_image(&root.path(&image), Some(kver), want_modprobe) {
        Ok(v) => {
            let missing: Vec<&str> = v
                .checks
                .iter()
                .filter(|c| c.found.is_none() && needed(&c.item))
                .map(|c| c.item.as_str())
                .chain(v.kernel_problem.as_deref())
                .collect();
            if missing.is_empty() {
                check(
                    "initramfs",
                    Verdict::Pass,
                    format!(
                        "{} holds vfio-early, its config, the boot script and the vfio modules",
                        shown.display()
                    ),
                    None,
                )
            } else {
                check(
                    "initramfs",
                    Verdict::Fail,
                    format!("{} lacks {}", shown.display(), missing.join(", ")),
                    Some(rebuild),
                )
            }
        }
        Err(e) => check(
            "initramfs",
            Verdict::Warn,
            format!("cannot read {}: {e}", shown.display()),
            Some("see `vfio-early initramfs examine` on it"),
        ),
    }
}

fn log_has(log: &[String], needles: &[&str]) -> Option<String> {
    log.iter()
        .find(|l| needles.iter().any(|n| l.contains(n)))
        .cloned()
}

pub fn run(inp: &Inputs) -> Report {
    let mut checks = Vec::new();
    let m = inp.machine;
    let log = inp.kernel_log;

    // IOMMU on.
    let iommu_on = !m.iommu_units.is_empty();
    let enable_fix = match m.cpu_vendor {
        CpuVendor::Intel => {
            "enable VT-d in the firmware setup; `vfio-early apply` adds intel_iommu=on; reboot"
        }
        _ => "enable the IOMMU (AMD-Vi / IOMMU) in the firmware setup and reboot",
    };
    checks.push(if iommu_on {
        check(
            "iommu",
            Verdict::Pass,
            format!("IOMMU enabled ({})", m.iommu_units.join(", ")),
            None,
        )
    } else if let Some(line) = log_has(log, &["DMAR: IOMMU enabled", "AMD-Vi: Found IOMMU"]) {
        // `DMAR: IOMMU enabled` only echoes intel_iommu=on; without a registered unit
        // the firmware has no (or a disabled) IOMMU, and passthrough cannot work.
        check(
            "iommu",
            Verdict::Fail,
            format!(
                "no IOMMU is active: the kernel was asked (`{line}`) but registered no IOMMU \
                 unit, so the firmware has it off or lacks it"
            ),
            Some(enable_fix),
        )
    } else {
        check(
            "iommu",
            Verdict::Fail,
            "no IOMMU is active: passthrough cannot work".into(),
            Some(enable_fix),
        )
    });

    // Interrupt remapping.
    let ir = log_has(
        log,
        &[
            "Enabled IRQ remapping",
            "Interrupt remapping enabled",
            "IRQ remapping enabled",
        ],
    );
    checks.push(match (ir, iommu_on) {
        (Some(line), _) => check("interrupt-remapping", Verdict::Pass, format!("interrupt remapping on (`{line}`)"), None),
        (None, false) => check("interrupt-remapping", Verdict::Warn, "unknown: the IOMMU is off".into(), Some(enable_fix)),
        (None, true) if inp.config.interrupts.allow_unsafe => check(
            "interrupt-remapping", Verdict::Warn,
            "no interrupt remapping; allow_unsafe_interrupts is on (a guest can forge interrupts)".into(),
            Some("enable x2APIC in the firmware setup if the platform has it, then drop allow_unsafe"),
        ),
        (None, true) => check(
            "interrupt-remapping", Verdict::Fail,
            "no interrupt remapping in the kernel log: vfio refuses to assign devices".into(),
            Some("enable x2APIC / interrupt remapping in the firmware setup; or, knowing the risk, [interrupts] allow_unsafe = true"),
        ),
    });

    // The command line carries what apply wrote.
    let manifest = apply::read_manifest(inp.root).ok().flatten();
    checks.push(match &manifest {
        None if inp.config.devices.is_empty() => check("cmdline", Verdict::Warn, "no device configured and nothing applied".into(), Some("add [[device]] entries to the config, then run `vfio-early apply`")),
        None => check("cmdline", Verdict::Fail, "`vfio-early apply` has not run".into(), Some("run `vfio-early apply`, then reboot")),
        Some(mf) => {
            let missing: Vec<&str> = mf.kernel_args.iter().filter(|t| !m.cmdline_has(t)).map(String::as_str).collect();
            if missing.is_empty() {
                check("cmdline", Verdict::Pass, format!("the kernel command line has {}", if mf.kernel_args.is_empty() { "nothing to check".to_string() } else { mf.kernel_args.join(" ") }), None)
            } else {
                check("cmdline", Verdict::Fail, format!("the kernel command line lacks {}", missing.join(" ")), Some("reboot; if it persists, check the bootloader (`vfio-early apply --dry-run` shows where the arguments go)"))
            }
        }
    });

    // The config in force is the one last applied.
    let applied = inp.root.read_to_string(apply::APPLIED).ok();
    let current = std::fs::read_to_string(inp.config_path).unwrap_or_default();
    checks.push(match applied {
        Some(a) if a.ends_with(&current) => check(
            "applied",
            Verdict::Pass,
            "the config is the one last applied".into(),
            None,
        ),
        Some(_) => check(
            "applied",
            Verdict::Warn,
            format!("{} changed since the last apply", inp.config_path.display()),
            Some("run `vfio-early apply` (and reboot) to put the edit in force"),
        ),
        None if inp.config.devices.is_empty() => check(
            "applied",
            Verdict::Pass,
            "no device configured".into(),
            None,
        ),
        None => check(
            "applied",
            Verdict::Fail,
            "the config has devices but was never applied".into(),
            Some("run `vfio-early apply`, then reboot"),
        ),
    });

    // The bootloader config carries the arguments for the next boot.
    if let Some(mf) = manifest.as_ref().filter(|mf| !mf.kernel_args.is_empty()) {
        checks.push(bootloader_check(inp.root, inp.config, mf));
    }

    // The running kernel's initramfs holds what the early binder needs.
    if let (Some(_), Some(kver)) = (&manifest, &m.running_kernel) {
        if !inp.config.devices.is_empty() {
            checks.push(initramfs_check(inp.root, kver));
        }
    }

    // vfio modules loaded (or built in: sys/module has them either way).
    let targets: Vec<_> = inp.plan.targets().collect();
    if !targets.is_empty() {
        let loaded: Vec<&str> = ["vfio", "vfio_iommu_type1", "vfio_pci"]
            .into_iter()
            .filter(|mname| inp.root.exists(Path::new(paths::SYS_MODULE).join(mname)))
            .collect();
        checks.push(if loaded.len() == 3 {
            check("vfio-modules", Verdict::Pass, "vfio, vfio_iommu_type1 and vfio_pci are loaded".into(), None)
        } else {
            check("vfio-modules", Verdict::Fail, format!("loaded: {}", if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") }), Some("check `vfio-early initramfs verify` and the kernel log (`dmesg | grep vfio-early`)"))
        });
    }

    // Each configured device on vfio-pci, with its /dev/vfio node.
    for d in &targets {
        let addr = d.address.to_string();
        let mut c = match m.device(d.address) {
            None => check("device", Verdict::Warn, format!("{addr} is absent on this boot"), Some("check that the card is seated, or remove it from the config")),
            Some(dev) if dev.driver.as_deref() == Some("vfio-pci") => {
                let node = dev.iommu_group.map(|g| Path::new(paths::DEV_VFIO).join(g.to_string()));
                match node {
                    Some(n) if inp.root.exists(&n) => check("device", Verdict::Pass, format!("{addr} on vfio-pci, /{} present", n.display()), None),
                    Some(n) => check("device", Verdict::Fail, format!("{addr} on vfio-pci but /{} is missing", n.display()), Some("the IOMMU group is not viable or vfio is broken: see the iommu-group check")),
                    None => check("device", Verdict::Fail, format!("{addr} on vfio-pci but in no IOMMU group"), Some(enable_fix)),
                }
            }
            Some(dev) => check("device", Verdict::Fail, format!("{addr} is on {}, not vfio-pci", dev.driver.as_deref().unwrap_or("no driver")), Some("run `vfio-early bind` now; for boot, check `dmesg | grep vfio-early` and `vfio-early initramfs verify`")),
        };
        c.device = Some(addr);
        checks.push(c);
    }

    // Entries that selected nothing on this boot (a card absent or moved).
    for (i, entry) in inp.config.devices.iter().enumerate() {
        let n = i + 1;
        if inp.plan.decisions.iter().any(|d| d.entry == n) {
            continue;
        }
        let wanted = match entry.address {
            Some(a) => format!("{} at {a}", entry.id),
            None => entry.id.to_string(),
        };
        let mut c = check(
            "device",
            Verdict::Warn,
            format!("entry {n}: no device {wanted} on this boot"),
            Some("check that the card is seated (`vfio-early list`), or remove the entry"),
        );
        c.device = entry.address.map(|a| a.to_string());
        checks.push(c);
    }

    // IOMMU group viability: the plan's group warnings.
    let split: Vec<&str> = inp
        .plan
        .problems
        .iter()
        .filter(|p| p.message.starts_with("IOMMU group"))
        .map(|p| p.message.as_str())
        .collect();
    if !targets.is_empty() {
        checks.push(if split.is_empty() {
            check("iommu-group", Verdict::Pass, "every taken device's IOMMU group is wholly taken".into(), None)
        } else {
            check("iommu-group", Verdict::Fail, split.join("; "), Some("take the other members too (add entries), or move the card to a slot with its own group"))
        });
    }

    // Boot framebuffer still holding a taken GPU's memory.
    if let Ok(iomem) = inp.root.read_to_string(paths::PROC_IOMEM) {
        for d in &targets {
            let is_display = m
                .device(d.address)
                .and_then(|x| x.class)
                .is_some_and(|c| c.is_display());
            if !is_display {
                continue;
            }
            let addr = d.address.to_string();
            let mut c = match framebuffer_in(&iomem, &addr) {
                Some(fb) => check("framebuffer", Verdict::Fail, format!("{fb} still holds memory of {addr} (\"BAR can't reserve\" in the guest)"), Some("set [kernel] framebuffer = \"sysfb-off\" (or \"auto\" with this GPU as boot VGA), apply, reboot")),
                None => check("framebuffer", Verdict::Pass, format!("no boot framebuffer on {addr}"), None),
            };
            c.device = Some(addr);
            checks.push(c);
        }
    }

    // Reset method of each taken device.
    for d in &targets {
        let addr = d.address.to_string();
        let rel = Path::new(paths::PCI_DEVICES)
            .join(&addr)
            .join("reset_method");
        let Ok(method) = inp.root.read_attr(&rel) else {
            continue;
        };
        let amd_gpu = m.device(d.address).is_some_and(|x| {
            x.id.is_some_and(|i| i.vendor == 0x1002) && x.class.is_some_and(|c| c.is_display())
        });
        let mut c = if method.is_empty() {
            check(
                "reset-method",
                Verdict::Warn,
                format!("{addr} has no reset method: it may not reset between VM starts"),
                Some(if amd_gpu {
                    "for AMD GPUs, load vendor-reset and write `device_specific` to reset_method"
                } else {
                    "expect to reboot the host to reset the device"
                }),
            )
        } else if amd_gpu && !method.contains("device_specific") {
            check(
                "reset-method",
                Verdict::Warn,
                format!("{addr} resets by `{method}`; many AMD GPUs need vendor-reset"),
                Some(
                    "load vendor-reset and write `device_specific` to reset_method (kernel 5.15+)",
                ),
            )
        } else {
            check(
                "reset-method",
                Verdict::Pass,
                format!("{addr} resets by `{method}`"),
                None,
            )
        };
        c.device = Some(addr);
        checks.push(c);
    }

    let verdict = checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Pass);
    Report {
        schema: 1,
        verdict,
        checks,
    }
}

fn bootloader_check(root: &Root, config: &Config, mf: &apply::Manifest) -> Check {
    use crate::bootloader::{self, Bootloader};
    let bl = bootloader::resolve(root, config.bootloader.kind);
    let has_all = |text: &str| {
        mf.kernel_args
            .iter()
            .all(|t| text.split_whitespace().any(|w| w == t))
    };
    let mut found = Vec::new();
    let mut problems = Vec::new();
    if bl.uses_grub_dropin(root) {
        match root.read_to_string(bootloader::GRUB_DROPIN) {
            Ok(t) if t == bootloader::render_grub_dropin(&mf.kernel_args) => {
                found.push("GRUB drop-in")
            }
            Ok(_) => problems.push("the GRUB drop-in differs from the last apply"),
            Err(_) => problems.push("the GRUB drop-in is missing"),
        }
        if let Ok(cfg) = root.read_to_string("boot/grub/grub.cfg") {
            let linux_lines: Vec<&str> = cfg
                .lines()
                .filter(|l| l.trim_start().starts_with("linux"))
                .collect();
            if linux_lines.iter().any(|l| has_all(l)) {
                found.push("grub.cfg");
            } else {
                problems.push(
                    "grub.cfg has no boot entry with the arguments (update-grub did not run?)",
                );
            }
        }
    }
    if bl.uses_kernel_cmdline() {
        let first = root
            .read_to_string(bootloader::KERNEL_CMDLINE)
            .unwrap_or_default();
        if has_all(first.lines().next().unwrap_or("")) {
            found.push("/etc/kernel/cmdline");
        } else {
            problems.push("/etc/kernel/cmdline lacks the arguments");
        }
    }
    if bl == Bootloader::None {
        return check(
            "bootloader",
            Verdict::Warn,
            "bootloader `none`: the arguments are yours to add".into(),
            Some("add the arguments of `vfio-early apply --dry-run` to the kernel command line"),
        );
    }
    if problems.is_empty() {
        check(
            "bootloader",
            Verdict::Pass,
            format!(
                "{} carr{} the arguments",
                found.join(" and "),
                if found.len() == 1 { "ies" } else { "y" }
            ),
            None,
        )
    } else {
        check(
            "bootloader",
            Verdict::Fail,
            problems.join("; "),
            Some("run `vfio-early apply` again (it regenerates the bootloader config)"),
        )
    }
}

/// The name of a boot framebuffer nested inside the device's range in `/proc/iomem`.
fn framebuffer_in(iomem: &str, addr: &str) -> Option<String> {
    let mut inside: Option<usize> = None;
    for line in iomem.lines() {
        let indent = line.len() - line.trim_start().len();
        let name = line.split_once(" : ").map(|(_, n)| n.trim()).unwrap_or("");
        match inside {
            Some(level) if indent > level => {
                if [
                    "BOOTFB",
                    "efifb",
                    "vesafb",
                    "simplefb",
                    "simpledrm",
                    "simple-framebuffer",
                ]
                .iter()
                .any(|f| name.contains(f))
                {
                    return Some(name.to_string());
                }
            }
            _ => inside = None,
        }
        if name == addr {
            inside = Some(indent);
        }
    }
    None
}

pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.checks {
        let tag = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        let _ = writeln!(out, "{tag}  {:<19} {}", c.id, c.summary);
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "      fix: {fix}");
        }
    }
    let _ = writeln!(
        out,
        "\n{}",
        match r.verdict {
            Verdict::Pass => "all checks pass",
            Verdict::Warn => "passes, with warnings",
            Verdict::Fail => "FAILED: see the fixes above",
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framebuffer_found_inside_the_gpu_range_only() {
        let iomem = "00000000-00000fff : Reserved\n\
                     e0000000-efffffff : PCI Bus 0000:01\n  \
                       e0000000-efffffff : 0000:01:00.0\n    \
                         e0000000-e07fffff : BOOTFB\n\
                     f0000000-f0ffffff : 0000:02:00.0\n";
        assert_eq!(
            framebuffer_in(iomem, "0000:01:00.0").as_deref(),
            Some("BOOTFB")
        );
        assert_eq!(framebuffer_in(iomem, "0000:02:00.0"), None);
    }
}
