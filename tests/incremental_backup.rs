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

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::pit::{
    prefill, read_image, release_node, verify_point_in_time, wait_job_event, Layout, WriteLog,
    WriterOpts, Writers,
};
use harness::transcript::{compare, Side};
use harness::{qemu_io, run, Livesnapd};
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

/// A qcow2 image with persistent bitmap `bro` (made by qemu-img), and one
/// whose bitmap `stale` QEMU left in use: qsd had the image open when it was
/// killed, so every reader must call the bitmap inconsistent.
fn bitmap_images(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ro = harness::create_image(dir.join("ro.qcow2"), "qcow2", harness::transcript::DISK);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&ro)
        .arg("bro"));
    let stale = harness::create_image(dir.join("stale.qcow2"), "qcow2", harness::transcript::DISK);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&stale)
        .arg("stale"));
    let qsd = harness::Qsd::bare();
    qsd.qmp().ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "d",
               "file": {"driver": "file", "filename": stale.to_str().unwrap()}}),
    );
    // Dropping the daemon kills it (SIGKILL).
    drop(qsd);
    (ro, stale)
}

#[test]
fn read_only_and_inconsistent_bitmaps_as_qsd() {
    let images = tempfile::tempdir().unwrap();
    let (ro, stale) = bitmap_images(images.path());
    compare(|s| {
        for (node, image, read_only) in [("ro", &ro, true), ("stale", &stale, false)] {
            let copy = s.path(&format!("{node}.qcow2"));
            std::fs::copy(image, &copy).unwrap();
            s.qmp.ok(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": node, "read-only": read_only,
                       "file": {"driver": "file", "filename": copy.to_str().unwrap()}}),
            );
            s.bitmaps(node);
        }
        let from = |device: &str, extra: Value| {
            let mut args = backup("j", "bitmap", extra);
            args["device"] = json!(device);
            args
        };
        for mode in ["on-success", "always"] {
            s.cmd(
                "blockdev-backup",
                from("ro", json!({"bitmap": "bro", "bitmap-mode": mode})),
            );
            s.cmd(
                "blockdev-backup",
                from("stale", json!({"bitmap": "stale", "bitmap-mode": mode})),
            );
        }
        s.cmd(
            "blockdev-backup",
            from("stale", json!({"bitmap": "stale", "bitmap-mode": "never"})),
        );
        // A job that never changes the bitmap may read a read-only one.
        s.cmd_until(
            "blockdev-backup",
            from("ro", json!({"bitmap": "bro", "bitmap-mode": "never"})),
            &["j null"],
        );
        s.bitmaps("ro");
    });
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
        s.add_failing_target();
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

/// Waits for job `id`'s BLOCK_JOB_COMPLETED (and its end); returns it.
fn completed(qmp: &mut harness::Qmp, id: &str) -> Value {
    let (ev, _) = wait_job_event(qmp, id, "BLOCK_JOB_COMPLETED", Duration::from_secs(30));
    while let Some(next) = qmp.event(Duration::from_secs(10)) {
        if next["event"] == "JOB_STATUS_CHANGE" && next["data"]["status"] == "null" {
            break;
        }
    }
    ev
}

