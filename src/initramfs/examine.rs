//! `initramfs examine`: the segments of an image as a table (offset, size in the file,
//! compression, unpacked size, entries). Rendering is pure; the walk is in `stream`.

use std::fmt::Write;
use std::path::Path;

use super::{walk_file, InitramfsError, Segment};

/// Reads the segments of the image at `path` (the whole image is walked, so a corrupt
/// entry anywhere is reported).
pub fn examine_image(path: &Path) -> Result<Vec<Segment>, InitramfsError> {
    walk_file(path, |_| Ok(()))
}

/// The segment table.
pub fn render_table(segments: &[Segment]) -> String {
    let mut out = format!(
        "{:>12}  {:>12}  {:<11}  {:>12}  {:>8}\n",
        "offset", "size", "compression", "unpacked", "entries"
    );
    for s in segments {
        let _ = writeln!(
            out,
            "{:>12}  {:>12}  {:<11}  {:>12}  {:>8}",
            s.offset,
            s.size,
            s.compression.to_string(),
            s.unpacked,
            s.entries
        );
    }
    out
}
