//! Guest requests: reads through the chain, writes with copy-on-write of
//! partial clusters, zero clusters, discard and allocation status.
//!
//! Data I/O never holds a lock: a request looks its mapping up (cache hits
//! take no lock at all), then reads or writes the file child or the backing
//! node directly. Allocating writes take the metadata lock twice, briefly: to
//! reserve the guest clusters and allocate host clusters, and, after the data
//! (with the copied head and tail of partial clusters) is written, to point
//! the L2 entries at it. Guest clusters with an allocation in flight are
//! reserved, so a second allocating write, zeroing or discard of the same
//! cluster waits for the first.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::compress::inflate_cluster;
use super::entry::{Cluster, COPIED, ZERO};
use super::meta::{Free, L2Table};
use super::Inner;
use crate::buf::IoBuf;
use crate::driver::{BlockStatus, WriteFlags, ZeroFlags};
use crate::node::BlockNode;

/// Where a run of guest bytes is read from.
#[derive(Clone, Copy, Debug)]
enum Seg {
    Data(u64),
    Zero,
    Backing,
    Compressed(u64, u64),
}

/// How a run of guest bytes is written.
#[derive(Clone, Copy, Debug)]
enum WSeg {
    InPlace(u64),
    Alloc,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// Removes reserved guest clusters and wakes waiters when dropped, also when
/// the request is cancelled.
struct Reservation<'a> {
    inner: &'a Inner,
    first: u64,
    count: u64,
}

impl Reservation<'_> {
    fn shrink(&mut self, count: u64) {
        let mut set = self.inner.inflight.lock().unwrap();
        for c in self.first + count..self.first + self.count {
            set.remove(&c);
        }
        self.count = count;
        drop(set);
        self.inner.inflight_changed.notify_waiters();
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.shrink(0);
    }
}

impl Inner {
    /// The current backing node.
    pub(super) fn backing(&self) -> Option<Arc<BlockNode>> {
        self.backing.read().unwrap().clone()
    }

    /// The L2 table for L1 index `l1i` if there is one (lookups only).
    async fn l2_for_read(&self, l1i: usize) -> io::Result<Option<Arc<L2Table>>> {
        let Some(slot) = self.l1.get(l1i) else {
            return Ok(None);
        };
        let off = slot.load(Ordering::Acquire) & super::entry::OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if let Some(t) = self.cache_get(off) {
            return Ok(Some(t));
        }
        let mut m = self.meta.lock().await;
        self.load_l2(&mut m, off).await.map(Some)
    }

    /// Guest bytes from `off` to the end of its L2 table, at most `len`.
    fn span_len(&self, off: u64, len: u64) -> u64 {
        let span = self.geo.l2_span();
        (span - off % span).min(len)
    }

    /// The read mapping of the run starting at `off`, at most `len` bytes.
    async fn map_read(&self, off: u64, len: u64) -> io::Result<(Seg, u64)> {
        let g = self.geo;
        let unalloc = if self.backing().is_some() {
            Seg::Backing
        } else {
            Seg::Zero
        };
        let Some(t) = self.l2_for_read(g.l1_index(off)).await? else {
            return Ok((unalloc, self.span_len(off, len)));
        };
        let i = g.l2_index(off);
        let first = g.decode(t.get(i));
        let inc = g.in_cluster(off);
        let seg = match first {
            Cluster::Unallocated => unalloc,
            Cluster::Zero { .. } => Seg::Zero,
            Cluster::Data { host, .. } => Seg::Data(host + inc),
            Cluster::Compressed { host, len } => {
                return Ok((Seg::Compressed(host, len), (g.cluster_size - inc).min(len)));
            }
        };
        let mut n = g.cluster_size - inc;
        let mut k = 1;
        while n < len && i + k < g.l2_entries() as usize {
            let next = g.decode(t.get(i + k));
            let same = match (first, next) {
                (Cluster::Unallocated, Cluster::Unallocated) => true,
                (Cluster::Zero { .. }, Cluster::Zero { .. }) => true,
                (Cluster::Data { host: h0, .. }, Cluster::Data { host, .. }) => {
                    host == h0 + k as u64 * g.cluster_size
                }
                _ => false,
            };
            if !same {
                break;
            }
            n += g.cluster_size;
            k += 1;
        }
        Ok((seg, n.min(len)))
    }

