//! The streaming walk over an image: segments found by magic, each cpio archive parsed
//! header by header, file data skipped through one fixed buffer. Nothing is collected;
//! each entry is handed to a visitor with its name borrowed from the buffer, so memory
//! stays bounded (two 128 KiB buffers plus the decoder's state) whatever the image size.
//! A [`Visitor`] may ask for an entry's data: it is handed over in chunks, and the
//! visitor decides what to keep.
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

/// Walks the image file at `path`; see [`walk`]. Only a regular file is read: a device
/// node (`/dev/zero` reads as endless padding), a FIFO (opening it waits for a writer)
/// or a directory is refused before it is opened, and again once open.
pub fn walk_file(
    path: &Path,
    visit: impl FnMut(&Entry<'_>) -> io::Result<()>,
) -> Result<Vec<Segment>, InitramfsError> {
    walk(open_image(path)?, visit)
}

/// Opens an image file; anything but a regular file is refused (see [`walk_file`]).
pub fn open_image(path: &Path) -> Result<File, InitramfsError> {
    let open_err = |source| InitramfsError::Open {
        path: path.to_path_buf(),
        source,
    };
    let regular = |meta: std::fs::Metadata| {
        if meta.is_file() {
            Ok(())
        } else {
            Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "not a regular file (it is {}); give the image file itself",
                    crate::root::file_kind(meta.file_type())
                ),
            )))
        }
    };
    regular(std::fs::metadata(path).map_err(open_err)?)?;
    let file = File::open(path).map_err(open_err)?;
    regular(file.metadata().map_err(open_err)?)?;
    Ok(file)
}

/// What a walk hands each entry to: its header and name, then, when asked for, its data.
pub trait Visitor {
    /// Called for each entry (trailers excluded) in order; `Ok(true)` asks for its data.
    /// An error stops the walk as [`InitramfsError::Output`].
    fn entry(&mut self, entry: &Entry<'_>) -> io::Result<bool>;
    /// The asked-for data of the entry just visited, in chunks, in order (not called
    /// for an empty file).
    fn data(&mut self, chunk: &[u8]);
}

/// A closure visits names only.
struct Names<F>(F);

impl<F: FnMut(&Entry<'_>) -> io::Result<()>> Visitor for Names<F> {
    fn entry(&mut self, entry: &Entry<'_>) -> io::Result<bool> {
        (self.0)(entry).map(|()| false)
    }
    fn data(&mut self, _: &[u8]) {}
}

/// Walks every segment of an image, calling `visit` for each entry (trailers excluded)
/// in order, and returns the segments. An error from `visit` stops the walk as
/// [`InitramfsError::Output`].
pub fn walk<R: Read>(
    image: R,
    visit: impl FnMut(&Entry<'_>) -> io::Result<()>,
) -> Result<Vec<Segment>, InitramfsError> {
    walk_visiting(image, &mut Names(visit))
}

/// [`walk`] with a [`Visitor`], which may ask for entries' data.
pub fn walk_visiting<R: Read>(
    image: R,
    visit: &mut dyn Visitor,
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
                cpio.parse(visit)
            }
            Compression::Gzip => {
                let decoder = flate2::bufread::GzDecoder::new(&mut outer);
                parse_unpacked(decoder, offset, compression, visit)
            }
            Compression::Zstd => {
                let decoder = zstd::stream::read::Decoder::with_buffer(&mut outer)
                    .map_err(|source| InitramfsError::Decompress {
                        at: Location {
                            segment: offset,
                            compression,
                            unpacked: 0,
                        },
                        read_to: offset,
                        source,
                    })?
                    .single_frame();
                parse_unpacked(decoder, offset, compression, visit)
            }
            format => return Err(InitramfsError::Unsupported { offset, format }),
        };
        // The decoder has let go of `outer`: say how far it had read.
        let stats = stats.map_err(|e| match e {
            InitramfsError::Decompress { at, source, .. } => InitramfsError::Decompress {
                at,
                read_to: outer.pos(),
                source,
            },
            other => other,
        })?;
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
    visit: &mut dyn Visitor,
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
                read_to: 0,
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

/// What the stream holds at the current position.
enum Next {
    /// The end of the stream (outside an archive).
    End,
    /// Zero padding between archives, now skipped.
    Padding,
    /// A valid header, consumed.
    Header(header::Header),
}

impl<R: Read> Archives<'_, R> {
    fn parse(&mut self, visit: &mut dyn Visitor) -> Result<Stats, InitramfsError> {
        let base = self.base;
        let mut stats = Stats::default();
        let mut in_archive = false;
        let mut name_copy: Vec<u8> = Vec::new();
        loop {
            let pos = self.input.pos();
            let h = match self.next_header(in_archive)? {
                Next::End => {
                    stats.unpacked = pos - base.start;
                    return Ok(stats);
                }
                Next::Padding => continue,
                Next::Header(h) => h,
            };
            in_archive = true;
            let trailer = self.entry(pos, h, visit, &mut name_copy)?;
            if !trailer {
                stats.entries += 1;
                continue;
            }
            stats.archives += 1;
            in_archive = false;
            if self.one_archive {
                stats.unpacked = self.input.pos() - base.start;
                return Ok(stats);
            }
        }
    }

