//! The mirror job (QEMU's `block/mirror.c`), built so that it always finishes.
//!
//! A [`WriteHook`] on the source sees every guest write. In `background`
//! mode it marks the written chunks dirty and the copy loop copies dirty
//! chunks to the target; in `write-blocking` mode each guest write is also
//! written to the target before it completes, so the dirty count can only
//! fall. livesnap's `auto` mode starts in background and switches to
//! write-blocking when the dirty count stops falling.
//!
//! Completion (`job-complete`, or a soft cancel in READY) is bounded: guest
//! requests on the exports of the source are held for at most
//! [`MirrorTuning::hold`] while the last dirty chunks are copied; if that is
//! not enough, the hold ends, the job switches to write-blocking and tries
//! again, at most [`MirrorTuning::attempts`] times, after which it stays
//! write-blocking until nothing is dirty (which that mode guarantees) and
//! takes a final hold that only has to wait for requests already in flight.
//! The instant the hold is taken is the snapshot's point in time.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livesnap_block::{
    offload, BackendHold, BlockNode, DirtyBitmap, HookedWrite, IoFuture, WriteFlags, WriteHook,
    WriteKind, ZeroFlags,
};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::exports::{hold_all, Exports};
use crate::guest::{GuestActivity, Pacer, DEFAULT_LOSS, PACED_CHUNK, PERIOD};
use crate::job::{
    ErrorVerdict, Job, JobCtx, JobDriver, JobFuture, JobManager, JobOptions, JobType, OnError,
};
use crate::rangelock::RangeLocks;

/// Largest single copy (QEMU's `MAX_IO_BYTES`).
pub const MAX_COPY: u64 = 1 << 20;
/// Most copies in flight (QEMU's `MAX_IN_FLIGHT`).
pub const MAX_IN_FLIGHT: usize = 16;
/// Default total of bytes in flight (QEMU's `DEFAULT_MIRROR_BUF_SIZE`).
pub const DEFAULT_BUF_SIZE: u64 = 16 << 20;

/// QEMU's `MirrorSyncMode` members a mirror accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorSync {
    /// Copy the whole disk.
    Full,
    /// Copy only what the top image allocates.
    Top,
    /// Copy only what is written from now on.
    None,
}

/// QEMU's `MirrorCopyMode`, plus livesnap's `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Guest writes mark chunks dirty; the job copies them.
    Background,
    /// Guest writes are written to the target too before they complete.
    WriteBlocking,
    /// Background until the dirty count stops falling, then write-blocking.
    Auto,
}

impl CopyMode {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
            CopyMode::Auto => "auto",
        }
    }

    /// Parses a member of `MirrorCopyMode` (with `auto`).
    pub fn parse(s: &str) -> Option<CopyMode> {
        Some(match s {
            "background" => CopyMode::Background,
            "write-blocking" => CopyMode::WriteBlocking,
            "auto" => CopyMode::Auto,
            _ => return None,
        })
    }
}

/// The bounds of completion and of the `auto` mode, and the guest's share.
#[derive(Clone, Copy, Debug)]
pub struct MirrorTuning {
    /// Longest time guest requests are held while the last chunks are
    /// copied; also the longest a write-blocking guest write waits for its
    /// copy on the target before it completes anyway (the chunk then counts
    /// as out of sync until the target write lands).
    pub hold: Duration,
    /// Held attempts before the job stays write-blocking until nothing is dirty.
    pub attempts: u32,
    /// `auto`: switch to write-blocking once the dirty count has not reached
    /// a new low (by 5 %) for this long.
    pub auto_patience: Duration,
    /// Most of the guest's write throughput the background copy may take
    /// (`x-busy-share`; 1.0 = no yielding): the pacer's target (guest.rs).
    pub busy_share: f64,
}

impl Default for MirrorTuning {
    fn default() -> Self {
        MirrorTuning {
            hold: Duration::from_millis(200),
            attempts: 3,
            auto_patience: Duration::from_millis(1000),
            busy_share: DEFAULT_LOSS,
        }
    }
}

/// Everything `blockdev-mirror` decided.
pub struct MirrorOptions {
    /// The node copied from.
    pub source: Arc<BlockNode>,
    /// The node copied to.
    pub target: Arc<BlockNode>,
    /// The node whose place the target takes on completion (default: the source).
    pub replaces: Arc<BlockNode>,
    /// What to copy.
    pub sync: MirrorSync,
    /// Bytes per dirty bit.
    pub granularity: u64,
    /// Most bytes in flight.
    pub buf_size: u64,
    /// Copy mode at start.
    pub copy_mode: CopyMode,
    /// Policy for source read errors.
    pub on_source_error: OnError,
    /// Policy for target write errors.
    pub on_target_error: OnError,
    /// Bounds and shares.
    pub tuning: MirrorTuning,
    /// Exports to hold and move.
    pub exports: Arc<dyn Exports>,
    /// The job's marks on nodes (blockers, in-use marks), removed when it
    /// ends; [`start`] sets them.
    pub users: Vec<(Arc<BlockNode>, livesnap_block::NodeUser)>,
}

