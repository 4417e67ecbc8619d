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
        out.write_all(entry.name)?;
        out.write_all(b"\n")
    })?;
    out.flush().map_err(InitramfsError::Output)
}

/// True when the error is the output pipe closing early, which `list | head` does on
/// purpose.
pub fn is_broken_pipe(e: &InitramfsError) -> bool {
    matches!(e, InitramfsError::Output(io) if io.kind() == io::ErrorKind::BrokenPipe)
}
