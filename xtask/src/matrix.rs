//! `cargo xtask boot-test`: every scenario under `tests/boot/scenarios/` (or the
//! `--scenario FILE`s) booted for real: the package installed in a Debian image
//! (`layer`), the scenario's config applied there (so the real initramfs-tools or
//! dracut builds the initramfs and `update-grub` writes the command line), the root
//! disk made (`disk`), the image booted in QEMU with an emulated IOMMU (`qemu`), and
//! the guest's own report checked against the scenario's expectations (`expect`).
//! One line per scenario with its phases, then a table summing each phase, then
//! `N passed, N failed`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use xshell::Shell;

use crate::layer::{Layers, State as LayerState};
use crate::phases::{self, Phase, Times};
use crate::qemu::{self, Report};
use crate::scenario::{self, ApplyIn, Boot, Root, Scenario};
use crate::{disk, expect, grub, image, lvm, progress, sdboot};

pub struct Options {
    pub scenarios: Vec<PathBuf>,
    pub jobs: usize,
    /// Keep every boot's overlay disk, not only those of failures (the prepared
    /// disks are kept anyway, as a cache).
    pub keep: bool,
}

/// What the probe reports beyond what the expectations need.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra {
    /// `vfio-early list` and the human `vfio-early status` (the demo shows them).
    pub list_and_status: bool,
    /// A line for each phase of each scenario as it ends (the demo), not only the
    /// scenario's line.
    pub phase_lines: bool,
}

/// One boot of a scenario: the guest's report and where its time went.
pub struct BootResult {
    pub report: Report,
    pub times: Times,
}

/// What a scenario run produced.
pub struct Run {
    pub name: String,
    pub failures: Vec<String>,
    pub elapsed: Duration,
    /// The host-side phases (layer, apply, disk).
    pub prep: Times,
    pub boots: Vec<BootResult>,
    pub dir: PathBuf,
}

impl Run {
    /// The report of the scenario's (first) boot.
    pub fn report(&self) -> Option<&Report> {
        self.boots.first().map(|b| &b.report)
    }

    /// Host and guest phases of the first boot, for one line.
    pub fn times(&self) -> Times {
        let mut t = self.prep.clone();
        if let Some(b) = self.boots.first() {
            t.spans.extend(b.times.spans.clone());
            t.guest = b.times.guest;
        }
        t
    }
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
    let started = Instant::now();
    let runs = run_scenarios(
        sh,
        project,
        &scenarios,
        opts.jobs,
        opts.keep,
        Extra {
            list_and_status: std::env::var_os("XTASK_BASELINE").is_some(),
            phase_lines: false,
        },
    )?;
    let all: Vec<Times> = runs.iter().map(Run::times).collect();
    progress::line("");
    for l in phases::table(&all.iter().collect::<Vec<_>>()) {
        progress::line(&l);
    }
    let failed = runs.iter().filter(|r| !r.failures.is_empty()).count();
    progress::line(&format!(
        "boot-test: {} in {} ({} at a time); logs in {}",
        runs.len(),
        progress::secs(started.elapsed()),
        opts.jobs,
        project.join("target/boot-test").display()
    ));
    progress::line(&format!(
        "{} passed, {} failed",
        runs.len() - failed,
        failed
    ));
    if failed > 0 {
        bail!("{failed} boot scenario(s) failed");
    }
    Ok(())
}

