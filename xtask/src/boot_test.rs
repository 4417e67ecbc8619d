//! `cargo xtask boot-test`: every scenario under `tests/boot/scenarios/` (or one
//! `--scenario FILE`) booted for real: the freshly built .deb installed in a Debian
//! image, the scenario's config applied there (so the real initramfs-tools or dracut
//! builds the initramfs and `update-grub` writes the command line), the image booted
//! in QEMU with an emulated IOMMU, and the guest's own report checked against the
//! scenario's expectations. One line per scenario, then `N passed, N failed`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use xshell::Shell;

use crate::image;
use crate::qemu::{self, Report};
use crate::scenario::{self, ApplyIn, Distro, Generator, Scenario};

pub struct Options {
    pub scenarios: Vec<PathBuf>,
    pub jobs: usize,
    /// Keep every scenario's disk image, not only those of failures.
    pub keep: bool,
}

/// A layer made on first use: empty until then, then its tree or why it failed.
type LayerSlot = Mutex<Option<Result<PathBuf, String>>>;

/// What a scenario run produced.
pub struct Run {
    pub name: String,
    pub failures: Vec<String>,
    pub elapsed: Duration,
    /// The QEMU part of `elapsed`.
    pub boot: Duration,
    pub dir: PathBuf,
    pub report: Report,
}

pub fn run(sh: &Shell, project: &Path, opts: Options) -> anyhow::Result<()> {
    let scenarios = if opts.scenarios.is_empty() {
        scenario::load_dir(&project.join("tests/boot/scenarios"))?
    } else {
        opts.scenarios
            .iter()
            .map(|p| scenario::load(p))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    if scenarios.is_empty() {
        bail!("no scenario to run");
    }
    let runs = run_scenarios(sh, project, &scenarios, opts.jobs, opts.keep)?;
    let failed = runs.iter().filter(|r| !r.failures.is_empty()).count();
    println!("{} passed, {} failed", runs.len() - failed, failed);
    if failed > 0 {
        bail!("{failed} boot scenario(s) failed");
    }
    Ok(())
}

/// Builds the package and images, then boots `scenarios`, `jobs` at a time, printing a
/// line as each ends.
pub fn run_scenarios(
    sh: &Shell,
    project: &Path,
    scenarios: &[Scenario],
    jobs: usize,
    keep: bool,
) -> anyhow::Result<Vec<Run>> {
    crate::tools::ensure_apt(
        sh,
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("debootstrap", "debootstrap"),
            ("mkfs.ext4", "e2fsprogs"),
        ],
    )?;
    let deb = crate::deb::build(sh, None, false)?;
    let work = project.join("target/boot-test");
    std::fs::create_dir_all(&work)?;

    // Each (distro, generator) layer is made by the first worker that needs it while
    // the other workers boot what is ready, so a cold debootstrap overlaps with boots.
    let bases: BTreeSet<(Distro, Generator)> =
        scenarios.iter().map(|s| (s.distro, s.generator)).collect();
    let layers: Arc<Vec<((Distro, Generator), LayerSlot)>> =
        Arc::new(bases.into_iter().map(|k| (k, Mutex::new(None))).collect());
    let deb = deb.as_path();

    let queue = Arc::new(Mutex::new(scenarios.to_vec()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let total = scenarios.len();
    eprintln!("boot-test: {total} scenario(s), {jobs} at a time");
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            let queue = Arc::clone(&queue);
            let results = Arc::clone(&results);
            let layers = Arc::clone(&layers);
            let work = work.clone();
            scope.spawn(move || loop {
                let next = queue.lock().ok().and_then(|mut q| {
                    if q.is_empty() {
                        None
                    } else {
                        Some(q.remove(0))
                    }
                });
                let Some(s) = next else { break };
                let layer = layers
                    .iter()
                    .find(|(k, _)| *k == (s.distro, s.generator))
                    .map(|(_, slot)| layer_for(project, &work, deb, s.distro, s.generator, slot))
                    .unwrap_or_else(|| Err("no image layer".into()));
                let run = match layer {
                    Ok(tree) => run_one(&work, &tree, &s, keep),
                    Err(why) => failed_run(&work, &s, why),
                };
                print_line(&run);
                if let Ok(mut r) = results.lock() {
                    r.push(run);
                }
            });
        }
    });
    let mut runs = Arc::try_unwrap(results)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default();
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(runs)
}