/// Clusters of `data` (a raw image) that are not all zero.
fn nonzero_clusters(data: &[u8]) -> Vec<u64> {
    data.chunks(K64 as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

#[test]
fn bitmap_granularity_rounds_to_backup_clusters_as_qsd() {
    compare(|s| {
        let url = s.export("src");
        // A fine bitmap: a 512-byte write marks one 4 KiB chunk, and the
        // backup copies the 64 KiB cluster around it.
        s.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "fine", "granularity": 4096}),
        );
        qemu_io(
            &url,
            "raw",
            &[
                "write -P 1 0 512",
                "write -P 2 100k 8k",
                "write -P 3 1M 64k",
            ],
        );
        s.bitmaps("src");
        s.qmp.ok(
            "blockdev-backup",
            backup("j", "incremental", json!({"bitmap": "fine"})),
        );
        let ev = completed(&mut s.qmp, "j");
        assert_eq!(ev["data"]["len"], json!(3 * K64), "{}: {ev}", s.name);
        let tgt = std::fs::read(s.path("tgt.img")).unwrap();
        assert_eq!(nonzero_clusters(&tgt), [0, 1, 16], "{}", s.name);
        s.record("target clusters", json!(nonzero_clusters(&tgt)));
        s.bitmaps("src");

        // A coarse bitmap: one 4 KiB write marks a 1 MiB chunk, all 16
        // clusters of which are copied.
        s.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "coarse", "granularity": 1 << 20}),
        );
        qemu_io(&url, "raw", &["write -P 4 2M 4k"]);
        s.add_raw("tgt2");
        let mut args = backup(
            "j",
            "bitmap",
            json!({"bitmap": "coarse", "bitmap-mode": "never"}),
        );
        args["target"] = json!("tgt2");
        s.qmp.ok("blockdev-backup", args);
        let ev = completed(&mut s.qmp, "j");
        assert_eq!(ev["data"]["len"], json!(1 << 20), "{}: {ev}", s.name);
        s.bitmaps("src");

        // Guest writes during an incremental: one to a cluster the bitmap
        // marks has its old data copied first; one elsewhere is not copied.
        s.cmd(
            "block-dirty-bitmap-clear",
            json!({"node": "src", "name": "fine"}),
        );
        qemu_io(&url, "raw", &["write -P 5 0 64k", "write -P 6 1M 64k"]);
        s.add_raw("tgt3");
        let mut args = backup(
            "j",
            "incremental",
            json!({"bitmap": "fine", "speed": 1, "x-perf": {"max-chunk": 65536, "max-workers": 1}}),
        );
        args["target"] = json!("tgt3");
        s.cmd_until("blockdev-backup", args, &["j running"]);
        qemu_io(&url, "raw", &["write -P 7 1M 64k", "write -P 8 3M 64k"]);
        s.bitmaps("src");
        s.cmd_until(
            "block-job-set-speed",
            json!({"device": "j", "speed": 0}),
            &["j null"],
        );
        let tgt = std::fs::read(s.path("tgt3.img")).unwrap();
        assert_eq!(nonzero_clusters(&tgt), [0, 16], "{}", s.name);
        assert!(
            tgt[1 << 20..(1 << 20) + K64 as usize]
                .iter()
                .all(|&b| b == 6),
            "{}: the cluster written during the job holds the new data, not the old",
            s.name
        );
        s.record("target clusters", json!(nonzero_clusters(&tgt)));
        s.bitmaps("src");
        assert_eq!(count(s, "src", "fine"), 2 * K64 / 4096 * 4096, "{}", s.name);
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

// ---------------------------------------------------------------------------
// A backup chain under concurrent writers.

/// Disk size: the writers' layout is the lower half; the upper half is
/// written once before the chain starts and never again, so no incremental
/// may hold any of it.
const DISK: u64 = 64 << 20;
const LAYOUT: u64 = DISK / 2;
const UPPER_FILL: u8 = 0x5a;

/// Clusters (64 KiB, the backup's cluster and the qcow2 cluster) that
/// `image` itself allocates, not its backing chain.
fn allocated_clusters(image: &Path) -> BTreeSet<u64> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-U", "-f", "qcow2"])
        .arg(image));
    let map: Value = serde_json::from_str(&out).unwrap();
    let mut clusters = BTreeSet::new();
    for e in map.as_array().unwrap() {
        if e["depth"] == 0 && e["present"] == true {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            assert!(
                start.is_multiple_of(K64) && len.is_multiple_of(K64),
                "{}: allocation not in whole clusters: {e}",
                image.display()
            );
            clusters.extend(start / K64..(start + len) / K64);
        }
    }
    clusters
}

/// The clusters an incremental between two backups may hold (a write that
/// may have come after the earlier instant and before the later one) and
/// must hold (a write certainly between them), from the writers' log; the
/// instants are only known to lie in their commands' windows.
fn changed_clusters(
    log: &WriteLog,
    prev: (Instant, Instant),
    this: (Instant, Instant),
) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let cluster = |w: &harness::pit::WriteRecord| w.block * log.layout.block_size as u64 / K64;
    let may = log
        .writes
        .iter()
        .filter(|w| w.acked.is_none_or(|a| a >= prev.0) && w.sent <= this.1)
        .map(cluster)
        .collect();
    let must = log
        .writes
        .iter()
        .filter(|w| w.sent >= prev.1 && w.acked.is_some_and(|a| a <= this.0))
        .map(cluster)
        .collect();
    (may, must)
}

/// One backup of the chain: its image and the window of the command that
/// fixed its point in time.
struct Step {
    image: std::path::PathBuf,
    window: (Instant, Instant),
}

