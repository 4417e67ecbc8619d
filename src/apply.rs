//! `apply` and `undo`: converge the files vfio-early owns to what the plan wants, then
//! regenerate the initramfs and the bootloader config, only when something changed.
//!
//! Owned files: the modprobe drop-in, the GRUB drop-in, the applied config snapshot that
//! the initramfs hooks copy into the image, and vfio-early's tokens in the first line of
//! `/etc/kernel/cmdline`. A manifest under `/var/lib/vfio-early/` records them all.
//!
//! Crash safety: the manifest is first rewritten to cover both the old and the new set
//! (so `undo` can always find every file), then each file is replaced atomically, then the
//! final manifest is written with the regeneration still pending; it is cleared only when
//! the commands succeed, so an interrupted apply finishes on the next run. `undo` is
//! `apply` towards the empty state. Writes go through [`Writer`] so tests can inject a
//! failure between two files.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bootloader::{self, Bootloader};
use crate::config::Config;
use crate::kargs;
use crate::kmod::KernelModules;
use crate::machine::Machine;
use crate::modprobe;
use crate::paths;
use crate::plan::Plan;
use crate::root::Root;

pub const MANIFEST: &str = "var/lib/vfio-early/manifest.json";
pub const APPLIED: &str = "var/lib/vfio-early/applied.toml";
/// The line an `apply --force` puts into the applied config.
pub const FORCED_MARKER: &str =
    "# Applied with --force: the early binder overrides interlocks at boot too.";

/// Whether an applied config (the text the initramfs carries) was applied with --force.
pub fn applied_with_force(text: &str) -> bool {
    text.lines().any(|l| l == FORCED_MARKER)
}
pub const MODPROBE: &str = "etc/modprobe.d/vfio-early.conf";

/// What apply wrote, for `undo`, `status` and package purge. Stable JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    /// Owned files, relative to the root.
    pub files: Vec<String>,
    /// Directories apply created; `undo` removes them when empty.
    pub dirs_created: Vec<String>,
    /// Tokens apply added to `/etc/kernel/cmdline`.
    pub cmdline_added: Vec<String>,
    /// `/etc/kernel/cmdline` before apply first touched it (`None`: absent).
    pub cmdline_before: Option<String>,
    /// `/etc/kernel/cmdline` as apply last wrote it.
    pub cmdline_after: Option<String>,
    /// The kernel arguments of the last apply, whatever the bootloader.
    pub kernel_args: Vec<String>,
    /// Commands still to run (an earlier run stopped before they succeeded).
    pub pending: Vec<Vec<String>>,
}

/// One owned file's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// Everything an apply or undo would do.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub files: Vec<FileChange>,
    pub manifest: Manifest,
    pub commands: Vec<Vec<String>>,
    pub bootloader: Option<Bootloader>,
    /// Tokens the user must add by hand (bootloader `none`).
    pub manual_tokens: Vec<String>,
    /// Per kernel: version and the vfio modules the hook will add.
    pub kernels: Vec<(String, Vec<&'static str>)>,
    pub softdeps: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.commands.is_empty()
    }
}

/// The file operations of a commit.
pub trait Writer {
    fn write(&mut self, root: &Root, rel: &str, contents: &str) -> io::Result<()>;
    fn remove(&mut self, root: &Root, rel: &str) -> io::Result<()>;
}

/// Atomic writes through the root.
pub struct AtomicWriter;

impl Writer for AtomicWriter {
    fn write(&mut self, root: &Root, rel: &str, contents: &str) -> io::Result<()> {
        root.write_atomic(rel, contents.as_bytes())
    }
    fn remove(&mut self, root: &Root, rel: &str) -> io::Result<()> {
        root.remove_file(rel)
    }
}

pub fn read_manifest(root: &Root) -> anyhow::Result<Option<Manifest>> {
    let damaged = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{}: the manifest is damaged ({e}); move it aside and run apply again",
            root.path(MANIFEST).display()
        )
    };
    match root.read_to_string(MANIFEST) {
        Ok(text) => {
            let m: Manifest = serde_json::from_str(&text).map_err(|e| damaged(&e))?;
            // Entries name paths under the root: `..` or absolute ones are never followed.
            for entry in m.files.iter().chain(&m.dirs_created) {
                Root::checked_rel(entry).map_err(|e| damaged(&e))?;
            }
            Ok(Some(m))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!(
            "reading {}: {e}",
            root.path(MANIFEST).display()
        )),
    }
}

fn read_opt(root: &Root, rel: &str) -> anyhow::Result<Option<String>> {
    match root.read_to_string(rel) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", root.path(rel).display())),
    }
}

