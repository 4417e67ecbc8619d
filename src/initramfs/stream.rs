//! The streaming walk over an image: segments found by magic, each cpio archive parsed
//! header by header, file data skipped through one fixed buffer. Nothing is collected;
//! each entry is handed to a visitor with its name borrowed from the buffer, so memory
//! stays bounded (two 128 KiB buffers plus the decoder's state) whatever the image size.
//!
//! Layout accepted, as the kernel's `unpack_to_rootfs` does: uncompressed cpio archives
//! (each ending in `TRAILER!!!`), zero padding between segments, then compressed
//! segments whose unpacked stream may itself hold several archives with zero padding
//! between them.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::path::Path;

use super::header::{self, Header};
use super::{Compression, InitramfsError, Location};

/// Size of the read buffers: large enough that a syscall or a decoder call is amortised
/// over hundreds of entries.
pub const BUF: usize = 128 * 1024;

/// One segment of an image, as `examine` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset of the segment in the image file.
    pub offset: u64,
    /// Bytes of the image file the segment occupies (compressed size).
    pub size: u64,
    pub compression: Compression,
    /// Bytes of its unpacked cpio stream.
    pub unpacked: u64,
    /// Entries, trailers not counted.
    pub entries: u64,
    /// cpio archives (trailers) inside.
    pub archives: u64,
}

/// One cpio entry, its name borrowed from the reader's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The path as stored (no NUL, no normalisation).
    pub name: &'a [u8],
    pub header: Header,
    /// Where the entry's header starts.
    pub at: Location,
}

impl Entry<'_> {
    pub fn is_dir(&self) -> bool {
        self.header.file_type() == header::S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.header.file_type() == header::S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.header.file_type() == header::S_IFLNK
    }
}

/// A reader with its own buffer that can guarantee `n` contiguous bytes (a whole header,
/// a whole name) and counts every byte consumed. It is also a `BufRead`, so a decoder
/// reading from it consumes exactly its segment and leaves the position at the next.
pub(crate) struct Input<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    pos: u64,
}

fn read_retrying<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl<R: Read> Input<R> {
    pub(crate) fn new(inner: R, capacity: usize) -> Self {
        Input {
            inner,
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
            pos: 0,
        }
    }

    /// Bytes consumed so far.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// The buffered bytes, at least `n` of them unless the stream ends first.
    /// `n` must not exceed the capacity.
    pub(crate) fn ensure(&mut self, n: usize) -> io::Result<&[u8]> {
        let n = n.min(self.buf.len());
        while self.end - self.start < n {
            if self.buf.len() - self.start < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let got = read_retrying(&mut self.inner, &mut self.buf[self.end..])?;
            if got == 0 {
                break;
            }
            self.end += got;
        }
        Ok(&self.buf[self.start..self.end])
    }

    /// Consumes `n` buffered bytes (at most what `ensure` returned).
    pub(crate) fn advance(&mut self, n: usize) {
        let n = n.min(self.end - self.start);
        self.start += n;
        self.pos += n as u64;
    }

    /// Skips `n` bytes without keeping them; returns how many were skipped (fewer only
    /// at the end of the stream).
    pub(crate) fn skip(&mut self, n: u64) -> io::Result<u64> {
        let mut left = n;
        loop {
            let avail = (self.end - self.start) as u64;
            let take = avail.min(left);
            self.advance(take as usize);
            left -= take;
            if left == 0 {
                return Ok(n);
            }
            self.start = 0;
            self.end = 0;
            let got = read_retrying(&mut self.inner, &mut self.buf)?;
            if got == 0 {
                return Ok(n - left);
            }
            self.end = got;
        }
    }

    /// Skips zero bytes (padding); stops at the first other byte or the end.
    pub(crate) fn skip_zeros(&mut self) -> io::Result<()> {
        loop {
            let buf = self.ensure(1)?;
            if buf.is_empty() {
                return Ok(());
            }
            let zeros = buf.iter().take_while(|&&b| b == 0).count();
            let all = zeros == buf.len();
            self.advance(zeros);
            if !all {
                return Ok(());
            }
        }
    }
}

