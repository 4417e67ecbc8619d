//! The binder against a simulated kernel: the list of sysfs writes it makes, and how it
//! reports EBUSY, ENODEV, EACCES, a device that vanishes mid-bind, and a missing device;
//! how a device it cannot take goes back to its driver (vfio-pci not loadable, a probe
//! that does not bind, a panic mid-bind), and what it refuses to touch (no IOMMU group,
//! no `unbind` file). Then the binary: `bind` on fake trees, `bind --early` with a closed,
//! full or broken standard error, and a release build that panics where told.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

use vfio_early::bind::{bind_devices, BindReport, Outcome, Sysfs};
use vfio_early::kmsg::Log;
use vfio_early::root::Root;
use vfio_early::{config, machine, plan};

use crate::fake::{bin, text, workstation, FakeMachine};

/// A kernel good enough for the binder: a write to an attribute that does not exist
/// fails with ENOENT; `driver_override` keeps the first line written (an empty line
/// clears it, shown as `(null)`); `unbind` drops the driver link; loading vfio-pci
/// claims overridden devices; `drivers_probe` binds an overridden device to vfio-pci, and
/// a device without override back to the driver it was unbound from. Faults can be
/// injected per attribute (by path suffix), per device (vfio-pci refuses it), or as a
/// panic inside a write.
struct FakeKernel {
    root: Root,
    writes: Vec<String>,
    faults: BTreeMap<String, i32>,
    vanish_on_unbind: Option<String>,
    modprobe_fails: bool,
    /// Devices whose vfio-pci probe fails (e.g. no IOMMU group at probe time).
    vfio_refuses: BTreeSet<String>,
    /// Panics (a bug in the binder's hands) on a write to a path with this suffix.
    panic_on: Option<String>,
    /// The driver each device was unbound from: its match at the next probe.
    native: BTreeMap<String, String>,
}

impl FakeKernel {
    fn new(m: &FakeMachine) -> Self {
        FakeKernel {
            root: Root::new(m.root()),
            writes: Vec::new(),
            faults: BTreeMap::new(),
            vanish_on_unbind: None,
            modprobe_fails: false,
            vfio_refuses: BTreeSet::new(),
            panic_on: None,
            native: BTreeMap::new(),
        }
    }

    fn dev_real(&self, addr: &str) -> std::path::PathBuf {
        self.root.path(format!("sys/devices/pci0000:00/{addr}"))
    }

    fn link_driver(&self, addr: &str, drv: &str) {
        std::os::unix::fs::symlink(
            format!("../../../bus/pci/drivers/{drv}"),
            self.dev_real(addr).join("driver"),
        )
        .expect("link");
    }

    /// What a probe of `addr` does: the override decides, as in the kernel.
    fn probe(&self, addr: &str) {
        let dir = self.dev_real(addr);
        if std::fs::symlink_metadata(dir.join("driver")).is_ok() {
            return;
        }
        let over = std::fs::read_to_string(dir.join("driver_override")).unwrap_or_default();
        match over.trim() {
            "vfio-pci" => {
                let vfio_loaded = self.root.exists("sys/bus/pci/drivers/vfio-pci");
                if vfio_loaded && !self.vfio_refuses.contains(addr) {
                    self.link_driver(addr, "vfio-pci");
                }
            }
            "(null)" => {
                if let Some(drv) = self.native.get(addr) {
                    self.link_driver(addr, drv);
                }
            }
            _ => {}
        }
    }
}

impl Sysfs for FakeKernel {
    fn root(&self) -> &Root {
        &self.root
    }

