//! Incremental backups: `blockdev-backup` with `sync: incremental|bitmap`
//! and `bitmap-mode`, against qemu-storage-daemon and under concurrent
//! writers.
//!
//! The first tests run the same QMP sequences on livesnapd and on qsd and
//! compare the transcripts (`livesnap_testkit::transcript`): QEMU's rules
//! for which `sync`/`bitmap`/`bitmap-mode` combinations are refused, with
//! its texts and in its order, and what each `bitmap-mode` leaves in the
//! bitmap after a success, a failing target (blkdebug) and a cancel, with
//! writes made over NBD. Besides agreeing with qsd, the counts are asserted
//! against what was written, so a mistake both share still fails.
//!
//! The chain test backs a disk up under concurrent NBD writers: a full
//! backup with the bitmap added in the same `transaction`, then two
//! incrementals into qcow2 overlays of the previous backup; each restored
//! image must equal the disk at that backup's instant (the point-in-time
//! verifier), and an incremental must hold exactly the clusters written
//! since the previous backup (checked against the writers' log).

use livesnap_testkit as harness;

use std::time::{Duration, Instant};

use harness::qemu_io;
use harness::transcript::{compare, Side};
use serde_json::{json, Value};

const K64: u64 = 64 << 10;

fn backup(id: &str, sync: &str, extra: Value) -> Value {
    let mut args = json!({"job-id": id, "device": "src", "target": "tgt", "sync": sync});
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    args
}

/// The `count` of bitmap `name` on `node`.
fn count(s: &mut Side, node: &str, name: &str) -> u64 {
    let v = s.dirty_bitmaps(node);
    v.as_array()
        .and_then(|bs| bs.iter().find(|b| b["name"] == name))
        .and_then(|b| b["count"].as_u64())
        .unwrap_or_else(|| panic!("{}: no bitmap {name} on {node}: {v}", s.name))
}

#[test]
fn sync_and_bitmap_mode_refusals_as_qsd() {
    compare(|s| {
        s.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        );
        s.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "tgt", "name": "on-tgt"}),
        );
        for (sync, extra) in [
            ("incremental", json!({})),
            ("bitmap", json!({})),
            ("bitmap", json!({"bitmap-mode": "never"})),
            (
                "incremental",
                json!({"bitmap": "b0", "bitmap-mode": "always"}),
            ),
            (
                "incremental",
                json!({"bitmap": "b0", "bitmap-mode": "never"}),
            ),
            (
                "incremental",
                json!({"bitmap": "nope", "bitmap-mode": "always"}),
            ),
            ("incremental", json!({"bitmap": "nope"})),
            ("bitmap", json!({"bitmap": "nope", "bitmap-mode": "never"})),
            (
                "bitmap",
                json!({"bitmap": "on-tgt", "bitmap-mode": "never"}),
            ),
            ("bitmap", json!({"bitmap": "b0"})),
            ("full", json!({"bitmap": "b0"})),
            ("none", json!({"bitmap": "b0"})),
            ("none", json!({"bitmap": "b0", "bitmap-mode": "always"})),
            ("full", json!({"bitmap": "b0", "bitmap-mode": "never"})),
            ("top", json!({"bitmap": "b0", "bitmap-mode": "never"})),
            ("full", json!({"bitmap-mode": "on-success"})),
            ("none", json!({"bitmap-mode": "never"})),
            (
                "bitmap",
                json!({"bitmap": "b0", "bitmap-mode": "sometimes"}),
            ),
            ("bitmap", json!({"bitmap": 1, "bitmap-mode": "never"})),
            // The bitmap checks come before the sizes and the job id.
            (
                "bitmap",
                json!({"bitmap": "nope", "bitmap-mode": "never", "target": "src"}),
            ),
            (
                "incremental",
                json!({"bitmap": "b0", "x-perf": {"max-workers": 0}}),
            ),
        ] {
            s.cmd("blockdev-backup", backup("j", sync, extra));
        }
        // A bitmap a running job holds is busy for everybody else.
        s.cmd_until(
            "blockdev-backup",
            backup(
                "j1",
                "full",
                json!({"bitmap": "b0", "bitmap-mode": "on-success", "speed": 1}),
            ),
            &["j1 running"],
        );
        s.bitmaps("src");
        s.queries();
        s.add_raw("tgt2");
        for extra in [
            json!({"bitmap": "b0", "bitmap-mode": "never"}),
            json!({"bitmap": "b0", "bitmap-mode": "on-success"}),
        ] {
            let mut args = backup("j2", "bitmap", extra);
            args["target"] = json!("tgt2");
            s.cmd("blockdev-backup", args);
        }
        for cmd in [
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-disable",
        ] {
            s.cmd(cmd, json!({"node": "src", "name": "b0"}));
        }
        s.cmd_until("job-cancel", json!({"id": "j1"}), &["j1 null"]);
        s.bitmaps("src");
        s.queries();
    });
}

/// A raw node `bad` over blkdebug over a new file, whose writes over
/// `[1 MiB, 1 MiB + 64 KiB)` fail with EIO.
fn add_failing_target(s: &mut Side) {
    let path = s.path("bad.img");
    harness::sparse_file(&path, harness::transcript::DISK);
    s.qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "bad",
               "file": {"driver": "blkdebug",
                        "inject-error": [{"event": "none", "iotype": "write",
                                          "sector": 2048, "errno": 5}],
                        "image": {"driver": "file", "filename": path.to_str().unwrap()}}}),
    );
}

/// One cluster at 0, 1 MiB and 2 MiB written over NBD.
fn dirty_three(url: &str) {
    qemu_io(
        url,
        "raw",
        &["write -P 7 0 64k", "write -P 8 1M 64k", "write -P 9 2M 4k"],
    );
}