/// The layer for (distro, generator): made once, by the first caller; the others wait
/// on the slot's lock. A failure is remembered, so every scenario of that layer fails
/// with the same reason instead of retrying.
fn layer_for(
    project: &Path,
    work: &Path,
    deb: &Path,
    distro: Distro,
    generator: Generator,
    slot: &LayerSlot,
) -> Result<PathBuf, String> {
    let mut guard = slot
        .lock()
        .map_err(|_| "a layer builder panicked".to_string())?;
    if let Some(done) = guard.as_ref() {
        return done.clone();
    }
    let made = image::ensure_base(project, distro, generator)
        .and_then(|base| prepare_layer(project, work, &base, deb, distro, generator))
        .map_err(|e| format!("image {}/{}: {e:#}", distro.name(), generator.name()));
    *guard = Some(made.clone());
    made
}

fn print_line(run: &Run) {
    let secs = run.elapsed.as_secs_f64();
    if run.failures.is_empty() {
        println!(
            "PASS  {:<34} {secs:>6.1} s (boot {:.1} s)",
            run.name,
            run.boot.as_secs_f64()
        );
    } else {
        println!(
            "FAIL  {:<34} {secs:>6.1} s  log: {}",
            run.name,
            run.dir.join("serial.log").display()
        );
        for f in &run.failures {
            println!("      - {f}");
        }
    }
}

fn failed_run(work: &Path, s: &Scenario, why: String) -> Run {
    Run {
        name: s.name(),
        failures: vec![why],
        elapsed: Duration::ZERO,
        boot: Duration::ZERO,
        dir: work.join(s.name()),
        report: Report::default(),
    }
}

