//! `vfio-early list`: the `lspci -nn` and `iommu_groups` steps in one view, plus what the
//! config does with each device. Rendering only: every verdict comes from the plan.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::context::Context;
use crate::machine::Machine;
use crate::outcome::Outcome;
use crate::pci::{PciAddress, VendorDevice};
use crate::plan::{Plan, Problem, Verdict};

/// One row of `list --json`. The field set is stable: add fields, never rename them.
#[derive(Debug, Serialize)]
pub struct Row {
    pub address: PciAddress,
    pub id: Option<VendorDevice>,
    pub subsystem: Option<VendorDevice>,
    pub class: Option<String>,
    pub class_name: &'static str,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    pub iommu_group: Option<u32>,
    /// The other devices in the same IOMMU group.
    pub group_peers: Vec<PciAddress>,
    pub boot_vga: bool,
    /// `take`, `refuse`, `take-forced`, or null when the config does not select it.
    pub verdict: Option<Verdict>,
    /// Which entry and rule selected it, and any interlock.
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListReport<'a> {
    pub schema: u32,
    pub devices: Vec<Row>,
    pub problems: &'a [Problem],
}

/// `vfio-early list [--json]`.
pub fn run(ctx: &Context, json: bool) -> anyhow::Result<Outcome> {
    if json {
        crate::out!("{}\n", render_json(&ctx.machine, &ctx.plan))?;
    } else {
        crate::out!("{}", render_table(&ctx.machine, &ctx.plan))?;
    }
    Ok(Outcome::Ok)
}

pub fn rows(machine: &Machine, plan: &Plan) -> Vec<Row> {
    let mut groups: BTreeMap<u32, Vec<PciAddress>> = BTreeMap::new();
    for d in &machine.devices {
        if let Some(g) = d.iommu_group {
            groups.entry(g).or_default().push(d.address);
        }
    }
    machine
        .devices
        .iter()
        .map(|d| {
            let decision = plan.decision(d.address);
            let reason = decision.map(|dec| match &dec.interlock {
                Some(why) => format!("{}; it {why}", dec.rule),
                None => dec.rule.clone(),
            });
            Row {
                address: d.address,
                id: d.id,
                subsystem: d.subsystem,
                class: d.class.map(|c| c.to_string()),
                class_name: d.class.map(|c| c.name()).unwrap_or("unknown"),
                driver: d.driver.clone(),
                driver_override: d.driver_override.clone(),
                iommu_group: d.iommu_group,
                group_peers: d
                    .iommu_group
                    .and_then(|g| groups.get(&g))
                    .map(|m| m.iter().copied().filter(|a| *a != d.address).collect())
                    .unwrap_or_default(),
                boot_vga: d.boot_vga,
                verdict: decision.map(|dec| dec.verdict.clone()),
                reason,
            }
        })
        .collect()
}

pub fn render_json(machine: &Machine, plan: &Plan) -> String {
    let report = ListReport {
        schema: 1,
        devices: rows(machine, plan),
        problems: &plan.problems,
    };
    serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "?".into())
}

/// The human table, then the IOMMU groups that matter, then problems.
pub fn render_table(machine: &Machine, plan: &Plan) -> String {
    let rows = rows(machine, plan);
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no PCI devices found under <root>/sys/bus/pci/devices\n");
        return out;
    }
    out.push_str(&render_devices(&rows));
    out.push_str(&render_selected(&rows));
    if !plan.problems.is_empty() {
        out.push('\n');
        out.push_str(&render_problems(&plan.problems));
    }
    out
}

/// The device table, columns aligned.
fn render_devices(rows: &[Row]) -> String {
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let class = if r.boot_vga {
                format!("{} (boot)", r.class_name)
            } else {
                r.class_name.to_string()
            };
            [
                r.address.to_string(),
                opt(&r.id),
                opt(&r.subsystem),
                class,
                r.driver.clone().unwrap_or_else(|| "-".into()),
                r.iommu_group
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.verdict.as_ref().map_or("-", Verdict::label).to_string(),
            ]
        })
        .collect();
    let header = [
        "ADDRESS",
        "ID",
        "SUBSYSTEM",
        "CLASS",
        "DRIVER",
        "GROUP",
        "VFIO",
    ];
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        l.trim_end().to_string()
    };
    let mut out = line(&header.map(String::from));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// The devices the config selects, why, and the IOMMU group peers of each.
fn render_selected(rows: &[Row]) -> String {
    let mut out = String::new();
    let chosen: Vec<&Row> = rows.iter().filter(|r| r.verdict.is_some()).collect();
    if chosen.is_empty() {
        return out;
    }
    out.push_str("\nselected by the config:\n");
    for r in &chosen {
        let _ = writeln!(
            out,
            "  {}  {}",
            r.address,
            r.reason.as_deref().unwrap_or("")
        );
        if !r.group_peers.is_empty() {
            let peers: Vec<String> = r.group_peers.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                out,
                "      IOMMU group {} also holds {}",
                opt(&r.iommu_group),
                peers.join(", ")
            );
        }
    }
    out
}

/// Problems as `warning: ...` / `error: ...` lines with their fix.
pub fn render_problems(problems: &[Problem]) -> String {
    let mut out = String::new();
    for p in problems {
        let tag = match p.severity {
            crate::plan::Severity::Note => "note",
            crate::plan::Severity::Warning => "warning",
            crate::plan::Severity::Error => "error",
        };
        let _ = writeln!(out, "{tag}: {}\n  fix: {}", p.message, p.fix);
    }
    out
}
