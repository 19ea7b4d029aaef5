//! The copy engine (`block_copy`) and the copy-before-write filter (`cbw`)
//! on in-memory nodes: each cluster is copied once whoever asks, requesters
//! wait for a copy in flight instead of repeating it, failures leave the
//! range pending for a retry, a cancel releases every waiter, zero ranges
//! become write-zeroes, sync=top skips what the top layer does not allocate,
//! and the filter keeps the point in time for its target and snapshot readers.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livesnap_block::BlockGraph;
use livesnap_block::{BlockDriver, BlockNode, BlockStatus, IoBuf, IoFuture, WriteFlags, ZeroFlags};
use livesnap_jobs::backup::{self, BackupOptions, BackupStart};
use livesnap_jobs::block_copy::{BlockCopy, BlockCopyOptions, ZeroStep, DEFAULT_CLUSTER_SIZE};
use livesnap_jobs::cbw::{Cbw, CbwOptions, OnCbwError, PAUSED_HOLD};
use livesnap_jobs::{JobManager, JobOptions, OnError};
use tokio::sync::watch;

const CLUSTER: u64 = DEFAULT_CLUSTER_SIZE;
const SIZE: u64 = 16 * CLUSTER;

/// An in-memory disk that counts and can fail or hold its writes.
struct MemDriver {
    data: Mutex<Vec<u8>>,
    /// (offset, len, zeroes) of every write that reached the driver.
    writes: Mutex<Vec<(u64, u64, bool)>>,
    /// Fail writes with EIO while set.
    fail_writes: AtomicBool,
    /// Writes wait while this is false.
    open: watch::Sender<bool>,
    /// Bit per cluster: allocated in this layer (depth 1) or not (depth 2).
    unallocated: Mutex<Vec<bool>>,
    reads: AtomicUsize,
}

impl MemDriver {
    fn new(size: u64) -> Arc<MemDriver> {
        Arc::new(MemDriver {
            data: Mutex::new(vec![0; size as usize]),
            writes: Mutex::new(Vec::new()),
            fail_writes: AtomicBool::new(false),
            open: watch::channel(true).0,
            unallocated: Mutex::new(vec![false; size.div_ceil(CLUSTER) as usize]),
            reads: AtomicUsize::new(0),
        })
    }

    fn fill(&self, offset: u64, bytes: &[u8]) {
        self.data.lock().unwrap()[offset as usize..offset as usize + bytes.len()]
            .copy_from_slice(bytes);
    }

    fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].to_vec()
    }

    fn writes(&self) -> Vec<(u64, u64, bool)> {
        self.writes.lock().unwrap().clone()
    }

    fn hold(&self) {
        self.open.send_replace(false);
    }

    fn release(&self) {
        self.open.send_replace(true);
    }

    async fn gate(&self) -> io::Result<()> {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open).await;
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

/// The node's driver: a shared handle, so the test keeps its own.
struct Mem(Arc<MemDriver>);

impl BlockDriver for Mem {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.0.data.lock().unwrap().len() as u64
    }

    fn filename(&self) -> String {
        "mem".into()
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            self.0.reads.fetch_add(1, Ordering::SeqCst);
            let len = buf.len() as u64;
            buf.copy_from_slice(&self.0.bytes(offset, len));
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.0.gate().await?;
            self.0.fill(offset, &buf);
            self.0
                .writes
                .lock()
                .unwrap()
                .push((offset, buf.len() as u64, false));
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.0.gate().await?;
            self.0.fill(offset, &vec![0; len as usize]);
            self.0.writes.lock().unwrap().push((offset, len, true));
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.write_zeroes(offset, len, ZeroFlags::default())
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Runs of whole clusters that are all-zero (`zero`) or not, and
    /// allocated in this layer (depth 1) or not (depth 2).
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let data = self.0.data.lock().unwrap();
            let unalloc = self.0.unallocated.lock().unwrap();
            let kind = |c: u64| {
                let s = (c * CLUSTER) as usize;
                let e = (s + CLUSTER as usize).min(data.len());
                (data[s..e].iter().all(|&b| b == 0), unalloc[c as usize])
            };
            let first = offset / CLUSTER;
            let k = kind(first);
            let mut end = (first + 1) * CLUSTER;
            while end < offset + len && kind(end / CLUSTER) == k {
                end += CLUSTER;
            }
            Ok(BlockStatus {
                len: end.min(offset + len) - offset,
                data: !k.0,
                zero: k.0,
                depth: if k.1 { 2 } else { 1 },
            })
        })
    }
}

