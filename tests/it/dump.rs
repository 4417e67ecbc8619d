//! `debug-dump` round trips: for each system-disk layout and bootloader the fake trees
//! build (LVM, LUKS on md RAID1, partitioned md, multi-device btrfs, bcache, a loop root,
//! an automount from fstab, swap, ZFS on Proxmox, NFS and iSCSI roots, systemd-boot
//! entries and UKIs, GRUB), `check` and `status` on the unpacked dump say what they say
//! on the original tree, refusal reasons included; and the dump leaves out secrets,
//! kernels and images.

use std::fs;

use crate::fake::{text, workstation, Dev, FakeMachine};

const NVME_ID: &str = "144d:a808";
const AHCI: &str = "0000:00:17.0";
const XHCI: &str = "0000:00:14.0";

/// Dumps `m` with the binary and unpacks the archive into a new tree.
fn round_trip(m: &FakeMachine) -> FakeMachine {
    let out = tempfile::tempdir().expect("tempdir");
    let archive = out.path().join("dump.cpio.gz");
    let run = m.run(&["debug-dump", "-o", archive.to_str().expect("utf-8")]);
    let err = text(m, &run.stderr);
    assert_eq!(run.status.code(), Some(0), "{err}");
    assert!(err.contains("entries); attach it"), "{err}");
    assert!(!err.contains("note:"), "a bound cut the dump: {err}");
    let unpacked = FakeMachine {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    vfio_early::dump::unpack(fs::File::open(&archive).expect("open"), unpacked.root())
        .expect("unpack");
    unpacked
}

/// Runs `args` on the original and on the dump; both must exit alike and print the same
/// (temporary roots shown as `<root>`). Returns the original's output.
fn same(m: &FakeMachine, d: &FakeMachine, args: &[&str]) -> String {
    let (a, b) = (m.run(args), d.run(args));
    let (out_a, out_b) = (text(m, &a.stdout), text(d, &b.stdout));
    assert_eq!(out_a, out_b, "`{}` differs on the dump", args.join(" "));
    assert_eq!(text(m, &a.stderr), text(d, &b.stderr), "{args:?} stderr");
    assert_eq!(a.status.code(), b.status.code(), "{args:?}: {out_a}");
    out_a
}

/// `check` on the original and its dump: the same verdicts and reasons. Returns the
/// original's report, for the test to say what it must hold.
fn check_round_trip(m: &FakeMachine) -> String {
    let d = round_trip(m);
    same(m, &d, &["check"])
}

fn nvme(m: &FakeMachine, addr: &'static str, group: u32) {
    m.add(
        Dev::new(addr, NVME_ID, 0x010802)
            .driver("nvme")
            .group(group),
    );
}

fn ahci(m: &FakeMachine, group: u32) {
    m.add(
        Dev::new(AHCI, "8086:a352", 0x010601)
            .driver("ahci")
            .group(group),
    );
}

fn nic(m: &FakeMachine, addr: &'static str, group: u32) {
    m.add(
        Dev::new(addr, "8086:10d3", 0x020000)
            .driver("e1000e")
            .group(group),
    );
}

/// The state an apply leaves: a manifest with the kernel arguments, the applied config.
fn applied(m: &FakeMachine, config: &str, kernel_args: &[&str]) {
    let args: Vec<String> = kernel_args.iter().map(|a| format!("\"{a}\"")).collect();
    m.write(
        "var/lib/vfio-early/manifest.json",
        &format!(
            "{{\"schema\": 1, \"files\": [\"etc/modprobe.d/vfio-early.conf\"], \
             \"dirs_created\": [], \"cmdline_added\": [], \"cmdline_before\": null, \
             \"cmdline_after\": null, \"kernel_args\": [{}], \"pending\": []}}\n",
            args.join(", ")
        ),
    );
    m.write(
        "var/lib/vfio-early/applied.toml",
        &format!("# The config as of the last `vfio-early apply`\n{config}"),
    );
    m.write(
        "etc/modprobe.d/vfio-early.conf",
        "options vfio-pci ids=10de:1b80\n",
    );
    m.config(config);
}

fn write_bytes(m: &FakeMachine, rel: &str, bytes: &[u8]) {
    let p = m.path(rel);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, bytes).expect("write");
}

