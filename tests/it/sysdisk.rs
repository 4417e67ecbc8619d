//! The system-disk interlock on fake machines, one layout each: ZFS on one of two
//! identical NVMe drives, LVM on NVMe, LUKS on md RAID1, md RAID1, multi-device btrfs,
//! swap, NFS and iSCSI roots, a tree without `/proc`, a mount table that is not UTF-8,
//! and a device whose class cannot be read. Where vfio-early cannot tell which devices
//! hold the system it refuses storage and network controllers, names the reason, and
//! writes nothing; `--force` overrides and says so.

use crate::fake::{text, workstation, Dev, FakeMachine};

const NVME_ID: &str = "144d:a808";
const AHCI: &str = "0000:00:17.0";

/// `check`'s exit code and report.
fn check(m: &FakeMachine) -> (Option<i32>, String) {
    let out = m.run(&["check"]);
    (out.status.code(), text(m, &out.stdout))
}

/// The verdict line of `check` for one device: `take`, `REFUSE` or `take (forced)`.
fn verdict(report: &str, address: &str) -> String {
    report
        .lines()
        .find(|l| l.contains(address) && l.contains('['))
        .map(|l| {
            l.trim_start()
                .split("  ")
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| format!("no line for {address} in:\n{report}"))
}

/// Proxmox on ZFS: two identical NVMe controllers, the root pool on one of them (which
/// one, only `zpool status` on the host can say), and an entry that selects by id only.
fn zfs_on_two_identical_nvme() -> FakeMachine {
    let m = FakeMachine::new();
    m.add(Dev::new("0000:00:00.0", "8086:3e30", 0x060000).group(0));
    m.add(
        Dev::new("0000:02:00.0", NVME_ID, 0x010802)
            .driver("nvme")
            .group(4),
    );
    m.add(
        Dev::new("0000:03:00.0", NVME_ID, 0x010802)
            .driver("nvme")
            .group(5),
    );
    m.zfs_root("rpool", &["0000:02:00.0", "0000:03:00.0"]);
    m.kernel_61();
    m.initramfs_tools();
    m.proxmox(Some("root=ZFS=rpool/ROOT/pve-1 boot=zfs\n"));
    m.config(&format!("[[device]]\nid = \"{NVME_ID}\"\n"));
    m
}

#[test]
fn zfs_root_on_one_of_two_identical_nvme_drives_is_refused() {
    let m = zfs_on_two_identical_nvme();
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(verdict(&report, "0000:02:00.0"), "REFUSED", "{report}");
    assert_eq!(verdict(&report, "0000:03:00.0"), "REFUSED", "{report}");
    assert!(
        report.contains("cannot tell which device holds / (zfs pool rpool)"),
        "{report}"
    );
    assert!(!report.contains("no problems found"), "{report}");
    insta::assert_snapshot!(report);
}

#[test]
fn zfs_root_apply_and_bind_refuse_and_change_nothing() {
    let m = zfs_on_two_identical_nvme();
    let before = m.tree();
    let out = m.run(&["apply"]);
    let err = text(&m, &out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refusing to take 0000:02:00.0: it is a storage controller and may hold the system: cannot tell which device holds / (zfs pool rpool)"),
        "{err}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    let out = m.run(&["bind"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&m, &out.stderr).contains("nothing was changed"));
    assert_eq!(before, m.tree(), "apply or bind changed the tree");
}

#[test]
fn zfs_root_force_overrides_and_says_so() {
    let m = zfs_on_two_identical_nvme();
    let out = m.run(&["apply", "--force"]);
    let err = text(&m, &out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    for addr in ["0000:02:00.0", "0000:03:00.0"] {
        assert!(
            err.contains(&format!(
                "{addr} taken although it is a storage controller and may hold the system: \
                 cannot tell which device holds / (zfs pool rpool) (--force)"
            )),
            "{err}"
        );
    }
    assert!(m
        .read("etc/modprobe.d/vfio-early.conf")
        .contains("softdep nvme pre: vfio-pci"));
}

#[test]
fn lvm_on_an_nvme_partition_is_traced_to_its_controller() {
    let m = FakeMachine::new();
    m.add(
        Dev::new("0000:02:00.0", NVME_ID, 0x010802)
            .driver("nvme")
            .group(4),
    );
    m.add(
        Dev::new("0000:04:00.0", "8086:10d3", 0x020000)
            .driver("e1000e")
            .group(6),
    );
    m.lvm_root_on_nvme("0000:02:00.0");
    m.config(&format!(
        "[[device]]\nid = \"{NVME_ID}\"\n\n[[device]]\nid = \"8086:10d3\"\n"
    ));
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains(
            "it holds the filesystem mounted at / (ext4 on dm-0 (vg0-root) > nvme0n1p3 > \
             nvme0) and the filesystem mounted at /boot/efi (vfat on nvme0n1p1 > nvme0); \
             the host would lose its disk"
        ),
        "{report}"
    );
    // Everything is known, so the NIC is not held back.
    assert_eq!(verdict(&report, "0000:04:00.0"), "take", "{report}");
}

/// An AHCI controller, a NIC, and `/` on md RAID1 (with or without LUKS) behind it.
fn md_machine(luks: bool) -> FakeMachine {
    let m = FakeMachine::new();
    m.add(
        Dev::new(AHCI, "8086:a352", 0x010601)
            .driver("ahci")
            .group(3),
    );
    m.add(
        Dev::new("0000:04:00.0", "8086:10d3", 0x020000)
            .driver("e1000e")
            .group(6),
    );
    m.md_raid1_root(AHCI, luks);
    m.config("[[device]]\nid = \"8086:a352\"\n");
    m
}

#[test]
fn luks_on_md_raid1_is_traced_to_the_sata_controller() {
    let (code, report) = check(&md_machine(true));
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(verdict(&report, AHCI), "REFUSED", "{report}");
    assert!(
        report.contains(
            "holds the filesystem mounted at / (ext4 on dm-0 (md0_crypt) > md0 (raid1) > sda1)"
        ),
        "{report}"
    );
}

#[test]
fn a_partitioned_md_raid1_is_traced_to_the_sata_controller() {
    let (code, report) = check(&md_machine(false));
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("holds the filesystem mounted at / (ext4 on md0p1 > md0 (raid1) > sda1)"),
        "{report}"
    );
}

#[test]
fn every_device_of_a_btrfs_root_is_refused() {
    let m = FakeMachine::new();
    m.add(
        Dev::new(AHCI, "8086:a352", 0x010601)
            .driver("ahci")
            .group(3),
    );
    m.add(
        Dev::new("0000:02:00.0", NVME_ID, 0x010802)
            .driver("nvme")
            .group(4),
    );
    m.btrfs_root_on_two_disks(AHCI, "0000:02:00.0");
    // The mount table names sda2 only; the NVMe disk is btrfs's second device.
    m.config(&format!("[[device]]\nid = \"{NVME_ID}\"\n"));
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("holds the filesystem mounted at / (btrfs on nvme0n1)"),
        "{report}"
    );
}

