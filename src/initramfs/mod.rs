//! Reading initramfs images: the concatenated segments the kernel unpacks at boot
//! (uncompressed early cpio archives, then a gzip or zstd compressed main archive), the
//! newc/crc cpio entries inside them, and the reports built on one streaming walk:
//! `examine` (the segments), `list` (every path), `verify` (does the image hold what
//! vfio-early needs at boot) and `holds` (does it hold our files byte for byte).
//!
//! Boundaries: this module reads; it never extracts, writes or decides anything about
//! devices. Memory stays bounded whatever the image size: file data is skipped through a
//! fixed buffer, and only `holds` keeps any (the few files it asks for, each at most a
//! byte longer than wanted). Every malformed input becomes an [`InitramfsError`] naming
//! the byte offset (never a panic).

pub mod compression;
pub mod examine;
pub mod header;
pub mod holds;
pub mod list;
pub mod stream;
pub mod testimg;
pub mod verify;

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use compression::Compression;
pub use stream::{walk, walk_file, Entry, Segment};
pub use verify::{verify_image, Check, Verification};

use crate::outcome::Outcome;
use crate::root::Root;

/// A command's failure on an image: unreadable or malformed is exit 2.
fn fail(image: &std::path::Path, e: &dyn fmt::Display) -> Outcome {
    crate::errln!("vfio-early: error: {}: {e}", image.display());
    Outcome::Usage
}

/// `vfio-early initramfs examine IMAGE`.
pub fn examine_cmd(image: &std::path::Path) -> anyhow::Result<Outcome> {
    Ok(match examine::examine_image(image) {
        Ok(segments) => {
            crate::out!("{}", examine::render_table(&segments))?;
            Outcome::Ok
        }
        Err(e) => fail(image, &e),
    })
}

/// `vfio-early initramfs list IMAGE`: a closed pipe (`| head`) ends it quietly.
pub fn list_cmd(image: &std::path::Path) -> anyhow::Result<Outcome> {
    match list::list_image(image, io::stdout().lock()) {
        Ok(()) => Ok(Outcome::Ok),
        Err(e) if list::is_broken_pipe(&e) => Ok(Outcome::Ok),
        // Writing failed (a full disk), not reading.
        Err(InitramfsError::Output(e)) => Err(crate::outcome::StdoutError(e).into()),
        Err(e) => Ok(fail(image, &e)),
    }
}

/// `vfio-early initramfs verify IMAGE [--kernel V]`: exit 1 when something is missing.
pub fn verify_cmd(
    root: &Root,
    image: &std::path::Path,
    kernel: Option<&str>,
) -> anyhow::Result<Outcome> {
    // The drop-in is expected exactly when this system has one.
    let want_modprobe = root.exists(crate::paths::MODPROBE);
    Ok(match verify::verify_image(image, kernel, want_modprobe) {
        Ok(v) => {
            crate::out!("{}", verify::render(&v))?;
            Outcome::failed_if(!v.complete())
        }
        Err(e) => fail(image, &e),
    })
}

/// Where in an image something went wrong: the segment's offset in the file, its
/// compression, and the offset inside the segment's unpacked stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub compression: Compression,
    pub unpacked: u64,
}

impl Location {
    /// The single offset the task's errors name: segment offset plus the offset in the
    /// unpacked stream (for an uncompressed segment, the file offset).
    pub fn offset(&self) -> u64 {
        self.segment.saturating_add(self.unpacked)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.compression == Compression::None {
            write!(f, "byte {}", self.offset())
        } else {
            write!(
                f,
                "byte {} (byte {} of the {} segment at byte {})",
                self.offset(),
                self.unpacked,
                self.compression,
                self.segment
            )
        }
    }
}

/// Why an image could not be read. Callers branch on the variant: `Output` is the
/// reader's consumer failing (a closed pipe), everything else is the image's fault.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read the image at byte {offset}: {source}")]
    Read { offset: u64, source: io::Error },
    #[error("{at}: {problem}")]
    Corrupt { at: Location, problem: String },
    #[error("{at}: the image ends early: {what}")]
    Truncated { at: Location, what: String },
    #[error(
        "{at}: the {} data is corrupt or cut short (the decoder had read the file up to \
         byte {read_to}): {source}",
        at.compression
    )]
    Decompress {
        at: Location,
        /// How far into the image file the decoder had read.
        read_to: u64,
        source: io::Error,
    },
    #[error(
        "byte {offset}: the segment is {format}-compressed; vfio-early reads only \
         uncompressed, gzip and zstd segments (rebuild the image with COMPRESS=zstd or gzip, or unpack it \
         with `{} -dc`)",
        format.tool()
    )]
    Unsupported { offset: u64, format: Compression },
    #[error(
        "byte {offset}: neither a cpio archive nor a known compression (starts with {})",
        hex(magic)
    )]
    Unknown { offset: u64, magic: Vec<u8> },
    #[error("the image holds no cpio archive")]
    Empty,
    #[error("cannot write the output: {0}")]
    Output(io::Error),
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl InitramfsError {
    /// The byte offset the error names, when it names one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            InitramfsError::Corrupt { at, .. }
            | InitramfsError::Truncated { at, .. }
            | InitramfsError::Decompress { at, .. } => Some(at.offset()),
            InitramfsError::Read { offset, .. }
            | InitramfsError::Unsupported { offset, .. }
            | InitramfsError::Unknown { offset, .. } => Some(*offset),
            InitramfsError::Open { .. } | InitramfsError::Empty | InitramfsError::Output(_) => None,
        }
    }
}
