//! Which PCI devices hold the running system: the devices behind `/`, `/boot`,
//! `/boot/efi`, `/usr`, `/var` and every active swap, traced through partitions,
//! device-mapper (LVM, LUKS/dm-crypt), md RAID, bcache, NVMe multipath, loop devices,
//! multi-device btrfs, ZFS pools and network roots (NFS, CIFS, iSCSI, nbd).
//!
//! Discovery only: [`crate::plan`] decides what follows. Everything is read through the
//! [`Root`]; the one host command, `zpool status`, runs only when the root is `/`, behind
//! the [`Zpool`] seam. What cannot be traced becomes a reason in
//! [`SystemDisks::unknown`], never a silent gap: "could not read the mount table" is
//! never "no system disks". The mount table and the swap list are read as bytes, since
//! mount points need not be UTF-8.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::paths;
use crate::pci::{Device, PciAddress};
use crate::root::Root;

/// Mount points whose backing devices must never be taken from the host.
pub const SYSTEM_MOUNTS: &[&str] = &["/", "/boot", "/boot/efi", "/usr", "/var"];

/// The "mount point" recorded for a device that holds an active swap area.
pub const SWAP: &str = "swap";

/// Filesystems that live in memory: no device holds them (the initramfs root, a tmpfs).
const MEMORY_FS: &[&str] = &["rootfs", "tmpfs", "ramfs"];

/// Filesystems reached over the network: a NIC carries them.
const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "fuse.glusterfs",
    "fuse.sshfs",
    "afs",
];

/// Stacked block devices deeper than this are reported, not followed (loops guard).
const MAX_DEPTH: usize = 16;

/// The most of a mount table, swap list or fstab read (a real one is a few KiB).
const TABLE_MAX: u64 = 16 << 20;

/// How long `zpool status` may take before it is killed and the pool is unknown.
const ZPOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// A PCI device that holds a system mount or swap, and how that was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SystemDisk {
    pub address: PciAddress,
    /// `/`, `/boot`, `/boot/efi`, `/usr`, `/var`, or [`SWAP`].
    pub mount_point: String,
    /// The path from the mount to the device, e.g. `ext4 on dm-0 (vg0-root) > nvme0n1p3`.
    pub how: String,
}

/// Which PCI devices hold the system, and what could not be traced.
///
/// Deliberately without `Default`: an empty answer must come from reading the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SystemDisks {
    pub known: Vec<SystemDisk>,
    /// Why the known list may be incomplete, one reason each, e.g. "cannot tell which
    /// device holds / (zfs pool rpool)". Empty when every system mount was traced.
    pub unknown: Vec<String>,
}

impl SystemDisks {
    /// The system mounts and swap that the device at `address` holds.
    pub fn held_by(&self, address: PciAddress) -> impl Iterator<Item = &SystemDisk> {
        self.known.iter().filter(move |d| d.address == address)
    }
}

/// Where the vdevs of a ZFS pool come from: `zpool status` on the host, text in tests.
pub trait Zpool {
    /// The output of `zpool status -P -L <pool>`, or why it could not be had.
    fn status(&self, pool: &str) -> Result<String, String>;
}

/// Runs `zpool status -P -L` on the host, with a time limit.
pub struct HostZpool;

impl Zpool for HostZpool {
    fn status(&self, pool: &str) -> Result<String, String> {
        if pool.is_empty() || pool.starts_with('-') {
            return Err(format!("`{pool}` is not a pool name"));
        }
        crate::command::run(
            Command::new("zpool").args(["status", "-P", "-L", pool]),
            ZPOOL_TIMEOUT,
            crate::command::Output::Capture,
        )
    }
}

/// Finds the system's devices on this root; `zpool status` runs only on the host.
pub fn discover(root: &Root, devices: &[Device]) -> SystemDisks {
    let host = HostZpool;
    let zpool: Option<&dyn Zpool> = if root.is_host() { Some(&host) } else { None };
    find_system_disks(root, devices, zpool)
}

/// Finds the system's devices; `zpool` is asked about ZFS pools when given (without it,
/// a ZFS system mount is unknown: a fake tree or a chroot cannot ask the host's pools).
pub fn find_system_disks(
    root: &Root,
    devices: &[Device],
    zpool: Option<&dyn Zpool>,
) -> SystemDisks {
    let mut out = SystemDisks {
        known: Vec::new(),
        unknown: Vec::new(),
    };
    let (mounts, table) = match read_mount_table(root) {
        Ok(m) => m,
        Err(reason) => {
            out.unknown.push(reason);
            // Swaps are still worth reading: what is known is still refused by name.
            let f = Finder {
                root,
                devices,
                zpool,
                mounts: Vec::new(),
            };
            f.trace_swaps(false, &mut out);
            return out;
        }
    };
    let f = Finder {
        root,
        devices,
        zpool,
        mounts: mounts.mounts,
    };
    if mounts.bad_lines > 0 {
        out.unknown.push(format!(
            "cannot parse {} line(s) of the mount table ({})",
            mounts.bad_lines,
            table.display()
        ));
    }
    for label in SYSTEM_MOUNTS {
        let entries: Vec<&Mount> = f
            .mounts
            .iter()
            .filter(|m| m.mount_point == label.as_bytes())
            .collect();
        let mut t = Trace::default();
        if entries.is_empty() && *label == "/" {
            t.missing.push(format!(
                "/ is not in the mount table {}: a chroot?",
                table.display()
            ));
        }
        let real: Vec<&Mount> = entries
            .iter()
            .copied()
            .filter(|m| m.fstype != "autofs")
            .collect();
        if real.is_empty() && !entries.is_empty() {
            // An automount not triggered yet: the device is the one /etc/fstab names.
            f.trace_fstab(label, &mut t);
        }
        for m in real {
            f.trace_mount(m, "", &mut t, 0);
        }
        t.record(label, &mut out);
    }
    f.trace_swaps(true, &mut out);
    out
}

