//! Faults under load: what clients and jobs see when the storage below them
//! fails, slows down or hangs, injected with the `blkdebug` filter.
//!
//! The first section checks the filter itself over QMP and NBD, against
//! qemu-storage-daemon where QEMU has the same feature.

use livesnap_testkit as harness;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::pit::{
    check_source_complete, prefill, read_export, read_image, release_node, verify_point_in_time,
    Layout, WriterOpts, Writers,
};
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

// ---------------------------------------------------------------------------
// Faults during jobs: every job type, every error policy
// ---------------------------------------------------------------------------

/// Size of the source and target in the job matrix.
const JOB_DISK: u64 = 16 * MIB;

/// Where faults are injected: outside the blocks the guest writes, so
/// whether a fault is met by the job's own copy (and with which policy) does
/// not depend on the guest's timing.
const FAULT_AT: u64 = 12 * MIB;

/// How long one step of a matrix case may take.
const STEP: Duration = Duration::from_secs(30);

/// How long a force cancel may take to end a job whose I/O hangs: a hang
/// would never end; measured, it takes a few milliseconds.
const CANCEL_BOUND: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq)]
enum JobKind {
    BackupFull,
    BackupTop,
    BackupIncremental,
    Mirror(&'static str),
}

impl JobKind {
    fn is_mirror(self) -> bool {
        matches!(self, JobKind::Mirror(_))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The first target write at FAULT_AT fails with this errno.
    Target(i32),
    /// The first source read at FAULT_AT fails with this errno.
    Source(i32),
    /// Every target write hangs (livesnapd's `x-stall`).
    TargetStall,
    /// Source reads at FAULT_AT hang.
    SourceStall,
}

impl Fault {
    /// (node, rules) to put on the source's and the target's blkdebug.
    fn rules(self) -> (Value, Value) {
        let sector = FAULT_AT / 512;
        let none = json!([]);
        match self {
            Fault::Target(e) => (
                none,
                json!([{"event": "none", "iotype": "write", "sector": sector, "errno": e,
                        "once": true}]),
            ),
            Fault::Source(e) => (
                json!([{"event": "none", "iotype": "read", "sector": sector, "errno": e,
                        "once": true}]),
                none,
            ),
            Fault::TargetStall => (
                none,
                json!([{"event": "none", "iotype": "write", "x-stall": true}]),
            ),
            Fault::SourceStall => (
                json!([{"event": "none", "iotype": "read", "sector": sector, "x-stall": true}]),
                none,
            ),
        }
    }
}

/// One daemon set up for a matrix case: `src` (raw over blkdebug `sdbg`)
/// exported as `disk`, `tgt` (raw over blkdebug `tdbg`), both `JOB_DISK`.
struct Rig {
    qmp: Qmp,
    url: String,
}

fn rig(qmp: Qmp, dir: &Path, fault: Fault) -> Rig {
    let (src_rules, tgt_rules) = fault.rules();
    let mut r = rig_nodes(qmp, dir, src_rules, tgt_rules);
    r.url = export(&mut r.qmp, dir, "src", "disk");
    r
}

/// The nodes of a [`Rig`] with these rules and a started NBD server, no export.
fn rig_nodes(mut qmp: Qmp, dir: &Path, src_rules: Value, tgt_rules: Value) -> Rig {
    for (node, dbg, rules) in [("src", "sdbg", src_rules), ("tgt", "tdbg", tgt_rules)] {
        let file = dir.join(format!("{node}.raw"));
        sparse_file(&file, JOB_DISK);
        let mut dbg = json!({"driver": "blkdebug", "node-name": dbg,
                             "image": {"driver": "file", "filename": file}});
        // qsd refuses an empty rule list.
        if rules != json!([]) {
            dbg["inject-error"] = rules;
        }
        qmp.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": node, "file": dbg}),
        );
    }
    let sock = dir.join("nbd.sock");
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    Rig {
        qmp,
        url: String::new(),
    }
}

/// Exports `node` writable as `name`; its NBD URL.
fn export(qmp: &mut Qmp, dir: &Path, node: &str, name: &str) -> String {
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": name, "node-name": node, "name": name, "writable": true}),
    );
    format!(
        "nbd+unix:///{name}?socket={}",
        dir.join("nbd.sock").display()
    )
}

