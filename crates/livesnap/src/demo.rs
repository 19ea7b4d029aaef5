//! `livesnap demo`: the seed problem and its fix, in one command.
//!
//! Starts a livesnapd inside this process on a fresh demo disk, and a
//! guest-like writer that writes faster than the copy may go. Then:
//! 1. the classic Nova algorithm (a mirror polled every 0.5 s until `cur ==
//!    end`, then an abort) on a background mirror, QEMU's default: under a
//!    short deadline it does not finish;
//! 2. the same loop, unchanged, with livesnapd's default copy mode: it ends,
//!    its abort within the completion bound, and its copy is checked;
//! 3. a live snapshot with `livesnap snapshot`, checked the same way.
//!
//! Each copy is checked against the writer's log: it must be exactly the
//! disk after one request N, with N inside its point-in-time window.
//! Everything (daemon, writer, files) is removed at the end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livesnap_block::{create_image, CreateOptions, ImageFormat};
use livesnap_nbd::client::NbdClient;
use serde_json::json;

use crate::endpoint::{Endpoint, CONNECT_TIMEOUT};
use crate::error::{Failure, Kind, Result};
use crate::signals::Interrupt;
use crate::snapshot::{self, EndpointArg, MethodArg};
use crate::target::CreateVia;
use crate::units::{bytes, monotonic_ns};

/// Bytes per record: one record per 4 KiB block.
const BLOCK: u64 = 4096;
/// Record magic.
const MAGIC: &[u8; 8] = b"LSDEMO01";
/// Request n writes block `n * STRIDE mod blocks`: with a power-of-two block
/// count any odd stride visits every block once per `blocks` requests, so the
/// blocks a request dirties are spread over the whole disk.
const STRIDE: u64 = 2_654_435_761;

/// What `livesnap demo` was asked.
pub struct DemoOptions {
    /// Demo disk size (rounded down to a power of two of 4 KiB blocks).
    pub size: u64,
    /// Job speed limit in bytes per second, for both Nova's mirror and the snapshot.
    pub speed: u64,
    /// How long the Nova algorithm is given.
    pub nova_deadline: Duration,
    /// Where to put the files (default: a fresh temporary directory).
    pub dir: Option<PathBuf>,
}

fn block_of(n: u64, blocks: u64) -> u64 {
    n.wrapping_mul(STRIDE) & (blocks - 1)
}

/// The first request that writes block `b` (the inverse of [`block_of`] on one period).
fn first_request(b: u64, blocks: u64) -> u64 {
    // STRIDE is odd, so it has an inverse modulo any power of two (Newton's iteration).
    let mut inv: u64 = STRIDE;
    for _ in 0..6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(STRIDE.wrapping_mul(inv)));
    }
    b.wrapping_mul(inv) & (blocks - 1)
}

fn record(n: u64, block: u64) -> Vec<u8> {
    let mut r = vec![0u8; BLOCK as usize];
    for (i, chunk) in r.chunks_mut(32).enumerate() {
        chunk[..8].copy_from_slice(MAGIC);
        chunk[8..16].copy_from_slice(&n.to_le_bytes());
        chunk[16..24].copy_from_slice(&block.to_le_bytes());
        let check = n ^ block.rotate_left(32) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        chunk[24..32].copy_from_slice(&check.to_le_bytes());
    }
    r
}

/// Which request block `b` holds: `Ok(None)` for never written (zeroes).
fn decode(data: &[u8], b: u64) -> std::result::Result<Option<u64>, String> {
    if data.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let n = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if data != record(n, b).as_slice() {
        return Err(format!("block {b} holds garbage or a torn write"));
    }
    Ok(Some(n))
}

/// One request of the writer: monotonic send and acknowledgement times.
#[derive(Clone, Copy)]
struct Sent {
    sent_ns: u64,
    acked_ns: u64,
}

