//! The planner: (config, machine) → plan. The only place where vfio-early decides which
//! devices are taken, which are refused and why, and which kernel arguments follow.
//!
//! Pure: no I/O. Every decision carries a reason a user can read; renderers and reports
//! print reasons, they never re-decide.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::bind::VFIO_DRIVER;
use crate::config::{AcsOverride, Config, DeviceEntry, Framebuffer, IommuVendor};
use crate::kmod::normalize;
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

impl Verdict {
    /// The word reports print for the verdict (`list`'s VFIO column, `check`).
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Take => "take",
            Verdict::TakeForced => "take (forced)",
            Verdict::Refuse => "REFUSED",
        }
    }
}

/// Why a selected device must stay with the host. `Display` is the sentence reports
/// print after "it": "it is a PCI bridge (...)".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "interlock")]
pub enum Interlock {
    /// A bridge: everything behind it would go too.
    Bridge { class_name: String },
    /// Its class cannot be read, so it may be a bridge.
    UnknownClass,
    /// It holds mounted system filesystems or swap: each as "the filesystem mounted at
    /// / (ext4 on nvme0n1p2)".
    SystemDisk { held: Vec<String> },
    /// A storage or network controller, while the devices holding the system are not
    /// all known: why they are not.
    MayHoldSystem { kind: String, reasons: Vec<String> },
    /// The boot VGA, and no other display stays with the host.
    OnlyDisplay,
    /// Live binds need an active IOMMU (vfio-pci's probe fails without one).
    NeedsIommu,
    /// A live bind of a device in no IOMMU group: vfio-pci cannot take it.
    NoIommuGroup,
    /// Another function of its slot, taken with it (`whole_slot`), is refused.
    CompanionOfRefused { primary: PciAddress },
}

impl fmt::Display for Interlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interlock::Bridge { class_name } => write!(
                f,
                "is a {class_name} (taking it cuts off everything behind it)"
            ),
            Interlock::UnknownClass => write!(
                f,
                "has a PCI class that cannot be read, so it may be a bridge (taking a \
                 bridge cuts off everything behind it)"
            ),
            Interlock::SystemDisk { held } => write!(
                f,
                "holds {}; the host would lose its disk",
                held.join(" and ")
            ),
            Interlock::MayHoldSystem { kind, reasons } => write!(
                f,
                "is a {kind} controller and may hold the system: {}",
                reasons.join("; ")
            ),
            Interlock::OnlyDisplay => write!(
                f,
                "is the boot VGA and the host's only display (the console would go dark)"
            ),
            Interlock::NeedsIommu => write!(f, "needs an active IOMMU"),
            Interlock::NoIommuGroup => write!(
                f,
                "is in no IOMMU group, so vfio-pci cannot take it on this boot"
            ),
            Interlock::CompanionOfRefused { primary } => write!(
                f,
                "goes with {primary} (same slot, whole_slot), which is refused"
            ),
        }
    }
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
    pub interlock: Option<Interlock>,
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

/// What a problem is about, for callers that act on a kind of problem (`status`) rather
/// than print it. Entries are 1-based `[[device]]` indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// A live bind without an active IOMMU: nothing is taken.
    NoIommu,
    /// The entry's `address` holds no device.
    NoDeviceAtAddress { entry: usize },
    /// The device at the entry's `address` has another id.
    IdentityMismatch { entry: usize },
    /// No device matches the entry.
    UnmatchedEntry { entry: usize },
    /// Two entries select the same device; the first decides.
    Overlap {
        address: PciAddress,
        first: usize,
        second: usize,
    },
    /// A device is selected and an interlock refuses it.
    Refused {
        address: PciAddress,
        interlock: Interlock,
    },
    /// A device is selected, an interlock objected, and `--force` overrode it.
    Forced {
        address: PciAddress,
        interlock: Interlock,
    },
    /// A taken device is in no IOMMU group.
    NoIommuGroup { address: PciAddress },
    /// An IOMMU group holds taken devices and endpoints the host keeps.
    SplitGroup {
        group: u32,
        taken: Vec<PciAddress>,
        kept: Vec<PciAddress>,
    },
    /// `acs_override` on a kernel that looks unpatched.
    AcsUnpatched,
    /// `allow_unsafe_interrupts` is on.
    UnsafeInterrupts,
    /// `vendor = "auto"` and the CPU vendor is unknown.
    UnknownCpuVendor,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(skip)]
    pub kind: ProblemKind,
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

impl Problem {
    fn new(kind: ProblemKind, severity: Severity, message: String, fix: &str) -> Problem {
        Problem {
            kind,
            severity,
            message,
            fix: fix.to_string(),
        }
    }
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
    /// Drivers that vfio-pci must load before (modprobe softdeps): every driver that
    /// could claim a taken device on an installed kernel. Empty unless the machine's
    /// kernel module facts were read (apply).
    pub softdeps: Vec<String>,
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

