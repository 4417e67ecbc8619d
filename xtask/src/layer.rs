//! Layer 2 of the test images: a cached base image (`image`) with the freshly built
//! .deb installed the way users do (`apt install ./…deb`), the harness's probe and its
//! unit, and the guest trimmed to what the probe needs. Cached under
//! `target/boot-test/layers/`, keyed by the base image, the package's bytes, the probe
//! files and the trimming script, so it is made again only when one of them changed.
//! Each (distro, generator) layer is made by the first scenario that needs it while
//! the other workers boot what is ready.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::deb::Fnv;
use crate::image;
use crate::progress;
use crate::scenario::{Distro, Generator};

/// The probe script, its unit and the target the guest boots to, installed into
/// every layer.
const PROBE: &str = "tests/boot/probe.sh";
const PROBE_UNIT: &str = "tests/boot/vfio-early-probe.service";
const PROBE_TARGET: &str = "tests/boot/vfio-early-probe.target";

/// Runs in the layer after the package is installed and the probe's units are in
/// place. Nothing here touches what the tests prove (the kernel and its modules, the
/// initramfs generator, the package's files); it removes work nobody looks at, which
/// under TCG costs seconds a boot, and on this machine seconds a scenario. (The
/// probe's unit, for its part, waits for udev's coldplug of the PCI devices only.)
pub const TRIM: &str = r#"
set -e
# A TCG guest on a loaded host can miss the kernel's timer check and panic ("timer
# doesn't work through Interrupt-remapped IO-APIC"); the check is for broken hardware.
# No CPU vulnerability mitigations in a throwaway guest: with page-table isolation
# every system call switches page tables, which flushes QEMU's TLB under TCG (an
# initramfs build in the guest took 84 s with them, 68 s without).
sed -i 's/^GRUB_CMDLINE_LINUX="console=ttyS0/& no_timer_check mitigations=off/' /etc/default/grub
grep -q 'no_timer_check mitigations=off' /etc/default/grub
# The guest boots to the probe's target: the probe and what it needs, nothing else.
ln -sf /etc/systemd/system/vfio-early-probe.target /etc/systemd/system/default.target
# No fsck of the test root (fstab pass 0): the initramfs carries no fsck and neither
# it nor systemd runs one; nothing here tests fsck.
sed -i 's|^\(/dev/vda[[:space:]].*[[:space:]]\)[0-9]$|\10|' /etc/fstab
# The q35 chipset's own functions, which no check reads (LPC bridge and its watchdog,
# SATA controller, SMBus), get no driver: loading and probing each is on the way to
# the probe at every boot (the six empty SATA links alone take a third of a second
# under TCG). Nor do the two modules systemd loads at its start for what these guests
# never use: QEMU's firmware config (credentials) and the firewall's tables.
printf 'blacklist %s\n' lpc_ich ahci i2c_i801 qemu_fw_cfg ip_tables \
    > /etc/modprobe.d/boot-harness-unused.conf
# No framebuffer console on the boot display, which nobody watches (QEMU has no
# display here): its driver still binds, as scenario 04 checks; setting up the console
# on it and tearing it down at power-off took about 0.3 s a boot.
echo 'options drm_kms_helper fbdev_emulation=0' >> /etc/modprobe.d/boot-harness-unused.conf
# Generators for what these images do not have (sysv scripts, encrypted or verity
# disks, GPT auto-mounts, gettys, hibernation) or no boot asks for (the kernel command
# line's systemd.run=, systemd.mask= and debug shell): each is a process at every boot.
mkdir -p /etc/systemd/system-generators
for g in systemd-sysv-generator systemd-gpt-auto-generator systemd-getty-generator \
    systemd-cryptsetup-generator systemd-veritysetup-generator \
    systemd-integritysetup-generator systemd-hibernate-resume-generator \
    systemd-rc-local-generator systemd-system-update-generator \
    systemd-bless-boot-generator systemd-debug-generator systemd-run-generator; do
    ln -sf /dev/null "/etc/systemd/system-generators/$g"
