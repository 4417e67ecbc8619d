//! `apply --trial` and `vfio-early trial status|commit|abort|verify`: boot a new
//! configuration once, keep it only if the booted host proves it, fall back by itself
//! otherwise.
//!
//! **Prepare** (`apply --trial`) renders the config and writes no file of the default
//! boot: the trial's state under `/var/lib/vfio-early/trial/` (the config being tried,
//! and `state.json`), and one boot entry that carries the trial's kernel arguments plus
//! `vfio_early.trial` and `panic=10`: a GRUB menu entry (an `/etc/grub.d` script, see
//! [`crate::grubmenu`]) armed with `grub-reboot`, or a boot-counted systemd-boot entry
//! (see [`crate::entries`]) armed with `bootctl set-oneshot`. The initramfs is rebuilt
//! so that it holds both configs (unless every image already holds them byte for byte,
//! a retry: [`images_hold_the_trial`]); the early binder takes the trial's only when the
//! command line says `vfio_early.trial` ([`crate::early`]). Where a one-shot boot cannot
//! be made safely (a grubenv GRUB cannot write, Proxmox's unmounted ESPs, unified kernel
//! images, no bootloader), the trial is refused with the reason and nothing is written.
//!
//! **Verify** (`vfio-early-verify.service`, every boot while a trial state exists) is a
//! pure decision ([`next_step`]) on the state, the command line and the boot id: in the
//! trial boot it runs `status`'s checks for the trial config ([`judge`] on
//! [`crate::status::evaluate`]'s report) and either commits (exactly what a plain
//! `apply` of the trial config writes, through [`crate::apply`]) or fails; in a later
//! boot without `vfio_early.trial` it knows the trial boot never got that far (a hang, a
//! panic, a reset) and fails it. A failed trial's entry is removed, so it cannot boot
//! again; the default boot was never changed.
//!
//! **Faults.** Every write goes through [`Writer`], intent first: the state file says
//! what is about to happen (`preparing`, `committing`, `failing`) before it happens, each
//! file is replaced atomically, and the next run of any trial command (or the unit at the
//! next boot) finishes what the state says. The default boot's files change only inside
//! the commit, which is a plain apply (its own manifest-first protocol).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::apply::{self, Target, Writer};
use crate::bootloader::Bootloader;
use crate::context::{ConfigNeed, Context, PlanMode};
use crate::entries::{self, Entry};
use crate::grubmenu;
use crate::host::{Generator, Runtime};
use crate::kargs::KernelToken;
use crate::kmsg::Log;
use crate::outcome::Outcome;
use crate::paths;
use crate::root::Root;
use crate::state::{self, Applied, Manifest};
use crate::status::{self, Report, Verdict};

/// On the trial entry's command line: the early binder takes the trial config.
pub const TRIAL_FLAG: &str = "vfio_early.trial";
/// On the trial entry's command line: a kernel panic (and initramfs-tools' "gave up
/// waiting for the root device") reboots after 10 s, into the default entry.
pub const PANIC_REBOOT: &str = "panic=10";
/// dracut's failures drop to a shell that waits forever; these make it reboot instead.
const DRACUT_REBOOT: &[&str] = &["rd.shell=0", "rd.emergency=reboot"];
/// Where efivarfs is mounted, as the mount table names it (never opened).
const EFIVARS_MOUNT: &[u8] = b"/sys/firmware/efi/efivars"; // root-ok
/// How long one regeneration command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(1800);

/// The trial's life: `preparing` → `prepared` → (the trial boot) `booted` →
/// `committing` → `committed`, or → `failing` → `failed`. The `-ing` phases are intents:
/// found by a later run, they are finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Preparing,
    Prepared,
    Booted,
    Committing,
    Committed,
    Failing,
    Failed,
}

impl Phase {
    /// The trial entry is armed or may be: the initramfs carries the trial config.
    pub fn is_open(self) -> bool {
        matches!(self, Phase::Preparing | Phase::Prepared | Phase::Booted)
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Prepared => "prepared",
            Phase::Booted => "booted",
            Phase::Committing => "committing",
            Phase::Committed => "committed",
            Phase::Failing => "failing",
            Phase::Failed => "failed",
        }
    }
}

/// How the trial boot is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// A menu entry from `/etc/grub.d`, and `grub-reboot` (grubenv's `next_entry`).
    Grub,
    /// A boot-counted Type #1 entry, and `bootctl set-oneshot` (`LoaderEntryOneShot`).
    SystemdBoot,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Grub => "grub",
            Method::SystemdBoot => "systemd-boot",
        }
    }
}

/// `/var/lib/vfio-early/trial/state.json`. Stable JSON: fields added, never renamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub schema: u32,
    pub phase: Phase,
    /// Why it failed, or how it was committed.
    pub reason: Option<String>,
    /// When the phase began, in seconds since 1970 (UTC).
    pub time: u64,
    pub bootloader: Method,
    /// `apply --trial --force`: the commit is `apply --force`.
    pub forced: bool,
    /// The trial config's kernel arguments: what the commit writes.
    pub kernel_args: Vec<String>,
    /// What the trial entry adds to the default entry's command line.
    pub entry_args: Vec<String>,
    /// The committed arguments the trial entry leaves out.
    pub entry_removes: Vec<String>,
    /// The boot entry files the trial owns (the GRUB script, or the ESP entry).
    pub entries: Vec<String>,
    /// Directories the trial created; removed with it when empty.
    pub dirs_created: Vec<String>,
    /// The boot in which it was prepared (`/proc/sys/kernel/random/boot_id`).
    pub prepared_boot: Option<String>,
    /// The trial boot, once verification began there.
    pub booted_boot: Option<String>,
}

impl State {
    pub fn to_json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }

    fn at(&self, phase: Phase, reason: Option<String>, now: u64) -> State {
        State {
            phase,
            reason,
            time: now,
            ..self.clone()
        }
    }
}

/// The trial's state as on disk: `None` when there is none; an error (with its fix)
/// when the file is damaged.
pub fn read_state(root: &Root) -> Result<Option<State>, String> {
    match root.read_to_string(paths::TRIAL_STATE) {
        Ok(text) => {
            let s: State = serde_json::from_str(&text).map_err(|e| {
                format!(
                    "{}: the trial state is damaged ({e}); `vfio-early trial abort` removes \
                     the trial",
                    root.path(paths::TRIAL_STATE).display()
                )
            })?;
            for p in s.entries.iter().chain(&s.dirs_created) {
                Root::checked_rel(p)
                    .map_err(|e| format!("{}: {e}", root.path(paths::TRIAL_STATE).display()))?;
            }
            Ok(Some(s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "reading {}: {e}",
            root.path(paths::TRIAL_STATE).display()
        )),
    }
}

/// Everything the trial decisions look at, read once.
#[derive(Debug, Clone)]
pub struct Facts {
    pub state: Result<Option<State>, String>,
    /// The trial config's text (`var/lib/vfio-early/trial/config.toml`).
    pub config_text: Option<String>,
    pub cmdline: Vec<u8>,
    pub boot_id: Option<String>,
    pub grubenv: Option<String>,
    /// Whether GRUB can write its grubenv: `Ok(what holds it)` or `Err(why not)`.
    pub grub_store: Result<String, String>,
    pub grub_reboot: bool,
    pub grub_linux: bool,
    /// The kernel-install config that says `layout=uki`, if one does.
    pub uki: Option<String>,
    pub bootctl: bool,
    /// Whether EFI variables can be written: `Err(why not)`.
    pub efivars: Result<(), String>,
    /// `LoaderEntryOneShot` now.
    pub oneshot: Option<String>,
    /// Every Type #1 entry under the ESP mounts.
    pub entries: Vec<Entry>,
    /// Which of the directories a trial may create exist already.
    pub existing_dirs: BTreeSet<String>,
}

/// Directories a trial may create, outermost first.
const TRIAL_DIRS: &[&str] = &["var", "var/lib", "var/lib/vfio-early", paths::TRIAL_DIR];

impl Facts {
    pub fn read(root: &Root) -> Facts {
        let mut entries = Vec::new();
        for esp in paths::ESP_MOUNTS {
            let dir = format!("{esp}/{}", paths::LOADER_ENTRIES);
            for name in root.read_dir_names(&dir).unwrap_or_default() {
                if !name.ends_with(".conf") {
                    continue;
                }
                let rel = format!("{dir}/{name}");
                if let Ok(text) = root.read_to_string(&rel) {
                    entries.push(Entry::parse(&dir, &name, &text));
                }
            }
        }
        Facts {
            state: read_state(root),
            config_text: root.read_to_string(paths::TRIAL_CONFIG).ok(),
            cmdline: root
                .read_bytes(paths::PROC_CMDLINE, 64 * 1024)
                .unwrap_or_default(),
            boot_id: root
                .read_attr(paths::BOOT_ID)
                .ok()
                .filter(|s| !s.is_empty()),
            grubenv: root.read_to_string(paths::GRUBENV).ok(),
            grub_store: grub_store(root),
            grub_reboot: root.exists(paths::GRUB_REBOOT),
            grub_linux: root.exists(paths::GRUB_LINUX_SCRIPT),
            uki: paths::KERNEL_INSTALL_CONF
                .iter()
                .find(|p| root.read_to_string(p).is_ok_and(|t| layout_is_uki(&t)))
                .map(|p| format!("/{p}")),
            bootctl: paths::BOOTCTL.iter().any(|p| root.exists(p)),
            efivars: efivars_writable(root),
            oneshot: root
                .read_bytes(paths::EFIVAR_ONESHOT, 4096)
                .ok()
                .and_then(|b| efivar_string(&b)),
            entries,
            existing_dirs: TRIAL_DIRS
                .iter()
                .filter(|d| root.is_dir(d))
                .map(|d| d.to_string())
                .collect(),
        }
    }

    /// Booted with `vfio_early.trial`.
    pub fn trial_boot(&self) -> bool {
        crate::early::trial_flag(&self.cmdline)
    }
}

/// `layout=uki` in a kernel-install config (the last assignment wins).
fn layout_is_uki(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("layout="))
        .next_back()
        .is_some_and(|v| v.trim().trim_matches('"') == "uki")
}

