//! The planner: (config, machine) → plan. The only place where vfio-early decides which
//! devices are taken, which are refused and why, and which kernel arguments follow.
//!
//! Pure: no I/O. Every decision carries a reason a user can read; renderers and reports
//! print reasons, they never re-decide.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{AcsOverride, Config, DeviceEntry, Framebuffer, IommuVendor};
use crate::machine::{CpuVendor, Machine};
use crate::pci::{Device, PciAddress, VendorDevice};
use crate::sysdisk::SWAP;

/// What happens to one device the config concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Bound to vfio-pci.
    Take,
    /// Selected, but an interlock keeps it with the host (use --force to override).
    Refuse,
    /// Selected, an interlock objected, and --force overrode it.
    TakeForced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub address: PciAddress,
    pub id: Option<VendorDevice>,
    pub verdict: Verdict,
    /// 1-based index of the `[[device]]` entry that selected it.
    pub entry: usize,
    /// Why it was selected (which rule of the entry).
    pub rule: String,
    /// Why an interlock objected, if one did.
    pub interlock: Option<String>,
}

impl Decision {
    pub fn taken(&self) -> bool {
        matches!(self.verdict, Verdict::Take | Verdict::TakeForced)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Note,
    Warning,
    /// Blocks `apply` and non-early `bind`.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

/// One kernel command-line token and why it is there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelArg {
    pub token: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub decisions: Vec<Decision>,
    pub problems: Vec<Problem>,
    pub kernel_args: Vec<KernelArg>,
}

impl Plan {
    /// Devices to bind to vfio-pci, in address order.
    pub fn targets(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| d.taken())
    }

    pub fn decision(&self, address: PciAddress) -> Option<&Decision> {
        self.decisions.iter().find(|d| d.address == address)
    }

    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Error)
    }
}

/// How the planner runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Override interlocks (`--force`).
    pub force: bool,
    /// The plan is for binding now (`bind`, `bind --early`), not for writing boot
    /// configuration: without an active IOMMU vfio-pci cannot take a device (its probe
    /// fails and the device would be left with no driver at all), so nothing is taken,
    /// whatever `force` says. `apply` leaves this off: before the first reboot with the
    /// new command line the IOMMU is usually still off.
    pub live: bool,
}

/// Makes the plan. See the module documentation.
pub fn plan(config: &Config, machine: &Machine, opts: Options) -> Plan {
    let mut plan = Plan::default();
    let mut selected: BTreeMap<PciAddress, (usize, String)> = BTreeMap::new();

    for (i, entry) in config.devices.iter().enumerate() {
        select_for_entry(i + 1, entry, machine, &mut selected, &mut plan.problems);
    }

    let no_iommu = opts.live && machine.iommu_units.is_empty() && !selected.is_empty();
    if no_iommu {
        plan.problems.push(Problem {
            severity: Severity::Warning,
            message: "no IOMMU is active on this boot, so vfio-pci cannot take devices; \
                      every selected device stays on its driver"
                .to_string(),
            fix: "enable VT-d / AMD-Vi (IOMMU) in the firmware setup, run `vfio-early apply` \
                  for the kernel arguments, reboot, and see `vfio-early status`"
                .to_string(),
        });
    }
    for (address, (entry, rule)) in selected {
        let Some(device) = machine.device(address) else {
            continue;
        };
        if no_iommu {
            plan.decisions.push(Decision {
                address,
                id: device.id,
                verdict: Verdict::Refuse,
                entry,
                rule,
                interlock: Some("needs an active IOMMU".to_string()),
            });
            continue;
        }
        let interlock = interlock_for(device, machine, &config.devices);
        let verdict = match (&interlock, opts.force) {
            (None, _) => Verdict::Take,
            (Some(_), true) => Verdict::TakeForced,
            (Some(_), false) => Verdict::Refuse,
        };
        if let Some(why) = &interlock {
            plan.problems.push(match verdict {
                Verdict::TakeForced => Problem {
                    severity: Severity::Warning,
                    message: format!("{address} taken although it {why} (--force)"),
                    fix: "make sure the host has another way to boot and be reached".to_string(),
                },
                _ => Problem {
                    severity: Severity::Error,
                    message: format!("refusing to take {address}: it {why}"),
                    fix: format!(
                        "remove or narrow entry {entry} (e.g. with `address =`), or run \
                         again with --force if you really mean it"
                    ),
                },
            });
        }
        plan.decisions.push(Decision {
            address,
            id: device.id,
            verdict,
            entry,
            rule,
            interlock,
        });
    }

    check_groups(machine, &mut plan);
    plan.kernel_args = kernel_args(config, machine, &plan);
    plan.problems.extend(kernel_arg_problems(config, machine));
    plan
}

