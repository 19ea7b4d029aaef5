//! `blockdev-backup` with copy-before-write, and fleecing through
//! `copy-before-write` + `snapshot-access`, against the running daemon:
//!
//! - point in time under concurrent self-describing NBD writers
//!   (`harness::pit`): sync=full, top and none, raw and qcow2 sources and
//!   targets, several iterations each; the target equals the disk at one
//!   instant between the command and its reply, and the disk keeps every
//!   acknowledged write;
//! - fleecing: the snapshot-access export, read over NBD (and with nbdcopy)
//!   while the writers go on, shows the disk as of the filter's creation;
//! - the commands' errors, events, `query-block-jobs` and the nodes'
//!   `query-named-block-nodes` entries next to qemu-storage-daemon's;
//! - a force cancel while the target stalls returns, and emits
//!   BLOCK_JOB_CANCELLED, within one second; break-snapshot keeps the guest
//!   writing when the target fails.

use livesnap_testkit as harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::pit::*;
use harness::{create_image, run, shape_diff, sparse_file, Livesnapd, Qmp, Qsd};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
/// The copy granularity of every backup here (64 KiB qcow2 and raw targets).
const CLUSTER: u64 = 64 << 10;
const WAIT: Duration = Duration::from_secs(60);

/// livesnapd exporting a fresh image of `format` as `disk`; returns the
/// daemon, the NBD URL and the image path.
fn daemon_with(dir: &Path, format: &str) -> (Livesnapd, String, PathBuf) {
    let img = dir.join(format!("source.{format}"));
    create_image(&img, format, DISK);
    let d = Livesnapd::with_image(&img, &["--format", format]);
    let url = d.url().to_string();
    (d, url, img)
}

fn pit_opts(seed: u64, target_format: &str) -> PitOpts {
    let mut o = PitOpts::new(DISK);
    o.writers.seed = seed;
    o.target_format = target_format.into();
    // Slow enough that thousands of writes race the copier.
    o.speed = 128 << 20;
    o
}

/// sync=full under writes, several times on one daemon per source format,
/// with raw and qcow2 targets: each target is the disk at the command.
#[test]
fn backup_full_is_a_point_in_time_copy() {
    for source_format in ["raw", "qcow2"] {
        let dir = tempfile::tempdir().unwrap();
        let (daemon, url, img) = daemon_with(dir.path(), source_format);
        let mut qmp = daemon.qmp();
        let mut d = PitDaemon {
            qmp: &mut qmp,
            url,
            node: "disk".into(),
            source_file: Some((img, source_format.into())),
            dir: dir.path().to_path_buf(),
        };
        for (i, target_format) in ["raw", "qcow2", "raw", "qcow2"].iter().enumerate() {
            let o = pit_opts(100 + i as u64, target_format);
            // Every scenario names its target node alike: one at a time.
            let r = scenario_backup(&mut d, &o);
            eprintln!("{source_format} -> {target_format}: {r}");
            assert!(r.during_job > 0, "no write raced the job: {r}");
            let _ = std::fs::remove_file(dir.path().join(format!("pit-backup.{target_format}")));
        }
    }
}

/// Waits for the job's end event (COMPLETED without error, or the one named).
fn wait_end(qmp: &mut Qmp, job: &str, want: &str) -> Value {
    wait_job_event(qmp, job, want, WAIT).0
}

