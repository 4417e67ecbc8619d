//! `initramfs list`: every path of an image, one per line, as stored (the bytes of the
//! name, no normalisation, trailers left out), the way `3cpio --list` and `lsinitramfs`
//! print them. Output goes through a large `BufWriter`; a closed pipe (`| head`) stops
//! the walk and is not an error for the caller to print.

use std::io::{self, Write};
use std::path::Path;

use super::{walk_file, InitramfsError};

/// Writes every path of the image at `path` to `out`, one per line. The caller sees a
/// closed pipe as `Err(InitramfsError::Output(e))` with `e.kind() == BrokenPipe`.
pub fn list_image(path: &Path, out: impl Write) -> Result<(), InitramfsError> {
    let mut out = io::BufWriter::with_capacity(super::stream::BUF, out);
    walk_file(path, |entry| {
        write_name(&mut out, entry.name)?;
        out.write_all(b"\n")
    })?;
    out.flush().map_err(InitramfsError::Output)
}

/// Writes a name as stored, but control characters (a newline, ESC) as `\xNN`: a name
/// in an image must not end a line early or drive the terminal.
fn write_name(out: &mut impl Write, name: &[u8]) -> io::Result<()> {
    let mut rest = name;
    while let Some(i) = rest.iter().position(|b| *b < 0x20 || *b == 0x7f) {
        out.write_all(&rest[..i])?;
        write!(out, "\\x{:02x}", rest[i])?;
        rest = &rest[i + 1..];
    }
    out.write_all(rest)
}

/// True when the error is the output pipe closing early, which `list | head` does on
/// purpose.
pub fn is_broken_pipe(e: &InitramfsError) -> bool {
    matches!(e, InitramfsError::Output(io) if io.kind() == io::ErrorKind::BrokenPipe)
}
