//! `vfio-early status`: every check the tutorials have people do by hand after a reboot,
//! each with PASS, WARN or FAIL and a one-line fix; exit 1 on any FAIL; `--json` for
//! automation (stable: fields are added, never renamed).
//!
//! [`evaluate`] is pure: every check is a function of the config, the machine, the
//! host's files and running state (read beforehand by [`crate::host`]) and the plan; the
//! verdict about which devices should be on vfio-pci is the plan's, never re-decided
//! here.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::bootloader::{self, Bootloader};
use crate::config::Config;
use crate::context::Context;
use crate::host::{Host, Image, Runtime};
use crate::machine::{CpuVendor, Machine};
use crate::nextboot::NextBoot;
use crate::outcome::Outcome;
use crate::paths;
use crate::plan::{Decision, Plan};
use crate::state::Manifest;
use crate::{kargs, kmod};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier: `iommu`, `interrupt-remapping`, `cmdline`, `next-boot`,
    /// `vfio-modules`, `device`, `iommu-group`, `initramfs`, `applied`, `framebuffer`,
    /// `reset-method`, `trial`.
    pub id: &'static str,
    pub verdict: Verdict,
    /// For per-device checks, the device.
    pub device: Option<String>,
    pub summary: String,
    /// One line saying what to do; null on PASS.
    pub fix: Option<String>,
}

