//! blockdev-mirror on livesnapd under concurrent writers: the target is a
//! point-in-time copy for every copy mode, with soft cancel and with
//! complete; and the seed's sequence (Nova: background mirror polled to
//! READY, then cancel or complete while the guest keeps writing) ends within
//! the documented bound.

use livesnap_testkit as harness;

use std::time::{Duration, Instant};

use harness::pit::{
    add_image_node, check_source_complete, end_mirror_checked, prefill, read_export,
    scenario_mirror_cancel, scenario_mirror_complete, wait_job_event, Layout, MirrorEnd, MirrorRig,
    PitDaemon, PitOpts, WriterOpts, Writers,
};
use harness::{create_image, Livesnapd, Qmp};
use serde_json::json;

const DISK: u64 = 64 << 20;

/// Runs both mirror scenarios (soft cancel, then complete) on a fresh daemon.
fn pit_mirror(mode: &'static str, source_format: &str, target_format: &str, rate: Option<f64>) {
    let scratch = tempfile::tempdir().unwrap();
    let image = match source_format {
        "raw" => create_image(scratch.path().join("disk.raw"), "raw", DISK),
        _ => create_image(scratch.path().join("disk.qcow2"), "qcow2", DISK),
    };
    let extra: Vec<&str> = match source_format {
        "raw" => vec![],
        _ => vec!["--format", "qcow2"],
    };
    let d = Livesnapd::with_image(&image, &extra);
    let mut qmp = d.qmp();
    let mut o = PitOpts::new(DISK);
    o.mirror_mode = mode;
    o.target_format = target_format.into();
    o.writers = WriterOpts {
        rate,
        ..WriterOpts::default()
    };
    if let Some(rate) = rate {
        // About a second of writes before the job and after the point in time.
        o.warmup = rate as u64;
        o.after = rate as u64;
    }
    let mut pd = PitDaemon {
        qmp: &mut qmp,
        url: d.url().to_string(),
        node: "disk".into(),
        // A qcow2 source read behind the daemon's back misses cached tables.
        source_file: (source_format == "raw").then(|| (image.clone(), "raw".to_string())),
        dir: scratch.path().to_path_buf(),
    };
    let r = scenario_mirror_cancel(&mut pd, &o);
    eprintln!("{mode} {source_format}->{target_format}: {r}");
    assert!(r.during_job > 0, "no write raced the mirror: {r}");
    let r = scenario_mirror_complete(&mut pd, &o);
    eprintln!("{mode} {source_format}->{target_format}: {r}");
}

#[test]
fn write_blocking_mirror_is_point_in_time_raw() {
    for _ in 0..3 {
        pit_mirror("write-blocking", "raw", "raw", None);
    }
}

#[test]
fn auto_mirror_is_point_in_time_raw_and_qcow2() {
    for _ in 0..2 {
        pit_mirror("auto", "raw", "raw", None);
    }
    pit_mirror("auto", "raw", "qcow2", None);
    pit_mirror("auto", "qcow2", "qcow2", None);
}

/// How fast a background mirror copies on this machine now, in 64 KiB
/// chunks per second: a full copy of a written disk, no writers.
fn measured_copy_rate() -> f64 {
    let scratch = tempfile::tempdir().unwrap();
    let image = create_image(scratch.path().join("disk.raw"), "raw", DISK);
    let d = Livesnapd::with_image(&image, &[]);
    let mut qmp = d.qmp();
    prefill(d.url(), &Layout::new(4096, DISK / 4096, 4, 0x7a7e));
    let target = scratch.path().join("target.raw");
    add_image_node(&mut qmp, "target", &target, "raw", DISK);
    let t0 = Instant::now();
    qmp.ok(
        "blockdev-mirror",
        json!({"job-id": "rate", "device": "disk", "target": "target", "sync": "full",
               "copy-mode": "background"}),
    );
    let (_, ready) = wait_job_event(
        &mut qmp,
        "rate",
        "BLOCK_JOB_READY",
        Duration::from_secs(120),
    );
    qmp.ok("block-job-cancel", json!({"device": "rate"}));
    wait_job_event(
        &mut qmp,
        "rate",
        "BLOCK_JOB_COMPLETED",
        Duration::from_secs(60),
    );
    (DISK / 65536) as f64 / ready.duration_since(t0).as_secs_f64().max(1e-3)
}

