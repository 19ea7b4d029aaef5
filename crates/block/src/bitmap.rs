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

    fn put(&mut self, chunk: u64, dirty: bool) {
        let w = &mut self.words[(chunk / 64) as usize];
        let bit = 1u64 << (chunk % 64);
        let was = *w & bit != 0;
        if dirty && !was {
            *w |= bit;
            self.dirty_chunks += 1;
        } else if !dirty && was {
            *w &= !bit;
            self.dirty_chunks -= 1;
        }
    }

    /// Marks every chunk touching `[offset, offset+len)` dirty.
    pub fn set(&mut self, offset: u64, len: u64) {
        let (first, end) = self.chunk_range(offset, len);
        for c in first..end {
            self.put(c, true);
        }
    }

    /// Marks every chunk touching `[offset, offset+len)` clean.
    pub fn reset(&mut self, offset: u64, len: u64) {
        let (first, end) = self.chunk_range(offset, len);
        for c in first..end {
            self.put(c, false);
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
}
