//! Command-line types (clap derive) and the dispatch: each subcommand loads its
//! [`Context`] (config, host, machine, plan: read once) and calls one verb of its
//! module. Nothing here reads, decides or prints beyond that.
//!
//! Exit status contract ([`Outcome`]): 0 ok, 1 a check or action failed, 2 bad usage or
//! bad config. Only this file and `main.rs` know the default root `/`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::context::{self, ConfigNeed, Context, PlanMode};
use crate::outcome::{Outcome, StdoutError};
use crate::root::Root;
use crate::{apply, bind, check, dump, early, initramfs, list, lock, rom, status, trial};

const AFTER_HELP: &str = "\
Typical use:
  vfio-early list            find the devices (ids, groups, drivers)
  $EDITOR /etc/vfio-early.toml
  vfio-early check           validate the config against this machine
  vfio-early apply --dry-run see what apply would change
  vfio-early apply           kernel arguments, modprobe config, initramfs
  reboot
  vfio-early undo            remove everything apply wrote

On a remote host, try first: `vfio-early apply --trial`, then reboot; the
trial boot checks itself and keeps the new configuration, or the boot after
falls back to the old one by itself.

Exit status: 0 ok, 1 a check or action failed, 2 bad usage or bad config.";

/// Declarative PCI passthrough: bind chosen devices to vfio-pci from early boot.
///
/// vfio-early reads /etc/vfio-early.toml, which says which PCI devices go to
/// vfio-pci, and makes it so: at every boot from the initramfs, before any
/// other driver can claim them, and now with `bind`.
#[derive(Debug, Parser)]
#[command(name = "vfio-early", version, max_term_width = 80, after_help = AFTER_HELP)]
pub struct Cli {
    /// Treat DIR as the filesystem root for every read and write (a chroot or a
    /// fixture tree). With a root other than /, no host command is run.
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,

