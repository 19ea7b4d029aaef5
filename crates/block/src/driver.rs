//! The interface every block driver implements (QEMU's `BlockDriver`).
//!
//! Futures are `Send` so that nodes can be driven from any runtime thread. A
//! driver whose implementation is not `Send` (the qcow2 driver over `imago`)
//! runs on its own single-threaded executor and forwards requests to it, the
//! way QEMU binds a node to one AioContext.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use crate::buf::IoBuf;
use crate::node::BlockNode;

/// A boxed I/O future returned by drivers.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Flags of a write request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the request completes.
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Force unit access.
    pub fua: bool,
    /// The range may be deallocated (punched) instead of written (NBD: no NO_HOLE).
    pub may_unmap: bool,
    /// Fail with `EOPNOTSUPP` rather than fall back to writing zero buffers (NBD FAST_ZERO).
    pub fast_only: bool,
}

/// Allocation status of one extent, as QEMU's `bdrv_block_status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the extent, from the queried offset; never 0 for a non-empty query.
    pub len: u64,
    /// The extent is backed by allocated storage at this layer or below (not a hole).
    pub data: bool,
    /// The extent reads as zeroes.
    pub zero: bool,
    /// Layer of the chain that allocates the extent (QEMU's `qemu:allocation-depth`):
    /// 0 = unallocated in the whole chain, 1 = this node, 2 = its backing, and so on.
    /// Nodes without a backing chain (`file`, `raw`) report 1 for everything.
    pub depth: u32,
}

/// Alignment and size limits of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this; the node layer pads other requests.
    pub request_alignment: u32,
    /// Largest single request the driver takes; the node layer splits bigger ones.
    pub max_transfer: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_alignment: 1,
            max_transfer: 32 << 20,
        }
    }
}

/// A child edge of a node: the role QEMU names it by ("file", "backing") and the child.
#[derive(Clone)]
pub struct ChildRef {
    /// Role of the child, e.g. `file`.
    pub role: &'static str,
    /// The child node.
    pub node: Arc<BlockNode>,
}

/// Any driver as `Any`, so a node's concrete driver can be reached
/// ([`crate::BlockNode::driver`]); every `'static` type has it.
pub trait AsAny {
    /// `self` as `Any`.
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<T: std::any::Any> AsAny for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A block driver instance opened on one node.
pub trait BlockDriver: AsAny + Send + Sync + 'static {
    /// QEMU's driver name, e.g. `file` or `raw`.
    fn format_name(&self) -> &'static str;

    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Alignment and transfer limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// Host file name this node reads from (for `query-named-block-nodes`).
    fn filename(&self) -> String;

    /// Child edges, in a stable order.
    fn children(&self) -> Vec<ChildRef> {
        Vec::new()
    }

    /// The node stops writing for good (an external snapshot froze it):
    /// give up what only a writer holds (a file's write locks).
    fn frozen_read_only(&self) {}

    /// The node leaves the graph: undo what opening did outside the node
    /// (a filter detaches from the disk it sits on).
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` and gives it back.
    /// On success every byte of `buf` is overwritten (zeroes past the end
    /// of the data): callers pass buffers with old contents
    /// ([`IoBuf::for_overwrite`]).
    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf>;

    /// Writes `buf` at `offset`.
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture<'_, ()>;

    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()>;

    /// Tells the driver the range is no longer needed; contents become unspecified.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Status of the extent starting at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus>;

    /// Changes the size to `len` (QEMU's `bdrv_co_truncate`); format drivers use it
    /// to grow their protocol child. Drivers that cannot resize refuse with `ENOTSUP`.
    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        let _ = len;
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// Facts only this format has, for `query-named-block-nodes` (QEMU's `ImageInfoSpecific`).
    fn format_specific(&self) -> Option<FormatSpecific> {
        None
    }

    /// Where the format keeps persistent dirty bitmaps, if it can.
    fn bitmap_store(&self) -> Option<&dyn crate::bitmaps::BitmapStore> {
        None
    }

    /// The backing node, for formats that have one.
    fn backing(&self) -> Option<Arc<BlockNode>> {
        None
    }

    /// For a filter (QEMU's `is_filter` drivers: copy-before-write,
    /// blkdebug), the child whose data it passes on as its own. Formats,
    /// `raw` and `snapshot-access` are not filters.
    fn filtered(&self) -> Option<Arc<BlockNode>> {
        None
    }

    /// Re-points the backing node in memory (an external snapshot); the image header is unchanged.
    fn set_backing(&self, backing: Option<Arc<BlockNode>>) -> crate::Result<()> {
        let _ = backing;
        Err(crate::Error::invalid(format!(
            "Driver '{}' does not support backing files",
            self.format_name()
        )))
    }
}

/// Format-specific image facts (QEMU's `ImageInfoSpecific` union).
#[derive(Clone, Debug)]
pub enum FormatSpecific {
    /// A qcow2 image.
    Qcow2(crate::qcow2::Qcow2Info),
}
