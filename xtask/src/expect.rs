//! A scenario's expectations checked against what happened: apply's exit status and
//! output, and the guest's report (drivers, modules, kernel log, `/dev/vfio`, the
//! command line, `status --json`'s verdicts, `status`'s text). One message per unmet
//! expectation; no message, no failure.

use crate::qemu::Report;
use crate::scenario::{self, ApplyIn, Firmware, LoaderSeen, Scenario};

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
    check_booted_by(e, r, &cmdline, &mut f);
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
/// must exit 0 (apply: the stage's `apply_exit`, with its `apply_output`), there must
/// be some if the stage has actions (`has_actions`) and none if not, and the next
/// boot's files must have reached the transfer disk.
pub fn check_actions(e: &scenario::Expect, has_actions: bool, r: &Report, n: usize) -> Vec<String> {
    let mut f = Vec::new();
    let actions: Vec<&String> = r
        .sections
        .keys()
        .filter(|k| k.starts_with("action "))
        .collect();
    if actions.is_empty() && has_actions {
        f.push(format!(
            "boot {n}: the probe ran no stage action (see its serial log)"
        ));
    }
    if !actions.is_empty() && !has_actions {
        f.push(format!(
            "boot {n}: the probe ran actions of a stage that has none: {}",
            actions
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
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
        } else if what == "run" {
            for want in e.run_output.iter().filter(|w| !text.contains(w.as_str())) {
                f.push(format!("boot {n}: the stage's run did not say `{want}`"));
            }
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

/// `console` against the boot's serial console, line by line.
pub fn check_console(e: &scenario::Expect, console: &[String]) -> Vec<String> {
    e.console
        .iter()
        .filter(|want| !console.iter().any(|l| l.contains(want.as_str())))
        .map(|want| format!("the console never said `{want}`"))
        .collect()
}

/// A boot expected never to reach the probe (`reaches_probe = false`): it must have
/// ended by itself (a panic, a reboot) before the probe's report, not by the timeout.
pub fn check_unreached(
    r: &Report,
    timed_out: Option<std::time::Duration>,
    n: usize,
) -> Vec<String> {
    let mut f = Vec::new();
    if !r.sections.is_empty() {
        f.push(format!(
            "boot {n}: the probe reported (sections: {}), expected the boot never to reach it",
            r.sections.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if let Some(t) = timed_out {
        f.push(format!(
            "boot {n}: the guest neither panicked nor rebooted within {} s (a hang)",
            t.as_secs()
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

/// What booted the guest, from the probe's `firmware` section: the firmware, and the
/// loader entry systemd-boot selected (decoded), if any.
pub fn booted_by(r: &Report, cmdline: &[&str]) -> (Option<Firmware>, LoaderSeen, Option<String>) {
    let lines = r.section("firmware");
    let firmware = match lines.first().map(|l| l.trim()) {
        Some("uefi") => Some(Firmware::Uefi),
        Some("bios") => Some(Firmware::Bios),
        _ => None,
    };
    let entry = lines
        .iter()
        .find_map(|l| l.strip_prefix("loader-entry-selected "))
        .map(|hex| efivar_text(hex.trim()).unwrap_or_else(|| format!("(undecodable: {hex})")));
    let loader = if entry.is_some() {
        LoaderSeen::SystemdBoot
    } else if cmdline.iter().any(|t| t.starts_with("BOOT_IMAGE=")) {
        LoaderSeen::Grub
    } else {
        LoaderSeen::Direct
    };
    (firmware, loader, entry)
}

/// The text of a string EFI variable as efivarfs shows it, given in hex: a 4-byte
/// attribute header, then UTF-16LE up to a NUL. `None` when it is not that.
pub fn efivar_text(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let body = bytes.get(4..)?;
    if !body.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = body
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

fn check_booted_by(e: &scenario::Expect, r: &Report, cmdline: &[&str], f: &mut Vec<String>) {
    let (firmware, loader, entry) = booted_by(r, cmdline);
    if let Some(want) = e.firmware {
        if firmware != Some(want) {
            let got = firmware.map_or("not reported", Firmware::name);
            f.push(format!("firmware {got}, expected {}", want.name()));
        }
    }
    if let Some(want) = e.loader {
        if loader != want {
            let entry = entry.as_deref().unwrap_or("none");
            f.push(format!(
                "the kernel was started by {} (loader entry {entry}), expected {}",
                loader.name(),
                want.name()
            ));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::parse_report;

    #[test]
    fn an_efi_string_variable_is_decoded_after_its_attributes() {
        // efivarfs: attributes 0x00000006 (boot service and runtime access), then
        // "ab-6.1.conf" in UTF-16LE with its NUL.
        let mut hex = "06000000".to_string();
        for c in "ab-6.1.conf\0".bytes() {
            hex.push_str(&format!("{c:02x}00"));
        }
        assert_eq!(efivar_text(&hex).as_deref(), Some("ab-6.1.conf"));
        assert_eq!(efivar_text("0600000061"), None, "odd UTF-16 body");
        assert_eq!(efivar_text("060000"), None, "shorter than the header");
        assert_eq!(efivar_text("zz000000"), None, "not hex");
    }

    #[test]
    fn an_unmet_boot_expectation_says_what_booted() {
        let e = scenario::Expect {
            firmware: Some(Firmware::Uefi),
            loader: Some(LoaderSeen::SystemdBoot),
            ..Default::default()
        };
        let r = parse_report("@@ == firmware\n@@ bios\n");
        let mut f = Vec::new();
        check_booted_by(&e, &r, &["root=/dev/vda"], &mut f);
        assert_eq!(
            f,
            [
                "firmware bios, expected uefi",
                "the kernel was started by direct (loader entry none), expected systemd-boot"
            ]
        );
        let ok = parse_report(
            "@@ == firmware\n@@ uefi\n@@ loader-entry-selected 06000000610062000000\n",
        );
        let mut f = Vec::new();
        check_booted_by(&e, &ok, &[], &mut f);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn the_loader_is_systemd_boot_grub_or_qemu() {
        let sd = parse_report(
            "@@ == firmware\n@@ uefi\n@@ loader-entry-selected 06000000610062000000\n",
        );
        let (fw, loader, entry) = booted_by(&sd, &["root=/dev/vda2"]);
        assert_eq!(fw, Some(Firmware::Uefi));
        assert_eq!(loader, LoaderSeen::SystemdBoot);
        assert_eq!(entry.as_deref(), Some("ab"));
        let bios = parse_report("@@ == firmware\n@@ bios\n");
        assert_eq!(
            booted_by(&bios, &["BOOT_IMAGE=/vmlinuz", "ro"]).1,
            LoaderSeen::Grub
        );
        assert_eq!(
            booted_by(&bios, &["root=/dev/vda"]),
            (Some(Firmware::Bios), LoaderSeen::Direct, None)
        );
        assert_eq!(booted_by(&parse_report(""), &[]).0, None);
    }

    #[test]
    fn a_boot_meant_never_to_reach_the_probe_fails_when_it_does_or_hangs() {
        let none = parse_report("[ 5.0] Rebooting automatically due to panic= boot argument\n");
        assert!(check_unreached(&none, None, 2).is_empty());
        let reached = parse_report("@@ == cmdline\n@@ root=/dev/vda\n@@ == end\n");
        let f = check_unreached(&reached, None, 2);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].contains("boot 2: the probe reported (sections: cmdline, end)"),
            "{f:?}"
        );
        // Even a report cut off by the boot's end is a boot that reached it.
        assert_eq!(
            check_unreached(&parse_report("@@ == cmdline\n"), None, 3).len(),
            1
        );
        let hung = check_unreached(&none, Some(std::time::Duration::from_secs(300)), 2);
        assert_eq!(
            hung,
            ["boot 2: the guest neither panicked nor rebooted within 300 s (a hang)"]
        );
    }

    #[test]
    fn console_lines_are_searched_whole_log() {
        let e = scenario::Expect {
            console: vec!["ALERT!".into(), "panic= boot argument".into()],
            ..Default::default()
        };
        let log = vec![
            "Gave up waiting for root file system device.".to_string(),
            "ALERT!  /dev/nonexistent does not exist.  Dropping to a shell!".to_string(),
        ];
        assert_eq!(
            check_console(&e, &log),
            ["the console never said `panic= boot argument`"]
        );
        let mut all = log.clone();
        all.push("Rebooting automatically due to panic= boot argument".into());
        assert!(check_console(&e, &all).is_empty());
    }

    #[test]
    fn a_stage_without_actions_must_run_none_and_one_with_actions_some() {
        let e = scenario::Expect::default();
        let none = parse_report("@@ == next-boot\n@@ exit=0\n@@ == end\n");
        assert!(check_actions(&e, false, &none, 2).is_empty());
        assert_eq!(
            check_actions(&e, true, &none, 2),
            ["boot 2: the probe ran no stage action (see its serial log)"]
        );
        let ran = parse_report(
            "@@ == action 1 run\n@@ ok\n@@ exit=0\n@@ == next-boot\n@@ exit=0\n@@ == end\n",
        );
        assert!(check_actions(&e, true, &ran, 1).is_empty());
        assert_eq!(
            check_actions(&e, false, &ran, 1),
            ["boot 1: the probe ran actions of a stage that has none: action 1 run"]
        );
        let failed =
            parse_report("@@ == action 1 run\n@@ no\n@@ exit=1\n@@ == next-boot\n@@ exit=0\n");
        assert_eq!(
            check_actions(&e, true, &failed, 1),
            ["boot 1: run exited Some(1): no"]
        );
        let said = scenario::Expect {
            run_output: vec!["ok".into(), "initramfs: kept".into()],
            ..Default::default()
        };
        assert_eq!(
            check_actions(&said, true, &ran, 1),
            ["boot 1: the stage's run did not say `initramfs: kept`"]
        );
    }
}
