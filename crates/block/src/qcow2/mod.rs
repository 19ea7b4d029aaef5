//! The `qcow2` format driver (QEMU's `block/qcow2*.c`), with backing chains.
//!
//! The image is read from a `file` child node; the backing image is any other
//! node (raw, qcow2, ...), owned by the graph, so `blockdev-snapshot` can
//! re-point it with [`Qcow2Driver::set_backing`]. Supported: versions 2 and 3,
//! cluster sizes 512 B – 2 MiB, refcount widths 1–64 bits, zero clusters,
//! reading deflate-compressed clusters, growing the refcount table. Not
//! supported: encryption, external data files, extended L2 entries, zstd, and
//! writing to images with internal snapshots (they open read-only).
//!
//! How it is built (see docs/decisions.md for why not `imago`):
//! - [`header`]: header, extensions, QEMU's open checks and error texts.
//! - [`entry`]: L1/L2 entry encoding and the geometry of one image.
//! - `meta`: L2 cache, refcounts, allocation, and the write ordering that
//!   keeps the image consistent if the process dies at any moment.
//! - `io`: guest reads, writes with copy-on-write, zeroes, discard, status.
//! - `bitmaps`: persistent dirty bitmaps, kept as a write-intent log.
//! - [`compress`]: compressed clusters.
//!
//! Every driver method is a `Send` future run on the caller's thread: there
//! is no per-image thread. Data I/O goes straight to the file child (tokio's
//! blocking pool) or to the backing node, without holding any lock, so many
//! requests are in flight at once and all cores serve them.

mod bitmaps;
pub mod compress;
pub mod entry;
pub mod header;
mod io;
pub(crate) mod meta;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use crate::buf::IoBuf;
use crate::driver::{BlockDriver, BlockStatus, ChildRef, IoFuture, Limits, WriteFlags, ZeroFlags};
use crate::node::BlockNode;
pub use bitmaps::Qcow2BitmapInfo;
use entry::{Geometry, OFFSET_MASK};
pub use header::{
    check_chain_depth, read_header_backing, resolve_backing_filename, BackingRef, Header,
    MAX_CHAIN_DEPTH,
};
use meta::{L2Cache, Meta};

/// The state shared by every request on one qcow2 node.
pub(crate) struct Inner {
    file: Arc<BlockNode>,
    backing: RwLock<Option<Arc<BlockNode>>>,
    header: Header,
    geo: Geometry,
    read_only: bool,
    l1_offset: u64,
    l1: Vec<AtomicU64>,
    cache: Mutex<L2Cache>,
    meta: tokio::sync::Mutex<Meta>,
    inflight: Mutex<HashSet<u64>>,
    inflight_changed: Notify,
    /// Held shared by every request from its mapping lookup to the end of
    /// its data I/O; taken exclusively before freed clusters become reusable.
    io_gate: tokio::sync::RwLock<()>,
    /// Some metadata change has not reached the file yet.
    meta_dirty: AtomicBool,
    /// The persistent dirty bitmaps.
    bitmaps: bitmaps::Bitmaps,
}

/// QEMU's `format-specific` data of a qcow2 node (`ImageInfoSpecificQCow2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Info {
    /// "0.10" (version 2) or "1.1" (version 3).
    pub compat: String,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// The lazy refcounts compatible feature bit.
    pub lazy_refcounts: bool,
    /// The corrupt bit.
    pub corrupt: bool,
    /// Extended L2 entries (always false: such images are refused).
    pub extended_l2: bool,
    /// "zlib".
    pub compression_type: String,
    /// Backing file name from the header.
    pub backing_filename: Option<String>,
    /// Backing file format from the header.
    pub backing_format: Option<String>,
    /// The backing file name resolved against the image's own name (QEMU's
    /// `full-backing-filename`).
    pub full_backing_filename: Option<String>,
    /// The persistent bitmaps the image's directory lists.
    pub bitmaps: Vec<Qcow2BitmapInfo>,
}

