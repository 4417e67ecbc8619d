//! What the machine is, discovered once into data: PCI devices, CPU vendor, the running
//! kernel and its command line, installed kernels, IOMMU state, and which PCI devices
//! hold mounted system filesystems.
//!
//! Everything is read through the [`Root`]; nothing here decides anything (that is
//! [`crate::plan`]). Missing files give "unknown", never an error: a container, a chroot
//! or a fixture tree lacks parts of a real machine.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use crate::paths;
use crate::pci::{self, Device, PciAddress};
use crate::root::Root;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuVendor {
    Intel,
    Amd,
    Unknown,
}

/// A PCI device that holds a system filesystem, and which mount point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SystemDisk {
    pub address: PciAddress,
    pub mount_point: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub devices: Vec<Device>,
    pub cpu_vendor: CpuVendor,
    /// `/proc/cmdline`, when readable.
    pub cmdline: Option<String>,
    /// The running kernel release (`/proc/sys/kernel/osrelease`).
    pub running_kernel: Option<String>,
    /// Kernel versions with a directory under `/lib/modules`.
    pub installed_kernels: Vec<String>,
    /// IOMMU units registered in `/sys/class/iommu` (dmar0, ivhd0, ...).
    pub iommu_units: Vec<String>,
    /// PCI devices behind `/`, `/boot`, `/boot/efi`, `/usr`, `/var`.
    pub system_disks: Vec<SystemDisk>,
    /// Module facts of each installed kernel, for the softdeps; read only where a plan
    /// needs them (apply), empty otherwise.
    #[serde(skip)]
    pub kernels: Vec<crate::kmod::KernelModules>,
}

impl Machine {
    pub fn device(&self, address: PciAddress) -> Option<&Device> {
        self.devices.iter().find(|d| d.address == address)
    }

    /// Whether the kernel command line carries `token` (exact, whitespace separated).
    pub fn cmdline_has(&self, token: &str) -> bool {
        self.cmdline
            .as_deref()
            .map(|c| c.split_whitespace().any(|t| t == token))
            .unwrap_or(false)
    }
}

/// Mount points whose backing device must never be taken from the host.
const SYSTEM_MOUNTS: &[&str] = &["/", "/boot", "/boot/efi", "/usr", "/var"];

/// Reads everything the planner and reports need, once.
pub fn discover(root: &Root) -> Machine {
    Machine {
        devices: pci::enumerate_devices(root),
        cpu_vendor: read_cpu_vendor(root),
        cmdline: root.read_attr(paths::PROC_CMDLINE).ok(),
        running_kernel: root.read_attr(paths::PROC_OSRELEASE).ok(),
        installed_kernels: list_dir_names(root, paths::LIB_MODULES),
        iommu_units: list_dir_names(root, paths::IOMMU_CLASS),
        system_disks: find_system_disks(root),
        kernels: Vec::new(),
    }
}

fn list_dir_names(root: &Root, rel: &str) -> Vec<String> {
    let mut names = root.read_dir_names(rel).unwrap_or_default();
    names.retain(|n| !n.starts_with('.'));
    names
}

fn read_cpu_vendor(root: &Root) -> CpuVendor {
    let Ok(text) = root.read_to_string(paths::PROC_CPUINFO) else {
        return CpuVendor::Unknown;
    };
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(':') {
            if key.trim() == "vendor_id" {
                return match value.trim() {
                    "GenuineIntel" => CpuVendor::Intel,
                    "AuthenticAMD" | "HygonGenuine" => CpuVendor::Amd,
                    _ => CpuVendor::Unknown,
                };
            }
        }
    }
    CpuVendor::Unknown
}

/// One line of `/proc/self/mountinfo`: mount point, `major:minor`, source.
fn parse_mountinfo_line(line: &str) -> Option<(String, String, String)> {
    let mut fields = line.split(' ');
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let majmin = fields.next()?.to_string();
    let _root = fields.next()?;
    let mount_point = unescape_mount(fields.next()?);
    // Optional fields end at "-", then fstype and source.
    let mut rest = fields.skip_while(|f| *f != "-");
    rest.next()?;
    let _fstype = rest.next()?;
    let source = unescape_mount(rest.next()?);
    Some((mount_point, majmin, source))
}

