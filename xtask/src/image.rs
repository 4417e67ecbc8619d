//! Test images for the boot harness and the package test: Debian root trees made with
//! debootstrap from this machine's own Debian mirror, cached between runs.
//!
//! Three layers, each a plain directory copied from the one before, so a scenario can
//! never spoil the cache:
//! 1. base (cached, keyed by distro, initramfs generator and package set):
//!    debootstrap + kernel + the boot plumbing every scenario needs;
//! 2. per package and base (`layer`, cached too): the .deb installed with
//!    `apt install ./...deb`, the harness's probe and its units, the guest trimmed;
//! 3. per scenario (`matrix`): the config written, `vfio-early apply` run; then its
//!    disk (`disk`).
//!
//! Nothing is mounted into the trees: the chroot commands see no host `/proc` or
//! `/sys`, so `apply` cannot read the build machine's devices (scenarios name the
//! IOMMU vendor), and a failed run leaves no mount behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::command;
use crate::scenario::{Distro, Generator};

/// The filesystem UUID of every test root disk; the grub-probe shim reports it.
pub const ROOT_UUID: &str = "6d8f5a3e-0b7c-4c1e-9a57-0fe000000001";

/// Cache directory: `$VFIO_EARLY_CACHE` or `target/boot-cache`.
pub fn cache_dir(project: &Path) -> PathBuf {
    std::env::var_os("VFIO_EARLY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| project.join("target/boot-cache"))
}

/// The Debian mirror: `$VFIO_EARLY_MIRROR`, else the first `URIs:` (deb822) or `deb`
/// line of this machine's apt sources that serves the main archive.
pub fn mirror() -> anyhow::Result<String> {
    if let Some(m) = std::env::var_os("VFIO_EARLY_MIRROR") {
        return Ok(m.to_string_lossy().into_owned());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|it| it.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.insert(0, PathBuf::from("/etc/apt/sources.list"));
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if let Some(uri) = mirror_from_sources(&text) {
            return Ok(uri);
        }
    }
    bail!(
        "no Debian mirror found in /etc/apt/sources.list{{,.d/*.sources}}; \
         set VFIO_EARLY_MIRROR to the URL of a Debian archive"
    )
}

/// The archive URI from a sources file's text (deb822 or one-line format), skipping the
/// security and other non-main archives.
pub fn mirror_from_sources(text: &str) -> Option<String> {
    let usable = |uri: &str| {
        (uri.starts_with("http://") || uri.starts_with("https://"))
            && uri.trim_end_matches('/').ends_with("/debian")
    };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("URIs:") {
            if let Some(uri) = rest.split_whitespace().find(|u| usable(u)) {
                return Some(uri.to_string());
            }
        }
        if let Some(rest) = line.strip_prefix("deb ") {
            if let Some(uri) = rest
                .split_whitespace()
                .filter(|t| !t.starts_with('['))
                .find(|u| usable(u))
            {
                return Some(uri.to_string());
            }
        }
    }
    None
}

/// Packages of a base image, in two steps: what debootstrap includes, then what is
/// installed inside (dracut must be in place before the kernel on Debian 13, or the
/// kernel pulls initramfs-tools).
pub fn packages(distro: Distro, generator: Generator) -> (Vec<&'static str>, Vec<&'static str>) {
    let common = [
        "systemd-sysv",
        "udev",
        "kmod",
        "zstd",
        "xz-utils",
        "grub2-common",
        "e2fsprogs",
    ];
    let mut first: Vec<&str> = common.to_vec();
    let mut second = Vec::new();
    match generator {
        Generator::InitramfsTools => first.extend(["initramfs-tools", "linux-image-amd64"]),
        Generator::Dracut => {
            first.push("dracut");
            second.push("linux-image-amd64");
        }
    }
    let _ = distro;
    (first, second)
}

