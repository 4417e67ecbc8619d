//! The one gate between vfio-early and the machine's files.
//!
//! Every read and write of `/sys`, `/proc`, `/dev`, `/etc`, `/boot`, `/lib/modules`,
//! `/usr/lib` and `/var/lib` goes through a [`Root`], which joins *relative* paths onto the
//! directory given with `--root` (default `/`). Only `main.rs` knows `/`. With a root other
//! than `/` the tool runs no host command ([`Root::is_host`] is false): callers report what
//! they would have run instead.
//!
//! Writes of files the tool owns are atomic: temporary file in the same directory, fsync,
//! rename, fsync of the directory. Sysfs attribute writes use [`Root::write_attr`], which
//! never creates or truncates.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

/// A filesystem root: `/` on a real host, a fixture tree in tests, a chroot in the harness.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// A root at `dir`. `dir` is used as given; relative paths are joined onto it.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root { dir: dir.into() }
    }

    /// The directory this root stands for.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when this root is the running system, so host commands may run.
    pub fn is_host(&self) -> bool {
        self.dir == Path::new("/")
    }

    /// Joins a relative path (such as `"sys/bus/pci/devices"`) onto the root.
    ///
    /// A leading `/` is stripped rather than honoured: `Path::join` with an absolute path
    /// silently drops the root, which is exactly the bug this type exists to prevent.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        let stripped: PathBuf = rel
            .components()
            .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
            .collect();
        self.dir.join(stripped)
    }

    /// Reads a whole file as UTF-8 text.
    pub fn read_to_string(&self, rel: impl AsRef<Path>) -> io::Result<String> {
        fs::read_to_string(self.path(rel))
    }

    /// Reads a sysfs-style attribute: the text with surrounding white space trimmed.
    pub fn read_attr(&self, rel: impl AsRef<Path>) -> io::Result<String> {
        Ok(self.read_to_string(rel)?.trim().to_string())
    }

    /// The last component of a symlink's target (`driver` → `e1000e`,
    /// `iommu_group` → `13`), or `None` when there is no link.
    pub fn link_name(&self, rel: impl AsRef<Path>) -> Option<String> {
        let target = fs::read_link(self.path(rel)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// True when the path exists (following symlinks inside the tree is not attempted:
    /// a dangling link in a fixture still counts as present).
    pub fn exists(&self, rel: impl AsRef<Path>) -> bool {
        fs::symlink_metadata(self.path(rel)).is_ok()
    }

    /// Writes a value to an existing sysfs attribute: no create, no truncate, one write.
    pub fn write_attr(&self, rel: impl AsRef<Path>, value: &str) -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).open(self.path(rel))?;
        f.write_all(value.as_bytes())
    }

    /// Replaces a file atomically: a temporary file beside it, fsync, rename, directory
    /// fsync. A crash leaves either the old or the new content, never a mix. Missing
    /// parent directories are created with mode 0755.
    pub fn write_atomic(&self, rel: impl AsRef<Path>, contents: &[u8]) -> io::Result<()> {
        let path = self.path(rel);
        let parent = path
            .parent()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
        fs::create_dir_all(parent)?;
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let tmp = parent.join(format!(
            ".{}.vfio-early-tmp.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            File::open(parent)?.sync_all()
        })();
        if result.is_err() {
            // Best effort: a leftover temporary file would be harmless but untidy.
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The names in a directory, sorted; empty when it cannot be read. Names that are
    /// not UTF-8 are left out (no machine path vfio-early reads has them).
    pub fn read_dir_names(&self, rel: impl AsRef<Path>) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.path(rel))
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Opens a file for reading.
    pub fn open(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        File::open(self.path(rel))
    }

    /// Opens a file with the given options (e.g. non-blocking reads of `/dev/kmsg`).
    pub fn open_with(&self, rel: impl AsRef<Path>, opts: &OpenOptions) -> io::Result<File> {
        opts.open(self.path(rel))
    }

    /// Reads at most `limit` bytes of a file (binary attributes such as `rom`).
    pub fn read_bytes(&self, rel: impl AsRef<Path>, limit: u64) -> io::Result<Vec<u8>> {
        let mut data = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(self.open(rel)?, limit), &mut data)?;
        Ok(data)
    }

    /// True when the path is a directory (following symlinks).
    pub fn is_dir(&self, rel: impl AsRef<Path>) -> bool {
        self.metadata(rel).is_ok_and(|m| m.is_dir())
    }

    /// A symlink's target, as stored.
    pub fn read_link(&self, rel: impl AsRef<Path>) -> io::Result<PathBuf> {
        fs::read_link(self.path(rel))
    }

    /// Metadata, following symlinks.
    pub fn metadata(&self, rel: impl AsRef<Path>) -> io::Result<fs::Metadata> {
        fs::metadata(self.path(rel))
    }

    /// Removes an empty directory.
    pub fn remove_dir(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        fs::remove_dir(self.path(rel))
    }

    /// Removes a file; a file that is already gone is not an error.
    pub fn remove_file(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        match fs::remove_file(self.path(rel)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths_stay_under_root() {
        let r = Root::new("/tmp/fake");
        let abs = r.path("/sys/bus/pci");
        assert_eq!(abs, PathBuf::from("/tmp/fake/sys/bus/pci"));
        assert_eq!(
            r.path("sys/bus/pci"),
            PathBuf::from("/tmp/fake/sys/bus/pci")
        );
    }

    #[test]
    fn host_root_is_only_slash() {
        assert!(Root::new("/").is_host());
        assert!(!Root::new("/tmp").is_host());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let r = Root::new(dir.path());
        r.write_atomic("etc/a/b.conf", b"one").unwrap();
        r.write_atomic("etc/a/b.conf", b"two").unwrap();
        assert_eq!(r.read_to_string("etc/a/b.conf").unwrap(), "two");
        let names: Vec<_> = fs::read_dir(r.path("etc/a")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
