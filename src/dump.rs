//! `vfio-early debug-dump`: packs the part of the machine that vfio-early reads into one
//! gzip-compressed newc cpio archive, and unpacks such an archive into a directory that
//! works as a `--root` fixture tree.
//!
//! Collected, and nothing else:
//! - PCI device attributes with their `driver`/`iommu_group` links, the PCI driver
//!   directories, IOMMU groups and units, `/proc/cmdline`, the CPU vendor line of
//!   `/proc/cpuinfo`, the kernel release, and the config;
//! - what [`crate::sysdisk`] walks to find the system's disks: the mount table, the active
//!   swaps, `/etc/fstab` (spec, mount point and type only: options may hold passwords),
//!   the `sys/dev/block` and `sys/class/block` links and, for every block device they
//!   lead to, its `slaves/` links, `dm/name`, `md/level`, `partition` and
//!   `loop/backing_file`, the parent of each partition, the controller links of an NVMe
//!   subsystem, `sys/fs/btrfs/*/devices`, the `/dev` links that mounted sources, swaps
//!   and fstab specs name, the `sys/class/net` links with the `lower_*` and `brif/` links
//!   of virtual interfaces, and the `sys/class/iscsi_host` links with each host's
//!   `netdev`;
//! - what [`crate::bootloader::BootFacts::read`], [`crate::nextboot`] and
//!   [`crate::host`] read: `sys/firmware/efi` and the `LoaderInfo` variable's name (an
//!   empty file: never its value), the kernel-install and proxmox-boot-tool files under
//!   `etc/kernel`, systemd-boot's initramfs hook, each ESP's `loader/loader.conf` and
//!   `loader/entries/*.conf`, `boot/grub/grub.cfg` (password lines left out), the files
//!   `apply` owns and the state under `var/lib/vfio-early`.
//!
//! Files whose presence alone is read (`update-grub`, `kernel-install`, the systemd-boot
//! and Proxmox GRUB loaders on an ESP) are stored empty. A UKI is stored as a stub holding
//! only its `.cmdline` section: no kernel, initrd or UKI is ever copied. Every read and
//! every listing is bounded, stacked block devices are followed at most 16 deep, and the
//! archive holds at most 200 000 entries; what a bound cut is reported.
//! Symlinks are stored as symlinks, with their relative targets, so the unpacked tree has
//! the kernel's shape, and unpacking never writes through one.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use cpio::newc::{Builder, ModeFileType};

use crate::paths;
use crate::root::Root;
use crate::sysdisk;

/// Attributes read from each PCI device directory.
const DEVICE_ATTRS: &[&str] = &[
    "vendor",
    "device",
    "subsystem_vendor",
    "subsystem_device",
    "class",
    "revision",
    "boot_vga",
    "modalias",
    "driver_override",
    "reset_method",
];
const DEVICE_LINKS: &[&str] = &["driver", "iommu_group"];
/// The attributes sysdisk reads from a block device's directory.
const BLOCK_ATTRS: &[&str] = &["dm/name", "md/level", "partition", "loop/backing_file"];
/// Largest attribute copied; sysfs text attributes are far smaller.
const MAX_ATTR: u64 = 64 * 1024;
/// Largest configuration or state file copied (grub.cfg, loader entries, the manifest).
const MAX_TEXT: u64 = 1024 * 1024;
/// Largest mount table or swap list copied (a host with many containers has long ones).
const MAX_TABLE: u64 = 16 * 1024 * 1024;
/// Most names taken from one directory.
const MAX_NAMES: usize = 16 * 1024;
/// Most block devices visited.
const MAX_BLOCK_DEVICES: usize = 16 * 1024;
/// Most loader entries, UKIs and state files taken from one directory.
const MAX_BOOT_FILES: usize = 256;
/// Stacked block devices deeper than this are not followed (as in sysdisk).
const MAX_DEPTH: usize = 16;
/// Symlinks followed in a row before giving up (as sysdisk's resolver).
const MAX_HOPS: usize = 8;
/// Most entries in one archive.
const MAX_ENTRIES: usize = 200_000;

/// Commands and loaders whose presence alone is read: stored empty.
const PRESENCE_FILES: &[&str] = &[
    paths::PROXMOX_BOOT_TOOL,
    paths::UPDATE_GRUB,
    paths::KERNEL_INSTALL,
    paths::UPDATE_INITRAMFS,
    paths::DRACUT,
];

