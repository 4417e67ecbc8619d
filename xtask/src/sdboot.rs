//! The image side of `boot = "uefi-systemd-boot"`: a test image made to look like a
//! Debian host booting through systemd-boot, with the distribution's own tools. Before
//! the scenario's `setup`: the ESP's mount point, a machine id (kernel-install names
//! entries by it), an fstab by UUID (the disk is partitioned) and the guest's coldplug
//! of block devices the ESP's mount waits for. After `setup` (which
//! installs `systemd-boot` and writes `/etc/kernel/cmdline`): `bootctl install` onto the
//! ESP directory and a `loader.conf` booting the entry at once. Apply then runs as on
//! any host: update-initramfs, whose systemd-boot hook runs kernel-install, which
//! writes the loader entry from `/etc/kernel/cmdline`. What booted is read back from
//! the ESP here; the disk itself is `disk`'s.
//!
//! The ESP is a plain directory of the tree, not a mounted FAT, which bootctl refuses
//! (`--esp-path` must be a mount point even with `SYSTEMD_RELAX_ESP_CHECKS=1`), and the
//! chroot has no mount table, so kernel-install's `90-loaderentry.install` (`stat -c
//! %m`) would take `/` for the ESP's mount point and write `/boot/efi/...` paths into
//! the entry, which systemd-boot cannot find. So bootctl and kernel-install (and the
//! hook's `bootctl is-installed`) run with `SYSTEMD_ESP_PATH=/boot/efi`, which systemd
//! takes as given ("useful for testing"), and `BOOT_MNT=/boot/efi`, which the plugin
//! takes instead of asking `stat`: together they stand for the mounted ESP a real host
//! has.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::disk::{self, ESP_DIR};
use crate::image::{self, ROOT_UUID};

/// The image's machine id (and kernel-install's entry token): fixed, so the loader
/// entry's name is known before it exists.
pub const MACHINE_ID: &str = "6d8f5a3e0b7c4c1e9a570fe000000001";

/// What every command touching the ESP in the image runs with (see the module doc).
pub const ENV: &str = "export SYSTEMD_ESP_PATH=/boot/efi BOOT_MNT=/boot/efi\n";

/// The guest's coldplug of block devices. The test images leave udev's coldplug out
/// but for PCI devices (`tests/boot/vfio-early-probe.service`), and the initramfs's udev
/// does not tag devices for systemd, so without it the ESP's mount would wait for its
/// device until systemd's timeout. The ESP's fstab line requires this unit.
pub const BLOCK_COLDPLUG_UNIT: &str = "vfio-early-test-block-coldplug.service";
const BLOCK_COLDPLUG: &str = "[Unit]
Description=vfio-early boot-test: udev coldplug of block devices, for the ESP's mount
DefaultDependencies=no
Wants=systemd-udevd.service
After=systemd-udevd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=udevadm trigger --subsystem-match=block --action=add --settle
";

/// The script run before `setup`.
pub fn before_setup() -> String {
    format!(
        "{}echo {MACHINE_ID} > /etc/machine-id\n\
         mkdir -p /etc/kernel\n\
         echo {MACHINE_ID} > /etc/kernel/entry-token\n",
        esp_mount()
    )
}

/// What any image with an ESP gets (systemd-boot's, and GRUB's with `uefi-grub`): the
/// mount point, the block coldplug unit, and an fstab naming the root and the ESP by
/// UUID.
pub fn esp_mount() -> String {
    format!(
        "mkdir -p /{ESP_DIR}\n\
         cat > /etc/systemd/system/{BLOCK_COLDPLUG_UNIT} <<'UNIT'\n{BLOCK_COLDPLUG}UNIT\n\
         printf '%s\\n' 'UUID={ROOT_UUID} / ext4 errors=remount-ro 0 0' \
         'UUID={esp} /{ESP_DIR} vfat umask=0077,x-systemd.requires={BLOCK_COLDPLUG_UNIT} 0 0' \
         > /etc/fstab\n",
        esp = disk::esp_uuid()
    )
}

/// The script run after `setup`: systemd-boot onto the ESP, booting the default entry
/// without a menu.
pub fn install() -> String {
    format!(
        "{ENV}\
         if ! command -v bootctl >/dev/null; then\n\
         echo 'boot = \"uefi-systemd-boot\": the image has no bootctl; install systemd-boot in setup' >&2\n\
         exit 1\n\
         fi\n\
         if ! test -s /etc/kernel/cmdline; then\n\
         echo 'boot = \"uefi-systemd-boot\": /etc/kernel/cmdline is missing; write it in setup' >&2\n\
         exit 1\n\
         fi\n\
         bootctl install --no-variables\n\
         printf 'timeout 0\\ndefault {MACHINE_ID}-*\\n' > /{ESP_DIR}/loader/loader.conf\n"
    )
}

