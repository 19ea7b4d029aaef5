//! The backup job (QEMU's `block/backup.c`): a copy-before-write filter on
//! the source keeps the target at the job's start while a background pass
//! copies everything else, each cluster at most once. There is no
//! convergence loop: the work is bounded by the disk size.
//!
//! The filter ([`Cbw`]) is attached by whoever creates the job, before the
//! job exists: its attach is the point in time. The job then walks the
//! pending clusters in large chunks (`x-perf` `max-chunk`, 1 MiB by default)
//! with up to `max-workers` copies in flight, holes and zeroes becoming
//! write-zeroes. While the guest is writing (or reading) the source, the pass
//! takes a bounded share of the time instead: one smaller chunk in flight,
//! then an idle pause so that copying fills at most `busy_share` of the
//! time (docs/decisions.md). sync=top first drops the clusters the top layer
//! does not allocate; sync=none copies nothing in the background and runs
//! until cancelled, so only what the guest overwrites reaches the target.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use livesnap_block::{offload, BlockGraph, BlockNode, Error, NodeUser, Thaw, Use};

use crate::block_copy::{BlockCopy, CopyError, CopyProgress, ZeroStep, MAX_CHUNK, MAX_WORKERS};
use crate::cbw::{Cbw, CbwDriver, CbwOptions, CLOSE_GRACE};
use crate::job::{
    ErrorVerdict, Job, JobCtx, JobDriver, JobFuture, JobManager, JobOptions, JobTxn, JobType,
    OnError,
};

/// QEMU's `MirrorSyncMode` members a backup supports (`incremental` is
/// `bitmap` with `on-success`, desugared by whoever parses it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupSync {
    /// The whole disk.
    Full,
    /// Only what the top layer allocates.
    Top,
    /// Only what the guest overwrites while the job runs.
    None,
    /// Only what the sync bitmap says is dirty at the job's start.
    Bitmap,
}

/// QEMU's `BitmapSyncMode`: what the job's end does to its bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapMode {
    /// Cleared of what was copied if the job succeeds, untouched otherwise.
    OnSuccess,
    /// Cleared of what was copied whatever the outcome.
    Always,
    /// Never changed by the job (writes during the job are still recorded).
    Never,
}

impl BitmapMode {
    /// QEMU's enum members, in schema order.
    pub const NAMES: &'static [&'static str] = &["on-success", "never", "always"];

    /// Parses a member of [`BitmapMode::NAMES`].
    pub fn parse(s: &str) -> Option<BitmapMode> {
        match s {
            "on-success" => Some(BitmapMode::OnSuccess),
            "never" => Some(BitmapMode::Never),
            "always" => Some(BitmapMode::Always),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

/// The named bitmap of the source a backup reads (sync=bitmap) or updates.
#[derive(Clone, Debug)]
pub struct SyncBitmap {
    /// The bitmap's name on the source node.
    pub name: String,
    /// What the job's end does to it.
    pub mode: BitmapMode,
}

/// Chunk size of the background pass while the guest is busy: a guest write
/// that hits a chunk being copied waits for all of it.
pub const BUSY_CHUNK: u64 = 256 << 10;

/// Default share of the time the background pass copies while the guest is busy.
pub const DEFAULT_BUSY_SHARE: f64 = 0.5;

/// Longest idle pause the pass takes at once (it re-checks the guest after).
const MAX_YIELD: Duration = Duration::from_millis(100);

/// What a backup job does besides the filter.
#[derive(Clone, Copy, Debug)]
pub struct BackupOptions {
    /// What to copy.
    pub sync: BackupSync,
    /// Policy for source read errors of the background pass.
    pub on_source_error: OnError,
    /// Policy for target write errors of the background pass.
    pub on_target_error: OnError,
    /// Background copies in flight while the guest is idle (QEMU's `max-workers`).
    pub max_workers: usize,
    /// Largest background copy (QEMU's `max-chunk`; 0 = the default, 1 MiB).
    pub max_chunk: u64,
    /// Share of the time the pass may copy while the guest is busy (0 < s <= 1; 1 = never yield).
    pub busy_share: f64,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            sync: BackupSync::Full,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            max_workers: MAX_WORKERS,
            max_chunk: 0,
            busy_share: DEFAULT_BUSY_SHARE,
        }
    }
}

