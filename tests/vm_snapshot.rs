//! End to end with a real VM: qemu-system-x86_64 (TCG) boots a Debian kernel
//! whose init keeps writing self-describing records to its virtio disk
//! (`tests/vm/init.sh`, built by `harness::vm`), and a live snapshot of that
//! disk taken while it writes must be exactly the disk after one request N,
//! with N inside what the guest had reported around the snapshot.
//!
//! The guest's requests are strictly sequential, so the check is exact: when
//! the serial console shows "wrote k", request k is on the disk and request
//! k + 2 has not been sent. A backup's point in time lies between the
//! `blockdev-backup` command and its reply, so with `r0` read before the
//! command and `r1` after the reply, `r0 <= N <= r1 + 1`. For `livesnap
//! snapshot` the window is the one its `--json` report gives (CLOCK_MONOTONIC),
//! bracketed by a watcher that reads the console every few milliseconds.

use livesnap_testkit as harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::pit::{add_image_node, read_export, read_export_at, release_node, wait_job_event};
use harness::vm::{
    check_final, check_snapshot, run_tag, Boot, GuestOpts, Taken, Vm, VmDisk, BLOCK, BOOT_TIMEOUT,
    INIT_SH,
};
use harness::{qemu_io, run, run_within, sparse_file, Livesnapd, Qmp};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// 64 record blocks 256 KiB apart: each in its own 64 KiB backup cluster,
/// spread over the whole 16 MiB disk so the background copy reaches most of
/// them only after the guest has rewritten them.
fn writer(tag: u32) -> GuestOpts {
    GuestOpts {
        tag,
        blocks: 64,
        base: 0,
        stride: 64,
        max: 0,
    }
}

const DISK: u64 = 16 * MIB;
/// Slow enough that the guest writes during the copy (so copy-before-write
/// has to keep old content), fast enough to finish in a few seconds.
const SPEED: u64 = 4 * MIB;
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Boots the writer, lets it cycle through every block once, and returns
/// the boot time.
fn boot(vm: &mut Vm, g: &GuestOpts) -> Duration {
    let boot = vm.wait_ready(BOOT_TIMEOUT);
    eprintln!(
        "vm_snapshot: guest ready {:.2} s after qemu started",
        boot.as_secs_f64()
    );
    vm.wait_written(u64::from(g.blocks) + 8, WRITE_TIMEOUT);
    boot
}

/// `blockdev-backup sync=full` of `device` into a new raw image `target`
/// over `qmp`, waiting for BLOCK_JOB_COMPLETED, then removing the target node.
fn backup(vm: &Vm, qmp: &mut Qmp, device: &str, target: &Path) -> Taken {
    add_image_node(qmp, "snap0", target, "raw", DISK);
    let r0 = vm.last_written().expect("the guest has written");
    let t0 = Instant::now();
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "snap", "device": device, "target": "snap0",
               "sync": "full", "speed": SPEED}),
    );
    let r1 = vm.last_written().unwrap();
    wait_job_event(qmp, "snap", "BLOCK_JOB_COMPLETED", JOB_TIMEOUT);
    let took = t0.elapsed();
    let r_done = vm.last_written().unwrap();
    release_node(qmp, "snap0", JOB_TIMEOUT);
    Taken {
        how: "blockdev-backup",
        r_start: r0,
        r0,
        r1,
        r_done,
        at: t0 - vm.started,
        took,
    }
}

/// The snapshot file, which must have the disk's size.
fn read_sized(path: &Path) -> Vec<u8> {
    let image = std::fs::read(path).unwrap();
    assert_eq!(image.len() as u64, DISK, "snapshot size");
    image
}

