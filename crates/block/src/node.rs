//! A node of the block graph: a driver instance plus what the generic block
//! layer adds around every request (QEMU's `block/io.c`): bounds and
//! permission checks, request tracking, and padding of requests that are not
//! aligned to what the driver needs.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::bitmaps::BitmapSet;
use crate::buf::IoBuf;
use crate::driver::{BlockDriver, BlockStatus, ChildRef, IoFuture, Limits, WriteFlags, ZeroFlags};
use crate::hook::{HookList, HookedWrite, WriteHook, WriteKind};
use crate::tracker::{RequestKind, RequestTracker};

/// Something outside the graph that uses a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeUser {
    /// A block export serving the node (its QMP id).
    Export(String),
    /// A job writing to the node, its target (the job's id).
    Job(String),
    /// A job's op blocker on its source (QEMU's): the node takes no other
    /// job and cannot be deleted while it runs. Holds the job's type.
    Blocker(&'static str),
}

impl NodeUser {
    /// QEMU's reason text for an op blocker ("block device is in use by
    /// block job: mirror"); `None` for a plain use.
    pub fn blocker_reason(&self) -> Option<String> {
        match self {
            NodeUser::Blocker(job_type) => {
                Some(format!("block device is in use by block job: {job_type}"))
            }
            _ => None,
        }
    }
}

