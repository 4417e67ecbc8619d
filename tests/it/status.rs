//! `status` on fake machines: a healthy host after apply and reboot (every check PASS),
//! and each failure a user meets: no IOMMU, arguments missing from the command line, a
//! device on its old driver, a config edited since apply, a boot framebuffer holding the
//! GPU, an AMD GPU without vendor-reset.

use std::os::unix::fs::symlink;

use vfio_early::initramfs::testimg::{self, Cpio};

use crate::fake::{text, workstation, FakeMachine};

const GPU_AND_NIC: &str = "[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n";

/// A workstation after `apply` and a reboot that went right.
fn healthy() -> FakeMachine {
    let m = workstation();
    m.kernel_61();
    m.grub();
    m.config(GPU_AND_NIC);
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    m.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet intel_iommu=on iommu=pt\n",
    );
    // `sys/class/iommu/dmar0` comes with the fake machine's IOMMU groups.
    m.write(
        "dev/kmsg",
        "6,100,1000,-;DMAR: IOMMU enabled\n\
         6,101,1001,-;DMAR-IR: Enabled IRQ remapping in x2apic mode\n\
         6,300,2000,-;vfio-early: done: 3 of 3 device(s) on vfio-pci\n",
    );
    for module in ["vfio", "vfio_iommu_type1", "vfio_pci"] {
        std::fs::create_dir_all(m.path(&format!("sys/module/{module}"))).expect("mkdir");
    }
    m.driver_dir("vfio-pci");
    for addr in ["0000:01:00.0", "0000:01:00.1", "0000:04:00.0"] {
        let link = m.path(&format!("sys/devices/pci0000:00/{addr}/driver"));
        std::fs::remove_file(&link).expect("rm");
        symlink("../../../bus/pci/drivers/vfio-pci", link).expect("ln");
        m.write(
            &format!("sys/devices/pci0000:00/{addr}/reset_method"),
            "flr bus\n",
        );
    }
    m.write(
        "boot/grub/grub.cfg",
        "menuentry 'Debian GNU/Linux' {\n\tlinux /boot/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet intel_iommu=on iommu=pt\n}\n",
    );
    // A Debian-shaped image; 6.1 also has vfio_virqfd, in a segment of its own.
    let mut initrd = testimg::debian_like("6.1.0-28-amd64", testimg::zstd);
    initrd.extend(testimg::gzip(
        &Cpio::newc()
            .file(
                "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/vfio/vfio_virqfd.ko",
                b"",
            )
            .finish(),
    ));
    std::fs::write(m.path("boot/initrd.img-6.1.0-28-amd64"), initrd).expect("write initrd");
    m.write("dev/vfio/1", "");
    m.write("dev/vfio/6", "");
    m.write(
        "proc/iomem",
        "e0000000-efffffff : PCI Bus 0000:01\n  e0000000-efffffff : 0000:01:00.0\n",
    );
    m
}

#[test]
fn a_healthy_host_passes_every_check() {
    let m = healthy();
    let out = m.run(&["status"]);
    let report = text(&m, &out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        !report.contains("FAIL") && !report.contains("WARN"),
        "{report}"
    );
    insta::assert_snapshot!(report);
    let json = m.run(&["status", "--json"]);
    insta::assert_snapshot!("healthy_json", text(&m, &json.stdout));
}

#[test]
fn a_missing_argument_and_a_device_left_on_its_driver_fail() {
    let m = healthy();
    m.write("proc/cmdline", "root=UUID=x ro quiet iommu=pt\n");
    // Not a pending reboot: the bootloader's next boot lacks it too.
    m.write(
        "boot/grub/grub.cfg",
        "menuentry 'Debian GNU/Linux' {\n\tlinux /boot/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet iommu=pt\n}\n",
    );
    let link = m.path("sys/devices/pci0000:00/0000:04:00.0/driver");
    std::fs::remove_file(&link).expect("rm");
    symlink("../../../bus/pci/drivers/e1000e", link).expect("ln");
    let out = m.run(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&m, &out.stdout);
    assert!(
        report.contains("FAIL  cmdline             the kernel command line lacks intel_iommu=on"),
        "{report}"
    );
    assert!(
        report.contains("FAIL  device              0000:04:00.0 is on e1000e"),
        "{report}"
    );
}

