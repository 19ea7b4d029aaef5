//! `livesnap backup`, `restore` and `verify`: a backup chain of a disk
//! that writers keep writing, against qemu-storage-daemon 10.0 (the
//! reference) and a qemu-system VM whose guest writes.
//!
//! Every restored backup must be the disk at one instant inside the window
//! its report gives (the point-in-time verifier over the writers' log), so
//! an incremental that missed a change, or took one from after its
//! instant, fails. Incrementals must hold only clusters written since the
//! backup before. A deadline or SIGINT in the middle of a backup must leave
//! DIR byte for byte as it was and the chain's bitmap as the only one, and
//! the next incremental must still be complete. verify must pass on the
//! chain and fail on a flipped byte, a missing file and a broken backing
//! link; a lost bitmap must stop an incremental until --full is asked.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use livesnap_testkit::chain::{
    assert_only_tracking, backup, backup_out, bitmaps, dir_state, own_data, path_of, restore,
    verify, LIMIT,
};
use livesnap_testkit::cli::{spawn_until, window_of, Daemon, Kind};
use livesnap_testkit::pit::{prefill, verify_point_in_time, Layout, WriteLog, WriterOpts, Writers};
use livesnap_testkit::vm::{
    check_snapshot, run_tag, Boot, GuestOpts, Taken, Vm, VmDisk, BOOT_TIMEOUT,
};
use livesnap_testkit::{qemu_io, run};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
/// The writers' region: [0, 32 MiB).
const WRITTEN: u64 = 32 * MIB;
/// A region written once, between two backups, never by the writers.
const STATIC: (u64, u64) = (40 * MIB, 8 * MIB);
const CLUSTER: u64 = 64 << 10;
const WAIT: Duration = Duration::from_secs(60);

/// The clusters written (or possibly written) between backup `prev`'s
/// window opening and backup `report`'s closing: all an incremental may hold.
fn touched(log: &WriteLog, prev: &Value, report: &Value) -> BTreeSet<u64> {
    let (from, _) = window_of(prev);
    let (_, to) = window_of(report);
    log.writes
        .iter()
        .filter(|w| w.sent <= to && w.acked.is_none_or(|a| a >= from))
        .map(|w| w.block * log.layout.block_size as u64 / CLUSTER)
        .collect()
}

/// An incremental holds only clusters the writers touched since the backup
/// before (and, with `extra`, that range): what changed, nothing else.
fn assert_only_changes(log: &WriteLog, prev: &Value, report: &Value, extra: Option<(u64, u64)>) {
    let allowed = touched(log, prev, report);
    let data = own_data(&path_of(report));
    let mut held = 0;
    for (start, len) in &data {
        for c in start / CLUSTER..(start + len).div_ceil(CLUSTER) {
            let in_extra = extra.is_some_and(|(s, l)| c * CLUSTER >= s && c * CLUSTER < s + l);
            assert!(
                allowed.contains(&c) || in_extra,
                "backup {} holds cluster {c} ({} KiB in), which nothing wrote since backup {}",
                report["index"],
                (c * CLUSTER) >> 10,
                prev["index"]
            );
            held += 1;
        }
    }
    let copied = report["bytes_copied"].as_u64().unwrap();
    let bound = (allowed.len() as u64 + extra.map_or(0, |e| e.1 / CLUSTER)) * CLUSTER;
    assert!(
        copied <= bound,
        "backup {} copied {copied} bytes, more than the {bound} of the clusters written since backup {}",
        report["index"],
        prev["index"]
    );
    eprintln!(
        "chain: backup {} holds {held} clusters of its own, {} touched since backup {} ({} in the region)",
        report["index"],
        allowed.len(),
        prev["index"],
        WRITTEN / CLUSTER
    );
}