/// A PE image with the given sections, as `ukify` lays out a UKI (minus the stub code).
fn pe(sections: &[(&str, &[u8])]) -> Vec<u8> {
    let pe = 0x80usize;
    let table = pe + 24;
    let mut data_at = 0x400usize;
    let mut out = vec![0u8; data_at];
    out[..2].copy_from_slice(b"MZ");
    out[0x3c..0x40].copy_from_slice(&(pe as u32).to_le_bytes());
    out[pe..pe + 4].copy_from_slice(b"PE\0\0");
    out[pe + 6..pe + 8].copy_from_slice(&(sections.len() as u16).to_le_bytes());
    for (i, (name, body)) in sections.iter().enumerate() {
        let s = table + i * 40;
        out[s..s + name.len()].copy_from_slice(name.as_bytes());
        let len = (body.len() as u32).to_le_bytes();
        out[s + 8..s + 12].copy_from_slice(&len);
        out[s + 16..s + 20].copy_from_slice(&len);
        out[s + 20..s + 24].copy_from_slice(&(data_at as u32).to_le_bytes());
        out.extend_from_slice(body);
        data_at += body.len();
    }
    out
}

#[test]
fn lvm_root_and_swap_on_nvme_multipath_survive_the_dump() {
    let m = FakeMachine::new();
    nvme(&m, "0000:02:00.0", 4);
    nic(&m, "0000:04:00.0", 6);
    m.lvm_root_on_nvme("0000:02:00.0");
    let dm = m.stacked("dm-1", "253:1", &["nvme0n1p2"]);
    m.write(&format!("{dm}/dm/name"), "vg0-swap\n");
    m.swaps(&["/dev/dm-1"]);
    m.config(&format!(
        "[[device]]\nid = \"{NVME_ID}\"\n\n[[device]]\nid = \"8086:10d3\"\n"
    ));
    let report = check_round_trip(&m);
    assert!(
        report.contains("(ext4 on dm-0 (vg0-root) > nvme0n1p3 > nvme0)"),
        "{report}"
    );
    assert!(
        report.contains("the active swap (partition dm-1 (vg0-swap) > nvme0n1p2 > nvme0)"),
        "{report}"
    );
    assert!(report.contains("take          0000:04:00.0"), "{report}");
}

#[test]
fn luks_on_md_raid1_and_swap_on_a_named_array_survive_the_dump() {
    let m = FakeMachine::new();
    ahci(&m, 3);
    nic(&m, "0000:04:00.0", 6);
    m.md_raid1_root(AHCI, true);
    // A second array for swap, named by its udev link /dev/md/swap only.
    m.sata_disk(AHCI, 2, "sdc", (8, 32), &[1]);
    let md = m.stacked("md127", "9:127", &["sdc1"]);
    m.write(&format!("{md}/md/level"), "raid0\n");
    m.link("dev/md127", "dev/md/swap");
    m.swaps(&["/dev/md/swap"]);
    m.config("[[device]]\nid = \"8086:a352\"\n");
    let report = check_round_trip(&m);
    assert!(
        report.contains("(ext4 on dm-0 (md0_crypt) > md0 (raid1) > sda1)"),
        "{report}"
    );
    assert!(
        report.contains("the active swap (partition md127 (raid0) > sdc1)"),
        "{report}"
    );
}

#[test]
fn a_partitioned_md_raid1_survives_the_dump() {
    let m = FakeMachine::new();
    ahci(&m, 3);
    m.md_raid1_root(AHCI, false);
    m.config("[[device]]\nid = \"8086:a352\"\n");
    let report = check_round_trip(&m);
    assert!(
        report.contains("(ext4 on md0p1 > md0 (raid1) > sda1)"),
        "{report}"
    );
}

#[test]
fn every_device_of_a_btrfs_root_survives_the_dump() {
    let m = FakeMachine::new();
    ahci(&m, 3);
    nvme(&m, "0000:02:00.0", 4);
    m.btrfs_root_on_two_disks(AHCI, "0000:02:00.0");
    m.config(&format!("[[device]]\nid = \"{NVME_ID}\"\n"));
    let report = check_round_trip(&m);
    assert!(
        report.contains("holds the filesystem mounted at / (btrfs on nvme0n1)"),
        "{report}"
    );
    assert!(!report.contains("cannot tell"), "{report}");
}

