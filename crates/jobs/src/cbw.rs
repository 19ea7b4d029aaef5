//! The `copy-before-write` filter (QEMU's `block/copy-before-write.c`): before
//! a write, write-zeroes or discard changes a cluster of its `file` child for
//! the first time, the cluster's old content is copied to the `target` child.
//! The target then holds the point-in-time image as of the filter's creation,
//! for a backup job ([`crate::backup`]) or for pull-mode readers through a
//! `snapshot-access` node ([`crate::snapshot_access`]).
//!
//! In QEMU the filter is inserted above the disk and guest writes go through
//! it. livesnap puts the interception on the disk node itself, as a
//! [`WriteHook`] attached when the filter is created and detached when it
//! goes: every write to `file` runs through it, whoever sends it (an export
//! on the disk, the filter node, a parent node), so no export has to be
//! moved onto the filter (docs/decisions.md). The filter node still exists,
//! named as in QEMU, and forwards its own I/O to `file`.
//!
//! A guest write waits only for the copy of the clusters it touches
//! (claimed in the shared [`BlockCopy`]; a cluster another request is copying
//! is waited for, never copied twice). `on-cbw-error` decides what a failed
//! (or, with `cbw-timeout`, slow) copy does to the guest write. A copy that
//! fails with an error its backup job stops on is first retried after the
//! job's resume, for at most [`PAUSED_HOLD`] (docs/decisions.md).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use livesnap_block::{
    BlockDriver, BlockNode, BlockStatus, ChildRef, DirtyBitmap, HookedWrite, IoBuf, IoFuture,
    Limits, WriteFlags, WriteHook, WriteKind, ZeroFlags,
};

use crate::block_copy::{BlockCopy, BlockCopyOptions, CopyError};
use crate::guest::GuestActivity;
use crate::job::OnError;

/// QEMU's `OnCbwError`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnCbwError {
    /// The guest write fails (default): the snapshot stays valid.
    #[default]
    BreakGuestWrite,
    /// The guest write goes on; the snapshot becomes invalid.
    BreakSnapshot,
}

impl OnCbwError {
    /// QEMU's enum members.
    pub const NAMES: &'static [&'static str] = &["break-guest-write", "break-snapshot"];

    /// Parses a member of [`OnCbwError::NAMES`].
    pub fn parse(s: &str) -> Option<OnCbwError> {
        match s {
            "break-guest-write" => Some(OnCbwError::BreakGuestWrite),
            "break-snapshot" => Some(OnCbwError::BreakSnapshot),
            _ => None,
        }
    }
}

/// Options of a copy-before-write filter (QEMU's `BlockdevOptionsCbw`).
#[derive(Clone, Copy, Debug, Default)]
pub struct CbwOptions {
    /// What a failed copy does to the guest write.
    pub on_cbw_error: OnCbwError,
    /// Seconds a copy may take before it counts as failed; 0 = no limit.
    pub cbw_timeout: u32,
    /// Smallest copy granularity (0 = the default).
    pub min_cluster_size: u64,
    /// Discard copied ranges from `file` (backup's `discard-source`).
    pub discard_source: bool,
}

/// Longest time a guest write needing a copy waits for a backup job that
/// stops on the copy's error to be resumed (docs/decisions.md); after it
/// `on-cbw-error` applies.
pub const PAUSED_HOLD: Duration = Duration::from_secs(5);

/// How long [`Cbw::close`] lets copies in flight finish before it gives up
/// on them and releases the guest writes waiting for them.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The state of one copy-before-write filter, shared by its node, its hook
/// on `file`, a backup job and snapshot readers.
pub struct Cbw {
    copy: Arc<BlockCopy>,
    file: Arc<BlockNode>,
    target: Arc<BlockNode>,
    opts: CbwOptions,
    hook: Mutex<Option<Arc<dyn WriteHook>>>,
    // Set once the filter is going away: new writes pass untouched.
    released: AtomicBool,
    // errno of the first failed copy under break-snapshot.
    snapshot_error: Mutex<Option<i32>>,
    // Clusters snapshot readers may still read (a snapshot discard clears them).
    access: Mutex<DirtyBitmap>,
    guest: GuestActivity,
    // The backup's (on-source-error, on-target-error): a copy error it
    // stops on holds the guest write until a resume instead of failing it.
    stop_policy: Mutex<(OnError, OnError)>,
    // Bumped when the job resumes after an error, or the filter is released.
    resumes: watch::Sender<u64>,
}

struct CbwHook(Weak<Cbw>);

impl WriteHook for CbwHook {
    fn intercept<'a>(&'a self, req: &'a HookedWrite, write: IoFuture<'a, ()>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let Some(cbw) = self.0.upgrade() else {
                return write.await;
            };
            let _busy = cbw.guest.write_started();
            cbw.before_write(req).await?;
            write.await
        })
    }
}