/// `livesnap snapshot DEVICE TARGET --format raw --json` through `qmp_path`
/// while the guest writes; the report's point-in-time window, bracketed by
/// the guest's progress, bounds the request the snapshot must be at.
fn cli_snapshot(vm: &Vm, qmp_path: &Path, device: &str, target: &Path) -> Taken {
    let watch = vm.watch_progress();
    let t0 = Instant::now();
    let (st, out, err) = run_within(
        Command::new(harness::cli::livesnap_bin())
            .args(["snapshot", "--qmp"])
            .arg(qmp_path)
            .arg(device)
            .arg(target)
            .args(["--format", "raw", "--method", "backup", "--deadline", "60s"])
            .args(["--speed", &SPEED.to_string(), "--json", "--quiet"]),
        JOB_TIMEOUT + Duration::from_secs(30),
    );
    let took = t0.elapsed();
    assert!(
        st.success(),
        "livesnap snapshot failed ({st}):\n{out}\n{err}"
    );
    let report: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("livesnap --json printed no JSON object ({e}): {out}"));
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["method"], "backup", "{report}");
    let (r0, r1) = watch.bracket(&report, WRITE_TIMEOUT);
    drop(watch);
    Taken {
        how: "livesnap",
        r_start: r0,
        r0,
        r1,
        r_done: vm.last_written().unwrap(),
        at: t0 - vm.started,
        took,
    }
}

/// A copy made by plainly reading the disk while the guest writes is not
/// from one instant, and the check says so: the last record block is read
/// first, the rest only after the guest has cycled through all blocks twice.
fn plain_copy_is_refused(vm: &mut Vm, g: &GuestOpts, read: impl Fn(u64) -> Vec<u8>) {
    let mut image = vec![0u8; DISK as usize];
    let last = g.offset(g.blocks - 1);
    image[last as usize..last as usize + BLOCK].copy_from_slice(&read(last));
    let now = vm.last_written().unwrap();
    vm.wait_written(now + 2 * u64::from(g.blocks), WRITE_TIMEOUT);
    for b in 0..g.blocks - 1 {
        let at = g.offset(b);
        image[at as usize..at as usize + BLOCK].copy_from_slice(&read(at));
    }
    let r = g.find_request(&image);
    assert!(
        r.is_err(),
        "a copy read across {} guest requests passes as the disk after {r:?}: the check proves nothing",
        2 * g.blocks
    );
}

/// livesnapd serves the VM's disk over NBD. While the guest writes, a live
/// snapshot taken (a) with `blockdev-backup` on livesnapd's own QMP socket
/// and (b) with `livesnap snapshot` is each exactly the disk after one
/// request inside its window, and the disk keeps every request.
#[test]
fn livesnapd_snapshots_of_a_running_vm() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    sparse_file(&disk, DISK);
    let d = Livesnapd::with_image(&disk, &[]);
    let socket = d.dir.path().join("nbd.sock");
    let g = writer(run_tag());
    let mut vm = Vm::start(
        VmDisk::Nbd {
            socket: &socket,
            export: "disk",
        },
        Boot::Writer(g),
    );
    boot(&mut vm, &g);

    let target = work.path().join("qmp.raw");
    let mut qmp = d.qmp();
    let t = backup(&vm, &mut qmp, "disk", &target);
    drop(qmp);
    let n = check_snapshot(&g, &read_sized(&target), &t);

    let target = work.path().join("cli.raw");
    let t = cli_snapshot(&vm, &d.qmp_path, "disk", &target);
    let m = check_snapshot(&g, &read_sized(&target), &t);
    assert!(m > n, "the second snapshot is not later than the first");

    plain_copy_is_refused(&mut vm, &g, |at| read_export_at(d.url(), at, BLOCK as u64));

    vm.kill();
    let last = vm.last_written().unwrap();
    check_final(&g, &read_export(d.url(), DISK), last);
    eprintln!(
        "vm_snapshot: livesnapd: whole test {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The same against QEMU itself, with the VM opening its local image through
/// legacy `-drive ...,id=drive0`: QEMU's own `blockdev-backup` of `drive0`
/// is the reference the check is proven on, and `livesnap snapshot drive0`
/// must pass the same check.
#[test]
fn qemu_system_snapshots_of_its_own_disk() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    sparse_file(&disk, DISK);
    let g = writer(run_tag());
    let mut vm = Vm::start(
        VmDisk::Drive {
            path: &disk,
            format: "raw",
        },
        Boot::Writer(g),
    );
    assert_eq!(vm.device, "drive0");
    boot(&mut vm, &g);

    let target = work.path().join("qmp.raw");
    // QEMU serves one QMP client at a time on this socket.
    let mut qmp = vm.qmp();
    let t = backup(&vm, &mut qmp, "drive0", &target);
    drop(qmp);
    let n = check_snapshot(&g, &read_sized(&target), &t);

    let target = work.path().join("cli.raw");
    let t = cli_snapshot(&vm, &vm.qmp_path.clone(), "drive0", &target);
    let m = check_snapshot(&g, &read_sized(&target), &t);
    assert!(m > n, "the second snapshot is not later than the first");

    vm.kill();
    let last = vm.last_written().unwrap();
    check_final(&g, &std::fs::read(&disk).unwrap(), last);
}

