//! The image side of `boot = "bios-grub"` and `boot = "uefi-grub"`: a test image made
//! to look like a Debian host booting through GRUB from its disk, with the
//! distribution's own tools. Before the scenario's `setup` (which installs `grub-pc`
//! or `grub-efi-amd64`): an fstab by UUID (the disk is partitioned; with an ESP, its
//! mount as for systemd-boot), GRUB on the serial console, the grub-probe stand-in
//! answering for the root partition, and (BIOS) debconf told that grub-pc's postinst
//! installs GRUB on no device. Apply then runs as on any GRUB host: `update-grub`
//! writes grub.cfg from `/etc/default/grub.d/vfio-early.cfg`. Once the disk is made,
//! `grub-install` runs on it in a chroot of the mounted disk (`loopdisk`): GRUB's core
//! image in the BIOS boot partition, or GRUB at the removable path of the ESP. It
//! leaves grub.cfg as apply's `update-grub` wrote it (checked).
//!
//! The stand-in stays, as in every test image: `update-grub` runs in a chroot with no
//! block device behind `/` (apply must not see the build machine's devices, so nothing
//! is mounted there). It answers as grub-probe does on the guest, for the root on
//! `/dev/vda2` in a GPT. grub-install does not run it: it probes the attached disk
//! through GRUB's own library.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::command;
use crate::disk::ESP_DIR;
use crate::image::{self, ROOT_UUID};
use crate::loopdisk::Attached;
use crate::scenario::Boot;
use crate::sdboot;

/// GRUB's settings for these images, a drop-in beside vfio-early's: the guest has a
/// serial port and no display, and nothing may wait (`GRUB_TIMEOUT=0` is in the
/// images' `/etc/default/grub`).
pub const SERIAL_DROPIN: &str = "etc/default/grub.d/boot-test-serial.cfg";
pub const SERIAL_SETTINGS: &str = "# vfio-early boot-test: GRUB on the serial console
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\"
";

/// The grub-probe stand-in for a root on the GPT's second partition (`--device` and
/// path arguments are ignored: every question is about the root).
pub fn probe_shim() -> String {
    format!(
        "#!/bin/sh\n\
         # vfio-early test images booted by GRUB: the chroot has no block device to probe;\n\
         # answer as grub-probe does in the guest, for the root on /dev/vda2 in a GPT.\n\
         target=\n\
         for a in \"$@\"; do\n\
         case \"$a\" in\n\
         --target=*) target=${{a#--target=}} ;;\n\
         esac\n\
         done\n\
         case \"$target\" in\n\
         device) echo /dev/vda2 ;;\n\
         disk) echo /dev/vda ;;\n\
         fs) echo ext2 ;;\n\
         fs_uuid) echo {ROOT_UUID} ;;\n\
         fs_label) echo vfe-root ;;\n\
         partmap) echo gpt ;;\n\
         drive) echo '(hd0,gpt2)' ;;\n\
         compatibility_hint) echo hd0,gpt2 ;;\n\
         hints_string) echo '--hint-bios=hd0,gpt2 --hint-efi=hd0,gpt2 --hint-baremetal=ahci0,gpt2' ;;\n\
         *) ;;\n\
         esac\n\
         exit 0\n"
    )
}

/// The script run before `setup`.
pub fn before_setup(boot: Boot) -> String {
    let mut s = if boot.has_esp() {
        sdboot::esp_mount()
    } else {
        format!("printf '%s\\n' 'UUID={ROOT_UUID} / ext4 errors=remount-ro 0 0' > /etc/fstab\n")
    };
    s.push_str(&format!(
        "mkdir -p /etc/default/grub.d\n\
         cat > /{SERIAL_DROPIN} <<'GRUB'\n{SERIAL_SETTINGS}GRUB\n\
         cat > /usr/sbin/grub-probe <<'SHIM'\n{}SHIM\n\
         chmod 755 /usr/sbin/grub-probe\n",
        probe_shim()
    ));
    if boot == Boot::BiosGrub {
        // grub-pc's postinst would ask where to install GRUB; the harness installs it
        // on the disk once the disk exists.
        s.push_str(
            "printf '%s\\n' 'grub-pc grub-pc/install_devices multiselect' \
             'grub-pc grub-pc/install_devices_empty boolean true' | debconf-set-selections\n",
        );
    }
    s
}

/// GRUB's platform for the boot mode: its modules' directory and its Debian package.
fn platform(boot: Boot) -> (&'static str, &'static str) {
    match boot {
        Boot::UefiGrub => ("x86_64-efi", "grub-efi-amd64"),
        _ => ("i386-pc", "grub-pc"),
    }
}

