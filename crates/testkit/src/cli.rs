//! Test support for the `livesnap` CLI: daemons to run it against
//! (qemu-storage-daemon and livesnapd, each exporting node `disk` over NBD)
//! and running the CLI, on top of the test kit (`livesnap-testkit`: tools,
//! the blocking QMP client, the daemons and the point-in-time checks).
//!
//! A missing peer tool fails the test with the package to install: these
//! tests must never pass by skipping.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::disk::{DiskDaemon as Daemon, Kind};
use crate::{instant_of, wait_within};

/// The CLI under test.
pub fn livesnap_bin() -> &'static std::path::Path {
    crate::bin("livesnap")
}

/// What a CLI run returned.
#[derive(Debug)]
pub struct Out {
    /// Exit status.
    pub status: ExitStatus,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

impl Out {
    /// The exit code (panics on death by signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("livesnap died by a signal: {self:?}"))
    }

    /// stdout as one JSON object.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {self:?}"))
    }

    /// Panics unless the exit code is `code`.
    pub fn expect(self, code: i32) -> Out {
        assert_eq!(self.code(), code, "unexpected exit code: {self:#?}");
        self
    }
}

/// Runs the CLI with `args`; panics if it runs longer than `limit`.
pub fn livesnap(args: &[&str], limit: Duration) -> Out {
    let child = spawn_livesnap(args);
    wait_out(child, limit)
}

/// Starts the CLI with piped stdout and stderr.
pub fn spawn_livesnap(args: &[&str]) -> Child {
    Command::new(livesnap_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn livesnap")
}

/// A CLI run followed on stderr up to a line holding a marker.
pub struct Started {
    /// The process.
    pub child: Child,
    /// Its stderr from the line after the marker's.
    pub lines: Lines<BufReader<ChildStderr>>,
    /// Its stderr up to the marker's line.
    pub seen: Vec<String>,
}

/// Starts the CLI with `args` and reads its stderr until a line holds
/// `marker` (e.g. the job has started); panics if it ends first.
pub fn spawn_until(args: &[&str], marker: &str) -> Started {
    let mut child = spawn_livesnap(args);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen: Vec<String> = Vec::new();
    while !seen.last().is_some_and(|l| l.contains(marker)) {
        let l = lines
            .next()
            .unwrap_or_else(|| panic!("livesnap ended before printing {marker:?}: {seen:?}"))
            .unwrap();
        seen.push(l);
    }
    Started { child, lines, seen }
}

impl Started {
    /// Sends `signal`, waits (bounded) for the exit; the result and the
    /// rest of stderr.
    pub fn signal(self, signal: i32, limit: Duration) -> (Out, String) {
        // SAFETY: kill(2) of the child this test spawned.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let lines = self.lines;
        let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
        let out = wait_out(self.child, limit);
        (out, rest.join().unwrap().join("\n"))
    }
}

/// Waits for a spawned CLI (killing it and panicking after `limit`).
pub fn wait_out(child: Child, limit: Duration) -> Out {
    let (status, stdout, stderr) = wait_within(child, limit).unwrap_or_else(|err| {
        panic!(
            "livesnap did not finish within {limit:?}; stderr: {}",
            err.join().unwrap()
        )
    });
    let o = Out {
        status,
        stdout,
        stderr,
    };
    eprintln!("[livesnap stderr]\n{}", o.stderr);
    o
}

/// The report's point-in-time window as `Instant`s, widened by 1 ms on each
/// side for the nanoseconds between reading `Instant` and the raw clock.
pub fn window_of(report: &Value) -> (Instant, Instant) {
    let p = &report["point_in_time"];
    let slack = Duration::from_millis(1);
    (
        instant_of(
            p["start_monotonic_ns"]
                .as_u64()
                .expect("start_monotonic_ns"),
        ) - slack,
        instant_of(p["end_monotonic_ns"].as_u64().expect("end_monotonic_ns")) + slack,
    )
}