/// Text files read whole, copied as they are.
const TEXT_FILES: &[&str] = &[
    paths::PROXMOX_UUIDS,
    paths::INSTALL_CONF,
    paths::INSTALL_CONF_DEFAULT,
    paths::SDBOOT_INITRAMFS_HOOK,
];

/// The name of systemd-boot's `LoaderInfo` EFI variable starts so; only the name is read.
const LOADER_INFO_PREFIX: &str = "LoaderInfo-";

enum Item {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

/// Everything collected, keyed by path relative to the root.
#[derive(Default)]
struct Collection {
    items: BTreeMap<PathBuf, Item>,
    /// What a bound cut, for the user.
    notes: Vec<String>,
    full: bool,
}

impl Collection {
    /// Adds an entry and its parent directories. The first entry at a path wins, and
    /// nothing is added beneath a stored symlink (unpacking would write through it).
    fn add(&mut self, rel: PathBuf, item: Item) {
        if self.items.contains_key(&rel) {
            return;
        }
        let parents: Vec<PathBuf> = rel
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .collect();
        if parents
            .iter()
            .any(|p| matches!(self.items.get(p), Some(Item::File(_) | Item::Link(_))))
        {
            return;
        }
        let new = parents
            .iter()
            .filter(|p| !self.items.contains_key(*p))
            .count();
        if self.items.len() + new + 1 > MAX_ENTRIES {
            if !self.full {
                self.full = true;
                self.notes
                    .push(format!("the dump stopped at {MAX_ENTRIES} entries"));
            }
            return;
        }
        for p in parents {
            self.items.entry(p).or_insert(Item::Dir);
        }
        self.items.insert(rel, item);
    }

    /// Adds a file as read, at most `limit` bytes (a longer one is cut and noted).
    fn add_bounded(&mut self, root: &Root, rel: &Path, limit: u64) {
        let Ok(mut data) = root.read_bytes(rel, limit + 1) else {
            return;
        };
        if data.len() as u64 > limit {
            data.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            self.notes.push(format!(
                "/{} is longer than {limit} bytes: cut",
                rel.display()
            ));
        }
        self.add(rel.to_path_buf(), Item::File(data));
    }

    fn add_file(&mut self, root: &Root, rel: &Path) {
        self.add_bounded(root, rel, MAX_ATTR);
    }

    /// An empty file where the root has one: for paths whose presence alone is read.
    fn add_marker(&mut self, root: &Root, rel: &Path) {
        if root.exists(rel) {
            self.add(rel.to_path_buf(), Item::File(Vec::new()));
        }
    }

    fn add_dir_if_present(&mut self, root: &Root, rel: &Path) {
        if root.is_dir(rel) {
            self.add(rel.to_path_buf(), Item::Dir);
        }
    }

    fn add_link(&mut self, root: &Root, rel: &Path) -> Option<PathBuf> {
        let target = root.read_link(rel).ok()?;
        self.add(rel.to_path_buf(), Item::Link(target.clone()));
        Some(target)
    }

    /// The names in a directory that `keep` accepts, sorted, at most `limit` (the rest
    /// are left out and noted).
    fn names_where(
        &mut self,
        root: &Root,
        rel: &Path,
        limit: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut names: Vec<String> = root
            .read_dir_names(rel)
            .unwrap_or_default()
            .into_iter()
            .filter(|n| keep(n))
            .collect();
        if names.len() > limit {
            names.truncate(limit);
            self.notes.push(format!(
                "/{} has more than {limit} entries: the rest were left out",
                rel.display()
            ));
        }
        names
    }

    /// The names in a directory, sorted, at most [`MAX_NAMES`].
    fn names(&mut self, root: &Root, rel: &Path) -> Vec<String> {
        self.names_where(root, rel, MAX_NAMES, |_| true)
    }

    /// Adds every symlink directly in a directory.
    fn add_links_in(&mut self, root: &Root, rel: &Path) {
        for name in self.names(root, rel) {
            self.add_link(root, &rel.join(name));
        }
    }

