//! The 110-byte header of a newc (`070701`) or crc (`070702`) cpio entry: thirteen
//! 8-digit hex fields after the magic. Parsing is pure and checks every field, so a
//! lying or garbled header is an error naming the field and its offset, never a panic.

/// Length of a newc/crc header.
pub const LEN: usize = 110;
/// The name of the entry that ends an archive.
pub const TRAILER: &[u8] = b"TRAILER!!!";
/// Longest name accepted: the kernel refuses names beyond `PATH_MAX` (4096).
pub const MAX_NAME: u32 = 4096;

/// File type bits of `mode`.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;

/// The fields of a header this reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// True for `070702` (the `check` field holds a checksum of the data).
    pub crc: bool,
    pub ino: u32,
    pub mode: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub filesize: u32,
    /// Length of the name including its terminating NUL.
    pub namesize: u32,
}

/// What is wrong with a header, and at which byte of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError {
    pub at: usize,
    pub problem: String,
}

fn field(h: &[u8], index: usize, name: &str) -> Result<u32, HeaderError> {
    let at = 6 + index * 8;
    let digits = h.get(at..at + 8).ok_or_else(|| HeaderError {
        at,
        problem: "header too short".into(),
    })?;
    let mut v: u32 = 0;
    for &d in digits {
        let nibble = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => {
                return Err(HeaderError {
                    at,
                    problem: format!(
                        "the {name} field is not hexadecimal ({:?})",
                        String::from_utf8_lossy(digits)
                    ),
                })
            }
        };
        v = (v << 4) | u32::from(nibble);
    }
    Ok(v)
}

/// Parses a header from its 110 bytes (`h` may be longer; only the start is read).
pub fn parse(h: &[u8]) -> Result<Header, HeaderError> {
    if h.len() < LEN {
        return Err(HeaderError {
            at: h.len(),
            problem: "header too short".into(),
        });
    }
    let crc = match &h[..6] {
        b"070701" => false,
        b"070702" => true,
        other => {
            return Err(HeaderError {
                at: 0,
                problem: format!(
                    "bad cpio magic {:?}, expected \"070701\" (newc) or \"070702\" (crc)",
                    String::from_utf8_lossy(other)
                ),
            })
        }
    };
    let header = Header {
        crc,
        ino: field(h, 0, "ino")?,
        mode: field(h, 1, "mode")?,
        nlink: {
            field(h, 2, "uid")?;
            field(h, 3, "gid")?;
            field(h, 4, "nlink")?
        },
        mtime: field(h, 5, "mtime")?,
        filesize: field(h, 6, "filesize")?,
        namesize: {
            for (i, name) in [
                (7, "devmajor"),
                (8, "devminor"),
                (9, "rdevmajor"),
                (10, "rdevminor"),
            ] {
                field(h, i, name)?;
            }
            field(h, 11, "namesize")?
        },
    };
    field(h, 12, "check")?;
    if header.namesize == 0 {
        return Err(HeaderError {
            at: 94,
            problem: "name size 0 (a name needs at least its NUL byte)".into(),
        });
    }
    if header.namesize > MAX_NAME {
        return Err(HeaderError {
            at: 94,
            problem: format!(
                "name size {} exceeds the kernel's limit of {MAX_NAME}",
                header.namesize
            ),
        });
    }
    Ok(header)
}

/// Bytes of padding after `len` bytes to reach a multiple of four.
pub fn pad4(len: u64) -> u64 {
    (4 - (len % 4)) % 4
}

impl Header {
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
    /// Bytes after the header up to the data: the name and its padding.
    pub fn name_span(&self) -> u64 {
        u64::from(self.namesize) + pad4(LEN as u64 + u64::from(self.namesize))
    }
    /// Bytes of data and its padding.
    pub fn data_span(&self) -> u64 {
        u64::from(self.filesize) + pad4(u64::from(self.filesize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(fields: [u32; 13], magic: &str) -> Vec<u8> {
        let mut h = magic.as_bytes().to_vec();
        for f in fields {
            h.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        h
    }

    #[test]
    fn parses_newc_and_crc() {
        let f = [7, 0o100644, 0, 0, 1, 5, 3, 0, 0, 0, 0, 4, 0];
        let h = parse(&raw(f, "070701")).unwrap();
        assert_eq!(
            (h.crc, h.ino, h.mode, h.nlink, h.mtime, h.filesize, h.namesize),
            (false, 7, 0o100644, 1, 5, 3, 4)
        );
        assert!(parse(&raw(f, "070702")).unwrap().crc);
        assert_eq!(h.name_span(), 4 + 2);
        assert_eq!(h.data_span(), 4);
    }

    #[test]
    fn names_the_bad_field() {
        let mut h = raw([0, 0, 0, 0, 1, 0, 3, 0, 0, 0, 0, 4, 0], "070701");
        h[6 + 6 * 8 + 3] = b'g';
        let e = parse(&h).unwrap_err();
        assert_eq!(e.at, 54);
        assert!(e.problem.contains("filesize"), "{}", e.problem);
        let e = parse(&raw([0; 13], "070707")).unwrap_err();
        assert!(e.problem.contains("magic"), "{}", e.problem);
        assert_eq!(e.at, 0);
        let e = parse(&raw([0; 13], "070701")).unwrap_err();
        assert!(e.problem.contains("name size 0"), "{}", e.problem);
        let e = parse(&raw([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 99999, 0], "070701")).unwrap_err();
        assert!(e.problem.contains("limit"), "{}", e.problem);
        assert!(parse(b"070701").is_err());
    }

    #[test]
    fn padding() {
        assert_eq!([0, 1, 2, 3, 4, 5].map(pad4), [0, 3, 2, 1, 0, 3]);
    }
}