#[test]
fn a_bcache_var_survives_the_dump() {
    let m = workstation();
    ahci(&m, 7);
    m.sata_disk(AHCI, 1, "sdb", (8, 16), &[]);
    m.stacked("bcache0", "251:0", &["sdb"]);
    let mut mounts = m.read("proc/self/mountinfo");
    mounts.push_str("40 29 251:0 / /var rw - ext4 /dev/bcache0 rw\n");
    m.write("proc/self/mountinfo", &mounts);
    m.config("[[device]]\nid = \"8086:a352\"\n");
    let report = check_round_trip(&m);
    assert!(
        report.contains("the filesystem mounted at /var (ext4 on bcache0 > sdb)"),
        "{report}"
    );
}

#[test]
fn a_live_system_on_a_loop_device_survives_the_dump() {
    let m = FakeMachine::new();
    ahci(&m, 3);
    m.sata_disk(AHCI, 0, "sda", (8, 0), &[1]);
    m.block("sys/devices/virtual/block/loop0", "7:0", None);
    m.write(
        "sys/devices/virtual/block/loop0/loop/backing_file",
        "/run/live/medium/live/filesystem.squashfs\n",
    );
    m.mounts(&[
        ("7:0", "/", "squashfs", "/dev/loop0"),
        ("8:1", "/run/live/medium", "ext4", "/dev/sda1"),
    ]);
    m.config("[[device]]\nid = \"8086:a352\"\n");
    let report = check_round_trip(&m);
    assert!(
        report.contains(
            "(squashfs on loop0 backed by /run/live/medium/live/filesystem.squashfs on ext4 on sda1)"
        ),
        "{report}"
    );
}

#[test]
fn an_automounted_boot_found_through_fstab_and_udev_survives_the_dump() {
    let m = workstation();
    ahci(&m, 7);
    m.sata_disk(AHCI, 0, "sda", (8, 0), &[1]);
    m.link("dev/sda1", "dev/disk/by-uuid/0b1e-77aa");
    let mut mounts = m.read("proc/self/mountinfo");
    mounts.push_str("41 29 0:45 / /boot rw - autofs systemd-1 rw,fd=49\n");
    m.write("proc/self/mountinfo", &mounts);
    m.write(
        "etc/fstab",
        "# <file system> <mount point> <type> <options> <dump> <pass>\n\
         UUID=0b1e-77aa\t/boot\text4\tnoauto,x-systemd.automount\t0 2\n",
    );
    m.config("[[device]]\nid = \"8086:a352\"\n");
    let report = check_round_trip(&m);
    assert!(
        report.contains("/boot (automount of ext4 on sda1)"),
        "{report}"
    );
}

#[test]
fn the_controller_of_an_active_swap_partition_survives_the_dump() {
    let m = workstation();
    ahci(&m, 7);
    m.swap_on_sata(AHCI);
    m.config("[[device]]\nid = \"8086:a352\"\n");
    let report = check_round_trip(&m);
    assert!(
        report.contains("it holds the active swap (partition sda2)"),
        "{report}"
    );
}

#[test]
fn an_nfs_root_over_a_usb_nic_holds_back_the_usb_controller_after_the_dump() {
    // The USB NIC's only PCI device is the xHCI controller: only sys/class/net tells.
    let m = workstation();
    m.nfs_root("10.0.0.1:/srv/root");
    m.link(
        &format!("sys/devices/pci0000:00/{XHCI}/usb2/2-1/2-1:1.0/net/enx0c37961a2b3c"),
        "sys/class/net/enx0c37961a2b3c",
    );
    m.config("[[device]]\nid = \"8086:a36d\"\n\n[[device]]\nid = \"10de:1b80\"\n");
    let report = check_round_trip(&m);
    assert!(
        report.contains(&format!("REFUSED       {XHCI}")),
        "{report}"
    );
    assert!(
        report.contains("(nfs4 from 10.0.0.1:/srv/root; which network controller"),
        "{report}"
    );
    assert!(report.contains("take          0000:01:00.0"), "{report}");
}

