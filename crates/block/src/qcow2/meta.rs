//! Metadata: the L2 table cache, refcounts, cluster allocation, and the order
//! in which metadata reaches the file.
//!
//! Ordering rules (each on-disk state between two writes is consistent, so a
//! process killed at any moment leaves at most leaked clusters):
//! - a refcount increment is written before any L1/L2/reftable entry that
//!   points at the cluster (new L2 tables and refblocks: right away; data
//!   clusters: every dirty refblock is written before any dirty L2 table);
//! - an L2 entry is only changed in memory after the data it points to was
//!   written (the L2 table reaches the file later, at flush or eviction);
//! - a refcount decrement is applied only after the L2 tables that dropped the
//!   cluster are on disk, and after every request that may still use the old
//!   mapping has finished (the I/O gate), so a freed cluster is never reused
//!   while an old L2 entry or an in-flight request still points at it.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::entry::{COPIED, OFFSET_MASK};
use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use super::Inner;
use crate::buf::IoBuf;

/// One cached L2 table. Entries change only under the metadata lock; readers
/// load them without locks.
pub(super) struct L2Table {
    pub offset: u64,
    entries: Box<[AtomicU64]>,
    dirty: AtomicBool,
    last_used: AtomicU64,
}

impl L2Table {
    fn from_bytes(offset: u64, b: &[u8]) -> L2Table {
        let entries = b
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        L2Table {
            offset,
            entries,
            dirty: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
        }
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.entries[i].load(Ordering::Acquire)
    }

    /// Sets entry `i`; the caller holds the metadata lock.
    pub fn set(&self, i: usize, v: u64) {
        self.entries[i].store(v, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
    }

    fn to_buf(&self) -> IoBuf {
        let mut b = IoBuf::zeroed(self.entries.len() * 8);
        for (i, e) in self.entries.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
        }
        b
    }
}

/// The L2 table cache (by host offset of the table).
pub(super) struct L2Cache {
    map: HashMap<u64, Arc<L2Table>>,
    capacity: usize,
    clock: u64,
}

impl L2Cache {
    pub fn new(capacity: usize) -> L2Cache {
        L2Cache {
            map: HashMap::new(),
            capacity: capacity.max(4),
            clock: 0,
        }
    }
}

/// One refcount block, kept in memory once loaded.
pub(super) struct RefBlock {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
}

/// A range to free once the L2 tables that dropped it are on disk.
#[derive(Clone, Copy, Debug)]
pub(super) struct Free {
    /// Host byte offset.
    pub offset: u64,
    /// Length in bytes (clusters touched are freed once each).
    pub len: u64,
    /// Punch the range out of the file afterwards (not for shared compressed clusters).
    pub punch: bool,
}

/// Metadata state guarded by the async metadata lock.
pub(super) struct Meta {
    reftable: Vec<u64>,
    reftable_offset: u64,
    refblocks: HashMap<usize, RefBlock>,
    /// Every cluster below this index is allocated.
    free_hint: u64,
    /// No cluster at or after this host offset was ever written: it reads as zeroes.
    pub fresh_from: u64,
    /// Clusters dropped from L2 tables, freed at the next flush.
    pub pending_free: Vec<Free>,
}

fn corrupt(what: String) -> io::Error {
    tracing::error!("qcow2: image is corrupt: {what}");
    io::Error::from_raw_os_error(libc::EIO)
}

impl Meta {
    /// Metadata state of an image whose refcount table was read as `reftable`.
    pub fn new(
        reftable: Vec<u64>,
        reftable_offset: u64,
        file_size: u64,
        cluster_size: u64,
    ) -> Meta {
        Meta {
            reftable,
            reftable_offset,
            refblocks: HashMap::new(),
            free_hint: 0,
            fresh_from: file_size.div_ceil(cluster_size) * cluster_size,
            pending_free: Vec::new(),
        }
    }
}

/// Reads the refcount of entry `i` from a refblock's bytes.
fn rc_get(order: u32, d: &[u8], i: usize) -> u64 {
    match order {
        0 => ((d[i / 8] >> (i % 8)) & 1) as u64,
        1 => ((d[i / 4] >> (2 * (i % 4))) & 3) as u64,
        2 => ((d[i / 2] >> (4 * (i % 2))) & 15) as u64,
        3 => d[i] as u64,
        4 => u16::from_be_bytes([d[2 * i], d[2 * i + 1]]) as u64,
        5 => u32::from_be_bytes(d[4 * i..4 * i + 4].try_into().expect("4")) as u64,
        _ => u64::from_be_bytes(d[8 * i..8 * i + 8].try_into().expect("8")),
    }
}