/// Adds every device the entry selects to `selected` (first entry wins).
fn select_for_entry(
    n: usize,
    entry: &DeviceEntry,
    machine: &Machine,
    selected: &mut BTreeMap<PciAddress, (usize, String)>,
    problems: &mut Vec<Problem>,
) {
    let id = entry.id;
    if let Some(addr) = entry.address {
        match machine.device(addr) {
            None => {
                problems.push(Problem {
                    severity: Severity::Warning,
                    message: format!("entry {n}: no device at {addr} (wanted {id})"),
                    fix: "check `vfio-early list`; the card may be absent or moved".to_string(),
                });
                return;
            }
            Some(d) if d.id != Some(id) => {
                let found =
                    d.id.map(|v| v.to_string())
                        .unwrap_or_else(|| "unknown".into());
                problems.push(Problem {
                    severity: Severity::Error,
                    message: format!(
                        "entry {n}: the device at {addr} is {found}, not {id}; nothing is \
                         taken there (a card was moved or added?)"
                    ),
                    fix: "check `vfio-early list` and correct the entry's address or id"
                        .to_string(),
                });
                return;
            }
            Some(_) => {}
        }
    }
    let matches: Vec<&Device> = machine
        .devices
        .iter()
        .filter(|d| d.id == Some(id))
        .filter(|d| entry.address.is_none_or(|a| a == d.address))
        .filter(|d| entry.subsystem.is_none_or(|s| d.subsystem == Some(s)))
        .filter(|d| {
            entry
                .class
                .is_none_or(|c| d.class.is_some_and(|dc| c.matches(dc)))
        })
        .collect();
    if matches.is_empty() {
        if entry.address.is_none() {
            problems.push(Problem {
                severity: Severity::Warning,
                message: format!("entry {n}: no device matches {}", describe_entry(entry)),
                fix: "check `vfio-early list`; the device may be absent on this machine"
                    .to_string(),
            });
        } else {
            problems.push(Problem {
                severity: Severity::Warning,
                message: format!(
                    "entry {n}: the device at the address does not match {}",
                    describe_entry(entry)
                ),
                fix: "check the entry's subsystem and class against `vfio-early list`".to_string(),
            });
        }
        return;
    }
    let mut rule = format!("entry {n}: id {id}");
    if let Some(a) = entry.address {
        rule.push_str(&format!(" at {a}"));
    }
    if let Some(s) = entry.subsystem {
        rule.push_str(&format!(", subsystem {s}"));
    }
    if let Some(c) = entry.class {
        rule.push_str(&format!(", class {c}"));
    }
    for d in &matches {
        selected.entry(d.address).or_insert((n, rule.clone()));
    }
    if entry.whole_slot {
        for d in &matches {
            for sibling in machine
                .devices
                .iter()
                .filter(|s| s.address != d.address && s.address.same_slot(&d.address))
            {
                selected.entry(sibling.address).or_insert((
                    n,
                    format!("entry {n}: same slot as {} (whole_slot)", d.address),
                ));
            }
        }
    }
}

fn describe_entry(entry: &DeviceEntry) -> String {
    let mut s = format!("id {}", entry.id);
    if let Some(sub) = entry.subsystem {
        s.push_str(&format!(", subsystem {sub}"));
    }
    if let Some(c) = entry.class {
        s.push_str(&format!(", class {c}"));
    }
    s
}

