//! `vfio-early rom dump`: a GPU's option ROM for QEMU's `romfile=`.
//!
//! Enables the ROM through sysfs (`rom` ← `1`), reads it, and disables it again whatever
//! happened. The image is checked before it is written: the `0x55AA` signature, the PCI
//! data structure (`PCIR`) of each image in the ROM (legacy BIOS, then UEFI), and the
//! vendor and device it names. Writes go through the binder's [`Sysfs`] seam so tests can
//! simulate the kernel; a read that fails with EIO (a shadowed boot-VGA ROM) is refused
//! with the known ways around it.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::bind::Sysfs;
use crate::outcome::Outcome;
use crate::paths;
use crate::pci::{PciAddress, VendorDevice};
use crate::root::Root;

/// One image inside the ROM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RomImage {
    pub offset: usize,
    pub length: usize,
    pub id: VendorDevice,
    /// 0 legacy x86 BIOS, 3 UEFI, others as the PCI firmware spec numbers them.
    pub code_type: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RomInfo {
    pub size: usize,
    pub images: Vec<RomImage>,
}

/// Largest ROM read: PCI expansion ROM BARs are at most 16 MiB.
const MAX_ROM: u64 = 16 << 20;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Validates a ROM image and lists the images in it.
pub fn parse_rom(b: &[u8]) -> Result<RomInfo, String> {
    let mut images = Vec::new();
    let mut offset = 0usize;
    loop {
        let img = b.get(offset..).unwrap_or(&[]);
        if img.get(..2) != Some(&[0x55, 0xAA][..]) {
            if offset == 0 {
                return Err(format!(
                    "no 0x55AA signature at the start (found {:02x?}): this is not an option ROM",
                    img.get(..2).unwrap_or(&[])
                ));
            }
            break;
        }
        let pcir = usize::from(u16_at(img, 0x18).ok_or("the ROM header is truncated")?);
        if img.get(pcir..pcir + 4) != Some(&b"PCIR"[..]) {
            return Err(format!(
                "image at offset {offset:#x}: no PCIR data structure at {pcir:#x}"
            ));
        }
        let vendor = u16_at(img, pcir + 4).ok_or("PCIR truncated")?;
        let device = u16_at(img, pcir + 6).ok_or("PCIR truncated")?;
        let length = usize::from(u16_at(img, pcir + 0x10).ok_or("PCIR truncated")?) * 512;
        let code_type = *img.get(pcir + 0x14).ok_or("PCIR truncated")?;
        let indicator = *img.get(pcir + 0x15).ok_or("PCIR truncated")?;
        if length == 0 {
            return Err(format!("image at offset {offset:#x} declares length 0"));
        }
        images.push(RomImage {
            offset,
            length,
            id: VendorDevice { vendor, device },
            code_type,
        });
        offset += length;
        if indicator & 0x80 != 0 || offset >= b.len() {
            break;
        }
    }
    Ok(RomInfo {
        size: b.len(),
        images,
    })
}

fn code_type_name(t: u8) -> &'static str {
    match t {
        0 => "legacy BIOS",
        1 => "Open Firmware",
        2 => "HP PA RISC",
        3 => "UEFI",
        _ => "other",
    }
}

/// `vfio-early rom dump ADDRESS -o FILE`: read, check, write atomically, print the
/// lines that use it. Exit 1 when the ROM cannot be read or is not usable.
pub fn dump(root: &Root, address: PciAddress, output: &Path) -> anyhow::Result<Outcome> {
    let mut sys = crate::bind::RealSysfs::new(root.clone());
    let data = match read_rom(&mut sys, address) {
        Ok(d) => d,
        Err(e) => {
            crate::errln!("vfio-early: error: {e}");
            return Ok(Outcome::Failed);
        }
    };
    let info = match parse_rom(&data) {
        Ok(i) => i,
        Err(e) => {
            crate::errln!(
                "vfio-early: error: the ROM of {address} is not usable: {e}; nothing written"
            );
            return Ok(Outcome::Failed);
        }
    };
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{} has no file name", output.display()))?;
    Root::new(dir).write_atomic(name, &data)?;
    let expected = crate::pci::read_device(root, address).id;
    crate::out!("{}", render(address, expected, &info, output))?;
    Ok(Outcome::Ok)
}