impl<R: Read> Read for Input<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.advance(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for Input<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.start == self.end {
            self.start = 0;
            self.end = read_retrying(&mut self.inner, &mut self.buf)?;
        }
        Ok(&self.buf[self.start..self.end])
    }

    fn consume(&mut self, amt: usize) {
        self.advance(amt);
    }
}

/// Walks the image file at `path`; see [`walk`].
pub fn walk_file(
    path: &Path,
    visit: impl FnMut(&Entry<'_>) -> io::Result<()>,
) -> Result<Vec<Segment>, InitramfsError> {
    let file = File::open(path).map_err(|source| InitramfsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    walk(file, visit)
}

/// Walks every segment of an image, calling `visit` for each entry (trailers excluded)
/// in order, and returns the segments. An error from `visit` stops the walk as
/// [`InitramfsError::Output`].
pub fn walk<R: Read>(
    image: R,
    mut visit: impl FnMut(&Entry<'_>) -> io::Result<()>,
) -> Result<Vec<Segment>, InitramfsError> {
    let mut outer = Input::new(image, BUF);
    let mut segments = Vec::new();
    loop {
        let before = outer.pos();
        outer.skip_zeros().map_err(|source| InitramfsError::Read {
            offset: before,
            source,
        })?;
        let offset = outer.pos();
        let head = outer
            .ensure(6)
            .map_err(|source| InitramfsError::Read { offset, source })?;
        if head.is_empty() {
            break;
        }
        let compression = Compression::detect(head).ok_or_else(|| InitramfsError::Unknown {
            offset,
            magic: head[..head.len().min(6)].to_vec(),
        })?;
        let stats = match compression {
            Compression::None => {
                let mut cpio = Archives {
                    input: &mut outer,
                    base: Base {
                        segment: offset,
                        compression,
                        start: offset,
                    },
                    one_archive: true,
                };
                cpio.parse(&mut visit)?
            }
            Compression::Gzip => {
                let decoder = flate2::bufread::GzDecoder::new(&mut outer);
                parse_unpacked(decoder, offset, compression, &mut visit)?
            }
            Compression::Zstd => {
                let decoder = zstd::stream::read::Decoder::with_buffer(&mut outer)
                    .map_err(|source| InitramfsError::Decompress {
                        at: Location {
                            segment: offset,
                            compression,
                            unpacked: 0,
                        },
                        source,
                    })?
                    .single_frame();
                parse_unpacked(decoder, offset, compression, &mut visit)?
            }
            format => return Err(InitramfsError::Unsupported { offset, format }),
        };
        segments.push(Segment {
            offset,
            size: outer.pos() - offset,
            compression,
            unpacked: stats.unpacked,
            entries: stats.entries,
            archives: stats.archives,
        });
    }
    if segments.is_empty() {
        return Err(InitramfsError::Empty);
    }
    Ok(segments)
}

fn parse_unpacked<D: Read>(
    decoder: D,
    segment: u64,
    compression: Compression,
    visit: &mut dyn FnMut(&Entry<'_>) -> io::Result<()>,
) -> Result<Stats, InitramfsError> {
    let mut inner = Input::new(decoder, BUF);
    let mut cpio = Archives {
        input: &mut inner,
        base: Base {
            segment,
            compression,
            start: 0,
        },
        one_archive: false,
    };
    cpio.parse(visit)
}

#[derive(Debug, Default)]
struct Stats {
    unpacked: u64,
    entries: u64,
    archives: u64,
}

/// Where a segment's stream starts, for locating errors.
#[derive(Debug, Clone, Copy)]
struct Base {
    segment: u64,
    compression: Compression,
    /// `input.pos()` where the segment's stream starts.
    start: u64,
}

impl Base {
    fn loc(&self, pos: u64) -> Location {
        Location {
            segment: self.segment,
            compression: self.compression,
            unpacked: pos.saturating_sub(self.start),
        }
    }

    fn io_error(&self, pos: u64, source: io::Error) -> InitramfsError {
        if self.compression == Compression::None {
            InitramfsError::Read {
                offset: self.loc(pos).offset(),
                source,
            }
        } else {
            InitramfsError::Decompress {
                at: self.loc(pos),
                source,
            }
        }
    }
}

/// The cpio archives of one segment's stream.
struct Archives<'i, R> {
    input: &'i mut Input<R>,
    base: Base,
    /// Stop after the first trailer (an uncompressed segment read from the image
    /// itself, where what follows is the next segment).
    one_archive: bool,
}

impl<R: Read> Archives<'_, R> {
    fn parse(
        &mut self,
        visit: &mut dyn FnMut(&Entry<'_>) -> io::Result<()>,
    ) -> Result<Stats, InitramfsError> {
        let base = self.base;
        let mut stats = Stats::default();
        let mut in_archive = false;
        let mut name_copy: Vec<u8> = Vec::new();
        loop {
            let pos = self.input.pos();
            let buf = match self.input.ensure(header::LEN) {
                Ok(b) => b,
                Err(e) => return Err(base.io_error(pos, e)),
            };
            if buf.is_empty() {
                if in_archive {
                    return Err(InitramfsError::Truncated {
                        at: base.loc(pos),
                        what: "the cpio archive has no TRAILER!!! entry".into(),
                    });
                }
                stats.unpacked = pos - base.start;
                return Ok(stats);
            }
            if !in_archive && buf[0] == 0 {
                if let Err(e) = self.input.skip_zeros() {
                    return Err(base.io_error(pos, e));
                }
                continue;
            }
            if buf.len() < header::LEN {
                let prefix = &b"07070"[..buf.len().min(5)];
                return Err(if buf.starts_with(prefix) {
                    InitramfsError::Truncated {
                        at: base.loc(pos + buf.len() as u64),
                        what: format!(
                            "a cpio header needs {} bytes, {} are left",
                            header::LEN,
                            buf.len()
                        ),
                    }
                } else {
                    InitramfsError::Corrupt {
                        at: base.loc(pos),
                        problem: "expected a cpio header, found other data".into(),
                    }
                });
            }
            let h = match header::parse(buf) {
                Ok(h) => h,
                Err(e) => {
                    return Err(InitramfsError::Corrupt {
                        at: base.loc(pos + e.at as u64),
                        problem: e.problem,
                    })
                }
            };
            self.input.advance(header::LEN);
            in_archive = true;

            let name_pos = self.input.pos();
            let span = h.name_span() as usize;
            let namesize = h.namesize as usize;
            let nb = match self.input.ensure(span) {
                Ok(b) => b,
                Err(e) => return Err(base.io_error(name_pos, e)),
            };
            if nb.len() < span {
                let got = nb.len() as u64;
                return Err(InitramfsError::Truncated {
                    at: base.loc(name_pos + got),
                    what: format!(
                        "the entry at {} declares a {namesize}-byte name",
                        base.loc(pos)
                    ),
                });
            }
            if nb[namesize - 1] != 0 {
                return Err(InitramfsError::Corrupt {
                    at: base.loc(name_pos + namesize as u64 - 1),
                    problem: format!(
                        "the name of the entry at {} does not end with a NUL byte \
                         (a wrong name size)",
                        base.loc(pos)
                    ),
                });
            }
            let name = &nb[..namesize - 1];
            let trailer = name == header::TRAILER;
            if !trailer {
                let entry = Entry {
                    name,
                    header: h,
                    at: base.loc(pos),
                };
                visit(&entry).map_err(InitramfsError::Output)?;
                stats.entries += 1;
            }
            if h.filesize > 0 {
                // Kept only for the error message below, in a buffer reused across entries.
                name_copy.clear();
                name_copy.extend_from_slice(name);
            }
            self.input.advance(span);

            let data_pos = self.input.pos();
            let want = h.data_span();
            let got = match self.input.skip(want) {
                Ok(n) => n,
                Err(e) => return Err(base.io_error(data_pos, e)),
            };
            if got < want {
                return Err(InitramfsError::Truncated {
                    at: base.loc(data_pos + got),
                    what: format!(
                        "{:?} (entry at {}) declares {} bytes of data, {} are left",
                        String::from_utf8_lossy(&name_copy),
                        base.loc(pos),
                        h.filesize,
                        got.min(u64::from(h.filesize))
                    ),
                });
            }
            if trailer {
                stats.archives += 1;
                in_archive = false;
                if self.one_archive {
                    stats.unpacked = self.input.pos() - base.start;
                    return Ok(stats);
                }
            }
        }
    }
}
