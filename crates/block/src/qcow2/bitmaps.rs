//! Persistent dirty bitmaps in the image (qcow2.rst, "Bitmaps"), kept as a
//! write-intent log while the image is open, so that they survive a crash.
//!
//! On disk the bitmaps extension points at a directory; each entry points at
//! a bitmap table whose entries point at clusters of bits (bit `i` of the
//! bitmap is bit `i % 8` of byte `i / 8`; an entry of 0 reads as all clean).
//! QEMU marks a bitmap `in_use` while it has the image open and, finding it
//! still so after a crash, must call it inconsistent and drop its content.
//! Here, while the image is open for writing:
//! - every bitmap is marked in use and all of its data clusters are
//!   allocated, so that any bit can be set in place;
//! - before a write dirties a chunk whose bit is not yet set on disk, the
//!   bits of the write-intent region around it are written and synced
//!   (concurrent marks share one sync); a crash then leaves bits that cover
//!   every write that may have reached the disk, plus at most the regions
//!   written since the last store;
//! - cleared bits reach the disk lazily, at the next flush, and the exact
//!   bits on close, with `in_use` cleared;
//! - autoclear bit 63 ([`AUTOCLEAR_WRITE_INTENT`]) tells a later open of
//!   livesnap that in-use bitmaps are such logs. Any other program that
//!   opens the image for writing clears unknown autoclear bits, so its own
//!   in-use bitmaps are never mistaken for ours; QEMU, not knowing the bit,
//!   sees in-use bitmaps as inconsistent, its own safe fallback.
//!
//! On-disk bits are always a superset of the node's bits: marks are durable
//! before the write they cover, and a store writes only the node's bits, so
//! even a torn store leaves a superset. Clusters freed by a store that dies
//! half-way are leaked, never corrupt (as everywhere in this driver).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::header::{
    BitmapsExt, Header, AUTOCLEAR_BITMAPS, AUTOCLEAR_WRITE_INTENT, MAX_BITMAPS,
    MAX_BITMAP_DIRECTORY_SIZE,
};
use super::meta::Free;
use super::Inner;
use crate::bitmap::DirtyBitmap;
use crate::bitmaps::{BitmapStore, StoredBitmap, MAX_NAME_LEN};
use crate::buf::IoBuf;
use crate::driver::IoFuture;

/// Directory entry flag: the bitmap is in use by an open image.
const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: writes are recorded into the bitmap (enabled).
const FLAG_AUTO: u32 = 1 << 1;
/// Flags this format version defines.
const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's limit on a bitmap table's entries.
const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// QEMU's limit on a bitmap's data in bytes.
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Table entry: bits that must be zero.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Table entry: host offset of the data cluster.
const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Table entry without a cluster: every bit set.
const TABLE_ALL_ONES: u64 = 1;
/// Smallest write-intent region: a mark sets at least this many bytes' bits.
const MIN_INTENT_REGION: u64 = 1 << 20;
/// Most write-intent regions of a disk: at most this many syncs between two
/// stores, whatever the guest does.
const MAX_INTENT_REGIONS: u64 = 4096;

/// One directory entry (`Qcow2BitmapDirEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct DirEntry {
    name: String,
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u8,
}

impl DirEntry {
    /// Bytes the entry takes in the directory (8-aligned).
    fn len(name: &str) -> u64 {
        (24 + name.len() as u64).div_ceil(8) * 8
    }
}

/// A bitmap as the image holds it.
#[derive(Clone, Debug)]
struct OnDisk {
    entry: DirEntry,
    /// Host offsets of the data clusters, when every one is allocated (the
    /// bitmaps this store maintains); empty for ones left as found.
    clusters: Vec<u64>,
}

/// What the header points at now.
#[derive(Default)]
struct Disk {
    autoclear: u64,
    ext: Option<BitmapsExt>,
    bitmaps: Vec<OnDisk>,
}

