//! Change tracking that survives `kill -9` (issue 11, "Crash"): rounds of
//! writers (FUA and flushes) on a qcow2 disk with a persistent bitmap, a
//! SIGKILL of livesnapd at a random moment, a restart, and an incremental
//! backup with that bitmap into a qcow2 overlay over the previous backup.
//! After every round:
//! - the reopened bitmap is consistent and recording (QEMU would call it
//!   inconsistent and force a full backup);
//! - the backup chain read through equals the source (`qemu-img compare`):
//!   the bitmap covered every write that reached the disk, whether its reply
//!   came back before the kill or not;
//! - the incremental copied no more than the part of the disk the writers
//!   write to (an eighth): small, not a full backup in disguise;
//! - `qemu-img check` finds no corruption in the source (leaks from the
//!   kill are allowed, as everywhere) and none at all in the backups.
//!
//! The full backup at the start is `qemu-img convert` plus `qemu-img bitmap
//! --clear` while no daemon runs: one instant. `LIVESNAP_BITMAP_CRASH_ROUNDS`
//! changes the number of rounds; the seed is printed and repeats with
//! `LIVESNAP_CRASH_SEED`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use livesnap_testkit as harness;

use harness::block::Rng;
use harness::pit::{prefill, wait_job_event, Layout, WriterOpts, Writers};
use harness::{run, run_status, Livesnapd};
use serde_json::{json, Value};

const SIZE: u64 = 64 << 20;
/// The writers stay in the first eighth of the disk, so an incremental
/// that copies more than that copied what did not change.
const WRITTEN: u64 = SIZE / 8;
const BLOCK: usize = 4096;
const BITMAP: &str = "crash";
const WAIT: Duration = Duration::from_secs(120);

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-img check`: no corruption (exit 0, or 3 for leaks when allowed).
fn check(img: &Path, allow_leaks: bool, ctx: &str) {
    let (st, out, err) =
        run_status(Command::new("qemu-img").args(["check", "-f", "qcow2", img.to_str().unwrap()]));
    let ok = st.code() == Some(0) || (allow_leaks && st.code() == Some(3));
    assert!(
        ok,
        "{ctx}: qemu-img check {}: {st}\n{out}{err}",
        img.display()
    );
}

/// The source node's bitmap as `query-named-block-nodes` reports it.
fn bitmap_info(d: &Livesnapd) -> Value {
    let nodes = d.qmp().ok("query-named-block-nodes", json!({"flat": true}));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "disk")
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .find(|b| b["name"] == BITMAP)
        .unwrap_or_else(|| panic!("no bitmap {BITMAP} on disk: {nodes}"))
}

fn seed() -> u64 {
    std::env::var("LIVESNAP_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| harness::monotonic_ns() ^ u64::from(std::process::id()))
}

#[test]
fn incremental_backups_stay_exact_across_kill9() {
    let rounds: u64 = std::env::var("LIVESNAP_BITMAP_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let seed = seed();
    eprintln!("seed {seed} (LIVESNAP_CRASH_SEED={seed} repeats the random choices)");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("disk.qcow2");
    let src_s = src.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", src_s, &SIZE.to_string()]);
    qemu_img(&["bitmap", "--add", src_s, BITMAP]);
    let layout = Layout::new(BLOCK, WRITTEN / BLOCK as u64, 4, seed);
    {
        let d = Livesnapd::with_image(&src, &["--format", "qcow2"]);
        prefill(d.url(), &Layout::new(BLOCK, SIZE / BLOCK as u64, 4, seed));
        d.stop_with(libc::SIGTERM);
    }
    // The full backup: the disk and a clean bitmap at one instant.
    let mut prev = tmp.path().join("backup-0.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        src_s,
        prev.to_str().unwrap(),
    ]);
    qemu_img(&["bitmap", "--clear", src_s, BITMAP]);

    let started = Instant::now();
    let (mut acked, mut copied, mut in_flight, mut flushes) = (0u64, 0u64, 0u64, 0u64);
    for round in 1..=rounds {
        let ctx = format!("round {round} (LIVESNAP_CRASH_SEED={seed})");
        let d = Livesnapd::with_image(&src, &["--format", "qcow2"]);
        let opts = WriterOpts {
            queue_depth: 4,
            rate: None,
            seed: rng.next_u64(),
            fua: rng.below(2) == 0,
        };
        let w = Writers::start(&[d.url()], &layout.with_tag(rng.next_u64()), &opts);
        w.wait_acked(1 + rng.below(200), WAIT);
        // A flush now and then: what it covers is durable, the rest may be.
        if rng.below(2) == 0 && harness::pit::flush_export(d.url()) {
            flushes += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.below(150)));
        let status = d.stop_with(libc::SIGKILL);
        assert_eq!(
            status.code(),
            None,
            "{ctx}: livesnapd should die by SIGKILL"
        );
        let log = w.stop();
        acked += log.acked() as u64;
        in_flight += log.failed() as u64;
        check(&src, true, &ctx);

        let d = Livesnapd::with_image(&src, &["--format", "qcow2"]);
        let info = bitmap_info(&d);
        assert!(
            info.get("inconsistent").is_none() && info["recording"] == true,
            "{ctx}: bitmap after the kill: {info}"
        );
        let top = tmp.path().join(format!("backup-{round}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            prev.file_name().unwrap().to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ]);
        let mut qmp = d.qmp();
        qmp.ok(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": "target",
                "file": {"driver": "file", "filename": top.to_str().unwrap()},
            }),
        );
        qmp.ok(
            "blockdev-backup",
            json!({"job-id": "inc", "device": "disk", "target": "target",
                   "sync": "incremental", "bitmap": BITMAP}),
        );
        let (ev, _) = wait_job_event(&mut qmp, "inc", "BLOCK_JOB_COMPLETED", WAIT);
        let len = ev["data"]["len"].as_u64().unwrap_or(0);
        assert!(
            len <= WRITTEN,
            "{ctx}: the incremental copied {len} bytes, more than the {WRITTEN} written to"
        );
        copied += len;
        harness::pit::release_node(&mut qmp, "target", WAIT);
        d.stop_with(libc::SIGTERM);

        check(&top, false, &ctx);
        let (st, out, err) = run_status(Command::new("qemu-img").args([
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            src_s,
            top.to_str().unwrap(),
        ]));
        assert!(
            st.success(),
            "{ctx}: the backup chain differs from the disk: the bitmap missed a write\n{out}{err}"
        );
        prev = top;
    }
    eprintln!(
        "{rounds} rounds in {:.1?}: {acked} writes acknowledged, {flushes} flushes, \
         {in_flight} writes cut by the kill; incrementals copied {} MiB in all; every chain \
         equal to its disk",
        started.elapsed(),
        copied >> 20
    );
    assert!(acked >= rounds, "the writers hardly ran: {acked} writes");
}
