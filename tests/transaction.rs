//! `transaction`: QEMU's actions (`abort`, the `block-dirty-bitmap-*`
//! ones, `blockdev-backup`, `blockdev-snapshot(-sync)`) and
//! `completion-mode`, against qemu-storage-daemon and under concurrent
//! writers.
//!
//! The parity tests run the same QMP sequences on livesnapd and on qsd and
//! compare the transcripts (`livesnap_testkit::transcript`): replies, error
//! classes and texts, event order, job queries, and the bitmaps and nodes
//! left behind, for transactions that succeed, fail in an action, are
//! aborted, and group their jobs. Where qsd 10.0.2 hangs (a grouped
//! transaction rolled back with two backups prepared) livesnapd is checked
//! on its own.
//!
//! The point-in-time test backs up two disks in one transaction while
//! writers write both: each copy must equal its disk at one instant of the
//! command, and the two instants must be one.

use livesnap_testkit as harness;

use std::time::{Duration, Instant};

use harness::pit::{
    prefill, read_image, release_node, verify_point_in_time, Layout, PitReport, WriteLog,
    WriterOpts, Writers,
};
use harness::transcript::{compare, normalise_event, Side};
use harness::{qemu_io, Livesnapd, Qmp};
use serde_json::{json, Value};

fn backup(id: &str, src: &str, tgt: &str, sync: &str) -> Value {
    json!({"type": "blockdev-backup",
           "data": {"job-id": id, "device": src, "target": tgt, "sync": sync}})
}

fn with(mut action: Value, extra: Value) -> Value {
    action["data"]
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    action
}

fn bitmap(kind: &str, node: &str, name: &str) -> Value {
    json!({"type": format!("block-dirty-bitmap-{kind}"), "data": {"node": node, "name": name}})
}

fn abort() -> Value {
    json!({"type": "abort", "data": {}})
}

fn grouped() -> Value {
    json!({"completion-mode": "grouped"})
}

/// The named nodes as a transaction may change them: read-only or not, and
/// the backing file (the side's directory masked), sorted by name. The
/// overlay `ov2` of blockdev-snapshot-sync is left out: qsd drops an overlay
/// nothing uses once the command is done, livesnapd keeps it (docs/qmp.md).
fn nodes(s: &mut Side) -> Value {
    let dir = s.path("");
    let dir = dir.to_str().unwrap();
    let all = s.qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let mut out: Vec<Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            let name = n["node-name"].as_str().unwrap_or("");
            !harness::is_auto_name(name) && name != "ov2"
        })
        .map(|n| {
            json!({
                "node-name": n["node-name"],
                "ro": n["ro"],
                "backing": n["image"]["backing-filename"]
                    .as_str()
                    .map(|b| b.replace(dir, "$DIR/")),
            })
        })
        .collect();
    out.sort_by_key(|n| n["node-name"].as_str().unwrap().to_string());
    Value::Array(out)
}

fn record_nodes(s: &mut Side) {
    let v = nodes(s);
    s.record("nodes", v);
}