/// sync=top over a qcow2 overlay of a raw base: the target (a qcow2 over the
/// same base) gets only what the overlay allocated at the job's start, and
/// with its backing it is the disk at that instant.
#[test]
fn backup_top_copies_the_top_layer_at_the_start() {
    for round in 0..3u64 {
        // A fresh chain each round: the verifier knows only this round's writes.
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(4096, DISK / 4096, 4, 0x70b0 + round);
        let base = dir.path().join("base.img");
        std::fs::write(&base, initial_image(&layout)).unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&overlay));
        let daemon = Livesnapd::with_image(&overlay, &["--format", "qcow2"]);
        let url = daemon.url().to_string();
        let mut qmp = daemon.qmp();
        let target = dir.path().join(format!("top{round}.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&target));
        let node = format!("top{round}");
        qmp.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node,
                   "file": {"driver": "file", "filename": target.to_str().unwrap()}}),
        );
        let w = Writers::start(
            &[&url],
            &layout,
            &WriterOpts {
                seed: 7 + round,
                ..Default::default()
            },
        );
        // Few enough writes that much of the disk stays in the base.
        w.wait_acked(150 * (round + 1), WAIT);
        let job = format!("top-{round}");
        let t0 = Instant::now();
        qmp.ok(
            "blockdev-backup",
            json!({"job-id": job, "device": "disk", "target": node, "sync": "top",
                   "speed": 64 << 20}),
        );
        let t1 = Instant::now();
        wait_end(&mut qmp, &job, "BLOCK_JOB_COMPLETED");
        w.wait_acked(w.acked() + 300, WAIT);
        let log = w.stop();
        log.assert_no_failures();
        release_node(&mut qmp, &node, WAIT);
        let copy = read_image(&target, "qcow2");
        let r = verify_point_in_time(&log, &copy, t0, t1).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("sync=top round {round}: {r}");
        // Exactly the clusters the overlay allocated at the instant: all
        // those written before the command, none written only after it.
        let allocated = top_clusters(&target);
        let cluster_of = |w: &WriteRecord| w.block * layout.block_size as u64 / CLUSTER;
        let must: BTreeSet<u64> = log
            .writes
            .iter()
            .filter(|w| w.acked.is_some_and(|a| a < t0))
            .map(cluster_of)
            .collect();
        let may: BTreeSet<u64> = log
            .writes
            .iter()
            .filter(|w| w.sent < t1)
            .map(cluster_of)
            .collect();
        assert!(
            must.is_subset(&allocated) && allocated.is_subset(&may),
            "sync=top copied {} clusters; {} were written before the command, {} by its reply; \
             missing {:?}, extra {:?}",
            allocated.len(),
            must.len(),
            may.len(),
            must.difference(&allocated).take(5).collect::<Vec<_>>(),
            allocated.difference(&may).take(5).collect::<Vec<_>>()
        );
        assert!(allocated.len() < (DISK / CLUSTER) as usize);
        check_source_complete(&log, &read_export(&url, layout.size()))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The 64 KiB clusters a qcow2 image allocates in its own layer.
fn top_clusters(path: &Path) -> BTreeSet<u64> {
    let out = run(Command::new("qemu-img")
        .args(["map", "-U", "--output=json"])
        .arg(path));
    let map: Value = serde_json::from_str(&out).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .flat_map(|e| {
            let start = e["start"].as_u64().unwrap();
            let len = e["length"].as_u64().unwrap();
            start / CLUSTER..(start + len).div_ceil(CLUSTER)
        })
        .collect()
}

/// sync=none into a qcow2 whose backing is the disk node itself (classic
/// image fleecing): once the writers stop, reading the target through its
/// backing shows the disk as of the command; a cancel ends the job.
#[test]
fn backup_none_keeps_the_start_in_a_fleecing_target() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, url, img) = daemon_with(dir.path(), "raw");
    let mut qmp = daemon.qmp();
    let sock = daemon.dir.path().join("nbd.sock");
    for round in 0..3u64 {
        let layout = Layout::new(4096, DISK / 4096, 4, 0x40e + round);
        prefill(&url, &layout);
        let target = dir.path().join(format!("fleece{round}.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&img)
            .arg(&target));
        let node = format!("fleece{round}");
        qmp.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node, "backing": "disk",
                   "file": {"driver": "file", "filename": target.to_str().unwrap()}}),
        );
        let w = Writers::start(
            &[&url],
            &layout,
            &WriterOpts {
                seed: 40 + round,
                ..Default::default()
            },
        );
        w.wait_acked(500, WAIT);
        let job = format!("none-{round}");
        let t0 = Instant::now();
        qmp.ok(
            "blockdev-backup",
            json!({"job-id": job, "device": "disk", "target": node, "sync": "none"}),
        );
        let t1 = Instant::now();
        let export = format!("snap{round}");
        qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": export, "node-name": node, "name": export}),
        );
        let snap_url = format!("nbd+unix:///{export}?socket={}", sock.display());
        w.wait_acked(w.acked() + 1000, WAIT);
        // Read while the writers go on: a cluster not copied yet is read
        // from the disk through the backing, racing its copy-before-write.
        let during = read_export(&snap_url, layout.size());
        w.wait_acked(w.acked() + 1000, WAIT);
        let log = w.stop();
        log.assert_no_failures();
        let info = qmp.ok("query-block-jobs", json!(null));
        assert_eq!(info[0]["status"], "running", "{info}");
        assert!(
            info[0]["offset"].as_u64().unwrap() > 0,
            "nothing copied: {info}"
        );
        let after = read_export(&snap_url, layout.size());
        for (when, copy) in [("during the writes", &during), ("after them", &after)] {
            let r = verify_point_in_time(&log, copy, t0, t1)
                .unwrap_or_else(|e| panic!("round {round}, read {when}: {e}"));
            eprintln!("sync=none round {round}, read {when}: {r}");
        }
        qmp.ok("block-export-del", json!({"id": export}));
        qmp.ok("block-job-cancel", json!({"device": job}));
        wait_end(&mut qmp, &job, "BLOCK_JOB_CANCELLED");
        check_source_complete(&log, &read_export(&url, layout.size()))
            .unwrap_or_else(|e| panic!("{e}"));
        release_node(&mut qmp, &node, WAIT);
    }
}