/// What starts a backup: its nodes and options, the arguments checked.
pub struct BackupStart {
    /// The job's id.
    pub job_id: String,
    /// The disk backed up.
    pub source: Arc<BlockNode>,
    /// Where its old content goes.
    pub target: Arc<BlockNode>,
    /// The name of the copy-before-write filter node put over the source.
    pub filter_name: String,
    /// The filter's options.
    pub cbw: CbwOptions,
    /// The job's own options.
    pub backup: BackupOptions,
    /// The source's bitmap the job reads or updates (checked by the caller
    /// against QEMU's rules for sync modes).
    pub bitmap: Option<SyncBitmap>,
    /// Options every job has.
    pub job: JobOptions,
    /// Longest wait for the source's in-flight writes before the filter
    /// goes on (its point in time).
    pub drain_timeout: Duration,
}

/// Starts a backup as QEMU's `blockdev-backup` does: [`prepare`], then
/// the job starts.
pub async fn start(
    graph: &Arc<BlockGraph>,
    jobs: &Arc<JobManager>,
    s: BackupStart,
) -> livesnap_block::Result<Arc<Job>> {
    let job = prepare(graph, jobs, s, None).await?;
    job.start();
    Ok(job)
}

/// QEMU's checks of the sync bitmap in `backup_job_create`, which come
/// after the op blockers and before the sizes: it must exist and not be
/// busy or inconsistent, and unless the job leaves it alone (`never`) it
/// must not be read-only.
pub fn check_bitmap(source: &BlockNode, b: &SyncBitmap) -> livesnap_block::Result<()> {
    let what = match b.mode {
        BitmapMode::Never => Use::Read,
        BitmapMode::OnSuccess | BitmapMode::Always => Use::Modify,
    };
    source.bitmaps().checked(&b.name, what).map(|_| ())
}

/// QEMU's `backup_job_create`: the sync bitmap is frozen and the
/// copy-before-write filter goes over the source at one instant (the point
/// in time), the filter becomes a node of `graph`, the job's op blockers go
/// on the filter and the target, and the job is created in `txn` (grouped
/// completion) but not started; if any step fails, what the earlier ones
/// did is undone. A created job that is cancelled instead of started
/// undoes all of it (a transaction's abort).
pub async fn prepare(
    graph: &Arc<BlockGraph>,
    jobs: &Arc<JobManager>,
    s: BackupStart,
    txn: Option<&Arc<JobTxn>>,
) -> livesnap_block::Result<Arc<Job>> {
    if let Some(b) = &s.bitmap {
        check_bitmap(&s.source, b)?;
    }
    if s.source.size() != s.target.size() {
        return Err(Error::invalid(
            "Source and target image have different sizes",
        ));
    }
    let sync = s.backup.sync;
    let freeze = s.bitmap.as_ref().map(|b| b.name.clone());
    let source = s.source.clone();
    let attach = Cbw::attach_with(s.source.clone(), s.target.clone(), s.cbw, |copy| {
        let Some(name) = &freeze else {
            return Ok(false);
        };
        let frozen = source.bitmaps().freeze(name)?;
        if sync == BackupSync::Bitmap {
            copy.set_pending(&frozen);
        }
        Ok(true)
    });
    let (cbw, frozen) = match tokio::time::timeout(s.drain_timeout, attach).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(e.context("Could not create node: Cannot create block-copy-state"))
        }
        Err(_) => {
            return Err(Error::busy(format!(
                "Requests on '{}' did not finish within {} s; backup not started",
                s.source.name(),
                s.drain_timeout.as_secs()
            )))
        }
    };
    let sync_bitmap = match (s.bitmap, frozen) {
        (Some(b), true) => Some(FrozenBitmap {
            name: b.name,
            mode: b.mode,
        }),
        _ => None,
    };
    let filter = BlockNode::new(
        s.filter_name.clone(),
        Box::new(CbwDriver::new(cbw.clone())),
        false,
        false,
    );
    if let Err(e) = graph.insert(filter.clone()) {
        cbw.close().await;
        if let Some(b) = &sync_bitmap {
            b.reclaim(&s.source);
        }
        return Err(e.context("Could not create node"));
    }
    let blocker = NodeUser::Blocker("backup");
    filter.add_user(blocker.clone());
    s.target.add_user(blocker.clone());
    let undo = {
        let graph = Arc::downgrade(graph);
        let (filter, target) = (filter.clone(), s.target.clone());
        move || {
            filter.remove_user(&blocker);
            target.remove_user(&blocker);
            if let Some(g) = graph.upgrade() {
                g.discard(filter.name());
            }
        }
    };
    let undo = Arc::new(Mutex::new(Some(Box::new(undo) as Cleanup)));
    let on_clean = undo.clone();
    let backup = Backup::new(
        cbw.clone(),
        s.backup,
        Box::new(move || {
            if let Some(f) = on_clean.lock().unwrap().take() {
                f()
            }
        }),
    );
    *backup.sync_bitmap.lock().unwrap() = sync_bitmap;
    match jobs.create_in(&s.job_id, backup.clone(), s.job, txn) {
        Ok(job) => {
            backup.attach_progress(&job.ctx());
            Ok(job)
        }
        Err(e) => {
            cbw.close().await;
            backup.end_sync_bitmap(false).await;
            if let Some(f) = undo.lock().unwrap().take() {
                f()
            }
            Err(e)
        }
    }
}