    /// The 1-based entries that selected no device on this machine (absent, moved, or
    /// narrowed away), in order.
    pub fn unmatched_entries(&self, config: &Config) -> Vec<usize> {
        (1..=config.devices.len())
            .filter(|n| !self.decisions.iter().any(|d| d.entry == *n))
            .collect()
    }

    /// The split-group problems: groups that hold taken devices and devices the host
    /// keeps.
    pub fn split_groups(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| matches!(p.kind, ProblemKind::SplitGroup { .. }))
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

/// Why a device was selected: the entry, the rule, and for a `whole_slot` companion the
/// device it goes with.
#[derive(Debug, Clone)]
struct Selection {
    entry: usize,
    rule: String,
    companion_of: Option<PciAddress>,
}

/// Makes the plan. See the module documentation.
pub fn plan(config: &Config, machine: &Machine, opts: Options) -> Plan {
    let mut plan = Plan::default();
    let mut selected: BTreeMap<PciAddress, Selection> = BTreeMap::new();

    for (i, entry) in config.devices.iter().enumerate() {
        select_for_entry(i + 1, entry, machine, &mut selected, &mut plan.problems);
    }

    let no_iommu = opts.live && machine.iommu_units.is_empty() && !selected.is_empty();
    if no_iommu {
        plan.problems.push(Problem::new(
            ProblemKind::NoIommu,
            Severity::Warning,
            "no IOMMU is active on this boot, so vfio-pci cannot take devices; \
             every selected device stays on its driver"
                .to_string(),
            "enable VT-d / AMD-Vi (IOMMU) in the firmware setup, run `vfio-early apply` \
             for the kernel arguments, reboot, and see `vfio-early status`",
        ));
    }
    // Primaries first, so that a companion knows whether the device it goes with is
    // refused; decisions are then kept in address order.
    let (primaries, companions): (Vec<_>, Vec<_>) = selected
        .iter()
        .partition(|(_, sel)| sel.companion_of.is_none());
    for (address, sel) in primaries.into_iter().chain(companions) {
        let Some(device) = machine.device(*address) else {
            continue;
        };
        let interlock = if no_iommu {
            Some(Interlock::NeedsIommu)
        } else if opts.live && device.iommu_group.is_none() {
            Some(Interlock::NoIommuGroup)
        } else {
            interlock_for(device, machine, &selected).or_else(|| {
                let primary = sel.companion_of?;
                let refused = plan
                    .decision(primary)
                    .is_some_and(|d| d.verdict == Verdict::Refuse);
                refused.then_some(Interlock::CompanionOfRefused { primary })
            })
        };
        let verdict = match (&interlock, opts.force) {
            (None, _) => Verdict::Take,
            // No force helps: vfio-pci's probe would fail and leave the device driverless.
            (Some(Interlock::NeedsIommu | Interlock::NoIommuGroup), _) => Verdict::Refuse,
            (Some(_), true) => Verdict::TakeForced,
            (Some(_), false) => Verdict::Refuse,
        };
        if let Some(why) = interlock.clone().filter(|i| *i != Interlock::NeedsIommu) {
            plan.problems
                .push(interlock_problem(*address, sel.entry, why, &verdict));
        }
        plan.decisions.push(Decision {
            address: *address,
            id: device.id,
            verdict,
            entry: sel.entry,
            rule: sel.rule.clone(),
            interlock,
        });
    }
    plan.decisions.sort_by_key(|d| d.address);

    check_groups(machine, &mut plan);
    plan.kernel_args = kernel_args(config, machine, &plan);
    plan.problems.extend(kernel_arg_problems(config, machine));
    plan.softdeps = softdeps(config, machine, &plan);
    plan
}

/// The problem an interlock raises: an error when it refuses, a warning when forced, a
/// note for a companion (its primary's refusal is the error).
fn interlock_problem(
    address: PciAddress,
    entry: usize,
    why: Interlock,
    verdict: &Verdict,
) -> Problem {
    match verdict {
        Verdict::TakeForced => Problem::new(
            ProblemKind::Forced {
                address,
                interlock: why.clone(),
            },
            Severity::Warning,
            format!("{address} taken although it {why} (--force)"),
            "make sure the host has another way to boot and be reached",
        ),
        _ => {
            let severity = match why {
                Interlock::CompanionOfRefused { .. } => Severity::Note,
                _ => Severity::Error,
            };
            let fix = match why {
                Interlock::NoIommuGroup => "enable VT-d / AMD-Vi (IOMMU) in the firmware setup, \
                     run `vfio-early apply` for the kernel arguments and reboot"
                    .to_string(),
                _ => format!(
                    "remove or narrow entry {entry} (e.g. with `address =`), or run \
                     again with --force if you really mean it"
                ),
            };
            Problem::new(
                ProblemKind::Refused {
                    address,
                    interlock: why.clone(),
                },
                severity,
                format!("refusing to take {address}: it {why}"),
                &fix,
            )
        }
    }
}

/// Adds every device the entry selects to `selected` (first entry wins).
fn select_for_entry(
    n: usize,
    entry: &DeviceEntry,
    machine: &Machine,
    selected: &mut BTreeMap<PciAddress, Selection>,
    problems: &mut Vec<Problem>,
) {
    if let Err(p) = check_address(n, entry, machine) {
        problems.push(p);
        return;
    }
    let matches: Vec<&Device> = machine
        .devices
        .iter()
        .filter(|d| entry_matches(entry, d))
        .collect();
    if matches.is_empty() {
        let (message, fix) = if entry.address.is_none() {
            (
                format!("entry {n}: no device matches {}", describe_entry(entry)),
                "check `vfio-early list`; the device may be absent on this machine",
            )
        } else {
            (
                format!(
                    "entry {n}: the device at the address does not match {}",
                    describe_entry(entry)
                ),
                "check the entry's subsystem and class against `vfio-early list`",
            )
        };
        problems.push(Problem::new(
            ProblemKind::UnmatchedEntry { entry: n },
            Severity::Warning,
            message,
            fix,
        ));
        return;
    }
    let rule = describe_rule(n, entry);
    for d in &matches {
        let sel = Selection {
            entry: n,
            rule: rule.clone(),
            companion_of: None,
        };
        select(d.address, sel, selected, problems);
    }
    if entry.whole_slot {
        for d in &matches {
            for sibling in machine
                .devices
                .iter()
                .filter(|s| s.address != d.address && s.address.same_slot(&d.address))
            {
                let sel = Selection {
                    entry: n,
                    rule: format!("entry {n}: same slot as {} (whole_slot)", d.address),
                    companion_of: Some(d.address),
                };
                select(sibling.address, sel, selected, problems);
            }
        }
    }
}

/// Records a selection; the first entry to select a device decides, and a later entry
/// that selects it again by its own rule (not as a whole_slot companion) is warned
/// about, naming both.
fn select(
    address: PciAddress,
    sel: Selection,
    selected: &mut BTreeMap<PciAddress, Selection>,
    problems: &mut Vec<Problem>,
) {
    match selected.get(&address) {
        None => {
            selected.insert(address, sel);
        }
        // The same entry twice, or a later entry's implicit whole_slot companion: quiet.
        Some(first) if first.entry == sel.entry || sel.companion_of.is_some() => {}
        Some(first) => problems.push(Problem::new(
            ProblemKind::Overlap {
                address,
                first: first.entry,
                second: sel.entry,
            },
            Severity::Warning,
            format!(
                "{address} is selected by entry {} ({}) and again by entry {} ({}); \
                 entry {} decides",
                first.entry, first.rule, sel.entry, sel.rule, first.entry
            ),
            "remove the duplicate entry, or narrow one of them with `address =`",
        )),
    }
}

/// An entry with `address =` must find a device there, of its id (identity check).
fn check_address(n: usize, entry: &DeviceEntry, machine: &Machine) -> Result<(), Problem> {
    let (id, Some(addr)) = (entry.id, entry.address) else {
        return Ok(());
    };
    match machine.device(addr) {
        None => Err(Problem::new(
            ProblemKind::NoDeviceAtAddress { entry: n },
            Severity::Warning,
            format!("entry {n}: no device at {addr} (wanted {id})"),
            "check `vfio-early list`; the card may be absent or moved",
        )),
        Some(d) if d.id != Some(id) => {
            let found =
                d.id.map(|v| v.to_string())
                    .unwrap_or_else(|| "unknown".into());
            Err(Problem::new(
                ProblemKind::IdentityMismatch { entry: n },
                Severity::Error,
                format!(
                    "entry {n}: the device at {addr} is {found}, not {id}; nothing is \
                     taken there (a card was moved or added?)"
                ),
                "check `vfio-early list` and correct the entry's address or id",
            ))
        }
        Some(_) => Ok(()),
    }
}

/// The rule an entry selects by, as reports print it.
fn describe_rule(n: usize, entry: &DeviceEntry) -> String {
    let mut rule = format!("entry {n}: id {}", entry.id);
    if let Some(a) = entry.address {
        rule.push_str(&format!(" at {a}"));
    }
    if let Some(s) = entry.subsystem {
        rule.push_str(&format!(", subsystem {s}"));
    }
    if let Some(c) = entry.class {
        rule.push_str(&format!(", class {c}"));
    }
    rule
}

/// The selection rule of one entry for one device: id, then the optional address,
/// subsystem and class narrowing.
fn entry_matches(entry: &DeviceEntry, d: &Device) -> bool {
    d.id == Some(entry.id)
        && entry.address.is_none_or(|a| a == d.address)
        && entry.subsystem.is_none_or(|s| d.subsystem == Some(s))
        && entry
            .class
            .is_none_or(|c| d.class.is_some_and(|dc| c.matches(dc)))
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

/// Why a device must stay with the host, if it must. `selected` is the planner's own
/// selection: a display it selects does not keep the host a console.
fn interlock_for(
    device: &Device,
    machine: &Machine,
    selected: &BTreeMap<PciAddress, Selection>,
) -> Option<Interlock> {
    // Fail closed: a device whose class cannot be read may be a bridge.
    let Some(class) = device.class else {
        return Some(Interlock::UnknownClass);
    };
    if class.is_bridge() {
        return Some(Interlock::Bridge {
            class_name: class.name().to_string(),
        });
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
        return Some(Interlock::SystemDisk { held });
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
        return Some(Interlock::MayHoldSystem {
            kind: kind.to_string(),
            reasons: unknown.clone(),
        });
    }
    if device.boot_vga {
        // Another display that the config does not select keeps the host a console.
        let other_display = machine.devices.iter().any(|d| {
            d.address != device.address
                && d.class.is_some_and(|c| c.is_display())
                && !selected.contains_key(&d.address)
        });
        if !other_display {
            return Some(Interlock::OnlyDisplay);
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
            None => plan.problems.push(Problem::new(
                ProblemKind::NoIommuGroup { address: *addr },
                Severity::Warning,
                format!("{addr} has no IOMMU group: the IOMMU is off or absent"),
                "enable VT-d / AMD-Vi in the firmware setup; vfio-early apply adds \
                 the kernel arguments",
            )),
        }
    }
    for (group, members_taken) in groups {
        let others: Vec<&Device> = machine
            .devices
            .iter()
            .filter(|d| d.iommu_group == Some(group) && !taken.contains(&d.address))
            .filter(|d| !d.class.is_some_and(|c| c.is_bridge()))
            .filter(|d| !matches!(d.driver.as_deref(), Some(VFIO_DRIVER) | Some("pci-stub")))
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
        plan.problems.push(Problem::new(
            ProblemKind::SplitGroup {
                group,
                taken: members_taken.clone(),
                kept: others.iter().map(|d| d.address).collect(),
            },
            Severity::Warning,
            format!(
                "IOMMU group {group} holds {} (taken) and also {}, which the host keeps; \
                 a VM can use a group only when every endpoint in it is on vfio-pci",
                taken_names.join(", "),
                names.join(", ")
            ),
            "take the other members too (add entries), or move the card to a slot \
             with its own group",
        ));
    }
}

/// Drivers that could claim a taken device, on any installed kernel: vfio-pci loads
/// before each (softdep). An entry that finds no device here (apply in a chroot, a card
/// not fitted yet) still gets the drivers that name its id, so the image is ready when
/// the device appears.
fn softdeps(config: &Config, machine: &Machine, plan: &Plan) -> Vec<String> {
    let kernels = &machine.kernels;
    let mut out = BTreeSet::new();
    for n in plan.unmatched_entries(config) {
        let Some(entry) = config.devices.get(n - 1) else {
            continue;
        };
        for k in kernels {
            out.extend(k.drivers_for_id(entry.id.vendor, entry.id.device));
        }
    }
    for d in plan.targets() {
        let Some(dev) = machine.device(d.address) else {
            continue;
        };
        if let Some(drv) = &dev.driver {
            out.insert(normalize(drv));
        }
        if let Some(alias) = &dev.modalias {
            for k in kernels {
                out.extend(k.drivers_for(alias));
            }
        }
    }
    // vfio-pci itself, and pcieport/pci-stub, are never softdep targets.
    for never in ["vfio_pci", "pci_stub", "pcieport"] {
        out.remove(never);
    }
    out.into_iter().collect()
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
    match vendor {
        CpuVendor::Intel => add(
            "intel_iommu=on",
            "Intel CPU: turn on VT-d (Debian leaves it off for some)",
        ),
        CpuVendor::Unknown => add(
            "intel_iommu=on",
            "CPU unknown: turns on VT-d on Intel, and AMD ignores it (its IOMMU is on \
             by default)",
        ),
        CpuVendor::Amd => {}
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
            out.push(Problem::new(
                ProblemKind::AcsUnpatched,
                Severity::Warning,
                format!(
                    "pcie_acs_override is honoured only by kernels carrying the ACS override \
                     patch (such as Proxmox's); the running kernel {} looks unpatched, so it \
                     will ignore it",
                    machine.running_kernel.as_deref().unwrap_or("(unknown)")
                ),
                "boot a Proxmox (pve) kernel, or drop acs_override; also know that \
                 splitting groups this way weakens isolation between devices",
            ));
        }
    }
    if config.interrupts.allow_unsafe {
        out.push(Problem::new(
            ProblemKind::UnsafeInterrupts,
            Severity::Warning,
            "allow_unsafe_interrupts is on: a guest can forge interrupts (MSI \
             injection) against the host"
                .to_string(),
            "turn it off when the IOMMU supports interrupt remapping (see `vfio-early \
             status`)",
        ));
    }
    if config.iommu.vendor == IommuVendor::Auto
        && machine.cpu_vendor == CpuVendor::Unknown
        && !config.devices.is_empty()
    {
        let why = if machine.running_system {
            "this CPU's vendor is not recognised"
        } else {
            "the root is not the running system (a chroot or an image), so its CPU is \
             not this one's"
        };
        out.push(Problem::new(
            ProblemKind::UnknownCpuVendor,
            Severity::Note,
            format!(
                "[iommu] vendor = \"auto\", but {why}: the arguments are right for both \
                 vendors (intel_iommu=on, which AMD ignores)"
            ),
            "set [iommu] vendor = \"intel\" or \"amd\" to be exact",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    //! Table-driven: one row per planner rule, on machines built in memory.

    use super::*;
    use crate::config;
    use crate::pci::PciClass;
    use crate::sysdisk::{SystemDisk, SystemDisks};

    fn dev(addr: &str, id: &str, class: u32) -> Device {
        Device {
            address: addr.parse().unwrap(),
            id: Some(id.parse().unwrap()),
            subsystem: Some("1af4:1100".parse().unwrap()),
            class: Some(PciClass(class)),
            driver: None,
            driver_override: None,
            iommu_group: None,
            boot_vga: false,
            modalias: None,
        }
    }

    trait With {
        fn group(self, g: u32) -> Self;
        fn driver(self, d: &str) -> Self;
        fn boot_vga(self) -> Self;
        fn subsystem(self, s: &str) -> Self;
    }

    impl With for Device {
        fn group(mut self, g: u32) -> Self {
            self.iommu_group = Some(g);
            self
        }
        fn driver(mut self, d: &str) -> Self {
            self.driver = Some(d.to_string());
            self
        }
        fn boot_vga(mut self) -> Self {
            self.boot_vga = true;
            self
        }
        fn subsystem(mut self, s: &str) -> Self {
            self.subsystem = Some(s.parse().unwrap());
            self
        }
    }

    const VGA: u32 = 0x030000;
    const AUDIO: u32 = 0x040300;
    const NIC: u32 = 0x020000;
    const NVME: u32 = 0x010802;
    const BRIDGE: u32 = 0x060400;

    /// A workstation: iGPU boot VGA, a GPU + HDMI audio in group 1 behind a root port,
    /// two identical NICs, an NVMe holding `/`.
    fn workstation() -> Vec<Device> {
        vec![
            dev("00:01.0", "8086:1901", BRIDGE)
                .driver("pcieport")
                .group(1),
            dev("00:02.0", "8086:3e92", VGA)
                .driver("i915")
                .group(2)
                .boot_vga(),
            dev("01:00.0", "10de:1b80", VGA)
                .driver("nouveau")
                .group(1)
                .subsystem("1458:3702"),
            dev("01:00.1", "10de:10f0", AUDIO)
                .driver("snd_hda_intel")
                .group(1),
            dev("02:00.0", "144d:a808", NVME).driver("nvme").group(4),
            dev("03:00.0", "8086:10d3", NIC).driver("e1000e").group(5),
            dev("04:00.0", "8086:10d3", NIC).driver("e1000e").group(6),
        ]
    }

    fn machine(devices: Vec<Device>) -> Machine {
        Machine {
            devices,
            cpu_vendor: CpuVendor::Intel,
            running_system: true,
            cmdline: Some("root=UUID=x ro".into()),
            running_kernel: Some("6.1.0-28-amd64".into()),
            installed_kernels: vec!["6.1.0-28-amd64".into()],
            iommu_units: vec!["dmar0".into()],
            system_disks: SystemDisks {
                known: vec![SystemDisk {
                    address: "02:00.0".parse().unwrap(),
                    mount_point: "/".into(),
                    how: "ext4 on nvme0n1p2".into(),
                }],
                unknown: Vec::new(),
            },
            kernels: Vec::new(),
        }
    }

    fn cfg(text: &str) -> Config {
        config::parse(text, std::path::Path::new("t.toml")).unwrap()
    }

    /// `bb:ss.f verdict` per decision, in address order.
    fn verdicts(p: &Plan) -> Vec<String> {
        p.decisions
            .iter()
            .map(|d| {
                let a = d.address.to_string();
                format!("{} {}", &a[5..], d.verdict.label())
            })
            .collect()
    }

    /// A short label per problem kind, for the tables.
    fn kinds(p: &Plan) -> Vec<String> {
        let short = |a: &PciAddress| a.to_string()[5..].to_string();
        p.problems
            .iter()
            .map(|pr| match &pr.kind {
                ProblemKind::NoIommu => "no-iommu".to_string(),
                ProblemKind::NoDeviceAtAddress { entry } => format!("no-device {entry}"),
                ProblemKind::IdentityMismatch { entry } => format!("mismatch {entry}"),
                ProblemKind::UnmatchedEntry { entry } => format!("unmatched {entry}"),
                ProblemKind::Overlap {
                    address,
                    first,
                    second,
                } => format!("overlap {} {first} {second}", short(address)),
                ProblemKind::Refused { address, interlock } => {
                    format!("refused {} {}", short(address), interlock_label(interlock))
                }
                ProblemKind::Forced { address, interlock } => {
                    format!("forced {} {}", short(address), interlock_label(interlock))
                }
                ProblemKind::NoIommuGroup { address } => format!("no-group {}", short(address)),
                ProblemKind::SplitGroup { group, .. } => format!("split {group}"),
                ProblemKind::AcsUnpatched => "acs".to_string(),
                ProblemKind::UnsafeInterrupts => "unsafe-interrupts".to_string(),
                ProblemKind::UnknownCpuVendor => "unknown-cpu".to_string(),
            })
            .collect()
    }

    fn interlock_label(i: &Interlock) -> &'static str {
        match i {
            Interlock::Bridge { .. } => "bridge",
            Interlock::UnknownClass => "unknown-class",
            Interlock::SystemDisk { .. } => "system-disk",
            Interlock::MayHoldSystem { .. } => "may-hold-system",
            Interlock::OnlyDisplay => "only-display",
            Interlock::NeedsIommu => "needs-iommu",
            Interlock::NoIommuGroup => "no-iommu-group",
            Interlock::CompanionOfRefused { .. } => "companion",
        }
    }

    struct Case {
        name: &'static str,
        config: &'static str,
        opts: Options,
        /// Changes to the workstation before planning.
        setup: fn(&mut Machine),
        verdicts: &'static [&'static str],
        problems: &'static [&'static str],
    }

    const REPORT: Options = Options {
        force: false,
        live: false,
    };
    const FORCE: Options = Options {
        force: true,
        live: false,
    };
    const LIVE: Options = Options {
        force: false,
        live: true,
    };

    fn keep(_: &mut Machine) {}

    const CASES: &[Case] = &[
        Case {
            name: "by id takes every device with the id",
            config: "[[device]]\nid = \"8086:10d3\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["03:00.0 take", "04:00.0 take"],
            problems: &[],
        },
        Case {
            name: "by address takes one of two identical devices",
            config: "[[device]]\nid = \"8086:10d3\"\naddress = \"04:00.0\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["04:00.0 take"],
            problems: &[],
        },
        Case {
            name: "an address holding another id takes nothing and is an error",
            config: "[[device]]\nid = \"8086:10d3\"\naddress = \"02:00.0\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &[],
            problems: &["mismatch 1"],
        },
        Case {
            name: "an address holding nothing is a warning",
            config: "[[device]]\nid = \"8086:10d3\"\naddress = \"09:00.0\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &[],
            problems: &["no-device 1"],
        },
        Case {
            name: "an id that matches nothing is a warning",
            config: "[[device]]\nid = \"1234:5678\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &[],
            problems: &["unmatched 1"],
        },
        Case {
            name: "subsystem narrows",
            config: "[[device]]\nid = \"10de:1b80\"\nsubsystem = \"1458:3702\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["01:00.0 take", "01:00.1 take"],
            problems: &[],
        },
        Case {
            name: "a subsystem that differs selects nothing",
            config: "[[device]]\nid = \"10de:1b80\"\nsubsystem = \"1043:0000\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &[],
            problems: &["unmatched 1"],
        },
        Case {
            name: "class narrows",
            config: "[[device]]\nid = \"10de:1b80\"\nclass = \"04\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &[],
            problems: &["unmatched 1"],
        },
        Case {
            name: "whole_slot takes the GPU's audio function",
            config: "[[device]]\nid = \"10de:1b80\"\nclass = \"0300\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["01:00.0 take", "01:00.1 take"],
            problems: &[],
        },
        Case {
            name: "without whole_slot the audio function stays, and the group is split",
            config: "[[device]]\nid = \"10de:1b80\"\nwhole_slot = false\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["01:00.0 take"],
            problems: &["split 1"],
        },
        Case {
            name: "the system disk is refused",
            config: "[[device]]\nid = \"144d:a808\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["02:00.0 REFUSED"],
            problems: &["refused 02:00.0 system-disk"],
        },
        Case {
            name: "force takes the system disk with a warning",
            config: "[[device]]\nid = \"144d:a808\"\n",
            opts: FORCE,
            setup: keep,
            verdicts: &["02:00.0 take (forced)"],
            problems: &["forced 02:00.0 system-disk"],
        },
        Case {
            name: "a bridge is refused",
            config: "[[device]]\nid = \"8086:1901\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["00:01.0 REFUSED"],
            problems: &["refused 00:01.0 bridge"],
        },
        Case {
            name: "the boot VGA goes when another display stays",
            config: "[[device]]\nid = \"8086:3e92\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["00:02.0 take"],
            problems: &[],
        },
        Case {
            name: "the boot VGA is refused when the other display is taken too",
            config: "[[device]]\nid = \"8086:3e92\"\n\n[[device]]\nid = \"10de:1b80\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["00:02.0 REFUSED", "01:00.0 take", "01:00.1 take"],
            problems: &["refused 00:02.0 only-display"],
        },
        Case {
            name: "the display interlock uses the planner's own selection (class)",
            // The entry names the GPU's id but its class narrows it away: the GPU stays
            // a host display, so the boot VGA may go.
            config: "[[device]]\nid = \"8086:3e92\"\n\n[[device]]\nid = \"10de:1b80\"\nclass = \"04\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["00:02.0 take"],
            problems: &["unmatched 2"],
        },
        Case {
            name: "a refused GPU's audio companion is refused with it",
            config: "[[device]]\nid = \"10de:1b80\"\n",
            opts: REPORT,
            setup: |m| {
                // The discrete GPU is the boot VGA and the only display.
                m.devices.retain(|d| d.address.to_string() != "0000:00:02.0");
                if let Some(gpu) = m.devices.iter_mut().find(|d| d.class == Some(PciClass(VGA))) {
                    gpu.boot_vga = true;
                }
            },
            verdicts: &["01:00.0 REFUSED", "01:00.1 REFUSED"],
            problems: &["refused 01:00.0 only-display", "refused 01:00.1 companion"],
        },
        Case {
            name: "force takes a refused GPU and its companion",
            config: "[[device]]\nid = \"10de:1b80\"\n",
            opts: FORCE,
            setup: |m| {
                m.devices.retain(|d| d.address.to_string() != "0000:00:02.0");
                if let Some(gpu) = m.devices.iter_mut().find(|d| d.class == Some(PciClass(VGA))) {
                    gpu.boot_vga = true;
                }
            },
            verdicts: &["01:00.0 take (forced)", "01:00.1 take"],
            problems: &["forced 01:00.0 only-display"],
        },
        Case {
            name: "the first entry that selects a device wins, and the overlap is warned",
            config: "[[device]]\nid = \"8086:10d3\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"03:00.0\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["03:00.0 take", "04:00.0 take"],
            problems: &["overlap 03:00.0 1 2"],
        },
        Case {
            name: "an entry naming a function its GPU's entry already takes is warned",
            config: "[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"10de:10f0\"\n",
            opts: REPORT,
            setup: keep,
            verdicts: &["01:00.0 take", "01:00.1 take"],
            problems: &["overlap 01:00.1 1 2"],
        },
        Case {
            name: "a live bind without an IOMMU takes nothing, even forced",
            config: "[[device]]\nid = \"8086:10d3\"\n",
            opts: Options {
                force: true,
                live: true,
            },
            setup: |m| m.iommu_units.clear(),
            verdicts: &["03:00.0 REFUSED", "04:00.0 REFUSED"],
            problems: &["no-iommu"],
        },
        Case {
            name: "a live bind refuses a device in no IOMMU group, even forced",
            config: "[[device]]\nid = \"8086:10d3\"\naddress = \"03:00.0\"\n",
            opts: Options {
                force: true,
                live: true,
            },
            setup: |m| {
                if let Some(d) = m.devices.iter_mut().find(|d| d.address.to_string() == "0000:03:00.0") {
                    d.iommu_group = None;
                }
            },
            verdicts: &["03:00.0 REFUSED"],
            problems: &["refused 03:00.0 no-iommu-group"],
        },
        Case {
            name: "a live bind with an IOMMU takes",
            config: "[[device]]\nid = \"8086:10d3\"\naddress = \"03:00.0\"\n",
            opts: LIVE,
            setup: keep,
            verdicts: &["03:00.0 take"],
            problems: &[],
        },
        Case {
            name: "apply without an IOMMU still plans (the IOMMU comes with the reboot)",
            config: "[[device]]\nid = \"8086:10d3\"\naddress = \"03:00.0\"\n",
            opts: REPORT,
            setup: |m| {
                m.iommu_units.clear();
                for d in &mut m.devices {
                    d.iommu_group = None;
                }
            },
            verdicts: &["03:00.0 take"],
            problems: &["no-group 03:00.0"],
        },
        Case {
            name: "a group member on vfio-pci or a bridge does not split the group",
            config: "[[device]]\nid = \"10de:1b80\"\nwhole_slot = false\n",
            opts: REPORT,
            setup: |m| {
                if let Some(a) = m.devices.iter_mut().find(|d| d.class == Some(PciClass(AUDIO))) {
                    a.driver = Some("vfio-pci".into());
                }
            },
            verdicts: &["01:00.0 take"],
            problems: &[],
        },
        Case {
            name: "acs_override on an unpatched kernel and unsafe interrupts are warned",
            config: "[kernel]\nacs_override = [\"downstream\"]\n[interrupts]\nallow_unsafe = true\n",
            opts: REPORT,
            setup: keep,
            verdicts: &[],
            problems: &["acs", "unsafe-interrupts"],
        },
        Case {
            name: "an unknown CPU vendor with vendor auto is warned",
            config: "[[device]]\nid = \"8086:10d3\"\naddress = \"03:00.0\"\n",
            opts: REPORT,
            setup: |m| m.cpu_vendor = CpuVendor::Unknown,
            verdicts: &["03:00.0 take"],
            problems: &["unknown-cpu"],
        },
    ];

    #[test]
    fn every_rule_of_the_planner() {
        let mut failures = Vec::new();
        for case in CASES {
            let mut m = machine(workstation());
            (case.setup)(&mut m);
            let p = plan(&cfg(case.config), &m, case.opts);
            let got = (verdicts(&p), kinds(&p));
            let want = (
                case.verdicts
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
                case.problems
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            );
            if got != want {
                failures.push(format!(
                    "{}:\n  got  {:?}\n  want {:?}",
                    case.name, got, want
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn unmatched_entries_are_the_entries_without_a_decision() {
        let m = machine(workstation());
        let c = cfg(
            "[[device]]\nid = \"1234:5678\"\n\n[[device]]\nid = \"8086:10d3\"\n\n\
                     [[device]]\nid = \"8086:10d3\"\naddress = \"02:00.0\"\n",
        );
        assert_eq!(plan(&c, &m, REPORT).unmatched_entries(&c), vec![1, 3]);
    }

    #[test]
    fn kernel_arguments_follow_vendor_and_settings() {
        let c = cfg("[[device]]\nid = \"8086:3e92\"\n");
        let tokens = |m: &Machine, c: &Config| -> Vec<String> {
            plan(c, m, REPORT)
                .kernel_args
                .into_iter()
                .map(|a| a.token)
                .collect()
        };
        let mut m = machine(workstation());
        // The boot VGA is taken (another display stays): the framebuffer goes too.
        assert_eq!(
            tokens(&m, &c),
            [
                "intel_iommu=on",
                "iommu=pt",
                "initcall_blacklist=sysfb_init"
            ]
        );
        m.cpu_vendor = CpuVendor::Amd;
        let c = cfg("[[device]]\nid = \"8086:10d3\"\n[iommu]\npassthrough = false\n");
        assert!(tokens(&m, &c).is_empty());
        let c = cfg("[[device]]\nid = \"8086:10d3\"\n[iommu]\nvendor = \"intel\"\n[kernel]\nframebuffer = \"video-off\"\nextra_args = [\"pci=realloc\"]\n");
        assert_eq!(
            tokens(&m, &c),
            [
                "intel_iommu=on",
                "iommu=pt",
                "video=efifb:off",
                "video=vesafb:off",
                "video=simplefb:off",
                "pci=realloc"
            ]
        );
        assert!(
            tokens(&m, &cfg("")).is_empty(),
            "nothing configured, no arguments"
        );
    }

    #[test]
    fn softdeps_come_from_aliases_and_drivers_bound_now() {
        let mut m = machine(workstation());
        let mut k = crate::kmod::KernelModules {
            version: "6.1.0-28-amd64".into(),
            ..Default::default()
        };
        k.pci_aliases = vec![
            (
                "pci:v00008086d000010D3sv*sd*bc*sc*i*".into(),
                "e1000e".into(),
            ),
            ("pci:v*d*sv*sd*bc02sc00i*".into(), "some_nic".into()),
            (
                "pci:v00001234d00005678sv*sd*bc*sc*i*".into(),
                "absent_drv".into(),
            ),
        ];
        m.kernels = vec![k];
        for d in &mut m.devices {
            d.modalias = d.id.map(|id| {
                format!(
                    "pci:v0000{:04X}d0000{:04X}sv00001AF4sd00001100bc{:02X}sc{:02X}i00",
                    id.vendor,
                    id.device,
                    d.class.map_or(0, |c| c.base()),
                    d.class.map_or(0, |c| c.sub())
                )
            });
        }
        let c = cfg("[[device]]\nid = \"8086:10d3\"\naddress = \"03:00.0\"\n\n[[device]]\nid = \"1234:5678\"\n");
        assert_eq!(
            plan(&c, &m, REPORT).softdeps,
            ["absent_drv", "e1000e", "some_nic"]
        );
        // Without module facts (every mode but apply), only the bound driver counts.
        m.kernels.clear();
        assert_eq!(plan(&c, &m, REPORT).softdeps, ["e1000e"]);
    }
}
