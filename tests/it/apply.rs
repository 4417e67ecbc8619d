//! `apply` and `undo` on fake roots: every rendered file across the matrix (CPU vendor,
//! bootloader, kernel layout, devices), idempotence, byte-for-byte undo, `--dry-run`,
//! crash consistency, and the GRUB drop-in sourced under `sh -e`.

use std::io;
use std::path::Path;
use std::time::Duration;

use vfio_early::apply::{self, AtomicWriter, Writer};
use vfio_early::host::Host;
use vfio_early::root::Root;
use vfio_early::{config, kmod, machine, plan};

use crate::fake::{text, workstation, FakeMachine};

const GPU_AND_NIC: &str = "[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n";

/// A fake tree is not the running system, so `auto` cannot know its CPU: the AMD
/// matrix cases say so in the config.
const AMD_GPU_AND_NIC: &str = "[iommu]\nvendor = \"amd\"\n\n[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n";

const OWNED: &[&str] = &[
    "etc/modprobe.d/vfio-early.conf",
    "etc/default/grub.d/vfio-early.cfg",
    "etc/kernel/cmdline",
    "var/lib/vfio-early/applied.toml",
    "var/lib/vfio-early/manifest.json",
];

/// The apply output and every owned file, for one snapshot per matrix case.
fn rendered(m: &FakeMachine, args: &[&str]) -> String {
    let out = m.run(args);
    assert_eq!(out.status.code(), Some(0), "{}", text(m, &out.stderr));
    let mut s = format!("$ vfio-early {}\n{}", args.join(" "), text(m, &out.stdout));
    for f in OWNED {
        if let Ok(c) = std::fs::read_to_string(m.path(f)) {
            s.push_str(&format!("\n==> /{f} <==\n{c}"));
        }
    }
    s
}

fn matrix_case(setup: impl Fn(&FakeMachine), config: &str) -> String {
    let m = workstation();
    m.initramfs_tools();
    setup(&m);
    m.config(config);
    rendered(&m, &["apply"])
}

#[test]
fn intel_grub_kernel_61() {
    insta::assert_snapshot!(matrix_case(
        |m| {
            m.kernel_61();
            m.grub();
        },
        GPU_AND_NIC
    ));
}

#[test]
fn amd_grub_kernel_612() {
    insta::assert_snapshot!(matrix_case(
        |m| {
            m.amd();
            m.kernel_612();
            m.grub();
        },
        AMD_GPU_AND_NIC
    ));
}

#[test]
fn intel_systemd_boot_both_kernels() {
    insta::assert_snapshot!(matrix_case(
        |m| {
            m.kernel_61();
            m.kernel_612();
            m.systemd_boot(Some("root=UUID=0b1c ro quiet\n"));
        },
        GPU_AND_NIC
    ));
}

#[test]
fn amd_proxmox_boot_tool() {
    insta::assert_snapshot!(matrix_case(
        |m| {
            m.amd();
            m.kernel_612();
            m.proxmox(Some("root=ZFS=rpool/ROOT/pve-1 boot=zfs\n"));
        },
        AMD_GPU_AND_NIC
    ));
}

#[test]
fn bootloader_none_prints_the_arguments() {
    insta::assert_snapshot!(matrix_case(|m| m.kernel_61(), GPU_AND_NIC));
}

#[test]
fn every_global_option() {
    insta::assert_snapshot!(matrix_case(
        |m| {
            m.kernel_61();
            m.grub();
        },
        "[[device]]\nid = \"8086:10d3\"\naddress = \"03:00.0\"\n\n\
         [kernel]\nframebuffer = \"sysfb-off\"\npcie_aspm_off = true\npci_noaer = true\n\
         acs_override = [\"downstream\", \"multifunction\"]\nextra_args = [\"pci=realloc\"]\n\n\
         [modules]\ndisable_vga = true\nblacklist = [\"nouveau\"]\n\n\
         [kvm]\nignore_msrs = true\nreport_ignored_msrs = false\n\n\
         [interrupts]\nallow_unsafe = true\n"
    ));
}