/// Write-intent state of one maintained bitmap.
struct Intent {
    /// Bits on disk or about to be written there.
    wanted: DirtyBitmap,
    /// Bits known to be on disk and synced.
    durable: DirtyBitmap,
    /// Host offsets of the data clusters.
    clusters: Vec<u64>,
    /// Bytes of disk one mark covers at least.
    region: u64,
}

#[derive(Default)]
struct Marks {
    maps: HashMap<String, Intent>,
    /// Chunk ranges set in `wanted` and not yet written: (name, offset, len).
    pending: Vec<(String, u64, u64)>,
    /// Generation of the newest pending range.
    requested: u64,
}

/// A persistent bitmap as `query-named-block-nodes` reports it in the
/// qcow2 format-specific data (QEMU's `Qcow2BitmapInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// The image marks it in use.
    pub in_use: bool,
    /// Writes are recorded into it (`auto`).
    pub auto: bool,
}

/// The persistent bitmaps of one open image.
#[derive(Default)]
pub(super) struct Bitmaps {
    /// What the image held at open, until the node takes it.
    loaded: Mutex<Vec<StoredBitmap>>,
    /// The on-disk state; held by stores and by mark commits.
    disk: tokio::sync::Mutex<Disk>,
    /// The directory as queries see it.
    infos: Mutex<Vec<Qcow2BitmapInfo>>,
    marks: Mutex<Marks>,
    /// Generation up to which pending marks are durable.
    committed: AtomicU64,
}

