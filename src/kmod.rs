//! Facts about each installed kernel's modules, read from `lib/modules/<version>/`:
//! which vfio modules exist (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz`, or built in per
//! `modules.builtin`), and which drivers could claim a device, by matching its modalias
//! against `modules.alias`. Pure reading; nothing here decides.

use std::collections::BTreeSet;
use std::path::Path;

use crate::paths;
use crate::root::Root;

/// The vfio modules vfio-early puts into the initramfs, in load order. `vfio_virqfd`
/// was merged into `vfio` in Linux 6.2 and `vfio_pci_core` split out in 5.15, so each is
/// used only where the kernel has it.
pub const VFIO_MODULES: &[&str] = &[
    "vfio",
    "vfio_iommu_type1",
    "vfio_virqfd",
    "vfio_pci_core",
    "vfio_pci",
];

/// The modules that must be loaded (or built in) for passthrough to work: the rest of
/// [`VFIO_MODULES`] are their dependencies, present or not by kernel version.
pub const VFIO_CORE_MODULES: &[&str] = &["vfio", "vfio_iommu_type1", "vfio_pci"];

/// The vfio modules a kernel of `version` needs, in load order, from the version alone
/// (for an initramfs image, whose module tree may hold no `modules.dep`):
/// `vfio_pci_core` exists from 5.15, `vfio_virqfd` until 6.1. An unparsable version is
/// taken as a current kernel.
pub fn vfio_modules_for(version: &str) -> Vec<&'static str> {
    let mut nums = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    let v = match (nums.next().flatten(), nums.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor),
        _ => (u32::MAX, 0),
    };
    VFIO_MODULES
        .iter()
        .copied()
        .filter(|m| match *m {
            "vfio_virqfd" => v < (6, 2),
            "vfio_pci_core" => v >= (5, 15),
            _ => true,
        })
        .collect()
}

/// Module names are compared with `-` folded to `_`, as modprobe does.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The normalized module name of a path ending in `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`.
pub fn module_name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko.zst", ".ko.xz", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(normalize(stem))
}

#[derive(Debug, Clone, Default)]
pub struct KernelModules {
    pub version: String,
    /// Loadable modules (normalized names).
    pub loadable: BTreeSet<String>,
    /// Built into the kernel image (normalized names).
    pub builtin: BTreeSet<String>,
    /// `(pattern, module)` from `modules.alias`, PCI aliases only.
    pub pci_aliases: Vec<(String, String)>,
}

