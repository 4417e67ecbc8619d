//! What is installed, configured and running on the host, read once into data for the
//! pure parts of `apply` ([`crate::apply::compute`]) and `status`
//! ([`crate::status::evaluate`]): vfio-early's state, the files it owns as they are now,
//! the bootloader and initramfs generator, and for `status` the running system's kernel
//! log, memory map, modules, `/dev/vfio` nodes, reset methods and initramfs.
//!
//! [`crate::machine`] is the hardware and kernel identity every command needs; this is
//! the rest, read only by the commands that need it. Nothing here decides anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::bootloader::BootFacts;
use crate::initramfs::Verification;
use crate::kmod::KernelModules;
use crate::machine::Machine;
use crate::paths;
use crate::pci::PciAddress;
use crate::root::Root;
use crate::state::State;

/// The files `apply` may write, as they are now.
pub const OWNED_FILES: &[&str] = &[
    paths::MODPROBE,
    paths::APPLIED,
    paths::FORCED,
    paths::GRUB_DROPIN,
    paths::KERNEL_CMDLINE,
];

/// Which tool rebuilds the initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    InitramfsTools,
    Dracut,
}

/// The host's files, for `apply`, `undo` and `status`.
#[derive(Debug, Clone)]
pub struct Host {
    /// The root is the running system, so host commands may run.
    pub is_host: bool,
    pub state: State,
    /// Each of [`OWNED_FILES`]: its text, `None` when absent, or why it cannot be read.
    pub owned: BTreeMap<&'static str, Result<Option<String>, String>>,
    /// The parent directories of the owned files that exist now.
    pub existing_dirs: BTreeSet<String>,
    pub boot: BootFacts,
    pub grub_cfg: Option<String>,
    pub generator: Generator,
    /// Kernel versions with an image in `/boot` (`vmlinuz-<version>`), sorted.
    pub kernel_images: Vec<String>,
    /// Kernel versions with an initramfs in `/boot` (`initrd.img-<version>`).
    pub initrds: Vec<String>,
    /// The command line the next boot will give the kernel, where it can be read.
    pub next_boot: Option<crate::nextboot::NextBoot>,
}

impl Host {
    /// `cmdline` is the kernel command line as already read (`Machine::cmdline`), the
    /// witness of which loader started this boot.
    pub fn read(root: &Root, cmdline: Option<&str>) -> Host {
        let mut owned = BTreeMap::new();
        let mut existing_dirs = BTreeSet::new();
        for rel in OWNED_FILES {
            owned.insert(*rel, read_opt(root, rel));
            let mut dir = Path::new(rel).parent();
            while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
                if root.exists(d) {
                    existing_dirs.insert(d.to_string_lossy().into_owned());
                }
                dir = d.parent();
            }
        }
        // update-initramfs wins where both exist, and is the default where neither does.
        let generator = if root.exists(paths::UPDATE_INITRAMFS) || !root.exists(paths::DRACUT) {
            Generator::InitramfsTools
        } else {
            Generator::Dracut
        };
        let boot = BootFacts::read(root, cmdline);
        let grub_cfg = root.read_to_string(paths::GRUB_CFG).ok();
        Host {
            is_host: root.is_host(),
            state: State::read(root),
            owned,
            existing_dirs,
            next_boot: crate::nextboot::read(root, &boot, grub_cfg.as_deref()),
            boot,
            grub_cfg,
            generator,
            kernel_images: versions_in_boot(root, "vmlinuz-"),
            initrds: versions_in_boot(root, "initrd.img-"),
        }
    }

    /// An owned file's text now (`None`: absent); an unreadable file is an error.
    pub fn current(&self, rel: &str) -> anyhow::Result<Option<String>> {
        match self.owned.get(rel) {
            Some(Ok(text)) => Ok(text.clone()),
            Some(Err(e)) => Err(anyhow::anyhow!("{e}")),
            None => Ok(None),
        }
    }

    /// An owned file's text when it can be read (reports).
    pub fn text(&self, rel: &str) -> Option<&str> {
        match self.owned.get(rel) {
            Some(Ok(Some(t))) => Some(t),
            _ => None,
        }
    }

    /// Whether an owned file exists now.
    pub fn has(&self, rel: &str) -> bool {
        self.text(rel).is_some()
    }
}

