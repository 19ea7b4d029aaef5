//! The `snapshot-access` driver (QEMU's `block/snapshot-access.c`): a
//! read-only view of the point-in-time image a `copy-before-write` node
//! keeps, for pull-mode backup (export it over NBD and read it while the
//! guest keeps writing to the disk).
//!
//! Reads and block status go to the filter's snapshot functions; a discard
//! tells the filter the reader is done with a range (those clusters are no
//! longer copied before writes, and read as `EACCES` afterwards); writes fail
//! with `ENOTSUP`. Over a node that is not a copy-before-write filter, every
//! request fails with `ENOTSUP`, as in QEMU.

use std::io;
use std::sync::Arc;

use livesnap_block::{
    BlockDriver, BlockNode, BlockStatus, ChildRef, IoBuf, IoFuture, Limits, WriteFlags, ZeroFlags,
};

use crate::cbw::{cbw_of, Cbw};

fn enotsup() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOTSUP)
}

/// A `snapshot-access` node over its `file` child.
pub struct SnapshotAccessDriver {
    file: Arc<BlockNode>,
    cbw: Option<Arc<Cbw>>,
}

impl SnapshotAccessDriver {
    /// Opens the view of `file` (normally a `copy-before-write` node).
    pub fn open(file: Arc<BlockNode>) -> SnapshotAccessDriver {
        let cbw = cbw_of(&file);
        SnapshotAccessDriver { file, cbw }
    }

    fn cbw(&self) -> io::Result<&Arc<Cbw>> {
        self.cbw.as_ref().ok_or_else(enotsup)
    }
}

/// Opens `snapshot-access` nodes over their `file` child.
pub struct SnapshotAccessFactory;

impl livesnap_block::DriverFactory for SnapshotAccessFactory {
    fn open<'a>(
        &'a self,
        o: livesnap_block::FactoryOpen<'a>,
    ) -> livesnap_block::OpenFuture<'a, Box<dyn BlockDriver>> {
        let file = o.file.expect("snapshot-access has a file child");
        Box::pin(
            async move { Ok(Box::new(SnapshotAccessDriver::open(file)) as Box<dyn BlockDriver>) },
        )
    }
}

impl BlockDriver for SnapshotAccessDriver {
    fn format_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn size(&self) -> u64 {
        self.file.size()
    }

    fn limits(&self) -> Limits {
        self.file.limits()
    }

    fn filename(&self) -> String {
        self.file.filename()
    }

    fn children(&self) -> Vec<ChildRef> {
        vec![ChildRef {
            role: "file",
            node: self.file.clone(),
        }]
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move { self.cbw()?.read_snapshot(offset, buf).await })
    }

    fn write(&self, _offset: u64, _buf: IoBuf, _flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(enotsup()) })
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(enotsup()) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.cbw()?.discard_snapshot(offset, len).await })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move { self.cbw()?.snapshot_block_status(offset, len).await })
    }
}
