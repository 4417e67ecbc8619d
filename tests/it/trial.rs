//! `apply --trial` and `vfio-early trial ...` on fake roots: a trial prepared on GRUB
//! and on systemd-boot without touching the default boot, the refusals per bootloader
//! (writing nothing), the trial entries (snapshots), verification in the trial boot
//! (a pass commits byte for byte what a plain `apply` writes; a failure keeps the
//! default and says why), the fallback when the trial boot never verified, abort and
//! undo, the early binder's choice of config, and a failure injected at every write of
//! each step, after which the next boot leaves the old or the new configuration.

use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use vfio_early::apply::{AtomicWriter, Writer};
use vfio_early::context::{ConfigNeed, Context, PlanMode};
use vfio_early::initramfs::testimg::{self, Cpio};
use vfio_early::root::Root;
use vfio_early::trial::{self, Phase};

use crate::fake::{text, workstation, Dev, FakeMachine};

/// The configuration in force: the GPU with its audio function, and one NIC.
const COMMITTED: &str = "[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n";
/// The configuration tried: the same devices, and one more kernel argument.
const TRIED: &str = "[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n\n[kernel]\nextra_args = [\"pci=realloc\"]\n";
/// [`TRIED`] with another argument: a different trial config.
const COMMITTED_PLUS_ARG: &str = "[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n\n[kernel]\nextra_args = [\"pci=nocrs\"]\n";
/// A configuration whose second device is absent: its trial fails verification.
const TRIED_ABSENT: &str = "[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:05:00.0\"\n";

/// The files of the default boot: what apply owns, and the bootloader's own.
const DEFAULT_BOOT: &[&str] = &[
    "etc/modprobe.d/vfio-early.conf",
    "etc/default/grub.d/vfio-early.cfg",
    "etc/kernel/cmdline",
    "var/lib/vfio-early/applied.toml",
    "var/lib/vfio-early/forced",
    "var/lib/vfio-early/manifest.json",
    "var/lib/vfio-early/cmdline-tokens",
    "boot/grub/grub.cfg",
    "boot/grub/grubenv",
    "boot/efi/loader/entries/0b1c-6.1.0-28-amd64.conf",
];

/// The devices the tried configurations take, with their IOMMU groups.
const ON_VFIO: &[(&str, u32)] = &[
    ("0000:01:00.0", 1),
    ("0000:01:00.1", 1),
    ("0000:04:00.0", 6),
];

const GRUB_TRIAL_BOOT: &str = "BOOT_IMAGE=/boot/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet \
    intel_iommu=on iommu=pt pci=realloc vfio_early.trial panic=10";
const GRUB_DEFAULT_BOOT: &str =
    "BOOT_IMAGE=/boot/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet intel_iommu=on iommu=pt";

fn ok(m: &FakeMachine, args: &[&str]) -> String {
    let out = m.run(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}\n{}\n{}",
        text(m, &out.stdout),
        text(m, &out.stderr)
    );
    text(m, &out.stdout)
}

fn default_boot(m: &FakeMachine) -> Vec<Option<Vec<u8>>> {
    DEFAULT_BOOT
        .iter()
        .map(|f| std::fs::read(m.path(f)).ok())
        .collect()
}

fn state(m: &FakeMachine) -> trial::State {
    trial::read_state(&Root::new(m.root()))
        .expect("state readable")
        .expect("a trial state")
}

/// A Debian 12 workstation on GRUB, with [`COMMITTED`] applied, in boot `boot-1`.
fn grub_host() -> FakeMachine {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub_for_trial();
    m.boot_id("boot-1");
    m.config(COMMITTED);
    ok(&m, &["apply"]);
    m
}

/// The same on systemd-boot (kernel-install entries for two kernels).
fn sdboot_host() -> FakeMachine {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.systemd_boot_for_trial("root=UUID=0b1c ro quiet\n");
    m.boot_id("boot-1");
    m.config(COMMITTED);
    ok(&m, &["apply"]);
    m.kernel_install(&["6.1.0-28-amd64", "6.1.0-27-amd64"]);
    m
}

const TRIAL_ENTRY: &str = "boot/efi/loader/entries/vfio-early-trial+1.conf";

/// The trial boot of systemd-boot: the kernel command line is the trial entry's options.
fn sdboot_trial_cmdline(m: &FakeMachine) -> String {
    let entry = m.read(TRIAL_ENTRY);
    let options = entry
        .lines()
        .find_map(|l| l.strip_prefix("options"))
        .expect("options")
        .trim();
    format!("initrd=\\0b1c\\6.1.0-28-amd64\\initrd.img-6.1.0-28-amd64 {options}")
}

