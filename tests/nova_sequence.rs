//! OpenStack Nova's live-snapshot loop, unchanged, against livesnapd: a
//! `blockdev-mirror` with QEMU's default arguments (no `copy-mode`) on an
//! O_DIRECT disk under four writers, `query-block-jobs` polled every 0.5 s
//! until `offset == len != 0` and READY, then a soft `block-job-cancel`
//! (Nova's abort) or `block-job-complete` (libvirt's pivot). livesnapd runs
//! such a mirror as `copy-mode: auto`, so the loop ends and the end is
//! bounded; the copy is the disk at one instant between the command and
//! its event. The same loop against qemu-storage-daemon is the contrast:
//! what it does there is printed, not judged (it depends on how fast the
//! machine copies against how fast it writes).

use livesnap_testkit as harness;

use std::time::{Duration, Instant};

use harness::disk::{DiskDaemon, Kind};
use harness::pit::{
    add_image_node, end_mirror_checked, prefill, wait_job_event, Layout, MirrorEnd, MirrorRig,
    WriterOpts, Writers,
};
use harness::{sparse_file, Qmp};
use serde_json::json;

const DISK: u64 = 64 << 20;

/// Nova's poll interval.
const POLL: Duration = Duration::from_millis(500);

/// How long livesnapd may take to let Nova's loop see `offset == len`: the
/// copy of 64 MiB plus `auto`'s patience, with room for a loaded machine.
/// Past it the test fails and says what the job reported.
const CONVERGE_LIMIT: Duration = Duration::from_secs(90);

/// A correctness bound on the end (cancel or complete to its event), not a
/// speed target: the documented bound is `attempts × hold` (0.6 s) plus
/// copying what was dirty, and the figures printed are well under a second;
/// the margin is for a loaded machine.
const END_BOUND: Duration = Duration::from_secs(5);

/// How long the contrast gives qemu-storage-daemon.
const QSD_LIMIT: Duration = Duration::from_secs(20);

/// What Nova's loop saw.
struct Polled {
    /// How long until `offset == len != 0` and READY, if that came.
    converged: Option<Duration>,
    polls: u32,
    /// The last `query-block-jobs` entry of the job.
    last: serde_json::Value,
}

/// Nova's `while not dev.is_job_complete(): time.sleep(0.5)`, bounded by `limit`.
fn poll_like_nova(qmp: &mut Qmp, job: &str, limit: Duration) -> Polled {
    let start = Instant::now();
    let mut polls = 0;
    loop {
        std::thread::sleep(POLL);
        polls += 1;
        let jobs = qmp.ok("query-block-jobs", json!({}));
        let j = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["device"] == job)
            .unwrap_or_else(|| panic!("job {job} vanished while Nova polled: {jobs}"))
            .clone();
        let (cur, end) = (j["offset"].as_u64().unwrap(), j["len"].as_u64().unwrap());
        if end != 0 && cur == end && j["ready"] == true {
            return Polled {
                converged: Some(start.elapsed()),
                polls,
                last: j,
            };
        }
        if start.elapsed() >= limit {
            return Polled {
                converged: None,
                polls,
                last: j,
            };
        }
    }
}

/// Starts `kind` on an O_DIRECT image of `format`, prefilled, with a target
/// node, four writers at full speed and the mirror started with QEMU's
/// default arguments.
fn start(kind: Kind, format: &str) -> (DiskDaemon, Qmp, Layout, Writers, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("disk.{format}"));
    if format == "raw" {
        sparse_file(&image, DISK);
    } else {
        harness::run(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&image)
                .arg(DISK.to_string()),
        );
    }
    let d = DiskDaemon::start_with(kind, dir, &image, format, true);
    let mut qmp = d.qmp();
    let layout = Layout::new(4096, DISK / 4096, 4, 0x0a0a ^ DISK);
    prefill(&d.url, &layout);
    let target = d.path("copy.raw");
    add_image_node(&mut qmp, "copy", &target, "raw", DISK);
    let w = Writers::start(&[d.url.as_str()], &layout, &WriterOpts::default());
    w.wait_acked(2000, Duration::from_secs(60));
    // Nova through libvirt: no copy-mode, no speed; QEMU's defaults.
    qmp.ok(
        "blockdev-mirror",
        json!({"job-id": "nova", "device": "disk", "target": "copy", "sync": "full"}),
    );
    (d, qmp, layout, w, target)
}

/// The whole sequence on livesnapd, ended by a soft cancel (Nova) or a pivot (libvirt's).
fn livesnapd_sequence(format: &str, end: MirrorEnd) {
    let (d, mut qmp, _layout, w, target) = start(Kind::Livesnapd, format);
    let p = poll_like_nova(&mut qmp, "nova", CONVERGE_LIMIT);
    let waited = p.converged.unwrap_or_else(|| {
        panic!(
            "Nova's loop never saw offset == len on livesnapd within {CONVERGE_LIMIT:?} ({} polls); last: {}",
            p.polls, p.last
        )
    });
    // The READY event came too; the end is judged by the events after it.
    wait_job_event(&mut qmp, "nova", "BLOCK_JOB_READY", Duration::from_secs(10));
    eprintln!(
        "livesnapd {format} {end:?}: Nova's loop saw offset == len after {waited:?} ({} polls, {})",
        p.polls, p.last
    );
    let mut rig = MirrorRig {
        qmp: &mut qmp,
        url: &d.url,
        job: "nova",
        target: ("copy", &target),
        source: (format == "raw").then_some(d.image.as_path()),
    };
    let took = end_mirror_checked(&mut rig, end, w);
    assert!(
        took < END_BOUND,
        "the {end:?} took {took:?}, over the bound {END_BOUND:?}"
    );
}

#[test]
fn nova_loop_with_default_arguments_ends_raw() {
    livesnapd_sequence("raw", MirrorEnd::Cancel);
}

#[test]
fn nova_loop_with_default_arguments_ends_qcow2() {
    livesnapd_sequence("qcow2", MirrorEnd::Cancel);
}

#[test]
fn libvirt_pivot_with_default_arguments_ends() {
    livesnapd_sequence("raw", MirrorEnd::Complete);
}

/// The same loop against qemu-storage-daemon, for the record: a background
/// mirror there may or may not converge, depending on this machine. What
/// is checked is what must hold either way: the writers never fail, and a
/// force cancel ends the job.
#[test]
fn nova_loop_against_qsd_is_the_contrast() {
    let (_d, mut qmp, _layout, w, _target) = start(Kind::Qsd, "raw");
    let p = poll_like_nova(&mut qmp, "nova", QSD_LIMIT);
    match p.converged {
        Some(t) => eprintln!(
            "qemu-storage-daemon: Nova's loop saw offset == len after {t:?} ({} polls) on this run",
            p.polls
        ),
        None => eprintln!(
            "qemu-storage-daemon: Nova's loop did not end within {QSD_LIMIT:?} ({} polls); last: {}",
            p.polls, p.last
        ),
    }
    let t0 = Instant::now();
    qmp.ok("block-job-cancel", json!({"device": "nova", "force": true}));
    let ended = loop {
        let ev = qmp
            .event(Duration::from_secs(30))
            .expect("no end event within 30 s of a force cancel");
        if ev["data"]["device"] == "nova"
            && matches!(
                ev["event"].as_str(),
                Some("BLOCK_JOB_CANCELLED" | "BLOCK_JOB_COMPLETED")
            )
        {
            break ev;
        }
    };
    eprintln!(
        "  force cancel: {} after {:?}",
        ended["event"],
        t0.elapsed()
    );
    let log = w.stop();
    log.assert_no_failures();
}
