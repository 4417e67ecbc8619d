//! `rom dump` against a simulated kernel: the ROM is enabled, read and always disabled
//! again; a shadowed boot-VGA ROM (EIO) is refused with the ways around it; a device
//! without a ROM and a garbage ROM are refused without writing a file.

use std::io;
use std::path::Path;

use vfio_early::bind::Sysfs;
use vfio_early::rom;
use vfio_early::root::Root;

use crate::fake::{text, Dev, FakeMachine};

struct RomKernel {
    root: Root,
    writes: Vec<String>,
    read_errno: Option<i32>,
}

impl Sysfs for RomKernel {
    fn root(&self) -> &Root {
        &self.root
    }
    fn write(&mut self, rel: &Path, value: &str) -> io::Result<()> {
        self.writes.push(format!("{} <- {value}", rel.display()));
        Ok(())
    }
    fn load_module(&mut self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn read_bytes(&mut self, rel: &Path, limit: u64) -> io::Result<Vec<u8>> {
        if let Some(e) = self.read_errno {
            return Err(io::Error::from_raw_os_error(e));
        }
        let data = std::fs::read(self.root.path(rel))?;
        Ok(data.into_iter().take(limit as usize).collect())
    }
}

fn gpu_with_rom(bytes: &[u8]) -> FakeMachine {
    let m = FakeMachine::new();
    m.add(
        Dev::new("0000:03:00.0", "1002:67df", 0x030000)
            .driver("amdgpu")
            .group(7),
    );
    std::fs::write(m.path("sys/devices/pci0000:00/0000:03:00.0/rom"), bytes).expect("rom");
    m
}

#[test]
fn the_rom_is_read_between_enable_and_disable() {
    let m = gpu_with_rom(&rom::sample_rom());
    let mut k = RomKernel {
        root: Root::new(m.root()),
        writes: Vec::new(),
        read_errno: None,
    };
    let data = rom::read_rom(&mut k, "03:00.0".parse().expect("addr")).expect("read");
    assert_eq!(data, rom::sample_rom());
    assert_eq!(
        k.writes,
        [
            "sys/bus/pci/devices/0000:03:00.0/rom <- 1",
            "sys/bus/pci/devices/0000:03:00.0/rom <- 0"
        ]
    );
    let info = rom::parse_rom(&data).expect("parse");
    let report = rom::render(
        "03:00.0".parse().expect("addr"),
        Some("1002:67df".parse().expect("id")),
        &info,
        Path::new("/root/rx580.rom"),
    );
    insta::assert_snapshot!(report);
}

#[test]
fn a_shadowed_rom_is_refused_with_a_hint_and_still_disabled() {
    let m = gpu_with_rom(&rom::sample_rom());
    let mut k = RomKernel {
        root: Root::new(m.root()),
        writes: Vec::new(),
        read_errno: Some(5),
    };
    let err = rom::read_rom(&mut k, "03:00.0".parse().expect("addr")).expect_err("eio");
    assert!(err.contains("boot display"), "{err}");
    assert_eq!(
        k.writes.last().map(String::as_str),
        Some("sys/bus/pci/devices/0000:03:00.0/rom <- 0")
    );
}

#[test]
fn cli_refuses_a_device_without_rom_and_a_garbage_rom() {
    let m = gpu_with_rom(b"not a rom at all");
    m.add(
        Dev::new("0000:04:00.0", "8086:10d3", 0x020000)
            .driver("e1000e")
            .group(8),
    );
    let out_file = m.path("out.rom");
    let o = out_file.to_str().expect("utf-8");
    let none = m.run(&["rom", "dump", "0000:04:00.0", "-o", o]);
    assert_eq!(none.status.code(), Some(1));
    assert!(text(&m, &none.stderr).contains("has no ROM attribute"));
    // In a fake tree the enable write lands in the file; the image stays garbage.
    let bad = m.run(&["rom", "dump", "0000:03:00.0", "-o", o]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&m, &bad.stderr).contains("not usable"),
        "{}",
        text(&m, &bad.stderr)
    );
    assert!(!out_file.exists(), "nothing may be written for a bad ROM");
}
