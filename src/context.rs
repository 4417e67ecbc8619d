//! The one loader: everything a command needs, read once, in one order: the root, the
//! config (its text and its parsed form), the host's files and state, the machine, and
//! the plan for the command's [`PlanMode`].
//!
//! Commands get a [`Context`] and never read their inputs again; the pure parts
//! (planner, `apply::compute`, `status::evaluate`) take it apart. A config that cannot be
//! loaded is a [`ConfigError`]: the caller prints it and exits 2, having read nothing
//! else.

use std::path::{Path, PathBuf};

use crate::config::{self, Config, ConfigError};
use crate::host::Host;
use crate::kmod;
use crate::machine::{self, Machine};
use crate::paths;
use crate::plan::{self, Plan};
use crate::root::Root;

/// What the plan is for; it sets the planner's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    /// A report (`list`, `check`): interlocks judged, nothing overridden.
    Report,
    /// Binding now (`bind`): needs an active IOMMU; `force` overrides interlocks.
    LiveBind { force: bool },
    /// Writing boot configuration (`apply`): reads the installed kernels' module facts
    /// for the softdeps; `force` overrides interlocks.
    Apply { force: bool },
    /// As the early binder plans at boot (`status`): interlocks overridden only when
    /// the last apply was forced.
    AsAppliedAtBoot,
}

/// Whether a missing config file is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigNeed {
    Required,
    /// A missing file is the empty config (reports on a machine not yet configured).
    MissingIsEmpty,
}

/// A command's inputs, read once.
pub struct Context {
    pub root: Root,
    pub config_path: PathBuf,
    /// The config file's text; `None` when it is missing (and that was allowed).
    pub config_text: Option<String>,
    pub config: Config,
    pub host: Host,
    pub machine: Machine,
    pub plan: Plan,
}

impl Context {
    /// Loads everything for `mode`. `config` is `--config` (default: the root's
    /// `etc/vfio-early.toml`).
    pub fn load(
        root: &Path,
        config: Option<&Path>,
        need: ConfigNeed,
        mode: PlanMode,
    ) -> Result<Context, ConfigError> {
        let root = Root::new(root);
        let config_path = config_path(&root, config);
        let (config_text, config) = load_config(&config_path, need)?;
        let mut machine = machine::discover(&root);
        let host = Host::read(&root, machine.cmdline.as_deref());
        if matches!(mode, PlanMode::Apply { .. }) {
            machine.kernels = kmod::read_all(&root, &machine.installed_kernels);
        }
        let opts = plan_options(mode, &host);
        let plan = plan::plan(&config, &machine, opts);
        Ok(Context {
            root,
            config_path,
            config_text,
            config,
            host,
            machine,
            plan,
        })
    }
}

/// `--config`, or the root's `etc/vfio-early.toml`.
pub fn config_path(root: &Root, config: Option<&Path>) -> PathBuf {
    config
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.path(paths::CONFIG))
}

/// The config's text and parsed form; a missing file is `(None, default)` when allowed.
pub fn load_config(path: &Path, need: ConfigNeed) -> Result<(Option<String>, Config), ConfigError> {
    if need == ConfigNeed::MissingIsEmpty && !path.exists() {
        return Ok((None, Config::default()));
    }
    let text = config::read_text(path)?;
    let config = config::parse(&text, path)?;
    Ok((Some(text), config))
}

/// The planner's options for a mode.
pub fn plan_options(mode: PlanMode, host: &Host) -> plan::Options {
    match mode {
        PlanMode::Report => plan::Options::default(),
        PlanMode::LiveBind { force } => plan::Options { force, live: true },
        PlanMode::Apply { force } => plan::Options { force, live: false },
        PlanMode::AsAppliedAtBoot => plan::Options {
            force: host.state.applied.as_ref().is_some_and(|a| a.forced),
            live: false,
        },
    }
}
