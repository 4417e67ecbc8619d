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

use crate::bootloader::{self, Bootloader};
use crate::config::Config;
use crate::context::Context;
use crate::host::{Generator, Host};
use crate::kargs;
use crate::kmod::KernelModules;
use crate::machine::Machine;
use crate::modprobe;
use crate::outcome::Outcome;
use crate::paths::{
    self, APPLIED, CMDLINE_TOKENS, FORCED, GRUB_DROPIN, KERNEL_CMDLINE, MANIFEST, MODPROBE,
};
use crate::plan::Plan;
use crate::root::Root;
use crate::state::{self, Manifest, State};

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
    /// The manifest before the change (the intent manifest covers both).
    pub old_manifest: Manifest,
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
    /// Nothing to write or run. A manifest that no longer says what is owned (an
    /// interrupted undo left it) is a change too, so recovery always converges.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.commands.is_empty() && self.manifest == self.old_manifest
    }
}

/// The file operations of a commit.
pub trait Writer {
    fn write(&mut self, root: &Root, rel: &str, contents: &str) -> io::Result<()>;
    fn remove(&mut self, root: &Root, rel: &str) -> io::Result<()>;
    /// A script another tool runs (mode 0755): the trial's GRUB script. Writers that
    /// only count or fail writes may keep this default.
    fn write_executable(&mut self, root: &Root, rel: &str, contents: &str) -> io::Result<()> {
        self.write(root, rel, contents)
    }
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
    fn write_executable(&mut self, root: &Root, rel: &str, contents: &str) -> io::Result<()> {
        root.write_atomic_mode(rel, contents.as_bytes(), crate::root::FileMode::Executable)
    }
}

/// The target state: `Some` for apply, `None` for undo.
pub struct Target<'a> {
    /// `apply --force`: recorded in a marker file the initramfs carries, so the early
    /// binder overrides the same interlocks at boot and no others.
    pub forced: bool,
    pub config: &'a Config,
    pub config_text: &'a str,
    pub plan: &'a Plan,
}

/// Computes what apply (with a target) or undo (without) would change: a pure function
/// of the target, the machine and the host's files as read.
pub fn compute(target: Option<&Target>, machine: &Machine, host: &Host) -> anyhow::Result<Changes> {
    let old = host.state.manifest()?.cloned().unwrap_or_default();
    let tokens: Vec<String> = target
        .map(|t| t.plan.kernel_args.iter().map(|a| a.token.clone()).collect())
        .unwrap_or_default();
    let bl = target.map(|t| host.boot.resolve(t.config.bootloader.kind));
    let mut ch = Changes {
        bootloader: bl,
        softdeps: target.map(|t| t.plan.softdeps.clone()).unwrap_or_default(),
        ..Changes::default()
    };
    for (path, new) in wanted_files(target, &tokens, bl, host, &ch.softdeps) {
        let old_text = host.current(path)?;
        if old_text != new {
            ch.files.push(FileChange {
                path: path.to_string(),
                old: old_text,
                new,
            });
        }
    }
    let mut manifest = Manifest {
        schema: 1,
        kernel_args: tokens.clone(),
        ..Manifest::default()
    };
    kernel_cmdline_change(&mut ch, &mut manifest, &old, &tokens, bl, machine, host)?;
    if bl == Some(Bootloader::None) {
        ch.manual_tokens = tokens.clone();
    }
    if target.is_some() {
        ch.kernels = machine
            .kernels
            .iter()
            .map(|k| (k.version.clone(), k.vfio_modules()))
            .collect();
    }
    // The manifest lists what will be owned afterwards.
    for (path, exists) in final_files(host, &ch)? {
        if exists {
            manifest.files.push(path);
        }
    }
    manifest.dirs_created = old.dirs_created.clone();
    for c in ch
        .files
        .iter()
        .filter(|c| c.old.is_none() && c.new.is_some())
    {
        for dir in missing_parents(host, &c.path) {
            if !manifest.dirs_created.contains(&dir) {
                manifest.dirs_created.push(dir);
            }
        }
    }
    ch.commands = commands(&ch, &old, bl, host);
    if host.is_host {
        manifest.pending = ch.commands.clone();
    }
    ch.manifest = manifest;
    ch.old_manifest = old;
    Ok(ch)
}