/// What the restore of backup `report` must be: the writers' region at one
/// instant of its window, the static region written or not, zeroes elsewhere.
fn check_restored(log: &WriteLog, dir: &Path, report: &Value, static_written: bool) {
    let n = report["index"].as_u64().unwrap();
    let img = restore(
        dir,
        n,
        &dir.parent().unwrap().join(format!("restored-{n}.raw")),
    );
    assert_eq!(img.len() as u64, DISK);
    let (t0, t1) = window_of(report);
    let pit = verify_point_in_time(log, &img[..WRITTEN as usize], t0, t1).unwrap_or_else(|e| {
        panic!("the restore of backup {n} is not the disk at its instant: {e}\n{report}")
    });
    eprintln!("chain: restore of backup {n}: {pit}");
    let (s, l) = (STATIC.0 as usize, STATIC.1 as usize);
    let want = if static_written { 0x5c } else { 0 };
    assert!(
        img[s..s + l].iter().all(|&b| b == want),
        "backup {n}: the region written between backups is not {want:#x}"
    );
    assert!(
        img[WRITTEN as usize..s].iter().all(|&b| b == 0) && img[s + l..].iter().all(|&b| b == 0),
        "backup {n}: data where nothing was written"
    );
}

/// A backup interrupted by `how` (a deadline, or SIGINT once the job
/// runs): its exit code, DIR byte for byte as it was, the chain's bitmap
/// the only one and recording, no job and no node left.
fn interrupted(d: &Daemon, dir: &Path, tracking: &str, how: &str) {
    let before = dir_state(dir);
    let nodes = d.qmp().node_names();
    let sock = d.cli_sock.to_str().unwrap();
    let stderr = if how == "deadline" {
        backup_out(
            &d.cli_sock,
            "disk",
            dir,
            &["--speed", "1M", "--deadline", "2s"],
        )
        .expect(4)
        .stderr
    } else {
        let (out, stderr) = spawn_until(
            &[
                "backup",
                "--qmp",
                sock,
                "disk",
                dir.to_str().unwrap(),
                "--speed",
                "1M",
            ],
            // A progress line (stderr is no terminal here): the job runs,
            // and the chain's progress reaches the operator.
            "progress:",
        )
        .signal(libc::SIGINT, LIMIT);
        assert_eq!(out.code(), 5, "{stderr}");
        assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
        stderr
    };
    eprintln!("chain: {how}: {}", stderr.trim());
    assert!(
        stderr.contains("and the disk's change tracking as they were")
            && !stderr.contains("LEFT BEHIND"),
        "{stderr}"
    );
    assert!(
        dir_state(dir) == before,
        "the {how} changed {}: {:?} -> {:?}",
        dir.display(),
        before.names(),
        dir_state(dir).names()
    );
    let mut q = d.qmp();
    assert_only_tracking(&mut q, "disk", tracking);
    assert!(q.job_ids().is_empty(), "jobs left: {:?}", q.job_ids());
    assert_eq!(q.node_names(), nodes, "nodes left");
}

