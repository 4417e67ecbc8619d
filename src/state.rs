//! vfio-early's own state under `/var/lib/vfio-early/`: the manifest of what `apply`
//! wrote (for `undo`, `status` and purge) and the config as of the last apply (what the
//! initramfs hooks copy into the image), and apply's `--force` marker: a file of its
//! own, so that no config text can forge it.
//!
//! Both `apply` and `status` read the state through [`State::read`]; only `apply` writes
//! it (through its `Writer`). The formats are stable: the manifest is JSON with a schema
//! number, fields added but never renamed.

use std::io;

use serde::{Deserialize, Serialize};

use crate::paths;
use crate::root::Root;

/// The applied config's text: a header, then the config as it was.
pub fn render_applied(config_text: &str) -> String {
    format!(
        "# The config as of the last `vfio-early apply`; the initramfs hooks copy this\n\
         # file into the image. Edit /etc/vfio-early.toml instead.\n{config_text}"
    )
}

/// The text of the forced marker file.
pub const FORCED_TEXT: &str = "# `vfio-early apply --force` was used: the early binder \
overrides interlocks at boot too.\n# `vfio-early apply` without --force removes this file.\n";

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

impl Manifest {
    /// True when the manifest records nothing: no file, token or pending command.
    pub fn owns_nothing(&self) -> bool {
        self.files.is_empty()
            && self.cmdline_added.is_empty()
            && self.pending.is_empty()
            && self.cmdline_after.is_none()
    }

    pub fn to_json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }
}

/// The config of the last apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The whole file, header and marker included.
    pub text: String,
    /// Applied with `--force` (the marker file exists).
    pub forced: bool,
}

impl Applied {
    /// Whether `config_text` is the config this snapshot was made from.
    pub fn is_of(&self, config_text: &str) -> bool {
        self.text.ends_with(config_text)
    }
}

/// The state as read from the root. A damaged manifest is kept as its error, so that
/// `status` can still report and `apply` can refuse with the reason.
#[derive(Debug, Clone)]
pub struct State {
    pub manifest: Result<Option<Manifest>, String>,
    pub applied: Option<Applied>,
}

impl Default for State {
    /// Nothing applied.
    fn default() -> Self {
        State {
            manifest: Ok(None),
            applied: None,
        }
    }
}

impl State {
    pub fn read(root: &Root) -> State {
        State {
            manifest: read_manifest(root),
            applied: root
                .read_to_string(paths::APPLIED)
                .ok()
                .map(|text| Applied {
                    forced: root.exists(paths::FORCED),
                    text,
                }),
        }
    }

    /// The manifest, or the error that makes it unusable (for apply and undo).
    pub fn manifest(&self) -> anyhow::Result<Option<&Manifest>> {
        match &self.manifest {
            Ok(m) => Ok(m.as_ref()),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    }

    /// The manifest when it can be read; `None` when absent or damaged (reports).
    pub fn manifest_if_any(&self) -> Option<&Manifest> {
        self.manifest.as_ref().ok().and_then(Option::as_ref)
    }
}

fn read_manifest(root: &Root) -> Result<Option<Manifest>, String> {
    let damaged = |e: &dyn std::fmt::Display| {
        format!(
            "{}: the manifest is damaged ({e}); move it aside and run apply again",
            root.path(paths::MANIFEST).display()
        )
    };
    match root.read_to_string(paths::MANIFEST) {
        Ok(text) => {
            let m: Manifest = serde_json::from_str(&text).map_err(|e| damaged(&e))?;
            // Entries name paths under the root: `..` or absolute ones are never followed.
            for entry in m.files.iter().chain(&m.dirs_created) {
                Root::checked_rel(entry).map_err(|e| damaged(&e))?;
            }
            Ok(Some(m))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "reading {}: {e}",
            root.path(paths::MANIFEST).display()
        )),
    }
}
