//! Which bootloader passes the kernel its command line, and the GRUB drop-in text.
//!
//! [`BootFacts::read`] reads what is installed under the root; detection and rendering
//! are pure. Detection order: Proxmox (`etc/kernel/proxmox-boot-uuids` non-empty and
//! `proxmox-boot-tool`), systemd-boot (`EFI/systemd/systemd-boot*.efi` on an ESP under
//! `boot/efi`, `efi` or `boot`), GRUB (`update-grub` and `boot/grub/grub.cfg`).
//! Rendering quotes each kernel argument for the shell that sources the drop-in and for
//! GRUB's parser after it.

use std::path::Path;

use serde::Serialize;

use crate::config::BootloaderKind;
use crate::kargs::KernelToken;
use crate::paths;
use crate::root::Root;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bootloader {
    Grub,
    /// systemd-boot with Type #1 entries, or UKIs (`layout=uki`), made by kernel-install
    /// from `/etc/kernel/cmdline`.
    SystemdBoot,
    /// proxmox-boot-tool keeps the ESPs in sync; what they boot decides where the
    /// arguments go.
    ProxmoxBootTool(EspLoader),
    None,
}

/// What the ESPs that proxmox-boot-tool manages boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EspLoader {
    /// GRUB (`EFI/proxmox/grubx64.efi`, or a legacy BIOS boot): reads
    /// `/etc/default/grub.d`.
    Grub,
    /// systemd-boot: `proxmox-<kver>.conf` entries from `/etc/kernel/cmdline`.
    SystemdBoot,
    /// Not known from here (the ESPs are not mounted): both files are written, each
    /// read by one of them.
    Unknown,
}

/// What is installed that passes the kernel its command line: read once, judged by
/// [`BootFacts::detect`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootFacts {
    /// `etc/kernel/proxmox-boot-uuids` is non-empty and `proxmox-boot-tool` exists.
    pub proxmox_boot_tool: bool,
    /// A systemd-boot loader on an ESP (`EFI/systemd/systemd-boot*.efi`).
    pub systemd_boot: bool,
    /// `update-grub` and `boot/grub/grub.cfg` exist.
    pub grub: bool,
    /// Booted through UEFI (`sys/firmware/efi`).
    pub efi: bool,
    /// This boot was started by systemd-boot (its `LoaderInfo` EFI variable).
    pub booted_by_systemd_boot: bool,
    /// This boot was started by GRUB (`BOOT_IMAGE=` on the kernel command line).
    pub booted_by_grub: bool,
    /// A mounted ESP holds Proxmox's GRUB (`EFI/proxmox/grubx64.efi`).
    pub esp_proxmox_grub: bool,
    /// kernel-install makes UKIs (`layout=uki` in `kernel/install.conf`).
    pub uki: bool,
    /// systemd-boot's initramfs hook (`/etc/initramfs/post-update.d/systemd-boot`) runs
    /// kernel-install after update-initramfs (and proxmox-boot-tool has not disabled it).
    pub kernel_install_hook: bool,
    /// `kernel-install` exists.
    pub kernel_install: bool,
}

/// The EFI variable systemd-boot sets for the OS it started.
const LOADER_INFO: &str = "LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// The line proxmox-boot-tool puts into the upstream hooks it disables.
const PBT_DISABLED: &str = "This hookfile has been disabled by proxmox-boot-tool";

impl BootFacts {
    /// `cmdline` is the kernel command line as already read (`Machine::cmdline`).
    pub fn read(root: &Root, cmdline: Option<&str>) -> BootFacts {
        let uuids = root
            .read_to_string(paths::PROXMOX_UUIDS)
            .unwrap_or_default();
        let on_esp = |rel: &str| {
            paths::ESP_MOUNTS
                .iter()
                .any(|esp| root.exists(Path::new(esp).join(rel)))
        };
        let hook = root
            .read_to_string(paths::SDBOOT_INITRAMFS_HOOK)
            .is_ok_and(|t| !t.contains(PBT_DISABLED));
        let layout = [paths::INSTALL_CONF, paths::INSTALL_CONF_DEFAULT]
            .iter()
            .find_map(|f| root.read_to_string(f).ok())
            .unwrap_or_default();
        BootFacts {
            proxmox_boot_tool: !uuids.trim().is_empty() && root.exists(paths::PROXMOX_BOOT_TOOL),
            systemd_boot: paths::ESP_MOUNTS.iter().any(|esp| {
                root.read_dir_names(Path::new(esp).join("EFI/systemd"))
                    .unwrap_or_default()
                    .iter()
                    .any(|n| n.starts_with("systemd-boot"))
            }),
            grub: root.exists(paths::UPDATE_GRUB) && root.exists(paths::GRUB_CFG),
            efi: root.exists(paths::SYS_FIRMWARE_EFI),
            booted_by_systemd_boot: root.exists(Path::new(paths::EFIVARS).join(LOADER_INFO)),
            booted_by_grub: cmdline
                .is_some_and(|c| c.split_whitespace().any(|t| t.starts_with("BOOT_IMAGE="))),
            esp_proxmox_grub: on_esp("EFI/proxmox/grubx64.efi"),
            uki: layout
                .lines()
                .any(|l| l.split('#').next().unwrap_or("").trim().replace(' ', "") == "layout=uki"),
            kernel_install_hook: hook,
            kernel_install: root.exists(paths::KERNEL_INSTALL),
        }
    }