impl KernelModules {
    /// Reads one kernel's module facts. A kernel without `modules.dep` (never depmod'ed)
    /// is walked instead.
    pub fn read(root: &Root, version: &str) -> KernelModules {
        let dir = Path::new(paths::LIB_MODULES).join(version);
        let mut loadable = BTreeSet::new();
        match root.read_to_string(dir.join("modules.dep")) {
            Ok(dep) => {
                for line in dep.lines() {
                    if let Some(name) = line.split(':').next().and_then(module_name_of) {
                        loadable.insert(name);
                    }
                }
            }
            Err(_) => walk_modules(root, &dir, &mut loadable, 0),
        }
        let builtin = root
            .read_to_string(dir.join("modules.builtin"))
            .map(|t| t.lines().filter_map(module_name_of).collect())
            .unwrap_or_default();
        let pci_aliases = root
            .read_to_string(dir.join("modules.alias"))
            .map(|t| {
                t.lines()
                    .filter_map(|l| {
                        let mut f = l.split_whitespace();
                        match (f.next(), f.next(), f.next()) {
                            (Some("alias"), Some(p), Some(m)) if p.starts_with("pci:") => {
                                Some((p.to_string(), normalize(m)))
                            }
                            _ => None,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        KernelModules {
            version: version.to_string(),
            loadable,
            builtin,
            pci_aliases,
        }
    }

    pub fn has(&self, module: &str) -> bool {
        let m = normalize(module);
        self.loadable.contains(&m) || self.builtin.contains(&m)
    }

    /// The vfio modules this kernel has as loadable modules, in load order.
    pub fn vfio_modules(&self) -> Vec<&'static str> {
        VFIO_MODULES
            .iter()
            .copied()
            .filter(|m| self.loadable.contains(*m))
            .collect()
    }

    /// Drivers that name this vendor:device in their PCI aliases, for a device that is
    /// not present (no modalias to match): only aliases with a concrete vendor count,
    /// so class-wide drivers (`pci:v*d*...bc0Csc03*`) are not swept in.
    pub fn drivers_for_id(&self, vendor: u16, device: u16) -> BTreeSet<String> {
        let v = format!("{vendor:08X}");
        let d = format!("{device:08X}");
        self.pci_aliases
            .iter()
            .filter(|(pattern, _)| {
                let Some(rest) = pattern.strip_prefix("pci:v") else {
                    return false;
                };
                let Some((pv, rest)) = rest.split_once('d') else {
                    return false;
                };
                let pd = rest.split("sv").next().unwrap_or("");
                !pv.contains('*') && glob_match(pv, &v) && glob_match(pd, &d)
            })
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Drivers whose PCI aliases match `modalias`.
    pub fn drivers_for(&self, modalias: &str) -> BTreeSet<String> {
        self.pci_aliases
            .iter()
            .filter(|(pattern, _)| glob_match(pattern, modalias))
            .map(|(_, m)| m.clone())
            .collect()
    }
}

fn walk_modules(root: &Root, dir: &Path, out: &mut BTreeSet<String>, depth: u8) {
    if depth > 12 {
        return;
    }
    for name in root.read_dir_names(dir).unwrap_or_default() {
        let p = dir.join(&name);
        if root.is_dir(&p) {
            walk_modules(root, &p, out, depth + 1);
        } else if let Some(m) = module_name_of(&name) {
            out.insert(m);
        }
    }
}

/// Every installed kernel's facts, by version.
pub fn read_all(root: &Root, versions: &[String]) -> Vec<KernelModules> {
    versions
        .iter()
        .map(|v| KernelModules::read(root, v))
        .collect()
}

/// Shell-style glob with `*`, `?` and `[...]` classes, as kmod matches aliases.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('?') => {
                pi += 1;
                ti += 1;
                continue;
            }
            Some('[') => {
                if let Some((matched, next)) = class_match(&p, pi, t[ti]) {
                    if matched {
                        pi = next;
                        ti += 1;
                        continue;
                    }
                }
            }
            Some(c) if *c == t[ti] => {
                pi += 1;
                ti += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`; returns whether it
/// matched and the index after `]`.
fn class_match(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let first = i;
    while let Some(&ch) = p.get(i) {
        if ch == ']' && i > first {
            return Some((matched != negate, i + 1));
        }
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|e| *e != ']') {
            let end = p[i + 2];
            if ch <= c && c <= end {
                matched = true;
            }
            i += 3;
        } else {
            if ch == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_modules_follow_the_kernel_version() {
        assert_eq!(
            vfio_modules_for("6.1.0-18-amd64"),
            [
                "vfio",
                "vfio_iommu_type1",
                "vfio_virqfd",
                "vfio_pci_core",
                "vfio_pci"
            ]
        );
        assert_eq!(
            vfio_modules_for("6.12.9-amd64"),
            ["vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci"]
        );
        assert_eq!(
            vfio_modules_for("5.10.0-28-amd64"),
            ["vfio", "vfio_iommu_type1", "vfio_virqfd", "vfio_pci"]
        );
        assert_eq!(vfio_modules_for("weird"), vfio_modules_for("6.12"));
    }

    #[test]
    fn globs_match_modaliases() {
        let ma = "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00";
        assert!(glob_match("pci:v00008086d000010D3sv*sd*bc*sc*i*", ma));
        assert!(!glob_match("pci:v00008086d000010D4sv*sd*bc*sc*i*", ma));
        assert!(glob_match("pci:v*d*sv*sd*bc02sc00i*", ma));
        assert!(glob_match("pci:v0000808[0-9]d*", ma));
        assert!(!glob_match("pci:v0000808[!6]d*", ma));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn module_names_fold_dashes_and_extensions() {
        assert_eq!(
            module_name_of("kernel/drivers/vfio/pci/vfio-pci.ko.xz").as_deref(),
            Some("vfio_pci")
        );
        assert_eq!(module_name_of("vfio.ko").as_deref(), Some("vfio"));
        assert_eq!(module_name_of("README"), None);
    }
}
