//! Every machine path vfio-early knows, relative to the [`crate::root::Root`].
//!
//! Kept in one place so a single test can prove none of them is absolute (an absolute
//! path joined onto a root silently escapes it).

pub const PCI_DEVICES: &str = "sys/bus/pci/devices";
pub const PCI_DRIVERS: &str = "sys/bus/pci/drivers";
pub const PCI_DRIVERS_PROBE: &str = "sys/bus/pci/drivers_probe";
pub const IOMMU_GROUPS: &str = "sys/kernel/iommu_groups";
pub const IOMMU_CLASS: &str = "sys/class/iommu";
pub const SYS_DEV_BLOCK: &str = "sys/dev/block";
pub const SYS_CLASS_BLOCK: &str = "sys/class/block";
pub const SYS_MODULE: &str = "sys/module";
pub const PROC_CMDLINE: &str = "proc/cmdline";
pub const PROC_CPUINFO: &str = "proc/cpuinfo";
pub const PROC_MOUNTINFO: &str = "proc/self/mountinfo";
pub const PROC_MOUNTS: &str = "proc/mounts";
pub const PROC_OSRELEASE: &str = "proc/sys/kernel/osrelease";
pub const PROC_IOMEM: &str = "proc/iomem";
pub const PROC_MODULES: &str = "proc/modules";
pub const PROC_LOCKS: &str = "proc/locks";
pub const PROC_SWAPS: &str = "proc/swaps";
pub const SYS_FS_BTRFS: &str = "sys/fs/btrfs";
pub const SYS_CLASS_NET: &str = "sys/class/net";
pub const SYS_CLASS_ISCSI_HOST: &str = "sys/class/iscsi_host";
pub const DEV: &str = "dev";
pub const DEV_MAPPER: &str = "dev/mapper";
pub const DEV_DISK: &str = "dev/disk";
pub const ETC_FSTAB: &str = "etc/fstab";
pub const DEV_KMSG: &str = "dev/kmsg";
pub const DEV_VFIO: &str = "dev/vfio";
pub const CONFIG: &str = "etc/vfio-early.toml";
pub const LIB_MODULES: &str = "lib/modules";
pub const BOOT: &str = "boot";
pub const STATE_DIR: &str = "var/lib/vfio-early";

// Files vfio-early owns (written by `apply`, removed by `undo`).
pub const MANIFEST: &str = "var/lib/vfio-early/manifest.json";
pub const APPLIED: &str = "var/lib/vfio-early/applied.toml";
/// The tokens apply added to `/etc/kernel/cmdline`, one per line, beside the manifest:
/// for the package's purge, which has no binary left to read the manifest with.
pub const CMDLINE_TOKENS: &str = "var/lib/vfio-early/cmdline-tokens";
/// Present when the last apply was forced; the initramfs carries it at the same path. A
/// file of its own, so no config text can forge it.
pub const FORCED: &str = "var/lib/vfio-early/forced";
pub const MODPROBE: &str = "etc/modprobe.d/vfio-early.conf";
pub const GRUB_DROPIN: &str = "etc/default/grub.d/vfio-early.cfg";
/// Shared with the user and kernel-install: vfio-early owns only its tokens.
pub const KERNEL_CMDLINE: &str = "etc/kernel/cmdline";

// `apply --trial`: the state of a trial (written intent-first, like the manifest) and
// the files it owns while one is under way.
pub const TRIAL_DIR: &str = "var/lib/vfio-early/trial";
pub const TRIAL_STATE: &str = "var/lib/vfio-early/trial/state.json";
/// The config being tried, as the user wrote it; the hooks copy it into the initramfs
/// at [`IMAGE_TRIAL_CONFIG`] while a trial is prepared.
pub const TRIAL_CONFIG: &str = "var/lib/vfio-early/trial/config.toml";
/// `apply --trial --force`: the trial's own marker, carried into the image at the same
/// path, so the early binder overrides interlocks in the trial boot only.
pub const TRIAL_FORCED: &str = "var/lib/vfio-early/trial/forced";
/// Where the initramfs holds the trial config; the early binder reads it only when the
/// kernel command line carries `vfio_early.trial`.
pub const IMAGE_TRIAL_CONFIG: &str = "etc/vfio-early-trial.toml";
/// The GRUB script that prints the trial's menu entry (owned while a trial is prepared).
pub const GRUB_TRIAL_SCRIPT: &str = "etc/grub.d/42_vfio-early-trial";
/// Debian's script for the Linux entries, which the trial script runs.
pub const GRUB_LINUX_SCRIPT: &str = "etc/grub.d/10_linux";
/// GRUB's environment block (`next_entry`, set by `grub-reboot`).
pub const GRUBENV: &str = "boot/grub/grubenv";
pub const GRUB_REBOOT: &str = "usr/sbin/grub-reboot";
/// `bootctl` (from systemd-boot, or systemd-boot-tools where that package is split off).
pub const BOOTCTL: &[&str] = &["usr/bin/bootctl", "bin/bootctl"];
/// kernel-install's config (`layout=uki` makes unified kernel images).
pub const KERNEL_INSTALL_CONF: &[&str] =
    &["etc/kernel/install.conf", "usr/lib/kernel/install.conf"];
