//! The binder: carries a plan out through sysfs.
//!
//! For each taken device: refuse it before any write when vfio-pci could not take it
//! (no IOMMU group) or its driver cannot let go (no `unbind` file); otherwise
//! `driver_override = vfio-pci`, unbind from its current driver; then make sure the
//! vfio-pci driver exists (modprobe, unless built in or already loaded), write the
//! address to `drivers_probe`, and verify the `driver` link. A device that does not end
//! on vfio-pci goes back where it was: `driver_override` cleared, probed again, and the
//! log says whether its driver took it back. Every step is logged; a failure is reported
//! and the binder goes on with the next device.
//!
//! Writes go through the [`Sysfs`] trait so that tests can inject `EBUSY`/`ENODEV`/
//! `EACCES` and simulate the kernel. Nothing here panics: the early-boot path depends on
//! it. Should a bug panic anyway, [`bind_devices`] catches it (the release profile
//! unwinds; an aborting build does not compile) and returns the devices it was changing.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::kmsg::Log;
use crate::paths;
use crate::pci::PciAddress;
use crate::plan::Plan;
use crate::root::Root;

pub const VFIO_DRIVER: &str = "vfio-pci";

/// The binder's hands: sysfs writes and module loading.
pub trait Sysfs {
    fn root(&self) -> &Root;
    /// Writes `value` to an attribute (path relative to the root).
    fn write(&mut self, rel: &Path, value: &str) -> io::Result<()>;
    /// Loads a kernel module; `Err` carries a message for the log.
    fn load_module(&mut self, name: &str) -> Result<(), String>;
    /// Reads a binary attribute (such as `rom`), at most `limit` bytes.
    fn read_bytes(&mut self, rel: &Path, limit: u64) -> io::Result<Vec<u8>> {
        self.root().read_bytes(rel, limit)
    }
}

/// The real machine (or a chroot/fixture tree, where no module is loaded).
pub struct RealSysfs {
    root: Root,
}

impl RealSysfs {
    pub fn new(root: Root) -> Self {
        RealSysfs { root }
    }
}

/// How long `modprobe` may take before the binder gives up on it; early boot must not
/// hang on a stuck module load.
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(15);

impl Sysfs for RealSysfs {
    fn root(&self) -> &Root {
        &self.root
    }

    fn write(&mut self, rel: &Path, value: &str) -> io::Result<()> {
        self.root.write_attr(rel, value)
    }

    fn load_module(&mut self, name: &str) -> Result<(), String> {
        if !self.root.is_host() {
            return Err(format!(
                "would run `modprobe {name}`, but the root is {} (not the host)",
                self.root.dir().display()
            ));
        }
        crate::command::run(
            Command::new("modprobe").arg(name),
            MODPROBE_TIMEOUT,
            crate::command::Output::Quiet,
        )
        .map(drop)
    }
}

/// What happened to one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result", content = "detail")]
pub enum Outcome {
    /// Now on vfio-pci.
    Bound,
    /// Was on vfio-pci already; nothing written.
    AlreadyBound,
    /// Not present on this boot (a warning, not a failure).
    Missing,
    /// Something failed; the message says what, and where the device was left (back on
    /// its driver, or why it could not be returned).
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceResult {
    pub address: PciAddress,
    pub previous_driver: Option<String>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BindReport {
    pub devices: Vec<DeviceResult>,
}

impl BindReport {
    pub fn failed(&self) -> bool {
        self.devices
            .iter()
            .any(|d| matches!(d.outcome, Outcome::Failed(_)))
    }

    /// Records the outcome of `address`, replacing an earlier one.
    fn set(&mut self, address: PciAddress, previous_driver: Option<String>, outcome: Outcome) {
        match self.devices.iter_mut().find(|d| d.address == address) {
            Some(d) => d.outcome = outcome,
            None => self.devices.push(DeviceResult {
                address,
                previous_driver,
                outcome,
            }),
        }
    }
}

fn device_dir(addr: PciAddress) -> PathBuf {
    Path::new(paths::PCI_DEVICES).join(addr.to_string())
}

fn current_driver(root: &Root, addr: PciAddress) -> Option<String> {
    root.link_name(device_dir(addr).join("driver"))
}

fn unbind_file(driver: &str) -> PathBuf {
    Path::new(paths::PCI_DRIVERS).join(driver).join("unbind")
}

// errno values are the same on every Linux architecture for these.
const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const EACCES: i32 = 13;
const EBUSY: i32 = 16;
const ENODEV: i32 = 19;

/// Explains an errno from a sysfs write in admin terms.
fn describe_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(EBUSY) => format!("{e} (the device is in use)"),
        Some(ENODEV) | Some(ENOENT) => format!("{e} (the device disappeared)"),
        Some(EACCES) | Some(EPERM) => format!("{e} (not permitted: run as root)"),
        _ => e.to_string(),
    }
}