    /// Reads the next header, or finds the end or padding between archives.
    fn next_header(&mut self, in_archive: bool) -> Result<Next, InitramfsError> {
        let base = self.base;
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
            return Ok(Next::End);
        }
        if !in_archive && buf[0] == 0 {
            if let Err(e) = self.input.skip_zeros() {
                return Err(base.io_error(pos, e));
            }
            return Ok(Next::Padding);
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
        Ok(Next::Header(h))
    }

    /// Reads the name and skips the data of the entry whose header (at `pos`) was just
    /// consumed; visits it unless it is the trailer, and hands its data over when the
    /// visitor asks. Returns whether it was the trailer.
    fn entry(
        &mut self,
        pos: u64,
        h: header::Header,
        visit: &mut dyn Visitor,
        name_copy: &mut Vec<u8>,
    ) -> Result<bool, InitramfsError> {
        let base = self.base;
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
        // The first NUL must be the last byte of the name: anywhere else, the name
        // size lies (the kernel would read a shorter name and lose its place).
        let nul = nb[..namesize].iter().position(|&b| b == 0);
        if nul != Some(namesize - 1) {
            let at = nul.unwrap_or(namesize - 1) as u64;
            return Err(InitramfsError::Corrupt {
                at: base.loc(name_pos + at),
                problem: format!(
                    "the name of the entry at {} does not end with its only NUL byte \
                     (a wrong name size)",
                    base.loc(pos)
                ),
            });
        }
        let name = &nb[..namesize - 1];
        let trailer = name == header::TRAILER;
        let mut wanted = false;
        if !trailer {
            let entry = Entry {
                name,
                header: h,
                at: base.loc(pos),
            };
            wanted = visit.entry(&entry).map_err(InitramfsError::Output)?;
        }
        if h.filesize > 0 {
            // Kept only for the error message below, in a buffer reused across entries.
            name_copy.clear();
            name_copy.extend_from_slice(name);
        }
        self.input.advance(span);

        let data_pos = self.input.pos();
        let want = h.data_span();
        let handed = if wanted {
            match self.hand_over(u64::from(h.filesize), visit) {
                Ok(n) => n,
                Err(e) => return Err(base.io_error(data_pos, e)),
            }
        } else {
            0
        };
        let got = handed
            + match self.input.skip(want - handed) {
                Ok(n) => n,
                Err(e) => return Err(base.io_error(self.input.pos(), e)),
            };
        if got < want {
            return Err(InitramfsError::Truncated {
                at: base.loc(data_pos + got),
                what: format!(
                    "{:?} (entry at {}) declares {} bytes of data, {} are left",
                    String::from_utf8_lossy(name_copy),
                    base.loc(pos),
                    h.filesize,
                    got.min(u64::from(h.filesize))
                ),
            });
        }
        Ok(trailer)
    }