/// The wanted text of each whole file apply owns (`None`: absent).
fn wanted_files(
    target: Option<&Target>,
    tokens: &[String],
    bl: Option<Bootloader>,
    host: &Host,
    softdeps: &[String],
) -> Vec<(&'static str, Option<String>)> {
    let modprobe_text = target.and_then(|t| modprobe::render(t.config, t.plan, softdeps));
    // The applied config, the hooks' source: present only when devices are configured.
    let configured = target.filter(|t| !t.config.devices.is_empty());
    let applied = configured.map(|t| state::render_applied(t.config_text));
    let forced = configured
        .filter(|t| t.forced)
        .map(|_| state::FORCED_TEXT.to_string());
    let grub = match bl {
        Some(b) if b.uses_grub_dropin(&host.boot) && !tokens.is_empty() => {
            Some(bootloader::render_grub_dropin(tokens))
        }
        _ => None,
    };
    vec![
        (MODPROBE, modprobe_text),
        (APPLIED, applied),
        (FORCED, forced),
        (GRUB_DROPIN, grub),
    ]
}

/// `/etc/kernel/cmdline`: back to what it was without our tokens, then ours added.
fn kernel_cmdline_change(
    ch: &mut Changes,
    manifest: &mut Manifest,
    old: &Manifest,
    tokens: &[String],
    bl: Option<Bootloader>,
    machine: &Machine,
    host: &Host,
) -> anyhow::Result<()> {
    let current = host.current(KERNEL_CMDLINE)?;
    let base: Option<String> = match &current {
        None => None,
        Some(cur) if old.cmdline_after.as_ref() == Some(cur) => old.cmdline_before.clone(),
        Some(cur) if old.cmdline_added.is_empty() => Some(cur.clone()),
        // Edited since: take out just our tokens.
        Some(cur) => Some(kargs::remove_tokens(cur, &old.cmdline_added)),
    };
    let cmdline_new = match bl {
        Some(b) if b.uses_kernel_cmdline() && !tokens.is_empty() => {
            let seed = match &base {
                Some(b) => b.clone(),
                // kernel-install falls back to /proc/cmdline when the file is absent:
                // on the running system that is what it boots with today.
                None if host.is_host => {
                    kargs::seed_from_proc(machine.cmdline.as_deref().unwrap_or(""))
                }
                None => anyhow::bail!(
                    "cannot write /{KERNEL_CMDLINE}: it does not exist, and outside the \
                     running system the arguments this system boots with (root=, ...) \
                     cannot be known, so kernel-install would make boot entries without \
                     them; nothing was written\n\
                     fix: create /{KERNEL_CMDLINE} in the target with the system's \
                     arguments on its first line (e.g. `root=UUID=... ro quiet`), then run \
                     apply again"
                ),
            };
            let (text, added) = kargs::add_tokens(&seed, tokens);
            manifest.cmdline_added = added;
            manifest.cmdline_before = base.clone();
            manifest.cmdline_after = Some(text.clone());
            Some(text)
        }
        _ => base,
    };
    if cmdline_new != current {
        ch.files.push(FileChange {
            path: KERNEL_CMDLINE.to_string(),
            old: current,
            new: cmdline_new,
        });
    }
    Ok(())
}

