//! Hostile values in the config, as a careless or malicious edit would write them. Every
//! writer either quotes a value for the program that parses its file (the shell that
//! sources the GRUB drop-in, then GRUB's own parser; kernel-install and ukify reading
//! `/etc/kernel/cmdline`; modprobe), or the config is refused with exit 2, file, line,
//! column, the line and a fix, and nothing is written. A config that is not a small
//! regular file is refused quickly, and a very long line gives a short error.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vfio_early::kargs;

use crate::fake::{bin, text, workstation, FakeMachine};

const NIC: &str = "[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n";

/// Kernel arguments the kernel takes as they are, with every character that the shell
/// or GRUB would act on, and a GRUB reserved word.
const ACCEPTED_ARGS: &str = r#"
[kernel]
extra_args = [
  'dyndbg="module vfio_pci +p"',
  'memmap=4G$4G',
  'x="$(touch pwned) `touch pwned2` ${HOME} $1"',
  'y="a; b && c || d | e < f > g # h { } [[ ]] * ?"',
  'acpi_osi="!Windows 2020"',
  'empty=""',
  'fi',
]

[modules]
blacklist = ["nouveau", "snd-hda-intel", "snd_hda_codec_hdmi"]
"#;

/// The same arguments as `/etc/kernel/cmdline` carries them: as written.
const AS_WRITTEN: &str = r#"intel_iommu=on iommu=pt dyndbg="module vfio_pci +p" memmap=4G$4G x="$(touch pwned) `touch pwned2` ${HOME} $1" y="a; b && c || d | e < f > g # h { } [[ ]] * ?" acpi_osi="!Windows 2020" empty="" fi"#;

/// The same arguments as GRUB words: what `$GRUB_CMDLINE_LINUX_DEFAULT` must hold once
/// the drop-in is sourced, and what `10_linux` pastes into grub.cfg.
const GRUB_WORDS: &str = r#"intel_iommu=on iommu=pt dyndbg="module vfio_pci +p" memmap="4G\$4G" x="\$(touch pwned) `touch pwned2` \${HOME} \$1" y="a; b && c || d | e < f > g # h { } [[ ]] * ?" acpi_osi="!Windows 2020" empty="" "fi""#;

