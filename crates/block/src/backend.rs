//! A block backend: what a user of the graph (an NBD export, a job) holds
//! instead of a node, so the node under it can be swapped (QEMU's
//! `BlockBackend` and `bdrv_replace_node`).
//!
//! An external snapshot or a mirror pivot puts a new node at the root of a
//! backend; users keep their handle and their next request goes to the new
//! node. The swap waits until no request is in flight on the old root, so no
//! write can land in an image that was just frozen.

use std::io;
use std::sync::{Arc, RwLock};

use crate::buf::IoBuf;
use crate::driver::{BlockStatus, Limits, WriteFlags, ZeroFlags};
use crate::node::BlockNode;

/// A swappable handle on the root node of a user's view of the graph.
pub struct BlockBackend {
    root: RwLock<Arc<BlockNode>>,
    // Held shared by every request, exclusively by a swap: tokio's RwLock
    // queues new requests behind a waiting swap, which is the drain.
    gate: Arc<tokio::sync::RwLock<()>>,
}

/// Guest requests on a backend held back (QEMU's drained section): while it
/// lives no request runs on the backend and new ones wait.
pub struct BackendHold {
    backend: Arc<BlockBackend>,
    _gate: tokio::sync::OwnedRwLockWriteGuard<()>,
}

impl BackendHold {
    /// The held backend.
    pub fn backend(&self) -> &Arc<BlockBackend> {
        &self.backend
    }

    /// Puts `new` at the root; held requests go to it once the hold ends.
    pub fn replace_root(&self, new: Arc<BlockNode>) -> Arc<BlockNode> {
        std::mem::replace(&mut *self.backend.root.write().unwrap(), new)
    }
}

impl BlockBackend {
    /// A backend whose root is `root`.
    pub fn new(root: Arc<BlockNode>) -> Arc<BlockBackend> {
        Arc::new(BlockBackend {
            root: RwLock::new(root),
            gate: Arc::new(tokio::sync::RwLock::new(())),
        })
    }

    /// The current root node.
    pub fn root(&self) -> Arc<BlockNode> {
        self.root.read().unwrap().clone()
    }

    /// Virtual size of the root.
    pub fn size(&self) -> u64 {
        self.root().size()
    }

    /// True when the root refuses writes.
    pub fn read_only(&self) -> bool {
        self.root().read_only()
    }

    /// Limits of the root.
    pub fn limits(&self) -> Limits {
        self.root().limits()
    }

    /// Puts `new` at the root once every request on the old root has finished.
    pub async fn replace_root(&self, new: Arc<BlockNode>) -> Arc<BlockNode> {
        let _drained = self.gate.write().await;
        std::mem::replace(&mut *self.root.write().unwrap(), new)
    }

    /// Waits until no request runs on the backend and holds new ones back
    /// until the returned guard is dropped. Callers bound the wait with a timeout.
    pub async fn hold(self: &Arc<Self>) -> BackendHold {
        let gate = self.gate.clone().write_owned().await;
        BackendHold {
            backend: self.clone(),
            _gate: gate,
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<IoBuf> {
        self.read_into(offset, IoBuf::for_overwrite(len)).await
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read_into(&self, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        let _in_flight = self.gate.read().await;
        self.root().read_into(offset, buf).await
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> io::Result<()> {
        let _in_flight = self.gate.read().await;
        self.root().write(offset, buf, flags).await
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let _in_flight = self.gate.read().await;
        self.root().write_zeroes(offset, len, flags).await
    }

    /// Discards a range.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _in_flight = self.gate.read().await;
        self.root().discard(offset, len).await
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        let _in_flight = self.gate.read().await;
        self.root().flush().await
    }

    /// Status of the extent at `offset`, at most `len` bytes.
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let _in_flight = self.gate.read().await;
        self.root().block_status(offset, len).await
    }
}