    /// Follows the symlinks at `rel` the way sysdisk resolves them (each target joined
    /// lexically onto its link's directory), storing every link on the way; returns where
    /// they end, which need not exist. `None` when `rel` does not exist or the chain is
    /// too long.
    fn follow(&mut self, root: &Root, rel: &Path) -> Option<PathBuf> {
        let mut cur = normalize(rel);
        root.symlink_metadata(&cur).ok()?;
        for _ in 0..MAX_HOPS {
            let Some(target) = self.add_link(root, &cur) else {
                return Some(cur);
            };
            cur = normalize(&cur.parent()?.join(target));
        }
        None
    }
}

/// Undoes `..` lexically; the result is relative to the root and never climbs out (an
/// absolute link target is taken from the root, as sysdisk takes it).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// `prefix` followed by digits only (`nvme0`, `nvme-subsys1`).
fn numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A path under the root for a source that names a file under `/dev`.
fn dev_path(source: &[u8]) -> Option<PathBuf> {
    let text = std::str::from_utf8(source).ok()?;
    let rel = Path::new(text).strip_prefix("/").ok()?;
    rel.starts_with(paths::DEV).then(|| rel.to_path_buf())
}

/// An fstab spec as the `/dev` path it stands for (`UUID=…` and the like become udev's
/// `/dev/disk/by-*` links, as sysdisk reads them); only a plain path under `/dev`.
fn fstab_dev_path(spec: &[u8]) -> Option<PathBuf> {
    let path = dev_path(&crate::sysdisk::fstab_source(spec))?;
    let text = path.to_str()?;
    Root::checked_rel(text).ok()
}

/// Reads a table (mount table, swaps), cut at its last whole line when too long.
fn add_table(c: &mut Collection, root: &Root, rel: &str) -> Option<Vec<u8>> {
    let mut data = root.read_bytes(rel, MAX_TABLE + 1).ok()?;
    if keep_whole_lines(&mut data, MAX_TABLE) {
        c.notes.push(format!(
            "/{rel} is longer than {MAX_TABLE} bytes: only its first lines were kept"
        ));
    }
    c.add(PathBuf::from(rel), Item::File(data.clone()));
    Some(data)
}

/// Cuts `data` longer than `limit` after its last whole line within `limit`: a cut line
/// would read as a different mount. True when it cut.
fn keep_whole_lines(data: &mut Vec<u8>, limit: u64) -> bool {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if data.len() <= limit {
        return false;
    }
    data.truncate(limit);
    let end = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    data.truncate(end);
    true
}

/// `/etc/fstab` with each entry's spec, mount point and type only: the options may hold
/// credentials (`password=`), and sysdisk reads nothing else.
fn reduce_fstab(text: &[u8]) -> Vec<u8> {
    let mut out =
        b"# vfio-early debug-dump: spec, mount point and type only; options left out\n".to_vec();
    for line in text.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line
            .split(|b| *b == b' ' || *b == b'\t')
            .filter(|x| !x.is_empty())
            .take(3)
            .collect();
        if fields.len() < 2 || fields[0].starts_with(b"#") {
            continue;
        }
        out.extend_from_slice(&fields.join(&b'\t'));
        out.push(b'\n');
    }
    out
}