    fn write(&mut self, rel: &Path, value: &str) -> io::Result<()> {
        let rel_s = rel.display().to_string();
        self.writes
            .push(format!("{rel_s} <- {}", value.escape_debug()));
        if self.panic_on.as_deref().is_some_and(|p| rel_s.ends_with(p)) {
            panic!("injected panic on {rel_s}");
        }
        if let Some((_, errno)) = self
            .faults
            .iter()
            .find(|(k, _)| rel_s.ends_with(k.as_str()))
        {
            return Err(io::Error::from_raw_os_error(*errno));
        }
        if !self.root.exists(rel) {
            return Err(io::Error::from_raw_os_error(2));
        }
        if rel_s.ends_with("/unbind") {
            if self.vanish_on_unbind.as_deref() == Some(value) {
                std::fs::remove_file(self.root.path(format!("sys/bus/pci/devices/{value}")))?;
                std::fs::remove_dir_all(self.dev_real(value))?;
                return Ok(());
            }
            let link = self.dev_real(value).join("driver");
            if let Some(drv) = std::fs::read_link(&link)?.file_name() {
                self.native
                    .insert(value.to_string(), drv.to_string_lossy().into_owned());
            }
            std::fs::remove_file(link)?;
            return Ok(());
        }
        if rel_s.ends_with("drivers_probe") {
            if !self.root.exists(format!("sys/bus/pci/devices/{value}")) {
                return Err(io::Error::from_raw_os_error(19));
            }
            self.probe(value);
            return Ok(());
        }
        if rel_s.ends_with("/driver_override") {
            let first = value.split('\n').next().unwrap_or("");
            let shown = if first.is_empty() { "(null)" } else { first };
            std::fs::write(self.root.path(rel), format!("{shown}\n"))?;
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
                self.probe(addr);
            }
        }
        Ok(())
    }
}

/// The whole story of a bind, for snapshots: the writes in order, the log, and where
/// each device of the workstation that a config can take ended up.
fn story(m: &FakeMachine, k: &FakeKernel, log: &Log) -> String {
    let mut out = String::from("writes:\n");
    for w in &k.writes {
        out.push_str(&format!("  {w}\n"));
    }
    out.push_str("log:\n");
    for (level, line) in &log.lines {
        out.push_str(&format!("  {level:?}: {line}\n"));
    }
    out.push_str("end state:\n");
    for a in [
        "0000:01:00.0",
        "0000:01:00.1",
        "0000:03:00.0",
        "0000:04:00.0",
    ] {
        let over = m.read(&format!("sys/devices/pci0000:00/{a}/driver_override"));
        out.push_str(&format!(
            "  {a}: driver {}, driver_override {}\n",
            m.driver_of(a).as_deref().unwrap_or("none"),
            over.trim()
        ));
    }
    out.replace(&m.root().display().to_string(), "<root>")
}

/// Asserts that every device of the workstation is on the driver it booted with and
/// carries no override.
fn assert_all_back(m: &FakeMachine, story: &str) {
    for (a, drv) in [
        ("0000:01:00.0", "nouveau"),
        ("0000:01:00.1", "snd_hda_intel"),
        ("0000:03:00.0", "e1000e"),
        ("0000:04:00.0", "e1000e"),
    ] {
        assert_eq!(m.driver_of(a).as_deref(), Some(drv), "{a}\n{story}");
        assert_eq!(
            m.read(&format!("sys/devices/pci0000:00/{a}/driver_override")),
            "(null)\n",
            "{a}\n{story}"
        );
    }
}