/// Writes the refcount of entry `i` into a refblock's bytes.
pub(crate) fn rc_set(order: u32, d: &mut [u8], i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = bits * (i % per);
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            d[i / per] = (d[i / per] & !mask) | (((v as u8) << shift) & mask);
        }
        3 => d[i] = v as u8,
        4 => d[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => d[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => d[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Writes one big-endian u64 (a table entry or header field) into the image file.
pub(super) async fn write_be64(
    file: &crate::node::BlockNode,
    offset: u64,
    value: u64,
) -> io::Result<()> {
    file.write(
        offset,
        IoBuf::from_slice(&value.to_be_bytes()),
        Default::default(),
    )
    .await
}

impl Inner {
    fn cs(&self) -> u64 {
        self.geo.cluster_size
    }

    /// The cached table at `off`, if cached.
    pub(super) fn cache_get(&self, off: u64) -> Option<Arc<L2Table>> {
        let mut c = self.cache.lock().unwrap();
        c.clock += 1;
        let now = c.clock;
        let t = c.map.get(&off)?.clone();
        t.last_used.store(now, Ordering::Relaxed);
        Some(t)
    }

    /// Checks that a metadata cluster offset from the image lies inside the file.
    fn check_meta_offset(&self, off: u64, what: &str) -> io::Result<()> {
        if !off.is_multiple_of(self.cs()) || off < self.cs() || off >= self.file.size() {
            return Err(corrupt(format!(
                "{what} offset {off:#x} is invalid or beyond the end of the file"
            )));
        }
        Ok(())
    }

    /// The L2 table at host offset `off`, loading it into the cache.
    pub(super) async fn load_l2(&self, m: &mut Meta, off: u64) -> io::Result<Arc<L2Table>> {
        if let Some(t) = self.cache_get(off) {
            return Ok(t);
        }
        self.check_meta_offset(off, "L2 table")?;
        let b = super::header::read_padded(&self.file, off, self.cs() as usize).await?;
        let t = Arc::new(L2Table::from_bytes(off, &b));
        self.cache_insert(m, t.clone()).await?;
        Ok(t)
    }

    async fn cache_insert(&self, m: &mut Meta, t: Arc<L2Table>) -> io::Result<()> {
        loop {
            let victim = {
                let c = self.cache.lock().unwrap();
                if c.map.len() < c.capacity {
                    break;
                }
                let clean = c
                    .map
                    .values()
                    .filter(|t| !t.dirty.load(Ordering::Acquire))
                    .min_by_key(|t| t.last_used.load(Ordering::Relaxed));
                match clean {
                    Some(v) => (v.clone(), false),
                    None => (
                        c.map
                            .values()
                            .min_by_key(|t| t.last_used.load(Ordering::Relaxed))
                            .expect("cache is full")
                            .clone(),
                        true,
                    ),
                }
            };
            if victim.1 {
                // Refcounts of everything the table points at go first.
                self.write_refblocks(m).await?;
                self.write_l2(&victim.0).await?;
            }
            self.cache.lock().unwrap().map.remove(&victim.0.offset);
        }
        let mut c = self.cache.lock().unwrap();
        c.clock += 1;
        t.last_used.store(c.clock, Ordering::Relaxed);
        c.map.insert(t.offset, t);
        Ok(())
    }

    async fn write_l2(&self, t: &L2Table) -> io::Result<()> {
        // Clear first: a change made while the write is in flight (only under
        // the metadata lock, which the writer holds) cannot be lost this way.
        t.dirty.store(false, Ordering::Release);
        let r = self
            .file
            .write(t.offset, t.to_buf(), Default::default())
            .await;
        if r.is_err() {
            t.dirty.store(true, Ordering::Release);
        }
        r
    }

    /// Writes every dirty L2 table.
    pub(super) async fn write_dirty_l2(&self, _m: &mut Meta) -> io::Result<()> {
        let dirty: Vec<Arc<L2Table>> = {
            let c = self.cache.lock().unwrap();
            c.map
                .values()
                .filter(|t| t.dirty.load(Ordering::Acquire))
                .cloned()
                .collect()
        };
        for t in dirty {
            self.write_l2(&t).await?;
        }
        Ok(())
    }

    /// Whether any cached L2 table is dirty.
    pub(super) fn l2_dirty(&self) -> bool {
        let c = self.cache.lock().unwrap();
        c.map.values().any(|t| t.dirty.load(Ordering::Acquire))
    }

    /// Writes every dirty refblock.
    pub(super) async fn write_refblocks(&self, m: &mut Meta) -> io::Result<()> {
        let mut keys: Vec<usize> = m
            .refblocks
            .iter()
            .filter(|(_, rb)| rb.dirty)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        for k in keys {
            let rb = m.refblocks.get_mut(&k).expect("refblock");
            self.file
                .write(rb.offset, IoBuf::from_slice(&rb.data), Default::default())
                .await?;
            rb.dirty = false;
        }
        Ok(())
    }

    /// Whether any refblock is dirty.
    pub(super) fn refblocks_dirty(m: &Meta) -> bool {
        m.refblocks.values().any(|rb| rb.dirty)
    }

    /// Loads the refblock for reftable index `rt` (which must have one).
    async fn load_refblock<'m>(&self, m: &'m mut Meta, rt: usize) -> io::Result<&'m mut RefBlock> {
        if !m.refblocks.contains_key(&rt) {
            let off = m.reftable[rt] & OFFSET_MASK;
            self.check_meta_offset(off, "Refcount block")?;
            let data = super::header::read_padded(&self.file, off, self.cs() as usize).await?;
            m.refblocks.insert(
                rt,
                RefBlock {
                    offset: off,
                    data,
                    dirty: false,
                },
            );
        }
        Ok(m.refblocks.get_mut(&rt).expect("loaded"))
    }

    /// Refcount of host cluster `idx`.
    pub(super) async fn refcount(&self, m: &mut Meta, idx: u64) -> io::Result<u64> {
        let rt = (idx >> self.geo.rb_bits) as usize;
        if rt >= m.reftable.len() || m.reftable[rt] & OFFSET_MASK == 0 {
            return Ok(0);
        }
        let order = self.geo.refcount_order;
        let i = (idx & (self.geo.rb_entries() - 1)) as usize;
        let rb = self.load_refblock(m, rt).await?;
        Ok(rc_get(order, &rb.data, i))
    }

    async fn set_refcount(&self, m: &mut Meta, idx: u64, v: u64) -> io::Result<()> {
        let rt = (idx >> self.geo.rb_bits) as usize;
        let order = self.geo.refcount_order;
        let i = (idx & (self.geo.rb_entries() - 1)) as usize;
        let rb = self.load_refblock(m, rt).await?;
        rc_set(order, &mut rb.data, i, v);
        rb.dirty = true;
        self.meta_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes the file at least `end` bytes long, growing it in steps so that
    /// appending clusters does not cost a truncate each.
    pub(super) async fn ensure_file_size(&self, end: u64) -> io::Result<()> {
        let size = self.file.size();
        if size >= end {
            return Ok(());
        }
        let step = (size / 32).clamp(1 << 20, 64 << 20);
        let target = end.max(size + step).div_ceil(self.cs()) * self.cs();
        self.file.truncate(target).await
    }

    /// Refuses to allocate host bytes `[off, off + len)` over the header,
    /// the L1 table, the refcount table or a refcount block. Only a corrupt
    /// image offers such clusters (metadata without a refcount, e.g. a
    /// refcount table whose first entry is 0), and handing them out would
    /// overwrite the metadata (fuzzing found a refblock written over the
    /// header, then endless allocation). QEMU refuses the same with its
    /// overlap checks ("Preventing invalid allocation ...").
    fn check_no_metadata_overlap(&self, m: &Meta, off: u64, len: u64) -> io::Result<()> {
        let cs = self.cs();
        let end = off.saturating_add(len);
        let hits = |start: u64, size: u64| start < end && off < start.saturating_add(size);
        let what = if hits(0, cs) {
            "the image header"
        } else if hits(self.l1_offset, self.l1.len() as u64 * 8) {
            "the L1 table"
        } else if hits(m.reftable_offset, m.reftable.len() as u64 * 8) {
            "the refcount table"
        } else if m
            .reftable
            .iter()
            .any(|&e| e & OFFSET_MASK != 0 && hits(e & OFFSET_MASK, cs))
        {
            "a refcount block"
        } else {
            return Ok(());
        };
        Err(corrupt(format!(
            "allocation at {off:#x} would overwrite {what}"
        )))
    }

    /// Allocates up to `max` contiguous clusters (at least one) and returns
    /// the first host offset, the count, and whether they are known to read
    /// as zeroes (never written before).
    pub(super) async fn alloc_run(&self, m: &mut Meta, max: u64) -> io::Result<(u64, u64, bool)> {
        let rb_entries = self.geo.rb_entries();
        let mut idx = m.free_hint;
        loop {
            let rt = (idx >> self.geo.rb_bits) as usize;
            if rt >= m.reftable.len() {
                self.grow_reftable(m, rt).await?;
                continue;
            }
            if m.reftable[rt] & OFFSET_MASK == 0 {
                self.create_refblock(m, rt).await?;
                continue;
            }
            let block_end = (rt as u64 + 1) * rb_entries;
            let mut start = None;
            while idx < block_end {
                if self.refcount(m, idx).await? == 0 {
                    start = Some(idx);
                    break;
                }
                idx += 1;
            }
            let Some(start) = start else {
                continue;
            };
            let mut n = 1;
            while n < max && start + n < block_end && self.refcount(m, start + n).await? == 0 {
                n += 1;
            }
            let off = start << self.geo.cluster_bits;
            let end = (start + n) << self.geo.cluster_bits;
            self.check_no_metadata_overlap(m, off, end - off)?;
            // The scan started at the hint: everything before `start` is in use.
            m.free_hint = start + n;
            self.ensure_file_size(end).await?;
            for i in 0..n {
                self.set_refcount(m, start + i, 1).await?;
            }
            let fresh = off >= m.fresh_from;
            m.fresh_from = m.fresh_from.max(end);
            return Ok((off, n, fresh));
        }
    }

    /// Creates the refblock for reftable index `rt`, placed in the first
    /// cluster it describes (free, since nothing there had a refcount).
    async fn create_refblock(&self, m: &mut Meta, rt: usize) -> io::Result<()> {
        let cs = self.cs();
        let off = ((rt as u64) << self.geo.rb_bits) * cs;
        self.check_no_metadata_overlap(m, off, cs)?;
        self.ensure_file_size(off + cs).await?;
        let mut data = vec![0u8; cs as usize];
        rc_set(self.geo.refcount_order, &mut data, 0, 1);
        self.file
            .write(off, IoBuf::from_slice(&data), Default::default())
            .await?;
        m.refblocks.insert(
            rt,
            RefBlock {
                offset: off,
                data,
                dirty: false,
            },
        );
        // The block is on disk (and counts itself) before the table points at it.
        write_be64(&self.file, m.reftable_offset + rt as u64 * 8, off).await?;
        m.reftable[rt] = off;
        m.fresh_from = m.fresh_from.max(off + cs);
        Ok(())
    }

    /// Replaces the refcount table by a larger one covering index `need`.
    ///
    /// The new table and a refblock describing it go into a range of clusters
    /// beyond everything in use; the header switches to it with one write.
    async fn grow_reftable(&self, m: &mut Meta, need: usize) -> io::Result<()> {
        let cs = self.cs();
        let rb_entries = self.geo.rb_entries();
        let used = self.file.size().max(m.fresh_from).div_ceil(cs);
        let k = (need as u64).max(used.div_ceil(rb_entries)) as usize;
        let per_cluster = (cs / 8) as usize;
        let new_len = (k + 1).max(m.reftable.len() * 2).div_ceil(per_cluster) * per_cluster;
        let nrt = (new_len / per_cluster) as u64;
        if nrt * cs > MAX_REFTABLE_BYTES || nrt + 1 > rb_entries {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let rb_off = ((k as u64) << self.geo.rb_bits) * cs;
        let rt_off = rb_off + cs;
        self.ensure_file_size(rt_off + nrt * cs).await?;

        let mut rb = vec![0u8; cs as usize];
        for i in 0..=nrt as usize {
            rc_set(self.geo.refcount_order, &mut rb, i, 1);
        }
        self.file
            .write(rb_off, IoBuf::from_slice(&rb), Default::default())
            .await?;
        let mut table = m.reftable.clone();
        table.resize(new_len, 0);
        table[k] = rb_off;
        let mut tb = IoBuf::zeroed((nrt * cs) as usize);
        for (i, e) in table.iter().enumerate() {
            tb[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.file.write(rt_off, tb, Default::default()).await?;
        // Dirty refblocks first, so the new table never points at stale counts
        // that the old table's blocks had in memory only.
        self.write_refblocks(m).await?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&rt_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(nrt as u32).to_be_bytes());
        self.file
            .write(OFF_REFTABLE, IoBuf::from_slice(&hdr), Default::default())
            .await?;

        let old_off = m.reftable_offset;
        let old_clusters = (m.reftable.len() as u64 * 8).div_ceil(cs);
        m.reftable = table;
        m.reftable_offset = rt_off;
        m.refblocks.insert(
            k,
            RefBlock {
                offset: rb_off,
                data: rb,
                dirty: false,
            },
        );
        m.fresh_from = m.fresh_from.max(rt_off + nrt * cs);
        // Nothing on disk points at the old table any more.
        for i in 0..old_clusters {
            self.decrement(m, (old_off >> self.geo.cluster_bits) + i)
                .await?;
        }
        Ok(())
    }

    async fn decrement(&self, m: &mut Meta, idx: u64) -> io::Result<()> {
        let rc = self.refcount(m, idx).await?;
        if rc == 0 {
            tracing::warn!("qcow2: freeing cluster {idx} whose refcount is already 0");
            return Ok(());
        }
        self.set_refcount(m, idx, rc - 1).await?;
        if rc == 1 && idx < m.free_hint {
            m.free_hint = idx;
        }
        Ok(())
    }

    /// Frees ranges whose last reference is gone from disk.
    pub(super) async fn apply_frees(&self, m: &mut Meta, frees: &[Free]) -> io::Result<()> {
        let cb = self.geo.cluster_bits;
        for f in frees {
            let first = f.offset >> cb;
            let last = (f.offset + f.len.max(1) - 1) >> cb;
            for idx in first..=last {
                self.decrement(m, idx).await?;
            }
        }
        Ok(())
    }

    /// The L2 table for L1 index `l1i`, creating it for a write if missing.
    pub(super) async fn ensure_l2(&self, m: &mut Meta, l1i: usize) -> io::Result<Arc<L2Table>> {
        let Some(slot) = self.l1.get(l1i) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let e = slot.load(Ordering::Acquire);
        let off = e & OFFSET_MASK;
        if off != 0 {
            if e & COPIED == 0 {
                // Shared with an internal snapshot: writable opens refuse those images.
                return Err(corrupt(format!("L1 entry {l1i} lacks the COPIED flag")));
            }
            return self.load_l2(m, off).await;
        }
        let (host, _, _) = self.alloc_run(m, 1).await?;
        self.file
            .write(host, IoBuf::zeroed(self.cs() as usize), Default::default())
            .await?;
        // The new table's refcount reaches the file before the L1 entry does.
        self.write_refblocks(m).await?;
        let entry = host | COPIED;
        write_be64(&self.file, self.l1_offset + l1i as u64 * 8, entry).await?;
        slot.store(entry, Ordering::Release);
        let t = Arc::new(L2Table::from_bytes(host, &vec![0u8; self.cs() as usize]));
        self.cache_insert(m, t.clone()).await?;
        Ok(t)
    }

    /// Writes all metadata back and makes it and every completed write durable.
    pub(super) async fn flush_all(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let frees = {
            let mut m = self.meta.lock().await;
            let r = async {
                if Self::refblocks_dirty(&m) {
                    self.write_refblocks(&mut m).await?;
                }
                if self.l2_dirty() {
                    // Data and refcounts are durable before any L2 entry points at them.
                    self.file.flush().await?;
                    self.write_dirty_l2(&mut m).await?;
                }
                // Only now, with every change made so far written to the file
                // (changes need the lock this holds), may a FUA write skip the
                // flush: its own datasync then makes these writes durable too.
                self.meta_dirty.store(false, Ordering::Release);
                Ok::<_, io::Error>(std::mem::take(&mut m.pending_free))
            }
            .await;
            if r.is_err() {
                self.meta_dirty.store(true, Ordering::Release);
            }
            r?
        };
        if !frees.is_empty() {
            // Every request that looked up a mapping before the L2 tables
            // dropped these clusters has finished once the gate is ours.
            drop(self.io_gate.write().await);
            // Punch while the clusters are still allocated: once their
            // refcount drops, a new allocation may reuse them at any moment.
            for f in frees.iter().filter(|f| f.punch) {
                let _ = self.file.discard(f.offset, f.len).await;
            }
            let mut m = self.meta.lock().await;
            self.apply_frees(&mut m, &frees).await?;
            self.write_refblocks(&mut m).await?;
            drop(m);
        }
        self.file.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths() {
        for order in 0..=6u32 {
            let mut d = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            rc_set(order, &mut d, 3, max);
            rc_set(order, &mut d, 4, 1);
            assert_eq!(rc_get(order, &d, 3), max, "order {order}");
            assert_eq!(rc_get(order, &d, 4), 1);
            assert_eq!(rc_get(order, &d, 2), 0);
            rc_set(order, &mut d, 3, 0);
            assert_eq!(rc_get(order, &d, 3), 0);
            assert_eq!(rc_get(order, &d, 4), 1);
        }
        // 1-bit refcounts: entry 0 is the lowest bit of byte 0 (QEMU's layout).
        let mut d = vec![0u8; 1];
        rc_set(0, &mut d, 0, 1);
        assert_eq!(d[0], 1);
    }
}
