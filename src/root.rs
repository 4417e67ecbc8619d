//! The one gate between vfio-early and the machine's files.
//!
//! Every read and write of `/sys`, `/proc`, `/dev`, `/etc`, `/boot`, `/lib/modules`,
//! `/usr/lib` and `/var/lib` goes through a [`Root`], which resolves *relative* paths
//! under the directory given with `--root` (default `/`). Only `main.rs` knows `/`. With a
//! root other than `/` the tool runs no host command ([`Root::is_host`] is false): callers
//! report what they would have run instead.
//!
//! **Confinement: chroot semantics.** Every path is resolved inside the root as a chroot
//! would resolve it: an absolute symlink found under the root (`etc/modprobe.d ->
//! /srv/conf`) means `<root>/srv/conf`; a relative one that climbs above the root
//! (`../../../../tmp`) stops at the root, as `..` does at `/`. Nothing outside the root is
//! ever read, written, created or removed, whatever the tree's symlinks say. Real sysfs,
//! whose links (`bus/pci/devices/X -> ../../../devices/...`) stay under `/sys`, resolves as
//! before. The kernel does the resolution (`openat2` with `RESOLVE_IN_ROOT` and
//! `RESOLVE_NO_MAGICLINKS`); on kernels without `openat2` (before 5.6) the same walk runs in
//! user space, one component at a time from a held directory handle, every step opened
//! with `O_NOFOLLOW`, symlinks read and followed within the root (at most 40).
//!
//! **Paths given by callers** are plain relative names: a path with `..` or an absolute
//! path is refused with an error naming it, never followed or silently re-rooted. Text from
//! outside the program (a manifest entry) becomes a path through [`Root::checked_rel`].
//!
//! **Writes** of files the tool owns are atomic: the parent directory is opened confined,
//! then a temporary file `.NAME.vfio-early-tmp.PID` is created in it (`O_EXCL`,
//! `O_NOFOLLOW`), filled, fsynced, renamed over `NAME` and the directory fsynced, all
//! relative to that one directory handle. A symlink at `NAME` itself is replaced, not
//! written through. Modes are fixed whatever the umask: files 0644 (or 0600 with
//! [`FileMode::Private`], 0755 with [`FileMode::Executable`]), directories the tool
//! creates 0755, each set with `fchmod` after creating. Sysfs attribute writes use
//! [`Root::write_attr`], which never creates or truncates.
//!
//! **Leftovers.** A crash between creating the temporary file and the rename leaves
//! `.NAME.vfio-early-tmp.PID` beside `NAME`; the next write or removal of `NAME` removes
//! every such file (one apply at a time is the caller's lock to keep), and
//! [`Root::clean_leftovers`] removes them for a whole directory. A crash inside
//! [`Root::create_dir_all`] leaves some of the directories made, each complete and 0755:
//! harmless, and the next call goes on from there.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fd::OwnedFd;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// The mode of every file the tool writes, unless [`FileMode::Private`] is asked for.
pub const FILE_MODE: u32 = 0o644;
/// The mode of a file written with [`FileMode::Private`].
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// The mode of a file written with [`FileMode::Executable`].
pub const EXECUTABLE_FILE_MODE: u32 = 0o755;
/// The mode of every directory the tool creates.
pub const DIR_MODE: u32 = 0o755;

/// The marker in the names of temporary files (`.NAME.vfio-early-tmp.PID`).
const TMP_MARKER: &[u8] = b".vfio-early-tmp.";
/// Symlinks followed in one resolution before giving up, as the kernel does.
const MAX_LINKS: u32 = 40;

/// The mode of a file written by [`Root::write_atomic_mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileMode {
    /// 0644: readable by everyone, writable by the owner.
    #[default]
    Shared,
    /// 0600: the owner only.
    Private,
    /// 0755: a script another tool runs (a GRUB `/etc/grub.d` script).
    Executable,
}

impl FileMode {
    pub fn bits(self) -> u32 {
        match self {
            FileMode::Shared => FILE_MODE,
            FileMode::Private => PRIVATE_FILE_MODE,
            FileMode::Executable => EXECUTABLE_FILE_MODE,
        }
    }
}

/// How paths are resolved under the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolver {
    /// `openat2(RESOLVE_IN_ROOT)`, the user-space walk where the kernel lacks it.
    Kernel,
    /// The user-space walk only (tests of the fallback).
    #[cfg_attr(not(test), allow(dead_code))]
    Walk,
}

/// Set once `openat2` answered `ENOSYS`: the kernel is older than 5.6.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// What kind of file this is, for messages that refuse anything but a regular file:
/// "a directory", "a FIFO", "a character device", ...
pub fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_file() {
        "a regular file"
    } else {
        "of another kind"
    }
}

/// A filesystem root: `/` on a real host, a fixture tree in tests, a chroot in the harness.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
    resolver: Resolver,
}