/// The target state: `Some` for apply, `None` for undo.
pub struct Target<'a> {
    /// `apply --force`: recorded in the applied config, so the early binder overrides
    /// the same interlocks at boot and no others.
    pub forced: bool,
    pub config: &'a Config,
    pub config_text: &'a str,
    pub plan: &'a Plan,
    pub machine: &'a Machine,
    pub kernels: &'a [KernelModules],
}

/// Computes what apply (with a target) or undo (without) would change. Reads only.
pub fn compute(root: &Root, target: Option<&Target>) -> anyhow::Result<Changes> {
    let old = read_manifest(root)?.unwrap_or_default();
    let mut ch = Changes::default();

    let tokens: Vec<String> = target
        .map(|t| t.plan.kernel_args.iter().map(|a| a.token.clone()).collect())
        .unwrap_or_default();
    let bl = target.map(|t| bootloader::resolve(root, t.config.bootloader.kind));
    ch.bootloader = bl;

    let mut want: Vec<(String, Option<String>)> = Vec::new();
    // The modprobe drop-in.
    let modprobe_text = target.and_then(|t| {
        ch.softdeps = modprobe::candidate_drivers(t.config, t.plan, t.machine, t.kernels);
        modprobe::render(t.config, t.plan, &ch.softdeps)
    });
    want.push((MODPROBE.to_string(), modprobe_text));
    // The applied config, the hooks' source: present only when devices are configured.
    let applied = target.filter(|t| !t.config.devices.is_empty()).map(|t| {
        format!(
            "# The config as of the last `vfio-early apply`; the initramfs hooks copy this\n\
             # file into the image. Edit /etc/vfio-early.toml instead.\n{}{}",
            if t.forced {
                format!("{FORCED_MARKER}\n")
            } else {
                String::new()
            },
            t.config_text
        )
    });
    want.push((APPLIED.to_string(), applied));
    // The GRUB drop-in.
    let grub = match bl {
        Some(b) if b.uses_grub_dropin(root) && !tokens.is_empty() => {
            Some(bootloader::render_grub_dropin(&tokens))
        }
        _ => None,
    };
    want.push((bootloader::GRUB_DROPIN.to_string(), grub));

    for (path, new) in want {
        let old_text = read_opt(root, &path)?;
        if old_text != new {
            ch.files.push(FileChange {
                path,
                old: old_text,
                new,
            });
        }
    }

    // /etc/kernel/cmdline: back to what it was without our tokens, then ours added.
    let current = read_opt(root, bootloader::KERNEL_CMDLINE)?;
    let base: Option<String> = match &current {
        None => None,
        Some(cur) if old.cmdline_after.as_ref() == Some(cur) => old.cmdline_before.clone(),
        Some(cur) if old.cmdline_added.is_empty() => Some(cur.clone()),
        // Edited since: take out just our tokens.
        Some(cur) => Some(kargs::remove_tokens(cur, &old.cmdline_added)),
    };
    let mut manifest = Manifest {
        schema: 1,
        kernel_args: tokens.clone(),
        ..Manifest::default()
    };
    let cmdline_new = match bl {
        Some(b) if b.uses_kernel_cmdline() && !tokens.is_empty() => {
            let seed = match &base {
                Some(b) => b.clone(),
                None => kargs::seed_from_proc(
                    &root.read_to_string(paths::PROC_CMDLINE).unwrap_or_default(),
                ),
            };
            let (text, added) = kargs::add_tokens(&seed, &tokens);
            manifest.cmdline_added = added;
            manifest.cmdline_before = base.clone();
            manifest.cmdline_after = Some(text.clone());
            Some(text)
        }
        _ => base,
    };
    if cmdline_new != current {
        ch.files.push(FileChange {
            path: bootloader::KERNEL_CMDLINE.to_string(),
            old: current,
            new: cmdline_new,
        });
    }
    if bl == Some(Bootloader::None) {
        ch.manual_tokens = tokens.clone();
    }
    if let Some(t) = target {
        ch.kernels = t
            .kernels
            .iter()
            .map(|k| (k.version.clone(), k.vfio_modules()))
            .collect();
    }

    // The manifest lists what will be owned afterwards.
    for (path, exists) in ch_final_files(root, &ch)? {
        if exists && path != bootloader::KERNEL_CMDLINE {
            manifest.files.push(path);
        }
    }
    manifest.dirs_created = old.dirs_created.clone();
    for c in &ch.files {
        if c.old.is_none() && c.new.is_some() {
            for dir in missing_parents(root, &c.path) {
                if !manifest.dirs_created.contains(&dir) {
                    manifest.dirs_created.push(dir);
                }
            }
        }
    }

    // Commands: only for what changed, plus anything an earlier run left pending.
    let touched: BTreeSet<&str> = ch.files.iter().map(|c| c.path.as_str()).collect();
    // Pending work is tracked on the host only: with another root the commands are
    // reported, and running them is the caller's business.
    let mut commands: Vec<Vec<String>> = if root.is_host() {
        old.pending.clone()
    } else {
        Vec::new()
    };
    let bl_now = bl.unwrap_or_else(|| bootloader::detect(root));
    if touched.contains(MODPROBE)
        || touched.contains(APPLIED)
        || touched.contains(bootloader::KERNEL_CMDLINE)
    {
        commands.push(initramfs_command(root));
    }
    if bl_now == Bootloader::ProxmoxBootTool && !touched.is_empty() {
        commands.push(vec!["proxmox-boot-tool".into(), "refresh".into()]);
    } else if touched.contains(bootloader::GRUB_DROPIN) && root.exists("boot/grub/grub.cfg") {
        commands.push(vec!["update-grub".into()]);
    }
    let mut unique: Vec<Vec<String>> = Vec::new();
    for c in commands {
        if !unique.contains(&c) {
            unique.push(c);
        }
    }
    ch.commands = unique;
    if root.is_host() {
        manifest.pending = ch.commands.clone();
    }
    ch.manifest = manifest;
    Ok(ch)
}

