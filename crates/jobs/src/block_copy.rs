//! The copy engine of backup and copy-before-write (QEMU's `block/block-copy.c`).
//!
//! A [`BlockCopy`] copies the clusters of a source node to the same offsets of
//! a target node, each at most once. The state is a *pending* bitmap (clusters
//! whose point-in-time content still has to reach the target), a *copied*
//! bitmap (clusters whose point-in-time content is on the target, for
//! snapshot reads) and a table of *claims*: cluster ranges being copied right
//! now. A range is claimed by clearing its pending bits and recording the
//! claim under one lock, so two requesters never copy the same cluster; a
//! requester that needs a claimed cluster waits for that copy instead of
//! starting its own, and if the copy fails the bits become pending again and
//! whoever needs them retries.
//!
//! Copies run as spawned tasks: a caller that gives up (timeout, cancel)
//! stops waiting, but the copy itself finishes (or fails) on its own and
//! releases its claim, which is what keeps the state consistent without ever
//! dropping an I/O future halfway.
//!
//! Zero and hole ranges (found with `block_status`) become write-zeroes on the
//! target; with `skip_unallocated` (sync=top, while the allocation scan runs)
//! ranges not allocated in the source's top layer are dropped uncopied.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use livesnap_block::{offload, BlockNode, DirtyBitmap, FormatSpecific, WriteFlags, ZeroFlags};
use tokio::sync::{Notify, Semaphore};

/// Cluster size when the target has none of its own (QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`).
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;
/// Largest single copy (QEMU's `BLOCK_COPY_MAX_BUFFER`).
pub const MAX_CHUNK: u64 = 1 << 20;
/// Memory all copies of one engine may hold at once (QEMU's `BLOCK_COPY_MAX_MEM`).
pub const MAX_MEM: u64 = 128 << 20;
/// Default number of background copies in flight (QEMU's `BLOCK_COPY_MAX_WORKERS`).
pub const MAX_WORKERS: usize = 64;
/// Largest zero run the zero pass claims at once: a guest write into a
/// claimed run waits for it, and a target that does not read as zeroes
/// gets one write-zeroes of this size.
pub const ZERO_STEP: u64 = 1 << 30;

/// Memory is accounted in KiB so the semaphore's `u32` permits cover any request.
const MEM_UNIT: u64 = 1024;

/// A failed copy: which side failed, and the error.
#[derive(Debug)]
pub struct CopyError {
    /// True when reading the source failed, false for the target.
    pub is_read: bool,
    /// What failed.
    pub error: io::Error,
}

impl Clone for CopyError {
    fn clone(&self) -> Self {
        CopyError {
            is_read: self.is_read,
            error: clone_error(&self.error),
        }
    }
}

/// A copy of an `io::Error` (which is not `Clone`): the errno when there is one.
pub fn clone_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// The error a waiter gets when the engine was cancelled under it.
fn ecanceled() -> CopyError {
    CopyError {
        is_read: false,
        error: io::Error::from_raw_os_error(libc::ECANCELED),
    }
}

/// Where the engine reports progress (a job's `offset`/`len`).
pub trait CopyProgress: Send + Sync {
    /// `bytes` more reached the target.
    fn work_done(&self, bytes: u64);
    /// Bytes still to copy (pending plus in flight).
    fn set_remaining(&self, bytes: u64);
    /// A copy-before-write claimed `bytes` (counted against the job's speed).
    fn guest_copy(&self, _bytes: u64) {}
}

/// Options of a [`BlockCopy`].
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockCopyOptions {
    /// Smallest cluster size (QEMU's `min-cluster-size`; 0 = none).
    pub min_cluster_size: u64,
    /// Discard what was copied from the source (QEMU's `discard-source`).
    pub discard_source: bool,
}

