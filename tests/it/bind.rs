//! The binder against a simulated kernel: the list of sysfs writes it makes, and how it
//! reports EBUSY, ENODEV, EACCES, a device that vanishes mid-bind, and a missing device.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use vfio_early::bind::{bind_devices, Outcome, Sysfs};
use vfio_early::kmsg::Log;
use vfio_early::root::Root;
use vfio_early::{config, machine, plan};

use crate::fake::{workstation, FakeMachine};

/// A kernel good enough for the binder: `unbind` drops the driver link, loading vfio-pci
/// claims overridden devices, `drivers_probe` binds an overridden device. Faults can be
/// injected per attribute (by path suffix).
struct FakeKernel {
    root: Root,
    writes: Vec<String>,
    faults: BTreeMap<String, i32>,
    vanish_on_unbind: Option<String>,
    modprobe_fails: bool,
}

impl FakeKernel {
    fn new(m: &FakeMachine) -> Self {
        FakeKernel {
            root: Root::new(m.root()),
            writes: Vec::new(),
            faults: BTreeMap::new(),
            vanish_on_unbind: None,
            modprobe_fails: false,
        }
    }

    fn dev_real(&self, addr: &str) -> std::path::PathBuf {
        self.root.path(format!("sys/devices/pci0000:00/{addr}"))
    }

    fn claim_overridden(&self, addr: &str) {
        let dir = self.dev_real(addr);
        let over = std::fs::read_to_string(dir.join("driver_override")).unwrap_or_default();
        let has_driver = std::fs::symlink_metadata(dir.join("driver")).is_ok();
        let vfio_loaded = self.root.exists("sys/bus/pci/drivers/vfio-pci");
        if over.trim() == "vfio-pci" && !has_driver && vfio_loaded {
            std::os::unix::fs::symlink("../../../bus/pci/drivers/vfio-pci", dir.join("driver"))
                .expect("link");
        }
    }
}

impl Sysfs for FakeKernel {
    fn root(&self) -> &Root {
        &self.root
    }

    fn write(&mut self, rel: &Path, value: &str) -> io::Result<()> {
        let rel_s = rel.display().to_string();
        self.writes.push(format!("{rel_s} <- {value}"));
        if let Some((_, errno)) = self
            .faults
            .iter()
            .find(|(k, _)| rel_s.ends_with(k.as_str()))
        {
            return Err(io::Error::from_raw_os_error(*errno));
        }
        if rel_s.ends_with("/unbind") {
            if self.vanish_on_unbind.as_deref() == Some(value) {
                std::fs::remove_file(self.root.path(format!("sys/bus/pci/devices/{value}")))?;
                std::fs::remove_dir_all(self.dev_real(value))?;
                return Ok(());
            }
            std::fs::remove_file(self.dev_real(value).join("driver"))?;
            return Ok(());
        }
        if rel_s.ends_with("drivers_probe") {
            if !self.root.exists(format!("sys/bus/pci/devices/{value}")) {
                return Err(io::Error::from_raw_os_error(19));
            }
            self.claim_overridden(value);
            return Ok(());
        }
        self.root.write_attr(rel, value)
    }

    fn load_module(&mut self, name: &str) -> Result<(), String> {
        self.writes.push(format!("modprobe {name}"));
        if self.modprobe_fails {
            return Err("modprobe: FATAL: Module vfio-pci not found".into());
        }
        std::fs::create_dir_all(self.root.path("sys/bus/pci/drivers/vfio-pci"))
            .map_err(|e| e.to_string())?;
        for addr in [
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:03:00.0",
            "0000:04:00.0",
        ] {
            if self.root.exists(format!("sys/bus/pci/devices/{addr}")) {
                self.claim_overridden(addr);
            }
        }
        Ok(())
    }
}

fn plan_for(m: &FakeMachine, cfg: &str) -> plan::Plan {
    let c = config::parse(cfg, Path::new("test.toml")).expect("config");
    let mach = machine::discover(&Root::new(m.root()));
    plan::plan(&c, &mach, plan::Options::default())
}

const GPU_AND_NIC: &str =
    "[[device]]\nid = \"10de:1b80\"\n[[device]]\nid = \"8086:10d3\"\naddress = \"04:00.0\"\n";