/// One mount: mount point and source as bytes (the kernel's octal escapes undone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: Vec<u8>,
    /// `major:minor` from mountinfo (absent in `/proc/mounts`).
    pub dev: Option<(u32, u32)>,
    pub fstype: String,
    pub source: Vec<u8>,
}

/// Parsed mount table lines, and how many lines could not be parsed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    pub mounts: Vec<Mount>,
    pub bad_lines: usize,
}

/// Reads `proc/self/mountinfo`, or `proc/mounts` when that is missing.
fn read_mount_table(root: &Root) -> Result<(Mounts, PathBuf), String> {
    let info = root.path(paths::PROC_MOUNTINFO);
    match root.read_bytes(paths::PROC_MOUNTINFO, TABLE_MAX) {
        Ok(bytes) => Ok((parse_mountinfo(&bytes), info)),
        Err(first) => {
            let mounts = root.path(paths::PROC_MOUNTS);
            match root.read_bytes(paths::PROC_MOUNTS, TABLE_MAX) {
                Ok(bytes) => Ok((parse_mounts(&bytes), mounts)),
                Err(_) => Err(format!(
                    "cannot read the mount table ({}: {first})",
                    info.display()
                )),
            }
        }
    }
}

/// Parses `/proc/self/mountinfo`: `id parent major:minor root mount-point options
/// [optional fields] - fstype source super-options`.
pub fn parse_mountinfo(bytes: &[u8]) -> Mounts {
    let mut out = Mounts::default();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match parse_mountinfo_line(line) {
            Some(m) => out.mounts.push(m),
            None => out.bad_lines += 1,
        }
    }
    out
}

fn parse_mountinfo_line(line: &[u8]) -> Option<Mount> {
    let mut fields = line.split(|b| *b == b' ');
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let majmin = std::str::from_utf8(fields.next()?).ok()?;
    let (major, minor) = majmin.split_once(':')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    let _root = fields.next()?;
    let mount_point = unescape(fields.next()?);
    let mut rest = fields.skip_while(|f| *f != b"-");
    rest.next()?;
    let fstype = String::from_utf8_lossy(rest.next()?).into_owned();
    let source = unescape(rest.next()?);
    Some(Mount {
        mount_point,
        dev: Some(dev),
        fstype,
        source,
    })
}

/// Parses `/proc/mounts` (fstab format): `source mount-point fstype options 0 0`.
pub fn parse_mounts(bytes: &[u8]) -> Mounts {
    let mut out = Mounts::default();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let mut f = line.split(|b| *b == b' ').filter(|x| !x.is_empty());
        match (f.next(), f.next(), f.next()) {
            (Some(src), Some(mp), Some(fstype)) => out.mounts.push(Mount {
                mount_point: unescape(mp),
                dev: None,
                fstype: String::from_utf8_lossy(fstype).into_owned(),
                source: unescape(src),
            }),
            _ => out.bad_lines += 1,
        }
    }
    out
}

/// One active swap area from `/proc/swaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    pub path: Vec<u8>,
    /// A swap file (on some filesystem) rather than a partition or block device.
    pub is_file: bool,
}

/// Parses `/proc/swaps`: a header line, then `path type size used priority`.
pub fn parse_swaps(bytes: &[u8]) -> Vec<Swap> {
    bytes
        .split(|b| *b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let mut f = line
                .split(|b| *b == b' ' || *b == b'\t')
                .filter(|x| !x.is_empty());
            let path = unescape(f.next()?);
            let kind = f.next().unwrap_or_default();
            Some(Swap {
                path,
                is_file: kind == b"file",
            })
        })
        .collect()
}