/// Boot Loader Specification Type #1 entries, relative to an ESP or XBOOTLDR mount.
pub const LOADER_ENTRIES: &str = "loader/entries";
/// The EFI variable systemd-boot reads (and deletes) for a one-shot entry.
pub const EFIVAR_ONESHOT: &str =
    "sys/firmware/efi/efivars/LoaderEntryOneShot-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
pub const BOOT_ID: &str = "proc/sys/kernel/random/boot_id";

// Bootloaders and initramfs generators, as installed.
pub const GRUB_CFG: &str = "boot/grub/grub.cfg";
pub const UPDATE_GRUB: &str = "usr/sbin/update-grub";
pub const PROXMOX_UUIDS: &str = "etc/kernel/proxmox-boot-uuids";
pub const PROXMOX_BOOT_TOOL: &str = "usr/sbin/proxmox-boot-tool";
/// Where an ESP may be mounted; systemd-boot lives in `EFI/systemd/` on it.
pub const ESP_MOUNTS: &[&str] = &["boot/efi", "efi", "boot"];
pub const SYS_FIRMWARE_EFI: &str = "sys/firmware/efi";
pub const EFIVARS: &str = "sys/firmware/efi/efivars";
pub const KERNEL_INSTALL: &str = "usr/bin/kernel-install";
pub const INSTALL_CONF: &str = "etc/kernel/install.conf";
pub const INSTALL_CONF_DEFAULT: &str = "usr/lib/kernel/install.conf";
/// systemd-boot's hook that runs kernel-install after update-initramfs.
pub const SDBOOT_INITRAMFS_HOOK: &str = "etc/initramfs/post-update.d/systemd-boot";
pub const UPDATE_INITRAMFS: &str = "usr/sbin/update-initramfs";
pub const DRACUT: &str = "usr/bin/dracut";

// Paths inside an initramfs image (relative to its root), for `initramfs verify`.
/// Where the hooks put the binary: `copy_exec ... /usr/sbin` (initramfs-tools) and
/// `inst_binary` (dracut); the others are the same file on merged-/usr trees.
pub const IMAGE_BINARY: &[&str] = &[
    "usr/sbin/vfio-early",
    "sbin/vfio-early",
    "usr/bin/vfio-early",
    "bin/vfio-early",
];
pub const IMAGE_MODPROBE: &[&str] = &[MODPROBE];
/// initramfs-tools copies `scripts/init-top/00vfio-early`; dracut's `inst_hook pre-udev
/// 00` installs under its hook directory, which moved from /lib to /var/lib.
pub const IMAGE_BOOT_SCRIPT: &[&str] = &[
    "scripts/init-top/00vfio-early",
    "var/lib/dracut/hooks/pre-udev/00-vfio-early-bind.sh",
    "lib/dracut/hooks/pre-udev/00-vfio-early-bind.sh",
    "usr/lib/dracut/hooks/pre-udev/00-vfio-early-bind.sh",
];
pub const IMAGE_MODULE_DIRS: &[&str] = &["lib/modules/", "usr/lib/modules/"];
/// Every file of ours (besides the binary and the boot script) a hook can put into an
/// image: the applied config, the modprobe drop-in, the `--force` marker, and a
/// trial's config and marker.
pub const IMAGE_OWN_FILES: &[&str] = &[CONFIG, MODPROBE, FORCED, IMAGE_TRIAL_CONFIG, TRIAL_FORCED];