impl Cbw {
    /// Creates the filter state and attaches its hook to `file`; returns
    /// once every write that started without the hook has finished, which is
    /// the point in time the target will hold.
    pub async fn attach(
        file: Arc<BlockNode>,
        target: Arc<BlockNode>,
        opts: CbwOptions,
    ) -> livesnap_block::Result<Arc<Cbw>> {
        let (cbw, ()) = Cbw::attach_with(file, target, opts, |_| Ok(())).await?;
        Ok(cbw)
    }

    /// [`Cbw::attach`], running `at_attach` at the point in time itself,
    /// while no write runs on `file`: an incremental backup freezes its
    /// bitmap there and makes only its dirty clusters pending. If it fails
    /// the filter is not attached.
    pub async fn attach_with<T>(
        file: Arc<BlockNode>,
        target: Arc<BlockNode>,
        opts: CbwOptions,
        at_attach: impl FnOnce(&BlockCopy) -> livesnap_block::Result<T>,
    ) -> livesnap_block::Result<(Arc<Cbw>, T)> {
        let copy = BlockCopy::new(
            file.clone(),
            target.clone(),
            BlockCopyOptions {
                min_cluster_size: opts.min_cluster_size,
                discard_source: opts.discard_source,
            },
        )?;
        let mut access = DirtyBitmap::new(copy.len(), copy.cluster_size());
        access.set_all();
        let cbw = Arc::new(Cbw {
            copy,
            file: file.clone(),
            target,
            opts,
            hook: Mutex::new(None),
            released: AtomicBool::new(false),
            snapshot_error: Mutex::new(None),
            access: Mutex::new(access),
            guest: GuestActivity::new(),
            stop_policy: Mutex::new((OnError::Report, OnError::Report)),
            resumes: watch::Sender::new(0),
        });
        let hook: Arc<dyn WriteHook> = Arc::new(CbwHook(Arc::downgrade(&cbw)));
        let r = file
            .add_write_hook_with(hook.clone(), || at_attach(&cbw.copy))
            .await?;
        *cbw.hook.lock().unwrap() = Some(hook);
        Ok((cbw, r))
    }

    /// The copy engine (a backup job drives its background pass with it).
    pub fn copy(&self) -> &Arc<BlockCopy> {
        &self.copy
    }

    /// The filtered node (the disk).
    pub fn file(&self) -> &Arc<BlockNode> {
        &self.file
    }

    /// Where old data goes.
    pub fn target(&self) -> &Arc<BlockNode> {
        &self.target
    }

    /// The filter's options.
    pub fn options(&self) -> CbwOptions {
        self.opts
    }

    /// The copy-before-write of one guest request.
    async fn before_write(&self, req: &HookedWrite) -> io::Result<()> {
        if self.released.load(Ordering::SeqCst) || self.snapshot_error().is_some() {
            return Ok(());
        }
        if req.kind == WriteKind::Discard && self.copy.is_own_discard(req.offset, req.len) {
            return Ok(());
        }
        let mut hold_until = None;
        let result = loop {
            let resumes = *self.resumes.borrow();
            let (result, timed_out) = self.copy_once(req.offset, req.len).await;
            let Err(e) = &result else { break result };
            // `cbw-timeout` is the filter's own limit, not an error the job
            // meets and stops on: nothing would resume it.
            if timed_out || self.released.load(Ordering::SeqCst) || !self.stops_on(e) {
                break result;
            }
            // The job pauses (or will) on this error: wait for its resume
            // and copy again, within one bounded hold per guest write.
            let until = *hold_until.get_or_insert_with(|| Instant::now() + PAUSED_HOLD);
            let left = until.saturating_duration_since(Instant::now());
            let mut rx = self.resumes.subscribe();
            let resumed = tokio::time::timeout(left, rx.wait_for(|&n| n != resumes)).await;
            if resumed.is_err() {
                break result;
            }
        };
        if let Err(e) = result {
            match self.opts.on_cbw_error {
                OnCbwError::BreakGuestWrite => return Err(e.error),
                // A release (job cancelled, filter removed) is no copy failure.
                OnCbwError::BreakSnapshot if self.released.load(Ordering::SeqCst) => {}
                OnCbwError::BreakSnapshot => self.break_snapshot(&e.error),
            }
        }
        // Snapshot readers still reading the old data from `file` finish first.
        self.copy.wait_frozen(req.offset, req.len).await;
        Ok(())
    }