fn guest_layout(tag: u64) -> Layout {
    // The first 8 MiB, away from FAULT_AT.
    Layout::new(4096, 8 * MIB / 4096, 2, tag)
}

fn start_job(qmp: &mut Qmp, kind: JobKind, policy: &str) {
    let mut args = json!({"job-id": "j", "device": "src", "target": "tgt",
                          "on-source-error": policy, "on-target-error": policy});
    match kind {
        JobKind::BackupFull => args["sync"] = json!("full"),
        JobKind::BackupTop => args["sync"] = json!("top"),
        JobKind::BackupIncremental => {
            args["sync"] = json!("incremental");
            args["bitmap"] = json!("b0");
        }
        JobKind::Mirror(mode) => {
            args["sync"] = json!("full");
            args["copy-mode"] = json!(mode);
        }
    }
    let cmd = if kind.is_mirror() {
        "blockdev-mirror"
    } else {
        "blockdev-backup"
    };
    qmp.ok(cmd, args);
}

/// The job's events until it ends (after a resume of a stopped job and a
/// cancel of a READY mirror), reduced to the fields that tell the outcome,
/// with `paused`/`io-status` of the job while stopped. `after_error` runs
/// once, when the first error has been handled (after the resume of a
/// stopped job).
fn run_to_end(qmp: &mut Qmp, kind: JobKind, mut after_error: impl FnMut()) -> Vec<Value> {
    let mut error_handled = false;
    let deadline = Instant::now() + STEP;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(ev) = qmp.event(left) else {
            panic!("job j did not end within {STEP:?}; saw {seen:?}");
        };
        let name = ev["event"].as_str().unwrap_or_default().to_string();
        if !name.starts_with("BLOCK_JOB") {
            continue;
        }
        let d = &ev["data"];
        let mut kept = json!({"event": name});
        for k in ["operation", "action", "error", "type"] {
            if let Some(v) = d.get(k) {
                kept[k] = v.clone();
            }
        }
        seen.push(kept);
        match name.as_str() {
            "BLOCK_JOB_ERROR" if d["action"] == "stop" => {
                // The job pauses on its own; show how, then resume it.
                let mut job = Value::Null;
                wait_until(STEP, "the stopped job to be paused", || {
                    let jobs = qmp.ok("query-block-jobs", Value::Null);
                    job = jobs[0].clone();
                    job["paused"] == true
                });
                seen.push(json!({"paused": job["paused"], "io-status": job["io-status"]}));
                qmp.ok("block-job-resume", json!({"device": "j"}));
            }
            _ => {}
        }
        if name == "BLOCK_JOB_ERROR" && !error_handled {
            error_handled = true;
            after_error();
        }
        match name.as_str() {
            "BLOCK_JOB_READY" if kind.is_mirror() => {
                qmp.ok("block-job-cancel", json!({"device": "j"}));
            }
            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => return seen,
            _ => {}
        }
    }
}

/// What QEMU's policies say for an error `errno` under `policy`.
fn expected_events(kind: JobKind, fault: Fault, policy: &str) -> Vec<Value> {
    let (op, errno) = match fault {
        Fault::Target(e) => ("write", e),
        Fault::Source(e) => ("read", e),
        _ => unreachable!(),
    };
    let action = match policy {
        "enospc" if errno == libc::ENOSPC => "stop",
        "enospc" => "report",
        p => p,
    };
    let ty = if kind.is_mirror() { "mirror" } else { "backup" };
    let mut v = vec![json!({"event": "BLOCK_JOB_ERROR", "operation": op, "action": action})];
    if action == "report" {
        let text = std::io::Error::from_raw_os_error(errno).to_string();
        let text = text.split(" (os error").next().unwrap().to_string();
        v.push(json!({"event": "BLOCK_JOB_COMPLETED", "type": ty, "error": text}));
        return v;
    }
    if action == "stop" {
        let io = if errno == libc::ENOSPC {
            "nospace"
        } else {
            "failed"
        };
        v.push(json!({"paused": true, "io-status": io}));
    }
    if kind.is_mirror() {
        v.push(json!({"event": "BLOCK_JOB_READY", "type": ty}));
    }
    v.push(json!({"event": "BLOCK_JOB_COMPLETED", "type": ty}));
    v
}