/// QEMU's checks on a mirror's nodes, in its order: the source takes no
/// second job, and is not its own target.
pub fn check_nodes(source: &BlockNode, target: &BlockNode) -> livesnap_block::Result<()> {
    if source.users().iter().any(|u| u.blocker_reason().is_some()) {
        return Err(livesnap_block::Error::busy("Need a root block node"));
    }
    if std::ptr::eq(source, target) {
        return Err(livesnap_block::Error::invalid(
            "Can't mirror node into itself",
        ));
    }
    Ok(())
}

/// Starts a mirror job as QEMU's `mirror_start_job` does: the checks on its
/// nodes, its marks on them (an op blocker on the source, an in-use mark on
/// the target, both gone when the job is), then the job; the marks are
/// undone if the job cannot be created.
pub fn start(
    jobs: &Arc<JobManager>,
    job_id: &str,
    mut opts: MirrorOptions,
    job: JobOptions,
) -> livesnap_block::Result<Arc<Job>> {
    check_nodes(&opts.source, &opts.target)?;
    jobs.check_id(job_id)?;
    opts.users = vec![
        (
            opts.source.clone(),
            livesnap_block::NodeUser::Blocker("mirror"),
        ),
        (
            opts.target.clone(),
            livesnap_block::NodeUser::Job(job_id.to_string()),
        ),
    ];
    for (node, user) in &opts.users {
        node.add_user(user.clone());
    }
    let users = opts.users.clone();
    jobs.spawn(job_id, Mirror::new(opts), job).inspect_err(|_| {
        for (node, user) in &users {
            node.remove_user(user);
        }
    })
}

const MODE_BACKGROUND: u8 = 0;
const MODE_WRITE_BLOCKING: u8 = 1;

/// What the hook and the copy loop share.
struct Shared {
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    bitmap: Mutex<DirtyBitmap>,
    locks: Arc<RangeLocks>,
    /// The mode guest writes follow now.
    mode: AtomicU8,
    /// Guest writes started in background mode and not yet finished: while
    /// any runs, the target may lag without the bitmap showing it yet.
    background_writes: AtomicU64,
    guest: GuestActivity,
    /// Set on a force cancel or at the end: the hook passes writes through.
    stopped: AtomicBool,
    stop: Notify,
    /// Wakes the copy loop when a guest write dirtied something.
    dirtied: Notify,
    /// Write-blocking target writes still in flight (the chunks they cover
    /// are locked and count as in sync only once these land).
    active_writes: AtomicU64,
    /// Longest a guest write waits for its copy on the target.
    target_wait: Duration,
    /// Copies inside the kernel until it refuses one (offload.rs).
    offload: offload::Offload,
}

impl Shared {
    fn write_blocking(&self) -> bool {
        self.mode.load(Ordering::SeqCst) == MODE_WRITE_BLOCKING
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        self.bitmap.lock().unwrap().set(offset, len);
        self.dirtied.notify_one();
    }

    fn dirty_bytes(&self) -> u64 {
        self.bitmap.lock().unwrap().dirty_bytes()
    }

    /// Writes a guest request's data to the target too (write-blocking mode).
    async fn mirror_write(&self, req: HookedWrite) -> io::Result<()> {
        match req.kind {
            WriteKind::Data => {
                let data = req
                    .take_data()
                    .expect("write-blocking is only taken with the data");
                self.target
                    .write(req.offset, data, WriteFlags::default())
                    .await
            }
            WriteKind::Zeroes => {
                self.target
                    .write_zeroes(req.offset, req.len, ZeroFlags::default())
                    .await
            }
            // The source's content is now unspecified; zeroes are one valid copy of it.
            WriteKind::Discard => {
                self.target
                    .write_zeroes(
                        req.offset,
                        req.len,
                        ZeroFlags {
                            may_unmap: true,
                            ..Default::default()
                        },
                    )
                    .await
            }
        }
    }
}

/// The hook on the source.
struct MirrorHook {
    shared: Arc<Shared>,
}

impl WriteHook for MirrorHook {
    fn wants_data(&self) -> bool {
        // Only write-blocking copies guest data to the target; background
        // mode must not pay a copy of every guest write.
        self.shared.write_blocking() && !self.shared.stopped.load(Ordering::SeqCst)
    }

    fn intercept<'a>(&'a self, req: &'a HookedWrite, write: IoFuture<'a, ()>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let s = &self.shared;
            if s.stopped.load(Ordering::SeqCst) {
                return write.await;
            }
            let _busy = s.guest.write_started();
            // Write-blocking only where the target is in sync: a chunk still
            // dirty will be copied whole anyway (QEMU's active mirror does
            // the same), so a write there costs the guest nothing extra and
            // the dirty count still cannot grow.
            let in_sync_somewhere = !s.bitmap.lock().unwrap().all(req.offset, req.len);
            let mut mirrored = None;
            if s.write_blocking() && in_sync_somewhere {
                let data = match req.kind {
                    WriteKind::Data => req.take_data(),
                    _ => None,
                };
                // No copy of the data when the mode switched after the node
                // asked: this one write takes the background path.
                if req.kind != WriteKind::Data || data.is_some() {
                    mirrored = Some(HookedWrite::new(req.offset, req.len, req.kind, data));
                }
            }
            let r = if let Some(copy) = mirrored {
                self.write_blocking(copy, write).await
            } else {
                s.background_writes.fetch_add(1, Ordering::SeqCst);
                let r = write.await;
                // After the write landed: a copy that read the chunk before
                // it did will be redone.
                s.mark_dirty(req.offset, req.len);
                s.background_writes.fetch_sub(1, Ordering::SeqCst);
                r
            };
            r
        })
    }
}

