//! `cargo xtask`: the project's task runner. One module per task; external commands run
//! through `command` (a timeout on each, output to a log file), and what the tasks print
//! goes through `progress` (one line per phase; `--verbose` streams everything), so CI
//! steps run and read the same way locally.

mod bench;
mod bench_boot;
mod codegen;
mod command;
mod deb;
mod deb_life;
mod demo;
mod disk;
mod expect;
mod fast;
mod fuzz;
mod grub;
mod image;
mod layer;
mod loopdisk;
mod lvm;
mod matrix;
mod phases;
mod progress;
mod qemu;
mod scenario;
mod sdboot;
mod test;
mod tools;

use clap::{Parser, Subcommand};

/// Tasks for building, testing and proving vfio-early.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    /// Stream every command's output (and the guests' consoles) instead of one line
    /// per phase.
    #[arg(long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run every test: formatting, lints, shellcheck, unit and integration tests,
    /// the package life cycle in a chroot and every boot scenario.
    Test {
        /// Stop after the unit and integration tests (no chroot, no VM).
        #[arg(long)]
        no_boot: bool,
    },
    /// The package's life cycle in a Debian 12 chroot: install, apply, upgrade,
    /// remove, purge; then the CLI tests against the installed binary.
    DebTest,
    /// Regenerate man pages and shell completion from the code.
    Codegen {
        /// Fail if a generated file differs instead of writing it.
        #[arg(long)]
        check: bool,
    },
    /// Build target/debian/vfio-early_<version>_amd64.deb (dpkg-buildpackage,
    /// lintian clean).
    Deb {
        /// Override the package version (for upgrade tests).
        #[arg(long)]
        version: Option<String>,
    },
    /// Time `initramfs list` against 3cpio, lsinitramfs and the bare
    /// decompressors on a ~400 MB kernel-tree image (in target/bench/); then the
    /// boots: each phase, and the ratio to a bare boot of the same kernel and
    /// initramfs measured in the same run.
    Bench {
        /// Runs per command; the best is reported.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Boots of each kind (bare, with vfio-early, vfio_early=off).
        #[arg(long, default_value_t = 2)]
        boots: usize,
        /// Only the reader table (no VM boots).
        #[arg(long, conflicts_with = "boot")]
        no_boot: bool,
        /// Only the boots (no reader table).
        #[arg(long)]
        boot: bool,
        /// Also boot every scenario, for the matrix's phases and ratio.
        #[arg(long)]
        matrix: bool,
    },
    /// Bounded mutation fuzzing (stable Rust) of the initramfs reader and the
    /// config parser; crashing inputs are saved under target/fuzz/.
    Fuzz {
        /// Total time budget, split between the two targets.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop each target after this many inputs.
        #[arg(long, default_value_t = u64::MAX)]
        iterations: u64,
        /// Seed of the mutation sequence (same seed, same inputs).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Show vfio-early at work: boots a VM whose emulated GPU and its audio
    /// function come up on vfio-pci, and prints `list` and `status` from inside it.
    Demo {
        /// On a fake machine tree instead of a booted VM (no root, no download).
        #[arg(long)]
        fake: bool,
    },
    /// Build the Debian base images the boot scenarios and deb-test use
    /// (debootstrap from this machine's mirror; cached in target/boot-cache/).
    Images,
    /// Boot every scenario of tests/boot/scenarios/ in QEMU and check the guest's
    /// report (real Debian images, the real package; TCG; a few minutes).
    BootTest {
        /// Run only these scenario files (any path); repeatable.
        #[arg(long, value_name = "FILE")]
        scenario: Vec<std::path::PathBuf>,
        /// Guests booted at once (each takes 1 GiB and a core).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Keep every boot's overlay disk under target/boot-test/ (prepared disks
        /// stay anyway, as a cache).
        #[arg(long)]
        keep: bool,
        /// The early binder alone in a minimal initramfs the harness writes
        /// (seconds a boot; no package, generator or bootloader involved).
        #[arg(long)]
        fast: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    progress::set_verbose(cli.verbose);
    let sh = xshell::Shell::new()?;
    sh.change_dir(project_root());
    match cli.task {
        Task::Test { no_boot } => test::run(&sh, &project_root(), no_boot),
        Task::DebTest => deb_life::run(&sh, &project_root()),
        Task::Images => image::prefetch(&project_root()),
        Task::Codegen { check } => codegen::run(check),
        Task::Deb { version } => deb::build(&sh, version.as_deref(), true).map(|_| ()),
        Task::Demo { fake: true } => demo::run_fake(&sh),
        Task::Demo { fake: false } => demo::run(&sh, &project_root()),
        Task::BootTest {
            scenario,
            fast: true,
            ..
        } => {
            let root = project_root();
            let list = if scenario.is_empty() {
                scenario::load_dir(&root.join("tests/boot/scenarios"))?
            } else {
                scenario
                    .iter()
                    .map(|p| scenario::load(p))
                    .collect::<anyhow::Result<_>>()?
            };
            fast::run(&sh, &root, &list)
        }
        Task::BootTest {
            scenario,
            jobs,
            keep,
            fast: false,
        } => matrix::run(
            &sh,
            &project_root(),
            matrix::Options {
                scenarios: scenario,
                jobs,
                keep,
            },
        ),
        Task::Bench {
            runs,
            boots,
            no_boot,
            boot,
            matrix,
        } => {
            if !boot {
                bench::run(&sh, &project_root(), runs)?;
            }
            if no_boot {
                progress::line("bench: boots SKIPPED (--no-boot)");
                Ok(())
            } else {
                bench_boot::run(&sh, &project_root(), boots, matrix)
            }
        }
        Task::Fuzz {
            seconds,
            iterations,
            seed,
        } => fuzz::run(&project_root(), seconds, iterations, seed),
    }
}

fn project_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| std::path::PathBuf::from("."))
}
