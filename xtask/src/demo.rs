//! `cargo xtask demo --fake`: the tool on a fake machine (tests/fixtures/workstation):
//! `list`, `check`, then `bind`, which shows exactly what it would write.

use xshell::{cmd, Shell};

pub fn run_fake(sh: &Shell) -> anyhow::Result<()> {
    let tmp = sh.create_temp_dir()?;
    let root = tmp.path().join("workstation");
    let root_s = root.display().to_string();
    cmd!(sh, "sh tests/fixtures/make-workstation.sh {root_s}").run()?;
    cmd!(sh, "cargo build --quiet --bin vfio-early").run()?;
    let bin = "target/debug/vfio-early";
    for args in [&["list"][..], &["check"][..]] {
        eprintln!("\n$ vfio-early --root <fake machine> {}", args.join(" "));
        cmd!(sh, "{bin} --root {root_s} {args...}").run()?;
    }
    eprintln!("\n$ vfio-early --root <fake machine> bind   (no kernel here: it says so)");
    let _ = cmd!(sh, "{bin} --root {root_s} bind").ignore_status().run();
    Ok(())
}