fn applied(setup: impl Fn(&FakeMachine), config: &str) -> FakeMachine {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    setup(&m);
    m.config(config);
    let out = m.run(&["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    m
}

/// Runs `script` under `sh -e` (as grub-mkconfig runs) in the root, after sourcing
/// `/etc/default/grub` and the drop-in with its guard made true.
fn source_grub_defaults(m: &FakeMachine, script: &str) -> String {
    let dropin = m.read("etc/default/grub.d/vfio-early.cfg");
    let guard = "[ -x /usr/sbin/vfio-early ]";
    assert!(dropin.contains(guard), "{dropin}");
    m.write("installed.cfg", &dropin.replace(guard, "true"));
    let out = Command::new("sh")
        .arg("-e")
        .arg("-c")
        .arg(format!(". ./etc/default/grub\n. ./installed.cfg\n{script}"))
        .current_dir(m.root())
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "sourcing the drop-in failed under sh -e: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn grub_dropin_carries_hostile_arguments_through_sh_and_grub() {
    let m = applied(|m| m.grub(), &format!("{NIC}{ACCEPTED_ARGS}"));
    insta::assert_snapshot!(format!(
        "==> /etc/default/grub.d/vfio-early.cfg <==\n{}\n==> /etc/modprobe.d/vfio-early.conf <==\n{}",
        m.read("etc/default/grub.d/vfio-early.cfg"),
        m.read("etc/modprobe.d/vfio-early.conf")
    ));

    // Layer 1: the shell. The variable holds the GRUB words, and nothing ran.
    let value = source_grub_defaults(&m, "printf '%s' \"$GRUB_CMDLINE_LINUX_DEFAULT\"");
    assert_eq!(value, format!("quiet {GRUB_WORDS}"));
    assert!(!m.path("pwned").exists() && !m.path("pwned2").exists());

    // Layer 2: GRUB. `10_linux` pastes the arguments into the `linux` line through a
    // here-document; GRUB's own parser (grub-script-check) must accept the result.
    let grub_cfg = source_grub_defaults(
        &m,
        "args=\"${GRUB_CMDLINE_LINUX} ${GRUB_CMDLINE_LINUX_DEFAULT}\"\n\
         cat << EOF\n\
         \tlinux\t/vmlinuz-6.1.0-28-amd64 root=UUID=0b1c ro ${args}\n\
         EOF\n",
    );
    assert_eq!(
        grub_cfg,
        format!("\tlinux\t/vmlinuz-6.1.0-28-amd64 root=UUID=0b1c ro  quiet {GRUB_WORDS}\n")
    );
    m.write("grub.cfg", &grub_cfg);
    let check = Command::new("grub-script-check")
        .arg(m.path("grub.cfg"))
        .output()
        .expect("grub-script-check (Debian package grub-common) checks grub.cfg; install it");
    assert!(
        check.status.success(),
        "GRUB's parser refused the linux line:\n{grub_cfg}\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn kernel_cmdline_carries_hostile_arguments_as_written() {
    let user = "root=UUID=0b1c ro quiet";
    let m = applied(
        |m| m.systemd_boot(Some(&format!("{user}\n"))),
        &format!("{NIC}{ACCEPTED_ARGS}"),
    );
    let cmdline = m.read("etc/kernel/cmdline");
    insta::assert_snapshot!(cmdline);
    assert_eq!(cmdline, format!("{user} {AS_WRITTEN}\n"));
    // The kernel splits it into exactly these arguments.
    let mut want = kargs::split_args(user);
    want.extend(kargs::split_args(AS_WRITTEN));
    assert_eq!(kargs::split_args(&cmdline), want);
    assert_eq!(want.len(), 12);

    // The user adds an argument of their own; apply keeps it and adds nothing twice,
    // undo takes out exactly ours.
    m.write(
        "etc/kernel/cmdline",
        &cmdline.replace('\n', " foo=\"x y\"\n"),
    );
    let out = m.run(&["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    assert_eq!(
        m.read("etc/kernel/cmdline"),
        format!("{user} foo=\"x y\" {AS_WRITTEN}\n")
    );
    let out = m.run(&["undo"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));
    assert_eq!(
        m.read("etc/kernel/cmdline"),
        format!("{user} foo=\"x y\"\n")
    );
}

/// Each config is refused by `apply` with exit 2 and a located error, before anything is
/// written; the errors, one after another, are the snapshot.
fn refused_all(cases: &[&str]) -> String {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub();
    m.systemd_boot(Some("root=UUID=0b1c ro quiet\n"));
    let mut all = String::new();
    for case in cases {
        m.config(&format!("{NIC}{case}"));
        let before = m.tree();
        let out = m.run(&["apply"]);
        let err = text(&m, &out.stderr);
        assert_eq!(out.status.code(), Some(2), "{case}: {err}");
        assert!(
            err.starts_with("vfio-early: error: <root>/etc/vfio-early.toml:"),
            "{case}: {err}"
        );
        assert!(err.contains("\nfix: "), "{case}: {err}");
        assert!(err.len() < 1500, "{case}: {} bytes of error", err.len());
        assert_eq!(before, m.tree(), "{case}: a refused config wrote something");
        let case: String = case.trim().chars().take(100).collect();
        all.push_str(&format!("### {case}\n{err}\n"));
    }
    all
}

#[test]
fn kernel_arguments_that_cannot_be_written_are_refused() {
    let long = format!("[kernel]\nextra_args = [\"a={}\"]\n", "b".repeat(3000));
    let cases = [
        "[kernel]\nextra_args = [\"quiet\\nrd.break=pre-mount\"]\n",
        "[kernel]\nextra_args = [\"a\\tb\"]\n",
        "[kernel]\nextra_args = [\"a\\u0000b\"]\n",
        "[kernel]\nextra_args = [\"a=\\u001b[2J\"]\n",
        "[kernel]\nextra_args = [\n  \"quiet\",\n  \"iommu=pt intel_iommu=on\",\n]\n",
        "[kernel]\nextra_args = ['dyndbg=\"module vfio_pci +p']\n",
        "[kernel]\nextra_args = ['\"dyndbg=module vfio_pci +p\"']\n",
        "[kernel]\nextra_args = ['foo=a\"b c\"']\n",
        "[kernel]\nextra_args = [\"foo='a b'\"]\n",
        "[kernel]\nextra_args = ['memmap=4G\\$4G']\n",
        "[kernel]\nextra_args = [\"$(reboot)\"]\n",
        "[kernel]\nextra_args = [\"`reboot`\"]\n",
        "[kernel]\nextra_args = [\"a;reboot\"]\n",
        "[kernel]\nextra_args = [\"\"]\n",
        "[kernel]\nextra_args = [\" quiet\"]\n",
        "[kernel]\nextra_args = [\"=x\"]\n",
        "[kernel]\nextra_args = [\"caf\u{e9}=1\"]\n",
        "[kernel]\nextra_args = ['x=\"a  b\"']\n",
        &long,
    ];
    insta::assert_snapshot!(refused_all(&cases));
}

#[test]
fn module_names_that_are_not_module_names_are_refused() {
    let long = format!("[modules]\nblacklist = [\"{}\"]\n", "m".repeat(56));
    let cases = [
        "[modules]\nblacklist = [\"nouveau\\ninstall vfio-pci /bin/sh -c id\"]\n",
        "[modules]\nblacklist = [\"nouveau\", \"nouveau amdgpu\"]\n",
        "[modules]\nblacklist = [\"\"]\n",
        "[modules]\nblacklist = [\"../nouveau\"]\n",
        "[modules]\nblacklist = [\"# nouveau\"]\n",
        "[modules]\nblacklist = [\"nouveau;reboot\"]\n",
        &long,
    ];
    insta::assert_snapshot!(refused_all(&cases));
}

/// Runs the binary, killing it (a failure) if it has not ended within `secs`.
fn run_bounded(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// `vfio-early --config PATH check` with its address space capped at 1 GiB, so that an
/// unbounded read fails fast instead of eating the machine's memory.
fn check_with_config(m: &FakeMachine, config: &Path) -> Output {
    run_bounded(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -v 1048576 && exec \"$@\"")
            .arg("sh")
            .arg(bin())
            .arg("--root")
            .arg(m.root())
            .arg("--config")
            .arg(config)
            .arg("check"),
        20,
    )
}

#[test]
fn a_config_that_is_not_a_regular_file_is_refused_quickly() {
    let m = workstation();
    let fifo = m.path("config.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let mut all = String::new();
    for path in [fifo.as_path(), Path::new("/dev/zero"), &m.path("etc")] {
        let out = check_with_config(&m, path);
        let err = text(&m, &out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        assert!(err.contains("not a regular file"), "{err}");
        all.push_str(&err);
    }
    insta::assert_snapshot!(all);
}

#[test]
fn a_config_larger_than_one_mib_is_refused() {
    let m = workstation();
    // Exactly 1 MiB is read; one byte more is refused.
    let pad = |total: usize| {
        let mut t = NIC.to_string();
        while t.len() < total {
            let n = (total - t.len()).min(100);
            if n >= 3 {
                t.push_str(&format!("#{}\n", "x".repeat(n - 2)));
            } else {
                t.push_str(&"\n".repeat(n));
            }
        }
        t
    };
    let exact = pad(1024 * 1024);
    assert_eq!(exact.len(), 1024 * 1024);
    m.write("exact.toml", &exact);
    let out = check_with_config(&m, &m.path("exact.toml"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&m, &out.stderr));

    m.write("big.toml", &pad(1024 * 1024 + 1));
    let out = check_with_config(&m, &m.path("big.toml"));
    assert_eq!(out.status.code(), Some(2));
    insta::assert_snapshot!(text(&m, &out.stderr));
}

#[test]
fn an_error_on_a_very_long_line_shows_an_excerpt() {
    let m = workstation();
    let many = "\"y\", ".repeat(100_000);
    m.config(&format!(
        "{NIC}[kernel]\nextra_args = [{many}\"a b\", {many}]\n"
    ));
    let out = m.run(&["check"]);
    let err = text(&m, &out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", &err[..err.len().min(500)]);
    assert!(err.len() < 1500, "{} bytes of error", err.len());
    insta::assert_snapshot!(err);
}
