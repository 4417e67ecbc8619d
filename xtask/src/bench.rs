//! `cargo xtask bench`, the reader half (`bench_boot` is the boot half): `vfio-early
//! initramfs list` against 3cpio, lsinitramfs and the bare decompressors on a
//! real-shaped image: an uncompressed early segment holding a
//! microcode-sized file, then a main archive holding a whole Debian kernel package
//! (~400 MB unpacked), in gzip and zstd variants. Prints best-of-N wall time, the ratio
//! to vfio-early and the peak RSS of each; a table to read, not a timed test.
//! Everything lives in `target/bench/` (the kernel package, its tree, the images, tools).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vfio_early::initramfs::testimg::Cpio;
use xshell::{cmd, Shell};

use crate::tools;

/// The newest `linux-image-6.1.0-N-amd64` apt knows.
fn pick_kernel_package(sh: &Shell) -> anyhow::Result<String> {
    let out = cmd!(
        sh,
        "timeout 120 apt-cache search --names-only ^linux-image-6\\.1\\.0-[0-9]+-amd64$"
    )
    .read()?;
    let mut names: Vec<(u32, String)> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|n| {
            let abi = n
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-amd64")?;
            Some((abi.parse().ok()?, n.to_string()))
        })
        .collect();
    names.sort();
    match names.pop() {
        Some((_, n)) => Ok(n),
        None => bail!("apt-cache knows no linux-image-6.1.0-*-amd64; run apt-get update"),
    }
}

fn prepare(sh: &Shell, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let tree = dir.join("tree");
    if !tree.join("lib/modules").exists() && !tree.join("usr/lib/modules").exists() {
        let have_deb = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"));
        let deb = match have_deb {
            Some(d) => d,
            None => {
                let pkg = pick_kernel_package(sh)?;
                eprintln!("xtask: bench: apt-get download {pkg}");
                let _d = sh.push_dir(dir);
                cmd!(sh, "timeout 900 apt-get download {pkg}").run()?;
                drop(_d);
                std::fs::read_dir(dir)?
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|x| x == "deb"))
                    .context("apt-get download left no .deb")?
            }
        };
        eprintln!("xtask: bench: unpacking {}", deb.display());
        std::fs::create_dir_all(&tree)?;
        cmd!(sh, "timeout 600 dpkg-deb -x {deb} {tree}").run()?;
    }
    let main = dir.join("main.cpio");
    if !main.exists() {
        eprintln!("xtask: bench: packing the main archive with GNU cpio");
        let _d = sh.push_dir(&tree);
        let list = cmd!(sh, "timeout 300 find .").read()?;
        let mut names: Vec<&str> = list.lines().collect();
        names.sort_unstable();
        let names = names.join("\n") + "\n";
        cmd!(
            sh,
            "timeout 600 cpio --quiet --reproducible -o -H newc -O {main}"
        )
        .stdin(names)
        .run()?;
    }
    let early = Cpio::newc()
        .dir("kernel")
        .dir("kernel/x86")
        .dir("kernel/x86/microcode")
        .file("kernel/x86/microcode/GenuineIntel.bin", &[0x5a; 6 << 20])
        .finish();
    let gz = dir.join("main.cpio.gz");
    let zst = dir.join("main.cpio.zst");
    if !gz.exists() {
        eprintln!("xtask: bench: gzip -n -6 (as mkinitramfs does)");
        let out = cmd!(sh, "timeout 900 gzip -n -6 -c {main}")
            .output()?
            .stdout;
        std::fs::write(&gz, out)?;
    }
    if !zst.exists() {
        eprintln!("xtask: bench: zstd -q -1 -T0 (as mkinitramfs does)");
        cmd!(sh, "timeout 900 zstd -q -f -1 -T0 {main} -o {zst}").run()?;
    }
    let image = |compressed: &Path, name: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        let mut bytes = early.clone();
        bytes.extend_from_slice(&std::fs::read(compressed)?);
        std::fs::write(&p, bytes)?;
        Ok(p)
    };
    Ok((
        image(&gz, "initrd-gzip.img")?,
        image(&zst, "initrd-zstd.img")?,
        gz,
        zst,
    ))
}

struct Sample {
    best: Duration,
    rss_kib: u64,
}

