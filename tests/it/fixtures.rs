//! Data-driven regression tests: every directory under `tests/fixtures/` is a machine
//! tree (the shape `vfio-early debug-dump` unpacks into, config at
//! `etc/vfio-early.toml`), and every report the tool prints about it is pinned by a
//! snapshot named after the case: `list`, `list --json`, `check`, `apply --dry-run`,
//! `status --json`. A user's unpacked dump dropped there becomes a regression test;
//! `cargo insta review` shows its first snapshots for acceptance.

use std::path::{Path, PathBuf};
use std::process::Command;

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

fn run(root: &Path, args: &[&str]) -> String {
    let out = Command::new(crate::fake::bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run vfio-early");
    let text = format!(
        "$ vfio-early {}   (exit {})\n{}{}",
        args.join(" "),
        out.status.code().map_or("signal".into(), |c| c.to_string()),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    text.replace(&root.display().to_string(), "<root>")
}

#[test]
fn every_fixture_case_matches_its_snapshots() {
    let cases = cases();
    assert!(!cases.is_empty(), "no case under tests/fixtures/");
    for case in cases {
        let name = case
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .expect("case name");
        assert!(
            case.join("etc/vfio-early.toml").exists(),
            "{name}: a case needs etc/vfio-early.toml"
        );
        for (suffix, args) in [
            ("list", &["list"][..]),
            ("list-json", &["list", "--json"][..]),
            ("check", &["check"][..]),
            ("apply-dry-run", &["apply", "--dry-run"][..]),
            ("status-json", &["status", "--json"][..]),
        ] {
            insta::assert_snapshot!(format!("{name}-{suffix}"), run(&case, args));
        }
    }
}