/// The copy granularity for `target`: max(64 KiB, the target's cluster size,
/// `min_cluster_size`), as QEMU's `block_copy_calculate_cluster_size`.
pub fn cluster_size_for(target: &BlockNode, min_cluster_size: u64) -> livesnap_block::Result<u64> {
    if min_cluster_size > i64::MAX as u64 {
        return Err(livesnap_block::Error::invalid(format!(
            "min-cluster-size too large: {min_cluster_size} > {}",
            i64::MAX
        )));
    }
    if min_cluster_size != 0 && !min_cluster_size.is_power_of_two() {
        return Err(livesnap_block::Error::invalid(
            "min-cluster-size needs to be a power of 2",
        ));
    }
    let target_cluster = match target.format_specific() {
        Some(FormatSpecific::Qcow2(info)) => info.cluster_size,
        _ => 0,
    };
    Ok(DEFAULT_CLUSTER_SIZE
        .max(target_cluster)
        .max(min_cluster_size))
}

/// What [`BlockCopy::settle_zero_run`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroStep {
    /// A zero run up to here is settled: the next step starts here.
    Zero(u64),
    /// The first pending cluster holds data up to here: the copy loop's.
    Data(u64),
    /// Nothing to settle there now (nothing pending, a claim in the way,
    /// an error, or a range left pending for the copy loop).
    Stop,
}

/// What a claimed range holds in the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    /// Data: read and write it.
    Data,
    /// Reads as zeroes: write zeroes.
    Zero,
    /// Not allocated in the top layer while `skip_unallocated` is on: drop it.
    Skip,
}

struct Range {
    id: u64,
    start: u64,
    end: u64,
}

impl Range {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

struct State {
    pending: DirtyBitmap,
    copied: DirtyBitmap,
    claims: Vec<Range>,
    // Snapshot reads served from the source: guest writes there wait for them.
    frozen: Vec<Range>,
    next_id: u64,
    in_flight_bytes: u64,
}

/// A claimed range: the caller copies it with [`BlockCopy::spawn_claim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    id: u64,
    /// First byte.
    pub start: u64,
    /// One past the last byte (the disk's end for the last, partial cluster).
    pub end: u64,
}

/// A snapshot read's hold on a range of the source (see [`BlockCopy::snapshot_piece`]).
pub struct FrozenRead {
    copy: Arc<BlockCopy>,
    id: u64,
}

impl Drop for FrozenRead {
    fn drop(&mut self) {
        self.copy
            .state
            .lock()
            .unwrap()
            .frozen
            .retain(|r| r.id != self.id);
        self.copy.changed.notify_waiters();
    }
}

type Progress = Arc<dyn CopyProgress>;

/// The copy state between one source and one target.
pub struct BlockCopy {
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    cluster: u64,
    len: u64,
    discard_source: bool,
    // The target's backing chain holds the source (image fleecing): readers
    // of the target fall through to the source where nothing was copied yet.
    fleecing: bool,
    state: Mutex<State>,
    // Notified whenever a claim or frozen read ends, or on cancel.
    changed: Notify,
    mem: Semaphore,
    cancelled: AtomicBool,
    skip_unallocated: AtomicBool,
    progress: Mutex<Option<Progress>>,
    own_discards: Mutex<Vec<(u64, u64)>>,
    // Copies inside the kernel until it refuses one (offload.rs).
    offload: offload::Offload,
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

/// True when `node` or an image below it in its backing chain is `wanted`.
fn chain_contains(node: &Arc<BlockNode>, wanted: &Arc<BlockNode>) -> bool {
    let mut at = node.backing();
    while let Some(n) = at {
        if Arc::ptr_eq(&n, wanted) {
            return true;
        }
        at = n.backing();
    }
    false
}

impl BlockCopy {
    /// An engine with every cluster of `source` pending.
    pub fn new(
        source: Arc<BlockNode>,
        target: Arc<BlockNode>,
        opts: BlockCopyOptions,
    ) -> livesnap_block::Result<Arc<BlockCopy>> {
        let cluster = cluster_size_for(&target, opts.min_cluster_size)?;
        let len = source.size();
        let mut pending = DirtyBitmap::new(len, cluster);
        pending.set_all();
        let fleecing = chain_contains(&target, &source);
        Ok(Arc::new(BlockCopy {
            source,
            target,
            cluster,
            len,
            discard_source: opts.discard_source,
            fleecing,
            state: Mutex::new(State {
                pending,
                copied: DirtyBitmap::new(len, cluster),
                claims: Vec::new(),
                frozen: Vec::new(),
                next_id: 0,
                in_flight_bytes: 0,
            }),
            changed: Notify::new(),
            mem: Semaphore::new((MAX_MEM / MEM_UNIT) as usize),
            cancelled: AtomicBool::new(false),
            skip_unallocated: AtomicBool::new(false),
            progress: Mutex::new(None),
            own_discards: Mutex::new(Vec::new()),
            offload: offload::Offload::new(),
        }))
    }

