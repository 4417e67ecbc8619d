//! `cargo xtask boot-test --fast`: the early binder alone, booted in seconds. The
//! harness writes a minimal initramfs itself with the `cpio` crate: busybox-static, our
//! binary (with the shared libraries it links), the Debian 12 kernel's vfio modules and
//! the drivers of the emulated devices (from the cached base image), the scenario's
//! config, the boot tests' probe (tests/boot/probe.sh, binder sections only) and an
//! `/init` that runs `vfio-early bind --early`, then loads drivers for every device as
//! udev would, then the probe, which reports and powers off.
//!
//! Only what the early binder decides is checked (drivers, kernel log, `/dev/vfio`,
//! modules): no bootloader, no generator, no `status`. Scenarios that need those
//! (another distro or generator, a setup script, apply in the guest) are reported as
//! skipped, with the reason.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cpio::newc::{Builder, ModeFileType};
use xshell::{cmd, Shell};

use crate::image;
use crate::progress;
use crate::qemu;
use crate::scenario::{ApplyIn, Distro, Generator, Scenario};

/// Drivers of every device the scenarios emulate (modprobe'd by modalias at boot).
const DRIVERS: &[&str] = &[
    "vfio",
    "vfio_iommu_type1",
    "vfio_pci",
    "e1000e",
    "bochs",
    "radeon",
    "snd_hda_intel",
];