impl Check {
    fn on(mut self, device: impl ToString) -> Check {
        self.device = Some(device.to_string());
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    /// The worst verdict of all checks.
    pub verdict: Verdict,
    pub checks: Vec<Check>,
}

/// Everything a status run looks at, read beforehand ([`crate::context`],
/// [`crate::host`]).
pub struct Inputs<'a> {
    pub config: &'a Config,
    /// The config file's text now (`None`: no file).
    pub config_text: Option<&'a str>,
    pub config_path: &'a Path,
    pub machine: &'a Machine,
    pub plan: &'a Plan,
    pub host: &'a Host,
    pub runtime: &'a Runtime,
    /// A trial's state (`apply --trial`), when there is one, or why it cannot be read.
    pub trial: Option<&'a Result<crate::trial::State, String>>,
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

/// Every check, in report order. Pure: a function of the inputs.
pub fn evaluate(inp: &Inputs) -> Report {
    let manifest = inp.host.state.manifest_if_any();
    let targets: Vec<&Decision> = inp.plan.targets().collect();
    let mut checks = vec![
        iommu_check(inp.machine, &inp.runtime.kernel_log),
        interrupt_remapping_check(inp),
        cmdline_check(
            inp.config,
            inp.machine,
            manifest,
            inp.host.next_boot.as_ref(),
        ),
        applied_check(inp),
    ];
    if let Some(mf) = manifest.filter(|mf| !mf.kernel_args.is_empty()) {
        checks.push(bootloader_check(inp.host, inp.config, mf));
        checks.extend(next_boot_check(inp.host, mf));
    }
    if let Some(image) = &inp.runtime.initramfs {
        checks.push(initramfs_check(image));
    }
    if !targets.is_empty() {
        checks.push(modules_check(inp.runtime));
    }
    checks.extend(targets.iter().map(|d| device_check(inp, d)));
    checks.extend(unmatched_checks(inp.config, inp.plan));
    if !targets.is_empty() {
        checks.push(group_check(inp.plan));
    }
    if let Some(iomem) = &inp.runtime.iomem {
        checks.extend(framebuffer_checks(inp.machine, &targets, iomem));
    }
    checks.extend(reset_checks(inp.machine, inp.runtime, &targets));
    if let Some(t) = inp.trial {
        checks.push(trial_check(t));
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

/// Whether `status` reads the running kernel's initramfs: when something was applied
/// for configured devices.
pub fn wants_initramfs(config: &Config, host: &Host) -> bool {
    host.state.manifest_if_any().is_some() && !config.devices.is_empty()
}

fn enable_fix(vendor: CpuVendor) -> &'static str {
    match vendor {
        CpuVendor::Intel => {
            "enable VT-d in the firmware setup; `vfio-early apply` adds intel_iommu=on; reboot"
        }
        CpuVendor::Amd => "enable the IOMMU (AMD-Vi / IOMMU) in the firmware setup and reboot",
        CpuVendor::Unknown => {
            "enable VT-d in the firmware setup (AMD-Vi / IOMMU on AMD CPUs); `vfio-early \
             apply` adds the kernel arguments; reboot"
        }
    }
}

fn log_has(log: &[String], needles: &[&str]) -> Option<String> {
    log.iter()
        .find(|l| needles.iter().any(|n| l.contains(n)))
        .cloned()
}

fn iommu_check(m: &Machine, log: &[String]) -> Check {
    let fix = Some(enable_fix(m.cpu_vendor));
    if !m.iommu_units.is_empty() {
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
            fix,
        )
    } else {
        check(
            "iommu",
            Verdict::Fail,
            "no IOMMU is active: passthrough cannot work".into(),
            fix,
        )
    }
}

fn interrupt_remapping_check(inp: &Inputs) -> Check {
    let ir = log_has(
        &inp.runtime.kernel_log,
        &[
            "Enabled IRQ remapping",
            "Interrupt remapping enabled",
            "IRQ remapping enabled",
        ],
    );
    let iommu_on = !inp.machine.iommu_units.is_empty();
    match (ir, iommu_on) {
        (Some(line), _) => check("interrupt-remapping", Verdict::Pass, format!("interrupt remapping on (`{line}`)"), None),
        (None, false) => check("interrupt-remapping", Verdict::Warn, "unknown: the IOMMU is off".into(), Some(enable_fix(inp.machine.cpu_vendor))),
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
    }
}

/// The command line carries what apply wrote; when it does not but the next boot does,
/// a reboot is pending.
fn cmdline_check(
    config: &Config,
    m: &Machine,
    manifest: Option<&Manifest>,
    next: Option<&NextBoot>,
) -> Check {
    let Some(mf) = manifest else {
        return if config.devices.is_empty() {
            check(
                "cmdline",
                Verdict::Warn,
                "no device configured and nothing applied".into(),
                Some("add [[device]] entries to the config, then run `vfio-early apply`"),
            )
        } else {
            check(
                "cmdline",
                Verdict::Fail,
                "`vfio-early apply` has not run".into(),
                Some("run `vfio-early apply`, then reboot"),
            )
        };
    };
    let missing: Vec<&str> = mf
        .kernel_args
        .iter()
        .filter(|t| !m.cmdline_has(t))
        .map(String::as_str)
        .collect();
    let next_has_all = next.is_some_and(|n| {
        mf.kernel_args
            .iter()
            .all(|t| kargs::cmdline_has(&n.cmdline, t))
    });
    if missing.is_empty() {
        let has = if mf.kernel_args.is_empty() {
            "nothing to check".to_string()
        } else {
            mf.kernel_args.join(" ")
        };
        check(
            "cmdline",
            Verdict::Pass,
            format!("the kernel command line has {has}"),
            None,
        )
    } else if next_has_all {
        let source = next.map(|n| n.source.as_str()).unwrap_or("");
        check(
            "cmdline",
            Verdict::Warn,
            format!(
                "reboot pending: the running kernel lacks {}, which the next boot ({source}) has",
                missing.join(" ")
            ),
            Some("reboot to put the arguments in force"),
        )
    } else {
        check("cmdline", Verdict::Fail, format!("the kernel command line lacks {}", missing.join(" ")), Some("reboot; if it persists, check the bootloader (`vfio-early apply --dry-run` shows where the arguments go)"))
    }
}

/// What the next boot will give the kernel, as the bootloader's files say.
fn next_boot_check(host: &Host, mf: &Manifest) -> Option<Check> {
    let next = host.next_boot.as_ref()?;
    let missing: Vec<&str> = mf
        .kernel_args
        .iter()
        .filter(|t| !kargs::cmdline_has(&next.cmdline, t))
        .map(String::as_str)
        .collect();
    Some(if missing.is_empty() {
        check(
            "next-boot",
            Verdict::Pass,
            format!(
                "the next boot ({}) has {}",
                next.source,
                mf.kernel_args.join(" ")
            ),
            None,
        )
    } else {
        check(
            "next-boot",
            Verdict::Fail,
            format!(
                "the next boot ({}) lacks {}",
                next.source,
                missing.join(" ")
            ),
            Some("run `vfio-early apply` again (it regenerates the bootloader config)"),
        )
    })
}

/// The config in force is the one last applied.
fn applied_check(inp: &Inputs) -> Check {
    let current = inp.config_text.unwrap_or("");
    match &inp.host.state.applied {
        Some(a) if a.is_of(current) => check(
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
            "the config has devices but nothing is applied".into(),
            Some("run `vfio-early apply`, then reboot"),
        ),
    }
}

/// The running kernel's initramfs holds what the early binder needs.
fn initramfs_check(image: &Image) -> Check {
    let kver = &image.kernel;
    let Some(path) = &image.path else {
        return check(
            "initramfs",
            Verdict::Warn,
            format!("no initramfs for {kver} in /boot (initrd.img-{kver} or initramfs-{kver}.img)"),
            Some("check where the bootloader loads the initramfs from"),
        );
    };
    let shown = Path::new("/").join(path);
    // A vfio module built into this kernel (or absent from its tree) needs no file in
    // the image: the kernel's own module lists decide, where they can be read.
    let needed = |item: &str| match item.strip_prefix("module ") {
        Some(m) if !image.loadable.is_empty() => image.loadable.contains(&kmod::normalize(m)),
        _ => true,
    };
    match &image.verification {
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
                    Some("run `vfio-early apply` (it rebuilds the initramfs), then reboot"),
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

/// vfio modules loaded (or built in: sys/module has them either way).
fn modules_check(rt: &Runtime) -> Check {
    let wanted = kmod::VFIO_CORE_MODULES;
    let loaded: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|m| rt.sys_modules.contains(*m))
        .collect();
    if loaded.len() == wanted.len() {
        check(
            "vfio-modules",
            Verdict::Pass,
            "vfio, vfio_iommu_type1 and vfio_pci are loaded".into(),
            None,
        )
    } else {
        check("vfio-modules", Verdict::Fail, format!("loaded: {}", if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") }), Some("check `vfio-early initramfs verify` and the kernel log (`dmesg | grep vfio-early`)"))
    }
}

/// A taken device on vfio-pci, with its /dev/vfio node.
fn device_check(inp: &Inputs, d: &Decision) -> Check {
    let addr = d.address;
    let node = |g: u32| Path::new(paths::DEV_VFIO).join(g.to_string());
    match inp.machine.device(addr) {
        None => check("device", Verdict::Warn, format!("{addr} is absent on this boot"), Some("check that the card is seated, or remove it from the config")),
        Some(dev) if dev.driver.as_deref() == Some(crate::bind::VFIO_DRIVER) => match dev.iommu_group {
            Some(g) if inp.runtime.vfio_nodes.contains(&g.to_string()) => check("device", Verdict::Pass, format!("{addr} on vfio-pci, /{} present", node(g).display()), None),
            Some(g) => check("device", Verdict::Fail, format!("{addr} on vfio-pci but /{} is missing", node(g).display()), Some("the IOMMU group is not viable or vfio is broken: see the iommu-group check")),
            None => check("device", Verdict::Fail, format!("{addr} on vfio-pci but in no IOMMU group"), Some(enable_fix(inp.machine.cpu_vendor))),
        },
        Some(dev) => check("device", Verdict::Fail, format!("{addr} is on {}, not vfio-pci", dev.driver.as_deref().unwrap_or("no driver")), Some("run `vfio-early bind` now; for boot, check `dmesg | grep vfio-early` and `vfio-early initramfs verify`")),
    }
    .on(addr)
}

/// Entries that selected nothing on this boot (a card absent or moved).
fn unmatched_checks(config: &Config, plan: &Plan) -> Vec<Check> {
    plan.unmatched_entries(config)
        .into_iter()
        .filter_map(|n| Some((n, config.devices.get(n - 1)?)))
        .map(|(n, entry)| {
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
            c
        })
        .collect()
}

/// IOMMU group viability: the plan's split groups.
fn group_check(plan: &Plan) -> Check {
    let split: Vec<&str> = plan.split_groups().map(|p| p.message.as_str()).collect();
    if split.is_empty() {
        check(
            "iommu-group",
            Verdict::Pass,
            "every taken device's IOMMU group is wholly taken".into(),
            None,
        )
    } else {
        check("iommu-group", Verdict::Fail, split.join("; "), Some("take the other members too (add entries), or move the card to a slot with its own group"))
    }
}

/// A boot framebuffer still holding a taken GPU's memory.
fn framebuffer_checks(m: &Machine, targets: &[&Decision], iomem: &str) -> Vec<Check> {
    targets
        .iter()
        .filter(|d| {
            m.device(d.address)
                .and_then(|x| x.class)
                .is_some_and(|c| c.is_display())
        })
        .map(|d| {
            let addr = d.address.to_string();
            match framebuffer_in(iomem, &addr) {
                Some(fb) => check("framebuffer", Verdict::Fail, format!("{fb} still holds memory of {addr} (\"BAR can't reserve\" in the guest)"), Some("set [kernel] framebuffer = \"sysfb-off\" (or \"auto\" with this GPU as boot VGA), apply, reboot")),
                None => check("framebuffer", Verdict::Pass, format!("no boot framebuffer on {addr}"), None),
            }
            .on(addr)
        })
        .collect()
}

/// The reset method of each taken device that has the attribute.
fn reset_checks(m: &Machine, rt: &Runtime, targets: &[&Decision]) -> Vec<Check> {
    targets
        .iter()
        .filter_map(|d| Some((d.address, rt.reset_methods.get(&d.address)?)))
        .map(|(addr, method)| {
            let amd_gpu = m.device(addr).is_some_and(|x| {
                x.id.is_some_and(|i| i.vendor == 0x1002) && x.class.is_some_and(|c| c.is_display())
            });
            if method.is_empty() {
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
                    Some("load vendor-reset and write `device_specific` to reset_method (kernel 5.15+)"),
                )
            } else {
                check("reset-method", Verdict::Pass, format!("{addr} resets by `{method}`"), None)
            }
            .on(addr)
        })
        .collect()
}

/// The bootloader config carries the arguments for the next boot.
fn bootloader_check(host: &Host, config: &Config, mf: &Manifest) -> Check {
    let bl = host.boot.resolve(config.bootloader.kind);
    // /etc/kernel/cmdline holds the tokens as the kernel reads them; a grub.cfg `linux`
    // line holds them as GRUB words (quoted for its parser).
    let has_all = |text: &str| mf.kernel_args.iter().all(|t| kargs::cmdline_has(text, t));
    let grub_has_all = |line: &str| {
        let words = kargs::split_args(line);
        mf.kernel_args.iter().all(|t| {
            t.parse::<kargs::KernelToken>()
                .is_ok_and(|k| words.contains(&k.grub_word().as_str()))
        })
    };
    let mut found = Vec::new();
    let mut problems = Vec::new();
    if bl.uses_grub_dropin(&host.boot) {
        match host.text(paths::GRUB_DROPIN) {
            Some(t) if t == bootloader::render_grub_dropin(&mf.kernel_args) => {
                found.push("GRUB drop-in")
            }
            Some(_) => problems.push("the GRUB drop-in differs from the last apply"),
            None => problems.push("the GRUB drop-in is missing"),
        }
        if let Some(cfg) = &host.grub_cfg {
            let has_entry = cfg
                .lines()
                .filter(|l| l.trim_start().starts_with("linux"))
                .any(grub_has_all);
            if has_entry {
                found.push("grub.cfg");
            } else {
                problems.push(
                    "grub.cfg has no boot entry with the arguments (update-grub did not run?)",
                );
            }
        }
    }
    if bl.uses_kernel_cmdline() {
        let first = host.text(paths::KERNEL_CMDLINE).unwrap_or("");
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

/// A trial (`apply --trial`): prepared, committed, or failed and why.
fn trial_check(t: &Result<crate::trial::State, String>) -> Check {
    match t {
        Ok(s) => {
            let (verdict, summary, fix) = crate::trial::status_line(s);
            check("trial", verdict, summary, fix)
        }
        Err(e) => check(
            "trial",
            Verdict::Warn,
            e.clone(),
            Some("`vfio-early trial abort` removes the trial"),
        ),
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

/// `vfio-early status [--json]`: reads the running system, evaluates, prints; exit 1 on
/// any FAIL.
pub fn run(ctx: &Context, json: bool) -> anyhow::Result<Outcome> {
    let with_image = wants_initramfs(&ctx.config, &ctx.host);
    let runtime = Runtime::read(&ctx.root, &ctx.machine, &ctx.host, with_image);
    let trial = crate::trial::read_state(&ctx.root).transpose();
    let report = evaluate(&Inputs {
        config: &ctx.config,
        config_text: ctx.config_text.as_deref(),
        config_path: &ctx.config_path,
        machine: &ctx.machine,
        plan: &ctx.plan,
        host: &ctx.host,
        runtime: &runtime,
        trial: trial.as_ref(),
    });
    if json {
        crate::out!("{}\n", serde_json::to_string_pretty(&report)?)?;
    } else {
        crate::out!("{}", render_table(&report))?;
    }
    Ok(Outcome::failed_if(report.verdict == Verdict::Fail))
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

#[cfg(test)]
mod checks {
    //! Each check as a function of facts: tables instead of fake trees.

    use super::*;
    use crate::bootloader::BootFacts;
    use crate::config;
    use crate::host::Generator;
    use crate::state::{Applied, State};
    use std::collections::BTreeMap;

    fn cfg(text: &str) -> Config {
        config::parse(text, Path::new("t.toml")).unwrap()
    }

    fn manifest(args: &[&str]) -> Manifest {
        Manifest {
            schema: 1,
            kernel_args: args.iter().map(|s| s.to_string()).collect(),
            ..Manifest::default()
        }
    }

    fn host(boot: BootFacts, files: &[(&'static str, &str)], grub_cfg: Option<&str>) -> Host {
        let mut owned = BTreeMap::new();
        for (rel, text) in files {
            owned.insert(*rel, Ok(Some(text.to_string())));
        }
        Host {
            is_host: false,
            state: State::default(),
            owned,
            existing_dirs: Default::default(),
            boot,
            grub_cfg: grub_cfg.map(str::to_string),
            generator: Generator::InitramfsTools,
            kernel_images: Vec::new(),
            initrds: Vec::new(),
            next_boot: None,
        }
    }

    const QUOTED: &str = "dyndbg=\"module vfio_pci +p\"";

    #[test]
    fn cmdline_check_reads_arguments_as_the_kernel_does() {
        let c = cfg("[[device]]\nid = \"8086:10d3\"\n");
        let m = |cmdline: &str| Machine {
            cmdline: Some(cmdline.to_string()),
            ..crate::machine::Machine::empty_for_tests()
        };
        let mf = manifest(&["intel_iommu=on", QUOTED]);
        for (cmdline, verdict) in [
            // GRUB hands a quoted value on with the quotes around the whole argument.
            (
                "root=/dev/vda ro intel_iommu=on \"dyndbg=module vfio_pci +p\"",
                Verdict::Pass,
            ),
            (
                "root=/dev/vda ro intel_iommu=on dyndbg=\"module vfio_pci +p\"",
                Verdict::Pass,
            ),
            ("root=/dev/vda ro intel_iommu=on", Verdict::Fail),
            (
                "root=/dev/vda ro \"dyndbg=module vfio_pci +p\"",
                Verdict::Fail,
            ),
        ] {
            let got = cmdline_check(&c, &m(cmdline), Some(&mf), None).verdict;
            assert_eq!(got, verdict, "{cmdline}");
        }
        assert_eq!(cmdline_check(&c, &m(""), None, None).verdict, Verdict::Fail);
        assert_eq!(
            cmdline_check(&cfg(""), &m(""), None, None).verdict,
            Verdict::Warn
        );
        // Applied, not rebooted yet: the next boot has the arguments.
        let next = NextBoot {
            source: "grub.cfg's default entry".into(),
            cmdline: "root=/dev/vda ro intel_iommu=on dyndbg=\"module vfio_pci +p\"".into(),
        };
        let c2 = cmdline_check(&c, &m("root=/dev/vda ro"), Some(&mf), Some(&next));
        assert_eq!(c2.verdict, Verdict::Warn);
        assert!(c2.summary.starts_with("reboot pending"), "{}", c2.summary);
        let stale = NextBoot {
            cmdline: "root=/dev/vda ro".into(),
            ..next.clone()
        };
        assert_eq!(
            cmdline_check(&c, &m("root=/dev/vda ro"), Some(&mf), Some(&stale)).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn bootloader_check_per_bootloader() {
        let grub = BootFacts {
            grub: true,
            ..BootFacts::default()
        };
        let sdboot = BootFacts {
            systemd_boot: true,
            ..BootFacts::default()
        };
        let args = ["intel_iommu=on", QUOTED];
        let dropin = bootloader::render_grub_dropin(&args.map(String::from));
        let good_cfg = "menuentry 'Debian' {\n\tlinux /vmlinuz root=/dev/vda ro quiet intel_iommu=on dyndbg=\"module vfio_pci +p\"\n}\n";
        let stale_cfg = "menuentry 'Debian' {\n\tlinux /vmlinuz root=/dev/vda ro quiet\n}\n";
        let c = cfg("[[device]]\nid = \"8086:10d3\"\n");
        let mf = manifest(&args);
        let cases: Vec<(&str, Host, Verdict)> = vec![
            (
                "grub, all in place",
                host(grub, &[(paths::GRUB_DROPIN, &dropin)], Some(good_cfg)),
                Verdict::Pass,
            ),
            (
                "grub, update-grub did not run",
                host(grub, &[(paths::GRUB_DROPIN, &dropin)], Some(stale_cfg)),
                Verdict::Fail,
            ),
            (
                "grub, drop-in missing",
                host(grub, &[], Some(good_cfg)),
                Verdict::Fail,
            ),
            (
                "grub, drop-in edited",
                host(grub, &[(paths::GRUB_DROPIN, "# edited\n")], Some(good_cfg)),
                Verdict::Fail,
            ),
            (
                "systemd-boot",
                host(
                    sdboot,
                    &[(
                        paths::KERNEL_CMDLINE,
                        "root=/dev/vda ro intel_iommu=on dyndbg=\"module vfio_pci +p\"\n",
                    )],
                    None,
                ),
                Verdict::Pass,
            ),
            (
                "systemd-boot, file lacks them",
                host(
                    sdboot,
                    &[(paths::KERNEL_CMDLINE, "root=/dev/vda ro\n")],
                    None,
                ),
                Verdict::Fail,
            ),
            ("none", host(BootFacts::default(), &[], None), Verdict::Warn),
        ];
        for (name, h, verdict) in cases {
            assert_eq!(bootloader_check(&h, &c, &mf).verdict, verdict, "{name}");
        }
    }

    #[test]
    fn modules_check_wants_the_three_core_modules() {
        let rt = |mods: &[&str]| Runtime {
            sys_modules: mods.iter().map(|s| s.to_string()).collect(),
            ..Runtime::default()
        };
        assert_eq!(
            modules_check(&rt(&["vfio", "vfio_iommu_type1", "vfio_pci", "kvm"])).verdict,
            Verdict::Pass
        );
        let c = modules_check(&rt(&["vfio"]));
        assert_eq!(
            (c.verdict, c.summary.as_str()),
            (Verdict::Fail, "loaded: vfio")
        );
        assert_eq!(modules_check(&rt(&[])).summary, "loaded: none");
    }

    #[test]
    fn applied_check_compares_the_config_text() {
        let c = cfg("[[device]]\nid = \"8086:10d3\"\n");
        let text = "[[device]]\nid = \"8086:10d3\"\n";
        let applied = |t: &str| Applied {
            text: crate::state::render_applied(t),
            forced: false,
        };
        let m = crate::machine::Machine::empty_for_tests();
        let plan = Plan::default();
        let rt = Runtime::default();
        for (state, config_text, verdict) in [
            (Some(applied(text)), Some(text), Verdict::Pass),
            (
                Some(applied(text)),
                Some("[[device]]\nid = \"10de:1b80\"\n"),
                Verdict::Warn,
            ),
            (None, Some(text), Verdict::Fail),
        ] {
            let mut h = host(BootFacts::default(), &[], None);
            h.state.applied = state;
            let inp = Inputs {
                config: &c,
                config_text,
                config_path: Path::new("/etc/vfio-early.toml"),
                machine: &m,
                plan: &plan,
                host: &h,
                runtime: &rt,
                trial: None,
            };
            assert_eq!(applied_check(&inp).verdict, verdict);
        }
    }
}