/// The owned files and whether each exists after the change.
fn ch_final_files(root: &Root, ch: &Changes) -> anyhow::Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for path in [MODPROBE, APPLIED, bootloader::GRUB_DROPIN] {
        let exists = match ch.files.iter().find(|c| c.path == path) {
            Some(c) => c.new.is_some(),
            None => read_opt(root, path)?.is_some(),
        };
        out.push((path.to_string(), exists));
    }
    Ok(out)
}

/// Parent directories of `rel` that do not exist yet, outermost first.
fn missing_parents(root: &Root, rel: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut p = Path::new(rel).parent();
    while let Some(dir) = p {
        if dir.as_os_str().is_empty() || root.exists(dir) {
            break;
        }
        out.push(dir.to_string_lossy().into_owned());
        p = dir.parent();
    }
    out.reverse();
    out
}

fn initramfs_command(root: &Root) -> Vec<String> {
    if root.exists("usr/sbin/update-initramfs") || !root.exists("usr/bin/dracut") {
        vec![
            "update-initramfs".into(),
            "-u".into(),
            "-k".into(),
            "all".into(),
        ]
    } else {
        vec!["dracut".into(), "--regenerate-all".into(), "--force".into()]
    }
}

/// Writes the changes: intent manifest, files, final manifest. Runs no command.
pub fn commit(root: &Root, ch: &Changes, w: &mut dyn Writer) -> anyhow::Result<()> {
    let old = read_manifest(root)?.unwrap_or_default();
    // 1. Intent: the union of old and new, so undo finds every file whatever happens.
    let mut intent = ch.manifest.clone();
    for f in &old.files {
        if !intent.files.contains(f) {
            intent.files.push(f.clone());
        }
    }
    for t in &old.cmdline_added {
        if !intent.cmdline_added.contains(t) {
            intent.cmdline_added.push(t.clone());
        }
    }
    if intent.cmdline_after.is_none() {
        intent.cmdline_before = old.cmdline_before.clone();
        intent.cmdline_after = old.cmdline_after.clone();
    }
    if !ch.files.is_empty() {
        w.write(root, MANIFEST, &to_json(&intent)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", root.path(MANIFEST).display()))?;
    }
    // 2. The files, each atomically.
    for c in &ch.files {
        let r = match &c.new {
            Some(text) => w.write(root, &c.path, text),
            None => w.remove(root, &c.path),
        };
        r.map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}; nothing is half-written, run the command again to finish",
                root.path(&c.path).display()
            )
        })?;
    }
    // 3. The final manifest, or none at all once nothing is owned.
    store_manifest(root, &ch.manifest, w)
}

/// Writes the manifest, or removes it (and the directories apply created, when empty)
/// once nothing is owned and nothing is pending.
fn store_manifest(root: &Root, m: &Manifest, w: &mut dyn Writer) -> anyhow::Result<()> {
    let nothing_owned = m.files.is_empty()
        && m.cmdline_added.is_empty()
        && m.pending.is_empty()
        && m.cmdline_after.is_none();
    if nothing_owned {
        w.remove(root, MANIFEST)?;
        for dir in m.dirs_created.iter().rev() {
            // Only empty directories go; anything the user put there stays.
            let _ = root.remove_dir(dir);
        }
    } else {
        w.write(root, MANIFEST, &to_json(m)?)?;
    }
    Ok(())
}

fn to_json(m: &Manifest) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(m)? + "\n")
}

