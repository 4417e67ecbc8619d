//! `vfio-early check`: the config validated and measured against this machine, as a
//! report. Rendering only; the plan holds every verdict.

use std::fmt::Write;
use std::path::Path;

use crate::config::Config;
use crate::context::Context;
use crate::list::render_problems;
use crate::outcome::Outcome;
use crate::plan::Plan;

/// `vfio-early check`: exit 1 when the plan has errors.
pub fn run(ctx: &Context) -> anyhow::Result<Outcome> {
    crate::out!("{}", render(&ctx.config_path, &ctx.config, &ctx.plan))?;
    Ok(Outcome::failed_if(ctx.plan.has_errors()))
}

pub fn render(path: &Path, config: &Config, plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: valid, {} device entr{}",
        path.display(),
        config.devices.len(),
        if config.devices.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    for d in &plan.decisions {
        let verdict = d.verdict.label();
        let id = d.id.map(|i| i.to_string()).unwrap_or_else(|| "?".into());
        let _ = writeln!(out, "  {verdict:<13} {} [{id}]  {}", d.address, d.rule);
        if let Some(why) = &d.interlock {
            let _ = writeln!(out, "                it {why}");
        }
    }
    if !plan.kernel_args.is_empty() {
        let tokens: Vec<&str> = plan.kernel_args.iter().map(|a| a.token.as_str()).collect();
        let _ = writeln!(out, "kernel arguments: {}", tokens.join(" "));
    }
    if plan.problems.is_empty() {
        out.push_str("no problems found\n");
    } else {
        out.push_str(&render_problems(&plan.problems));
    }
    out
}