/// Reads the ROM of `addr`: enable, read, disable (always).
pub fn read_rom(sys: &mut dyn Sysfs, addr: PciAddress) -> Result<Vec<u8>, String> {
    let rel = Path::new(paths::PCI_DEVICES)
        .join(addr.to_string())
        .join("rom");
    let root = sys.root().clone();
    if !root.exists(&rel) {
        return Err(format!(
            "{addr} has no ROM attribute: the device has no option ROM (or {addr} is not a \
             device here; see `vfio-early list`)"
        ));
    }
    sys.write(&rel, "1")
        .map_err(|e| format!("enabling the ROM of {addr}: {e} (run as root)"))?;
    let read = sys.read_bytes(&rel, MAX_ROM);
    // Disabled again whatever the read gave.
    let disabled = sys.write(&rel, "0");
    let data = match read {
        Err(e) if e.raw_os_error() == Some(5) => {
            return Err(format!(
                "reading the ROM of {addr}: {e}. The ROM is probably shadowed because this \
                 GPU is the boot display: dump it with another GPU as the boot display \
                 (firmware setting or another slot), or take the card with vfio-pci first \
                 and retry; as a last resort use the vendor's ROM file"
            ))
        }
        Err(e) => return Err(format!("reading the ROM of {addr}: {e}")),
        Ok(d) => d,
    };
    disabled.map_err(|e| format!("disabling the ROM of {addr} again: {e}"))?;
    if data.is_empty() {
        return Err(format!(
            "the ROM of {addr} read as empty: the device exposes no ROM image"
        ));
    }
    Ok(data)
}

/// The report printed after a dump.
pub fn render(
    addr: PciAddress,
    expected: Option<VendorDevice>,
    info: &RomInfo,
    file: &Path,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ROM of {addr}: {} bytes, {} image(s)",
        info.size,
        info.images.len()
    );
    for img in &info.images {
        let _ = writeln!(
            out,
            "  at {:#07x}: {} bytes, {} {}",
            img.offset,
            img.length,
            code_type_name(img.code_type),
            img.id
        );
    }
    if let (Some(exp), Some(first)) = (expected, info.images.first()) {
        if first.id != exp {
            let _ = writeln!(
                out,
                "warning: the ROM names {} but the device is {exp}; some cards do this, \
                 but check you dumped the right one",
                first.id
            );
        }
    }
    let shown = file.display();
    let _ = writeln!(out, "wrote {shown}");
    let _ = writeln!(out, "QEMU:    -device vfio-pci,host={addr},romfile={shown}");
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "Proxmox: copy it to /usr/share/kvm/{name}, then hostpci0: {addr},romfile={name}"
    );
    out
}

/// A ROM with a legacy image and a UEFI image, for tests (here and in tests/it).
#[doc(hidden)]
pub fn sample_rom() -> Vec<u8> {
    let mut rom = Vec::new();
    for last in [false, true] {
        let mut img = vec![0u8; 1024];
        img[0] = 0x55;
        img[1] = 0xAA;
        img[0x18] = 0x40;
        img[0x40..0x44].copy_from_slice(b"PCIR");
        img[0x44..0x46].copy_from_slice(&0x1002u16.to_le_bytes());
        img[0x46..0x48].copy_from_slice(&0x67dfu16.to_le_bytes());
        img[0x50..0x52].copy_from_slice(&2u16.to_le_bytes());
        img[0x54] = if last { 3 } else { 0 };
        img[0x55] = if last { 0x80 } else { 0 };
        rom.extend(img);
    }
    rom
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_legacy_and_uefi_images() {
        let info = parse_rom(&sample_rom()).unwrap();
        assert_eq!(info.images.len(), 2);
        assert_eq!(info.images[1].code_type, 3);
        assert_eq!(info.images[0].id.to_string(), "1002:67df");
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(parse_rom(b"").is_err());
        assert!(parse_rom(&[0x55, 0xAA]).is_err());
        assert!(parse_rom(&[0u8; 64]).unwrap_err().contains("0x55AA"));
        let mut bad = sample_rom();
        bad[0x40] = b'X';
        assert!(parse_rom(&bad).unwrap_err().contains("PCIR"));
        let rom = sample_rom();
        for cut in 0..rom.len() {
            let _ = parse_rom(&rom[..cut]);
        }
    }
}