/// A sync bitmap frozen by a backup.
struct FrozenBitmap {
    name: String,
    mode: BitmapMode,
}

impl FrozenBitmap {
    /// Puts the frozen content back (QEMU's reclaim): the bitmap is as if
    /// the job had never run, plus the writes since.
    fn reclaim(&self, source: &BlockNode) {
        source.bitmaps().thaw(&self.name, Thaw::Reclaim);
    }
}

/// Releases what the creator set up around the job (the filter node, node
/// users), once the job is over.
pub type Cleanup = Box<dyn FnOnce() + Send>;

/// A `blockdev-backup` job.
pub struct Backup {
    cbw: Arc<Cbw>,
    opts: BackupOptions,
    cleanup: Mutex<Option<Cleanup>>,
    // Taken when the job ends, by commit or abort.
    sync_bitmap: Mutex<Option<FrozenBitmap>>,
    // `run` began: the job may have copied something.
    ran: AtomicBool,
    // When the job last went on after a stop: copies started before then
    // failed in the same incident, and are retried without a new error.
    resumed_at: Mutex<Option<Instant>>,
}

struct JobProgress(JobCtx);

impl CopyProgress for JobProgress {
    fn work_done(&self, bytes: u64) {
        self.0.progress_update(bytes);
    }

    fn set_remaining(&self, bytes: u64) {
        self.0.progress_set_remaining(bytes);
    }

    fn guest_copy(&self, bytes: u64) {
        // As QEMU's block-copy: the guest's copies count against `speed`
        // (the background pass waits longer) but are never held back.
        self.0.ratelimit_account(bytes);
    }
}

impl Backup {
    /// A job over an attached filter; `cleanup` runs when the job is cleaned up.
    pub fn new(cbw: Arc<Cbw>, opts: BackupOptions, cleanup: Cleanup) -> Arc<Backup> {
        // sync=none copies nothing itself, so it never meets an error to
        // stop on and never resumes: a held guest write would only wait.
        if opts.sync != BackupSync::None {
            cbw.set_stop_policy(opts.on_source_error, opts.on_target_error);
        }
        Arc::new(Backup {
            cbw,
            opts,
            cleanup: Mutex::new(Some(cleanup)),
            sync_bitmap: Mutex::new(None),
            ran: AtomicBool::new(false),
            resumed_at: Mutex::new(None),
        })
    }