/// Builds the package (or reuses it) and the layers, then boots `scenarios`, `jobs` at
/// a time, printing a line as each ends.
pub fn run_scenarios(
    sh: &Shell,
    project: &Path,
    scenarios: &[Scenario],
    jobs: usize,
    keep: bool,
    extra: Extra,
) -> anyhow::Result<Vec<Run>> {
    crate::tools::ensure_apt(
        sh,
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("qemu-img", "qemu-utils"),
            ("debootstrap", "debootstrap"),
            ("mkfs.ext4", "e2fsprogs"),
        ],
    )?;
    if scenarios.iter().any(|s| s.boot != Boot::Direct) {
        crate::tools::ensure_apt(sh, &[("sfdisk", "fdisk")])?;
    }
    if scenarios.iter().any(|s| s.boot.has_esp()) {
        crate::tools::ensure_apt(sh, &[("mkfs.vfat", "dosfstools"), ("mcopy", "mtools")])?;
        crate::tools::ensure_apt_files(
            sh,
            &[(qemu::OVMF_CODE, "ovmf"), (qemu::OVMF_VARS, "ovmf")],
        )?;
    }
    if scenarios.iter().any(|s| s.boot.is_grub()) {
        crate::tools::ensure_apt(sh, &[("losetup", "mount"), ("partx", "util-linux")])?;
    }
    if scenarios.iter().any(|s| s.boot == Boot::UefiGrub) {
        crate::tools::ensure_apt(sh, &[("fusefat", "fusefat")])?;
    }
    let work = project.join("target/boot-test");
    std::fs::create_dir_all(&work)?;
    // A scenario prepared before rewrites its disk in place; a new one takes up to
    // about 1 GiB (its sparse root disk and the kernel and initramfs beside it), and
    // the layers, images and package want some room of their own.
    let new = scenarios
        .iter()
        .filter(|s| !work.join(s.name()).join(PREPARED_KEY).exists())
        .count() as u64;
    crate::tools::ensure_free_space(
        &work,
        (new + 2) * crate::tools::GIB,
        &format!("{new} new boot scenario(s) of {}", scenarios.len()),
    )?;
    let deb = crate::deb::build(sh, None, false)?;
    let wanted: Vec<_> = scenarios.iter().map(|s| (s.distro, s.generator)).collect();
    let layers = Layers::new(project, &deb, &wanted);

    // The longest first, so that the workers end together (`Scenario::cost`: boots
    // and in-guest rebuilds); otherwise file order.
    let mut ordered = scenarios.to_vec();
    ordered.sort_by_key(|s| std::cmp::Reverse(s.cost()));
    let queue = Arc::new(Mutex::new(ordered));
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            let queue = Arc::clone(&queue);
            let results = Arc::clone(&results);
            let layers = &layers;
            let work = work.clone();
            scope.spawn(move || loop {
                // A scenario whose layer nobody makes yet first (a cold run starts
                // every layer as early as it can, while the other workers boot), then
                // one whose layer is ready, else wait for a layer being made.
                let next = queue.lock().ok().and_then(|mut q| {
                    let state = |s: &Scenario| layers.state(s.distro, s.generator);
                    let pos = q
                        .iter()
                        .position(|s| state(s) == LayerState::NotStarted)
                        .or_else(|| q.iter().position(|s| state(s) == LayerState::Ready))
                        .unwrap_or(0);
                    let s = (pos < q.len()).then(|| q.remove(pos))?;
                    layers.claim(s.distro, s.generator);
                    Some(s)
                });
                let Some(s) = next else { break };
                let run = run_one(&work, layers, &s, keep, extra);
                // With a line per phase (the demo) the scenario's own line would repeat
                // them; a failure is still told.
                if !extra.phase_lines || !run.failures.is_empty() {
                    print_line(&run);
                }
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

fn print_line(run: &Run) {
    let verdict = if run.failures.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let later: String = run
        .boots
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, b)| format!(" · boot {} {}", i + 1, progress::secs(b.times.guest)))
        .collect();
    progress::line(&format!(
        "{verdict}  {:<30} {:>7}  {}{later}",
        run.name,
        progress::secs(run.elapsed),
        run.times().line()
    ));
    if !run.failures.is_empty() {
        progress::line(&format!("      logs: {}", run.dir.display()));
        for f in &run.failures {
            progress::line(&format!("      - {f}"));
        }
    }
}

fn run_one(work: &Path, layers: &Layers, s: &Scenario, keep: bool, extra: Extra) -> Run {
    let started = Instant::now();
    let dir = work.join(s.name());
    let mut run = Run {
        name: s.name(),
        failures: Vec::new(),
        elapsed: Duration::ZERO,
        prep: Times::default(),
        boots: Vec::new(),
        dir: dir.clone(),
    };
    if let Err(e) = boot_scenario(&dir, layers, s, keep, extra, &mut run) {
        run.failures.push(format!("{e:#}"));
    }
    run.elapsed = started.elapsed();
    run
}

/// What a boot needs from the prepared image.
pub struct Prepared {
    pub kernel: Kernel,
    /// The prepared root disk; boots write to an overlay on it.
    pub disk: PathBuf,
}