/// The script run after `setup`: GRUB's installer and the platform's modules are there.
pub fn check_installed(boot: Boot) -> String {
    let (platform, package) = platform(boot);
    format!(
        "if ! command -v grub-install >/dev/null || ! test -d /usr/lib/grub/{platform}; then\n\
         echo 'boot = \"{}\": the image has no grub-install for {platform}; install {package} in setup' >&2\n\
         exit 1\n\
         fi\n",
        boot.name()
    )
}

/// The script run in the chroot of the attached disk (`device` its loop device):
/// grub-install, then a check that GRUB is where the firmware looks and that grub.cfg
/// is still the one `update-grub` wrote.
pub fn install(boot: Boot, device: &str) -> String {
    let (target, installed) = match boot {
        Boot::UefiGrub => (
            format!("--target=x86_64-efi --efi-directory=/{ESP_DIR} --removable --no-nvram"),
            format!("/{ESP_DIR}/EFI/BOOT/BOOTX64.EFI"),
        ),
        _ => (
            format!("--target=i386-pc {device}"),
            "/boot/grub/i386-pc/core.img".to_string(),
        ),
    };
    format!(
        "before=$(md5sum /boot/grub/grub.cfg)\n\
         grub-install {target}\n\
         test -s {installed}\n\
         test \"$before\" = \"$(md5sum /boot/grub/grub.cfg)\"\n"
    )
}

/// Runs `before_setup` in the tree.
pub fn prepare_tree(tree: &Path, boot: Boot, log: &Path) -> anyhow::Result<()> {
    image::chroot_sh(tree, &before_setup(boot), log, Duration::from_secs(60))
}

/// Runs `check_installed` in the tree.
pub fn check_tree(tree: &Path, boot: Boot, log: &Path) -> anyhow::Result<()> {
    image::chroot_sh(tree, &check_installed(boot), log, Duration::from_secs(60))
}

/// GRUB onto the made disk: attached as a loop device, its root mounted (and its ESP),
/// the image's `grub-install` run in a chroot there; all undone after, even on error.
pub fn install_on_disk(disk: &Path, boot: Boot, log: &Path) -> anyhow::Result<()> {
    let mnt = disk.with_extension("mnt");
    std::fs::create_dir_all(&mnt)?;
    let mut attached = Attached::attach(disk, log)?;
    let root = attached.partition(2);
    attached.mount(&[root.as_str()], &mnt)?;
    if boot.has_esp() {
        let esp = attached.partition(1);
        attached.mount_fat(&esp, &mnt.join(ESP_DIR))?;
    }
    for dir in ["dev", "proc", "sys"] {
        attached.mount(&["--bind", &format!("/{dir}")], &mnt.join(dir))?;
    }
    let script = install(boot, attached.device());
    let installed = image::chroot_sh(&mnt, &script, log, Duration::from_secs(300));
    let detached = attached.detach();
    installed?;
    detached?;
    std::fs::remove_dir(&mnt)?;
    Ok(())
}

/// The initramfs GRUB boots from `disk` (the prepared disk, or an overlay as a boot
/// left it): the `initrd` of grub.cfg's default (first) entry, read off the disk's
/// root partition with debugfs (no mount) into `into`. An overlay is flattened to a
/// raw file first (removed after), since debugfs reads no qcow2.
pub fn booted_initrd(disk: &Path, into: &Path, log: &Path) -> anyhow::Result<PathBuf> {
    if disk.extension().is_some_and(|e| e == "qcow2") {
        let raw = into.join("booted.raw");
        let flattened = command::run(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(disk)
                .arg(&raw),
            log,
            Duration::from_secs(300),
        );
        let result = flattened.and_then(|()| read_booted_initrd(&raw, disk, into, log));
        let _ = std::fs::remove_file(&raw);
        return result;
    }
    read_booted_initrd(disk, disk, into, log)
}