#[test]
fn an_iscsi_root_over_a_bridged_bond_survives_the_dump() {
    let m = workstation();
    m.iscsi_root("0000:04:00.0");
    // The session is bound to br0, whose port bond0 has eth1 (04:00.0) as its lower.
    m.write(
        "sys/devices/platform/host2/iscsi_host/host2/netdev",
        "br0\n",
    );
    m.link("sys/devices/virtual/net/br0", "sys/class/net/br0");
    m.link("sys/devices/virtual/net/bond0", "sys/class/net/bond0");
    m.link(
        "sys/devices/virtual/net/bond0/brport",
        "sys/devices/virtual/net/br0/brif/bond0",
    );
    m.link(
        "sys/devices/pci0000:00/0000:04:00.0/net/eth1",
        "sys/devices/virtual/net/bond0/lower_eth1",
    );
    m.config("[[device]]\nid = \"8086:10d3\"\n");
    let report = check_round_trip(&m);
    assert!(report.contains("REFUSED       0000:04:00.0"), "{report}");
    assert!(report.contains("take          0000:03:00.0"), "{report}");
    assert!(
        report.contains("(ext4 on sdb1 (iSCSI session1 over br0))"),
        "{report}"
    );
}

#[test]
fn proxmox_on_zfs_survives_the_dump_with_its_bootloader() {
    let m = FakeMachine::new();
    m.add(Dev::new("0000:00:00.0", "8086:3e30", 0x060000).group(0));
    nvme(&m, "0000:02:00.0", 4);
    nvme(&m, "0000:03:00.0", 5);
    m.zfs_root("rpool", &["0000:02:00.0", "0000:03:00.0"]);
    m.initramfs_tools();
    let config = format!("[[device]]\nid = \"{NVME_ID}\"\n");
    m.proxmox(Some("root=ZFS=rpool/ROOT/pve-1 boot=zfs intel_iommu=on\n"));
    applied(&m, &config, &["intel_iommu=on"]);
    let d = round_trip(&m);
    let report = same(&m, &d, &["check"]);
    assert!(
        report.contains("cannot tell which device holds / (zfs pool rpool)"),
        "{report}"
    );
    let status = same(&m, &d, &["status", "--json"]);
    assert!(
        status.contains("/etc/kernel/cmdline (proxmox-boot-tool copies it to every ESP)"),
        "{status}"
    );
    // What the next boot gets is read from the files the dump kept.
    same(&m, &d, &["status"]);
}

#[test]
fn systemd_boot_entries_and_a_uki_survive_the_dump_without_the_kernel() {
    let m = workstation();
    let config = "[[device]]\nid = \"10de:1b80\"\n";
    m.systemd_boot(Some("root=UUID=x ro quiet intel_iommu=on\n"));
    m.write("usr/bin/kernel-install", "#!/bin/sh\n");
    m.write(
        "boot/efi/loader/loader.conf",
        "timeout 3\ndefault debian-6.1.0-*\n",
    );
    m.write(
        "boot/efi/loader/entries/debian-6.1.0-28-amd64.conf",
        "title Debian\noptions root=UUID=x ro quiet intel_iommu=on\nlinux /vmlinuz\n",
    );
    m.write(
        "boot/efi/loader/entries/debian-6.12.9-amd64.conf",
        "title Debian\noptions root=UUID=x ro quiet\nlinux /vmlinuz\n",
    );
    applied(&m, config, &["intel_iommu=on", "iommu=pt"]);
    let d = round_trip(&m);
    let status = same(&m, &d, &["status"]);
    assert!(
        status.contains("/boot/efi/loader/entries/debian-6.1.0-28-amd64.conf) lacks iommu=pt"),
        "{status}"
    );
    same(&m, &d, &["status", "--json"]);

    // The same host making UKIs: the newest one's .cmdline is what boots next.
    m.write("etc/kernel/install.conf", "layout=uki\n");
    let kernel = vec![0x5au8; 256 * 1024];
    write_bytes(
        &m,
        "boot/efi/EFI/Linux/debian-6.1.0-28-amd64.efi",
        &pe(&[
            (".linux", &kernel),
            (".cmdline", b"root=UUID=x intel_iommu=on\0"),
        ]),
    );
    write_bytes(
        &m,
        "boot/efi/EFI/Linux/debian-6.12.9-amd64.efi",
        &pe(&[
            (".linux", &kernel),
            (".cmdline", b"root=UUID=x intel_iommu=on iommu=pt\0"),
        ]),
    );
    let d = round_trip(&m);
    let status = same(&m, &d, &["status"]);
    assert!(
        status.contains(
            "the next boot (the .cmdline of /boot/efi/EFI/Linux/debian-6.12.9-amd64.efi) has"
        ),
        "{status}"
    );
    same(&m, &d, &["status", "--json"]);
    let uki = fs::metadata(d.path("boot/efi/EFI/Linux/debian-6.12.9-amd64.efi")).expect("uki");
    assert!(
        uki.len() < 1024,
        "the kernel was copied: {} bytes",
        uki.len()
    );
}