#[test]
fn bitmap_modes_after_success_failure_and_cancel_as_qsd() {
    compare(|s| {
        let url = s.export("src");
        add_failing_target(s);
        s.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0", "granularity": 65536}),
        );
        dirty_three(&url);
        s.bitmaps("src");
        assert_eq!(count(s, "src", "b0"), 3 * K64, "{}", s.name);

        // Success: on-success and always clear what was copied; never keeps it.
        s.cmd_until(
            "blockdev-backup",
            backup(
                "j",
                "bitmap",
                json!({"bitmap": "b0", "bitmap-mode": "never"}),
            ),
            &["j null"],
        );
        assert_eq!(count(s, "src", "b0"), 3 * K64, "{}: never", s.name);
        s.cmd_until(
            "blockdev-backup",
            backup("j", "incremental", json!({"bitmap": "b0"})),
            &["j null"],
        );
        s.bitmaps("src");
        assert_eq!(count(s, "src", "b0"), 0, "{}: incremental", s.name);
        dirty_three(&url);
        s.cmd_until(
            "blockdev-backup",
            backup(
                "j",
                "bitmap",
                json!({"bitmap": "b0", "bitmap-mode": "always"}),
            ),
            &["j null"],
        );
        assert_eq!(count(s, "src", "b0"), 0, "{}: always", s.name);
        dirty_three(&url);
        s.cmd_until(
            "blockdev-backup",
            backup(
                "j",
                "full",
                json!({"bitmap": "b0", "bitmap-mode": "on-success"}),
            ),
            &["j null"],
        );
        s.bitmaps("src");
        assert_eq!(count(s, "src", "b0"), 0, "{}: full", s.name);

        // A target failing at 1 MiB, one cluster at a time: 0 is copied,
        // 1 MiB fails, 2 MiB is never reached.
        dirty_three(&url);
        let failing = |mode: &str, sync: &str| {
            let mut args = backup(
                "j",
                sync,
                json!({"bitmap": "b0", "bitmap-mode": mode,
                       "x-perf": {"max-workers": 1, "max-chunk": 65536}}),
            );
            args["target"] = json!("bad");
            args
        };
        for mode in ["on-success", "never"] {
            s.cmd_until("blockdev-backup", failing(mode, "bitmap"), &["j null"]);
            s.bitmaps("src");
            assert_eq!(count(s, "src", "b0"), 3 * K64, "{}: failed {mode}", s.name);
        }
        s.cmd_until("blockdev-backup", failing("always", "bitmap"), &["j null"]);
        s.bitmaps("src");
        assert_eq!(count(s, "src", "b0"), 2 * K64, "{}: failed always", s.name);
        // A failed full backup under always gives back what it did not copy.
        s.cmd_until("blockdev-backup", failing("always", "full"), &["j null"]);
        s.bitmaps("src");
        let disk = harness::transcript::DISK;
        assert_eq!(
            count(s, "src", "b0"),
            disk - (1 << 20),
            "{}: failed full always",
            s.name
        );

        // Cancelled: on-success and never give everything back; the bitmap
        // is listed with its successor while the job runs.
        s.cmd(
            "block-dirty-bitmap-clear",
            json!({"node": "src", "name": "b0"}),
        );
        dirty_three(&url);
        for mode in ["on-success", "never"] {
            s.cmd_until(
                "blockdev-backup",
                backup(
                    "j",
                    "bitmap",
                    json!({"bitmap": "b0", "bitmap-mode": mode, "speed": 1}),
                ),
                &["j running"],
            );
            s.bitmaps("src");
            qemu_io(&url, "raw", &["write -P 10 3M 4k"]);
            s.bitmaps("src");
            s.cmd_until("job-cancel", json!({"id": "j"}), &["j null"]);
            s.bitmaps("src");
            assert_eq!(
                count(s, "src", "b0"),
                4 * K64,
                "{}: cancelled {mode}",
                s.name
            );
            s.cmd(
                "block-dirty-bitmap-clear",
                json!({"node": "src", "name": "b0"}),
            );
            dirty_three(&url);
        }
        // always: what the job copied before the cancel is cleared (its
        // amount depends on timing, so only the relation is compared).
        s.cmd_until(
            "blockdev-backup",
            backup(
                "j",
                "bitmap",
                json!({"bitmap": "b0", "bitmap-mode": "always", "speed": 1}),
            ),
            &["j running"],
        );
        let before = 3 * K64;
        s.qmp.ok("job-cancel", json!({"id": "j"}));
        let (ev, _) = cancelled(&mut s.qmp, "j");
        let copied = ev["data"]["offset"].as_u64().unwrap();
        assert_eq!(
            count(s, "src", "b0"),
            before - copied,
            "{}: cancelled always ({ev})",
            s.name
        );
        s.settle(&[]);
    });
}

/// Waits for job `id`'s BLOCK_JOB_CANCELLED (and its end); returns it.
fn cancelled(qmp: &mut harness::Qmp, id: &str) -> (Value, Instant) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = qmp
            .event(left)
            .unwrap_or_else(|| panic!("no BLOCK_JOB_CANCELLED for {id}; saw {seen:?}"));
        if e["event"] == "BLOCK_JOB_CANCELLED" && e["data"]["device"] == id {
            let at = Instant::now();
            // Then concluded and null.
            while let Some(next) = qmp.event(Duration::from_secs(10)) {
                if next["event"] == "JOB_STATUS_CHANGE" && next["data"]["status"] == "null" {
                    break;
                }
            }
            return (e, at);
        }
        seen.push(e);
    }
}
