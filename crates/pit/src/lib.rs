//! Is a copy of a disk the disk as it was at one instant T?
//!
//! Each block of the copy holds one logged write, or what was there before
//! any. The writers' log bounds T for that block: T is no earlier than the
//! held write was issued, and earlier than the next write to the block
//! completed (had that one completed first, the copy would hold it). The
//! copy is point-in-time exactly when these per-block intervals meet.
//!
//! The crate owns only that reasoning. It knows no record format and no
//! clock: callers decode their own records (NBD writers' blocks, a guest's
//! records) and give the bounds in their own time, a monotonic instant or
//! the number of a request from a writer that issues one at a time. It does
//! no I/O and has no dependencies, so the test kit and the CLI's demo share
//! it.

/// One block's bound on T, and the block that sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound<T> {
    /// The bound.
    pub at: T,
    /// The block.
    pub block: u64,
}

/// The instants a copy can be from, narrowed block by block.
#[derive(Clone, Debug)]
pub struct Instants<T> {
    latest: Option<Bound<T>>,
    earliest: Option<Bound<T>>,
}

impl<T: Ord + Copy> Default for Instants<T> {
    fn default() -> Self {
        Instants {
            latest: None,
            earliest: None,
        }
    }
}

impl<T: Ord + Copy> Instants<T> {
    /// No block seen yet: any instant.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds what `block` holds: `T >= since` (its held write was issued
    /// then; `None` when it holds what was there before any write) and
    /// `T < until` (the next write to it completed then; `None` when none
    /// did).
    pub fn add(&mut self, block: u64, since: Option<T>, until: Option<T>) {
        if let Some(at) = since {
            if self.latest.is_none_or(|l| at > l.at) {
                self.latest = Some(Bound { at, block });
            }
        }
        if let Some(at) = until {
            if self.earliest.is_none_or(|e| at < e.at) {
                self.earliest = Some(Bound { at, block });
            }
        }
    }

    /// The greatest lower bound: no instant before it fits.
    pub fn latest(&self) -> Option<Bound<T>> {
        self.latest
    }

    /// The least upper bound: no instant at or after it fits.
    pub fn earliest(&self) -> Option<Bound<T>> {
        self.earliest
    }

    /// Whether some instant fits every block.
    pub fn meet(&self) -> bool {
        match (self.latest, self.earliest) {
            (Some(l), Some(e)) => l.at < e.at,
            _ => true,
        }
    }

    /// The instants `[from, until)` that fit every block and lie in the
    /// window `[t0, t1]` (`until` is `t1` itself when no block bounds T
    /// from above inside it), or `None` when there are none.
    pub fn within(&self, t0: T, t1: T) -> Option<(T, T)> {
        let from = self.latest.map_or(t0, |l| l.at.max(t0));
        let until = self.earliest.map_or(t1, |e| e.at.min(t1));
        let fits = from <= t1 && self.earliest.is_none_or(|e| from < e.at);
        fits.then_some((from, until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One writer, one request at a time, request n to block n % 4: a copy
    /// holding requests 4..=6 and block 3's request 3 is the disk after 6.
    #[test]
    fn a_sequential_writer_pins_one_request() {
        let mut i = Instants::new();
        for (b, held) in [4u64, 5, 6, 3].into_iter().enumerate() {
            i.add(b as u64, Some(held), Some(held + 4));
        }
        assert!(i.meet());
        assert_eq!(i.latest(), Some(Bound { at: 6, block: 2 }));
        assert_eq!(i.earliest(), Some(Bound { at: 7, block: 3 }));
        assert_eq!(i.within(0, 100), Some((6, 7)));
    }

    /// Block 0 holds request 8 while block 1 misses request 5: two instants.
    #[test]
    fn a_mix_of_instants_does_not_meet() {
        let mut i = Instants::new();
        i.add(0, Some(8), Some(12));
        i.add(1, Some(1), Some(5));
        assert!(!i.meet());
        assert_eq!(i.within(0, 100), None);
    }

    #[test]
    fn the_window_narrows_and_can_exclude() {
        let mut i = Instants::new();
        i.add(0, Some(10), Some(20));
        assert_eq!(i.within(12, 30), Some((12, 20)));
        assert_eq!(i.within(0, 15), Some((10, 15)));
        // Everything the copy holds came after the window.
        assert_eq!(i.within(0, 5), None);
        // Blocks that hold the initial data and were never overwritten fit any window.
        let mut j: Instants<u64> = Instants::new();
        j.add(0, None, None);
        assert_eq!(j.within(3, 4), Some((3, 4)));
    }
}
