//! `cargo xtask deb-test`: the package's life cycle, for real, in a Debian 12 chroot
//! (the boot harness's cached base image): install with apt, the initramfs rebuilt with
//! our files, an upgrade that keeps an edited config, remove (everything but the
//! conffile gone, file lists compared with the tree from before), purge (nothing left).
//! Then the CLI tests run against the binary the package installed (the autopkgtest of
//! debian/tests/control, here).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use xshell::{cmd, Shell};

use crate::scenario::{Distro, Generator};
use crate::{command, image, progress};

/// Paths whose contents change with any apt run, and are no file of ours.
const VOLATILE: &[&str] = &[
    "var/lib/dpkg/",
    "var/lib/apt/",
    "var/cache/",
    "var/log/",
    "tmp/",
    "var/tmp/",
    "etc/ld.so.cache",
    "var/lib/initramfs-tools/",
];

pub fn run(sh: &Shell, project: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    crate::tools::ensure_apt(sh, &[("debootstrap", "debootstrap")])?;
    let previous = crate::deb::build(sh, Some(&upgrade_from_version(sh)?), false)?;
    let previous_copy = project.join("target/deb-test/previous.deb");
    std::fs::create_dir_all(project.join("target/deb-test"))?;
    std::fs::copy(&previous, &previous_copy)?;
    let current = crate::deb::build(sh, None, true)?;

    let base = image::ensure_base(project, Distro::Bookworm, Generator::InitramfsTools)?;
    let work = project.join("target/deb-test");
    let tree = work.join("root");
    let log = work.join("deb-test.log");
    let _ = std::fs::remove_file(&log);
    progress::line(&format!(
        "deb-test: Debian 12 chroot from the cached base (log {})",
        log.display()
    ));
    image::copy_tree(&base, &tree, &log)?;
    let chroot = |script: &str| image::chroot_sh(&tree, script, &log, Duration::from_secs(600));
    // The test images' small initramfs: each of the life cycle's nine builds takes
    // seconds instead of 20 (what goes into an image is the hook's business, and the
    // hook adds the vfio modules in any MODULES mode). The install's trigger builds the
    // first one.
    chroot(crate::layer::SMALL_INITRAMFS)?;
    let step = |what: &str| progress::line(&format!("deb-test: {what}"));

    let before = file_list(&tree)?;
    let release = image::kernel_release(&tree)?;
    let initrd = tree.join(format!("boot/initrd.img-{release}"));
    let initrd_mtime = || std::fs::metadata(&initrd).and_then(|m| m.modified()).ok();
    let built_before = initrd_mtime();

    step("install the previous build with apt");
    std::fs::copy(&previous_copy, tree.join("tmp/previous.deb"))?;
    std::fs::copy(&current, tree.join("tmp/current.deb"))?;
    chroot("apt-get install -y -q /tmp/previous.deb")?;
    expect(
        tree.join("etc/vfio-early.toml").is_file(),
        "the config /etc/vfio-early.toml is installed",
    )?;
    expect(
        initrd_mtime() != built_before,
        "the update-initramfs trigger rebuilt the initramfs",
    )?;
    // The shipped config takes nothing, so the image holds nothing of ours.
    let listing = initramfs_listing(&tree, &log)?;
    expect(
        !has(&listing, "scripts/init-top/00vfio-early") && !has(&listing, "usr/sbin/vfio-early"),
        "with nothing configured the image holds no file of vfio-early's",
    )?;

    step("configure a device and apply");
    let config = "[iommu]\nvendor = \"intel\"\n\n[[device]]\nid = \"8086:10d3\"\n";
    std::fs::write(tree.join("etc/vfio-early.toml"), config)?;
    chroot("vfio-early apply")?;
    for f in [
        "etc/default/grub.d/vfio-early.cfg",
        "var/lib/vfio-early/manifest.json",
    ] {
        expect(tree.join(f).exists(), &format!("apply wrote /{f}"))?;
    }
    let grub = std::fs::read_to_string(tree.join("boot/grub/grub.cfg"))?;
    expect(
        grub.contains("intel_iommu=on"),
        "update-grub put intel_iommu=on into grub.cfg",
    )?;
    let listing = initramfs_listing(&tree, &log)?;
    for f in [
        "usr/sbin/vfio-early",
        "etc/vfio-early.toml",
        "scripts/init-top/00vfio-early",
        "kernel/drivers/vfio/pci/vfio-pci.ko",
    ] {
        expect(
            has(&listing, f),
            &format!("after apply the initramfs holds {f}"),
        )?;
    }

    step("upgrade to the current build with an edited config");
    let edited = format!("# edited by the admin\n{config}");
    std::fs::write(tree.join("etc/vfio-early.toml"), &edited)?;
    chroot("apt-get install -y -q /tmp/current.deb")?;
    expect(
        std::fs::read_to_string(tree.join("etc/vfio-early.toml"))? == edited,
        "the upgrade kept the edited config",
    )?;
    expect(
        tree.join("etc/default/grub.d/vfio-early.cfg").exists(),
        "the upgrade kept what apply wrote",
    )?;

    step("remove");
    chroot("apt-get remove -y -q vfio-early")?;
    let after_remove = file_list(&tree)?;
    let mut allowed = BTreeSet::new();
    allowed.insert("etc/vfio-early.toml".to_string());
    compare(&before, &after_remove, &allowed, "after apt remove")?;
    let grub = std::fs::read_to_string(tree.join("boot/grub/grub.cfg"))?;
    expect(
        !grub.contains("intel_iommu=on"),
        "grub.cfg lost the arguments after remove",
    )?;
    let listing = initramfs_listing(&tree, &log)?;
    expect(
        !listing
            .iter()
            .any(|l| l.contains("vfio-early") || l.ends_with("etc/vfio-early.toml")),
        "the initramfs holds no vfio-early file after remove",
    )?;

    step("purge");
    chroot("apt-get purge -y -q vfio-early")?;
    let after_purge = file_list(&tree)?;
    compare(&before, &after_purge, &BTreeSet::new(), "after apt purge")?;

    step("CLI tests against the installed binary (as autopkgtest does)");
    chroot("apt-get install -y -q /tmp/current.deb")?;
    let bin = tree.join("usr/sbin/vfio-early");
    command::run(
        std::process::Command::new("cargo")
            .args(["test", "--quiet", "--test", "it"])
            .env("VFIO_EARLY_BIN", &bin)
            .current_dir(project),
        &log,
        Duration::from_secs(1800),
    )
    .context("the integration tests against the installed binary")?;

    image::remove_tree(&tree)?;
    progress::line(&format!(
        "deb-test: passed in {:.0} s (install, apply, upgrade, remove, purge, installed-binary tests)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The version the upgrade starts from: the changelog's, with `~prev` (sorts lower).
fn upgrade_from_version(sh: &Shell) -> anyhow::Result<String> {
    let v = cmd!(sh, "timeout 60 dpkg-parsechangelog -S Version")
        .read()
        .context("dpkg-parsechangelog")?;
    Ok(format!("{}~prev", v.trim()))
}

/// Whether the listing has a path ending in `suffix` (lsinitramfs prints no `./`).
fn has(listing: &[String], suffix: &str) -> bool {
    listing
        .iter()
        .any(|l| l == suffix || l.ends_with(&format!("/{suffix}")))
}

fn expect(ok: bool, what: &str) -> anyhow::Result<()> {
    if ok {
        progress::line(&format!("deb-test:   ok: {what}"));
        Ok(())
    } else {
        bail!("deb-test: FAILED: {what}")
    }
}

/// Every path in the tree (relative, directories with a trailing `/`), without the
/// volatile ones.
fn file_list(tree: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<PathBuf> = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let p = e.path();
            let rel = p
                .strip_prefix(tree)
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            let is_dir = e.file_type()?.is_dir();
            let shown = if is_dir { format!("{rel}/") } else { rel };
            if VOLATILE.iter().any(|v| shown.starts_with(v)) {
                continue;
            }
            if is_dir {
                stack.push(p);
            }
            out.insert(shown);
        }
    }
    Ok(out)
}

fn compare(
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
    allowed: &BTreeSet<String>,
    when: &str,
) -> anyhow::Result<()> {
    let added: Vec<&String> = after
        .difference(before)
        .filter(|p| !allowed.contains(*p))
        .collect();
    let lost: Vec<&String> = before.difference(after).collect();
    if added.is_empty() && lost.is_empty() {
        progress::line(&format!(
            "deb-test:   ok: {when}, the tree has the same {} paths as before the install{}",
            before.len(),
            if allowed.is_empty() {
                String::new()
            } else {
                format!(
                    " (plus {})",
                    allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            }
        ));
        return Ok(());
    }
    bail!(
        "deb-test: FAILED: {when}: added {added:?}, lost {lost:?} (compared with the tree before the install)"
    )
}

/// The paths in the image's initramfs, listed by the image's own lsinitramfs.
fn initramfs_listing(tree: &Path, log: &Path) -> anyhow::Result<Vec<String>> {
    let release = image::kernel_release(tree)?;
    let out = tree.join("tmp/initramfs-listing");
    image::chroot_sh(
        tree,
        &format!("lsinitramfs /boot/initrd.img-{release} > /tmp/initramfs-listing"),
        log,
        Duration::from_secs(300),
    )?;
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok(text.lines().map(str::to_string).collect())
}
