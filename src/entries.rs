//! Boot Loader Specification Type #1 entries (`loader/entries/*.conf` on an ESP or
//! XBOOTLDR partition, as kernel-install writes them for systemd-boot), for the trial:
//! which entry the default boot uses, and the trial's copy of it.
//!
//! Boot counting (systemd's automatic boot assessment): an entry named `ID+LEFT.conf`
//! or `ID+LEFT-DONE.conf` is tried LEFT more times; systemd-boot renames it at each try
//! (`+1` becomes `+0-1`), and an entry with no tries left is "bad" and sorted last, so it
//! is never the default again. The trial's entry is `vfio-early-trial+1.conf`: one try.
//! Its id, for `bootctl set-oneshot` and systemd-boot, is the file name without the
//! counter, `vfio-early-trial.conf`. Pure: text and names in, text out.

use std::cmp::Ordering;
use std::fmt::Write as _;

use crate::kargs;

/// The trial entry's id (the file name without its boot counter).
pub const TRIAL_ID: &str = "vfio-early-trial.conf";
/// The trial entry's file name: one try, then it is bad.
pub const TRIAL_FILE: &str = "vfio-early-trial+1.conf";
/// Below every kernel version: the trial entry sorts after its OS's real entries.
const TRIAL_VERSION: &str = "0-vfio-early-trial";

/// One entry file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The directory holding it (`boot/efi/loader/entries`), relative to the root.
    pub dir: String,
    /// Its file name, counter included.
    pub file: String,
    /// The keys in file order (`options` may repeat).
    pub keys: Vec<(String, String)>,
}

impl Entry {
    pub fn parse(dir: &str, file: &str, text: &str) -> Entry {
        let keys = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| match l.split_once([' ', '\t']) {
                Some((k, v)) => (k.to_string(), v.trim().to_string()),
                None => (l.to_string(), String::new()),
            })
            .collect();
        Entry {
            dir: dir.to_string(),
            file: file.to_string(),
            keys,
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The entry's path relative to the root.
    pub fn path(&self) -> String {
        format!("{}/{}", self.dir, self.file)
    }

    /// The id: the file name without the boot counter.
    pub fn id(&self) -> String {
        id_of(&self.file)
    }

    /// Tries left, when the entry is counted.
    pub fn tries_left(&self) -> Option<u32> {
        counter(&self.file).map(|(left, _)| left)
    }

    /// The options, all `options` lines joined as systemd-boot joins them.
    pub fn options(&self) -> String {
        let all: Vec<&str> = self
            .keys
            .iter()
            .filter(|(k, _)| k == "options")
            .map(|(_, v)| v.as_str())
            .collect();
        all.join(" ")
    }
}

/// `NAME+LEFT[-DONE].conf` → (LEFT, DONE).
fn counter(file: &str) -> Option<(u32, u32)> {
    let stem = file.strip_suffix(".conf")?;
    let (_, count) = stem.rsplit_once('+')?;
    let (left, done) = match count.split_once('-') {
        Some((l, d)) => (l, d),
        None => (count, "0"),
    };
    Some((left.parse().ok()?, done.parse().ok()?))
}

/// A file name without its boot counter: `vfio-early-trial+0-1.conf` → `vfio-early-trial.conf`.
pub fn id_of(file: &str) -> String {
    match (counter(file), file.strip_suffix(".conf")) {
        (Some(_), Some(stem)) => match stem.rsplit_once('+') {
            Some((name, _)) => format!("{name}.conf"),
            None => file.to_string(),
        },
        _ => file.to_string(),
    }
}

/// Whether a file in `loader/entries` is one of the trial's (any counter state).
pub fn is_trial_file(file: &str) -> bool {
    id_of(file) == TRIAL_ID
}

/// The entry the default boot uses: among the entries that are not the trial's, not bad
/// (no tries left) and name a kernel (`linux`), the one with the newest `version`.
pub fn default_entry(entries: &[Entry]) -> Option<&Entry> {
    entries
        .iter()
        .filter(|e| !is_trial_file(&e.file))
        .filter(|e| e.tries_left() != Some(0))
        .filter(|e| e.get("linux").is_some())
        .max_by(|a, b| {
            compare_versions(
                a.get("version").unwrap_or(""),
                b.get("version").unwrap_or(""),
            )
            .then_with(|| b.file.cmp(&a.file))
        })
}

/// A version comparison in the manner of systemd's: runs of digits compare as numbers,
/// other runs as text, `~` before anything.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (Some(b'~'), Some(b'~')) => {}
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let da = trim_zeros(&a[..na]);
                let db = trim_zeros(&b[..nb]);
                let o = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
                continue;
            }
            (Some(x), Some(y)) => {
                let o = x.cmp(y);
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
        a = &a[1..];
        b = &b[1..];
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|c| **c == b'0').count();
    &d[n..]
}

