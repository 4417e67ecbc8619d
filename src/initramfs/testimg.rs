//! A small builder of initramfs images in memory, for the unit and integration tests,
//! the fuzzer's seeds and the benchmark's early segment: newc or crc cpio archives with
//! directories, files, symlinks and hard links, gzip and zstd segments, zero padding.
//! Deterministic (fixed mtime, inodes counted from 1), so images are reproducible.

use std::io::Write;

use super::header::{pad4, S_IFDIR, S_IFLNK, S_IFREG};

/// One cpio archive being built.
#[derive(Debug, Clone)]
pub struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
    crc: bool,
}

impl Default for Cpio {
    fn default() -> Self {
        Cpio::newc()
    }
}

impl Cpio {
    /// A `070701` archive.
    pub fn newc() -> Cpio {
        Cpio {
            out: Vec::new(),
            next_ino: 1,
            crc: false,
        }
    }

    /// A `070702` archive (with data checksums).
    pub fn crc() -> Cpio {
        Cpio {
            crc: true,
            ..Cpio::newc()
        }
    }

    /// Appends a raw entry; `ino` 0 takes the next free inode.
    pub fn entry(&mut self, name: &str, mode: u32, nlink: u32, ino: u32, data: &[u8]) -> &mut Self {
        let ino = if ino == 0 {
            self.next_ino += 1;
            self.next_ino - 1
        } else {
            ino
        };
        let check = if self.crc {
            data.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)))
        } else {
            0
        };
        let magic = if self.crc { "070702" } else { "070701" };
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            1_700_000_000,
            data.len() as u32,
            0,
            0,
            0,
            0,
            namesize as u32,
            check,
        ];
        self.out.extend_from_slice(magic.as_bytes());
        for f in fields {
            // Writing into a Vec cannot fail.
            let _ = write!(self.out, "{f:08X}");
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.zero_pad();
        self.out.extend_from_slice(data);
        self.zero_pad();
        self
    }

    fn zero_pad(&mut self) {
        let n = pad4(self.out.len() as u64) as usize;
        self.out.extend(std::iter::repeat_n(0, n));
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, S_IFDIR | 0o755, 2, 0, b"")
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name, S_IFREG | 0o644, 1, 0, data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// Hard links as GNU cpio writes them: one inode, the data only with the last name.
    pub fn hardlinks(&mut self, names: &[&str], data: &[u8]) -> &mut Self {
        let ino = self.next_ino;
        self.next_ino += 1;
        let n = names.len() as u32;
        for (i, name) in names.iter().enumerate() {
            let last = i + 1 == names.len();
            self.entry(name, S_IFREG | 0o644, n, ino, if last { data } else { b"" });
        }
        self
    }

    /// The archive with its `TRAILER!!!`, padded to 512 bytes as GNU cpio does.
    pub fn finish(&mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, 0, b"");
        let mut out = std::mem::take(&mut self.out);
        let pad = (512 - out.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0, pad));
        out
    }
}

/// `data` as one gzip member (no name, no time: reproducible).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// `data` as one zstd frame (level 3, with content size and checksum).
pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap_or_default()
}

/// A small image shaped like Debian's: an early uncompressed segment with microcode,
/// then a main archive (compressed by `compress`) holding what vfio-early installs.
pub fn debian_like(kver: &str, compress: fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let mut image = Cpio::newc()
        .dir("kernel")
        .dir("kernel/x86")
        .dir("kernel/x86/microcode")
        .file("kernel/x86/microcode/AuthenticAMD.bin", &[0xaa; 1000])
        .finish();
    let modules = format!("usr/lib/modules/{kver}");
    let vfio = format!("{modules}/kernel/drivers/vfio");
    let mut main = Cpio::newc();
    main.dir(".")
        .symlink("bin", "usr/bin")
        .symlink("lib", "usr/lib")
        .symlink("sbin", "usr/sbin")
        .dir("etc")
        .dir("etc/modprobe.d")
        .file(
            "etc/modprobe.d/vfio-early.conf",
            b"softdep nouveau pre: vfio-pci\n",
        )
        .file("etc/vfio-early.toml", b"[[device]]\nid = \"10de:1b80\"\n")
        .dir("scripts")
        .dir("scripts/init-top")
        .file(
            "scripts/init-top/00vfio-early",
            b"#!/bin/sh\nvfio-early bind --early\n",
        )
        .dir("usr")
        .dir("usr/bin")
        .hardlinks(&["usr/bin/busybox", "usr/bin/sh"], &[0x7f; 3000])
        .dir("usr/lib")
        .dir("usr/lib/modules")
        .dir(&modules)
        .file(&format!("{modules}/modules.dep"), b"")
        .dir(&format!("{modules}/kernel"))
        .dir(&format!("{modules}/kernel/drivers"))
        .dir(&vfio)
        .dir(&format!("{vfio}/pci"));
    for m in [
        "vfio",
        "vfio_iommu_type1",
        "pci/vfio-pci-core",
        "pci/vfio-pci",
    ] {
        main.file(&format!("{vfio}/{m}.ko.xz"), &[0x55; 700]);
    }
    main.dir("usr/sbin")
        .file("usr/sbin/vfio-early", &[0x7f; 5000]);
    image.extend_from_slice(&compress(&main.finish()));
    image
}