done
# Smaller trees to copy and disks to write: no documentation, man pages, locales or
# package lists (dpkg leaves them out of later installs too).
printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/locale/*' \
    > /etc/dpkg/dpkg.cfg.d/vfio-early-test-nodoc
find /usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete
rm -rf /usr/share/man/* /usr/share/locale/* /var/lib/apt/lists/* /var/cache/apt/*.bin
"#;

/// The test images' initramfs builds take the modules a guest needs to mount its root
/// (virtio, ext4; an LVM root's device-mapper comes with lvm2's own hook), not
/// Debian's `most` (initramfs-tools) or generic image (dracut): built on this machine
/// (a chroot's MODULES=dep would read the build machine's root) in 1.5 s instead of
/// 18 s, 6 MB instead of 30 that a TCG guest unpacks at every boot. vfio-early's hook
/// and dracut module add the vfio modules themselves in any mode. udev's coldplug,
/// in the initramfs and on the root, replays the PCI, virtio and block devices only.
/// Written before the package is installed, so the install's own initramfs build
/// already takes it: in every layer, and in deb-test's chroot (nine builds there).
/// Builds in a guest take it too (the stage scripts' zz-boot-harness sets only the
/// compression level).
pub const SMALL_INITRAMFS: &str = r#"
set -e
if [ -d /etc/initramfs-tools ]; then
    echo MODULES=list > /etc/initramfs-tools/conf.d/boot-harness-modules
    printf '%s\n' virtio_pci virtio_blk ext4 >> /etc/initramfs-tools/modules
fi
# udev's coldplug at sysinit (systemd-udev-trigger.service; a boot waits for it when
# it pulls in vfio-early-verify.service, ordered after it) replays the PCI devices,
# which every check reads, the virtio devices (Debian 13's virtio_pci is built in, so
# its disk exists before udev starts and only a replay loads virtio_blk) and the block
# devices, which fstab mounts (an ESP by its UUID). The rest (CPUs, platform and ACPI
# devices, input, ttys: a few hundred events and module lookups) took about 5 s of a
# trial boot under TCG, and nothing reads it. Written here, before the package's
# install builds an image, because dracut's image, where systemd runs the same unit,
# takes it too.
mkdir -p /etc/systemd/system/systemd-udev-trigger.service.d
printf '%s\n' '[Service]' 'ExecStart=' \
    'ExecStart=-udevadm trigger --action=add --subsystem-match=pci --subsystem-match=virtio --subsystem-match=block' \
    > /etc/systemd/system/systemd-udev-trigger.service.d/boot-harness.conf
# dracut's modules the way initramfs-tools' are listed: `drivers` is the whole list of
# kernel modules (vfio-early's dracut module adds the vfio ones itself), and none of
# the dracut modules that bring drivers or files for what these guests do not have:
# the udev hardware database (13 MB that names devices for humans), QEMU's other disks
# and devices (SATA, SCSI, CD, 9p, virtiofs, memory devices), NVDIMMs, an overlay
# root, hibernation. Debian's generic image held 788 kernel modules, 69 MB unpacked
# at every boot.
if [ -d /etc/dracut.conf.d ]; then
    printf '%s\n' 'drivers+=" virtio_pci virtio_blk ext4 "' \
        'omit_dracutmodules+=" hwdb qemu virtfs virtiofs nvdimm overlay-root lunmask resume "' \
        'install_items+=" /etc/systemd/system/systemd-udev-trigger.service.d/boot-harness.conf "' \
        > /etc/dracut.conf.d/10-boot-harness.conf
fi
# initramfs-tools' coldplug (the udev package's init-top script, which runs after
# vfio-early's) narrowed the same way: the PCI devices, whose drivers the checks read
# (udev still loads e1000e for a NIC vfio-early took), virtio and block. The rest took
# about 1 s of every boot's initramfs stage under TCG. A script of the same name in
# /etc/initramfs-tools/scripts replaces the packaged one.
udev=/usr/share/initramfs-tools/scripts/init-top/udev
if [ -e "$udev" ]; then
    mine=/etc/initramfs-tools/scripts/init-top/udev
    mkdir -p "${mine%/*}"
    sed 's/^udevadm trigger --type=\(subsystems\|devices\) --action=add$/& --subsystem-match=pci --subsystem-match=virtio --subsystem-match=block/' \
        "$udev" > "$mine"
    chmod 755 "$mine"
    [ "$(grep -c -- '--action=add --subsystem-match=pci' "$mine")" = 2 ] ||
        { echo "$udev: its two udevadm trigger lines were not found" >&2; exit 1; }
fi
"#;

/// A layer ready to copy: its tree, and how long making it took when this call made it.
#[derive(Clone)]
pub struct Made {
    pub tree: PathBuf,
    pub built: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ready,
    Busy,
    NotStarted,
}

type Slot = Mutex<Option<Result<PathBuf, String>>>;

/// The layers of one run, each made (or found in the cache) on first use.
pub struct Layers<'a> {
    project: &'a Path,
    deb: &'a Path,
    slots: Vec<((Distro, Generator), Slot)>,
    claimed: Mutex<std::collections::BTreeSet<(Distro, Generator)>>,
}

impl<'a> Layers<'a> {
    pub fn new(project: &'a Path, deb: &'a Path, wanted: &[(Distro, Generator)]) -> Self {
        let mut keys = wanted.to_vec();
        keys.sort();
        keys.dedup();
        Layers {
            project,
            deb,
            slots: keys.into_iter().map(|k| (k, Mutex::new(None))).collect(),
            claimed: Mutex::new(Default::default()),
        }
    }

    /// Whether the layer is ready (made or failed), being made, or not started, so a
    /// worker can pick a scenario it need not wait for.
    pub fn state(&self, distro: Distro, generator: Generator) -> State {
        let Some((_, slot)) = self.slots.iter().find(|(k, _)| *k == (distro, generator)) else {
            return State::Ready;
        };
        let claimed = self
            .claimed
            .lock()
            .map(|c| c.contains(&(distro, generator)))
            .unwrap_or(true);
        match slot.try_lock() {
            Ok(g) if g.is_some() => State::Ready,
            Ok(_) if !claimed => State::NotStarted,
            _ => State::Busy,
        }
    }

    /// Marks a layer as taken by a worker that is about to make it, so the others
    /// pick another scenario meanwhile.
    pub fn claim(&self, distro: Distro, generator: Generator) {
        if let Ok(mut c) = self.claimed.lock() {
            c.insert((distro, generator));
        }
    }

    /// The layer for (distro, generator). A failure is remembered, so every scenario
    /// of that layer fails with the same reason instead of retrying.
    /// The package the layers install.
    pub fn deb(&self) -> &Path {
        self.deb
    }

    pub fn get(&self, distro: Distro, generator: Generator) -> Result<Made, String> {
        let slot = self
            .slots
            .iter()
            .find(|(k, _)| *k == (distro, generator))
            .map(|(_, s)| s)
            .ok_or_else(|| "no image layer for this scenario".to_string())?;
        let mut guard = slot
            .lock()
            .map_err(|_| "a layer builder panicked".to_string())?;
        if let Some(done) = guard.as_ref() {
            return done.clone().map(|tree| Made { tree, built: None });
        }
        let started = Instant::now();
        let made = ensure(self.project, self.deb, distro, generator)
            .map_err(|e| format!("image {}/{}: {e:#}", distro.name(), generator.name()));
        *guard = Some(made.as_ref().map(|m| m.tree.clone()).map_err(Clone::clone));
        made.map(|m| Made {
            built: m.built.map(|_| started.elapsed()),
            ..m
        })
    }
}

/// The layer's cache key: base image, package bytes, probe files, trimming script.
fn key(project: &Path, base: &Path, deb: &Path) -> anyhow::Result<String> {
    let mut h = Fnv::new();
    h.add(base.to_string_lossy().as_bytes());
    h.add(&std::fs::read(deb).with_context(|| format!("reading {}", deb.display()))?);
    for f in [PROBE, PROBE_UNIT, PROBE_TARGET] {
        h.add(&std::fs::read(project.join(f)).with_context(|| format!("reading {f}"))?);
    }
    h.add(TRIM.as_bytes());
    h.add(SMALL_INITRAMFS.as_bytes());
    Ok(format!("{:016x}", h.0))
}

/// The layer from the cache, or made now.
pub fn ensure(
    project: &Path,
    deb: &Path,
    distro: Distro,
    generator: Generator,
) -> anyhow::Result<Made> {
    let base = image::ensure_base(project, distro, generator)?;
    let dir = project.join("target/boot-test/layers");
    std::fs::create_dir_all(&dir)?;
    let prefix = format!("{}-{}-", distro.name(), generator.name());
    let name = format!("{prefix}{}", key(project, &base, deb)?);
    let tree = dir.join(&name);
    if tree.join(".complete").exists() {
        return Ok(Made { tree, built: None });
    }
    // Older layers of the same base are stale now: make room.
    for e in std::fs::read_dir(&dir)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && n != name {
            image::remove_tree(&e.path())?;
        }
    }
    let log = dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    let phase = progress::start(
        &format!("layer {}/{}", distro.name(), generator.name()),
        "copying the base image, apt install ./vfio-early.deb",
    );
    let partial = dir.join(format!("{name}.partial"));
    image::copy_tree(&base, &partial, &log)?;
    let file = deb
        .file_name()
        .context("package path has no file name")?
        .to_string_lossy()
        .into_owned();
    std::fs::copy(deb, partial.join("tmp").join(&file))?;
    image::chroot_sh(&partial, SMALL_INITRAMFS, &log, Duration::from_secs(60))?;
    image::chroot_sh(
        &partial,
        &format!("apt-get install -y -q /tmp/{file}\nrm /tmp/{file}"),
        &log,
        Duration::from_secs(600),
    )?;
    install_probe(project, &partial)?;
    phase.waiting("trimming the guest");
    image::chroot_sh(&partial, TRIM, &log, Duration::from_secs(300))?;
    std::fs::write(partial.join(".complete"), format!("{name}\n"))?;
    std::fs::rename(&partial, &tree)
        .with_context(|| format!("renaming {} to {}", partial.display(), tree.display()))?;
    let took = phase.done(&format!("built; log {}", log.display()));
    Ok(Made {
        tree,
        built: Some(took),
    })
}

fn install_probe(project: &Path, tree: &Path) -> anyhow::Result<()> {
    let probe = tree.join("usr/local/sbin/vfio-early-probe");
    std::fs::create_dir_all(tree.join("usr/local/sbin"))?;
    std::fs::copy(project.join(PROBE), &probe)?;
    set_mode(&probe, 0o755)?;
    let units = tree.join("etc/systemd/system");
    for f in [PROBE_UNIT, PROBE_TARGET] {
        let name = Path::new(f).file_name().context("unit file name")?;
        std::fs::copy(project.join(f), units.join(name))?;
    }
    Ok(())
}

pub fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
