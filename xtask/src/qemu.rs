//! Booting a test image: the QEMU command line (q35, TCG unless asked for KVM, an
//! emulated IOMMU, the root disk on virtio at a fixed slot), a hard timeout, the serial
//! console read through a pipe (each line stamped with the host time it arrived, kept
//! in `serial.log`), and the probe's report read back from it. The disk is made before
//! and elsewhere (`disk`); this module only boots what it is given.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::scenario::Iommu;

/// Slot of the root disk (virtio-blk); scenarios keep clear of it.
pub const ROOT_DISK_ADDR: &str = "10.0";

/// OVMF's code (read-only) and the variable store each scenario gets a copy of (kept
/// across its boots, as NVRAM).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How the guest gets its kernel.
pub enum Loader<'a> {
    /// QEMU loads the kernel and initramfs itself (SeaBIOS hands over at once).
    Direct {
        kernel: &'a Path,
        initrd: &'a Path,
        append: &'a str,
    },
    /// UEFI firmware (OVMF as pflash) boots the root disk, whatever its ESP holds;
    /// `vars` is the scenario's copy of the variable store (written by the guest).
    Uefi { code: &'a Path, vars: &'a Path },
    /// QEMU's own BIOS (SeaBIOS) boots the root disk, whatever its MBR starts.
    Bios,
}

pub struct Boot<'a> {
    pub loader: Loader<'a>,
    pub disk: Option<&'a Path>,
    pub iommu: Iommu,
    pub devices: &'a [String],
    pub extra: &'a [String],
    pub serial_log: &'a Path,
    pub timeout: Duration,
    pub memory_mib: u32,
}

pub struct Outcome {
    /// QEMU start to exit.
    pub elapsed: Duration,
    pub timed_out: bool,
    /// The serial console's lines, each with the time since QEMU started at which it
    /// arrived.
    pub serial: Vec<(Duration, String)>,
    /// The kernel's panic line, when it panicked (QEMU is stopped then, not left to
    /// the timeout).
    pub panic: Option<String>,
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
        // No default devices (CD-ROM, parallel port, NIC): each is a driver to probe
        // and udev events at every boot, and no scenario uses them. The standard VGA
        // stays (the boot display at 00:01.0); a scenario's own `-vga` overrides it.
        .args(["-nodefaults", "-vga", "std"])
        .args(["-display", "none", "-no-reboot"])
        .args(["-monitor", "none", "-serial", "stdio"]);
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
        // The firmware boots the disk, not a NIC's option ROM.
        let boot_first = match b.loader {
            Loader::Uefi { .. } | Loader::Bios => ",bootindex=0",
            Loader::Direct { .. } => "",
        };
        c.arg("-drive")
            .arg(format!(
                "file={},format={},if=none,id=root",
                disk.display(),
                if disk.extension().is_some_and(|e| e == "qcow2") {
                    "qcow2"
                } else {
                    "raw"
                }
            ))
            .args([
                "-device",
                &format!("virtio-blk-pci,drive=root,addr={ROOT_DISK_ADDR}{boot_first}"),
            ]);
    }
    for d in b.devices {
        c.args(["-device", d]);
    }
    c.args(b.extra);
    match b.loader {
        Loader::Direct {
            kernel,
            initrd,
            append,
        } => {
            c.arg("-kernel")
                .arg(kernel)
                .arg("-initrd")
                .arg(initrd)
                .args(["-append", append]);
        }
        Loader::Uefi { code, vars } => {
            for (unit, file, ro) in [(0, code, ",readonly=on"), (1, vars, "")] {
                c.arg("-drive").arg(format!(
                    "if=pflash,format=raw,unit={unit}{ro},file={}",
                    file.display()
                ));
            }
        }
        Loader::Bios => {}
    }
    c
}

/// Boots and waits for the guest to power off, or kills it at the timeout. The serial
/// console is written to `b.serial_log` as it arrives (and streamed with `--verbose`);
/// `phase`, when given, says which part of the probe's report is arriving.
pub fn run(
    b: &Boot,
    qemu_log: &Path,
    phase: Option<&crate::progress::Phase>,
) -> anyhow::Result<Outcome> {
    let log = std::fs::File::create(qemu_log)
        .with_context(|| format!("creating {}", qemu_log.display()))?;
    let mut serial_file = std::fs::File::create(b.serial_log)
        .with_context(|| format!("creating {}", b.serial_log.display()))?;
    let cmd = command(b);
    writeln!(&log, "{}", crate::command::shown(&cmd))?;
    let started = Instant::now();
    let mut child = crate::command::timed(&cmd, b.timeout)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("running qemu-system-x86_64")?;
    let mut serial = Vec::new();
    let mut panic = None;
    if let Some(out) = child.stdout.take() {
        let mut reader = std::io::BufReader::new(out);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let at = started.elapsed();
            let _ = serial_file.write_all(&buf);
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if crate::progress::verbose() {
                crate::progress::line(&format!("  guest| {line}"));
            }
            if let (Some(p), Some(section)) = (phase, line.strip_prefix("@@ == ")) {
                p.waiting(&format!("the probe's report: {section}"));
            }
            if panic.is_none() && line.contains("Kernel panic - not syncing") {
                // A panicked kernel waits forever: stop QEMU now (`timeout` passes
                // the signal on), keep reading what is left.
                panic = Some(line.clone());
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
            serial.push((at, line));
        }
    }
    let status = child.wait().context("waiting for qemu-system-x86_64")?;
    Ok(Outcome {
        elapsed: started.elapsed(),
        timed_out: panic.is_none() && (status.code() == Some(124) || status.code() == Some(137)),
        serial,
        panic,
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
            loader: Loader::Direct {
                kernel: Path::new("vmlinuz"),
                initrd: Path::new("initrd"),
                append: "root=/dev/vda",
            },
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
        assert!(joined.contains("-kernel vmlinuz -initrd initrd -append root=/dev/vda"));
        assert!(!joined.contains("pflash"));
        assert!(!joined.contains("bootindex"));
    }

    #[test]
    fn a_uefi_boot_has_the_firmware_and_no_kernel() {
        let b = Boot {
            loader: Loader::Uefi {
                code: Path::new("/fw/CODE.fd"),
                vars: Path::new("vars.fd"),
            },
            disk: Some(Path::new("disk.img")),
            iommu: Iommu::Intel,
            devices: &[],
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
        assert!(joined.contains("-drive if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd"));
        assert!(joined.contains("-drive if=pflash,format=raw,unit=1,file=vars.fd"));
        assert!(joined.contains("virtio-blk-pci,drive=root,addr=10.0,bootindex=0"));
        for direct in ["-kernel", "-initrd", "-append"] {
            assert!(!args.iter().any(|a| a == direct), "{joined}");
        }
    }

    #[test]
    fn a_bios_boot_starts_the_disk_with_qemus_own_firmware() {
        let b = Boot {
            loader: Loader::Bios,
            disk: Some(Path::new("boot.qcow2")),
            iommu: Iommu::Intel,
            devices: &["e1000e,addr=05.0".to_string()],
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
        assert!(
            joined.contains("virtio-blk-pci,drive=root,addr=10.0,bootindex=0"),
            "the disk before the NIC's option ROM: {joined}"
        );
        assert!(joined.contains("file=boot.qcow2,format=qcow2"));
        for absent in ["-kernel", "-initrd", "-append", "-bios"] {
            assert!(!args.iter().any(|a| a == absent), "{joined}");
        }
        assert!(!joined.contains("pflash"));
    }
}
