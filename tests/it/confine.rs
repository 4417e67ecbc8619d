//! `--root` confines every write: symlinked directories under the root that point outside
//! it resolve inside the root (chroot semantics) or are refused, never followed out; a
//! manifest naming `../` paths is refused; owned files and the directories apply makes get
//! fixed modes whatever the umask; temporary files a crash left are removed by the next run.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::fake::{bin, text, workstation, FakeMachine};

const CONFIG: &str = "[[device]]\nid = \"10de:1b80\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:04:00.0\"\n";

/// A workstation with GRUB and initramfs-tools, ready to apply [`CONFIG`].
fn machine() -> FakeMachine {
    let m = workstation();
    m.initramfs_tools();
    m.kernel_61();
    m.grub();
    m.config(CONFIG);
    m
}

/// Where a chroot at `m` finds the absolute path `abs`.
fn inside(m: &FakeMachine, abs: &Path) -> PathBuf {
    m.root().join(abs.strip_prefix("/").expect("absolute"))
}

/// Every name under `dir`, recursively (symlinks not followed).
fn all_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).expect("prefix").display().to_string());
            if e.file_type().expect("type").is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn assert_ok(m: &FakeMachine, out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        text(m, &out.stdout),
        text(m, &out.stderr)
    );
}

#[test]
fn an_absolute_symlink_to_outside_resolves_inside_the_root() {
    let m = machine();
    let outside = tempfile::tempdir().expect("tempdir");
    symlink(outside.path(), m.path("etc/modprobe.d")).expect("symlink");
    fs::create_dir_all(inside(&m, outside.path())).expect("mkdir");

    let out = m.run(&["apply"]);
    assert_ok(&m, &out);
    assert_eq!(all_names(outside.path()), Vec::<String>::new());
    let written = inside(&m, outside.path()).join("vfio-early.conf");
    assert!(
        fs::read_to_string(&written)
            .expect("modprobe file inside the root")
            .contains("softdep e1000e pre: vfio-pci"),
        "{}",
        written.display()
    );

    assert_ok(&m, &m.run(&["undo"]));
    assert!(!written.exists());
    assert_eq!(all_names(outside.path()), Vec::<String>::new());
}

#[test]
fn a_symlink_leading_nowhere_under_the_root_is_refused() {
    let m = machine();
    let outside = tempfile::tempdir().expect("tempdir");
    symlink(outside.path(), m.path("etc/modprobe.d")).expect("symlink");

    let out = m.run(&["apply"]);
    let err = text(&m, &out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!(
        "cannot create the directory <root>/etc/modprobe.d: it is a symlink to `{}`, which does \
         not exist under the root <root>",
        outside.path().display()
    );
    assert!(err.contains(&want), "{err}");
    assert_eq!(all_names(outside.path()), Vec::<String>::new());
    assert!(!inside(&m, outside.path()).exists());
}

#[test]
fn a_relative_symlink_climbing_out_stops_at_the_root() {
    let m = machine();
    let outside = tempfile::tempdir().expect("tempdir");
    let climb = format!(
        "{}{}",
        "../".repeat(40),
        outside
            .path()
            .strip_prefix("/")
            .expect("absolute")
            .display()
    );
    symlink(&climb, m.path("etc/default/grub.d")).expect("symlink");
    // On the host the link does lead outside.
    assert_eq!(
        fs::canonicalize(m.path("etc/default/grub.d")).expect("canonicalize"),
        fs::canonicalize(outside.path()).expect("canonicalize")
    );
    fs::create_dir_all(inside(&m, outside.path())).expect("mkdir");

    assert_ok(&m, &m.run(&["apply"]));
    assert_eq!(all_names(outside.path()), Vec::<String>::new());
    let dropin = inside(&m, outside.path()).join("vfio-early.cfg");
    assert!(
        fs::read_to_string(&dropin)
            .expect("GRUB drop-in inside the root")
            .contains("intel_iommu=on"),
        "{}",
        dropin.display()
    );
}

#[test]
fn a_state_directory_symlinked_out_keeps_manifest_and_config_inside() {
    let m = machine();
    let outside = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(m.path("var/lib")).expect("mkdir");
    symlink(outside.path(), m.path("var/lib/vfio-early")).expect("symlink");
    let state = inside(&m, outside.path());
    fs::create_dir_all(&state).expect("mkdir");

    assert_ok(&m, &m.run(&["apply"]));
    assert_eq!(all_names(outside.path()), Vec::<String>::new());
    assert_eq!(all_names(&state), ["applied.toml", "manifest.json"]);
    // Reads follow the same resolution: a second apply finds its own manifest.
    let again = m.run(&["apply"]);
    assert_ok(&m, &again);
    assert!(text(&m, &again.stdout).contains("nothing changed"));

    assert_ok(&m, &m.run(&["undo"]));
    assert_eq!(all_names(&state), Vec::<String>::new());
    assert_eq!(all_names(outside.path()), Vec::<String>::new());
}

#[test]
fn a_manifest_naming_paths_outside_the_root_is_refused() {
    let m = workstation();
    m.config("");
    // A directory beside the root, reachable with `..`.
    let parent = m.root().parent().expect("parent");
    let outside = tempfile::tempdir_in(parent).expect("tempdir");
    let name = outside
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    fs::create_dir(outside.path().join("empty")).expect("mkdir");
    fs::write(outside.path().join("file"), "keep").expect("write");
    let manifest = format!(
        "{{\"schema\": 1, \"files\": [\"../{name}/file\"], \"dirs_created\": [\"../{name}/empty\"], \
         \"cmdline_added\": [], \"cmdline_before\": null, \"cmdline_after\": null, \
         \"kernel_args\": [], \"pending\": []}}\n"
    );
    m.write("var/lib/vfio-early/manifest.json", &manifest);

    for cmd in ["undo", "apply"] {
        let out = m.run(&[cmd]);
        let err = text(&m, &out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(err.contains("the manifest is damaged"), "{cmd}: {err}");
        assert!(err.contains(&format!("`../{name}/")), "{cmd}: {err}");
        assert!(outside.path().join("empty").is_dir(), "{cmd} removed it");
        assert_eq!(
            fs::read_to_string(outside.path().join("file")).expect("file"),
            "keep"
        );
        assert_eq!(m.read("var/lib/vfio-early/manifest.json"), manifest);
    }
}

/// Runs the binary on `m` with `umask` set.
fn run_with_umask(m: &FakeMachine, umask: &str, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask}; exec \"$@\""))
        .arg("sh")
        .arg(bin())
        .arg("--root")
        .arg(m.root())
        .args(args)
        .output()
        .expect("run vfio-early")
}