    /// The config file [default: <root>/etc/vfio-early.toml].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Show every PCI device: ids, class, driver, IOMMU group, and whether the
    /// config takes it and why.
    List {
        /// Print stable JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and check it against this machine: entries that match
    /// nothing, interlocks, IOMMU group viability.
    Check,
    /// Take the configured devices now: driver_override, unbind, load vfio-pci,
    /// probe, verify.
    Bind {
        /// Early-boot mode, used by the initramfs: log to /dev/kmsg, never fail,
        /// always exit 0; `vfio_early=off` on the kernel command line disables it.
        #[arg(long)]
        early: bool,
        /// Take devices even when an interlock objects (boot disk, only display,
        /// bridges).
        #[arg(long)]
        force: bool,
    },
    /// Write the kernel command line and modprobe config for the configured
    /// devices, then rebuild the initramfs and bootloader config (only when
    /// something changed). Idempotent.
    Apply {
        /// Show the diff and the commands, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Apply even when an interlock objects (boot disk, only display, bridges).
        #[arg(long)]
        force: bool,
        /// Do nothing unless the config has device entries or an earlier apply
        /// left files (used by the package's postinst).
        #[arg(long, conflicts_with = "trial")]
        if_configured: bool,
        /// Try the config for one boot first, changing nothing of the default
        /// boot: prepare a boot entry that carries it (GRUB with grub-reboot, or
        /// systemd-boot with a one-shot, boot-counted entry) and rebuild the
        /// initramfs with both configs (kept as it is when every image already
        /// holds this trial byte for byte: a retry). In that boot vfio-early-verify.service
        /// runs status's checks and keeps the config (as `apply` would write it)
        /// or drops it; a boot that hangs or panics falls back to the current
        /// configuration at the next boot by itself. Refused, writing nothing,
        /// where a one-shot boot cannot be made safely (grubenv on btrfs, ZFS,
        /// LVM or md RAID; proxmox-boot-tool; unified kernel images). See
        /// `vfio-early trial --help`.
        #[arg(long)]
        trial: bool,
        /// For tests: an extra kernel argument on the trial entry only.
        #[arg(
            long = "trial-arg",
            value_name = "ARG",
            requires = "trial",
            hide = true
        )]
        trial_arg: Vec<String>,
        /// How long to wait for another apply or undo on the same root to finish.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
    },
    /// Inspect, force or cancel a trial made by `apply --trial`.
    ///
    /// The safe way to apply on a remote host: `vfio-early apply --trial`,
    /// then `reboot`. The next boot, and only that one, uses the new
    /// configuration; vfio-early-verify.service runs status's checks there and
    /// keeps it (exactly as `apply` would have written it) or drops it. If the
    /// trial boot hangs, panics (the trial entry carries panic=10) or is
    /// reset, the boot after it is the previous configuration, with nobody at
    /// the console. Then `vfio-early trial status` (or `status`) says
    /// "trial committed", or "trial failed: ...; the previous configuration
    /// boots next".
    ///
    /// A trial's state is in /var/lib/vfio-early/trial/: prepared (the next
    /// boot tries it), booted, committed, or failed. `undo` removes a trial
    /// too; a plain `apply` is refused while one is under way.
    #[command(subcommand)]
    Trial(TrialCmd),
    /// Remove every file apply wrote, take its tokens out of /etc/kernel/cmdline,
    /// and regenerate: the system returns to how it was before apply.
    Undo {
        /// Show the diff and the commands, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for another apply or undo on the same root to finish.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
    },
    /// For the initramfs hooks: the files to copy and the modules to add for a
    /// kernel, one per line; nothing when no device is configured.
    HookFiles {
        /// The kernel version the image is built for.
        #[arg(long, value_name = "VERSION")]
        kernel: String,
    },
    /// Prove every step after a reboot: IOMMU, interrupt remapping, command
    /// line, initramfs, modules, each device on vfio-pci, IOMMU groups,
    /// framebuffer, reset method. PASS/WARN/FAIL with a fix each; exit 1 on any
    /// FAIL.
    ///
    /// --json prints {"schema": 1, "verdict": V, "checks": [{"id", "verdict",
    /// "device", "summary", "fix"}]}, V being "pass", "warn" or "fail"; "device"
    /// is a PCI address or null. Check ids: iommu, interrupt-remapping, cmdline,
    /// applied, bootloader, next-boot, initramfs, vfio-modules, device, iommu-group,
    /// framebuffer, reset-method, trial. Fields and ids are added, never renamed.
    Status {
        /// Print stable JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Option ROMs (VBIOS) for QEMU's romfile=.
    #[command(subcommand)]
    Rom(RomCmd),
    /// Read an initramfs image: its segments, its paths, and whether it holds
    /// what vfio-early needs at boot.
    #[command(subcommand)]
    Initramfs(InitramfsCmd),
    /// Pack what vfio-early reads (PCI devices, IOMMU groups, drivers, cmdline,
    /// CPU vendor, mounts and swaps with the disks and NICs under them,
    /// bootloader files, the config and state) into one archive for a bug report.
    DebugDump {
        /// Where to write the archive (a gzip-compressed cpio).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum TrialCmd {
    /// Show the trial: its phase and since when, the bootloader that boots it,
    /// its kernel arguments, and what failed if it did.
    Status {
        /// Print the state file's JSON (`null` when there is no trial).
        #[arg(long)]
        json: bool,
    },
    /// Make the trial's configuration the default now, as `apply` would write
    /// it, without waiting for its verification; remove the trial entry.
    /// Also finishes a commit that was interrupted.
    Commit {
        /// How long to wait for another apply, undo or trial command to finish.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
    },
    /// Cancel the trial: remove its entry, its one-shot choice and its state.
    /// The default boot is left as it is.
    Abort {
        /// How long to wait for another apply, undo or trial command to finish.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
    },
    /// Run by vfio-early-verify.service at boot. In the trial boot (the kernel
    /// command line has vfio_early.trial): run status's checks for the trial
    /// config, then commit it or fail it (exit 1), saying why in the kernel
    /// log. In a later boot: a trial that never reached this is failed, and an
    /// interrupted commit or clean-up is finished (exit 0).
    Verify {
        /// How long to wait for another apply, undo or trial command to finish.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        wait: u64,
    },
    /// For the trial's GRUB script: read 10_linux's output on standard input,
    /// print the trial's menu entry.
    #[command(hide = true)]
    GrubEntry,
}

#[derive(Debug, Subcommand)]
pub enum RomCmd {
    /// Dump a device's ROM to a file, checked (0x55AA, PCIR, vendor and
    /// device), and print the QEMU and Proxmox lines that use it.
    Dump {
        /// The device, e.g. 0000:01:00.0 (see `vfio-early list`).
        address: crate::pci::PciAddress,
        /// Where to write the ROM.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum InitramfsCmd {
    /// The segments of an image: offset and size in the file, compression,
    /// unpacked size, entries. Exit 2 when the image cannot be read.
    Examine {
        /// The image, e.g. /boot/initrd.img-6.1.0-18-amd64.
        image: PathBuf,
    },
    /// Every path in an image, one per line, as stored (like lsinitramfs).
    /// Exit 2 when the image cannot be read.
    List {
        /// The image, e.g. /boot/initrd.img-6.1.0-18-amd64.
        image: PathBuf,
    },
    /// Whether an image holds vfio-early, its config, its modprobe drop-in, its
    /// boot script and the kernel's vfio modules. Exit 0 when all are there, 1
    /// when something is missing, 2 when the image cannot be read.
    Verify {
        /// The image, e.g. /boot/initrd.img-6.1.0-18-amd64.
        image: PathBuf,
        /// The kernel whose modules to look for [default: the image's only
        /// lib/modules/<version>].
        #[arg(long, value_name = "VERSION")]
        kernel: Option<String>,
    },
}

/// Parses the process arguments, runs the command, maps the outcome to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(outcome) => outcome.into(),
        // The reader went away (`| head`): stop quietly, as coreutils do.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<StdoutError>()
                    .is_some_and(StdoutError::is_broken_pipe)
            }) =>
        {
            ExitCode::from(1)
        }
        Err(e) => {
            crate::errln!("vfio-early: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Loads the context for a command; a bad config is printed (with `after`, a line
/// saying what was not done) and becomes exit 2.
fn load(
    cli: &Cli,
    need: ConfigNeed,
    mode: PlanMode,
    after: Option<&str>,
) -> Result<Context, Outcome> {
    Context::load(&cli.root, cli.config.as_deref(), need, mode).map_err(|e| {
        crate::errln!("vfio-early: error: {e}");
        if let Some(line) = after {
            crate::errln!("vfio-early: {line}");
        }
        Outcome::Usage
    })
}

fn secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}

/// Runs one parsed command line.
pub fn run(cli: &Cli) -> anyhow::Result<Outcome> {
    use ConfigNeed::{MissingIsEmpty, Required};
    let root = Root::new(&cli.root);
    let ctx = |need, mode, after| load(cli, need, mode, after);
    Ok(match &cli.cmd {
        Cmd::List { json } => match ctx(MissingIsEmpty, PlanMode::Report, None) {
            Ok(c) => list::run(&c, *json)?,
            Err(o) => o,
        },
        Cmd::Check => match ctx(Required, PlanMode::Report, None) {
            Ok(c) => check::run(&c)?,
            Err(o) => o,
        },
        Cmd::Bind { early: true, .. } => {
            early::run(&root, &context::config_path(&root, cli.config.as_deref()));
            Outcome::Ok
        }
        Cmd::Bind { force, .. } => {
            match ctx(Required, PlanMode::LiveBind { force: *force }, None) {
                Ok(c) => bind::run_live(&c),
                Err(o) => o,
            }
        }
        Cmd::Apply { .. } => run_apply(cli, &root)?,
        Cmd::Undo { dry_run, wait } => {
            let _lock = match dry_run {
                true => None,
                false => Some(lock::acquire(&root, "undo", secs(*wait))?),
            };
            apply::undo(&root, *dry_run)?
        }
        Cmd::Trial(sub) => run_trial(sub, &root)?,
        Cmd::Status { json } => match ctx(MissingIsEmpty, PlanMode::AsAppliedAtBoot, None) {
            Ok(c) => status::run(&c, *json)?,
            Err(o) => o,
        },
        Cmd::Rom(RomCmd::Dump { address, output }) => rom::dump(&root, *address, output)?,
        Cmd::HookFiles { kernel } => apply::hook_files(&root, kernel)?,
        Cmd::Initramfs(InitramfsCmd::Examine { image }) => initramfs::examine_cmd(image)?,
        Cmd::Initramfs(InitramfsCmd::List { image }) => initramfs::list_cmd(image)?,
        Cmd::Initramfs(InitramfsCmd::Verify { image, kernel }) => {
            initramfs::verify_cmd(&root, image, kernel.as_deref())?
        }
        Cmd::DebugDump { output } => {
            let cfg = context::config_path(&root, cli.config.as_deref());
            dump::run(&root, &cfg, output)?
        }
    })
}

/// `apply` (and `apply --trial`): the lock, held while reading, deciding and writing
/// (one apply at a time), then the context and the verb.
fn run_apply(cli: &Cli, root: &Root) -> anyhow::Result<Outcome> {
    let Cmd::Apply {
        dry_run,
        force,
        if_configured,
        trial: try_it,
        trial_arg,
        wait,
    } = &cli.cmd
    else {
        return Ok(Outcome::Usage);
    };
    let _lock = match dry_run {
        true => None,
        false => Some(lock::acquire(root, "apply", secs(*wait))?),
    };
    let mode = PlanMode::Apply { force: *force };
    let c = match load(cli, ConfigNeed::Required, mode, Some("nothing was written")) {
        Ok(c) => c,
        Err(o) => return Ok(o),
    };
    if *try_it {
        let opts = trial::Options {
            dry_run: *dry_run,
            force: *force,
            extra_args: trial_arg.clone(),
        };
        return trial::prepare(&c, &opts, &mut apply::AtomicWriter);
    }
    let opts = apply::Options {
        dry_run: *dry_run,
        force: *force,
        if_configured: *if_configured,
    };
    apply::apply(&c, opts)
}

/// `trial status|commit|abort|verify|grub-entry`: the changing ones hold the lock.
fn run_trial(sub: &TrialCmd, root: &Root) -> anyhow::Result<Outcome> {
    match sub {
        TrialCmd::Status { json } => trial::status_cmd(root, *json),
        TrialCmd::Commit { wait } => {
            let _lock = lock::acquire(root, "trial commit", secs(*wait))?;
            trial::commit_cmd(root, &mut apply::AtomicWriter)
        }
        TrialCmd::Abort { wait } => {
            let _lock = lock::acquire(root, "trial abort", secs(*wait))?;
            trial::abort_cmd(root, &mut apply::AtomicWriter)
        }
        TrialCmd::Verify { wait } => {
            let _lock = lock::acquire(root, "trial verify", secs(*wait))?;
            trial::verify(root, &mut apply::AtomicWriter)
        }
        // No lock: it runs inside update-grub, which `apply --trial` runs holding it.
        TrialCmd::GrubEntry => trial::grub_entry_cmd(root),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