    /// One attempt at the copy of `[offset, offset + len)`, within
    /// `cbw-timeout`; true with the error when that limit ended it.
    async fn copy_once(&self, offset: u64, len: u64) -> (Result<(), CopyError>, bool) {
        let copy = self.copy.copy(offset, len);
        if self.opts.cbw_timeout == 0 {
            return (copy.await, false);
        }
        let limit = Duration::from_secs(self.opts.cbw_timeout as u64);
        match tokio::time::timeout(limit, copy).await {
            Ok(result) => (result, false),
            Err(_) => {
                let error = io::Error::from_raw_os_error(libc::ETIMEDOUT);
                (
                    Err(CopyError {
                        is_read: false,
                        error,
                    }),
                    true,
                )
            }
        }
    }

    /// Tells the filter which copy errors its backup job stops on
    /// (`on-source-error`, `on-target-error`).
    pub fn set_stop_policy(&self, on_source_error: OnError, on_target_error: OnError) {
        *self.stop_policy.lock().unwrap() = (on_source_error, on_target_error);
    }

    /// The backup job resumed after an error: held guest writes copy again.
    pub fn job_resumed(&self) {
        self.resumes.send_modify(|n| *n += 1);
    }

    fn stops_on(&self, e: &CopyError) -> bool {
        let (source, target) = *self.stop_policy.lock().unwrap();
        match if e.is_read { source } else { target } {
            OnError::Stop => true,
            OnError::Enospc => e.error.raw_os_error() == Some(libc::ENOSPC),
            OnError::Report | OnError::Ignore => false,
        }
    }

    fn break_snapshot(&self, e: &io::Error) {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let mut err = self.snapshot_error.lock().unwrap();
        if err.is_none() {
            tracing::warn!(
                "copy-before-write on '{}' failed ({e}): the snapshot is broken",
                self.file.name()
            );
            *err = Some(errno);
        }
        drop(err);
        // Nothing needs the old data any more: release whoever waits for it.
        self.copy.cancel();
    }

    /// The error that broke the snapshot (break-snapshot), if one did.
    pub fn snapshot_error(&self) -> Option<io::Error> {
        self.snapshot_error
            .lock()
            .unwrap()
            .map(io::Error::from_raw_os_error)
    }

    /// The guest's writes to `file` as the hook sees them (a backup paces
    /// its background copy by them).
    pub fn guest(&self) -> &GuestActivity {
        &self.guest
    }

    /// Gives up on the snapshot at once (a force cancel): guest writes
    /// waiting for a copy are released (failing under break-guest-write),
    /// later writes pass untouched.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.copy.cancel();
        self.job_resumed();
    }

    /// Removes the filter: copies in flight get [`CLOSE_GRACE`] to finish,
    /// then the rest is released and the hook detached.
    pub async fn close(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.job_resumed();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.copy.wait_idle()).await;
        self.copy.cancel();
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            self.file.remove_write_hook(&hook).await;
        }
        self.copy.set_progress(None);
    }

    /// QEMU's three internal bitmaps of the filter, newest first, as
    /// `(granularity, bytes)`: readable by snapshot readers, copied to the
    /// target, still to copy.
    pub fn bitmap_counts(&self) -> [(u64, u64); 3] {
        let g = self.copy.cluster_size();
        let access = self.access.lock().unwrap().dirty_bytes();
        let (copied, pending) = self.copy.counts();
        [(g, access), (g, copied), (g, pending)]
    }

    fn check_snapshot(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.snapshot_error().is_some() || self.hook.lock().unwrap().is_none() {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        let access = self.access.lock().unwrap();
        let cluster = self.copy.cluster_size();
        let mut at = offset / cluster * cluster;
        while at < offset + len {
            if !access.get(at) {
                return Err(io::Error::from_raw_os_error(libc::EACCES));
            }
            at += cluster;
        }
        Ok(())
    }

    /// Reads the point-in-time image (QEMU's `cbw_co_preadv_snapshot`):
    /// copied clusters from the target, the others from `file` while guest
    /// writes to them wait.
    pub async fn read_snapshot(self: &Arc<Self>, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let len = buf.len() as u64;
        self.check_snapshot(offset, len)?;
        let mut done = 0u64;
        while done < len {
            let (n, on_target, hold) = self.copy.snapshot_piece(offset + done, len - done);
            let node = if on_target { &self.target } else { &self.file };
            let data = node.read_unordered(offset + done, n as usize).await?;
            drop(hold);
            buf[done as usize..(done + n) as usize].copy_from_slice(&data);
            done += n;
        }
        // A snapshot broken meanwhile fails reads in flight too (QEMU).
        if self.snapshot_error().is_some() {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        Ok(buf)
    }

    /// Allocation status of the point-in-time image at `offset`.
    pub async fn snapshot_block_status(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
    ) -> io::Result<BlockStatus> {
        self.check_snapshot(offset, 1)?;
        let (n, on_target, hold) = self.copy.snapshot_piece(offset, len);
        let node = if on_target { &self.target } else { &self.file };
        let mut st = node.block_status(offset, n).await?;
        drop(hold);
        st.len = st.len.min(n);
        Ok(st)
    }

    /// The reader no longer needs `[offset, offset + len)` (QEMU's
    /// `cbw_co_pdiscard_snapshot`): whole clusters inside it stop being
    /// readable and copied, and are discarded from the target.
    pub async fn discard_snapshot(&self, offset: u64, len: u64) -> io::Result<()> {
        let cluster = self.copy.cluster_size();
        let start = offset.div_ceil(cluster) * cluster;
        let end = if offset + len >= self.copy.len() {
            self.copy.len()
        } else {
            (offset + len) / cluster * cluster
        };
        if end <= start {
            return Ok(());
        }
        self.access.lock().unwrap().reset(start, end - start);
        self.copy.reset(start, end - start);
        self.target.discard(start, end - start).await
    }
}

/// The `copy-before-write` node's driver: I/O goes to `file` (whose hook
/// does the copying).
pub struct CbwDriver {
    cbw: Arc<Cbw>,
}

impl CbwDriver {
    /// A driver for a filter that is already attached.
    pub fn new(cbw: Arc<Cbw>) -> CbwDriver {
        CbwDriver { cbw }
    }
}

impl BlockDriver for CbwDriver {
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.cbw.close())
    }

    fn size(&self) -> u64 {
        self.cbw.file.size()
    }

    fn limits(&self) -> Limits {
        self.cbw.file.limits()
    }

    fn filename(&self) -> String {
        self.cbw.file.filename()
    }

    fn children(&self) -> Vec<ChildRef> {
        vec![
            ChildRef {
                role: "file",
                node: self.cbw.file.clone(),
            },
            ChildRef {
                role: "target",
                node: self.cbw.target.clone(),
            },
        ]
    }

    fn filtered(&self) -> Option<Arc<BlockNode>> {
        Some(self.cbw.file.clone())
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(self.cbw.file.read_into(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(self.cbw.file.write(offset, buf, flags))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.cbw.file.write_zeroes(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.cbw.file.discard(offset, len))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.cbw.file.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.cbw.file.block_status(offset, len))
    }
}