/// verify passes on the chain, and on copies of it fails on a flipped
/// byte, a missing file and a broken backing link; restore refuses the
/// corrupted copy.
fn verify_catches_damage(dir: &Path, work: &Path) {
    let ok = verify(dir).expect(0).json();
    assert_eq!(ok["result"], "ok", "{ok}");
    let damaged = |name: &str, damage: &dyn Fn(&Path)| -> Value {
        let copy = work.join(name);
        run(Command::new("cp").arg("-r").arg(dir).arg(&copy));
        damage(&copy);
        let out = verify(&copy).expect(7);
        let v = out.json();
        assert_eq!(v["result"], "failed", "{v}");
        eprintln!("chain: verify of {name}: {v}");
        v
    };
    let flipped = damaged("flipped", &|c| {
        let f = c.join("0001-incremental.qcow2");
        let mut b = std::fs::read(&f).unwrap();
        let at = b.len() - 4096;
        b[at] ^= 0x40;
        std::fs::write(&f, b).unwrap();
    });
    assert!(
        flipped["backups"][1]["problems"][0]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{flipped}"
    );
    let out = Command::new(livesnap_testkit::cli::livesnap_bin())
        .args(["restore", "--at", "2", "--quiet"])
        .arg(work.join("flipped"))
        .arg(work.join("from-flipped.raw"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(!work.join("from-flipped.raw").exists());
    let missing = damaged("missing", &|c| {
        std::fs::remove_file(c.join("0002-incremental.qcow2")).unwrap()
    });
    assert!(
        missing["backups"][2]["problems"][0]
            .as_str()
            .unwrap()
            .contains("missing"),
        "{missing}"
    );
    let relinked = damaged("relinked", &|c| {
        run(Command::new("qemu-img")
            .args(["rebase", "-u", "-F", "qcow2", "-b", "0000-full.qcow2"])
            .arg(c.join("0002-incremental.qcow2")));
    });
    let problems = relinked["backups"][2]["problems"].to_string();
    assert!(problems.contains("broken backing link"), "{relinked}");
}

#[test]
fn chain_under_writers_qsd() {
    chain_under_writers(Kind::Qsd);
}

/// Full + incremental + incremental under writers, a deadline and a SIGINT
/// mid-backup, the next incremental, a lost bitmap, --full and one more
/// incremental: every backup restored and checked.
fn chain_under_writers(kind: Kind) {
    let work = tempfile::tempdir().unwrap();
    let ddir = tempfile::tempdir().unwrap();
    let image = ddir.path().join("disk.qcow2");
    livesnap_testkit::create_image(&image, "qcow2", DISK);
    let d = Daemon::start(kind, ddir, &image, "qcow2");
    let dir = work.path().join("chain");
    let layout = Layout::new(4096, WRITTEN / 4096, 4, 0xc4a1 ^ kind as u64);
    prefill(&d.url, &layout);
    // Slow enough that an incremental holds a fraction of the region.
    let w = Writers::start(
        &[&d.url],
        &layout,
        &WriterOpts {
            rate: Some(100.0),
            ..WriterOpts::default()
        },
    );
    w.wait_acked(100, WAIT);
    let r0 = backup(&d.cli_sock, "disk", &dir, &["--speed", "16M"]);
    assert_eq!(
        (r0["kind"].as_str(), r0["index"].as_u64()),
        (Some("full"), Some(0))
    );
    assert_eq!(r0["bytes_copied"], DISK, "{r0}");
    let tracking = r0["bitmap"].as_str().unwrap().to_string();
    assert_only_tracking(&mut d.qmp(), "disk", &tracking);
    w.wait_acked(w.acked() + 150, WAIT);
    let r1 = backup(&d.cli_sock, "disk", &dir, &[]);
    w.wait_acked(w.acked() + 150, WAIT);
    let r2 = backup(&d.cli_sock, "disk", &dir, &[]);
    for r in [&r1, &r2] {
        assert_eq!(r["kind"], "incremental", "{r}");
        assert_eq!(r["bitmap"], tracking.as_str(), "{r}");
    }
    assert_eq!(r2["backing"], "0001-incremental.qcow2", "{r2}");
    assert_only_tracking(&mut d.qmp(), "disk", &tracking);

    // Something the next backup must carry, then two runs that do not finish.
    qemu_io(
        &d.url,
        "raw",
        &[&format!("write -P 0x5c {} {}", STATIC.0, STATIC.1)],
    );
    interrupted(&d, &dir, &tracking, "deadline");
    interrupted(&d, &dir, &tracking, "SIGINT");
    w.wait_acked(w.acked() + 100, WAIT);
    let r3 = backup(&d.cli_sock, "disk", &dir, &[]);
    assert!(r3["bytes_copied"].as_u64().unwrap() >= STATIC.1, "{r3}");

    // The tracking lost: no incremental, until --full.
    d.qmp().ok(
        "block-dirty-bitmap-remove",
        serde_json::json!({"node": "disk", "name": tracking}),
    );
    let before = dir_state(&dir);
    let lost = backup_out(&d.cli_sock, "disk", &dir, &[]).expect(1).json();
    let why = lost["reason"].as_str().unwrap();
    assert!(
        why.contains("no bitmap") && why.contains("--full"),
        "{lost}"
    );
    assert!(dir_state(&dir) == before, "a refused backup changed DIR");
    let r4 = backup(&d.cli_sock, "disk", &dir, &["--full"]);
    assert_eq!(
        (r4["kind"].as_str(), r4["index"].as_u64()),
        (Some("full"), Some(4))
    );
    let tracking4 = r4["bitmap"].as_str().unwrap().to_string();
    assert_ne!(tracking4, tracking);
    assert_only_tracking(&mut d.qmp(), "disk", &tracking4);
    w.wait_acked(w.acked() + 100, WAIT);
    let r5 = backup(&d.cli_sock, "disk", &dir, &[]);
    assert_eq!(r5["backing"], "0004-full.qcow2", "{r5}");
    w.wait_acked(w.acked() + 100, WAIT);
    let log = w.stop();
    log.assert_no_failures();

    assert_only_changes(&log, &r0, &r1, None);
    assert_only_changes(&log, &r1, &r2, None);
    assert_only_changes(&log, &r2, &r3, Some(STATIC));
    assert_only_changes(&log, &r4, &r5, None);
    for (r, static_written) in [
        (&r0, false),
        (&r1, false),
        (&r2, false),
        (&r3, true),
        (&r4, true),
        (&r5, true),
    ] {
        check_restored(&log, &dir, r, static_written);
    }
    // The same restore as a qcow2: equal to the raw one, clean for qemu-img.
    let q = work.path().join("r2.qcow2");
    livesnap_testkit::cli::livesnap(
        &[
            "restore",
            dir.to_str().unwrap(),
            q.to_str().unwrap(),
            "--at",
            "2",
            "--format",
            "qcow2",
            "--quiet",
        ],
        LIMIT,
    )
    .expect(0);
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&q));
    let raw = restore(&dir, 2, &work.path().join("r2.raw"));
    assert!(
        livesnap_testkit::pit::read_image(&q, "qcow2") == raw,
        "the qcow2 restore differs from the raw one"
    );
    verify_catches_damage(&dir, work.path());
    // The chain moves with its directory: relative backing names.
    let moved = work.path().join("moved");
    std::fs::rename(&dir, &moved).unwrap();
    assert_eq!(verify(&moved).expect(0).json()["result"], "ok");
    assert!(bitmaps(&mut d.qmp(), "disk").len() == 1);
}