fn node(name: &str, d: &Arc<MemDriver>) -> Arc<BlockNode> {
    BlockNode::new(name, Box::new(Mem(d.clone())), false, false)
}

/// A source with a distinct byte per cluster (never zero) and an empty target.
fn setup() -> (Arc<MemDriver>, Arc<MemDriver>, Arc<BlockCopy>) {
    let src = MemDriver::new(SIZE);
    for c in 0..SIZE / CLUSTER {
        src.fill(c * CLUSTER, &vec![c as u8 + 1; CLUSTER as usize]);
    }
    let tgt = MemDriver::new(SIZE);
    let bc = BlockCopy::new(
        node("src", &src),
        node("tgt", &tgt),
        BlockCopyOptions::default(),
    )
    .unwrap();
    (src, tgt, bc)
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_cluster_is_copied_once_whoever_asks() {
    let (src, tgt, bc) = setup();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let bc = bc.clone();
        // Overlapping, unaligned requests over the whole disk.
        let offset = (i * 37 * 1024) % SIZE;
        let len = (3 * CLUSTER).min(SIZE - offset);
        tasks.push(tokio::spawn(async move { bc.copy(offset, len).await }));
    }
    // A background walker at the same time.
    let walker = {
        let bc = bc.clone();
        tokio::spawn(async move {
            while let Some(c) = bc.claim_next(0, 2 * CLUSTER) {
                let (tx, rx) = tokio::sync::oneshot::channel();
                bc.spawn_claim(c, move |r| {
                    let _ = tx.send(r.is_ok());
                });
                assert!(rx.await.unwrap());
            }
        })
    };
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    walker.await.unwrap();
    assert!(bc.wait_idle().await);
    assert!(bc.is_done());
    assert_eq!(tgt.bytes(0, SIZE), src.bytes(0, SIZE));
    let mut covered = vec![0u32; (SIZE / CLUSTER) as usize];
    for (off, len, _) in tgt.writes() {
        for c in off / CLUSTER..(off + len).div_ceil(CLUSTER) {
            covered[c as usize] += 1;
        }
    }
    assert!(
        covered.iter().all(|&n| n == 1),
        "copies per cluster: {covered:?}"
    );
}

#[tokio::test]
async fn a_requester_waits_for_the_copy_in_flight() {
    let (_src, tgt, bc) = setup();
    tgt.hold();
    let a = tokio::spawn({
        let bc = bc.clone();
        async move { bc.copy(0, 4096).await }
    });
    settle().await;
    let b = tokio::spawn({
        let bc = bc.clone();
        async move { bc.copy(100, 10).await }
    });
    settle().await;
    assert!(
        !a.is_finished() && !b.is_finished(),
        "both wait for the held write"
    );
    // A cluster nobody claimed is copied at once, whatever is held elsewhere... once writes flow.
    assert!(!bc.is_idle());
    tgt.release();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(tgt.writes().len(), 1, "one copy for both requesters");
    assert!(bc.is_copied(0) && !bc.is_copied(CLUSTER));
}

#[tokio::test]
async fn a_failed_copy_stays_pending_and_is_retried() {
    let (src, tgt, bc) = setup();
    tgt.fail_writes.store(true, Ordering::SeqCst);
    let before = bc.pending_bytes();
    let e = bc.copy(CLUSTER, 1).await.unwrap_err();
    assert!(!e.is_read);
    assert_eq!(e.error.raw_os_error(), Some(libc::EIO));
    assert!(bc.wait_idle().await);
    assert_eq!(
        bc.pending_bytes(),
        before,
        "the failed cluster is pending again"
    );
    tgt.fail_writes.store(false, Ordering::SeqCst);
    bc.copy(CLUSTER, 1).await.unwrap();
    assert_eq!(tgt.bytes(CLUSTER, CLUSTER), src.bytes(CLUSTER, CLUSTER));
    assert_eq!(bc.pending_bytes(), before - CLUSTER);
}

