//! `livesnap snapshot --libvirt` against a real libvirtd driving QEMU:
//! transient TCG domains boot the writer guest (`tests/vm/init.sh`), whose
//! init writes numbered records to /dev/vda with O_DIRECT, and every copy
//! must be exactly the disk after one guest request inside the report's
//! point-in-time window, with the guest writing on during and after, and
//! the domain left as it was: no domain job, no block job, its disks
//! unchanged. Failures (deadline, SIGINT, a target whose file system fills
//! up, a freeze without an agent) each leave the domain as it was, the
//! target removed, with their exit codes. And OpenStack Nova's own loop
//! (the test kit's `nova.py`, libvirt's Python binding) runs on the same
//! stack for the record.
//!
//! The harness starts virtlogd and libvirtd when none answers and stops
//! what it started at exit (`tests/harness/libvirt.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use livesnap_testkit::cli::{livesnap, spawn_livesnap, wait_out, Out};
use livesnap_testkit::libvirt::{shared_dir, Domain, DomainDisk, URI};
use livesnap_testkit::pit::read_image;
use livesnap_testkit::vm::{
    check_final, check_point_in_time, check_snapshot, raced, raced_enough, run_tag, GuestOpts,
    Taken,
};
use livesnap_testkit::{qemu_io, run, run_within, sparse_file};
use serde_json::Value;

/// Takes of one snapshot before a check that the guest raced none of them fails.
const SNAPSHOT_TRIES: u32 = 4;

const MIB: u64 = 1 << 20;
/// Long enough for a snapshot with the guest writing through it (the guest
/// writes about a hundred records a second under TCG).
const RUN_LIMIT: Duration = Duration::from_secs(180);
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// 64 record blocks `stride` × 4 KiB apart, from the start of the disk.
fn writer(stride: u32) -> GuestOpts {
    GuestOpts {
        tag: run_tag(),
        blocks: 64,
        base: 0,
        stride,
        max: 0,
    }
}

fn raw_disk(dir: &Path, name: &str, size: u64) -> DomainDisk {
    let path = dir.join(name);
    sparse_file(&path, size);
    DomainDisk {
        path,
        format: "raw".into(),
    }
}

/// `livesnap snapshot --libvirt DOMAIN ARGS --json --quiet`, the guest's
/// progress followed around it; asserts success and returns the report and
/// what the guest had written around its window.
fn snapshot(dom: &Domain, args: &[&str]) -> (Value, Taken) {
    let watch = dom.console.watch();
    let r_start = dom.last_written().unwrap();
    let t0 = Instant::now();
    let at = t0 - dom.started;
    let mut all = vec!["snapshot", "--libvirt", &dom.name, "--connect", URI];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", "--quiet"]);
    let out = livesnap(&all, RUN_LIMIT).expect(0);
    let report = out.json();
    assert_eq!(report["result"], "ok", "{report}");
    let (r0, r1) = watch.bracket(&report, WRITE_TIMEOUT);
    let taken = Taken {
        how: "livesnap --libvirt",
        r_start,
        r0,
        r1,
        r_done: dom.last_written().unwrap(),
        at,
        took: t0.elapsed(),
    };
    (report, taken)
}

/// The target read as raw (through its backing chain).
fn image_of(report: &Value) -> Vec<u8> {
    let t = &report["target"];
    read_image(
        Path::new(t["path"].as_str().unwrap()),
        t["format"].as_str().unwrap(),
    )
}