/// The guest-like writer: one NBD connection, one request at a time, so the
/// disk after request N is a well-defined state.
struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Sent>>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Writer {
    async fn start(nbd_addr: &str, blocks: u64) -> Result<Writer> {
        let client = NbdClient::connect(nbd_addr, "disk")
            .await
            .map_err(|e| Failure::endpoint(format!("demo writer cannot connect: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let b = block_of(n, blocks);
                let data = record(n, b);
                let sent_ns = monotonic_ns();
                client
                    .write(b * BLOCK, &data, false)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                log2.lock().unwrap().push(Sent {
                    sent_ns,
                    acked_ns: monotonic_ns(),
                });
                n += 1;
            }
            client
                .flush()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(())
        });
        Ok(Writer { stop, log, task })
    }

    fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The log so far.
    fn log(&self) -> Vec<Sent> {
        self.log.lock().unwrap().clone()
    }

    /// A request sent after `ns` has been acknowledged.
    fn sent_after(&self, ns: u64) -> bool {
        self.log
            .lock()
            .unwrap()
            .last()
            .is_some_and(|s| s.sent_ns > ns)
    }

    /// Writes per second over the last `over`.
    async fn rate(&self, over: Duration) -> f64 {
        let a = self.count();
        tokio::time::sleep(over).await;
        (self.count() - a) as f64 / over.as_secs_f64()
    }

    async fn stop(self) -> Result<Vec<Sent>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .map_err(|e| Failure::endpoint(format!("demo writer: {e}")))?
            .map_err(|e| Failure::endpoint(format!("demo writer: {e}")))?;
        let log = self.log.lock().unwrap().clone();
        Ok(log)
    }
}

/// Finds N such that `image` is exactly the disk after request N. The
/// writer issues one request at a time, so request numbers are its instants:
/// a block holding request n allows N >= n, and N < the next request to it.
fn find_request(image: &[u8], blocks: u64) -> std::result::Result<Option<u64>, String> {
    let mut instants = livesnap_pit::Instants::new();
    for b in 0..blocks {
        let data = &image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        let held = decode(data, b)?;
        if let Some(n) = held {
            if block_of(n, blocks) != b {
                return Err(format!(
                    "block {b} holds request {n}, which wrote another block"
                ));
            }
        }
        let next = held.map_or(first_request(b, blocks), |n| n + blocks);
        instants.add(b, held, Some(next));
    }
    match (instants.latest(), instants.earliest()) {
        (None, _) => Ok(None),
        (Some(l), _) if instants.meet() => Ok(Some(l.at)),
        (Some(l), e) => Err(format!(
            "the copy mixes instants: it holds request {}, but misses request {}, written before it",
            l.at,
            e.map_or(0, |e| e.at)
        )),
    }
}

/// Creates a sparse raw image.
async fn create_raw(path: &Path, size: u64) -> Result<()> {
    create_image(&CreateOptions {
        filename: path.to_string_lossy().into_owned(),
        format: ImageFormat::Raw,
        size: Some(size),
        cluster_size: None,
        backing_file: None,
        backing_format: None,
    })
    .await
    .map_err(|e| Failure::endpoint(format!("cannot create {}: {e}", path.display())))
}

/// What Nova's loop did.
struct NovaRun {
    /// It saw `cur == end` and its abort ended the job.
    finished: bool,
    /// From the mirror command to the end (or to the deadline).
    took: Duration,
    /// The abort's window (CLOCK_MONOTONIC ns): the copy is the disk at one
    /// instant in it.
    window: Option<(u64, u64)>,
    /// The copy, kept when it finished (the caller checks and removes it).
    copy: PathBuf,
}

