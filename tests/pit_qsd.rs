//! The point-in-time checker (`harness::pit`) validated two ways: synthetic
//! logs and images show the verifier rejects what it must, and the block-job
//! scenarios pass against qemu-storage-daemon, whose jobs are the reference.
//! `tests/pit_livesnapd.rs` can run the same scenarios against livesnapd.

use livesnap_testkit as harness;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::pit::*;
use harness::{sparse_file, Qsd};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// The verifier on synthetic histories.

/// 8 blocks of 512 bytes, 2 writers; instants are `base + ms`.
struct Synth {
    layout: Layout,
    base: Instant,
    log: WriteLog,
    seq: [u64; 2],
}

impl Synth {
    fn new() -> Synth {
        let layout = Layout::new(512, 8, 2, 0xfeed);
        Synth {
            layout,
            base: Instant::now(),
            log: WriteLog {
                layout,
                writes: Vec::new(),
                errors: Vec::new(),
            },
            seq: [0; 2],
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Logs a write to `block` sent at `sent` ms and acknowledged at `acked` ms; returns its seq.
    fn write(&mut self, block: u64, sent: u64, acked: Option<u64>) -> u64 {
        let writer = self.layout.owner(block);
        self.seq[writer as usize] += 1;
        let seq = self.seq[writer as usize];
        self.log.writes.push(WriteRecord {
            writer,
            seq,
            block,
            sent: self.at(sent),
            acked: acked.map(|a| self.at(a)),
        });
        seq
    }

    /// An image whose block b holds `held[b]`: `None` for the initial content, else that seq.
    fn image(&self, held: &[Option<u64>]) -> Vec<u8> {
        let mut img = Vec::new();
        for (b, h) in held.iter().enumerate() {
            let b = b as u64;
            img.extend(match h {
                None => block_bytes(&self.layout, INITIAL, 0, b),
                Some(s) => block_bytes(&self.layout, self.layout.owner(b), *s, b),
            });
        }
        img
    }

    fn verify(&self, img: &[u8], t0: u64, t1: u64) -> Result<PitReport, PitError> {
        verify_point_in_time(&self.log, img, self.at(t0), self.at(t1))
    }
}

/// Block 0 is written at 10..20 ms and 50..60 ms, block 1 at 30..40 ms; the
/// other blocks stay initial. Returns (seqs of block 0, seq of block 1).
fn two_block_history(s: &mut Synth) -> ([u64; 2], u64) {
    let a = s.write(0, 10, Some(20));
    let c = s.write(1, 30, Some(40));
    let b = s.write(0, 50, Some(60));
    ([a, b], c)
}

#[test]
fn verifier_accepts_a_copy_from_one_instant() {
    let mut s = Synth::new();
    let ([a, _], c) = two_block_history(&mut s);
    // The disk between 40 and 50 ms: block 0 holds its first write, block 1 its only one.
    let mut held = vec![None; 8];
    held[0] = Some(a);
    held[1] = Some(c);
    let img = s.image(&held);
    let r = s.verify(&img, 0, 100).unwrap_or_else(|e| panic!("{e}"));
    // T >= 30 (block 1's write was sent) and T < 60 (block 0's second write not yet acknowledged).
    assert_eq!((r.from, r.until), (s.at(30), s.at(60)), "{r}");
    assert_eq!((r.carried, r.changed_after, r.pinning), (2, 0, 2), "{r}");
    // A write in flight may or may not be in the copy: both outcomes pass.
    held[1] = None;
    s.verify(&s.image(&held), 35, 35)
        .unwrap_or_else(|e| panic!("{e}"));
    held[1] = Some(c);
    s.verify(&s.image(&held), 35, 35)
        .unwrap_or_else(|e| panic!("{e}"));
    // The untouched disk is a copy from any instant before the first acknowledgement.
    s.verify(&s.image(&[None; 8]), 0, 19)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn verifier_rejects_a_mix_of_two_instants() {
    let mut s = Synth::new();
    let ([a, b], c) = two_block_history(&mut s);
    // Block 0 as before 20 ms (still initial), block 1 as after 30 ms (holding its write).
    let mut held = vec![None; 8];
    held[1] = Some(c);
    let img = s.image(&held);
    let e = s.verify(&img, 0, 100).unwrap_err();
    match &e {
        PitError::Inconsistent { blocks, .. } => assert_eq!(blocks, &vec![1, 0], "{e}"),
        _ => panic!("wrong verdict: {e}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("block 1") && msg.contains("block 0"), "{msg}");
    // Block 0 from after 50 ms, block 1 initial though its write was acknowledged at 40.
    let mut held = vec![None; 8];
    held[0] = Some(b);
    assert!(s.verify(&s.image(&held), 0, 100).is_err());
    // Block 0 as between 20 and 60 ms, block 1 as before 40 ms: both fit 20..40 ms.
    held[0] = Some(a);
    s.verify(&s.image(&held), 0, 100)
        .unwrap_or_else(|e| panic!("{e}"));
    // And block 0's first write with block 1 unwritten does not fit a window from 45 ms.
    assert!(s.verify(&s.image(&held), 45, 100).is_err());
    held[0] = Some(b);
    held[1] = Some(c);
    s.verify(&s.image(&held), 0, 100)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn verifier_rejects_a_consistent_copy_from_outside_the_window() {
    let mut s = Synth::new();
    let ([a, b], c) = two_block_history(&mut s);
    let mut held = vec![None; 8];
    held[0] = Some(a);
    held[1] = Some(c);
    let img = s.image(&held);
    // Consistent for T in [30, 60) only.
    s.verify(&img, 55, 70).unwrap_or_else(|e| panic!("{e}"));
    let e = s.verify(&img, 0, 25).unwrap_err();
    assert!(e.to_string().contains("after the window"), "{e}");
    let e = s.verify(&img, 60, 90).unwrap_err();
    assert!(e.to_string().contains("T < that"), "{e}");
    // Holding everything at 100 ms is not a copy from a window ending at 55.
    held[0] = Some(b);
    assert!(s.verify(&s.image(&held), 0, 45).is_err());
}

#[test]
fn verifier_rejects_garbage_zeroes_torn_and_foreign_blocks() {
    let mut s = Synth::new();
    let ([a, b], c) = two_block_history(&mut s);
    let mut held = vec![None; 8];
    held[0] = Some(a);
    held[1] = Some(c);
    let good = s.image(&held);
    let bs = s.layout.block_size;
    let unknown = |img: &[u8]| match s.verify(img, 0, 100) {
        Err(PitError::Unknown { block, detail }) => (block, detail),
        r => panic!("expected an unknown block, got {r:?}"),
    };
    // A never-copied (zero) block.
    let mut img = good.clone();
    img[5 * bs..6 * bs].fill(0);
    assert_eq!(unknown(&img).0, 5);
    // One flipped byte in the middle of a block.
    let mut img = good.clone();
    img[3 * bs + 200] ^= 1;
    let (blk, detail) = unknown(&img);
    assert_eq!(blk, 3, "{detail}");
    assert!(detail.contains("torn"), "{detail}");
    // Half old, half new: a torn write.
    let mut img = good.clone();
    img[bs / 2..bs].copy_from_slice(&block_bytes(&s.layout, 0, b, 0)[bs / 2..]);
    let (blk, detail) = unknown(&img);
    assert_eq!(blk, 0, "{detail}");
    assert!(detail.contains("torn"), "{detail}");
    // Block 2's content written at block 4's place.
    let mut img = good.clone();
    let from2 = img[2 * bs..3 * bs].to_vec();
    img[4 * bs..5 * bs].copy_from_slice(&from2);
    assert_eq!(unknown(&img).0, 4);
    // A write the log never sent.
    let mut img = good.clone();
    img[6 * bs..7 * bs].copy_from_slice(&block_bytes(&s.layout, 0, 99, 6));
    let (blk, detail) = unknown(&img);
    assert_eq!(blk, 6);
    assert!(detail.contains("never sent"), "{detail}");
    // Content of another run.
    let mut img = good.clone();
    img[7 * bs..8 * bs].copy_from_slice(&block_bytes(&s.layout.with_tag(1), INITIAL, 0, 7));
    let (blk, detail) = unknown(&img);
    assert_eq!(blk, 7);
    assert!(detail.contains("another run"), "{detail}");
    // Short image.
    assert!(matches!(
        s.verify(&good[..bs], 0, 100),
        Err(PitError::Size { .. })
    ));
}

#[test]
fn verifier_treats_a_failed_write_as_maybe_landed() {
    let mut s = Synth::new();
    let a = s.write(0, 10, Some(20));
    let f = s.write(0, 30, None);
    let n = s.write(0, 50, Some(60));
    let one = |h: u64| {
        let mut held = vec![None; 8];
        held[0] = Some(h);
        s.image(&held)
    };
    // Holding the write before the failed one, T < 60: the failure does not bound it.
    let r = s.verify(&one(a), 0, 100).unwrap();
    assert_eq!(r.until, s.at(60));
    // Holding the failed write is possible from 30 on.
    let r = s.verify(&one(f), 0, 100).unwrap();
    assert_eq!((r.from, r.until), (s.at(30), s.at(60)));
    s.verify(&one(n), 0, 100).unwrap();
    assert!(s.verify(&one(n), 0, 45).is_err());
}

#[test]
fn completeness_check_finds_a_lost_acknowledged_write() {
    let mut s = Synth::new();
    let ([_, b], c) = two_block_history(&mut s);
    let mut held = vec![None; 8];
    held[0] = Some(b);
    held[1] = Some(c);
    check_source_complete(&s.log, &s.image(&held)).unwrap_or_else(|e| panic!("{e}"));
    held[1] = None;
    let e = check_source_complete(&s.log, &s.image(&held)).unwrap_err();
    match &e {
        PitError::Inconsistent { blocks, .. } => assert_eq!(blocks, &vec![1], "{e}"),
        _ => panic!("wrong verdict: {e}"),
    }
    // An unanswered last write may or may not be there.
    s.write(2, 70, None);
    held[1] = Some(c);
    check_source_complete(&s.log, &s.image(&held)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn nbd_urls_parse() {
    assert_eq!(
        NbdAddr::parse("nbd+unix:///disk?socket=/tmp/a.sock"),
        NbdAddr {
            addr: "unix:/tmp/a.sock".into(),
            export: "disk".into()
        }
    );
    assert_eq!(
        NbdAddr::parse("nbd://127.0.0.1:1234/d0"),
        NbdAddr {
            addr: "127.0.0.1:1234".into(),
            export: "d0".into()
        }
    );
    assert_eq!(NbdAddr::parse("nbd://localhost").addr, "localhost:10809");
}

// ---------------------------------------------------------------------------
// The scenarios against qemu-storage-daemon.

const DISK: u64 = 64 * MIB;

/// qsd exporting a fresh 64 MiB raw image as `disk` on a unix socket in `dir`.
fn qsd(dir: &Path) -> (Qsd, String) {
    let img = dir.join("source.img");
    sparse_file(&img, DISK);
    let sock = dir.join("nbd.sock");
    let args: Vec<String> = [
        format!(
            "--blockdev=driver=file,node-name=file0,filename={}",
            img.display()
        ),
        "--blockdev=driver=raw,node-name=disk,file=file0".into(),
        format!("--nbd-server=addr.type=unix,addr.path={}", sock.display()),
        "--export=type=nbd,id=e0,node-name=disk,name=disk,writable=on".into(),
    ]
    .into();
    let q = Qsd::start(&args);
    harness::wait_until(Duration::from_secs(10), "qsd NBD socket", || sock.exists());
    (q, format!("nbd+unix:///disk?socket={}", sock.display()))
}

fn run_on_qsd(
    scenario: fn(&mut PitDaemon, &PitOpts) -> ScenarioReport,
    opts: &PitOpts,
) -> ScenarioReport {
    let dir = tempfile::tempdir().unwrap();
    let (q, url) = qsd(dir.path());
    let mut qmp = q.qmp();
    let mut d = PitDaemon {
        qmp: &mut qmp,
        url,
        node: "disk".into(),
        source_file: Some((dir.path().join("source.img"), "raw".into())),
        dir: dir.path().to_path_buf(),
    };
    let started = Instant::now();
    let r = scenario(&mut d, opts);
    eprintln!("qsd {r} [{:.2} s]", started.elapsed().as_secs_f64());
    r
}

#[test]
fn qsd_backup_is_a_point_in_time_copy() {
    let r = run_on_qsd(scenario_backup, &PitOpts::new(DISK));
    assert!(r.pit.is_some());
}

#[test]
fn qsd_mirror_soft_cancel_is_a_point_in_time_copy() {
    let r = run_on_qsd(scenario_mirror_cancel, &PitOpts::new(DISK));
    assert!(r.pit.is_some());
}

#[test]
fn qsd_mirror_complete_keeps_every_write() {
    let r = run_on_qsd(scenario_mirror_complete, &PitOpts::new(DISK));
    assert!(r.pit.is_some());
}

#[test]
fn qsd_backup_to_qcow2_is_a_point_in_time_copy() {
    let mut o = PitOpts::new(DISK);
    o.target_format = "qcow2".into();
    o.writers.seed = 7;
    let r = run_on_qsd(scenario_backup, &o);
    assert!(r.pit.is_some());
}

/// The verifier on a live disk: reading the export in two halves while the
/// writers go on is no point-in-time copy, and must be rejected.
#[test]
fn qsd_plain_copy_under_writes_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_q, url) = qsd(dir.path());
    let layout = Layout::new(4096, DISK / 4096, 4, 42);
    prefill(&url, &layout);
    let w = Writers::start(&[&url], &layout, &WriterOpts::default());
    w.wait_acked(1000, Duration::from_secs(60));
    let half = DISK / 2;
    let t0 = Instant::now();
    let mut copy = read_export_at(&url, 0, half);
    w.wait_acked(w.acked() + 1000, Duration::from_secs(60));
    copy.extend(read_export_at(&url, half, half));
    let t1 = Instant::now();
    let log = w.stop();
    log.assert_no_failures();
    let e = verify_point_in_time(&log, &copy, t0, t1).unwrap_err();
    eprintln!("plain copy rejected: {e}");
    let PitError::Inconsistent { blocks, .. } = &e else {
        panic!("wrong verdict: {e}");
    };
    // The conflict is between a block of each half.
    assert!(blocks.iter().any(|&b| b < layout.blocks / 2), "{e}");
    assert!(blocks.iter().any(|&b| b >= layout.blocks / 2), "{e}");
    check_source_complete(&log, &read_export(&url, DISK)).unwrap_or_else(|e| panic!("{e}"));
}

/// Paced writers never run ahead of their rate, and counting works while they run.
#[test]
fn qsd_writers_keep_their_pace() {
    let dir = tempfile::tempdir().unwrap();
    let (_q, url) = qsd(dir.path());
    let layout = Layout::new(4096, 1024, 4, 5);
    prefill(&url, &layout);
    let rate = 2000.0;
    let opts = WriterOpts {
        rate: Some(rate),
        ..WriterOpts::default()
    };
    let start = Instant::now();
    let w = Writers::start(&[&url, &url], &layout, &opts);
    w.wait_acked(300, Duration::from_secs(30));
    let log = w.stop();
    let elapsed = start.elapsed().as_secs_f64();
    log.assert_no_failures();
    // Each writer may send its first write at once, then one per 1/(rate/4) s.
    let most = (rate * elapsed) as usize + 4;
    assert!(
        log.writes.len() <= most,
        "{} writes in {elapsed:.3} s at {rate}/s",
        log.writes.len()
    );
    assert!(log.writes.len() >= 300);
    check_source_complete(&log, &read_export(&url, layout.size()))
        .unwrap_or_else(|e| panic!("{e}"));
}
