//! Command-line types (clap derive) and the dispatch to one module per subcommand.
//!
//! Exit status contract: 0 ok, 1 a check or action failed, 2 bad usage or bad config.
//! Only this file and `main.rs` know the default root `/`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError};
use crate::kmsg::Log;
use crate::root::Root;
use crate::{apply, bind, list, machine, paths, plan};

const AFTER_HELP: &str = "\
Typical use:
  vfio-early list            find the devices (ids, groups, drivers)
  $EDITOR /etc/vfio-early.toml
  vfio-early check           validate the config against this machine
  vfio-early apply --dry-run see what apply would change
  vfio-early apply           kernel arguments, modprobe config, initramfs
  reboot
  vfio-early undo            remove everything apply wrote

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
        #[arg(long)]
        if_configured: bool,
    },
    /// Remove every file apply wrote, take its tokens out of /etc/kernel/cmdline,
    /// and regenerate: the system returns to how it was before apply.
    Undo {
        /// Show the diff and the commands, change nothing.
        #[arg(long)]
        dry_run: bool,
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
    /// applied, bootloader, initramfs, vfio-modules, device, iommu-group,
    /// framebuffer, reset-method. Fields and ids are added, never renamed.
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
    /// CPU vendor, mounts, the config) into one archive for a bug report.
    DebugDump {
        /// Where to write the archive (a gzip-compressed cpio).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
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

/// The outcome of a command, mapped to the exit status contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Failed,
    Usage,
}

impl From<Status> for ExitCode {
    fn from(s: Status) -> ExitCode {
        match s {
            Status::Ok => ExitCode::SUCCESS,
            Status::Failed => ExitCode::from(1),
            Status::Usage => ExitCode::from(2),
        }
    }
}

/// Parses the process arguments, runs the command, maps the outcome to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Bind { early: true, .. } = cli.cmd {
        return run_early(&cli).into();
    }
    match run(&cli) {
        Ok(status) => status.into(),
        Err(e) => {
            eprintln!("vfio-early: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn config_path(cli: &Cli, root: &Root) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(|| root.path(paths::CONFIG))
}

/// Loads the config; a missing file is an empty config only when `missing_ok`.
fn load_config(path: &Path, missing_ok: bool) -> Result<Config, ConfigError> {
    if missing_ok && !path.exists() {
        return Ok(Config::default());
    }
    config::load(path)
}

fn print_config_error(e: &ConfigError) {
    eprintln!("vfio-early: error: {e}");
}

/// Runs one parsed command line (all but `bind --early`).
pub fn run(cli: &Cli) -> anyhow::Result<Status> {
    let root = Root::new(&cli.root);
    let cfg_path = config_path(cli, &root);
    match &cli.cmd {
        Cmd::List { json } => {
            let config = match load_config(&cfg_path, true) {
                Ok(c) => c,
                Err(e) => {
                    print_config_error(&e);
                    return Ok(Status::Usage);
                }
            };
            let machine = machine::discover(&root);
            let plan = plan::plan(&config, &machine, plan::Options::default());
            if *json {
                println!("{}", list::render_json(&machine, &plan));
            } else {
                print!("{}", list::render_table(&machine, &plan));
            }
            Ok(Status::Ok)
        }
        Cmd::Check => {
            let config = match load_config(&cfg_path, false) {
                Ok(c) => c,
                Err(e) => {
                    print_config_error(&e);
                    return Ok(Status::Usage);
                }
            };
            let machine = machine::discover(&root);
            let plan = plan::plan(&config, &machine, plan::Options::default());
            print!("{}", crate::check::render(&cfg_path, &config, &plan));
            Ok(if plan.has_errors() {
                Status::Failed
            } else {
                Status::Ok
            })
        }
        Cmd::Bind { force, .. } => {
            let config = match load_config(&cfg_path, false) {
                Ok(c) => c,
                Err(e) => {
                    print_config_error(&e);
                    return Ok(Status::Usage);
                }
            };
            let machine = machine::discover(&root);
            let opts = plan::Options {
                force: *force,
                live: true,
            };
            let plan = plan::plan(&config, &machine, opts);
            if plan.has_errors() {
                eprint!("{}", list::render_problems(&plan.problems));
                eprintln!("vfio-early: nothing was changed");
                return Ok(Status::Failed);
            }
            eprint!("{}", list::render_problems(&plan.problems));
            let mut log = Log::stderr();
            let mut sys = bind::RealSysfs::new(root);
            let report = bind::bind_devices(&mut sys, &plan, &mut log);
            if report.devices.is_empty() {
                eprintln!("vfio-early: the config takes no device on this machine");
            }
            Ok(if report.failed() {
                Status::Failed
            } else {
                Status::Ok
            })
        }
        Cmd::Apply {
            dry_run,
            force,
            if_configured,
        } => {
            let loaded = config::read_text(&cfg_path)
                .and_then(|t| config::parse(&t, &cfg_path).map(|c| (c, t)));
            let (config, text) = match loaded {
                Ok(c) => c,
                Err(e) => {
                    print_config_error(&e);
                    eprintln!("vfio-early: nothing was written");
                    return Ok(Status::Usage);
                }
            };
            if *if_configured && config.devices.is_empty() && apply::read_manifest(&root)?.is_none()
            {
                println!("no device configured and nothing applied before: nothing to do");
                return Ok(Status::Ok);
            }
            let machine = machine::discover(&root);
            let plan = plan::plan(
                &config,
                &machine,
                plan::Options {
                    force: *force,
                    live: false,
                },
            );
            eprint!("{}", list::render_problems(&plan.problems));
            if plan.has_errors() {
                eprintln!("vfio-early: nothing was written");
                return Ok(Status::Failed);
            }
            let kernels = crate::kmod::read_all(&root, &machine.installed_kernels);
            let target = apply::Target {
                forced: *force,
                config: &config,
                config_text: &text,
                plan: &plan,
                machine: &machine,
                kernels: &kernels,
            };
            converge(&root, Some(&target), *dry_run)
        }
        Cmd::Undo { dry_run } => converge(&root, None, *dry_run),
        Cmd::Status { json } => {
            let config = match load_config(&cfg_path, true) {
                Ok(c) => c,
                Err(e) => {
                    print_config_error(&e);
                    return Ok(Status::Usage);
                }
            };
            let machine = machine::discover(&root);
            // As the early binder plans: interlocks overridden only when apply was forced.
            let forced = root
                .read_to_string(apply::APPLIED)
                .map(|t| apply::applied_with_force(&t))
                .unwrap_or(false);
            let plan = plan::plan(
                &config,
                &machine,
                plan::Options {
                    force: forced,
                    live: false,
                },
            );
            let kernel_log = crate::kmsg::read_log(&root);
            let report = crate::status::run(&crate::status::Inputs {
                root: &root,
                config: &config,
                config_path: &cfg_path,
                machine: &machine,
                plan: &plan,
                kernel_log: &kernel_log,
            });
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::status::render_table(&report));
            }
            Ok(if report.verdict == crate::status::Verdict::Fail {
                Status::Failed
            } else {
                Status::Ok
            })
        }
        Cmd::Rom(RomCmd::Dump { address, output }) => {
            let mut sys = bind::RealSysfs::new(root.clone());
            let data = match crate::rom::read_rom(&mut sys, *address) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("vfio-early: error: {e}");
                    return Ok(Status::Failed);
                }
            };
            let info = match crate::rom::parse_rom(&data) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("vfio-early: error: the ROM of {address} is not usable: {e}; nothing written");
                    return Ok(Status::Failed);
                }
            };
            let dir = output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = output
                .file_name()
                .ok_or_else(|| anyhow::anyhow!("{} has no file name", output.display()))?;
            Root::new(dir).write_atomic(name, &data)?;
            let expected = crate::pci::read_device(&root, *address).id;
            print!("{}", crate::rom::render(*address, expected, &info, output));
            Ok(Status::Ok)
        }
        Cmd::HookFiles { kernel } => {
            print!("{}", apply::render_hook_files(&root, kernel));
            Ok(Status::Ok)
        }
        Cmd::Initramfs(sub) => Ok(run_initramfs(sub, &root)),
        Cmd::DebugDump { output } => {
            let count = crate::dump::write_dump(&root, &cfg_path, output)?;
            eprintln!(
                "vfio-early: wrote {} ({count} entries); attach it to your bug report",
                output.display()
            );
            Ok(Status::Ok)
        }
    }
}