#[test]
fn hook_files_follow_each_kernel() {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.kernel_612();
    m.grub();
    m.config(GPU_AND_NIC);
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    let mut s = String::new();
    for k in ["6.1.0-28-amd64", "6.12.48+deb13-amd64"] {
        let out = m.run(&["hook-files", "--kernel", k]);
        s.push_str(&format!("--kernel {k}\n{}", text(&m, &out.stdout)));
    }
    insta::assert_snapshot!(s);
}

#[test]
fn hook_files_are_empty_without_devices() {
    let m = workstation();
    m.kernel_61();
    m.config("[kvm]\nignore_msrs = true\n");
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    let out = m.run(&["hook-files", "--kernel", "6.1.0-28-amd64"]);
    assert_eq!(out.stdout, b"");
}

type Setup = Box<dyn Fn(&FakeMachine)>;

fn setups() -> Vec<(&'static str, Setup)> {
    vec![
        ("grub", Box::new(|m: &FakeMachine| m.grub())),
        (
            "systemd-boot",
            Box::new(|m: &FakeMachine| m.systemd_boot(Some("root=UUID=0b1c ro quiet  \n"))),
        ),
        (
            "proxmox-existing-cmdline",
            Box::new(|m: &FakeMachine| m.proxmox(Some("root=ZFS=rpool/ROOT/pve-1 boot=zfs\n"))),
        ),
        ("none", Box::new(|_: &FakeMachine| {})),
    ]
}

#[test]
fn apply_is_idempotent_and_undo_restores_every_byte() {
    for (name, setup) in setups() {
        let m = workstation();
        m.initramfs_tools();
        m.kernel_61();
        setup(&m);
        m.config(GPU_AND_NIC);
        let before = m.tree();

        let first = m.run(&["apply"]);
        assert_eq!(
            first.status.code(),
            Some(0),
            "{name}: {}",
            text(&m, &first.stderr)
        );
        let after = m.tree();
        assert_ne!(before, after, "{name}: apply changed nothing");
        assert_eq!(
            before.get("etc/default/grub"),
            after.get("etc/default/grub")
        );

        let second = m.run(&["apply"]);
        let out = text(&m, &second.stdout);
        assert!(out.contains("nothing changed"), "{name}: {out}");
        assert!(!out.contains("would run"), "{name}: {out}");
        assert_eq!(after, m.tree(), "{name}: second apply touched files");

        let undo = m.run(&["undo"]);
        assert_eq!(
            undo.status.code(),
            Some(0),
            "{name}: {}",
            text(&m, &undo.stderr)
        );
        assert_eq!(before, m.tree(), "{name}: undo left a difference");
    }
}

#[test]
fn undo_after_a_user_edit_removes_only_our_tokens() {
    let m = workstation();
    m.kernel_61();
    m.systemd_boot(Some("root=UUID=0b1c ro quiet\n"));
    m.config(GPU_AND_NIC);
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    let edited = m
        .read("etc/kernel/cmdline")
        .replace("quiet", "quiet splash");
    m.write("etc/kernel/cmdline", &edited);
    assert_eq!(m.run(&["undo"]).status.code(), Some(0));
    assert_eq!(
        m.read("etc/kernel/cmdline"),
        "root=UUID=0b1c ro quiet splash\n"
    );
}