/// A qemu-system VM (TCG) whose guest writes records to its qcow2 `-drive`
/// disk: full + incremental + incremental through `drive0`, each restore
/// exactly the disk after one guest request inside its window, and each
/// incremental no bigger than the clusters the guest writes to.
#[test]
fn chain_of_a_running_vm() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("vm.qcow2");
    livesnap_testkit::create_image(&disk, "qcow2", DISK);
    // Data the guest never touches, so the full backup has more to copy.
    qemu_io(disk.to_str().unwrap(), "qcow2", &["write -P 0x77 48M 16M"]);
    let g = GuestOpts {
        tag: run_tag(),
        blocks: 64,
        base: 0,
        stride: 64,
        max: 0,
    };
    let mut vm = Vm::start(
        VmDisk::Drive {
            path: &disk,
            format: "qcow2",
        },
        Boot::Writer(g),
    );
    vm.wait_ready(BOOT_TIMEOUT);
    vm.wait_written(u64::from(g.blocks) + 8, WAIT);
    let dir = work.path().join("chain");
    let mut last = 0;
    let mut reports = Vec::new();
    for speed in ["8M", "1M", "1M"] {
        let watch = vm.watch_progress();
        let r_start = vm.last_written().unwrap();
        let t0 = Instant::now();
        let r = backup(&vm.qmp_path, "drive0", &dir, &["--speed", speed]);
        let (r0, r1) = watch.bracket(&r, WAIT);
        drop(watch);
        // Let the guest write between backups.
        let r_done = vm.wait_written(vm.last_written().unwrap() + u64::from(g.blocks) / 2, WAIT);
        let n = r["index"].as_u64().unwrap();
        let img = restore(&dir, n, &work.path().join("restored.raw"));
        assert!(
            img[48 * MIB as usize..].iter().all(|&b| b == 0x77),
            "backup {n} lost the disk's static data"
        );
        let m = check_snapshot(
            &g,
            &img[..48 * MIB as usize],
            &Taken {
                how: "livesnap backup",
                r_start,
                r0,
                r1,
                r_done,
                at: t0 - vm.started,
                took: t0.elapsed(),
            },
        );
        assert!(
            m > last || n == 0,
            "backup {n} is not later than the one before"
        );
        last = m;
        if n > 0 {
            // At most the guest's record clusters changed.
            let bound = u64::from(g.blocks) * CLUSTER;
            assert!(
                r["bytes_copied"].as_u64().unwrap() <= bound,
                "incremental {n} copied more than the {bound} bytes of the guest's clusters: {r}"
            );
            for (start, len) in own_data(&path_of(&r)) {
                assert!(
                    start + len <= g.disk_bytes().next_multiple_of(CLUSTER),
                    "{r}"
                );
            }
        }
        reports.push(r);
    }
    assert_eq!(reports[2]["backing"], "0001-incremental.qcow2");
    verify(&dir).expect(0);
}