#[test]
fn a_grub_cfg_without_the_arguments_fails() {
    let m = healthy();
    m.write(
        "boot/grub/grub.cfg",
        "\tlinux /boot/vmlinuz root=UUID=x ro quiet\n",
    );
    let out = m.run(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&m, &out.stdout).contains("FAIL  bootloader          grub.cfg has no boot entry"));
}

#[test]
fn no_iommu_is_a_clear_diagnosis() {
    let m = healthy();
    std::fs::remove_file(m.path("sys/class/iommu/dmar0")).expect("rm");
    m.write("dev/kmsg", "6,1,1,-;DMAR: IOMMU disabled\n");
    let out = m.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let iommu = &v["checks"][0];
    assert_eq!(iommu["id"], "iommu");
    assert_eq!(iommu["verdict"], "fail");
    assert!(iommu["fix"].as_str().is_some_and(|f| f.contains("VT-d")));
}

#[test]
fn an_edited_config_is_flagged_until_applied() {
    let m = healthy();
    m.config(&format!("{GPU_AND_NIC}\n[kvm]\nignore_msrs = true\n"));
    let out = m.run(&["status"]);
    let report = text(&m, &out.stdout);
    assert!(report.contains("WARN  applied"), "{report}");
    assert_eq!(out.status.code(), Some(0), "a warning is not a failure");
}

#[test]
fn a_boot_framebuffer_on_the_gpu_fails() {
    let m = healthy();
    m.write(
        "proc/iomem",
        "e0000000-efffffff : PCI Bus 0000:01\n  e0000000-efffffff : 0000:01:00.0\n    e0000000-e07fffff : BOOTFB\n",
    );
    let out = m.run(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&m, &out.stdout);
    assert!(
        report.contains("FAIL  framebuffer         BOOTFB still holds memory of 0000:01:00.0"),
        "{report}"
    );
    assert!(report.contains("sysfb-off"), "{report}");
}

#[test]
fn an_amd_gpu_without_device_specific_reset_gets_the_vendor_reset_hint() {
    let m = FakeMachine::new();
    m.add(
        crate::fake::Dev::new("0000:03:00.0", "1002:67df", 0x030000)
            .driver("vfio-pci")
            .group(7),
    );
    m.write("sys/devices/pci0000:00/0000:03:00.0/reset_method", "bus\n");
    m.config("[[device]]\nid = \"1002:67df\"\n");
    let out = m.run(&["status"]);
    let report = text(&m, &out.stdout);
    assert!(report.contains("WARN  reset-method        0000:03:00.0 resets by `bus`; many AMD GPUs need vendor-reset"), "{report}");
}

#[test]
fn an_initramfs_without_our_files_fails_and_says_how_to_rebuild() {
    let m = healthy();
    let stale = Cpio::newc()
        .file("usr/lib/modules/6.1.0-28-amd64/modules.dep", b"")
        .finish();
    std::fs::write(
        m.path("boot/initrd.img-6.1.0-28-amd64"),
        testimg::zstd(&stale),
    )
    .expect("write");
    let out = m.run(&["status"]);
    let report = text(&m, &out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAIL  initramfs           /boot/initrd.img-6.1.0-28-amd64 lacks vfio-early binary, config"),
        "{report}"
    );
    assert!(
        report.contains("run `vfio-early apply` (it rebuilds the initramfs)"),
        "{report}"
    );
}