/// Nova's live-snapshot loop on livesnapd: a mirror (`copy_mode`: none, as
/// Nova through libvirt sends, or QEMU's `background`), `query-block-jobs`
/// every 0.5 s until `cur == end` and READY, then its abort (a soft
/// `block-job-cancel`), all within `deadline`.
async fn nova(
    q: &mut Endpoint,
    dir: &Path,
    size: u64,
    speed: u64,
    copy_mode: Option<&str>,
    deadline: Duration,
) -> Result<NovaRun> {
    // A job id of its own per run: the events of an earlier run may still be queued.
    let job = match copy_mode {
        Some(m) => format!("nova-{m}"),
        None => "nova".to_string(),
    };
    let copy = dir.join("nova-copy.raw");
    create_raw(&copy, size).await?;
    q.must(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "nova-copy",
               "file": {"driver": "file", "filename": copy.to_string_lossy()}}),
    )
    .await?;
    let mut args = json!({"job-id": job, "device": "disk", "target": "nova-copy",
                          "sync": "full", "speed": speed});
    if let Some(m) = copy_mode {
        args["copy-mode"] = json!(m);
    }
    q.must("blockdev-mirror", args).await?;
    let start = Instant::now();
    let mut window = None;
    let mut last_print = Instant::now() - Duration::from_secs(2);
    while start.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let jobs = q.must("query-block-jobs", json!({})).await?;
        let Some(j) = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == job.as_str()))
        else {
            break;
        };
        let (cur, end) = (
            j["offset"].as_u64().unwrap_or(0),
            j["len"].as_u64().unwrap_or(0),
        );
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "  nova: {:>4.1}s  cur {:>10}  end {:>10}  ({} behind)",
                start.elapsed().as_secs_f64(),
                cur,
                end,
                bytes(end.saturating_sub(cur))
            );
        }
        if end != 0 && cur == end && j["ready"] == true {
            // Nova's blockJobAbort: a soft cancel, then wait for the end.
            let t0 = monotonic_ns();
            q.must("block-job-cancel", json!({ "device": job })).await?;
            let left = deadline.saturating_sub(start.elapsed());
            if wait_end(q, &job, left).await? {
                window = Some((t0, monotonic_ns()));
            }
            break;
        }
    }
    let took = start.elapsed();
    if window.is_none() {
        // Clean up what Nova left: a force cancel ends the job at once.
        let _ = q
            .call("block-job-cancel", json!({"device": job, "force": true}))
            .await;
    }
    wait_gone(q, &job, Duration::from_secs(10)).await?;
    let _ = q
        .call("blockdev-del", json!({"node-name": "nova-copy"}))
        .await;
    if window.is_none() {
        let _ = std::fs::remove_file(&copy);
    }
    Ok(NovaRun {
        finished: window.is_some(),
        took,
        window,
        copy,
    })
}

/// Waits for job `id`'s BLOCK_JOB_COMPLETED; false if it ended otherwise
/// or `limit` passed first.
async fn wait_end(q: &mut Endpoint, id: &str, limit: Duration) -> Result<bool> {
    let until = Instant::now() + limit;
    while let Some(ev) = q
        .event(until.saturating_duration_since(Instant::now()))
        .await?
    {
        if ev["data"]["device"] != id {
            continue;
        }
        match ev["event"].as_str() {
            Some("BLOCK_JOB_COMPLETED") => return Ok(ev["data"].get("error").is_none()),
            Some("BLOCK_JOB_CANCELLED") => return Ok(false),
            _ => {}
        }
    }
    Ok(false)
}

/// Waits until job `id` is no longer listed; false if `limit` passed first.
async fn wait_gone(q: &mut Endpoint, id: &str, limit: Duration) -> Result<bool> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let jobs = q.must("query-jobs", json!({})).await?;
        if !jobs
            .as_array()
            .is_some_and(|a| a.iter().any(|j| j["id"] == id))
        {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

/// Runs the demo.
pub async fn run(opts: &DemoOptions) -> Result<()> {
    let temp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| Failure::usage(format!("cannot create {}: {e}", d.display())))?;
            d.clone()
        }
        None => {
            temp = tempdir()?;
            temp.clone()
        }
    };
    let result = run_in(opts, &dir).await;
    if opts.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn tempdir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let d = base.join(format!("livesnap-demo-{}-{i}", std::process::id()));
        if std::fs::create_dir(&d).is_ok() {
            return Ok(d);
        }
    }
    Err(Failure::usage("cannot create a temporary directory"))
}

async fn run_in(opts: &DemoOptions, dir: &Path) -> Result<()> {
    // The largest power of two of blocks that fits (see STRIDE).
    let fit = (opts.size / BLOCK).max(2);
    let blocks = 1u64 << (63 - fit.leading_zeros());
    let size = blocks * BLOCK;
    let disk = dir.join("disk.raw");
    create_raw(&disk, size).await?;
    let qmp_path = dir.join("qmp.sock");
    let nbd_path = dir.join("nbd.sock");
    println!(
        "livesnap demo: a {} disk served by an embedded livesnapd",
        bytes(size)
    );
    println!("  QMP {}   NBD {}", qmp_path.display(), nbd_path.display());
    let daemon = livesnapd::Embedded::start(&disk, "raw", &nbd_path, &qmp_path)
        .await
        .map_err(|e| Failure::endpoint(format!("cannot start livesnapd: {e}")))?;
    let outcome = demo_steps(opts, dir, size, blocks, &nbd_path, &qmp_path).await;
    daemon.stop().await;
    outcome
}