fn outcome_of<'a>(report: &'a BindReport, addr: &str) -> &'a Outcome {
    &report
        .devices
        .iter()
        .find(|d| d.address.to_string() == addr)
        .unwrap_or_else(|| panic!("{addr} not in {report:?}"))
        .outcome
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
fn ebusy_on_unbind_clears_the_override_and_keeps_the_driver() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    k.faults.insert("nouveau/unbind".into(), 16);
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    let story = story(&m, &k, &log);
    assert!(report.failed());
    assert!(
        matches!(outcome_of(&report, "0000:01:00.0"),
            Outcome::Failed(m) if m.contains("in use") && m.contains("stays on nouveau")),
        "{story}"
    );
    // Not left overridden: the next probe of the GPU must not hand it to vfio-pci.
    assert_eq!(m.driver_of("0000:01:00.0").as_deref(), Some("nouveau"));
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:01:00.0/driver_override"),
        "(null)\n",
        "{story}"
    );
    assert_eq!(m.driver_of("0000:04:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(m.driver_of("0000:01:00.1").as_deref(), Some("vfio-pci"));
    insta::assert_snapshot!(story);
}

#[test]
fn a_driver_without_unbind_file_is_named_and_its_device_untouched() {
    let m = workstation();
    std::fs::remove_file(m.path("sys/bus/pci/drivers/e1000e/unbind")).expect("rm");
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    let story = story(&m, &k, &log);
    assert!(
        matches!(outcome_of(&report, "0000:04:00.0"),
            Outcome::Failed(m) if m.contains("the driver e1000e has no unbind file in sysfs: ")),
        "{story}"
    );
    assert!(
        !k.writes.iter().any(|w| w.contains("0000:04:00.0")),
        "{story}"
    );
    assert_eq!(m.driver_of("0000:04:00.0").as_deref(), Some("e1000e"));
    assert_eq!(m.driver_of("0000:01:00.0").as_deref(), Some("vfio-pci"));
    insta::assert_snapshot!(story);
}

#[test]
fn a_device_without_iommu_group_is_not_touched() {
    // vfio-pci cannot take a device outside every IOMMU group: unbinding it would only
    // leave the NIC with no driver.
    let m = workstation();
    std::fs::remove_file(m.path("sys/devices/pci0000:00/0000:04:00.0/iommu_group")).expect("rm");
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    let story = story(&m, &k, &log);
    assert!(
        matches!(outcome_of(&report, "0000:04:00.0"),
            Outcome::Failed(m) if m.contains("no IOMMU group")),
        "{story}"
    );
    assert!(
        !k.writes.iter().any(|w| w.contains("0000:04:00.0")),
        "{story}"
    );
    assert_eq!(m.driver_of("0000:04:00.0").as_deref(), Some("e1000e"));
    insta::assert_snapshot!(story);
}

#[test]
fn vfio_pci_that_cannot_be_loaded_returns_every_device_to_its_driver() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    k.modprobe_fails = true;
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    let story = story(&m, &k, &log);
    for (a, drv) in [
        ("0000:01:00.0", "nouveau"),
        ("0000:01:00.1", "snd_hda_intel"),
        ("0000:04:00.0", "e1000e"),
    ] {
        assert!(
            matches!(outcome_of(&report, a),
                Outcome::Failed(m) if m.contains("vfio-pci could not be loaded")
                    && m.ends_with(&format!("returned to {drv}"))),
            "{a}: {story}"
        );
    }
    assert_all_back(&m, &story);
    insta::assert_snapshot!(story);
}

#[test]
fn a_device_vfio_pci_does_not_take_goes_back_to_its_driver() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    k.vfio_refuses.insert("0000:04:00.0".into());
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    let story = story(&m, &k, &log);
    assert!(
        matches!(outcome_of(&report, "0000:04:00.0"),
            Outcome::Failed(m) if m.contains("did not take it") && m.ends_with("returned to e1000e")),
        "{story}"
    );
    assert_eq!(m.driver_of("0000:04:00.0").as_deref(), Some("e1000e"));
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:04:00.0/driver_override"),
        "(null)\n"
    );
    assert_eq!(m.driver_of("0000:01:00.0").as_deref(), Some("vfio-pci"));
    insta::assert_snapshot!(story);
}

#[test]
fn a_device_that_cannot_be_returned_says_why() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    k.vfio_refuses.insert("0000:04:00.0".into());
    k.faults.insert("drivers_probe".into(), 5);
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    let story = story(&m, &k, &log);
    assert!(
        matches!(outcome_of(&report, "0000:04:00.0"),
            Outcome::Failed(m) if m.contains("could not be returned to e1000e: drivers_probe")),
        "{story}"
    );
    assert!(
        log.lines
            .iter()
            .any(|(_, l)| l.starts_with("0000:04:00.0: could not be returned to e1000e")),
        "{story}"
    );
    // The override is cleared all the same, so e1000e takes it at the next probe.
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:04:00.0/driver_override"),
        "(null)\n"
    );
    insta::assert_snapshot!(story);
}

#[test]
fn a_panic_mid_bind_is_caught_and_the_devices_returned() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    // The GPU and its audio are unbound by then; the NIC's override is set.
    k.panic_on = Some("e1000e/unbind".into());
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    let story = story(&m, &k, &log);
    for a in ["0000:01:00.0", "0000:01:00.1", "0000:04:00.0"] {
        assert!(
            matches!(outcome_of(&report, a),
                Outcome::Failed(m) if m.starts_with("internal error (injected panic")),
            "{a}: {story}"
        );
    }
    assert_all_back(&m, &story);
    insta::assert_snapshot!(story);
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