    /// Ends the freeze of the sync bitmap as QEMU's
    /// `backup_cleanup_sync_bitmap`: `on-success` after a success and
    /// `always` drop what the job was to copy (writes since the start stay
    /// recorded); otherwise the frozen content comes back; a failed `always`
    /// job gives back the clusters it did not copy.
    async fn end_sync_bitmap(&self, succeeded: bool) {
        let Some(b) = self.sync_bitmap.lock().unwrap().take() else {
            return;
        };
        let source = self.cbw.file();
        let sync = (succeeded || b.mode == BitmapMode::Always) && b.mode != BitmapMode::Never;
        // A job that never ran (a transaction rolled back) copied nothing
        // and leaves the bitmap as it was; QEMU would merge its whole
        // copy-before-write bitmap into an `always` one (docs/qmp.md).
        if !sync || !self.ran.load(Ordering::SeqCst) {
            b.reclaim(source);
        } else if succeeded {
            source.bitmaps().thaw(&b.name, Thaw::Abdicate(None));
        } else {
            // Copies still in flight decide whether their clusters count as
            // copied (QEMU waits for them too); one that hangs counts as not.
            let copy = self.cbw.copy();
            let _ = tokio::time::timeout(CLOSE_GRACE, copy.wait_settled()).await;
            source
                .bitmaps()
                .thaw(&b.name, Thaw::Abdicate(Some(copy.uncopied())));
        }
    }

    /// Sends the copy's progress to the job from now on (before the job
    /// starts, so its `len` is right from the first query).
    pub fn attach_progress(&self, ctx: &JobCtx) {
        self.cbw
            .copy()
            .set_progress(Some(Arc::new(JobProgress(ctx.clone()))));
    }

    /// The filter the job runs over.
    pub fn cbw(&self) -> &Arc<Cbw> {
        &self.cbw
    }

    fn chunk(&self) -> u64 {
        let copy = self.cbw.copy();
        let cluster = copy.cluster_size();
        // Offloaded copies hold no buffer: larger ones cost less each.
        let default = if copy.offloads() {
            offload::IDLE_CHUNK
        } else {
            MAX_CHUNK
        };
        let chunk = cluster.max(default);
        if self.opts.max_chunk == 0 {
            chunk
        } else {
            chunk.min(self.opts.max_chunk).max(cluster)
        }
    }

