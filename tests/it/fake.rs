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

    /// Proxmox VE on ZFS with UEFI: proxmox-boot-tool's ESPs boot systemd-boot (this
    /// boot was started by it).
    pub fn proxmox(&self, cmdline: Option<&str>) {
        self.proxmox_boot_tool(cmdline);
        self.write(
            "sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f",
            "",
        );
    }

    /// proxmox-boot-tool managing ESPs that boot GRUB (Secure Boot, PVE 8.1+): one is
    /// mounted here and holds `EFI/proxmox/grubx64.efi`.
    pub fn proxmox_grub(&self) {
        self.proxmox_boot_tool(None);
        self.write("boot/efi/EFI/proxmox/grubx64.efi", "MZ");
        self.grub();
    }

    /// proxmox-boot-tool with UEFI and nothing that tells what its ESPs boot.
    pub fn proxmox_boot_tool(&self, cmdline: Option<&str>) {
        self.write("usr/sbin/proxmox-boot-tool", "#!/bin/sh\n");
        self.write("etc/kernel/proxmox-boot-uuids", "5C1E-4A2B\n");
        fs::create_dir_all(self.path("sys/firmware/efi/efivars")).expect("mkdir");
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

/// The shortest relative symlink target from directory `from` to `to` (both relative to
/// the root), as the kernel writes its sysfs links.
fn rel_target(from: &str, to: &str) -> String {
    let f: Vec<&str> = from.split('/').filter(|s| !s.is_empty()).collect();
    let t: Vec<&str> = to.split('/').filter(|s| !s.is_empty()).collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; f.len() - common];
    parts.extend(&t[common..]);
    parts.join("/")
}

/// System disk layouts in the kernel's sysfs shape: block devices under their controller
/// (`sys/devices/pci0000:00/<addr>/.../block/<disk>/<part>`), `sys/class/block/<name>` and
/// `sys/dev/block/M:m` links into them, device-mapper and md devices under
/// `sys/devices/virtual/block/` with `slaves/` links, and the mount table and swap list
/// that name them.
impl FakeMachine {
    /// A symlink at `rel` pointing to `to` (both relative to the root), made relative.
    pub fn link(&self, to: &str, rel: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let from = Path::new(rel)
            .parent()
            .expect("parent")
            .to_str()
            .expect("utf-8");
        symlink(rel_target(from, to), p).expect("symlink");
    }

    /// A block device at `real` (a directory under `sys/devices/`) numbered `majmin`, with
    /// its `dev` file, `partition` for partitions, and its class and number links.
    pub fn block(&self, real: &str, majmin: &str, partition: Option<u32>) {
        let name = real.rsplit('/').next().expect("name");
        self.write(&format!("{real}/dev"), &format!("{majmin}\n"));
        if let Some(n) = partition {
            self.write(&format!("{real}/partition"), &format!("{n}\n"));
        }
        self.link(real, &format!("sys/class/block/{name}"));
        self.link(real, &format!("sys/dev/block/{majmin}"));
    }

    /// A stacked device (`dm-N` or `mdN`) under `sys/devices/virtual/block/` whose
    /// `slaves/` link to the named block devices (which must exist already).
    pub fn stacked(&self, name: &str, majmin: &str, slaves: &[&str]) -> String {
        let real = format!("sys/devices/virtual/block/{name}");
        self.block(&real, majmin, None);
        fs::create_dir_all(self.path(&format!("{real}/slaves"))).expect("mkdir");
        for s in slaves {
            let target = fs::read_link(self.path(&format!("sys/class/block/{s}"))).expect("slave");
            let to = format!(
                "sys/{}",
                target
                    .to_str()
                    .and_then(|t| t.strip_prefix("../../"))
                    .expect("a sys/class/block link")
            );
            self.link(&to, &format!("{real}/slaves/{s}"));
        }
        real
    }

    /// A SATA disk on AHCI port `port` of the controller at `addr`, with partitions.
    pub fn sata_disk(
        &self,
        addr: &str,
        port: u32,
        disk: &str,
        major_minor: (u32, u32),
        parts: &[u32],
    ) {
        let (major, minor) = major_minor;
        let real = format!(
            "sys/devices/pci0000:00/{addr}/ata{}/host{port}/target{port}:0:0/{port}:0:0:0/block/{disk}",
            port + 1
        );
        self.block(&real, &format!("{major}:{minor}"), None);
        for p in parts {
            self.block(
                &format!("{real}/{disk}{p}"),
                &format!("{major}:{}", minor + p),
                Some(*p),
            );
        }
    }