/// Runs the regeneration commands on the host, streaming their output; with another
/// root, only says what it would run. Clears `pending` in the manifest on success.
pub fn run_commands(root: &Root, ch: &Changes, out: &mut dyn io::Write) -> anyhow::Result<()> {
    if ch.commands.is_empty() {
        return Ok(());
    }
    if !root.is_host() {
        for c in &ch.commands {
            writeln!(
                out,
                "would run: {}   (the root is {}, not the host)",
                c.join(" "),
                root.dir().display()
            )?;
        }
        return Ok(());
    }
    for c in &ch.commands {
        let Some((prog, args)) = c.split_first() else {
            continue;
        };
        writeln!(out, "running: {}   (this can take a minute)", c.join(" "))?;
        out.flush()?;
        let status = run_streaming(Command::new(prog).args(args), Duration::from_secs(1800))?;
        if !status {
            anyhow::bail!(
                "`{}` failed; the files are in place and the command stays pending: fix the \
                 cause above and run `vfio-early apply` again",
                c.join(" ")
            );
        }
    }
    if let Some(mut m) = read_manifest(root)? {
        m.pending.clear();
        store_manifest(root, &m, &mut AtomicWriter)?;
    }
    Ok(())
}

fn run_streaming(cmd: &mut Command, limit: Duration) -> anyhow::Result<bool> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {shown}: {e}"))?;
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{shown} ran over {} minutes; killed", limit.as_secs() / 60);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A unified diff of every file change, for `--dry-run`.
pub fn render_diff(ch: &Changes) -> String {
    let mut out = String::new();
    for c in &ch.files {
        let shown = format!("/{}", c.path);
        let old = c.old.as_deref().unwrap_or("");
        let new = c.new.as_deref().unwrap_or("");
        let (a, b) = match (&c.old, &c.new) {
            (None, _) => ("/dev/null".to_string(), shown.clone()), // root-ok
            (_, None) => (shown.clone(), "/dev/null".to_string()), // root-ok
            _ => (shown.clone(), shown.clone()),
        };
        let diff = similar::TextDiff::from_lines(old, new);
        let _ = write!(
            out,
            "{}",
            diff.unified_diff().context_radius(3).header(&a, &b)
        );
    }
    out
}

/// The summary printed by apply and undo.
pub fn render_summary(ch: &Changes, dry_run: bool) -> String {
    let mut out = String::new();
    if let Some(b) = ch.bootloader {
        let name = serde_json::to_value(b)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(out, "bootloader: {name}");
    }
    if !ch.manifest.kernel_args.is_empty() {
        let _ = writeln!(
            out,
            "kernel arguments: {}",
            ch.manifest.kernel_args.join(" ")
        );
    }
    for (version, mods) in &ch.kernels {
        let _ = writeln!(out, "kernel {version}: initramfs gets {}", mods.join(" "));
    }
    if !ch.softdeps.is_empty() {
        let _ = writeln!(out, "vfio-pci loads before: {}", ch.softdeps.join(" "));
    }
    if !ch.manual_tokens.is_empty() {
        let _ = writeln!(
            out,
            "bootloader is `none`: add these to the kernel command line yourself: {}",
            ch.manual_tokens.join(" ")
        );
    }
    if ch.is_empty() {
        out.push_str("nothing changed: every file already matches; nothing rebuilt\n");
        return out;
    }
    let verb = |c: &FileChange| match (&c.old, &c.new, dry_run) {
        (None, Some(_), false) => "wrote",
        (None, Some(_), true) => "would write",
        (Some(_), Some(_), false) => "updated",
        (Some(_), Some(_), true) => "would update",
        (_, None, false) => "removed",
        (_, None, true) => "would remove",
    };
    for c in &ch.files {
        let _ = writeln!(out, "{} /{}", verb(c), c.path);
    }
    if dry_run {
        for c in &ch.commands {
            let _ = writeln!(out, "would run: {}", c.join(" "));
        }
    }
    out
}

/// The lines the initramfs hooks read: files to copy and modules to add for `version`.
/// Empty when no device is configured (the hooks then add nothing).
pub fn render_hook_files(root: &Root, version: &str) -> String {
    if !root.exists(APPLIED) {
        return String::new();
    }
    let mut out = format!("file /{APPLIED} /{}\n", paths::CONFIG);
    if root.exists(MODPROBE) {
        let _ = writeln!(out, "file /{MODPROBE} /{MODPROBE}");
    }
    let km = KernelModules::read(root, version);
    let mods: Vec<&str> = if km.loadable.is_empty() {
        // Unknown kernel tree: name them all; the hooks tolerate missing ones.
        crate::kmod::VFIO_MODULES.to_vec()
    } else {
        km.vfio_modules()
    };
    for m in mods {
        let _ = writeln!(out, "module {m}");
    }
    out
}