#[test]
fn background_mirror_is_point_in_time_with_paced_writers() {
    // Background mode converges only when the guest dirties slower than the
    // job copies (each 4 KiB write dirties a 64 KiB chunk). The first pass
    // measured here copies long runs at full parallelism; converging copies
    // scattered chunks, within the window a busy guest leaves (guest.rs),
    // far slower. Writers at a thirty-second of the first pass's rate
    // (unloaded here: ~95/s of ~3000 chunks/s) let it reach READY on a loaded
    // machine too, and the completion still has writes racing it.
    let chunks = measured_copy_rate();
    let rate = (chunks / 32.0).clamp(10.0, 400.0);
    eprintln!("background mirror copies {chunks:.0} chunks/s here: writers at {rate:.0}/s");
    for _ in 0..2 {
        pit_mirror("background", "raw", "raw", Some(rate));
    }
    pit_mirror("background", "raw", "qcow2", Some(rate));
}

/// A correctness bound, not a speed target: the documented bound is
/// `attempts × hold` (0.6 s by default) plus copying what was dirty; QEMU
/// never ends in this sequence. The margin absorbs a loaded CI machine; the
/// measured times (well under a second) are printed and reported in
/// docs/benchmarks.md.
const COMPLETION_BOUND: Duration = Duration::from_secs(5);