/// The regeneration commands: only for what changed, plus anything an earlier run left
/// pending. Pending work is tracked on the host only: with another root the commands are
/// reported, and running them is the caller's business.
fn commands(ch: &Changes, old: &Manifest, bl: Option<Bootloader>, host: &Host) -> Vec<Vec<String>> {
    let touched: BTreeSet<&str> = ch.files.iter().map(|c| c.path.as_str()).collect();
    let mut commands: Vec<Vec<String>> = if host.is_host {
        old.pending.clone()
    } else {
        Vec::new()
    };
    // The files the initramfs carries (the command line too: systemd-boot's hook makes
    // the entries again after the rebuild).
    let in_image = [MODPROBE, APPLIED, FORCED, KERNEL_CMDLINE];
    let image_changed = in_image.iter().any(|f| touched.contains(f));
    if image_changed {
        commands.push(initramfs_command(host.generator));
    }
    let bl_now = bl.unwrap_or_else(|| host.boot.detect());
    match bl_now {
        // Copies kernels and initrds to every ESP and writes what each boots:
        // systemd-boot entries from /etc/kernel/cmdline, or grub.cfg.
        Bootloader::ProxmoxBootTool(_) if !touched.is_empty() => {
            commands.push(vec!["proxmox-boot-tool".into(), "refresh".into()]);
        }
        Bootloader::ProxmoxBootTool(_) => {}
        _ if touched.contains(GRUB_DROPIN) && host.grub_cfg.is_some() => {
            commands.push(vec!["update-grub".into()]);
        }
        Bootloader::SystemdBoot if image_changed && !kernel_install_runs_after(host) => {
            // dracut --regenerate-all (or a system without systemd-boot's initramfs
            // hook) leaves the loader entries and UKIs as they were: kernel-install
            // makes them again, from /etc/kernel/cmdline, for every installed kernel.
            for v in &host.kernel_images {
                let mut c = vec![
                    "kernel-install".to_string(),
                    "add".into(),
                    v.clone(),
                    format!("/boot/vmlinuz-{v}"),
                ];
                if host.initrds.contains(v) {
                    c.push(format!("/boot/initrd.img-{v}"));
                }
                commands.push(c);
            }
        }
        _ => {}
    }
    let mut unique: Vec<Vec<String>> = Vec::new();
    for c in commands {
        if !unique.contains(&c) {
            unique.push(c);
        }
    }
    unique
}

/// The whole files apply owns and whether each exists after the change.
fn final_files(host: &Host, ch: &Changes) -> anyhow::Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for path in [MODPROBE, APPLIED, FORCED, GRUB_DROPIN] {
        let exists = match ch.files.iter().find(|c| c.path == path) {
            Some(c) => c.new.is_some(),
            None => host.current(path)?.is_some(),
        };
        out.push((path.to_string(), exists));
    }
    Ok(out)
}

/// Parent directories of `rel` that do not exist yet, outermost first.
fn missing_parents(host: &Host, rel: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut p = Path::new(rel).parent();
    while let Some(dir) = p {
        let name = dir.to_string_lossy();
        if dir.as_os_str().is_empty() || host.existing_dirs.contains(name.as_ref()) {
            break;
        }
        out.push(name.into_owned());
        p = dir.parent();
    }
    out.reverse();
    out
}

/// Whether rebuilding the initramfs already runs kernel-install for each kernel:
/// update-initramfs with systemd-boot's post-update hook in place.
fn kernel_install_runs_after(host: &Host) -> bool {
    host.generator == Generator::InitramfsTools && host.boot.kernel_install_hook
}

/// The command that rebuilds every installed kernel's initramfs.
pub fn initramfs_command(generator: Generator) -> Vec<String> {
    match generator {
        Generator::InitramfsTools => vec![
            "update-initramfs".into(),
            "-u".into(),
            "-k".into(),
            "all".into(),
        ],
        Generator::Dracut => vec!["dracut".into(), "--regenerate-all".into(), "--force".into()],
    }
}

/// Writes the changes: intent manifest, files, final manifest. Runs no command.
pub fn commit(root: &Root, ch: &Changes, w: &mut dyn Writer) -> anyhow::Result<()> {
    commit_reporting(root, ch, w, &mut |_| Ok(()))
}

/// [`commit`], calling `done` after each file is in place (to say so only then).
pub fn commit_reporting(
    root: &Root,
    ch: &Changes,
    w: &mut dyn Writer,
    done: &mut dyn FnMut(&FileChange) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    // Leftovers of a crash (temporary files beside the owned ones) go first.
    for c in &ch.files {
        if let Some(dir) = Path::new(&c.path).parent() {
            let _ = root.clean_leftovers(dir);
        }
    }
    let old = &ch.old_manifest;
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
        write_state(root, &intent, w)
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
        done(c)?;
    }
    // 3. The final manifest, or none at all once nothing is owned.
    store_manifest(root, &ch.manifest, w)
}