/// Layer 2, made once per run and base image: the base copied, the package installed
/// the way users do, the probe added. Returns the layer's tree.
fn prepare_layer(
    project: &Path,
    work: &Path,
    base: &Path,
    deb: &Path,
    distro: Distro,
    generator: Generator,
) -> anyhow::Result<PathBuf> {
    let tree = work.join(format!("layer-{}-{}", distro.name(), generator.name()));
    let log = work.join(format!("layer-{}-{}.log", distro.name(), generator.name()));
    let _ = std::fs::remove_file(&log);
    let started = Instant::now();
    eprintln!(
        "boot-test: installing the package into {}/{} (log {})",
        distro.name(),
        generator.name(),
        log.display()
    );
    image::copy_tree(base, &tree, &log)?;
    let name = deb
        .file_name()
        .context("package path has no file name")?
        .to_string_lossy()
        .into_owned();
    std::fs::copy(deb, tree.join("tmp").join(&name))?;
    image::chroot_sh(
        &tree,
        &format!("apt-get install -y -q /tmp/{name}\nrm /tmp/{name}"),
        &log,
        Duration::from_secs(600),
    )?;
    install_probe(project, &tree)?;
    eprintln!(
        "boot-test: {}/{} ready in {:.0} s",
        distro.name(),
        generator.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(tree)
}

fn install_probe(project: &Path, tree: &Path) -> anyhow::Result<()> {
    let probe = tree.join("usr/local/sbin/vfio-early-probe");
    std::fs::create_dir_all(tree.join("usr/local/sbin"))?;
    std::fs::copy(project.join("tests/boot/probe.sh"), &probe)?;
    set_mode(&probe, 0o755)?;
    let unit = tree.join("etc/systemd/system/vfio-early-probe.service");
    std::fs::copy(project.join("tests/boot/vfio-early-probe.service"), &unit)?;
    let wants = tree.join("etc/systemd/system/sysinit.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("vfio-early-probe.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/vfio-early-probe.service", link)?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn run_one(work: &Path, layer: &Path, s: &Scenario, keep: bool) -> Run {
    let started = Instant::now();
    let dir = work.join(s.name());
    let mut run = Run {
        name: s.name(),
        failures: Vec::new(),
        elapsed: Duration::ZERO,
        boot: Duration::ZERO,
        dir: dir.clone(),
        report: Report::default(),
    };
    match boot_scenario(&dir, layer, s, keep) {
        Ok((report, failures, boot)) => {
            run.boot = boot;
            run.report = report;
            run.failures = failures;
        }
        Err(e) => run.failures.push(format!("{e:#}")),
    }
    run.elapsed = started.elapsed();
    run
}

/// Prepares the scenario's image, boots it and checks the report. `Err` is a harness
/// failure (the scenario fails too, with the reason).
fn boot_scenario(
    dir: &Path,
    layer: &Path,
    s: &Scenario,
    keep: bool,
) -> anyhow::Result<(Report, Vec<String>, Duration)> {
    image::remove_tree(dir)?;
    std::fs::create_dir_all(dir)?;
    let log = dir.join("prepare.log");
    let tree = dir.join("root");
    image::copy_tree(layer, &tree, &log)?;
    std::fs::write(tree.join("etc/vfio-early.toml"), &s.config)?;
    if let Some(setup) = &s.setup {
        image::chroot_sh(&tree, setup, &log, Duration::from_secs(600))?;
    }
    let mut failures = Vec::new();
    match s.apply_in {
        ApplyIn::Image => {
            let out = dir.join("apply.log");
            let code =
                image::chroot_status(&tree, "vfio-early apply", &out, Duration::from_secs(900))?;
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            check_apply(&s.expect, code, &text, "in the image", &mut failures);
        }
        ApplyIn::Guest => {
            std::fs::create_dir_all(tree.join("etc/vfio-early-probe"))?;
            std::fs::write(tree.join("etc/vfio-early-probe/apply-in-guest"), "")?;
        }
    }
    let release = image::kernel_release(&tree)?;
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    std::fs::copy(tree.join(format!("boot/vmlinuz-{release}")), &kernel)
        .context("copying the kernel out of the image")?;
    std::fs::copy(tree.join(format!("boot/initrd.img-{release}")), &initrd)
        .context("copying the initramfs out of the image")?;
    let append = image::grub_linux_args(&tree)?;
    std::fs::write(dir.join("cmdline"), &append)?;
    let disk = dir.join("disk.img");
    image::make_disk(&tree, &disk, &log)?;
    image::remove_tree(&tree)?;

    let serial = dir.join("serial.log");
    let outcome = qemu::run(
        &qemu::Boot {
            kernel: &kernel,
            initrd: &initrd,
            append: &append,
            disk: Some(&disk),
            iommu: s.iommu,
            devices: &s.devices,
            extra: &s.qemu_args,
            serial_log: &serial,
            timeout: boot_timeout(),
            memory_mib: 1024,
        },
        &dir.join("qemu.log"),
    )?;
    let report = qemu::read_report(&serial);
    if outcome.timed_out {
        failures.push(format!(
            "the guest did not power off within {} s",
            boot_timeout().as_secs()
        ));
    }
    if !report.complete {
        failures.push("the probe's report is missing or cut off (see serial.log)".into());
    } else {
        failures.extend(check_report(s, &report));
    }
    if failures.is_empty() && !keep {
        let _ = std::fs::remove_file(&disk);
    }
    Ok((report, failures, outcome.elapsed))
}

fn boot_timeout() -> Duration {
    let secs = std::env::var("VFIO_EARLY_BOOT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

fn check_apply(
    e: &scenario::Expect,
    code: Option<i32>,
    text: &str,
    where_: &str,
    failures: &mut Vec<String>,
) {
    if code != Some(e.apply_exit) {
        failures.push(format!(
            "apply {where_} exited {code:?}, expected {}: {}",
            e.apply_exit,
            last_lines(text, 6)
        ));
    }
    for want in &e.apply_output {
        if !text.contains(want.as_str()) {
            failures.push(format!("apply {where_} did not say `{want}`"));
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Checks the guest's report against the scenario; one message per unmet expectation.
pub fn check_report(s: &Scenario, r: &Report) -> Vec<String> {
    let e = &s.expect;
    let mut f = Vec::new();
    if s.apply_in == ApplyIn::Guest {
        let (text, code) = r.with_exit("guest-apply");
        check_apply(e, code, &text, "in the guest", &mut f);
    }
    let cmdline: Vec<&str> = r
        .section("cmdline")
        .first()
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    for t in &e.cmdline {
        if !cmdline.contains(&t.as_str()) {
            f.push(format!("/proc/cmdline lacks `{t}`: {}", cmdline.join(" ")));
        }
    }
    for t in &e.cmdline_absent {
        if cmdline.contains(&t.as_str()) {
            f.push(format!("/proc/cmdline has `{t}`"));
        }
    }
    for (addr, want) in &e.drivers {
        let found = r
            .section("drivers")
            .iter()
            .find(|l| l.split_whitespace().next() == Some(addr.as_str()))
            .and_then(|l| l.split_whitespace().nth(3).map(str::to_string));
        let ok = match (&found, want.as_str()) {
            (None, "absent") => true,
            (None, _) => false,
            (Some(d), "not vfio-pci") => d != "vfio-pci",
            (Some(d), w) => d == w,
        };
        if !ok {
            f.push(format!(
                "{addr}: driver {}, expected {want}",
                found.as_deref().unwrap_or("(no such device)")
            ));
        }
    }
    let modules = r.section("modules");
    for m in &e.modules_loaded {
        if !modules.iter().any(|l| l.trim() == m) {
            f.push(format!("module {m} is not loaded"));
        }
    }
    if e.guest_files_absent {
        for l in r.section("guest-files") {
            if !l.contains("No such file") {
                f.push(format!("apply in the guest left a file: {l}"));
            }
        }
    }
    let kmsg = r.section("kmsg").join("\n");
    for want in &e.kmsg {
        if !kmsg.contains(want.as_str()) {
            f.push(format!("kernel log lacks `{want}`"));
        }
    }
    if let Some(want) = e.vfio_group_nodes {
        let has = r
            .section("vfio-dev")
            .iter()
            .any(|l| l.split_whitespace().any(|t| t.parse::<u32>().is_ok()));
        if has != want {
            f.push(format!(
                "/dev/vfio group nodes present: {has}, expected {want}"
            ));
        }
    }
    let (status_text, _) = r.with_exit("status");
    for want in &e.status_output {
        if !status_text.contains(want.as_str()) {
            f.push(format!("`vfio-early status` did not say `{want}`"));
        }
    }
    if !e.status.is_empty() || e.status_verdict.is_some() {
        let (json, _) = r.with_exit("status-json");
        match serde_json::from_str::<serde_json::Value>(&json) {
            Ok(v) => f.extend(check_status(e, &v)),
            Err(err) => f.push(format!("status --json is not JSON ({err})")),
        }
    }
    f
}

fn check_status(e: &scenario::Expect, v: &serde_json::Value) -> Vec<String> {
    let mut f = Vec::new();
    if let Some(want) = &e.status_verdict {
        let got = v["verdict"].as_str().unwrap_or("?");
        if got != want {
            f.push(format!("status verdict {got}, expected {want}"));
        }
    }
    let checks = v["checks"].as_array().cloned().unwrap_or_default();
    for (key, want) in &e.status {
        let found = checks.iter().find(|c| {
            let id = c["id"].as_str().unwrap_or("");
            match c["device"].as_str() {
                Some(d) => key == id || *key == format!("{id} {d}"),
                None => key == id,
            }
        });
        match found {
            None => f.push(format!("status has no check `{key}`")),
            Some(c) => {
                let got = c["verdict"].as_str().unwrap_or("?");
                if got != want {
                    f.push(format!(
                        "status {key}: {got}, expected {want} ({})",
                        c["summary"].as_str().unwrap_or("")
                    ));
                }
            }
        }
    }
    f
}
