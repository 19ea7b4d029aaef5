//! A dirty bitmap: which chunks of a disk differ from a copy (QEMU's
//! `BdrvDirtyBitmap`, in memory only).
//!
//! One bit per `granularity` bytes. The bitmap is a plain value; jobs wrap it
//! in their own lock together with the state that must change atomically with
//! it (in-flight ranges, progress).

/// A bitmap over `size` bytes with one bit per `granularity` bytes.
#[derive(Clone, Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    words: Vec<u64>,
    dirty_chunks: u64,
}

impl DirtyBitmap {
    /// An all-clean bitmap; `granularity` must be a power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        assert!(
            granularity.is_power_of_two(),
            "granularity must be a power of two"
        );
        let chunks = size.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            size,
            words: vec![0; chunks.div_ceil(64) as usize],
            dirty_chunks: 0,
        }
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Size of the disk the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn chunks(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// The chunk range `[first, end)` that touches bytes `[offset, offset+len)`.
    fn chunk_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return (0, 0);
        }
        (offset / self.granularity, end.div_ceil(self.granularity))
    }

    fn test(&self, chunk: u64) -> bool {
        self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// Marks every chunk touching `[offset, offset+len)` dirty.
    pub fn set(&mut self, offset: u64, len: u64) {
        let (first, end) = self.chunk_range(offset, len);
        self.fill(first, end, true);
    }

    /// Marks every chunk touching `[offset, offset+len)` clean.
    pub fn reset(&mut self, offset: u64, len: u64) {
        let (first, end) = self.chunk_range(offset, len);
        self.fill(first, end, false);
    }

    /// Sets chunks `[first, end)` to `dirty` a word at a time: a job marks
    /// and clears whole disks and long runs, which bit by bit cost time
    /// proportional to the disk under the job's lock.
    fn fill(&mut self, first: u64, end: u64, dirty: bool) {
        let mut c = first;
        while c < end {
            let w = (c / 64) as usize;
            let word_start = w as u64 * 64;
            let lo = c - word_start;
            let hi = end.min(word_start + 64) - word_start;
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[w];
            let new = if dirty { old | mask } else { old & !mask };
            self.dirty_chunks =
                self.dirty_chunks - old.count_ones() as u64 + new.count_ones() as u64;
            self.words[w] = new;
            c = word_start + 64;
        }
    }

    /// Marks the whole disk dirty.
    pub fn set_all(&mut self) {
        self.set(0, self.size);
    }

    /// True when any chunk touching `[offset, offset+len)` is dirty.
    pub fn any(&self, offset: u64, len: u64) -> bool {
        let (first, end) = self.chunk_range(offset, len);
        (first..end).any(|c| self.test(c))
    }

    /// True when every chunk touching `[offset, offset+len)` is dirty.
    pub fn all(&self, offset: u64, len: u64) -> bool {
        let (first, end) = self.chunk_range(offset, len);
        first < end && (first..end).all(|c| self.test(c))
    }

    /// True when the chunk holding byte `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        offset < self.size && self.test(offset / self.granularity)
    }

    /// Number of dirty chunks.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty_chunks
    }

    /// Dirty bytes (the last chunk counts only up to the disk's end).
    pub fn dirty_bytes(&self) -> u64 {
        let chunks = self.chunks();
        if chunks == 0 {
            return 0;
        }
        let last = chunks - 1;
        let tail_short = self.granularity * chunks - self.size;
        self.dirty_chunks * self.granularity - if self.test(last) { tail_short } else { 0 }
    }

    /// True when nothing is dirty.
    pub fn is_clean(&self) -> bool {
        self.dirty_chunks == 0
    }

    /// The first dirty run at or after byte `from`, at most `max_len` bytes
    /// long (rounded up to one chunk), as `(offset, len)` clamped to the disk.
    pub fn next_dirty_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let chunks = self.chunks();
        let mut c = from / self.granularity;
        // Skip clean words quickly.
        while c < chunks {
            let word = self.words[(c / 64) as usize] >> (c % 64);
            if word == 0 {
                c = (c / 64 + 1) * 64;
                continue;
            }
            c += word.trailing_zeros() as u64;
            break;
        }
        if c >= chunks {
            return None;
        }
        let max_chunks = max_len.div_ceil(self.granularity).max(1);
        let mut end = c + 1;
        while end < chunks && end - c < max_chunks && self.test(end) {
            end += 1;
        }
        let offset = c * self.granularity;
        let stop = (end * self.granularity).min(self.size);
        Some((offset, stop - offset))
    }
}