impl MirrorHook {
    async fn write_blocking(&self, req: HookedWrite, write: IoFuture<'_, ()>) -> io::Result<()> {
        let s = &self.shared;
        let g = s.bitmap.lock().unwrap().granularity();
        let start = req.offset / g * g;
        let end = (req.offset + req.len).div_ceil(g) * g;
        // Serialised against copies of the same chunks, so the target gets
        // the writes to a chunk in the order the source did; held until both
        // writes have landed.
        let stop = s.stop.notified();
        tokio::pin!(stop);
        // Registered before the flag is read, so a stop in between still wakes us.
        stop.as_mut().enable();
        if s.stopped.load(Ordering::SeqCst) {
            return write.await;
        }
        // The chunks may be held by an earlier target write that hangs: a
        // force cancel must free this write too, or detaching the hook
        // (which waits for every guest write) would wait for ever.
        let lock = tokio::select! {
            lock = s.locks.lock(start, end) => lock,
            _ = &mut stop => return write.await,
        };
        // The target write starts at once, alongside the source write (the
        // guest waits for the slower of the two, not their sum), in a task
        // that keeps the chunks locked until it lands: a guest whose copy
        // takes longer than `target_wait` goes on without a late target
        // write ever overtaking a newer one.
        let (offset, len) = (req.offset, req.len);
        s.active_writes.fetch_add(1, Ordering::SeqCst);
        let (source_done, source_result) = tokio::sync::oneshot::channel::<bool>();
        let shared = s.clone();
        let mut task = tokio::spawn(async move {
            let mirrored = shared.mirror_write(req).await;
            let source_ok = source_result.await.unwrap_or(false);
            if mirrored.is_ok() && source_ok {
                // Chunks the write covered whole are now equal on both
                // sides; partly covered dirty chunks stay dirty.
                let first = offset.div_ceil(g) * g;
                let last = (offset + len) / g * g;
                if last > first {
                    shared.bitmap.lock().unwrap().reset(first, last - first);
                }
            } else {
                // A failed source write leaves its range unspecified, a
                // failed target write leaves it stale: the copy loop (whose
                // error policy applies) copies it again.
                shared.mark_dirty(offset, len);
            }
            drop(lock);
            shared.active_writes.fetch_sub(1, Ordering::SeqCst);
            shared.dirtied.notify_one();
        });
        let r = write.await;
        let _ = source_done.send(r.is_ok());
        r?;
        tokio::select! {
            _ = &mut task => {}
            _ = tokio::time::sleep(s.target_wait) => {}
            _ = stop => {}
        }
        Ok(())
    }
}

/// Marks a chunk dirty again unless its copy finished: a copy that is
/// aborted half-way (cancel, completion) must not leave its chunk clean.
struct Redirty {
    shared: Arc<Shared>,
    offset: u64,
    len: u64,
    armed: bool,
}

impl Drop for Redirty {
    fn drop(&mut self) {
        if self.armed {
            self.shared.mark_dirty(self.offset, self.len);
        }
    }
}

/// Outcome of one copy.
struct CopyDone {
    offset: u64,
    len: u64,
    result: Result<(), (bool, io::Error)>,
    took: Duration,
}

/// What the copy loop carries from one turn to the next.
struct LoopState {
    ops: JoinSet<CopyDone>,
    in_flight_bytes: u64,
    /// Where the next search for dirty chunks starts (round robin).
    cursor: u64,
    /// `auto`: the lowest dirty count seen, and when it last fell.
    best_dirty: u64,
    last_progress: Instant,
    last_log: Instant,
    /// Under a duty cycle, no copy starts before this (guest.rs).
    paused_until: Instant,
    /// The mode the pacer's baseline was measured in.
    paced_write_blocking: bool,
    /// The window of copies the guest leaves (guest.rs).
    pacer: Pacer,
}

/// Whether the copy loop goes on with this turn or looks again first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    Go,
    Again,
}

/// The mirror job.
pub struct Mirror {
    opts: MirrorOptions,
    shared: Arc<Shared>,
    hook: Arc<dyn WriteHook>,
    /// The mode asked for (`auto` stays `auto` while the hook's mode moves).
    requested_mode: Mutex<CopyMode>,
    actively_synced: AtomicBool,
    /// Copy throughput estimate in bytes per second, for completion budgets.
    copy_rate: AtomicU64,
    /// What the sync mode marked dirty at the start (the first pass).
    initial_dirty: AtomicU64,
}