    /// The copy granularity.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Bytes covered (the source's size).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty source.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The node copied from.
    pub fn source(&self) -> &Arc<BlockNode> {
        &self.source
    }

    /// The node copied to.
    pub fn target(&self) -> &Arc<BlockNode> {
        &self.target
    }

    /// True while data chunks are copied inside the kernel, without
    /// buffers (so larger chunks cost no memory).
    pub fn offloads(&self) -> bool {
        !self.fleecing && self.offload.active(&self.source, &self.target)
    }

    /// Sends progress to `p` from now on (`None` stops it), starting with the remaining bytes.
    pub fn set_progress(&self, p: Option<Progress>) {
        *self.progress.lock().unwrap() = p;
        self.report_remaining();
    }

    fn report_remaining(&self) {
        let remaining = {
            let st = self.state.lock().unwrap();
            st.pending.dirty_bytes() + st.in_flight_bytes
        };
        let p = self.progress.lock().unwrap().clone();
        if let Some(p) = p {
            p.set_remaining(remaining);
        }
    }

    fn report_done(&self, bytes: u64) {
        let p = self.progress.lock().unwrap().clone();
        if let Some(p) = p {
            p.work_done(bytes);
        }
    }

    fn report_guest_copy(&self, bytes: u64) {
        let p = self.progress.lock().unwrap().clone();
        if let Some(p) = p {
            p.guest_copy(bytes);
        }
    }

    /// Stops the engine: no new claims, and every waiter returns `ECANCELED`.
    /// Copies in flight finish on their own.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// True once [`BlockCopy::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Drops ranges not allocated in the source's top layer instead of
    /// copying them (sync=top until the allocation scan is done).
    pub fn set_skip_unallocated(&self, on: bool) {
        self.skip_unallocated.store(on, Ordering::SeqCst);
    }

    /// Bytes still pending (not claimed, not copied).
    pub fn pending_bytes(&self) -> u64 {
        self.state.lock().unwrap().pending.dirty_bytes()
    }

    /// Bytes copied to the target and bytes still pending.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap();
        (st.copied.dirty_bytes(), st.pending.dirty_bytes())
    }

    /// True when nothing is pending and nothing is being copied.
    pub fn is_done(&self) -> bool {
        let st = self.state.lock().unwrap();
        st.pending.is_clean() && st.claims.is_empty()
    }

    /// True when no copy is in flight.
    pub fn is_idle(&self) -> bool {
        self.state.lock().unwrap().claims.is_empty()
    }

    /// True when the cluster holding byte `offset` is on the target.
    pub fn is_copied(&self, offset: u64) -> bool {
        self.state.lock().unwrap().copied.get(offset)
    }

    /// Makes exactly the clusters that touch a dirty chunk of `bits` pending
    /// (an incremental backup copies what its bitmap says changed; a
    /// granularity finer than the cluster rounds out to whole clusters).
    /// Called before anything is claimed.
    pub fn set_pending(&self, bits: &DirtyBitmap) {
        {
            let mut st = self.state.lock().unwrap();
            debug_assert!(st.claims.is_empty(), "pending set while copying");
            st.pending.reset(0, u64::MAX);
            st.pending.merge(bits);
        }
        self.report_remaining();
    }