#[test]
fn arguments_and_lookups_as_qsd() {
    compare(|s| {
        s.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        );
        for args in [
            json!({}),
            json!({"actions": []}),
            json!({"actions": [], "properties": {}}),
            json!({"actions": {}}),
            json!({"actions": [1]}),
            json!({"actions": [{"data": {}}]}),
            json!({"actions": [{"type": 1, "data": {}}]}),
            json!({"actions": [{"type": "foo", "data": {}}]}),
            json!({"actions": [{"type": "abort"}]}),
            json!({"actions": [{"type": "abort", "data": 1}]}),
            json!({"actions": [{"type": "abort", "data": {"x": 1}}]}),
            json!({"actions": [{"type": "abort", "data": {}, "x": 1}]}),
            json!({"actions": [bitmap("add", "src", "b1"), {"type": "abort", "data": {"x": 1}}]}),
            json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "src"}}]}),
            json!({"actions": [{"type": "blockdev-backup", "data": {"device": "src", "target": "tgt"}}]}),
            json!({"actions": [{"type": "block-dirty-bitmap-merge",
                                "data": {"node": "src", "target": "b0", "bitmaps": [{"node": "src"}]}}]}),
            json!({"actions": [], "properties": 1}),
            json!({"actions": [], "properties": {"y": 1}}),
            json!({"actions": [], "properties": {"completion-mode": "foo"}}),
            json!({"actions": [], "x": 1}),
            json!({"actions": [abort()]}),
            json!({"actions": [abort()], "properties": grouped()}),
            json!({"actions": [bitmap("add", "src", "b1"), backup("j", "src", "tgt", "none")],
                   "properties": grouped()}),
            json!({"actions": [{"type": "blockdev-snapshot", "data": {"node": "src", "overlay": "tgt"}}],
                   "properties": grouped()}),
            json!({"actions": [bitmap("add", "nope", "b1")]}),
            json!({"actions": [bitmap("clear", "src", "nope")]}),
            json!({"actions": [backup("j", "nope", "tgt", "full")]}),
            json!({"actions": [backup("j", "src", "nope", "full")]}),
            json!({"actions": [{"type": "blockdev-snapshot-sync",
                                "data": {"device": "nope", "snapshot-file": "/nonexistent/x"}}]}),
            json!({"actions": [bitmap("add", "src", "b2")], "properties": {"completion-mode": "individual"}}),
        ] {
            s.cmd("transaction", args);
        }
        s.bitmaps("src");
        s.queries();
    });
}

#[test]
fn bitmap_actions_commit_and_roll_back_as_qsd() {
    compare(|s| {
        let url = s.export("src");
        s.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        );
        s.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b2", "disabled": true}),
        );
        qemu_io(&url, "raw", &["write 0 64k", "write 1M 4k"]);
        s.bitmaps("src");
        // Everything commits at once.
        let merge = json!({"type": "block-dirty-bitmap-merge",
                           "data": {"node": "src", "target": "b3", "bitmaps": ["b0"]}});
        s.cmd(
            "transaction",
            json!({"actions": [
                with(bitmap("add", "src", "b3"), json!({"disabled": true})),
                merge,
                bitmap("clear", "src", "b0"),
                bitmap("enable", "src", "b2"),
                bitmap("disable", "src", "b3"),
            ]}),
        );
        s.bitmaps("src");
        qemu_io(&url, "raw", &["write 2M 4k"]);
        s.bitmaps("src");
        // And each is undone when a later action fails.
        for failing in [abort(), bitmap("clear", "src", "nope")] {
            s.cmd(
                "transaction",
                json!({"actions": [
                    bitmap("add", "src", "b4"),
                    json!({"type": "block-dirty-bitmap-merge",
                           "data": {"node": "src", "target": "b3", "bitmaps": ["b0", "b2"]}}),
                    bitmap("clear", "src", "b2"),
                    bitmap("disable", "src", "b0"),
                    bitmap("enable", "src", "b3"),
                    bitmap("remove", "src", "b3"),
                    failing,
                ]}),
            );
            s.bitmaps("src");
        }
        // A bitmap being removed is busy for the later actions; a second
        // add of one name undoes the first.
        for actions in [
            json!([bitmap("remove", "src", "b3"), bitmap("clear", "src", "b3")]),
            json!([bitmap("remove", "src", "b3"), bitmap("remove", "src", "b3")]),
            json!([bitmap("add", "src", "b9"), bitmap("add", "src", "b9")]),
            json!([bitmap("remove", "src", "b3"), bitmap("remove", "src", "b2")]),
        ] {
            s.cmd("transaction", json!({ "actions": actions }));
            s.bitmaps("src");
        }
    });
}

