//! Copy offload: a block job's copy between two raw images on plain files
//! done inside the kernel (`FICLONERANGE`, then `copy_file_range`) instead
//! of reading into and writing from user space.
//!
//! Only a `raw` node directly over a `file` node on a regular file takes
//! part: a filter (blkdebug, throttle, copy-before-write), a format with
//! metadata (qcow2) or a block device never does, so fault injection and
//! format logic always see their I/O. The copy keeps the node layer's rules
//! around it: both ends are tracked as a read and a write on the raw node
//! and on its file node, the target's dirty bitmaps are marked, and a target
//! with a write hook is never offloaded to (the hook must see the data).
//!
//! With O_DIRECT on either end only a reflink is tried: the kernel's
//! `copy_file_range` between O_DIRECT files moves the data in pipe-sized
//! direct I/Os, slower than the jobs' own parallel 1 MiB ones (measured in
//! docs/decisions.md).
//!
//! The kernel may refuse (`EXDEV` across file systems, `EOPNOTSUPP`,
//! `EINVAL` for unaligned O_DIRECT ranges, `ENOSYS`) or stop short; the
//! caller is told how many bytes made it from the start and copies the rest
//! through buffers, where a real I/O error is then reported against the side
//! that failed.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::file::FileDriver;
use crate::node::BlockNode;
use crate::raw::RawDriver;
use crate::tracker::RequestKind;

/// Copy size block jobs use for offloaded copies while the guest is idle:
/// no buffer holds it, and larger copies cost fewer tasks and system calls
/// (a 1 GiB page-cache copy ran at about twice the rate with 8 MiB calls
/// as with 1 MiB ones here).
pub const IDLE_CHUNK: u64 = 8 << 20;

/// One end of an offloaded copy: the raw node, its file node, the open file
/// and where the raw window starts in it.
struct End<'a> {
    raw: &'a BlockNode,
    file_node: &'a Arc<BlockNode>,
    file: Arc<File>,
    base: u64,
    alignment: u64,
}

impl End<'_> {
    /// The file driver aligns requests only when it opened the file O_DIRECT.
    fn direct(&self) -> bool {
        self.alignment > 1
    }
}

fn end_of(node: &BlockNode) -> Option<End<'_>> {
    let (file_node, base) = node.driver::<RawDriver>()?.window();
    let (file, alignment) = file_node.driver::<FileDriver>()?.offload_file()?;
    Some(End {
        raw: node,
        file_node,
        file,
        base,
        alignment: alignment.max(1) as u64,
    })
}

/// True when copies from `source` to `target` go through the kernel without
/// buffers: both are `raw` over a `file` node on a regular file, neither
/// opened O_DIRECT (there only a reflink is tried). The kernel may still
/// refuse a given copy (two file systems): [`copy_range`] then copies nothing.
pub fn offloadable(source: &BlockNode, target: &BlockNode) -> bool {
    match (end_of(source), end_of(target)) {
        (Some(s), Some(t)) => !s.direct() && !t.direct(),
        _ => false,
    }
}

/// One job's use of copy offload: once the kernel copied nothing of a chunk
/// (another file system, no reflink under O_DIRECT) it is not asked again,
/// which saves a failed system call per chunk; buffers copy from then on.
#[derive(Debug, Default)]
pub struct Offload {
    refused: AtomicBool,
}

impl Offload {
    /// Offload not refused yet.
    pub fn new() -> Offload {
        Offload::default()
    }

    /// True while copies from `source` to `target` go through the kernel:
    /// [`offloadable`], and not refused before.
    pub fn active(&self, source: &BlockNode, target: &BlockNode) -> bool {
        !self.refused.load(Ordering::Relaxed) && offloadable(source, target)
    }

