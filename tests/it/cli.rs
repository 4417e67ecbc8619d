//! The CLI as a user runs it, on fake machine trees: `list`, `check`, `bind`, interlocks,
//! `bind --early` and `debug-dump`.

use crate::fake::{text, workstation, Dev, FakeMachine};

const GPU_AND_NIC: &str = r#"
[[device]]
id = "10de:1b80"

[[device]]
id = "8086:10d3"
address = "0000:04:00.0"
"#;

#[test]
fn list_table_shows_ids_groups_drivers_and_verdicts() {
    let m = workstation();
    m.config(GPU_AND_NIC);
    let out = m.run(&["list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    insta::assert_snapshot!(text(&m, &out.stdout));
}

#[test]
fn list_json_is_stable() {
    let m = workstation();
    m.config(GPU_AND_NIC);
    let out = m.run(&["list", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // The audio function follows the GPU; the other identical NIC stays.
    let verdict = |addr: &str| {
        v["devices"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["address"] == addr))
            .map(|d| d["verdict"].clone())
    };
    assert_eq!(verdict("0000:01:00.1"), Some(serde_json::json!("take")));
    assert_eq!(verdict("0000:03:00.0"), Some(serde_json::Value::Null));
    assert_eq!(verdict("0000:04:00.0"), Some(serde_json::json!("take")));
    insta::assert_snapshot!(text(&m, &out.stdout));
}

#[test]
fn list_without_config_selects_nothing() {
    let m = workstation();
    let out = m.run(&["list"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!text(&m, &out.stdout).contains("selected by the config"));
}

#[test]
fn check_passes_on_a_good_config() {
    let m = workstation();
    m.config(GPU_AND_NIC);
    let out = m.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stdout));
    insta::assert_snapshot!(text(&m, &out.stdout));
}

#[test]
fn check_refuses_the_root_disk_and_bind_changes_nothing() {
    let m = workstation();
    m.config("[[device]]\nid = \"144d:a808\"\n");
    let out = m.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&m, &out.stdout);
    assert!(report.contains("REFUSE"), "{report}");
    insta::assert_snapshot!(report);

    let out = m.run(&["bind"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&m, &out.stderr).contains("nothing was changed"));
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:02:00.0/driver_override"),
        "(null)\n"
    );
    assert_eq!(m.driver_of("0000:02:00.0").as_deref(), Some("nvme"));
}

#[test]
fn the_only_display_and_bridges_are_refused() {
    let m = workstation();
    // Both GPUs selected: the boot VGA would leave the host without a display.
    m.config(
        "[[device]]\nid = \"8086:3e92\"\n[[device]]\nid = \"10de:1b80\"\n\
         [[device]]\nid = \"8086:1901\"\n",
    );
    let out = m.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&m, &out.stdout);
    assert!(report.contains("boot VGA"), "{report}");
    assert!(report.contains("PCI bridge"), "{report}");
}

#[test]
fn a_second_display_lets_the_boot_vga_go() {
    // The discrete GPU stays with the host, so taking the iGPU leaves a console.
    let m = workstation();
    m.config("[[device]]\nid = \"8086:3e92\"\n");
    let out = m.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stdout));
}

#[test]
fn identity_mismatch_takes_nothing_and_says_so() {
    let m = workstation();
    m.config("[[device]]\nid = \"10de:1b80\"\naddress = \"0000:03:00.0\"\n");
    let out = m.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&m, &out.stdout);
    assert!(report.contains("is 8086:10d3, not 10de:1b80"), "{report}");
}

#[test]
fn group_split_is_explained() {
    let m = workstation();
    m.config("[[device]]\nid = \"10de:1b80\"\nwhole_slot = false\n");
    let out = m.run(&["check"]);
    let report = text(&m, &out.stdout);
    assert!(report.contains("IOMMU group 1"), "{report}");
    assert!(
        report.contains("0000:01:00.1 (audio, snd_hda_intel)"),
        "{report}"
    );
    assert!(
        !report.contains("0000:00:01.0 ("),
        "bridges are fine in a group: {report}"
    );
}

#[test]
fn bind_on_a_fake_root_writes_overrides_and_reports_what_it_could_not_do() {
    let m = workstation();
    m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"04:00.0\"\n");
    let out = m.run(&["bind"]);
    let err = text(&m, &out.stderr);
    // The override and unbind land; no kernel probes in a fake tree, which is reported,
    // and the override is cleared again (`\n` written in place over `vfio-pci`: the
    // kernel keeps the first line).
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:04:00.0/driver_override"),
        "\nfio-pci"
    );
    assert_eq!(m.read("sys/bus/pci/drivers/e1000e/unbind"), "0000:04:00.0");
    assert!(err.contains("would run `modprobe vfio-pci`"), "{err}");
    assert!(
        err.contains("0000:04:00.0: driver_override cleared; stays on e1000e"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    // The other identical NIC is untouched.
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:03:00.0/driver_override"),
        "(null)\n"
    );
}