    /// Replaces the mount table: `/proc` plus one mountinfo line per `(majmin, mount
    /// point, fstype, source)`.
    pub fn mounts(&self, mounts: &[(&str, &str, &str, &str)]) {
        let mut text = String::from("22 1 0:21 / /proc rw,nosuid - proc proc rw\n");
        for (i, (majmin, point, fstype, source)) in mounts.iter().enumerate() {
            text.push_str(&format!(
                "{} 1 {majmin} / {point} rw,relatime shared:{} - {fstype} {source} rw\n",
                30 + i,
                i + 1
            ));
        }
        self.write("proc/self/mountinfo", &text);
    }

    /// `/proc/swaps` with one partition per device path.
    pub fn swaps(&self, devices: &[&str]) {
        let mut text = String::from("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n");
        for d in devices {
            text.push_str(&format!("{d:<40}partition\t8388604\t\t0\t\t-2\n"));
        }
        self.write("proc/swaps", &text);
    }

    /// `/` on LVM (`vg0-root`, dm-0) on the third partition of an NVMe namespace, `/boot/efi`
    /// on its first, behind the controller at `addr`. Debian's kernels enable native NVMe
    /// multipath, so the namespace hangs off `sys/devices/virtual/nvme-subsystem/`, which
    /// links to its controller.
    pub fn lvm_root_on_nvme(&self, addr: &str) {
        let ctrl = format!("sys/devices/pci0000:00/{addr}/nvme/nvme0");
        self.write(&format!("{ctrl}/address"), &format!("{addr}\n"));
        let subsys = "sys/devices/virtual/nvme-subsystem/nvme-subsys0";
        self.link(&ctrl, &format!("{subsys}/nvme0"));
        let ns = format!("{subsys}/nvme0n1");
        self.block(&ns, "259:0", None);
        for p in 1..=3 {
            self.block(&format!("{ns}/nvme0n1p{p}"), &format!("259:{p}"), Some(p));
        }
        let dm = self.stacked("dm-0", "253:0", &["nvme0n1p3"]);
        self.write(&format!("{dm}/dm/name"), "vg0-root\n");
        self.mounts(&[
            ("253:0", "/", "ext4", "/dev/mapper/vg0-root"),
            ("259:1", "/boot/efi", "vfat", "/dev/nvme0n1p1"),
        ]);
    }

    /// `/` on md RAID1 (`md0`) over `sda1` and `sdb1`, two SATA disks behind the AHCI
    /// controller at `ahci`: with `luks`, through dm-crypt (`md0_crypt`, dm-0) on md0;
    /// without, on the first partition of the partitioned array (`md0p1`, whose
    /// `slaves/` is empty: its disk is the parent directory).
    pub fn md_raid1_root(&self, ahci: &str, luks: bool) {
        self.sata_disk(ahci, 0, "sda", (8, 0), &[1]);
        self.sata_disk(ahci, 1, "sdb", (8, 16), &[1]);
        let md = self.stacked("md0", "9:0", &["sda1", "sdb1"]);
        self.write(&format!("{md}/md/level"), "raid1\n");
        if luks {
            let dm = self.stacked("dm-0", "253:0", &["md0"]);
            self.write(&format!("{dm}/dm/name"), "md0_crypt\n");
            self.mounts(&[("253:0", "/", "ext4", "/dev/mapper/md0_crypt")]);
        } else {
            self.block(&format!("{md}/md0p1"), "259:8", Some(1));
            self.mounts(&[("259:8", "/", "ext4", "/dev/md0p1")]);
        }
    }

