//! Fake machine trees in the kernel's real sysfs shape: device directories under
//! `sys/devices/pci0000:00/`, `sys/bus/pci/devices/*` symlinks into them, `driver` and
//! `iommu_group` symlinks, `sys/kernel/iommu_groups/N/devices/*` back-links, driver
//! directories with `bind`/`unbind`, `/proc` files, and a helper to run the binary.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Dev {
    pub addr: &'static str,
    pub id: &'static str,
    pub class: u32,
    pub subsystem: &'static str,
    pub driver: Option<&'static str>,
    pub group: Option<u32>,
    pub boot_vga: bool,
}

impl Dev {
    pub fn new(addr: &'static str, id: &'static str, class: u32) -> Self {
        Dev {
            addr,
            id,
            class,
            subsystem: "1af4:1100",
            driver: None,
            group: None,
            boot_vga: false,
        }
    }
    pub fn driver(mut self, d: &'static str) -> Self {
        self.driver = Some(d);
        self
    }
    pub fn group(mut self, g: u32) -> Self {
        self.group = Some(g);
        self
    }
    pub fn boot_vga(mut self) -> Self {
        self.boot_vga = true;
        self
    }
    pub fn subsystem(mut self, s: &'static str) -> Self {
        self.subsystem = s;
        self
    }
}

pub struct FakeMachine {
    pub dir: tempfile::TempDir,
}

impl FakeMachine {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = FakeMachine { dir };
        for d in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/kernel/iommu_groups",
            "sys/devices/pci0000:00",
            "sys/dev/block",
            "proc/self",
            "proc/sys/kernel",
            "etc",
            "dev",
        ] {
            fs::create_dir_all(m.path(d)).expect("mkdir");
        }
        m.write("sys/bus/pci/drivers_probe", "");
        m.write(
            "proc/cmdline",
            "BOOT_IMAGE=/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet\n",
        );
        m.write(
            "proc/cpuinfo",
            "processor\t: 0\nvendor_id\t: GenuineIntel\n",
        );
        m.write("proc/sys/kernel/osrelease", "6.1.0-28-amd64\n");
        m.write(
            "proc/self/mountinfo",
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n",
        );
        m
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, text).expect("write");
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    pub fn driver_dir(&self, name: &str) {
        let d = format!("sys/bus/pci/drivers/{name}");
        for f in ["bind", "unbind", "new_id"] {
            self.write(&format!("{d}/{f}"), "");
        }
    }

    pub fn add(&self, dev: Dev) -> &Self {
        let real = format!("sys/devices/pci0000:00/{}", dev.addr);
        let (vendor, device) = dev.id.split_once(':').expect("id");
        let (sv, sd) = dev.subsystem.split_once(':').expect("subsystem");
        self.write(&format!("{real}/vendor"), &format!("0x{vendor}\n"));
        self.write(&format!("{real}/device"), &format!("0x{device}\n"));
        self.write(&format!("{real}/subsystem_vendor"), &format!("0x{sv}\n"));
        self.write(&format!("{real}/subsystem_device"), &format!("0x{sd}\n"));
        self.write(&format!("{real}/class"), &format!("0x{:06x}\n", dev.class));
        self.write(&format!("{real}/driver_override"), "(null)\n");
        self.write(
            &format!("{real}/modalias"),
            &format!(
                "pci:v0000{}d0000{}sv0000{}sd0000{}bc{:02X}sc{:02X}i{:02X}\n",
                vendor.to_uppercase(),
                device.to_uppercase(),
                sv.to_uppercase(),
                sd.to_uppercase(),
                dev.class >> 16,
                (dev.class >> 8) & 0xff,
                dev.class & 0xff
            ),
        );
        if dev.class >> 16 == 0x03 {
            self.write(
                &format!("{real}/boot_vga"),
                if dev.boot_vga { "1\n" } else { "0\n" },
            );
        }
        symlink(
            format!("../../../devices/pci0000:00/{}", dev.addr),
            self.path(&format!("sys/bus/pci/devices/{}", dev.addr)),
        )
        .expect("symlink");
        if let Some(drv) = dev.driver {
            self.driver_dir(drv);
            symlink(
                format!("../../../bus/pci/drivers/{drv}"),
                self.path(&format!("{real}/driver")),
            )
            .expect("symlink");
        }
        if let Some(g) = dev.group {
            // IOMMU groups exist only when an IOMMU unit is registered.
            if fs::symlink_metadata(self.path("sys/class/iommu/dmar0")).is_err() {
                fs::create_dir_all(self.path("sys/class/iommu")).expect("mkdir");
                symlink(
                    "../../devices/virtual/iommu/dmar0",
                    self.path("sys/class/iommu/dmar0"),
                )
                .expect("symlink");
            }
            let gdir = format!("sys/kernel/iommu_groups/{g}/devices");
            fs::create_dir_all(self.path(&gdir)).expect("mkdir");
            symlink(
                format!("../../../../devices/pci0000:00/{}", dev.addr),
                self.path(&format!("{gdir}/{}", dev.addr)),
            )
            .expect("symlink");
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                self.path(&format!("{real}/iommu_group")),
            )
            .expect("symlink");
        }
        self
    }

    /// Makes `/` live on an NVMe namespace behind the controller at `addr`.
    pub fn root_fs_on(&self, addr: &str) {
        self.write(
            "proc/self/mountinfo",
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
             29 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro\n",
        );
        symlink(
            format!("../../devices/pci0000:00/{addr}/nvme/nvme0/nvme0n1/nvme0n1p2"),
            self.path("sys/dev/block/259:2"),
        )
        .expect("symlink");
    }

    pub fn config(&self, text: &str) {
        self.write("etc/vfio-early.toml", text);
    }

    pub fn driver_of(&self, addr: &str) -> Option<String> {
        fs::read_link(self.path(&format!("sys/devices/pci0000:00/{addr}/driver")))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// Runs the binary with `--root` set to this tree.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--root")
            .arg(self.root())
            .args(args)
            .output()
            .expect("run vfio-early")
    }
}