/// Pull mode: a copy-before-write filter over the disk, snapshot-access on
/// top, exported read-only. Read over NBD and with nbdcopy while the
/// writers go on, it is the disk as of the filter's blockdev-add.
#[test]
fn fleecing_export_shows_the_disk_at_the_filter_creation() {
    harness::require_tool("nbdcopy");
    for source_format in ["raw", "qcow2"] {
        let dir = tempfile::tempdir().unwrap();
        let (daemon, url, _img) = daemon_with(dir.path(), source_format);
        let mut qmp = daemon.qmp();
        let sock = daemon.dir.path().join("nbd.sock");
        for round in 0..3u64 {
            let layout = Layout::new(4096, DISK / 4096, 4, 0xf1ee + round);
            prefill(&url, &layout);
            let scratch = dir.path().join(format!("scratch{round}.qcow2"));
            add_image_node(&mut qmp, "scratch", &scratch, "qcow2", DISK);
            let w = Writers::start(
                &[&url],
                &layout,
                &WriterOpts {
                    seed: 90 + round,
                    ..Default::default()
                },
            );
            w.wait_acked(500, WAIT);
            let t0 = Instant::now();
            qmp.ok(
                "blockdev-add",
                json!({"driver": "copy-before-write", "node-name": "cbw",
                       "file": "disk", "target": "scratch"}),
            );
            let t1 = Instant::now();
            qmp.ok(
                "blockdev-add",
                json!({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}),
            );
            qmp.ok(
                "block-export-add",
                json!({"type": "nbd", "id": "fleece", "node-name": "snap"}),
            );
            let snap_url = format!("nbd+unix:///snap?socket={}", sock.display());
            w.wait_acked(w.acked() + 500, WAIT);
            // Read while the writers keep going: guest writes copy first,
            // and wait for reads of what they overwrite.
            let copy = read_export(&snap_url, layout.size());
            let by_nbdcopy = dir.path().join("nbdcopy.raw");
            run(Command::new("nbdcopy").arg(&snap_url).arg(&by_nbdcopy));
            let copied = std::fs::read(&by_nbdcopy).unwrap();
            w.wait_acked(w.acked() + 500, WAIT);
            let log = w.stop();
            log.assert_no_failures();
            for (how, image) in [("NBD", &copy), ("nbdcopy", &copied)] {
                let r = verify_point_in_time(&log, image, t0, t1)
                    .unwrap_or_else(|e| panic!("{source_format} round {round}, {how}: {e}"));
                eprintln!("fleecing {source_format} round {round} ({how}): {r}");
            }
            let end = read_export(&url, layout.size());
            check_source_complete(&log, &end).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                verify_point_in_time(&log, &end, t0, t1).is_err(),
                "the disk at the end would pass too: the check proves nothing"
            );
            qmp.ok("block-export-del", json!({"id": "fleece"}));
            release_node(&mut qmp, "snap", WAIT);
            qmp.ok("blockdev-del", json!({"node-name": "cbw"}));
            qmp.ok("blockdev-del", json!({"node-name": "scratch"}));
            let _ = std::fs::remove_file(&scratch);
        }
    }
}

