//! Faults under load: what clients and jobs see when the storage below them
//! fails, slows down or hangs, injected with the `blkdebug` filter.
//!
//! The first section checks the filter itself over QMP and NBD, against
//! qemu-storage-daemon where QEMU has the same feature.

use livesnap_testkit as harness;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// blkdebug over QMP and NBD
// ---------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

/// Adds `raw` node `disk` over blkdebug node `dbg` over a new 16 MiB file in
/// `dir`, with `rules` as `inject-error`, and exports `disk` writable on a
/// unix socket; returns the NBD URL.
fn blkdebug_export(q: &mut Qmp, dir: &Path, rules: Value) -> String {
    let file = dir.join("disk.raw");
    sparse_file(&file, 16 * MIB);
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "disk",
               "file": {"driver": "blkdebug", "node-name": "dbg", "inject-error": rules,
                        "image": {"driver": "file", "filename": file}}}),
    );
    let sock = dir.join("nbd.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true}),
    );
    format!("nbd+unix:///disk?socket={}", sock.display())
}

/// Runs one qemu-io command per process run over `url`; the lines that say
/// what happened (timings dropped).
fn io_outcome(url: &str, cmds: &[&str]) -> Vec<String> {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(url);
    let (_, out, err) = run_within(Command::new("qemu-io").args(&args), Duration::from_secs(60));
    format!("{out}{err}")
        .lines()
        .filter(|l| l.contains("failed") || l.starts_with("wrote") || l.starts_with("read"))
        .map(str::to_string)
        .collect()
}

/// A qemu-io run left going in the background.
fn io_background(url: &str, cmd: &str) -> Child {
    require_tool("qemu-io");
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The fault script and what every client sees, on livesnapd and on qsd.
const FAULT_RULES: &str = r#"[
    {"event": "none", "iotype": "write", "sector": 2048, "errno": 28},
    {"event": "none", "iotype": "read", "sector": 4096, "errno": 5, "once": true},
    {"event": "none", "iotype": "write", "sector": 8192, "once": true}
]"#;

const FAULT_SCRIPT: &[&[&str]] = &[
    // Sector 2048 is 1 MiB: writes over it fail with ENOSPC, each time.
    &["write -P 0x11 1M 4k"],
    &["write -P 0x11 1020k 8k"],
    &["write -P 0x12 0 64k", "read -P 0x12 0 64k"],
    // Reads there work; other writes too.
    &["read 1M 4k", "write -P 0x13 2M 64k"],
    // Sector 4096 is 2 MiB: the first read fails with EIO, the next works.
    &["read 2M 4k"],
    &["read -P 0x13 2M 64k"],
    // A once write rule with the default errno (EIO).
    &["write 4M 512"],
    &["write -P 0x14 4M 512", "read -P 0x14 4M 512"],
];

#[test]
fn blkdebug_faults_reach_nbd_clients_as_on_qsd() {
    let rules: Value = serde_json::from_str(FAULT_RULES).unwrap();
    let mut outcomes = Vec::new();
    let ls = Livesnapd::bare();
    let qsd = Qsd::bare();
    for (mut q, dir) in [
        (ls.qmp(), ls.dir.path().to_path_buf()),
        (qsd.qmp(), qsd.dir.path().to_path_buf()),
    ] {
        let url = blkdebug_export(&mut q, &dir, rules.clone());
        let o: Vec<Vec<String>> = FAULT_SCRIPT.iter().map(|s| io_outcome(&url, s)).collect();
        let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
        let dbg = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "dbg")
            .unwrap()
            .clone();
        assert_eq!(dbg["drv"], "blkdebug");
        assert!(dbg["image"].get("actual-size").is_none(), "{dbg}");
        outcomes.push(o);
    }
    assert_eq!(outcomes[0], outcomes[1], "livesnapd (left), qsd (right)");
    let o = &outcomes[0];
    assert_eq!(o[0], ["write failed: No space left on device"]);
    assert_eq!(o[1], ["write failed: No space left on device"]);
    assert_eq!(o[4], ["read failed: Input/output error"]);
    assert!(o[5][0].starts_with("read 65536/65536"), "{:?}", o[5]);
    assert_eq!(o[6], ["write failed: Input/output error"]);
    assert!(o[7].iter().all(|l| !l.contains("failed")), "{:?}", o[7]);
}

#[test]
fn blkdebug_delay_slows_only_matching_requests() {
    let ls = Livesnapd::bare();
    let mut q = ls.qmp();
    let url = blkdebug_export(
        &mut q,
        ls.dir.path(),
        json!([{"event": "none", "iotype": "write", "sector": 0, "x-delay-ms": 10000}]),
    );
    let start = Instant::now();
    let mut slow = io_background(&url, "write -P 0x21 0 4k");
    // Meanwhile: other clients, other sectors and the monitor go on.
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let o = io_outcome(
        &url,
        &["write -P 0x22 1M 64k", "read -P 0x22 1M 64k", "read 0 4k"],
    );
    assert!(o.iter().all(|l| !l.contains("failed")), "{o:?}");
    // They finished while the delayed write still waited: ordered by
    // events, not by a time bound (the delay only has to outlast them).
    assert!(
        slow.try_wait().unwrap().is_none(),
        "the delayed write ended first: the other requests waited for it ({:?})",
        t.elapsed()
    );
    q.ok("query-version", Value::Null);
    let out = finish(slow);
    assert!(out.contains("wrote 4096/4096"), "{out}");
    assert!(start.elapsed() >= Duration::from_millis(10000));
    // The delayed write landed.
    let o = io_outcome(&url, &["read -P 0x21 0 4k"]);
    assert!(o.iter().all(|l| !l.contains("failed")), "{o:?}");
}

