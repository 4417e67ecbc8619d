//! Segment formats by magic bytes, as the kernel's `decompress_method` knows them: the
//! cpio magic for an uncompressed segment, gzip and zstd (read here), and xz, lz4,
//! bzip2, lzma and lzop (recognised, so the error can name them, but not read: they
//! would each need another decoder crate, and Debian and Ubuntu ship zstd by default).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// An uncompressed cpio archive.
    None,
    Gzip,
    Zstd,
    Xz,
    Lz4,
    Bzip2,
    Lzma,
    Lzo,
}

impl Compression {
    /// The format whose magic `head` starts with (at least 6 bytes wanted; fewer only
    /// at the end of the image), or `None` when the bytes match nothing known.
    pub fn detect(head: &[u8]) -> Option<Compression> {
        let starts = |m: &[u8]| head.starts_with(m);
        if starts(b"070701") || starts(b"070702") {
            Some(Compression::None)
        } else if starts(&[0x1f, 0x8b]) || starts(&[0x1f, 0x9e]) {
            Some(Compression::Gzip)
        } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(Compression::Xz)
        } else if starts(&[0x02, 0x21, 0x4c, 0x18]) || starts(&[0x04, 0x22, 0x4d, 0x18]) {
            Some(Compression::Lz4)
        } else if starts(b"BZh") {
            Some(Compression::Bzip2)
        } else if starts(&[0x5d, 0x00, 0x00]) {
            Some(Compression::Lzma)
        } else if starts(&[0x89, b'L', b'Z', b'O', 0x00]) {
            Some(Compression::Lzo)
        } else {
            None
        }
    }

    /// True for the formats this reader can unpack.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            Compression::None | Compression::Gzip | Compression::Zstd
        )
    }

    /// The command-line tool that unpacks the format (for error messages).
    pub fn tool(self) -> &'static str {
        match self {
            Compression::None => "cat",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Lz4 => "lz4",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzop",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "cpio",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Lz4 => "lz4",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Compression;

    #[test]
    fn magics() {
        let cases: &[(&[u8], Option<Compression>)] = &[
            (b"070701000", Some(Compression::None)),
            (b"070702000", Some(Compression::None)),
            (b"070707000", None),
            (&[0x1f, 0x8b, 8, 0], Some(Compression::Gzip)),
            (&[0x28, 0xb5, 0x2f, 0xfd, 0], Some(Compression::Zstd)),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Some(Compression::Xz)),
            (&[0x04, 0x22, 0x4d, 0x18, 0], Some(Compression::Lz4)),
            (&[0x02, 0x21, 0x4c, 0x18, 0], Some(Compression::Lz4)),
            (b"BZh91AY", Some(Compression::Bzip2)),
            (&[0x5d, 0, 0, 0x80, 0], Some(Compression::Lzma)),
            (&[0x89, b'L', b'Z', b'O', 0, 0x0d], Some(Compression::Lzo)),
            (b"hello!", None),
            (b"", None),
        ];
        for (head, want) in cases {
            assert_eq!(Compression::detect(head), *want, "{head:?}");
        }
    }
}