/// How the prepared image's kernel is started.
#[derive(Clone)]
pub enum Kernel {
    /// By QEMU: the kernel, initramfs and command line copied out of the image.
    Direct {
        kernel: PathBuf,
        initrd: PathBuf,
        append: String,
    },
    /// By UEFI firmware and the bootloader on the disk's ESP.
    Uefi,
    /// By the BIOS and GRUB in the disk's BIOS boot partition.
    Bios,
}

impl Prepared {
    /// The prepared image of `dir`, as `prepare` left it for a scenario booting `boot`.
    fn cached(dir: &Path, boot: Boot) -> anyhow::Result<Prepared> {
        let kernel = match boot {
            Boot::Direct => Kernel::Direct {
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initrd.img"),
                append: std::fs::read_to_string(dir.join("cmdline"))?
                    .trim()
                    .to_string(),
            },
            Boot::UefiSystemdBoot | Boot::UefiUki | Boot::UefiGrub => Kernel::Uefi,
            Boot::BiosGrub => Kernel::Bios,
        };
        Ok(Prepared {
            kernel,
            disk: dir.join("disk.img"),
        })
    }
}

/// The key of the inputs a scenario's directory was prepared from.
const PREPARED_KEY: &str = "prepared.key";

/// Files of a scenario's directory that make up its prepared image, with the key of
/// the inputs they were made from written last.
const PREPARED: &[&str] = &[
    PREPARED_KEY,
    "disk.img",
    "vmlinuz",
    "initrd.img",
    "cmdline",
    "apply.log",
    "apply.exit",
    "prepare.log",
];

/// The key of a scenario's prepared image: the layer (base image, package, probe) and
/// everything of the scenario that reaches the image.
fn prepared_key(layer: &Path, s: &Scenario, flags: &[&str]) -> String {
    let mut h = crate::deb::Fnv::new();
    let mut parts = vec![
        layer.to_string_lossy().into_owned(),
        s.config.clone(),
        s.setup.clone().unwrap_or("\0".into()),
        format!("{:?}", s.apply_in),
        format!("{:?}", s.root),
        format!("{:?}", s.stages),
        flags.join(","),
    ];
    // The scripts the probe runs, as the harness writes them into the image (only
    // where there are stages, so the other scenarios' disks stay cached).
    if !s.stages.is_empty() {
        parts.push(s.stages.iter().map(scenario::Stage::script).collect());
    }
    // A direct boot's key stays what it was before boot modes, so its disk stays cached.
    if s.boot.is_systemd_boot() {
        parts.push(format!(
            "{:?}\0{}\0{}\0{}",
            s.boot,
            sdboot::before_setup(),
            sdboot::install(),
            sdboot::ENV
        ));
    }
    if s.boot.is_grub() {
        parts.push(format!(
            "{:?}\0{}\0{}\0{}",
            s.boot,
            grub::before_setup(s.boot),
            grub::check_installed(s.boot),
            grub::install(s.boot, "DEVICE")
        ));
    }
    for part in parts {
        h.add(part.as_bytes());
        h.add(&[0]);
    }
    format!("{:016x}", h.0)
}

/// The probe's flags for a scenario (see tests/boot/probe.sh).
fn probe_flags(s: &Scenario, extra: Extra) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if s.apply_in == ApplyIn::Guest {
        flags.push("apply-in-guest");
    }
    let status_text = std::iter::once(&s.expect)
        .chain(s.stages.iter().map(|st| &st.expect))
        .any(|e| !e.status_output.is_empty());
    if extra.list_and_status || status_text {
        flags.push("status-text");
    }
    if extra.list_and_status {
        flags.push("list");
    }
    flags
}

