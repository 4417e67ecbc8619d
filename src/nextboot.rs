//! The command line the next boot will give the kernel, as the bootloader's own files
//! say: grub.cfg's default entry, the default systemd-boot loader entry's `options`, a
//! UKI's embedded `.cmdline` section, or (proxmox-boot-tool, whose ESPs are not mounted)
//! the file its refresh copies there. `status` compares it with `/proc/cmdline` to tell
//! "reboot pending" from "the bootloader lost the arguments".
//!
//! Reading is here ([`read`]); the parsers are pure and tested on text and bytes.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::bootloader::{BootFacts, Bootloader, EspLoader};
use crate::paths;
use crate::root::Root;

/// The next boot's command line and where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextBoot {
    /// E.g. "grub.cfg's default entry", "/boot/efi/loader/entries/debian-6.1.conf".
    pub source: String,
    pub cmdline: String,
}

/// Reads the next boot's command line for the detected bootloader; `None` when it cannot
/// be told from here.
pub fn read(root: &Root, boot: &BootFacts, grub_cfg: Option<&str>) -> Option<NextBoot> {
    match boot.detect() {
        Bootloader::Grub => grub_cfg
            .and_then(grub_default_args)
            .map(|cmdline| NextBoot {
                source: "grub.cfg's default entry".to_string(),
                cmdline,
            }),
        Bootloader::SystemdBoot if boot.uki => read_uki(root),
        Bootloader::SystemdBoot => read_loader_entry(root),
        Bootloader::ProxmoxBootTool(EspLoader::SystemdBoot) => root
            .read_to_string(paths::KERNEL_CMDLINE)
            .ok()
            .map(|t| NextBoot {
                source: "/etc/kernel/cmdline (proxmox-boot-tool copies it to every ESP)"
                    .to_string(),
                cmdline: t.lines().next().unwrap_or("").to_string(),
            }),
        _ => None,
    }
}

/// The arguments of grub.cfg's first `linux` line (the default entry with
/// `GRUB_DEFAULT=0`), without the kernel path.
pub fn grub_default_args(cfg: &str) -> Option<String> {
    cfg.lines().map(str::trim).find_map(|l| {
        let rest = l.strip_prefix("linux")?;
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        let rest = rest.trim_start();
        let args = rest.split_once([' ', '\t']).map_or("", |(_, a)| a);
        Some(args.trim().to_string())
    })
}

/// A Type #1 entry's `options` lines, joined (the spec allows several).
pub fn entry_options(entry: &str) -> String {
    entry
        .lines()
        .filter_map(|l| l.trim().strip_prefix("options"))
        .filter(|r| r.starts_with([' ', '\t']))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The entry systemd-boot picks by default: `default` of loader.conf as a glob over the
/// entry file names, else the first by the loader's order (highest version first).
pub fn default_entry<'a>(loader_conf: &str, names: &'a [String]) -> Option<&'a String> {
    let pattern = loader_conf.lines().find_map(|l| {
        let l = l.trim();
        let rest = l.strip_prefix("default")?;
        rest.starts_with([' ', '\t'])
            .then(|| rest.trim().to_string())
    });
    let mut sorted: Vec<&String> = names.iter().filter(|n| n.ends_with(".conf")).collect();
    sorted.sort_by(|a, b| version_cmp(b, a));
    if let Some(p) = pattern {
        if let Some(hit) = sorted.iter().find(|n| {
            crate::kmod::glob_match(&p, n) || crate::kmod::glob_match(&p, &n[..n.len() - 5])
        }) {
            return Some(hit);
        }
    }
    sorted.into_iter().next()
}