#[test]
fn blkdebug_stall_holds_requests_until_the_rules_change() {
    let mut ls = Livesnapd::bare();
    let mut q = ls.qmp();
    let url = blkdebug_export(
        &mut q,
        ls.dir.path(),
        json!([{"event": "none", "iotype": "write", "x-stall": true}]),
    );
    let stalled = io_background(&url, "write -P 0x31 0 64k");
    std::thread::sleep(Duration::from_millis(500));
    // Reads and the monitor carry on while the write hangs.
    let o = io_outcome(&url, &["read 1M 64k"]);
    assert!(o.iter().all(|l| !l.contains("failed")), "{o:?}");
    q.ok("query-named-block-nodes", Value::Null);
    let mut stalled = stalled;
    assert!(
        stalled.try_wait().unwrap().is_none(),
        "the write was not held"
    );

    // New rules: the held write is checked against them, and fails.
    q.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "dbg",
               "inject-error": [{"event": "none", "iotype": "write", "errno": 5}]}),
    );
    let out = finish(stalled);
    assert!(out.contains("write failed: Input/output error"), "{out}");

    // Held again, then released with no rules: it completes.
    q.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "dbg", "inject-error": [{"event": "none", "x-stall": true}]}),
    );
    let held = io_background(&url, "write -P 0x32 0 64k");
    std::thread::sleep(Duration::from_millis(300));
    q.ok("x-blkdebug-set-rules", json!({"node-name": "dbg"}));
    let out = finish(held);
    assert!(out.contains("wrote 65536/65536"), "{out}");
    let o = io_outcome(&url, &["read -P 0x32 0 64k"]);
    assert!(o.iter().all(|l| !l.contains("failed")), "{o:?}");
    assert!(ls.is_running());
}

#[test]
fn blkdebug_set_rules_errors() {
    let ls = Livesnapd::bare();
    let mut q = ls.qmp();
    blkdebug_export(&mut q, ls.dir.path(), json!([]));
    let cases = [
        (
            json!({"node-name": "nosuch"}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            json!({"node-name": "disk"}),
            "Node 'disk' is not a blkdebug node",
        ),
        (json!({}), "Parameter 'node-name' is missing"),
        (
            json!({"node-name": "dbg", "inject-error": [{"iotype": "write"}]}),
            "Parameter 'inject-error[0].event' is missing",
        ),
        (
            json!({"node-name": "dbg", "inject-error": [{"event": "none", "x-delay-ms": -1}]}),
            "Value '-1' is out of range for parameter 'x-delay-ms'",
        ),
        (
            json!({"node-name": "dbg", "inject-error": [{"event": "none", "x-stall": 1}]}),
            "Invalid parameter type for 'inject-error[0].x-stall', expected: boolean",
        ),
        (
            json!({"node-name": "dbg", "bogus": 1}),
            "Parameter 'bogus' is unexpected",
        ),
    ];
    for (args, text) in cases {
        let e = q.execute("x-blkdebug-set-rules", args.clone()).unwrap_err();
        assert_eq!(e, ("GenericError".to_string(), text.to_string()), "{args}");
    }
    let commands = q.ok("query-commands", Value::Null);
    assert!(
        commands
            .as_array()
            .unwrap()
            .contains(&json!({"name": "x-blkdebug-set-rules"})),
        "{commands}"
    );
}

#[test]
fn blkdebug_options_livesnapd_refuses() {
    let ls = Livesnapd::bare();
    let mut q = ls.qmp();
    let file = ls.dir.path().join("f.raw");
    sparse_file(&file, MIB);
    let add = |extra: Value| {
        let mut args = json!({"driver": "blkdebug", "node-name": "d",
                              "image": {"driver": "file", "filename": file}});
        for (k, v) in extra.as_object().unwrap() {
            args[k] = v.clone();
        }
        args
    };
    let config = ls.dir.path().join("blkdebug.conf");
    std::fs::write(&config, "[inject-error]\nevent = \"read_aio\"\n").unwrap();
    let cases = [
        (
            json!({"set-state": [{"event": "none", "new_state": 2}]}),
            "blkdebug set-state rules are not supported by livesnapd",
        ),
        (
            json!({"opt-write-zero": 512}),
            "blkdebug opt-write-zero is not supported by livesnapd",
        ),
        (
            json!({"opt-discard": 512}),
            "blkdebug opt-discard is not supported by livesnapd",
        ),
        (
            json!({"config": config}),
            "blkdebug config files are not supported by livesnapd; give inject-error rules instead",
        ),
    ];
    for (extra, text) in cases {
        let e = q.execute("blockdev-add", add(extra.clone())).unwrap_err();
        assert_eq!(e.1, text, "{extra}");
    }
    // Nothing was left behind by the refusals.
    assert_eq!(q.ok("query-named-block-nodes", Value::Null), json!([]));
}