#[test]
fn backup_and_snapshot_actions_as_qsd() {
    compare(|s| {
        s.add_raw("src2");
        s.add_raw("tgt2");
        // A full backup and a new bitmap at one instant.
        s.cmd_until(
            "transaction",
            json!({"actions": [bitmap("add", "src", "b0"), backup("j1", "src", "tgt", "full")]}),
            &["j1 null"],
        );
        s.bitmaps("src");
        // Two jobs are created in order and started last-first.
        s.cmd_until(
            "transaction",
            json!({"actions": [backup("j1", "src", "tgt", "none"), backup("j2", "src2", "tgt2", "none")]}),
            &["j1 running", "j2 running"],
        );
        s.queries();
        s.cmd_until("job-cancel", json!({"id": "j1"}), &["j1 null"]);
        s.cmd_until("job-cancel", json!({"id": "j2"}), &["j2 null"]);
        // Rolled back: jobs created are cancelled newest first, the bitmap
        // added goes, nothing is left.
        for failing in [
            abort(),
            bitmap("clear", "src", "zz"),
            backup("j1", "src2", "tgt2", "none"),
        ] {
            s.cmd_until(
                "transaction",
                json!({"actions": [
                    bitmap("add", "src", "b1"),
                    backup("j1", "src", "tgt", "none"),
                    with(backup("j2", "src2", "tgt2", "incremental"), json!({"bitmap": "nope"})),
                    failing,
                ]}),
                &[],
            );
            s.cmd_until(
                "transaction",
                json!({"actions": [
                    bitmap("add", "src", "b1"),
                    backup("j1", "src", "tgt", "none"),
                    backup("j2", "src2", "tgt2", "none"),
                    failing,
                ]}),
                &[],
            );
            s.bitmaps("src");
            s.queries();
        }
        // A backup freezes its bitmap at prepare: later actions see it busy,
        // and the rollback gives it back as it was.
        s.cmd(
            "transaction",
            json!({"actions": [
                with(backup("j1", "src", "tgt", "incremental"), json!({"bitmap": "b0"})),
                bitmap("clear", "src", "b0"),
            ]}),
        );
        s.cmd(
            "transaction",
            json!({"actions": [
                with(backup("j1", "src", "tgt", "bitmap"), json!({"bitmap": "b0", "bitmap-mode": "on-success"})),
                abort(),
            ]}),
        );
        s.bitmaps("src");
        s.queries();
        // External snapshots: undone by a rollback, kept by a commit.
        record_nodes(s);
        let ov = s.path("ov.qcow2");
        harness::create_image(&ov, "qcow2", harness::transcript::DISK);
        s.qmp.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "ov", "backing": null,
                   "file": {"driver": "file", "filename": ov.to_str().unwrap()}}),
        );
        let snap = json!({"type": "blockdev-snapshot", "data": {"node": "src2", "overlay": "ov"}});
        let sync = json!({"type": "blockdev-snapshot-sync",
                          "data": {"node-name": "src", "snapshot-node-name": "ov2",
                                   "snapshot-file": s.path("ov2.qcow2").to_str().unwrap()}});
        s.cmd(
            "transaction",
            json!({"actions": [snap.clone(), sync.clone(), abort()]}),
        );
        record_nodes(s);
        s.cmd("transaction", json!({"actions": [snap, sync]}));
        record_nodes(s);
    });
}

/// Puts the status changes to `waiting` of one step in a fixed order: the
/// jobs of a group finish in an order that depends on timing.
fn sort_waiting(mut events: Vec<String>) -> Vec<String> {
    let mut i = 0;
    while i < events.len() {
        let mut j = i;
        while j < events.len() && events[j].ends_with(" waiting") {
            j += 1;
        }
        events[i..j].sort();
        i = j.max(i + 1);
    }
    events
}