/// What a matrix case has before its job starts: the bitmap an incremental
/// backup needs, the guest's data, data where the fault is (so that every
/// sync mode copies it), and two writers that have had writes acknowledged.
fn guest_before_job(r: &mut Rig, kind: JobKind, layout: &Layout) -> Writers {
    if kind == JobKind::BackupIncremental {
        r.qmp.ok(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        );
    }
    prefill(&r.url, layout);
    let o = io_outcome(&r.url, &[&format!("write -P 0x5a {FAULT_AT} 1M")]);
    assert!(o.iter().all(|l| !l.contains("failed")), "{o:?}");
    let w = Writers::start(
        &[&r.url],
        layout,
        &WriterOpts {
            queue_depth: 2,
            rate: Some(500.0),
            ..Default::default()
        },
    );
    w.wait_acked(20, STEP);
    w
}

/// One error case on one daemon: the job's events, and the guest's check
/// (no failed write, every acknowledged write on the source).
fn error_case(qmp: Qmp, dir: &Path, kind: JobKind, fault: Fault, policy: &str) -> Vec<Value> {
    let mut r = rig(qmp, dir, fault);
    let layout = guest_layout(0xfa17 ^ FAULT_AT);
    let mut w = Some(guest_before_job(&mut r, kind, &layout));
    let mut log = None;
    start_job(&mut r.qmp, kind, policy);
    // The guest writes until the error has been met and handled. A mirror's
    // guest then stops: on two busy cores a background mirror beside a
    // steady writer may not reach READY within the bound (its copy yields
    // to guest writes), and convergence is not what this case is about.
    let events = run_to_end(&mut r.qmp, kind, || {
        if kind.is_mirror() {
            log = w.take().map(Writers::stop);
        }
    });
    let log = log.unwrap_or_else(|| w.take().expect("writers still running").stop());
    log.assert_no_failures();
    check_source_complete(&log, &read_export(&r.url, layout.size()))
        .unwrap_or_else(|e| panic!("{kind:?} {fault:?} {policy}: {e}"));
    let o = io_outcome(&r.url, &[&format!("read -P 0x5a {FAULT_AT} 1M")]);
    assert!(o.iter().all(|l| !l.contains("failed")), "{o:?}");
    events
}

const POLICIES: &[&str] = &["report", "ignore", "stop", "enospc"];
const ERRORS: &[Fault] = &[
    Fault::Target(libc::EIO),
    Fault::Target(libc::ENOSPC),
    Fault::Source(libc::EIO),
];

/// Every error and policy for `kind`, on livesnapd and (unless `ours_only`)
/// on qemu-storage-daemon: the events are QEMU's policy, the same on both,
/// and the guest loses nothing.
fn error_matrix(kind: JobKind, ours_only: bool) {
    for &fault in ERRORS {
        for &policy in POLICIES {
            let want = expected_events(kind, fault, policy);
            let ls = Livesnapd::bare();
            let ours = error_case(ls.qmp(), ls.dir.path(), kind, fault, policy);
            assert_eq!(ours, want, "livesnapd: {kind:?} {fault:?} {policy}");
            if !ours_only {
                let mut qsd = Qsd::bare();
                let (qmp, dir) = (qsd.qmp(), qsd.dir.path().to_path_buf());
                let theirs =
                    std::panic::catch_unwind(move || error_case(qmp, &dir, kind, fault, policy));
                match theirs {
                    Ok(theirs) => assert_eq!(theirs, want, "qsd: {kind:?} {fault:?} {policy}"),
                    // qsd 10.0.2 sometimes segfaults when a write-blocking
                    // mirror's target fails (docs/reliability.md): nothing
                    // to compare with, which is not livesnapd's failure.
                    Err(e) => match wait_exit(&mut qsd) {
                        Some(st) => eprintln!(
                            "qsd crashed ({st}) in {kind:?} {fault:?} {policy}; case not compared"
                        ),
                        None => std::panic::resume_unwind(e),
                    },
                }
            }
        }
    }
}