/// Writes the manifest, or removes it (and the directories apply created, when empty)
/// once nothing is owned and nothing is pending.
fn store_manifest(root: &Root, m: &Manifest, w: &mut dyn Writer) -> anyhow::Result<()> {
    if m.owns_nothing() {
        w.remove(root, CMDLINE_TOKENS)?;
        w.remove(root, MANIFEST)?;
        for dir in m.dirs_created.iter().rev() {
            // Only empty directories go; anything the user put there stays.
            let _ = root.remove_dir(dir);
        }
    } else {
        write_state(root, m, w)?;
    }
    Ok(())
}

/// The manifest, and beside it the plain list of the tokens in `/etc/kernel/cmdline`
/// (for the package's purge, which reads no JSON). The manifest goes first: it records
/// the directories apply creates.
fn write_state(root: &Root, m: &Manifest, w: &mut dyn Writer) -> anyhow::Result<()> {
    w.write(root, MANIFEST, &m.to_json()?)?;
    if m.cmdline_added.is_empty() {
        w.remove(root, CMDLINE_TOKENS)?;
    } else {
        let lines: String = m.cmdline_added.iter().map(|t| format!("{t}\n")).collect();
        w.write(root, CMDLINE_TOKENS, &lines)?;
    }
    Ok(())
}