/// Prepares the scenario's image (or finds it prepared from the same inputs), boots it
/// and checks the report. `Err` is a harness failure (the scenario fails too, with the
/// reason).
fn boot_scenario(
    dir: &Path,
    layers: &Layers,
    s: &Scenario,
    keep: bool,
    extra: Extra,
    run: &mut Run,
) -> anyhow::Result<()> {
    let name = s.name();
    let layer = {
        let phase = progress::start(&name, "the image layer");
        let made = layers
            .get(s.distro, s.generator)
            .map_err(anyhow::Error::msg)?;
        match made.built {
            Some(d) => {
                run.prep.set(Phase::Layer, d);
                run.prep.note(Phase::Layer, "built");
            }
            None => run.prep.note(Phase::Layer, "cached"),
        }
        drop(phase);
        made.tree
    };
    let say = |what: &str, took: Duration, text: &str| {
        if extra.phase_lines {
            progress::line(&format!("{:<28} {:>7}  {text}", what, progress::secs(took)));
        }
    };
    std::fs::create_dir_all(dir)?;
    let flags = probe_flags(s, extra);
    let key = prepared_key(&layer, s, &flags);
    let key_file = dir.join(PREPARED_KEY);
    let phase = progress::start(&name, "copying the layer, vfio-early apply");
    let prepared = if std::fs::read_to_string(&key_file).is_ok_and(|k| k.trim() == key) {
        run.prep.note(Phase::Apply, "cached");
        run.prep.note(Phase::Disk, "cached");
        say(
            "apply, disk",
            Duration::ZERO,
            "cached: prepared from the same package, layer and scenario",
        );
        Prepared::cached(dir, s.boot)?
    } else {
        for f in PREPARED {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let tree = dir.join("root");
        let prepared = prepare(dir, &layer, &tree, s, &flags)?;
        run.prep.set(Phase::Apply, phase.elapsed());
        say(
            "apply",
            phase.elapsed(),
            "config written, `vfio-early apply` in the image (update-initramfs, update-grub)",
        );
        phase.waiting("making the root disk");
        let disk_started = Instant::now();
        disk::make(
            &tree,
            &prepared.disk,
            s.root,
            s.boot,
            &dir.join("prepare.log"),
        )?;
        image::remove_tree(&tree)?;
        if s.boot.is_grub() {
            phase.waiting("grub-install on the disk (loop device, chroot)");
            grub::install_on_disk(&prepared.disk, s.boot, &dir.join("prepare.log"))?;
        }
        run.prep.set(Phase::Disk, disk_started.elapsed());
        say("disk", disk_started.elapsed(), disk_text(s.boot));
        std::fs::write(&key_file, format!("{key}\n"))?;
        prepared
    };
    if s.apply_in == ApplyIn::Image {
        let text = std::fs::read_to_string(dir.join("apply.log")).unwrap_or_default();
        let code = std::fs::read_to_string(dir.join("apply.exit"))
            .ok()
            .and_then(|c| c.trim().parse().ok());
        expect::check_apply(&s.expect, code, &text, "in the image", &mut run.failures);
    }
    phase.waiting("booting (QEMU, TCG) until the probe powers off");
    let overlay = dir.join("boot.qcow2");
    disk::overlay(&prepared.disk, &overlay, &dir.join("qemu.log"))?;
    let boot = boot(dir, s, &prepared, &overlay, Some(&phase))?;
    drop(phase);
    say(
        "boot",
        boot.times.guest,
        &format!("QEMU start to power-off: {}", boot.times.line()),
    );
    if let Some(line) = &boot.panic {
        run.failures
            .push(format!("the guest kernel panicked: {line}"));
    }
    if run.failures.is_empty() {
        run.failures.extend(expect::check_boot(s, &boot.report));
        run.failures
            .extend(expect::check_console(&s.expect, &boot.console));
        // GRUB booted what the prepared disk holds (the overlay may hold a stage's
        // changes by now).
        let list = initramfs_list(
            dir,
            layers.deb(),
            &s.expect,
            &prepared,
            s.boot,
            &prepared.disk,
        )?;
        run.failures
            .extend(expect::check_initramfs(&s.expect, list.as_deref(), 1));
    }
    if let Some(timeout) = boot.timed_out {
        run.failures.push(format!(
            "the guest did not power off within {} s",
            timeout.as_secs()
        ));
    }
    run.boots.push(BootResult {
        report: boot.report,
        times: boot.times,
    });
    for (i, stage) in s.stages.iter().enumerate() {
        if !run.failures.is_empty() {
            break;
        }
        let n = i + 2;
        let phase = progress::start(&name, &format!("boot {n} (after stage {})", i + 1));
        let failures = stage_boot(dir, layers, s, stage, &prepared, &overlay, n, &phase, run)?;
        run.failures.extend(failures);
    }
    if run.failures.is_empty() && !keep {
        let _ = std::fs::remove_file(&overlay);
    }
    Ok(())
}

/// What the disk phase made, for the demo's line.
fn disk_text(boot: Boot) -> &'static str {
    match boot {
        Boot::Direct => "the root disk (mkfs.ext4 -d)",
        Boot::UefiSystemdBoot | Boot::UefiUki => {
            "the disk: GPT, ESP (mkfs.vfat, mcopy), root (mkfs.ext4 -d)"
        }
        Boot::BiosGrub => {
            "the disk: GPT, BIOS boot partition, root (mkfs.ext4 -d), grub-install i386-pc"
        }
        Boot::UefiGrub => {
            "the disk: GPT, ESP (mkfs.vfat), root (mkfs.ext4 -d), grub-install x86_64-efi"
        }
    }
}