#[test]
fn the_controller_of_an_active_swap_partition_is_refused() {
    let m = workstation();
    m.add(
        Dev::new(AHCI, "8086:a352", 0x010601)
            .driver("ahci")
            .group(7),
    );
    m.swap_on_sata(AHCI);
    m.config("[[device]]\nid = \"8086:a352\"\n");
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("it holds the active swap (partition sda2); the host would lose its disk"),
        "{report}"
    );
}

#[test]
fn an_nfs_root_holds_back_every_nic_but_no_disk() {
    let m = FakeMachine::new();
    m.add(
        Dev::new("0000:02:00.0", NVME_ID, 0x010802)
            .driver("nvme")
            .group(4),
    );
    m.add(
        Dev::new("0000:04:00.0", "8086:10d3", 0x020000)
            .driver("e1000e")
            .group(6),
    );
    m.nfs_root("10.0.0.1:/srv/root");
    m.config(&format!(
        "[[device]]\nid = \"8086:10d3\"\n\n[[device]]\nid = \"{NVME_ID}\"\n"
    ));
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains(
            "holds the filesystem mounted at / (nfs4 from 10.0.0.1:/srv/root; which network \
             controller carries it cannot be known offline, so each one may)"
        ),
        "{report}"
    );
    assert_eq!(verdict(&report, "0000:04:00.0"), "REFUSED", "{report}");
    assert_eq!(verdict(&report, "0000:02:00.0"), "take", "{report}");
}