/// qsd's exit status once it has died, waiting a little for the kernel to
/// reap it; `None` if it is still running.
fn wait_exit(qsd: &mut Qsd) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(st) = qsd.exit_status() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn backup_full_faults_under_every_policy() {
    error_matrix(JobKind::BackupFull, false);
}

#[test]
fn backup_top_faults_under_every_policy() {
    error_matrix(JobKind::BackupTop, false);
}

#[test]
fn backup_incremental_faults_under_every_policy() {
    error_matrix(JobKind::BackupIncremental, false);
}

#[test]
fn mirror_background_faults_under_every_policy() {
    error_matrix(JobKind::Mirror("background"), false);
}

#[test]
fn mirror_write_blocking_faults_under_every_policy() {
    error_matrix(JobKind::Mirror("write-blocking"), false);
}

#[test]
fn mirror_auto_faults_under_every_policy() {
    // `auto` is livesnapd's own copy mode.
    error_matrix(JobKind::Mirror("auto"), true);
}

/// Waits for job `j`'s end event and returns it, or panics with what was seen.
fn wait_job_end(qmp: &mut Qmp, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(ev) = qmp.event(left) else {
            panic!("job j did not end within {limit:?}; saw {seen:?}");
        };
        if matches!(
            ev["event"].as_str(),
            Some("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED")
        ) {
            return ev;
        }
        seen.push(ev);
    }
}

/// Clears the rules of both blkdebug nodes (held requests go on).
fn clear_faults(qmp: &mut Qmp) {
    for node in ["sdbg", "tdbg"] {
        qmp.ok("x-blkdebug-set-rules", json!({"node-name": node}));
    }
}

/// A target or source that hangs, under every job type: a force cancel ends
/// the job within CANCEL_BOUND (QMP keeps answering meanwhile), the guest gets
/// no error (backups break their snapshot, the default) and keeps every
/// acknowledged write.
#[test]
fn a_force_cancel_is_prompt_when_the_target_or_source_hangs() {
    let kinds = [
        JobKind::BackupFull,
        JobKind::BackupTop,
        JobKind::BackupIncremental,
        JobKind::Mirror("background"),
        JobKind::Mirror("write-blocking"),
        JobKind::Mirror("auto"),
    ];
    for kind in kinds {
        for fault in [Fault::TargetStall, Fault::SourceStall] {
            let mut ls = Livesnapd::bare();
            let mut r = rig(ls.qmp(), ls.dir.path(), fault);
            let layout = guest_layout(0x57a11);
            let w = guest_before_job(&mut r, kind, &layout);
            start_job(&mut r.qmp, kind, "report");
            // Let the job run into the hang.
            std::thread::sleep(Duration::from_millis(300));
            r.qmp.ok("query-block-jobs", Value::Null);
            let t = Instant::now();
            r.qmp
                .ok("block-job-cancel", json!({"device": "j", "force": true}));
            let ev = wait_job_end(&mut r.qmp, CANCEL_BOUND);
            eprintln!(
                "{kind:?} {fault:?}: {} after {:?}",
                ev["event"],
                t.elapsed()
            );
            assert_eq!(
                ev["event"], "BLOCK_JOB_CANCELLED",
                "{kind:?} {fault:?}: {ev}"
            );
            clear_faults(&mut r.qmp);
            let after = w.acked();
            wait_until(STEP, "guest writes after the cancel", || {
                w.acked() > after + 50
            });
            let log = w.stop();
            log.assert_no_failures();
            check_source_complete(&log, &read_export(&r.url, layout.size()))
                .unwrap_or_else(|e| panic!("{kind:?} {fault:?}: {e}"));
            assert!(ls.is_running());
        }
    }
}