    /// Reads file bytes at `host`; past the end of the file reads zeroes, a
    /// cluster that starts past the end is corruption.
    async fn read_host(&self, host: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let size = self.file.size();
        let start = self.geo.cluster_start(host);
        if start >= size {
            tracing::error!(
                "qcow2: image is corrupt: data cluster {start:#x} is beyond the end of the file"
            );
            return Err(eio());
        }
        let len = buf.len() as u64;
        if host + len <= size {
            return self.file.read_into(host, buf).await;
        }
        let n = size.saturating_sub(host) as usize;
        buf.fill(0);
        if n > 0 {
            let part = self.file.read(host, n).await?;
            buf[..n].copy_from_slice(&part);
        }
        Ok(buf)
    }

    /// Reads from the backing node; past its end (or without one) reads zeroes.
    async fn read_backing(&self, off: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let Some(b) = self.backing() else {
            buf.fill(0);
            return Ok(buf);
        };
        let bsize = b.size();
        let len = buf.len() as u64;
        if off + len <= bsize {
            return b.read_into(off, buf).await;
        }
        buf.fill(0);
        if off < bsize {
            let n = (bsize - off) as usize;
            let part = b.read(off, n).await?;
            buf[..n].copy_from_slice(&part);
        }
        Ok(buf)
    }

    /// The whole decompressed cluster stored at `host` (`len` bytes).
    async fn read_compressed(&self, host: u64, len: u64) -> io::Result<Vec<u8>> {
        let size = self.file.size();
        if host >= size {
            tracing::error!("qcow2: image is corrupt: compressed cluster {host:#x} is beyond the end of the file");
            return Err(eio());
        }
        let n = len.min(size - host) as usize;
        let input = self.file.read(host, n).await?;
        let mut out = vec![0u8; self.geo.cluster_size as usize];
        inflate_cluster(&input, &mut out).map_err(|e| {
            tracing::error!("{e}");
            eio()
        })?;
        Ok(out)
    }

    async fn read_seg(&self, seg: Seg, off: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        match seg {
            Seg::Data(host) => self.read_host(host, buf).await,
            Seg::Zero => {
                buf.fill(0);
                Ok(buf)
            }
            Seg::Backing => self.read_backing(off, buf).await,
            Seg::Compressed(host, len) => {
                let data = self.read_compressed(host, len).await?;
                let inc = self.geo.in_cluster(off) as usize;
                let n = buf.len();
                buf.copy_from_slice(&data[inc..inc + n]);
                Ok(buf)
            }
        }
    }