#[test]
fn grouped_completion_as_qsd() {
    compare(|s| {
        s.canon = Some(sort_waiting);
        s.add_raw("src2");
        s.add_raw("tgt2");
        s.add_failing_target();
        let url = s.export("src2");
        qemu_io(&url, "raw", &["write 1M 64k"]);
        // Both succeed: each waits for the other, then both finalise.
        s.cmd_until(
            "transaction",
            json!({"actions": [backup("j1", "src", "tgt", "full"), backup("j2", "src2", "tgt2", "full")],
                   "properties": grouped()}),
            &["j1 null", "j2 null"],
        );
        // A cancel cancels the group.
        s.cmd_until(
            "transaction",
            json!({"actions": [backup("j1", "src", "tgt", "none"), backup("j2", "src2", "tgt2", "none")],
                   "properties": grouped()}),
            &["j1 running", "j2 running"],
        );
        s.cmd_until("job-cancel", json!({"id": "j1"}), &["j1 null", "j2 null"]);
        // A failing job cancels the others.
        s.cmd_until(
            "transaction",
            json!({"actions": [backup("j1", "src", "tgt", "none"), backup("j2", "src2", "bad", "full")],
                   "properties": grouped()}),
            &["j1 null", "j2 null"],
        );
        s.queries();
        // With manual finalisation: one job-finalize finalises the group,
        // one cancel in PENDING aborts it.
        let manual = json!({"auto-finalize": false});
        for last in ["job-finalize", "job-cancel"] {
            s.cmd_until(
                "transaction",
                json!({"actions": [with(backup("j1", "src", "tgt", "full"), manual.clone()),
                                   with(backup("j2", "src2", "tgt2", "full"), manual.clone())],
                       "properties": grouped()}),
                &["j1 pending", "j2 pending"],
            );
            s.queries();
            s.cmd_until(last, json!({"id": "j2"}), &["j1 null", "j2 null"]);
            s.queries();
        }
        // One job needing job-finalize holds the group in PENDING.
        s.cmd_until(
            "transaction",
            json!({"actions": [with(backup("j1", "src", "tgt", "full"), manual),
                               backup("j2", "src2", "tgt2", "full")],
                   "properties": grouped()}),
            &["j1 pending", "j2 pending"],
        );
        s.cmd_until("job-finalize", json!({"id": "j2"}), &["j1 null", "j2 null"]);
        s.cmd("job-finalize", json!({"id": "j1"}));
        // A prepare failing after one job was created.
        s.cmd_until(
            "transaction",
            json!({"actions": [backup("j1", "src", "tgt", "none"), backup("j1", "src2", "tgt2", "none")],
                   "properties": grouped()}),
            &["j1 null"],
        );
        s.queries();
    });
}

/// The events (normalised) up to and including `until`.
fn events(qmp: &mut Qmp, until: &str) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.iter().any(|e| e == until) {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = qmp
            .event(left)
            .unwrap_or_else(|| panic!("no {until} within 20 s; saw {out:?}"));
        out.push(normalise_event(&e));
    }
    out
}

#[test]
fn grouped_rollback_with_two_jobs_ends() {
    // qsd 10.0.2 never answers this transaction (its rollback waits for
    // jobs that never started); livesnapd rolls it back like an individual
    // one.
    let d = Livesnapd::bare();
    let mut s = d.qmp();
    for n in ["src", "tgt", "src2", "tgt2"] {
        let path = d.dir.path().join(format!("{n}.img"));
        harness::sparse_file(&path, 4 << 20);
        s.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": n,
                   "file": {"driver": "file", "filename": path.to_str().unwrap()}}),
        );
    }
    let r = s.execute(
        "transaction",
        json!({"actions": [backup("j1", "src", "tgt", "none"), backup("j2", "src2", "tgt2", "none"),
                           backup("j3", "src", "nope", "none")],
               "properties": grouped()}),
    );
    assert_eq!(
        r.unwrap_err().1,
        "Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(
        events(&mut s, "j1 null"),
        [
            "j1 created",
            "j2 created",
            "j2 aborting",
            "j2 concluded",
            "j2 null",
            "j1 aborting",
            "j1 concluded",
            "j1 null",
        ]
    );
    assert!(s.job_ids().is_empty());
    let filters = s
        .ok("query-named-block-nodes", json!({"flat": true}))
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drv"] == "copy-before-write")
        .count();
    assert_eq!(filters, 0, "a rolled-back backup left its filter");
}