/// Runs the regeneration commands on the host, streaming their output; with another
/// root, only says what it would run. Clears `pending` in the manifest on success.
pub fn run_commands(root: &Root, ch: &Changes) -> anyhow::Result<()> {
    if ch.commands.is_empty() {
        return Ok(());
    }
    if !root.is_host() {
        for c in &ch.commands {
            crate::out!(
                "would run: {}   (the root is {}, not the host)\n",
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
        crate::out!("running: {}   (this can take a minute)\n", c.join(" "))?;
        let ran = crate::command::run(
            Command::new(prog).args(args),
            Duration::from_secs(1800),
            crate::command::Output::Stream,
        );
        if let Err(e) = ran {
            anyhow::bail!(
                "{e}; the files are in place and `{}` stays pending: fix the cause above \
                 and run `vfio-early apply` again",
                c.join(" ")
            );
        }
    }
    if let Some(m) = State::read(root).manifest()? {
        let mut m = m.clone();
        m.pending.clear();
        store_manifest(root, &m, &mut AtomicWriter)?;
    }
    Ok(())
}

/// `vfio-early apply`'s flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub dry_run: bool,
    pub force: bool,
    pub if_configured: bool,
}

/// `vfio-early apply`: the plan must pass its interlocks; then converge.
pub fn apply(ctx: &Context, opts: Options) -> anyhow::Result<Outcome> {
    if opts.if_configured && ctx.config.devices.is_empty() && ctx.host.state.manifest()?.is_none() {
        crate::out!("no device configured and nothing applied before: nothing to do\n")?;
        return Ok(Outcome::Ok);
    }
    crate::outcome::eprint(&crate::list::render_problems(&ctx.plan.problems));
    if ctx.plan.has_errors() {
        crate::errln!("vfio-early: nothing was written");
        return Ok(Outcome::Failed);
    }
    // A trial under way would undo this apply when it commits: refused until it ends.
    if let Some(why) = crate::trial::before_apply(&ctx.root, opts.dry_run, &mut AtomicWriter)? {
        crate::errln!("vfio-early: {why}");
        return Ok(Outcome::Failed);
    }
    let target = Target {
        forced: opts.force,
        config: &ctx.config,
        config_text: ctx.config_text.as_deref().unwrap_or(""),
        plan: &ctx.plan,
    };
    converge(
        &ctx.root,
        Some(&target),
        &ctx.machine,
        &ctx.host,
        opts.dry_run,
    )
}

/// `vfio-early undo`: apply towards the empty state. Needs no config (it may be the
/// thing that is broken).
pub fn undo(root: &Root, dry_run: bool) -> anyhow::Result<Outcome> {
    // A trial goes first (its entry, its one-shot choice, its state), then what apply
    // wrote.
    crate::trial::discard(
        root,
        "removed by `vfio-early undo`",
        dry_run,
        &mut AtomicWriter,
    )?;
    let machine = crate::machine::discover(root);
    let host = Host::read(root, machine.cmdline.as_deref());
    converge(root, None, &machine, &host, dry_run)
}

/// Shared by apply and undo: compute, show, write, regenerate. Each file is reported
/// once it is written or removed, never before.
fn converge(
    root: &Root,
    target: Option<&Target>,
    machine: &Machine,
    host: &Host,
    dry_run: bool,
) -> anyhow::Result<Outcome> {
    let ch = compute(target, machine, host)?;
    if dry_run {
        crate::out!("{}", render_summary(&ch, true))?;
        crate::out!("{}", render_diff(&ch))?;
        return Ok(Outcome::Ok);
    }
    crate::out!("{}", render_header(&ch))?;
    if ch.is_empty() {
        crate::out!("{NOTHING_CHANGED}")?;
        return Ok(Outcome::Ok);
    }
    commit_reporting(root, &ch, &mut AtomicWriter, &mut |c| {
        crate::out!("{} /{}\n", file_verb(c, false), c.path).map_err(Into::into)
    })?;
    run_commands(root, &ch)?;
    Ok(Outcome::Ok)
}

/// `vfio-early hook-files --kernel V`, for the initramfs hooks.
pub fn hook_files(root: &Root, version: &str) -> anyhow::Result<Outcome> {
    // Only the owned files matter here, not what booted.
    let host = Host::read(root, None);
    let km = KernelModules::read(root, version);
    let trial = crate::trial::hook_lines(root);
    crate::out!("{}", render_hook_files(&host, &km, &trial))?;
    Ok(Outcome::Ok)
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
    let mut out = render_header(ch);
    if ch.is_empty() {
        out.push_str(NOTHING_CHANGED);
        return out;
    }
    for c in &ch.files {
        let _ = writeln!(out, "{} /{}", file_verb(c, dry_run), c.path);
    }
    if dry_run {
        for c in &ch.commands {
            let _ = writeln!(out, "would run: {}", c.join(" "));
        }
    }
    out
}

const NOTHING_CHANGED: &str = "nothing changed: every file already matches; nothing rebuilt\n";

/// What apply decided, before any file line: bootloader, arguments, modules, softdeps.
fn render_header(ch: &Changes) -> String {
    let mut out = String::new();
    if let Some(b) = ch.bootloader {
        let _ = writeln!(out, "bootloader: {}", b.describe());
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
    out
}

fn file_verb(c: &FileChange, dry_run: bool) -> &'static str {
    match (&c.old, &c.new, dry_run) {
        (None, Some(_), false) => "wrote",
        (None, Some(_), true) => "would write",
        (Some(_), Some(_), false) => "updated",
        (Some(_), Some(_), true) => "would update",
        (_, None, false) => "removed",
        (_, None, true) => "would remove",
    }
}

/// The lines the initramfs hooks read: files to copy and modules to add for the
/// kernel `km` (read for that version), and `trial`'s lines while a trial may boot
/// ([`crate::trial::hook_lines`]). Empty when no device is configured and no trial is
/// prepared (the hooks then add nothing).
pub fn render_hook_files(host: &Host, km: &KernelModules, trial: &[String]) -> String {
    if !host.has(APPLIED) && trial.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    if host.has(APPLIED) {
        let _ = writeln!(out, "file /{APPLIED} /{}", paths::CONFIG);
        for f in [MODPROBE, FORCED] {
            if host.has(f) {
                let _ = writeln!(out, "file /{f} /{f}");
            }
        }
    }
    for line in trial {
        let _ = writeln!(out, "{line}");
    }
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
