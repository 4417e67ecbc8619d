//! `initramfs verify`: whether an image holds what vfio-early needs at boot: the binary,
//! the applied config, the modprobe drop-in, the boot script (initramfs-tools or dracut)
//! and the kernel's vfio modules. [`verify_image`] is pure of printing so `status` can
//! call it; [`render`] is the report. Paths are compared after dropping a leading `./`
//! or `/`, and both `lib/modules` and `usr/lib/modules` count (merged /usr images).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::Path;

use super::{walk, InitramfsError};
use crate::{kmod, paths};

use paths::{
    IMAGE_BINARY as BINARY, IMAGE_BOOT_SCRIPT as BOOT_SCRIPT, IMAGE_MODPROBE as MODPROBE,
    IMAGE_MODULE_DIRS as MODULE_DIRS,
};

/// One thing the image must hold.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// What it is, e.g. `module vfio_pci`.
    pub item: String,
    /// The paths that would do (the first is shown when none is there).
    pub wanted: Vec<String>,
    /// The path found in the image.
    pub found: Option<String>,
}

/// The outcome for one image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    /// The kernel whose modules were checked.
    pub kernel: Option<String>,
    /// Why no kernel could be chosen (no module tree, or several and no `--kernel`).
    pub kernel_problem: Option<String>,
    pub checks: Vec<Check>,
}

impl Verification {
    /// True when everything is there.
    pub fn complete(&self) -> bool {
        self.kernel_problem.is_none() && self.checks.iter().all(|c| c.found.is_some())
    }
}

/// `name` without a leading `./` or `/` (both appear in images built by other tools).
pub(super) fn normalize(name: &str) -> &str {
    let mut n = name;
    loop {
        if let Some(rest) = n.strip_prefix("./") {
            n = rest;
        } else if let Some(rest) = n.strip_prefix('/') {
            n = rest;
        } else {
            return n;
        }
    }
}

/// `(kernel version, rest)` for a path under a module tree.
pub(super) fn split_module_path(name: &str) -> Option<(&str, &str)> {
    let rest = MODULE_DIRS.iter().find_map(|d| name.strip_prefix(d))?;
    let (kver, rest) = rest.split_once('/').unwrap_or((rest, ""));
    (!kver.is_empty()).then_some((kver, rest))
}

/// Walks the image once and checks it. `kernel` chooses the module tree; without it the
/// image's only `lib/modules/<version>` is used.
///
/// `want_modprobe`: whether the modprobe drop-in must be there; `apply` writes it only
/// when there is something to say (softdeps, options), and the hooks copy it only then,
/// so callers pass whether the system has one.
pub fn verify_image(
    path: &Path,
    kernel: Option<&str>,
    want_modprobe: bool,
) -> Result<Verification, InitramfsError> {
    verify_reader(super::stream::open_image(path)?, kernel, want_modprobe)
}

/// [`verify_image`] on an open image (for callers that open it through a `Root`).
pub fn verify_reader(
    image: impl std::io::Read,
    kernel: Option<&str>,
    want_modprobe: bool,
) -> Result<Verification, InitramfsError> {
    let mut fixed: Vec<(&str, &[&str])> =
        vec![("vfio-early binary", BINARY), ("config", &[paths::CONFIG])];
    if want_modprobe {
        fixed.push(("modprobe drop-in", MODPROBE));
    }
    fixed.push(("boot script", BOOT_SCRIPT));
    let mut found: Vec<Option<String>> = vec![None; fixed.len()];
    let mut kernels: BTreeSet<String> = BTreeSet::new();
    // (kernel, module) -> path; only vfio modules are kept, so memory stays small.
    let mut modules: BTreeMap<(String, String), String> = BTreeMap::new();
    walk(image, |entry| {
        let Ok(name) = std::str::from_utf8(entry.name) else {
            return Ok(());
        };
        let name = normalize(name);
        for (i, (_, candidates)) in fixed.iter().enumerate() {
            if found[i].is_none() && !entry.is_dir() && candidates.contains(&name) {
                found[i] = Some(name.to_string());
            }
        }
        if let Some((kver, rest)) = split_module_path(name) {
            if !kernels.contains(kver) {
                kernels.insert(kver.to_string());
            }
            if let Some(module) = kmod::module_name_of(rest) {
                if kmod::VFIO_MODULES.contains(&module.as_str()) {
                    modules
                        .entry((kver.to_string(), module))
                        .or_insert_with(|| name.to_string());
                }
            }
        }
        Ok(())
    })?;

    let mut checks: Vec<Check> = fixed
        .iter()
        .zip(found)
        .map(|((item, candidates), found)| Check {
            item: item.to_string(),
            wanted: candidates.iter().map(|c| c.to_string()).collect(),
            found,
        })
        .collect();

    let (kernel, kernel_problem) = choose_kernel(kernel, &kernels);
    if let Some(k) = &kernel {
        for module in kmod::vfio_modules_for(k) {
            checks.push(Check {
                item: format!("module {module}"),
                wanted: vec![format!("lib/modules/{k}/.../{module}.ko*")],
                found: modules.get(&(k.clone(), module.to_string())).cloned(),
            });
        }
    }
    Ok(Verification {
        kernel,
        kernel_problem,
        checks,
    })
}

/// The kernel whose modules to check: the one asked for, else the image's only one.
fn choose_kernel(
    asked: Option<&str>,
    in_image: &BTreeSet<String>,
) -> (Option<String>, Option<String>) {
    match asked {
        Some(k) => (Some(k.to_string()), None),
        None => match in_image.len() {
            1 => (in_image.iter().next().cloned(), None),
            0 => (
                None,
                Some("the image has no lib/modules/<version> directory".to_string()),
            ),
            _ => (
                None,
                Some(format!(
                    "the image holds several kernels' modules ({}); choose one with --kernel",
                    in_image.iter().cloned().collect::<Vec<_>>().join(", ")
                )),
            ),
        },
    }
}

/// The report: the kernel, one verdict line per item, and a last line with the fix.
pub fn render(v: &Verification) -> String {
    let mut out = String::new();
    match (&v.kernel, &v.kernel_problem) {
        (Some(k), _) => {
            let _ = writeln!(out, "kernel: {k}");
        }
        (None, Some(p)) => {
            let _ = writeln!(out, "MISSING  kernel modules: {p}");
        }
        (None, None) => {}
    }
    let width = v.checks.iter().map(|c| c.item.len()).max().unwrap_or(0);
    for c in &v.checks {
        match &c.found {
            Some(p) => {
                let _ = writeln!(out, "ok       {:<width$}  {p}", c.item);
            }
            None => {
                let wanted = c.wanted.first().map(String::as_str).unwrap_or("");
                let _ = writeln!(out, "MISSING  {:<width$}  {wanted}", c.item);
            }
        }
    }
    let missing = v.checks.iter().filter(|c| c.found.is_none()).count()
        + usize::from(v.kernel_problem.is_some());
    if missing == 0 {
        out.push_str("verdict: the image holds everything vfio-early needs at boot\n");
    } else {
        let kver = v.kernel.as_deref().unwrap_or("<version>");
        let _ = writeln!(
            out,
            "verdict: {missing} missing; run `vfio-early apply` with a device configured, \
             or rebuild the image (update-initramfs -u -k {kver}, or dracut -f --kver {kver}); \
             a module built into the kernel needs no file"
        );
    }
    out
}