#[test]
fn happy_path_writes_in_order() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    assert!(!report.failed(), "{:?}", log.lines);
    for a in ["0000:01:00.0", "0000:01:00.1", "0000:04:00.0"] {
        assert_eq!(m.driver_of(a).as_deref(), Some("vfio-pci"), "{a}");
    }
    assert_eq!(m.driver_of("0000:03:00.0").as_deref(), Some("e1000e"));
    insta::assert_snapshot!(k.writes.join("\n"));
}

#[test]
fn already_bound_devices_are_left_alone() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    bind_devices(&mut k, &p, &mut Log::silent());
    let mut k2 = FakeKernel::new(&m);
    let report = bind_devices(&mut k2, &p, &mut Log::silent());
    assert!(k2.writes.is_empty(), "{:?}", k2.writes);
    assert!(report
        .devices
        .iter()
        .all(|d| d.outcome == Outcome::AlreadyBound));
}

#[test]
fn ebusy_on_unbind_fails_that_device_only() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    k.faults.insert("nouveau/unbind".into(), 16);
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    assert!(report.failed());
    let gpu = &report.devices[0];
    assert!(
        matches!(&gpu.outcome, Outcome::Failed(m) if m.contains("in use")),
        "{gpu:?}"
    );
    assert_eq!(m.driver_of("0000:04:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(m.driver_of("0000:01:00.1").as_deref(), Some("vfio-pci"));
}

#[test]
fn enodev_and_eacces_on_override_are_reported() {
    for (errno, word) in [(19, "disappeared"), (13, "run as root")] {
        let m = workstation();
        let p = plan_for(&m, GPU_AND_NIC);
        let mut k = FakeKernel::new(&m);
        k.faults
            .insert("0000:04:00.0/driver_override".into(), errno);
        let mut log = Log::silent();
        let report = bind_devices(&mut k, &p, &mut log);
        let nic = report
            .devices
            .iter()
            .find(|d| d.address.to_string() == "0000:04:00.0");
        assert!(
            matches!(&nic.map(|d| &d.outcome), Some(Outcome::Failed(m)) if m.contains(word)),
            "{errno}: {nic:?}"
        );
        // The NIC keeps its driver: no unbind after a failed override.
        assert_eq!(m.driver_of("0000:04:00.0").as_deref(), Some("e1000e"));
        assert!(log.lines.iter().any(|(_, l)| l.contains(word)));
    }
}

#[test]
fn a_device_that_vanishes_mid_bind_is_reported() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    k.vanish_on_unbind = Some("0000:04:00.0".into());
    let report = bind_devices(&mut k, &p, &mut Log::silent());
    let nic = report
        .devices
        .iter()
        .find(|d| d.address.to_string() == "0000:04:00.0");
    assert!(
        matches!(&nic.map(|d| &d.outcome), Some(Outcome::Failed(m)) if m.contains("disappeared")),
        "{nic:?}"
    );
    assert_eq!(m.driver_of("0000:01:00.0").as_deref(), Some("vfio-pci"));
}

#[test]
fn a_failed_modprobe_is_logged_and_reported() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    k.modprobe_fails = true;
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    assert!(report.failed());
    assert!(log
        .lines
        .iter()
        .any(|(_, l)| l.contains("Module vfio-pci not found")));
}

#[test]
fn a_missing_device_is_a_warning() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    std::fs::remove_file(m.path("sys/bus/pci/devices/0000:04:00.0")).expect("rm");
    let report = bind_devices(&mut FakeKernel::new(&m), &p, &mut Log::silent());
    assert!(!report.failed());
    assert!(report.devices.iter().any(|d| d.outcome == Outcome::Missing));
}

#[test]
fn vfio_pci_built_in_needs_no_modprobe() {
    let m = workstation();
    m.driver_dir("vfio-pci");
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    let report = bind_devices(&mut k, &p, &mut Log::silent());
    assert!(!report.failed());
    assert!(!k.writes.iter().any(|w| w.starts_with("modprobe")));
    assert!(k
        .writes
        .iter()
        .any(|w| w.starts_with("sys/bus/pci/drivers_probe")));
}