/// All constants above, for the test that rejects absolute paths.
pub const ALL: &[&str] = &[
    PCI_DEVICES,
    PCI_DRIVERS,
    PCI_DRIVERS_PROBE,
    IOMMU_GROUPS,
    IOMMU_CLASS,
    SYS_DEV_BLOCK,
    SYS_CLASS_BLOCK,
    SYS_MODULE,
    PROC_CMDLINE,
    PROC_CPUINFO,
    PROC_MOUNTINFO,
    PROC_MOUNTS,
    PROC_OSRELEASE,
    PROC_IOMEM,
    PROC_MODULES,
    PROC_LOCKS,
    PROC_SWAPS,
    SYS_FS_BTRFS,
    SYS_CLASS_NET,
    SYS_CLASS_ISCSI_HOST,
    DEV,
    DEV_MAPPER,
    DEV_DISK,
    ETC_FSTAB,
    DEV_KMSG,
    DEV_VFIO,
    CONFIG,
    LIB_MODULES,
    BOOT,
    STATE_DIR,
    MANIFEST,
    APPLIED,
    CMDLINE_TOKENS,
    FORCED,
    MODPROBE,
    GRUB_DROPIN,
    KERNEL_CMDLINE,
    TRIAL_DIR,
    TRIAL_STATE,
    TRIAL_CONFIG,
    TRIAL_FORCED,
    IMAGE_TRIAL_CONFIG,
    GRUB_TRIAL_SCRIPT,
    GRUB_LINUX_SCRIPT,
    GRUBENV,
    GRUB_REBOOT,
    LOADER_ENTRIES,
    EFIVAR_ONESHOT,
    BOOT_ID,
    GRUB_CFG,
    UPDATE_GRUB,
    PROXMOX_UUIDS,
    PROXMOX_BOOT_TOOL,
    SYS_FIRMWARE_EFI,
    EFIVARS,
    KERNEL_INSTALL,
    INSTALL_CONF,
    INSTALL_CONF_DEFAULT,
    SDBOOT_INITRAMFS_HOOK,
    UPDATE_INITRAMFS,
    DRACUT,
];

/// The lists of paths above, for the same test.
pub const ALL_LISTS: &[&[&str]] = &[
    ESP_MOUNTS,
    BOOTCTL,
    KERNEL_INSTALL_CONF,
    IMAGE_BINARY,
    IMAGE_MODPROBE,
    IMAGE_BOOT_SCRIPT,
    IMAGE_MODULE_DIRS,
    IMAGE_OWN_FILES,
];

#[cfg(test)]
mod tests {
    #[test]
    fn no_path_constant_is_absolute() {
        for p in super::ALL
            .iter()
            .chain(super::ALL_LISTS.iter().copied().flatten())
        {
            assert!(!p.starts_with('/'), "{p} is absolute");
            assert!(!p.contains(".."), "{p} climbs out of the root");
        }
    }

    #[test]
    fn no_absolute_machine_path_literal_in_sources() {
        // Any "/sys/..", "/proc/..", "/dev/.." string literal in src/ outside comments
        // bypasses the root.
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut bad = Vec::new();
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                // Unit tests hold sample data ("/dev/nvme0n1p2" in a mountinfo line), not
                // machine access: only the code before `#[cfg(test)]` is checked.
                let code_part = text.split("#[cfg(test)]").next().unwrap_or("");
                let mut prev = "";
                for (n, line) in code_part.lines().enumerate() {
                    let code = line.trim_start();
                    // `root-ok` (at the line's end or alone on the line before) marks a
                    // deliberate absolute path, e.g. a test proving the root strips it.
                    let exempt = code.starts_with("//")
                        || code.ends_with("// root-ok")
                        || prev.trim() == "// root-ok";
                    prev = line;
                    if exempt {
                        continue;
                    }
                    for dir in ["sys/", "proc/", "dev/", "lib/modules"] {
                        if code.contains(&format!("\"/{dir}")) {
                            bad.push(format!("{}:{}: {}", p.display(), n + 1, line.trim()));
                        }
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "absolute machine paths:\n{}",
            bad.join("\n")
        );
    }
}