impl Root {
    /// A root at `dir`. `dir` is used as given (a relative `dir` is taken from the current
    /// directory at each call); paths under it are resolved as in a chroot.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root {
            dir: dir.into(),
            resolver: Resolver::Kernel,
        }
    }

    /// The same root, resolved by the user-space walk only (as on kernels before 5.6).
    #[cfg(test)]
    fn walking(mut self) -> Self {
        self.resolver = Resolver::Walk;
        self
    }

    /// The directory this root stands for.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when this root is the running system, so host commands may run.
    pub fn is_host(&self) -> bool {
        self.dir == Path::new("/")
    }

    /// Joins a relative path (such as `"sys/bus/pci/devices"`) onto the root, for messages.
    ///
    /// A leading `/` is stripped rather than honoured: `Path::join` with an absolute path
    /// silently drops the root. The result is a name to show, not a way in: symlinks under
    /// the root are not resolved here; use the methods of `Root` for every read and write.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        let stripped: PathBuf = rel
            .components()
            .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
            .collect();
        self.dir.join(stripped)
    }

    /// Turns untrusted text (a manifest entry) into a path under the root: plain names
    /// only, no `..`, not absolute, not empty, no NUL byte. `.` and repeated `/` are
    /// dropped.
    pub fn checked_rel(text: &str) -> io::Result<PathBuf> {
        if text.contains('\0') {
            return Err(refused(
                Path::new(&text.replace('\0', "\\0")),
                "it holds a NUL byte",
            ));
        }
        let rel = Path::new(text);
        let comps = plain_components(rel)?;
        if comps.is_empty() {
            return Err(refused(rel, "it names no file under the root"));
        }
        Ok(comps.iter().collect())
    }

    // ---- reads ----

    /// Reads a whole regular file as UTF-8 text.
    pub fn read_to_string(&self, rel: impl AsRef<Path>) -> io::Result<String> {
        let mut text = String::new();
        self.open_regular(rel.as_ref())?.read_to_string(&mut text)?;
        Ok(text)
    }

    /// Reads at most `limit` bytes of a regular file (ask for one byte more than you
    /// accept to tell a file that is too long).
    pub fn read_bytes(&self, rel: impl AsRef<Path>, limit: u64) -> io::Result<Vec<u8>> {
        let mut data = Vec::new();
        self.open_regular(rel.as_ref())?
            .take(limit)
            .read_to_end(&mut data)?;
        Ok(data)
    }

    /// Opens a regular file for reading (an initramfs image, read as a stream).
    pub fn open(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        self.open_regular(rel.as_ref())
    }

    /// Opens a device node (`dev/kmsg`): for reading without blocking, or for writing.
    /// In a fixture tree the node may be a plain file; both work.
    pub fn open_device(&self, rel: impl AsRef<Path>, write: bool) -> io::Result<File> {
        let comps = plain_components(rel.as_ref())?;
        let flags = if write {
            OFlags::WRONLY
        } else {
            OFlags::RDONLY | OFlags::NONBLOCK
        };
        Ok(File::from(self.open_in(&comps, flags)?))
    }

    /// Reads a sysfs-style attribute: the text with surrounding white space trimmed.
    pub fn read_attr(&self, rel: impl AsRef<Path>) -> io::Result<String> {
        Ok(self.read_to_string(rel)?.trim().to_string())
    }

    /// The target of a symlink, as stored (not resolved).
    pub fn read_link(&self, rel: impl AsRef<Path>) -> io::Result<PathBuf> {
        let (dir, name) = self.open_parent(rel.as_ref(), OFlags::PATH)?;
        let target = rfs::readlinkat(&dir, name.as_os_str(), Vec::new())?;
        Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
    }

    /// The last component of a symlink's target (`driver` → `e1000e`,
    /// `iommu_group` → `13`), or `None` when there is no link.
    pub fn link_name(&self, rel: impl AsRef<Path>) -> Option<String> {
        let target = self.read_link(rel).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// The names in a directory (not `.` and `..`), sorted. Names that are not UTF-8 are
    /// left out: no machine path the tool looks for has one.
    pub fn read_dir_names(&self, rel: impl AsRef<Path>) -> io::Result<Vec<String>> {
        let comps = plain_components(rel.as_ref())?;
        let fd = self.open_in(&comps, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut names = Vec::new();
        for entry in rfs::Dir::new(fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if let Ok(n) = std::str::from_utf8(name) {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// What the path leads to, following symlinks (within the root).
    pub fn metadata(&self, rel: impl AsRef<Path>) -> io::Result<Metadata> {
        let comps = plain_components(rel.as_ref())?;
        File::from(self.open_in(&comps, OFlags::PATH)?).metadata()
    }

    /// The path itself: a symlink is described, not followed.
    pub fn symlink_metadata(&self, rel: impl AsRef<Path>) -> io::Result<Metadata> {
        let rel = rel.as_ref();
        if plain_components(rel)?.is_empty() {
            return self.metadata(rel);
        }
        let (dir, name) = self.open_parent(rel, OFlags::PATH)?;
        let fd = rfs::openat(
            &dir,
            name.as_os_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        File::from(fd).metadata()
    }

    /// True when the path exists (a dangling symlink, as in a fixture, counts as present).
    pub fn exists(&self, rel: impl AsRef<Path>) -> bool {
        self.symlink_metadata(rel).is_ok()
    }

    /// True when the path leads to a directory (following symlinks within the root).
    pub fn is_dir(&self, rel: impl AsRef<Path>) -> bool {
        self.metadata(rel).is_ok_and(|m| m.is_dir())
    }

    // ---- writes ----

    /// Writes a value to an existing sysfs attribute: no create, no truncate, one write.
    pub fn write_attr(&self, rel: impl AsRef<Path>, value: &str) -> io::Result<()> {
        let comps = plain_components(rel.as_ref())?;
        let mut f = File::from(self.open_in(&comps, OFlags::WRONLY)?);
        f.write_all(value.as_bytes())
    }

    /// Replaces a file atomically with mode 0644; see [`Root::write_atomic_mode`].
    pub fn write_atomic(&self, rel: impl AsRef<Path>, contents: &[u8]) -> io::Result<()> {
        self.write_atomic_mode(rel, contents, FileMode::Shared)
    }

    /// Replaces a file atomically: a temporary file beside it, fsync, rename, directory
    /// fsync. A crash leaves either the old or the new content, never a mix. The file gets
    /// `mode` whatever the umask; missing parent directories are created 0755. Stale
    /// temporary files of the same name, left by a crash, are removed first.
    pub fn write_atomic_mode(
        &self,
        rel: impl AsRef<Path>,
        contents: &[u8],
        mode: FileMode,
    ) -> io::Result<()> {
        let rel = rel.as_ref();
        let comps = plain_components(rel)?;
        let Some((name, parent)) = comps.split_last() else {
            return Err(refused(
                rel,
                "it names the root itself, not a file under it",
            ));
        };
        let dir = self.ensure_dir(parent)?;
        remove_leftovers(&dir, Some(name))?;
        let tmp = tmp_name(name);
        let fd = rfs::openat(
            &dir,
            tmp.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(PRIVATE_FILE_MODE),
        )?;
        let result = (|| {
            rfs::fchmod(&fd, Mode::from_raw_mode(mode.bits()))?;
            let mut f = File::from(fd);
            f.write_all(contents)?;
            f.sync_all()?;
            drop(f);
            rfs::renameat(&dir, tmp.as_os_str(), &dir, *name)?;
            rfs::fsync(&dir)?;
            Ok(())
        })();
        if result.is_err() {
            // Best effort: a leftover would be removed by the next write anyway.
            let _ = rfs::unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
        }
        result
    }

    /// Creates a directory and its missing parents under the root, each 0755 whatever the
    /// umask. Existing directories keep their mode. A symlink in the way that leads nowhere
    /// under the root is an error, not a reason to create its target.
    pub fn create_dir_all(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let rel = rel.as_ref();
        let comps = plain_components(rel)?;
        self.ensure_dir(&comps).map(drop)
    }

    /// Removes a file (or symlink); a file that is already gone is not an error. Stale
    /// temporary files of the same name go too.
    pub fn remove_file(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let (dir, name) = match self.open_parent(rel.as_ref(), OFlags::RDONLY) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        remove_leftovers(&dir, Some(&name))?;
        match rfs::unlinkat(&dir, name.as_os_str(), AtFlags::empty()) {
            Ok(()) => Ok(rfs::fsync(&dir)?),
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a directory only when it is empty (otherwise the error says it is not);
    /// a directory that is already gone is not an error.
    pub fn remove_dir(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let (dir, name) = match self.open_parent(rel.as_ref(), OFlags::RDONLY) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match rfs::unlinkat(&dir, name.as_os_str(), AtFlags::REMOVEDIR) {
            Ok(()) => Ok(rfs::fsync(&dir)?),
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes every temporary file a crashed write left in `dir`
    /// (`.NAME.vfio-early-tmp.PID`), and returns their names. A missing directory has none.
    pub fn clean_leftovers(&self, dir: impl AsRef<Path>) -> io::Result<Vec<String>> {
        let comps = plain_components(dir.as_ref())?;
        match self.open_in(&comps, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => remove_leftovers(&fd, None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    // ---- resolution ----

    /// Opens a regular file for reading; anything else (a FIFO, a device) is an error
    /// rather than a hang.
    fn open_regular(&self, rel: &Path) -> io::Result<File> {
        let comps = plain_components(rel)?;
        let f = File::from(self.open_in(&comps, OFlags::RDONLY | OFlags::NONBLOCK)?);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.path(rel).display()),
            ));
        }
        Ok(f)
    }

    /// The directory holding `rel`, opened confined with `flags`, and the last name.
    fn open_parent(&self, rel: &Path, flags: OFlags) -> io::Result<(OwnedFd, OsString)> {
        let comps = plain_components(rel)?;
        let Some((name, parent)) = comps.split_last() else {
            return Err(refused(
                rel,
                "it names the root itself, not a file under it",
            ));
        };
        let dir = self.open_in(parent, flags | OFlags::DIRECTORY)?;
        Ok((dir, name.to_os_string()))
    }

    /// The directory `comps` opened for writing entries, created (0755) where missing.
    fn ensure_dir(&self, comps: &[&OsStr]) -> io::Result<OwnedFd> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY;
        match self.open_in(comps, flags) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let Some((name, parent)) = comps.split_last() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the root {} does not exist", self.dir.display()),
            ));
        };
        let up = self.ensure_dir(parent)?;
        match rfs::mkdirat(&up, *name, Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) => {
                let fd = rfs::openat(
                    &up,
                    *name,
                    flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                rfs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE))?;
                rfs::fsync(&up)?;
                Ok(fd)
            }
            // Made meanwhile, or a symlink whose target is missing under the root.
            Err(Errno::EXIST) => self.open_in(comps, flags).map_err(|e| {
                if e.kind() != io::ErrorKind::NotFound {
                    return e;
                }
                let here: PathBuf = comps.iter().collect();
                let target = self
                    .read_link(&here)
                    .map(|t| format!("a symlink to `{}`", t.display()))
                    .unwrap_or_else(|_| "in the way".to_string());
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "cannot create the directory {}: it is {target}, which does not exist \
                         under the root {} (symlinks under the root resolve as in a chroot); \
                         create the target under the root or remove the link",
                        self.path(&here).display(),
                        self.dir.display()
                    ),
                )
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens `comps` under the root as a chroot would, following symlinks within it.
    /// `flags` never holds `O_CREAT`: files are created relative to a confined parent.
    fn open_in(&self, comps: &[&OsStr], flags: OFlags) -> io::Result<OwnedFd> {
        let root = rfs::openat(
            rfs::CWD,
            &self.dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let flags = flags | OFlags::CLOEXEC;
        if self.resolver == Resolver::Kernel && !NO_OPENAT2.load(Ordering::Relaxed) {
            let joined: PathBuf = if comps.is_empty() {
                PathBuf::from(".")
            } else {
                comps.iter().collect()
            };
            let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
            // EAGAIN: a rename raced with a `..` lookup; the kernel asks to try again.
            for _ in 0..16 {
                match rfs::openat2(&root, &joined, flags, Mode::empty(), how) {
                    Err(Errno::AGAIN) => continue,
                    Err(Errno::NOSYS) => {
                        NO_OPENAT2.store(true, Ordering::Relaxed);
                        break;
                    }
                    // Some container seccomp filters answer EPERM for unknown syscalls.
                    Err(Errno::PERM) => break,
                    other => return Ok(other?),
                }
            }
        }
        walk(&root, comps, flags)
    }
}

/// The user-space resolution: one component at a time from a held directory handle, each
/// step `O_NOFOLLOW`, symlinks read and followed within the root, `..` stopping at it.
fn walk(root: &OwnedFd, comps: &[&OsStr], flags: OFlags) -> io::Result<OwnedFd> {
    // The directories walked through, below the root; `..` pops one.
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut queue: VecDeque<OsString> = comps.iter().map(|c| c.to_os_string()).collect();
    let mut links = 0;
    while let Some(name) = queue.pop_front() {
        match name.as_bytes() {
            b"" | b"." => continue,
            b".." => {
                stack.pop();
                continue;
            }
            _ => {}
        }
        let cur = stack.last().unwrap_or(root);
        let st = rfs::statat(cur, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Errno::LOOP.into());
                }
                let target = rfs::readlinkat(cur, name.as_os_str(), Vec::new())?.into_bytes();
                if target.first() == Some(&b'/') {
                    stack.clear();
                }
                for part in target.split(|b| *b == b'/').rev() {
                    queue.push_front(OsString::from_vec(part.to_vec()));
                }
            }
            _ if queue.is_empty() => {
                let fd = rfs::openat(
                    cur,
                    name.as_os_str(),
                    flags | OFlags::NOFOLLOW,
                    Mode::empty(),
                )?;
                // O_PATH opens a symlink put there since the stat instead of refusing it.
                if FileType::from_raw_mode(rfs::fstat(&fd)?.st_mode) == FileType::Symlink {
                    return Err(Errno::LOOP.into());
                }
                return Ok(fd);
            }
            FileType::Directory => {
                let fd = rfs::openat(
                    cur,
                    name.as_os_str(),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                stack.push(fd);
            }
            _ => return Err(Errno::NOTDIR.into()),
        }
    }
    let cur = stack.last().unwrap_or(root);
    Ok(rfs::openat(cur, ".", flags, Mode::empty())?)
}

/// The components of a caller's path, refusing `..` and absolute paths.
fn plain_components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused(rel, "it climbs with `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(
                    rel,
                    "it is absolute; paths under the root are relative",
                ))
            }
        }
    }
    Ok(out)
}