/// The binary under test: `VFIO_EARLY_BIN` (an installed package) or the one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os("VFIO_EARLY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vfio-early")))
}

/// Output text with the temporary root replaced, for snapshots.
pub fn text(m: &FakeMachine, bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace(&m.root().display().to_string(), "<root>")
}

/// A workstation: iGPU as boot VGA, a discrete GPU with HDMI audio in one group, two
/// identical NICs, an NVMe holding `/`, a USB controller, bridges.
pub fn workstation() -> FakeMachine {
    let m = FakeMachine::new();
    m.add(Dev::new("0000:00:00.0", "8086:3e30", 0x060000).group(0));
    m.add(
        Dev::new("0000:00:01.0", "8086:1901", 0x060400)
            .driver("pcieport")
            .group(1),
    );
    m.add(
        Dev::new("0000:00:02.0", "8086:3e92", 0x030000)
            .driver("i915")
            .group(2)
            .boot_vga(),
    );
    m.add(
        Dev::new("0000:00:14.0", "8086:a36d", 0x0c0330)
            .driver("xhci_hcd")
            .group(3),
    );
    m.add(
        Dev::new("0000:01:00.0", "10de:1b80", 0x030000)
            .driver("nouveau")
            .group(1)
            .subsystem("1458:3702"),
    );
    m.add(
        Dev::new("0000:01:00.1", "10de:10f0", 0x040300)
            .driver("snd_hda_intel")
            .group(1)
            .subsystem("1458:3702"),
    );
    m.add(
        Dev::new("0000:02:00.0", "144d:a808", 0x010802)
            .driver("nvme")
            .group(4),
    );
    m.add(
        Dev::new("0000:03:00.0", "8086:10d3", 0x020000)
            .driver("e1000e")
            .group(5),
    );
    m.add(
        Dev::new("0000:04:00.0", "8086:10d3", 0x020000)
            .driver("e1000e")
            .group(6),
    );
    m.root_fs_on("0000:02:00.0");
    m
}

