//! `cargo xtask codegen [--check]`: files generated from the code, committed so packaging
//! needs no Rust at build time, and checked for drift in CI (like `cargo fmt --check`):
//! `man/vfio-early.8` and one page per subcommand from the clap definition,
//! `man/vfio-early.toml.5` from the shipped, commented config, and
//! `completions/vfio-early.bash`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::CommandFactory;

fn render_man(cmd: clap::Command) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .section("8")
        .manual("System Administration")
        .render(&mut buf)?;
    Ok(String::from_utf8(buf)?)
}

/// Escapes a line of text for roff.
fn roff_line(line: &str) -> String {
    let escaped = line.replace('\\', "\\e");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

fn render_config_man(shipped: &str, version: &str) -> String {
    let mut out = format!(
        ".TH VFIO-EARLY.TOML 5 \"\" \"vfio-early {version}\" \"File Formats\"\n\
         .SH NAME\n\
         vfio-early.toml \\- which PCI devices vfio-early binds to vfio-pci from early boot\n\
         .SH SYNOPSIS\n\
         /etc/vfio-early.toml\n\
         .SH DESCRIPTION\n\
         The one file an administrator edits. TOML; every key is optional and has a default\n\
         that suits most machines; unknown keys are errors. An error names the file, line\n\
         and column, shows the line and says how to fix it.\n\
         After an edit, run\n\
         .B vfio-early check\n\
         and\n\
         .BR \"vfio-early apply\" .\n\
         .SH \"KEYS AND EXAMPLES\"\n\
         The file as shipped, which documents every key:\n\
         .PP\n\
         .nf\n"
    );
    for line in shipped.lines() {
        out.push_str(&roff_line(line));
        out.push('\n');
    }
    out.push_str(".fi\n.SH \"SEE ALSO\"\n.BR vfio-early (8)\n");
    out
}

/// Every generated file with its content.
fn generate() -> anyhow::Result<Vec<(PathBuf, String)>> {
    let cmd = vfio_early::cli::Cli::command();
    let version = cmd.get_version().unwrap_or("0").to_string();
    let mut files = vec![(PathBuf::from("man/vfio-early.8"), render_man(cmd.clone())?)];
    for sub in cmd.get_subcommands() {
        let name = format!("vfio-early-{}", sub.get_name());
        let page = render_man(sub.clone().name(name.clone()).version(version.clone()))?;
        files.push((PathBuf::from(format!("man/{name}.8")), page));
    }
    let shipped = std::fs::read_to_string("etc/vfio-early.toml").context("etc/vfio-early.toml")?;
    files.push((
        PathBuf::from("man/vfio-early.toml.5"),
        render_config_man(&shipped, &version),
    ));
    let mut bash = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::Bash,
        &mut vfio_early::cli::Cli::command(),
        "vfio-early",
        &mut bash,
    );
    files.push((
        PathBuf::from("completions/vfio-early.bash"),
        String::from_utf8(bash)?,
    ));
    Ok(files)
}

pub fn run(check: bool) -> anyhow::Result<()> {
    let files = generate()?;
    let mut drift = Vec::new();
    for (path, content) in &files {
        let current = std::fs::read_to_string(path).unwrap_or_default();
        if current != *content {
            if check {
                drift.push(path.display().to_string());
            } else {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(path, content)?;
                eprintln!("xtask: wrote {}", path.display());
            }
        }
    }
    // A page left behind by a removed subcommand is drift too.
    for dir in ["man", "completions"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if !files.iter().any(|(f, _)| Path::new(f) == p) {
                drift.push(format!("{} (stale)", p.display()));
            }
        }
    }
    if !drift.is_empty() {
        bail!(
            "generated files differ from the code: {}\nrun `cargo xtask codegen` and commit",
            drift.join(", ")
        );
    }
    if check {
        eprintln!("xtask: {} generated files are current", files.len());
    }
    Ok(())
}