#[test]
fn an_iscsi_root_holds_back_the_nic_its_session_is_bound_to() {
    let m = workstation();
    m.iscsi_root("0000:04:00.0");
    // Both identical NICs are selected; only the one carrying the session is refused.
    m.config("[[device]]\nid = \"8086:10d3\"\n");
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(verdict(&report, "0000:04:00.0"), "REFUSED", "{report}");
    assert_eq!(verdict(&report, "0000:03:00.0"), "take", "{report}");
    assert!(
        report.contains(
            "holds the filesystem mounted at / (ext4 on sdb1 (iSCSI session1 over eth1))"
        ),
        "{report}"
    );
}

#[test]
fn without_proc_storage_and_network_are_refused_but_a_gpu_is_taken() {
    let m = workstation();
    m.without_proc();
    m.config(&format!(
        "[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n\n[[device]]\nid = \"{NVME_ID}\"\n"
    ));
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(verdict(&report, "0000:01:00.0"), "take", "{report}");
    assert_eq!(verdict(&report, "0000:04:00.0"), "REFUSED", "{report}");
    assert_eq!(verdict(&report, "0000:02:00.0"), "REFUSED", "{report}");
    assert!(
        report.contains(
            "it is a network controller and may hold the system: cannot read the mount table \
             (<root>/proc/self/mountinfo: No such file or directory"
        ),
        "{report}"
    );

    // The GPU alone goes through.
    m.config("[[device]]\nid = \"10de:1b80\"\n");
    let (code, report) = check(&m);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(verdict(&report, "0000:01:00.0"), "take", "{report}");
}

#[test]
fn a_mount_table_that_is_not_utf8_is_still_read() {
    let m = workstation();
    m.mount_point_not_utf8();
    m.config(&format!("[[device]]\nid = \"{NVME_ID}\"\n"));
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("holds the filesystem mounted at / (ext4 on nvme0n1p2)"),
        "{report}"
    );
}

#[test]
fn a_device_whose_class_cannot_be_read_is_refused() {
    let m = workstation();
    std::fs::remove_file(m.path("sys/devices/pci0000:00/0000:04:00.0/class")).expect("rm");
    m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n");
    let (code, report) = check(&m);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("it has a PCI class that cannot be read, so it may be a bridge"),
        "{report}"
    );
}

#[test]
fn in_the_initramfs_the_memory_root_holds_nothing_and_the_nic_is_bound() {
    // Before `/` is mounted the root is rootfs: nothing on a disk holds it, and the
    // early binder must not mistake that for "unknown" (the root disk is apply's call).
    let m = workstation();
    m.mounts(&[("0:2", "/", "rootfs", "rootfs")]);
    m.swaps(&[]);
    m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n");
    let out = m.run(&["bind", "--early"]);
    assert_eq!(out.status.code(), Some(0));
    // Taken, not refused: it was unbound from e1000e (with no vfio-pci module in a fake
    // tree it is then returned, which the bind tests cover).
    assert_eq!(
        m.read("sys/bus/pci/drivers/e1000e/unbind"),
        "0000:04:00.0",
        "{}",
        text(&m, &out.stderr)
    );
}