/// Why a device must stay with the host, if it must.
fn interlock_for(device: &Device, machine: &Machine, entries: &[DeviceEntry]) -> Option<String> {
    // Fail closed: a device whose class cannot be read may be a bridge.
    let Some(class) = device.class else {
        return Some(
            "has a PCI class that cannot be read, so it may be a bridge (taking a bridge \
             cuts off everything behind it)"
                .to_string(),
        );
    };
    if class.is_bridge() {
        return Some(format!(
            "is a {} (taking it cuts off everything behind it)",
            class.name()
        ));
    }
    let held: Vec<String> = machine
        .system_disks
        .held_by(device.address)
        .map(|s| {
            if s.mount_point == SWAP {
                format!("the active swap ({})", s.how)
            } else {
                format!("the filesystem mounted at {} ({})", s.mount_point, s.how)
            }
        })
        .collect();
    if !held.is_empty() {
        return Some(format!(
            "holds {}; the host would lose its disk",
            held.join(" and ")
        ));
    }
    // Where the system's devices are not all known, any storage or network controller
    // may hold them.
    let unknown = &machine.system_disks.unknown;
    let kind = match class.base() {
        0x01 => Some("storage"),
        0x02 => Some("network"),
        _ => None,
    };
    if let (Some(kind), false) = (kind, unknown.is_empty()) {
        return Some(format!(
            "is a {kind} controller and may hold the system: {}",
            unknown.join("; ")
        ));
    }
    if device.boot_vga {
        // Another display that no entry selects keeps the host a console.
        let other_display = machine.devices.iter().any(|d| {
            d.address != device.address
                && d.class.is_some_and(|c| c.is_display())
                && !entries
                    .iter()
                    .any(|e| d.id == Some(e.id) && e.address.is_none_or(|a| a == d.address))
        });
        if !other_display {
            return Some(
                "is the boot VGA and the host's only display (the console would go dark)"
                    .to_string(),
            );
        }
    }
    None
}

/// Warns when a taken device shares its IOMMU group with endpoints the host keeps.
fn check_groups(machine: &Machine, plan: &mut Plan) {
    let taken: Vec<PciAddress> = plan.targets().map(|d| d.address).collect();
    let mut groups: BTreeMap<u32, Vec<PciAddress>> = BTreeMap::new();
    for addr in &taken {
        match machine.device(*addr).and_then(|d| d.iommu_group) {
            Some(g) => groups.entry(g).or_default().push(*addr),
            None => plan.problems.push(Problem {
                severity: Severity::Warning,
                message: format!("{addr} has no IOMMU group: the IOMMU is off or absent"),
                fix: "enable VT-d / AMD-Vi in the firmware setup; vfio-early apply adds \
                      the kernel arguments"
                    .to_string(),
            }),
        }
    }
    for (group, members_taken) in groups {
        let others: Vec<&Device> = machine
            .devices
            .iter()
            .filter(|d| d.iommu_group == Some(group) && !taken.contains(&d.address))
            .filter(|d| !d.class.is_some_and(|c| c.is_bridge()))
            .filter(|d| !matches!(d.driver.as_deref(), Some("vfio-pci") | Some("pci-stub")))
            .collect();
        if others.is_empty() {
            continue;
        }
        let names: Vec<String> = others
            .iter()
            .map(|d| {
                format!(
                    "{} ({}, {})",
                    d.address,
                    d.class.map(|c| c.name()).unwrap_or("unknown"),
                    d.driver.as_deref().unwrap_or("no driver")
                )
            })
            .collect();
        let taken_names: Vec<String> = members_taken.iter().map(|a| a.to_string()).collect();
        plan.problems.push(Problem {
            severity: Severity::Warning,
            message: format!(
                "IOMMU group {group} holds {} (taken) and also {}, which the host keeps; \
                 a VM can use a group only when every endpoint in it is on vfio-pci",
                taken_names.join(", "),
                names.join(", ")
            ),
            fix: "take the other members too (add entries), or move the card to a slot \
                  with its own group"
                .to_string(),
        });
    }
}