/// Runs `before_setup` in the tree.
pub fn prepare_tree(tree: &Path, log: &Path) -> anyhow::Result<()> {
    image::chroot_sh(tree, &before_setup(), log, Duration::from_secs(60))
}

/// Runs `install` in the tree.
pub fn install_loader(tree: &Path, log: &Path) -> anyhow::Result<()> {
    image::chroot_sh(tree, &install(), log, Duration::from_secs(300))
}

/// The kernel arguments of the loader entry systemd-boot will boot: the one entry
/// kernel-install wrote on the ESP (`options` lines joined, as systemd-boot does).
pub fn entry_options(tree: &Path) -> anyhow::Result<String> {
    let dir = tree.join(ESP_DIR).join("loader/entries");
    let name = the_one(&dir, ".conf", "loader entries", "")?;
    let text = std::fs::read_to_string(dir.join(&name))?;
    let esp = tree.join(ESP_DIR);
    for file in files_of(&text) {
        if !esp.join(file.trim_start_matches('/')).is_file() {
            anyhow::bail!(
                "loader entry {name} names {file}, which is not on the ESP (paths in an \
                 entry are from the ESP's root)"
            );
        }
    }
    Ok(vfio_early::nextboot::entry_options(&text))
}

/// The command line embedded in the unified kernel image systemd-boot will start: the
/// one UKI kernel-install put under `EFI/Linux` on the ESP (`layout=uki`).
pub fn uki_cmdline(tree: &Path) -> anyhow::Result<String> {
    let dir = tree.join(ESP_DIR).join("EFI/Linux");
    let name = the_one(&dir, ".efi", "unified kernel images", " (layout=uki)")?;
    let mut f = std::fs::File::open(dir.join(&name))?;
    let cmdline = vfio_early::nextboot::pe_section(&mut f, b".cmdline")?
        .with_context(|| format!("{name} has no .cmdline section"))?;
    Ok(String::from_utf8_lossy(&cmdline)
        .trim_end_matches(['\0', '\n', ' '])
        .to_string())
}

/// The files a Boot Loader Specification entry loads (`linux`, `initrd`).
pub fn files_of(entry: &str) -> Vec<&str> {
    entry
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match words.next() {
                Some("linux" | "initrd") => words.next(),
                _ => None,
            }
        })
        .collect()
}

/// The one file of `dir` ending in `ext` that kernel-install wrote (`what` names them,
/// `how` its layout); an error names what is there instead.
fn the_one(dir: &Path, ext: &str, what: &str, how: &str) -> anyhow::Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect();
    names.sort();
    match <[String; 1]>::try_from(names) {
        Ok([name]) => Ok(name),
        Err(names) => anyhow::bail!(
            "{} holds {} {what} ({}), expected the one kernel-install{how} writes when \
             apply rebuilds the initramfs (see apply.log)",
            dir.display(),
            names.len(),
            names.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_esp_path_is_the_one_the_disk_mounts() {
        assert_eq!(
            ENV,
            format!("export SYSTEMD_ESP_PATH=/{ESP_DIR} BOOT_MNT=/{ESP_DIR}\n")
        );
    }

    #[test]
    fn options_lines_are_joined() {
        let entry = "title Debian\nversion 6.12\noptions root=UUID=x ro\n\
                     linux /id/6.12/linux\noptions  intel_iommu=on iommu=pt\noptionsfoo bar\n";
        assert_eq!(
            vfio_early::nextboot::entry_options(entry),
            "root=UUID=x ro intel_iommu=on iommu=pt"
        );
        assert_eq!(files_of(entry), ["/id/6.12/linux"]);
        assert_eq!(
            files_of("linux /a/linux\ninitrd /a/initrd.img\ninitrdx /b\n"),
            ["/a/linux", "/a/initrd.img"]
        );
    }

    #[test]
    fn the_image_mounts_its_esp_by_the_uuid_the_disk_gets() {
        let s = before_setup();
        assert!(
            s.contains(&format!(
                "'UUID=7E5A-0001 /boot/efi vfat umask=0077,x-systemd.requires={BLOCK_COLDPLUG_UNIT} 0 0'"
            )),
            "{s}"
        );
        assert!(s.contains(&format!(
            "/etc/systemd/system/{BLOCK_COLDPLUG_UNIT} <<'UNIT'\n[Unit]"
        )));
        assert!(s.contains(&format!("UUID={ROOT_UUID} / ext4")), "{s}");
        assert!(install().contains("default 6d8f5a3e0b7c4c1e9a570fe000000001-*"));
    }
}
