//! What the machine is, discovered once into data: PCI devices, CPU vendor, the running
//! kernel and its command line, installed kernels, IOMMU state, and which PCI devices
//! hold the system's mounts and swap (traced by [`crate::sysdisk`]).
//!
//! Everything is read through the [`Root`]; nothing here decides anything (that is
//! [`crate::plan`]). Missing files give "unknown", never an error: a container, a chroot
//! or a fixture tree lacks parts of a real machine.

use serde::Serialize;

use crate::paths;
use crate::pci::{self, Device, PciAddress};
use crate::root::Root;
use crate::sysdisk::{self, SystemDisks};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuVendor {
    Intel,
    Amd,
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub devices: Vec<Device>,
    /// The CPU vendor of the running system; `Unknown` for any other root (a chroot's
    /// or image's `/proc/cpuinfo` is the build host's, not the target's).
    pub cpu_vendor: CpuVendor,
    /// The root is the system this process runs on: `/`, and not inside a chroot.
    pub running_system: bool,
    /// `/proc/cmdline`, when readable.
    pub cmdline: Option<String>,
    /// The running kernel release (`/proc/sys/kernel/osrelease`).
    pub running_kernel: Option<String>,
    /// Kernel versions with a directory under `/lib/modules`.
    pub installed_kernels: Vec<String>,
    /// IOMMU units registered in `/sys/class/iommu` (dmar0, ivhd0, ...).
    pub iommu_units: Vec<String>,
    /// PCI devices behind `/`, `/boot`, `/boot/efi`, `/usr`, `/var` and swap, and what
    /// could not be traced ([`crate::sysdisk`]).
    pub system_disks: SystemDisks,
    /// Module facts of each installed kernel, for the softdeps; read only where a plan
    /// needs them (apply), empty otherwise.
    #[serde(skip)]
    pub kernels: Vec<crate::kmod::KernelModules>,
}

impl Machine {
    /// A machine with nothing discovered, every system disk known (none): for unit tests
    /// that fill in what they need.
    #[cfg(test)]
    pub fn empty_for_tests() -> Machine {
        Machine {
            devices: Vec::new(),
            cpu_vendor: CpuVendor::Unknown,
            running_system: false,
            cmdline: None,
            running_kernel: None,
            installed_kernels: Vec::new(),
            iommu_units: Vec::new(),
            system_disks: crate::sysdisk::SystemDisks {
                known: Vec::new(),
                unknown: Vec::new(),
            },
            kernels: Vec::new(),
        }
    }

    pub fn device(&self, address: PciAddress) -> Option<&Device> {
        self.devices.iter().find(|d| d.address == address)
    }

    /// Whether the kernel command line carries `token` (exact, whitespace separated).
    pub fn cmdline_has(&self, token: &str) -> bool {
        self.cmdline
            .as_deref()
            .map(|c| crate::kargs::cmdline_has(c, token))
            .unwrap_or(false)
    }
}

/// Reads everything the planner and reports need, once.
pub fn discover(root: &Root) -> Machine {
    let devices = pci::enumerate_devices(root);
    let system_disks = sysdisk::discover(root, &devices);
    let running_system = is_running_system(root);
    Machine {
        devices,
        cpu_vendor: if running_system {
            read_cpu_vendor(root)
        } else {
            CpuVendor::Unknown
        },
        running_system,
        cmdline: root.read_attr(paths::PROC_CMDLINE).ok(),
        running_kernel: root.read_attr(paths::PROC_OSRELEASE).ok(),
        installed_kernels: list_dir_names(root, paths::LIB_MODULES),
        iommu_units: list_dir_names(root, paths::IOMMU_CLASS),
        system_disks,
        kernels: Vec::new(),
    }
}

/// Whether `root` is the system this process runs on: `/`, and the same directory as
/// init's root (a chroot shows another one, or has no `/proc` at all).
fn is_running_system(root: &Root) -> bool {
    use std::os::unix::fs::MetadataExt;
    if !root.is_host() {
        return false;
    }
    // Which system the process runs in is a property of the process, not of the tree
    // under the root: the kernel's own view of init's root is asked directly.
    let init_root = std::fs::metadata("/proc/1/root"); // root-ok
    let own_root = std::fs::metadata("/"); // root-ok
    match (init_root, own_root) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
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