/// A named node of the block graph.
pub struct BlockNode {
    name: String,
    driver: Box<dyn BlockDriver>,
    read_only: AtomicBool,
    monitor_owned: bool,
    cache_direct: AtomicBool,
    tracker: RequestTracker,
    users: Mutex<Vec<NodeUser>>,
    // Held shared by every write for its whole duration, exclusively to
    // change the list: attaching a hook is also a drain of the node's writes.
    hooks: tokio::sync::RwLock<HookList>,
    /// The named dirty bitmaps (see [`crate::bitmaps`]).
    pub(crate) bitmaps: Mutex<BitmapSet>,
    /// Set while the node has any bitmap: writes skip all bitmap work otherwise.
    pub(crate) has_bitmaps: AtomicBool,
    /// Held shared by a write from marking its range dirty to its end, and
    /// exclusively while the persistent bitmaps are written to the image, so
    /// that no write's durable mark can be overwritten by an older copy.
    pub(crate) bitmap_io: tokio::sync::RwLock<()>,
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl BlockNode {
    /// Wraps an opened driver as node `name`.
    ///
    /// `monitor_owned` is true for nodes created by name through `blockdev-add`
    /// (only those may be deleted with `blockdev-del`, as in QEMU).
    pub fn new(
        name: impl Into<String>,
        driver: Box<dyn BlockDriver>,
        read_only: bool,
        monitor_owned: bool,
    ) -> Arc<BlockNode> {
        let bitmaps = match driver.bitmap_store() {
            Some(store) => BitmapSet::from_stored(store.take_loaded(), store.read_only()),
            None => BitmapSet::default(),
        };
        Arc::new(BlockNode {
            has_bitmaps: AtomicBool::new(!bitmaps.is_empty()),
            bitmaps: Mutex::new(bitmaps),
            bitmap_io: tokio::sync::RwLock::new(()),
            name: name.into(),
            driver,
            read_only: AtomicBool::new(read_only),
            monitor_owned,
            cache_direct: AtomicBool::new(false),
            tracker: RequestTracker::new(),
            users: Mutex::new(Vec::new()),
            hooks: tokio::sync::RwLock::new(Vec::new()),
        })
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's QEMU name (`file`, `raw`, ...).
    pub fn format_name(&self) -> &'static str {
        self.driver.format_name()
    }

    /// Host file this node reads from.
    pub fn filename(&self) -> String {
        self.driver.filename()
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// True when the node refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }

    /// Freezes the node against writes (the old top after an external snapshot).
    pub fn set_read_only(&self) {
        if !self.read_only.swap(true, Ordering::SeqCst) {
            self.driver.frozen_read_only();
        }
    }

    /// True when the node was created by name through the monitor.
    pub fn monitor_owned(&self) -> bool {
        self.monitor_owned
    }

    /// Records the `cache.direct` option the node was opened with (reported by queries).
    pub fn set_cache_direct(&self, direct: bool) {
        self.cache_direct.store(direct, Ordering::Relaxed);
    }

    /// The `cache.direct` option the node was opened with.
    pub fn cache_direct(&self) -> bool {
        self.cache_direct.load(Ordering::Relaxed)
    }

    /// The driver's limits.
    pub fn limits(&self) -> Limits {
        self.driver.limits()
    }

    /// Child edges.
    pub fn children(&self) -> Vec<ChildRef> {
        self.driver.children()
    }

    /// Format-specific facts (qcow2 header fields).
    pub fn format_specific(&self) -> Option<crate::driver::FormatSpecific> {
        self.driver.format_specific()
    }

    /// The backing node, if the format has one.
    pub fn backing(&self) -> Option<Arc<BlockNode>> {
        self.driver.backing()
    }

    /// The child a filter passes on (see [`BlockDriver::filtered`]).
    pub fn filtered(&self) -> Option<Arc<BlockNode>> {
        self.driver.filtered()
    }

    /// What this node filters or, for a format, its backing node (QEMU's
    /// `bdrv_filter_or_cow_bs`): the next node down the chain whose data
    /// shows through this one.
    pub fn filtered_or_backing(&self) -> Option<Arc<BlockNode>> {
        self.filtered().or_else(|| self.backing())
    }

    /// Undoes what opening the driver did outside the node; the node must
    /// be out of the graph (or about to go).
    pub async fn close(&self) {
        if let Err(e) = self.store_bitmaps(true).await {
            tracing::warn!("{}: storing dirty bitmaps on close failed: {e}", self.name);
        }
        self.driver.close().await;
    }

    /// The node's driver as its concrete type, when it is a `T`: how other
    /// layers reach what only one driver has (a filter's state, a fault
    /// injector's rules) without side registries.
    pub fn driver<T: 'static>(&self) -> Option<&T> {
        // The driver itself, not its box (a Box is `Any` too).
        crate::driver::AsAny::as_any(&*self.driver).downcast_ref::<T>()
    }

    /// Where the node's format keeps persistent bitmaps.
    pub(crate) fn bitmap_store(&self) -> Option<&dyn crate::bitmaps::BitmapStore> {
        self.driver.bitmap_store()
    }

    /// Re-points the backing node (see [`BlockDriver::set_backing`]).
    pub fn set_backing(&self, backing: Option<Arc<BlockNode>>) -> crate::Result<()> {
        self.driver.set_backing(backing)
    }

    /// In-flight requests on this node.
    pub fn tracker(&self) -> &RequestTracker {
        &self.tracker
    }

    /// Records that something outside the graph (an export, a job) uses this node.
    pub fn add_user(&self, who: NodeUser) {
        self.users.lock().unwrap().push(who);
    }

    /// Forgets one use recorded by [`BlockNode::add_user`].
    pub fn remove_user(&self, who: &NodeUser) {
        let mut users = self.users.lock().unwrap();
        if let Some(i) = users.iter().position(|u| u == who) {
            users.remove(i);
        }
    }

    /// Everything currently using this node, oldest first.
    pub fn users(&self) -> Vec<NodeUser> {
        self.users.lock().unwrap().clone()
    }

    /// QEMU's op blocker check: "Node 'x' is busy: <the newest blocker's reason>".
    pub fn check_not_blocked(&self) -> crate::Result<()> {
        match self.users().iter().rev().find_map(NodeUser::blocker_reason) {
            Some(reason) => Err(crate::Error::busy(format!(
                "Node '{}' is busy: {reason}",
                self.name()
            ))),
            None => Ok(()),
        }
    }

    /// Runs `hook` around every later write; returns once every write that
    /// started without it has finished, so none of them can land unseen.
    pub async fn add_write_hook(&self, hook: Arc<dyn WriteHook>) {
        let _ = self.add_write_hook_with(hook, || Ok(())).await;
    }

    /// Like [`BlockNode::add_write_hook`], and runs `at_attach` at the
    /// instant the hook goes on, while no write runs on the node: whatever
    /// it reads of the node's state (a bitmap it freezes) is exactly what
    /// the writes before the hook left. If it fails, the hook stays off.
    pub async fn add_write_hook_with<T>(
        &self,
        hook: Arc<dyn WriteHook>,
        at_attach: impl FnOnce() -> crate::Result<T>,
    ) -> crate::Result<T> {
        let mut hooks = self.hooks.write().await;
        let r = at_attach()?;
        hooks.push(hook);
        Ok(r)
    }

    /// Detaches `hook` once the writes running inside it have finished.
    pub async fn remove_write_hook(&self, hook: &Arc<dyn WriteHook>) {
        self.hooks.write().await.retain(|h| !Arc::ptr_eq(h, hook));
    }

    /// Number of attached hooks.
    pub async fn write_hook_count(&self) -> usize {
        self.hooks.read().await.len()
    }

    /// Runs a driver write inside every hook, the oldest outermost.
    async fn hooked(
        &self,
        hooks: &HookList,
        offset: u64,
        len: u64,
        kind: WriteKind,
        data: Option<IoBuf>,
        write: IoFuture<'_, ()>,
    ) -> io::Result<()> {
        let req = HookedWrite::new(offset, len, kind, data);
        let mut fut = write;
        for h in hooks.iter().rev() {
            fut = h.intercept(&req, fut);
        }
        self.dirtying(offset, len, fut).await
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(einval()),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    fn alignment(&self) -> u64 {
        self.driver.limits().request_alignment.max(1) as u64
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<IoBuf> {
        self.read_into(offset, IoBuf::for_overwrite(len)).await
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` and gives it back.
    pub async fn read_into(&self, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        self.check_range(offset, buf.len() as u64)?;
        let (start, end) = self.aligned(offset, buf.len() as u64);
        let _req = self
            .tracker
            .begin(start, end - start, RequestKind::Read, false)
            .await;
        self.read_aligned(offset, buf, start, end).await
    }

    /// Reads `len` bytes at `offset` without waiting for overlapping
    /// serialising requests (see [`RequestTracker::begin_unordered`]): how a
    /// copy-before-write hook reads the old data of the write it runs in.
    pub async fn read_unordered(&self, offset: u64, len: usize) -> io::Result<IoBuf> {
        self.check_range(offset, len as u64)?;
        let (start, end) = self.aligned(offset, len as u64);
        let _req = self
            .tracker
            .begin_unordered(start, end - start, RequestKind::Read);
        self.read_aligned(offset, IoBuf::for_overwrite(len), start, end)
            .await
    }

    /// `[offset, offset+len)` widened to the driver's alignment.
    fn aligned(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.alignment();
        (align_down(offset, a), align_up(offset + len, a))
    }

    /// The driver read of `buf` at `offset`, through a padded buffer over
    /// `[start, end)` when the request is not aligned.
    async fn read_aligned(
        &self,
        offset: u64,
        buf: IoBuf,
        start: u64,
        end: u64,
    ) -> io::Result<IoBuf> {
        let len = buf.len();
        if start == offset && end == offset + len as u64 {
            return self.driver.read(offset, buf).await;
        }
        let padded = self
            .driver
            .read(start, IoBuf::for_overwrite((end - start) as usize))
            .await?;
        let skip = (offset - start) as usize;
        let mut buf = buf;
        buf.copy_from_slice(&padded[skip..skip + len]);
        Ok(buf)
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> io::Result<()> {
        self.write_ordered(offset, buf, flags, false).await
    }

    /// Writes `buf` at `offset` as a serialising request (QEMU's
    /// `BDRV_REQ_SERIALISING`): it waits for overlapping requests on this
    /// node and later overlapping ones wait for it. A copy-before-write into
    /// an image whose backing is the disk uses it, so a reader of that image
    /// never falls through to the disk for a cluster being copied.
    pub async fn write_serialising(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.write_ordered(offset, buf, flags, true).await
    }

    async fn write_ordered(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
        serialising: bool,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        let (start, end) = self.aligned(offset, len);
        let hooks = self.hooks.read().await;
        if start == offset && end == offset + len {
            let _req = self
                .tracker
                .begin(offset, len, RequestKind::Write, serialising)
                .await;
            return self.write_hooked(&hooks, offset, buf, flags).await;
        }
        // Read-modify-write of the partial blocks; serialised so that two
        // partial writes into one block cannot lose each other's bytes.
        let _req = self
            .tracker
            .begin(start, end - start, RequestKind::Write, true)
            .await;
        let mut padded = self
            .driver
            .read(start, IoBuf::for_overwrite((end - start) as usize))
            .await?;
        let skip = (offset - start) as usize;
        padded[skip..skip + buf.len()].copy_from_slice(&buf);
        self.write_hooked(&hooks, start, padded, flags).await
    }

    /// The driver write of an aligned data request, inside the hooks (with a
    /// copy of the data for the hooks that want one).
    async fn write_hooked(
        &self,
        hooks: &HookList,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let len = buf.len() as u64;
        if hooks.is_empty() {
            return self
                .dirtying(offset, len, self.driver.write(offset, buf, flags))
                .await;
        }
        let data = hooks
            .iter()
            .any(|h| h.wants_data())
            .then(|| IoBuf::from_slice(&buf));
        let write = self.driver.write(offset, buf, flags);
        self.hooked(hooks, offset, len, WriteKind::Data, data, write)
            .await
    }

    /// Runs `io` as a write of `[offset, offset + len)` that no write hook
    /// sees (a copy offloaded below the node, [`crate::offload`]): tracked,
    /// marked in the node's dirty bitmaps, and ordered against attaching a
    /// hook. `None`, with nothing run, when the node refuses the write or a
    /// hook is attached (a hook must see the data, so the caller writes
    /// through buffers instead).
    pub(crate) async fn write_unhooked(
        &self,
        offset: u64,
        len: u64,
        io: IoFuture<'_, ()>,
    ) -> Option<io::Result<()>> {
        if self.check_writable().is_err() || self.check_range(offset, len).is_err() {
            return None;
        }
        let hooks = self.hooks.read().await;
        if !hooks.is_empty() {
            return None;
        }
        let _req = self
            .tracker
            .begin(offset, len, RequestKind::Write, false)
            .await;
        Some(self.dirtying(offset, len, io).await)
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let a = self.alignment();
        let head_end = align_up(offset, a).min(offset + len);
        let tail_start = align_down(offset + len, a).max(head_end);
        if head_end > offset {
            self.write(
                offset,
                IoBuf::zeroed((head_end - offset) as usize),
                WriteFlags { fua: flags.fua },
            )
            .await?;
        }
        if tail_start > head_end {
            // Scoped: the head and tail writes take the hook lock themselves.
            let hooks = self.hooks.read().await;
            let _req = self
                .tracker
                .begin(head_end, tail_start - head_end, RequestKind::Write, false)
                .await;
            let len = tail_start - head_end;
            let write = self.driver.write_zeroes(head_end, len, flags);
            self.hooked(&hooks, head_end, len, WriteKind::Zeroes, None, write)
                .await?;
        }
        if offset + len > tail_start {
            self.write(
                tail_start,
                IoBuf::zeroed((offset + len - tail_start) as usize),
                WriteFlags { fua: flags.fua },
            )
            .await?;
        }
        Ok(())
    }

    /// Discards a range; only whole aligned blocks inside it are passed down.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let a = self.alignment();
        let start = align_up(offset, a);
        let end = align_down(offset + len, a);
        if end <= start {
            return Ok(());
        }
        let hooks = self.hooks.read().await;
        let _req = self
            .tracker
            .begin(start, end - start, RequestKind::Write, false)
            .await;
        let write = self.driver.discard(start, end - start);
        self.hooked(&hooks, start, end - start, WriteKind::Discard, None, write)
            .await
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        self.driver.flush().await?;
        self.store_bitmaps_if_cleared().await
    }

    /// Resizes the node (only drivers that support it: `file` on a regular file).
    /// Format drivers use this to grow their protocol child before allocating clusters.
    pub async fn truncate(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.driver.truncate(len).await
    }

    /// True when block status says all of `[offset, offset + len)` reads as
    /// zeroes (false when it cannot tell): a copy can skip writing zeroes there.
    pub async fn reads_as_zeroes(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            match self.block_status(at, end - at).await {
                Ok(st) if st.zero => at += st.len,
                _ => return false,
            }
        }
        true
    }

    /// Status of the extent at `offset`, at most `len` bytes (clamped to the node's end).
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        if offset >= self.size() {
            return Err(einval());
        }
        let len = len.min(self.size() - offset);
        let mut st = self.driver.block_status(offset, len).await?;
        st.len = st.len.clamp(1, len);
        Ok(st)
    }
}