/// A snapshot of `dom`'s disk, checked to be the disk after one request in
/// its window; returns that request.
fn checked_snapshot(dom: &Domain, args: &[&str]) -> (Value, u64) {
    let disks = dom.disks();
    // QEMU's backup has no speed until livesnap sets one right after it
    // starts; with copy offload a raw target can be done before that, too
    // soon for the guest to race it (which the check needs to mean
    // anything). Such a take proves nothing either way: take it again.
    let mut tries = 1;
    let (report, taken) = loop {
        let (report, taken) = snapshot(dom, args);
        if raced_enough(&dom.guest, &taken) || tries == SNAPSHOT_TRIES {
            break (report, taken);
        }
        eprintln!(
            "libvirt: {} ended {:.2} s after it started, the guest wrote only {} requests meanwhile: again",
            report["method"],
            taken.took.as_secs_f64(),
            raced(&taken)
        );
        std::fs::remove_file(report["target"]["path"].as_str().unwrap()).unwrap();
        tries += 1;
    };
    eprintln!(
        "libvirt: {} took {:.2} s ({}); guest at {} when started, {}..{} around the window, {} at the end",
        report["method"],
        taken.took.as_secs_f64(),
        report["notes"],
        taken.r_start,
        taken.r0,
        taken.r1,
        taken.r_done
    );
    let image = image_of(&report);
    let span = dom.guest.disk_bytes() as usize;
    // Every take ended before the guest could race it (QEMU's backup, before
    // its speed was set, copies the whole disk by copy offload in a fraction
    // of a second here): the copy must still be the disk at one instant,
    // and what the guest raced is reported rather than demanded.
    let n = if raced_enough(&dom.guest, &taken) {
        check_snapshot(&dom.guest, &image[..span], &taken)
    } else {
        eprintln!(
            "libvirt: the guest raced {} only {} requests in {} tries: point in time checked, race not demanded",
            report["method"],
            raced(&taken),
            SNAPSHOT_TRIES
        );
        check_point_in_time(&dom.guest, &image[..span], &taken)
    };
    dom.assert_as_it_was(&disks);
    eprintln!(
        "libvirt: {} {} -> {}: the disk after request {n} (window {:.1} ms, {})",
        report["method"],
        report["target"]["format"],
        report["target"]["path"],
        report["point_in_time"]["width_ms"],
        report["point_in_time"]["defined_by"]
    );
    (report, n)
}

/// The guest's disk after the domain was destroyed holds every request it reported.
fn check_disk_after(dom: &mut Domain) {
    dom.destroy();
    let last = dom.last_written().unwrap();
    let image = read_image(&dom.disk.path, &dom.disk.format);
    check_final(&dom.guest, &image[..dom.guest.disk_bytes() as usize], last);
}

/// Backup and mirror, into qcow2 and raw, each a point-in-time copy taken
/// while the guest writes; libvirt creates each target.
#[test]
fn backup_and_mirror_into_qcow2_and_raw() {
    let dir = shared_dir();
    // 512 MiB of data, then records 2 MiB apart over the next 128 MiB: the
    // copy reaches the records only after the guest has written many of
    // them again, so a copy that followed the guest would mix requests.
    // libvirt's backup has no bandwidth of its own and livesnap sets it
    // right after the start; QEMU's first burst of copies runs at full
    // speed, and the data in front takes it.
    let disk = raw_disk(dir.path(), "disk.raw", 640 * MIB);
    qemu_io(
        disk.path.to_str().unwrap(),
        "raw",
        &["write -P 0x2d 0 512M"],
    );
    let g = GuestOpts {
        base: (512 * MIB / 4096) as u32,
        ..writer(512)
    };
    let mut dom = Domain::start(dir.path(), disk, g);
    dom.boot();
    let mut last = 0;
    for (method, format) in [
        ("backup", "qcow2"),
        ("backup", "raw"),
        ("mirror", "qcow2"),
        ("mirror", "raw"),
    ] {
        let target = dir.path().join(format!("{method}.{format}"));
        let (report, n) = checked_snapshot(
            &dom,
            &[
                "vda",
                target.to_str().unwrap(),
                "--method",
                method,
                "--format",
                format,
                "--speed",
                if method == "backup" { "64M" } else { "128M" },
                "--deadline",
                "120s",
            ],
        );
        assert_eq!(report["method"], method, "{report}");
        assert_eq!(report["target"]["created_via"], "libvirt", "{report}");
        assert!(n > last, "each snapshot is later than the one before");
        last = n;
        std::fs::remove_file(&target).unwrap();
    }
    check_disk_after(&mut dom);
}