impl Bitmaps {
    /// The directory as last written (QEMU reads it from the image).
    pub(super) fn infos(&self) -> Vec<Qcow2BitmapInfo> {
        self.infos.lock().unwrap().clone()
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses a directory as QEMU's `bitmap_list_load`, with its texts.
fn parse_directory(dir: &[u8], nb_bitmaps: u32) -> crate::Result<Vec<DirEntry>> {
    let broken = || crate::Error::invalid("Broken bitmap directory");
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < dir.len() {
        if at + 24 > dir.len() {
            return Err(broken());
        }
        if out.len() as u32 >= nb_bitmaps {
            return Err(crate::Error::invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let e = &dir[at..];
        let name_size = be16(e, 18) as usize;
        let extra = be32(e, 20) as usize;
        let len = (24 + name_size + extra).div_ceil(8) * 8;
        if at + len > dir.len() {
            return Err(broken());
        }
        if extra != 0 {
            return Err(crate::Error::invalid("Bitmap extra data is not supported"));
        }
        out.push(DirEntry {
            name: String::from_utf8_lossy(&e[24..24 + name_size]).into_owned(),
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            granularity_bits: e[17],
        });
        if e[16] != TYPE_DIRTY_TRACKING || name_size > MAX_NAME_LEN {
            return Err(constraints(&out[out.len() - 1].name));
        }
        at += len;
    }
    if (out.len() as u32) != nb_bitmaps {
        return Err(crate::Error::invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

fn constraints(name: &str) -> crate::Error {
    crate::Error::invalid(format!("Bitmap '{name}' doesn't satisfy the constraints"))
}

/// Data clusters a bitmap of `size` bytes at `granularity` takes.
fn data_clusters(size: u64, granularity: u64, cs: u64) -> u64 {
    size.div_ceil(granularity).div_ceil(8).div_ceil(cs)
}

/// QEMU's `check_dir_entry`.
fn check_entry(e: &DirEntry, cs: u64, disk_size: u64) -> crate::Result<()> {
    let bad = e.table_size == 0
        || e.table_offset == 0
        || !e.table_offset.is_multiple_of(cs)
        || e.table_size as u64 > MAX_TABLE_SIZE
        || !(9..=31).contains(&e.granularity_bits)
        || e.flags & !KNOWN_FLAGS != 0;
    let phys = e.table_size as u64 * cs;
    if bad
        || phys > MAX_PHYS_SIZE
        || (e.flags & FLAG_IN_USE == 0 && disk_size > (phys * 8) << e.granularity_bits)
    {
        return Err(constraints(&e.name));
    }
    Ok(())
}

/// The directory's bytes for `entries`.
fn render_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut d = Vec::new();
    for e in entries {
        d.extend_from_slice(&e.table_offset.to_be_bytes());
        d.extend_from_slice(&e.table_size.to_be_bytes());
        d.extend_from_slice(&e.flags.to_be_bytes());
        d.push(TYPE_DIRTY_TRACKING);
        d.push(e.granularity_bits);
        d.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(e.name.as_bytes());
        d.resize(d.len().div_ceil(8) * 8, 0);
    }
    d
}

fn info_of(e: &DirEntry) -> Qcow2BitmapInfo {
    Qcow2BitmapInfo {
        name: e.name.clone(),
        granularity: 1 << e.granularity_bits,
        in_use: e.flags & FLAG_IN_USE != 0,
        auto: e.flags & FLAG_AUTO != 0,
    }
}

impl Inner {
    fn bitmap_cs(&self) -> u64 {
        self.geo.cluster_size
    }

    /// Reads a bitmap table and checks its entries (QEMU's `bitmap_table_load`).
    async fn read_table(&self, e: &DirEntry) -> crate::Result<Vec<u64>> {
        let fail = |err: io::Error| {
            crate::Error::io(
                format!(
                    "Could not read bitmap_table table from image for bitmap '{}'",
                    e.name
                ),
                &err,
            )
        };
        let raw = super::header::read_padded(&self.file, e.table_offset, e.table_size as usize * 8)
            .await
            .map_err(fail)?;
        let cs = self.bitmap_cs();
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        for &t in &table {
            let off = t & TABLE_OFFSET;
            if t & TABLE_RESERVED != 0
                || (off != 0 && (t & TABLE_ALL_ONES != 0 || !off.is_multiple_of(cs)))
            {
                return Err(fail(einval()));
            }
        }
        Ok(table)
    }

    /// Reads a bitmap's bits (QEMU's `load_bitmap_data`).
    async fn read_bits(&self, e: &DirEntry, table: &[u64]) -> crate::Result<DirtyBitmap> {
        let cs = self.bitmap_cs();
        let size = self.geo.size;
        let gran = 1u64 << e.granularity_bits;
        let fail = |err: io::Error| {
            crate::Error::io(
                format!("Could not read bitmap '{}' from image", e.name),
                &err,
            )
        };
        if data_clusters(size, gran, cs) != table.len() as u64 {
            return Err(fail(einval()));
        }
        let bytes_needed = size.div_ceil(gran).div_ceil(8) as usize;
        let mut bytes = vec![0u8; table.len() * cs as usize];
        for (i, &t) in table.iter().enumerate() {
            let dst = &mut bytes[i * cs as usize..(i + 1) * cs as usize];
            let off = t & TABLE_OFFSET;
            if off != 0 {
                let data = super::header::read_padded(&self.file, off, cs as usize)
                    .await
                    .map_err(fail)?;
                dst.copy_from_slice(&data);
            } else if t & TABLE_ALL_ONES != 0 {
                dst.fill(0xff);
            }
        }
        bytes.truncate(bytes_needed);
        Ok(DirtyBitmap::from_bytes(size, gran, &bytes))
    }

    /// Loads the bitmaps of the header as QEMU's `qcow2_load_dirty_bitmaps`
    /// does; opened for writing, also takes them over as write-intent logs
    /// (marked in use, every data cluster allocated).
    pub(super) async fn load_bitmaps(&self, header: &Header) -> crate::Result<()> {
        let Some(ext) = header.bitmaps else {
            if !self.read_only {
                // Unknown autoclear bits go (QEMU does the same); a stale
                // bitmaps extension without its autoclear bit goes with them.
                self.set_autoclear_only(header, 0).await?;
            }
            return Ok(());
        };
        if ext.directory_size == 0 {
            return Err(crate::Error::invalid(
                "Requested bitmap directory size is zero",
            ));
        }
        let dir = super::header::read_padded(
            &self.file,
            ext.directory_offset,
            ext.directory_size as usize,
        )
        .await
        .map_err(|e| crate::Error::io("Failed to read bitmap directory", &e))?;
        let entries = parse_directory(&dir, ext.nb_bitmaps)?;
        let cs = self.bitmap_cs();
        for e in &entries {
            check_entry(e, cs, self.geo.size)?;
        }
        // In-use bitmaps are ours to trust only when the image says every
        // writer since kept them as write-intent logs.
        let trusted = header.autoclear & AUTOCLEAR_WRITE_INTENT != 0;
        let mut loaded = Vec::new();
        let mut on_disk = Vec::new();
        for e in entries {
            let gran = 1u64 << e.granularity_bits;
            let inconsistent = e.flags & FLAG_IN_USE != 0 && !trusted;
            let bits = if inconsistent {
                DirtyBitmap::new(self.geo.size, gran)
            } else {
                let table = self.read_table(&e).await?;
                self.read_bits(&e, &table).await?
            };
            loaded.push(StoredBitmap {
                name: e.name.clone(),
                enabled: e.flags & FLAG_AUTO != 0,
                inconsistent,
                bits,
            });
            on_disk.push(OnDisk {
                entry: e,
                clusters: Vec::new(),
            });
        }
        *self.bitmaps.infos.lock().unwrap() = on_disk.iter().map(|b| info_of(&b.entry)).collect();
        {
            let mut disk = self.bitmaps.disk.lock().await;
            disk.autoclear = header.autoclear;
            disk.ext = Some(ext);
            disk.bitmaps = on_disk;
        }
        if !self.read_only {
            self.write_bitmaps(&loaded, false, header)
                .await
                .map_err(|e| crate::Error::io("Can't update bitmap directory", &e))?;
        }
        *self.bitmaps.loaded.lock().unwrap() = loaded;
        Ok(())
    }

    /// Writes the header with `autoclear` and no bitmaps when what the image
    /// says differs (an image without a consistent bitmaps extension).
    async fn set_autoclear_only(&self, header: &Header, autoclear: u64) -> crate::Result<()> {
        if header.version < 3 || header.autoclear == autoclear && !header.layout.stale_bitmaps {
            return Ok(());
        }
        self.write_header(header, autoclear, None)
            .await
            .map_err(|e| crate::Error::io("Could not update qcow2 header", &e))?;
        self.bitmaps.disk.lock().await.autoclear = autoclear;
        Ok(())
    }

    /// Rewrites the header area with `autoclear` and `bitmaps` and syncs it.
    /// The header structure is read back first, under the metadata lock:
    /// other fields (the refcount table's place) change while open.
    async fn write_header(
        &self,
        header: &Header,
        autoclear: u64,
        bitmaps: Option<BitmapsExt>,
    ) -> io::Result<()> {
        let _m = self.meta.lock().await;
        let fixed =
            super::header::read_padded(&self.file, 0, header.header_length as usize).await?;
        let bytes = header
            .layout
            .render(&fixed, autoclear, bitmaps, self.bitmap_cs())
            .ok_or_else(einval)?;
        self.file
            .write(0, IoBuf::from_slice(&bytes), Default::default())
            .await?;
        self.file.flush().await
    }

    /// Allocates `n` contiguous clusters for bitmap metadata.
    async fn alloc_bitmap_clusters(&self, n: u64) -> io::Result<u64> {
        let mut m = self.meta.lock().await;
        let mut partial = Vec::new();
        let off = loop {
            let (off, got, _) = self.alloc_run(&mut m, n).await?;
            if got == n {
                break off;
            }
            partial.push(Free {
                offset: off,
                len: got * self.bitmap_cs(),
                punch: false,
            });
        };
        self.apply_frees(&mut m, &partial).await?;
        Ok(off)
    }

    /// Writes `set`, the node's whole persistent set, in place of what the
    /// image holds: maintained (in use, fully allocated) while open,
    /// `closing` marks them clean. Inconsistent bitmaps stay as found.
    async fn write_bitmaps(
        &self,
        set: &[StoredBitmap],
        closing: bool,
        header: &Header,
    ) -> io::Result<()> {
        let cs = self.bitmap_cs();
        let mut disk = self.bitmaps.disk.lock().await;
        let mut entries = Vec::new();
        let mut kept = Vec::new();
        let mut frees = Vec::new();
        let mut intents = HashMap::new();
        let mut written = false;
        for s in set {
            let old = disk.bitmaps.iter().find(|b| b.entry.name == s.name);
            if s.inconsistent {
                if let Some(old) = old {
                    entries.push(old.entry.clone());
                    kept.push(old.clone());
                }
                continue;
            }
            let gran = s.bits.granularity();
            let gbits = gran.trailing_zeros() as u8;
            let n = data_clusters(self.geo.size, gran, cs).max(1);
            let reuse =
                old.filter(|o| o.entry.granularity_bits == gbits && o.clusters.len() as u64 == n);
            let (table_offset, clusters) = match reuse {
                Some(o) => (o.entry.table_offset, o.clusters.clone()),
                None => {
                    let data = self.alloc_bitmap_clusters(n).await?;
                    let table_clusters = (n * 8).div_ceil(cs);
                    let table = self.alloc_bitmap_clusters(table_clusters).await?;
                    let clusters: Vec<u64> = (0..n).map(|i| data + i * cs).collect();
                    let raw: Vec<u8> = clusters.iter().flat_map(|c| c.to_be_bytes()).collect();
                    self.file
                        .write(table, IoBuf::from_slice(&raw), Default::default())
                        .await?;
                    if let Some(o) = old {
                        frees.extend(self.bitmap_frees(o).await?);
                    }
                    (table, clusters)
                }
            };
            // The node's bits are a subset of what is on disk, so from here
            // on what is durable is at least these bits, even if the
            // writes below stop half-way.
            let bytes = s.bits.to_bytes();
            for (i, &c) in clusters.iter().enumerate() {
                let from = (i * cs as usize).min(bytes.len());
                let to = ((i + 1) * cs as usize).min(bytes.len());
                let mut data = bytes[from..to].to_vec();
                data.resize(cs as usize, 0);
                self.file
                    .write(c, IoBuf::from_slice(&data), Default::default())
                    .await?;
            }
            written = true;
            let entry = DirEntry {
                name: s.name.clone(),
                table_offset,
                table_size: n as u32,
                flags: if closing { 0 } else { FLAG_IN_USE }
                    | if s.enabled { FLAG_AUTO } else { 0 },
                granularity_bits: gbits,
            };
            entries.push(entry.clone());
            kept.push(OnDisk {
                entry,
                clusters: clusters.clone(),
            });
            // Only recording bitmaps take marks: a disabled one keeps its bits.
            if !closing && s.enabled {
                intents.insert(
                    s.name.clone(),
                    Intent {
                        wanted: s.bits.clone(),
                        durable: s.bits.clone(),
                        clusters,
                        region: self.intent_region(gran),
                    },
                );
            }
        }
        for old in &disk.bitmaps {
            if !set.iter().any(|s| s.name == old.entry.name) {
                frees.extend(self.bitmap_frees(old).await?);
            }
        }
        // What the store replaces is no longer safe to set bits in.
        {
            let mut marks = self.bitmaps.marks.lock().unwrap();
            marks.maps = intents;
            marks.pending.clear();
            self.bitmaps
                .committed
                .store(marks.requested, Ordering::Release);
        }

        let all_maintained = kept.iter().all(|b| !b.clusters.is_empty());
        let mut autoclear = if entries.is_empty() {
            0
        } else {
            AUTOCLEAR_BITMAPS
        };
        if !closing && !entries.is_empty() && all_maintained {
            autoclear |= AUTOCLEAR_WRITE_INTENT;
        }
        let old_entries: Vec<DirEntry> = disk.bitmaps.iter().map(|b| b.entry.clone()).collect();
        if entries == old_entries && autoclear == disk.autoclear {
            if written {
                self.file.flush().await?;
            }
            disk.bitmaps = kept;
            return Ok(());
        }

        // New refcounts, tables and bits are durable before anything points
        // at them; the header switches to the new directory in one write.
        let ext = if entries.is_empty() {
            None
        } else {
            let dir = render_directory(&entries);
            if dir.len() as u64 > MAX_BITMAP_DIRECTORY_SIZE || entries.len() as u32 > MAX_BITMAPS {
                return Err(einval());
            }
            let off = self
                .alloc_bitmap_clusters((dir.len() as u64).div_ceil(cs))
                .await?;
            self.file
                .write(off, IoBuf::from_slice(&dir), Default::default())
                .await?;
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: off,
            })
        };
        {
            let mut m = self.meta.lock().await;
            self.write_refblocks(&mut m).await?;
        }
        self.file.flush().await?;
        self.write_header(header, autoclear, ext).await?;
        if let Some(old) = disk.ext {
            frees.push(Free {
                offset: old.directory_offset,
                len: old.directory_size,
                punch: false,
            });
        }
        disk.ext = ext;
        disk.autoclear = autoclear;
        disk.bitmaps = kept;
        *self.bitmaps.infos.lock().unwrap() = entries.iter().map(info_of).collect();
        drop(disk);
        // Nothing points at these any more; losing this step leaks them.
        let mut m = self.meta.lock().await;
        self.apply_frees(&mut m, &frees).await?;
        self.write_refblocks(&mut m).await
    }

    /// The clusters of a bitmap that is going away: its data and its table.
    async fn bitmap_frees(&self, b: &OnDisk) -> io::Result<Vec<Free>> {
        let cs = self.bitmap_cs();
        let data: Vec<u64> = if b.clusters.is_empty() {
            match self.read_table(&b.entry).await {
                Ok(t) => t
                    .iter()
                    .map(|t| t & TABLE_OFFSET)
                    .filter(|&o| o != 0)
                    .collect(),
                // An unreadable table leaks its clusters rather than fail the store.
                Err(_) => Vec::new(),
            }
        } else {
            b.clusters.clone()
        };
        let mut frees: Vec<Free> = data
            .into_iter()
            .map(|offset| Free {
                offset,
                len: cs,
                punch: false,
            })
            .collect();
        frees.push(Free {
            offset: b.entry.table_offset,
            len: b.entry.table_size as u64 * 8,
            punch: false,
        });
        Ok(frees)
    }

    /// Bytes of disk one write-intent mark covers.
    fn intent_region(&self, granularity: u64) -> u64 {
        let spread = self
            .geo
            .size
            .div_ceil(MAX_INTENT_REGIONS)
            .next_power_of_two();
        spread.max(MIN_INTENT_REGION).max(granularity)
    }

    /// Makes `[offset, offset+len)` dirty on disk in every recording
    /// bitmap before the write that dirties it goes out (see the module
    /// comment).
    async fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let generation = {
            let mut marks = self.bitmaps.marks.lock().unwrap();
            let marks = &mut *marks;
            let mut wait = false;
            for (name, intent) in marks.maps.iter_mut() {
                if intent.durable.all(offset, len) {
                    continue;
                }
                wait = true;
                let start = offset / intent.region * intent.region;
                let end = (offset + len)
                    .div_ceil(intent.region)
                    .saturating_mul(intent.region)
                    .min(self.geo.size);
                if !intent.wanted.all(start, end - start) {
                    intent.wanted.set(start, end - start);
                    marks.requested += 1;
                    marks.pending.push((name.clone(), start, end - start));
                }
            }
            if !wait {
                return Ok(());
            }
            marks.requested
        };
        let _disk = self.bitmaps.disk.lock().await;
        if self.bitmaps.committed.load(Ordering::Acquire) >= generation {
            return Ok(());
        }
        let (upto, taken, writes) = {
            let mut marks = self.bitmaps.marks.lock().unwrap();
            let taken = std::mem::take(&mut marks.pending);
            let mut writes = Vec::new();
            for (name, off, len) in &taken {
                if let Some(intent) = marks.maps.get(name) {
                    writes.extend(intent_writes(intent, *off, *len, self.bitmap_cs()));
                }
            }
            (marks.requested, taken, writes)
        };
        let r = async {
            for (at, bytes) in writes {
                self.file
                    .write(at, IoBuf::from_slice(&bytes), Default::default())
                    .await?;
            }
            self.file.flush().await
        }
        .await;
        let mut marks = self.bitmaps.marks.lock().unwrap();
        match r {
            Ok(()) => {
                for (name, off, len) in &taken {
                    if let Some(intent) = marks.maps.get_mut(name) {
                        intent.durable.set(*off, *len);
                    }
                }
                self.bitmaps.committed.store(upto, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // The next mark tries them again.
                marks.pending.extend(taken);
                Err(e)
            }
        }
    }
}

/// The file writes that put `wanted`'s bits for `[off, off+len)` on disk:
/// (host offset, bytes), split at data cluster boundaries.
fn intent_writes(intent: &Intent, off: u64, len: u64, cs: u64) -> Vec<(u64, Vec<u8>)> {
    let gran = intent.wanted.granularity();
    let first_chunk = off / gran;
    let end_chunk = (off + len).div_ceil(gran);
    let (mut byte, end_byte) = (first_chunk / 8, end_chunk.div_ceil(8));
    let mut out = Vec::new();
    while byte < end_byte {
        let cluster = byte / cs;
        let stop = end_byte.min((cluster + 1) * cs);
        let bytes = intent
            .wanted
            .bytes_at(byte as usize, (stop - byte) as usize);
        out.push((intent.clusters[cluster as usize] + byte % cs, bytes));
        byte = stop;
    }
    out
}

impl BitmapStore for Inner {
    fn take_loaded(&self) -> Vec<StoredBitmap> {
        std::mem::take(&mut *self.bitmaps.loaded.lock().unwrap())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn check_storable(&self, name: &str, granularity: u64) -> crate::Result<()> {
        if self.header.version < 3 {
            return Err(crate::Error::invalid(
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        let gbits = granularity.trailing_zeros();
        if gbits > 31 {
            return Err(crate::Error::invalid(
                "Granularity exceeds maximum (2147483648 bytes)",
            ));
        }
        if gbits < 9 {
            return Err(crate::Error::invalid(
                "Granularity is under minimum (512 bytes)",
            ));
        }
        let bytes = self.geo.size.div_ceil(granularity).div_ceil(8);
        if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * self.bitmap_cs() {
            return Err(crate::Error::invalid(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(crate::Error::invalid(format!(
                "Name length exceeds maximum ({MAX_NAME_LEN} characters)"
            )));
        }
        let infos = self.bitmaps.infos.lock().unwrap();
        if infos.len() as u32 + 1 > MAX_BITMAPS {
            return Err(crate::Error::invalid(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        let dir: u64 =
            infos.iter().map(|i| DirEntry::len(&i.name)).sum::<u64>() + DirEntry::len(name);
        if dir > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(crate::Error::invalid(
                "Not enough space in the bitmap directory",
            ));
        }
        Ok(())
    }

    fn store(&self, bitmaps: Vec<StoredBitmap>, closing: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Ok(());
            }
            if closing {
                // The image is complete before its bitmaps say they are.
                self.flush_all().await?;
            }
            let header = self.header.clone();
            self.write_bitmaps(&bitmaps, closing, &header).await?;
            if closing {
                // The refcounts of what the store freed, so nothing is left
                // for the driver's last-chance flush when it is dropped.
                self.flush_all().await?;
            }
            Ok(())
        })
    }

    fn mark_dirty(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.mark(offset, len))
    }
}