/// An efivarfs file: 4 bytes of attributes, then UTF-16LE text ending in NUL.
fn efivar_string(bytes: &[u8]) -> Option<String> {
    let units: Vec<u16> = bytes
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

/// Whether GRUB can write the grubenv under `/boot/grub`: the filesystem that holds it
/// must be on a plain block device (no LVM, dm-crypt, md RAID or other stacked device:
/// GRUB writes none of them) and not btrfs or ZFS, as Debian's `00_header` judges
/// for recordfail. What cannot be told is a no.
fn grub_store(root: &Root) -> Result<String, String> {
    let bytes = root
        .read_bytes(paths::PROC_MOUNTINFO, 16 << 20)
        .map_err(|e| format!("cannot read the mount table ({e})"))?;
    let mounts = crate::sysdisk::parse_mountinfo(&bytes).mounts;
    let holder = ["/boot/grub", "/boot", "/"]
        .iter()
        .find_map(|p| {
            mounts
                .iter()
                .rfind(|m| m.mount_point == p.as_bytes() && m.fstype != "autofs")
        })
        .ok_or("/ is not in the mount table (a chroot?)")?;
    let point = String::from_utf8_lossy(&holder.mount_point).into_owned();
    let fs = holder.fstype.as_str();
    if matches!(fs, "btrfs" | "zfs") {
        return Err(format!("{point} is on {fs}"));
    }
    let Some((major, minor)) = holder.dev.filter(|(major, _)| *major != 0) else {
        return Err(format!(
            "{point} ({fs}) is not on a block device GRUB can write"
        ));
    };
    let link = format!("{}/{major}:{minor}", paths::SYS_DEV_BLOCK);
    let target = root
        .read_link(&link)
        .map_err(|e| format!("{point}: cannot find its block device {major}:{minor} ({e})"))?;
    let dir = crate::sysdisk::normalize(&Path::new(paths::SYS_DEV_BLOCK).join(target));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let under = |sub: &str| root.exists(dir.join(sub));
    if under("dm") {
        let what = match root.read_attr(dir.join("dm/uuid")) {
            Ok(u) if u.starts_with("LVM-") => "LVM",
            Ok(u) if u.starts_with("CRYPT-") => "dm-crypt",
            _ => "device-mapper",
        };
        let dm_name = root.read_attr(dir.join("dm/name")).unwrap_or_default();
        return Err(format!("{point} is on {what} ({name} {dm_name})"));
    }
    if under("md")
        || (under("partition") && dir.parent().is_some_and(|p| root.exists(p.join("md"))))
    {
        return Err(format!("{point} is on md RAID ({name})"));
    }
    if !root
        .read_dir_names(dir.join("slaves"))
        .unwrap_or_default()
        .is_empty()
    {
        return Err(format!("{point} is on a stacked block device ({name})"));
    }
    Ok(format!("{point} ({fs} on {name})"))
}

/// efivarfs mounted read-write, from the mount table (fields: id parent dev root point
/// options ...).
fn efivars_writable(root: &Root) -> Result<(), String> {
    let bytes = root
        .read_bytes(paths::PROC_MOUNTINFO, 16 << 20)
        .map_err(|e| format!("cannot read the mount table ({e})"))?;
    let line = bytes
        .split(|b| *b == b'\n')
        .rfind(|l| l.split(|b| *b == b' ').nth(4) == Some(EFIVARS_MOUNT))
        .ok_or("efivarfs is not mounted (not booted with UEFI?)")?;
    let options = line.split(|b| *b == b' ').nth(5).unwrap_or_default();
    if options.split(|b| *b == b',').any(|o| o == b"rw") {
        Ok(())
    } else {
        Err("efivarfs is mounted read-only".into())
    }
}

/// Seconds since 1970 now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A time as `2025-01-31 23:59:59 UTC`.
pub fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---- deciding ----

/// Why a trial cannot be prepared, and the exit status to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub outcome: Outcome,
}

fn refuse(message: String) -> Refusal {
    Refusal {
        message,
        outcome: Outcome::Failed,
    }
}

const CONSOLE_FIX: &str = "fix: apply with `vfio-early apply` while you can reach the \
                           console (or IPMI / KVM-over-IP), so a boot that goes wrong can \
                           be picked up there";

/// How the trial boot will be chosen, or why it cannot be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Way {
    Grub,
    /// The default entry to copy.
    SystemdBoot(Entry),
}