/// A qcow2 disk over a raw base, as an OpenStack instance on a Glance
/// image: `--shallow` copies only the top layer into a qcow2 over the same
/// base; then Nova's own loop through libvirt's Python binding, recorded.
#[test]
fn shallow_mirror_and_novas_loop_on_a_qcow2_overlay() {
    let dir = shared_dir();
    let g = writer(128); // records over the first 32 MiB
    let base = dir.path().join("base.raw");
    sparse_file(&base, 64 * MIB);
    // The base's own data lies beyond the records, where the guest never writes.
    qemu_io(base.to_str().unwrap(), "raw", &["write -P 0x6b 32M 32M"]);
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top));
    let mut dom = Domain::start(
        dir.path(),
        DomainDisk {
            path: top,
            format: "qcow2".into(),
        },
        g,
    );
    dom.boot();
    let check_base = |image: &[u8], what: &str| {
        assert!(
            image[32 << 20..].iter().all(|&b| b == 0x6b),
            "{what}: the base's data is not seen through the copy's backing file"
        );
    };

    let target = dir.path().join("delta.qcow2");
    let (report, _) = checked_snapshot(
        &dom,
        &[
            "vda",
            target.to_str().unwrap(),
            "--shallow",
            "--method",
            "auto",
            "--speed",
            "2M",
            "--deadline",
            "120s",
        ],
    );
    assert_eq!(report["method"], "mirror", "auto with --shallow: {report}");
    assert_eq!(report["sync"], "top", "{report}");
    assert_eq!(report["target"]["created_via"], "local", "{report}");
    assert_eq!(
        report["target"]["backing"],
        base.to_str().unwrap(),
        "{report}"
    );
    check_base(&image_of(&report), "livesnap --shallow");
    let allocated = std::fs::metadata(&target).unwrap().len();
    assert!(
        allocated < 16 * MIB,
        "the delta holds {allocated} bytes: the base's 32 MiB were copied"
    );
    std::fs::remove_file(&target).unwrap();

    nova_loop(&dom, &base, dir.path());
    check_disk_after(&mut dom);
}