    /// `/` on one btrfs filesystem over `sda2` (behind the SATA controller at `ahci`) and
    /// the whole NVMe disk `nvme0n1` (behind `nvme`). The mount table names only the
    /// first device; `sys/fs/btrfs/<fsid>/devices/` lists both.
    pub fn btrfs_root_on_two_disks(&self, ahci: &str, nvme: &str) {
        self.sata_disk(ahci, 0, "sda", (8, 0), &[1, 2]);
        let ns = format!("sys/devices/pci0000:00/{nvme}/nvme/nvme0/nvme0n1");
        self.block(&ns, "259:0", None);
        let fsid = "sys/fs/btrfs/4a1e6c2b-8f0d-4c7e-9a55-2f1b0c3d4e5f/devices";
        self.link(
            &format!("sys/devices/pci0000:00/{ahci}/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda2"),
            &format!("{fsid}/sda2"),
        );
        self.link(&ns, &format!("{fsid}/nvme0n1"));
        self.mounts(&[("0:31", "/", "btrfs", "/dev/sda2")]);
    }

    /// `/` on the ZFS dataset `<pool>/ROOT/pve-1`, as Proxmox installs it. Every NVMe
    /// controller's namespace gets its partitions; which of them the pool uses only
    /// `zpool status` on the host can tell.
    pub fn zfs_root(&self, pool: &str, nvme: &[&str]) {
        for (n, addr) in nvme.iter().enumerate() {
            let ns = format!("sys/devices/pci0000:00/{addr}/nvme/nvme{n}/nvme{n}n1");
            self.block(&ns, &format!("259:{}", n * 4), None);
            for p in 1..=3 {
                self.block(
                    &format!("{ns}/nvme{n}n1p{p}"),
                    &format!("259:{}", n * 4 + p as usize),
                    Some(p),
                );
            }
        }
        self.mounts(&[("0:25", "/", "zfs", &format!("{pool}/ROOT/pve-1"))]);
    }

    /// `/` on NFS (version 4) from `source` (`server:/export`).
    pub fn nfs_root(&self, source: &str) {
        self.link("sys/devices/virtual/net/lo", "sys/class/net/lo");
        self.mounts(&[("0:23", "/", "nfs4", source)]);
    }

    /// `/` on `sdb1` of an iSCSI session of the software initiator (host2, session1),
    /// bound to the interface `eth1` of the NIC at `nic`.
    pub fn iscsi_root(&self, nic: &str) {
        let host = "sys/devices/platform/host2";
        let disk = format!("{host}/session1/target2:0:0/2:0:0:0/block/sdb");
        self.block(&disk, "8:16", None);
        self.block(&format!("{disk}/sdb1"), "8:17", Some(1));
        self.write(&format!("{host}/iscsi_host/host2/netdev"), "eth1\n");
        self.link(
            &format!("{host}/iscsi_host/host2"),
            "sys/class/iscsi_host/host2",
        );
        self.link(
            &format!("sys/devices/pci0000:00/{nic}/net/eth1"),
            "sys/class/net/eth1",
        );
        self.mounts(&[("8:17", "/", "ext4", "/dev/sdb1")]);
    }

    /// An active swap partition `sda2` on a SATA disk behind the controller at `ahci`.
    pub fn swap_on_sata(&self, ahci: &str) {
        self.sata_disk(ahci, 0, "sda", (8, 0), &[1, 2]);
        self.swaps(&["/dev/sda2"]);
    }

    /// A tree without `/proc` at all, as a chroot without it mounted.
    pub fn without_proc(&self) {
        fs::remove_dir_all(self.path("proc")).expect("rm proc");
    }

    /// Adds a mount whose mount point is not UTF-8 (`/mnt/\xff\xfe`) to the mount table.
    pub fn mount_point_not_utf8(&self) {
        let mut bytes = fs::read(self.path("proc/self/mountinfo")).expect("mountinfo");
        bytes.extend_from_slice(b"40 1 8:33 / /mnt/\xff\xfe rw,relatime - ext4 /dev/sdc1 rw\n");
        fs::write(self.path("proc/self/mountinfo"), bytes).expect("write");
    }
}