/// The kernel escapes space, tab, newline and backslash in paths as `\NNN` (octal).
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            if let Some(oct) = field.get(i + 1..i + 4) {
                if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                    let v = oct
                        .iter()
                        .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                    if let Ok(byte) = u8::try_from(v) {
                        out.push(byte);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// The device paths `zpool status -P` lists under `config:` (every leaf vdev, including
/// log, cache, special and spare devices).
pub fn parse_zpool_status(text: &str) -> Vec<String> {
    let mut in_config = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed == "config:" {
            in_config = true;
            continue;
        }
        if in_config && !line.starts_with([' ', '\t']) && !trimmed.is_empty() {
            // `errors:` or another section: the config is over.
            in_config = false;
        }
        if !in_config {
            continue;
        }
        if let Some(first) = trimmed.split_whitespace().next() {
            if first.starts_with('/') {
                out.push(first.to_string());
            }
        }
    }
    out
}

/// What one trace found: devices with how, and what it could not follow.
#[derive(Default)]
struct Trace {
    found: Vec<(PciAddress, String)>,
    missing: Vec<String>,
}

impl Trace {
    fn record(self, label: &str, out: &mut SystemDisks) {
        for (address, how) in self.found {
            let dup = out
                .known
                .iter()
                .any(|d| d.address == address && d.mount_point == label);
            if !dup {
                out.known.push(SystemDisk {
                    address,
                    mount_point: label.to_string(),
                    how,
                });
            }
        }
        for m in self.missing {
            let reason = format!("cannot tell which device holds {label} ({m})");
            if !out.unknown.contains(&reason) {
                out.unknown.push(reason);
            }
        }
    }
}

struct Finder<'a> {
    root: &'a Root,
    devices: &'a [Device],
    zpool: Option<&'a dyn Zpool>,
    mounts: Vec<Mount>,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Undoes `..` lexically; the result is relative to the root and never climbs out.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// The PCI function nearest the end of a sysfs path: the controller closest to the disk.
fn last_pci(p: &Path) -> Option<PciAddress> {
    p.components()
        .filter_map(|c| c.as_os_str().to_str()?.parse::<PciAddress>().ok())
        .next_back()
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `prefix` followed by digits only (`zram0`, `ram1`).
fn numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Finder<'_> {
    /// Follows symlinks inside the root (a sysfs link, a `/dev/disk/by-*` link) to the path
    /// they name, relative to the root; a path that is no link is returned as it is. The
    /// end need not exist: sysfs link targets carry the device path in their text (and a
    /// `debug-dump` tree keeps the links without every directory they point into).
    fn resolve(&self, rel: &Path) -> Option<PathBuf> {
        let mut cur = normalize(rel);
        self.root.symlink_metadata(&cur).ok()?;
        for _ in 0..8 {
            let Ok(target) = self.root.read_link(&cur) else {
                return Some(cur);
            };
            let joined = if target.is_absolute() {
                target
            } else {
                cur.parent()?.join(target)
            };
            cur = normalize(&joined);
        }
        None
    }

    /// Entry names of a directory under the root, sorted; errors as they are.
    fn names(&self, rel: &Path) -> io::Result<Vec<String>> {
        self.root.read_dir_names(rel)
    }

    /// A block device's name for people: `dm-0 (vg0-root)`, `md0 (raid1)`, `sda2`.
    fn label(&self, dir: &Path) -> String {
        let name = name_of(dir);
        if let Ok(dm) = self.root.read_attr(dir.join("dm/name")) {
            return format!("{name} ({dm})");
        }
        if let Ok(level) = self.root.read_attr(dir.join("md/level")) {
            return format!("{name} ({level})");
        }
        name
    }

    /// A mounted filesystem: which devices hold it.
    fn trace_mount(&self, m: &Mount, prefix: &str, t: &mut Trace, depth: usize) {
        let fstype = m.fstype.as_str();
        let source = lossy(&m.source);
        if MEMORY_FS.contains(&fstype) {
            return;
        }
        if fstype == "zfs" {
            let pool = source.split('/').next().unwrap_or_default();
            self.trace_zfs(pool, prefix, t, depth);
            return;
        }
        if NETWORK_FS.contains(&fstype) {
            self.trace_network(&format!("{prefix}{fstype} from {source}"), t);
            return;
        }
        let what = format!("{prefix}{fstype} on ");
        let by_number = m.dev.filter(|(major, _)| *major != 0).and_then(|(a, b)| {
            self.resolve(&Path::new(paths::SYS_DEV_BLOCK).join(format!("{a}:{b}")))
        });
        let dir = by_number.or_else(|| self.block_dir_for_source(&m.source));
        if fstype == "btrfs" {
            self.trace_btrfs(dir, &what, &source, t, depth);
            return;
        }
        match dir {
            Some(dir) => {
                let trail = format!("{what}{}", self.label(&dir));
                self.walk_block(&dir, trail, t, depth);
            }
            None => t.missing.push(format!(
                "{what}{source}: no block device for it in {}",
                paths::SYS_DEV_BLOCK
            )),
        }
    }

    /// The sysfs directory of the block device a source names: `/dev/nvme0n1p2`,
    /// `/dev/mapper/vg-root`, `/dev/VG/LV`, `/dev/disk/by-uuid/...`, `/dev/md/NAME`.
    fn block_dir_for_source(&self, source: &[u8]) -> Option<PathBuf> {
        let rel = Path::new(OsStr::from_bytes(source))
            .strip_prefix("/")
            .ok()?;
        if !rel.starts_with(paths::DEV) {
            return None;
        }
        // udev's links (mapper, disk/by-*, VG/LV, md/NAME) end at the kernel's node.
        let node = self.resolve(rel).unwrap_or_else(|| rel.to_path_buf());
        // A real device node gives its number.
        if let Ok(meta) = self.root.metadata(&node) {
            if meta.file_type().is_block_device() {
                let (major, minor) = dev_numbers(meta.rdev());
                let link = Path::new(paths::SYS_DEV_BLOCK).join(format!("{major}:{minor}"));
                if let Some(dir) = self.resolve(&link) {
                    return Some(dir);
                }
            }
        }
        let name = name_of(&node);
        if !name.is_empty() {
            if let Some(dir) = self.resolve(&Path::new(paths::SYS_CLASS_BLOCK).join(&name)) {
                return Some(dir);
            }
        }
        // A device-mapper name: /dev/mapper/NAME, or /dev/VG/LV (`-` doubled in names).
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let dm_name = match parts.as_slice() {
            [_, _, name] if rel.starts_with(paths::DEV_MAPPER) => name.clone(),
            [_, vg, lv] => format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--")),
            _ => return None,
        };
        let class = Path::new(paths::SYS_CLASS_BLOCK);
        for n in self.names(class).ok()? {
            if n.starts_with("dm-")
                && self.root.read_attr(class.join(&n).join("dm/name")).ok() == Some(dm_name.clone())
            {
                return self.resolve(&class.join(n));
            }
        }
        None
    }

    /// Walks a block device down to PCI devices: `slaves/` of stacked devices (dm, md,
    /// bcache), a partition's disk, NVMe multipath controllers, iSCSI sessions, loop
    /// backing files; memory disks hold nothing; the rest is unknown.
    fn walk_block(&self, dir: &Path, trail: String, t: &mut Trace, depth: usize) {
        if depth > MAX_DEPTH {
            t.missing
                .push(format!("{trail}: stacked deeper than {MAX_DEPTH} devices"));
            return;
        }
        let name = name_of(dir);
        match self.names(&dir.join("slaves")) {
            Ok(slaves) if !slaves.is_empty() => {
                for s in slaves {
                    match self.resolve(&dir.join("slaves").join(&s)) {
                        Some(sub) => {
                            let next = format!("{trail} > {}", self.label(&sub));
                            self.walk_block(&sub, next, t, depth + 1);
                        }
                        None => t.missing.push(format!("{trail}: cannot follow slaves/{s}")),
                    }
                }
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                t.missing.push(format!(
                    "{trail}: cannot read {}/slaves: {e}",
                    dir.display()
                ));
                return;
            }
        }
        if let Some(address) = last_pci(dir) {
            t.found.push((address, trail));
            return;
        }
        let comps: Vec<String> = dir
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if let Some(i) = comps.iter().position(|c| numbered(c, "nvme-subsys")) {
            self.trace_nvme_subsystem(&comps[..=i], &trail, t);
            return;
        }
        if let Some(i) = comps.iter().position(|c| numbered(c, "session")) {
            let host = i
                .checked_sub(1)
                .map(|h| comps[h].as_str())
                .unwrap_or_default();
            self.trace_iscsi(host, &comps[i], &trail, t);
            return;
        }
        if self.root.exists(dir.join("partition")) {
            // A partition of a virtual disk (md0p1): the disk is the parent directory.
            if let Some(disk) = dir.parent() {
                let next = format!("{trail} > {}", self.label(disk));
                self.walk_block(disk, next, t, depth + 1);
                return;
            }
        }
        if numbered(&name, "zram") || numbered(&name, "ram") {
            return;
        }
        if numbered(&name, "nbd") {
            self.trace_network(&format!("{trail} (network block device)"), t);
            return;
        }
        if numbered(&name, "loop") {
            self.trace_loop(dir, &trail, t, depth);
            return;
        }
        t.missing.push(format!(
            "{trail}: {} leads to no PCI device and has no slaves",
            dir.display()
        ));
    }

    /// Native NVMe multipath: the namespace hangs off the subsystem (`comps`, its path),
    /// which links to each controller that reaches it.
    fn trace_nvme_subsystem(&self, comps: &[String], trail: &str, t: &mut Trace) {
        let subsys: PathBuf = comps.iter().collect();
        let mut any = false;
        for c in self.names(&subsys).unwrap_or_default() {
            if !numbered(&c, "nvme") {
                continue;
            }
            if let Some(address) = self.resolve(&subsys.join(&c)).as_deref().and_then(last_pci) {
                t.found.push((address, format!("{trail} > {c}")));
                any = true;
            }
        }
        if !any {
            let name = comps.last().map(String::as_str).unwrap_or("");
            t.missing
                .push(format!("{trail}: no controller of {name} found"));
        }
    }

    /// A loop device: the filesystem holding its backing file.
    fn trace_loop(&self, dir: &Path, trail: &str, t: &mut Trace, depth: usize) {
        match self.root.read_attr(dir.join("loop/backing_file")) {
            Ok(file) => {
                let prefix = format!("{trail} backed by {file} on ");
                self.trace_file(file.as_bytes(), &prefix, t, depth + 1);
            }
            Err(e) => t
                .missing
                .push(format!("{trail}: cannot read its backing file: {e}")),
        }
    }

    /// A file (a swap file, a loop device's backing file): the filesystem holding it.
    fn trace_file(&self, path: &[u8], prefix: &str, t: &mut Trace, depth: usize) {
        if depth > MAX_DEPTH {
            t.missing
                .push(format!("{prefix}: stacked deeper than {MAX_DEPTH} devices"));
            return;
        }
        let file = Path::new(OsStr::from_bytes(path));
        let holder = self
            .mounts
            .iter()
            .filter(|m| m.fstype != "autofs")
            .filter(|m| file.starts_with(Path::new(OsStr::from_bytes(&m.mount_point))))
            .max_by_key(|m| m.mount_point.len());
        match holder {
            Some(m) => self.trace_mount(m, prefix, t, depth + 1),
            None => t.missing.push(format!(
                "{prefix}{}: no mounted filesystem holds it",
                lossy(path)
            )),
        }
    }

    /// Every device of a btrfs filesystem, from `sys/fs/btrfs/<fsid>/devices/`.
    fn trace_btrfs(
        &self,
        source_dir: Option<PathBuf>,
        what: &str,
        source: &str,
        t: &mut Trace,
        depth: usize,
    ) {
        let Some(source_dir) = source_dir else {
            t.missing
                .push(format!("{what}{source}: no block device for it in sysfs"));
            return;
        };
        let name = name_of(&source_dir);
        let base = Path::new(paths::SYS_FS_BTRFS);
        let mut devices = BTreeSet::new();
        for fsid in self.names(base).unwrap_or_default() {
            let dir = base.join(&fsid).join("devices");
            let members = self.names(&dir).unwrap_or_default();
            if members.contains(&name) {
                devices.extend(members.into_iter().map(|m| dir.join(m)));
            }
        }
        if devices.is_empty() {
            // Its own device is known; whether it has others is not.
            let trail = format!("{what}{}", self.label(&source_dir));
            self.walk_block(&source_dir, trail, t, depth);
            t.missing.push(format!(
                "{what}{source}: its other devices are not listed under {}",
                paths::SYS_FS_BTRFS
            ));
            return;
        }
        for link in devices {
            match self.resolve(&link) {
                Some(dir) => {
                    let trail = format!("{what}{}", self.label(&dir));
                    self.walk_block(&dir, trail, t, depth + 1);
                }
                None => t
                    .missing
                    .push(format!("{what}{source}: cannot follow {}", link.display())),
            }
        }
    }

    /// A ZFS pool: its vdevs from `zpool status`, when the host can be asked.
    fn trace_zfs(&self, pool: &str, prefix: &str, t: &mut Trace, depth: usize) {
        let Some(zpool) = self.zpool else {
            // ZFS publishes no vdev list in sysfs or proc, and a fake tree or chroot
            // cannot ask the host's pools.
            t.missing.push(format!("{prefix}zfs pool {pool}"));
            return;
        };
        let text = match zpool.status(pool) {
            Ok(text) => text,
            Err(e) => {
                t.missing.push(format!("{prefix}zfs pool {pool}: {e}"));
                return;
            }
        };
        let leaves = parse_zpool_status(&text);
        if leaves.is_empty() {
            t.missing.push(format!(
                "{prefix}zfs pool {pool}: `zpool status` lists no device"
            ));
        }
        for leaf in leaves {
            let what = format!("{prefix}zfs pool {pool} on ");
            match self.block_dir_for_source(leaf.as_bytes()) {
                Some(dir) => {
                    let trail = format!("{what}{}", self.label(&dir));
                    self.walk_block(&dir, trail, t, depth + 1);
                }
                // A file vdev lives on some other filesystem.
                None if !Path::new(&leaf)
                    .strip_prefix("/")
                    .is_ok_and(|r| r.starts_with(paths::DEV)) =>
                {
                    self.trace_file(
                        leaf.as_bytes(),
                        &format!("{what}file {leaf} on "),
                        t,
                        depth + 1,
                    );
                }
                None => t
                    .missing
                    .push(format!("{what}{leaf}: no block device for it in sysfs")),
            }
        }
    }

    /// An iSCSI disk: the NIC its host is bound to, or every network controller.
    fn trace_iscsi(&self, host: &str, session: &str, trail: &str, t: &mut Trace) {
        let netdev = self
            .root
            .read_attr(
                Path::new(paths::SYS_CLASS_ISCSI_HOST)
                    .join(host)
                    .join("netdev"),
            )
            .ok()
            .filter(|n| !matches!(n.as_str(), "" | "(null)" | "<NULL>" | "default"));
        if let Some(nd) = netdev {
            let mut addrs = BTreeSet::new();
            self.netdev_pci(&nd, &mut addrs, 0);
            if !addrs.is_empty() {
                for a in addrs {
                    t.found
                        .push((a, format!("{trail} (iSCSI {session} over {nd})")));
                }
                return;
            }
        }
        self.trace_network(&format!("{trail} (iSCSI {session})"), t);
    }

    /// The PCI devices under a network interface: itself, or the ports of a bond,
    /// VLAN (`lower_*`) or bridge (`brif/*`).
    fn netdev_pci(&self, name: &str, out: &mut BTreeSet<PciAddress>, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let Some(dir) = self.resolve(&Path::new(paths::SYS_CLASS_NET).join(name)) else {
            return;
        };
        if let Some(a) = last_pci(&dir) {
            out.insert(a);
            return;
        }
        let mut lowers: Vec<PathBuf> = self
            .names(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with("lower_"))
            .map(|n| dir.join(n))
            .collect();
        lowers.extend(
            self.names(&dir.join("brif"))
                .unwrap_or_default()
                .into_iter()
                .map(|n| dir.join("brif").join(n)),
        );
        for l in lowers {
            let Some(target) = self.resolve(&l) else {
                continue;
            };
            if let Some(a) = last_pci(&target) {
                out.insert(a);
                continue;
            }
            // A bridge port links to `<port>/brport`; a lower device to `<port>`.
            let port = if target.ends_with("brport") {
                target.parent().map(name_of).unwrap_or_default()
            } else {
                name_of(&target)
            };
            self.netdev_pci(&port, out, depth + 1);
        }
    }

    /// A network root: the route to the server is not knowable offline, so every network
    /// controller (and the PCI parent of every network interface) may carry it.
    fn trace_network(&self, what: &str, t: &mut Trace) {
        let mut candidates: BTreeSet<PciAddress> = self
            .devices
            .iter()
            .filter(|d| d.class.is_some_and(|c| c.base() == 0x02))
            .map(|d| d.address)
            .collect();
        let net = Path::new(paths::SYS_CLASS_NET);
        for n in self.names(net).unwrap_or_default() {
            if let Some(a) = self.resolve(&net.join(n)).as_deref().and_then(last_pci) {
                candidates.insert(a);
            }
        }
        if candidates.is_empty() {
            t.missing.push(format!(
                "{what}: no network controller found that could carry it"
            ));
            return;
        }
        for a in candidates {
            t.found.push((
                a,
                format!("{what}; which network controller carries it cannot be known offline, so each one may"),
            ));
        }
    }

    /// An automount not yet triggered: the device `/etc/fstab` gives for it.
    fn trace_fstab(&self, label: &str, t: &mut Trace) {
        let text = match self.root.read_bytes(paths::ETC_FSTAB, TABLE_MAX) {
            Ok(b) => b,
            Err(e) => {
                t.missing.push(format!(
                    "autofs, not mounted yet; cannot read /{}: {e}",
                    paths::ETC_FSTAB
                ));
                return;
            }
        };
        for line in text.split(|b| *b == b'\n') {
            let mut f = line
                .split(|b| *b == b' ' || *b == b'\t')
                .filter(|x| !x.is_empty());
            let (Some(spec), Some(file)) = (f.next(), f.next()) else {
                continue;
            };
            if spec.starts_with(b"#") || unescape(file) != label.as_bytes() {
                continue;
            }
            let spec = unescape(spec);
            let fstype = f.next().map(lossy).unwrap_or_default();
            let m = Mount {
                mount_point: label.as_bytes().to_vec(),
                dev: None,
                fstype,
                source: fstab_source(&spec),
            };
            self.trace_mount(&m, "automount of ", t, 0);
            return;
        }
        t.missing.push(format!(
            "autofs, not mounted yet, and not in /{}",
            paths::ETC_FSTAB
        ));
    }

    /// Every active swap area, under the mount point [`SWAP`].
    fn trace_swaps(&self, table_ok: bool, out: &mut SystemDisks) {
        let path = self.root.path(paths::PROC_SWAPS);
        let bytes = match self.root.read_bytes(paths::PROC_SWAPS, TABLE_MAX) {
            Ok(b) => b,
            // With /proc readable, no swaps file means a kernel built without swap.
            Err(e) if e.kind() == io::ErrorKind::NotFound && table_ok => return,
            Err(e) => {
                out.unknown.push(format!(
                    "cannot read the active swaps ({}: {e})",
                    path.display()
                ));
                return;
            }
        };
        for swap in parse_swaps(&bytes) {
            let mut t = Trace::default();
            if swap.is_file {
                self.trace_file(
                    &swap.path,
                    &format!("file {} on ", lossy(&swap.path)),
                    &mut t,
                    0,
                );
            } else {
                match self.block_dir_for_source(&swap.path) {
                    Some(dir) => {
                        let trail = format!("partition {}", self.label(&dir));
                        self.walk_block(&dir, trail, &mut t, 0);
                    }
                    None => t.missing.push(format!(
                        "{}: no block device for it in sysfs",
                        lossy(&swap.path)
                    )),
                }
            }
            t.record(SWAP, out);
        }
    }
}

/// `UUID=…`, `PARTUUID=…`, `LABEL=…`, `PARTLABEL=…` as udev's `/dev/disk/by-*` links.
pub fn fstab_source(spec: &[u8]) -> Vec<u8> {
    for (key, dir) in [
        (&b"UUID="[..], "by-uuid"),
        (b"PARTUUID=", "by-partuuid"),
        (b"LABEL=", "by-label"),
        (b"PARTLABEL=", "by-partlabel"),
    ] {
        if let Some(value) = spec.strip_prefix(key) {
            let mut out = format!("/{}/{dir}/", paths::DEV_DISK).into_bytes();
            out.extend_from_slice(value);
            return out;
        }
    }
    spec.to_vec()
}

/// Major and minor numbers of a `dev_t`, as glibc's `gnu_dev_major`/`gnu_dev_minor`.
fn dev_numbers(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn mountinfo_line_parses_with_optional_fields() {
        let l = b"29 1 259:2 / / rw,relatime shared:1 master:2 - ext4 /dev/nvme0n1p2 rw\n";
        let m = parse_mountinfo(l);
        assert_eq!(m.bad_lines, 0);
        assert_eq!(
            m.mounts,
            vec![Mount {
                mount_point: b"/".to_vec(),
                dev: Some((259, 2)),
                fstype: "ext4".into(),
                source: b"/dev/nvme0n1p2".to_vec(),
            }]
        );
    }

    #[test]
    fn mountinfo_is_read_as_bytes_and_counts_bad_lines() {
        let mut text = b"30 1 8:1 / /mnt/\xff\xfe\\040x rw - ext4 /dev/sda1 rw\n".to_vec();
        text.extend_from_slice(b"garbage\n31 1 0:40 / /srv rw - nfs4 h:/x rw\n");
        let m = parse_mountinfo(&text);
        assert_eq!(m.bad_lines, 1);
        assert_eq!(m.mounts[0].mount_point, b"/mnt/\xff\xfe x".to_vec());
        assert_eq!(m.mounts[1].fstype, "nfs4");
    }

    #[test]
    fn proc_mounts_parses() {
        let m = parse_mounts(
            b"rpool/ROOT/pve-1 / zfs rw,xattr 0 0\n/dev/sda1 /boot\\040x ext2 rw 0 0\n",
        );
        assert_eq!(m.mounts.len(), 2);
        assert_eq!(m.mounts[0].source, b"rpool/ROOT/pve-1".to_vec());
        assert_eq!(m.mounts[1].mount_point, b"/boot x".to_vec());
        assert_eq!(m.mounts[1].dev, None);
    }

    #[test]
    fn escapes_decode_and_stray_backslashes_stay() {
        assert_eq!(unescape(b"/mnt/a\\040b"), b"/mnt/a b".to_vec());
        assert_eq!(unescape(b"/x\\"), b"/x\\".to_vec());
        assert_eq!(unescape(b"/x\\9zz"), b"/x\\9zz".to_vec());
        assert_eq!(unescape(b"a\\134b"), b"a\\b".to_vec());
    }

    #[test]
    fn swaps_parse_partitions_and_files() {
        let text = b"Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
/dev/dm-1                               partition\t1000444\t\t0\t\t-2\n\
/swap\\040file                           file\t\t1048572\t\t0\t\t-3\n";
        assert_eq!(
            parse_swaps(text),
            vec![
                Swap {
                    path: b"/dev/dm-1".to_vec(),
                    is_file: false
                },
                Swap {
                    path: b"/swap file".to_vec(),
                    is_file: true
                },
            ]
        );
        assert!(parse_swaps(b"Filename Type Size Used Priority\n").is_empty());
    }

    const ZPOOL_MIRROR: &str = "  pool: rpool
 state: ONLINE
  scan: scrub repaired 0B in 00:01:02 with 0 errors on Sun Jan 14 00:25:03 2024
config:

\tNAME                STATE     READ WRITE CKSUM
\trpool               ONLINE       0     0     0
\t  mirror-0          ONLINE       0     0     0
\t    /dev/nvme0n1p3  ONLINE       0     0     0
\t    /dev/nvme1n1p3  ONLINE       0     0     0
\tlogs
\t  /dev/sdc1         ONLINE       0     0     0

errors: No known data errors
";

    #[test]
    fn zpool_status_leaves_parse() {
        assert_eq!(
            parse_zpool_status(ZPOOL_MIRROR),
            vec!["/dev/nvme0n1p3", "/dev/nvme1n1p3", "/dev/sdc1"]
        );
        assert!(parse_zpool_status("no pools available\n").is_empty());
    }

    #[test]
    fn an_option_is_no_pool_name() {
        assert!(HostZpool.status("-x").is_err());
    }

    #[test]
    fn dev_numbers_split_like_glibc() {
        assert_eq!(dev_numbers((259 << 8) | 2), (259, 2));
        // Large minors spill into the high bits.
        assert_eq!(dev_numbers((8 << 8) | 0x12 | (0x345 << 20)), (8, 0x34512));
    }

    #[test]
    fn fstab_specs_become_udev_links() {
        assert_eq!(
            fstab_source(b"UUID=AB-CD"),
            b"/dev/disk/by-uuid/AB-CD".to_vec()
        );
        assert_eq!(fstab_source(b"/dev/sda1"), b"/dev/sda1".to_vec());
    }

    /// A tree with two NVMe controllers and their namespaces, for the ZFS seam.
    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new() -> Self {
            let t = Tree(tempfile::tempdir().unwrap());
            for (n, addr) in [(0, "0000:02:00.0"), (1, "0000:03:00.0")] {
                let dir =
                    format!("sys/devices/pci0000:00/{addr}/nvme/nvme{n}/nvme{n}n1/nvme{n}n1p3");
                fs::create_dir_all(t.0.path().join(&dir)).unwrap();
                fs::write(t.0.path().join(dir).join("partition"), "3\n").unwrap();
                t.link(
                    &format!("../../devices/pci0000:00/{addr}/nvme/nvme{n}/nvme{n}n1/nvme{n}n1p3"),
                    &format!("sys/class/block/nvme{n}n1p3"),
                );
            }
            t.write(
                "proc/self/mountinfo",
                "29 1 0:25 / / rw - zfs rpool/ROOT/pve-1 rw\n",
            );
            t.write("proc/swaps", "Filename Type Size Used Priority\n");
            t
        }
        fn write(&self, rel: &str, text: &str) {
            let p = self.0.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        fn link(&self, target: &str, rel: &str) {
            let p = self.0.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            symlink(target, p).unwrap();
        }
        fn find(&self, zpool: Option<&dyn Zpool>) -> SystemDisks {
            find_system_disks(&Root::new(self.0.path()), &[], zpool)
        }
    }

    struct FakeZpool(Result<String, String>);
    impl Zpool for FakeZpool {
        fn status(&self, pool: &str) -> Result<String, String> {
            assert_eq!(pool, "rpool");
            self.0.clone()
        }
    }

    #[test]
    fn zfs_vdevs_come_from_zpool_status() {
        let t = Tree::new();
        // udev's by-id link, as `zpool status -P` without -L prints it.
        t.link("../../nvme1n1p3", "dev/disk/by-id/nvme-Samsung_X-part3");
        let text = ZPOOL_MIRROR
            .replace("/dev/nvme1n1p3", "/dev/disk/by-id/nvme-Samsung_X-part3")
            .replace("\t  /dev/sdc1         ONLINE       0     0     0\n", "")
            .replace("\tlogs\n", "");
        let disks = t.find(Some(&FakeZpool(Ok(text))));
        assert_eq!(disks.unknown, Vec::<String>::new());
        let got: Vec<(String, &str, &str)> = disks
            .known
            .iter()
            .map(|d| {
                (
                    d.address.to_string(),
                    d.mount_point.as_str(),
                    d.how.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("0000:02:00.0".into(), "/", "zfs pool rpool on nvme0n1p3"),
                ("0000:03:00.0".into(), "/", "zfs pool rpool on nvme1n1p3"),
            ]
        );
    }

    #[test]
    fn zfs_without_the_host_or_with_a_failing_zpool_is_unknown() {
        let t = Tree::new();
        let disks = t.find(None);
        assert!(disks.known.is_empty());
        assert_eq!(
            disks.unknown,
            vec!["cannot tell which device holds / (zfs pool rpool)"]
        );
        let disks = t.find(Some(&FakeZpool(Err("zpool: not found".into()))));
        assert_eq!(
            disks.unknown,
            vec!["cannot tell which device holds / (zfs pool rpool: zpool: not found)"]
        );
        // A leaf that resolves to nothing keeps the pool unknown too.
        let disks = t.find(Some(&FakeZpool(Ok(ZPOOL_MIRROR.to_string()))));
        assert_eq!(disks.known.len(), 2);
        assert_eq!(disks.unknown.len(), 1, "{:?}", disks.unknown);
        assert!(
            disks.unknown[0].contains("/dev/sdc1"),
            "{:?}",
            disks.unknown
        );
    }

    #[test]
    fn a_missing_root_entry_and_a_missing_table_are_unknown() {
        let t = Tree::new();
        t.write(
            "proc/self/mountinfo",
            "22 1 0:21 / /proc rw - proc proc rw\n",
        );
        let disks = t.find(None);
        assert_eq!(disks.unknown.len(), 1);
        assert!(disks.unknown[0]
            .starts_with("cannot tell which device holds / (/ is not in the mount table"));
        fs::remove_dir_all(t.0.path().join("proc")).unwrap();
        let disks = t.find(None);
        assert!(
            disks.unknown[0].starts_with("cannot read the mount table ("),
            "{:?}",
            disks.unknown
        );
        assert!(
            disks.unknown[1].starts_with("cannot read the active swaps ("),
            "{:?}",
            disks.unknown
        );
    }

    #[test]
    fn the_initramfs_root_is_held_by_nothing() {
        let t = Tree::new();
        t.write("proc/self/mountinfo", "1 1 0:2 / / rw - rootfs rootfs rw\n");
        let disks = t.find(None);
        assert!(
            disks.known.is_empty() && disks.unknown.is_empty(),
            "{disks:?}"
        );
    }

    #[test]
    fn bcache_is_traced_to_its_backing_and_its_caching_device() {
        let t = Tree::new();
        // The backing disk on a SATA port; bcache links its cache (an NVMe partition)
        // as a holder too, so both sit in `slaves/`.
        let sdb = "sys/devices/pci0000:00/0000:00:17.0/ata2/host1/target1:0:0/1:0:0:0/block/sdb";
        fs::create_dir_all(t.0.path().join(sdb)).unwrap();
        let bcache = "sys/devices/virtual/block/bcache0";
        fs::create_dir_all(t.0.path().join(bcache).join("slaves")).unwrap();
        t.link(
            "../../../../pci0000:00/0000:00:17.0/ata2/host1/target1:0:0/1:0:0:0/block/sdb",
            &format!("{bcache}/slaves/sdb"),
        );
        t.link(
            "../../../../pci0000:00/0000:03:00.0/nvme/nvme1/nvme1n1/nvme1n1p3",
            &format!("{bcache}/slaves/nvme1n1p3"),
        );
        t.link("../../devices/virtual/block/bcache0", "sys/dev/block/251:0");
        t.write(
            "proc/self/mountinfo",
            "29 1 251:0 / / rw - ext4 /dev/bcache0 rw\n",
        );
        let disks = t.find(None);
        assert_eq!(disks.unknown, Vec::<String>::new());
        let got: Vec<(String, &str)> = disks
            .known
            .iter()
            .map(|d| (d.address.to_string(), d.how.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("0000:03:00.0".into(), "ext4 on bcache0 > nvme1n1p3"),
                ("0000:00:17.0".into(), "ext4 on bcache0 > sdb"),
            ]
        );
    }

    #[test]
    fn a_loop_device_is_held_by_the_filesystem_of_its_backing_file() {
        let t = Tree::new();
        t.write(
            "proc/self/mountinfo",
            "29 1 7:0 / / ro - squashfs /dev/loop0 ro\n\
             30 1 259:3 / /run/live/medium ro - ext4 /dev/nvme0n1p3 ro\n",
        );
        t.link("../../devices/virtual/block/loop0", "sys/dev/block/7:0");
        t.write(
            "sys/devices/virtual/block/loop0/loop/backing_file",
            "/run/live/medium/live/filesystem.squashfs\n",
        );
        t.link(
            "../../devices/pci0000:00/0000:02:00.0/nvme/nvme0/nvme0n1/nvme0n1p3",
            "sys/dev/block/259:3",
        );
        let disks = t.find(None);
        assert_eq!(disks.unknown, Vec::<String>::new());
        assert_eq!(disks.known.len(), 1);
        assert_eq!(
            disks.known[0].how,
            "squashfs on loop0 backed by /run/live/medium/live/filesystem.squashfs on ext4 on nvme0n1p3"
        );
    }

    #[test]
    fn a_swap_file_is_held_by_the_filesystem_it_lives_on() {
        let t = Tree::new();
        t.write(
            "proc/self/mountinfo",
            "29 1 259:3 / / rw - ext4 /dev/nvme0n1p3 rw\n",
        );
        t.link(
            "../../devices/pci0000:00/0000:02:00.0/nvme/nvme0/nvme0n1/nvme0n1p3",
            "sys/dev/block/259:3",
        );
        t.write(
            "proc/swaps",
            "Filename Type Size Used Priority\n/swapfile file 1048572 0 -2\n/dev/zram0 partition 100 0 100\n",
        );
        t.link("../../devices/virtual/block/zram0", "sys/class/block/zram0");
        fs::create_dir_all(t.0.path().join("sys/devices/virtual/block/zram0")).unwrap();
        let disks = t.find(None);
        assert_eq!(disks.unknown, Vec::<String>::new());
        let swap: Vec<&str> = disks
            .known
            .iter()
            .filter(|d| d.mount_point == SWAP)
            .map(|d| d.how.as_str())
            .collect();
        assert_eq!(swap, vec!["file /swapfile on ext4 on nvme0n1p3"]);
    }
}