#[test]
fn intel_iommu_on_without_an_iommu_unit_is_a_failure() {
    // `DMAR: IOMMU enabled` only echoes intel_iommu=on (seen booting QEMU without an
    // IOMMU); with no registered unit passthrough cannot work.
    let m = healthy();
    std::fs::remove_file(m.path("sys/class/iommu/dmar0")).expect("rm");
    m.write("dev/kmsg", "6,1,1,-;DMAR: IOMMU enabled\n");
    let out = m.run(&["status"]);
    let report = text(&m, &out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAIL  iommu               no IOMMU is active: the kernel was asked (`DMAR: IOMMU enabled`)"),
        "{report}"
    );
    assert!(
        report.contains("enable VT-d in the firmware setup"),
        "{report}"
    );
}

#[test]
fn an_entry_that_finds_no_device_is_a_warning() {
    let m = healthy();
    m.config(&format!("{GPU_AND_NIC}\n[[device]]\nid = \"1002:73bf\"\n"));
    let out = m.run(&["status"]);
    let report = text(&m, &out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a warning is not a failure: {report}"
    );
    assert!(
        report.contains("WARN  device              entry 3: no device 1002:73bf on this boot"),
        "{report}"
    );
}

#[test]
fn a_vfio_module_built_into_the_kernel_needs_no_file_in_the_initramfs() {
    let m = healthy();
    let dir = "lib/modules/6.1.0-28-amd64";
    let dep: String = m
        .read(&format!("{dir}/modules.dep"))
        .lines()
        .filter(|l| !l.contains("vfio-pci.ko"))
        .map(|l| format!("{l}\n"))
        .collect();
    m.write(&format!("{dir}/modules.dep"), &dep);
    m.write(
        &format!("{dir}/modules.builtin"),
        "kernel/drivers/pci/pcieport.ko\nkernel/drivers/vfio/pci/vfio-pci.ko\n",
    );
    let k = "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/vfio";
    let image = Cpio::newc()
        .file("usr/sbin/vfio-early", b"\x7fELF")
        .file("etc/vfio-early.toml", b"")
        .file("etc/modprobe.d/vfio-early.conf", b"")
        .file("scripts/init-top/00vfio-early", b"")
        .file(&format!("{k}/vfio.ko"), b"")
        .file(&format!("{k}/vfio_iommu_type1.ko"), b"")
        .file(&format!("{k}/vfio_virqfd.ko"), b"")
        .file(&format!("{k}/pci/vfio-pci-core.ko"), b"")
        .finish();
    std::fs::write(
        m.path("boot/initrd.img-6.1.0-28-amd64"),
        testimg::zstd(&image),
    )
    .expect("write");
    let out = m.run(&["status"]);
    let report = text(&m, &out.stdout);
    assert!(report.contains("PASS  initramfs"), "{report}");

    // Still required where the kernel has it as a module.
    m.write(
        &format!("{dir}/modules.dep"),
        &format!("{dep}kernel/drivers/vfio/pci/vfio-pci.ko:\n"),
    );
    let report = text(&m, &m.run(&["status"]).stdout);
    assert!(report.contains("lacks module vfio_pci"), "{report}");
}

#[test]
fn applied_but_not_rebooted_is_a_pending_reboot_not_a_broken_bootloader() {
    let m = healthy();
    m.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet\n",
    );
    let out = m.run(&["status"]);
    let report = text(&m, &out.stdout);
    assert!(
        report.contains("WARN  cmdline             reboot pending: the running kernel lacks intel_iommu=on iommu=pt, which the next boot (grub.cfg's default entry) has"),
        "{report}"
    );
    assert!(
        report.contains("PASS  next-boot           the next boot (grub.cfg's default entry) has intel_iommu=on iommu=pt"),
        "{report}"
    );
    // grub.cfg regenerated without them: the next boot is what is broken.
    m.write(
        "boot/grub/grub.cfg",
        "menuentry 'Debian GNU/Linux' {\n\tlinux /boot/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet\n}\n",
    );
    let report = text(&m, &m.run(&["status"]).stdout);
    assert!(
        report.contains("FAIL  next-boot           the next boot (grub.cfg's default entry) lacks intel_iommu=on iommu=pt"),
        "{report}"
    );
}