#[test]
fn dry_run_writes_nothing_and_shows_a_diff() {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub();
    m.config(GPU_AND_NIC);
    let before = m.tree();
    let out = m.run(&["apply", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(before, m.tree());
    let shown = text(&m, &out.stdout);
    assert!(
        shown.contains("+++ /etc/default/grub.d/vfio-early.cfg"),
        "{shown}"
    );
    assert!(
        shown.contains("would run: update-initramfs -u -k all"),
        "{shown}"
    );
    insta::assert_snapshot!(shown);
}

#[test]
fn a_config_change_updates_and_emptying_it_removes() {
    let m = workstation();
    m.kernel_61();
    m.grub();
    m.config(GPU_AND_NIC);
    let before = m.tree();
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    m.config("[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n");
    let out = m.run(&["apply"]);
    let shown = text(&m, &out.stdout);
    assert!(
        shown.contains("updated /etc/modprobe.d/vfio-early.conf"),
        "{shown}"
    );
    assert!(!m.read("etc/modprobe.d/vfio-early.conf").contains("nouveau"));
    m.config("");
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    let mut expect = before;
    expect.insert("etc/vfio-early.toml".into(), String::new());
    assert_eq!(expect, m.tree(), "an empty config leaves nothing behind");
}

#[test]
fn bad_config_and_interlocks_write_nothing() {
    for (cfg, code) in [
        ("[[device]]\nid = \"10de\"\n", 2),
        ("[[device]]\nid = \"144d:a808\"\n", 1),
    ] {
        let m = workstation();
        m.kernel_61();
        m.grub();
        m.config(cfg);
        let before = m.tree();
        let out = m.run(&["apply"]);
        assert_eq!(out.status.code(), Some(code), "{cfg}");
        assert!(text(&m, &out.stderr).contains("nothing was written"));
        assert_eq!(before, m.tree(), "{cfg}");
    }
}

#[test]
fn forced_apply_takes_the_refused_device() {
    let m = workstation();
    m.kernel_61();
    m.grub();
    m.config("[[device]]\nid = \"144d:a808\"\n");
    let out = m.run(&["apply", "--force"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&m, &out.stderr).contains("taken although it holds the filesystem mounted at /"));
    assert!(m
        .read("etc/modprobe.d/vfio-early.conf")
        .contains("softdep nvme pre: vfio-pci"));
}

/// Fails the `n`th write or remove, like a crash or a full disk between two files.
struct FailAt {
    n: usize,
    calls: usize,
}

impl Writer for FailAt {
    fn write(&mut self, root: &Root, rel: &str, contents: &str) -> io::Result<()> {
        self.calls += 1;
        if self.calls == self.n {
            return Err(io::Error::other("injected failure"));
        }
        AtomicWriter.write(root, rel, contents)
    }
    fn remove(&mut self, root: &Root, rel: &str) -> io::Result<()> {
        self.calls += 1;
        if self.calls == self.n {
            return Err(io::Error::other("injected failure"));
        }
        AtomicWriter.remove(root, rel)
    }
}

fn commit_with(m: &FakeMachine, cfg: &str, undo: bool, w: &mut dyn Writer) -> anyhow::Result<()> {
    let root = Root::new(m.root());
    let c = config::parse(cfg, Path::new("t")).expect("config");
    let mut mach = machine::discover(&root);
    mach.kernels = kmod::read_all(&root, &mach.installed_kernels);
    let p = plan::plan(&c, &mach, plan::Options::default());
    let target = apply::Target {
        forced: false,
        config: &c,
        config_text: cfg,
        plan: &p,
    };
    let host = Host::read(&root, mach.cmdline.as_deref());
    let ch = apply::compute(if undo { None } else { Some(&target) }, &mach, &host)?;
    apply::commit(&root, &ch, w)
}

#[test]
fn a_failure_between_files_leaves_each_old_or_new_and_the_next_run_completes() {
    for n in 1..=6 {
        let m = workstation();
        m.kernel_61();
        m.systemd_boot(Some("root=UUID=0b1c ro\n"));
        m.grub();
        m.config(GPU_AND_NIC);
        let old = m.tree();
        // The reference: a clean apply on a twin.
        let twin = workstation();
        twin.kernel_61();
        twin.systemd_boot(Some("root=UUID=0b1c ro\n"));
        twin.grub();
        twin.config(GPU_AND_NIC);
        commit_with(&twin, GPU_AND_NIC, false, &mut AtomicWriter).expect("clean");
        let new = twin.tree();

        let failed = commit_with(&m, GPU_AND_NIC, false, &mut FailAt { n, calls: 0 });
        let mid = m.tree();
        for f in OWNED.iter().filter(|f| !f.ends_with("manifest.json")) {
            let now = mid.get(*f);
            assert!(
                now == old.get(*f) || now == new.get(*f),
                "failure at write {n}: {f} is neither old nor new"
            );
        }
        if failed.is_err() {
            // Undo after the crash finds everything; then a fresh apply completes.
            commit_with(&m, GPU_AND_NIC, true, &mut AtomicWriter).expect("undo");
            assert_eq!(old, m.tree(), "undo after a failure at write {n}");
        }
        commit_with(&m, GPU_AND_NIC, false, &mut AtomicWriter).expect("rerun");
        let done = m.tree();
        for f in OWNED {
            assert_eq!(done.get(*f), new.get(*f), "rerun after failure at {n}: {f}");
        }
    }
}

#[test]
fn grub_dropin_never_aborts_grub_mkconfig_under_sh_e() {
    let m = workstation();
    m.kernel_61();
    m.grub();
    m.config(GPU_AND_NIC);
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    let dropin = m.path("etc/default/grub.d/vfio-early.cfg");
    let installed = m.path("installed.cfg");
    // The guard true (binary present, here: `true`) and false (package removed).
    let text = std::fs::read_to_string(&dropin).expect("dropin");
    std::fs::write(
        &installed,
        text.replace("/usr/sbin/vfio-early", "/bin/true"),
    )
    .expect("w");
    for (file, expect) in [
        (&installed, "quiet intel_iommu=on iommu=pt"),
        (&dropin, "quiet"),
    ] {
        // grub-mkconfig runs under `set -e` and sources the defaults, then each drop-in.
        let out = std::process::Command::new("sh")
            .arg("-e")
            .arg("-c")
            .arg(format!(
                ". {}; . {}; echo \"$GRUB_CMDLINE_LINUX_DEFAULT\"",
                m.path("etc/default/grub").display(),
                file.display()
            ))
            .output()
            .expect("sh");
        assert!(out.status.success(), "sh -e aborted on {}", file.display());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expect);
    }
}

#[test]
fn if_configured_does_nothing_on_the_shipped_config() {
    let m = workstation();
    m.kernel_61();
    m.grub();
    m.write(
        "etc/vfio-early.toml",
        include_str!("../../etc/vfio-early.toml"),
    );
    let before = m.tree();
    let out = m.run(&["apply", "--if-configured"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&m, &out.stdout).contains("nothing to do"));
    assert_eq!(before, m.tree());
    // With devices it applies as usual.
    m.config(GPU_AND_NIC);
    let out = m.run(&["apply", "--if-configured"]);
    assert!(text(&m, &out.stdout).contains("wrote /etc/modprobe.d/vfio-early.conf"));
}

#[test]
fn an_absent_device_still_gets_the_softdeps_of_its_id() {
    // apply in a chroot, or before the card is fitted: no modalias to match, so the
    // drivers naming the id (vendor-specific aliases only) get the softdep.
    let m = workstation();
    m.kernel_61();
    m.grub();
    m.config("[[device]]\nid = \"10de:2204\"\n");
    let out = m.run(&["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    let conf = m.read("etc/modprobe.d/vfio-early.conf");
    assert!(conf.contains("softdep nouveau pre: vfio-pci"), "{conf}");
    assert!(
        !conf.contains("snd_hda_intel") && !conf.contains("nvme"),
        "class-wide drivers are not swept in: {conf}"
    );
}

#[test]
fn systemd_boot_without_a_kernel_cmdline_file_is_refused_outside_the_host() {
    // A chroot or image tree: /proc/cmdline there is not how the target boots, and a
    // file holding only our tokens would give kernel-install entries without root=.
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.systemd_boot(None);
    m.config(GPU_AND_NIC);
    let before = m.tree();
    let out = m.run(&["apply"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&m, &out.stderr);
    assert!(err.contains("cannot write /etc/kernel/cmdline"), "{err}");
    assert!(err.contains("root="), "{err}");
    assert_eq!(m.tree(), before, "nothing may be written");
}

#[test]
fn on_the_host_a_missing_kernel_cmdline_is_seeded_from_proc_cmdline_and_undo_removes_it() {
    // What kernel-install itself falls back to; computed as the running system would
    // (the pure part of apply, with the host facts marked as the running system's).
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.proxmox(None);
    let root = Root::new(m.root());
    let c = config::parse(GPU_AND_NIC, Path::new("t")).expect("config");
    let mut mach = machine::discover(&root);
    mach.kernels = kmod::read_all(&root, &mach.installed_kernels);
    let p = plan::plan(&c, &mach, plan::Options::default());
    let target = apply::Target {
        forced: false,
        config: &c,
        config_text: GPU_AND_NIC,
        plan: &p,
    };
    let mut host = Host::read(&root, mach.cmdline.as_deref());
    host.is_host = true;
    let ch = apply::compute(Some(&target), &mach, &host).expect("compute");
    let created = ch
        .files
        .iter()
        .find(|f| f.path == "etc/kernel/cmdline")
        .expect("cmdline written");
    assert_eq!(created.old, None);
    assert_eq!(
        created.new.as_deref(),
        Some("root=UUID=x ro quiet intel_iommu=on iommu=pt\n"),
        "seeded from /proc/cmdline without BOOT_IMAGE="
    );
    assert_eq!(ch.manifest.cmdline_before, None);

    // Once written, undo takes the created file away again.
    apply::commit(&root, &ch, &mut AtomicWriter).expect("commit");
    let mut host = Host::read(&root, mach.cmdline.as_deref());
    host.is_host = true;
    let ch = apply::compute(None, &mach, &host).expect("undo");
    let removed = ch
        .files
        .iter()
        .find(|f| f.path == "etc/kernel/cmdline")
        .expect("cmdline removed");
    assert_eq!(removed.new, None);
}

#[test]
fn a_second_apply_waits_for_the_first_then_names_it() {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub();
    m.config(GPU_AND_NIC);
    let held = vfio_early::lock::acquire(&Root::new(m.root()), "apply", Duration::from_secs(1))
        .expect("lock");
    let before = m.tree();
    let start = std::time::Instant::now();
    let out = m.run(&["apply", "--wait", "1"]);
    let err = text(&m, &out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(start.elapsed() >= Duration::from_secs(1), "did not wait");
    assert!(err.contains("another vfio-early is changing"), "{err}");
    assert!(err.contains("nothing was written"), "{err}");
    assert_eq!(m.tree(), before);
    let out = m.run(&["undo", "--wait", "0"]);
    assert_eq!(out.status.code(), Some(1), "undo is locked out too");
    // A dry run only reads: it does not wait.
    assert_eq!(m.run(&["apply", "--dry-run"]).status.code(), Some(0));
    drop(held);
    assert_eq!(m.run(&["apply", "--wait", "1"]).status.code(), Some(0));
}

#[test]
fn concurrent_applies_leave_the_files_of_one_config() {
    const NIC_ONLY: &str = "[[device]]\nid = \"8086:10d3\"\naddress = \"0000:03:00.0\"\n";
    for round in 0..6 {
        let m = workstation();
        m.initramfs_tools();
        m.kernel_61();
        m.systemd_boot(Some("root=UUID=0b1c ro\n"));
        m.grub();
        m.write("a.toml", GPU_AND_NIC);
        m.write("b.toml", NIC_ONLY);
        let spawn = |cfg: &str| {
            std::process::Command::new(crate::fake::bin())
                .arg("--root")
                .arg(m.root())
                .arg("--config")
                .arg(m.path(cfg))
                .arg("apply")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let (a, b) = (spawn("a.toml"), spawn("b.toml"));
        let (a, b) = (
            a.wait_with_output().expect("a"),
            b.wait_with_output().expect("b"),
        );
        assert_eq!(
            (a.status.code(), b.status.code()),
            (Some(0), Some(0)),
            "round {round}"
        );
        // Whichever ran last, every owned file is that config's, as a lone apply makes.
        let now = m.tree();
        let matches = |cfg: &str| {
            let twin = workstation();
            twin.initramfs_tools();
            twin.kernel_61();
            twin.systemd_boot(Some("root=UUID=0b1c ro\n"));
            twin.grub();
            twin.config(cfg);
            assert_eq!(twin.run(&["apply"]).status.code(), Some(0));
            let t = twin.tree();
            OWNED
                .iter()
                .filter(|f| !f.ends_with("manifest.json"))
                .all(|f| {
                    let mine = now
                        .get(*f)
                        .map(|c| c.replace(&m.root().display().to_string(), ""));
                    let theirs = t
                        .get(*f)
                        .map(|c| c.replace(&twin.root().display().to_string(), ""));
                    mine == theirs
                })
        };
        assert!(
            matches(GPU_AND_NIC) || matches(NIC_ONLY),
            "round {round}: the owned files match neither config"
        );
    }
}

#[test]
fn an_interrupted_undo_is_finished_by_the_next_one() {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub();
    m.config(GPU_AND_NIC);
    let before = m.tree();
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    // An undo that removed the files and then stopped: the manifest still names them.
    for f in OWNED.iter().filter(|f| !f.ends_with("manifest.json")) {
        let _ = std::fs::remove_file(m.path(f));
    }
    assert!(m.path("var/lib/vfio-early/manifest.json").exists());
    let out = m.run(&["undo"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    assert_eq!(
        m.tree(),
        before,
        "the stale manifest and its directories stay"
    );
}

#[test]
fn undo_says_removed_only_for_what_it_removed() {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub();
    m.config(GPU_AND_NIC);
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    let root = Root::new(m.root());
    let mach = machine::discover(&root);
    let ch =
        apply::compute(None, &mach, &Host::read(&root, mach.cmdline.as_deref())).expect("undo");
    assert!(ch.files.len() >= 3, "{:?}", ch.files);
    // The second removal fails (the intent state takes the first two calls: the
    // manifest, and the token list beside it).
    let mut said = Vec::new();
    let r = apply::commit_reporting(&root, &ch, &mut FailAt { n: 4, calls: 0 }, &mut |c| {
        said.push(c.path.clone());
        Ok(())
    });
    assert!(r.is_err());
    assert_eq!(
        said,
        [ch.files[0].path.clone()],
        "reported before it was done"
    );
    assert!(!m.path(&ch.files[0].path).exists());
    assert!(m.path(&ch.files[1].path).exists());
}

#[test]
fn printing_fails_cleanly_on_a_full_disk_a_closed_stdout_and_a_broken_pipe() {
    let m = workstation();
    m.config(GPU_AND_NIC);
    let root = m.root().display().to_string();
    let bin = crate::fake::bin().display().to_string();
    // (A closed stdout is reopened on /dev/null by the Rust runtime before main: its
    // output is discarded as with `>/dev/null`.)
    let image = m.path("initrd.img");
    std::fs::write(
        &image,
        vfio_early::initramfs::testimg::debian_like(
            "6.1.0-28-amd64",
            vfio_early::initramfs::testimg::zstd,
        ),
    )
    .expect("image");
    let image = image.display().to_string();
    for cmd in ["list", "check", "status --json", "initramfs list \"$2\""] {
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("exec \"$0\" --root \"$1\" {cmd} >/dev/full"),
                &bin,
                &root,
                &image,
            ])
            .output()
            .expect("sh");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains("writing to standard output") && err.contains("No space left on device"),
            "{cmd}: {err}"
        );
        assert!(!err.contains("panicked"), "{cmd}: {err}");
    }
    // A reader that has gone away (its end of the pipe closed before the first write):
    // a quiet exit, no panic, no message.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = std::process::Command::new(&bin)
        .args(["--root", &root, "list", "--json"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn purge_after_a_failed_undo_takes_our_tokens_out_of_kernel_cmdline() {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.systemd_boot(Some("root=UUID=0b1c ro quiet\n# a comment line\n"));
    m.config(&format!(
        "{GPU_AND_NIC}\n[kernel]\nextra_args = [\"dyndbg=\\\"module vfio_pci +p\\\"\"]\n"
    ));
    let out = m.run(&["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    let applied = m.read("etc/kernel/cmdline");
    assert!(
        applied.contains("dyndbg=\"module vfio_pci +p\""),
        "{applied}"
    );
    // The user adds a token of their own afterwards; then undo never ran (it failed in
    // prerm) and the package is purged: only the postrm is left to clean up.
    let first = applied.lines().next().unwrap_or("").to_string();
    m.write(
        "etc/kernel/cmdline",
        &applied.replacen(&first, &format!("{first} mitigations=off"), 1),
    );
    let postrm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("debian/vfio-early.postrm");
    let out = std::process::Command::new("sh")
        .arg(&postrm)
        .arg("purge")
        .env("DPKG_ROOT", m.root())
        .output()
        .expect("postrm");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        m.read("etc/kernel/cmdline"),
        "root=UUID=0b1c ro quiet mitigations=off\n# a comment line\n"
    );
    for gone in ["var/lib/vfio-early", "etc/modprobe.d/vfio-early.conf"] {
        assert!(!m.path(gone).exists(), "{gone} left by purge");
    }
}

#[test]
fn an_image_prepared_on_an_amd_machine_still_gets_the_intel_argument() {
    // --root is an image or chroot: its /proc/cpuinfo is the build host's (AMD here),
    // not the target's. auto never trusts it: the arguments are right for both vendors.
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub();
    m.amd();
    m.config(GPU_AND_NIC);
    let out = m.run(&["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    assert!(
        text(&m, &out.stdout).contains("kernel arguments: intel_iommu=on iommu=pt"),
        "{}",
        text(&m, &out.stdout)
    );
    let err = text(&m, &out.stderr);
    assert!(err.contains("the root is not the running system"), "{err}");
    assert!(m
        .read("etc/default/grub.d/vfio-early.cfg")
        .contains("intel_iommu=on"));
}

/// The three Proxmox VE layouts, and one where what the ESPs boot cannot be known.
#[test]
fn proxmox_layouts_each_get_the_file_their_loader_reads() {
    let pve_kernel = |m: &FakeMachine| {
        m.initramfs_tools();
        m.kernel_61();
    };
    // (name, setup, GRUB drop-in written, /etc/kernel/cmdline changed, command)
    type Setup = fn(&FakeMachine);
    let cases: [(&str, Setup, bool, bool, &str); 4] = [
        (
            "GRUB without proxmox-boot-tool",
            |m| m.grub(),
            true,
            false,
            "update-grub",
        ),
        (
            "systemd-boot through proxmox-boot-tool",
            |m| m.proxmox(Some("root=ZFS=rpool/ROOT/pve-1 boot=zfs\n")),
            false,
            true,
            "proxmox-boot-tool refresh",
        ),
        (
            "GRUB through proxmox-boot-tool",
            |m| m.proxmox_grub(),
            true,
            false,
            "proxmox-boot-tool refresh",
        ),
        (
            "proxmox-boot-tool, ESPs unknown",
            |m| {
                m.proxmox_boot_tool(Some("root=ZFS=rpool/ROOT/pve-1 boot=zfs\n"));
                // Neither GRUB's BOOT_IMAGE= nor systemd-boot's LoaderInfo says who booted.
                m.write("proc/cmdline", "root=ZFS=rpool/ROOT/pve-1 boot=zfs quiet\n");
            },
            true,
            true,
            "proxmox-boot-tool refresh",
        ),
    ];
    for (name, setup, dropin, cmdline, command) in cases {
        let m = workstation();
        pve_kernel(&m);
        setup(&m);
        let before = m.read("etc/kernel/cmdline");
        m.config(GPU_AND_NIC);
        let out = m.run(&["apply"]);
        let stdout = text(&m, &out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            text(&m, &out.stderr)
        );
        assert_eq!(
            m.path("etc/default/grub.d/vfio-early.cfg").exists(),
            dropin,
            "{name}: {stdout}"
        );
        assert_eq!(
            m.read("etc/kernel/cmdline") != before,
            cmdline,
            "{name}: {stdout}"
        );
        assert!(
            stdout.contains(&format!("would run: {command}")),
            "{name}: {stdout}"
        );
        if command.starts_with("proxmox") {
            assert!(
                !stdout.contains("would run: update-grub"),
                "{name}: {stdout}"
            );
        }
    }
}

#[test]
fn systemd_boot_with_dracut_or_without_its_hook_runs_kernel_install_for_every_kernel() {
    let m = workstation();
    m.kernel_61();
    m.kernel_612();
    m.systemd_boot(Some("root=UUID=0b1c ro\n"));
    m.write("usr/bin/dracut", "#!/bin/sh\n");
    m.write("usr/bin/kernel-install", "#!/bin/sh\n");
    for v in ["6.1.0-28-amd64", "6.12.48+deb13-amd64"] {
        m.write(&format!("boot/vmlinuz-{v}"), "");
        m.write(&format!("boot/initrd.img-{v}"), "");
    }
    m.config(GPU_AND_NIC);
    let out = m.run(&["apply"]);
    let stdout = text(&m, &out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    assert!(
        stdout.contains("would run: dracut --regenerate-all --force"),
        "{stdout}"
    );
    for v in ["6.1.0-28-amd64", "6.12.48+deb13-amd64"] {
        assert!(
            stdout.contains(&format!(
                "would run: kernel-install add {v} /boot/vmlinuz-{v} /boot/initrd.img-{v}"
            )),
            "{stdout}"
        );
    }
    // Undo makes the entries again too (without our arguments).
    let out = m.run(&["undo"]);
    assert!(text(&m, &out.stdout).contains("would run: kernel-install add 6.1.0-28-amd64"));

    // initramfs-tools with systemd-boot's hook: update-initramfs is enough.
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.systemd_boot(Some("root=UUID=0b1c ro\n"));
    m.write("etc/initramfs/post-update.d/systemd-boot", "#!/bin/sh\n");
    m.write("boot/vmlinuz-6.1.0-28-amd64", "");
    m.config(GPU_AND_NIC);
    let stdout = text(&m, &m.run(&["apply"]).stdout);
    assert!(
        stdout.contains("would run: update-initramfs -u -k all"),
        "{stdout}"
    );
    assert!(!stdout.contains("kernel-install"), "{stdout}");
}

#[test]
fn forcing_alone_rebuilds_the_initramfs_that_carries_the_marker() {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub();
    m.config(GPU_AND_NIC);
    assert_eq!(m.run(&["apply"]).status.code(), Some(0));
    let out = m.run(&["apply", "--force"]);
    let stdout = text(&m, &out.stdout);
    assert!(
        stdout.contains("wrote /var/lib/vfio-early/forced"),
        "{stdout}"
    );
    assert!(
        stdout.contains("would run: update-initramfs -u -k all"),
        "{stdout}"
    );
}