impl Mirror {
    /// A mirror job; nothing happens until the job runs.
    pub fn new(opts: MirrorOptions) -> Arc<Mirror> {
        let size = opts.source.size();
        let shared = Arc::new(Shared {
            source: opts.source.clone(),
            target: opts.target.clone(),
            bitmap: Mutex::new(DirtyBitmap::new(size, opts.granularity)),
            locks: RangeLocks::new(),
            mode: AtomicU8::new(if opts.copy_mode == CopyMode::WriteBlocking {
                MODE_WRITE_BLOCKING
            } else {
                MODE_BACKGROUND
            }),
            background_writes: AtomicU64::new(0),
            guest: GuestActivity::new(),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
            dirtied: Notify::new(),
            active_writes: AtomicU64::new(0),
            target_wait: opts.tuning.hold,
            offload: offload::Offload::new(),
        });
        let hook: Arc<dyn WriteHook> = Arc::new(MirrorHook {
            shared: shared.clone(),
        });
        Arc::new(Mirror {
            requested_mode: Mutex::new(opts.copy_mode),
            opts,
            shared,
            hook,
            actively_synced: AtomicBool::new(false),
            copy_rate: AtomicU64::new(0),
            initial_dirty: AtomicU64::new(0),
        })
    }

    fn switch_to_write_blocking(&self) {
        if self.shared.mode.swap(MODE_WRITE_BLOCKING, Ordering::SeqCst) != MODE_WRITE_BLOCKING {
            tracing::info!("mirror: switching to write-blocking");
        }
    }

    /// Marks what the chosen sync mode has to copy; returns the bytes
    /// found already equal (zeroes on both sides), which count as done.
    async fn dirty_init(&self) -> io::Result<u64> {
        let size = self.opts.source.size();
        match self.opts.sync {
            MirrorSync::None => {}
            MirrorSync::Full => return self.dirty_init_full().await,
            MirrorSync::Top => {
                let mut off = 0;
                while off < size {
                    let st = self.opts.source.block_status(off, size - off).await?;
                    if st.depth == 1 {
                        self.shared.bitmap.lock().unwrap().set(off, st.len);
                    }
                    off += st.len;
                }
            }
        }
        Ok(0)
    }

    /// sync=full: everything but the runs the source reads as zeroes where
    /// the target already does too (a new image), found by block status, so
    /// that a sparse disk costs its extents rather than its size. A guest
    /// write meanwhile marks its range itself (the hook is on).
    async fn dirty_init_full(&self) -> io::Result<u64> {
        let (source, target) = (&self.opts.source, &self.opts.target);
        let size = source.size();
        let mut off = 0;
        while off < size {
            let Ok(st) = source.block_status(off, size - off).await else {
                // The copy loop meets the error again, under the job's policy.
                self.shared.bitmap.lock().unwrap().set(off, size - off);
                break;
            };
            if !(st.zero && target.reads_as_zeroes(off, st.len).await) {
                self.shared.bitmap.lock().unwrap().set(off, st.len);
            }
            off += st.len;
        }
        Ok(size - self.shared.dirty_bytes())
    }

