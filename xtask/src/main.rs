//! `cargo xtask`: the project's task runner. One module per task; external commands run
//! through xshell (with `timeout` where they could hang), so CI steps run the same way
//! locally.

mod bench;
mod codegen;
mod deb;
mod demo;
mod fuzz;
mod test;
mod tools;

use clap::{Parser, Subcommand};

/// Tasks for building, testing and proving vfio-early.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run every test: formatting, lints, shellcheck, unit and integration tests.
    Test,
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
    /// decompressors on a ~400 MB kernel-tree image (in target/bench/).
    Bench {
        /// Runs per command; the best is reported.
        #[arg(long, default_value_t = 5)]
        runs: u32,
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
    /// Show vfio-early at work.
    Demo {
        /// On a fake machine tree instead of a booted VM.
        #[arg(long)]
        fake: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sh = xshell::Shell::new()?;
    sh.change_dir(project_root());
    match cli.task {
        Task::Test => test::run(&sh),
        Task::Codegen { check } => codegen::run(check),
        Task::Deb { version } => deb::build(&sh, version.as_deref()).map(|_| ()),
        Task::Bench { runs } => bench::run(&sh, &project_root(), runs),
        Task::Fuzz {
            seconds,
            iterations,
            seed,
        } => fuzz::run(&project_root(), seconds, iterations, seed),
        Task::Demo { fake: _ } => demo::run_fake(&sh),
    }
}

fn project_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| std::path::PathBuf::from("."))
}