/// The fast tier's `/init`: the early binder, then what udev would do, then the boot
/// tests' own probe (tests/boot/probe.sh, the same report as every boot), which powers
/// off.
const INIT: &str = r#"#!/bin/sh
# vfio-early fast tier: the early binder alone, then what udev would do.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
vfio-early bind --early
for d in /sys/bus/pci/devices/*; do
    modprobe -q "$(cat "$d/modalias")" 2>/dev/null
done
exec /bin/sh /usr/local/sbin/vfio-early-probe
"#;

/// Why a scenario cannot run in the fast tier, if it cannot.
pub fn unsupported(s: &Scenario) -> Option<&'static str> {
    if s.distro != Distro::Bookworm || s.generator != Generator::InitramfsTools {
        return Some("the fast tier boots the Debian 12 kernel only");
    }
    if s.setup.is_some() {
        return Some("needs its image setup script");
    }
    if s.apply_in == ApplyIn::Guest {
        return Some("runs apply in a full guest");
    }
    None
}

pub fn run(sh: &Shell, project: &Path, scenarios: &[Scenario]) -> anyhow::Result<()> {
    crate::tools::ensure_apt(
        sh,
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox-static"),
            ("debootstrap", "debootstrap"),
        ],
    )?;
    let work = project.join("target/boot-test/fast");
    let phase = progress::start("fast: cargo build --release", "the binary");
    crate::command::run(
        std::process::Command::new("cargo")
            .args(["build", "--release", "--bin", "vfio-early"])
            .current_dir(project),
        &work.join("build.log"),
        Duration::from_secs(1800),
    )?;
    drop(phase);
    let base = image::ensure_base(project, Distro::Bookworm, Generator::InitramfsTools)?;
    let release = image::kernel_release(&base)?;
    std::fs::create_dir_all(&work)?;
    let common = common_files(sh, project, &base, &release)?;

    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for s in scenarios {
        if let Some(why) = unsupported(s) {
            progress::line(&format!("SKIP  {:<30} {why}", s.name()));
            skipped += 1;
            continue;
        }
        let started = Instant::now();
        let dir = work.join(s.name());
        std::fs::create_dir_all(&dir)?;
        let phase = progress::start(&s.name(), "booting the early binder alone");
        let (failures, times) = boot_one(&dir, &base, &release, &common, s)
            .unwrap_or_else(|e| (vec![format!("{e:#}")], Default::default()));
        drop(phase);
        let took = progress::secs(started.elapsed());
        if failures.is_empty() {
            progress::line(&format!(
                "PASS  {:<30} {took:>7}  {}",
                s.name(),
                times.line()
            ));
            passed += 1;
        } else {
            progress::line(&format!(
                "FAIL  {:<30} {took:>7}  log: {}",
                s.name(),
                dir.join("serial.log").display()
            ));
            for f in &failures {
                progress::line(&format!("      - {f}"));
            }
            failed += 1;
        }
    }
    progress::line(&format!(
        "{passed} passed, {failed} failed, {skipped} skipped (fast tier)"
    ));
    if failed > 0 {
        bail!("{failed} fast boot scenario(s) failed");
    }
    Ok(())
}

/// (path in the image, source on the host or inline bytes, mode)
enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
    Dir,
    Link(String),
}

struct Entry {
    path: String,
    source: Source,
    mode: u32,
}

fn common_files(
    sh: &Shell,
    project: &Path,
    base: &Path,
    release: &str,
) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut dirs = BTreeSet::new();
    let mut add = |path: &str, source: Source, mode: u32| {
        let mut parent = Path::new(path).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.insert(d.clone()) {
                out.push(Entry {
                    path: d,
                    source: Source::Dir,
                    mode: 0o755,
                });
            }
        }
        out.push(Entry {
            path: path.to_string(),
            source,
            mode,
        });
    };
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        add(&format!("{d}/.keep"), Source::Bytes(Vec::new()), 0o644);
    }
    add("init", Source::Bytes(INIT.as_bytes().to_vec()), 0o755);
    add(
        "usr/local/sbin/vfio-early-probe",
        Source::Host(project.join("tests/boot/probe.sh")),
        0o755,
    );
    // Only what the binder decides: no list, no status (no /boot, no package here).
    add(
        "etc/vfio-early-probe/binder-only",
        Source::Bytes(Vec::new()),
        0o644,
    );
    add("bin/busybox", Source::Host("/bin/busybox".into()), 0o755);
    add("bin/sh", Source::Link("busybox".into()), 0o777);
    let bin = project.join("target/release/vfio-early");
    add("usr/sbin/vfio-early", Source::Host(bin.clone()), 0o755);
    // The shared libraries the binary links, at the paths the loader looks for.
    let bin_s = bin.display().to_string();
    let ldd = cmd!(sh, "timeout 60 ldd {bin_s}").read().context("ldd")?;
    for lib in ldd.split_whitespace().filter(|t| t.starts_with('/')) {
        let real = std::fs::canonicalize(lib).with_context(|| format!("resolving {lib}"))?;
        add(lib.trim_start_matches('/'), Source::Host(real), 0o755);
    }
    // Modules with their dependencies, from the image's modules.dep.
    let mdir = format!("lib/modules/{release}");
    let dep = std::fs::read_to_string(base.join(&mdir).join("modules.dep"))
        .context("modules.dep of the base image")?;
    let mut wanted: Vec<String> = Vec::new();
    for name in DRIVERS {
        let line = dep
            .lines()
            .find(|l| {
                let path = l.split(':').next().unwrap_or("");
                let file = path.rsplit('/').next().unwrap_or("");
                let stem = file.split(".ko").next().unwrap_or("").replace('-', "_");
                stem == *name
            })
            .with_context(|| format!("module {name} not in modules.dep"))?;
        let (m, deps) = line.split_once(':').unwrap_or((line, ""));
        for p in std::iter::once(m).chain(deps.split_whitespace()) {
            if !wanted.iter().any(|w| w == p) {
                wanted.push(p.to_string());
            }
        }
    }
    for p in &wanted {
        add(
            &format!("{mdir}/{p}"),
            Source::Host(base.join(&mdir).join(p)),
            0o644,
        );
    }
    for f in [
        "modules.dep",
        "modules.alias",
        "modules.builtin",
        "modules.order",
    ] {
        add(
            &format!("{mdir}/{f}"),
            Source::Host(base.join(&mdir).join(f)),
            0o644,
        );
    }
    Ok(out)
}

fn boot_one(
    dir: &Path,
    base: &Path,
    release: &str,
    common: &[Entry],
    s: &Scenario,
) -> anyhow::Result<(Vec<String>, crate::phases::Times)> {
    let initrd = dir.join("initrd.cpio");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&initrd)?);
    let config = Entry {
        path: "etc/vfio-early.toml".into(),
        source: Source::Bytes(s.config.as_bytes().to_vec()),
        mode: 0o644,
    };
    for (ino, e) in common.iter().chain(std::iter::once(&config)).enumerate() {
        let data = match &e.source {
            Source::Host(p) => {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))?
            }
            Source::Bytes(b) => b.clone(),
            Source::Dir => Vec::new(),
            Source::Link(t) => t.as_bytes().to_vec(),
        };
        let b = Builder::new(&e.path)
            .ino(u32::try_from(ino + 1)?)
            .uid(0)
            .gid(0)
            .nlink(1);
        let b = match e.source {
            Source::Dir => b.mode(e.mode).set_mode_file_type(ModeFileType::Directory),
            Source::Link(_) => b.mode(e.mode).set_mode_file_type(ModeFileType::Symlink),
            _ => b.mode(e.mode).set_mode_file_type(ModeFileType::Regular),
        };
        let mut out = b.write(&mut w, u32::try_from(data.len())?);
        out.write_all(&data)?;
        out.finish()?;
    }
    cpio::newc::trailer(&mut w)?;
    w.flush()?;
    drop(w);

    let mut append = vec![
        "console=ttyS0".to_string(),
        "no_timer_check".to_string(),
        "mitigations=off".to_string(),
        "quiet".to_string(),
    ];
    append.extend(s.expect.cmdline.iter().cloned());
    let append = append.join(" ");
    let serial = dir.join("serial.log");
    let kernel = base.join(format!("boot/vmlinuz-{release}"));
    let outcome = qemu::run(
        &qemu::Boot {
            loader: qemu::Loader::Direct {
                kernel: &kernel,
                initrd: &initrd,
                append: &append,
            },
            disk: None,
            iommu: s.iommu,
            devices: &s.devices,
            extra: &s.qemu_args,
            serial_log: &serial,
            timeout: Duration::from_secs(120),
            memory_mib: 512,
        },
        &dir.join("qemu.log"),
        None,
    )?;
    let text: String = outcome
        .serial
        .iter()
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let report = qemu::parse_report(&text);
    let times = crate::phases::guest(report.section("kmsg"), &outcome.serial, outcome.elapsed);
    let mut failures = Vec::new();
    if let Some(line) = &outcome.panic {
        failures.push(format!("the guest kernel panicked: {line}"));
    }
    if outcome.timed_out {
        failures.push("the guest did not power off within 120 s".into());
    }
    if !report.complete {
        failures.push("the report is missing or cut off (see serial.log)".into());
        return Ok((failures, times));
    }
    // Only what the early binder decides: no status, no apply in the fast tier.
    let mut only_binder = s.clone();
    only_binder.expect.status.clear();
    only_binder.expect.status_verdict = None;
    only_binder.expect.status_output.clear();
    only_binder.expect.apply_output.clear();
    failures.extend(crate::expect::check_report(&only_binder, &report));
    Ok((failures, times))
}
