//! `vfio-early debug-dump`: packs the part of the machine that vfio-early reads into one
//! gzip-compressed newc cpio archive, and unpacks such an archive into a directory that
//! works as a `--root` fixture tree.
//!
//! Collected, and nothing else: PCI device attributes with their `driver`/`iommu_group`
//! links, the PCI driver directories, IOMMU groups and units, block-device links (to find
//! the boot disk), `/proc/cmdline`, the CPU vendor line of `/proc/cpuinfo`, the kernel
//! release, mounts, and the config. Symlinks are stored as symlinks, with their relative
//! targets, so the unpacked tree has the kernel's shape.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use cpio::newc::{Builder, ModeFileType};

use crate::paths;
use crate::root::Root;

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
/// Largest attribute copied; sysfs text attributes are far smaller.
const MAX_ATTR: u64 = 64 * 1024;

enum Item {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

/// Everything collected, keyed by path relative to the root.
#[derive(Default)]
struct Collection {
    items: std::collections::BTreeMap<PathBuf, Item>,
}

impl Collection {
    fn add(&mut self, rel: PathBuf, item: Item) {
        let mut parent = rel.parent();
        while let Some(p) = parent {
            if p.as_os_str().is_empty() {
                break;
            }
            self.items.entry(p.to_path_buf()).or_insert(Item::Dir);
            parent = p.parent();
        }
        self.items.insert(rel, item);
    }

    fn add_file(&mut self, root: &Root, rel: &Path) {
        if let Ok(data) = root.read_bytes(rel, MAX_ATTR) {
            self.add(rel.to_path_buf(), Item::File(data));
        }
    }

    fn add_link(&mut self, root: &Root, rel: &Path) -> Option<PathBuf> {
        let target = root.read_link(rel).ok()?;
        self.add(rel.to_path_buf(), Item::Link(target.clone()));
        Some(target)
    }

    /// Adds every symlink directly in a directory.
    fn add_links_in(&mut self, root: &Root, rel: &Path) {
        for name in dir_names(root, rel) {
            self.add_link(root, &rel.join(name));
        }
    }
}

fn dir_names(root: &Root, rel: &Path) -> Vec<String> {
    root.read_dir_names(rel).unwrap_or_default()
}

/// Resolves `link` (relative to the root) lexically: its directory joined with its target.
fn resolve(link: &Path, target: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in link.parent()?.join(target).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Some(out)
}

fn collect(root: &Root, config: &Path) -> Collection {
    let mut c = Collection::default();
    let devices = Path::new(paths::PCI_DEVICES);
    let mut drivers = BTreeSet::new();
    for name in dir_names(root, devices) {
        let link = devices.join(&name);
        let Some(target) = c.add_link(root, &link) else {
            continue;
        };
        let Some(real) = resolve(&link, &target) else {
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
    for name in dir_names(root, driver_dir).into_iter().chain(drivers) {
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
    for g in dir_names(root, groups) {
        c.add(groups.join(&g), Item::Dir);
        c.add_links_in(root, &groups.join(&g).join("devices"));
    }
    c.add_links_in(root, Path::new(paths::IOMMU_CLASS));
    c.add_links_in(root, Path::new(paths::SYS_DEV_BLOCK));
    c.add_links_in(root, Path::new(paths::SYS_CLASS_BLOCK));
    for f in [
        paths::PROC_CMDLINE,
        paths::PROC_OSRELEASE,
        paths::PROC_MOUNTINFO,
    ] {
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
    if let Ok(data) = fs::read(config) {
        c.add(PathBuf::from(paths::CONFIG), Item::File(data));
    }
    c
}

/// `vfio-early debug-dump -o FILE`.
pub fn run(root: &Root, config: &Path, output: &Path) -> anyhow::Result<crate::outcome::Outcome> {
    let count = write_dump(root, config, output)?;
    crate::errln!(
        "vfio-early: wrote {} ({count} entries); attach it to your bug report",
        output.display()
    );
    Ok(crate::outcome::Outcome::Ok)
}

/// Writes the archive; returns the number of entries.
pub fn write_dump(root: &Root, config: &Path, output: &Path) -> anyhow::Result<usize> {
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
    Ok(c.items.len())
}

/// Unpacks a dump into `dir`, giving a tree usable with `--root`. Entry names that are
/// absolute or climb with `..` are refused.
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
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unsafe entry name in dump: {name}"),
            ));
        }
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