/// `booted_initrd` on a raw disk (`shown` is the disk the messages name).
fn read_booted_initrd(
    raw: &Path,
    shown: &Path,
    into: &Path,
    log: &Path,
) -> anyhow::Result<PathBuf> {
    let limit = Duration::from_secs(300);
    let disk = shown;
    let out = command::timed(
        Command::new("partx")
            .args(["-g", "-n", "2", "-o", "START"])
            .arg(raw),
        limit,
    )
    .output()
    .context("running partx")?;
    let start: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("partx found no root partition (2) on {}", disk.display()))?;
    let fs = format!("{}?offset={}", raw.display(), start * 512);
    let dump = |from: &str, to: &Path| -> anyhow::Result<()> {
        let _ = std::fs::remove_file(to);
        command::run(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump {from} {}", to.display()))
                .arg(&fs),
            log,
            limit,
        )?;
        // debugfs exits 0 when the file is missing: the file tells.
        if !to.is_file() {
            bail!(
                "{from} is not on {}'s root (see {})",
                disk.display(),
                log.display()
            );
        }
        Ok(())
    };
    let cfg = into.join("booted-grub.cfg");
    dump("/boot/grub/grub.cfg", &cfg)?;
    let text = std::fs::read_to_string(&cfg)?;
    let initrd = first_initrd(&text).context("the booted grub.cfg has no initrd line")?;
    let file = into.join("booted-initrd.img");
    dump(&initrd, &file)?;
    Ok(file)
}

/// The file of grub.cfg's first `initrd` line (the default entry's, as `GRUB_DEFAULT=0`
/// boots it).
pub fn first_initrd(cfg: &str) -> Option<String> {
    first_file(cfg, "initrd")
}

/// The file of grub.cfg's first line whose command is `command` (`linux`, `initrd`).
pub fn first_file(cfg: &str, command: &str) -> Option<String> {
    cfg.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(command)).then(|| words.next().map(str::to_string))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_booted_initrd_is_the_first_entrys() {
        let cfg = "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1 root=/dev/vda2\n\
                   \tinitrd\t/boot/initrd.img-6.1\n}\nsubmenu 'Advanced' {\n\
                   \tinitrd /boot/initrd.img-6.0\n}\n";
        assert_eq!(first_initrd(cfg).as_deref(), Some("/boot/initrd.img-6.1"));
        assert_eq!(first_initrd("initrdefi /x\n"), None);
    }

    #[test]
    fn grub_talks_on_the_serial_port() {
        assert!(SERIAL_SETTINGS.contains("\nGRUB_TERMINAL=serial\n"));
        assert!(SERIAL_SETTINGS.contains("GRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\""));
        let s = before_setup(Boot::BiosGrub);
        assert!(s.contains(&format!("cat > /{SERIAL_DROPIN} <<'GRUB'\n# vfio-early")));
    }

    #[test]
    fn the_stand_in_answers_for_the_root_partition() {
        let shim = probe_shim();
        assert!(shim.contains("device) echo /dev/vda2 ;;"));
        assert!(shim.contains(&format!("fs_uuid) echo {ROOT_UUID} ;;")));
        assert!(shim.contains("partmap) echo gpt ;;"));
        assert!(shim.contains("compatibility_hint) echo hd0,gpt2 ;;"));
        assert!(
            shim.contains("${a#--target=}"),
            "a shell expansion, not Rust's"
        );
    }

    #[test]
    fn each_mode_gets_its_fstab_and_only_bios_preseeds_grub_pc() {
        let bios = before_setup(Boot::BiosGrub);
        assert!(bios.contains(&format!("'UUID={ROOT_UUID} / ext4 errors=remount-ro 0 0'")));
        assert!(!bios.contains("vfat"));
        assert!(bios.contains("grub-pc/install_devices_empty boolean true"));
        let uefi = before_setup(Boot::UefiGrub);
        assert!(uefi.contains("UUID=7E5A-0001 /boot/efi vfat"), "{uefi}");
        assert!(!uefi.contains("debconf"));
    }

    #[test]
    fn grub_install_targets_the_platform_and_keeps_grub_cfg() {
        let bios = install(Boot::BiosGrub, "/dev/loop3");
        assert!(
            bios.contains("grub-install --target=i386-pc /dev/loop3\n"),
            "{bios}"
        );
        assert!(bios.contains("test -s /boot/grub/i386-pc/core.img"));
        let uefi = install(Boot::UefiGrub, "/dev/loop3");
        assert!(uefi.contains(
            "grub-install --target=x86_64-efi --efi-directory=/boot/efi --removable --no-nvram\n"
        ));
        assert!(uefi.contains("test -s /boot/efi/EFI/BOOT/BOOTX64.EFI"));
        assert!(!uefi.contains("loop3"), "the ESP is found by its mount");
        for s in [bios, uefi] {
            assert!(s.ends_with("test \"$before\" = \"$(md5sum /boot/grub/grub.cfg)\"\n"));
        }
        assert!(check_installed(Boot::UefiGrub).contains("/usr/lib/grub/x86_64-efi"));
        assert!(check_installed(Boot::BiosGrub).contains("install grub-pc in setup"));
    }
}