// ---------------------------------------------------------------------------
// Next to qemu-storage-daemon.

/// What a daemon answers to one script; compared between the two.
#[derive(Default)]
struct Transcript {
    steps: Vec<(String, Value)>,
}

impl Transcript {
    fn push(&mut self, what: impl Into<String>, v: Value) {
        self.steps.push((what.into(), v));
    }

    fn call(&mut self, qmp: &mut Qmp, cmd: &str, args: Value) -> Result<Value, (String, String)> {
        let r = qmp.execute(cmd, args.clone());
        let v = match &r {
            Ok(v) => json!({"return": v}),
            Err((class, desc)) => json!({"error": [class, desc]}),
        };
        self.push(format!("{cmd} {args}"), v);
        r
    }
}

/// Events until `until` for `job` (or `timeout`), statuses without the
/// paused/running churn qsd's drains add.
fn job_events(qmp: &mut Qmp, job: &str, until: &str, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut out: Vec<Value> = Vec::new();
    let mut done = false;
    while let Some(ev) = qmp.event(if done {
        Duration::from_millis(300)
    } else {
        deadline.saturating_duration_since(Instant::now())
    }) {
        let data = &ev["data"];
        if data["id"] != job && data["device"] != job {
            continue;
        }
        let name = ev["event"].as_str().unwrap().to_string();
        if name == "JOB_STATUS_CHANGE" {
            let s = data["status"].as_str().unwrap();
            if s == "paused" {
                continue;
            }
            let last = out.last().and_then(|e| e["data"]["status"].as_str());
            if s == "running" && last == Some("running") {
                continue;
            }
        }
        done |= name == until;
        out.push(json!({"event": name, "data": data}));
        if done && data["status"] == "null" {
            break;
        }
    }
    out
}

fn parity_script(qmp: &mut Qmp, dir: &Path) -> Transcript {
    let mut t = Transcript::default();
    for (name, size) in [("src", DISK), ("tgt", DISK), ("small", DISK / 2)] {
        let f = dir.join(format!("{name}.img"));
        sparse_file(&f, size);
        qmp.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": name,
                   "file": {"driver": "file", "filename": f.to_str().unwrap()}}),
        );
    }
    let base = json!({"device": "src", "target": "tgt", "sync": "full", "job-id": "j"});
    let with = |extra: Value| {
        let mut a = base.clone();
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        a
    };
    let bad = [
        json!({}),
        json!({"sync": "full"}),
        json!({"device": "src", "sync": "full"}),
        json!({"device": "src", "target": "tgt"}),
        with(json!({"sync": "bogus"})),
        with(json!({"sync": "bitmap"})),
        with(json!({"sync": "incremental"})),
        with(json!({"bitmap": "bm"})),
        with(json!({"bitmap-mode": "always"})),
        with(json!({"device": "nope"})),
        with(json!({"target": "nope"})),
        with(json!({"target": "src"})),
        with(json!({"target": "small"})),
        with(json!({"job-id": "1bad"})),
        json!({"device": "src", "target": "tgt", "sync": "full"}),
        with(json!({"speed": -1})),
        with(json!({"compress": true})),
        with(json!({"on-source-error": "bogus"})),
        with(json!({"x-perf": {"max-workers": 0}})),
        with(json!({"x-perf": {"max-chunk": -1}})),
        with(json!({"x-perf": {"max-chunk": 4096}})),
        with(json!({"x-perf": {"min-cluster-size": 3000}})),
        with(json!({"x-perf": {"min-cluster-size": -1}})),
        with(json!({"x-perf": {"bogus": 1}})),
        with(json!({"x-perf": 5})),
        with(json!({"filter-node-name": "1bad"})),
        with(json!({"filter-node-name": "tgt"})),
        with(json!({"filter-node-name": "a".repeat(32)})),
    ];
    for a in bad {
        let _ = t.call(qmp, "blockdev-backup", a);
    }
    // qsd creates and drops job 'j' for the negative speed (JOB_STATUS_CHANGE
    // created, null); livesnapd refuses it first (docs/qmp.md).
    while qmp.event(Duration::from_millis(200)).is_some() {}
    // A running job: its shapes, the busy nodes, a force cancel.
    t.call(
        qmp,
        "blockdev-backup",
        with(json!({"speed": 1, "auto-dismiss": false, "filter-node-name": "flt"})),
    )
    .unwrap();
    let jobs = qmp.ok("query-block-jobs", json!(null));
    t.push("query-block-jobs", jobs);
    let jobs = qmp.ok("query-jobs", json!(null));
    t.push("query-jobs", jobs);
    let nodes = qmp.ok("query-named-block-nodes", json!(null));
    let flt = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "flt")
        .cloned()
        .unwrap_or(Value::Null);
    t.push("filter node", flt);
    let _ = t.call(qmp, "blockdev-backup", with(json!({"job-id": "j2"})));
    let _ = t.call(
        qmp,
        "blockdev-backup",
        with(json!({"device": "tgt", "target": "src", "job-id": "j2"})),
    );
    for n in ["src", "tgt", "flt"] {
        let _ = t.call(qmp, "blockdev-del", json!({"node-name": n}));
    }
    t.call(
        qmp,
        "block-job-cancel",
        json!({"device": "j", "force": true}),
    )
    .unwrap();
    let evs = job_events(qmp, "j", "BLOCK_JOB_CANCELLED", WAIT);
    t.push("events of a cancel", Value::Array(evs));
    let jobs = qmp.ok("query-block-jobs", json!(null));
    t.push("concluded job", jobs);
    t.call(qmp, "job-dismiss", json!({"id": "j"})).unwrap();
    let evs = job_events(qmp, "j", "JOB_STATUS_CHANGE", Duration::from_secs(2));
    t.push("events of dismiss", Value::Array(evs));
    // A job that runs to its end (a sparse disk: zeroes only).
    t.call(qmp, "blockdev-backup", with(json!({"job-id": "k"})))
        .unwrap();
    let evs = job_events(qmp, "k", "BLOCK_JOB_COMPLETED", WAIT);
    t.push("events of a completed job", Value::Array(evs));
    for n in ["src", "tgt"] {
        let _ = t.call(qmp, "blockdev-del", json!({"node-name": n}));
    }
    t
}