/// Which way the trial boot can be made on this host (pure).
pub fn choose_way(bootloader: Bootloader, f: &Facts) -> Result<Way, Refusal> {
    match bootloader {
        Bootloader::Grub => {
            if let Err(why) = &f.grub_store {
                return Err(refuse(format!(
                    "{why}: GRUB cannot write its environment block (grubenv) there, so \
                     the one-shot `next_entry` of a trial would never be cleared and the \
                     trial would boot again and again (Debian's 00_header turns recordfail \
                     off for the same reason); --trial is refused and nothing was \
                     written\n{CONSOLE_FIX}"
                )));
            }
            if !f.grub_reboot {
                return Err(refuse(format!(
                    "/{} is missing, so no entry can be chosen for one boot; --trial is \
                     refused and nothing was written\nfix: install grub2-common, or {}",
                    paths::GRUB_REBOOT,
                    &CONSOLE_FIX[5..]
                )));
            }
            if !f.grub_linux {
                return Err(refuse(format!(
                    "/{} is missing: the trial entry is made from its first entry; --trial \
                     is refused and nothing was written\nfix: reinstall grub-common",
                    paths::GRUB_LINUX_SCRIPT
                )));
            }
            Ok(Way::Grub)
        }
        Bootloader::SystemdBoot => {
            if let Some(conf) = &f.uki {
                return Err(refuse(format!(
                    "{conf} says layout=uki: each kernel is a unified image that carries \
                     its command line inside (signed, under Secure Boot), so a trial needs \
                     an image or add-on of its own, which vfio-early does not build yet; \
                     --trial is refused and nothing was written\n{CONSOLE_FIX}"
                )));
            }
            if !f.bootctl {
                return Err(refuse(format!(
                    "bootctl is missing, so the trial entry cannot be chosen for one boot; \
                     --trial is refused and nothing was written\nfix: install \
                     systemd-boot-tools (or systemd-boot), or {}",
                    &CONSOLE_FIX[5..]
                )));
            }
            if let Err(why) = &f.efivars {
                return Err(refuse(format!(
                    "{why}: LoaderEntryOneShot cannot be set, and without it the trial \
                     entry would not be chosen; --trial is refused and nothing was \
                     written\n{CONSOLE_FIX}"
                )));
            }
            let Some(default) = entries::default_entry(&f.entries) else {
                return Err(refuse(format!(
                    "no boot entry in loader/entries on {} (Type #1, with `linux`) to copy \
                     for the trial; --trial is refused and nothing was written\n{CONSOLE_FIX}",
                    paths::ESP_MOUNTS
                        .iter()
                        .map(|e| format!("/{e}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            Ok(Way::SystemdBoot(default.clone()))
        }
        Bootloader::ProxmoxBootTool(_) => Err(refuse(format!(
            "proxmox-boot-tool keeps its ESPs unmounted and rewrites them on `refresh`; \
             vfio-early cannot yet place a trial entry on every one of them, so --trial is \
             refused and nothing was written\n{CONSOLE_FIX}"
        ))),
        Bootloader::None => Err(refuse(format!(
            "no bootloader vfio-early can drive (GRUB or systemd-boot) was found, so no \
             configuration can be booted just once; --trial is refused and nothing was \
             written\nfix: if detection is wrong, set [bootloader] kind in the config; \
             otherwise {}",
            &CONSOLE_FIX[5..]
        ))),
    }
}

/// `apply --trial`'s flags.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub dry_run: bool,
    pub force: bool,
    /// Extra kernel arguments for the trial entry only (tests: an invalid `root=`).
    pub extra_args: Vec<String>,
}

/// One file the trial writes (`Some`) or removes (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWrite {
    pub path: String,
    pub text: Option<String>,
    pub executable: bool,
}

/// Everything `apply --trial` would do.
#[derive(Debug, Clone)]
pub struct Preparation {
    pub intent: State,
    pub ready: State,
    pub writes: Vec<FileWrite>,
    /// Regeneration: the initramfs (both configs), grub.cfg (the entry).
    pub commands: Vec<Vec<String>>,
    /// Chooses the trial entry for the next boot only; run last.
    pub arm: Vec<String>,
    /// Whether the initramfs is rebuilt, and why (see [`images_hold_the_trial`]).
    pub initramfs: String,
}

/// What `apply --trial` would write and run (pure), or why it refuses.
pub fn compute_prepare(
    ctx: &Context,
    f: &Facts,
    opts: &Options,
    now: u64,
) -> Result<Preparation, Refusal> {
    let manifest = check_can_prepare(ctx, f, opts)?;
    let text = ctx.config_text.clone().unwrap_or_default();
    let bl = ctx.host.boot.resolve(ctx.config.bootloader.kind);
    let way = choose_way(bl, f)?;
    let kernel_args: Vec<String> = ctx
        .plan
        .kernel_args
        .iter()
        .map(|a| a.token.clone())
        .collect();
    let entry_args = trial_entry_args(ctx, opts, &kernel_args)?;
    let mut writes = vec![
        FileWrite {
            path: paths::TRIAL_CONFIG.into(),
            text: Some(text),
            executable: false,
        },
        FileWrite {
            path: paths::TRIAL_FORCED.into(),
            text: opts.force.then(|| TRIAL_FORCED_TEXT.to_string()),
            executable: false,
        },
    ];
    let mut commands = vec![apply::initramfs_command(ctx.host.generator)];
    let (method, entry_removes, entry_paths, arm) =
        boot_entry(&way, f, &manifest, &entry_args, &mut writes, &mut commands);
    let dirs_created = trial_dirs(f);
    let intent = State {
        schema: 1,
        phase: Phase::Preparing,
        reason: None,
        time: now,
        bootloader: method,
        forced: opts.force,
        kernel_args,
        entry_args,
        entry_removes,
        entries: entry_paths,
        dirs_created,
        prepared_boot: f.boot_id.clone(),
        booted_boot: None,
    };
    let ready = intent.at(Phase::Prepared, None, now);
    Ok(Preparation {
        intent,
        ready,
        writes,
        commands,
        arm,
        initramfs: "rebuilt".into(),
    })
}

/// A trial can be prepared: no other under way, nothing pending, devices configured, a
/// config other than the one applied. Returns the manifest of the last apply.
fn check_can_prepare(ctx: &Context, f: &Facts, opts: &Options) -> Result<Manifest, Refusal> {
    match &f.state {
        Err(e) => return Err(refuse(e.clone())),
        Ok(Some(s)) if !matches!(s.phase, Phase::Preparing | Phase::Committed | Phase::Failed) => {
            return Err(refuse(format!(
                "a trial is already under way ({} since {}); --trial wrote nothing\nfix: \
                 reboot to try it and let it finish, or cancel it with `vfio-early trial \
                 abort`, then run `vfio-early apply --trial` again",
                s.phase.name(),
                utc(s.time)
            )))
        }
        Ok(_) => {}
    }
    let manifest = ctx
        .host
        .state
        .manifest()
        .map_err(|e| refuse(e.to_string()))?
        .cloned()
        .unwrap_or_default();
    if !manifest.pending.is_empty() {
        return Err(refuse(format!(
            "an earlier apply did not finish (`{}` is pending); --trial wrote nothing\nfix: \
             run `vfio-early apply` to finish it first",
            manifest.pending[0].join(" ")
        )));
    }
    if ctx.config.devices.is_empty() {
        return Err(refuse(
            "the config takes no device, so there is nothing to try; --trial wrote \
             nothing\nfix: add [[device]] entries; `vfio-early undo` removes an applied \
             configuration"
                .into(),
        ));
    }
    let text = ctx.config_text.clone().unwrap_or_default();
    if let Some(a) = &ctx.host.state.applied {
        if a.is_of(&text) && a.forced == opts.force {
            return Err(Refusal {
                message: "this config is the one already applied: there is nothing to try".into(),
                outcome: Outcome::Ok,
            });
        }
    }
    Ok(manifest)
}

/// The trial entry's arguments: the plan's, `--trial-arg`s, the trial flag, reboot on
/// panic (and dracut's own reboot instead of a rescue shell).
fn trial_entry_args(
    ctx: &Context,
    opts: &Options,
    kernel_args: &[String],
) -> Result<Vec<String>, Refusal> {
    let mut extras = Vec::new();
    for a in &opts.extra_args {
        let t: KernelToken = a
            .parse()
            .map_err(|e| refuse(format!("--trial-arg `{a}`: {e}")))?;
        extras.push(t.to_string());
    }
    let mut entry_args = kernel_args.to_vec();
    entry_args.extend(extras);
    entry_args.push(TRIAL_FLAG.into());
    entry_args.push(PANIC_REBOOT.into());
    if ctx.host.generator == Generator::Dracut {
        entry_args.extend(DRACUT_REBOOT.iter().map(|s| s.to_string()));
    }
    Ok(entry_args)
}

/// The boot entry of the trial, per way: the writes and commands that make it, and the
/// method, the tokens it drops, its paths and the command that arms it.
fn boot_entry(
    way: &Way,
    f: &Facts,
    manifest: &Manifest,
    entry_args: &[String],
    writes: &mut Vec<FileWrite>,
    commands: &mut Vec<Vec<String>>,
) -> (Method, Vec<String>, Vec<String>, Vec<String>) {
    match way {
        Way::Grub => {
            writes.push(FileWrite {
                path: paths::GRUB_TRIAL_SCRIPT.into(),
                text: Some(grubmenu::render_script()),
                executable: true,
            });
            commands.push(vec!["update-grub".into()]);
            (
                Method::Grub,
                manifest.kernel_args.clone(),
                vec![paths::GRUB_TRIAL_SCRIPT.to_string()],
                vec!["grub-reboot".into(), grubmenu::ENTRY_ID.into()],
            )
        }
        Way::SystemdBoot(default) => {
            // Leftovers of an earlier trial go first: one trial entry at a time.
            for e in f.entries.iter().filter(|e| entries::is_trial_file(&e.file)) {
                writes.push(FileWrite {
                    path: e.path(),
                    text: None,
                    executable: false,
                });
            }
            let removes = manifest.cmdline_added.clone();
            let path = format!("{}/{}", default.dir, entries::TRIAL_FILE);
            writes.push(FileWrite {
                path: path.clone(),
                text: Some(entries::render_trial(default, &removes, entry_args)),
                executable: false,
            });
            (
                Method::SystemdBoot,
                removes,
                vec![path],
                vec![
                    "bootctl".into(),
                    "set-oneshot".into(),
                    entries::TRIAL_ID.into(),
                ],
            )
        }
    }
}

/// The trial's directories that it creates (an earlier trial's stay its own).
fn trial_dirs(f: &Facts) -> Vec<String> {
    // An earlier trial's directories stay ours: they exist now only because of it.
    let mut dirs_created: Vec<String> = match &f.state {
        Ok(Some(old)) => old.dirs_created.clone(),
        _ => Vec::new(),
    };
    for d in TRIAL_DIRS.iter().filter(|d| !f.existing_dirs.contains(**d)) {
        if !dirs_created.iter().any(|x| x == d) {
            dirs_created.push(d.to_string());
        }
    }
    dirs_created
}

/// The text of the trial's `--force` marker.
pub const TRIAL_FORCED_TEXT: &str = "# `vfio-early apply --trial --force`: the early \
binder overrides interlocks in the trial boot.\n";

/// What a run of `vfio-early trial verify` does, from the state, whether this is the
/// trial boot, and which boot this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do, and why.
    Nothing(String),
    /// The trial boot: check and commit, or fail.
    Verify,
    /// A commit was interrupted: finish it.
    FinishCommit,
    /// Fail the trial (remove its entry) for this reason.
    Fail(String),
    /// A failure's clean-up was interrupted: finish it.
    FinishFailure,
    /// Remove entry files a finished trial left (a blessed systemd-boot entry).
    RemoveLeftovers,
}

/// The decision of `trial verify` (pure).
pub fn next_step(state: &State, trial_boot: bool, boot_id: Option<&str>, leftovers: bool) -> Step {
    let same_boot = state.prepared_boot.as_deref() == boot_id;
    match state.phase {
        Phase::Preparing | Phase::Prepared | Phase::Booted if trial_boot => Step::Verify,
        Phase::Prepared if same_boot => Step::Nothing("the trial boots at the next reboot".into()),
        Phase::Preparing if same_boot => Step::Nothing(
            "`vfio-early apply --trial` has not finished; run it again or `vfio-early \
             trial abort`"
                .into(),
        ),
        Phase::Prepared => Step::Fail(
            "the trial boot did not reach verification (it hung, panicked, lost its root \
             disk, or was reset)"
                .into(),
        ),
        Phase::Booted => Step::Fail(
            "verification did not finish in the trial boot (it timed out, or the trial \
             boot was reset)"
                .into(),
        ),
        Phase::Preparing => Step::Fail(
            "`vfio-early apply --trial` was interrupted, or its trial boot did not reach \
             verification"
                .into(),
        ),
        Phase::Committing => Step::FinishCommit,
        Phase::Failing => Step::FinishFailure,
        Phase::Committed | Phase::Failed if leftovers => Step::RemoveLeftovers,
        Phase::Committed | Phase::Failed if trial_boot => Step::Nothing(format!(
            "booted with {TRIAL_FLAG}, but the trial is already {}",
            state.phase.name()
        )),
        Phase::Committed | Phase::Failed => {
            Step::Nothing(format!("the trial is {}", state.phase.name()))
        }
    }
}

/// The checks of `status` that prove a trial boot: the IOMMU, interrupt remapping, the
/// trial's arguments on the command line, the vfio modules, every device on vfio-pci
/// with its node, whole IOMMU groups, no boot framebuffer on a taken GPU. The others
/// speak of the committed configuration (`applied`, `bootloader`, `initramfs`) and do
/// not count, nor do checks added later until named here.
const PROVING_CHECKS: &[&str] = &[
    "iommu",
    "interrupt-remapping",
    "cmdline",
    "vfio-modules",
    "device",
    "iommu-group",
    "framebuffer",
];

/// The report with only the [`PROVING_CHECKS`], judged as a trial is ([`judge`]): a
/// configured device that is absent, which `status` only warns of, fails a trial, so
/// the table the verification prints ends in the same verdict as the trial.
pub fn proving(report: &Report) -> Report {
    let checks: Vec<_> = report
        .checks
        .iter()
        .filter(|c| PROVING_CHECKS.contains(&c.id))
        .cloned()
        .map(|mut c| {
            if c.id == "device" && c.verdict == Verdict::Warn {
                c.verdict = Verdict::Fail;
            }
            c
        })
        .collect();
    Report {
        schema: report.schema,
        verdict: checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Pass),
        checks,
    }
}

/// Whether a trial boot's `status` report proves the trial (pure): no proving check
/// fails, and no configured device is absent (a trial must show every device on
/// vfio-pci, where `status` only warns). `Ok` says what passed, `Err` why it failed.
pub fn judge(report: &Report) -> Result<String, String> {
    let counted: Vec<_> = report
        .checks
        .iter()
        .filter(|c| PROVING_CHECKS.contains(&c.id))
        .collect();
    let bad: Vec<String> = counted
        .iter()
        .filter(|c| c.verdict == Verdict::Fail || (c.id == "device" && c.verdict == Verdict::Warn))
        .map(|c| format!("{}: {}", c.id, c.summary))
        .collect();
    if bad.is_empty() {
        Ok(format!(
            "verified in the trial boot: {} check(s) pass",
            counted.len()
        ))
    } else {
        Err(bad.join("; "))
    }
}

/// The `trial` line of `status`: verdict, summary, fix.
pub fn status_line(state: &State) -> (Verdict, String, Option<&'static str>) {
    let when = utc(state.time);
    let reason = state.reason.clone().unwrap_or_default();
    match state.phase {
        Phase::Preparing => (
            Verdict::Warn,
            format!("trial being prepared since {when}: `vfio-early apply --trial` did not finish"),
            Some("run `vfio-early apply --trial` again, or `vfio-early trial abort`"),
        ),
        Phase::Prepared => (
            Verdict::Warn,
            format!(
                "trial prepared at {when}: the next boot (only that one) uses it, through {}",
                state.bootloader.name()
            ),
            Some("reboot to try it; `vfio-early trial abort` cancels it"),
        ),
        Phase::Booted => (
            Verdict::Warn,
            format!("trial booted at {when}: vfio-early-verify.service is checking it"),
            Some("wait for vfio-early-verify.service (`systemctl status vfio-early-verify`)"),
        ),
        Phase::Committing => (
            Verdict::Warn,
            format!("trial being committed since {when} (interrupted?)"),
            Some("run `vfio-early trial commit` to finish it"),
        ),
        Phase::Committed => (
            Verdict::Pass,
            format!("trial committed at {when}: its configuration is the default ({reason})"),
            None,
        ),
        Phase::Failing | Phase::Failed => (
            Verdict::Warn,
            format!("trial failed: {reason}; the previous configuration boots next"),
            Some(
                "fix the cause, then `vfio-early apply --trial` again; `vfio-early trial \
                 abort` clears this",
            ),
        ),
    }
}

// ---- doing ----

fn write_state(root: &Root, s: &State, w: &mut dyn Writer) -> anyhow::Result<()> {
    w.write(root, paths::TRIAL_STATE, &s.to_json()?)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", root.path(paths::TRIAL_STATE).display()))
}

fn apply_write(root: &Root, f: &FileWrite, w: &mut dyn Writer) -> anyhow::Result<()> {
    let r = match (&f.text, f.executable) {
        (Some(t), true) => w.write_executable(root, &f.path, t),
        (Some(t), false) => w.write(root, &f.path, t),
        (None, _) => w.remove(root, &f.path),
    };
    r.map_err(|e| anyhow::anyhow!("{}: {e}", root.path(&f.path).display()))
}

/// Runs commands on the host (each time-limited, output shown); with another root,
/// says what it would run.
fn run_commands(root: &Root, commands: &[Vec<String>]) -> anyhow::Result<()> {
    for c in commands {
        let Some((prog, args)) = c.split_first() else {
            continue;
        };
        if !root.is_host() {
            crate::out!(
                "would run: {}   (the root is {}, not the host)\n",
                shown_command(c),
                root.dir().display()
            )?;
            continue;
        }
        crate::out!("running: {}\n", shown_command(c))?;
        crate::command::run(
            Command::new(prog).args(args),
            COMMAND_LIMIT,
            crate::command::Output::Stream,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

fn shown_command(c: &[String]) -> String {
    c.iter()
        .map(|a| {
            if a.is_empty() {
                "''".to_string()
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `vfio-early apply --trial`.
pub fn prepare(ctx: &Context, opts: &Options, w: &mut dyn Writer) -> anyhow::Result<Outcome> {
    crate::outcome::eprint(&crate::list::render_problems(&ctx.plan.problems));
    if ctx.plan.has_errors() {
        crate::errln!("vfio-early: nothing was written");
        return Ok(Outcome::Failed);
    }
    let facts = Facts::read(&ctx.root);
    let mut p = match compute_prepare(ctx, &facts, opts, now()) {
        Ok(p) => p,
        Err(r) => {
            match r.outcome {
                Outcome::Ok => crate::out!("{}\n", r.message)?,
                _ => crate::errln!("vfio-early: {}", r.message),
            }
            return Ok(r.outcome);
        }
    };
    let text = ctx.config_text.clone().unwrap_or_default();
    let default = entries::default_entry(&facts.entries)
        .filter(|_| p.ready.bootloader == Method::SystemdBoot);
    match images_hold_the_trial(ctx, default, &text, opts.force) {
        Ok(n) => {
            let rebuild = apply::initramfs_command(ctx.host.generator);
            p.commands.retain(|c| *c != rebuild);
            p.initramfs =
                format!("kept: its {n} image(s) already hold this trial's files, byte for byte");
        }
        Err(why) => p.initramfs = format!("rebuilt ({why})"),
    }
    crate::out!("{}", render_preparation(&p, opts.dry_run))?;
    if opts.dry_run {
        return Ok(Outcome::Ok);
    }
    let root = &ctx.root;
    for dir in [paths::TRIAL_DIR, "etc/grub.d"] {
        let _ = root.clean_leftovers(dir);
    }
    let not_armed = "the trial is not armed and the default boot is unchanged";
    let unfinished = |e: anyhow::Error| {
        anyhow::anyhow!(
            "{e}; nothing is half-written and {not_armed}
fix: run `vfio-early apply              --trial` again, or remove the trial with `vfio-early trial abort`"
        )
    };
    write_state(root, &p.intent, w).map_err(unfinished)?;
    for f in &p.writes {
        apply_write(root, f, w).map_err(unfinished)?;
    }
    if let Err(e) = run_commands(root, &p.commands) {
        anyhow::bail!(
            "{e}; {not_armed}\nfix: fix the cause above and run `vfio-early apply --trial` \
             again, or remove the trial with `vfio-early trial abort`"
        );
    }
    if root.is_host() && p.ready.bootloader == Method::Grub {
        let cfg = root.read_to_string(paths::GRUB_CFG).unwrap_or_default();
        if !grubmenu::has_trial_entry(&cfg) {
            anyhow::bail!(
                "update-grub wrote no `{}` entry into /{} (see its output above); \
                 {not_armed}\nfix: `vfio-early trial abort` removes the trial",
                grubmenu::ENTRY_ID,
                paths::GRUB_CFG
            );
        }
    }
    if let Err(e) = run_commands(root, std::slice::from_ref(&p.arm)) {
        anyhow::bail!("{e}; {not_armed}\nfix: `vfio-early trial abort` removes the trial");
    }
    write_state(root, &p.ready, w).map_err(|e| {
        anyhow::anyhow!(
            "{e}; the trial is armed: the next boot tries it (the state says `preparing`,              which the trial boot accepts)"
        )
    })?;
    crate::out!(
        "trial prepared: the next boot, and only that one, uses the new configuration; \
         vfio-early-verify.service checks it there and keeps it, or the boot after falls \
         back to the current one by itself\nnext: reboot; then `vfio-early trial status`\n"
    )?;
    Ok(Outcome::Ok)
}

fn render_preparation(p: &Preparation, dry_run: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "trial through: {}", p.ready.bootloader.name());
    let _ = writeln!(
        out,
        "kernel arguments of the trial: {}",
        p.ready.kernel_args.join(" ")
    );
    let _ = writeln!(
        out,
        "the trial entry drops: {}",
        if p.ready.entry_removes.is_empty() {
            "nothing".to_string()
        } else {
            p.ready.entry_removes.join(" ")
        }
    );
    let _ = writeln!(
        out,
        "the trial entry adds: {}",
        p.ready.entry_args.join(" ")
    );
    let _ = writeln!(out, "initramfs: {}", p.initramfs);
    if dry_run {
        for f in &p.writes {
            match &f.text {
                Some(t) => {
                    let _ = writeln!(out, "would write /{}:", f.path);
                    for l in t.lines() {
                        let _ = writeln!(out, "  {l}");
                    }
                }
                None => {
                    let _ = writeln!(out, "would remove /{}", f.path);
                }
            }
        }
        for c in p.commands.iter().chain(std::iter::once(&p.arm)) {
            let _ = writeln!(out, "would run: {}", shown_command(c));
        }
    }
    out
}

/// `vfio-early trial verify`: run by vfio-early-verify.service at every boot while a
/// trial state exists. Exit 1 only in a trial boot that failed (so boot-complete.target
/// fails with it); 0 in every other boot, whatever happens.
pub fn verify(root: &Root, w: &mut dyn Writer) -> anyhow::Result<Outcome> {
    let facts = Facts::read(root);
    let mut log = Log::kmsg(root);
    let trial_boot = facts.trial_boot();
    match verify_steps(root, &facts, w, &mut log) {
        Ok(outcome) => Ok(outcome),
        // Never fail an ordinary boot's boot-complete.target (with systemd-boot's
        // counting, that would count its default entry down): log, exit 0. In the trial
        // boot the error is the failure.
        Err(e) if !trial_boot => {
            log.error(&format!("trial: {e:#}"));
            Ok(Outcome::Ok)
        }
        Err(e) => Err(e),
    }
}

fn verify_steps(
    root: &Root,
    facts: &Facts,
    w: &mut dyn Writer,
    log: &mut Log,
) -> anyhow::Result<Outcome> {
    let trial_boot = facts.trial_boot();
    let state = match &facts.state {
        Ok(Some(s)) => s.clone(),
        Ok(None) => {
            if trial_boot {
                log.warn(&format!(
                    "booted with {TRIAL_FLAG}, but no trial is prepared"
                ));
            }
            return Ok(Outcome::Ok);
        }
        Err(e) => {
            log.error(e);
            return Ok(Outcome::failed_if(trial_boot));
        }
    };
    let leftovers = !existing_entries(root, &state, facts).is_empty();
    match next_step(&state, trial_boot, facts.boot_id.as_deref(), leftovers) {
        Step::Nothing(why) => {
            crate::out!("vfio-early trial: nothing to do: {why}\n")?;
            Ok(Outcome::Ok)
        }
        Step::Verify => verify_here(root, facts, &state, w, log),
        Step::FinishCommit => {
            let reason = state.reason.clone().unwrap_or_default();
            finish_commit(root, facts, &state, reason, w, log)?;
            Ok(Outcome::Ok)
        }
        Step::Fail(reason) => {
            fail(root, facts, &state, &reason, w, log)?;
            Ok(Outcome::Ok)
        }
        Step::FinishFailure => {
            let reason = state.reason.clone().unwrap_or_default();
            fail(root, facts, &state, &reason, w, log)?;
            Ok(Outcome::Ok)
        }
        Step::RemoveLeftovers => {
            for p in existing_entries(root, &state, facts) {
                apply_write(root, &removal(&p), w)?;
            }
            Ok(Outcome::Ok)
        }
    }
}

fn removal(path: &str) -> FileWrite {
    FileWrite {
        path: path.to_string(),
        text: None,
        executable: false,
    }
}

/// The trial's entry files that exist now: those the state names, and any trial entry
/// in a `loader/entries` directory (the counter renames it).
fn existing_entries(root: &Root, state: &State, f: &Facts) -> Vec<String> {
    let mut out: Vec<String> = state
        .entries
        .iter()
        .filter(|p| root.exists(p))
        .cloned()
        .collect();
    for e in f.entries.iter().filter(|e| entries::is_trial_file(&e.file)) {
        if !out.contains(&e.path()) {
            out.push(e.path());
        }
    }
    out
}

/// The trial config's context, for verification and the commit.
fn trial_context(root: &Root, state: &State) -> Result<Context, String> {
    let path = root.path(paths::TRIAL_CONFIG);
    Context::load(
        root.dir(),
        Some(&path),
        ConfigNeed::Required,
        PlanMode::Apply {
            force: state.forced,
        },
    )
    .map_err(|e| {
        let text = e.to_string();
        format!(
            "the trial config cannot be loaded: {}",
            text.lines().next().unwrap_or("")
        )
    })
}

fn verify_here(
    root: &Root,
    facts: &Facts,
    state: &State,
    w: &mut dyn Writer,
    log: &mut Log,
) -> anyhow::Result<Outcome> {
    let mut booted = state.at(Phase::Booted, None, now());
    booted.booted_boot = facts.boot_id.clone();
    write_state(root, &booted, w)?;
    let verdict = match trial_context(root, &booted) {
        Err(e) => Err(e),
        Ok(ctx) if ctx.plan.has_errors() => Err(ctx
            .plan
            .problems
            .iter()
            .filter(|p| p.severity == crate::plan::Severity::Error)
            .map(|p| p.message.clone())
            .collect::<Vec<_>>()
            .join("; ")),
        Ok(ctx) => {
            let report = proving(&evaluate_trial(&ctx, &booted));
            crate::out!("{}", status::render_table(&report))?;
            judge(&report)
        }
    };
    match verdict {
        Ok(summary) => {
            finish_commit(root, facts, &booted, summary, w, log)?;
            Ok(Outcome::Ok)
        }
        Err(reason) => {
            fail(root, facts, &booted, &reason, w, log)?;
            Ok(Outcome::Failed)
        }
    }
}

/// `status::evaluate` for the trial config: as if it were applied with the trial's
/// arguments (the report's `applied`, `bootloader` and `initramfs` checks then speak of
/// the committed files, and [`judge`] leaves them out).
pub fn evaluate_trial(ctx: &Context, state: &State) -> Report {
    let text = ctx.config_text.clone().unwrap_or_default();
    let mut host = ctx.host.clone();
    host.state.manifest = Ok(Some(Manifest {
        schema: 1,
        kernel_args: state.kernel_args.clone(),
        ..Manifest::default()
    }));
    host.state.applied = Some(Applied {
        text: state::render_applied(&text),
        forced: state.forced,
    });
    let runtime = Runtime::read(&ctx.root, &ctx.machine, &host, false);
    status::evaluate(&status::Inputs {
        config: &ctx.config,
        config_text: Some(&text),
        config_path: &ctx.config_path,
        machine: &ctx.machine,
        plan: &ctx.plan,
        host: &host,
        runtime: &runtime,
        trial: None,
    })
}

/// The commit: the trial config becomes the default, exactly as a plain `apply` of it
/// writes it; the trial's entry goes (in the trial boot, a systemd-boot entry is blessed
/// instead, as systemd-bless-boot expects to find it, and removed at the next boot).
fn finish_commit(
    root: &Root,
    facts: &Facts,
    state: &State,
    reason: String,
    w: &mut dyn Writer,
    log: &mut Log,
) -> anyhow::Result<()> {
    let committing = state.at(Phase::Committing, Some(reason.clone()), now());
    write_state(root, &committing, w)?;
    let ctx = trial_context(root, state).map_err(|e| {
        anyhow::anyhow!("{e}; the commit is pending\nfix: `vfio-early trial abort`")
    })?;
    if ctx.plan.has_errors() {
        anyhow::bail!(
            "the trial config no longer passes its interlocks; the commit is pending\nfix: \
             `vfio-early trial abort`"
        );
    }
    let text = ctx.config_text.clone().unwrap_or_default();
    let target = Target {
        forced: state.forced,
        config: &ctx.config,
        config_text: &text,
        plan: &ctx.plan,
    };
    // Where /etc/kernel/cmdline is missing, apply seeds it from /proc/cmdline: in the
    // trial boot that carries the trial entry's arguments, `vfio_early.trial` among
    // them, which must never reach the default boot.
    let mut machine = ctx.machine.clone();
    if let Some(c) = &machine.cmdline {
        machine.cmdline = Some(
            crate::kargs::remove_tokens(c, &state.entry_args)
                .trim_end()
                .to_string(),
        );
    }
    let mut ch = apply::compute(Some(&target), &machine, &ctx.host)?;
    apply::commit(root, &ch, w)?;
    let bless = facts.trial_boot() && state.bootloader == Method::SystemdBoot;
    let mut kept = Vec::new();
    for p in existing_entries(root, state, facts) {
        if bless && entries::is_trial_file(p.rsplit('/').next().unwrap_or("")) {
            let blessed = match p.rsplit_once('/') {
                Some((dir, _)) => format!("{dir}/{}", entries::TRIAL_ID),
                None => entries::TRIAL_ID.to_string(),
            };
            if p != blessed {
                let text = root.read_to_string(&p).unwrap_or_default();
                w.write(root, &blessed, &text)?;
                w.remove(root, &p)?;
            }
            kept.push(blessed);
        } else {
            apply_write(root, &removal(&p), w)?;
        }
    }
    let update_grub = vec!["update-grub".to_string()];
    if state.bootloader == Method::Grub && !ch.commands.contains(&update_grub) {
        ch.commands.push(update_grub);
    }
    ch.commands.extend(disarm(state, facts));
    apply::run_commands(root, &ch).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(the trial commit stays pending: `vfio-early trial commit` finishes it)"
        )
    })?;
    let mut done = state.at(Phase::Committed, Some(reason.clone()), now());
    done.entries = kept;
    write_state(root, &done, w)?;
    log.info(&format!(
        "trial committed: its configuration is now the default ({reason})"
    ));
    crate::out!("trial committed: {reason}\n")?;
    Ok(())
}

/// The commands that take back the one-shot choice, when it still names the trial.
fn disarm(state: &State, f: &Facts) -> Vec<Vec<String>> {
    match state.bootloader {
        Method::Grub
            if f.grubenv
                .as_deref()
                .and_then(|t| grubmenu::env_value(t, "next_entry"))
                .as_deref()
                == Some(grubmenu::ENTRY_ID) =>
        {
            vec![vec![
                "grub-editenv".into(),
                format!("/{}", paths::GRUBENV),
                "unset".into(),
                "next_entry".into(),
            ]]
        }
        Method::SystemdBoot if f.oneshot.as_deref() == Some(entries::TRIAL_ID) => {
            vec![vec!["bootctl".into(), "set-oneshot".into(), String::new()]]
        }
        _ => Vec::new(),
    }
}

/// A failed trial: its entry goes (so it cannot boot again), the default was never
/// changed; the reason goes to the kernel log and the state.
fn fail(
    root: &Root,
    facts: &Facts,
    state: &State,
    reason: &str,
    w: &mut dyn Writer,
    log: &mut Log,
) -> anyhow::Result<()> {
    let failing = state.at(Phase::Failing, Some(reason.to_string()), now());
    write_state(root, &failing, w)?;
    let present = existing_entries(root, state, facts);
    for p in &present {
        apply_write(root, &removal(p), w)?;
    }
    let mut commands = disarm(state, facts);
    if state.bootloader == Method::Grub && !present.is_empty() {
        commands.push(vec!["update-grub".into()]);
    }
    run_commands(root, &commands)?;
    let mut failed = failing.at(Phase::Failed, Some(reason.to_string()), now());
    failed.entries.clear();
    write_state(root, &failed, w)?;
    log.error(&format!(
        "trial failed: {reason}; the previous configuration boots next"
    ));
    crate::out!("trial failed: {reason}; the previous configuration boots next\n")?;
    Ok(())
}

/// Removes every trace of a trial: its entry (and the one-shot choice), its files, its
/// state, the directories it created. Intent first: the state says `failing` with
/// `why` until the entry is gone.
pub fn discard(root: &Root, why: &str, dry_run: bool, w: &mut dyn Writer) -> anyhow::Result<()> {
    let facts = Facts::read(root);
    let state = match &facts.state {
        Ok(s) => s.clone(),
        // A damaged state still names nothing we can trust: remove what we know.
        Err(_) => None,
    };
    let present = match &state {
        Some(s) => existing_entries(root, s, &facts),
        None => {
            let mut v: Vec<String> = facts
                .entries
                .iter()
                .filter(|e| entries::is_trial_file(&e.file))
                .map(Entry::path)
                .collect();
            if root.exists(paths::GRUB_TRIAL_SCRIPT) {
                v.push(paths::GRUB_TRIAL_SCRIPT.into());
            }
            v
        }
    };
    let files: Vec<&str> = [paths::TRIAL_CONFIG, paths::TRIAL_FORCED, paths::TRIAL_STATE]
        .into_iter()
        .filter(|p| root.exists(p))
        .collect();
    if present.is_empty() && files.is_empty() {
        return Ok(());
    }
    let mut commands = state
        .as_ref()
        .map(|s| disarm(s, &facts))
        .unwrap_or_default();
    if present.iter().any(|p| p == paths::GRUB_TRIAL_SCRIPT) {
        commands.push(vec!["update-grub".into()]);
    }
    if dry_run {
        for p in present
            .iter()
            .map(String::as_str)
            .chain(files.iter().copied())
        {
            crate::out!("would remove /{p}\n")?;
        }
        for c in &commands {
            crate::out!("would run: {}\n", shown_command(c))?;
        }
        return Ok(());
    }
    if let Some(s) = &state {
        if !present.is_empty() {
            write_state(root, &s.at(Phase::Failing, Some(why.to_string()), now()), w)?;
        }
    }
    for p in &present {
        apply_write(root, &removal(p), w)?;
        crate::out!("removed /{p}\n")?;
    }
    run_commands(root, &commands)?;
    // The state goes last: until then it names what is left.
    for p in files {
        w.remove(root, p)?;
        crate::out!("removed /{p}\n")?;
    }
    let dirs = state.map(|s| s.dirs_created).unwrap_or_default();
    for d in dirs.iter().rev() {
        let _ = root.remove_dir(d);
    }
    Ok(())
}

/// Before a plain `apply`: refused while a trial is under way (its commit would undo the
/// apply); a finished trial's traces go (not in a dry run).
pub fn before_apply(
    root: &Root,
    dry_run: bool,
    w: &mut dyn Writer,
) -> anyhow::Result<Option<String>> {
    match read_state(root) {
        Ok(Some(s)) if !matches!(s.phase, Phase::Committed | Phase::Failed) => Ok(Some(format!(
            "a trial is under way ({} since {}); apply wrote nothing\nfix: let it finish \
             (reboot into it), or `vfio-early trial abort` (or `trial commit`) first",
            s.phase.name(),
            utc(s.time)
        ))),
        Ok(Some(_)) if !dry_run => {
            discard(root, "superseded by `vfio-early apply`", false, w)?;
            Ok(None)
        }
        Ok(_) => Ok(None),
        Err(e) => Ok(Some(e)),
    }
}

/// The lines `vfio-early hook-files` adds while a trial may boot: the trial config (and
/// its `--force` marker) into the image.
pub fn hook_lines(root: &Root) -> Vec<String> {
    let open = matches!(read_state(root), Ok(Some(s)) if s.phase.is_open());
    if !open || !root.exists(paths::TRIAL_CONFIG) {
        return Vec::new();
    }
    trial_file_lines(root.exists(paths::TRIAL_FORCED))
}

fn trial_file_lines(forced: bool) -> Vec<String> {
    let mut out = vec![format!(
        "file /{} /{}",
        paths::TRIAL_CONFIG,
        paths::IMAGE_TRIAL_CONFIG
    )];
    if forced {
        out.push(format!("file /{0} /{0}", paths::TRIAL_FORCED));
    }
    out
}

/// Whether the rebuild `apply --trial` would run can be skipped: every installed
/// kernel's image already holds, byte for byte, what `hook-files` will list once the
/// trial's files (`text`, `forced`) are written, and nothing else of ours; and where a
/// systemd-boot entry is copied (`default`), each of its initrds on the ESP is one of
/// those images. That is a retried trial of the same config. Returns how many images
/// were read; `Err` says why the rebuild is needed.
fn images_hold_the_trial(
    ctx: &Context,
    default: Option<&Entry>,
    text: &str,
    forced: bool,
) -> Result<usize, String> {
    let root = &ctx.root;
    let mut kernels: BTreeSet<&str> = ctx.host.initrds.iter().map(String::as_str).collect();
    kernels.extend(ctx.machine.kernels.iter().map(|k| k.version.as_str()));
    if kernels.is_empty() {
        return Err("no kernel with an initramfs found".into());
    }
    let images = kernels
        .iter()
        .map(|k| crate::host::image_path(root, k).ok_or(format!("no initramfs for {k} in /boot")))
        .collect::<Result<Vec<_>, _>>()?;
    let binary = root
        .read_bytes(paths::IMAGE_BINARY[0], 256 << 20)
        .map_err(|e| format!("/{}: {e}", paths::IMAGE_BINARY[0]))?;
    for (kver, image) in kernels.iter().zip(&images) {
        let km = crate::kmod::KernelModules::read(root, kver);
        let lines = apply::render_hook_files(&ctx.host, &km, &trial_file_lines(forced));
        let mut wanted = crate::initramfs::holds::Wanted {
            files: paths::IMAGE_OWN_FILES
                .iter()
                .map(|f| (f.to_string(), None))
                .collect(),
            binary: binary.clone(),
            kernel: kver.to_string(),
            modules: Vec::new(),
        };
        for line in lines.lines() {
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("file"), Some(src), Some(dest)) => {
                    let src = src.trim_start_matches('/');
                    let bytes = if src == paths::TRIAL_CONFIG {
                        text.as_bytes().to_vec()
                    } else if src == paths::TRIAL_FORCED {
                        TRIAL_FORCED_TEXT.as_bytes().to_vec()
                    } else {
                        root.read_bytes(src, 16 << 20)
                            .map_err(|e| format!("/{src}: {e}"))?
                    };
                    wanted
                        .files
                        .insert(dest.trim_start_matches('/').to_string(), Some(bytes));
                }
                (Some("module"), Some(m), None) => wanted.modules.push(m.to_string()),
                _ => return Err(format!("an unexpected hook-files line `{line}`")),
            }
        }
        let shown = Path::new("/").join(image);
        let file = root
            .open(image)
            .map_err(|e| format!("{}: {e}", shown.display()))?;
        let diffs = crate::initramfs::holds::differences(std::io::BufReader::new(file), &wanted)
            .map_err(|e| format!("{}: {e}", shown.display()))?;
        if let Some(d) = diffs.first() {
            return Err(format!("{d} in {}", shown.display()));
        }
    }
    if let Some(e) = default {
        let esp = e.dir.strip_suffix(paths::LOADER_ENTRIES).unwrap_or(&e.dir);
        for (_, rel) in e.keys.iter().filter(|(k, _)| k == "initrd") {
            let on_esp = Path::new(esp).join(rel.trim_start_matches('/'));
            let copy = root
                .read_bytes(&on_esp, 1 << 30)
                .map_err(|e| format!("/{}: {e}", on_esp.display()))?;
            let same = images
                .iter()
                .any(|img| root.read_bytes(img, 1 << 30).is_ok_and(|b| b == copy));
            if !same {
                return Err(format!(
                    "/{} is not a copy of an image in /boot",
                    on_esp.display()
                ));
            }
        }
    }
    Ok(images.len())
}

/// `vfio-early trial status [--json]`.
pub fn status_cmd(root: &Root, json: bool) -> anyhow::Result<Outcome> {
    let state = match read_state(root) {
        Ok(s) => s,
        Err(e) => {
            crate::errln!("vfio-early: {e}");
            return Ok(Outcome::Failed);
        }
    };
    let Some(s) = state else {
        if json {
            crate::out!("null\n")?;
        } else {
            crate::out!("no trial (`vfio-early apply --trial` prepares one)\n")?;
        }
        return Ok(Outcome::Ok);
    };
    if json {
        crate::out!("{}", s.to_json()?)?;
        return Ok(Outcome::Ok);
    }
    crate::out!("{}", render_status(&s))?;
    Ok(Outcome::Ok)
}

pub fn render_status(s: &State) -> String {
    let (_, summary, fix) = status_line(s);
    let mut out = format!("{summary}\n");
    let _ = writeln!(out, "phase: {} since {}", s.phase.name(), utc(s.time));
    let _ = writeln!(out, "bootloader: {}", s.bootloader.name());
    let _ = writeln!(out, "kernel arguments: {}", s.kernel_args.join(" "));
    let _ = writeln!(out, "the trial entry adds: {}", s.entry_args.join(" "));
    if let Some(fix) = fix {
        let _ = writeln!(out, "next: {fix}");
    }
    out
}

/// `vfio-early trial commit`: make the trial the default now, without (or without
/// waiting for) its verification; finishes an interrupted commit.
pub fn commit_cmd(root: &Root, w: &mut dyn Writer) -> anyhow::Result<Outcome> {
    let facts = Facts::read(root);
    let state = match &facts.state {
        Ok(Some(s)) => s.clone(),
        Ok(None) => {
            crate::errln!(
                "vfio-early: no trial to commit (`vfio-early apply --trial` prepares one)"
            );
            return Ok(Outcome::Failed);
        }
        Err(e) => {
            crate::errln!("vfio-early: {e}");
            return Ok(Outcome::Failed);
        }
    };
    if state.phase == Phase::Committed {
        crate::out!("the trial is already committed\n")?;
        return Ok(Outcome::Ok);
    }
    if facts.config_text.is_none() {
        crate::errln!(
            "vfio-early: /{} is missing: nothing to commit\nfix: `vfio-early trial abort`",
            paths::TRIAL_CONFIG
        );
        return Ok(Outcome::Failed);
    }
    let reason = match state.phase {
        Phase::Committing => state.reason.clone().unwrap_or_default(),
        _ => "committed by `vfio-early trial commit`, without verification".to_string(),
    };
    let mut log = Log::kmsg(root);
    finish_commit(root, &facts, &state, reason, w, &mut log)?;
    Ok(Outcome::Ok)
}

/// `vfio-early trial abort`: cancel a trial; the default boot stays as it is.
pub fn abort_cmd(root: &Root, w: &mut dyn Writer) -> anyhow::Result<Outcome> {
    match read_state(root) {
        Ok(Some(s)) if s.phase == Phase::Committing => {
            crate::errln!(
                "vfio-early: the trial is being committed (since {}); abort cannot take back \
                 a half-made commit\nfix: `vfio-early trial commit` finishes it; `vfio-early \
                 undo` then removes everything",
                utc(s.time)
            );
            return Ok(Outcome::Failed);
        }
        Ok(None) if !root.exists(paths::GRUB_TRIAL_SCRIPT) && !root.exists(paths::TRIAL_DIR) => {
            crate::out!("no trial to abort\n")?;
            return Ok(Outcome::Ok);
        }
        _ => {}
    }
    discard(root, "aborted by `vfio-early trial abort`", false, w)?;
    crate::out!("trial aborted: the default boot is unchanged\n")?;
    Ok(Outcome::Ok)
}

/// `vfio-early trial grub-entry`, run by the trial's GRUB script inside `update-grub`:
/// reads `10_linux`'s output on standard input and prints the trial's menu entry while a
/// trial is open; otherwise nothing. Never fails `update-grub`: a problem is a line on
/// standard error and exit 0.
pub fn grub_entry_cmd(root: &Root) -> anyhow::Result<Outcome> {
    let mut input = String::new();
    let read = std::io::stdin().take(16 << 20).read_to_string(&mut input);
    let state = match read_state(root) {
        Ok(Some(s)) if s.phase.is_open() && s.bootloader == Method::Grub => s,
        Ok(_) => return Ok(Outcome::Ok),
        Err(e) => {
            crate::errln!("vfio-early: {e}; no trial entry");
            return Ok(Outcome::Ok);
        }
    };
    if let Err(e) = read {
        crate::errln!("vfio-early: reading 10_linux's output: {e}; no trial entry");
        return Ok(Outcome::Ok);
    }
    match grubmenu::trial_entry(&input, &state.entry_removes, &state.entry_args) {
        Ok(entry) => crate::out!("{entry}")?,
        Err(e) => crate::errln!("vfio-early: {e}; no trial entry"),
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Check;

    fn state(phase: Phase) -> State {
        State {
            schema: 1,
            phase,
            reason: None,
            time: 0,
            bootloader: Method::Grub,
            forced: false,
            kernel_args: vec!["intel_iommu=on".into()],
            entry_args: vec![],
            entry_removes: vec![],
            entries: vec![],
            dirs_created: vec![],
            prepared_boot: Some("a".into()),
            booted_boot: None,
        }
    }

    #[test]
    fn the_step_follows_phase_boot_and_flag() {
        use Phase::*;
        let s = |p| state(p);
        assert_eq!(
            next_step(&s(Prepared), true, Some("b"), false),
            Step::Verify
        );
        assert_eq!(
            next_step(&s(Preparing), true, Some("b"), false),
            Step::Verify
        );
        assert!(matches!(
            next_step(&s(Prepared), false, Some("a"), false),
            Step::Nothing(_)
        ));
        assert!(matches!(
            next_step(&s(Preparing), false, Some("a"), false),
            Step::Nothing(_)
        ));
        assert!(
            matches!(next_step(&s(Prepared), false, Some("b"), false), Step::Fail(r) if r.contains("did not reach verification"))
        );
        assert!(
            matches!(next_step(&s(Booted), false, Some("c"), false), Step::Fail(r) if r.contains("did not finish"))
        );
        assert_eq!(
            next_step(&s(Committing), false, Some("c"), false),
            Step::FinishCommit
        );
        assert_eq!(
            next_step(&s(Committing), true, Some("c"), false),
            Step::FinishCommit
        );
        assert_eq!(
            next_step(&s(Failing), false, Some("c"), false),
            Step::FinishFailure
        );
        assert_eq!(
            next_step(&s(Committed), false, Some("c"), true),
            Step::RemoveLeftovers
        );
        assert!(matches!(
            next_step(&s(Committed), true, Some("c"), false),
            Step::Nothing(_)
        ));
        assert!(matches!(
            next_step(&s(Failed), false, Some("c"), false),
            Step::Nothing(_)
        ));
    }

    fn check(id: &'static str, verdict: Verdict) -> Check {
        Check {
            id,
            verdict,
            device: None,
            summary: format!("{id} says so"),
            fix: None,
        }
    }

    fn report(checks: Vec<Check>) -> Report {
        Report {
            schema: 1,
            verdict: Verdict::Pass,
            checks,
        }
    }

    #[test]
    fn judge_counts_the_proving_checks_only() {
        let ok = report(vec![
            check("iommu", Verdict::Pass),
            check("applied", Verdict::Fail),
            check("bootloader", Verdict::Fail),
            check("initramfs", Verdict::Fail),
            check("reset-method", Verdict::Warn),
            check("device", Verdict::Pass),
        ]);
        assert_eq!(
            judge(&ok),
            Ok("verified in the trial boot: 2 check(s) pass".into())
        );
        let absent = report(vec![check("device", Verdict::Warn)]);
        assert_eq!(judge(&absent), Err("device: device says so".into()));
        let two = report(vec![
            check("iommu", Verdict::Fail),
            check("cmdline", Verdict::Fail),
        ]);
        assert_eq!(
            judge(&two),
            Err("iommu: iommu says so; cmdline: cmdline says so".into())
        );
        let warn = report(vec![check("interrupt-remapping", Verdict::Warn)]);
        assert!(judge(&warn).is_ok());
    }

    #[test]
    fn the_verification_table_ends_in_the_trials_verdict() {
        // Found in a boot (scenario 31): the trial boot printed status's "passes, with
        // warnings" for a missing device, then failed the trial for it.
        let r = report(vec![
            check("iommu", Verdict::Pass),
            check("device", Verdict::Pass),
            check("device", Verdict::Warn),
            check("reset-method", Verdict::Warn),
        ]);
        let p = proving(&r);
        let verdicts: Vec<_> = p.checks.iter().map(|c| (c.id, c.verdict)).collect();
        assert_eq!(
            verdicts,
            [
                ("iommu", Verdict::Pass),
                ("device", Verdict::Pass),
                ("device", Verdict::Fail)
            ]
        );
        assert_eq!(p.verdict, Verdict::Fail);
        let table = status::render_table(&p);
        assert!(table.contains("FAIL  device "), "{table}");
        assert!(table.ends_with("FAILED: see the fixes above\n"), "{table}");
        assert_eq!(judge(&p), Err("device: device says so".into()));
        let warn_only = proving(&report(vec![check("interrupt-remapping", Verdict::Warn)]));
        assert_eq!(warn_only.verdict, Verdict::Warn);
        assert!(judge(&warn_only).is_ok());
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_735_689_599), "2024-12-31 23:59:59 UTC");
    }

    #[test]
    fn efivar_text_is_utf16_after_four_bytes() {
        let mut b = vec![7, 0, 0, 0];
        for u in "vfio-early-trial.conf".encode_utf16().chain([0]) {
            b.extend(u.to_le_bytes());
        }
        assert_eq!(efivar_string(&b).as_deref(), Some(entries::TRIAL_ID));
        assert_eq!(efivar_string(&[1, 2]), None);
    }

    #[test]
    fn uki_layout_is_read_like_kernel_install() {
        assert!(layout_is_uki("layout=uki\n"));
        assert!(layout_is_uki("#layout=bls\nlayout=\"uki\"\n"));
        assert!(!layout_is_uki("layout=uki\nlayout=bls\n"));
        assert!(!layout_is_uki("# layout=uki\n"));
    }

    fn facts() -> Facts {
        Facts {
            state: Ok(None),
            config_text: None,
            cmdline: Vec::new(),
            boot_id: None,
            grubenv: None,
            grub_store: Ok("/ (ext4 on vda1)".into()),
            grub_reboot: true,
            grub_linux: true,
            uki: None,
            bootctl: true,
            efivars: Ok(()),
            oneshot: None,
            entries: vec![Entry::parse(
                "boot/efi/loader/entries",
                "m-6.1.conf",
                "version 6.1\nlinux /l\n",
            )],
            existing_dirs: BTreeSet::new(),
        }
    }

    #[test]
    fn each_bootloader_is_chosen_or_refused_with_its_reason() {
        let f = facts();
        assert_eq!(choose_way(Bootloader::Grub, &f), Ok(Way::Grub));
        assert!(matches!(
            choose_way(Bootloader::SystemdBoot, &f),
            Ok(Way::SystemdBoot(_))
        ));
        let msg = |bl, f: &Facts| choose_way(bl, f).unwrap_err().message;
        let mut lvm = facts();
        lvm.grub_store = Err("/boot is on LVM (dm-0 vg0-boot)".into());
        assert!(msg(Bootloader::Grub, &lvm).starts_with("/boot is on LVM"));
        assert!(msg(
            Bootloader::ProxmoxBootTool(crate::bootloader::EspLoader::SystemdBoot),
            &f
        )
        .contains("proxmox-boot-tool"));
        assert!(msg(Bootloader::None, &f).contains("no bootloader"));
        let mut uki = facts();
        uki.uki = Some("/etc/kernel/install.conf".into());
        assert!(msg(Bootloader::SystemdBoot, &uki).contains("layout=uki"));
        let mut ro = facts();
        ro.efivars = Err("efivarfs is mounted read-only".into());
        assert!(msg(Bootloader::SystemdBoot, &ro).contains("LoaderEntryOneShot"));
        let mut none = facts();
        none.entries.clear();
        assert!(msg(Bootloader::SystemdBoot, &none).contains("no boot entry"));
        let mut nobootctl = facts();
        nobootctl.bootctl = false;
        assert!(msg(Bootloader::SystemdBoot, &nobootctl).contains("systemd-boot-tools"));
        for (bl, f) in [(Bootloader::Grub, &lvm), (Bootloader::None, &f)] {
            assert!(msg(bl, f).contains("nothing was written"));
            assert!(msg(bl, f).contains("\nfix: "));
        }
    }
}