/// A short stable key for the cache: distro, generator and a hash of the package set
/// and of the base setup script.
pub fn base_key(distro: Distro, generator: Generator) -> String {
    let (a, b) = packages(distro, generator);
    let mut h: u64 = 0xcbf29ce484222325;
    for byte in a
        .join(",")
        .bytes()
        .chain([b'|'])
        .chain(b.join(",").bytes())
        .chain(BASE_SETUP.bytes())
    {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{}-{}-{:08x}", distro.name(), generator.name(), h as u32)
}

/// Runs in every base image once: console on the serial port, no login prompt on it,
/// a root filesystem in fstab, and a `grub-probe` stand-in, because the chroot has no
/// block device for GRUB to probe and `update-grub` must still write a real grub.cfg.
const BASE_SETUP: &str = r#"
set -e
echo vfio-early-test > /etc/hostname
printf '/dev/vda / ext4 errors=remount-ro 0 1\n' > /etc/fstab
ln -sf /dev/null /etc/systemd/system/serial-getty@ttyS0.service
ln -sf /dev/null /etc/systemd/system/getty@tty1.service
# grub2-common ships no /etc/default/grub (grub-pc's postinst writes it): write the
# Debian defaults, with the console on the serial port.
cat > /etc/default/grub <<'GRUB'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX="console=ttyS0"
GRUB
dpkg-divert --quiet --local --rename --add /usr/sbin/grub-probe
cat > /usr/sbin/grub-probe <<'SHIM'
#!/bin/sh
# vfio-early test images: the chroot has no block device to probe; answer for the
# virtio disk the harness boots from.
target=
for a in "$@"; do
    case "$a" in
        --target=*) target=${a#--target=} ;;
    esac
done
case "$target" in
    device) echo /dev/vda ;;
    fs) echo ext2 ;;
    fs_uuid) echo "@ROOT_UUID@" ;;
    fs_label) echo vfe-root ;;
    drive) echo '(hd0)' ;;
    compatibility_hint) echo hd0 ;;
    *) ;;
esac
exit 0
SHIM
chmod 755 /usr/sbin/grub-probe
mkdir -p /boot/grub
update-grub
"#;

/// Runs `script` with `sh -e` inside `dir` (chroot), with a clean environment, its
/// output appended to `log`, killed after `limit`; fails unless it exits 0.
pub fn chroot_sh(dir: &Path, script: &str, log: &Path, limit: Duration) -> anyhow::Result<()> {
    match chroot_status(dir, script, log, limit)? {
        Some(0) => Ok(()),
        code => bail!(
            "in the image {}: `{}` failed (exit {code:?}); see {}",
            dir.display(),
            script.trim().lines().next().unwrap_or(""),
            log.display()
        ),
    }
}

/// Like `chroot_sh`, returning the exit code (`None` when killed) for callers that
/// expect failures.
pub fn chroot_status(
    dir: &Path,
    script: &str,
    log: &Path,
    limit: Duration,
) -> anyhow::Result<Option<i32>> {
    let mut cmd = Command::new("env");
    cmd.arg("-i")
        .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("DEBIAN_FRONTEND=noninteractive")
        .arg("LC_ALL=C")
        .arg("HOME=/root")
        .arg("chroot")
        .arg(dir)
        .arg("sh")
        .arg("-ec")
        .arg(script);
    command::status(&mut cmd, log, limit)
}

/// Copies a tree, preserving everything (`cp -a`).
pub fn copy_tree(from: &Path, to: &Path, log: &Path) -> anyhow::Result<()> {
    remove_tree(to)?;
    command::run(
        Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(from)
            .arg(to),
        log,
        Duration::from_secs(600),
    )
}

/// Removes a tree (or a file) if it exists.
pub fn remove_tree(path: &Path) -> anyhow::Result<()> {
    match path.symlink_metadata() {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return Ok(()),
    }
    .with_context(|| format!("removing {}", path.display()))
}

/// `cargo xtask images`: every base image the boot scenarios and deb-test use, in the
/// order the matrix first needs them (its costliest scenarios start first), Debian 12
/// with initramfs-tools (deb-test's) among the first. `cargo xtask test` runs this
/// beside its first steps, so that the debootstraps' downloads overlap the compiling;
/// a later xtask that needs an image still being made waits for it (see [`ensure_base`]).
pub fn prefetch(project: &Path) -> anyhow::Result<()> {
    let mut scenarios = crate::scenario::load_dir(&project.join("tests/boot/scenarios"))?;
    scenarios.sort_by_key(|s| std::cmp::Reverse(s.cost()));
    let mut bases = vec![(Distro::Bookworm, Generator::InitramfsTools)];
    for s in &scenarios {
        if !bases.contains(&(s.distro, s.generator)) {
            bases.push((s.distro, s.generator));
        }
    }
    for (distro, generator) in bases {
        let dir = ensure_base(project, distro, generator)?;
        crate::progress::line(&format!("images: {}", dir.display()));
    }
    Ok(())
}