/// A VM with a `-blockdev` disk, its CPU stopped: QMP knows the disk by its
/// node name, and a backup of that node copies it whole.
#[test]
fn qemu_system_blockdev_disk_is_addressed_by_its_node() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    sparse_file(&disk, 4 * MIB);
    qemu_io(
        disk.to_str().unwrap(),
        "raw",
        &["write -P 0x5a 0 1M", "write -P 0xa5 3M 4k"],
    );
    let vm = Vm::start(
        VmDisk::Blockdev {
            path: &disk,
            format: "raw",
        },
        Boot::Paused,
    );
    assert_eq!(vm.device, "disk0");
    let mut qmp = vm.qmp();
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let ours = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap_or_else(|| panic!("no disk0 in query-named-block-nodes: {nodes}"));
    assert_eq!(ours["file"], json!(disk.to_str().unwrap()), "{ours}");
    let blocks = qmp.ok("query-block", json!(null));
    assert!(
        blocks
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["qdev"].as_str().is_some_and(|q| q.contains("vd0"))
                && b["inserted"]["node-name"] == "disk0"),
        "device vd0 on node disk0 not in query-block: {blocks}"
    );

    let target = work.path().join("copy.raw");
    add_image_node(&mut qmp, "copy0", &target, "raw", 4 * MIB);
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "copy", "device": "disk0", "target": "copy0", "sync": "full"}),
    );
    wait_job_event(&mut qmp, "copy", "BLOCK_JOB_COMPLETED", JOB_TIMEOUT);
    release_node(&mut qmp, "copy0", JOB_TIMEOUT);
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(&disk).unwrap(),
        "the copy of disk0 differs from its image"
    );
}

/// The record codec the checks rest on: an image is recognised exactly at
/// its request, and anything else is refused.
#[test]
fn find_request_is_exact() {
    let g = GuestOpts {
        tag: 0x1234_5678,
        blocks: 4,
        base: 0,
        stride: 2,
        max: 0,
    };
    let size = g.disk_bytes() + 8192;
    assert_eq!(g.find_request(&g.image_after(None, size)), Ok(None));
    for n in [0, 1, 3, 4, 5, 11, 1_000_003] {
        assert_eq!(
            g.find_request(&g.image_after(Some(n), size)),
            Ok(Some(n)),
            "n={n}"
        );
    }
    // Block 2 one write behind (2 instead of 6) while block 1 holds 9: no
    // single request explains it. (Block 1 behind would be the disk after 8.)
    let mut img = g.image_after(Some(9), size);
    let at = g.offset(2) as usize;
    img[at..at + 4096].copy_from_slice(&g.record(2));
    assert!(g.find_request(&img).is_err());
    let mut img = g.image_after(Some(9), size);
    let at = g.offset(1) as usize;
    img[at..at + 4096].copy_from_slice(&g.record(5));
    assert_eq!(g.find_request(&img), Ok(Some(8)));
    // A record from another run.
    let other = GuestOpts { tag: 7, ..g };
    let mut img = g.image_after(Some(9), size);
    img[at..at + 4096].copy_from_slice(&other.record(9));
    assert!(g.find_request(&img).is_err());
    // A torn record (the first half of a newer write).
    let mut img = g.image_after(Some(9), size);
    img[at..at + 2048].copy_from_slice(&g.record(13)[..2048]);
    assert!(g.find_request(&img).is_err());
    // A stray byte between record blocks.
    let mut img = g.image_after(Some(9), size);
    img[4096 + 17] = 1;
    assert!(g.find_request(&img).is_err());
    // Byte for byte what init.sh's own format and arithmetic give under
    // busybox (the guest's shell), for a large n too.
    let fmt = INIT_SH
        .lines()
        .find_map(|l| l.strip_prefix("fmt="))
        .expect("init.sh sets fmt");
    let p = INIT_SH
        .lines()
        .find_map(|l| l.trim().strip_prefix("p=$(("))
        .expect("init.sh computes p");
    for n in [5u64, 1_000_003] {
        let b = n % u64::from(g.blocks);
        let script = format!(
            "fmt={fmt}; tag={}; n={n}; b={b}; p=$(({p}; printf \"$fmt\" $tag $n $b $p",
            g.tag
        );
        let out = run(Command::new("/bin/busybox").args(["sh", "-c", &script]));
        assert_eq!(out.as_bytes(), &g.record(n)[..64], "n={n}");
    }
}