    /// Waits until no copy is in flight, cancelled or not (copies of a
    /// cancelled engine still finish on their own).
    pub async fn wait_settled(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// The clusters not known to be on the target: pending ones and those
    /// being copied right now (what a failed `always` backup gives back to
    /// its bitmap).
    pub fn uncopied(&self) -> DirtyBitmap {
        let st = self.state.lock().unwrap();
        let mut bits = st.pending.clone();
        for r in &st.claims {
            bits.set(r.start, r.end - r.start);
        }
        bits
    }

    /// Clusters inside `[offset, offset + len)` (rounded inward) stop being
    /// pending without a copy (a snapshot discard, the sync=top scan).
    pub fn reset(&self, offset: u64, len: u64) {
        let start = offset.div_ceil(self.cluster) * self.cluster;
        let end = if offset + len >= self.len {
            self.len
        } else {
            align_down(offset + len, self.cluster)
        };
        if end <= start {
            return;
        }
        self.state.lock().unwrap().pending.reset(start, end - start);
        self.report_remaining();
    }

    /// The sync=top scan step at cluster-aligned `offset`: drops the
    /// clusters from there that the top layer does not allocate and returns
    /// where the next step starts. A cluster allocated in any part counts as
    /// allocated (QEMU's `block_copy_reset_unallocated`).
    pub async fn reset_unallocated(&self, offset: u64) -> io::Result<u64> {
        let cluster_end = (offset + self.cluster).min(self.len);
        let st = self.source.block_status(offset, self.len - offset).await?;
        if st.depth == 1 {
            return Ok((offset + st.len.div_ceil(self.cluster) * self.cluster).min(self.len));
        }
        let whole = if offset + st.len >= self.len {
            self.len - offset
        } else {
            align_down(st.len, self.cluster)
        };
        if whole > 0 {
            self.reset_exact(offset, whole);
            return Ok(offset + whole);
        }
        // Unallocated head shorter than a cluster: the cluster is skipped only
        // if nothing in it is allocated.
        let mut at = offset + st.len;
        while at < cluster_end {
            let st = self.source.block_status(at, cluster_end - at).await?;
            if st.depth == 1 {
                return Ok(cluster_end);
            }
            at += st.len;
        }
        self.reset_exact(offset, cluster_end - offset);
        Ok(cluster_end)
    }

    fn reset_exact(&self, start: u64, len: u64) {
        self.state.lock().unwrap().pending.reset(start, len);
        self.report_remaining();
    }

    /// Claims the first pending run at or after `from` (at most `max_len`
    /// bytes); `None` when nothing is pending there or the engine was cancelled.
    pub fn claim_next(&self, from: u64, max_len: u64) -> Option<Claim> {
        let mut st = self.state.lock().unwrap();
        if self.is_cancelled() {
            return None;
        }
        let (start, len) = st.pending.next_dirty_run(from, max_len)?;
        Some(Self::claim_locked(&mut st, start, start + len))
    }

    /// Claims the first pending run inside `[start, end)`, clipped to it.
    fn claim_within(&self, start: u64, end: u64) -> Option<Claim> {
        let mut st = self.state.lock().unwrap();
        if self.is_cancelled() {
            return None;
        }
        let (s, l) = st
            .pending
            .next_dirty_run(start, end - start)
            .filter(|&(s, _)| s < end)?;
        Some(Self::claim_locked(&mut st, s, (s + l).min(end)))
    }

    /// Settles the zero run of the source at the first pending cluster at
    /// or after `offset`, ahead of the copy loop: the run is claimed whole
    /// (up to [`ZERO_STEP`]), checked again under the claim, and counts as
    /// copied with no write where the target already reads as zeroes, one
    /// write-zeroes otherwise. A sparse disk then costs its extents, not
    /// one chunk copy per MiB of holes. A fleecing target (whose zeroes are
    /// written as data) is left alone.
    pub async fn settle_zero_run(self: &Arc<Self>, offset: u64) -> ZeroStep {
        if self.fleecing || self.is_cancelled() {
            return ZeroStep::Stop;
        }
        let first = self.state.lock().unwrap().pending.next_dirty_run(offset, 1);
        let Some((p, _)) = first else {
            return ZeroStep::Stop;
        };
        // An error here is the copy loop's to meet, under its policy.
        let Ok(st) = self.source.block_status(p, self.len - p).await else {
            return ZeroStep::Stop;
        };
        let run_end = if p + st.len >= self.len {
            self.len
        } else {
            align_down(p + st.len, self.cluster)
        };
        if !st.zero || run_end <= p {
            // Data, or zeroes shorter than a cluster: the copy loop's.
            return ZeroStep::Data((p + st.len).min(self.len));
        }
        let end = run_end.min(p + ZERO_STEP);
        let Some(claim) = self.claim_within(p, end) else {
            return ZeroStep::Stop;
        };
        let (s, e) = (claim.start, claim.end);
        let still_zero = matches!(
            self.source.block_status(s, e - s).await,
            Ok(st) if st.zero && st.len >= e - s
        );
        let settled = still_zero
            && (self.target.reads_as_zeroes(s, e - s).await
                || self
                    .target
                    .write_zeroes(
                        s,
                        e - s,
                        ZeroFlags {
                            may_unmap: true,
                            ..Default::default()
                        },
                    )
                    .await
                    .is_ok());
        if !settled {
            // Pending again: the copy loop copies it, with its error policy.
            self.finish(claim, &[], Some(s));
            self.report_remaining();
            return ZeroStep::Stop;
        }
        if self.discard_source {
            self.discard_source_range(s, e).await;
        }
        self.finish(claim, &[(s, e)], None);
        self.report_done(e - s);
        self.report_remaining();
        ZeroStep::Zero(e)
    }

    fn claim_locked(st: &mut State, start: u64, end: u64) -> Claim {
        st.pending.reset(start, end - start);
        st.in_flight_bytes += end - start;
        let id = st.next_id;
        st.next_id += 1;
        st.claims.push(Range { id, start, end });
        Claim { id, start, end }
    }

    /// Copies a claimed range on its own task; `report` gets the result
    /// (bytes that reached the target, or the error) before the claim is
    /// released, so a waiter woken by the release already sees it.
    pub fn spawn_claim(
        self: &Arc<Self>,
        claim: Claim,
        report: impl FnOnce(Result<u64, CopyError>) + Send + 'static,
    ) {
        let bc = self.clone();
        tokio::spawn(async move {
            let mut copied = Vec::new();
            let result = bc.copy_claim(claim, &mut copied).await;
            let done: u64 = copied.iter().map(|(s, e)| e - s).sum();
            let failed_from = match &result {
                Ok(()) => None,
                Err((at, _)) => Some(*at),
            };
            report(result.map(|()| done).map_err(|(_, e)| e));
            bc.finish(claim, &copied, failed_from);
            if done > 0 {
                bc.report_done(done);
            }
            bc.report_remaining();
        });
    }

    /// Releases a claim: `copied` ranges are on the target; from
    /// `failed_from` on, the range is pending again.
    fn finish(&self, claim: Claim, copied: &[(u64, u64)], failed_from: Option<u64>) {
        {
            let mut st = self.state.lock().unwrap();
            st.claims.retain(|r| r.id != claim.id);
            st.in_flight_bytes -= claim.end - claim.start;
            for &(s, e) in copied {
                st.copied.set(s, e - s);
            }
            if let Some(at) = failed_from {
                st.pending.set(at, claim.end - at);
            }
        }
        self.changed.notify_waiters();
    }

    /// What the source holds at `[start, end)`: the kind of the run at
    /// `start` and where it ends (cluster-aligned, at least one cluster).
    async fn classify(&self, start: u64, end: u64) -> (Region, u64) {
        let one = (start + self.cluster).min(end);
        let st = match self.source.block_status(start, end - start).await {
            Ok(st) if st.len >= self.cluster || start + st.len >= self.len => st,
            // Unknown, or a run shorter than a cluster: copy one cluster as data.
            _ => return (Region::Data, one),
        };
        let run_end = if start + st.len >= self.len {
            self.len
        } else {
            align_down(start + st.len, self.cluster)
        }
        .min(end);
        let region = if self.skip_unallocated.load(Ordering::SeqCst) && st.depth != 1 {
            Region::Skip
        } else if st.zero {
            Region::Zero
        } else {
            Region::Data
        };
        (region, run_end)
    }

    /// Copies `claim` piece by piece; on failure returns where it stopped.
    async fn copy_claim(
        &self,
        claim: Claim,
        copied: &mut Vec<(u64, u64)>,
    ) -> Result<(), (u64, CopyError)> {
        let mut at = claim.start;
        while at < claim.end {
            let (region, end) = self.classify(at, claim.end).await;
            // A fleecing target's readers see through to the source: zeroes
            // are written as data, serialised like every copy into it.
            let region = if region == Region::Zero && self.fleecing {
                Region::Data
            } else {
                region
            };
            let r = match region {
                Region::Skip => Ok(()),
                Region::Zero => self
                    .target
                    .write_zeroes(
                        at,
                        end - at,
                        ZeroFlags {
                            may_unmap: true,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|error| CopyError {
                        is_read: false,
                        error,
                    }),
                Region::Data => self.copy_data(at, end).await,
            };
            if let Err(e) = r {
                return Err((at, e));
            }
            if region != Region::Skip {
                if self.discard_source {
                    self.discard_source_range(at, end).await;
                }
                copied.push((at, end));
            }
            at = end;
        }
        Ok(())
    }

    /// Copies data at `[start, end)`: inside the kernel where both ends
    /// allow it ([`offload`]), the rest through buffers of at most
    /// [`MAX_CHUNK`] bytes. A fleecing target is never offloaded to: its
    /// copies must be serialising writes.
    async fn copy_data(&self, start: u64, end: u64) -> Result<(), CopyError> {
        let mut at = start;
        if !self.fleecing {
            at += self
                .offload
                .copy(&self.source, &self.target, start, end - start, true)
                .await;
        }
        while at < end {
            let piece = (at + MAX_CHUNK).min(end);
            self.copy_buffered(at, piece).await?;
            at = piece;
        }
        Ok(())
    }

    async fn copy_buffered(&self, start: u64, end: u64) -> Result<(), CopyError> {
        let units = (end - start).div_ceil(MEM_UNIT) as u32;
        let _mem = self
            .mem
            .acquire_many(units)
            .await
            .expect("the semaphore is never closed");
        // Unordered: a copy-before-write runs inside the guest write it
        // protects; claims already keep writes off this range.
        let read = self
            .source
            .read_unordered(start, (end - start) as usize)
            .await;
        let buf = read.map_err(|error| CopyError {
            is_read: true,
            error,
        })?;
        let write = if self.fleecing {
            // Waits for readers of the target still reading the source
            // through it, and holds new ones until the copy is in place.
            self.target
                .write_serialising(start, buf, WriteFlags::default())
                .await
        } else {
            self.target.write(start, buf, WriteFlags::default()).await
        };
        write.map_err(|error| CopyError {
            is_read: false,
            error,
        })
    }

    async fn discard_source_range(&self, start: u64, end: u64) {
        self.own_discards.lock().unwrap().push((start, end));
        if let Err(e) = self.source.discard(start, end - start).await {
            tracing::warn!("discard-source of {start}+{}: {e}", end - start);
        }
        let mut own = self.own_discards.lock().unwrap();
        if let Some(i) = own.iter().position(|&r| r == (start, end)) {
            own.swap_remove(i);
        }
    }

    /// True when a discard of `[offset, offset + len)` on the source is this
    /// engine's own `discard-source` (the copy-before-write hook lets it pass).
    pub fn is_own_discard(&self, offset: u64, len: u64) -> bool {
        self.own_discards
            .lock()
            .unwrap()
            .iter()
            .any(|&(s, e)| s <= offset && offset + len <= e)
    }

    /// Copies every pending cluster touching `[offset, offset + len)` and
    /// waits for copies of it already in flight (a copy-before-write). Fails
    /// with this call's own copy error, or `ECANCELED` if the engine is
    /// cancelled while something in the range still needs copying.
    pub async fn copy(self: &Arc<Self>, offset: u64, len: u64) -> Result<(), CopyError> {
        if len == 0 || offset >= self.len {
            return Ok(());
        }
        let start = align_down(offset, self.cluster);
        let end = (offset + len)
            .div_ceil(self.cluster)
            .saturating_mul(self.cluster)
            .min(self.len);
        let failure: Arc<Mutex<Option<CopyError>>> = Arc::new(Mutex::new(None));
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let claim = {
                let mut st = self.state.lock().unwrap();
                if let Some(e) = failure.lock().unwrap().take() {
                    return Err(e);
                }
                let run = st
                    .pending
                    .next_dirty_run(start, (end - start).min(MAX_CHUNK))
                    .filter(|&(s, _)| s < end);
                match run {
                    Some((s, l)) => {
                        if self.is_cancelled() {
                            return Err(ecanceled());
                        }
                        Some(Self::claim_locked(&mut st, s, (s + l).min(end)))
                    }
                    None if st.claims.iter().any(|r| r.overlaps(start, end)) => {
                        if self.is_cancelled() {
                            return Err(ecanceled());
                        }
                        None
                    }
                    None => return Ok(()),
                }
            };
            match claim {
                Some(claim) => {
                    self.report_guest_copy(claim.end - claim.start);
                    let failure = failure.clone();
                    self.spawn_claim(claim, move |r| {
                        if let Err(e) = r {
                            failure.lock().unwrap().get_or_insert(e);
                        }
                    });
                }
                None => notified.await,
            }
        }
    }

    /// Waits until no copy is in flight; returns false if cancelled first.
    pub async fn wait_idle(&self) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return true;
            }
            if self.is_cancelled() {
                return false;
            }
            notified.await;
        }
    }

    /// Waits until no snapshot read holds any part of `[offset, offset + len)`
    /// on the source (returns at once once cancelled).
    pub async fn wait_frozen(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len.max(1));
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.state.lock().unwrap();
                if self.is_cancelled() || !st.frozen.iter().any(|r| r.overlaps(offset, end)) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// The start of a snapshot read at `offset` (at most `len` bytes): how
    /// many bytes share one state, whether the point-in-time data is on the
    /// target, and otherwise a hold that keeps guest writes off that range of
    /// the source until it is dropped (QEMU's `cbw_snapshot_read_lock`).
    pub fn snapshot_piece(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
    ) -> (u64, bool, Option<FrozenRead>) {
        let mut st = self.state.lock().unwrap();
        let on_target = st.copied.get(offset);
        let mut end = (align_down(offset, self.cluster) + self.cluster).min(self.len);
        let limit = offset + len;
        while end < limit && st.copied.get(end) == on_target {
            end = (end + self.cluster).min(self.len);
        }
        let end = end.min(limit);
        if on_target {
            return (end - offset, true, None);
        }
        let id = st.next_id;
        st.next_id += 1;
        st.frozen.push(Range {
            id,
            start: offset,
            end,
        });
        (
            end - offset,
            false,
            Some(FrozenRead {
                copy: self.clone(),
                id,
            }),
        )
    }
}
