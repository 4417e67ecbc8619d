//! `cargo xtask fuzz`: a bounded, seeded mutation fuzzer on stable Rust (cargo-fuzz needs
//! nightly) for the two parsers that take untrusted bytes: the initramfs reader
//! (`initramfs::walk`) and the config parser (`config::parse`). Seeds are the test
//! images from `initramfs::testimg` and the shipped config; mutations flip, overwrite,
//! insert, delete, cut and splice, and cpio mutations are also recompressed so the cpio
//! parser is reached behind gzip and zstd. A panic is a finding: its input is saved
//! under `target/fuzz/` and the task fails. Same seed, same inputs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vfio_early::initramfs::testimg::{self, Cpio};

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Byte strings that make parsers take unusual paths.
const TOKENS: &[&[u8]] = &[
    b"070701",
    b"070702",
    b"TRAILER!!!\0",
    b"FFFFFFFF",
    b"00000000",
    b"7FFFFFFF",
    b"00001000",
    b"\x1f\x8b\x08\x00",
    b"\x28\xb5\x2f\xfd",
    b"\xfd7zXZ\0",
    b"[[device]]\n",
    b"id = \"",
    b"address = \"0000:01:00.0\"\n",
    b"\"\"\"",
    b"=",
    b"\n[",
    b"\xff\xfe",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, others: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let i = rng.below(len + 1);
                input.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let i = rng.below(len);
                let end = (i + t.len()).min(len);
                input[i..end].copy_from_slice(&t[..end - i]);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(64).min(len - i);
                input.drain(i..i + n);
            }
            5 => input.truncate(rng.below(len + 1)),
            6 if !others.is_empty() => {
                let o = &others[rng.below(others.len())];
                let a = rng.below(o.len() + 1);
                let b = a + rng.below(o.len() - a + 1);
                let i = rng.below(len + 1);
                input.splice(i..i, o[a..b].iter().copied());
            }
            _ if len > 0 => {
                // Repeat a chunk: duplicated headers and names.
                let a = rng.below(len);
                let b = a + rng.below(len - a).min(256);
                let chunk = input[a..b].to_vec();
                input.splice(b..b, chunk);
            }
            _ => input.push(rng.next() as u8),
        }
    }
}

fn image_seeds() -> Vec<Vec<u8>> {
    let small = Cpio::newc()
        .dir(".")
        .file("etc/vfio-early.toml", b"x")
        .symlink("sbin", "usr/sbin")
        .hardlinks(&["a", "b"], b"data")
        .finish();
    vec![
        small.clone(),
        Cpio::crc().file("c", b"123").finish(),
        testimg::debian_like("6.1.0-18-amd64", testimg::zstd),
        testimg::debian_like("6.12.9-amd64", testimg::gzip),
        [small.clone(), testimg::gzip(&small)].concat(),
    ]
}

fn save(dir: &Path, kind: &str, n: usize, input: &[u8]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join(format!("crash-{kind}-{n}.bin"));
    std::fs::write(&p, input).with_context(|| format!("write {}", p.display()))?;
    Ok(p)
}

/// Runs both targets for `seconds` in total (half each) or `iterations` inputs each,
/// whichever ends first.
pub fn run(root: &Path, seconds: u64, iterations: u64, seed: u64) -> anyhow::Result<()> {
    let out = root.join("target/fuzz");
    let shipped = std::fs::read(root.join("etc/vfio-early.toml")).context("etc/vfio-early.toml")?;
    let config_seeds = vec![
        shipped,
        b"[[device]]\nid = \"10de:1b80\"\naddress = \"0000:01:00.0\"\n".to_vec(),
        b"[options]\n".to_vec(),
    ];
    let images = image_seeds();
    // Panics are findings, reported below; the default hook would flood the terminal.
    std::panic::set_hook(Box::new(|_| {}));
    let budget = Duration::from_secs(seconds.max(2) / 2);
    let mut crashes = Vec::new();
    for target in ["initramfs", "config"] {
        let seeds = if target == "initramfs" {
            &images
        } else {
            &config_seeds
        };
        let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        let start = Instant::now();
        let mut n: u64 = 0;
        while n < iterations && start.elapsed() < budget {
            let mut input = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &mut input, seeds);
            let input = if target == "initramfs" {
                match rng.below(4) {
                    0 => testimg::gzip(&input),
                    1 => testimg::zstd(&input),
                    _ => input,
                }
            } else {
                input
            };
            let outcome = std::panic::catch_unwind(|| {
                if target == "initramfs" {
                    let _ = vfio_early::initramfs::walk(&input[..], |_| Ok(()));
                } else {
                    let text = String::from_utf8_lossy(&input);
                    let _ = vfio_early::config::parse(&text, Path::new("fuzz.toml"));
                }
            });
            if outcome.is_err() {
                let p = save(&out, target, crashes.len(), &input)?;
                eprintln!("xtask: fuzz: {target} panicked on {}", p.display());
                crashes.push(p);
            }
            n += 1;
            if n.is_multiple_of(20_000) {
                eprintln!("xtask: fuzz: {target}: {n} inputs, {:.0?}", start.elapsed());
            }
        }
        eprintln!(
            "xtask: fuzz: {target}: {n} inputs in {:.1?}, seed {seed}",
            start.elapsed()
        );
    }
    let _ = std::panic::take_hook();
    if !crashes.is_empty() {
        bail!(
            "{} crashing input(s) saved under {}; reproduce with the same --seed",
            crashes.len(),
            out.display()
        );
    }
    eprintln!("xtask: fuzz: no panic");
    Ok(())
}