#[tokio::test]
async fn cancel_releases_every_waiter_at_once() {
    let (_src, tgt, bc) = setup();
    tgt.hold();
    let waiters: Vec<_> = (0..3)
        .map(|i| {
            let bc = bc.clone();
            tokio::spawn(async move { bc.copy(i * 1000, 10).await })
        })
        .collect();
    settle().await;
    let t = Instant::now();
    bc.cancel();
    for w in waiters {
        // The held target never completes: a release at all is the cancel's.
        let e = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("released")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::ECANCELED));
    }
    eprintln!("cancel released the waiters in {:?}", t.elapsed());
    assert!(
        bc.claim_next(0, SIZE).is_none(),
        "no new claims after a cancel"
    );
    // Ranges that need nothing pass even after the cancel.
    tgt.release();
    assert!(tokio::time::timeout(Duration::from_secs(5), bc.wait_idle())
        .await
        .is_ok());
}

#[tokio::test]
async fn zero_ranges_become_write_zeroes() {
    let (src, tgt, bc) = setup();
    src.fill(2 * CLUSTER, &vec![0; 3 * CLUSTER as usize]);
    tgt.fill(0, &vec![0xee; SIZE as usize]);
    bc.copy(0, SIZE).await.unwrap();
    assert_eq!(tgt.bytes(0, SIZE), src.bytes(0, SIZE));
    let zeroes: Vec<_> = tgt.writes().into_iter().filter(|w| w.2).collect();
    assert_eq!(zeroes, vec![(2 * CLUSTER, 3 * CLUSTER, true)]);
}

/// The zero pass: zero runs of the source are settled without a write where
/// the target already reads as zeroes, with one write-zeroes where it does
/// not, count as copied, and leave data to the copy loop.
#[tokio::test]
async fn the_zero_pass_writes_only_where_the_target_is_not_zero() {
    let (src, tgt, bc) = setup();
    src.fill(2 * CLUSTER, &vec![0; 5 * CLUSTER as usize]);
    src.fill(10 * CLUSTER, &vec![0; 6 * CLUSTER as usize]);
    // Old data on the target over part of the second zero run.
    tgt.fill(12 * CLUSTER, &vec![0xee; CLUSTER as usize]);
    assert_eq!(bc.settle_zero_run(0).await, ZeroStep::Data(2 * CLUSTER));
    assert_eq!(
        bc.settle_zero_run(CLUSTER).await,
        ZeroStep::Data(2 * CLUSTER)
    );
    assert_eq!(
        bc.settle_zero_run(2 * CLUSTER).await,
        ZeroStep::Zero(7 * CLUSTER)
    );
    assert_eq!(
        bc.settle_zero_run(7 * CLUSTER).await,
        ZeroStep::Data(10 * CLUSTER)
    );
    assert_eq!(bc.settle_zero_run(10 * CLUSTER).await, ZeroStep::Zero(SIZE));
    assert_eq!(bc.settle_zero_run(SIZE - 1).await, ZeroStep::Stop);
    assert_eq!(tgt.writes(), vec![(10 * CLUSTER, 6 * CLUSTER, true)]);
    assert!(bc.is_copied(2 * CLUSTER) && bc.is_copied(15 * CLUSTER));
    assert!(!bc.is_copied(0) && !bc.is_copied(9 * CLUSTER));
    assert_eq!(bc.pending_bytes(), 5 * CLUSTER);
    bc.copy(0, SIZE).await.unwrap();
    assert_eq!(tgt.bytes(0, SIZE), src.bytes(0, SIZE));
}