    /// The detected bootloader, in the order Proxmox, systemd-boot, GRUB.
    pub fn detect(&self) -> Bootloader {
        if self.proxmox_boot_tool {
            Bootloader::ProxmoxBootTool(self.esp_loader())
        } else if self.systemd_boot {
            Bootloader::SystemdBoot
        } else if self.grub {
            Bootloader::Grub
        } else {
            Bootloader::None
        }
    }

    /// What proxmox-boot-tool's ESPs boot, as its own hook decides per ESP: GRUB where
    /// `EFI/proxmox/grubx64.efi` is, or on a legacy BIOS boot; else systemd-boot. The
    /// ESPs are not kept mounted, so when none is, this boot's loader is the witness
    /// (systemd-boot's `LoaderInfo` variable, GRUB's `BOOT_IMAGE=`).
    pub fn esp_loader(&self) -> EspLoader {
        if self.esp_proxmox_grub {
            EspLoader::Grub
        } else if self.booted_by_systemd_boot {
            EspLoader::SystemdBoot
        } else if !self.efi || self.booted_by_grub {
            EspLoader::Grub
        } else {
            EspLoader::Unknown
        }
    }

    /// The configured bootloader, or the detected one for `auto`.
    pub fn resolve(&self, kind: BootloaderKind) -> Bootloader {
        match kind {
            BootloaderKind::Grub => Bootloader::Grub,
            BootloaderKind::SystemdBoot => Bootloader::SystemdBoot,
            BootloaderKind::ProxmoxBootTool => Bootloader::ProxmoxBootTool(self.esp_loader()),
            BootloaderKind::None => Bootloader::None,
            BootloaderKind::Auto => self.detect(),
        }
    }
}

impl Bootloader {
    /// Whether kernel arguments go to the GRUB drop-in.
    pub fn uses_grub_dropin(self, _facts: &BootFacts) -> bool {
        matches!(
            self,
            Bootloader::Grub | Bootloader::ProxmoxBootTool(EspLoader::Grub | EspLoader::Unknown)
        )
    }

    /// Whether kernel arguments go to `/etc/kernel/cmdline`.
    pub fn uses_kernel_cmdline(self) -> bool {
        matches!(
            self,
            Bootloader::SystemdBoot
                | Bootloader::ProxmoxBootTool(EspLoader::SystemdBoot | EspLoader::Unknown)
        )
    }

    /// The name users write in the config (`[bootloader] kind`).
    pub fn name(self) -> &'static str {
        match self {
            Bootloader::Grub => "grub",
            Bootloader::SystemdBoot => "systemd-boot",
            Bootloader::ProxmoxBootTool(_) => "proxmox-boot-tool",
            Bootloader::None => "none",
        }
    }

    /// The name with what the ESPs boot, for reports.
    pub fn describe(self) -> String {
        match self {
            Bootloader::ProxmoxBootTool(EspLoader::Grub) => {
                "proxmox-boot-tool (its ESPs boot GRUB)".to_string()
            }
            Bootloader::ProxmoxBootTool(EspLoader::SystemdBoot) => {
                "proxmox-boot-tool (its ESPs boot systemd-boot)".to_string()
            }
            Bootloader::ProxmoxBootTool(EspLoader::Unknown) => {
                "proxmox-boot-tool (what its ESPs boot is not known here: both the GRUB \
                 drop-in and /etc/kernel/cmdline are written)"
                    .to_string()
            }
            b => b.name().to_string(),
        }
    }
}

/// The GRUB drop-in. It appends to `GRUB_CMDLINE_LINUX_DEFAULT` only, so recovery entries
/// boot without the passthrough arguments (an escape hatch), and is guarded by an `if`
/// (never `a && b`, which aborts grub-mkconfig under `set -e` when false) so it is inert
/// once vfio-early is removed.
///
/// Two parsers read each token: `/bin/sh` sources the drop-in (inside a double-quoted
/// assignment), then GRUB parses the `linux` line that `10_linux` pastes the variable
/// into. Each token is written as a GRUB word ([`KernelToken::grub_word`]), and that text
/// is escaped for the shell's double quotes ([`sh_double_quoted`]). The tokens come from
/// the plan, whose kernel arguments are built-in or from the config's validated
/// [`KernelToken`]s; a string that is not a kernel argument (only a hand-edited manifest
/// could hold one) is left out, so the drop-in is well-formed whatever it is given.
pub fn render_grub_dropin(tokens: &[String]) -> String {
    let words: Vec<String> = tokens
        .iter()
        .filter_map(|t| t.parse::<KernelToken>().ok())
        .map(|t| t.grub_word())
        .collect();
    format!(
        "# Generated by `vfio-early apply` from /etc/vfio-early.toml: do not edit.\n\
         # Adds the passthrough arguments to normal boot entries; recovery entries stay\n\
         # without them. Inert once vfio-early is removed; `vfio-early undo` removes it.\n\
         if [ -x /usr/sbin/vfio-early ]; then\n\
         \tGRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT {}\"\n\
         fi\n",
        sh_double_quoted(&words.join(" "))
    )
}

