//! `livesnap snapshot` scenarios, the same against every daemon: a snapshot
//! under concurrent writers checked point-in-time, and the failures (deadline,
//! SIGINT, failing target) that must leave no node, job or file behind.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cli::{livesnap, spawn_until, window_of, Daemon, Kind, Out};
use crate::pit::{
    check_source_complete, initial_image, prefill, read_export, read_image, verify_point_in_time,
    Layout, WriterOpts, Writers,
};
use crate::run;

const MIB: u64 = 1 << 20;
/// Bound of one CLI run in these tests.
pub const CLI_LIMIT: Duration = Duration::from_secs(120);
/// Bound of waits on writers.
const WAIT: Duration = Duration::from_secs(60);
/// Writes acknowledged before the snapshot starts, and after it ends.
const WARMUP: u64 = 1500;

/// What the daemon holds before a snapshot, to compare after it.
pub struct Before {
    nodes: BTreeSet<String>,
}

/// Records the daemon's nodes.
pub fn before(d: &Daemon) -> Before {
    Before {
        nodes: d.qmp().node_names(),
    }
}

/// Panics unless the daemon has exactly the nodes it had, no job, and the
/// target file does not exist.
pub fn assert_nothing_left(d: &Daemon, b: &Before, target: &Path) {
    let mut q = d.qmp();
    assert_eq!(q.node_names(), b.nodes, "nodes left behind");
    assert!(
        q.job_ids().is_empty(),
        "jobs left behind: {:?}",
        q.job_ids()
    );
    assert!(
        !target.exists(),
        "target file {} left behind",
        target.display()
    );
}

/// `livesnap snapshot` of the daemon's disk to `target` with `method`.
pub fn snapshot_args<'a>(d: &'a Daemon, target: &'a str, method: &'a str) -> Vec<&'a str> {
    vec![
        "snapshot",
        "--qmp",
        d.cli_sock.to_str().unwrap(),
        "disk",
        target,
        "--method",
        method,
    ]
}

/// The snapshot arguments every scenario here uses.
fn args<'a>(d: &'a Daemon, target: &'a str, method: &'a str, format: &'a str) -> Vec<&'a str> {
    let mut a = snapshot_args(d, target, method);
    a.extend(["--format", format]);
    a
}

/// `livesnap snapshot` of a 32 MiB raw disk on a fresh `kind` daemon while
/// 4 writers keep writing self-describing blocks over NBD: the target must
/// equal the disk at one instant inside the window the JSON report names,
/// the disk must keep every acknowledged write, and the disk at the end must
/// not pass as a copy from the window (so the writes after it give the check
/// teeth). Returns the report.
pub fn pit_snapshot(kind: Kind, method: &str, format: &str, extra: &[&str]) -> Value {
    let size = 32 * MIB;
    let d = &Daemon::raw(kind, size);
    let layout = Layout::new(4096, size / 4096, 4, 0x5eed ^ size);
    prefill(&d.url, &layout);
    let b = before(d);
    let w = Writers::start(&[&d.url], &layout, &WriterOpts::default());
    w.wait_acked(WARMUP, WAIT);
    let target = d.path(&format!("snap-{method}.{format}"));
    let mut a = args(d, target.to_str().unwrap(), method, format);
    a.extend(["--json"]);
    a.extend(extra);
    let out = livesnap(&a, CLI_LIMIT).expect(0);
    let report = out.json();
    w.wait_acked(w.acked() + WARMUP, WAIT);
    let log = w.stop();
    log.assert_no_failures();
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["method"], method, "{report}");
    let (t0, t1) = window_of(&report);
    let copy = read_image(&target, format);
    let pit = verify_point_in_time(&log, &copy, t0, t1).unwrap_or_else(|e| {
        panic!("{method} snapshot ({format}) is not point-in-time: {e}\nreport: {report}")
    });
    eprintln!(
        "{method} {format}: {} writes, {} acknowledged inside the window; {pit}",
        log.writes.len(),
        log.acked_between(t0, t1)
    );
    let end = read_export(&d.url, layout.size());
    check_source_complete(&log, &end).unwrap_or_else(|e| panic!("the disk lost writes: {e}"));
    assert!(
        verify_point_in_time(&log, &end, t0, t1).is_err(),
        "the disk at the end passes as a copy from the window: no write raced the snapshot"
    );
    // Only the target's nodes came and went.
    assert_eq!(d.qmp().node_names(), b.nodes, "nodes left behind");
    assert!(d.qmp().job_ids().is_empty(), "jobs left behind");
    // A backup's work is the disk; a mirror's `len` grows with re-dirtied data.
    if method == "backup" {
        assert_eq!(report["bytes_total"].as_u64(), Some(size), "{report}");
    } else {
        assert!(report["bytes_copied"].as_u64() >= Some(size), "{report}");
    }
    report
}