/// Polls `query-block-jobs` until the job is READY, as Nova does.
fn poll_until_ready(qmp: &mut Qmp, job: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let jobs = qmp.ok("query-block-jobs", json!({}));
        let j = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["device"] == job)
            .unwrap_or_else(|| panic!("job {job} vanished: {jobs}"));
        if j["ready"] == true {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "no READY within {timeout:?}: {j}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The seed's sequence on O_DIRECT images: a background mirror polled to
/// READY, the guest writing at full speed, then the end command. Returns
/// how long the end took.
fn seed_sequence(end: MirrorEnd) -> Duration {
    let scratch = tempfile::tempdir().unwrap();
    let image = create_image(scratch.path().join("disk.raw"), "raw", DISK);
    let d = Livesnapd::with_image(&image, &["--cache-direct"]);
    let mut qmp = d.qmp();
    let layout = Layout::new(4096, DISK / 4096, 4, 0x5eed);
    prefill(d.url(), &layout);
    let target = scratch.path().join("target.raw");
    add_image_node(&mut qmp, "target", &target, "raw", DISK);
    qmp.ok(
        "blockdev-mirror",
        json!({"job-id": "nova", "device": "disk", "target": "target", "sync": "full",
               "copy-mode": "background"}),
    );
    poll_until_ready(&mut qmp, "nova", Duration::from_secs(30));
    // The event came too; the end is judged by the events after it.
    wait_job_event(&mut qmp, "nova", "BLOCK_JOB_READY", Duration::from_secs(5));
    // Now the guest writes as fast as it can, as in the measurements where
    // QEMU's cancel never returned.
    let w = Writers::start(&[d.url()], &layout, &WriterOpts::default());
    w.wait_acked(3000, Duration::from_secs(30));
    let mut rig = MirrorRig {
        qmp: &mut qmp,
        url: d.url(),
        job: "nova",
        target: ("target", &target),
        source: Some(&image),
    };
    end_mirror_checked(&mut rig, end, w)
}

#[test]
fn seed_sequence_soft_cancel_ends_within_bound() {
    for _ in 0..2 {
        let took = seed_sequence(MirrorEnd::Cancel);
        assert!(took < COMPLETION_BOUND, "soft cancel took {took:?}");
    }
}

#[test]
fn seed_sequence_complete_ends_within_bound() {
    for _ in 0..2 {
        let took = seed_sequence(MirrorEnd::Complete);
        assert!(took < COMPLETION_BOUND, "job-complete took {took:?}");
    }
}

/// Issue 12: a light writer (fio, 4 MiB/s of 4 KiB random writes) kept a
/// background mirror from READY for as long as it wrote: the job treated
/// any guest write as "busy" and copied one chunk at a time. The mirror
/// must now reach READY while the writer is still writing. A liveness
/// check, not a speed test: the bound is far above the second or two it
/// takes, and far below the writer's minute.
#[test]
fn mirror_reaches_ready_while_a_light_writer_writes() {
    harness::require_tool("fio");
    const SIZE: u64 = 256 << 20;
    let scratch = tempfile::tempdir().unwrap();
    let image = create_image(scratch.path().join("disk.raw"), "raw", SIZE);
    let d = Livesnapd::with_image(&image, &["--cache-direct"]);
    let mut qmp = d.qmp();
    prefill(d.url(), &Layout::new(4096, SIZE / 4096, 4, 0x119b));
    let writes_for = Duration::from_secs(60);
    let mut fio = harness::Spawned::spawn(std::process::Command::new("fio").args([
        "--name=light",
        "--ioengine=nbd",
        &format!("--uri={}", d.url()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=1",
        "--rate=4m",
        "--time_based",
        &format!("--runtime={}", writes_for.as_secs()),
    ]));
    let fio_started = Instant::now();
    // The writer is connected and writing before the job starts.
    std::thread::sleep(Duration::from_secs(1));
    for (n, mode) in ["background", "auto"].into_iter().enumerate() {
        let job = format!("light{n}");
        let target = scratch.path().join(format!("{job}.raw"));
        add_image_node(&mut qmp, &job, &target, "raw", SIZE);
        qmp.ok(
            "blockdev-mirror",
            json!({"job-id": job, "device": "disk", "target": job, "sync": "full",
                   "copy-mode": mode}),
        );
        let started = Instant::now();
        let bound = Duration::from_secs(20);
        let mut last = serde_json::Value::Null;
        loop {
            let jobs = qmp.ok("query-block-jobs", json!({}));
            if let Some(j) = jobs.as_array().unwrap().iter().find(|j| j["device"] == job) {
                last = j.clone();
            }
            if last["ready"] == true {
                break;
            }
            assert!(
                started.elapsed() < bound,
                "{mode} mirror not READY within {bound:?} under a 4 MiB/s writer \
                 (writer running: {}); last query-block-jobs entry: {last}",
                fio_started.elapsed() < writes_for
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = started.elapsed();
        assert!(
            fio_started.elapsed() < writes_for,
            "READY only after the writer's {writes_for:?}: nothing shown"
        );
        eprintln!("{mode} mirror READY after {took:?} under a 4 MiB/s writer");
        // The event came too; the end is judged by the events after it.
        wait_job_event(&mut qmp, &job, "BLOCK_JOB_READY", Duration::from_secs(5));
        qmp.ok("block-job-cancel", json!({"device": job}));
        wait_job_event(
            &mut qmp,
            &job,
            "BLOCK_JOB_COMPLETED",
            Duration::from_secs(30),
        );
    }
    // fio stops at its first failed write: still running, it never failed.
    let exited = fio.child.try_wait().unwrap();
    assert!(exited.is_none(), "fio exited during the test: {exited:?}");
}

// ---------------------------------------------------------------------------
// Faults on the target, through the blkdebug filter.

/// A daemon exporting a prefilled raw disk, a blkdebug target over a raw
/// file with `rule`, and writers running; returns them with the layout.
struct FaultRig {
    _scratch: tempfile::TempDir,
    d: Livesnapd,
    qmp: Qmp,
    writers: Option<Writers>,
}

fn fault_rig(rule: serde_json::Value) -> FaultRig {
    let scratch = tempfile::tempdir().unwrap();
    let image = create_image(scratch.path().join("disk.raw"), "raw", 16 << 20);
    let d = Livesnapd::with_image(&image, &[]);
    let mut qmp = d.qmp();
    let layout = Layout::new(4096, (16 << 20) / 4096, 2, 0xfa17);
    prefill(d.url(), &layout);
    let target = create_image(scratch.path().join("target.raw"), "raw", 16 << 20);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "target",
               "file": {"driver": "blkdebug", "node-name": "faulty", "inject-error": [rule],
                        "image": {"driver": "file", "filename": target.to_str().unwrap()}}}),
    );
    let writers = Writers::start(
        &[d.url()],
        &layout,
        &WriterOpts {
            rate: Some(2000.0),
            ..WriterOpts::default()
        },
    );
    writers.wait_acked(200, Duration::from_secs(30));
    FaultRig {
        _scratch: scratch,
        d,
        qmp,
        writers: Some(writers),
    }
}

impl FaultRig {
    /// Stops the writers: none failed, and the disk holds every acknowledged write.
    fn guest_lost_nothing(&mut self) {
        let w = self.writers.take().unwrap();
        w.wait_acked(w.acked() + 200, Duration::from_secs(30));
        let log = w.stop();
        log.assert_no_failures();
        let now = read_export(self.d.url(), 16 << 20);
        check_source_complete(&log, &now).expect("the guest lost an acknowledged write");
    }

    fn mirror(&mut self, extra: serde_json::Value) {
        // `auto` by default: it starts in background, so the copy loop, where
        // the error policies apply, meets the fault first (a guest's mirrored
        // write would absorb a `once` rule by marking its chunk dirty again),
        // and it still converges under the writers.
        let mut args = json!({"job-id": "m", "device": "disk", "target": "target",
                              "sync": "full", "copy-mode": "auto"});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        self.qmp.ok("blockdev-mirror", args);
    }

    /// The next event about job `m` other than status changes.
    fn next_job_event(&mut self) -> serde_json::Value {
        loop {
            let ev = self
                .qmp
                .event(Duration::from_secs(20))
                .expect("an event about the job");
            if ev["event"] != "JOB_STATUS_CHANGE" {
                return ev;
            }
        }
    }
}

#[test]
fn target_eio_with_report_fails_the_job_and_the_guest_goes_on() {
    let mut r = fault_rig(json!({"event": "write_aio", "iotype": "write", "errno": 5}));
    r.mirror(json!({"on-target-error": "report"}));
    let ev = r.next_job_event();
    assert_eq!(ev["event"], "BLOCK_JOB_ERROR", "{ev}");
    assert_eq!(ev["data"]["operation"], "write");
    assert_eq!(ev["data"]["action"], "report");
    let ev = r.next_job_event();
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    assert_eq!(ev["data"]["error"], "Input/output error", "{ev}");
    r.guest_lost_nothing();
    // The source node is free again.
    assert!(r
        .qmp
        .ok("query-block-jobs", json!({}))
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn target_eio_once_with_ignore_and_stop_recovers() {
    for policy in ["ignore", "stop"] {
        let mut r =
            fault_rig(json!({"event": "write_aio", "iotype": "write", "errno": 5, "once": true}));
        r.mirror(json!({"on-target-error": policy}));
        let ev = r.next_job_event();
        assert_eq!(ev["event"], "BLOCK_JOB_ERROR", "{policy}: {ev}");
        assert_eq!(ev["data"]["action"], policy, "{ev}");
        if policy == "stop" {
            let jobs = r.qmp.ok("query-block-jobs", json!({}));
            assert_eq!(jobs[0]["io-status"], "failed", "{jobs}");
            assert_eq!(jobs[0]["paused"], true, "{jobs}");
            r.qmp.ok("block-job-resume", json!({"device": "m"}));
        }
        let ev = r.next_job_event();
        assert_eq!(ev["event"], "BLOCK_JOB_READY", "{policy}: {ev}");
        r.qmp.ok("block-job-cancel", json!({"device": "m"}));
        let ev = r.next_job_event();
        assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{policy}: {ev}");
        assert!(ev["data"].get("error").is_none(), "{ev}");
        r.guest_lost_nothing();
    }
}

#[test]
fn enospc_policy_stops_on_enospc_and_reports_eio() {
    let mut r =
        fault_rig(json!({"event": "write_aio", "iotype": "write", "errno": 28, "once": true}));
    r.mirror(json!({"on-target-error": "enospc"}));
    let ev = r.next_job_event();
    assert_eq!(ev["data"]["action"], "stop", "{ev}");
    let jobs = r.qmp.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["io-status"], "nospace", "{jobs}");
    r.qmp
        .ok("block-job-cancel", json!({"device": "m", "force": true}));
    assert_eq!(r.next_job_event()["event"], "BLOCK_JOB_CANCELLED");
    r.guest_lost_nothing();

    let mut r = fault_rig(json!({"event": "write_aio", "iotype": "write", "errno": 5}));
    r.mirror(json!({"on-target-error": "enospc"}));
    let ev = r.next_job_event();
    assert_eq!(ev["data"]["action"], "report", "{ev}");
    assert_eq!(r.next_job_event()["event"], "BLOCK_JOB_COMPLETED");
    r.guest_lost_nothing();
}

#[test]
fn force_cancel_with_a_stalled_target_ends() {
    // The target hangs on every write, for ever: copies and the guest's
    // mirrored writes (write-blocking) wait on it until the cancel, so a
    // cancel that waited for them would never end; any end proves it did not.
    let mut r = fault_rig(json!({"event": "write_aio", "iotype": "write", "x-stall": true}));
    r.mirror(json!({"copy-mode": "write-blocking"}));
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    r.qmp
        .ok("block-job-cancel", json!({"device": "m", "force": true}));
    let (_, t1) = wait_job_event(
        &mut r.qmp,
        "m",
        "BLOCK_JOB_CANCELLED",
        Duration::from_secs(30),
    );
    eprintln!("force cancel over a stalled target ended in {:?}", t1 - t0);
    r.guest_lost_nothing();
}

/// A guest write to a chunk whose earlier write-blocking copy hangs on the
/// target waits for that chunk's lock; a force cancel must free it too, or
/// detaching the mirror (which waits for every guest write) never ends.
/// Deterministic: the first write's target copy hangs for ever and holds
/// the chunk, the second write to the same chunk queues behind it.
#[test]
fn force_cancel_frees_a_write_queued_behind_a_hung_copy() {
    let scratch = tempfile::tempdir().unwrap();
    // Sparse: nothing to copy, every chunk in sync from the start.
    let image = create_image(scratch.path().join("disk.raw"), "raw", 16 << 20);
    let d = Livesnapd::with_image(&image, &[]);
    let mut qmp = d.qmp();
    let target = create_image(scratch.path().join("target.raw"), "raw", 16 << 20);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "target",
               "file": {"driver": "blkdebug", "node-name": "faulty",
                        "image": {"driver": "file", "filename": target.to_str().unwrap()}}}),
    );
    qmp.ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "disk", "target": "target", "sync": "full",
               "copy-mode": "write-blocking"}),
    );
    wait_job_event(&mut qmp, "m", "BLOCK_JOB_READY", Duration::from_secs(30));
    // In sync: from now on every target write hangs.
    qmp.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "faulty",
               "inject-error": [{"event": "none", "iotype": "write", "x-stall": true}]}),
    );
    let url = d.url().to_string();
    // Answered once the guest stops waiting for the hung target copy.
    harness::qemu_io(&url, "raw", &["write -P 0x11 0 4k"]);
    let mut second = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 0 4k", &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It queues behind the first write's copy.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second write did not wait"
    );
    qmp.ok("block-job-cancel", json!({"device": "m", "force": true}));
    wait_job_event(
        &mut qmp,
        "m",
        "BLOCK_JOB_CANCELLED",
        Duration::from_secs(30),
    );
    let (st, _, err) = harness::wait_within(second, Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the queued guest write was never answered"));
    assert!(st.success(), "the queued guest write failed: {err}");
    assert_eq!(
        harness::pit::read_export_at(&url, 0, 4096),
        vec![0x22; 4096],
        "the disk must hold the last acknowledged write"
    );
}
