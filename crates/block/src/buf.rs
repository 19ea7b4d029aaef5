//! Page-aligned I/O buffers, so the same buffer can go to an O_DIRECT file,
//! recycled through one process-wide pool shared by NBD, the block layer and
//! the jobs.
//!
//! A fresh large allocation costs page faults and zeroing on every request
//! (and, from malloc's heap, memory that fragments and stays). Buffers are
//! therefore kept by capacity class (powers of two from [`BUF_ALIGN`]) when
//! dropped, up to [`POOL_BYTES`] in all, and handed out again.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Alignment of every [`IoBuf`]: enough for O_DIRECT on any Linux block device.
pub const BUF_ALIGN: usize = 4096;

/// Bytes of free buffers the pool keeps for the whole process: a few
/// requests of the largest size tools use (1–2 MiB), or many small ones.
pub const POOL_BYTES: usize = 16 << 20;

/// Capacity classes: 4 KiB << i, up to 32 MiB (NBD's largest payload).
const CLASSES: usize = 14;

/// An owned byte buffer whose memory starts on a [`BUF_ALIGN`] boundary.
///
/// Its bytes are always initialised: zeroes when it is new, or whatever a
/// previous user left when it comes from the pool through
/// [`IoBuf::for_overwrite`]. Requests move their buffer through the layers
/// (and onto I/O worker threads) by value, which is why this is owned
/// rather than a borrowed slice.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf uniquely owns its allocation, like Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for IoBuf {}

/// A free buffer's memory, kept in the pool.
struct Free(NonNull<u8>);

// SAFETY: the pool owns the memory; nothing else points to it.
unsafe impl Send for Free {}

/// Free buffers per class, and their bytes in all.
struct Pool {
    free: [Mutex<Vec<Free>>; CLASSES],
    bytes: AtomicUsize,
}

static POOL: Pool = Pool {
    free: [const { Mutex::new(Vec::new()) }; CLASSES],
    bytes: AtomicUsize::new(0),
};

/// The class serving `len` bytes, or `None` past the largest (allocated exactly, never kept).
fn class(len: usize) -> Option<usize> {
    let i = len
        .max(1)
        .div_ceil(BUF_ALIGN)
        .next_power_of_two()
        .trailing_zeros() as usize;
    (i < CLASSES).then_some(i)
}

fn class_cap(i: usize) -> usize {
    BUF_ALIGN << i
}

impl Pool {
    fn take(&self, i: usize) -> Option<NonNull<u8>> {
        let mut list = self.free[i].lock().unwrap_or_else(|e| e.into_inner());
        let f = list.pop()?;
        drop(list);
        self.bytes.fetch_sub(class_cap(i), Ordering::Relaxed);
        Some(f.0)
    }

    /// Keeps `ptr` unless the pool is full; gives it back when it was not kept.
    fn keep(&self, i: usize, ptr: NonNull<u8>) -> Option<NonNull<u8>> {
        let cap = class_cap(i);
        let kept = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b + cap <= POOL_BYTES).then_some(b + cap)
            });
        if kept.is_err() {
            return Some(ptr);
        }
        let mut list = self.free[i].lock().unwrap_or_else(|e| e.into_inner());
        list.push(Free(ptr));
        None
    }

    /// Frees every kept buffer.
    fn clear(&self) {
        for (i, list) in self.free.iter().enumerate() {
            let taken = std::mem::take(&mut *list.lock().unwrap_or_else(|e| e.into_inner()));
            self.bytes
                .fetch_sub(taken.len() * class_cap(i), Ordering::Relaxed);
            for f in taken {
                dealloc(f.0, class_cap(i));
            }
        }
    }
}

fn layout(cap: usize) -> Layout {
    Layout::from_size_align(cap, BUF_ALIGN).expect("buffer layout")
}

