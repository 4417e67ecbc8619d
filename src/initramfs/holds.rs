//! Whether an image already holds, byte for byte, what vfio-early's hooks would put into
//! it: `apply --trial` keeps such images instead of rebuilding them (a retried trial
//! of the same config). [`differences`] walks the image once, keeping only the data
//! of the few paths asked for (each at most one byte longer than wanted), and names
//! every difference; none means the rebuild would change nothing of ours.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};

use super::stream::{walk_visiting, Entry, Visitor};
use super::verify::{normalize, split_module_path};
use super::InitramfsError;
use crate::{kmod, paths};

/// What the image must hold.
#[derive(Debug, Clone, Default)]
pub struct Wanted {
    /// Image paths (no leading `/`) that must hold these bytes (`Some`) or must be
    /// absent (`None`).
    pub files: BTreeMap<String, Option<Vec<u8>>>,
    /// The binary, at any of [`paths::IMAGE_BINARY`].
    pub binary: Vec<u8>,
    /// The kernel whose module tree must hold `modules`.
    pub kernel: String,
    pub modules: Vec<String>,
}

/// What one walk saw.
struct Seen<'w> {
    wanted: &'w Wanted,
    /// Data kept per asked-for path (the last copy in the image wins, as at unpacking).
    data: BTreeMap<String, Vec<u8>>,
    /// Where the data being handed over goes, and how much of it to keep.
    current: Option<(String, usize)>,
    boot_script: bool,
    modules: BTreeSet<String>,
}

impl Visitor for Seen<'_> {
    fn entry(&mut self, entry: &Entry<'_>) -> io::Result<bool> {
        self.current = None;
        let Ok(name) = std::str::from_utf8(entry.name) else {
            return Ok(false);
        };
        let name = normalize(name);
        if entry.is_dir() {
            return Ok(false);
        }
        if paths::IMAGE_BOOT_SCRIPT.contains(&name) {
            self.boot_script = true;
        }
        if let Some((kver, rest)) = split_module_path(name) {
            if kver == self.wanted.kernel {
                if let Some(m) = kmod::module_name_of(rest) {
                    self.modules.insert(m);
                }
            }
        }
        let keep = if paths::IMAGE_BINARY.contains(&name) {
            self.wanted.binary.len() + 1
        } else {
            match self.wanted.files.get(name) {
                Some(Some(bytes)) => bytes.len() + 1,
                Some(None) => 0,
                None => return Ok(false),
            }
        };
        self.data.insert(name.to_string(), Vec::new());
        self.current = Some((name.to_string(), keep));
        Ok(keep > 0 && entry.is_file())
    }

    fn data(&mut self, chunk: &[u8]) {
        if let Some((name, keep)) = &self.current {
            if let Some(buf) = self.data.get_mut(name) {
                let room = keep.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
        }
    }
}