/// grub.cfg without its `password` and `password_pbkdf2` lines.
fn reduce_grub_cfg(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for line in text.split_inclusive(|b| *b == b'\n') {
        let first = line
            .split(|b| b.is_ascii_whitespace())
            .find(|w| !w.is_empty())
            .unwrap_or_default();
        if first.starts_with(b"password") {
            out.extend_from_slice(b"# (a password line left out by vfio-early debug-dump)\n");
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

/// A PE image holding one section, `.cmdline`, with `cmdline`: what nextboot reads of a
/// UKI, without its kernel and initrd.
fn uki_stub(cmdline: &[u8]) -> Vec<u8> {
    const PE: usize = 0x40;
    const TABLE: usize = PE + 24;
    const DATA: usize = TABLE + 40;
    let len = u32::try_from(cmdline.len()).unwrap_or(u32::MAX);
    let mut out = vec![0u8; DATA];
    out[..2].copy_from_slice(b"MZ");
    out[0x3c..0x40].copy_from_slice(&(PE as u32).to_le_bytes());
    out[PE..PE + 4].copy_from_slice(b"PE\0\0");
    // Machine x86-64, one section, no optional header.
    out[PE + 4..PE + 6].copy_from_slice(&0x8664u16.to_le_bytes());
    out[PE + 6..PE + 8].copy_from_slice(&1u16.to_le_bytes());
    out[TABLE..TABLE + 8].copy_from_slice(b".cmdline");
    out[TABLE + 8..TABLE + 12].copy_from_slice(&len.to_le_bytes());
    out[TABLE + 16..TABLE + 20].copy_from_slice(&len.to_le_bytes());
    out[TABLE + 20..TABLE + 24].copy_from_slice(&(DATA as u32).to_le_bytes());
    out.extend_from_slice(cmdline);
    out
}

fn collect(root: &Root, config: &Path) -> Collection {
    let mut c = Collection::default();
    collect_pci(root, &mut c);
    for f in [paths::PROC_CMDLINE, paths::PROC_OSRELEASE] {
        c.add_file(root, Path::new(f));
    }
    if let Ok(cpuinfo) = root.read_to_string(paths::PROC_CPUINFO) {
        // The vendor line only: the rest is noise and could identify the machine.
        if let Some(line) = cpuinfo.lines().find(|l| l.starts_with("vendor_id")) {
            c.add(
                PathBuf::from(paths::PROC_CPUINFO),
                Item::File(format!("{line}\n").into_bytes()),
            );
        }
    }
    collect_system_disks(root, &mut c);
    collect_network(root, &mut c);
    collect_boot(root, &mut c);
    collect_owned(root, &mut c);
    if let Ok(data) = fs::read(config) {
        c.add(PathBuf::from(paths::CONFIG), Item::File(data));
    }
    c
}

fn collect_pci(root: &Root, c: &mut Collection) {
    let devices = Path::new(paths::PCI_DEVICES);
    let mut drivers = BTreeSet::new();
    for name in c.names(root, devices) {
        let link = devices.join(&name);
        let Some(target) = c.add_link(root, &link) else {
            continue;
        };
        let Some(real) = link.parent().map(|p| normalize(&p.join(target))) else {
            continue;
        };
        c.add(real.clone(), Item::Dir);
        for attr in DEVICE_ATTRS {
            c.add_file(root, &real.join(attr));
        }
        for l in DEVICE_LINKS {
            c.add_link(root, &real.join(l));
        }
        if let Some(d) = root.link_name(real.join("driver")) {
            drivers.insert(d);
        }
    }
    let driver_dir = Path::new(paths::PCI_DRIVERS);
    for name in c.names(root, driver_dir).into_iter().chain(drivers) {
        // Write-only attributes, recorded empty so a fixture can be bound against.
        for attr in ["bind", "unbind", "new_id"] {
            c.add(driver_dir.join(&name).join(attr), Item::File(Vec::new()));
        }
    }
    c.add(
        PathBuf::from(paths::PCI_DRIVERS_PROBE),
        Item::File(Vec::new()),
    );
    let groups = Path::new(paths::IOMMU_GROUPS);
    for g in c.names(root, groups) {
        c.add(groups.join(&g), Item::Dir);
        c.add_links_in(root, &groups.join(&g).join("devices"));
    }
    c.add_links_in(root, Path::new(paths::IOMMU_CLASS));
}

/// What [`crate::sysdisk`] reads: the mount table, swaps and fstab, the `/dev` links
/// their sources name, and every block device with the stack beneath it.
fn collect_system_disks(root: &Root, c: &mut Collection) {
    let mut sources: Vec<PathBuf> = Vec::new();
    // sysdisk reads /proc/mounts only when mountinfo cannot be read.
    if let Some(t) = add_table(c, root, paths::PROC_MOUNTINFO) {
        let m = sysdisk::parse_mountinfo(&t);
        sources.extend(m.mounts.iter().filter_map(|m| dev_path(&m.source)));
    } else if let Some(t) = add_table(c, root, paths::PROC_MOUNTS) {
        let m = sysdisk::parse_mounts(&t);
        sources.extend(m.mounts.iter().filter_map(|m| dev_path(&m.source)));
    }
    if let Some(t) = add_table(c, root, paths::PROC_SWAPS) {
        sources.extend(
            sysdisk::parse_swaps(&t)
                .iter()
                .filter_map(|s| dev_path(&s.path)),
        );
    }
    if let Some(fstab) = root
        .read_bytes(paths::ETC_FSTAB, MAX_TEXT)
        .ok()
        .map(|t| reduce_fstab(&t))
    {
        for line in fstab
            .split(|b| *b == b'\n')
            .filter(|l| !l.starts_with(b"#"))
        {
            if let Some(spec) = line.split(|b| *b == b'\t').next() {
                sources.extend(fstab_dev_path(&sysdisk::unescape(spec)));
            }
        }
        c.add(PathBuf::from(paths::ETC_FSTAB), Item::File(fstab));
    }
    sources.sort();
    sources.dedup();
    sources.truncate(MAX_NAMES);
    // udev's links (mapper, disk/by-*, VG/LV, md/NAME) down to the kernel's node; the
    // node itself is not stored: sysdisk finds the device by its name then.
    for s in &sources {
        c.follow(root, s);
    }

    let mut queue: Vec<(PathBuf, usize)> = Vec::new();
    for base in [paths::SYS_DEV_BLOCK, paths::SYS_CLASS_BLOCK] {
        let base = Path::new(base);
        for name in c.names(root, base) {
            queue.extend(c.follow(root, &base.join(name)).map(|d| (d, 0)));
        }
    }
    let btrfs = Path::new(paths::SYS_FS_BTRFS);
    for fsid in c.names(root, btrfs) {
        let devices = btrfs.join(fsid).join("devices");
        c.add_dir_if_present(root, &devices);
        for name in c.names(root, &devices) {
            queue.extend(c.follow(root, &devices.join(name)).map(|d| (d, 0)));
        }
    }
    let mut seen = BTreeSet::new();
    while let Some((dir, depth)) = queue.pop() {
        if depth > MAX_DEPTH || seen.contains(&dir) {
            continue;
        }
        if seen.len() >= MAX_BLOCK_DEVICES {
            c.notes.push(format!(
                "more than {MAX_BLOCK_DEVICES} block devices: the rest were left out"
            ));
            break;
        }
        seen.insert(dir.clone());
        collect_block_device(root, c, &dir, depth, &mut queue);
    }
}

/// One block device: what sysdisk reads of it, and the devices it leads to.
fn collect_block_device(
    root: &Root,
    c: &mut Collection,
    dir: &Path,
    depth: usize,
    queue: &mut Vec<(PathBuf, usize)>,
) {
    c.add_dir_if_present(root, dir);
    for attr in BLOCK_ATTRS {
        c.add_file(root, &dir.join(attr));
    }
    let slaves = dir.join("slaves");
    // An empty `slaves/` is kept: it is what tells a disk from a stacked device.
    c.add_dir_if_present(root, &slaves);
    for s in c.names(root, &slaves) {
        queue.extend(c.follow(root, &slaves.join(s)).map(|d| (d, depth + 1)));
    }
    if root.exists(dir.join("partition")) {
        // A partition of a virtual disk (md0p1) leads to its disk, the parent directory.
        if let Some(disk) = dir.parent() {
            queue.push((disk.to_path_buf(), depth + 1));
        }
    }
    // Native NVMe multipath: the subsystem links to each controller that reaches it.
    let comps: Vec<&std::ffi::OsStr> = dir.components().map(|c| c.as_os_str()).collect();
    if let Some(i) = comps
        .iter()
        .position(|c| c.to_str().is_some_and(|c| numbered(c, "nvme-subsys")))
    {
        let subsys: PathBuf = comps[..=i].iter().collect();
        for n in c.names(root, &subsys) {
            if numbered(&n, "nvme") {
                c.follow(root, &subsys.join(n));
            }
        }
    }
}

/// Network interfaces (which NIC carries a network root) and iSCSI hosts (which
/// interface a session is bound to).
fn collect_network(root: &Root, c: &mut Collection) {
    let net = Path::new(paths::SYS_CLASS_NET);
    for name in c.names(root, net) {
        let Some(dir) = c.follow(root, &net.join(name)) else {
            continue;
        };
        // A bond's or VLAN's lower devices, a bridge's ports.
        for n in c.names(root, &dir) {
            if n.starts_with("lower_") {
                c.follow(root, &dir.join(n));
            }
        }
        let brif = dir.join("brif");
        for n in c.names(root, &brif) {
            c.follow(root, &brif.join(n));
        }
    }
    let hosts = Path::new(paths::SYS_CLASS_ISCSI_HOST);
    for name in c.names(root, hosts) {
        if let Some(dir) = c.follow(root, &hosts.join(name)) {
            c.add_file(root, &dir.join("netdev"));
        }
    }
}

/// What the bootloader detection and the next boot's command line read.
fn collect_boot(root: &Root, c: &mut Collection) {
    for f in PRESENCE_FILES {
        c.add_marker(root, Path::new(f));
    }
    for f in TEXT_FILES {
        c.add_bounded(root, Path::new(f), MAX_TEXT);
    }
    if let Ok(cfg) = root.read_bytes(paths::GRUB_CFG, MAX_TEXT) {
        c.add(
            PathBuf::from(paths::GRUB_CFG),
            Item::File(reduce_grub_cfg(&cfg)),
        );
    }
    c.add_dir_if_present(root, Path::new(paths::SYS_FIRMWARE_EFI));
    let efivars = Path::new(paths::EFIVARS);
    for n in c.names(root, efivars) {
        if n.starts_with(LOADER_INFO_PREFIX) {
            // Whether systemd-boot started this boot; its value is never read.
            c.add(efivars.join(n), Item::File(Vec::new()));
        }
    }
    for esp in paths::ESP_MOUNTS {
        let esp = Path::new(esp);
        let sd = esp.join("EFI/systemd");
        for n in c.names(root, &sd) {
            if n.starts_with("systemd-boot") {
                c.add(sd.join(n), Item::File(Vec::new()));
            }
        }
        c.add_marker(root, &esp.join("EFI/proxmox/grubx64.efi"));
        c.add_bounded(root, &esp.join("loader/loader.conf"), MAX_ATTR);
        let entries = esp.join("loader/entries");
        c.add_dir_if_present(root, &entries);
        for n in c.names_where(root, &entries, MAX_BOOT_FILES, |n| n.ends_with(".conf")) {
            c.add_bounded(root, &entries.join(n), MAX_ATTR);
        }
        let linux = esp.join("EFI/Linux");
        c.add_dir_if_present(root, &linux);
        for n in c.names_where(root, &linux, MAX_BOOT_FILES, |n| n.ends_with(".efi")) {
            let rel = linux.join(n);
            // Unreadable or without a `.cmdline`: an empty file reads the same.
            let cmdline = root
                .open(&rel)
                .ok()
                .and_then(|mut f| crate::nextboot::pe_section(&mut f, b".cmdline").ok())
                .flatten();
            let data = cmdline.map(|cmd| uki_stub(&cmd)).unwrap_or_default();
            c.add(rel, Item::File(data));
        }
    }
}

/// The files `apply` owns, the directories they would go to, and vfio-early's state.
fn collect_owned(root: &Root, c: &mut Collection) {
    for rel in crate::host::OWNED_FILES {
        let rel = Path::new(rel);
        for d in rel
            .ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty())
        {
            c.add_dir_if_present(root, d);
        }
        c.add_bounded(root, rel, MAX_TEXT);
    }
    let state = Path::new(paths::STATE_DIR);
    c.add_dir_if_present(root, state);
    for n in c.names_where(root, state, MAX_BOOT_FILES, |_| true) {
        let rel = state.join(n);
        if root.symlink_metadata(&rel).is_ok_and(|m| m.is_file()) {
            c.add_bounded(root, &rel, MAX_TEXT);
        }
    }
}

/// `vfio-early debug-dump -o FILE`.
pub fn run(root: &Root, config: &Path, output: &Path) -> anyhow::Result<crate::outcome::Outcome> {
    let written = write_dump(root, config, output)?;
    for note in &written.notes {
        crate::errln!("vfio-early: note: {note}");
    }
    crate::errln!(
        "vfio-early: wrote {} ({} entries); attach it to your bug report",
        output.display(),
        written.entries
    );
    Ok(crate::outcome::Outcome::Ok)
}

/// What [`write_dump`] wrote.
#[derive(Debug)]
pub struct Written {
    pub entries: usize,
    /// What a bound cut or left out, one line each.
    pub notes: Vec<String>,
}

/// Writes the archive.
pub fn write_dump(root: &Root, config: &Path, output: &Path) -> anyhow::Result<Written> {
    let c = collect(root, config);
    let mut buf = Vec::new();
    {
        let mut gz = flate2::write::GzEncoder::new(&mut buf, flate2::Compression::default());
        for (ino, (path, item)) in (1u32..).zip(&c.items) {
            let name = path.to_string_lossy();
            let b = Builder::new(&name).ino(ino).nlink(1);
            let (b, data): (Builder, Vec<u8>) = match item {
                Item::Dir => (
                    b.mode(0o755).set_mode_file_type(ModeFileType::Directory),
                    Vec::new(),
                ),
                Item::File(d) => (
                    b.mode(0o644).set_mode_file_type(ModeFileType::Regular),
                    d.clone(),
                ),
                Item::Link(t) => (
                    b.mode(0o777).set_mode_file_type(ModeFileType::Symlink),
                    t.to_string_lossy().into_owned().into_bytes(),
                ),
            };
            let len = u32::try_from(data.len()).context("an entry is too large for cpio")?;
            let mut w = b.write(&mut gz, len);
            w.write_all(&data)?;
            w.finish()?;
        }
        cpio::newc::trailer(&mut gz)?;
        gz.finish()?;
    }
    // Written atomically beside its final name: a half-written dump is never left.
    let out_dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .context("the output path has no file name")?;
    Root::new(out_dir)
        .write_atomic(name, &buf)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(Written {
        entries: c.items.len(),
        notes: c.notes,
    })
}

/// Unpacks a dump into `dir`, giving a tree usable with `--root`. Entry names that are
/// absolute or climb with `..`, entries that would be written through a symlink, and
/// entries larger than any dump holds are refused.
pub fn unpack(archive: impl Read, dir: &Path) -> io::Result<usize> {
    let mut r = flate2::read::GzDecoder::new(archive);
    let mut count = 0;
    loop {
        let reader = cpio::NewcReader::new(r)?;
        if reader.entry().is_trailer() {
            return Ok(count);
        }
        let name = reader.entry().name().to_string();
        let mode = reader.entry().mode();
        let rel = Path::new(&name);
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(invalid(format!("unsafe entry name in dump: {name}")));
        }
        if u64::from(reader.entry().file_size()) > MAX_TABLE {
            return Err(invalid(format!("entry too large in dump: {name}")));
        }
        refuse_symlink_on_the_way(dir, rel)?;
        let dest = dir.join(rel);
        let mut reader = reader;
        let mut data = Vec::new();
        reader.read_to_end(&mut data)?;
        match mode & 0o170000 {
            0o040000 => fs::create_dir_all(&dest)?,
            0o120000 => {
                if let Some(p) = dest.parent() {
                    fs::create_dir_all(p)?;
                }
                let target = String::from_utf8_lossy(&data).into_owned();
                std::os::unix::fs::symlink(target, &dest)?;
            }
            _ => {
                if let Some(p) = dest.parent() {
                    fs::create_dir_all(p)?;
                }
                fs::write(&dest, &data)?;
            }
        }
        count += 1;
        r = reader.finish()?;
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// An entry at `rel` must not reach through a symlink already unpacked (an earlier entry
/// of a hostile archive), nor land on one: either would write outside `dir`.
fn refuse_symlink_on_the_way(dir: &Path, rel: &Path) -> io::Result<()> {
    let mut cur = dir.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(invalid(format!(
                    "dump entry {} would be written through the symlink {}",
                    rel.display(),
                    cur.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_keeps_spec_mount_point_and_type_only() {
        let got = reduce_fstab(
            b"# comment\nUUID=ab / ext4 defaults 0 1\n\n//h/s /mnt/s cifs password=x 0 0\nbroken\n",
        );
        assert_eq!(
            String::from_utf8_lossy(&got),
            "# vfio-early debug-dump: spec, mount point and type only; options left out\n\
             UUID=ab\t/\text4\n//h/s\t/mnt/s\tcifs\n"
        );
    }

    #[test]
    fn grub_cfg_loses_its_password_lines_only() {
        let got = reduce_grub_cfg(
            b"set superusers=root\n\tpassword_pbkdf2 root grub.pbkdf2.x\npassword u p\nlinux /v a\n",
        );
        assert_eq!(
            String::from_utf8_lossy(&got),
            "set superusers=root\n\
             # (a password line left out by vfio-early debug-dump)\n\
             # (a password line left out by vfio-early debug-dump)\n\
             linux /v a\n"
        );
    }

    #[test]
    fn a_long_table_keeps_whole_lines_only() {
        let mut t = b"1 a\n2 b\n3 c\n".to_vec();
        assert!(!keep_whole_lines(&mut t, 12));
        assert!(keep_whole_lines(&mut t, 10));
        assert_eq!(t, b"1 a\n2 b\n");
    }

    #[test]
    fn a_long_listing_is_cut_and_noted() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in ["a.conf", "b.conf", "c.conf", "d.txt"] {
            fs::write(dir.path().join(n), "").expect("write");
        }
        let mut c = Collection::default();
        let root = Root::new(dir.path());
        let got = c.names_where(&root, Path::new(""), 2, |n| n.ends_with(".conf"));
        assert_eq!(got, vec!["a.conf", "b.conf"]);
        assert_eq!(
            c.notes,
            vec!["/ has more than 2 entries: the rest were left out"]
        );
        assert_eq!(
            c.names_where(&root, Path::new(""), 3, |n| n.ends_with(".conf"))
                .len(),
            3
        );
        assert_eq!(c.notes.len(), 1);
    }

    #[test]
    fn a_uki_stub_reads_back_its_cmdline() {
        let stub = uki_stub(b"root=UUID=x intel_iommu=on\0");
        let got =
            crate::nextboot::pe_section(&mut io::Cursor::new(&stub), b".cmdline").expect("read");
        assert_eq!(got.as_deref(), Some(&b"root=UUID=x intel_iommu=on\0"[..]));
        let none = crate::nextboot::pe_section(&mut io::Cursor::new(&stub), b".linux");
        assert_eq!(none.expect("read"), None);
    }

    #[test]
    fn nothing_is_collected_beneath_a_link() {
        let mut c = Collection::default();
        c.add("a/b".into(), Item::Link("../x".into()));
        c.add("a/b/c".into(), Item::File(b"through the link".to_vec()));
        c.add("a/b".into(), Item::Dir);
        assert!(matches!(c.items.get(Path::new("a/b")), Some(Item::Link(_))));
        assert!(!c.items.contains_key(Path::new("a/b/c")));
        assert!(matches!(c.items.get(Path::new("a")), Some(Item::Dir)));
    }

    #[test]
    fn a_link_loop_is_followed_a_bounded_number_of_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("b", dir.path().join("a")).expect("link");
        std::os::unix::fs::symlink("a", dir.path().join("b")).expect("link");
        let mut c = Collection::default();
        assert_eq!(c.follow(&Root::new(dir.path()), Path::new("a")), None);
        assert_eq!(c.items.len(), 2);
    }

    /// A gzip-compressed newc archive of `(name, mode, data)` entries.
    fn archive(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut gz = flate2::write::GzEncoder::new(&mut buf, flate2::Compression::default());
        for (ino, (name, mode, data)) in (1u32..).zip(entries) {
            let mut w = Builder::new(name)
                .ino(ino)
                .mode(*mode)
                .write(&mut gz, data.len() as u32);
            w.write_all(data).expect("write");
            w.finish().expect("finish");
        }
        cpio::newc::trailer(&mut gz).expect("trailer");
        gz.finish().expect("gzip");
        buf
    }

    #[test]
    fn unpacking_never_writes_through_a_link() {
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().to_str().expect("utf-8").as_bytes();
        for second in ["a/planted", "a"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let bytes = archive(&[
                ("a", 0o120777, target),
                (second, 0o100644, b"written outside"),
            ]);
            let err = unpack(&bytes[..], dir.path()).expect_err(second);
            assert!(err.to_string().contains("through the symlink"), "{err}");
            assert!(!outside.path().join("planted").exists());
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = archive(&[("../x", 0o100644, b"x")]);
        let err = unpack(&bytes[..], dir.path()).expect_err("climbs");
        assert!(err.to_string().contains("unsafe entry name"), "{err}");
    }
}