    /// [`copy_range`], or nothing once the kernel has refused a copy; a
    /// copy of nothing counts as that refusal.
    pub async fn copy(
        &self,
        source: &BlockNode,
        target: &BlockNode,
        offset: u64,
        len: u64,
        unordered: bool,
    ) -> u64 {
        if self.refused.load(Ordering::Relaxed) {
            return 0;
        }
        let n = copy_range(source, target, offset, len, unordered).await;
        if n == 0 {
            self.refused.store(true, Ordering::Relaxed);
        }
        n
    }
}

/// Copies `[offset, offset + len)` of `source` to the same range of
/// `target` inside the kernel and returns how many bytes from `offset` on
/// reached the target: `len`, or less (even 0) when offload is not possible
/// for this pair or this range, or the kernel stopped; the caller copies
/// the rest through buffers. `unordered` reads the source as
/// [`BlockNode::read_unordered`] does (a copy-before-write's own read).
pub async fn copy_range(
    source: &BlockNode,
    target: &BlockNode,
    offset: u64,
    len: u64,
    unordered: bool,
) -> u64 {
    let (Some(src), Some(dst)) = (end_of(source), end_of(target)) else {
        return 0;
    };
    let align = src.alignment.max(dst.alignment);
    let fits = |n: &BlockNode| offset.checked_add(len).is_some_and(|e| e <= n.size());
    if len == 0 || !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
        return 0;
    }
    if !fits(source) || !fits(target) {
        return 0;
    }
    let (src_off, dst_off) = (src.base + offset, dst.base + offset);
    let _reads = if unordered {
        (
            src.raw
                .tracker()
                .begin_unordered(offset, len, RequestKind::Read),
            src.file_node
                .tracker()
                .begin_unordered(src_off, len, RequestKind::Read),
        )
    } else {
        (
            src.raw
                .tracker()
                .begin(offset, len, RequestKind::Read, false)
                .await,
            src.file_node
                .tracker()
                .begin(src_off, len, RequestKind::Read, false)
                .await,
        )
    };
    let copied = Arc::new(AtomicU64::new(0));
    let done = copied.clone();
    let (src_file, dst_file) = (src.file.clone(), dst.file.clone());
    let direct = src.direct() || dst.direct();
    let kernel: crate::driver::IoFuture<'_, ()> = Box::pin(async move {
        let n = tokio::task::spawn_blocking(move || {
            kernel_copy(&src_file, src_off, &dst_file, dst_off, len, direct)
        })
        .await
        .unwrap_or(0);
        done.store(n, Ordering::Release);
        Ok(())
    });
    let file_node = dst.file_node;
    let inner: crate::driver::IoFuture<'_, ()> = Box::pin(async move {
        // A hook on the file node makes this copy nothing: the raw node's
        // bitmaps then carry a harmless extra mark.
        let _ = file_node.write_unhooked(dst_off, len, kernel).await;
        Ok(())
    });
    let _ = dst.raw.write_unhooked(offset, len, inner).await;
    copied.load(Ordering::Acquire)
}

/// The system calls: a reflink where the file system shares blocks and the
/// range is aligned to its block size, else (without O_DIRECT)
/// `copy_file_range` until done, refused or short. Returns the bytes copied
/// from the start.
fn kernel_copy(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64, direct: bool) -> u64 {
    if clone_range(src, src_off, dst, dst_off, len) {
        return len;
    }
    if direct {
        return 0;
    }
    let mut done = 0u64;
    while done < len {
        let mut off_in = (src_off + done) as libc::loff_t;
        let mut off_out = (dst_off + done) as libc::loff_t;
        // SAFETY: both fds are open for the duration; the offsets are ours.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                (len - done) as usize,
                0,
            )
        };
        match r {
            n if n > 0 => done += n as u64,
            // End of the source file: the rest reads as zeroes, which buffers do.
            0 => break,
            _ if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
            // EXDEV, EOPNOTSUPP, EINVAL, ENOSYS, or an I/O error: the buffer
            // path copies the rest and reports a real error on its side.
            _ => break,
        }
    }
    done
}