fn fleecing_script(qmp: &mut Qmp, dir: &Path) -> Transcript {
    let mut t = Transcript::default();
    for (name, size) in [("src", DISK), ("tgt", DISK)] {
        let f = dir.join(format!("{name}.img"));
        sparse_file(&f, size);
        qmp.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": name,
                   "file": {"driver": "file", "filename": f.to_str().unwrap()}}),
        );
    }
    let cbw = |extra: Value| {
        let mut a = json!({"driver": "copy-before-write", "node-name": "c",
                           "file": "src", "target": "tgt"});
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        a
    };
    let cases = [
        json!({"driver": "copy-before-write", "node-name": "c", "file": "src"}),
        json!({"driver": "copy-before-write", "node-name": "c", "target": "tgt"}),
        cbw(json!({"bitmap": {"node": "src", "name": "bm"}})),
        cbw(json!({"bitmap": {"node": "nope", "name": "bm"}})),
        cbw(json!({"bitmap": {"node": "src"}})),
        cbw(json!({"min-cluster-size": 3000})),
        cbw(json!({"min-cluster-size": "64k"})),
        cbw(json!({"cbw-timeout": -1})),
        cbw(json!({"on-cbw-error": "x"})),
        cbw(json!({"bogus": 1})),
        cbw(json!({"file": "nope"})),
        json!({"driver": "snapshot-access", "node-name": "s"}),
        json!({"driver": "snapshot-access", "node-name": "s", "file": "nope"}),
        json!({"driver": "snapshot-access", "node-name": "s", "file": "src", "x": 1}),
    ];
    for a in cases {
        if t.call(qmp, "blockdev-add", a).is_ok() {
            qmp.ok("blockdev-del", json!({"node-name": "c"}));
        }
    }
    t.call(
        qmp,
        "blockdev-add",
        cbw(json!({"on-cbw-error": "break-snapshot", "cbw-timeout": 5})),
    )
    .unwrap();
    t.call(
        qmp,
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "s", "file": "c"}),
    )
    .unwrap();
    let nodes = qmp.ok("query-named-block-nodes", json!(null));
    for name in ["c", "s"] {
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .cloned()
            .unwrap_or(Value::Null);
        t.push(format!("node {name}"), n);
    }
    for n in ["src", "tgt", "c", "s", "c"] {
        let _ = t.call(qmp, "blockdev-del", json!({"node-name": n}));
    }
    t
}