#[test]
fn a_grub_trial_is_prepared_without_touching_the_default_boot() {
    let m = grub_host();
    let hooks_before = ok(&m, &["hook-files", "--kernel", "6.1.0-28-amd64"]);
    let before = default_boot(&m);
    m.config(TRIED);
    let out = ok(&m, &["apply", "--trial"]);
    insta::assert_snapshot!(out);
    assert_eq!(default_boot(&m), before, "the default boot changed");
    let s = state(&m);
    assert_eq!(s.phase, Phase::Prepared);
    assert_eq!(s.prepared_boot.as_deref(), Some("boot-1"));
    assert_eq!(m.read("var/lib/vfio-early/trial/config.toml"), TRIED);
    let script = m.path("etc/grub.d/42_vfio-early-trial");
    assert_eq!(
        std::fs::read_to_string(&script).expect("script"),
        vfio_early::grubmenu::render_script()
    );
    let mode = std::fs::metadata(&script)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o755,
        "grub-mkconfig runs only executable scripts"
    );
    let sh = Command::new("sh")
        .arg("-n")
        .arg(&script)
        .status()
        .expect("sh");
    assert!(sh.success(), "the script is valid sh");
    // The initramfs keeps the committed config as it was and gains the trial's.
    let hooks = ok(&m, &["hook-files", "--kernel", "6.1.0-28-amd64"]);
    for line in hooks_before.lines() {
        assert!(hooks.contains(line), "{line} left the initramfs:\n{hooks}");
    }
    assert!(
        hooks.contains("file /var/lib/vfio-early/trial/config.toml /etc/vfio-early-trial.toml\n"),
        "{hooks}"
    );
    // `status` says a trial is waiting; a plain apply and a second trial are refused.
    let status = text(&m, &m.run(&["status"]).stdout);
    assert!(
        status.contains("WARN  trial") && status.contains("the next boot (only that one)"),
        "{status}"
    );
    for args in [&["apply"][..], &["apply", "--trial"]] {
        let out = m.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&m, &out.stderr).contains("a trial is already under way")
                || text(&m, &out.stderr).contains("a trial is under way")
        );
    }
    assert_eq!(default_boot(&m), before);
}

/// Builds `/boot/initrd.img-<kver>` as the hooks would now: every file and module
/// `hook-files` lists, the binary and the boot script (`edit` changes the archive).
fn image_as_hooks_build_it(m: &FakeMachine, kver: &str, edit: impl FnOnce(&mut Cpio)) {
    let mut cpio = Cpio::newc();
    cpio.file(
        "usr/sbin/vfio-early",
        &std::fs::read(m.path("usr/sbin/vfio-early")).expect("binary"),
    )
    .file("scripts/init-top/00vfio-early", b"#!/bin/sh\n");
    for line in ok(m, &["hook-files", "--kernel", kver]).lines() {
        match line.split(' ').collect::<Vec<_>>()[..] {
            ["file", src, dest] => {
                let bytes = std::fs::read(m.path(src.trim_start_matches('/'))).expect("hook file");
                cpio.file(dest.trim_start_matches('/'), &bytes);
            }
            ["module", name] => {
                cpio.file(
                    &format!("usr/lib/modules/{kver}/kernel/drivers/vfio/{name}.ko"),
                    b"ko",
                );
            }
            _ => panic!("{line}"),
        }
    }
    edit(&mut cpio);
    let image = testimg::zstd(&cpio.finish());
    std::fs::write(m.path(&format!("boot/initrd.img-{kver}")), image).expect("image written");
}

/// A trial of [`TRIED`] whose rebuild made the image (as [`image_as_hooks_build_it`],
/// changed by `edit`), then aborted; returns what `apply --trial` said.
fn tried_then_aborted(m: &FakeMachine, kver: &str, edit: impl FnOnce(&mut Cpio)) -> String {
    m.config(TRIED);
    let out = ok(m, &["apply", "--trial"]);
    image_as_hooks_build_it(m, kver, edit);
    ok(m, &["trial", "abort"]);
    out
}

