//! A scenario's expectations checked against what happened: apply's exit status and
//! output, and the guest's report (drivers, modules, kernel log, `/dev/vfio`, the
//! command line, `status --json`'s verdicts, `status`'s text). One message per unmet
//! expectation; no message, no failure.

use crate::qemu::Report;
use crate::scenario::{self, ApplyIn, Scenario};

pub fn check_apply(
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
    check_expect(&s.expect, s.apply_in == ApplyIn::Guest, r)
}

/// Checks one boot's report against `e` (`guest_apply`: the probe ran apply).
pub fn check_expect(e: &scenario::Expect, guest_apply: bool, r: &Report) -> Vec<String> {
    let mut f = Vec::new();
    f.extend(check_paths(e, r));
    if e.kernel_newest {
        let kernels = r.section("kernels");
        let running = kernels.first().map(String::as_str).unwrap_or("?");
        let newest = kernels.last().map(String::as_str).unwrap_or("?");
        if kernels.len() < 2 || running != newest {
            f.push(format!(
                "the running kernel {running} is not the newest installed ({})",
                kernels.get(1..).unwrap_or_default().join(", ")
            ));
        }
    }
    if guest_apply {
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

/// `paths_present` and `paths_absent` against the probe's `paths` section, which must
/// report each of them.
fn check_paths(e: &scenario::Expect, r: &Report) -> Vec<String> {
    let lines = r.section("paths");
    let mut f = Vec::new();
    for (want, paths) in [("present", &e.paths_present), ("absent", &e.paths_absent)] {
        for p in paths {
            let got = lines
                .iter()
                .find_map(|l| l.split_once(' ').filter(|(_, path)| *path == p.as_str()))
                .map(|(state, _)| state);
            match got {
                Some(state) if state == want => {}
                Some(state) => f.push(format!("{p} is {state}, expected {want}")),
                None => f.push(format!("the probe did not report on {p}")),
            }
        }
    }
    f
}

/// A stage's actions, run by the probe at the end of boot `n`: each `action` section
/// must exit 0 (apply: the stage's `apply_exit`, with its `apply_output`), and the
/// next boot's files must have reached the transfer disk.
pub fn check_actions(e: &scenario::Expect, r: &Report, n: usize) -> Vec<String> {
    let mut f = Vec::new();
    let actions: Vec<&String> = r
        .sections
        .keys()
        .filter(|k| k.starts_with("action "))
        .collect();
    if actions.is_empty() {
        f.push(format!(
            "boot {n}: the probe ran no stage action (see its serial log)"
        ));
    }
    for name in actions {
        let (text, code) = r.with_exit(name);
        let what = name.splitn(3, ' ').nth(2).unwrap_or("");
        if what == "apply" {
            check_apply(e, code, &text, &format!("in boot {n}"), &mut f);
        } else if code != Some(0) {
            f.push(format!(
                "boot {n}: {what} exited {code:?}: {}",
                last_lines(&text, 6)
            ));
        }
    }
    let (text, code) = r.with_exit("next-boot");
    if code != Some(0) {
        f.push(format!(
            "boot {n}: the next boot's files did not reach the transfer disk: {}",
            last_lines(&text, 4)
        ));
    }
    f
}

/// `initramfs_has` and `initramfs_lacks` against our reader's list of the initramfs
/// boot `n` used (`None` when no expectation reads it).
pub fn check_initramfs(e: &scenario::Expect, list: Option<&str>, n: usize) -> Vec<String> {
    let Some(list) = list else {
        return Vec::new();
    };
    let mut f = Vec::new();
    for want in &e.initramfs_has {
        if !list.contains(want.as_str()) {
            f.push(format!("boot {n}: the initramfs lacks `{want}`"));
        }
    }
    for bad in &e.initramfs_lacks {
        if let Some(line) = list.lines().find(|l| l.contains(bad.as_str())) {
            f.push(format!("boot {n}: the initramfs holds `{bad}`: {line}"));
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

/// Every expectation on one boot: the report must be complete, then each check.
pub fn check_boot(s: &Scenario, r: &Report) -> Vec<String> {
    if !r.complete {
        return vec!["the probe's report is missing or cut off (see serial.log)".into()];
    }
    check_report(s, r)
}