#[tokio::test]
async fn top_scan_drops_what_the_top_layer_does_not_allocate() {
    let (src, tgt, bc) = setup();
    {
        let mut u = src.unallocated.lock().unwrap();
        for c in [1, 2, 3, 9, 15] {
            u[c] = true;
        }
    }
    bc.set_skip_unallocated(true);
    let mut at = 0;
    while at < bc.len() {
        at = bc.reset_unallocated(at).await.unwrap();
    }
    bc.set_skip_unallocated(false);
    assert_eq!(bc.pending_bytes(), 11 * CLUSTER);
    while let Some(c) = bc.claim_next(0, SIZE) {
        bc.spawn_claim(c, |r| assert!(r.is_ok()));
    }
    assert!(bc.wait_idle().await);
    let written: Vec<u64> = tgt.writes().iter().map(|w| w.0 / CLUSTER).collect();
    assert!(
        written.iter().all(|c| ![1, 2, 3, 9, 15].contains(c)),
        "{written:?}"
    );
    assert_eq!(tgt.bytes(0, CLUSTER), src.bytes(0, CLUSTER));
    assert_eq!(tgt.bytes(CLUSTER, CLUSTER), vec![0; CLUSTER as usize]);
}

#[tokio::test]
async fn a_snapshot_read_holds_writes_to_its_range() {
    let (_src, _tgt, bc) = setup();
    let (n, on_target, hold) = bc.snapshot_piece(100, 10 * CLUSTER);
    assert!(!on_target && hold.is_some());
    assert_eq!(n, 10 * CLUSTER, "uncopied clusters form one piece");
    let w = tokio::spawn({
        let bc = bc.clone();
        async move { bc.wait_frozen(5 * CLUSTER, 1).await }
    });
    settle().await;
    assert!(!w.is_finished());
    tokio::time::timeout(Duration::from_secs(1), bc.wait_frozen(20 * CLUSTER, 1))
        .await
        .expect("outside the held range nothing waits");
    drop(hold);
    tokio::time::timeout(Duration::from_secs(1), w)
        .await
        .unwrap()
        .unwrap();
    bc.copy(0, 1).await.unwrap();
    let (n, on_target, hold) = bc.snapshot_piece(0, SIZE);
    assert!(on_target && hold.is_none() && n == CLUSTER);
}