/// The target fails every write, the guest's copies-before-write included,
/// under each error policy and each `on-cbw-error`. break-snapshot (the
/// default): no guest write fails and the job ends with the target's error
/// (a stopped job after its resume). break-guest-write: guest writes may fail
/// but every acknowledged one is on the source, and a force cancel ends the
/// job. QMP keeps answering throughout.
#[test]
fn a_failing_backup_target_under_each_policy_and_on_cbw_error() {
    for errno in [libc::EIO, libc::ENOSPC] {
        for &policy in POLICIES {
            for cbw in [None, Some("break-guest-write")] {
                let what = format!("errno {errno}, {policy}, {cbw:?}");
                let ls = Livesnapd::bare();
                let mut r = rig(ls.qmp(), ls.dir.path(), Fault::Target(errno));
                // Every target write fails, not only the first.
                r.qmp.ok(
                    "x-blkdebug-set-rules",
                    json!({"node-name": "tdbg", "inject-error":
                           [{"event": "none", "iotype": "write", "errno": errno}]}),
                );
                let layout = guest_layout(0xcb7);
                prefill(&r.url, &layout);
                let w = Writers::start(
                    &[&r.url],
                    &layout,
                    &WriterOpts {
                        queue_depth: 2,
                        rate: Some(500.0),
                        ..Default::default()
                    },
                );
                w.wait_acked(20, STEP);
                let mut args = json!({"job-id": "j", "device": "src", "target": "tgt",
                                      "sync": "full", "on-target-error": policy});
                if let Some(c) = cbw {
                    args["on-cbw-error"] = json!(c);
                }
                r.qmp.ok("blockdev-backup", args);
                let text = std::io::Error::from_raw_os_error(errno).to_string();
                let text = text.split(" (os error").next().unwrap().to_string();
                let deadline = Instant::now() + STEP;
                let end = loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ev = r
                        .qmp
                        .event(left)
                        .unwrap_or_else(|| panic!("{what}: the job did not end within {STEP:?}"));
                    match ev["event"].as_str() {
                        Some("BLOCK_JOB_ERROR") if ev["data"]["action"] == "stop" => {
                            if cbw.is_some() {
                                // Held writes fail after the hold; then give up.
                                r.qmp
                                    .ok("block-job-cancel", json!({"device": "j", "force": true}));
                            } else {
                                // Resumed into the same full target: stops again
                                // until the snapshot breaks, then fails.
                                std::thread::sleep(Duration::from_millis(200));
                                let _ = r.qmp.execute("block-job-resume", json!({"device": "j"}));
                            }
                        }
                        Some("BLOCK_JOB_ERROR") if cbw.is_some() && policy == "ignore" => {
                            // Ignored for ever: the job would retry until cancelled.
                            let _ = r
                                .qmp
                                .execute("block-job-cancel", json!({"device": "j", "force": true}));
                        }
                        Some("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED") => break ev,
                        _ => {}
                    }
                };
                r.qmp.ok("query-version", Value::Null);
                let log = w.stop();
                if cbw.is_none() {
                    log.assert_no_failures();
                    assert_eq!(end["event"], "BLOCK_JOB_COMPLETED", "{what}: {end}");
                    assert_eq!(end["data"]["error"], json!(text), "{what}: {end}");
                } else if end["event"] == "BLOCK_JOB_COMPLETED" {
                    assert_eq!(end["data"]["error"], json!(text), "{what}: {end}");
                }
                check_source_complete(&log, &read_export(&r.url, layout.size()))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                eprintln!(
                    "{what}: {} acked, {} failed, {}",
                    log.acked(),
                    log.failed(),
                    end["event"]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Disk full for real: a target on a small tmpfs
// ---------------------------------------------------------------------------

/// A size-limited tmpfs mounted by the test, unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let (st, out, err) = run_within(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}")])
                .arg("tmpfs")
                .arg(dir.path()),
            Duration::from_secs(30),
        );
        assert!(
            st.success(),
            "mount -t tmpfs (the test runs as root): {out}{err}"
        );
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: a daemon still holding a file must not leave the mount behind.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

const FULL_FS: u64 = 64 * MIB;
const FULL_DISK: u64 = 48 * MIB;
const FILLER: u64 = 32 * MIB;

/// What one disk-full run ended as.
#[derive(Debug)]
struct FullOutcome {
    /// The job's events reduced to name/action/error, in order.
    events: Vec<String>,
    /// Guest writes acknowledged.
    #[allow(dead_code)] // printed
    acked: usize,
    /// Guest writes failed.
    failed: usize,
    /// A completed backup's target checked as a point-in-time copy.
    copy: Option<Result<String, String>>,
}

/// Source `src` (48 MiB of data) exported as `disk`; target `tgt`, a raw
/// file on a 64 MiB tmpfs of which a filler takes 32 MiB, so the job runs
/// out of space half way. A stop makes room (the filler goes) and resumes.
fn disk_full_case(mut qmp: Qmp, dir: &Path, cmd: &str, extra: Value) -> FullOutcome {
    let fs = SmallFs::mount(FULL_FS);
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0xffu8; FILLER as usize]).unwrap();
    let src = dir.join("src.raw");
    sparse_file(&src, FULL_DISK);
    let tgt = fs.path().join("tgt.raw");
    sparse_file(&tgt, FULL_DISK);
    for (node, file) in [("src", &src), ("tgt", &tgt)] {
        qmp.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": node,
                   "file": {"driver": "file", "filename": file}}),
        );
    }
    let sock = dir.join("nbd.sock");
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "src", "name": "disk", "writable": true}),
    );
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    let layout = Layout::new(4096, FULL_DISK / 4096, 2, 0xf011);
    prefill(&url, &layout);
    let w = Writers::start(
        &[&url],
        &layout,
        &WriterOpts {
            queue_depth: 2,
            // Slow enough for a background mirror to converge.
            rate: Some(200.0),
            ..Default::default()
        },
    );
    w.wait_acked(20, STEP);
    let mut args = json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"});
    for (k, v) in extra.as_object().unwrap() {
        args[k] = v.clone();
    }
    let t0 = Instant::now();
    qmp.ok(cmd, args);
    let t1 = Instant::now();
    let deadline = Instant::now() + STEP;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(ev) = qmp.event(left) else {
            let jobs = qmp.ok("query-block-jobs", Value::Null);
            panic!("{cmd} {extra}: no end within {STEP:?}: {events:?}; jobs: {jobs}");
        };
        let (name, d) = (ev["event"].as_str().unwrap_or_default(), &ev["data"]);
        if !name.starts_with("BLOCK_JOB") {
            continue;
        }
        let mut line = name.to_string();
        for k in ["action", "error"] {
            if let Some(v) = d[k].as_str() {
                line += &format!(" {k}={v}");
            }
        }
        events.push(line);
        // The daemon keeps serving the monitor and the export meanwhile.
        qmp.ok("query-block-jobs", Value::Null);
        match name {
            "BLOCK_JOB_ERROR" if d["action"] == "stop" => {
                if filler.exists() {
                    std::fs::remove_file(&filler).unwrap();
                }
                // A mirror sends one stop per failed copy: later ones may
                // find the job resumed already.
                let _ = qmp.execute("block-job-resume", json!({"device": "j"}));
            }
            "BLOCK_JOB_READY" => {
                qmp.ok("block-job-cancel", json!({"device": "j"}));
            }
            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => break,
            _ => {}
        }
    }
    let after = w.acked();
    wait_until(STEP, "guest writes after the job", || {
        w.acked() > after + 20
    });
    let log = w.stop();
    check_source_complete(&log, &read_export(&url, layout.size()))
        .unwrap_or_else(|e| panic!("{cmd} {extra}: {e}"));
    // A backup that completed holds the disk as of its start, the guest
    // writes held and copied again after the resume included.
    let copy = (cmd == "blockdev-backup"
        && events.last().is_some_and(|e| e == "BLOCK_JOB_COMPLETED"))
    .then(|| {
        verify_point_in_time(&log, &read_image(&tgt, "raw"), t0, t1)
            .map(|r| r.to_string())
            .map_err(|e| e.to_string())
    });
    // Nothing holds the tmpfs when it goes.
    release_node(&mut qmp, "tgt", STEP);
    FullOutcome {
        copy,
        events,
        acked: log.acked(),
        failed: log.failed(),
    }
}