/// Stage `n - 1`'s actions (run at the end of the previous boot, whose report is the
/// last of `run.boots`) checked, then boot `n` on the same disk, with the kernel,
/// initramfs and command line of the guest's grub.cfg as the guest left them, checked
/// against the stage's expectations.
#[allow(clippy::too_many_arguments)]
fn stage_boot(
    dir: &Path,
    layers: &Layers,
    s: &Scenario,
    stage: &scenario::Stage,
    prepared: &Prepared,
    overlay: &Path,
    n: usize,
    phase: &progress::Phase,
    run: &mut Run,
) -> anyhow::Result<Vec<String>> {
    let before = &run.boots.last().context("no boot before a stage")?.report;
    // The stage's actions ran at the end of the boot before, by its probe; a boot
    // that never reached the probe ran none (`scenario::load` sees the stage has none).
    let before_reached = n < 3 || s.stages[n - 3].expect.reaches_probe();
    let mut failures = if before_reached {
        expect::check_actions(&stage.expect, stage.has_actions(), before, n - 1)
    } else {
        Vec::new()
    };
    if !failures.is_empty() {
        return Ok(failures);
    }
    let next = next_boot(dir, prepared, n)?;
    // What GRUB will boot is on the overlay now, before this boot's own actions.
    let list = initramfs_list(dir, layers.deb(), &stage.expect, &next, s.boot, overlay)?;
    phase.waiting(&format!("boot {n}: QEMU until the probe powers off"));
    let boot = boot_nth(dir, s, &next, overlay, n, Some(phase))?;
    failures.extend(
        expect::check_console(&stage.expect, &boot.console)
            .into_iter()
            .map(|f| format!("boot {n}: {f}")),
    );
    if !stage.expect.reaches_probe() {
        failures.extend(expect::check_unreached(&boot.report, boot.timed_out, n));
        run.boots.push(BootResult {
            report: boot.report,
            times: boot.times,
        });
        return Ok(failures);
    }
    if let Some(line) = &boot.panic {
        failures.push(format!("boot {n}: the guest kernel panicked: {line}"));
    }
    if let Some(timeout) = boot.timed_out {
        failures.push(format!(
            "boot {n}: the guest did not power off within {} s",
            timeout.as_secs()
        ));
    }
    if failures.is_empty() {
        let found = if boot.report.complete {
            expect::check_expect(&stage.expect, false, &boot.report)
        } else {
            vec!["the probe's report is missing or cut off".to_string()]
        };
        failures.extend(found.into_iter().map(|f| format!("boot {n}: {f}")));
        failures.extend(expect::check_initramfs(&stage.expect, list.as_deref(), n));
    }
    run.boots.push(BootResult {
        report: boot.report,
        times: boot.times,
    });
    Ok(failures)
}

/// Where a stage's transfer disk is attached, and its size (a kernel, an initramfs
/// and grub.cfg, in a tar archive).
const TRANSFER_ADDR: &str = "11.0";
const TRANSFER_BYTES: u64 = 512 << 20;

/// What boot `n` boots: the kernel, initramfs and grub.cfg the previous boot's probe
/// wrote to the transfer disk, i.e. grub.cfg's default entry as the guest left it.
/// (A firmware boot needs none of this: the bootloader on the disk chooses.)
fn next_boot(dir: &Path, prepared: &Prepared, n: usize) -> anyhow::Result<Prepared> {
    if !matches!(prepared.kernel, Kernel::Direct { .. }) {
        return Ok(Prepared {
            kernel: prepared.kernel.clone(),
            disk: prepared.disk.clone(),
        });
    }
    let into = dir.join(format!("boot-{n}"));
    let _ = std::fs::remove_dir_all(&into);
    std::fs::create_dir_all(&into)?;
    crate::command::run(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(dir.join("transfer.img"))
            .arg("-C")
            .arg(&into),
        &dir.join("prepare.log"),
        Duration::from_secs(120),
    )
    .context("reading the transfer disk the guest wrote (see serial.log's next-boot)")?;
    let cfg = std::fs::read_to_string(into.join("boot/grub/grub.cfg"))
        .context("the transfer disk holds no grub.cfg")?;
    let append =
        image::linux_args_from_grub_cfg(&cfg).context("the guest's grub.cfg has no linux line")?;
    let path_of = |word: &str| -> anyhow::Result<PathBuf> {
        let file = crate::grub::first_file(&cfg, word)
            .with_context(|| format!("the guest's grub.cfg has no {word} line"))?;
        Ok(into.join(file.trim_start_matches('/')))
    };
    Ok(Prepared {
        kernel: Kernel::Direct {
            kernel: path_of("linux")?,
            initrd: path_of("initrd")?,
            append,
        },
        disk: prepared.disk.clone(),
    })
}