/// Checks `image` against the writer's log: it must be exactly the disk
/// after one request whose number lies inside the window `(w0, w1)`
/// (CLOCK_MONOTONIC ns). Returns (that request, the window's bounds).
async fn verify(
    writer: &Writer,
    image: &[u8],
    blocks: u64,
    (w0, w1): (u64, u64),
    what: &str,
) -> Result<(u64, u64, u64)> {
    // Every request sent before the window closed must be in the log: the
    // writer has one in flight at a time, so wait for one sent after it.
    let until = Instant::now() + Duration::from_secs(30);
    while !writer.sent_after(w1) {
        if Instant::now() >= until {
            return Err(Failure::job("the demo writer stopped writing"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let log = writer.log();
    // Requests certainly in the copy: acknowledged before the window opened;
    // possibly in it: sent before it closed.
    let lo = log.iter().take_while(|s| s.acked_ns < w0).count() as u64;
    let hi = log.iter().take_while(|s| s.sent_ns < w1).count() as u64;
    let n = find_request(image, blocks).map_err(|e| {
        Failure::new(
            Kind::Job,
            format!("{what} is not a point-in-time copy: {e}"),
        )
    })?;
    let n_done = n.map_or(0, |n| n + 1);
    if n_done < lo || n_done > hi {
        return Err(Failure::new(
            Kind::Job,
            format!("{what} is the disk after {n_done} requests, outside its window [{lo}, {hi}]"),
        ));
    }
    Ok((n_done, lo, hi))
}

async fn demo_steps(
    opts: &DemoOptions,
    dir: &Path,
    size: u64,
    blocks: u64,
    nbd_path: &Path,
    qmp_path: &Path,
) -> Result<()> {
    let writer = Writer::start(&format!("unix:{}", nbd_path.display()), blocks).await?;
    let rate = writer.rate(Duration::from_millis(500)).await;
    println!(
        "\nA guest writes 4 KiB records all over the disk: {:.0} writes/s, dirtying {}/s of 64 KiB chunks;",
        rate,
        bytes((rate * 65536.0) as u64)
    );
    println!("the copy may go at {}/s.", bytes(opts.speed));
    let mut q = Endpoint::connect(qmp_path, CONNECT_TIMEOUT).await?;

    println!(
        "\n1. Nova's algorithm (mirror, poll every 0.5 s until cur == end, then abort) on a\n   background mirror, QEMU's default copy mode, given {}s:",
        opts.nova_deadline.as_secs()
    );
    let classic = nova(
        &mut q,
        dir,
        size,
        opts.speed,
        Some("background"),
        opts.nova_deadline,
    )
    .await?;
    let classic_line = if classic.finished {
        let _ = std::fs::remove_file(&classic.copy);
        println!(
            "  Nova finished this time (the guest slowed down); under heavier writes it may not."
        );
        format!(
            "finished after {:.1}s this time",
            classic.took.as_secs_f64()
        )
    } else {
        println!(
            "  Nova is still polling after {}s: cur never reaches end under these writes, so Nova never gets to its abort and waits for ever.",
            opts.nova_deadline.as_secs()
        );
        println!("  (the demo force-cancelled the job and removed the copy)");
        format!(
            "still polling after {}s (Nova would poll for ever)",
            opts.nova_deadline.as_secs()
        )
    };

    // Nova's loop needs a whole first pass at the speed limit, then a
    // clean instant: give it three passes' worth, at least its deadline.
    let pass = Duration::from_secs_f64(size as f64 / opts.speed.max(1) as f64);
    let limit = opts.nova_deadline.max(pass * 3);
    println!(
        "\n2. The same loop, unchanged (no copy-mode, as Nova sends it), on livesnapd's default\n   (copy-mode auto: write-blocking once the copy stops gaining), given {}s:",
        limit.as_secs()
    );
    let ours = nova(&mut q, dir, size, opts.speed, None, limit).await?;
    let Some(window) = ours.window else {
        return Err(Failure::job(format!(
            "Nova's loop did not end on livesnapd's default within {}s",
            limit.as_secs()
        )));
    };
    let image = read_file(&ours.copy)?;
    let _ = std::fs::remove_file(&ours.copy);
    let (n, lo, hi) = verify(&writer, &image, blocks, window, "Nova's copy").await?;
    let end_ms = (window.1 - window.0) as f64 / 1e6;
    println!(
        "  Nova saw cur == end after {:.1}s; its abort ended in {end_ms:.0} ms. The copy is exactly\n  the disk after request #{n} (the abort's window: requests {lo}..{hi}). Point in time: verified.",
        ours.took.as_secs_f64()
    );

    println!("\n3. livesnap snapshot (copy-before-write backup: point in time at the start):");
    let target = dir.join("snapshot.raw");
    let sopts = snapshot::Options {
        endpoint: EndpointArg::Qmp(qmp_path.to_path_buf()),
        disk: "disk".into(),
        target: target.clone(),
        format: ImageFormat::Raw,
        shallow: false,
        method: MethodArg::Backup,
        deadline: Duration::from_secs(600),
        speed: Some(opts.speed),
        freeze: None,
        freeze_hold: Duration::from_secs(10),
        cbw_timeout: 30,
        create_via: CreateVia::Auto,
        copy_mode: None,
        target_blkdebug: None,
        quiet: true,
    };
    let started = Instant::now();
    let before = writer.count();
    let report = snapshot::run(&sopts, Interrupt::install()).await?;
    let took = started.elapsed();
    let during = writer.count() - before;
    println!(
        "  done in {:.1}s; the guest kept writing: {} writes while it ran ({:.0} writes/s).",
        took.as_secs_f64(),
        during,
        during as f64 / took.as_secs_f64().max(1e-3)
    );
    let image = read_file(&target)?;
    let _ = std::fs::remove_file(&target);
    let (m, lo, hi) = verify(
        &writer,
        &image,
        blocks,
        (report.window.0.mono_ns, report.window.1.mono_ns),
        "the snapshot",
    )
    .await?;
    println!(
        "  the snapshot is exactly the disk after request #{m} (window: requests {lo}..{hi}). Point in time: verified."
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = writer.stop().await?;
    let disk_now = find_request(&read_file(&dir.join("disk.raw"))?, blocks)
        .map_err(|e| Failure::new(Kind::Job, format!("the disk itself is inconsistent: {e}")))?;
    if disk_now.map_or(0, |n| n + 1) != log.len() as u64 {
        return Err(Failure::new(
            Kind::Job,
            format!(
                "the disk lost acknowledged writes: it holds {disk_now:?}, {} were acknowledged",
                log.len()
            ),
        ));
    }
    println!(
        "\nThe disk itself holds all {} acknowledged writes. In short:",
        log.len()
    );
    println!("  Nova's loop, background mirror (QEMU's default):  {classic_line}");
    println!(
        "  the same loop on livesnapd's default:             ended after {:.1}s (abort {end_ms:.0} ms), point in time verified",
        ours.took.as_secs_f64()
    );
    println!(
        "  livesnap snapshot:                                ended after {:.1}s, point in time verified",
        took.as_secs_f64()
    );
    Ok(())
}

fn read_file(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| Failure::job(format!("cannot read {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_inverts_block_of() {
        for blocks in [2u64, 64, 4096, 1 << 16] {
            for b in (0..blocks).step_by((blocks / 16).max(1) as usize) {
                assert_eq!(block_of(first_request(b, blocks), blocks), b);
            }
        }
    }

    #[test]
    fn find_request_accepts_one_instant_and_rejects_a_mix() {
        let blocks = 16u64;
        let mut disk = vec![0u8; (blocks * BLOCK) as usize];
        let mut states = Vec::new();
        for n in 0..40u64 {
            let b = block_of(n, blocks);
            disk[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&record(n, b));
            states.push(disk.clone());
        }
        assert_eq!(find_request(&states[5], blocks), Ok(Some(5)));
        assert_eq!(find_request(&states[39], blocks), Ok(Some(39)));
        // Block of request 30 from the later state, the rest from state 20.
        let mut mixed = states[20].clone();
        let b = block_of(30, blocks);
        mixed[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]
            .copy_from_slice(&states[39][(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]);
        assert!(find_request(&mixed, blocks).is_err());
        let mut torn = states[10].clone();
        torn[100] ^= 1;
        assert!(find_request(&torn, blocks).is_err());
    }
}