/// The chain must be in a directory of its own: DIR with other files is refused.
#[test]
fn refuses_a_directory_with_other_files() {
    let ddir = tempfile::tempdir().unwrap();
    let image = ddir.path().join("disk.qcow2");
    livesnap_testkit::create_image(&image, "qcow2", 4 * MIB);
    let d = Daemon::start(Kind::Qsd, ddir, &image, "qcow2");
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("notes.txt"), "x").unwrap();
    let out = backup_out(&d.cli_sock, "disk", work.path(), &[]).expect(1);
    assert!(out.stderr.contains("empty directory"), "{out:?}");
    assert!(bitmaps(&mut d.qmp(), "disk").is_empty());
    // A failed first run leaves no directory it created.
    let new = work.path().join("new");
    let out = backup_out(&d.cli_sock, "nosuchdisk", &new, &[]).expect(1);
    assert!(out.stderr.contains("no node or device named"), "{out:?}");
    assert!(!new.exists(), "the failed run left {}", new.display());
}

/// A run killed outright (SIGKILL) after its job started, the job then
/// completing on its own, which clears the chain's bitmap (QEMU's
/// on-success): the next run undoes what the killed one left (its job's
/// nodes, its partial file, its undo bitmap merged back) and its
/// incremental still holds what the killed one had copied. Then
/// qemu-storage-daemon killed and restarted: the bitmap is inconsistent,
/// the backup says so and refuses, and --full starts over.
#[test]
fn killed_run_and_crashed_daemon() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.qcow2");
    livesnap_testkit::create_image(&image, "qcow2", DISK);
    let dir = work.path().join("chain");
    let d = Daemon::start(Kind::Qsd, tempfile::tempdir().unwrap(), &image, "qcow2");
    let layout = Layout::new(4096, WRITTEN / 4096, 4, 0x4b11);
    prefill(&d.url, &layout);
    let w = Writers::start(
        &[&d.url],
        &layout,
        &WriterOpts {
            rate: Some(100.0),
            ..WriterOpts::default()
        },
    );
    w.wait_acked(100, WAIT);
    let r0 = backup(&d.cli_sock, "disk", &dir, &[]);
    let tracking = r0["bitmap"].as_str().unwrap().to_string();
    let nodes = d.qmp().node_names();
    w.wait_acked(w.acked() + 100, WAIT);
    // Quiet from here, so the bitmaps' counts say what the jobs did.
    let log = w.stop();
    log.assert_no_failures();
    let static_write = format!("write -P 0x5c {} {}", STATIC.0, STATIC.1);
    qemu_io(&d.url, "raw", &[&static_write]);

    let sock = d.cli_sock.to_str().unwrap();
    let started = spawn_until(
        &[
            "backup",
            "--qmp",
            sock,
            "disk",
            dir.to_str().unwrap(),
            "--speed",
            "4M",
        ],
        "point in time fixed",
    );
    let pid = started.child.id();
    let (out, _) = started.signal(libc::SIGKILL, LIMIT);
    assert_eq!(out.status.code(), None, "{out:?}");
    let record = std::fs::read_to_string(dir.join(".livesnap-run.json")).unwrap();
    assert!(record.contains(&format!("\"pid\": {pid}")), "{record}");
    assert!(dir.join("0001-incremental.qcow2").exists());
    // The orphaned job runs to its end and clears the chain's bitmap.
    let job = format!("livesnap-{pid}-job");
    let mut q = d.qmp();
    let deadline = Instant::now() + WAIT;
    while q.job_ids().contains(&job) {
        assert!(Instant::now() < deadline, "the orphaned job did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = bitmaps(&mut q, "disk");
    assert_eq!(
        b.len(),
        2,
        "the chain's and the killed run's undo bitmap: {b:?}"
    );
    let undo = b.keys().find(|k| **k != tracking).unwrap();
    assert_eq!(
        b[&tracking]["count"], 0,
        "the job did not complete (QEMU clears the bitmap then): {b:?}"
    );
    assert!(b[undo]["count"].as_u64().unwrap() >= STATIC.1, "{b:?}");
    drop(q);

    let r1 = backup(&d.cli_sock, "disk", &dir, &[]);
    assert!(
        r1["notes"].to_string().contains(&format!("pid {pid}")),
        "{r1}"
    );
    assert_eq!(r1["index"], 1, "{r1}");
    assert!(r1["bytes_copied"].as_u64().unwrap() >= STATIC.1, "{r1}");
    assert!(!dir.join(".livesnap-run.json").exists());
    let mut q = d.qmp();
    assert_only_tracking(&mut q, "disk", &tracking);
    assert_eq!(q.node_names(), nodes, "the killed run's nodes are left");
    drop(q);
    check_restored(&log, &dir, &r1, true);

    // A clean stop stores the bitmap in the image; reopened, it is marked
    // in use there, and a kill leaves it so: inconsistent at the next start.
    let _ = d.qmp().execute("quit", Value::Null);
    drop(d);
    let d = Daemon::start(Kind::Qsd, tempfile::tempdir().unwrap(), &image, "qcow2");
    assert_only_tracking(&mut d.qmp(), "disk", &tracking);
    drop(d);
    let d = Daemon::start(Kind::Qsd, tempfile::tempdir().unwrap(), &image, "qcow2");
    let b = bitmaps(&mut d.qmp(), "disk");
    assert_eq!(b[&tracking]["inconsistent"], true, "{b:?}");
    let before = dir_state(&dir);
    let refused = backup_out(&d.cli_sock, "disk", &dir, &[]).expect(1).json();
    let why = refused["reason"].as_str().unwrap();
    assert!(
        why.contains("inconsistent") && why.contains("--full"),
        "{refused}"
    );
    assert!(dir_state(&dir) == before, "a refused backup changed DIR");
    let r2 = backup(&d.cli_sock, "disk", &dir, &["--full"]);
    let r3 = backup(&d.cli_sock, "disk", &dir, &[]);
    assert_eq!(r3["backing"], "0002-full.qcow2", "{r3}");
    assert_only_tracking(&mut d.qmp(), "disk", r2["bitmap"].as_str().unwrap());
    let img = restore(&dir, 3, &work.path().join("r3.raw"));
    let disk = livesnap_testkit::pit::read_export(&d.url, DISK);
    assert!(
        img == disk,
        "the restore of backup 3 differs from the idle disk"
    );
    assert_eq!(verify(&dir).expect(0).json()["result"], "ok");
}

/// A raw disk cannot keep a persistent bitmap (QEMU refuses it): the chain
/// tracks changes in memory, says so, and still makes correct incrementals.
#[test]
fn raw_disk_tracks_changes_in_memory() {
    for kind in [Kind::Qsd, Kind::Livesnapd] {
        raw_disk_chain(kind);
    }
}

fn raw_disk_chain(kind: Kind) {
    let d = Daemon::raw(kind, 8 * MIB);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("chain");
    qemu_io(&d.url, "raw", &["write -P 0x11 0 1M"]);
    let r0 = backup(&d.cli_sock, "disk", &dir, &[]);
    assert!(
        r0["notes"]
            .to_string()
            .contains("cannot keep a persistent bitmap"),
        "{r0}"
    );
    let b = bitmaps(&mut d.qmp(), "disk");
    assert_eq!(
        b[r0["bitmap"].as_str().unwrap()]["persistent"],
        false,
        "{b:?}"
    );
    qemu_io(&d.url, "raw", &["write -P 0x22 4M 128k"]);
    let r1 = backup(&d.cli_sock, "disk", &dir, &[]);
    assert_eq!(r1["bytes_copied"], 128 << 10, "{r1}");
    let img = restore(&dir, 1, &work.path().join("r1.raw"));
    assert!(
        img == std::fs::read(&d.image).unwrap(),
        "restore differs from the disk"
    );
    let img0 = restore(&dir, 0, &work.path().join("r0.raw"));
    assert!(img0[4 << 20..(4 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn chain_under_writers_livesnapd() {
    chain_under_writers(Kind::Livesnapd);
}

/// livesnapd keeps its persistent bitmap covering every acknowledged write
/// across a kill -9 (beyond QEMU, which declares it inconsistent): after
/// the restart the chain goes on with an incremental, and that
/// incremental still holds every write made before the kill.
#[test]
fn livesnapd_killed_chain_goes_on() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.qcow2");
    livesnap_testkit::create_image(&image, "qcow2", DISK);
    let dir = work.path().join("chain");
    let d = Daemon::start(
        Kind::Livesnapd,
        tempfile::tempdir().unwrap(),
        &image,
        "qcow2",
    );
    let layout = Layout::new(4096, WRITTEN / 4096, 4, 0x1d5d);
    prefill(&d.url, &layout);
    let r0 = backup(&d.cli_sock, "disk", &dir, &[]);
    let tracking = r0["bitmap"].as_str().unwrap().to_string();
    // Flushed writes (FUA) that the next incremental must hold, then the kill.
    let w = Writers::start(
        &[&d.url],
        &layout,
        &WriterOpts {
            rate: Some(100.0),
            fua: true,
            ..WriterOpts::default()
        },
    );
    w.wait_acked(200, WAIT);
    let log = w.stop();
    log.assert_no_failures();
    drop(d);
    let d = Daemon::start(
        Kind::Livesnapd,
        tempfile::tempdir().unwrap(),
        &image,
        "qcow2",
    );
    assert_only_tracking(&mut d.qmp(), "disk", &tracking);
    let r1 = backup(&d.cli_sock, "disk", &dir, &[]);
    assert_eq!(r1["kind"], "incremental", "{r1}");
    check_restored(&log, &dir, &r1, false);
    assert_eq!(verify(&dir).expect(0).json()["result"], "ok");
}
