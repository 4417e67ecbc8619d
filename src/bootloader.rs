//! Which bootloader passes the kernel its command line, and the GRUB drop-in text.
//!
//! [`BootFacts::read`] reads what is installed under the root; detection and rendering
//! are pure. Detection order: Proxmox (`etc/kernel/proxmox-boot-uuids` non-empty and
//! `proxmox-boot-tool`), systemd-boot (`EFI/systemd/systemd-boot*.efi` on an ESP under
//! `boot/efi`, `efi` or `boot`), GRUB (`update-grub` and `boot/grub/grub.cfg`).
//! Rendering quotes each kernel argument for the shell that sources the drop-in and for
//! GRUB's parser after it.

use serde::Serialize;

use crate::config::BootloaderKind;
use crate::kargs::KernelToken;
use crate::paths;
use crate::root::Root;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bootloader {
    Grub,
    SystemdBoot,
    /// proxmox-boot-tool keeps ESPs in sync; they run systemd-boot (reads
    /// `/etc/kernel/cmdline`) or GRUB (reads `/etc/default/grub.d`).
    ProxmoxBootTool,
    None,
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
}

impl BootFacts {
    pub fn read(root: &Root) -> BootFacts {
        let uuids = root
            .read_to_string(paths::PROXMOX_UUIDS)
            .unwrap_or_default();
        BootFacts {
            proxmox_boot_tool: !uuids.trim().is_empty() && root.exists(paths::PROXMOX_BOOT_TOOL),
            systemd_boot: paths::ESP_MOUNTS.iter().any(|esp| {
                root.read_dir_names(std::path::Path::new(esp).join("EFI/systemd"))
                    .unwrap_or_default()
                    .iter()
                    .any(|n| n.starts_with("systemd-boot"))
            }),
            grub: root.exists(paths::UPDATE_GRUB) && root.exists(paths::GRUB_CFG),
        }
    }

    /// The detected bootloader, in the order Proxmox, systemd-boot, GRUB.
    pub fn detect(&self) -> Bootloader {
        if self.proxmox_boot_tool {
            Bootloader::ProxmoxBootTool
        } else if self.systemd_boot {
            Bootloader::SystemdBoot
        } else if self.grub {
            Bootloader::Grub
        } else {
            Bootloader::None
        }
    }

    /// The configured bootloader, or the detected one for `auto`.
    pub fn resolve(&self, kind: BootloaderKind) -> Bootloader {
        match kind {
            BootloaderKind::Grub => Bootloader::Grub,
            BootloaderKind::SystemdBoot => Bootloader::SystemdBoot,
            BootloaderKind::ProxmoxBootTool => Bootloader::ProxmoxBootTool,
            BootloaderKind::None => Bootloader::None,
            BootloaderKind::Auto => self.detect(),
        }
    }
}

impl Bootloader {
    /// Whether kernel arguments go to the GRUB drop-in.
    pub fn uses_grub_dropin(self, facts: &BootFacts) -> bool {
        match self {
            Bootloader::Grub => true,
            Bootloader::ProxmoxBootTool => facts.grub,
            _ => false,
        }
    }

    /// Whether kernel arguments go to `/etc/kernel/cmdline`.
    pub fn uses_kernel_cmdline(self) -> bool {
        matches!(self, Bootloader::SystemdBoot | Bootloader::ProxmoxBootTool)
    }

    /// The name users write in the config (`[bootloader] kind`).
    pub fn name(self) -> &'static str {
        match self {
            Bootloader::Grub => "grub",
            Bootloader::SystemdBoot => "systemd-boot",
            Bootloader::ProxmoxBootTool => "proxmox-boot-tool",
            Bootloader::None => "none",
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