#[test]
fn early_bind_honours_the_kill_switch() {
    let m = workstation();
    m.config(GPU_AND_NIC);
    m.write("proc/cmdline", "root=/dev/nvme0n1p2 vfio_early=off\n");
    let out = m.run(&["bind", "--early"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&m, &out.stderr).contains("vfio-early: warning: disabled by vfio_early=off"));
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:01:00.0/driver_override"),
        "(null)\n"
    );
}

#[test]
fn the_kill_switch_holds_on_a_command_line_that_is_not_utf8() {
    let m = workstation();
    m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"04:00.0\"\n");
    std::fs::write(
        m.path("proc/cmdline"),
        b"BOOT_IMAGE=/vmlinuz root=UUID=x ro label=\xff\xfe vfio_early=off quiet\n",
    )
    .expect("write");
    let out = m.run(&["bind", "--early"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&m, &out.stderr).contains("disabled by vfio_early=off"),
        "{}",
        text(&m, &out.stderr)
    );
    assert_eq!(m.read("sys/bus/pci/drivers/e1000e/unbind"), "");
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:04:00.0/driver_override"),
        "(null)\n"
    );
}

#[test]
fn early_bind_logs_to_kmsg_and_exits_zero_on_a_bad_config() {
    let m = workstation();
    m.write("dev/kmsg", "");
    m.config("[[device]]\nid = 12\n");
    let out = m.run(&["bind", "--early"]);
    assert_eq!(out.status.code(), Some(0));
    let kmsg = m.read("dev/kmsg");
    assert!(
        kmsg.starts_with("<3>vfio-early: config error, nothing bound:"),
        "{kmsg}"
    );
}

#[test]
fn early_bind_warns_about_a_missing_device_and_exits_zero() {
    let m = workstation();
    m.write("dev/kmsg", "");
    m.config("[[device]]\nid = \"1002:67df\"\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:07:00.0\"\n");
    let out = m.run(&["bind", "--early"]);
    assert_eq!(out.status.code(), Some(0));
    let kmsg = m.read("dev/kmsg");
    assert!(
        kmsg.contains("<4>vfio-early: entry 1: no device matches id 1002:67df"),
        "{kmsg}"
    );
    assert!(
        kmsg.contains("<4>vfio-early: entry 2: no device at 0000:07:00.0"),
        "{kmsg}"
    );
}

#[test]
fn early_bind_without_config_does_nothing() {
    let m = workstation();
    let out = m.run(&["bind", "--early"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&m, &out.stderr).contains("no config"));
}