/// The filter end to end: a guest write through the source node copies the
/// old cluster first; the snapshot reads the old data; a closed filter
/// copies nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_keeps_the_point_in_time() {
    let src = MemDriver::new(SIZE);
    src.fill(0, &vec![0x11; SIZE as usize]);
    let tgt = MemDriver::new(SIZE);
    let source = node("src", &src);
    let cbw = Cbw::attach(source.clone(), node("tgt", &tgt), CbwOptions::default())
        .await
        .unwrap();
    source
        .write(
            CLUSTER + 512,
            IoBuf::from_slice(&[0x22; 4096]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    assert_eq!(tgt.bytes(CLUSTER, CLUSTER), vec![0x11; CLUSTER as usize]);
    assert_eq!(tgt.writes(), vec![(CLUSTER, CLUSTER, false)]);
    let snap = cbw
        .read_snapshot(CLUSTER, IoBuf::zeroed(3 * CLUSTER as usize))
        .await
        .unwrap();
    assert!(
        snap.iter().all(|&b| b == 0x11),
        "the snapshot shows the old data"
    );
    // A second write to the same cluster copies nothing.
    source
        .write(
            CLUSTER,
            IoBuf::from_slice(&[0x33; 512]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    assert_eq!(tgt.writes().len(), 1);
    cbw.close().await;
    source
        .write(
            5 * CLUSTER,
            IoBuf::from_slice(&[0x44; 512]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    assert_eq!(tgt.writes().len(), 1, "a closed filter copies nothing");
    assert!(source.write_hook_count().await == 0);
}

/// A failing target: break-guest-write fails the guest write and leaves the
/// disk alone; break-snapshot lets it through and breaks the snapshot.
#[tokio::test]
async fn on_cbw_error_decides_the_guest_write() {
    for policy in [OnCbwError::BreakGuestWrite, OnCbwError::BreakSnapshot] {
        let src = MemDriver::new(SIZE);
        let tgt = MemDriver::new(SIZE);
        tgt.fail_writes.store(true, Ordering::SeqCst);
        let source = node("src", &src);
        let opts = CbwOptions {
            on_cbw_error: policy,
            ..Default::default()
        };
        let cbw = Cbw::attach(source.clone(), node("tgt", &tgt), opts)
            .await
            .unwrap();
        let r = source
            .write(0, IoBuf::from_slice(&[0x55; 512]), WriteFlags::default())
            .await;
        match policy {
            OnCbwError::BreakGuestWrite => {
                assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
                assert_eq!(src.bytes(0, 512), vec![0; 512]);
                assert!(cbw.snapshot_error().is_none());
            }
            OnCbwError::BreakSnapshot => {
                r.unwrap();
                assert_eq!(src.bytes(0, 512), vec![0x55; 512]);
                assert!(cbw.snapshot_error().is_some());
                let e = cbw.read_snapshot(0, IoBuf::zeroed(512)).await.unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EACCES));
            }
        }
        cbw.close().await;
    }
}

/// cbw-timeout: a copy slower than the limit fails the guest write
/// (break-guest-write) in about the limit, not when the target answers.
#[tokio::test]
async fn a_slow_copy_times_out() {
    let src = MemDriver::new(SIZE);
    let tgt = MemDriver::new(SIZE);
    tgt.hold();
    let source = node("src", &src);
    let opts = CbwOptions {
        cbw_timeout: 1,
        ..Default::default()
    };
    let cbw = Cbw::attach(source.clone(), node("tgt", &tgt), opts)
        .await
        .unwrap();
    let t = Instant::now();
    let e = source
        .write(0, IoBuf::from_slice(&[1; 512]), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT));
    // Not before the timeout; the copy stalls for ever, so any end is the timeout's.
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // Releasing the filter does not wait for the stalled copy (for ever).
    tokio::time::timeout(Duration::from_secs(30), cbw.close())
        .await
        .expect("close waited for the stalled copy");
    tgt.release();
}

/// An image over a backing node (the disk): unwritten ranges read through
/// to the backing, after waiting at `gate` (so a test can hold a reader
/// between its lookup and its backing read).
struct Overlay {
    mem: Arc<MemDriver>,
    written: Mutex<Vec<bool>>,
    backing: Arc<BlockNode>,
    gate: watch::Sender<bool>,
}

impl BlockDriver for Overlay {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.backing.size()
    }

    fn filename(&self) -> String {
        "overlay".into()
    }

    fn backing(&self) -> Option<Arc<BlockNode>> {
        Some(self.backing.clone())
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            if self.written.lock().unwrap()[(offset / CLUSTER) as usize] {
                buf.copy_from_slice(&self.mem.bytes(offset, len));
                return Ok(buf);
            }
            let _ = self.gate.subscribe().wait_for(|open| *open).await;
            self.backing.read_into(offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.mem.fill(offset, &buf);
            let mut w = self.written.lock().unwrap();
            for c in offset / CLUSTER..(offset + buf.len() as u64).div_ceil(CLUSTER) {
                w[c as usize] = true;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        let _ = flags;
        self.write(offset, IoBuf::zeroed(len as usize), WriteFlags::default())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.write_zeroes(offset, len, ZeroFlags::default())
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            Ok(BlockStatus {
                len: len.min(CLUSTER - offset % CLUSTER),
                data: true,
                zero: false,
                depth: 1,
            })
        })
    }
}

/// Image fleecing: the target's backing is the disk, and a reader of the
/// target falls through to the disk where nothing was copied. A guest write
/// racing such a read must not land before the read is done: the copy into
/// the target is serialised against the reader, so the guest write waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleecing_reader_never_sees_the_new_data() {
    let src = MemDriver::new(SIZE);
    src.fill(0, &vec![0x11; SIZE as usize]);
    let source = node("src", &src);
    let overlay = Arc::new(Overlay {
        mem: MemDriver::new(SIZE),
        written: Mutex::new(vec![false; (SIZE / CLUSTER) as usize]),
        backing: source.clone(),
        gate: watch::channel(false).0,
    });
    struct Shared(Arc<Overlay>);
    impl BlockDriver for Shared {
        fn format_name(&self) -> &'static str {
            self.0.format_name()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn filename(&self) -> String {
            self.0.filename()
        }
        fn backing(&self) -> Option<Arc<BlockNode>> {
            self.0.backing()
        }
        fn read(&self, o: u64, b: IoBuf) -> IoFuture<'_, IoBuf> {
            self.0.read(o, b)
        }
        fn write(&self, o: u64, b: IoBuf, f: WriteFlags) -> IoFuture<'_, ()> {
            self.0.write(o, b, f)
        }
        fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> IoFuture<'_, ()> {
            self.0.write_zeroes(o, l, f)
        }
        fn discard(&self, o: u64, l: u64) -> IoFuture<'_, ()> {
            self.0.discard(o, l)
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            self.0.flush()
        }
        fn block_status(&self, o: u64, l: u64) -> IoFuture<'_, BlockStatus> {
            self.0.block_status(o, l)
        }
    }
    let target = BlockNode::new("fleece", Box::new(Shared(overlay.clone())), false, false);
    let cbw = Cbw::attach(source.clone(), target.clone(), CbwOptions::default())
        .await
        .unwrap();
    // The reader looked the cluster up (unwritten) and is about to read the disk.
    let reader = tokio::spawn({
        let target = target.clone();
        async move { target.read(0, 4096).await.unwrap() }
    });
    settle().await;
    let guest = tokio::spawn({
        let source = source.clone();
        async move {
            source
                .write(0, IoBuf::from_slice(&[0x22; 4096]), WriteFlags::default())
                .await
        }
    });
    settle().await;
    assert!(
        !guest.is_finished(),
        "the guest write must wait for the fleecing reader"
    );
    overlay.gate.send_replace(true);
    let data = reader.await.unwrap();
    assert!(
        data.iter().all(|&b| b == 0x11),
        "the reader saw the new data"
    );
    guest.await.unwrap().unwrap();
    assert!(src.bytes(0, 4096).iter().all(|&b| b == 0x22));
    assert!(target
        .read(0, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x11));
    cbw.close().await;
}