#[test]
fn a_retried_trial_keeps_images_that_already_hold_it() {
    let m = grub_host();
    let kver = "6.1.0-28-amd64";
    m.write("usr/sbin/vfio-early", "the installed binary");
    // The first trial's rebuild made the image; the trial fails (here: aborted).
    let first = tried_then_aborted(&m, kver, |_| {});
    assert!(
        first.contains(&format!(
            "initramfs: rebuilt (no initramfs for {kver} in /boot)"
        )),
        "{first}"
    );
    m.config(TRIED);
    let again = ok(&m, &["apply", "--trial", "--trial-arg", "rootdelay=5"]);
    assert!(
        again.contains(
            "initramfs: kept: its 1 image(s) already hold this trial's files, byte for byte"
        ),
        "{again}"
    );
    assert!(!again.contains("update-initramfs"), "{again}");
    assert!(again.contains("would run: update-grub"), "{again}");
    ok(&m, &["trial", "abort"]);
    // Anything of ours that differs or is extra means a rebuild, and says why.
    type Edit = fn(&mut Cpio);
    let cases: [(&str, Edit, &str); 3] = [
        (
            COMMITTED_PLUS_ARG,
            |_| {},
            "/etc/vfio-early-trial.toml differs",
        ),
        (
            TRIED,
            |c| {
                c.file("var/lib/vfio-early/trial/forced", b"x");
            },
            "/var/lib/vfio-early/trial/forced is there",
        ),
        (
            TRIED,
            |c| {
                c.file("usr/sbin/vfio-early", b"an older binary");
            },
            "the vfio-early binary differs from the installed one",
        ),
    ];
    for (config, edit, why) in cases {
        tried_then_aborted(&m, kver, edit);
        m.config(config);
        let out = ok(&m, &["apply", "--trial", "--dry-run"]);
        assert!(
            out.contains(&format!(
                "initramfs: rebuilt ({why} in /boot/initrd.img-{kver})"
            )),
            "{why}: {out}"
        );
        assert!(
            out.contains("would run: update-initramfs -u -k all"),
            "{why}: {out}"
        );
    }
}

#[test]
fn on_systemd_boot_the_esp_copy_of_the_image_counts_too() {
    let m = sdboot_host();
    let kver = "6.1.0-28-amd64";
    m.write("usr/sbin/vfio-early", "the installed binary");
    tried_then_aborted(&m, kver, |_| {});
    // The default entry boots the ESP's copy, which kernel-install has not refreshed.
    let esp = format!("boot/efi/0b1c/{kver}/initrd.img-{kver}");
    m.write(&esp, "an older image");
    let out = ok(&m, &["apply", "--trial", "--dry-run"]);
    assert!(
        out.contains(&format!(
            "initramfs: rebuilt (/{esp} is not a copy of an image in /boot)"
        )),
        "{out}"
    );
    std::fs::copy(m.path(&format!("boot/initrd.img-{kver}")), m.path(&esp)).expect("copied");
    let out = ok(&m, &["apply", "--trial", "--dry-run"]);
    assert!(out.contains("initramfs: kept: its 1 image(s)"), "{out}");
    assert!(!out.contains("update-initramfs"), "{out}");
}

#[test]
fn the_config_already_applied_has_nothing_to_try() {
    let m = grub_host();
    let before = m.tree();
    let out = m.run(&["apply", "--trial"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&m, &out.stdout).contains("nothing to try"));
    assert_eq!(m.tree(), before);
}

/// `10_linux` as Debian 12 prints it with submenus and recovery entries off, with the
/// committed drop-in's arguments on each `linux` line.
const LINUX_OUTPUT: &str = "\
menuentry 'Debian GNU/Linux, with Linux 6.1.0-28-amd64' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-6.1.0-28-amd64-advanced-0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e' {
	load_video
	insmod gzio
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root 0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e
	echo	'Loading Linux 6.1.0-28-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-28-amd64 root=UUID=0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e ro  quiet intel_iommu=on iommu=pt
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-28-amd64
}
menuentry 'Debian GNU/Linux, with Linux 6.1.0-27-amd64' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-6.1.0-27-amd64-advanced-0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e' {
	load_video
	insmod gzio
	linux	/boot/vmlinuz-6.1.0-27-amd64 root=UUID=0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e ro  quiet intel_iommu=on iommu=pt
	initrd	/boot/initrd.img-6.1.0-27-amd64
}
";