/// `FICLONERANGE` where the range is aligned to the target's block size.
fn clone_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> bool {
    let Ok(meta) = dst.metadata() else {
        return false;
    };
    let block = std::os::unix::fs::MetadataExt::blksize(&meta).max(1);
    if !(src_off.is_multiple_of(block)
        && dst_off.is_multiple_of(block)
        && len.is_multiple_of(block))
    {
        return false;
    }
    let arg = libc::file_clone_range {
        src_fd: src.as_raw_fd() as i64,
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: FICLONERANGE reads `arg`, which lives across the call.
    unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &arg) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::FileOptions;
    use crate::raw::RawOptions;
    use crate::{IoBuf, WriteFlags};
    use std::io::Write;

    fn image(dir: &std::path::Path, name: &str, fill: Option<u8>, len: usize) -> String {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        match fill {
            Some(b) => f.write_all(&vec![b; len]).unwrap(),
            None => f.set_len(len as u64).unwrap(),
        }
        path.to_str().unwrap().to_string()
    }

    fn raw(path: &str, direct: bool) -> Arc<BlockNode> {
        // Unlocked: a test opens one image twice, with and without O_DIRECT.
        let opts = FileOptions {
            filename: path.into(),
            direct,
            read_only: false,
        };
        let file = FileDriver::open_locked(&opts, crate::Locking::Off, false).unwrap();
        let file = BlockNode::new(format!("{path}-file"), Box::new(file), false, false);
        let raw = RawDriver::open(file, RawOptions::default()).unwrap();
        BlockNode::new(path.to_string(), Box::new(raw), false, false)
    }

    async fn same(a: &BlockNode, b: &BlockNode, offset: u64, len: usize) -> bool {
        a.read(offset, len).await.unwrap()[..] == b.read(offset, len).await.unwrap()[..]
    }

    #[tokio::test]
    async fn same_file_system_copies_in_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(&image(dir.path(), "src", Some(0x5a), 4 << 20), false);
        let dst = raw(&image(dir.path(), "dst", None, 4 << 20), false);
        assert!(offloadable(&src, &dst));
        assert_eq!(
            copy_range(&src, &dst, 1 << 20, 2 << 20, false).await,
            2 << 20
        );
        assert!(same(&src, &dst, 1 << 20, 2 << 20).await);
        let untouched = dst.read(0, 1 << 20).await.unwrap();
        assert!(untouched.iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn the_targets_dirty_bitmaps_see_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(&image(dir.path(), "src", Some(9), 4 << 20), false);
        let dst = raw(&image(dir.path(), "dst", None, 4 << 20), false);
        dst.add_bitmap("b", Some(65536), false, false)
            .await
            .unwrap();
        let file = dst.children()[0].node.clone();
        file.add_bitmap("f", Some(65536), false, false)
            .await
            .unwrap();
        assert_eq!(
            copy_range(&src, &dst, 1 << 20, 1 << 20, false).await,
            1 << 20
        );
        let marked = |n: &BlockNode, name: &str| {
            let bits = n.bitmaps().get(name).unwrap().content();
            (bits.dirty_bytes(), bits.next_dirty_run(0, u64::MAX))
        };
        assert_eq!(marked(&dst, "b"), (1 << 20, Some((1 << 20, 1 << 20))));
        assert_eq!(marked(&file, "f"), (1 << 20, Some((1 << 20, 1 << 20))));
    }

    #[tokio::test]
    async fn copies_stay_coherent_with_direct_readers_and_writers() {
        let dir = tempfile::tempdir().unwrap();
        let s = image(dir.path(), "src", Some(0x33), 4 << 20);
        let d = image(dir.path(), "dst", None, 4 << 20);
        let (src, dst) = (raw(&s, false), raw(&d, false));
        // Still only in the page cache when the copy runs.
        src.write(0, IoBuf::from_slice(&[0x44; 65536]), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(copy_range(&src, &dst, 0, 4 << 20, false).await, 4 << 20);
        // A reader of the target with O_DIRECT (a VM with cache=none) sees it.
        let direct_dst = raw(&d, true);
        assert!(same(&src, &direct_dst, 0, 4 << 20).await);

        // O_DIRECT ends: a reflink or nothing; what was copied is right,
        // and an unaligned range is left to the caller.
        let direct_src = raw(&s, true);
        if direct_src.limits().request_alignment == 1 {
            return; // no O_DIRECT on this file system
        }
        direct_src
            .write(0, IoBuf::from_slice(&[0x55; 65536]), WriteFlags::default())
            .await
            .unwrap();
        let n = copy_range(&direct_src, &direct_dst, 0, 4 << 20, false).await;
        assert!(n == 0 || n == 4 << 20, "{n}");
        if n > 0 {
            assert!(same(&direct_src, &dst, 0, 4 << 20).await);
        }
        assert_eq!(
            copy_range(&direct_src, &direct_dst, 512, 4096, false).await,
            0
        );
    }

    #[tokio::test]
    async fn another_file_system_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let src = raw(&image(dir.path(), "src", Some(7), 1 << 20), false);
        let dst = raw(&image(shm.path(), "dst", None, 1 << 20), false);
        let n = copy_range(&src, &dst, 0, 1 << 20, false).await;
        // Linux refuses copies between different file system types (EXDEV);
        // whatever it did copy must be right.
        assert!(same(&src, &dst, 0, n as usize).await);
        if same_fs_type(dir.path(), shm.path()) {
            return;
        }
        assert_eq!(n, 0);
    }

    fn same_fs_type(a: &std::path::Path, b: &std::path::Path) -> bool {
        let kind = |p: &std::path::Path| {
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: statfs fills plain data for a valid path.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
            st.f_type
        };
        kind(a) == kind(b)
    }

    #[tokio::test]
    async fn filters_formats_and_hooked_targets_are_never_offloaded() {
        let dir = tempfile::tempdir().unwrap();
        let s = image(dir.path(), "src", Some(1), 1 << 20);
        let src = raw(&s, false);
        let dst = raw(&image(dir.path(), "dst", None, 1 << 20), false);
        // A bare file node is no raw image.
        let file_only = src.children()[0].node.clone();
        assert!(!offloadable(&file_only, &dst));
        assert_eq!(copy_range(&file_only, &dst, 0, 65536, false).await, 0);
        // Fault injection between raw and file must see the I/O: a raw
        // image over blkdebug is never offloaded from, nor blkdebug itself.
        let dbg = crate::BlkdebugDriver::open(file_only, Default::default()).unwrap();
        let dbg = BlockNode::new("dbg", Box::new(dbg), false, false);
        let over = RawDriver::open(dbg.clone(), RawOptions::default()).unwrap();
        let over = BlockNode::new("over", Box::new(over), false, false);
        for n in [&over, &dbg] {
            assert!(!offloadable(n, &dst));
            assert_eq!(copy_range(n, &dst, 0, 65536, false).await, 0);
        }

        struct Seen(std::sync::atomic::AtomicBool);
        impl crate::WriteHook for Seen {
            fn intercept<'a>(
                &'a self,
                _req: &'a crate::HookedWrite,
                write: crate::IoFuture<'a, ()>,
            ) -> crate::IoFuture<'a, ()> {
                self.0.store(true, Ordering::SeqCst);
                write
            }
        }
        let hook = Arc::new(Seen(false.into()));
        dst.add_write_hook(hook.clone()).await;
        assert_eq!(copy_range(&src, &dst, 0, 65536, false).await, 0);
        assert!(!hook.0.load(Ordering::SeqCst));
        let untouched = dst.read(0, 65536).await.unwrap();
        assert!(untouched.iter().all(|&b| b == 0));
    }
}