/// Trees for trials (`apply --trial`): GRUB as Debian installs it (a grubenv,
/// `grub-reboot`, an `/etc/grub.d/10_linux` stand-in), systemd-boot with kernel-install's
/// Type #1 entries and `bootctl`, efivarfs in the mount table, the boot id, and the
/// machine as a trial boot sees it.
impl FakeMachine {
    /// GRUB for a trial: what [`FakeMachine::grub`] writes, plus an empty grubenv,
    /// `grub-reboot` and an executable `10_linux` stand-in.
    pub fn grub_for_trial(&self) {
        use std::os::unix::fs::PermissionsExt;
        self.grub();
        let mut env = String::from("# GRUB Environment Block\n");
        env.push_str(&"#".repeat(1024 - env.len()));
        self.write("boot/grub/grubenv", &env);
        self.write("usr/sbin/grub-reboot", "#!/bin/sh\n");
        self.write(
            "etc/grub.d/10_linux",
            "#!/bin/sh\n# stand-in for Debian's 10_linux\nexit 0\n",
        );
        fs::set_permissions(
            self.path("etc/grub.d/10_linux"),
            fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
    }

    /// `/proc/sys/kernel/random/boot_id`: which boot this is.
    pub fn boot_id(&self, id: &str) {
        self.write("proc/sys/kernel/random/boot_id", &format!("{id}\n"));
    }

    /// efivarfs in the mount table, read-write or read-only.
    pub fn efivars(&self, rw: bool) {
        let mut text = self.read("proc/self/mountinfo");
        text.push_str(&format!(
            "45 22 0:44 / /sys/firmware/efi/efivars {},nosuid,nodev,noexec,relatime shared:9 - efivarfs efivarfs rw\n",
            if rw { "rw" } else { "ro" }
        ));
        self.write("proc/self/mountinfo", &text);
    }

    /// systemd-boot for a trial: the loader on the ESP at `boot/efi`,
    /// `/etc/kernel/cmdline`, `bootctl`, efivarfs read-write; entries come from
    /// [`FakeMachine::kernel_install`].
    pub fn systemd_boot_for_trial(&self, cmdline: &str) {
        self.systemd_boot(Some(cmdline));
        self.write("usr/bin/bootctl", "#!/bin/sh\n");
        self.efivars(true);
    }

    /// What kernel-install writes for each kernel: a Type #1 entry (machine id `0b1c`)
    /// whose options are the first line of `/etc/kernel/cmdline` now.
    pub fn kernel_install(&self, kernels: &[&str]) {
        let cmdline = self.read("etc/kernel/cmdline");
        let options = cmdline.lines().next().unwrap_or("");
        for k in kernels {
            self.write(
                &format!("boot/efi/loader/entries/0b1c-{k}.conf"),
                &format!(
                    "title      Debian GNU/Linux 12 (bookworm)\nversion    {k}\n\
                     machine-id 0b1c\nsort-key   debian\noptions    {options}\n\
                     linux      /0b1c/{k}/linux\ninitrd     /0b1c/{k}/initrd.img-{k}\n"
                ),
            );
        }
    }

    /// The machine as a boot sees it: `cmdline`, boot id `boot`, each of `on_vfio`
    /// (address, IOMMU group) on vfio-pci with its `/dev/vfio` node, the vfio modules
    /// loaded, and a kernel log with the IOMMU and interrupt remapping on. The log
    /// starts with a padding record: vfio-early writes its own lines over the start of a
    /// plain file (the real `/dev/kmsg` appends).
    pub fn boot_into(&self, cmdline: &str, boot: &str, on_vfio: &[(&str, u32)]) {
        self.write("proc/cmdline", &format!("{cmdline}\n"));
        self.boot_id(boot);
        self.write(
            "dev/kmsg",
            &format!(
                "6,1,1,-;{}\n6,100,1000,-;DMAR: IOMMU enabled\n\
                 6,101,1001,-;DMAR-IR: Enabled IRQ remapping in x2apic mode\n",
                " ".repeat(2048)
            ),
        );
        for module in ["vfio", "vfio_iommu_type1", "vfio_pci"] {
            fs::create_dir_all(self.path(&format!("sys/module/{module}"))).expect("mkdir");
        }
        self.driver_dir("vfio-pci");
        for (addr, group) in on_vfio {
            let link = self.path(&format!("sys/devices/pci0000:00/{addr}/driver"));
            let _ = fs::remove_file(&link);
            symlink("../../../bus/pci/drivers/vfio-pci", link).expect("ln");
            self.write(&format!("dev/vfio/{group}"), "");
        }
    }
}