    /// Hands the next `len` bytes to the visitor in chunks; returns how many there were
    /// (fewer only at the end of the stream, which the caller reports).
    fn hand_over(&mut self, len: u64, visit: &mut dyn Visitor) -> io::Result<u64> {
        let mut left = len;
        while left > 0 {
            let buf = self.input.ensure(BUF)?;
            if buf.is_empty() {
                break;
            }
            let take = (buf.len() as u64).min(left) as usize;
            visit.data(&buf[..take]);
            self.input.advance(take);
            left -= take as u64;
        }
        Ok(len - left)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testimg::{self, Cpio};
    use super::*;

    fn names(image: &[u8]) -> Result<Vec<String>, InitramfsError> {
        let mut out = Vec::new();
        walk(image, |e| {
            out.push(String::from_utf8_lossy(e.name).into_owned());
            Ok(())
        })?;
        Ok(out)
    }

    fn segments(image: &[u8]) -> Vec<Segment> {
        walk(image, |_| Ok(())).expect("walk")
    }

    fn small() -> Vec<u8> {
        Cpio::newc()
            .dir(".")
            .dir("etc")
            .file("etc/vfio-early.toml", b"[[device]]\n")
            .symlink("sbin", "usr/sbin")
            .finish()
    }

    const SMALL: [&str; 4] = [".", "etc", "etc/vfio-early.toml", "sbin"];

    #[test]
    fn reads_newc_crc_gzip_and_zstd() {
        let crc = Cpio::crc()
            .dir(".")
            .dir("etc")
            .file("etc/vfio-early.toml", b"x")
            .symlink("sbin", "usr/sbin")
            .finish();
        assert_eq!(names(&small()).unwrap(), SMALL);
        assert_eq!(names(&crc).unwrap(), SMALL);
        assert_eq!(names(&testimg::gzip(&small())).unwrap(), SMALL);
        assert_eq!(names(&testimg::zstd(&small())).unwrap(), SMALL);
        let s = segments(&testimg::zstd(&small()));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].compression, Compression::Zstd);
        assert_eq!(s[0].entries, 4);
        assert_eq!(s[0].unpacked, small().len() as u64);
    }

    #[test]
    fn multi_segment_with_padding() {
        let early = Cpio::newc()
            .file("kernel/x86/microcode/GenuineIntel.bin", b"uc")
            .finish();
        let mut image = early.clone();
        image.extend_from_slice(&[0; 1024]);
        image.extend_from_slice(&early);
        let gz_at = image.len() as u64;
        image.extend_from_slice(&testimg::gzip(&small()));
        image.extend_from_slice(&[0; 4]);
        let zst_at = image.len() as u64;
        // Two archives with zero padding between them inside one compressed stream.
        let mut two = small();
        two.extend_from_slice(&[0; 512]);
        two.extend_from_slice(&Cpio::newc().file("second", b"").finish());
        image.extend_from_slice(&testimg::zstd(&two));
        let s = segments(&image);
        let shape: Vec<_> = s
            .iter()
            .map(|s| (s.offset, s.compression, s.entries, s.archives))
            .collect();
        assert_eq!(
            shape,
            [
                (0, Compression::None, 1, 1),
                (early.len() as u64 + 1024, Compression::None, 1, 1),
                (gz_at, Compression::Gzip, 4, 1),
                (zst_at, Compression::Zstd, 5, 2),
            ]
        );
        assert_eq!(
            names(&image).unwrap().last().map(String::as_str),
            Some("second")
        );
    }

    #[test]
    fn hardlinks_and_symlinks_keep_their_types() {
        let image = Cpio::newc()
            .hardlinks(&["bin/busybox", "bin/sh", "bin/ls"], b"ELF")
            .symlink("lib", "usr/lib")
            .finish();
        let mut seen = Vec::new();
        walk(&image[..], |e| {
            seen.push((
                String::from_utf8_lossy(e.name).into_owned(),
                e.header.ino,
                e.header.nlink,
                e.header.filesize,
                e.is_symlink(),
                e.is_file(),
            ));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                ("bin/busybox".into(), 1, 3, 0, false, true),
                ("bin/sh".into(), 1, 3, 0, false, true),
                ("bin/ls".into(), 1, 3, 3, false, true),
                ("lib".into(), 2, 1, 7, true, false),
            ]
        );
    }

    /// Every cut before the end of the last trailer must fail with an offset inside the
    /// cut image, and never panic.
    fn assert_cuts_fail(image: &[u8], cuts: std::ops::Range<usize>) {
        for cut in cuts {
            match walk(&image[..cut], |_| Ok(())) {
                Ok(s) => panic!("cut at {cut} of {} read as {s:?}", image.len()),
                Err(InitramfsError::Empty) => assert!(image[..cut].iter().all(|&b| b == 0)),
                Err(e) => {
                    let off = e.offset().unwrap_or_else(|| panic!("no offset: {e}"));
                    if !matches!(e, InitramfsError::Decompress { .. }) {
                        assert!(off <= cut as u64, "cut {cut}: {e}");
                    }
                    assert!(e.to_string().contains("byte "), "{e}");
                }
            }
        }
    }

    #[test]
    fn truncation_anywhere_is_an_error_with_an_offset() {
        let plain = small();
        // The 512-byte block padding after the trailer may be cut: the kernel needs none.
        let trailer_end = segments(&plain)[0].size as usize;
        assert!(trailer_end < plain.len());
        assert_cuts_fail(&plain, 0..trailer_end);
        let gz = testimg::gzip(&plain);
        assert_cuts_fail(&gz, 0..gz.len());
        let zst = testimg::zstd(&plain);
        assert_cuts_fail(&zst, 0..zst.len());
        let mut two = plain.clone();
        two.extend_from_slice(&zst);
        assert_cuts_fail(&two, plain.len() + 1..two.len());
    }

    #[test]
    fn lying_sizes_name_the_offset() {
        // filesize beyond the end.
        let mut image = Cpio::newc().file("a", b"data").finish();
        image[54..62].copy_from_slice(b"00100000");
        let e = names(&image).unwrap_err();
        assert!(matches!(e, InitramfsError::Truncated { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("\"a\" (entry at byte 0) declares 1048576 bytes"),
            "{e}"
        );
        // namesize too large: the NUL is not where it says.
        let mut image = Cpio::newc().file("abc", b"data").finish();
        image[94..102].copy_from_slice(b"00000006");
        let e = names(&image).unwrap_err();
        assert_eq!(e.offset(), Some(113), "{e}");
        assert!(e.to_string().contains("NUL"), "{e}");
        // namesize beyond the end of the stream.
        let mut image = Cpio::newc().file("abc", b"").to_owned().finish();
        image.truncate(116);
        image[94..102].copy_from_slice(b"00000FFF");
        let e = names(&image).unwrap_err();
        assert!(matches!(e, InitramfsError::Truncated { .. }), "{e}");
        // bad hex, in a compressed segment: the offset adds the segment's.
        let mut inner = Cpio::newc().file("abc", b"").finish();
        inner[14..15].copy_from_slice(b"x");
        let mut image = Cpio::newc().file("early", b"").finish();
        let at = image.len() as u64;
        image.extend_from_slice(&testimg::gzip(&inner));
        let e = names(&image).unwrap_err();
        assert_eq!(e.offset(), Some(at + 14));
        assert_eq!(
            e.to_string(),
            format!(
                "byte {} (byte 14 of the gzip segment at byte {at}): the mode field is not \
                 hexadecimal (\"x00081A4\")",
                at + 14
            )
        );
    }

    #[test]
    fn unknown_and_unsupported_formats_are_named_with_their_offset() {
        let early = Cpio::newc().file("early", b"").finish();
        for (magic, name) in [
            (&[0xfd, b'7', b'z', b'X', b'Z', 0][..], "xz"),
            (&[0x04, 0x22, 0x4d, 0x18, 0, 0], "lz4"),
            (b"BZh91AY", "bzip2"),
            (&[0x5d, 0, 0, 0x80, 0, 0], "lzma"),
            (&[0x89, b'L', b'Z', b'O', 0, 0x0d], "lzo"),
        ] {
            let mut image = early.clone();
            image.extend_from_slice(magic);
            image.extend_from_slice(&[1; 64]);
            let e = names(&image).unwrap_err();
            assert!(matches!(e, InitramfsError::Unsupported { .. }), "{e}");
            assert_eq!(e.offset(), Some(early.len() as u64));
            assert!(
                e.to_string().starts_with(&format!(
                    "byte {}: the segment is {name}-compressed",
                    early.len()
                )),
                "{e}"
            );
        }
        let e = names(b"hello world").unwrap_err();
        assert_eq!(
            e.to_string(),
            "byte 0: neither a cpio archive nor a known compression (starts with 0x68656c6c6f20)"
        );
        assert!(matches!(names(b"").unwrap_err(), InitramfsError::Empty));
        assert!(matches!(
            names(&[0; 100]).unwrap_err(),
            InitramfsError::Empty
        ));
        // Garbage after a trailer inside a compressed stream.
        let mut inner = small();
        inner.extend_from_slice(b"junk");
        let e = names(&testimg::zstd(&inner)).unwrap_err();
        assert_eq!(e.offset(), Some(small().len() as u64), "{e}");
    }

    #[test]
    fn mutated_images_never_panic() {
        // A deterministic miniature of `cargo xtask fuzz`: flip bytes, cut, splice.
        let seeds = [
            small(),
            testimg::gzip(&small()),
            testimg::zstd(&small()),
            testimg::debian_like("6.1.0-18-amd64", testimg::zstd),
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in &seeds {
            for _ in 0..300 {
                let mut m = seed.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % m.len();
                    m[i] = next() as u8;
                }
                let _ = walk(&m[..], |_| Ok(()));
            }
        }
    }

    #[test]
    fn visitor_errors_stop_the_walk() {
        let e = walk(&small()[..], |_| {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        })
        .unwrap_err();
        assert!(super::super::list::is_broken_pipe(&e));
    }

    #[test]
    fn input_refills_across_the_buffer_edge() {
        // A tiny buffer forces every header and name across a refill.
        let image = small();
        let mut input = Input::new(&image[..], 7);
        let got = input.ensure(5).unwrap().to_vec();
        assert_eq!(got, &image[..got.len()]);
        input.advance(3);
        assert_eq!(input.ensure(7).unwrap(), &image[3..10]);
        assert_eq!(input.skip(1000).unwrap(), 1000);
        assert_eq!(input.pos(), 1003);
        assert_eq!(input.skip(u64::MAX).unwrap(), image.len() as u64 - 1003);
    }
}