#[test]
fn the_dump_keeps_what_is_read_and_leaves_secrets_and_images_out() {
    let m = workstation();
    m.grub();
    m.initramfs_tools();
    m.write(
        "boot/grub/grub.cfg",
        "set superusers=\"admin\"\n  password_pbkdf2 admin grub.pbkdf2.sha512.10000.SECRETHASH\n\
         menuentry 'Debian' {\n\tlinux\t/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet intel_iommu=on\n}\n",
    );
    m.write(
        "etc/fstab",
        "UUID=x / ext4 errors=remount-ro 0 1\n\
         //nas/share /mnt/nas cifs username=alice,password=SECRETPASS 0 0\n",
    );
    m.write(
        "etc/shadow",
        "root:$6$SECRETSALT$SECRETHASH:19000:0:99999:7:::\n",
    );
    m.write(
        "etc/crypttab",
        "root_crypt UUID=y /etc/keys/root.key luks\n",
    );
    m.write("etc/keys/root.key", "SECRETKEY");
    m.write("root/.ssh/id_ed25519", "SECRETKEY");
    m.write("home/alice/.bash_history", "SECRET");
    m.write(
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: SECRET CPU\n",
    );
    m.write(
        "sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f",
        "\x06\0\0\0s\0y\0s\0t\0e\0m\0d\0SECRET",
    );
    m.write("var/lib/vfio-early/cmdline-tokens", "intel_iommu=on\n");
    applied(&m, "[[device]]\nid = \"10de:1b80\"\n", &["intel_iommu=on"]);
    let d = round_trip(&m);
    let status = same(&m, &d, &["status"]);
    assert!(
        status.contains("the next boot (grub.cfg's default entry) has intel_iommu=on"),
        "{status}"
    );

    // Kernels and initrds are never copied (status then differs: no image to verify).
    m.write("boot/vmlinuz-6.1.0-28-amd64", &"K".repeat(64 * 1024));
    m.write("boot/initrd.img-6.1.0-28-amd64", &"I".repeat(64 * 1024));
    let d = round_trip(&m);
    let tree = d.tree();
    let secrets: Vec<&String> = tree
        .iter()
        .filter(|(p, v)| p.contains("SECRET") || v.contains("SECRET"))
        .map(|(p, _)| p)
        .collect();
    assert!(secrets.is_empty(), "secrets in the dump: {secrets:?}");
    for gone in [
        "etc/shadow",
        "etc/crypttab",
        "etc/keys",
        "root",
        "home",
        "boot/vmlinuz-6.1.0-28-amd64",
        "boot/initrd.img-6.1.0-28-amd64",
    ] {
        assert!(!tree.contains_key(gone), "{gone} is in the dump");
    }
    // What is read is there, reduced to what is read.
    assert_eq!(
        tree.get("etc/fstab").map(String::as_str),
        Some(
            "# vfio-early debug-dump: spec, mount point and type only; options left out\n\
             UUID=x\t/\text4\n//nas/share\t/mnt/nas\tcifs\n"
        )
    );
    let grub = tree.get("boot/grub/grub.cfg").expect("grub.cfg");
    assert!(
        grub.contains("\tlinux\t/vmlinuz-6.1.0-28-amd64 root=UUID=x"),
        "{grub}"
    );
    assert_eq!(
        tree.get("sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")
            .map(String::as_str),
        Some("")
    );
    assert_eq!(
        tree.get("usr/sbin/update-grub").map(String::as_str),
        Some(""),
        "a command is stored by its presence"
    );
    assert_eq!(
        tree.get("var/lib/vfio-early/cmdline-tokens")
            .map(String::as_str),
        Some("intel_iommu=on\n")
    );
    assert_eq!(
        tree.get("proc/cpuinfo").map(String::as_str),
        Some("vendor_id\t: GenuineIntel\n")
    );
}