/// Runs `scenario` for backup, then mirror, on one fresh `kind` daemon
/// with a raw disk of `size` bytes.
fn each_method(kind: Kind, size: u64, scenario: impl Fn(&Daemon, &str)) {
    // Data, not a sparse disk: jobs skip zeroes, so a job over zeroes ends
    // at once whatever its speed, and these scenarios need one that runs.
    let d = Daemon::raw_with_data(kind, size);
    for method in ["backup", "mirror"] {
        scenario(&d, method);
    }
}

/// Reads the raw disk file's bytes (the daemon has it open; raw data is
/// read through the page cache it writes to).
fn disk_bytes(d: &Daemon) -> Vec<u8> {
    std::fs::read(&d.image).unwrap()
}

/// For each method on a fresh `kind` daemon, a job too slow for its
/// deadline: exit code 4, nothing left, the disk unchanged.
pub fn deadline_expires(kind: Kind) {
    each_method(kind, 64 * MIB, deadline_expires_with);
}

fn deadline_expires_with(d: &Daemon, method: &str) {
    let disk = disk_bytes(d);
    let b = before(d);
    let target = d.path(&format!("deadline-{method}.qcow2"));
    let mut a = args(d, target.to_str().unwrap(), method, "qcow2");
    a.extend(["--speed", "1M", "--deadline", "2s", "--json"]);
    let start = std::time::Instant::now();
    let out = livesnap(&a, CLI_LIMIT).expect(4);
    let took = start.elapsed();
    let j = out.json();
    assert_eq!(j["error"], "deadline", "{j}");
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("deadline of 2.0s expired"),
        "{j}"
    );
    assert!(
        took < Duration::from_secs(10),
        "a 2 s deadline took {took:?} to end"
    );
    assert_nothing_left(d, &b, &target);
    assert!(disk_bytes(d) == disk, "the source changed");
}

/// For each method on a fresh `kind` daemon, SIGINT while the job runs:
/// exit code 5, nothing left, the disk unchanged.
pub fn sigint(kind: Kind) {
    each_method(kind, 64 * MIB, sigint_with);
}

