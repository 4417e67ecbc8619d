//! What xtask prints while it works: one line per phase, with its elapsed time and what
//! it waited for. On a terminal a status line, updated in place, shows what is running
//! now and for how long; elsewhere (CI, a pipe) only the finished lines are printed.
//! Command output goes to log files that the lines name; `--verbose` streams it too.
//! Everything goes to standard output, through this module, so the status line is
//! cleared before any other line is written.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// `--verbose`: stream every command's output and print phases as they start.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

struct Running {
    id: u64,
    label: String,
    waiting: String,
    started: Instant,
}

#[derive(Default)]
struct State {
    running: Vec<Running>,
    next_id: u64,
    /// A status line is on the screen (to clear before printing).
    drawn: bool,
    ticker: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    running: Vec::new(),
    next_id: 0,
    drawn: false,
    ticker: false,
});

fn live() -> bool {
    !verbose() && std::io::stdout().is_terminal()
}

/// A phase in progress; `done` prints its line. Dropped without `done`, it just stops
/// showing (the caller reports the failure).
pub struct Phase {
    id: u64,
    label: String,
    started: Instant,
}

/// Starts a phase: `label` names it, `waiting` says what it waits for.
pub fn start(label: &str, waiting: &str) -> Phase {
    let started = Instant::now();
    let Ok(mut st) = STATE.lock() else {
        return Phase {
            id: u64::MAX,
            label: label.to_string(),
            started,
        };
    };
    st.next_id += 1;
    let id = st.next_id;
    st.running.push(Running {
        id,
        label: label.to_string(),
        waiting: waiting.to_string(),
        started,
    });
    if verbose() {
        write_line(&mut st, &format!("--- {label}: {waiting}"));
    } else if live() && !st.ticker {
        st.ticker = true;
        std::thread::spawn(tick);
    }
    redraw(&mut st);
    Phase {
        id,
        label: label.to_string(),
        started,
    }
}

impl Phase {
    /// Changes what the phase says it waits for.
    pub fn waiting(&self, what: &str) {
        if let Ok(mut st) = STATE.lock() {
            if let Some(r) = st.running.iter_mut().find(|r| r.id == self.id) {
                r.waiting = what.to_string();
            }
            redraw(&mut st);
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ends the phase with its line: label, elapsed time, `summary`.
    pub fn done(self, summary: &str) -> Duration {
        let took = self.started.elapsed();
        if let Ok(mut st) = STATE.lock() {
            st.running.retain(|r| r.id != self.id);
        }
        line(&format!("{:<28} {:>7}  {summary}", self.label, secs(took)));
        took
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Ok(mut st) = STATE.lock() {
            st.running.retain(|r| r.id != self.id);
            redraw(&mut st);
        }
    }
}

/// `12.3 s`, or `4 min 05 s` past two minutes.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 120.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{s:.1} s")
    }
}

/// Prints a finished line (above the status line, if any).
pub fn line(text: &str) {
    match STATE.lock() {
        Ok(mut st) => {
            write_line(&mut st, text);
            redraw(&mut st);
        }
        Err(_) => println!("{text}"),
    }
}

/// Writes raw text (e.g. a streamed log) without touching the status line's state
/// beyond clearing it.
pub fn raw(bytes: &[u8]) {
    if let Ok(mut st) = STATE.lock() {
        clear(&mut st);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }
}

fn write_line(st: &mut State, text: &str) {
    clear(st);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

fn clear(st: &mut State) {
    if st.drawn {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[K");
        let _ = out.flush();
        st.drawn = false;
    }
}

fn redraw(st: &mut State) {
    if !live() {
        return;
    }
    clear(st);
    if st.running.is_empty() {
        return;
    }
    let text = st
        .running
        .iter()
        .map(|r| format!("{} {}: {}", secs(r.started.elapsed()), r.label, r.waiting))
        .collect::<Vec<_>>()
        .join(" | ");
    let width = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(100)
        .saturating_sub(1);
    let shown: String = text.chars().take(width).collect();
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{shown}");
    let _ = out.flush();
    st.drawn = true;
}

fn tick() {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(mut st) = STATE.lock() {
            redraw(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_read_well() {
        assert_eq!(secs(Duration::from_millis(12_340)), "12.3 s");
        assert_eq!(secs(Duration::from_secs(245)), "4 min 05 s");
    }
}