/// `initramfs examine|list|verify`: an unreadable or malformed image is exit 2.
fn run_initramfs(cmd: &InitramfsCmd, root: &Root) -> Status {
    use crate::initramfs::{examine, list, verify};
    let fail = |image: &Path, e: &dyn std::fmt::Display| {
        eprintln!("vfio-early: error: {}: {e}", image.display());
        Status::Usage
    };
    match cmd {
        InitramfsCmd::Examine { image } => match examine::examine_image(image) {
            Ok(segments) => {
                print!("{}", examine::render_table(&segments));
                Status::Ok
            }
            Err(e) => fail(image, &e),
        },
        InitramfsCmd::List { image } => match list::list_image(image, std::io::stdout().lock()) {
            Ok(()) => Status::Ok,
            Err(e) if list::is_broken_pipe(&e) => Status::Ok,
            Err(e) => fail(image, &e),
        },
        InitramfsCmd::Verify { image, kernel } => {
            // The drop-in is expected exactly when this system has one.
            let want_modprobe = root.exists(crate::apply::MODPROBE);
            match verify::verify_image(image, kernel.as_deref(), want_modprobe) {
                Ok(v) => {
                    print!("{}", verify::render(&v));
                    if v.complete() {
                        Status::Ok
                    } else {
                        Status::Failed
                    }
                }
                Err(e) => fail(image, &e),
            }
        }
    }
}