/// The base image for (distro, generator): from the cache, or built now (a few minutes).
pub fn ensure_base(
    project: &Path,
    distro: Distro,
    generator: Generator,
) -> anyhow::Result<PathBuf> {
    let cache = cache_dir(project);
    let key = base_key(distro, generator);
    let dir = cache.join(&key);
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // One builder per image: another xtask (deb-test beside boot-test, or a second
    // terminal) waits here for the first, then finds the image made.
    let lock_path = cache.join(format!("{key}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let partial = cache.join(format!("{key}.partial"));
    remove_tree(&partial)?;
    let log = cache.join(format!("{key}.log"));
    let _ = std::fs::remove_file(&log);
    let mirror = mirror()?;
    let (first, second) = packages(distro, generator);
    let phase = crate::progress::start(
        &format!("image {}/{}", distro.name(), generator.name()),
        "debootstrap from this machine's mirror (a few minutes, once)",
    );
    command::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", first.join(",")))
            .arg(distro.name())
            .arg(&partial)
            .arg(&mirror),
        &log,
        Duration::from_secs(1500),
    )
    .context("debootstrap")?;
    if !second.is_empty() {
        std::fs::copy("/etc/resolv.conf", partial.join("etc/resolv.conf")).ok();
        chroot_sh(
            &partial,
            &format!(
                "apt-get update -q\napt-get install -y -q --no-install-recommends {}",
                second.join(" ")
            ),
            &log,
            Duration::from_secs(1200),
        )?;
    }
    chroot_sh(
        &partial,
        &BASE_SETUP.replace("@ROOT_UUID@", ROOT_UUID),
        &log,
        Duration::from_secs(300),
    )?;
    chroot_sh(&partial, "apt-get clean", &log, Duration::from_secs(60))?;
    std::fs::write(partial.join(".complete"), format!("{key}\n"))?;
    remove_tree(&dir)?;
    std::fs::rename(&partial, &dir)?;
    phase.done(&format!("built {key}; log {}", log.display()));
    Ok(dir)
}

/// The installed kernel release in a tree (the newest when several).
pub fn kernel_release(tree: &Path) -> anyhow::Result<String> {
    let mut rel: Vec<String> = std::fs::read_dir(tree.join("lib/modules"))
        .with_context(|| format!("no kernel in {}", tree.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    rel.sort();
    rel.pop()
        .with_context(|| format!("no kernel under {}/lib/modules", tree.display()))
}

/// The kernel arguments of the first `linux` line in the tree's grub.cfg (what GRUB
/// would boot by default), without the kernel path.
pub fn grub_linux_args(tree: &Path) -> anyhow::Result<String> {
    let cfg = tree.join("boot/grub/grub.cfg");
    let text =
        std::fs::read_to_string(&cfg).with_context(|| format!("reading {}", cfg.display()))?;
    linux_args_from_grub_cfg(&text).with_context(|| format!("no linux line in {}", cfg.display()))
}

pub fn linux_args_from_grub_cfg(text: &str) -> Option<String> {
    text.lines().map(str::trim).find_map(|l| {
        let rest = l.strip_prefix("linux")?;
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        let mut tokens = rest.split_whitespace();
        tokens.next()?; // the kernel path
        Some(tokens.collect::<Vec<_>>().join(" "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_skips_security() {
        let text = "Types: deb\nURIs: http://mirror.example/debian-security\n\
                    Suites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian\n";
        assert_eq!(
            mirror_from_sources(text).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn mirror_from_one_line_format() {
        let text = "# comment\ndeb [arch=amd64] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_sources(text).as_deref(),
            Some("http://mirror.example/debian/")
        );
    }

    #[test]
    fn linux_line_of_grub_cfg() {
        let cfg = "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1.0-50-amd64 root=/dev/vda ro console=ttyS0 quiet intel_iommu=on\n\tinitrd /boot/initrd.img\n}\n";
        assert_eq!(
            linux_args_from_grub_cfg(cfg).as_deref(),
            Some("root=/dev/vda ro console=ttyS0 quiet intel_iommu=on")
        );
        assert_eq!(linux_args_from_grub_cfg("linux16 x\n"), None);
    }

    #[test]
    fn base_key_changes_with_the_package_set() {
        assert_ne!(
            base_key(Distro::Trixie, Generator::Dracut),
            base_key(Distro::Trixie, Generator::InitramfsTools)
        );
        assert!(base_key(Distro::Bookworm, Generator::InitramfsTools)
            .starts_with("bookworm-initramfs-tools-"));
    }
}