/// Compares two transcripts: error replies exactly, everything else by shape,
/// and the values that do not depend on timing.
fn compare(qsd: &Transcript, ours: &Transcript) {
    assert_eq!(qsd.steps.len(), ours.steps.len());
    let mut diffs = Vec::new();
    for ((what, a), (_, b)) in ours.steps.iter().zip(&qsd.steps) {
        let mismatch = if a.get("error").is_some() || b.get("error").is_some() {
            (a != b).then(|| format!("livesnapd {a}\n      qsd {b}"))
        } else {
            shape_diff(&normalise(a), &normalise(b), "")
                .map(|d| format!("{d}\n   livesnapd {a}\n   qsd {b}"))
        };
        if let Some(m) = mismatch {
            diffs.push(format!("{what}: {m}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "differences from qsd:\n{}",
        diffs.join("\n")
    );
}

/// Replaces timing-dependent numbers and paths; keeps names, statuses, types.
fn normalise(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "timestamp" | "actual-size"))
                .map(|(k, v)| {
                    let v = match k.as_str() {
                        "offset" | "current-progress" | "count" | "busy" => json!(0),
                        _ => normalise(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        other => other.clone(),
    }
}

/// Same values too, where they do not depend on timing: the event lists
/// and statuses.
fn compare_events(qsd: &Transcript, ours: &Transcript) {
    for ((what, a), (_, b)) in ours.steps.iter().zip(&qsd.steps) {
        if what.starts_with("events") {
            assert_eq!(normalise(a), normalise(b), "{what}");
        }
    }
}

#[test]
fn commands_events_and_queries_match_qsd() {
    let qdir = tempfile::tempdir().unwrap();
    let q = Qsd::bare();
    let theirs = parity_script(&mut q.qmp(), qdir.path());
    let ldir = tempfile::tempdir().unwrap();
    let l = Livesnapd::bare();
    let ours = parity_script(&mut l.qmp(), ldir.path());
    compare(&theirs, &ours);
    compare_events(&theirs, &ours);
}

#[test]
fn fleecing_nodes_match_qsd() {
    let qdir = tempfile::tempdir().unwrap();
    let q = Qsd::bare();
    let theirs = fleecing_script(&mut q.qmp(), qdir.path());
    let ldir = tempfile::tempdir().unwrap();
    let l = Livesnapd::bare();
    let ours = fleecing_script(&mut l.qmp(), ldir.path());
    compare(&theirs, &ours);
}

// ---------------------------------------------------------------------------
// Faults in the target.

/// livesnapd with a 64 MiB raw disk `src` exported as `disk` and a target
/// `tgt` = raw over blkdebug `dbg` over a file, with `rules` on `dbg`.
fn faulty_target(rules: Value) -> (Livesnapd, Qmp, String) {
    let d = Livesnapd::bare();
    let mut qmp = d.qmp();
    let src = d.dir.path().join("src.img");
    let tgt = d.dir.path().join("tgt.img");
    sparse_file(&src, DISK);
    sparse_file(&tgt, DISK);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src",
               "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "tgt",
               "file": {"driver": "blkdebug", "node-name": "dbg", "inject-error": rules,
                        "image": {"driver": "file", "filename": tgt.to_str().unwrap()}}}),
    );
    let sock = d.dir.path().join("nbd.sock");
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src", "name": "disk", "writable": true}),
    );
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    (d, qmp, url)
}

