//! PCI domain types and the inventory read from `<root>/sys`.
//!
//! [`PciAddress`], [`VendorDevice`] and [`PciClass`] parse once and travel as types.
//! [`enumerate_devices`] reads `sys/bus/pci/devices/*` exactly as the kernel lays it out
//! (symlinks for `driver` and `iommu_group`, hex attribute files). A device with a missing
//! or garbled attribute is kept with that field unknown: one odd device never makes the
//! whole inventory fail.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::paths;
use crate::root::Root;

/// A PCI function address, `dddd:bb:ss.f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

impl PciAddress {
    /// The same slot, function 0..7 excluded: used to find sibling functions.
    pub fn same_slot(&self, other: &PciAddress) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.slot == other.slot
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

/// Why a PCI address or id did not parse; the text is shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

impl FromStr for PciAddress {
    type Err = ParseError;

    /// Accepts `dddd:bb:ss.f` and `bb:ss.f` (domain 0), hex in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            ParseError(format!(
                "`{s}` is not a PCI address\nfix: write it as `lspci -D` shows it, \
                 e.g. \"0000:01:00.0\" (the domain is optional)"
            ))
        };
        let (rest, function) = s.rsplit_once('.').ok_or_else(err)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, slot) = match parts.as_slice() {
            [d, b, s] => (*d, *b, *s),
            [b, s] => ("0", *b, *s),
            _ => return Err(err()),
        };
        let hex_ok = |t: &str, max_len: usize| {
            !t.is_empty() && t.len() <= max_len && t.chars().all(|c| c.is_ascii_hexdigit())
        };
        if !hex_ok(domain, 8) || !hex_ok(bus, 2) || !hex_ok(slot, 2) || !hex_ok(function, 1) {
            return Err(err());
        }
        let domain = u32::from_str_radix(domain, 16).map_err(|_| err())?;
        let bus = u8::from_str_radix(bus, 16).map_err(|_| err())?;
        let slot = u8::from_str_radix(slot, 16).map_err(|_| err())?;
        let function = u8::from_str_radix(function, 16).map_err(|_| err())?;
        if slot > 0x1f || function > 7 {
            return Err(err());
        }
        Ok(PciAddress {
            domain,
            bus,
            slot,
            function,
        })
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A `vendor:device` pair (also used for subsystem ids), as `lspci -nn` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VendorDevice {
    pub vendor: u16,
    pub device: u16,
}

impl fmt::Display for VendorDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.device)
    }
}

impl FromStr for VendorDevice {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            ParseError(format!(
                "`{s}` is not a PCI id\nfix: write four hex digits, a colon and four hex \
                 digits, as `lspci -nn` shows them in brackets, e.g. \"10de:1b80\""
            ))
        };
        let (v, d) = s.split_once(':').ok_or_else(err)?;
        let ok = |t: &str| t.len() == 4 && t.chars().all(|c| c.is_ascii_hexdigit());
        if !ok(v) || !ok(d) {
            return Err(err());
        }
        Ok(VendorDevice {
            vendor: u16::from_str_radix(v, 16).map_err(|_| err())?,
            device: u16::from_str_radix(d, 16).map_err(|_| err())?,
        })
    }
}

impl Serialize for VendorDevice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for VendorDevice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The 24-bit PCI class code: base class, subclass, programming interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciClass(pub u32);

impl PciClass {
    pub fn base(self) -> u8 {
        (self.0 >> 16) as u8
    }
    pub fn sub(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Base class 0x03: VGA, XGA, 3D or other display controller.
    pub fn is_display(self) -> bool {
        self.base() == 0x03
    }
    /// Base class 0x06: host, ISA, PCI-to-PCI and other bridges.
    pub fn is_bridge(self) -> bool {
        self.base() == 0x06
    }

    /// A short human name, the words an admin knows from `lspci`.
    pub fn name(self) -> &'static str {
        match (self.base(), self.sub()) {
            (0x00, _) => "unclassified",
            (0x01, 0x00) => "SCSI",
            (0x01, 0x01) => "IDE",
            (0x01, 0x04) => "RAID",
            (0x01, 0x06) => "SATA",
            (0x01, 0x07) => "SAS",
            (0x01, 0x08) => "NVMe",
            (0x01, _) => "storage",
            (0x02, 0x00) => "Ethernet",
            (0x02, 0x80) => "network",
            (0x02, _) => "network",
            (0x03, 0x00) => "VGA",
            (0x03, 0x01) => "XGA",
            (0x03, 0x02) => "3D",
            (0x03, _) => "display",
            (0x04, 0x01) => "audio",
            (0x04, 0x03) => "audio",
            (0x04, _) => "multimedia",
            (0x05, _) => "memory",
            (0x06, 0x00) => "host bridge",
            (0x06, 0x01) => "ISA bridge",
            (0x06, 0x04) => "PCI bridge",
            (0x06, _) => "bridge",
            (0x07, _) => "communication",
            (0x08, _) => "system",
            (0x09, _) => "input",
            (0x0c, 0x03) => "USB",
            (0x0c, 0x05) => "SMBus",
            (0x0c, _) => "serial bus",
            (0x0d, _) => "wireless",
            (0x10, _) => "encryption",
            (0x11, _) => "signal processing",
            (0x12, _) => "accelerator",
            (0x13, _) => "instrumentation",
            _ => "other",
        }
    }
}