/// Kernel arguments that follow from the config, the CPU and the taken devices.
fn kernel_args(config: &Config, machine: &Machine, plan: &Plan) -> Vec<KernelArg> {
    let mut args = Vec::new();
    let mut add = |token: &str, reason: &str| {
        args.push(KernelArg {
            token: token.to_string(),
            reason: reason.to_string(),
        })
    };
    if config.devices.is_empty() && !has_global_settings(config) {
        return args;
    }
    let vendor = match config.iommu.vendor {
        IommuVendor::Intel => CpuVendor::Intel,
        IommuVendor::Amd => CpuVendor::Amd,
        IommuVendor::Auto => machine.cpu_vendor,
    };
    if vendor == CpuVendor::Intel {
        add(
            "intel_iommu=on",
            "Intel CPU: turn on VT-d (Debian leaves it off for some)",
        );
    }
    if config.iommu.passthrough {
        add(
            "iommu=pt",
            "[iommu] passthrough: host devices skip translation",
        );
    }
    let boot_vga_taken = plan
        .targets()
        .any(|d| machine.device(d.address).is_some_and(|dev| dev.boot_vga));
    match config.kernel.framebuffer {
        Framebuffer::Auto if boot_vga_taken => add(
            "initcall_blacklist=sysfb_init",
            "a taken GPU is the boot VGA: keep the boot framebuffer off its memory",
        ),
        Framebuffer::SysfbOff => add(
            "initcall_blacklist=sysfb_init",
            "[kernel] framebuffer = \"sysfb-off\"",
        ),
        Framebuffer::VideoOff => {
            for t in ["video=efifb:off", "video=vesafb:off", "video=simplefb:off"] {
                add(t, "[kernel] framebuffer = \"video-off\"");
            }
        }
        Framebuffer::Auto | Framebuffer::Keep => {}
    }
    if config.kernel.pcie_aspm_off {
        add("pcie_aspm=off", "[kernel] pcie_aspm_off");
    }
    if config.kernel.pci_noaer {
        add("pci=noaer", "[kernel] pci_noaer");
    }
    if let Some(token) = acs_token(&config.kernel.acs_override) {
        add(&token, "[kernel] acs_override (patched kernels only)");
    }
    for extra in &config.kernel.extra_args {
        add(extra, "[kernel] extra_args");
    }
    args
}

fn acs_token(values: &[AcsOverride]) -> Option<String> {
    if values.is_empty() {
        return None;
    }
    let mut down = false;
    let mut multi = false;
    for v in values {
        match v {
            AcsOverride::Downstream => down = true,
            AcsOverride::Multifunction => multi = true,
            AcsOverride::Both => {
                down = true;
                multi = true;
            }
        }
    }
    let parts: Vec<&str> = [(down, "downstream"), (multi, "multifunction")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, s)| *s)
        .collect();
    Some(format!("pcie_acs_override={}", parts.join(",")))
}

fn has_global_settings(config: &Config) -> bool {
    let d = Config::default();
    config.kernel != d.kernel
        || config.modules != d.modules
        || config.kvm != d.kvm
        || config.interrupts != d.interrupts
}

fn kernel_arg_problems(config: &Config, machine: &Machine) -> Vec<Problem> {
    let mut out = Vec::new();
    if !config.kernel.acs_override.is_empty() {
        let patched = machine
            .running_kernel
            .as_deref()
            .is_some_and(|k| k.contains("-pve"));
        if !patched {
            out.push(Problem {
                severity: Severity::Warning,
                message: format!(
                    "pcie_acs_override is honoured only by kernels carrying the ACS override \
                     patch (such as Proxmox's); the running kernel {} looks unpatched, so it \
                     will ignore it",
                    machine.running_kernel.as_deref().unwrap_or("(unknown)")
                ),
                fix: "boot a Proxmox (pve) kernel, or drop acs_override; also know that \
                      splitting groups this way weakens isolation between devices"
                    .to_string(),
            });
        }
    }
    if config.interrupts.allow_unsafe {
        out.push(Problem {
            severity: Severity::Warning,
            message: "allow_unsafe_interrupts is on: a guest can forge interrupts (MSI \
                      injection) against the host"
                .to_string(),
            fix: "turn it off when the IOMMU supports interrupt remapping (see `vfio-early \
                  status`)"
                .to_string(),
        });
    }
    if config.iommu.vendor == IommuVendor::Auto
        && machine.cpu_vendor == CpuVendor::Unknown
        && !config.devices.is_empty()
    {
        out.push(Problem {
            severity: Severity::Warning,
            message: "the CPU vendor is unknown, so no IOMMU argument is added".to_string(),
            fix: "set [iommu] vendor = \"intel\" or \"amd\"".to_string(),
        });
    }
    out
}