/// Options of the qcow2 driver beyond its children (QEMU's `BlockdevOptionsQcow2`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Qcow2Options {
    /// `l2-cache-size`: bytes of L2 tables kept in memory. Default: enough
    /// to map the whole disk, at most 32 MiB (QEMU's default on Linux).
    pub l2_cache_size: Option<u64>,
}

/// The cache options of `BlockdevOptionsQcow2` (QAPI `int`s), checked when
/// the image opens, as QEMU's `read_cache_sizes` does.
#[derive(Clone, Copy, Debug, Default)]
pub struct Qcow2Cache {
    /// `cache-size`.
    pub cache_size: Option<i64>,
    /// `l2-cache-size`.
    pub l2_cache_size: Option<i64>,
    /// `l2-cache-entry-size`.
    pub l2_cache_entry_size: Option<i64>,
    /// `refcount-cache-size`.
    pub refcount_cache_size: Option<i64>,
    /// `cache-clean-interval`.
    pub cache_clean_interval: Option<i64>,
    /// `lazy-refcounts`.
    pub lazy_refcounts: bool,
}

impl Qcow2Cache {
    /// QEMU's checks (`qcow2_update_options_prepare`), in its order, for
    /// an image with `cluster_size` and `version`; returns the L2 cache
    /// size in bytes, the only one livesnapd uses.
    pub fn check(&self, cluster_size: u64, version_3: bool) -> crate::Result<Option<u64>> {
        let sizes = [
            ("cache-size", self.cache_size),
            ("l2-cache-size", self.l2_cache_size),
            ("l2-cache-entry-size", self.l2_cache_entry_size),
            ("refcount-cache-size", self.refcount_cache_size),
        ];
        for (name, v) in sizes {
            if let Some(v) = v.filter(|v| *v < 0) {
                return Err(crate::Error::invalid(format!(
                    "Value '{v}' is out of range for parameter '{name}'"
                )));
            }
        }
        if let Some(combined) = self.cache_size {
            if self.l2_cache_size.is_some() && self.refcount_cache_size.is_some() {
                return Err(crate::Error::invalid(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
                ));
            }
            if self.l2_cache_size.is_some_and(|l2| l2 > combined) {
                return Err(crate::Error::invalid(
                    "l2-cache-size may not exceed cache-size",
                ));
            }
            if self.refcount_cache_size.is_some_and(|r| r > combined) {
                return Err(crate::Error::invalid(
                    "refcount-cache-size may not exceed cache-size",
                ));
            }
        }
        let entry = self.l2_cache_entry_size.unwrap_or(cluster_size as i64);
        if entry < 512 || entry as u64 > cluster_size || !(entry as u64).is_power_of_two() {
            return Err(crate::Error::invalid(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size \
                 ({cluster_size})"
            )));
        }
        // A negative number reads as a huge unsigned one in QEMU.
        if self
            .cache_clean_interval
            .is_some_and(|i| i < 0 || i > u32::MAX as i64)
        {
            return Err(crate::Error::invalid("Cache clean interval too big"));
        }
        if self.lazy_refcounts && !version_3 {
            return Err(crate::Error::invalid(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        Ok(self.l2_cache_size.map(|v| v as u64))
    }
}

/// A qcow2 image on a `file` child, optionally over a backing node.
pub struct Qcow2Driver {
    inner: Arc<Inner>,
}

impl Qcow2Driver {
    /// Opens the qcow2 image in `file`. `backing` is the node unallocated
    /// clusters read from (the daemon opens it from [`read_header_backing`]
    /// or takes it from the user); `None` reads them as zeroes. Errors carry
    /// QEMU's texts where QEMU has one.
    pub async fn open(
        file: Arc<BlockNode>,
        backing: Option<Arc<BlockNode>>,
        read_only: bool,
    ) -> crate::Result<Qcow2Driver> {
        Self::open_with(file, backing, read_only, Qcow2Options::default()).await
    }

    /// [`Qcow2Driver::open`] with options.
    pub async fn open_with(
        file: Arc<BlockNode>,
        backing: Option<Arc<BlockNode>>,
        read_only: bool,
        opts: Qcow2Options,
    ) -> crate::Result<Qcow2Driver> {
        if !read_only && file.read_only() {
            return Err(crate::Error::invalid("Block node is read-only"));
        }
        let header = Header::read(&file, !read_only).await?;
        let geo = Geometry::new(&header);
        let cs = geo.cluster_size;
        let fsize = file.size();

        let l1_bytes = header.l1_size as u64 * 8;
        if header.l1_size > 0 && header.l1_table_offset + l1_bytes > fsize {
            return Err(crate::Error::corrupt(
                "Could not read L1 table: the table lies beyond the end of the image file \
                        (image is corrupt)",
            ));
        }
        let l1_raw = header::read_padded(&file, header.l1_table_offset, l1_bytes as usize)
            .await
            .map_err(|e| crate::Error::io("Could not read L1 table", &e))?;
        let l1: Vec<AtomicU64> = l1_raw
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        for (i, e) in l1.iter().enumerate() {
            let off = e.load(Ordering::Relaxed) & OFFSET_MASK;
            if off != 0 && !off.is_multiple_of(cs) {
                return Err(crate::Error::corrupt(format!(
                    "Could not open image: L2 table offset {off:#x} in L1 entry {i} is not \
                     cluster aligned (image is corrupt)"
                )));
            }
        }

        let rt_bytes = header.refcount_table_clusters as u64 * cs;
        if header.refcount_table_offset + rt_bytes > fsize {
            return Err(crate::Error::corrupt(
                "Could not initialize refcount handling: the refcount table lies beyond \
                        the end of the image file (image is corrupt)",
            ));
        }
        let rt_raw = header::read_padded(&file, header.refcount_table_offset, rt_bytes as usize)
            .await
            .map_err(|e| crate::Error::io("Could not initialize refcount handling", &e))?;
        let reftable: Vec<u64> = rt_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if !read_only {
            for (i, e) in reftable.iter().enumerate() {
                let off = e & OFFSET_MASK;
                if off != 0 && (!off.is_multiple_of(cs) || off >= fsize) {
                    return Err(crate::Error::corrupt(format!(
                        "Could not initialize refcount handling: refcount block {i} at {off:#x} \
                         is invalid or beyond the end of the image file (image is corrupt)"
                    )));
                }
            }
        }

        if !read_only {
            // A partly written last cluster (QEMU writes only what it must) is
            // completed, so every cluster lies wholly inside the file.
            let aligned = fsize.div_ceil(cs) * cs;
            if aligned != fsize {
                file.truncate(aligned)
                    .await
                    .map_err(|e| crate::Error::io("Could not grow the image file", &e))?;
            }
        }

        // Cache enough L2 tables to map the whole disk, up to 32 MiB of tables.
        let tables = header.size.div_ceil(geo.l2_span()) as usize;
        let capacity = match opts.l2_cache_size {
            Some(bytes) => (bytes / cs) as usize,
            None => tables.min(((32 << 20) / cs) as usize),
        };
        let meta = Meta::new(reftable, header.refcount_table_offset, file.size(), cs);
        let driver = Qcow2Driver {
            inner: Arc::new(Inner {
                file,
                backing: RwLock::new(backing),
                l1_offset: header.l1_table_offset,
                geo,
                header,
                read_only,
                l1,
                cache: Mutex::new(L2Cache::new(capacity)),
                meta: tokio::sync::Mutex::new(meta),
                inflight: Mutex::new(HashSet::new()),
                inflight_changed: Notify::new(),
                io_gate: tokio::sync::RwLock::new(()),
                meta_dirty: AtomicBool::new(false),
                bitmaps: Default::default(),
            }),
        };
        let header = driver.inner.header.clone();
        driver.inner.load_bitmaps(&header).await?;
        Ok(driver)
    }

    /// Points unallocated clusters at a new backing node, in memory only (the
    /// header is not rewritten): what `blockdev-snapshot` does to an overlay.
    pub fn set_backing(&self, backing: Option<Arc<BlockNode>>) {
        *self.inner.backing.write().unwrap() = backing;
    }

    /// The current backing node.
    pub fn backing(&self) -> Option<Arc<BlockNode>> {
        self.inner.backing()
    }

    /// The backing file named in the image header (not necessarily the node in use).
    pub fn header_backing(&self) -> Option<&BackingRef> {
        self.inner.header.backing.as_ref()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.inner.geo.cluster_size
    }

    /// QEMU's `format-specific` data for `query-named-block-nodes`.
    pub fn info(&self) -> Qcow2Info {
        let h = &self.inner.header;
        Qcow2Info {
            compat: if h.version >= 3 { "1.1" } else { "0.10" }.into(),
            cluster_size: h.cluster_size(),
            refcount_bits: 1 << h.refcount_order,
            lazy_refcounts: h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
            corrupt: h.incompatible & header::INCOMPAT_CORRUPT != 0,
            extended_l2: false,
            compression_type: "zlib".into(),
            backing_filename: h.backing.as_ref().map(|b| b.filename.clone()),
            backing_format: h.backing.as_ref().and_then(|b| b.format.clone()),
            full_backing_filename: h
                .backing
                .as_ref()
                .map(|b| resolve_backing_filename(&self.inner.file.filename(), &b.filename)),
            bitmaps: self.inner.bitmaps.infos(),
        }
    }
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        // Best effort: write metadata back when the node goes away without a
        // final flush (there is no async drop). Whatever does not make it is
        // leaked clusters at worst, never corruption.
        if self.inner.read_only || !self.inner.meta_dirty.load(Ordering::Acquire) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let inner = self.inner.clone();
            rt.spawn(async move {
                if let Err(e) = inner.flush_all().await {
                    tracing::warn!("qcow2: flush on close failed: {e}");
                }
            });
        }
    }
}