/// Shared by apply and undo: compute, show, write, regenerate.
fn converge(root: &Root, target: Option<&apply::Target>, dry_run: bool) -> anyhow::Result<Status> {
    let ch = apply::compute(root, target)?;
    let mut stdout = std::io::stdout();
    print!("{}", apply::render_summary(&ch, dry_run));
    if dry_run {
        print!("{}", apply::render_diff(&ch));
        return Ok(Status::Ok);
    }
    if ch.is_empty() {
        return Ok(Status::Ok);
    }
    apply::commit(root, &ch, &mut apply::AtomicWriter)?;
    apply::run_commands(root, &ch, &mut stdout)?;
    Ok(Status::Ok)
}

/// `bind --early`: from the initramfs. Never fails, never panics outward, exits 0.
pub fn run_early(cli: &Cli) -> Status {
    let root = Root::new(&cli.root);
    let mut log = Log::kmsg(&root);
    let cfg_path = config_path(cli, &root);
    // Catches for real: the release profile unwinds (a build that aborts is refused).
    bind::run_guarded(&mut log, "the early binder", |log| {
        early_bind(&root, &cfg_path, log)
    });
    Status::Ok
}

/// The early binder's steps; every failure is logged and ends the step quietly.
pub fn early_bind(root: &Root, cfg_path: &Path, log: &mut Log) {
    let cmdline = root.read_attr(paths::PROC_CMDLINE).unwrap_or_default();
    if cmdline
        .split_whitespace()
        .any(|t| t == "vfio_early=off" || t == "vfio-early=off")
    {
        log.warn("disabled by vfio_early=off on the kernel command line; nothing done");
        return;
    }
    if !cfg_path.exists() {
        log.info(&format!(
            "no config at {}; nothing to do",
            cfg_path.display()
        ));
        return;
    }
    // Read once: the text gives both the config and apply's --force marker.
    let parsed = config::read_text(cfg_path).and_then(|t| {
        let forced = apply::applied_with_force(&t);
        config::parse(&t, cfg_path).map(|c| (c, forced))
    });
    let (config, forced) = match parsed {
        Ok(c) => c,
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or("invalid config");
            log.error(&format!("config error, nothing bound: {first}"));
            return;
        }
    };
    let machine = machine::discover(root);
    // `apply` is the gate for interlocks, but it may have run where the devices were not
    // visible (a chroot, before a card was fitted): the interlocks that can be judged
    // this early (bridges, the only display) are judged again, unless apply was forced.
    // The root filesystem is not mounted yet, so that one is apply's alone.
    let opts = plan::Options {
        force: forced,
        live: true,
    };
    let plan = plan::plan(&config, &machine, opts);
    for p in &plan.problems {
        log.warn(&p.message);
    }
    if plan.targets().next().is_none() {
        log.info("the config takes no device on this boot");
        return;
    }
    bind::inject_fault("before-bind");
    let mut sys = bind::RealSysfs::new(root.clone());
    let report = bind::bind_devices(&mut sys, &plan, log);
    let bound = report
        .devices
        .iter()
        .filter(|d| {
            matches!(
                d.outcome,
                bind::Outcome::Bound | bind::Outcome::AlreadyBound
            )
        })
        .count();
    log.info(&format!(
        "done: {bound} of {} device(s) on vfio-pci",
        report.devices.len()
    ));
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