    /// Takes `[offset, offset+len)` out of the bitmap and returns the copy of
    /// it to spawn; the chunk becomes dirty again if the copy does not finish.
    fn start_copy(
        shared: &Arc<Shared>,
        offset: u64,
        len: u64,
    ) -> impl std::future::Future<Output = CopyDone> + Send + 'static {
        shared.bitmap.lock().unwrap().reset(offset, len);
        let redirty = Redirty {
            shared: shared.clone(),
            offset,
            len,
            armed: true,
        };
        let shared = shared.clone();
        async move {
            // Moved whole into the future, so dropping the future drops it.
            let mut redirty = redirty;
            let done = Self::copy_chunk(shared, offset, len).await;
            // copy_chunk marks failures dirty itself.
            redirty.armed = false;
            done
        }
    }

    /// Largest copy the loop issues: larger when the copy is offloaded (no
    /// buffer holds it), within the buffer size; the pacer shrinks it while
    /// the guest is busy.
    fn copy_max(&self) -> u64 {
        let kernel = self
            .shared
            .offload
            .active(&self.opts.source, &self.opts.target);
        let max = if kernel {
            offload::IDLE_CHUNK
        } else {
            MAX_COPY
        };
        max.min(self.opts.buf_size)
    }

    /// Copies `[offset, offset+len)` from source to target once the range is
    /// free of guest writes; zero ranges become write-zeroes.
    async fn copy_chunk(shared: Arc<Shared>, offset: u64, len: u64) -> CopyDone {
        let started = Instant::now();
        let _lock = shared.locks.lock(offset, offset + len).await;
        // Cleared before reading: a guest write racing with the copy marks it again.
        shared.bitmap.lock().unwrap().reset(offset, len);
        let result = async {
            let st = shared
                .source
                .block_status(offset, len)
                .await
                .map_err(|e| (true, e))?;
            if st.zero && st.len >= len {
                return shared
                    .target
                    .write_zeroes(
                        offset,
                        len,
                        ZeroFlags {
                            may_unmap: true,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| (false, e));
            }
            // Inside the kernel where both ends allow it; what it did not
            // copy goes through a buffer (which also tells a read error
            // from a write error).
            let offloaded = shared
                .offload
                .copy(&shared.source, &shared.target, offset, len, false)
                .await;
            if offloaded >= len {
                return Ok(());
            }
            let (offset, len) = (offset + offloaded, len - offloaded);
            let buf = shared
                .source
                .read(offset, len as usize)
                .await
                .map_err(|e| (true, e))?;
            shared
                .target
                .write(offset, buf, WriteFlags::default())
                .await
                .map_err(|e| (false, e))
        }
        .await;
        if result.is_err() {
            shared.bitmap.lock().unwrap().set(offset, len);
        }
        CopyDone {
            offset,
            len,
            result,
            took: started.elapsed(),
        }
    }

    fn note_rate(&self, len: u64, took: Duration) {
        let rate = (len as f64 / took.as_secs_f64().max(1e-6)) as u64;
        let old = self.copy_rate.load(Ordering::Relaxed);
        let new = if old == 0 { rate } else { (old * 7 + rate) / 8 };
        self.copy_rate.store(new, Ordering::Relaxed);
    }

    /// Handles a finished copy; `Err` ends the job.
    async fn finish_copy(&self, ctx: &JobCtx, done: CopyDone) -> livesnap_block::Result<()> {
        match done.result {
            Ok(()) => {
                self.note_rate(done.len, done.took);
                ctx.progress_update(done.len);
                Ok(())
            }
            Err((is_read, e)) => {
                let policy = if is_read {
                    self.opts.on_source_error
                } else {
                    self.opts.on_target_error
                };
                tracing::warn!("mirror: copy of {}+{} failed: {e}", done.offset, done.len);
                match ctx.io_error(policy, is_read, &e).await {
                    ErrorVerdict::Fail(msg) => Err(msg),
                    // The chunk is dirty again and will be retried.
                    ErrorVerdict::Ignore => {
                        ctx.sleep(Duration::from_millis(10)).await;
                        Ok(())
                    }
                    ErrorVerdict::Retry => Ok(()),
                }
            }
        }
    }

    fn update_remaining(&self, ctx: &JobCtx, in_flight: u64) {
        ctx.progress_set_remaining(self.shared.dirty_bytes() + in_flight);
    }

    fn want_completion(&self, ctx: &JobCtx) -> bool {
        ctx.is_ready() && (ctx.complete_requested() || ctx.cancel_requested())
    }

    /// The copy loop (QEMU's `mirror_run`): runs until completion was asked
    /// for and done, or the job is cancelled. Each turn watches `auto`,
    /// reports READY once in sync, completes when asked, and otherwise runs
    /// one iteration and waits for something to happen.
    async fn run_loop(&self, ctx: &JobCtx) -> livesnap_block::Result<()> {
        let mut st = LoopState {
            ops: JoinSet::new(),
            in_flight_bytes: 0,
            cursor: 0,
            best_dirty: u64::MAX,
            last_progress: Instant::now(),
            last_log: Instant::now(),
            paused_until: Instant::now(),
            paced_write_blocking: self.shared.write_blocking(),
            pacer: Pacer::new(
                Instant::now(),
                self.opts.tuning.busy_share,
                PACED_CHUNK.max(self.opts.granularity),
                self.opts.buf_size,
            ),
        };
        let mut kicks = ctx.kicks();
        loop {
            if ctx.is_cancelled() {
                st.ops.abort_all();
                return Err(livesnap_block::Error::invalid("Operation canceled"));
            }
            let dirty = self.shared.dirty_bytes();
            self.update_remaining(ctx, st.in_flight_bytes);
            self.log_state(ctx, &mut st, dirty);
            self.watch_auto(&mut st, dirty);
            if self.sync_point(ctx, &st, dirty).await? == Turn::Again {
                continue;
            }
            if self.want_completion(ctx) {
                // Aborted copies left their chunks dirty; completion copies them.
                st.ops.abort_all();
                while let Some(r) = st.ops.join_next().await {
                    if let Ok(done) = r {
                        let _ = self.finish_copy(ctx, done).await;
                    }
                }
                return self.complete_bounded(ctx).await;
            }
            let issued = self.iteration(ctx, &mut st);
            self.wait_for_progress(ctx, &mut st, &mut kicks, issued)
                .await?;
            ctx.pause_point().await;
        }
    }

    /// Once a second at debug level: what the loop sees.
    fn log_state(&self, ctx: &JobCtx, st: &mut LoopState, dirty: u64) {
        if st.last_log.elapsed() < Duration::from_secs(1) {
            return;
        }
        st.last_log = Instant::now();
        let shared = &self.shared;
        tracing::debug!(
            "mirror {}: dirty {dirty} in flight {} ({} ops) write-blocking {} window {} guest loss {:.2} rate {}",
            ctx.id(),
            st.in_flight_bytes,
            st.ops.len(),
            shared.write_blocking(),
            st.pacer.window(),
            st.pacer.last_loss(),
            self.copy_rate.load(Ordering::Relaxed)
        );
    }

    /// livesnap's auto mode: write-blocking once background stops gaining
    /// (the dirty count has not fallen by 5% for `auto_patience`).
    fn watch_auto(&self, st: &mut LoopState, dirty: u64) {
        if *self.requested_mode.lock().unwrap() != CopyMode::Auto || self.shared.write_blocking() {
            return;
        }
        if st.best_dirty == u64::MAX || (dirty as u128) * 20 < (st.best_dirty as u128) * 19 {
            st.best_dirty = dirty;
            st.last_progress = Instant::now();
        } else if st.last_progress.elapsed() >= self.opts.tuning.auto_patience && dirty > 0 {
            // Also in READY: completion's hold would cope with a little
            // dirt, but a caller that waits for `offset == len` before it
            // completes (Nova, libvirt) needs the job to get clean, which
            // only write-blocking guarantees under a busy guest.
            self.switch_to_write_blocking();
        }
    }

    /// READY and "actively synced": flushes the target and reports READY
    /// the first time the job is in sync. [`Turn::Again`] when the loop
    /// must look again before going on.
    async fn sync_point(
        &self,
        ctx: &JobCtx,
        st: &LoopState,
        dirty: u64,
    ) -> livesnap_block::Result<Turn> {
        let shared = &self.shared;
        let clean = dirty == 0
            && st.ops.is_empty()
            && shared.active_writes.load(Ordering::SeqCst) == 0
            && shared.background_writes.load(Ordering::SeqCst) == 0;
        // `auto` is READY once what is dirty fits in one completion hold:
        // its completion is bounded, so waiting for a clean instant (QEMU's
        // READY) would only push the guest into write-blocking. Only after
        // the first pass, though: READY tells users the bulk of the copy is
        // done.
        let auto = *self.requested_mode.lock().unwrap() == CopyMode::Auto;
        let first_pass_done = ctx.progress().0 >= self.initial_dirty.load(Ordering::Relaxed);
        let settled = |dirty: u64| auto && first_pass_done && dirty <= self.hold_budget();
        if !(clean || (settled(dirty) && !ctx.is_ready())) {
            return Ok(Turn::Go);
        }
        if ctx.is_ready() {
            if shared.write_blocking() {
                self.actively_synced.store(true, Ordering::SeqCst);
            }
            return Ok(Turn::Go);
        }
        if let Err(e) = self.flush_target(ctx).await {
            let verdict = ctx.io_error(self.opts.on_target_error, false, &e).await;
            if let ErrorVerdict::Fail(m) = verdict {
                return Err(m);
            }
            return Ok(Turn::Again);
        }
        let dirty = shared.dirty_bytes();
        if dirty == 0 || settled(dirty) {
            if dirty == 0 && shared.write_blocking() {
                self.actively_synced.store(true, Ordering::SeqCst);
            }
            ctx.set_ready();
        }
        Ok(Turn::Again)
    }

    /// One iteration (QEMU's `mirror_iteration`): issues copies of dirty
    /// runs within the rate limit, the buffer, the in-flight limit and the
    /// window the guest leaves (guest.rs). Returns whether it issued any.
    fn iteration(&self, ctx: &JobCtx, st: &mut LoopState) -> bool {
        let shared = &self.shared;
        let now = Instant::now();
        // Write-blocking makes each guest write slower by itself: that is
        // the guest's new baseline, not a cost of the background copy.
        if shared.write_blocking() != st.paced_write_blocking {
            st.paced_write_blocking = shared.write_blocking();
            st.pacer.forget_baseline();
        }
        st.pacer.set_speed_limited(ctx.speed() > 0);
        // What is left fits in one period at the measured rate: finish it
        // (the first pass of a small disk is over before a probe could end).
        let left = shared.dirty_bytes() + st.in_flight_bytes;
        let rate = self.copy_rate.load(Ordering::Relaxed) as f64;
        if (left as f64) <= rate * PERIOD.as_secs_f64() {
            st.pacer.finishing();
        } else {
            st.pacer.tick(now, &shared.guest, st.in_flight_bytes);
        }
        let window = st.pacer.window().min(self.opts.buf_size);
        let max_len = st.pacer.chunk(self.copy_max());
        let mut issued = false;
        while st.ops.len() < MAX_IN_FLIGHT && st.in_flight_bytes < window && now >= st.paused_until
        {
            if !ctx.ratelimit_delay().is_zero() {
                break;
            }
            let run = {
                let bm = shared.bitmap.lock().unwrap();
                bm.next_dirty_run(st.cursor, max_len)
                    .or_else(|| bm.next_dirty_run(0, max_len))
            };
            let Some((off, len)) = run else { break };
            // Skip runs a guest write or another copy holds right now.
            if shared.locks.try_lock(off, off + len).is_none() && !st.ops.is_empty() {
                st.cursor = off + len;
                if st.cursor >= shared.source.size() {
                    st.cursor = 0;
                }
                break;
            }
            st.cursor = off + len;
            st.in_flight_bytes += len;
            ctx.ratelimit_account(len);
            st.ops.spawn(Self::start_copy(shared, off, len));
            issued = true;
        }
        issued
    }

    /// Waits for a copy to end, a guest write, the rate limit, a job verb,
    /// the pacer's next period or 50 ms; a finished copy is accounted, and
    /// under a duty cycle the loop starts no copy for the guest's part of
    /// the time.
    async fn wait_for_progress(
        &self,
        ctx: &JobCtx,
        st: &mut LoopState,
        kicks: &mut tokio::sync::watch::Receiver<u64>,
        issued: bool,
    ) -> livesnap_block::Result<()> {
        let delay = ctx.ratelimit_delay();
        let idle_ops = st.ops.is_empty();
        // Nothing may start before the pacer's next look (a probe, a pause):
        // wait for it instead of waking for every guest write.
        let probing = st.pacer.window() == 0;
        let held = probing || Instant::now() < st.paused_until;
        let wake = if probing {
            st.pacer.next_tick()
        } else {
            st.paused_until
        };
        let wake = tokio::time::Instant::from_std(wake);
        tokio::select! {
            Some(r) = st.ops.join_next(), if !idle_ops => {
                let done = r.map_err(|e| {
                    livesnap_block::Error::new(
                        livesnap_block::ErrorKind::Io,
                        format!("copy task failed: {e}"),
                    )
                })?;
                st.in_flight_bytes -= done.len;
                let pause = st.pacer.pause_after(done.took);
                if !pause.is_zero() {
                    st.paused_until = st.paused_until.max(Instant::now() + pause);
                }
                self.finish_copy(ctx, done).await?;
            }
            _ = self.shared.dirtied.notified(), if idle_ops && !issued && delay.is_zero() && !held => {}
            _ = tokio::time::sleep_until(wake), if idle_ops && held => {}
            _ = tokio::time::sleep(delay), if !delay.is_zero() => {}
            _ = kicks.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        Ok(())
    }

    /// Flushes the target; a force cancel interrupts a flush that hangs.
    async fn flush_target(&self, ctx: &JobCtx) -> io::Result<()> {
        let mut kicks = ctx.kicks();
        let flush = self.opts.target.flush();
        tokio::pin!(flush);
        loop {
            tokio::select! {
                r = &mut flush => return r,
                _ = kicks.changed() => {
                    if ctx.is_cancelled() {
                        return Err(io::Error::from_raw_os_error(libc::ECANCELED));
                    }
                }
            }
        }
    }

    /// Bytes that can be copied within half a hold at the measured rate.
    fn hold_budget(&self) -> u64 {
        let rate = self.copy_rate.load(Ordering::Relaxed).max(64 << 20);
        (rate as f64 * self.opts.tuning.hold.as_secs_f64() / 2.0) as u64
    }

    /// Holds every export of the node being replaced, within `limit`.
    async fn hold_guests(&self, limit: Duration) -> Option<Vec<BackendHold>> {
        hold_all(self.opts.exports.backends_of(&self.opts.replaces), limit).await
    }

    /// Copies every dirty chunk now, at full speed; `Ok(false)` if `deadline` passed first.
    async fn copy_all_dirty(
        &self,
        ctx: &JobCtx,
        deadline: tokio::time::Instant,
    ) -> livesnap_block::Result<bool> {
        let mut ops: JoinSet<CopyDone> = JoinSet::new();
        let mut kicks = ctx.kicks();
        loop {
            while ops.len() < MAX_IN_FLIGHT {
                let run = self
                    .shared
                    .bitmap
                    .lock()
                    .unwrap()
                    .next_dirty_run(0, MAX_COPY);
                let Some((off, len)) = run else { break };
                ops.spawn(Self::start_copy(&self.shared, off, len));
            }
            if ops.is_empty() {
                if self.shared.active_writes.load(Ordering::SeqCst) == 0 {
                    return Ok(true);
                }
                // Mirrored guest writes still landing: wait, then look again.
                tokio::select! {
                    _ = self.shared.dirtied.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                    _ = tokio::time::sleep_until(deadline) => return Ok(false),
                }
                continue;
            }
            tokio::select! {
                Some(r) = ops.join_next() => {
                    let done = r.map_err(|e| {
                        livesnap_block::Error::new(
                            livesnap_block::ErrorKind::Io,
                            format!("copy task failed: {e}"),
                        )
                    })?;
                    self.finish_copy(ctx, done).await?;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    ops.abort_all();
                    while ops.join_next().await.is_some() {}
                    return Ok(false);
                }
                _ = kicks.changed() => {}
            }
            if ctx.is_cancelled() {
                ops.abort_all();
                return Err(livesnap_block::Error::invalid("Operation canceled"));
            }
        }
    }

    /// Finishes the job within the documented bound: see the module doc.
    async fn complete_bounded(&self, ctx: &JobCtx) -> livesnap_block::Result<()> {
        let tuning = self.opts.tuning;
        let mut attempt = 0u32;
        loop {
            if ctx.is_cancelled() {
                return Err(livesnap_block::Error::invalid("Operation canceled"));
            }
            let dirty = self.shared.dirty_bytes();
            let must_finish = attempt >= tuning.attempts;
            // Too much to copy in one hold: converge write-blocking first.
            if dirty > self.hold_budget() || (must_finish && dirty > 0) {
                self.switch_to_write_blocking();
                let deadline = tokio::time::Instant::now() + tuning.hold;
                self.copy_all_dirty(ctx, deadline).await?;
                if !must_finish {
                    attempt += 1;
                }
                continue;
            }
            let Some(holds) = self.hold_guests(tuning.hold).await else {
                self.switch_to_write_blocking();
                attempt += 1;
                continue;
            };
            let deadline = tokio::time::Instant::now() + tuning.hold;
            let done = self.copy_all_dirty(ctx, deadline).await?;
            if !done || self.shared.dirty_bytes() != 0 {
                drop(holds);
                self.switch_to_write_blocking();
                attempt += 1;
                continue;
            }
            if let Err(e) = self.flush_target(ctx).await {
                drop(holds);
                match ctx.io_error(self.opts.on_target_error, false, &e).await {
                    ErrorVerdict::Fail(m) => return Err(m),
                    _ => continue,
                }
            }
            // The point in time. From here the source's writes are no longer mirrored.
            self.shared.stopped.store(true, Ordering::SeqCst);
            self.shared.stop.notify_waiters();
            let pivot = ctx.complete_requested() && !ctx.cancel_requested();
            if pivot {
                for h in &holds {
                    h.replace_root(self.opts.target.clone());
                }
                self.opts
                    .exports
                    .pivoted(&self.opts.replaces, &self.opts.target);
            }
            drop(holds);
            ctx.progress_set_remaining(0);
            return Ok(());
        }
    }

    /// Stops mirroring guest writes and releases any of them waiting on the target.
    fn stop_hook(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.stop.notify_waiters();
    }
}

impl JobDriver for Mirror {
    fn job_type(&self) -> JobType {
        JobType::Mirror
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> JobFuture<'a, livesnap_block::Result<()>> {
        Box::pin(async move {
            if self.opts.target.size() != self.opts.source.size() {
                return Err(livesnap_block::Error::invalid(
                    "Source and target image have different sizes",
                ));
            }
            // Attaching drains the source's writes: none can land unseen after this.
            self.opts.source.add_write_hook(self.hook.clone()).await;
            // The walk asks the target too, which may hang: a cancel ends it
            // (it holds nothing but its block-status queries).
            let mut kicks = ctx.kicks();
            let init = self.dirty_init();
            tokio::pin!(init);
            let equal = loop {
                tokio::select! {
                    r = &mut init => break r?,
                    _ = kicks.changed() => {
                        if ctx.is_cancelled() {
                            return Err(livesnap_block::Error::invalid("Operation canceled"));
                        }
                    }
                }
            };
            ctx.progress_update(equal);
            self.initial_dirty
                .store(equal + self.shared.dirty_bytes(), Ordering::Relaxed);
            self.update_remaining(ctx, 0);
            self.run_loop(ctx).await
        })
    }

    fn complete(&self, _ctx: &JobCtx) -> livesnap_block::Result<()> {
        Ok(())
    }

    fn cancel(&self, ctx: &JobCtx, force: bool) -> bool {
        // Before READY any cancel is a force cancel (QEMU's mirror_cancel).
        let force = force || !ctx.is_ready();
        if force {
            self.stop_hook();
        }
        force
    }

    fn clean<'a>(&'a self, _ctx: &'a JobCtx) -> JobFuture<'a, ()> {
        Box::pin(async move {
            self.stop_hook();
            self.opts.source.remove_write_hook(&self.hook).await;
            for (node, user) in &self.opts.users {
                node.remove_user(user);
            }
        })
    }

    fn change(&self, _ctx: &JobCtx, options: &Map<String, Value>) -> livesnap_block::Result<()> {
        let Some(mode) = options.get("copy-mode") else {
            return Ok(());
        };
        let mode = mode
            .as_str()
            .and_then(CopyMode::parse)
            .ok_or_else(|| livesnap_block::Error::invalid("Invalid parameter 'copy-mode'"))?;
        let mut requested = self.requested_mode.lock().unwrap();
        if *requested == mode {
            return Ok(());
        }
        match mode {
            CopyMode::WriteBlocking => {
                *requested = mode;
                self.switch_to_write_blocking();
                Ok(())
            }
            // An auto mirror still copying in the background is, to a caller
            // written for QEMU (whose default is background), already in that
            // mode: QEMU's no-op. Asked for explicitly, it stays there.
            CopyMode::Background
                if *requested == CopyMode::Auto && !self.shared.write_blocking() =>
            {
                *requested = mode;
                Ok(())
            }
            other => Err(livesnap_block::Error::invalid(format!(
                "Change to copy mode '{}' is not implemented",
                other.as_str()
            ))),
        }
    }

    fn block_job_info(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            "actively-synced".into(),
            json!(self.actively_synced.load(Ordering::SeqCst)),
        );
        m
    }
}
