//! Booting a test image: the QEMU command line (q35, TCG unless asked for KVM, an
//! emulated IOMMU, the root disk on virtio at a fixed slot), a hard timeout, the serial
//! log kept on disk, and the probe's report read back from it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::scenario::Iommu;

/// Slot of the root disk (virtio-blk); scenarios keep clear of it.
pub const ROOT_DISK_ADDR: &str = "10.0";

pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub append: &'a str,
    pub disk: Option<&'a Path>,
    pub iommu: Iommu,
    pub devices: &'a [String],
    pub extra: &'a [String],
    pub serial_log: &'a Path,
    pub timeout: Duration,
    pub memory_mib: u32,
}

pub struct Outcome {
    pub elapsed: Duration,
    pub timed_out: bool,
}

/// KVM only when asked (`VFIO_EARLY_KVM=1`): on these machines a KVM guest hangs.
fn accel() -> &'static str {
    if std::env::var_os("VFIO_EARLY_KVM").is_some_and(|v| v == "1") {
        "kvm"
    } else {
        "tcg"
    }
}

pub fn command(b: &Boot) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    let machine = match b.iommu {
        Iommu::None => "q35".to_string(),
        _ => "q35,kernel-irqchip=split".to_string(),
    };
    // The CPU vendor matches the IOMMU, as on real machines (qemu64 is AuthenticAMD).
    let cpu = match b.iommu {
        Iommu::Intel => "qemu64,vendor=GenuineIntel",
        _ => "qemu64",
    };
    c.args(["-M", &machine, "-accel", accel(), "-cpu", cpu, "-smp", "1"])
        .args(["-m", &b.memory_mib.to_string()])
        .args(["-display", "none", "-nic", "none", "-no-reboot"])
        .args(["-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", b.serial_log.display()));
    match b.iommu {
        Iommu::Intel => {
            c.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
        }
        Iommu::Amd => {
            c.args(["-device", "amd-iommu,intremap=on"]);
        }
        Iommu::None => {}
    }
    if let Some(disk) = b.disk {
        c.arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=root",
                disk.display()
            ))
            .args([
                "-device",
                &format!("virtio-blk-pci,drive=root,addr={ROOT_DISK_ADDR}"),
            ]);
    }
    for d in b.devices {
        c.args(["-device", d]);
    }
    c.args(b.extra)
        .arg("-kernel")
        .arg(b.kernel)
        .arg("-initrd")
        .arg(b.initrd)
        .args(["-append", b.append]);
    c
}

/// Boots and waits for the guest to power off, or kills it at the timeout.
pub fn run(b: &Boot, qemu_log: &Path) -> anyhow::Result<Outcome> {
    let _ = std::fs::remove_file(b.serial_log);
    let log = std::fs::File::create(qemu_log)
        .with_context(|| format!("creating {}", qemu_log.display()))?;
    let cmd = command(b);
    let started = Instant::now();
    let status = Command::new("timeout")
        .arg("-k5")
        .arg(b.timeout.as_secs().to_string())
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running qemu-system-x86_64")?;
    Ok(Outcome {
        elapsed: started.elapsed(),
        timed_out: status.code() == Some(124) || status.code() == Some(137),
    })
}

/// The probe's report: its sections (`== name` lines) with their lines, read from the
/// serial log's `@@ ` lines only.
#[derive(Debug, Default)]
pub struct Report {
    pub sections: BTreeMap<String, Vec<String>>,
    pub complete: bool,
}

impl Report {
    pub fn section(&self, name: &str) -> &[String] {
        self.sections.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A section's text without its trailing `exit=N` line, and N.
    pub fn with_exit(&self, name: &str) -> (String, Option<i32>) {
        let lines = self.section(name);
        let mut exit = None;
        let mut body = Vec::new();
        for l in lines {
            match l.strip_prefix("exit=") {
                Some(n) => exit = n.trim().parse().ok(),
                None => body.push(l.as_str()),
            }
        }
        (body.join("\n"), exit)
    }
}

pub fn read_report(serial_log: &Path) -> Report {
    let bytes = std::fs::read(serial_log).unwrap_or_default();
    parse_report(&String::from_utf8_lossy(&bytes))
}

pub fn parse_report(text: &str) -> Report {
    let mut r = Report::default();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix("@@ ").or_else(|| line.strip_prefix("@@")) else {
            continue;
        };
        if let Some(name) = rest.strip_prefix("== ") {
            let name = name.trim().to_string();
            if name == "end" {
                r.complete = true;
            }
            r.sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let Some(name) = &current {
            r.sections
                .entry(name.clone())
                .or_default()
                .push(rest.to_string());
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_ignores_kernel_lines_and_splits_sections() {
        let log = "[ 1.0] kernel says hi\n@@ == cmdline\n@@ root=/dev/vda ro\n\
                   [ 2.0] interleaved\n@@ == status\n@@ PASS iommu\n@@ exit=0\n@@ == end\n";
        let r = parse_report(log);
        assert!(r.complete);
        assert_eq!(r.section("cmdline"), ["root=/dev/vda ro"]);
        assert_eq!(r.with_exit("status"), ("PASS iommu".to_string(), Some(0)));
    }

    #[test]
    fn a_cut_off_report_is_incomplete() {
        let r = parse_report("@@ == cmdline\n@@ x\n");
        assert!(!r.complete);
    }

    #[test]
    fn the_command_pins_the_root_disk_and_the_iommu() {
        let devices = vec!["e1000e,addr=05.0".to_string()];
        let b = Boot {
            kernel: Path::new("vmlinuz"),
            initrd: Path::new("initrd"),
            append: "root=/dev/vda",
            disk: Some(Path::new("disk.img")),
            iommu: Iommu::Amd,
            devices: &devices,
            extra: &[],
            serial_log: Path::new("serial.log"),
            timeout: Duration::from_secs(1),
            memory_mib: 1024,
        };
        let args: Vec<String> = command(&b)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-device amd-iommu,intremap=on"));
        assert!(joined.contains("virtio-blk-pci,drive=root,addr=10.0"));
        assert!(joined.contains("-device e1000e,addr=05.0"));
        assert!(joined.contains("-M q35,kernel-irqchip=split"));
    }
}