/// Fresh zeroed memory of `cap` bytes (for large sizes, pages the kernel
/// zeroes lazily: untouched ones cost no memory).
fn alloc_zeroed(cap: usize) -> NonNull<u8> {
    let layout = layout(cap);
    // SAFETY: layout has non-zero size.
    let raw = unsafe { alloc::alloc_zeroed(layout) };
    NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

fn dealloc(ptr: NonNull<u8>, cap: usize) {
    // SAFETY: allocated by `alloc_zeroed` with this capacity.
    unsafe { alloc::dealloc(ptr.as_ptr(), layout(cap)) }
}

impl IoBuf {
    /// A buffer of `len` bytes whose contents are left from a previous user:
    /// only for callers that overwrite all of it before anyone reads it (a
    /// read from a file, a payload read from a socket). Never hand such a
    /// buffer on after a partial fill: old bytes of another request would leak.
    pub fn for_overwrite(len: usize) -> Self {
        match class(len) {
            Some(i) => {
                let cap = class_cap(i);
                let ptr = POOL.take(i).unwrap_or_else(|| alloc_zeroed(cap));
                IoBuf { ptr, len, cap }
            }
            None => {
                let cap = len.div_ceil(BUF_ALIGN) * BUF_ALIGN;
                IoBuf {
                    ptr: alloc_zeroed(cap),
                    len,
                    cap,
                }
            }
        }
    }

    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let Some(i) = class(len) else {
            return IoBuf::for_overwrite(len);
        };
        match POOL.take(i) {
            Some(ptr) => {
                let mut b = IoBuf {
                    ptr,
                    len,
                    cap: class_cap(i),
                };
                b.fill(0);
                b
            }
            None => IoBuf {
                ptr: alloc_zeroed(class_cap(i)),
                len,
                cap: class_cap(i),
            },
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = IoBuf::for_overwrite(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shrinks the visible length; the allocation is kept.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let kept = match class(self.cap) {
            Some(i) if class_cap(i) == self.cap => POOL.keep(i, self.ptr),
            _ => Some(self.ptr),
        };
        if let Some(ptr) = kept {
            dealloc(ptr, self.cap);
        }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

/// Hands memory that no buffer uses back to the kernel: the pool's free
/// buffers, then the pages malloc holds free.
///
/// A heap fragmented by large buffers keeps its free pages after the
/// buffers are gone; glibc's `malloc_trim` releases those pages wherever
/// they are. Costs a walk of malloc's arenas, so callers run it after a
/// burst of large buffers ends, not per request.
pub fn release_free_memory() {
    POOL.clear();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 65537] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let b = IoBuf::from_slice(b"abc");
        assert_eq!(&b[..], b"abc");
    }

    #[test]
    fn a_recycled_buffer_is_zeroed_when_asked() {
        // Other tests share the pool: fill and drop several, so that one of
        // them is what `zeroed` gets if the pool keeps anything.
        let dirty: Vec<IoBuf> = (0..4)
            .map(|_| {
                let mut b = IoBuf::for_overwrite(3 * 4096);
                b.fill(0xa5);
                b
            })
            .collect();
        drop(dirty);
        for _ in 0..4 {
            let b = IoBuf::zeroed(3 * 4096 - 7);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn classes_cover_every_length_once() {
        assert_eq!(class(0), Some(0));
        assert_eq!(class(4096), Some(0));
        assert_eq!(class(4097), Some(1));
        assert_eq!(class(1 << 20), Some(8));
        assert_eq!(class(32 << 20), Some(CLASSES - 1));
        assert_eq!(class((32 << 20) + 1), None);
        let big = IoBuf::for_overwrite((32 << 20) + 1);
        assert_eq!(big.len(), (32 << 20) + 1);
    }

    #[test]
    fn the_pool_stays_within_its_bytes() {
        let bufs: Vec<IoBuf> = (0..40).map(|_| IoBuf::for_overwrite(1 << 20)).collect();
        drop(bufs);
        assert!(POOL.bytes.load(Ordering::Relaxed) <= POOL_BYTES);
        release_free_memory();
    }
}