/// Orders names as versions: runs of digits by value, the rest by bytes.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let d = c.is_ascii_digit();
            match out.last_mut() {
                Some((ld, run)) if *ld == d => run.push(c),
                _ => out.push((d, c.to_string())),
            }
        }
        out
    };
    let (a, b) = (split(a), split(b));
    for (x, y) in a.iter().zip(&b) {
        let o = match (x.0 && y.0, x.1.parse::<u128>(), y.1.parse::<u128>()) {
            (true, Ok(p), Ok(q)) => p.cmp(&q),
            _ => x.1.cmp(&y.1),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

fn read_loader_entry(root: &Root) -> Option<NextBoot> {
    paths::ESP_MOUNTS.iter().find_map(|esp| {
        let dir = Path::new(esp).join("loader/entries");
        let names = root.read_dir_names(&dir).ok()?;
        let conf = root
            .read_to_string(Path::new(esp).join("loader/loader.conf"))
            .unwrap_or_default();
        let name = default_entry(&conf, &names)?;
        let entry = root.read_to_string(dir.join(name)).ok()?;
        Some(NextBoot {
            source: format!("/{}", dir.join(name).display()),
            cmdline: entry_options(&entry),
        })
    })
}

/// The newest UKI under `EFI/Linux` on an ESP, and its `.cmdline`.
fn read_uki(root: &Root) -> Option<NextBoot> {
    paths::ESP_MOUNTS.iter().find_map(|esp| {
        let dir = Path::new(esp).join("EFI/Linux");
        let mut names: Vec<String> = root
            .read_dir_names(&dir)
            .ok()?
            .into_iter()
            .filter(|n| n.ends_with(".efi"))
            .collect();
        names.sort_by(|a, b| version_cmp(b, a));
        let name = names.first()?;
        let mut f = root.open(dir.join(name)).ok()?;
        let cmdline = pe_section(&mut f, b".cmdline").ok()??;
        let text = String::from_utf8_lossy(&cmdline);
        Some(NextBoot {
            source: format!("the .cmdline of /{}", dir.join(name).display()),
            cmdline: text
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string(),
        })
    })
}

/// The bytes of a PE image's section `name` (at most 1 MiB), or `None` when it has no
/// such section. Reads only the headers and the section.
pub fn pe_section(f: &mut (impl Read + Seek), name: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = vec![0u8; 4096];
    let n = read_up_to(f, &mut head)?;
    head.truncate(n);
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.get(..2) != Some(b"MZ") {
        return Ok(None);
    }
    let Some(pe) = u32_at(0x3c).map(|v| v as usize) else {
        return Ok(None);
    };
    if head.get(pe..pe + 4) != Some(b"PE\0\0") {
        return Ok(None);
    }
    let (Some(sections), Some(opt_size)) = (u16_at(pe + 6), u16_at(pe + 20)) else {
        return Ok(None);
    };
    let table = pe + 24 + usize::from(opt_size);
    for i in 0..usize::from(sections) {
        let s = table + i * 40;
        let Some(sname) = head.get(s..s + 8) else {
            return Ok(None);
        };
        let sname = sname.split(|b| *b == 0).next().unwrap_or(sname);
        if sname != name {
            continue;
        }
        let (Some(vsize), Some(raw_size), Some(raw_at)) =
            (u32_at(s + 8), u32_at(s + 16), u32_at(s + 20))
        else {
            return Ok(None);
        };
        let len = vsize.min(raw_size).min(1 << 20) as usize;
        f.seek(SeekFrom::Start(u64::from(raw_at)))?;
        let mut data = vec![0u8; len];
        let got = read_up_to(f, &mut data)?;
        data.truncate(got);
        return Ok(Some(data));
    }
    Ok(None)
}

fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_default_is_the_first_linux_line() {
        let cfg = "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1 root=UUID=x ro quiet intel_iommu=on\n}\nmenuentry 'old' {\n\tlinux /boot/vmlinuz-5 root=y\n}\n";
        assert_eq!(
            grub_default_args(cfg).as_deref(),
            Some("root=UUID=x ro quiet intel_iommu=on")
        );
        assert_eq!(grub_default_args("linux16 /x y\n"), None);
    }

    #[test]
    fn the_default_loader_entry_follows_loader_conf_then_versions() {
        let names: Vec<String> = [
            "debian-6.1.0-28-amd64.conf",
            "debian-6.12.9-amd64.conf",
            "debian-6.9.1-amd64.conf",
            "vfio-early-trial+1.conf",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            default_entry("timeout 3\n", &names[..3]).map(String::as_str),
            Some("debian-6.12.9-amd64.conf")
        );
        assert_eq!(
            default_entry("default debian-6.1.0-28-amd64\n", &names).map(String::as_str),
            Some("debian-6.1.0-28-amd64.conf")
        );
        assert_eq!(
            default_entry("default debian-6.9*\n", &names).map(String::as_str),
            Some("debian-6.9.1-amd64.conf")
        );
        assert_eq!(
            entry_options(
                "title Debian\noptions root=UUID=x ro\noptions quiet intel_iommu=on\nlinux /x\n"
            ),
            "root=UUID=x ro quiet intel_iommu=on"
        );
    }

    /// A minimal PE with two sections, the second `.cmdline`.
    fn pe(cmdline: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        b[0x86..0x88].copy_from_slice(&2u16.to_le_bytes());
        b[0x94..0x96].copy_from_slice(&0xf0u16.to_le_bytes());
        let table = 0x80 + 24 + 0xf0;
        b[table..table + 8].copy_from_slice(b".osrel\0\0");
        let s = table + 40;
        b[s..s + 8].copy_from_slice(b".cmdline");
        b[s + 8..s + 12].copy_from_slice(&(cmdline.len() as u32).to_le_bytes());
        b[s + 16..s + 20].copy_from_slice(&0x200u32.to_le_bytes());
        b[s + 20..s + 24].copy_from_slice(&0x300u32.to_le_bytes());
        b[0x300..0x300 + cmdline.len()].copy_from_slice(cmdline);
        b
    }

    #[test]
    fn the_cmdline_section_of_a_uki_is_read() {
        let img = pe(b"root=UUID=x ro intel_iommu=on\0");
        let got = pe_section(&mut std::io::Cursor::new(img), b".cmdline").unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&b"root=UUID=x ro intel_iommu=on\0"[..])
        );
        let none = pe_section(&mut std::io::Cursor::new(pe(b"x")), b".linux").unwrap();
        assert_eq!(none, None);
        let not_pe = pe_section(&mut std::io::Cursor::new(b"hello".to_vec()), b".cmdline");
        assert_eq!(not_pe.unwrap(), None);
    }
}