/// Best wall time of `runs` runs with stdout to /dev/null, and the largest peak RSS
/// GNU time saw.
fn measure(argv: &[String], runs: u32) -> anyhow::Result<Sample> {
    let rss_file = std::env::temp_dir().join("vfio-early-bench-rss");
    let mut best = Duration::MAX;
    let mut rss_kib = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let status = Command::new("timeout")
            .arg("600")
            .arg("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(&rss_file)
            .args(argv)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .with_context(|| format!("run {}", argv.join(" ")))?;
        let took = start.elapsed();
        if !status.success() {
            bail!("{} failed: {status}", argv.join(" "));
        }
        best = best.min(took);
        let text = std::fs::read_to_string(&rss_file).unwrap_or_default();
        let kib = text
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .next_back()
            .unwrap_or(0);
        rss_kib = rss_kib.max(kib);
    }
    Ok(Sample { best, rss_kib })
}

pub fn run(sh: &Shell, root: &Path, runs: u32) -> anyhow::Result<()> {
    tools::ensure_apt(
        sh,
        &[
            ("cpio", "cpio"),
            ("zstd", "zstd"),
            ("lsinitramfs", "initramfs-tools-core"),
            ("time", "time"),
        ],
    )?;
    let dir = root.join("target/bench");
    let tools_root = dir.join("tools");
    let threecpio = tools_root.join("bin/3cpio");
    if !threecpio.exists() {
        eprintln!(
            "xtask: bench: cargo install threecpio into {}",
            tools_root.display()
        );
        cmd!(
            sh,
            "timeout 1800 cargo install --locked --root {tools_root} threecpio"
        )
        .run()?;
    }
    eprintln!("xtask: bench: cargo build --release");
    cmd!(
        sh,
        "timeout 1800 cargo build --release --quiet --bin vfio-early"
    )
    .run()?;
    let ours = root.join("target/release/vfio-early");
    let (img_gz, img_zst, gz, zst) = prepare(sh, &dir)?;

    let s = |p: &Path| p.display().to_string();
    let o = s(&ours);
    let t = s(&threecpio);
    let rows: Vec<(&str, &str, Vec<String>)> = vec![
        (
            "gzip",
            "vfio-early initramfs list",
            vec![o.clone(), "initramfs".into(), "list".into(), s(&img_gz)],
        ),
        (
            "gzip",
            "3cpio --list",
            vec![t.clone(), "--list".into(), s(&img_gz)],
        ),
        (
            "gzip",
            "lsinitramfs",
            vec!["lsinitramfs".into(), s(&img_gz)],
        ),
        (
            "gzip",
            "gzip -dc (main segment)",
            vec!["gzip".into(), "-dc".into(), s(&gz)],
        ),
        (
            "zstd",
            "vfio-early initramfs list",
            vec![o.clone(), "initramfs".into(), "list".into(), s(&img_zst)],
        ),
        (
            "zstd",
            "3cpio --list",
            vec![t, "--list".into(), s(&img_zst)],
        ),
        (
            "zstd",
            "lsinitramfs",
            vec!["lsinitramfs".into(), s(&img_zst)],
        ),
        (
            "zstd",
            "zstd -dc (main segment)",
            vec!["zstd".into(), "-dcq".into(), s(&zst)],
        ),
    ];
    let unpacked = std::fs::metadata(dir.join("main.cpio"))?.len();
    println!(
        "image: early cpio segment + {} MB cpio of a Debian kernel package; best of {runs}",
        unpacked / 1_000_000
    );
    println!(
        "{:<5}  {:<27}  {:>9}  {:>13}  {:>9}",
        "fmt", "command", "best s", "vs vfio-early", "peak RSS"
    );
    let mut base = Duration::ZERO;
    for (fmt, name, argv) in rows {
        eprintln!("xtask: bench: {fmt}: {name}");
        let m = measure(&argv, runs)?;
        if name.starts_with("vfio-early") {
            base = m.best;
        }
        let ratio = m.best.as_secs_f64() / base.as_secs_f64().max(1e-9);
        println!(
            "{fmt:<5}  {name:<27}  {:>9.3}  {:>12.2}x  {:>6} MiB",
            m.best.as_secs_f64(),
            ratio,
            m.rss_kib / 1024
        );
    }
    Ok(())
}
