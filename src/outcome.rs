//! The outcome of a command, mapped to the exit status contract: 0 ok, 1 a check or
//! action failed, 2 bad usage or bad config.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Usage,
}

impl Outcome {
    /// `Failed` when `failed`, else `Ok`.
    pub fn failed_if(failed: bool) -> Outcome {
        if failed {
            Outcome::Failed
        } else {
            Outcome::Ok
        }
    }
}

impl From<Outcome> for ExitCode {
    fn from(s: Outcome) -> ExitCode {
        match s {
            Outcome::Ok => ExitCode::SUCCESS,
            Outcome::Failed => ExitCode::from(1),
            Outcome::Usage => ExitCode::from(2),
        }
    }
}