/// `vfio-early initramfs list` of the booted initramfs (the file QEMU was handed, or
/// for GRUB the one grub.cfg's default entry names on the disk as the boot left it),
/// by the package's own binary (unpacked from the .deb once), when the expectations
/// read it.
fn initramfs_list(
    dir: &Path,
    deb: &Path,
    e: &scenario::Expect,
    booted: &Prepared,
    boot: Boot,
    disk: &Path,
) -> anyhow::Result<Option<String>> {
    if e.initramfs_has.is_empty() && e.initramfs_lacks.is_empty() {
        return Ok(None);
    }
    let initrd = match (&booted.kernel, boot) {
        (Kernel::Direct { initrd, .. }, _) => initrd.clone(),
        (_, Boot::BiosGrub | Boot::UefiGrub) => {
            grub::booted_initrd(disk, dir, &dir.join("prepare.log"))?
        }
        _ => bail!(
            "initramfs_has and initramfs_lacks read the initramfs QEMU was handed, or the \
             one grub.cfg's default entry names on the disk GRUB booted: direct and GRUB \
             boots only"
        ),
    };
    let initrd = &initrd;
    let unpacked = dir.join("package");
    let binary = unpacked.join("usr/sbin/vfio-early");
    let log = dir.join("prepare.log");
    if !binary.exists() {
        crate::command::run(
            std::process::Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(&unpacked),
            &log,
            Duration::from_secs(120),
        )?;
    }
    let out = dir.join("initramfs-list.txt");
    let _ = std::fs::remove_file(&out);
    let code = crate::command::status(
        std::process::Command::new(&binary)
            .args(["initramfs", "list"])
            .arg(initrd),
        &out,
        Duration::from_secs(120),
    )?;
    if code != Some(0) {
        bail!(
            "vfio-early initramfs list {} failed: see {}",
            initrd.display(),
            out.display()
        );
    }
    // The log's own lines (the command, a blank line) are not the list.
    let text = std::fs::read_to_string(&out)?;
    Ok(Some(
        text.lines()
            .filter(|l| !l.is_empty() && !l.starts_with("### "))
            .map(|l| format!("{l}\n"))
            .collect(),
    ))
}