#[test]
fn a_panic_while_returning_a_device_is_caught_too() {
    let m = workstation();
    let p = plan_for(&m, GPU_AND_NIC);
    let mut k = FakeKernel::new(&m);
    // vfio-pci refuses the NIC, its probe panics, and so does the probe that would
    // return it to e1000e.
    k.vfio_refuses.insert("0000:04:00.0".into());
    k.panic_on = Some("drivers_probe".into());
    let mut log = Log::silent();
    let report = bind_devices(&mut k, &p, &mut log);
    let story = story(&m, &k, &log);
    assert!(
        matches!(outcome_of(&report, "0000:04:00.0"),
            Outcome::Failed(m) if m.ends_with("could not be returned: internal error (injected \
                panic on sys/bus/pci/drivers_probe)")),
        "{story}"
    );
    // The override was cleared before the probe, so e1000e takes it at the next probe.
    assert_eq!(m.read(NIC_OVERRIDE), "(null)\n", "{story}");
    assert_eq!(m.driver_of("0000:01:00.0").as_deref(), Some("vfio-pci"));
}

/// An attribute of the fake tree as the kernel would read it. The binary writes sysfs
/// attributes in place, never truncating (as sysfs wants), so in a plain file a cleared
/// override (`"\n"`) lands over the `vfio-pci` written before it: the first line is what
/// the kernel would have kept.
fn attr(m: &FakeMachine, rel: &str) -> String {
    m.read(rel).lines().next().unwrap_or("").to_string()
}

const NIC: &str = "[[device]]\nid = \"8086:10d3\"\naddress = \"04:00.0\"\n";
const NIC_OVERRIDE: &str = "sys/devices/pci0000:00/0000:04:00.0/driver_override";
const E1000E_UNBIND: &str = "sys/bus/pci/drivers/e1000e/unbind";

#[test]
fn live_bind_refuses_a_device_without_iommu_group_before_touching_it() {
    let m = workstation();
    std::fs::remove_file(m.path("sys/devices/pci0000:00/0000:04:00.0/iommu_group")).expect("rm");
    m.driver_dir("vfio-pci");
    m.config(NIC);
    let out = m.run(&["bind"]);
    let err = text(&m, &out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refusing to take 0000:04:00.0: it is in no IOMMU group"),
        "{err}"
    );
    assert_eq!(m.read(E1000E_UNBIND), "", "unbound anyway: {err}");
    assert_eq!(m.read(NIC_OVERRIDE), "(null)\n", "{err}");
}

#[test]
fn live_bind_names_a_missing_unbind_file_and_changes_nothing() {
    let m = workstation();
    std::fs::remove_file(m.path(E1000E_UNBIND)).expect("rm");
    m.driver_dir("vfio-pci");
    m.config(NIC);
    let out = m.run(&["bind"]);
    let err = text(&m, &out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "0000:04:00.0: the driver e1000e has no unbind file in sysfs: \
             <root>/sys/bus/pci/drivers/e1000e/unbind"
        ),
        "{err}"
    );
    assert_eq!(m.read(NIC_OVERRIDE), "(null)\n", "{err}");
}

/// What the early binder does on a fake tree: no vfio-pci there, and `modprobe` never
/// runs under `--root`, so after the unbind the NIC must go back.
fn assert_early_bind_returned_the_nic(
    m: &FakeMachine,
    how: &str,
    status: std::process::ExitStatus,
) {
    assert_eq!(status.code(), Some(0), "{how}: {status}");
    assert_eq!(
        m.read(E1000E_UNBIND),
        "0000:04:00.0",
        "{how}: never reached the unbind"
    );
    assert_eq!(attr(m, NIC_OVERRIDE), "", "{how}: driver_override left set");
    assert_eq!(
        m.driver_of("0000:04:00.0").as_deref(),
        Some("e1000e"),
        "{how}"
    );
}