/// Nova's algorithm on this stack, bounded by the test: what it does is
/// printed; if it ended, its delta must be a point-in-time copy from its
/// abort, and either way the domain is left as it was.
fn nova_loop(dom: &Domain, base: &Path, dir: &Path) {
    let delta = dir.join("nova-delta.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(&delta));
    let disks = dom.disks();
    let script = Path::new(livesnap_testkit::NOVA_PY);
    let watch = dom.console.watch();
    let limit = 60;
    let (st, out, err) = run_within(
        Command::new("/usr/bin/python3")
            .arg(script)
            .args([URI, &dom.name, "vda"])
            .arg(&delta)
            .arg(limit.to_string()),
        Duration::from_secs(limit + 60),
    );
    assert!(
        st.success(),
        "nova.py failed ({st}; python3-libvirt installed?): {out}{err}"
    );
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("libvirt: Nova's loop on this stack: {r}");
    if r["converged"] == true {
        let report = serde_json::json!({"point_in_time": {
            "start_monotonic_ns": r["abort_start_ns"], "end_monotonic_ns": r["abort_end_ns"]}});
        let (r0, r1) = watch.bracket(&report, WRITE_TIMEOUT);
        let image = read_image(&delta, "qcow2");
        let n = dom
            .guest
            .find_request(&image[..dom.guest.disk_bytes() as usize])
            .unwrap_or_else(|e| panic!("Nova's delta is not the disk after one request: {e}"))
            .expect("Nova's delta holds the guest's writes");
        assert!(
            r0 <= n && n <= r1 + 1,
            "Nova's delta is the disk after {n}, outside its abort's window [{r0}, {}]",
            r1 + 1
        );
        eprintln!("libvirt: Nova's delta is the disk after request {n} (abort window {r0}..{r1})");
    } else {
        // Its abort was asynchronous: give the job a bounded time to go.
        let deadline = Instant::now() + Duration::from_secs(30);
        while dom.virsh(&["dumpxml"], &[]).contains("<mirror") {
            assert!(
                Instant::now() < deadline,
                "Nova's copy did not go within 30 s of its abort"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(watch);
    dom.assert_as_it_was(&disks);
}

/// A failed snapshot's report: the exit code, and no target left.
fn failed(out: Out, code: i32, target: &Path) -> Value {
    let out = out.expect(code);
    let r = out.json();
    assert_eq!(r["result"], "failed", "{r}");
    assert!(
        target.symlink_metadata().is_err(),
        "the target {} is left: {r}",
        target.display()
    );
    let reason = r["reason"].as_str().unwrap();
    assert!(!reason.contains("LEFT BEHIND"), "{r}");
    r
}

fn failing_args<'a>(dom: &'a Domain, target: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "snapshot",
        "--libvirt",
        &dom.name,
        "--connect",
        URI,
        "vda",
        target,
        "--json",
        "--quiet",
    ];
    a.extend_from_slice(rest);
    a
}

/// A tmpfs of `size` at `path`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let (st, out, err) = run_within(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
                .arg("tmpfs")
                .arg(path),
            Duration::from_secs(30),
        );
        assert!(
            st.success(),
            "this test fills a small tmpfs to make the target fail and needs mount(8) as root: {out}{err}"
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The deadline (backup and mirror), SIGINT, a target whose file system
/// fills up (backup and mirror) and a freeze without a guest agent each end
/// with their exit code and leave the domain as it was, the target removed,
/// the guest writing on.
#[test]
fn failures_leave_the_domain_as_it_was() {
    let dir = shared_dir();
    // A 1 GiB disk: records over its first 16 MiB, and 64 MiB of data at
    // 128 MiB, so a copy at 1 MiB/s runs for a minute and a full target
    // fails with ENOSPC well after it started.
    let disk = raw_disk(dir.path(), "disk.raw", 1024 * MIB);
    qemu_io(
        disk.path.to_str().unwrap(),
        "raw",
        &["write -P 0x3c 128M 64M"],
    );
    // Mounted before the domain starts: QEMU runs in a mount namespace of
    // its own, which sees only what was mounted before.
    let small = dir.path().join("small");
    let _tmpfs = Tmpfs::mount(&small, "16M");
    let mut dom = Domain::start(dir.path(), disk, writer(64));
    dom.boot();
    let disks = dom.disks();

    for method in ["mirror", "backup"] {
        let target = dir.path().join(format!("deadline-{method}.qcow2"));
        let t = target.to_str().unwrap();
        let started = Instant::now();
        let out = livesnap(
            &failing_args(
                &dom,
                t,
                &["--method", method, "--speed", "1M", "--deadline", "3s"],
            ),
            RUN_LIMIT,
        );
        let r = failed(out, 4, &target);
        eprintln!(
            "libvirt: {method} deadline: {} after {:?}",
            r["reason"],
            started.elapsed()
        );
        dom.assert_as_it_was(&disks);
    }

    let target = dir.path().join("sigint.qcow2");
    let child = spawn_livesnap(&failing_args(
        &dom,
        target.to_str().unwrap(),
        &["--method", "mirror", "--speed", "1M"],
    ));
    // Once the copy runs (its target exists), interrupt it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while target.symlink_metadata().is_err() {
        assert!(Instant::now() < deadline, "the block copy never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: a plain kill(2) of the child this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let r = failed(wait_out(child, RUN_LIMIT), 5, &target);
    eprintln!("libvirt: SIGINT: {}", r["reason"]);
    dom.assert_as_it_was(&disks);

    for (method, format) in [("backup", "qcow2"), ("mirror", "raw")] {
        let target = small.join(format!("full-{method}.{format}"));
        let out = livesnap(
            &failing_args(
                &dom,
                target.to_str().unwrap(),
                &["--method", method, "--format", format, "--deadline", "120s"],
            ),
            RUN_LIMIT,
        );
        let r = failed(out, 3, &target);
        eprintln!("libvirt: {method} into a full file system: {}", r["reason"]);
        dom.assert_as_it_was(&disks);
    }

    // The test guest runs no agent: the freeze fails before anything is copied.
    let target = dir.path().join("freeze.qcow2");
    let out = livesnap(
        &failing_args(
            &dom,
            target.to_str().unwrap(),
            &["--deadline", "60s", "--freeze-hold", "5s", "--freeze"],
        ),
        RUN_LIMIT,
    );
    let r = failed(out, 6, &target);
    eprintln!("libvirt: freeze without an agent: {}", r["reason"]);
    dom.assert_as_it_was(&disks);

    // The records the guest reported are all on its disk.
    dom.destroy();
    let last = dom.last_written().unwrap();
    let mut head = vec![0u8; 16 * MIB as usize];
    let f = std::fs::File::open(&dom.disk.path).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
    check_final(&dom.guest, &head[..dom.guest.disk_bytes() as usize], last);
}

/// The other verbs through libvirt: info, jobs, watch, and a cancel that
/// refuses to abandon a copy before READY unless forced.
#[test]
fn verbs_through_libvirt() {
    let dir = shared_dir();
    let disk = raw_disk(dir.path(), "disk.raw", 256 * MIB);
    qemu_io(
        disk.path.to_str().unwrap(),
        "raw",
        &["write -P 0x11 64M 64M"],
    );
    let dom = Domain::start(dir.path(), disk, writer(16));
    dom.boot();
    let disks = dom.disks();
    let name = dom.name.clone();
    let at = |verb: &'static str| vec![verb, "--libvirt", name.as_str(), "--connect", URI];

    let info = livesnap(&[at("info"), vec!["--json"]].concat(), RUN_LIMIT)
        .expect(0)
        .json();
    assert_eq!(info["backup (virDomainBackupBegin)"], "yes", "{info}");
    assert_eq!(info["block copy with synchronous writes"], "yes", "{info}");
    assert!(
        info["disk vda"].as_str().unwrap().contains("disk.raw"),
        "{info}"
    );
    let none = livesnap(&at("jobs"), RUN_LIMIT).expect(0);
    assert!(none.stdout.contains("no jobs"), "{none:?}");

    // A slow copy to have a job to look at; `watch` sees its events.
    let watch =
        spawn_livesnap(&[at("watch"), vec!["--json", "--for", "60s", "--count", "3"]].concat());
    let target = dir.path().join("verbs.qcow2");
    let snap = spawn_livesnap(
        &[
            at("snapshot"),
            vec![
                "vda",
                target.to_str().unwrap(),
                "--method",
                "mirror",
                "--speed",
                "1M",
                "--json",
                "--quiet",
            ],
        ]
        .concat(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let jobs = loop {
        let j = livesnap(&[at("jobs"), vec!["--json"]].concat(), RUN_LIMIT)
            .expect(0)
            .json();
        if j.as_array().is_some_and(|a| !a.is_empty()) {
            break j;
        }
        assert!(Instant::now() < deadline, "no job seen: {j}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(jobs[0]["id"], "vda", "{jobs}");
    assert_eq!(jobs[0]["type"], "copy", "{jobs}");
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    // Not READY: a plain cancel would abandon the copy.
    let refused = livesnap(&[at("cancel"), vec!["vda"]].concat(), RUN_LIMIT).expect(1);
    assert!(refused.stderr.contains("not ready"), "{refused:?}");
    livesnap(&[at("cancel"), vec!["vda", "--force"]].concat(), RUN_LIMIT).expect(0);
    // The snapshot sees its job ended by someone else: a job failure, cleaned up.
    let r = failed(wait_out(snap, RUN_LIMIT), 3, &target);
    eprintln!("libvirt: snapshot whose job was cancelled: {}", r["reason"]);
    // The early abort pauses the guest around it (QEMU 10.0 can crash on a
    // write-blocking copy cancelled before READY under guest writes):
    // suspended, the copy's end, resumed.
    let w = wait_out(watch, RUN_LIMIT).expect(0);
    let evs: Vec<Value> = w
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<String> = evs
        .iter()
        .map(|e| match e["event"].as_str() {
            Some("LIFECYCLE") => format!("LIFECYCLE {}", e["data"]["event"].as_str().unwrap_or("")),
            n => n.unwrap_or("").to_string(),
        })
        .collect();
    assert_eq!(
        names,
        ["LIFECYCLE suspended", "BLOCK_JOB", "LIFECYCLE resumed"],
        "{}",
        w.stdout
    );
    assert_eq!(evs[1]["data"]["disk"], "vda", "{}", w.stdout);
    dom.assert_as_it_was(&disks);
}

/// The domain's checkpoints, by name.
fn checkpoints(dom: &Domain) -> Vec<String> {
    dom.virsh(&["checkpoint-list"], &["--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// A backup chain through libvirt checkpoints while the guest writes: a
/// full backup cut short by its deadline leaves DIR empty and no
/// checkpoint; then full + incremental + incremental, each restored image
/// exactly the disk after one guest request inside its window, each
/// incremental no more than the guest's clusters, only the newest
/// checkpoint left, and verify passing.
#[test]
fn backup_chain_through_checkpoints() {
    use livesnap_testkit::chain::{dir_state, restore};
    let dir = shared_dir();
    let path = dir.path().join("disk.qcow2");
    livesnap_testkit::create_image(&path, "qcow2", 512 * MIB);
    // Data the guest never touches, enough that a full backup runs for
    // seconds whatever the speed (QEMU's first burst ignores a speed set
    // after the start, and libvirt's backup has no speed of its own).
    qemu_io(
        path.to_str().unwrap(),
        "qcow2",
        &["write -P 0x3c 128M 256M"],
    );
    let g = writer(64);
    let mut dom = Domain::start(
        dir.path(),
        DomainDisk {
            path,
            format: "qcow2".into(),
        },
        g,
    );
    dom.boot();
    let disks = dom.disks();
    let chain = dir.path().join("chain");
    let c = chain.to_str().unwrap();
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = ["backup", "--libvirt", &dom.name, "--connect", URI, "vda", c]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--json", "--quiet"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    let a = args(&["--speed", "1M", "--deadline", "3s"]);
    let r = livesnap(&a.iter().map(String::as_str).collect::<Vec<_>>(), RUN_LIMIT)
        .expect(4)
        .json();
    let reason = r["reason"].as_str().unwrap();
    // Whether the job was still copying or the backup was being checked:
    // either way the checkpoint libvirt made must go again.
    assert!(
        reason.contains("while the backup job ran") || reason.contains("while committing"),
        "{r}"
    );
    assert!(!reason.contains("LEFT BEHIND"), "{r}");
    assert!(
        !chain.exists(),
        "the directory the run created is left: {r}"
    );
    assert!(checkpoints(&dom).is_empty(), "{:?}", checkpoints(&dom));
    dom.assert_as_it_was(&disks);

    let mut last = 0;
    let mut i = 0;
    for step in 0..3 {
        if step == 2 {
            // A deadline that cuts an incremental short, in its job or its
            // commit: the checkpoint it made goes, the previous one keeps
            // tracking, and the next incremental (checked below) misses
            // nothing. Should the run beat the deadline, it is a backup.
            let before = dir_state(&chain);
            let kept = checkpoints(&dom);
            let a = args(&["--deadline", "400ms"]);
            let out = livesnap(&a.iter().map(String::as_str).collect::<Vec<_>>(), RUN_LIMIT);
            let r = out.json();
            match out.code() {
                4 => {
                    assert!(
                        !r["reason"].as_str().unwrap().contains("LEFT BEHIND"),
                        "{r}"
                    );
                    assert!(dir_state(&chain) == before, "the deadline changed DIR: {r}");
                    assert_eq!(checkpoints(&dom), kept, "{r}");
                    eprintln!("libvirt: incremental cut short: {}", r["reason"]);
                }
                0 => {
                    eprintln!("libvirt: the 0.4 s deadline did not cut the incremental: {r}");
                    i += 1;
                }
                c => panic!("exit code {c}: {r}"),
            }
            dom.assert_as_it_was(&disks);
        }
        let watch = dom.console.watch();
        let r_start = dom.last_written().unwrap();
        let t0 = Instant::now();
        let a = args(&["--deadline", "120s"]);
        let report = livesnap(&a.iter().map(String::as_str).collect::<Vec<_>>(), RUN_LIMIT)
            .expect(0)
            .json();
        let (r0, r1) = watch.bracket(&report, WRITE_TIMEOUT);
        drop(watch);
        let r_done = dom.wait_written(
            dom.last_written().unwrap() + u64::from(g.blocks) / 2,
            WRITE_TIMEOUT,
        );
        assert_eq!(report["index"], i, "{report}");
        assert_eq!(
            report["kind"],
            if i == 0 { "full" } else { "incremental" },
            "{report}"
        );
        let img = restore(&chain, i, &dir.path().join("restored.raw"));
        let n = check_snapshot(
            &g,
            &img[..g.disk_bytes() as usize],
            &Taken {
                how: "livesnap backup --libvirt",
                r_start,
                r0,
                r1,
                r_done,
                at: t0 - dom.started,
                took: t0.elapsed(),
            },
        );
        assert!(n > last, "backup {i} is not later than the one before");
        last = n;
        assert!(
            img[128 * MIB as usize..384 * MIB as usize]
                .iter()
                .all(|&b| b == 0x3c),
            "backup {i} lost the disk's data"
        );
        if i > 0 {
            let bound = u64::from(g.blocks) * (64 << 10);
            assert!(
                report["bytes_copied"].as_u64().unwrap() <= bound,
                "incremental {i} copied more than the guest's {bound} bytes of clusters: {report}"
            );
        }
        assert_eq!(
            checkpoints(&dom),
            [report["bitmap"].as_str().unwrap()],
            "only the newest checkpoint is kept"
        );
        dom.assert_as_it_was(&disks);
        i += 1;
    }
    let v = livesnap(&["verify", c, "--json"], RUN_LIMIT)
        .expect(0)
        .json();
    assert_eq!(v["result"], "ok", "{v}");
    check_disk_after(&mut dom);
}