/// The scenario's tree from the layer: config, setup, apply (in the image, or marked
/// for the guest), the probe's flags; then what boots it: the kernel, initramfs and
/// command line that GRUB would boot, or (firmware boots) the loader entry on the ESP.
/// Apply's output and exit status are kept in `apply.log` and `apply.exit` for the
/// checks; the command line the guest should get in `cmdline`.
fn prepare(
    dir: &Path,
    layer: &Path,
    tree: &Path,
    s: &Scenario,
    flags: &[&str],
) -> anyhow::Result<Prepared> {
    let log = dir.join("prepare.log");
    image::copy_tree(layer, tree, &log)?;
    std::fs::write(tree.join("etc/vfio-early.toml"), &s.config)?;
    if s.root == Root::Lvm {
        let fstab = format!("{} / ext4 errors=remount-ro 0 1\n", lvm::device());
        std::fs::write(tree.join("etc/fstab"), fstab)?;
    }
    match s.boot {
        Boot::Direct => {}
        Boot::UefiSystemdBoot | Boot::UefiUki => sdboot::prepare_tree(tree, &log)?,
        Boot::BiosGrub | Boot::UefiGrub => grub::prepare_tree(tree, s.boot, &log)?,
    }
    if let Some(setup) = &s.setup {
        image::chroot_sh(tree, setup, &log, Duration::from_secs(600))?;
    }
    match s.boot {
        Boot::Direct => {}
        Boot::UefiSystemdBoot | Boot::UefiUki => sdboot::install_loader(tree, &log)?,
        Boot::BiosGrub | Boot::UefiGrub => grub::check_tree(tree, s.boot, &log)?,
    }
    let flag_dir = tree.join("etc/vfio-early-probe");
    std::fs::create_dir_all(&flag_dir)?;
    for f in flags {
        std::fs::write(flag_dir.join(f), "")?;
    }
    let mut paths: Vec<&String> = s.expect.paths().collect();
    for (i, stage) in s.stages.iter().enumerate() {
        // Named by the probe's own count of the boot that runs it.
        let run = scenario::probe_run(s, i + 1);
        std::fs::write(flag_dir.join(format!("stage-{run}.sh")), stage.script())?;
        paths.extend(stage.expect.paths());
    }
    paths.sort();
    paths.dedup();
    if !paths.is_empty() {
        let list: String = paths.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(flag_dir.join("paths"), list)?;
    }
    if s.apply_in == ApplyIn::Image {
        let out = dir.join("apply.log");
        let env = if s.boot.is_systemd_boot() {
            sdboot::ENV
        } else {
            ""
        };
        let script = format!("{env}vfio-early apply");
        let code = image::chroot_status(tree, &script, &out, Duration::from_secs(900))?;
        let shown = code.map_or("killed".to_string(), |c| c.to_string());
        std::fs::write(dir.join("apply.exit"), format!("{shown}\n"))?;
    }
    let (kernel, append) = match s.boot {
        Boot::Direct => direct_kernel(dir, tree, s)?,
        Boot::UefiSystemdBoot => (Kernel::Uefi, sdboot::entry_options(tree)?),
        Boot::UefiUki => (Kernel::Uefi, sdboot::uki_cmdline(tree)?),
        // GRUB boots grub.cfg's default entry, the first.
        Boot::UefiGrub => (Kernel::Uefi, image::grub_linux_args(tree)?),
        Boot::BiosGrub => (Kernel::Bios, image::grub_linux_args(tree)?),
    };
    std::fs::write(dir.join("cmdline"), &append)?;
    Ok(Prepared {
        kernel,
        disk: dir.join("disk.img"),
    })
}

/// The kernel and initramfs copied out of the tree, and grub.cfg's command line.
fn direct_kernel(dir: &Path, tree: &Path, s: &Scenario) -> anyhow::Result<(Kernel, String)> {
    let release = image::kernel_release(tree)?;
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    std::fs::copy(tree.join(format!("boot/vmlinuz-{release}")), &kernel)
        .context("copying the kernel out of the image")?;
    std::fs::copy(tree.join(format!("boot/initrd.img-{release}")), &initrd)
        .context("copying the initramfs out of the image")?;
    let mut append = image::grub_linux_args(tree)?;
    if s.root == Root::Lvm {
        // As grub-mkconfig writes it on a host whose / is on LVM.
        append = with_root(&append, &lvm::device());
    }
    let k = Kernel::Direct {
        kernel,
        initrd,
        append: append.clone(),
    };
    Ok((k, append))
}