/// qemu-system with a `-blockdev` disk and writers going through QEMU's own
/// NBD export of it: `livesnap snapshot` on node `disk0` must give the disk
/// at one instant inside the window its report gives, and lose no write.
#[test]
fn qemu_system_blockdev_disk_snapshot_under_writers() {
    use harness::pit::{
        check_source_complete, prefill, verify_point_in_time, Layout, WriterOpts, Writers,
    };
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    sparse_file(&disk, DISK);
    let vm = Vm::start(
        VmDisk::Blockdev {
            path: &disk,
            format: "raw",
        },
        Boot::Paused,
    );
    let sock = work.path().join("nbd.sock");
    {
        // QEMU serves one monitor client at a time: this one goes before the CLI comes.
        let mut qmp = vm.qmp();
        qmp.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
        );
        qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "w", "node-name": "disk0", "writable": true}),
        );
    }
    let url = format!("nbd+unix:///disk0?socket={}", sock.display());
    let layout = Layout::new(4096, DISK / 4096, 4, 0xb10c);
    prefill(&url, &layout);
    let w = Writers::start(
        &[&url],
        &layout,
        &WriterOpts {
            rate: Some(2000.0),
            ..WriterOpts::default()
        },
    );
    w.wait_acked(500, JOB_TIMEOUT);
    let target = work.path().join("snap.raw");
    let (status, stdout, stderr) = run_within(
        Command::new(harness::cli::livesnap_bin())
            .args(["snapshot", "--qmp"])
            .arg(&vm.qmp_path)
            .arg("disk0")
            .arg(&target)
            .args(["--format", "raw", "--json", "--quiet", "--speed", "8M"]),
        JOB_TIMEOUT + Duration::from_secs(30),
    );
    assert!(
        status.success(),
        "livesnap snapshot failed: {stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("a JSON report");
    let pit = &report["point_in_time"];
    let t0 = harness::instant_of(pit["start_monotonic_ns"].as_u64().expect("window start"));
    let t1 = harness::instant_of(pit["end_monotonic_ns"].as_u64().expect("window end"));
    w.wait_acked(w.acked() + 500, JOB_TIMEOUT);
    let log = w.stop();
    log.assert_no_failures();
    let copy = std::fs::read(&target).unwrap();
    let r = verify_point_in_time(&log, &copy, t0, t1)
        .unwrap_or_else(|e| panic!("snapshot of qemu-system's -blockdev disk: {e}"));
    eprintln!("qemu-system -blockdev, livesnap snapshot: {r}");
    assert!(
        log.sent_between(t1, Instant::now()) > 0,
        "no write raced the copy"
    );
    check_source_complete(&log, &read_export(&url, DISK))
        .expect("the disk keeps every acknowledged write");
}
