//! `initramfs examine|list|verify` as a user runs them, on images built at test time by
//! `vfio_early::initramfs::testimg` (no binary fixtures to regenerate), and on one built
//! by GNU cpio and gzip, to prove the reader agrees with the tools that make real images.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vfio_early::initramfs::testimg::{self, Cpio};

use crate::fake::bin;

struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn new() -> Self {
        Images {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).expect("write image");
        p
    }
    /// Runs on a system (`--root`) that has a modprobe drop-in, so `verify` wants one in
    /// the image too.
    fn run(&self, args: &[&str], image: &Path) -> Output {
        let root = self.dir.path().join("root");
        std::fs::create_dir_all(root.join("etc/modprobe.d")).expect("mkdir");
        std::fs::write(root.join("etc/modprobe.d/vfio-early.conf"), "").expect("write");
        self.run_on(&root, args, image)
    }
    fn run_on(&self, root: &Path, args: &[&str], image: &Path) -> Output {
        Command::new(bin())
            .arg("--root")
            .arg(root)
            .arg("initramfs")
            .args(args)
            .arg(image)
            .output()
            .expect("run vfio-early")
    }
    fn text(&self, bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).replace(&self.dir.path().display().to_string(), "<dir>")
    }
}

#[test]
fn examine_shows_each_segment() {
    let t = Images::new();
    let mut image = testimg::debian_like("6.1.0-18-amd64", testimg::zstd);
    image.extend_from_slice(&[0; 8]);
    image.extend_from_slice(&testimg::gzip(&Cpio::newc().file("late", b"x").finish()));
    let p = t.write("initrd.img", &image);
    let out = t.run(&["examine"], &p);
    assert_eq!(out.status.code(), Some(0), "{}", t.text(&out.stderr));
    insta::assert_snapshot!(t.text(&out.stdout));
}

#[test]
fn list_prints_every_path_as_stored() {
    let t = Images::new();
    let p = t.write(
        "initrd.img",
        &testimg::debian_like("6.1.0-18-amd64", testimg::gzip),
    );
    let out = t.run(&["list"], &p);
    assert_eq!(out.status.code(), Some(0), "{}", t.text(&out.stderr));
    insta::assert_snapshot!(t.text(&out.stdout));
}

#[test]
fn list_agrees_with_gnu_cpio_and_gzip() {
    let t = Images::new();
    let tree = t.dir.path().join("tree");
    for d in ["usr/sbin", "etc/modprobe.d", "usr/lib/modules/6.12.9-amd64"] {
        std::fs::create_dir_all(tree.join(d)).expect("mkdir");
    }
    std::fs::write(tree.join("usr/sbin/vfio-early"), vec![7; 70_000]).expect("write");
    std::fs::write(tree.join("etc/vfio-early.toml"), "# odd length\n").expect("write");
    std::os::unix::fs::symlink("usr/sbin", tree.join("sbin")).expect("symlink");
    std::fs::hard_link(tree.join("etc/vfio-early.toml"), tree.join("etc/link")).expect("link");
    let script = "find . | LC_ALL=C sort | cpio --quiet --reproducible -o -H newc | gzip -n";
    let built = Command::new("sh")
        .args(["-c", script])
        .current_dir(&tree)
        .stderr(Stdio::inherit())
        .output()
        .expect("cpio and gzip are needed (apt-get install cpio gzip)");
    assert!(built.status.success(), "{script} failed");
    let p = t.write("gnu.img", &built.stdout);
    let ours = t.run(&["list"], &p);
    assert_eq!(ours.status.code(), Some(0), "{}", t.text(&ours.stderr));
    let theirs = Command::new("sh")
        .args(["-c", "gzip -dc | cpio --quiet -it"])
        .stdin(std::fs::File::open(&p).expect("open"))
        .output()
        .expect("cpio -it");
    assert_eq!(t.text(&ours.stdout), t.text(&theirs.stdout));
}

#[test]
fn list_into_a_closed_pipe_is_quiet() {
    let t = Images::new();
    let mut main = Cpio::newc();
    for i in 0..20_000 {
        main.file(&format!("usr/share/many/file-{i:05}"), b"");
    }
    let p = t.write("big.img", &testimg::zstd(&main.finish()));
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' initramfs list '{}' | head -n 1; echo \"status ${{PIPESTATUS:-}}\"",
            bin().display(),
            p.display()
        ))
        .output()
        .expect("sh");
    assert_eq!(t.text(&out.stdout), "usr/share/many/file-00000\nstatus \n");
    assert_eq!(t.text(&out.stderr), "", "a closed pipe is not an error");
}

#[test]
fn verify_passes_on_a_complete_image() {
    let t = Images::new();
    let p = t.write(
        "initrd.img",
        &testimg::debian_like("6.12.9-amd64", testimg::zstd),
    );
    let out = t.run(&["verify"], &p);
    assert_eq!(out.status.code(), Some(0), "{}", t.text(&out.stdout));
    insta::assert_snapshot!(t.text(&out.stdout));
}