/// The disk-full cases: (command, extra arguments, livesnapd's events).
fn disk_full_cases() -> Vec<(&'static str, Value, Vec<&'static str>)> {
    // A guest's copy-before-write may meet the full target before the
    // background copy: then the snapshot breaks and no BLOCK_JOB_ERROR is
    // sent, so `action=report` errors are not compared.
    let report = vec!["BLOCK_JOB_COMPLETED error=No space left on device"];
    let stop = |last: Vec<&'static str>| {
        let mut v = vec!["BLOCK_JOB_ERROR action=stop"];
        v.extend(last);
        v
    };
    vec![
        ("blockdev-backup", json!({}), report.clone()),
        (
            "blockdev-backup",
            json!({"on-target-error": "stop"}),
            stop(vec!["BLOCK_JOB_COMPLETED"]),
        ),
        (
            "blockdev-backup",
            json!({"on-target-error": "enospc"}),
            stop(vec!["BLOCK_JOB_COMPLETED"]),
        ),
        (
            "blockdev-mirror",
            json!({"copy-mode": "background"}),
            report.clone(),
        ),
        (
            "blockdev-mirror",
            json!({"copy-mode": "write-blocking"}),
            report.clone(),
        ),
        (
            "blockdev-mirror",
            json!({"copy-mode": "background", "on-target-error": "enospc"}),
            stop(vec!["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]),
        ),
    ]
}

/// Backup and mirror into a target on a full tmpfs: the jobs end or pause
/// as their policy says (a stopped job completes once room is made), QMP
/// and NBD keep serving, no guest write fails, the source keeps every
/// acknowledged write. qemu-storage-daemon under the same script is run
/// and reported (its backup fails guest writes: break-guest-write).
#[test]
fn jobs_into_a_full_filesystem() {
    let only = std::env::var("LIVESNAP_FULL_CASE").ok();
    for (i, (cmd, extra, want)) in disk_full_cases().into_iter().enumerate() {
        if only.as_ref().is_some_and(|o| *o != i.to_string()) {
            continue;
        }
        let ls = Livesnapd::bare();
        let ours = disk_full_case(ls.qmp(), ls.dir.path(), cmd, extra.clone());
        eprintln!("livesnapd {cmd} {extra}: {ours:?}");
        let reported = |e: &&String| e.as_str() == "BLOCK_JOB_ERROR action=report";
        let mut events: Vec<&String> = ours.events.iter().filter(|e| !reported(e)).collect();
        // A mirror reports each failed copy in flight (as QEMU's does); a
        // backup stops once per failure (QEMU's block-copy call).
        if cmd == "blockdev-mirror" {
            events.dedup();
        }
        assert_eq!(events, want, "{cmd} {extra}");
        assert_eq!(
            ours.failed, 0,
            "guest writes failed: {cmd} {extra}: {ours:?}"
        );
        if let Some(Err(e)) = &ours.copy {
            panic!("{cmd} {extra}: the completed backup is no point-in-time copy: {e}");
        }
        // Recorded, not asserted: qsd 10.0.2 was seen to segfault here now and then.
        let theirs = std::panic::catch_unwind(|| {
            let qsd = Qsd::bare();
            disk_full_case(qsd.qmp(), qsd.dir.path(), cmd, extra.clone())
        });
        eprintln!("qsd {cmd} {extra}: {theirs:?}");
    }
}

// ---------------------------------------------------------------------------
// Fleecing with a failing scratch target or source
// ---------------------------------------------------------------------------

/// One fleecing run: a copy-before-write filter `cbw` over `src` with
/// `on-cbw-error: policy` into `tgt` (with `tgt_rules`), the guest writing
/// through the filter (exported as `disk`, as QEMU needs it), a
/// `snapshot-access` export `snap`. Returns (what a read of the snapshot
/// said, whether any guest write failed); panics if an acknowledged write
/// is not on the source.
fn fleecing_case(
    qmp: Qmp,
    dir: &Path,
    src_rules: Value,
    tgt_rules: Value,
    policy: &str,
) -> (Vec<String>, bool) {
    let mut r = rig_nodes(qmp, dir, src_rules, tgt_rules);
    let layout = guest_layout(0xf1ee);
    // The disk before the filter: written through a first export.
    let pre = export(&mut r.qmp, dir, "src", "pre");
    prefill(&pre, &layout);
    // The prefill's connection may still be closing on the server's side.
    wait_until(STEP, "export 'pre' to be deleted", || {
        r.qmp
            .execute("block-export-del", json!({"id": "pre"}))
            .is_ok()
    });
    r.qmp.ok(
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
               "target": "tgt", "on-cbw-error": policy}),
    );
    r.qmp.ok(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}),
    );
    let url = export(&mut r.qmp, dir, "cbw", "disk");
    r.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "snap", "node-name": "snap", "name": "snap"}),
    );
    let snap = format!("nbd+unix:///snap?socket={}", dir.join("nbd.sock").display());
    let w = Writers::start(
        &[&url],
        &layout,
        &WriterOpts {
            queue_depth: 2,
            rate: Some(500.0),
            ..Default::default()
        },
    );
    wait_until(STEP, "guest writes", || w.acked() + w.failed() > 100);
    let (_, out, err) = run_within(
        Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read 0 64k", &snap]),
        STEP,
    );
    let read: Vec<String> = format!("{out}{err}")
        .lines()
        .filter(|l| l.contains("failed") || l.starts_with("read"))
        .map(str::to_string)
        .collect();
    r.qmp.ok("query-named-block-nodes", Value::Null);
    let log = w.stop();
    check_source_complete(&log, &read_export(&url, layout.size()))
        .unwrap_or_else(|e| panic!("fleecing {policy}: {e}"));
    let read = read
        .into_iter()
        .map(|l| l.split(" (").next().unwrap().to_string())
        .map(|l| {
            if l.starts_with("read 65536/65536") {
                "read ok".into()
            } else {
                l
            }
        })
        .collect();
    (read, log.failed() > 0)
}