/// Waits until each job of `ids` has ended with BLOCK_JOB_COMPLETED and no
/// error; returns when the last one did.
fn wait_completed(qmp: &mut Qmp, ids: &[&str], timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    let mut left: Vec<&str> = ids.to_vec();
    let mut seen = Vec::new();
    while !left.is_empty() {
        let wait = deadline.saturating_duration_since(Instant::now());
        let e = qmp
            .event(wait)
            .unwrap_or_else(|| panic!("jobs {left:?} not done within {timeout:?}; saw {seen:?}"));
        let name = e["event"].as_str().unwrap_or_default();
        assert!(
            name != "BLOCK_JOB_CANCELLED" && e["data"].get("error").is_none(),
            "a job failed: {e}"
        );
        if name == "BLOCK_JOB_COMPLETED" {
            left.retain(|id| e["data"]["device"] != *id);
        }
        seen.push(normalise_event(&e));
    }
    Instant::now()
}

/// The instants two point-in-time reports allow in common (the window's end
/// is allowed when both reach it).
fn common(a: &PitReport, b: &PitReport) -> Option<(Instant, Instant)> {
    let lo = a.from.max(b.from);
    let hi = a.until.min(b.until);
    (lo < hi || (lo == hi && hi == a.t1)).then_some((lo, hi))
}

#[test]
fn two_disks_backed_up_at_one_instant_under_writers() {
    const SIZE: u64 = 16 << 20;
    let d = Livesnapd::bare();
    let mut q = d.qmp();
    let dir = d.dir.path();
    let sock = dir.join("nbd.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    for n in ["d1", "d2", "t1", "t2"] {
        let path = dir.join(format!("{n}.img"));
        harness::sparse_file(&path, SIZE);
        q.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": n,
                   "file": {"driver": "file", "filename": path.to_str().unwrap()}}),
        );
    }
    let mut urls = Vec::new();
    let mut writers = Vec::new();
    for (i, n) in ["d1", "d2"].iter().enumerate() {
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": n, "node-name": n, "writable": true}),
        );
        let url = format!("nbd+unix:///{n}?socket={}", sock.display());
        let layout = Layout::new(4096, SIZE / 4096, 4, 0x7a11_0000 + i as u64);
        prefill(&url, &layout);
        writers.push(Writers::start(&[&url], &layout, &WriterOpts::default()));
        urls.push(url);
    }
    for w in &writers {
        w.wait_acked(1000, Duration::from_secs(60));
    }
    let t0 = Instant::now();
    q.ok(
        "transaction",
        json!({"actions": [
                   with(backup("j1", "d1", "t1", "full"), json!({"speed": 64 << 20})),
                   with(backup("j2", "d2", "t2", "full"), json!({"speed": 64 << 20})),
               ],
               "properties": grouped()}),
    );
    let t1 = Instant::now();
    let done = wait_completed(&mut q, &["j1", "j2"], Duration::from_secs(120));
    let logs: Vec<WriteLog> = writers
        .into_iter()
        .map(|w| {
            w.wait_acked(w.acked() + 1000, Duration::from_secs(60));
            let log = w.stop();
            log.assert_no_failures();
            log
        })
        .collect();
    let mut reports = Vec::new();
    for (i, (log, t)) in logs.iter().zip(["t1", "t2"]).enumerate() {
        release_node(&mut q, t, Duration::from_secs(10));
        let copy = read_image(&dir.join(format!("{t}.img")), "raw");
        let r = verify_point_in_time(log, &copy, t0, t1)
            .unwrap_or_else(|e| panic!("backup of d{}: {e}", i + 1));
        // Writes raced the copy: a copy from the job's end would differ.
        assert!(
            verify_point_in_time(log, &copy, done, done).is_err(),
            "the backup of d{} passes as a copy from the end too: no write raced it",
            i + 1
        );
        eprintln!(
            "d{}: {r}; {} writes during the jobs",
            i + 1,
            log.sent_between(t1, done)
        );
        reports.push(r);
    }
    let (lo, hi) = common(&reports[0], &reports[1]).unwrap_or_else(|| {
        panic!(
            "the two backups are from different instants: d1 {}, d2 {}",
            reports[0], reports[1]
        )
    });
    eprintln!(
        "common instant in a window of {:?} (t0+{:?}); the command took {:?}",
        hi - lo,
        lo - t0,
        t1 - t0
    );
}