/// `blockdev-add` options of a copy-before-write node, beyond its children.
pub struct CbwOpenOptions {
    /// The filter's options.
    pub opts: CbwOptions,
    /// `bitmap` as (node, name): looked up, then refused when the filter opens.
    pub bitmap: Option<(String, String)>,
    /// Longest wait for the disk's in-flight writes before the filter goes on.
    pub drain_timeout: Duration,
}

/// Opens `copy-before-write` nodes (children `file`, then `target`), as
/// QEMU's `cbw_open`: the filter's point in time is its open.
pub struct CbwFactory;

impl livesnap_block::DriverFactory for CbwFactory {
    fn open<'a>(
        &'a self,
        o: livesnap_block::FactoryOpen<'a>,
    ) -> livesnap_block::OpenFuture<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let opts = o
                .options
                .downcast_ref::<CbwOpenOptions>()
                .expect("copy-before-write nodes are opened with CbwOpenOptions");
            let file = o.file.expect("a filter has a file child");
            let target = o
                .children
                .into_iter()
                .find(|(role, _)| *role == "target")
                .map(|(_, n)| n)
                .expect("copy-before-write has a target child");
            // Looked up and checked as QEMU does, then refused: the filter
            // copies every cluster (docs/qmp.md).
            if let Some((node, name)) = &opts.bitmap {
                let holder = livesnap_block::lookup_bitmap(o.graph, node, name)?;
                holder.bitmaps().checked(name, livesnap_block::Use::Read)?;
                return Err(livesnap_block::Error::unsupported(
                    "The copy-before-write bitmap option is not supported by livesnapd",
                ));
            }
            // A target that is the disk itself would wait on its own copies.
            if Arc::ptr_eq(&file, &target) {
                return Err(livesnap_block::Error::invalid(
                    "The copy-before-write target must not be the filtered node itself",
                ));
            }
            let attach = Cbw::attach(file.clone(), target, opts.opts);
            match tokio::time::timeout(opts.drain_timeout, attach).await {
                Ok(Ok(cbw)) => Ok(Box::new(CbwDriver::new(cbw)) as Box<dyn BlockDriver>),
                Ok(Err(e)) => Err(e.context("Cannot create block-copy-state")),
                Err(_) => Err(livesnap_block::Error::busy(format!(
                    "Requests on '{}' did not finish within {} s; filter not added",
                    file.name(),
                    opts.drain_timeout.as_secs()
                ))),
            }
        })
    }
}

/// The filter state of `node`, if it is a copy-before-write node.
pub fn cbw_of(node: &BlockNode) -> Option<Arc<Cbw>> {
    node.driver::<CbwDriver>().map(|d| d.cbw.clone())
}