/// discard-source: a copied cluster is discarded from the disk, through the
/// disk's own hook without waiting on itself; the guest write that caused
/// the copy then lands on the discarded cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_source_drops_what_was_copied() {
    let src = MemDriver::new(SIZE);
    src.fill(0, &vec![0x11; SIZE as usize]);
    let tgt = MemDriver::new(SIZE);
    let source = node("src", &src);
    let opts = CbwOptions {
        discard_source: true,
        ..Default::default()
    };
    let cbw = Cbw::attach(source.clone(), node("tgt", &tgt), opts)
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        source.write(
            2 * CLUSTER,
            IoBuf::from_slice(&[0x22; 512]),
            WriteFlags::default(),
        ),
    )
    .await
    .expect("the discard must not wait on its own copy")
    .unwrap();
    assert_eq!(
        tgt.bytes(2 * CLUSTER, CLUSTER),
        vec![0x11; CLUSTER as usize]
    );
    assert!(src.writes().contains(&(2 * CLUSTER, CLUSTER, true)));
    let mut want = vec![0x22; 512];
    want.resize(CLUSTER as usize, 0);
    assert_eq!(src.bytes(2 * CLUSTER, CLUSTER), want);
    // The background pass discards too.
    let bc = cbw.copy().clone();
    while let Some(c) = bc.claim_next(0, SIZE) {
        bc.spawn_claim(c, |r| assert!(r.is_ok()));
    }
    assert!(bc.wait_idle().await);
    assert_eq!(tgt.bytes(0, CLUSTER), vec![0x11; CLUSTER as usize]);
    assert_eq!(src.bytes(0, CLUSTER), vec![0; CLUSTER as usize]);
    cbw.close().await;
}

