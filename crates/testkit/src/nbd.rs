//! The NBD server's fixtures: file-backed nodes, a server on a temp Unix socket,
//! test drivers that delay or fail requests on purpose, and dirty bitmaps set
//! by hand.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livesnap_block::driver::IoFuture;
use livesnap_block::{
    BlockBackend, BlockDriver, BlockNode, BlockStatus, DirtyBitmap, FileDriver, FileOptions, IoBuf,
    RawDriver, RawOptions, WriteFlags, ZeroFlags,
};
use livesnap_nbd::{DirtyExtents, ExportBitmap, ExportConfig, ExportTable, ListenAddr, NbdServer};

/// Opens `path` as a raw node over a file node.
pub fn open_node(path: &Path, read_only: bool) -> Arc<BlockNode> {
    let fd = FileDriver::open(&FileOptions {
        filename: path.to_str().unwrap().into(),
        direct: false,
        read_only,
    })
    .unwrap();
    let file = BlockNode::new("file0", Box::new(fd), read_only, false);
    let raw = RawDriver::open(file, RawOptions::default()).unwrap();
    BlockNode::new("raw0", Box::new(raw), read_only, true)
}

pub use crate::{pattern, sparse_file};

/// An NBD server on a unix socket and a TCP port, over an export table.
pub struct Fixture {
    /// Where its files and socket live.
    pub dir: tempfile::TempDir,
    /// Its exports.
    pub table: Arc<ExportTable>,
    /// The server (None once stopped).
    pub server: Option<NbdServer>,
    /// Its TCP address.
    pub addr: String,
    /// Its unix socket.
    pub sock: PathBuf,
}

impl Fixture {
    /// A server on a Unix socket with no exports yet.
    pub async fn new(max_connections: u32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let table = ExportTable::new();
        let server = NbdServer::start(
            &ListenAddr::Unix(sock.clone()),
            max_connections,
            table.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        Fixture {
            dir,
            table,
            server: Some(server),
            addr,
            sock,
        }
    }

    /// Adds an export over a new sparse file.
    pub fn add_file_export(&self, name: &str, size: u64, writable: bool) -> Arc<BlockNode> {
        let path = sparse_file(
            self.dir
                .path()
                .join(format!("disk-{}.img", self.table.list().len())),
            size,
        );
        let node = open_node(&path, false);
        self.add_node(name, node.clone(), writable, None);
        node
    }

    /// Exports `node` as `name`.
    pub fn add_node(
        &self,
        name: &str,
        node: Arc<BlockNode>,
        writable: bool,
        description: Option<&str>,
    ) {
        self.table
            .add(ExportConfig {
                name: name.into(),
                description: description.map(Into::into),
                backend: BlockBackend::new(node),
                writable,
                allocation_depth: false,
                bitmaps: Vec::new(),
            })
            .unwrap();
    }

    /// Exports `node` as `name`, offering `bitmaps` as
    /// `qemu:dirty-bitmap:NAME` contexts.
    pub fn add_bitmap_node(
        &self,
        name: &str,
        node: Arc<BlockNode>,
        writable: bool,
        bitmaps: &[(&str, Arc<TestBitmap>)],
    ) {
        self.table
            .add(ExportConfig {
                name: name.into(),
                description: None,
                backend: BlockBackend::new(node),
                writable,
                allocation_depth: false,
                bitmaps: bitmaps
                    .iter()
                    .map(|(n, b)| ExportBitmap {
                        name: n.to_string(),
                        extents: b.clone(),
                    })
                    .collect(),
            })
            .unwrap();
    }

    /// Adds a read-only export of `node` that offers `qemu:allocation-depth`.
    pub fn add_depth_node(&self, name: &str, node: Arc<BlockNode>) {
        self.table
            .add(ExportConfig {
                name: name.into(),
                description: None,
                backend: BlockBackend::new(node),
                writable: false,
                allocation_depth: true,
                bitmaps: Vec::new(),
            })
            .unwrap();
    }
}

/// A driver over a child node that delays reads at offset 0 and can fail
/// requests with a chosen errno, to make ordering and error paths testable.
pub struct TestDriver {
    /// The node it forwards to.
    pub child: Arc<BlockNode>,
    /// Delay for reads starting at offset 0.
    pub slow_read: Duration,
    /// Writes (and write zeroes) at or beyond this offset fail with `fail_errno`.
    pub fail_from: u64,
    /// The errno of those failures.
    pub fail_errno: i32,
    /// Errno for write zeroes with fast_only set (None: pass through).
    pub fast_zero_errno: Option<i32>,
}

impl TestDriver {
    fn failing(&self, offset: u64) -> io::Result<()> {
        if offset >= self.fail_from {
            return Err(io::Error::from_raw_os_error(self.fail_errno));
        }
        Ok(())
    }
}

impl BlockDriver for TestDriver {
    fn format_name(&self) -> &'static str {
        "test"
    }
    fn size(&self) -> u64 {
        self.child.size()
    }
    fn filename(&self) -> String {
        self.child.filename()
    }
    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            if offset == 0 && !self.slow_read.is_zero() {
                tokio::time::sleep(self.slow_read).await;
            }
            self.child.read_into(offset, buf).await
        })
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.failing(offset)?;
            self.child.write(offset, buf, flags).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if flags.fast_only {
                if let Some(e) = self.fast_zero_errno {
                    return Err(io::Error::from_raw_os_error(e));
                }
            }
            self.failing(offset)?;
            self.child.write_zeroes(offset, len, flags).await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.child.discard(offset, len).await })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.child.flush().await })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move { self.child.block_status(offset, len).await })
    }
}