impl BlockDriver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn format_specific(&self) -> Option<crate::driver::FormatSpecific> {
        Some(crate::driver::FormatSpecific::Qcow2(self.info()))
    }

    fn backing(&self) -> Option<Arc<BlockNode>> {
        Qcow2Driver::backing(self)
    }

    fn bitmap_store(&self) -> Option<&dyn crate::bitmaps::BitmapStore> {
        Some(&*self.inner)
    }

    fn set_backing(&self, backing: Option<Arc<BlockNode>>) -> crate::Result<()> {
        Qcow2Driver::set_backing(self, backing);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.inner.geo.size
    }

    fn limits(&self) -> Limits {
        Limits::default()
    }

    fn filename(&self) -> String {
        self.inner.file.filename()
    }

    fn children(&self) -> Vec<ChildRef> {
        let mut v = vec![ChildRef {
            role: "file",
            node: self.inner.file.clone(),
        }];
        if let Some(b) = self.backing() {
            v.push(ChildRef {
                role: "backing",
                node: b,
            });
        }
        v
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(self.inner.read(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.inner.write(offset, buf, flags).await? {
                self.inner.flush_all().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.inner.write_zeroes(offset, len, flags).await?;
            if flags.fua {
                self.inner.flush_all().await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.inner.discard(offset, len).await?;
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.inner.flush_all())
    }

    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            // A flush frees the clusters it unmapped after writing the L2
            // tables, which dirties refcounts again; the second one writes
            // those, so nothing is left for a write after the node is gone
            // (and its image lock released to the next user).
            for _ in 0..2 {
                if self.inner.read_only || !self.inner.meta_dirty.load(Ordering::Acquire) {
                    return;
                }
                if let Err(e) = self.inner.flush_all().await {
                    tracing::warn!("qcow2: flush on close failed: {e}");
                    return;
                }
            }
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.inner.block_status(offset, len))
    }
}