/// Drivers built with `suppress_bind_attrs` have no `bind`/`unbind` files: such a driver
/// cannot let go of a device, and an attempt would fail with a bare "No such file".
fn no_unbind_file(root: &Root, driver: &str) -> String {
    format!(
        "the driver {driver} has no unbind file in sysfs: {} (it does not let devices go \
         while it runs)",
        root.path(unbind_file(driver)).display()
    )
}

/// Why a device must not be touched at all, judged before the first write: a device that
/// vfio-pci cannot take would only lose its driver.
fn refusal(root: &Root, addr: PciAddress, previous: Option<&str>) -> Option<String> {
    let stays = match previous {
        Some(drv) => format!("nothing changed, it stays on {drv}"),
        None => "nothing changed".to_string(),
    };
    if !root.exists(device_dir(addr).join("iommu_group")) {
        return Some(format!(
            "it has no IOMMU group (no active IOMMU covers it), so {VFIO_DRIVER} cannot take \
             it; {stays}"
        ));
    }
    if let Some(drv) = previous {
        if !root.exists(unbind_file(drv)) {
            return Some(format!("{}; {stays}", no_unbind_file(root, drv)));
        }
    }
    None
}

/// Test-only: panics at `point` when the binary is built with the `fault-injection`
/// feature and `VFIO_EARLY_FAULT` names that point, so that tests can prove a bug in the
/// binder is caught in the profile we ship. Shipped builds have no such feature: there
/// this is an empty function.
#[cfg(feature = "fault-injection")]
pub fn inject_fault(point: &str) {
    if std::env::var_os("VFIO_EARLY_FAULT").is_some_and(|v| v == point) {
        panic!("fault injected at {point} (VFIO_EARLY_FAULT)");
    }
}

/// Test-only fault injection; compiled out of shipped builds (see the feature's twin).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn inject_fault(_point: &str) {}

