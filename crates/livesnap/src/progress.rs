//! What a person sees while a job runs, on stderr: an indicatif bar on a
//! terminal, one plain line per interval otherwise, nothing with `--quiet`.
//! stdout is left to the final report (`--json` keeps it machine-readable).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::units::{bytes, duration};

/// How often plain lines are printed.
pub const LINE_INTERVAL: Duration = Duration::from_secs(1);

/// One progress sample of a job.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Bytes done (`offset`).
    pub done: u64,
    /// Bytes of work known so far (`len`; it may grow).
    pub total: u64,
    /// Mirror only: bytes still dirty (`len - offset`).
    pub remaining: Option<u64>,
    /// Mirror only: the copy mode, as livesnap set it or last switched it.
    pub mode: Option<String>,
    /// The job's state (`running`, `ready`, ...).
    pub status: String,
}

enum Out {
    // Drawn from the first sample on.
    Bar(Option<ProgressBar>),
    Lines,
    Quiet,
}

/// The progress display of one command.
pub struct Progress {
    out: Out,
    // For the plain lines' rate: the previous sample.
    last: Option<(Instant, u64)>,
    rate: f64,
}

impl Progress {
    /// A display: quiet, a bar when stderr is a terminal, else plain lines.
    pub fn new(quiet: bool) -> Progress {
        let out = if quiet {
            Out::Quiet
        } else if std::io::stderr().is_terminal() {
            Out::Bar(None)
        } else {
            Out::Lines
        };
        Progress {
            out,
            last: None,
            rate: 0.0,
        }
    }

    /// True unless `--quiet`.
    pub fn enabled(&self) -> bool {
        !matches!(self.out, Out::Quiet)
    }

    /// Marks the job's start (of `total` bytes of work as far as known),
    /// from which the first rate is measured.
    pub fn start(&mut self, total: u64) {
        self.last = Some((Instant::now(), 0));
        // From here the bar's elapsed time and rate are the job's.
        if let Out::Bar(b) = &mut self.out {
            b.get_or_insert_with(new_bar).set_length(total);
        }
    }

    /// A status line ("creating the target ...").
    pub fn note(&self, msg: &str) {
        match &self.out {
            Out::Bar(Some(b)) => b.println(msg),
            Out::Quiet => {}
            _ => eprintln!("{msg}"),
        }
    }

    /// Shows a sample.
    pub fn update(&mut self, s: &Sample) {
        let now = Instant::now();
        if let Some((t, done)) = self.last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 && s.done >= done {
                let r = (s.done - done) as f64 / dt;
                // A short moving average: jobs copy in bursts.
                self.rate = if self.rate == 0.0 {
                    r
                } else {
                    0.5 * self.rate + 0.5 * r
                };
            }
        }
        self.last = Some((now, s.done));
        match &mut self.out {
            Out::Bar(bar) => {
                let b = bar.get_or_insert_with(new_bar);
                b.set_length(s.total.max(s.done));
                b.set_position(s.done);
                b.set_message(extra(s));
            }
            Out::Lines => eprintln!("{}", self.line(s)),
            Out::Quiet => {}
        }
    }

    fn line(&self, s: &Sample) -> String {
        let pct = if s.total > 0 {
            format!(
                " ({:.0}%)",
                100.0 * s.done.min(s.total) as f64 / s.total as f64
            )
        } else {
            String::new()
        };
        let mut l = format!("progress: {} / {}{}", bytes(s.done), bytes(s.total), pct);
        if self.rate > 0.0 {
            l += &format!(", {}/s", bytes(self.rate as u64));
        }
        let left = s.remaining.unwrap_or(s.total.saturating_sub(s.done));
        if self.rate > 0.0 && left > 0 {
            l += &format!(
                ", ETA {}",
                duration(Duration::from_secs_f64(left as f64 / self.rate))
            );
        }
        let x = extra(s);
        if !x.is_empty() {
            l += ", ";
            l += &x;
        }
        l
    }

    /// Removes the bar (before the final report is printed).
    pub fn finish(&mut self) {
        if let Out::Bar(b) = &mut self.out {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        }
    }
}

fn extra(s: &Sample) -> String {
    let mut parts = Vec::new();
    if let Some(r) = s.remaining {
        parts.push(format!("remaining {}", bytes(r)));
    }
    if let Some(m) = &s.mode {
        parts.push(format!("mode {m}"));
    }
    if !s.status.is_empty() && s.status != "running" {
        parts.push(s.status.clone());
    }
    parts.join(", ")
}

fn new_bar() -> ProgressBar {
    let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    b.set_style(style);
    b.enable_steady_tick(Duration::from_millis(250));
    b
}