    /// The job's failure if the snapshot was broken (break-snapshot).
    fn broken(&self) -> livesnap_block::Result<()> {
        match self.cbw.snapshot_error() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// sync=top: drop what the top layer does not allocate. Copies meanwhile
    /// check allocation themselves.
    async fn scan_top(&self, ctx: &JobCtx) -> livesnap_block::Result<()> {
        let copy = self.cbw.copy();
        copy.set_skip_unallocated(true);
        let mut offset = 0;
        while offset < copy.len() {
            if ctx.is_cancelled() {
                return Ok(());
            }
            ctx.pause_point().await;
            offset = copy.reset_unallocated(offset).await?;
        }
        copy.set_skip_unallocated(false);
        Ok(())
    }

    /// Settles the source's zero runs from `at` on, ahead of the copy
    /// loop's next claim (see [`BlockCopy::settle_zero_run`]), and returns
    /// where that claim starts looking. In the loop's order, so a job that
    /// stops at an error has copied what QEMU's would have. Not under a
    /// speed limit: as in QEMU, a backup's zeroes count against `speed`,
    /// which the loop's chunks account. `data_until` remembers the end of
    /// the data run last seen, so a full disk asks once per run.
    async fn settle_zeroes(
        &self,
        ctx: &JobCtx,
        mut at: u64,
        data_until: &mut u64,
    ) -> livesnap_block::Result<u64> {
        let copy = self.cbw.copy();
        let mut kicks = ctx.kicks();
        while at >= *data_until
            && copy.pending_bytes() > 0
            && ctx.speed() == 0
            && !ctx.is_cancelled()
        {
            // A step holds a claim: on its own task it always releases it,
            // and a cancel need not wait for a target that hangs.
            let mut step = tokio::spawn({
                let copy = copy.clone();
                async move { copy.settle_zero_run(at).await }
            });
            let step = loop {
                tokio::select! {
                    r = &mut step => break r.unwrap_or(ZeroStep::Stop),
                    _ = kicks.changed() => {
                        if ctx.is_cancelled() {
                            return Ok(at);
                        }
                    }
                }
            };
            match step {
                ZeroStep::Zero(next) => at = next,
                ZeroStep::Data(end) => *data_until = end,
                ZeroStep::Stop => break,
            }
        }
        Ok(at)
    }

    /// sync=none: nothing to do but let the filter copy what the guest overwrites.
    async fn wait_cancel(&self, ctx: &JobCtx) -> livesnap_block::Result<()> {
        let mut kicks = ctx.kicks();
        loop {
            if ctx.is_cancelled() || ctx.cancel_requested() {
                return Ok(());
            }
            self.broken()?;
            ctx.pause_point().await;
            tokio::select! {
                _ = kicks.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn on_error(&self, ctx: &JobCtx, e: &CopyError) -> livesnap_block::Result<()> {
        let policy = if e.is_read {
            self.opts.on_source_error
        } else {
            self.opts.on_target_error
        };
        let verdict = ctx.io_error(policy, e.is_read, &e.error).await;
        // Guest writes held on the same error copy again (or give up, if
        // the job failed or was cancelled meanwhile).
        self.cbw.job_resumed();
        if matches!(verdict, ErrorVerdict::Retry) {
            *self.resumed_at.lock().unwrap() = Some(Instant::now());
        }
        match verdict {
            ErrorVerdict::Fail(msg) => Err(msg),
            // The range is pending again: the pass comes back to it.
            ErrorVerdict::Ignore | ErrorVerdict::Retry => Ok(()),
        }
    }

    /// The background pass (QEMU's `backup_loop` over `block_copy_async`).
    async fn copy_all(&self, ctx: &JobCtx) -> livesnap_block::Result<()> {
        let copy: &Arc<BlockCopy> = self.cbw.copy();
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Result<u64, CopyError>)>();
        let mut kicks = ctx.kicks();
        let mut in_flight = 0usize;
        let mut cursor = 0u64;
        let mut data_until = 0u64;
        let mut next_allowed = Instant::now();
        let share = self.opts.busy_share.clamp(0.01, 1.0);
        loop {
            if ctx.is_cancelled() {
                // Copies still in flight finish (or stall) on their own.
                return Ok(());
            }
            self.broken()?;
            while let Ok((started, r)) = rx.try_recv() {
                in_flight -= 1;
                self.finished(ctx, started, r, share, &mut next_allowed)
                    .await?;
            }
            ctx.pause_point().await;
            ctx.ratelimit_sleep().await;
            if ctx.is_cancelled() {
                return Ok(());
            }
            let busy = share < 1.0 && self.cbw.guest_busy();
            let limit = if busy {
                1
            } else {
                self.opts.max_workers.max(1)
            };
            let now = Instant::now();
            let waiting_share = busy && now < next_allowed;
            let claim = if in_flight >= limit || waiting_share {
                None
            } else {
                let max = if busy {
                    self.chunk().min(BUSY_CHUNK.max(copy.cluster_size()))
                } else {
                    self.chunk()
                };
                cursor = self.settle_zeroes(ctx, cursor, &mut data_until).await?;
                copy.claim_next(cursor, max).or_else(|| {
                    cursor = 0;
                    copy.claim_next(0, max)
                })
            };
            if let Some(claim) = claim {
                cursor = claim.end;
                in_flight += 1;
                ctx.ratelimit_account(claim.end - claim.start);
                let tx = tx.clone();
                let started = Instant::now();
                copy.spawn_claim(claim, move |r| {
                    let _ = tx.send((started, r));
                });
                continue;
            }
            if in_flight == 0 && !waiting_share && copy.pending_bytes() == 0 {
                // Everything is claimed or copied: wait for the guest's copies too.
                if self.wait_cbw_copies(ctx).await? {
                    return Ok(());
                }
                continue;
            }
            let pause = next_allowed
                .saturating_duration_since(now)
                .min(MAX_YIELD)
                .max(Duration::from_millis(1));
            tokio::select! {
                r = rx.recv(), if in_flight > 0 => {
                    if let Some((started, r)) = r {
                        in_flight -= 1;
                        self.finished(ctx, started, r, share, &mut next_allowed).await?;
                    }
                }
                _ = kicks.changed() => {}
                _ = tokio::time::sleep(pause), if waiting_share || in_flight == 0 => {}
            }
        }
    }

    async fn finished(
        &self,
        ctx: &JobCtx,
        started: Instant,
        r: Result<u64, CopyError>,
        share: f64,
        next_allowed: &mut Instant,
    ) -> livesnap_block::Result<()> {
        match r {
            Ok(_) => {
                if share < 1.0 && self.cbw.guest_busy() {
                    // Idle for what the guest is owed of the time this copy took.
                    let took = started.elapsed().as_secs_f64();
                    let idle = took * (1.0 - share) / share;
                    *next_allowed = Instant::now() + Duration::from_secs_f64(idle.min(1.0));
                }
                Ok(())
            }
            // One error, one stop (QEMU's block-copy call returns its first
            // error once): the other copies in flight at the stop are retried.
            Err(_)
                if self
                    .resumed_at
                    .lock()
                    .unwrap()
                    .is_some_and(|at| started <= at) =>
            {
                Ok(())
            }
            Err(e) => self.on_error(ctx, &e).await,
        }
    }

    /// Waits until copies started by guest writes are done too; then the
    /// target is complete and is flushed. Returns false when a guest's copy
    /// failed and left its range pending again (the pass goes on).
    async fn wait_cbw_copies(&self, ctx: &JobCtx) -> livesnap_block::Result<bool> {
        let copy = self.cbw.copy();
        let mut kicks = ctx.kicks();
        loop {
            if ctx.is_cancelled() {
                return Ok(true);
            }
            if copy.is_done() {
                break;
            }
            if copy.pending_bytes() > 0 {
                return Ok(false);
            }
            tokio::select! {
                _ = copy.wait_idle() => {}
                _ = kicks.changed() => {}
            }
        }
        self.broken()?;
        self.cbw.target().flush().await?;
        Ok(true)
    }
}

impl JobDriver for Backup {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> JobFuture<'a, livesnap_block::Result<()>> {
        Box::pin(async move {
            self.ran.store(true, Ordering::SeqCst);
            self.attach_progress(ctx);
            if self.opts.sync == BackupSync::Top {
                self.scan_top(ctx).await?;
            }
            match self.opts.sync {
                BackupSync::None => self.wait_cancel(ctx).await,
                BackupSync::Full | BackupSync::Top | BackupSync::Bitmap => self.copy_all(ctx).await,
            }
        })
    }

    fn commit<'a>(&'a self, _ctx: &'a JobCtx) -> JobFuture<'a, ()> {
        Box::pin(self.end_sync_bitmap(true))
    }

    fn abort<'a>(&'a self, _ctx: &'a JobCtx) -> JobFuture<'a, ()> {
        Box::pin(self.end_sync_bitmap(false))
    }

    fn cancel(&self, _ctx: &JobCtx, _force: bool) -> bool {
        // QEMU's backup_cancel: any cancel is a force cancel. Releasing the
        // filter now frees guest writes waiting on a stalled target.
        self.cbw.release();
        true
    }

    fn clean<'a>(&'a self, _ctx: &'a JobCtx) -> JobFuture<'a, ()> {
        Box::pin(async move {
            self.cbw.close().await;
            if let Some(cleanup) = self.cleanup.lock().unwrap().take() {
                cleanup();
            }
        })
    }
}