/// Text for the inside of a POSIX shell double-quoted string: there, only `$`, `` ` ``,
/// `"` and `\` are special, and a backslash before each makes it literal.
fn sh_double_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '$' | '`' | '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// GRUB's script lexer (grub-core/script/yylex.l) on one `linux` line, for the words
    /// `grub_word` writes: unquoted text, `"..."` with `\$`, `\\`, `\"` escapes, and
    /// `'...'`; blanks split words. `None` for what this model does not cover (a bare
    /// `$`, operators), which `grub_word` must never produce.
    fn grub_argv(line: &str) -> Option<Vec<String>> {
        let mut argv = Vec::new();
        let mut word: Option<String> = None;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                ' ' | '\t' => {
                    if let Some(w) = word.take() {
                        argv.push(w);
                    }
                }
                '"' => {
                    let w = word.get_or_insert_with(String::new);
                    loop {
                        match chars.next()? {
                            '"' => break,
                            '\\' => match chars.next()? {
                                e @ ('$' | '\\' | '"') => w.push(e),
                                e => {
                                    w.push('\\');
                                    w.push(e);
                                }
                            },
                            '$' => return None,
                            c => w.push(c),
                        }
                    }
                }
                '\'' => {
                    let w = word.get_or_insert_with(String::new);
                    loop {
                        match chars.next()? {
                            '\'' => break,
                            c => w.push(c),
                        }
                    }
                }
                '{' | '}' | '|' | '&' | '$' | ';' | '<' | '>' | '\\' | '#' => return None,
                c => word.get_or_insert_with(String::new).push(c),
            }
        }
        argv.extend(word);
        Some(argv)
    }

    /// GRUB's `grub_create_loader_cmdline` (grub-core/lib/cmdline.c): an argument with a
    /// space is enclosed in double quotes, and `\`, `'`, `"` get a backslash.
    fn grub_loader_cmdline(argv: &[String]) -> String {
        let quoted: Vec<String> = argv
            .iter()
            .map(|a| {
                let mut out = String::new();
                for c in a.chars() {
                    if matches!(c, '\\' | '\'' | '"') {
                        out.push('\\');
                    }
                    out.push(c);
                }
                if a.contains(' ') {
                    format!("\"{out}\"")
                } else {
                    out
                }
            })
            .collect();
        quoted.join(" ")
    }

    const HOSTILE: &[&str] = &[
        "intel_iommu=on",
        "dyndbg=\"module vfio_pci +p\"",
        "memmap=4G$4G",
        "x=$(touch${IFS}/tmp/pwned)",
        "x=\"`id` $(id) ${HOME} $1 $? $#\"",
        "x=\"a; b && c || d | e < f > g # h\"",
        "x=\"{ } [[ ]] * ? [a]\"",
        "acpi_osi=\"!Windows 2020\"",
        "param=\"\"",
        "param=",
        "fi",
        "--",
    ];

    /// Each token reaches the kernel as the same param and value: through the shell (see
    /// the integration test that sources the drop-in), GRUB's parser and GRUB's loader.
    #[test]
    fn grub_words_reach_the_kernel_unchanged() {
        for t in HOSTILE {
            let token: KernelToken = t.parse().unwrap();
            let argv = grub_argv(&token.grub_word()).unwrap_or_else(|| panic!("{t}"));
            assert_eq!(argv.len(), 1, "{t}: {argv:?}");
            let kernel_sees = grub_loader_cmdline(&argv);
            let args = crate::kargs::split_args(&kernel_sees);
            assert_eq!(args.len(), 1, "{t}: the kernel sees {kernel_sees}");
            assert_eq!(
                crate::kargs::kernel_reads(args[0]),
                (token.param(), token.value()),
                "{t}: the kernel sees {kernel_sees}"
            );
        }
    }

    #[test]
    fn the_shell_layer_escapes_its_four_specials() {
        assert_eq!(
            sh_double_quoted("a\"b$c`d\\e f'g"),
            "a\\\"b\\$c\\`d\\\\e f'g"
        );
    }

    #[test]
    fn strings_that_are_not_kernel_arguments_are_left_out() {
        let text = render_grub_dropin(&s(&["iommu=pt", "a\nb", "$(reboot)", "x y"]));
        assert!(
            text.contains("$GRUB_CMDLINE_LINUX_DEFAULT iommu=pt\""),
            "{text}"
        );
        assert_eq!(text.lines().count(), 6, "{text}");
    }
}