/// Wraps a new sparse file in a [`TestDriver`].
pub fn test_node(
    dir: &Path,
    name: &str,
    size: u64,
    td: impl FnOnce(Arc<BlockNode>) -> TestDriver,
) -> Arc<BlockNode> {
    let path = sparse_file(dir.join(name), size);
    let child = open_node(&path, false);
    BlockNode::new(format!("test-{name}"), Box::new(td(child)), false, true)
}

/// One extent of a [`DepthDriver`]: where it ends, and its status.
#[derive(Clone, Copy, Debug)]
pub struct DepthExtent {
    /// Where it ends.
    pub end: u64,
    /// Allocated data.
    pub data: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Which layer of the chain holds it.
    pub depth: u32,
}

/// A read-only driver with a fixed allocation map, as a backing chain would
/// report it: each lookup answers at most `max_lookup` bytes of one extent,
/// and lookups at or beyond `fail_from` fail with EIO.
pub struct DepthDriver {
    /// The extents, in order.
    pub map: Vec<DepthExtent>,
    /// The most one lookup answers.
    pub max_lookup: u64,
    /// Lookups from here fail.
    pub fail_from: u64,
}

impl BlockDriver for DepthDriver {
    fn format_name(&self) -> &'static str {
        "depth-test"
    }
    fn size(&self) -> u64 {
        self.map.last().map_or(0, |e| e.end)
    }
    fn filename(&self) -> String {
        "depth-test".into()
    }
    fn read(&self, _offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        buf.fill(0);
        Box::pin(async move { Ok(buf) })
    }
    fn write(&self, _offset: u64, _buf: IoBuf, _flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EPERM)) })
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EPERM)) })
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EPERM)) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            if offset >= self.fail_from {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let e = self
                .map
                .iter()
                .find(|e| offset < e.end)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            Ok(BlockStatus {
                len: (e.end - offset).min(len).min(self.max_lookup),
                data: e.data,
                zero: e.zero,
                depth: e.depth,
            })
        })
    }
}

/// A read-only node over a [`DepthDriver`].
pub fn depth_node(map: Vec<DepthExtent>, max_lookup: u64, fail_from: u64) -> Arc<BlockNode> {
    BlockNode::new(
        "depth-test",
        Box::new(DepthDriver {
            map,
            max_lookup,
            fail_from,
        }),
        true,
        true,
    )
}

/// A dirty bitmap the test sets by hand, offered by an export.
pub struct TestBitmap(pub Mutex<DirtyBitmap>);

impl TestBitmap {
    /// A clean bitmap over `size` bytes.
    pub fn new(size: u64, granularity: u64) -> Arc<TestBitmap> {
        Arc::new(TestBitmap(Mutex::new(DirtyBitmap::new(size, granularity))))
    }

    /// Marks `[offset, offset+len)` dirty.
    pub fn set(&self, offset: u64, len: u64) {
        self.0.lock().unwrap().set(offset, len);
    }
}

impl DirtyExtents for TestBitmap {
    fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        self.0.lock().unwrap().extents(offset, len, max)
    }
}
