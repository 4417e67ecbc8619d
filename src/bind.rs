//! The binder: carries a plan out through sysfs.
//!
//! For each taken device: `driver_override = vfio-pci`, unbind from its current driver;
//! then make sure the vfio-pci driver exists (modprobe, unless built in or already
//! loaded), write the address to `drivers_probe`, and verify the `driver` link. Every
//! step is logged; a failure is reported and the binder goes on with the next device.
//!
//! Writes go through the [`Sysfs`] trait so that tests can inject `EBUSY`/`ENODEV`/
//! `EACCES` and simulate the kernel. Nothing here panics: the early-boot path depends on
//! it.

use std::io;
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
    /// Something failed; the message says what.
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
}

fn device_dir(addr: PciAddress) -> PathBuf {
    Path::new(paths::PCI_DEVICES).join(addr.to_string())
}

fn current_driver(root: &Root, addr: PciAddress) -> Option<String> {
    root.link_name(device_dir(addr).join("driver"))
}

/// Explains an errno from a sysfs write in admin terms.
fn describe_io(e: &io::Error) -> String {
    // errno values are the same on every Linux architecture for these.
    const EPERM: i32 = 1;
    const ENOENT: i32 = 2;
    const EACCES: i32 = 13;
    const EBUSY: i32 = 16;
    const ENODEV: i32 = 19;
    match e.raw_os_error() {
        Some(EBUSY) => format!("{e} (the device is in use)"),
        Some(ENODEV) | Some(ENOENT) => format!("{e} (the device disappeared)"),
        Some(EACCES) | Some(EPERM) => format!("{e} (not permitted: run as root)"),
        _ => e.to_string(),
    }
}

/// Binds every taken device of `plan` to vfio-pci. Never panics; failures are in the
/// report and the log.
pub fn bind_devices(sys: &mut dyn Sysfs, plan: &Plan, log: &mut Log) -> BindReport {
    let mut report = BindReport::default();
    let root = sys.root().clone();
    let mut pending: Vec<usize> = Vec::new();

    for decision in plan.targets() {
        let addr = decision.address;
        let dir = device_dir(addr);
        if !root.exists(&dir) {
            log.warn(&format!("{addr}: not present on this boot; skipped"));
            report.devices.push(DeviceResult {
                address: addr,
                previous_driver: None,
                outcome: Outcome::Missing,
            });
            continue;
        }
        let previous = current_driver(&root, addr);
        if previous.as_deref() == Some(VFIO_DRIVER) {
            log.info(&format!("{addr}: already on {VFIO_DRIVER}"));
            report.devices.push(DeviceResult {
                address: addr,
                previous_driver: previous,
                outcome: Outcome::AlreadyBound,
            });
            continue;
        }
        if let Err(e) = sys.write(&dir.join("driver_override"), VFIO_DRIVER) {
            let msg = format!("setting driver_override: {}", describe_io(&e));
            log.error(&format!("{addr}: {msg}; left as it is"));
            report.devices.push(DeviceResult {
                address: addr,
                previous_driver: previous,
                outcome: Outcome::Failed(msg),
            });
            continue;
        }
        log.info(&format!("{addr}: driver_override set to {VFIO_DRIVER}"));
        if let Some(drv) = &previous {
            let unbind = Path::new(paths::PCI_DRIVERS).join(drv).join("unbind");
            match sys.write(&unbind, &addr.to_string()) {
                Ok(()) => log.info(&format!("{addr}: unbound from {drv}")),
                Err(e) => {
                    let msg = format!("unbinding from {drv}: {}", describe_io(&e));
                    log.error(&format!("{addr}: {msg}"));
                    report.devices.push(DeviceResult {
                        address: addr,
                        previous_driver: previous,
                        outcome: Outcome::Failed(msg),
                    });
                    continue;
                }
            }
        }
        report.devices.push(DeviceResult {
            address: addr,
            previous_driver: previous,
            outcome: Outcome::Bound,
        });
        pending.push(report.devices.len() - 1);
    }

    if pending.is_empty() {
        return report;
    }

    let driver_dir = Path::new(paths::PCI_DRIVERS).join(VFIO_DRIVER);
    if root.exists(&driver_dir) {
        log.info(&format!("{VFIO_DRIVER} driver present"));
    } else {
        match sys.load_module(VFIO_DRIVER) {
            Ok(()) => log.info(&format!("loaded {VFIO_DRIVER}")),
            Err(e) => log.error(&format!("loading {VFIO_DRIVER}: {e}")),
        }
    }

    for i in pending {
        let Some(result) = report.devices.get_mut(i) else {
            continue;
        };
        let addr = result.address;
        // vfio-pci claims overridden devices as it registers; probe the rest.
        if current_driver(&root, addr).as_deref() != Some(VFIO_DRIVER) {
            if let Err(e) = sys.write(Path::new(paths::PCI_DRIVERS_PROBE), &addr.to_string()) {
                log.warn(&format!("{addr}: drivers_probe: {}", describe_io(&e)));
            }
        }
        match current_driver(&root, addr) {
            Some(d) if d == VFIO_DRIVER => log.info(&format!("{addr}: bound to {VFIO_DRIVER}")),
            other => {
                let now = other.unwrap_or_else(|| "no driver".to_string());
                let msg = if root.exists(device_dir(addr)) {
                    format!("still on {now} after probing")
                } else {
                    "the device disappeared during the bind".to_string()
                };
                log.error(&format!("{addr}: {msg}"));
                result.outcome = Outcome::Failed(msg);
            }
        }
    }
    report
}

/// `vfio-early bind`: takes the configured devices now. Refuses (changing nothing)
/// when the plan has errors; exit 1 when a device could not be bound.
pub fn run_live(ctx: &crate::context::Context) -> crate::outcome::Outcome {
    use crate::outcome::Outcome;
    let problems = crate::list::render_problems(&ctx.plan.problems);
    eprint!("{problems}");
    if ctx.plan.has_errors() {
        eprintln!("vfio-early: nothing was changed");
        return Outcome::Failed;
    }
    let mut log = Log::stderr();
    let mut sys = RealSysfs::new(ctx.root.clone());
    let report = bind_devices(&mut sys, &ctx.plan, &mut log);
    if report.devices.is_empty() {
        eprintln!("vfio-early: the config takes no device on this machine");
    }
    Outcome::failed_if(report.failed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_descriptions_name_the_cause() {
        let e = io::Error::from_raw_os_error(16);
        assert!(describe_io(&e).contains("in use"));
        let e = io::Error::from_raw_os_error(19);
        assert!(describe_io(&e).contains("disappeared"));
        let e = io::Error::from_raw_os_error(13);
        assert!(describe_io(&e).contains("root"));
    }
}
