//! `livesnap demo`, the README's first command, run as CI runs it.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_shows_nova_stuck_and_a_verified_snapshot() {
    let start = Instant::now();
    let out = Command::new(livesnap_testkit::cli::livesnap_bin())
        .args([
            "demo",
            "--size",
            "32M",
            "--speed",
            "8M",
            "--nova-deadline",
            "4s",
        ])
        .output()
        .expect("run livesnap demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Nova's loop must not have converged: the writer dirties far more than
    // 8 MiB/s, so a background mirror at that speed never reaches cur == end.
    assert!(
        stdout.contains("Nova is still polling after 4s"),
        "Nova's algorithm finished, so the demo shows nothing:\n{stdout}"
    );
    // The same loop, unchanged, ends on livesnapd's default, and both its
    // copy and livesnap's snapshot check out against the writer's log.
    assert!(
        stdout.contains("the same loop on livesnapd's default:             ended after"),
        "Nova's unchanged loop did not end on livesnapd's default:\n{stdout}"
    );
    assert_eq!(
        stdout.matches("Point in time: verified.").count(),
        2,
        "Nova's copy and the snapshot must both be verified:\n{stdout}"
    );
    // A hang guard, not a speed check: the demo bounds each of its steps
    // (4 s, 12 s, the snapshot's own deadline).
    assert!(
        start.elapsed() < Duration::from_secs(900),
        "the demo took {:?}",
        start.elapsed()
    );
    // Nothing left behind: the demo's temporary directory is gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("livesnap-demo-{}-", child_pid_hint(&stdout)))
        })
        .collect();
    assert!(leftovers.is_empty(), "demo left {leftovers:?}");
}

/// The demo prints its directory (`.../livesnap-demo-PID-N/qmp.sock`); the PID is in it.
fn child_pid_hint(stdout: &str) -> String {
    stdout
        .split("livesnap-demo-")
        .nth(1)
        .and_then(|s| s.split('-').next())
        .unwrap_or("none")
        .to_string()
}