#[test]
fn verify_names_what_is_missing() {
    let t = Images::new();
    // A 6.1 kernel also needs vfio_virqfd, which this image lacks.
    let p = t.write(
        "initrd.img",
        &testimg::debian_like("6.1.0-18-amd64", testimg::zstd),
    );
    let out = t.run(&["verify"], &p);
    assert_eq!(out.status.code(), Some(1));
    insta::assert_snapshot!("verify_6_1_lacks_virqfd", t.text(&out.stdout));

    let other = t.run(&["verify", "--kernel", "6.12.9-amd64"], &p);
    assert_eq!(other.status.code(), Some(1));
    insta::assert_snapshot!("verify_other_kernel", t.text(&other.stdout));

    let empty = t.write(
        "plain.img",
        &testimg::gzip(&Cpio::newc().dir(".").dir("etc").finish()),
    );
    let out = t.run(&["verify"], &empty);
    assert_eq!(out.status.code(), Some(1));
    insta::assert_snapshot!("verify_nothing_there", t.text(&out.stdout));
}

#[test]
fn dracut_layout_verifies() {
    let t = Images::new();
    let k = "usr/lib/modules/6.12.9-amd64/kernel/drivers/vfio";
    let mut c = Cpio::newc();
    c.file("usr/bin/vfio-early", b"elf")
        .file("etc/vfio-early.toml", b"")
        .file("etc/modprobe.d/vfio-early.conf", b"")
        .file("var/lib/dracut/hooks/pre-udev/00-vfio-early-bind.sh", b"");
    for m in [
        "vfio.ko.zst",
        "vfio_iommu_type1.ko.zst",
        "pci/vfio-pci-core.ko.zst",
        "pci/vfio-pci.ko.zst",
    ] {
        c.file(&format!("{k}/{m}"), b"");
    }
    let p = t.write("initramfs.img", &testimg::zstd(&c.finish()));
    let out = t.run(&["verify"], &p);
    assert_eq!(out.status.code(), Some(0), "{}", t.text(&out.stdout));
}

#[test]
fn bad_images_exit_2_with_the_offset() {
    let t = Images::new();
    let mut xz = Cpio::newc().file("early", b"").finish();
    xz.extend_from_slice(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0]);
    let zst = testimg::zstd(
        &Cpio::newc()
            .file("usr/sbin/vfio-early", &[1; 5000])
            .finish(),
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("xz", xz),
        ("truncated", zst[..zst.len() - 9].to_vec()),
        ("garbage", b"MZ\x90\x00 not an initramfs".to_vec()),
        ("empty", Vec::new()),
    ];
    let mut report = String::new();
    for (name, bytes) in cases {
        let p = t.write(name, &bytes);
        for cmd in ["examine", "list", "verify"] {
            let out = t.run(&[cmd], &p);
            assert_eq!(out.status.code(), Some(2), "{cmd} {name}");
            if cmd == "examine" {
                report.push_str(&t.text(&out.stderr));
            }
        }
    }
    let missing = t.run(&["list"], &t.dir.path().join("nope"));
    assert_eq!(missing.status.code(), Some(2));
    report.push_str(&t.text(&missing.stderr));
    insta::assert_snapshot!(report);
}

#[test]
fn verify_wants_the_modprobe_drop_in_only_where_the_system_has_one() {
    // apply writes the drop-in only when there is something to say, and the hooks copy
    // it only then.
    let t = Images::new();
    let mut main = Cpio::newc();
    main.file("usr/sbin/vfio-early", b"\x7fELF")
        .file("etc/vfio-early.toml", b"")
        .file("scripts/init-top/00vfio-early", b"")
        .file(
            "usr/lib/modules/6.12.9-amd64/kernel/drivers/vfio/vfio.ko.xz",
            b"",
        )
        .file(
            "usr/lib/modules/6.12.9-amd64/kernel/drivers/vfio/vfio_iommu_type1.ko.xz",
            b"",
        )
        .file(
            "usr/lib/modules/6.12.9-amd64/kernel/drivers/vfio/pci/vfio-pci.ko.xz",
            b"",
        )
        .file(
            "usr/lib/modules/6.12.9-amd64/kernel/drivers/vfio/pci/vfio-pci-core.ko.xz",
            b"",
        );
    let p = t.write("no-dropin.img", &testimg::zstd(&main.finish()));
    let bare = t.dir.path().join("bare-root");
    std::fs::create_dir_all(&bare).expect("mkdir");
    let out = t.run_on(&bare, &["verify"], &p);
    let report = t.text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(!report.contains("modprobe"), "{report}");

    let out = t.run(&["verify"], &p);
    let report = t.text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("MISSING  modprobe drop-in"), "{report}");
}

#[test]
fn list_escapes_control_characters_in_names() {
    let dir = tempfile::tempdir().expect("tmp");
    let image = dir.path().join("evil.img");
    std::fs::write(
        &image,
        Cpio::newc()
            .file("etc/a\nfake-line", b"")
            .file("etc/\x1b[31mred", b"")
            .finish(),
    )
    .expect("write");
    let out = Command::new(crate::fake::bin())
        .args(["initramfs", "list"])
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "etc/a\\x0afake-line\netc/\\x1b[31mred\n"
    );
}

#[test]
fn device_nodes_and_fifos_are_refused_not_read_forever() {
    let dir = tempfile::tempdir().expect("tmp");
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    for (path, kind) in [
        (std::path::PathBuf::from("/dev/zero"), "a character device"),
        (fifo, "a FIFO"),
        (dir.path().to_path_buf(), "a directory"),
    ] {
        for cmd in ["examine", "list", "verify"] {
            let out = Command::new("timeout")
                .arg("20")
                .arg(crate::fake::bin())
                .args(["initramfs", cmd])
                .arg(&path)
                .output()
                .expect("run");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{cmd} {}: {err}",
                path.display()
            );
            assert!(
                err.contains(&format!("not a regular file (it is {kind})")),
                "{err}"
            );
        }
    }
}