#[test]
fn garbage_in_one_device_leaves_the_rest_listed() {
    let m = workstation();
    m.write("sys/devices/pci0000:00/0000:03:00.0/vendor", "garbage\n");
    std::fs::remove_file(m.path("sys/devices/pci0000:00/0000:04:00.0/iommu_group")).ok();
    let out = m.run(&["list", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let devs = v["devices"].as_array().expect("devices");
    assert_eq!(devs.len(), 9);
    let nic = devs
        .iter()
        .find(|d| d["address"] == "0000:03:00.0")
        .expect("nic");
    assert_eq!(nic["id"], serde_json::Value::Null);
    let nic2 = devs
        .iter()
        .find(|d| d["address"] == "0000:04:00.0")
        .expect("nic2");
    assert_eq!(nic2["iommu_group"], serde_json::Value::Null);
}

#[test]
fn missing_iommu_group_is_a_warning_in_check() {
    let m = workstation();
    std::fs::remove_file(m.path("sys/devices/pci0000:00/0000:04:00.0/iommu_group")).ok();
    m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"04:00.0\"\n");
    let out = m.run(&["check"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&m, &out.stdout).contains("has no IOMMU group"));
}

#[test]
fn debug_dump_round_trips_into_a_fixture_tree() {
    let m = workstation();
    m.config(GPU_AND_NIC);
    let archive = m.path("dump.cpio.gz");
    let out = m.run(&["debug-dump", "-o", archive.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    let unpacked = FakeMachine {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let n = vfio_early::dump::unpack(
        std::fs::File::open(&archive).expect("open"),
        unpacked.root(),
    )
    .expect("unpack");
    assert!(n > 50, "only {n} entries");
    let a = m.run(&["list", "--json"]);
    let b = unpacked.run(&["list", "--json"]);
    assert_eq!(text(&m, &a.stdout), text(&unpacked, &b.stdout));
    // Nothing beyond what the tool reads: the full cpuinfo is reduced to its vendor.
    assert_eq!(unpacked.read("proc/cpuinfo"), "vendor_id\t: GenuineIntel\n");
}

#[test]
fn a_fresh_tree_without_pci_lists_nothing() {
    let m = FakeMachine::new();
    let out = m.run(&["list"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&m, &out.stdout).contains("no PCI devices"));
    let _ = Dev::new("0000:00:00.0", "8086:0000", 0);
}

#[test]
fn without_an_iommu_bind_leaves_every_device_on_its_driver() {
    // vfio-pci cannot take a device without an IOMMU; binding anyway would leave the
    // NIC with no driver at all.
    let m = workstation();
    std::fs::remove_file(m.path("sys/class/iommu/dmar0")).expect("rm");
    m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"04:00.0\"\n");
    for args in [&["bind"][..], &["bind", "--early"][..]] {
        let out = m.run(args);
        let err = text(&m, &out.stderr);
        assert!(err.contains("no IOMMU is active"), "{args:?}: {err}");
        assert_eq!(
            m.read("sys/devices/pci0000:00/0000:04:00.0/driver_override"),
            "(null)\n",
            "{args:?}"
        );
        assert_eq!(m.driver_of("0000:04:00.0").as_deref(), Some("e1000e"));
    }
}

/// Both displays taken: the boot VGA (00:02.0) would leave the host without a console.
const BOTH_DISPLAYS: &str = "[[device]]\nid = \"8086:3e92\"\n\n[[device]]\nid = \"10de:1b80\"\n";

#[test]
fn the_early_binder_judges_the_interlocks_it_can_see_again() {
    // apply may have run where the devices were invisible (a chroot); at boot the
    // binder still keeps the host's only display unless apply was forced.
    let m = workstation();
    m.config(BOTH_DISPLAYS);
    let out = m.run(&["bind", "--early"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:00:02.0/driver_override"),
        "(null)\n",
        "the only display was taken: {}",
        text(&m, &out.stderr)
    );
    // Taken: unbound from its driver (and returned, as a fake tree has no vfio-pci).
    assert_eq!(m.read("sys/bus/pci/drivers/nouveau/unbind"), "0000:01:00.0");

    let m = workstation();
    m.config(BOTH_DISPLAYS);
    m.write("var/lib/vfio-early/forced", vfio_early::state::FORCED_TEXT);
    assert_eq!(m.run(&["bind", "--early"]).status.code(), Some(0));
    assert_eq!(
        m.read("sys/bus/pci/drivers/i915/unbind"),
        "0000:00:02.0",
        "apply --force is honoured at boot"
    );
}

/// The marker line older versions put into the applied config: config text that
/// carries it (e.g. applied.toml restored as the config) must not force anything.
const LEGACY_FORCED_LINE: &str =
    "# Applied with --force: the early binder overrides interlocks at boot too.";

#[test]
fn no_config_text_can_forge_apply_force() {
    let m = workstation();
    m.config(&format!("{LEGACY_FORCED_LINE}\n{BOTH_DISPLAYS}"));
    assert_eq!(m.run(&["bind", "--early"]).status.code(), Some(0));
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:00:02.0/driver_override"),
        "(null)\n",
        "a comment in the config forced the only display away"
    );
    // Nor does a plain apply of such a config pass force on to the boot.
    m.kernel_61();
    m.grub();
    let out = m.run(&["apply"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&m, &out.stderr));
    assert!(!m.path("var/lib/vfio-early/forced").exists());
}

#[test]
fn apply_force_is_recorded_for_the_early_binder() {
    let m = workstation();
    m.kernel_61();
    m.grub();
    m.config(BOTH_DISPLAYS);
    let out = m.run(&["apply"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&m, &out.stderr));
    let out = m.run(&["apply", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    assert_eq!(
        m.read("var/lib/vfio-early/forced"),
        vfio_early::state::FORCED_TEXT
    );
    let hook = m.run(&["hook-files", "--kernel", "6.1.0-28-amd64"]);
    assert!(
        String::from_utf8_lossy(&hook.stdout)
            .contains("file /var/lib/vfio-early/forced /var/lib/vfio-early/forced"),
        "the initramfs carries the marker"
    );
    // Applied again without --force (and without the display), the marker goes.
    m.config("[[device]]\nid = \"10de:1b80\"\n");
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    assert!(!m.path("var/lib/vfio-early/forced").exists());
}