/// A filter whose backup stops on target errors: a guest write whose copy
/// fails waits for the job's resume and copies again instead of failing;
/// one never resumed gets `on-cbw-error` after the bounded hold.
#[tokio::test]
async fn a_stopped_backup_holds_the_guest_write_until_resume() {
    for resume in [true, false] {
        let src = MemDriver::new(SIZE);
        src.fill(0, &[0x11; CLUSTER as usize]);
        let tgt = MemDriver::new(SIZE);
        tgt.fail_writes.store(true, Ordering::SeqCst);
        let source = node("src", &src);
        let opts = CbwOptions {
            on_cbw_error: OnCbwError::BreakGuestWrite,
            ..Default::default()
        };
        let cbw = Cbw::attach(source.clone(), node("tgt", &tgt), opts)
            .await
            .unwrap();
        cbw.set_stop_policy(OnError::Report, OnError::Stop);
        let started = Instant::now();
        let write = tokio::spawn({
            let source = source.clone();
            async move {
                source
                    .write(0, IoBuf::from_slice(&[0x55; 512]), WriteFlags::default())
                    .await
            }
        });
        settle().await;
        assert!(!write.is_finished(), "the guest write was not held");
        assert_eq!(src.bytes(0, 512), vec![0x11; 512]);
        if resume {
            // Space was made and the job resumed: the copy is retried.
            tgt.fail_writes.store(false, Ordering::SeqCst);
            cbw.job_resumed();
            tokio::time::timeout(Duration::from_secs(5), write)
                .await
                .expect("the held write did not go on after the resume")
                .unwrap()
                .unwrap();
            assert_eq!(tgt.bytes(0, 512), vec![0x11; 512]);
            assert_eq!(src.bytes(0, 512), vec![0x55; 512]);
        } else {
            let r = tokio::time::timeout(PAUSED_HOLD * 4, write)
                .await
                .expect("the hold is not bounded")
                .unwrap();
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
            assert!(started.elapsed() >= PAUSED_HOLD);
        }
        cbw.close().await;
    }
}

/// The error policies that do not stop the job never hold a guest write.
#[tokio::test]
async fn a_reporting_backup_does_not_hold_the_guest_write() {
    let src = MemDriver::new(SIZE);
    let tgt = MemDriver::new(SIZE);
    tgt.fail_writes.store(true, Ordering::SeqCst);
    let source = node("src", &src);
    let opts = CbwOptions {
        on_cbw_error: OnCbwError::BreakSnapshot,
        ..Default::default()
    };
    let cbw = Cbw::attach(source.clone(), node("tgt", &tgt), opts)
        .await
        .unwrap();
    // enospc stops on ENOSPC only: this EIO is reported.
    cbw.set_stop_policy(OnError::Enospc, OnError::Enospc);
    tokio::time::timeout(
        PAUSED_HOLD / 2,
        source.write(0, IoBuf::from_slice(&[0x55; 512]), WriteFlags::default()),
    )
    .await
    .expect("the guest write was held")
    .unwrap();
    assert!(cbw.snapshot_error().is_some());
    cbw.close().await;
}

/// Copies-before-write count against a backup's `speed` without waiting
/// for it: at 1 byte/s the guest's writes all go through, and the job owes
/// the limiter what they copied (hours of it at that speed).
#[tokio::test]
async fn guest_copies_count_against_the_backup_speed() {
    let src = MemDriver::new(SIZE);
    let tgt = MemDriver::new(SIZE);
    let (source, target) = (node("src", &src), node("tgt", &tgt));
    let graph = Arc::new(BlockGraph::new());
    graph.insert(source.clone()).unwrap();
    graph.insert(target.clone()).unwrap();
    let jobs = JobManager::new(Arc::new(|_: &str, _: serde_json::Value| {}));
    let job = backup::prepare(
        &graph,
        &jobs,
        BackupStart {
            job_id: "j".into(),
            source: source.clone(),
            target,
            filter_name: "cbw".into(),
            cbw: CbwOptions::default(),
            backup: BackupOptions::default(),
            bitmap: None,
            job: JobOptions {
                speed: 1,
                ..Default::default()
            },
            drain_timeout: Duration::from_secs(5),
        },
        None,
    )
    .await
    .unwrap();
    let ctx = job.ctx();
    assert_eq!(ctx.ratelimit_delay(), Duration::ZERO);
    // Not started: only the guest copies.
    tokio::time::timeout(Duration::from_secs(30), async {
        for c in 0..SIZE / CLUSTER {
            source
                .write(
                    c * CLUSTER,
                    IoBuf::from_slice(&[0x66; 512]),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
        }
    })
    .await
    .expect("guest writes were held back by the speed limit");
    // SIZE bytes at 1 byte per 100 ms slice: the debt is ~SIZE/10 s.
    let owed = ctx.ratelimit_delay();
    assert!(owed > Duration::from_secs(3600), "{owed:?}");
    assert_eq!(tgt.bytes(0, 512), vec![0; 512]);
    job.cancel(true).await.unwrap();
}