#[test]
fn early_bind_exits_0_and_returns_the_device_with_stderr_closed_full_or_broken() {
    // No /dev/kmsg in the tree: every line goes to standard error, which fails.
    let tree = || {
        let m = workstation();
        m.config(NIC);
        m
    };
    let root = |m: &FakeMachine| m.root().display().to_string();

    // Closed standard output and error (Rust reopens them on /dev/null at start-up).
    let m = tree();
    let status = Command::new("sh")
        .args(["-c", "exec \"$0\" \"$@\" >&- 2>&-"])
        .arg(bin())
        .args(["--root", &root(&m), "bind", "--early"])
        .status()
        .expect("run sh");
    assert_early_bind_returned_the_nic(&m, "closed stderr", status);

    // A full device: every write fails with ENOSPC (eprintln! panics on it).
    let m = tree();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("this test needs /dev/full (a standard Linux device node)");
    let status = Command::new(bin())
        .args(["--root", &root(&m), "bind", "--early"])
        .stderr(full)
        .status()
        .expect("run vfio-early");
    assert_early_bind_returned_the_nic(&m, "stderr on /dev/full", status);

    // A pipe whose reader is gone: every write fails with EPIPE.
    let m = tree();
    let mut child = Command::new(bin())
        .args(["--root", &root(&m), "bind", "--early"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vfio-early");
    drop(child.stderr.take());
    let status = child.wait().expect("wait");
    assert_early_bind_returned_the_nic(&m, "stderr a broken pipe", status);
}

/// The property `panic = "unwind"` buys, checked in the profile we ship: a release build
/// with the test-only `fault-injection` feature panics where told, and the early binder
/// catches it, returns the device, logs it and exits 0. Under `panic = "abort"` this
/// build fails to compile, and before that it died with SIGABRT mid-bind.
///
/// It builds in the project's own target directory, so the release build of the package
/// that follows reuses every dependency (only vfio-early itself is built again, without
/// the feature, replacing `release/vfio-early`); the test runs a copy kept apart under
/// `tmp/`, never the file a package could pick up.
#[test]
fn a_panic_in_the_early_binder_is_caught_in_a_release_build() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target = tmp.parent().expect("target/tmp has a parent");
    let out = Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .args(["build", "--release", "--locked", "--offline", "--quiet"])
        .args(["--features", "fault-injection", "--bin", "vfio-early"])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build --release --features fault-injection: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let release_bin = tmp.join("vfio-early-fault-injection");
    std::fs::copy(target.join("release/vfio-early"), &release_bin).expect("copy the build");
    for point in ["before-bind", "after-unbind"] {
        let m = workstation();
        m.write("dev/kmsg", "");
        m.config(NIC);
        let out = Command::new(&release_bin)
            .env("VFIO_EARLY_FAULT", point)
            .args(["--root", &m.root().display().to_string(), "bind", "--early"])
            .output()
            .expect("run the release build");
        let err = text(&m, &out.stderr);
        let kmsg = m.read("dev/kmsg");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{point}: {}\n{err}\n{kmsg}",
            out.status
        );
        // The panic really happened (the default hook printed it) and was caught.
        assert!(
            err.contains(&format!("fault injected at {point}")),
            "{point}: {err}"
        );
        match point {
            "before-bind" => {
                assert!(
                    kmsg.contains(
                        "<3>vfio-early: internal error in the early binder (fault injected \
                         at before-bind (VFIO_EARLY_FAULT)); boot continues without it"
                    ),
                    "{kmsg}"
                );
                assert_eq!(m.read(E1000E_UNBIND), "", "{kmsg}");
                assert_eq!(m.read(NIC_OVERRIDE), "(null)\n", "{kmsg}");
            }
            _ => {
                assert!(
                    kmsg.contains(
                        "<3>vfio-early: internal error while binding (fault injected at \
                         after-unbind (VFIO_EARLY_FAULT))"
                    ),
                    "{kmsg}"
                );
                assert!(
                    kmsg.contains("<6>vfio-early: 0000:04:00.0: driver_override cleared"),
                    "{kmsg}"
                );
                assert_eq!(m.read(E1000E_UNBIND), "0000:04:00.0", "{kmsg}");
                assert_eq!(attr(&m, NIC_OVERRIDE), "", "{kmsg}");
            }
        }
    }
}