/// `append` with its `root=` argument replaced by `root=DEVICE`.
fn with_root(append: &str, device: &str) -> String {
    append
        .split_whitespace()
        .map(|t| {
            if t.starts_with("root=") {
                format!("root={device}")
            } else {
                t.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One boot's outcome.
pub struct Booted {
    pub report: Report,
    /// The serial console's lines.
    pub console: Vec<String>,
    /// The kernel's panic line, if it panicked.
    pub panic: Option<String>,
    pub times: Times,
    /// The timeout, when the guest ran into it.
    pub timed_out: Option<Duration>,
}

/// Boots a prepared image once: QEMU until the probe powers the guest off, the report
/// read from the serial console, the guest's phases from its kernel log.
pub fn boot(
    dir: &Path,
    s: &Scenario,
    p: &Prepared,
    disk: &Path,
    phase: Option<&progress::Phase>,
) -> anyhow::Result<Booted> {
    boot_nth(dir, s, p, disk, 1, phase)
}

/// Boot number `n` of a scenario (logs of boots after the first are `serial-N.log`
/// and `qemu-N.log`). A scenario with stages gets a transfer disk, on which the probe
/// leaves the next boot's kernel, initramfs and grub.cfg.
fn boot_nth(
    dir: &Path,
    s: &Scenario,
    p: &Prepared,
    disk: &Path,
    n: usize,
    phase: Option<&progress::Phase>,
) -> anyhow::Result<Booted> {
    // A boot that runs a stage's actions rebuilds initramfs images under TCG.
    let timeout = boot_timeout() * if n <= s.stages.len() { 3 } else { 1 };
    let suffix = if n == 1 {
        String::new()
    } else {
        format!("-{n}")
    };
    let mut extra = s.qemu_args.clone();
    if !s.stages.is_empty() && matches!(p.kernel, Kernel::Direct { .. }) {
        let transfer = dir.join("transfer.img");
        let _ = std::fs::remove_file(&transfer);
        std::fs::File::create(&transfer)?.set_len(TRANSFER_BYTES)?;
        extra.extend([
            "-drive".to_string(),
            format!("file={},format=raw,if=none,id=xfer", transfer.display()),
            "-device".to_string(),
            format!("virtio-blk-pci,drive=xfer,serial=vfe-transfer,addr={TRANSFER_ADDR}"),
        ]);
    }
    let vars = dir.join("ovmf-vars.fd");
    let loader = match &p.kernel {
        Kernel::Direct {
            kernel,
            initrd,
            append,
        } => qemu::Loader::Direct {
            kernel,
            initrd,
            append,
        },
        Kernel::Uefi => {
            // The first boot starts from the firmware's pristine variables; later boots
            // of the scenario keep what the earlier ones wrote (`bootctl set-oneshot`'s
            // LoaderEntryOneShot, systemd-boot's own), as a machine's NVRAM does.
            if n == 1 || !vars.exists() {
                std::fs::copy(qemu::OVMF_VARS, &vars)
                    .with_context(|| format!("copying {}", qemu::OVMF_VARS))?;
            }
            qemu::Loader::Uefi {
                code: Path::new(qemu::OVMF_CODE),
                vars: &vars,
            }
        }
        Kernel::Bios => qemu::Loader::Bios,
    };
    let outcome = qemu::run(
        &qemu::Boot {
            loader,
            disk: Some(disk),
            iommu: s.iommu,
            devices: &s.devices,
            extra: &extra,
            serial_log: &dir.join(format!("serial{suffix}.log")),
            timeout,
            memory_mib: 1024,
        },
        &dir.join(format!("qemu{suffix}.log")),
        phase,
    )?;
    let text: String = outcome
        .serial
        .iter()
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let report = qemu::parse_report(&text);
    let times = phases::guest(report.section("kmsg"), &outcome.serial, outcome.elapsed);
    Ok(Booted {
        report,
        console: outcome.serial.into_iter().map(|(_, l)| l).collect(),
        panic: outcome.panic,
        times,
        timed_out: outcome.timed_out.then_some(timeout),
    })
}

pub fn boot_timeout() -> Duration {
    let secs = std::env::var("VFIO_EARLY_BOOT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(extra: &str) -> Scenario {
        toml::from_str(&format!(
            "description = \"x\"\ndistro = \"trixie\"\ngenerator = \"initramfs-tools\"\n\
             iommu = \"intel\"\nconfig = \"\"\n{extra}\n[expect]\n"
        ))
        .expect("scenario")
    }

    #[test]
    fn the_boot_mode_keys_the_prepared_image() {
        let layer = Path::new("layers/x");
        let direct = prepared_key(layer, &scenario(""), &[]);
        assert_eq!(
            direct,
            prepared_key(layer, &scenario("boot = \"direct\""), &[]),
            "the default is direct"
        );
        let keys: Vec<String> = ["uefi-systemd-boot", "bios-grub", "uefi-grub"]
            .iter()
            .map(|b| prepared_key(layer, &scenario(&format!("boot = \"{b}\"")), &[]))
            .collect();
        assert!(!keys.contains(&direct));
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[1], keys[2], "one disk per boot mode");
    }

    #[test]
    fn a_grub_boot_has_no_transfer_disk_and_keeps_its_firmware() {
        let bios = Prepared {
            kernel: Kernel::Bios,
            disk: PathBuf::from("disk.img"),
        };
        let next = next_boot(Path::new("/nonexistent"), &bios, 2).expect("no transfer to read");
        assert!(matches!(next.kernel, Kernel::Bios));
        assert_eq!(next.disk, bios.disk);
    }
}