fn sigint_with(d: &Daemon, method: &str) {
    let disk = disk_bytes(d);
    let b = before(d);
    let target = d.path(&format!("sigint-{method}.raw"));
    let mut a = args(d, target.to_str().unwrap(), method, "raw");
    a.extend(["--speed", "1M"]);
    // Progress lines on stderr mean the job is running.
    let (out, stderr) = spawn_until(&a, "progress:").signal(libc::SIGINT, CLI_LIMIT);
    assert_eq!(out.code(), 5, "stderr: {stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    assert_nothing_left(d, &b, &target);
    assert!(disk_bytes(d) == disk, "the source changed");
}

/// For each method on a fresh `kind` daemon, every write to the target
/// fails (a blkdebug node under it): exit code 3, nothing left. With
/// `writers`, guest writes go on meanwhile and none may fail.
pub fn failing_target(kind: Kind, writers: bool) {
    each_method(kind, 16 * MIB, |d, method| {
        failing_target_with(d, method, writers)
    });
}

fn failing_target_with(d: &Daemon, method: &str, writers: bool) {
    let layout = Layout::new(4096, 8 << 20 >> 12, 4, 0xfa11);
    // Data to copy: jobs skip what reads as zeroes, which would never touch the target.
    prefill(&d.url, &layout);
    let w = writers.then(|| {
        let w = Writers::start(&[&d.url], &layout, &WriterOpts::default());
        w.wait_acked(WARMUP, WAIT);
        w
    });
    let b = before(d);
    let target = d.path(&format!("failing-{method}.raw"));
    let mut a = args(d, target.to_str().unwrap(), method, "raw");
    a.extend([
        "--json",
        "--x-target-blkdebug",
        r#"[{"event": "write_aio", "iotype": "write", "errno": 5}]"#,
    ]);
    let out = livesnap(&a, CLI_LIMIT).expect(3);
    let j = out.json();
    assert_eq!(j["error"], "job", "{j}");
    assert!(
        j["reason"].as_str().unwrap().contains("error"),
        "reason should name the error: {j}"
    );
    if let Some(w) = w {
        w.wait_acked(w.acked() + WARMUP, WAIT);
        let log = w.stop();
        log.assert_no_failures();
        check_source_complete(&log, &read_export(&d.url, layout.size()))
            .unwrap_or_else(|e| panic!("the disk lost writes: {e}"));
    }
    assert_nothing_left(d, &b, &target);
}

/// A qcow2 disk over a raw backing file (`--shallow`): the target holds only
/// the top layer, names the same backing file, is point-in-time through it,
/// and allocates nothing where the top layer has nothing.
pub fn shallow(kind: Kind, method: &str, extra: &[&str]) {
    const SIZE: u64 = 32 << 20;
    const WRITTEN: u64 = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    // The backing file holds the initial records where the writers write,
    // and a pattern past that the snapshot must read through its backing.
    let layout = Layout::new(4096, WRITTEN / 4096, 4, 0x5a11 + method.len() as u64);
    let mut base_data = initial_image(&layout);
    base_data.extend((WRITTEN..SIZE).map(|i| (i % 251) as u8));
    std::fs::write(&base, &base_data).unwrap();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top));
    let d = Daemon::start(kind, dir, &top, "qcow2");
    let b = before(&d);
    let w = Writers::start(&[&d.url], &layout, &WriterOpts::default());
    w.wait_acked(WARMUP, WAIT);
    let target = d.path(&format!("shallow-{method}.qcow2"));
    let mut a = args(&d, target.to_str().unwrap(), method, "qcow2");
    a.extend(["--shallow", "--json"]);
    a.extend(extra);
    let out: Out = livesnap(&a, CLI_LIMIT).expect(0);
    let report = out.json();
    w.wait_acked(w.acked() + WARMUP, WAIT);
    let log = w.stop();
    log.assert_no_failures();
    assert_eq!(report["sync"], "top", "{report}");
    assert_eq!(
        report["target"]["backing"],
        base.to_str().unwrap(),
        "{report}"
    );
    let info: Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&target)))
    .unwrap();
    assert_eq!(info["backing-filename"], base.to_str().unwrap(), "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    let copy = read_image(&target, "qcow2");
    assert_eq!(copy.len() as u64, SIZE);
    let (t0, t1) = window_of(&report);
    verify_point_in_time(&log, &copy[..WRITTEN as usize], t0, t1)
        .unwrap_or_else(|e| panic!("shallow {method} snapshot is not point-in-time: {e}"));
    assert!(
        copy[WRITTEN as usize..] == base_data[WRITTEN as usize..],
        "the snapshot does not read the backing file's data through"
    );
    // Data allocated in the target itself (depth 0) only where the top layer had data.
    let map: Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["map", "-U", "--output=json"])
        .arg(&target)))
    .unwrap();
    for e in map.as_array().unwrap() {
        if e["depth"] == 0 && e["data"] == true {
            let end = e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap();
            assert!(
                end <= WRITTEN.next_multiple_of(64 << 10),
                "the shallow target holds data the top layer never had: {e}"
            );
        }
    }
    assert_eq!(d.qmp().node_names(), b.nodes, "nodes left behind");
}