// The binder's last line of defence is `catch_unwind`: a bug must leave the devices on
// their drivers, not abort with a NIC unbound. Under `panic = "abort"` nothing is ever
// caught, so such a build is refused outright.
#[cfg(not(panic = "unwind"))]
compile_error!(
    "vfio-early must be built with panic = \"unwind\" (see [profile.release] in Cargo.toml): \
     the binder's catch_unwind returns devices to their drivers after a bug"
);

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f`, turning a panic into one logged line: `what` names the step that gave up.
/// The early binder's outermost guard; `bind_devices` has its own, which also returns the
/// devices it was changing.
pub fn run_guarded(log: &mut Log, what: &str, f: impl FnOnce(&mut Log)) {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| f(log)));
    if let Err(payload) = outcome {
        log.error(&format!(
            "internal error in {what} ({}); boot continues without it",
            panic_message(&*payload)
        ));
    }
}

/// A device the binder has changed but not yet seen on vfio-pci: what to undo.
struct InFlight {
    address: PciAddress,
    previous: Option<String>,
}

/// Binds every taken device of `plan` to vfio-pci. A device that cannot be taken is
/// returned to its previous driver (`driver_override` cleared, probed again), and the log
/// says whether that worked. Never panics: a bug inside is caught here, the devices it
/// was changing are returned, and the report says so.
pub fn bind_devices(sys: &mut dyn Sysfs, plan: &Plan, log: &mut Log) -> BindReport {
    let mut report = BindReport::default();
    let mut in_flight: Vec<InFlight> = Vec::new();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        bind_all(sys, plan, log, &mut report, &mut in_flight)
    }));
    if let Err(payload) = outcome {
        let why = panic_message(&*payload);
        log.error(&format!(
            "internal error while binding ({why}); the devices being changed go back to \
             their drivers and the others are left as they are"
        ));
        for d in in_flight {
            // The same bug may strike again: one device's failure must not stop the rest.
            let back = panic::catch_unwind(AssertUnwindSafe(|| {
                return_device(sys, log, d.address, d.previous.as_deref())
            }))
            .unwrap_or_else(|p| {
                let msg = format!(
                    "could not be returned: internal error ({})",
                    panic_message(&*p)
                );
                log.error(&format!("{}: {msg}", d.address));
                msg
            });
            report.set(
                d.address,
                d.previous,
                Outcome::Failed(format!("internal error ({why}); {back}")),
            );
        }
    }
    report
}

fn bind_all(
    sys: &mut dyn Sysfs,
    plan: &Plan,
    log: &mut Log,
    report: &mut BindReport,
    in_flight: &mut Vec<InFlight>,
) {
    let root = sys.root().clone();
    for decision in plan.targets() {
        release_device(sys, &root, decision.address, log, report, in_flight);
    }
    if in_flight.is_empty() || !ensure_vfio_driver(sys, &root, log, report, in_flight) {
        return;
    }
    while let Some(d) = in_flight.first() {
        let addr = d.address;
        // vfio-pci claims overridden devices as it registers; probe the rest.
        if current_driver(&root, addr).as_deref() != Some(VFIO_DRIVER) {
            if let Err(e) = sys.write(Path::new(paths::PCI_DRIVERS_PROBE), &addr.to_string()) {
                log.warn(&format!("{addr}: drivers_probe: {}", describe_io(&e)));
            }
        }
        inject_fault("after-probe");
        let now = current_driver(&root, addr);
        let outcome = if now.as_deref() == Some(VFIO_DRIVER) {
            log.info(&format!("{addr}: bound to {VFIO_DRIVER}"));
            Outcome::Bound
        } else if !root.exists(device_dir(addr)) {
            let msg = "the device disappeared during the bind".to_string();
            log.error(&format!("{addr}: {msg}"));
            Outcome::Failed(msg)
        } else {
            let msg = format!(
                "{VFIO_DRIVER} did not take it (on {} after probing)",
                now.as_deref().unwrap_or("no driver")
            );
            log.error(&format!("{addr}: {msg}"));
            let back = return_device(sys, log, addr, d.previous.as_deref());
            Outcome::Failed(format!("{msg}; {back}"))
        };
        let previous = d.previous.clone();
        in_flight.remove(0);
        report.set(addr, previous, outcome);
    }
}

/// First half of a bind: `driver_override = vfio-pci`, then unbind from the current
/// driver. A device that is missing, already bound or refused is reported and left; one
/// whose unbind fails is returned at once. The others stay in flight.
fn release_device(
    sys: &mut dyn Sysfs,
    root: &Root,
    addr: PciAddress,
    log: &mut Log,
    report: &mut BindReport,
    in_flight: &mut Vec<InFlight>,
) {
    let dir = device_dir(addr);
    if !root.exists(&dir) {
        log.warn(&format!("{addr}: not present on this boot; skipped"));
        report.set(addr, None, Outcome::Missing);
        return;
    }
    let previous = current_driver(root, addr);
    if previous.as_deref() == Some(VFIO_DRIVER) {
        log.info(&format!("{addr}: already on {VFIO_DRIVER}"));
        report.set(addr, previous, Outcome::AlreadyBound);
        return;
    }
    if let Some(why) = refusal(root, addr, previous.as_deref()) {
        log.error(&format!("{addr}: {why}"));
        report.set(addr, previous, Outcome::Failed(why));
        return;
    }
    // In flight from before the first write: if anything below panics, the guard in
    // `bind_devices` returns this device (clearing an override that was never set is
    // harmless).
    in_flight.push(InFlight {
        address: addr,
        previous: previous.clone(),
    });
    if let Err(e) = sys.write(&dir.join("driver_override"), VFIO_DRIVER) {
        in_flight.retain(|d| d.address != addr);
        let msg = format!("setting driver_override: {}", describe_io(&e));
        log.error(&format!("{addr}: {msg}; left as it is"));
        report.set(addr, previous, Outcome::Failed(msg));
        return;
    }
    log.info(&format!("{addr}: driver_override set to {VFIO_DRIVER}"));
    if let Some(drv) = &previous {
        let unbind = unbind_file(drv);
        if let Err(e) = sys.write(&unbind, &addr.to_string()) {
            let msg = if e.raw_os_error() == Some(ENOENT) && !root.exists(&unbind) {
                no_unbind_file(root, drv)
            } else {
                format!("unbinding from {drv}: {}", describe_io(&e))
            };
            log.error(&format!("{addr}: {msg}"));
            let back = return_device(sys, log, addr, Some(drv));
            in_flight.retain(|d| d.address != addr);
            report.set(addr, previous, Outcome::Failed(format!("{msg}; {back}")));
            return;
        }
        log.info(&format!("{addr}: unbound from {drv}"));
    }
    inject_fault("after-unbind");
    // Provisional: the verification below decides.
    report.set(addr, previous, Outcome::Bound);
}

/// Makes sure the vfio-pci driver exists (modprobe unless present). When it cannot be
/// loaded, every device in flight is returned to its driver and `false` comes back.
fn ensure_vfio_driver(
    sys: &mut dyn Sysfs,
    root: &Root,
    log: &mut Log,
    report: &mut BindReport,
    in_flight: &mut Vec<InFlight>,
) -> bool {
    let driver_dir = Path::new(paths::PCI_DRIVERS).join(VFIO_DRIVER);
    if root.exists(&driver_dir) {
        log.info(&format!("{VFIO_DRIVER} driver present"));
    } else if let Err(e) = sys.load_module(VFIO_DRIVER) {
        log.error(&format!("loading {VFIO_DRIVER}: {e}"));
        for d in std::mem::take(in_flight) {
            let back = return_device(sys, log, d.address, d.previous.as_deref());
            let msg = format!("{VFIO_DRIVER} could not be loaded: {e}; {back}");
            report.set(d.address, d.previous, Outcome::Failed(msg));
        }
        return false;
    } else {
        log.info(&format!("loaded {VFIO_DRIVER}"));
    }
    true
}

/// Returns a device the binder could not take to where it was: `driver_override`
/// cleared (a lone newline: the kernel's `driver_set_override` clears on an empty line,
/// and a zero-byte write never reaches it), then `drivers_probe` so that its previous
/// driver takes it again. A device that had no driver is left without one, as it was
/// (in early boot its driver loads later and finds it). Logs and returns what happened.
fn return_device(
    sys: &mut dyn Sysfs,
    log: &mut Log,
    addr: PciAddress,
    previous: Option<&str>,
) -> String {
    let root = sys.root().clone();
    let target = previous.unwrap_or("no driver");
    if let Err(e) = sys.write(&device_dir(addr).join("driver_override"), "\n") {
        let msg = format!(
            "could not be returned to {target}: clearing driver_override: {}; it stays \
             {VFIO_DRIVER}, so no other driver can take the device until the next boot",
            describe_io(&e)
        );
        log.error(&format!("{addr}: {msg}"));
        return msg;
    }
    let Some(drv) = previous else {
        let msg = "driver_override cleared; left without a driver, as it was".to_string();
        log.info(&format!("{addr}: {msg}"));
        return msg;
    };
    if current_driver(&root, addr).as_deref() == Some(drv) {
        let msg = format!("driver_override cleared; stays on {drv}");
        log.info(&format!("{addr}: {msg}"));
        return msg;
    }
    if current_driver(&root, addr).is_none() {
        if let Err(e) = sys.write(Path::new(paths::PCI_DRIVERS_PROBE), &addr.to_string()) {
            let msg = format!(
                "could not be returned to {drv}: drivers_probe: {}; driver_override is \
                 cleared, so {drv} takes it at the next probe or boot",
                describe_io(&e)
            );
            log.error(&format!("{addr}: {msg}"));
            return msg;
        }
    }
    match current_driver(&root, addr) {
        Some(now) if now == drv => {
            let msg = format!("returned to {drv}");
            log.info(&format!("{addr}: {msg}"));
            msg
        }
        now => {
            let msg = format!(
                "could not be returned to {drv}: on {} after probing (driver_override \
                 cleared)",
                now.as_deref().unwrap_or("no driver")
            );
            log.error(&format!("{addr}: {msg}"));
            msg
        }
    }
}

/// `vfio-early bind`: takes the configured devices now. Refuses (changing nothing)
/// when the plan has errors; exit 1 when a device could not be bound.
pub fn run_live(ctx: &crate::context::Context) -> crate::outcome::Outcome {
    use crate::outcome::Outcome;
    let problems = crate::list::render_problems(&ctx.plan.problems);
    crate::outcome::eprint(&problems);
    if ctx.plan.has_errors() {
        crate::errln!("vfio-early: nothing was changed");
        return Outcome::Failed;
    }
    let mut log = Log::stderr();
    let mut sys = RealSysfs::new(ctx.root.clone());
    let report = bind_devices(&mut sys, &ctx.plan, &mut log);
    if report.devices.is_empty() {
        crate::errln!("vfio-early: the config takes no device on this machine");
    }
    Outcome::failed_if(report.failed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_descriptions_name_the_cause() {
        let e = io::Error::from_raw_os_error(EBUSY);
        assert!(describe_io(&e).contains("in use"));
        let e = io::Error::from_raw_os_error(19);
        assert!(describe_io(&e).contains("disappeared"));
        let e = io::Error::from_raw_os_error(13);
        assert!(describe_io(&e).contains("root"));
    }
}