impl DirtyBitmap {
    /// ORs `other` into this bitmap: every byte dirty in `other` becomes
    /// dirty here, whatever the two granularities (QEMU merges across them).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        if other.granularity == self.granularity && other.size == self.size {
            for (w, o) in self.words.iter_mut().zip(&other.words) {
                *w |= o;
            }
            self.dirty_chunks = self.words.iter().map(|w| w.count_ones() as u64).sum();
            return;
        }
        let mut from = 0;
        while let Some((off, len)) = other.next_dirty_run(from, u64::MAX) {
            self.set(off, len);
            from = off + len;
        }
    }

    /// The extent at `offset`, at most `max_len` bytes: its length and
    /// whether it is dirty (what NBD's `qemu:dirty-bitmap` context reports).
    pub fn extent(&self, offset: u64, max_len: u64) -> (u64, bool) {
        let end = offset.saturating_add(max_len).min(self.size);
        if offset >= end {
            return (0, false);
        }
        let dirty = self.get(offset);
        let mut c = offset / self.granularity + 1;
        let last = end.div_ceil(self.granularity);
        let same = if dirty { u64::MAX } else { 0 };
        while c < last {
            // Whole words of the same state at once: a long run is walked
            // 64 chunks a step while the node's writes wait on the lock.
            if c.is_multiple_of(64) && c + 64 <= last && self.words[(c / 64) as usize] == same {
                c += 64;
                continue;
            }
            if self.test(c) != dirty {
                break;
            }
            c += 1;
        }
        ((c * self.granularity).min(end) - offset, dirty)
    }

    /// Up to `max` runs covering `[offset, offset+len)` from `offset`, each
    /// (length, dirty), neighbours differing: what NBD's
    /// `qemu:dirty-bitmap` context reports. Bytes past the bitmap's end
    /// read clean.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let (n, dirty) = match self.extent(pos, end - pos) {
                (0, _) => (end - pos, false),
                run => run,
            };
            match out.last_mut() {
                Some(last) if last.1 == dirty => last.0 += n,
                _ => out.push((n, dirty)),
            }
            pos += n;
        }
        out
    }

    /// The bits as bytes, chunk `i` in bit `i % 8` of byte `i / 8` (the
    /// layout of qcow2 bitmap data), `chunks().div_ceil(8)` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.chunks().div_ceil(8) as usize;
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(n);
        out
    }

    /// Bytes `[first, first + n)` of [`DirtyBitmap::to_bytes`], without
    /// making all of it; bytes past the end read as zero.
    pub fn bytes_at(&self, first: usize, n: usize) -> Vec<u8> {
        (first..first + n)
            .map(|i| self.words.get(i / 8).map_or(0, |w| w.to_le_bytes()[i % 8]))
            .collect()
    }

    /// A bitmap over `size` bytes from bytes laid out as [`DirtyBitmap::to_bytes`]
    /// makes them; missing bytes read as clean, bits past the end are ignored.
    pub fn from_bytes(size: u64, granularity: u64, bytes: &[u8]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(size, granularity);
        for (i, w) in b.words.iter_mut().enumerate() {
            let mut le = [0u8; 8];
            let start = (i * 8).min(bytes.len());
            let end = (start + 8).min(bytes.len());
            le[..end - start].copy_from_slice(&bytes[start..end]);
            *w = u64::from_le_bytes(le);
        }
        let chunks = b.chunks();
        if !chunks.is_multiple_of(64) {
            if let Some(last) = b.words.last_mut() {
                *last &= (1u64 << (chunks % 64)) - 1;
            }
        }
        b.dirty_chunks = b.words.iter().map(|w| w.count_ones() as u64).sum();
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reset_count_and_runs() {
        let mut b = DirtyBitmap::new(10 * 4096 + 100, 4096);
        assert!(b.is_clean());
        b.set(4095, 2);
        assert_eq!(b.dirty_chunks(), 2);
        assert_eq!(b.next_dirty_run(0, 1 << 20), Some((0, 8192)));
        b.set(10 * 4096, 1);
        assert_eq!(b.dirty_bytes(), 8192 + 100);
        assert_eq!(b.next_dirty_run(8192, 1 << 20), Some((40960, 100)));
        b.reset(0, 4096);
        assert!(!b.get(0) && b.get(4096));
        assert_eq!(b.next_dirty_run(0, 4096), Some((4096, 4096)));
        b.set_all();
        assert_eq!(b.dirty_bytes(), 10 * 4096 + 100);
        assert_eq!(b.next_dirty_run(0, 3 * 4096), Some((0, 3 * 4096)));
        b.reset(0, u64::MAX);
        assert!(b.is_clean() && b.next_dirty_run(0, 1).is_none());
    }

    #[test]
    fn runs_cross_word_boundaries() {
        let mut b = DirtyBitmap::new(1000 * 512, 512);
        b.set(63 * 512, 3 * 512);
        assert_eq!(b.next_dirty_run(0, u64::MAX), Some((63 * 512, 3 * 512)));
        assert!(b.any(65 * 512, 1) && !b.any(66 * 512, 512));
        assert!(b.all(63 * 512, 3 * 512) && !b.all(63 * 512, 4 * 512));
        b.set(999 * 512, 512);
        assert_eq!(b.next_dirty_run(66 * 512, u64::MAX), Some((999 * 512, 512)));
    }

    #[test]
    fn extents_across_whole_words() {
        let mut b = DirtyBitmap::new(1000 * 512, 512);
        b.set(0, 200 * 512);
        b.set(700 * 512, 1);
        assert_eq!(b.extent(0, u64::MAX), (200 * 512, true));
        assert_eq!(b.extent(3 * 512, 100 * 512), (100 * 512, true));
        assert_eq!(b.extent(200 * 512, u64::MAX), (500 * 512, false));
        assert_eq!(
            b.extents(0, 1000 * 512, 10),
            vec![
                (200 * 512, true),
                (500 * 512, false),
                (512, true),
                (299 * 512, false)
            ]
        );
    }

    #[test]
    fn merge_extents_and_bytes() {
        let mut a = DirtyBitmap::new(1 << 20, 65536);
        let mut fine = DirtyBitmap::new(1 << 20, 512);
        fine.set(70000, 1);
        a.merge(&fine);
        assert_eq!(a.next_dirty_run(0, u64::MAX), Some((65536, 65536)));
        assert_eq!(a.extent(0, u64::MAX), (65536, false));
        assert_eq!(a.extent(65536, u64::MAX), (65536, true));
        assert_eq!(a.extent(100000, 10), (10, true));
        assert_eq!(a.extent(131072, u64::MAX), ((1 << 20) - 131072, false));
        let bytes = a.to_bytes();
        assert_eq!(bytes.len(), 2);
        assert_eq!(a.bytes_at(0, 3), vec![0b10, 0, 0]);
        assert_eq!(bytes, vec![0b10, 0]);
        let back = DirtyBitmap::from_bytes(1 << 20, 65536, &[0xff, 0xff, 0xff]);
        assert_eq!(back.dirty_chunks(), 16);
        let mut same = DirtyBitmap::new(1 << 20, 65536);
        same.set(0, 1);
        same.merge(&a);
        assert_eq!(same.dirty_chunks(), 2);
    }

    #[test]
    fn word_fills_match_a_bit_model() {
        let chunks = 300u64;
        let mut b = DirtyBitmap::new(chunks * 512 - 7, 512);
        let mut model = vec![false; chunks as usize];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let first = seed % chunks;
            let n = (seed >> 20) % 140;
            let dirty = seed & (1 << 40) != 0;
            let end = (first + n).min(chunks);
            if dirty {
                b.set(first * 512, n * 512);
            } else {
                b.reset(first * 512, n * 512);
            }
            for c in first..end {
                model[c as usize] = dirty;
            }
            assert_eq!(
                b.dirty_chunks(),
                model.iter().filter(|&&d| d).count() as u64
            );
        }
        for (c, &d) in model.iter().enumerate() {
            assert_eq!(b.get(c as u64 * 512), d, "chunk {c}");
        }
    }
}