/// Adds qcow2 `image` (created by the caller) as node `node`, without
/// opening its backing chain: the backup writes whole clusters.
fn add_target(q: &mut harness::Qmp, node: &str, image: &Path) {
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node, "backing": null,
               "file": {"driver": "file", "filename": image.to_str().unwrap()}}),
    );
}

#[test]
fn full_then_incrementals_under_writers_restore_each_instant() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    harness::sparse_file(&disk, DISK);
    let d = Livesnapd::with_image(&disk, &[]);
    let url = d.url().to_string();
    let mut q = d.qmp();
    let layout = Layout::new(4096, LAYOUT / 4096, 4, 0x1ac4_e11a);
    prefill(&url, &layout);
    qemu_io(
        &url,
        "raw",
        &[&format!("write -P {UPPER_FILL} {LAYOUT} {}", DISK - LAYOUT)],
    );
    let opts = WriterOpts {
        rate: Some(500.0),
        ..WriterOpts::default()
    };
    let w = Writers::start(&[&url], &layout, &opts);
    let wait = Duration::from_secs(120);
    w.wait_acked(300, wait);

    // The full backup and the bitmap, at one instant.
    let full = dir.path().join("full.qcow2");
    harness::create_image(&full, "qcow2", DISK);
    add_target(&mut q, "full", &full);
    let t0 = Instant::now();
    q.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-backup",
             "data": {"job-id": "full", "device": "disk", "target": "full", "sync": "full",
                      "speed": 64 << 20}},
        ]}),
    );
    let t1 = Instant::now();
    let (_, full_done) = wait_job_event(&mut q, "full", "BLOCK_JOB_COMPLETED", wait);
    release_node(&mut q, "full", Duration::from_secs(10));
    let mut steps = vec![Step {
        image: full.clone(),
        window: (t0, t1),
    }];

    // Two incrementals, each a qcow2 over the previous backup.
    for i in 1..=2 {
        w.wait_acked(w.acked() + 300, wait);
        let image = dir.path().join(format!("inc{i}.qcow2"));
        let prev = steps.last().unwrap().image.clone();
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&prev)
            .arg(&image)
            .arg(DISK.to_string()));
        let node = format!("inc{i}");
        add_target(&mut q, &node, &image);
        let t0 = Instant::now();
        q.ok(
            "blockdev-backup",
            json!({"job-id": node, "device": "disk", "target": node,
                   "sync": "incremental", "bitmap": "b0"}),
        );
        let t1 = Instant::now();
        wait_job_event(&mut q, &node, "BLOCK_JOB_COMPLETED", wait);
        release_node(&mut q, &node, Duration::from_secs(10));
        steps.push(Step {
            image,
            window: (t0, t1),
        });
    }
    w.wait_acked(w.acked() + 300, wait);
    let log = w.stop();
    log.assert_no_failures();

    // Each backup, read through its chain, is the disk at its instant.
    for (i, s) in steps.iter().enumerate() {
        let restored = read_image(&s.image, "qcow2");
        let r = verify_point_in_time(&log, &restored, s.window.0, s.window.1)
            .unwrap_or_else(|e| panic!("backup {i} ({}): {e}", s.image.display()));
        assert!(
            restored[LAYOUT as usize..].iter().all(|&b| b == UPPER_FILL),
            "backup {i}: the upper half, written once before the chain, is not what it was"
        );
        eprintln!("backup {i}: {r}");
    }
    // A copy from the full backup's end would differ: writes raced it.
    assert!(
        verify_point_in_time(&log, &read_image(&full, "qcow2"), full_done, full_done).is_err(),
        "the full backup passes as a copy from its end: no write raced it"
    );
    // Each incremental holds exactly what changed since the one before.
    let total = DISK / K64;
    for i in 1..steps.len() {
        let got = allocated_clusters(&steps[i].image);
        let (may, must) = changed_clusters(&log, steps[i - 1].window, steps[i].window);
        let extra: Vec<_> = got.difference(&may).take(8).collect();
        let missing: Vec<_> = must.difference(&got).take(8).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "incremental {i}: {} clusters, {} may and {} must change; clusters that did not \
             change {extra:?}; changed clusters it lacks {missing:?}",
            got.len(),
            may.len(),
            must.len()
        );
        assert!(
            got.iter().all(|&c| c < LAYOUT / K64),
            "incremental {i} holds part of the upper half"
        );
        eprintln!(
            "incremental {i}: {} of {total} clusters ({} KiB), {} to {} changed by the writers",
            got.len(),
            got.len() as u64 * K64 / 1024,
            must.len(),
            may.len()
        );
    }
}