impl fmt::Display for PciClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06x}", self.0)
    }
}

impl Serialize for PciClass {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One PCI function as sysfs shows it. `None` means the attribute was missing or garbled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub address: PciAddress,
    pub id: Option<VendorDevice>,
    pub subsystem: Option<VendorDevice>,
    pub class: Option<PciClass>,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    pub iommu_group: Option<u32>,
    pub boot_vga: bool,
    pub modalias: Option<String>,
}

/// Reads a `0x1234`-style hex attribute.
fn read_hex(root: &Root, rel: &std::path::Path) -> Option<u32> {
    let text = root.read_attr(rel).ok()?;
    let digits = text.strip_prefix("0x").unwrap_or(&text);
    u32::from_str_radix(digits, 16).ok()
}

fn read_pair(root: &Root, dir: &std::path::Path, a: &str, b: &str) -> Option<VendorDevice> {
    let vendor = u16::try_from(read_hex(root, &dir.join(a))?).ok()?;
    let device = u16::try_from(read_hex(root, &dir.join(b))?).ok()?;
    Some(VendorDevice { vendor, device })
}

/// Reads one device directory, `sys/bus/pci/devices/<address>`.
pub fn read_device(root: &Root, address: PciAddress) -> Device {
    let dir = std::path::Path::new(paths::PCI_DEVICES).join(address.to_string());
    let driver_override = root
        .read_attr(dir.join("driver_override"))
        .ok()
        .filter(|s| !s.is_empty() && s != "(null)");
    Device {
        address,
        id: read_pair(root, &dir, "vendor", "device"),
        subsystem: read_pair(root, &dir, "subsystem_vendor", "subsystem_device"),
        class: read_hex(root, &dir.join("class")).map(|c| PciClass(c & 0x00ff_ffff)),
        driver: root.link_name(dir.join("driver")),
        driver_override,
        iommu_group: root
            .link_name(dir.join("iommu_group"))
            .and_then(|g| g.parse().ok()),
        boot_vga: root
            .read_attr(dir.join("boot_vga"))
            .map(|v| v == "1")
            .unwrap_or(false),
        modalias: root.read_attr(dir.join("modalias")).ok(),
    }
}

/// Every PCI function under `<root>/sys/bus/pci/devices`, sorted by address. Entries whose
/// name is not a PCI address are skipped; an absent directory gives an empty list (a
/// machine or container without PCI).
pub fn enumerate_devices(root: &Root) -> Vec<Device> {
    let mut devices: Vec<Device> = root
        .read_dir_names(paths::PCI_DEVICES)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| n.parse::<PciAddress>().ok())
        .map(|a| read_device(root, a))
        .collect();
    devices.sort_by_key(|d| d.address);
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_round_trips_and_defaults_domain() {
        let a: PciAddress = "01:00.1".parse().unwrap();
        assert_eq!(a.to_string(), "0000:01:00.1");
        let b: PciAddress = "000A:FF:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "000a:ff:1f.7");
    }

    #[test]
    fn address_rejects_garbage() {
        for s in [
            "",
            "1:2",
            "0000:01:00",
            "0000:01:20.0",
            "0000:01:00.8",
            "zz:00.0",
            "0000:001:00.0",
        ] {
            assert!(s.parse::<PciAddress>().is_err(), "{s} parsed");
        }
    }

    #[test]
    fn vendor_device_parses_any_case() {
        let v: VendorDevice = "10DE:1b80".parse().unwrap();
        assert_eq!(v.to_string(), "10de:1b80");
        for s in ["10de", "10de:1b8", "10de-1b80", "10de:1b80:0", "g0de:1b80"] {
            assert!(s.parse::<VendorDevice>().is_err(), "{s} parsed");
        }
    }

    #[test]
    fn class_names() {
        assert_eq!(PciClass(0x030000).name(), "VGA");
        assert_eq!(PciClass(0x040300).name(), "audio");
        assert_eq!(PciClass(0x010802).name(), "NVMe");
        assert_eq!(PciClass(0x060400).name(), "PCI bridge");
        assert!(PciClass(0x060000).is_bridge());
    }
}