/// Every way the image differs from `wanted`, in words (`/etc/x differs`); empty when
/// it holds everything wanted and nothing unwanted.
pub fn differences(image: impl Read, wanted: &Wanted) -> Result<Vec<String>, InitramfsError> {
    let mut seen = Seen {
        wanted,
        data: BTreeMap::new(),
        current: None,
        boot_script: false,
        modules: BTreeSet::new(),
    };
    walk_visiting(image, &mut seen)?;
    let mut out = Vec::new();
    for (path, want) in &wanted.files {
        match (want, seen.data.get(path)) {
            (Some(_), None) => out.push(format!("no /{path}")),
            (Some(bytes), Some(got)) if got != bytes => out.push(format!("/{path} differs")),
            (None, Some(_)) => out.push(format!("/{path} is there")),
            _ => {}
        }
    }
    let binaries: Vec<&Vec<u8>> = paths::IMAGE_BINARY
        .iter()
        .filter_map(|p| seen.data.get(*p))
        .collect();
    if binaries.is_empty() {
        out.push("no vfio-early binary".into());
    } else if !binaries.iter().any(|b| **b == wanted.binary) {
        out.push("the vfio-early binary differs from the installed one".into());
    }
    if !seen.boot_script {
        out.push("no boot script".into());
    }
    for m in &wanted.modules {
        if !seen.modules.contains(&kmod::normalize(m)) {
            out.push(format!("no module {m} for {}", wanted.kernel));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::testimg::{self, Cpio};
    use super::*;

    const KVER: &str = "6.1.0-28-amd64";

    fn wanted() -> Wanted {
        let mut files = BTreeMap::new();
        files.insert(paths::CONFIG.to_string(), Some(b"[[device]]\n".to_vec()));
        files.insert(paths::IMAGE_TRIAL_CONFIG.to_string(), None);
        Wanted {
            files,
            binary: vec![7u8; 300_000],
            kernel: KVER.into(),
            modules: vec!["vfio-pci".into()],
        }
    }

    /// An image as the hooks build it: early cpio, then a zstd main archive.
    fn image(edit: impl FnOnce(&mut Cpio)) -> Vec<u8> {
        let mut main = Cpio::newc();
        main.dir("usr")
            .file("usr/sbin/vfio-early", &[7u8; 300_000])
            .file("./etc/vfio-early.toml", b"[[device]]\n")
            .file("scripts/init-top/00vfio-early", b"#!/bin/sh\n")
            .file(
                &format!("usr/lib/modules/{KVER}/kernel/drivers/vfio/pci/vfio-pci.ko"),
                b"\x7fELF",
            );
        edit(&mut main);
        let mut out = Cpio::newc()
            .file("kernel/x86/microcode/GenuineIntel.bin", b"u")
            .finish();
        out.extend(testimg::zstd(&main.finish()));
        out
    }

    #[test]
    fn an_image_built_from_the_same_files_has_no_difference() {
        // The binary spans several read buffers: its bytes are compared whole.
        assert_eq!(
            differences(&image(|_| {})[..], &wanted()).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_difference_is_named() {
        let img = image(|c| {
            c.file("etc/vfio-early-trial.toml", b"old trial\n");
        });
        let mut w = wanted();
        w.files
            .insert(paths::CONFIG.into(), Some(b"[[device]]\nid = 1\n".to_vec()));
        w.binary[299_999] = 8;
        w.modules.push("vfio_iommu_type1".into());
        assert_eq!(
            differences(&img[..], &w).unwrap(),
            [
                "/etc/vfio-early-trial.toml is there",
                "/etc/vfio-early.toml differs",
                "the vfio-early binary differs from the installed one",
                "no module vfio_iommu_type1 for 6.1.0-28-amd64",
            ]
        );
        let mut w = wanted();
        w.files
            .insert(paths::MODPROBE.into(), Some(b"softdep\n".to_vec()));
        w.kernel = "6.12.0-1-amd64".into();
        assert_eq!(
            differences(&image(|_| {})[..], &w).unwrap(),
            [
                "no /etc/modprobe.d/vfio-early.conf",
                "no module vfio-pci for 6.12.0-1-amd64"
            ]
        );
    }

    #[test]
    fn a_longer_file_differs_and_the_last_copy_counts() {
        // Same prefix, one byte more: kept only up to one byte past the wanted length.
        let img = image(|c| {
            c.file("etc/vfio-early.toml", b"[[device]]\n\n");
        });
        assert_eq!(
            differences(&img[..], &wanted()).unwrap(),
            ["/etc/vfio-early.toml differs"]
        );
        let mut bare = Cpio::newc();
        bare.file("etc/vfio-early.toml", b"x");
        assert_eq!(
            differences(&bare.finish()[..], &wanted()).unwrap(),
            [
                "/etc/vfio-early.toml differs",
                "no vfio-early binary",
                "no boot script",
                "no module vfio-pci for 6.1.0-28-amd64"
            ]
        );
    }

    #[test]
    fn a_damaged_image_is_an_error_not_a_match() {
        let mut img = image(|_| {});
        img.truncate(img.len() - 40);
        assert!(differences(&img[..], &wanted()).is_err());
    }
}