/// The versions of the files `<prefix><version>` in `/boot`, sorted.
fn versions_in_boot(root: &Root, prefix: &str) -> Vec<String> {
    root.read_dir_names(paths::BOOT)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| n.strip_prefix(prefix).map(str::to_string))
        .collect()
}

fn read_opt(root: &Root, rel: &str) -> Result<Option<String>, String> {
    match root.read_to_string(rel) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", root.path(rel).display())),
    }
}

/// The running system, for `status`.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    /// The kernel log's messages, oldest first.
    pub kernel_log: Vec<String>,
    /// `/proc/iomem`, when readable.
    pub iomem: Option<String>,
    /// Module names under `/sys/module` (loaded or built in).
    pub sys_modules: BTreeSet<String>,
    /// Names under `/dev/vfio` (group numbers, `vfio`).
    pub vfio_nodes: BTreeSet<String>,
    /// Each device's `reset_method`, where the kernel has the attribute.
    pub reset_methods: BTreeMap<PciAddress, String>,
    /// The running kernel's initramfs, when asked for.
    pub initramfs: Option<Image>,
}

/// The running kernel's initramfs image as read with our own reader.
#[derive(Debug, Clone)]
pub struct Image {
    pub kernel: String,
    /// Where it is, relative to the root; `None` when there is none.
    pub path: Option<PathBuf>,
    /// What it holds, or why it could not be read.
    pub verification: Result<Verification, String>,
    /// The kernel's loadable modules (empty when its tree cannot be read): a vfio module
    /// built in needs no file in the image.
    pub loadable: BTreeSet<String>,
}

impl Runtime {
    /// Reads the running system; the initramfs only when `with_initramfs` (it is the
    /// slow part: a whole image decompressed).
    pub fn read(root: &Root, machine: &Machine, host: &Host, with_initramfs: bool) -> Runtime {
        let reset_methods = machine
            .devices
            .iter()
            .filter_map(|d| {
                let rel = Path::new(paths::PCI_DEVICES)
                    .join(d.address.to_string())
                    .join("reset_method");
                root.read_attr(rel).ok().map(|m| (d.address, m))
            })
            .collect();
        let initramfs = match (&machine.running_kernel, with_initramfs) {
            (Some(kver), true) => Some(read_image(root, kver, host.has(paths::MODPROBE))),
            _ => None,
        };
        Runtime {
            kernel_log: crate::kmsg::read_log(root),
            iomem: root.read_to_string(paths::PROC_IOMEM).ok(),
            sys_modules: root
                .read_dir_names(paths::SYS_MODULE)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            vfio_nodes: root
                .read_dir_names(paths::DEV_VFIO)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            reset_methods,
            initramfs,
        }
    }
}

/// Where the initramfs of `kver` is in `/boot` (Debian's `initrd.img-V`, or dracut's
/// own `initramfs-V.img`), if it is there.
pub fn image_path(root: &Root, kver: &str) -> Option<PathBuf> {
    [
        format!("initrd.img-{kver}"),
        format!("initramfs-{kver}.img"),
    ]
    .iter()
    .map(|n| Path::new(paths::BOOT).join(n))
    .find(|p| root.exists(p))
}

fn read_image(root: &Root, kver: &str, want_modprobe: bool) -> Image {
    let path = image_path(root, kver);
    let verification = match &path {
        Some(p) => root
            .open(p)
            .map_err(|e| format!("{}: {e}", root.path(p).display()))
            .and_then(|f| {
                crate::initramfs::verify::verify_reader(f, Some(kver), want_modprobe)
                    .map_err(|e| e.to_string())
            }),
        None => Err("no image".to_string()),
    };
    Image {
        kernel: kver.to_string(),
        path,
        verification,
        loadable: KernelModules::read(root, kver).loadable,
    }
}