/// Fleecing into a scratch target that fails every write (EIO, ENOSPC), or
/// from a source whose first read for a copy fails, under both
/// `on-cbw-error` values, on livesnapd and on qemu-storage-daemon:
/// break-guest-write fails guest writes and keeps the snapshot readable;
/// break-snapshot keeps every guest write and the snapshot reads fail with
/// EACCES. The two daemons answer the same.
#[test]
fn fleecing_with_a_failing_target_or_source_as_qsd() {
    let all_writes = |e: i32| json!([{"event": "none", "iotype": "write", "errno": e}]);
    let first_read = json!([{"event": "none", "iotype": "read", "errno": 5, "once": true}]);
    let cases = [
        (json!([]), all_writes(libc::EIO)),
        (json!([]), all_writes(libc::ENOSPC)),
        (first_read, json!([])),
    ];
    for (src_rules, tgt_rules) in cases {
        for policy in ["break-guest-write", "break-snapshot"] {
            let what = format!("{policy}, source {src_rules}, target {tgt_rules}");
            let ls = Livesnapd::bare();
            let ours = fleecing_case(
                ls.qmp(),
                ls.dir.path(),
                src_rules.clone(),
                tgt_rules.clone(),
                policy,
            );
            let qsd = Qsd::bare();
            let theirs = fleecing_case(
                qsd.qmp(),
                qsd.dir.path(),
                src_rules.clone(),
                tgt_rules.clone(),
                policy,
            );
            eprintln!("{what}: livesnapd {ours:?}, qsd {theirs:?}");
            if policy == "break-snapshot" {
                // The broken snapshot's EACCES reaches the NBD client as
                // NBD_EPERM from livesnapd, NBD_EINVAL from qsd (which maps
                // every errno outside its short list to EINVAL).
                let failed = |text: &str| (vec![format!("read failed: {text}")], false);
                assert_eq!(ours, failed("Operation not permitted"), "{what}");
                assert_eq!(theirs, failed("Invalid argument"), "{what}");
            } else {
                assert_eq!(ours, theirs, "{what}: livesnapd (left), qsd (right)");
                assert_eq!(ours, (vec!["read ok".to_string()], true), "{what}");
            }
        }
    }
}