/// The target stops answering writes: the copier and the guest writes that
/// need a copy hang on it. A force cancel still returns and emits
/// BLOCK_JOB_CANCELLED within a second; the held guest writes fail
/// (break-guest-write), later ones pass; no acknowledged write is lost.
#[test]
fn force_cancel_with_a_stalled_target_ends_within_a_second() {
    let (_d, mut qmp, url) =
        faulty_target(json!([{"event": "write_aio", "iotype": "write", "x-stall": true}]));
    let layout = Layout::new(4096, DISK / 4096, 4, 0x57a1);
    prefill(&url, &layout);
    let w = Writers::start(&[&url], &layout, &WriterOpts::default());
    w.wait_acked(200, WAIT);
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "stuck", "device": "src", "target": "tgt", "sync": "full",
               "on-cbw-error": "break-guest-write"}),
    );
    // Guest writes pile up behind copies the target never finishes.
    std::thread::sleep(Duration::from_millis(500));
    let stuck_at = w.acked();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        w.acked() - stuck_at < 50,
        "guest writes were not held by the stalled copies"
    );
    let t = Instant::now();
    qmp.ok(
        "block-job-cancel",
        json!({"device": "stuck", "force": true}),
    );
    let replied = t.elapsed();
    let (ev, _) = wait_job_event(
        &mut qmp,
        "stuck",
        "BLOCK_JOB_CANCELLED",
        // The copies stall for ever: any end shows the cancel did not wait.
        Duration::from_secs(30),
    );
    let ended = t.elapsed();
    eprintln!("cancel replied in {replied:?}, BLOCK_JOB_CANCELLED after {ended:?}: {ev}");
    // The writers go on once the filter is gone.
    let after = w.acked();
    harness::wait_until(WAIT, "writes after the cancel", || w.acked() > after + 500);
    let log = w.stop();
    assert!(
        log.failed() > 0,
        "the held writes should have failed (break-guest-write)"
    );
    check_source_complete(&log, &read_export(&url, layout.size()))
        .unwrap_or_else(|e| panic!("{e}"));
    // The target is free again once its stalled writes are let go.
    qmp.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "dbg", "inject-error": []}),
    );
    release_node(&mut qmp, "tgt", WAIT);
}

/// `args` with `on-cbw-error: policy` when one is given.
fn with_cbw_policy(mut args: Value, policy: Option<&str>) -> Value {
    if let Some(p) = policy {
        args["on-cbw-error"] = json!(p);
    }
    args
}

/// The target fails every write. With on-cbw-error=break-snapshot (livesnapd's
/// default for blockdev-backup, given or not) the guest never sees the
/// failure and the job fails; with break-guest-write (QEMU's default) the
/// guest write that needed the copy fails.
#[test]
fn on_cbw_error_policies_with_a_failing_target() {
    for policy in [None, Some("break-snapshot"), Some("break-guest-write")] {
        let (_d, mut qmp, url) =
            faulty_target(json!([{"event": "write_aio", "iotype": "write", "errno": 5}]));
        let layout = Layout::new(4096, DISK / 4096, 2, 0xe770);
        prefill(&url, &layout);
        // sync=none: only guest writes copy, so the policy alone decides.
        qmp.ok(
            "blockdev-backup",
            with_cbw_policy(
                json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "none"}),
                policy,
            ),
        );
        let w = Writers::start(
            &[&url],
            &layout,
            &WriterOpts {
                queue_depth: 2,
                ..Default::default()
            },
        );
        harness::wait_until(WAIT, "writes", || w.acked() + w.failed() > 200);
        if policy != Some("break-guest-write") {
            let ev = job_events(&mut qmp, "j", "BLOCK_JOB_COMPLETED", WAIT);
            let done = ev
                .iter()
                .find(|e| e["event"] == "BLOCK_JOB_COMPLETED")
                .unwrap_or_else(|| panic!("no BLOCK_JOB_COMPLETED: {ev:?}"));
            assert_eq!(done["data"]["error"], "Input/output error", "{done}");
            let log = w.stop();
            log.assert_no_failures();
            check_source_complete(&log, &read_export(&url, layout.size()))
                .unwrap_or_else(|e| panic!("{e}"));
        } else {
            let log = w.stop();
            assert!(
                log.failed() > 0,
                "no guest write failed under break-guest-write"
            );
            check_source_complete(&log, &read_export(&url, layout.size()))
                .unwrap_or_else(|e| panic!("{e}"));
            qmp.ok("block-job-cancel", json!({"device": "j"}));
            wait_end(&mut qmp, "j", "BLOCK_JOB_CANCELLED");
        }
    }
}