fn grub_entry(m: &FakeMachine, input: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(crate::fake::bin())
        .arg("--root")
        .arg(m.root())
        .args(["trial", "grub-entry"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("feed");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        text(m, &out.stdout),
        text(m, &out.stderr),
    )
}

#[test]
fn the_grub_trial_entry_is_10_linux_first_entry_with_the_trial_arguments() {
    let m = grub_host();
    // No trial: the script prints nothing (update-grub stays as it was).
    assert_eq!(
        grub_entry(&m, LINUX_OUTPUT),
        (Some(0), String::new(), String::new())
    );
    m.config(TRIED);
    ok(&m, &["apply", "--trial"]);
    let (code, entry, err) = grub_entry(&m, LINUX_OUTPUT);
    assert_eq!(code, Some(0), "{err}");
    insta::assert_snapshot!(entry);
    // Input it cannot use never fails grub-mkconfig: a line on stderr, exit 0.
    let (code, entry, err) = grub_entry(&m, "menuentry 'x' {\n");
    assert_eq!((code, entry.as_str()), (Some(0), ""));
    assert!(err.contains("no trial entry"), "{err}");
}

#[test]
fn a_systemd_boot_trial_is_a_boot_counted_copy_of_the_default_entry() {
    let m = sdboot_host();
    let before = default_boot(&m);
    m.config(TRIED);
    let out = ok(&m, &["apply", "--trial"]);
    assert_eq!(default_boot(&m), before, "the default boot changed");
    let entry = m.read(TRIAL_ENTRY);
    insta::assert_snapshot!(format!("{out}\n==> /{TRIAL_ENTRY} <==\n{entry}"));
    let s = state(&m);
    assert_eq!(s.phase, Phase::Prepared);
    assert_eq!(s.entries, [TRIAL_ENTRY]);
}

/// A machine whose only device to take is one NIC, for layouts `workstation` cannot mix.
fn plain_machine() -> FakeMachine {
    let m = FakeMachine::new();
    m.add(
        Dev::new("0000:04:00.0", "8086:10d3", 0x020000)
            .driver("e1000e")
            .group(6),
    );
    m.initramfs_tools();
    m.kernel_61();
    m.boot_id("boot-1");
    m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n");
    m
}

#[test]
fn trials_that_cannot_fall_back_are_refused_with_the_reason_and_nothing_written() {
    type Setup = fn(&FakeMachine);
    let cases: Vec<(&str, Setup, &str)> = vec![
        (
            "grub, / on btrfs",
            |m| {
                m.grub_for_trial();
                m.btrfs_root_on_two_disks("0000:00:17.0", "0000:02:00.0");
            },
            "/ is on btrfs: GRUB cannot write its environment block",
        ),
        (
            "grub, / on LVM",
            |m| {
                m.grub_for_trial();
                m.lvm_root_on_nvme("0000:02:00.0");
                m.write(
                    "sys/devices/virtual/block/dm-0/dm/uuid",
                    "LVM-kdH4JFuvrIAdpXLfKcXwlmTLddfjTEjvtJibfeEwT691fmQqcBCvlPctKJAZEOa8\n",
                );
            },
            "/ is on LVM (dm-0 vg0-root)",
        ),
        (
            "grub, / on md RAID1",
            |m| {
                m.grub_for_trial();
                m.md_raid1_root("0000:00:17.0", false);
            },
            "/ is on md RAID (md0p1)",
        ),
        (
            "proxmox-boot-tool",
            |m| {
                m.proxmox(Some("root=ZFS=rpool/ROOT/pve-1 boot=zfs\n"));
                m.root_fs_on("0000:02:00.0");
            },
            "proxmox-boot-tool keeps its ESPs unmounted",
        ),
        (
            "no bootloader",
            |m| m.root_fs_on("0000:02:00.0"),
            "no bootloader vfio-early can drive",
        ),
        (
            "systemd-boot, unified kernel images",
            |m| {
                m.root_fs_on("0000:02:00.0");
                m.systemd_boot_for_trial("root=UUID=0b1c ro\n");
                m.kernel_install(&["6.1.0-28-amd64"]);
                m.write("etc/kernel/install.conf", "layout=uki\n");
            },
            "/etc/kernel/install.conf says layout=uki",
        ),
        (
            "systemd-boot, EFI variables read-only",
            |m| {
                m.root_fs_on("0000:02:00.0");
                m.systemd_boot(Some("root=UUID=0b1c ro\n"));
                m.write("usr/bin/bootctl", "");
                m.kernel_install(&["6.1.0-28-amd64"]);
                m.efivars(false);
            },
            "efivarfs is mounted read-only: LoaderEntryOneShot cannot be set",
        ),
        (
            "systemd-boot without bootctl",
            |m| {
                m.root_fs_on("0000:02:00.0");
                m.systemd_boot(Some("root=UUID=0b1c ro\n"));
                m.kernel_install(&["6.1.0-28-amd64"]);
                m.efivars(true);
            },
            "bootctl is missing",
        ),
        (
            "systemd-boot without an entry to copy",
            |m| {
                m.root_fs_on("0000:02:00.0");
                m.systemd_boot_for_trial("root=UUID=0b1c ro\n");
            },
            "no boot entry in loader/entries",
        ),
    ];
    let mut all = String::new();
    for (name, setup, reason) in cases {
        let m = plain_machine();
        setup(&m);
        let before = m.tree();
        let out = m.run(&["apply", "--trial"]);
        let err = text(&m, &out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(reason), "{name}: {err}");
        assert!(err.contains("nothing was written"), "{name}: {err}");
        assert!(err.contains("\nfix: "), "{name}: {err}");
        assert_eq!(m.tree(), before, "{name}: something was written");
        all.push_str(&format!("--- {name}\n{err}"));
    }
    insta::assert_snapshot!(all);
}

#[test]
fn a_verified_grub_trial_commits_exactly_what_apply_writes() {
    let m = grub_host();
    m.config(TRIED);
    ok(&m, &["apply", "--trial"]);
    m.boot_into(GRUB_TRIAL_BOOT, "boot-2", ON_VFIO);
    let out = ok(&m, &["trial", "verify"]);
    assert!(
        out.contains("trial committed: verified in the trial boot"),
        "{out}"
    );
    // The twin: the same host where the tried config was applied plainly.
    let twin = grub_host();
    twin.config(TRIED);
    ok(&twin, &["apply"]);
    for f in DEFAULT_BOOT {
        assert_eq!(
            std::fs::read(m.path(f)).ok(),
            std::fs::read(twin.path(f)).ok(),
            "/{f} differs from a plain apply"
        );
    }
    assert!(!m.path("etc/grub.d/42_vfio-early-trial").exists());
    assert!(
        out.contains("would run: update-grub"),
        "the entry leaves grub.cfg: {out}"
    );
    assert_eq!(state(&m).phase, Phase::Committed);
    assert!(m
        .read("dev/kmsg")
        .contains("<6>vfio-early: trial committed"));
    // (grub.cfg was not regenerated here: no update-grub in a fake tree.)
    let status = text(&m, &m.run(&["status"]).stdout);
    assert!(
        status.contains("PASS  trial               trial committed at"),
        "{status}"
    );
    assert!(ok(&m, &["trial", "status"]).starts_with("trial committed at"));
    let hooks = ok(&m, &["hook-files", "--kernel", "6.1.0-28-amd64"]);
    assert!(!hooks.contains("trial"), "{hooks}");
    // The next boot, the committed default: nothing left to do.
    m.boot_into(
        &format!("{GRUB_DEFAULT_BOOT} pci=realloc"),
        "boot-3",
        ON_VFIO,
    );
    assert!(ok(&m, &["trial", "verify"]).contains("nothing to do: the trial is committed"));
}

#[test]
fn a_verified_systemd_boot_trial_commits_and_blesses_its_entry() {
    let m = sdboot_host();
    m.config(TRIED);
    ok(&m, &["apply", "--trial"]);
    // systemd-boot counts the try down as it boots the entry.
    std::fs::rename(
        m.path(TRIAL_ENTRY),
        m.path("boot/efi/loader/entries/vfio-early-trial+0-1.conf"),
    )
    .expect("count");
    let cmdline = {
        let entry = m.read("boot/efi/loader/entries/vfio-early-trial+0-1.conf");
        std::fs::write(m.path(TRIAL_ENTRY), &entry).expect("w");
        let c = sdboot_trial_cmdline(&m);
        std::fs::remove_file(m.path(TRIAL_ENTRY)).expect("rm");
        c
    };
    assert!(cmdline.contains("vfio_early.trial panic=10"), "{cmdline}");
    m.boot_into(&cmdline, "boot-2", ON_VFIO);
    let out = ok(&m, &["trial", "verify"]);
    assert!(out.contains("trial committed"), "{out}");
    let twin = sdboot_host();
    twin.config(TRIED);
    ok(&twin, &["apply"]);
    for f in DEFAULT_BOOT {
        assert_eq!(m.read(f), twin.read(f), "/{f} differs from a plain apply");
    }
    // Blessed, as systemd-bless-boot expects after boot-complete.target ...
    let entries = "boot/efi/loader/entries";
    assert!(m.path(&format!("{entries}/vfio-early-trial.conf")).exists());
    assert!(!m
        .path(&format!("{entries}/vfio-early-trial+0-1.conf"))
        .exists());
    // ... and gone at the next boot.
    m.boot_into("root=UUID=0b1c ro quiet", "boot-3", ON_VFIO);
    ok(&m, &["trial", "verify"]);
    assert!(!m.path(&format!("{entries}/vfio-early-trial.conf")).exists());
    assert_eq!(state(&m).phase, Phase::Committed);
}

#[test]
fn a_trial_that_fails_verification_keeps_the_default_and_says_why() {
    let m = grub_host();
    let before = default_boot(&m);
    m.config(TRIED_ABSENT);
    ok(&m, &["apply", "--trial"]);
    m.boot_into(
        "BOOT_IMAGE=/boot/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet intel_iommu=on iommu=pt vfio_early.trial panic=10",
        "boot-2",
        &[("0000:04:00.0", 6)],
    );
    let out = m.run(&["trial", "verify"]);
    let said = text(&m, &out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("trial failed: device: entry 2: no device 8086:10d3 at 0000:05:00.0"),
        "{said}"
    );
    assert_eq!(default_boot(&m), before, "the default boot changed");
    assert!(
        !m.path("etc/grub.d/42_vfio-early-trial").exists(),
        "the trial could boot again"
    );
    assert!(said.contains("would run: update-grub"), "{said}");
    let s = state(&m);
    assert_eq!(s.phase, Phase::Failed);
    let kmsg = m.read("dev/kmsg");
    assert!(
        kmsg.contains("<3>vfio-early: trial failed: device: entry 2")
            && kmsg.contains("the previous configuration boots next"),
        "{kmsg}"
    );
    // Boot 3, the previous configuration: status explains, nothing more happens.
    m.boot_into(GRUB_DEFAULT_BOOT, "boot-3", ON_VFIO);
    let status = m.run(&["status"]);
    let report = text(&m, &status.stdout);
    assert!(
        report.contains("WARN  trial               trial failed: device: entry 2: no device")
            && report.contains("; the previous configuration boots next"),
        "{report}"
    );
    assert!(ok(&m, &["trial", "verify"]).contains("nothing to do"));
    assert_eq!(default_boot(&m), before);
}

#[test]
fn a_trial_boot_that_never_verified_is_failed_by_the_next_boot() {
    let m = grub_host();
    let before = default_boot(&m);
    m.config(TRIED);
    ok(&m, &["apply", "--trial"]);
    // Same boot: not tried yet.
    assert!(ok(&m, &["trial", "verify"]).contains("the trial boots at the next reboot"));
    assert_eq!(state(&m).phase, Phase::Prepared);
    // The trial boot hung (or panicked, or was reset): the next boot is the default.
    m.boot_into(GRUB_DEFAULT_BOOT, "boot-3", ON_VFIO);
    let out = ok(&m, &["trial", "verify"]);
    assert!(
        out.contains("trial failed: the trial boot did not reach verification"),
        "{out}"
    );
    assert_eq!(default_boot(&m), before);
    assert!(!m.path("etc/grub.d/42_vfio-early-trial").exists());
    let status = ok(&m, &["trial", "status"]);
    assert!(
        status.starts_with("trial failed: the trial boot did not reach verification"),
        "{status}"
    );
}

#[test]
fn abort_and_undo_remove_every_trace_of_a_trial() {
    for host in [grub_host as fn() -> FakeMachine, sdboot_host] {
        let m = host();
        m.config(TRIED);
        let before = m.tree();
        ok(&m, &["apply", "--trial"]);
        assert_ne!(m.tree(), before);
        let out = ok(&m, &["trial", "abort"]);
        assert!(out.contains("trial aborted"), "{out}");
        assert_eq!(m.tree(), before, "abort left something");
        assert!(ok(&m, &["trial", "abort"]).contains("no trial to abort"));

        // undo during a trial: the same as undo without one.
        ok(&m, &["apply", "--trial"]);
        ok(&m, &["undo"]);
        let twin = host();
        twin.config(TRIED);
        ok(&twin, &["undo"]);
        assert_eq!(m.tree(), twin.tree(), "undo left a trial behind");
    }
}

#[test]
fn the_early_binder_takes_the_trial_config_only_in_the_trial_boot() {
    let touched = |m: &FakeMachine, addr: &str| {
        m.read(&format!("sys/devices/pci0000:00/{addr}/driver_override")) != "(null)\n"
    };
    for (cmdline, trial_config, committed_nic, trial_nic) in [
        ("root=/dev/nvme0n1p2 ro", true, true, false),
        (
            "root=/dev/nvme0n1p2 ro vfio_early.trial panic=10",
            true,
            false,
            true,
        ),
        // A trial boot whose initramfs lacks the trial config binds nothing.
        (
            "root=/dev/nvme0n1p2 ro vfio_early.trial",
            false,
            false,
            false,
        ),
        (
            "root=/dev/nvme0n1p2 vfio_early.trial vfio_early=off",
            true,
            false,
            false,
        ),
    ] {
        let m = workstation();
        m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n");
        if trial_config {
            m.write(
                "etc/vfio-early-trial.toml",
                "[[device]]\nid = \"8086:10d3\"\naddress = \"0000:03:00.0\"\n",
            );
        }
        m.write("proc/cmdline", &format!("{cmdline}\n"));
        let out = m.run(&["bind", "--early"]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(touched(&m, "0000:04:00.0"), committed_nic, "{cmdline}");
        assert_eq!(touched(&m, "0000:03:00.0"), trial_nic, "{cmdline}");
        if cmdline.contains("trial") && !trial_config {
            assert!(text(&m, &out.stderr).contains("no trial config"));
        }
    }
}

/// A writer that fails its `n`th operation (1-based), as a power loss there would.
struct FailAt {
    n: usize,
    calls: usize,
}

impl FailAt {
    fn hit(&mut self) -> io::Result<()> {
        self.calls += 1;
        if self.calls == self.n {
            return Err(io::Error::other("injected failure"));
        }
        Ok(())
    }
}

impl Writer for FailAt {
    fn write(&mut self, root: &Root, rel: &str, contents: &str) -> io::Result<()> {
        self.hit()?;
        AtomicWriter.write(root, rel, contents)
    }
    fn remove(&mut self, root: &Root, rel: &str) -> io::Result<()> {
        self.hit()?;
        AtomicWriter.remove(root, rel)
    }
    fn write_executable(&mut self, root: &Root, rel: &str, contents: &str) -> io::Result<()> {
        self.hit()?;
        AtomicWriter.write_executable(root, rel, contents)
    }
}

fn prepare_with(m: &FakeMachine, w: &mut dyn Writer) -> anyhow::Result<()> {
    let ctx = Context::load(
        m.root(),
        None,
        ConfigNeed::Required,
        PlanMode::Apply { force: false },
    )
    .expect("context");
    trial::prepare(&ctx, &trial::Options::default(), w).map(|_| ())
}

/// Runs `step` failing at each of its writes in turn until it runs through; after each
/// failure, `check` sees the tree. `step` reports the failure (`Err`), except where it
/// must not fail its boot (`trial verify` outside the trial boot logs it, exit 0).
fn at_every_write(
    fresh: impl Fn() -> FakeMachine,
    step: impl Fn(&FakeMachine, &mut dyn Writer) -> anyhow::Result<()>,
    reports: bool,
    check: impl Fn(&FakeMachine, usize),
) -> usize {
    for n in 1..100 {
        let m = fresh();
        let mut w = FailAt { n, calls: 0 };
        let r = step(&m, &mut w);
        if w.calls < n {
            r.expect("runs through without a failure");
            return n - 1;
        }
        assert_eq!(r.is_err(), reports, "failure {n}: {r:?}");
        check(&m, n);
    }
    panic!("more than 99 writes");
}

#[test]
fn power_loss_during_prepare_never_touches_the_default_and_abort_cleans_up() {
    for host in [grub_host as fn() -> FakeMachine, sdboot_host] {
        let fresh = || {
            let m = host();
            m.config(TRIED);
            m
        };
        let pristine = fresh().tree();
        let writes = at_every_write(fresh, prepare_with, true, |m, n| {
            let now = m.tree();
            for f in DEFAULT_BOOT {
                assert_eq!(
                    now.get(*f),
                    pristine.get(*f),
                    "failure at {n}: /{f} changed"
                );
            }
            // The default never boots the trial: nothing was armed (no command ran).
            ok(m, &["trial", "abort"]);
            assert_eq!(m.tree(), pristine, "failure at {n}: abort left something");
            // And a new run completes.
            ok(m, &["apply", "--trial"]);
            assert_eq!(state(m).phase, Phase::Prepared, "failure at {n}");
        });
        assert!(writes >= 4, "{writes} writes");
    }
}

/// A GRUB host in its trial boot, and the default-boot files before and after a commit.
fn trial_boot(config: &str, on_vfio: &[(&str, u32)], cmdline: &str) -> FakeMachine {
    let m = grub_host();
    m.config(config);
    ok(&m, &["apply", "--trial"]);
    m.boot_into(cmdline, "boot-2", on_vfio);
    m
}

fn verify_with(m: &FakeMachine, w: &mut dyn Writer) -> anyhow::Result<()> {
    trial::verify(&Root::new(m.root()), w).map(|_| ())
}

#[test]
fn power_loss_during_a_commit_leaves_the_old_or_the_new_configuration() {
    let old = default_boot(&grub_host());
    let new = {
        let twin = grub_host();
        twin.config(TRIED);
        ok(&twin, &["apply"]);
        default_boot(&twin)
    };
    let writes = at_every_write(
        || trial_boot(TRIED, ON_VFIO, GRUB_TRIAL_BOOT),
        verify_with,
        true,
        |m, n| {
            let now = default_boot(m);
            for (i, f) in DEFAULT_BOOT.iter().enumerate() {
                assert!(
                    now[i] == old[i] || now[i] == new[i],
                    "failure at {n}: /{f} is neither old nor new"
                );
            }
            // The next boot (the default entry: GRUB cleared next_entry) finishes it.
            m.boot_into(GRUB_DEFAULT_BOOT, "boot-3", ON_VFIO);
            ok(m, &["trial", "verify"]);
            let after = default_boot(m);
            assert!(
                after == old || after == new,
                "failure at {n}: the default boot is a mix after the next boot"
            );
            let s = state(m);
            match s.phase {
                Phase::Committed => assert_eq!(after, new, "failure at {n}"),
                Phase::Failed => assert_eq!(after, old, "failure at {n}"),
                p => panic!("failure at {n}: left in {p:?}"),
            }
            assert!(
                !m.path("etc/grub.d/42_vfio-early-trial").exists(),
                "failure at {n}"
            );
        },
    );
    assert!(writes >= 8, "{writes} writes");
}

#[test]
fn power_loss_during_a_failed_trial_or_its_fallback_keeps_the_old_configuration() {
    let old = default_boot(&grub_host());
    let absent_boot = "BOOT_IMAGE=/boot/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet \
                       intel_iommu=on iommu=pt vfio_early.trial panic=10";
    let recover = |m: &FakeMachine, n: usize| {
        assert_eq!(default_boot(m), old, "failure at {n}: the default changed");
        m.boot_into(GRUB_DEFAULT_BOOT, "boot-4", ON_VFIO);
        ok(m, &["trial", "verify"]);
        assert_eq!(default_boot(m), old, "failure at {n}");
        assert_eq!(state(m).phase, Phase::Failed, "failure at {n}");
        assert!(
            !m.path("etc/grub.d/42_vfio-early-trial").exists(),
            "failure at {n}"
        );
    };
    // Verification fails in the trial boot.
    at_every_write(
        || trial_boot(TRIED_ABSENT, &[("0000:04:00.0", 6)], absent_boot),
        verify_with,
        true,
        recover,
    );
    // The fallback: the trial boot never verified; the next boot fails it.
    at_every_write(
        || {
            let m = grub_host();
            m.config(TRIED);
            ok(&m, &["apply", "--trial"]);
            m.boot_into(GRUB_DEFAULT_BOOT, "boot-3", ON_VFIO);
            m
        },
        verify_with,
        false,
        recover,
    );
}

#[test]
fn the_trial_commands_teach_in_their_help() {
    let m = FakeMachine::new();
    let help = ok(&m, &["trial", "--help"]);
    for word in ["status", "commit", "abort", "verify", "apply --trial"] {
        assert!(help.contains(word), "{word}:\n{help}");
    }
    assert!(
        !help.contains("grub-entry"),
        "the hidden command shows:\n{help}"
    );
    let apply = ok(&m, &["apply", "--help"]);
    assert!(apply.contains("--trial"), "{apply}");
    assert!(!apply.contains("--trial-arg"), "{apply}");
}

#[test]
fn a_dry_run_shows_the_trial_and_writes_nothing() {
    let m = grub_host();
    m.config(TRIED);
    let before = m.tree();
    let out = ok(&m, &["apply", "--trial", "--dry-run"]);
    assert!(
        out.contains("would write /etc/grub.d/42_vfio-early-trial:"),
        "{out}"
    );
    assert!(
        out.contains("would run: grub-reboot vfio-early-trial"),
        "{out}"
    );
    assert_eq!(m.tree(), before);
}

#[test]
fn trial_commit_keeps_a_trial_without_waiting_and_takes_back_its_one_shot() {
    let m = grub_host();
    m.config(TRIED);
    ok(&m, &["apply", "--trial"]);
    let json = ok(&m, &["trial", "status", "--json"]);
    assert!(json.contains("\"phase\": \"prepared\""), "{json}");
    // As grub-reboot left it.
    let env = m.read("boot/grub/grubenv").replacen(
        "# GRUB Environment Block\n",
        "# GRUB Environment Block\nnext_entry=vfio-early-trial\n",
        1,
    );
    m.write("boot/grub/grubenv", &env[..1024]);
    let out = ok(&m, &["trial", "commit"]);
    assert!(
        out.contains("would run: grub-editenv /boot/grub/grubenv unset next_entry"),
        "{out}"
    );
    assert!(out.contains("without verification"), "{out}");
    let twin = grub_host();
    twin.config(TRIED);
    ok(&twin, &["apply"]);
    for f in DEFAULT_BOOT.iter().filter(|f| !f.ends_with("grubenv")) {
        assert_eq!(m.read(f), twin.read(f), "/{f} differs from a plain apply");
    }
    assert!(!m.path("etc/grub.d/42_vfio-early-trial").exists());
    assert!(ok(&m, &["trial", "commit"]).contains("already committed"));
    // A finished trial is cleared by the next plain apply.
    ok(&m, &["apply"]);
    assert!(!m.path("var/lib/vfio-early/trial").exists());
    assert_eq!(ok(&m, &["trial", "status", "--json"]), "null\n");
}
