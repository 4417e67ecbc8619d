//! `cargo xtask demo`: the demo VM (scenario 4, booted for real); `--fake`: the tool on
//! a fake machine (tests/fixtures/workstation):
//! `list`, `check`, then `bind`, which shows exactly what it would write.

use xshell::{cmd, Shell};

use crate::progress;

pub fn run_fake(sh: &Shell) -> anyhow::Result<()> {
    let tmp = sh.create_temp_dir()?;
    let root = tmp.path().join("workstation");
    let root_s = root.display().to_string();
    cmd!(
        sh,
        "timeout 120 sh tests/fixtures/make-workstation.sh {root_s}"
    )
    .run()?;
    cmd!(sh, "timeout 1800 cargo build --quiet --bin vfio-early").run()?;
    let bin = "target/debug/vfio-early";
    for args in [&["list"][..], &["check"][..]] {
        eprintln!("\n$ vfio-early --root <fake machine> {}", args.join(" "));
        cmd!(sh, "timeout 60 {bin} --root {root_s} {args...}").run()?;
    }
    eprintln!("\n$ vfio-early --root <fake machine> bind   (no kernel here: it says so)");
    let _ = cmd!(sh, "timeout 60 {bin} --root {root_s} bind")
        .ignore_status()
        .run();
    Ok(())
}

/// The main job: scenario 4 (a GPU and its audio function) booted for real, and what
/// `vfio-early list` and `status` printed inside the guest. One line per phase; the
/// logs stay in files named at the end.
pub fn run(sh: &Shell, project: &std::path::Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let path = project.join(DEMO_SCENARIO);
    let mut s = crate::scenario::load(&path)?;
    progress::line(&format!("demo: {}", s.description));
    // Its own directory (target/boot-test/demo/): the demo's probe also prints `list`
    // and `status`, so its prepared image is not the matrix's scenario 4.
    s.path = project.join("target/demo/demo.toml");
    let runs = crate::matrix::run_scenarios(
        sh,
        project,
        &[s],
        1,
        false,
        crate::matrix::Extra {
            list_and_status: true,
            phase_lines: true,
        },
    )?;
    let run = runs
        .first()
        .ok_or_else(|| anyhow::anyhow!("the demo scenario did not run"))?;
    if let Some(report) = run.report() {
        for (title, section) in [("vfio-early list", "list"), ("vfio-early status", "status")] {
            let (text, _) = report.with_exit(section);
            progress::line(&format!("\n(guest) # {title}\n{text}"));
        }
    }
    progress::line(&format!(
        "\ndemo: {}; logs in {} (serial.log, apply.log, prepare.log, qemu.log) and target/debian/*.log",
        progress::secs(started.elapsed()),
        run.dir.display()
    ));
    if !run.failures.is_empty() {
        anyhow::bail!(
            "the demo VM did not show what it should: {}",
            run.failures.join("; ")
        );
    }
    progress::line("The GPU at 00:05.0 and its audio function at 00:05.1 are on vfio-pci;");
    progress::line("the boot display at 00:01.0 kept its driver.");
    Ok(())
}

const DEMO_SCENARIO: &str = "tests/boot/scenarios/04-gpu-with-audio.toml";