/// Kernel module trees and bootloaders for the apply matrix.
impl FakeMachine {
    /// A Debian 12 kernel: `.ko` modules, `vfio_virqfd` present.
    pub fn kernel_61(&self) {
        self.kernel("6.1.0-28-amd64", ".ko", true);
    }

    /// A Debian 13 kernel: `.ko.xz` modules, no `vfio_virqfd` (merged into vfio in 6.2).
    pub fn kernel_612(&self) {
        self.kernel("6.12.48+deb13-amd64", ".ko.xz", false);
    }

    fn kernel(&self, version: &str, ext: &str, virqfd: bool) {
        let mut mods = vec![
            "kernel/drivers/vfio/vfio",
            "kernel/drivers/vfio/vfio_iommu_type1",
            "kernel/drivers/vfio/pci/vfio-pci-core",
            "kernel/drivers/vfio/pci/vfio-pci",
            "kernel/drivers/net/ethernet/intel/e1000e/e1000e",
            "kernel/drivers/gpu/drm/nouveau/nouveau",
            "kernel/sound/pci/hda/snd-hda-intel",
            "kernel/drivers/nvme/host/nvme",
        ];
        if virqfd {
            mods.push("kernel/drivers/vfio/vfio_virqfd");
        }
        let dep: String = mods.iter().map(|m| format!("{m}{ext}:\n")).collect();
        let dir = format!("lib/modules/{version}");
        self.write(&format!("{dir}/modules.dep"), &dep);
        self.write(
            &format!("{dir}/modules.alias"),
            "# Aliases extracted from modules themselves.\n\
             alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n\
             alias pci:v000010DEd*sv*sd*bc03sc*i* nouveau\n\
             alias pci:v*d*sv*sd*bc04sc03i* snd_hda_intel\n\
             alias pci:v*d*sv*sd*bc01sc08i02* nvme\n\
             alias usb:v*p*d*dc*dsc*dp*ic03isc01ip01in* usbhid\n",
        );
        self.write(
            &format!("{dir}/modules.builtin"),
            "kernel/drivers/pci/pcieport.ko\n",
        );
    }

    pub fn amd(&self) {
        self.write(
            "proc/cpuinfo",
            "processor\t: 0\nvendor_id\t: AuthenticAMD\n",
        );
    }

    pub fn initramfs_tools(&self) {
        self.write("usr/sbin/update-initramfs", "#!/bin/sh\n");
    }

    pub fn grub(&self) {
        self.write("usr/sbin/update-grub", "#!/bin/sh\n");
        self.write("boot/grub/grub.cfg", "# grub.cfg\n");
        self.write(
            "etc/default/grub",
            "GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"\"\n",
        );
    }

    pub fn systemd_boot(&self, cmdline: Option<&str>) {
        self.write("boot/efi/EFI/systemd/systemd-bootx64.efi", "MZ");
        if let Some(c) = cmdline {
            self.write("etc/kernel/cmdline", c);
        }
    }

    pub fn proxmox(&self, cmdline: Option<&str>) {
        self.write("usr/sbin/proxmox-boot-tool", "#!/bin/sh\n");
        self.write("etc/kernel/proxmox-boot-uuids", "5C1E-4A2B\n");
        if let Some(c) = cmdline {
            self.write("etc/kernel/cmdline", c);
        }
    }

    /// Every path under the root with its content (files), target (links) or `dir`.
    pub fn tree(&self) -> std::collections::BTreeMap<String, String> {
        fn walk(base: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let p = e.path();
                let rel = p.strip_prefix(base).expect("prefix").display().to_string();
                let meta = fs::symlink_metadata(&p).expect("meta");
                if meta.file_type().is_symlink() {
                    let t = fs::read_link(&p).expect("link");
                    out.insert(rel, format!("-> {}", t.display()));
                } else if meta.is_dir() {
                    out.insert(rel, "dir".into());
                    walk(base, &p, out);
                } else {
                    out.insert(
                        rel,
                        String::from_utf8_lossy(&fs::read(&p).expect("read")).into(),
                    );
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        walk(self.root(), self.root(), &mut out);
        out
    }
}