#[test]
fn modes_are_fixed_whatever_the_umask() {
    for umask in ["000", "077"] {
        let m = machine();
        assert!(!m.path("var").exists() && !m.path("etc/modprobe.d").exists());
        let out = run_with_umask(&m, umask, &["apply"]);
        assert_ok(&m, &out);
        for f in [
            "etc/modprobe.d/vfio-early.conf",
            "etc/default/grub.d/vfio-early.cfg",
            "var/lib/vfio-early/applied.toml",
        ] {
            assert_eq!(mode(&m.path(f)), 0o644, "umask {umask}: {f}");
        }
        let manifest = mode(&m.path("var/lib/vfio-early/manifest.json"));
        assert!(
            manifest == 0o644 || manifest == 0o600,
            "umask {umask}: manifest {manifest:o}"
        );
        for d in [
            "etc/modprobe.d",
            "etc/default/grub.d",
            "var",
            "var/lib",
            "var/lib/vfio-early",
        ] {
            assert_eq!(mode(&m.path(d)), 0o755, "umask {umask}: {d}");
        }

        // A rewrite keeps the fixed mode, and so does a file apply replaces.
        m.config("[[device]]\nid = \"10de:1b80\"\n");
        assert_ok(&m, &run_with_umask(&m, umask, &["apply"]));
        assert_eq!(
            mode(&m.path("etc/modprobe.d/vfio-early.conf")),
            0o644,
            "umask {umask}: rewrite"
        );
    }
}

#[test]
fn an_existing_kernel_cmdline_is_rewritten_0644_whatever_the_umask() {
    for umask in ["000", "077"] {
        let m = workstation();
        m.initramfs_tools();
        m.kernel_61();
        m.systemd_boot(Some("root=UUID=0b1c ro quiet\n"));
        m.config(CONFIG);
        assert_ok(&m, &run_with_umask(&m, umask, &["apply"]));
        assert!(m.read("etc/kernel/cmdline").contains("intel_iommu=on"));
        assert_eq!(mode(&m.path("etc/kernel/cmdline")), 0o644, "umask {umask}");
    }
}

#[test]
fn temporary_files_a_crash_left_are_removed_by_the_next_run() {
    let m = machine();
    let stale = [
        "etc/modprobe.d/.vfio-early.conf.vfio-early-tmp.4242",
        "etc/default/grub.d/.vfio-early.cfg.vfio-early-tmp.17",
        "var/lib/vfio-early/.manifest.json.vfio-early-tmp.99999",
        "var/lib/vfio-early/.applied.toml.vfio-early-tmp.3",
    ];
    for f in stale {
        m.write(f, "half");
    }
    m.write("etc/modprobe.d/other.conf", "options x y=1\n");
    m.write("etc/modprobe.d/.vfio-early.conf.bak", "user's\n");

    assert_ok(&m, &m.run(&["apply"]));
    for f in stale {
        assert!(!m.path(f).exists(), "{f} left after apply");
    }
    assert_eq!(
        all_names(&m.path("etc/modprobe.d")),
        [".vfio-early.conf.bak", "other.conf", "vfio-early.conf"]
    );

    // A crash during undo's removal: the next undo clears it too.
    m.write(stale[0], "half");
    assert_ok(&m, &m.run(&["undo"]));
    assert_eq!(
        all_names(&m.path("etc/modprobe.d")),
        [".vfio-early.conf.bak", "other.conf"]
    );
}