/// The trial's entry: a copy of `default` (kernel, initrds, machine-id, sort-key, any
/// other key) with the title marked, a version below every kernel's (so it sorts after
/// its OS's real entries and is never the default by order), and options with each of
/// `remove` taken off once and `add` appended.
pub fn render_trial(default: &Entry, remove: &[String], add: &[String]) -> String {
    let mut options = kargs::remove_tokens(&default.options(), remove);
    let (with, _) = kargs::add_tokens(&options, add);
    options = with.trim_end().to_string();
    let mut out = String::from(
        "# Generated by `vfio-early apply --trial`: one boot of a new configuration\n\
         # (`bootctl set-oneshot vfio-early-trial.conf`, and boot counting: one try).\n\
         # The trial's commit, its fallback, `vfio-early trial abort` and `vfio-early undo`\n\
         # remove it. Do not edit.\n",
    );
    let mut wrote_options = false;
    for (k, v) in &default.keys {
        match k.as_str() {
            "title" => {
                let _ = writeln!(out, "title      vfio-early trial (boots once): {v}");
            }
            "version" => {
                let _ = writeln!(out, "version    {TRIAL_VERSION}");
            }
            "options" if !wrote_options => {
                let _ = writeln!(out, "options    {options}");
                wrote_options = true;
            }
            "options" => {}
            _ => {
                let _ = writeln!(out, "{k:<10} {v}");
            }
        }
    }
    if !wrote_options {
        let _ = writeln!(out, "options    {options}");
    }
    if default.get("title").is_none() {
        out.push_str("title      vfio-early trial (boots once)\n");
    }
    if default.get("version").is_none() {
        let _ = writeln!(out, "version    {TRIAL_VERSION}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn counters_and_ids() {
        assert_eq!(counter("a+3.conf"), Some((3, 0)));
        assert_eq!(counter("a+0-1.conf"), Some((0, 1)));
        assert_eq!(counter("a.conf"), None);
        assert_eq!(counter("a+x.conf"), None);
        assert_eq!(id_of("vfio-early-trial+0-1.conf"), TRIAL_ID);
        assert_eq!(id_of(TRIAL_FILE), TRIAL_ID);
        assert_eq!(id_of("debian-6.1.conf"), "debian-6.1.conf");
        assert!(is_trial_file("vfio-early-trial.conf"));
        assert!(!is_trial_file("vfio-early-trial-x.conf"));
    }

    #[test]
    fn versions_compare_as_numbers() {
        assert_eq!(compare_versions("6.10.1", "6.9.12"), Ordering::Greater);
        assert_eq!(
            compare_versions("6.1.0-28-amd64", "6.1.0-9-amd64"),
            Ordering::Greater
        );
        assert_eq!(compare_versions("6.1", "6.1~rc1"), Ordering::Greater);
        assert_eq!(
            compare_versions("0-vfio-early-trial", "6.1.0"),
            Ordering::Less
        );
        assert_eq!(compare_versions("007", "7"), Ordering::Equal);
    }

    #[test]
    fn the_default_is_the_newest_good_entry_that_is_not_ours() {
        let e = |file: &str, v: &str| {
            Entry::parse(
                "boot/efi/loader/entries",
                file,
                &format!("version {v}\nlinux /l\n"),
            )
        };
        let all = vec![
            e("m-6.1.0-9.conf", "6.1.0-9-amd64"),
            e("m-6.1.0-28.conf", "6.1.0-28-amd64"),
            e("m-6.12.0+0-3.conf", "6.12.0-1-amd64"),
            e("vfio-early-trial+1.conf", "9.9"),
        ];
        assert_eq!(
            default_entry(&all).map(|x| x.file.as_str()),
            Some("m-6.1.0-28.conf")
        );
        assert_eq!(default_entry(&all[3..]), None);
    }

    #[test]
    fn the_trial_copy_keeps_everything_but_title_version_and_options() {
        let d = Entry::parse(
            "boot/efi/loader/entries",
            "0b1c-6.1.0-28-amd64.conf",
            "title      Debian GNU/Linux 12 (bookworm)\nversion    6.1.0-28-amd64\n\
             machine-id 0b1c\nsort-key   debian\noptions    root=UUID=x ro\n\
             options    quiet intel_iommu=on iommu=pt\n\
             linux      /0b1c/6.1.0-28-amd64/linux\ninitrd     /0b1c/6.1.0-28-amd64/initrd.img-6.1.0-28-amd64\n",
        );
        let t = render_trial(
            &d,
            &s(&["intel_iommu=on", "iommu=pt"]),
            &s(&["intel_iommu=on", "vfio_early.trial", "panic=10"]),
        );
        assert!(
            t.contains(
                "\noptions    root=UUID=x ro quiet intel_iommu=on vfio_early.trial panic=10\n"
            ),
            "{t}"
        );
        assert!(t.contains("\nversion    0-vfio-early-trial\n"), "{t}");
        assert!(t.contains("\nsort-key   debian\n"), "{t}");
        assert!(
            t.contains("\ninitrd     /0b1c/6.1.0-28-amd64/initrd.img-6.1.0-28-amd64\n"),
            "{t}"
        );
        assert_eq!(t.matches("options").count(), 1, "{t}");
    }
}