fn refused(rel: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "refused `{}`: {why}, and every path must stay under the root",
            rel.display()
        ),
    )
}

/// `.NAME.vfio-early-tmp.PID`
fn tmp_name(name: &OsStr) -> OsString {
    let mut v = Vec::with_capacity(name.len() + 32);
    v.push(b'.');
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(TMP_MARKER);
    v.extend_from_slice(std::process::id().to_string().as_bytes());
    OsString::from_vec(v)
}

/// The `NAME` of a temporary file `.NAME.vfio-early-tmp.PID`, if `entry` is one.
fn leftover_of(entry: &[u8]) -> Option<&[u8]> {
    let inner = entry.strip_prefix(b".")?;
    let at = inner
        .windows(TMP_MARKER.len())
        .rposition(|w| w == TMP_MARKER)?;
    let (name, pid) = (&inner[..at], &inner[at + TMP_MARKER.len()..]);
    let pid_ok = !pid.is_empty() && pid.iter().all(u8::is_ascii_digit);
    (pid_ok && !name.is_empty()).then_some(name)
}

/// Unlinks the temporary files in `dir` (of `only`, when given); returns their names.
fn remove_leftovers(dir: &OwnedFd, only: Option<&OsStr>) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let entry = entry?;
        let file = entry.file_name().to_bytes();
        let Some(name) = leftover_of(file) else {
            continue;
        };
        if only.is_some_and(|o| o.as_bytes() != name) || entry.file_type() == FileType::Directory {
            continue;
        }
        match rfs::unlinkat(dir, entry.file_name(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {
                removed.push(String::from_utf8_lossy(file).into_owned());
            }
            // A directory of that name (d_type unknown): not ours to remove.
            Err(Errno::ISDIR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A root tree and a directory beside it that nothing may touch.
    struct Trees {
        _top: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn trees() -> Trees {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        let outside = top.path().join("outside");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        Trees {
            root,
            outside,
            _top: top,
        }
    }

    /// Both resolvers over the same tree: the kernel's and the fallback walk.
    fn both(dir: &Path) -> [Root; 2] {
        [Root::new(dir), Root::new(dir).walking()]
    }

    fn resolver(dir: &Path, walk: bool) -> Root {
        if walk {
            Root::new(dir).walking()
        } else {
            Root::new(dir)
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|it| {
                it.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// The same path as `abs`, inside `root` (where a chroot would look).
    fn inside(root: &Path, abs: &Path) -> PathBuf {
        root.join(abs.strip_prefix("/").unwrap())
    }

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
        for r in both(tempfile::tempdir().unwrap().path()) {
            r.write_atomic("etc/a/b.conf", b"one").unwrap();
            r.write_atomic("etc/a/b.conf", b"two").unwrap();
            assert_eq!(r.read_to_string("etc/a/b.conf").unwrap(), "two");
            assert_eq!(names(&r.path("etc/a")), ["b.conf"]);
        }
    }

    #[test]
    fn modes_are_fixed() {
        let t = trees();
        let r = Root::new(&t.root);
        // An existing file with a wide mode is narrowed on rewrite.
        fs::write(t.root.join("etc/wide"), "x").unwrap();
        fs::set_permissions(t.root.join("etc/wide"), fs::Permissions::from_mode(0o666)).unwrap();
        r.write_atomic("etc/wide", b"y").unwrap();
        assert_eq!(mode(&t.root.join("etc/wide")), 0o644);
        r.write_atomic("var/lib/x/shared", b"a").unwrap();
        r.write_atomic_mode("var/lib/x/private", b"a", FileMode::Private)
            .unwrap();
        assert_eq!(mode(&t.root.join("var/lib/x/shared")), 0o644);
        assert_eq!(mode(&t.root.join("var/lib/x/private")), 0o600);
        for d in ["var", "var/lib", "var/lib/x"] {
            assert_eq!(mode(&t.root.join(d)), 0o755, "{d}");
        }
        // Existing directories keep theirs.
        fs::set_permissions(t.root.join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
        r.create_dir_all("etc/new").unwrap();
        assert_eq!(mode(&t.root.join("etc")), 0o750);
        assert_eq!(mode(&t.root.join("etc/new")), 0o755);
    }

    #[test]
    fn an_absolute_symlinked_directory_resolves_inside_the_root() {
        for walk in [false, true] {
            let t = trees();
            let r = resolver(&t.root, walk);
            symlink(&t.outside, t.root.join("etc/modprobe.d")).unwrap();
            fs::create_dir_all(inside(&t.root, &t.outside)).unwrap();
            r.write_atomic("etc/modprobe.d/vfio-early.conf", b"new")
                .unwrap();
            assert_eq!(names(&t.outside), Vec::<String>::new());
            assert_eq!(
                fs::read_to_string(inside(&t.root, &t.outside).join("vfio-early.conf")).unwrap(),
                "new"
            );
            assert_eq!(
                r.read_to_string("etc/modprobe.d/vfio-early.conf").unwrap(),
                "new"
            );
            r.remove_file("etc/modprobe.d/vfio-early.conf").unwrap();
            assert!(!r.exists("etc/modprobe.d/vfio-early.conf"));
        }
    }

    #[test]
    fn a_climbing_relative_symlink_stops_at_the_root() {
        for walk in [false, true] {
            let t = trees();
            let r = resolver(&t.root, walk);
            fs::create_dir_all(t.root.join("etc/default")).unwrap();
            let up = "../".repeat(20);
            let target = format!("{up}{}", t.outside.strip_prefix("/").unwrap().display());
            symlink(&target, t.root.join("etc/default/grub.d")).unwrap();
            // On the host the link reaches the outside directory; under the root, not.
            assert!(t.root.join("etc/default/grub.d").is_dir());
            fs::create_dir_all(inside(&t.root, &t.outside)).unwrap();
            r.write_atomic("etc/default/grub.d/vfio-early.cfg", b"x")
                .unwrap();
            assert_eq!(names(&t.outside), Vec::<String>::new());
            assert!(inside(&t.root, &t.outside).join("vfio-early.cfg").is_file());
        }
    }

    #[test]
    fn a_symlink_leading_nowhere_under_the_root_is_refused() {
        for walk in [false, true] {
            let t = trees();
            let r = resolver(&t.root, walk);
            symlink(&t.outside, t.root.join("etc/modprobe.d")).unwrap();
            let e = r
                .write_atomic("etc/modprobe.d/vfio-early.conf", b"x")
                .unwrap_err();
            let msg = e.to_string();
            let want = format!(
                "cannot create the directory {}: it is a symlink to `{}`, which does not exist \
                 under the root {}",
                t.root.join("etc/modprobe.d").display(),
                t.outside.display(),
                t.root.display()
            );
            assert!(msg.starts_with(&want), "{msg}");
            assert_eq!(names(&t.outside), Vec::<String>::new());
            assert!(!inside(&t.root, &t.outside).exists());
            // Reads through it find nothing, even where the outside has the file.
            fs::write(t.outside.join("secret"), "s").unwrap();
            let e = r.read_to_string("etc/modprobe.d/secret").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound);
            assert!(!r.exists("etc/modprobe.d/secret"));
            // Nor do removals reach it.
            r.remove_file("etc/modprobe.d/secret").unwrap();
            assert!(t.outside.join("secret").exists());
        }
    }

    #[test]
    fn a_symlinked_file_is_read_inside_and_replaced_not_written_through() {
        for walk in [false, true] {
            let t = trees();
            let r = resolver(&t.root, walk);
            fs::write(t.outside.join("cmdline"), "outside").unwrap();
            fs::create_dir_all(inside(&t.root, &t.outside)).unwrap();
            fs::write(inside(&t.root, &t.outside).join("cmdline"), "inside").unwrap();
            symlink(t.outside.join("cmdline"), t.root.join("etc/cmdline")).unwrap();
            assert_eq!(r.read_to_string("etc/cmdline").unwrap(), "inside");
            assert!(r.metadata("etc/cmdline").unwrap().is_file());
            assert!(r.symlink_metadata("etc/cmdline").unwrap().is_symlink());
            r.write_atomic("etc/cmdline", b"new").unwrap();
            assert_eq!(
                fs::read_to_string(t.outside.join("cmdline")).unwrap(),
                "outside"
            );
            assert!(!fs::symlink_metadata(t.root.join("etc/cmdline"))
                .unwrap()
                .is_symlink());
        }
    }

    #[test]
    fn callers_paths_with_dotdot_or_absolute_are_refused() {
        let t = trees();
        fs::write(t.outside.join("shadow"), "s").unwrap();
        fs::create_dir(t.outside.join("empty")).unwrap();
        for r in both(&t.root) {
            for bad in [
                "../outside/shadow",
                "etc/../../outside/shadow",
                "/etc/passwd",
            ] {
                let e = r.read_to_string(bad).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
                assert!(e.to_string().contains(bad), "{e}");
                assert!(r.write_atomic(bad, b"x").is_err());
                assert!(r.remove_file(bad).is_err());
                assert!(r.write_attr(bad, "1").is_err());
                assert!(r.read_link(bad).is_err());
                assert!(!r.exists(bad));
            }
            assert!(r.remove_dir("../outside/empty").is_err());
            assert!(r.create_dir_all("../outside/made").is_err());
        }
        assert_eq!(fs::read_to_string(t.outside.join("shadow")).unwrap(), "s");
        assert_eq!(names(&t.outside), ["empty", "shadow"]);
    }

    #[test]
    fn checked_rel_takes_plain_relative_paths_only() {
        assert_eq!(
            Root::checked_rel("etc/modprobe.d/vfio-early.conf").unwrap(),
            PathBuf::from("etc/modprobe.d/vfio-early.conf")
        );
        assert_eq!(
            Root::checked_rel("./var//lib/x").unwrap(),
            PathBuf::from("var/lib/x")
        );
        for bad in [
            "",
            ".",
            "/",
            "/etc/shadow",
            "../../etc/shadow",
            "var/../../x",
            "a\0b",
        ] {
            let e = Root::checked_rel(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(e.to_string().starts_with("refused `"), "{e}");
        }
    }

    /// The kernel's sysfs shape: relative links that stay under `sys`.
    fn sysfs(root: &Path) {
        let dev = root.join("sys/devices/pci0000:00/0000:03:00.0");
        fs::create_dir_all(&dev).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/drivers/e1000e")).unwrap();
        fs::create_dir_all(root.join("sys/kernel/iommu_groups/5")).unwrap();
        fs::write(dev.join("vendor"), "0x8086\n").unwrap();
        fs::write(dev.join("driver_override"), "(null)\n").unwrap();
        fs::write(root.join("sys/bus/pci/drivers/e1000e/unbind"), "").unwrap();
        symlink(
            "../../../devices/pci0000:00/0000:03:00.0",
            root.join("sys/bus/pci/devices/0000:03:00.0"),
        )
        .unwrap();
        symlink("../../../bus/pci/drivers/e1000e", dev.join("driver")).unwrap();
        symlink("../../../kernel/iommu_groups/5", dev.join("iommu_group")).unwrap();
    }

    #[test]
    fn sysfs_links_resolve_and_attributes_are_never_created() {
        let dir = tempfile::tempdir().unwrap();
        sysfs(dir.path());
        for r in both(dir.path()) {
            let d = Path::new("sys/bus/pci/devices/0000:03:00.0");
            assert_eq!(r.read_attr(d.join("vendor")).unwrap(), "0x8086");
            assert_eq!(r.link_name(d.join("driver")).as_deref(), Some("e1000e"));
            assert_eq!(r.link_name(d.join("iommu_group")).as_deref(), Some("5"));
            assert_eq!(
                r.read_link(d.join("driver")).unwrap(),
                PathBuf::from("../../../bus/pci/drivers/e1000e")
            );
            assert_eq!(r.link_name(d.join("vendor")), None);
            assert_eq!(
                r.read_dir_names("sys/bus/pci/devices").unwrap(),
                ["0000:03:00.0"]
            );
            assert_eq!(r.read_dir_names(d.join("driver")).unwrap(), ["unbind"]);
            assert!(r.is_dir(d));
            assert!(!r.is_dir(d.join("vendor")));
            assert!(r.exists(d.join("driver")));
            r.write_attr(d.join("driver/unbind"), "0000:03:00.0")
                .unwrap();
            assert_eq!(
                fs::read_to_string(dir.path().join("sys/bus/pci/drivers/e1000e/unbind")).unwrap(),
                "0000:03:00.0"
            );
            r.write_attr(d.join("driver_override"), "vfio-pci").unwrap();
            let e = r.write_attr(d.join("no_such_attr"), "1").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound);
            assert!(!dir
                .path()
                .join("sys/devices/pci0000:00/0000:03:00.0/no_such_attr")
                .exists());
        }
    }

    #[test]
    fn dangling_links_exist_and_loops_end() {
        let t = trees();
        symlink("nowhere", t.root.join("etc/dangling")).unwrap();
        symlink("b", t.root.join("etc/a")).unwrap();
        symlink("a", t.root.join("etc/b")).unwrap();
        fs::write(t.root.join("etc/file"), "f").unwrap();
        for r in both(&t.root) {
            assert!(r.exists("etc/dangling"));
            assert!(!r.exists("etc/missing"));
            assert_eq!(
                r.read_to_string("etc/dangling").unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
            let e = r.read_to_string("etc/a").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(Errno::LOOP.raw_os_error()), "{e}");
            let e = r.read_to_string("etc/file/x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(Errno::NOTDIR.raw_os_error()), "{e}");
            assert!(r.exists(""));
            assert!(r.is_dir(""));
        }
    }

    #[test]
    fn reads_are_bounded_and_refuse_what_is_not_a_file() {
        let t = trees();
        fs::write(t.root.join("etc/big"), vec![b'x'; 10_000]).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(t.root.join("etc/fifo"))
            .status()
            .unwrap();
        assert!(status.success());
        for r in both(&t.root) {
            assert_eq!(r.read_bytes("etc/big", 100).unwrap().len(), 100);
            assert_eq!(r.read_bytes("etc/big", 1 << 20).unwrap().len(), 10_000);
            let e = r.read_to_string("etc/fifo").unwrap_err();
            assert!(e.to_string().contains("is not a regular file"), "{e}");
            assert!(r.read_to_string("etc").is_err());
        }
    }

    #[test]
    fn stale_temporaries_go_with_the_next_write_or_removal() {
        for walk in [false, true] {
            let t = trees();
            let r = resolver(&t.root, walk);
            let etc = t.root.join("etc");
            for n in [
                ".a.conf.vfio-early-tmp.12345",
                ".a.conf.vfio-early-tmp.1",
                ".b.conf.vfio-early-tmp.7",
                ".a.conf.vfio-early-tmp.x",
                ".a.conf.bak",
                "a.conf.vfio-early-tmp.3",
            ] {
                fs::write(etc.join(n), "stale").unwrap();
            }
            r.write_atomic("etc/a.conf", b"new").unwrap();
            assert_eq!(
                names(&etc),
                [
                    ".a.conf.bak",
                    ".a.conf.vfio-early-tmp.x",
                    ".b.conf.vfio-early-tmp.7",
                    "a.conf",
                    "a.conf.vfio-early-tmp.3"
                ]
            );
            fs::write(etc.join(".a.conf.vfio-early-tmp.99"), "stale").unwrap();
            r.remove_file("etc/a.conf").unwrap();
            assert!(!names(&etc).contains(&".a.conf.vfio-early-tmp.99".to_string()));
            assert!(!names(&etc).contains(&"a.conf".to_string()));
            fs::create_dir(etc.join(".d.vfio-early-tmp.5")).unwrap();
            assert_eq!(
                r.clean_leftovers("etc").unwrap(),
                [".b.conf.vfio-early-tmp.7"]
            );
            assert_eq!(
                names(&etc),
                [
                    ".a.conf.bak",
                    ".a.conf.vfio-early-tmp.x",
                    ".d.vfio-early-tmp.5",
                    "a.conf.vfio-early-tmp.3"
                ]
            );
            assert_eq!(
                r.clean_leftovers("no/such/dir").unwrap(),
                Vec::<String>::new()
            );
        }
    }

    #[test]
    fn remove_dir_only_when_empty() {
        let t = trees();
        for r in both(&t.root) {
            r.create_dir_all("var/lib/x").unwrap();
            r.write_atomic("var/lib/x/f", b"").unwrap();
            let e = r.remove_dir("var/lib/x").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::DirectoryNotEmpty);
            r.remove_file("var/lib/x/f").unwrap();
            r.remove_file("var/lib/x/f").unwrap();
            r.remove_dir("var/lib/x").unwrap();
            r.remove_dir("var/lib/x").unwrap();
            assert!(!t.root.join("var/lib/x").exists());
            // Through a symlink: the directory under the root goes, the outside one stays.
            fs::create_dir(t.outside.join("d")).unwrap();
            fs::create_dir_all(inside(&t.root, &t.outside).join("d")).unwrap();
            symlink(&t.outside, t.root.join("var/out")).unwrap();
            r.remove_dir("var/out/d").unwrap();
            assert!(t.outside.join("d").is_dir());
            assert!(!inside(&t.root, &t.outside).join("d").exists());
            fs::remove_file(t.root.join("var/out")).unwrap();
            fs::remove_dir(t.outside.join("d")).unwrap();
        }
    }

    #[test]
    fn the_host_root_reads_proc_through_its_links() {
        for r in both(Path::new("/")) {
            let status = r.read_to_string("proc/self/status").unwrap();
            let pid = format!("\nPid:\t{}\n", std::process::id());
            assert!(status.contains(&pid), "{status}");
        }
        // A magic link (`/proc/self/root`) is refused by the kernel's resolution; the walk
        // reads it as the text `/`, which names the root again: confined either way.
        let e = Root::new("/").metadata("proc/self/root").unwrap_err();
        assert!(
            !NO_OPENAT2.load(Ordering::Relaxed),
            "openat2 is missing here"
        );
        assert_eq!(e.raw_os_error(), Some(Errno::LOOP.raw_os_error()), "{e}");
        assert!(Root::new("/").walking().is_dir("proc/self/root"));
    }

    #[test]
    fn a_half_made_directory_tree_is_finished_by_the_next_write() {
        let t = trees();
        let r = Root::new(&t.root);
        fs::create_dir_all(t.root.join("var/lib")).unwrap();
        r.write_atomic("var/lib/vfio-early/manifest.json", b"{}")
            .unwrap();
        assert_eq!(
            r.read_to_string("var/lib/vfio-early/manifest.json")
                .unwrap(),
            "{}"
        );
    }
}
