//! Command-line types (clap derive) and the dispatch to one module per subcommand.
//!
//! Exit status contract: 0 ok, 1 a check or action failed, 2 bad usage or bad config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Declarative PCI passthrough: bind chosen devices to vfio-pci from early boot.
#[derive(Debug, Parser)]
#[command(name = "vfio-early", version, max_term_width = 80)]
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
    /// config takes it.
    List {
        /// Print stable JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the process arguments, runs the command, maps the outcome to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vfio-early: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = crate::root::Root::new(&cli.root);
    match cli.cmd {
        Cmd::List { json: _ } => {
            for d in crate::pci::enumerate_devices(&root) {
                println!("{}", d.address);
            }
            Ok(ExitCode::SUCCESS)
        }
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