    /// Reads `buf.len()` guest bytes at `off`.
    pub(super) async fn read(&self, off: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let _gate = self.io_gate.read().await;
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(buf);
        }
        let (seg, n) = self.map_read(off, len).await?;
        if n >= len {
            return self.read_seg(seg, off, buf).await;
        }
        let (mut seg, mut n) = (seg, n);
        let mut pos = 0u64;
        loop {
            let piece = self
                .read_seg(seg, off + pos, IoBuf::for_overwrite(n as usize))
                .await?;
            buf[pos as usize..(pos + n) as usize].copy_from_slice(&piece);
            pos += n;
            if pos >= len {
                return Ok(buf);
            }
            (seg, n) = self.map_read(off + pos, len - pos).await?;
        }
    }

    /// The write mapping of the run starting at `off`, at most `len` bytes.
    async fn map_write(&self, off: u64, len: u64) -> io::Result<(WSeg, u64)> {
        let g = self.geo;
        let Some(t) = self.l2_for_read(g.l1_index(off)).await? else {
            return Ok((WSeg::Alloc, self.span_len(off, len)));
        };
        let i = g.l2_index(off);
        let in_place = |c: Cluster| match c {
            Cluster::Data { host, copied: true } => Some(host),
            _ => None,
        };
        let first = in_place(g.decode(t.get(i)));
        let mut n = g.cluster_size - g.in_cluster(off);
        let mut k = 1;
        while n < len && i + k < g.l2_entries() as usize {
            let next = in_place(g.decode(t.get(i + k)));
            let same = match (first, next) {
                (Some(h0), Some(h)) => h == h0 + k as u64 * g.cluster_size,
                (None, None) => true,
                _ => false,
            };
            if !same {
                break;
            }
            n += g.cluster_size;
            k += 1;
        }
        let seg = match first {
            Some(h) => WSeg::InPlace(h + g.in_cluster(off)),
            None => WSeg::Alloc,
        };
        Ok((seg, n.min(len)))
    }

    /// Writes `buf` at guest offset `off`. Returns whether a FUA write still
    /// needs a flush (metadata changed or was pending).
    pub(super) async fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> io::Result<bool> {
        let _gate = self.io_gate.read().await;
        let len = buf.len() as u64;
        let mut changed = false;
        let mut need_flush = false;
        let mut pos = 0u64;
        let mut buf = Some(buf);
        while pos < len {
            let (seg, n) = self.map_write(off + pos, len - pos).await?;
            match seg {
                WSeg::InPlace(host) => {
                    if host + n > self.file.size() {
                        tracing::error!("qcow2: image is corrupt: data cluster {host:#x} is beyond the end of the file");
                        return Err(eio());
                    }
                    let b = buf.as_ref().expect("buffer");
                    let piece = if pos == 0 && n == len {
                        buf.take().expect("buffer")
                    } else {
                        IoBuf::from_slice(&b[pos as usize..(pos + n) as usize])
                    };
                    // FUA can go straight to the file only when no metadata
                    // is pending, checked after the lookup: the mapping just
                    // used may come from a write that finished a moment ago
                    // (after one this request waited for, or while a flush
                    // was still writing the L2 tables).
                    let fua = flags.fua && !self.meta_dirty.load(Ordering::Acquire);
                    need_flush |= flags.fua && !fua;
                    self.file.write(host, piece, WriteFlags { fua }).await?;
                    pos += n;
                }
                WSeg::Alloc => {
                    let (done, back) = self
                        .alloc_write(off + pos, buf.take().expect("buffer"), pos as usize)
                        .await?;
                    buf = back;
                    if done > 0 {
                        changed = true;
                    }
                    pos += done as u64;
                }
            }
        }
        Ok(flags.fua && (changed || need_flush))
    }

    /// Waits until none of the guest clusters `[first, first + count)` is
    /// reserved, then reserves them. The metadata lock must not be held.
    async fn reserve(&self, first: u64, count: u64) -> Reservation<'_> {
        loop {
            let notified = {
                let mut set = self.inflight.lock().unwrap();
                if !(first..first + count).any(|c| set.contains(&c)) {
                    for c in first..first + count {
                        set.insert(c);
                    }
                    return Reservation {
                        inner: self,
                        first,
                        count,
                    };
                }
                // Created under the lock: it sees every later notify_waiters().
                self.inflight_changed.notified()
            };
            notified.await;
        }
    }

    /// Allocating write of the bytes `buf[pos..]` at guest offset `off`, for
    /// the clusters up to the end of the request or of the L2 table that are
    /// not writable in place. Returns the bytes written and the buffer, unless
    /// it was written as it is.
    async fn alloc_write(
        &self,
        off: u64,
        buf: IoBuf,
        pos: usize,
    ) -> io::Result<(usize, Option<IoBuf>)> {
        let g = self.geo;
        let cs = g.cluster_size;
        let end = off + (buf.len() - pos) as u64;
        let c0 = g.cluster_start(off);
        let l1i = g.l1_index(off);
        let l2i = g.l2_index(off);
        let span_end = (l1i as u64 + 1) * g.l2_span();
        let want = (end.div_ceil(cs) * cs).min(span_end);
        let n_want = (want - c0) / cs;

        // Phase 1: reserve the guest clusters, find what they hold now, allocate.
        let mut resv = self.reserve(c0 / cs, n_want).await;
        let (host, olds, fresh) = {
            let mut m = self.meta.lock().await;
            let t = self.ensure_l2(&mut m, l1i).await?;
            let mut olds = Vec::new();
            for k in 0..n_want as usize {
                let c = g.decode(t.get(l2i + k));
                if matches!(c, Cluster::Data { copied: true, .. }) {
                    break;
                }
                olds.push(c);
            }
            if olds.is_empty() {
                // Someone allocated it meanwhile: the caller writes in place.
                return Ok((0, Some(buf)));
            }
            let (host, got, fresh) = self.alloc_run(&mut m, olds.len() as u64).await?;
            olds.truncate(got as usize);
            (host, olds, fresh)
        };
        let got = olds.len() as u64;
        resv.shrink(got);

        // Phase 2: the data, with the head and tail of partial clusters copied.
        let run_end = c0 + got * cs;
        let wend = end.min(run_end);
        let dlen = (wend - off) as usize;
        let head = (off - c0) as usize;
        let tail = (run_end - wend) as usize;
        let bsize = self.backing().map(|b| b.size());
        let src_zero = |c: Cluster, from: u64| match c {
            Cluster::Unallocated => bsize.is_none_or(|s| from >= s),
            Cluster::Zero { .. } => true,
            _ => false,
        };
        let head_zero = head == 0 || src_zero(olds[0], c0);
        let tail_zero = tail == 0 || src_zero(olds[got as usize - 1], wend);
        let written = if fresh && head_zero && tail_zero {
            let (piece, rest) = if pos == 0 && dlen == buf.len() {
                (buf, None)
            } else {
                (IoBuf::from_slice(&buf[pos..pos + dlen]), Some(buf))
            };
            (
                self.file
                    .write(host + head as u64, piece, Default::default())
                    .await,
                rest,
            )
        } else {
            let mut full = IoBuf::zeroed((got * cs) as usize);
            let r = async {
                if !head_zero {
                    self.cow_fill(olds[0], c0, &mut full[..head]).await?;
                }
                full[head..head + dlen].copy_from_slice(&buf[pos..pos + dlen]);
                if !tail_zero {
                    let at = (wend - c0) as usize;
                    self.cow_fill(olds[got as usize - 1], wend, &mut full[at..])
                        .await?;
                }
                self.file.write(host, full, Default::default()).await
            }
            .await;
            (r, Some(buf))
        };
        if let Err(e) = written.0 {
            // Nothing points at the new clusters: give them back.
            let mut m = self.meta.lock().await;
            let _ = self
                .apply_frees(
                    &mut m,
                    &[Free {
                        offset: host,
                        len: got * cs,
                        punch: false,
                    }],
                )
                .await;
            return Err(e);
        }

        // Phase 3: point the L2 entries at the new clusters. The flag goes
        // first: whoever sees a new entry also sees that it is not on disk.
        let mut m = self.meta.lock().await;
        let t = self.ensure_l2(&mut m, l1i).await?;
        self.meta_dirty.store(true, Ordering::Release);
        for (k, old) in olds.iter().enumerate() {
            match *old {
                Cluster::Data { host, .. } => m.pending_free.push(Free {
                    offset: host,
                    len: cs,
                    punch: false,
                }),
                Cluster::Zero { host: Some(h) } => m.pending_free.push(Free {
                    offset: h,
                    len: cs,
                    punch: true,
                }),
                Cluster::Compressed { host, len } => m.pending_free.push(Free {
                    offset: host,
                    len,
                    punch: false,
                }),
                _ => {}
            }
            t.set(l2i + k, (host + k as u64 * cs) | COPIED);
        }
        drop(m);
        drop(resv);
        Ok((dlen, written.1))
    }

    /// Fills `dst` with what the guest saw at `from` before a write: the
    /// source of copy-on-write for the parts of a cluster a write leaves alone.
    async fn cow_fill(&self, old: Cluster, from: u64, dst: &mut [u8]) -> io::Result<()> {
        let n = dst.len();
        match old {
            Cluster::Unallocated => {
                let b = self.read_backing(from, IoBuf::for_overwrite(n)).await?;
                dst.copy_from_slice(&b);
            }
            Cluster::Zero { .. } => dst.fill(0),
            Cluster::Data { host, .. } => {
                let b = self
                    .read_host(host + self.geo.in_cluster(from), IoBuf::for_overwrite(n))
                    .await?;
                dst.copy_from_slice(&b);
            }
            Cluster::Compressed { host, len } => {
                let data = self.read_compressed(host, len).await?;
                let inc = self.geo.in_cluster(from) as usize;
                dst.copy_from_slice(&data[inc..inc + n]);
            }
        }
        Ok(())
    }

    /// Whether `[off, off + len)` reads as zeroes, from allocation status only.
    async fn reads_zero(&self, mut off: u64, len: u64) -> io::Result<bool> {
        let end = off + len;
        while off < end {
            let st = self.block_status(off, end - off).await?;
            if !st.zero {
                return Ok(false);
            }
            off += st.len.max(1);
        }
        Ok(true)
    }

    /// Makes `[off, off + len)` read as zeroes. Returns whether metadata changed.
    pub(super) async fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> io::Result<bool> {
        let g = self.geo;
        let end = off + len;
        let a = (off.div_ceil(g.cluster_size) * g.cluster_size).min(end);
        // The partial last cluster of an image counts as whole when the request reaches the end.
        let b = if end == g.size {
            end.div_ceil(g.cluster_size) * g.cluster_size
        } else {
            g.cluster_start(end)
        }
        .max(a);
        let mut parts = Vec::new();
        if a > off {
            parts.push((off, a - off));
        }
        if end > b {
            parts.push((b, end - b));
        }
        let full = (a, b.min(end.div_ceil(g.cluster_size) * g.cluster_size));
        if g.version < 3 && full.1 > full.0 {
            parts.push((full.0, full.1.min(end) - full.0));
        }
        let mut to_write = Vec::new();
        for &(o, l) in &parts {
            if !self.reads_zero(o, l).await? {
                if flags.fast_only {
                    return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
                }
                to_write.push((o, l));
            }
        }
        let mut changed = false;
        if g.version >= 3 && full.1 > full.0 {
            changed |= self.zero_clusters(full.0, full.1, flags.may_unmap).await?;
        }
        for (mut o, l) in to_write {
            let e = o + l;
            while o < e {
                let n = (e - o).min(1 << 20);
                changed |= self
                    .write(o, IoBuf::zeroed(n as usize), WriteFlags::default())
                    .await?;
                o += n;
            }
        }
        Ok(changed)
    }

    /// Sets the zero flag on the whole clusters `[a, b)` (v3 images).
    async fn zero_clusters(&self, a: u64, b: u64, unmap: bool) -> io::Result<bool> {
        let g = self.geo;
        self.change_clusters(a, b, |c| match c {
            Cluster::Data { host, copied: true } if !unmap => Some((host | COPIED | ZERO, None)),
            Cluster::Zero { host: Some(_) } if !unmap => None,
            Cluster::Zero { host: None } => None,
            Cluster::Unallocated => Some((ZERO, None)),
            other => Some((ZERO, free_of(other, g.cluster_size))),
        })
        .await
    }

    /// Discards the whole clusters in `[off, off + len)` as QEMU's qcow2
    /// does: they read as zeroes afterwards (v2 images without a backing file
    /// cannot express that and fall back to unallocated).
    pub(super) async fn discard(&self, off: u64, len: u64) -> io::Result<bool> {
        let g = self.geo;
        let end = off + len;
        let a = off.div_ceil(g.cluster_size) * g.cluster_size;
        let b = if end == g.size {
            end.div_ceil(g.cluster_size) * g.cluster_size
        } else {
            g.cluster_start(end)
        };
        if b <= a {
            return Ok(false);
        }
        let has_backing = self.backing().is_some();
        let zero = if g.version >= 3 { ZERO } else { 0 };
        self.change_clusters(a, b, |c| match c {
            Cluster::Unallocated if !has_backing => None,
            Cluster::Unallocated => (zero != 0).then_some((zero, None)),
            Cluster::Zero { host: None } if zero != 0 => None,
            other => Some((zero, free_of(other, g.cluster_size))),
        })
        .await
    }

    /// Rewrites the L2 entries of the whole clusters `[a, b)` with `f`
    /// (new entry and what to free, or `None` to keep the entry).
    async fn change_clusters(
        &self,
        a: u64,
        b: u64,
        f: impl Fn(Cluster) -> Option<(u64, Option<Free>)>,
    ) -> io::Result<bool> {
        let g = self.geo;
        let cs = g.cluster_size;
        let mut off = a;
        let mut changed = false;
        while off < b {
            let n = self.span_len(off, b - off);
            let l1i = g.l1_index(off);
            let l2i = g.l2_index(off);
            let count = n.div_ceil(cs);
            let _resv = self.reserve(off / cs, count).await;
            let mut m = self.meta.lock().await;
            let l1_empty = self.l1[l1i].load(Ordering::Acquire) & super::entry::OFFSET_MASK == 0;
            if l1_empty && f(Cluster::Unallocated).is_none() {
                off += n;
                continue;
            }
            let t = self.ensure_l2(&mut m, l1i).await?;
            for k in 0..count as usize {
                let c = g.decode(t.get(l2i + k));
                if let Some((new, free)) = f(c) {
                    t.set(l2i + k, new);
                    if let Some(fr) = free {
                        m.pending_free.push(fr);
                    }
                    changed = true;
                }
            }
            if changed {
                self.meta_dirty.store(true, Ordering::Release);
            }
            off += n;
        }
        Ok(changed)
    }

    /// Allocation status of the run at `off` (at most `len` bytes), through the chain.
    pub(super) async fn block_status(&self, off: u64, len: u64) -> io::Result<BlockStatus> {
        let g = self.geo;
        let unalloc_len;
        match self.l2_for_read(g.l1_index(off)).await? {
            None => unalloc_len = self.span_len(off, len),
            Some(t) => {
                let i = g.l2_index(off);
                let kind = |c: Cluster| match c {
                    Cluster::Unallocated => 0,
                    Cluster::Zero { .. } => 1,
                    _ => 2,
                };
                let first = kind(g.decode(t.get(i)));
                let mut n = g.cluster_size - g.in_cluster(off);
                let mut k = 1;
                while n < len
                    && i + k < g.l2_entries() as usize
                    && kind(g.decode(t.get(i + k))) == first
                {
                    n += g.cluster_size;
                    k += 1;
                }
                let n = n.min(len);
                match first {
                    1 => {
                        return Ok(BlockStatus {
                            len: n,
                            data: false,
                            zero: true,
                            depth: 1,
                        })
                    }
                    2 => {
                        return Ok(BlockStatus {
                            len: n,
                            data: true,
                            zero: false,
                            depth: 1,
                        })
                    }
                    _ => unalloc_len = n,
                }
            }
        }
        let unallocated = BlockStatus {
            len: unalloc_len,
            data: false,
            zero: true,
            depth: 0,
        };
        let Some(b) = self.backing() else {
            return Ok(unallocated);
        };
        let bsize = b.size();
        if off >= bsize {
            // Past a short backing's end the backing layer answers "zeroes",
            // so QEMU counts the range as that layer's (allocation depth 2).
            return Ok(BlockStatus {
                depth: 2,
                ..unallocated
            });
        }
        let st = b.block_status(off, unalloc_len.min(bsize - off)).await?;
        Ok(BlockStatus {
            len: st.len.min(unalloc_len),
            data: st.data,
            zero: st.zero,
            depth: if st.depth > 0 { st.depth + 1 } else { 0 },
        })
    }
}

/// What to free when an entry holding `c` is replaced.
fn free_of(c: Cluster, cs: u64) -> Option<Free> {
    match c {
        Cluster::Data { host, copied } => Some(Free {
            offset: host,
            len: cs,
            punch: copied,
        }),
        Cluster::Zero { host: Some(h) } => Some(Free {
            offset: h,
            len: cs,
            punch: true,
        }),
        Cluster::Compressed { host, len } => Some(Free {
            offset: host,
            len,
            punch: false,
        }),
        _ => None,
    }
}