/// The kernel escapes space, tab, newline and backslash in mount paths as octal.
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(oct) = s.get(i + 1..i + 4) {
                if let Ok(v) = u8::from_str_radix(oct, 8) {
                    out.push(char::from(v));
                    i += 4;
                    continue;
                }
            }
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

fn find_system_disks(root: &Root) -> Vec<SystemDisk> {
    let mut out: Vec<SystemDisk> = Vec::new();
    let Ok(text) = root
        .read_to_string(paths::PROC_MOUNTINFO)
        .or_else(|_| root.read_to_string(paths::PROC_MOUNTS))
    else {
        return out;
    };
    let is_mountinfo = text
        .lines()
        .next()
        .map(|l| l.contains(" - "))
        .unwrap_or(false);
    for line in text.lines() {
        let (mount_point, majmin, source) = if is_mountinfo {
            match parse_mountinfo_line(line) {
                Some(t) => t,
                None => continue,
            }
        } else {
            let mut f = line.split_whitespace();
            let (Some(src), Some(mp)) = (f.next(), f.next()) else {
                continue;
            };
            (unescape_mount(mp), String::new(), unescape_mount(src))
        };
        if !SYSTEM_MOUNTS.contains(&mount_point.as_str()) {
            continue;
        }
        let mut addresses = BTreeSet::new();
        if !majmin.is_empty() {
            block_pci_devices(
                root,
                &Path::new(paths::SYS_DEV_BLOCK).join(&majmin),
                &mut addresses,
                0,
            );
        }
        if addresses.is_empty() {
            // The mount source names a device node; only its name is used.
            // root-ok
            if let Some(name) = source.strip_prefix("/dev/") {
                let name = name.rsplit('/').next().unwrap_or(name);
                block_pci_devices(
                    root,
                    &Path::new(paths::SYS_CLASS_BLOCK).join(name),
                    &mut addresses,
                    0,
                );
            }
        }
        for address in addresses {
            if !out
                .iter()
                .any(|d| d.address == address && d.mount_point == mount_point)
            {
                out.push(SystemDisk {
                    address,
                    mount_point: mount_point.clone(),
                });
            }
        }
    }
    out
}

/// Follows a `/sys/dev/block/M:m` or `/sys/class/block/NAME` link to the PCI device
/// behind it; for device-mapper and md devices, follows `slaves/` down to the disks.
fn block_pci_devices(root: &Root, link: &Path, out: &mut BTreeSet<PciAddress>, depth: u8) {
    if depth > 8 {
        return;
    }
    let Ok(target) = std::fs::read_link(root.path(link)) else {
        return;
    };
    // The last PCI address in the link target is the controller nearest the disk.
    if let Some(addr) = target
        .components()
        .filter_map(|c| c.as_os_str().to_str()?.parse::<PciAddress>().ok())
        .next_back()
    {
        out.insert(addr);
        return;
    }
    // Virtual block device: look at its slaves (dm-crypt, LVM, md). A partition's
    // slaves live on the parent disk, which also has a PCI path, so this is rare.
    let resolved = link.parent().unwrap_or(Path::new("")).join(&target);
    let slaves = root.path(&resolved).join("slaves");
    if let Ok(entries) = std::fs::read_dir(slaves) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name();
            block_pci_devices(
                root,
                &Path::new(paths::SYS_CLASS_BLOCK).join(name),
                out,
                depth + 1,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_line_parses() {
        let l = "29 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw";
        let (mp, mm, src) = parse_mountinfo_line(l).unwrap();
        assert_eq!(
            (mp.as_str(), mm.as_str(), src.as_str()),
            ("/", "259:2", "/dev/nvme0n1p2")
        );
    }

    #[test]
    fn mount_escapes_decode() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/x\\"), "/x\\");
    }
}
