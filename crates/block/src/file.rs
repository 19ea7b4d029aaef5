//! The `file` protocol driver: a host file or block device (QEMU's `block/file-posix.c`).
//!
//! Reads, writes, flushes and fallocate go through one of two engines
//! (QEMU's `aio` option): io_uring ([`uring`]), the default wherever the
//! kernel allows it, or tokio's blocking pool (`aio=threads`, and the
//! fallback). Either way a slow disk never stalls the runtime threads that
//! serve NBD and QMP. With io_uring, a file without O_DIRECT sends only its
//! reads to the ring (see `Engine`). `lseek` (block status) and `ftruncate`
//! have no io_uring opcode and always run on the blocking pool.

mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::buf::IoBuf;
use crate::driver::{BlockDriver, BlockStatus, IoFuture, Limits, WriteFlags, ZeroFlags};
use crate::lock::{lock_image, release_locks, ImagePerms, Locking, PERM_ALL};

pub use uring::DISABLE_ENV as DISABLE_IO_URING_ENV;

/// Options of the `file` driver, named as in QEMU's `BlockdevOptionsFile`.
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// Host path.
    pub filename: String,
    /// `cache.direct`: open with O_DIRECT, bypassing the host page cache.
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
}

/// QEMU's `BlockdevAioOptions`: how the `file` driver submits its I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAio {
    /// `threads`: a pool of threads making blocking system calls.
    Threads,
    /// `native` (Linux AIO in QEMU): needs `cache.direct=on`; served by io_uring.
    Native,
    /// `io_uring`.
    IoUring,
}

impl FileAio {
    /// The option's QAPI value.
    pub fn as_str(self) -> &'static str {
        match self {
            FileAio::Threads => "threads",
            FileAio::Native => "native",
            FileAio::IoUring => "io_uring",
        }
    }

    /// The value named `s` in QAPI, if any.
    pub fn parse(s: &str) -> Option<FileAio> {
        [FileAio::Threads, FileAio::Native, FileAio::IoUring]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// The engine a [`FileDriver`] submits its I/O to.
enum Engine {
    Threads,
    /// The shared ring and the file's own open file description for it.
    /// Without O_DIRECT (`direct` false) only reads go to the ring: ext4
    /// cannot write to the page cache, sync or fallocate without blocking,
    /// so io_uring hands those to its worker threads, which costs more CPU
    /// per request than the thread pool does (docs/decisions.md).
    Uring {
        ring: &'static uring::Uring,
        file: Arc<File>,
        direct: bool,
    },
}

/// An open host file.
pub struct FileDriver {
    file: Arc<File>,
    engine: Engine,
    filename: String,
    size: Arc<AtomicU64>,
    alignment: u32,
    regular: bool,
    read_only: bool,
    force_share: bool,
    locking: Locking,
    /// The image locks held (none yet, or `locking=off`).
    locks: Mutex<Option<ImagePerms>>,
}

/// Largest chunk of zeroes written at once when fallocate cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

impl FileDriver {
    /// Opens the file as QEMU's file driver does, locking it with QEMU's
    /// default (`locking=auto`, no `force-share`).
    pub fn open(opts: &FileOptions) -> io::Result<FileDriver> {
        FileDriver::open_locked(opts, Locking::Auto, false)
    }

    /// Opens the file and takes the image locks of a read-only or writable
    /// open (shared by everyone when `force_share`). A refusal QEMU also
    /// makes carries its text in a [`Refusal`] or
    /// [`LockConflict`](crate::lock::LockConflict) payload.
    pub fn open_locked(
        opts: &FileOptions,
        locking: Locking,
        force_share: bool,
    ) -> io::Result<FileDriver> {
        let f = FileDriver::open_unlocked(opts, locking, force_share)?;
        f.take_locks(false)?;
        Ok(f)
    }

    /// Opens the file and checks what it is, but takes its image locks only
    /// when [`take_locks`](Self::take_locks) is called: a `file` node
    /// added on its own locks when a node is opened on it, as QEMU's file
    /// node takes the permissions its parents ask for.
    pub fn open_unlocked(
        opts: &FileOptions,
        locking: Locking,
        force_share: bool,
    ) -> io::Result<FileDriver> {
        FileDriver::open_unlocked_aio(opts, locking, force_share, None)
    }

    /// [`open_unlocked`](Self::open_unlocked) with the engine QEMU's `aio`
    /// option names (`None`: io_uring where the kernel allows it). io_uring
    /// asked for where the kernel refuses it falls back to threads with a
    /// warning, as QEMU 10 does.
    pub fn open_unlocked_aio(
        opts: &FileOptions,
        locking: Locking,
        force_share: bool,
        aio: Option<FileAio>,
    ) -> io::Result<FileDriver> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        // A FIFO's open waits for a peer and a device's may wait on the
        // device: never block the caller (the QMP monitor) before the file
        // type is known to be one this driver serves.
        let mut flags = libc::O_NONBLOCK;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let file = oo.open(&opts.filename)?;
        let meta = file.metadata()?;
        let kind = meta.file_type();
        // Block devices are accepted too (QEMU wants host_device for them).
        if !kind.is_file() && !kind.is_block_device() {
            return Err(refusal(format!(
                "'file' driver requires '{}' to be a regular file",
                opts.filename
            )));
        }
        if let Some(fs) = pseudo_filesystem(&file)? {
            return Err(refusal(format!(
                "'file' driver cannot serve '{}': it is a {fs} pseudo file, not an image",
                opts.filename
            )));
        }
        clear_nonblock(&file)?;
        let size = device_size(&file)?;
        let engine = engine_for(aio, &opts.filename, &file);
        let regular = kind.is_file();
        let alignment = if opts.direct {
            probe_direct_alignment(&file)
        } else {
            1
        };
        Ok(FileDriver {
            file: Arc::new(file),
            engine,
            filename: opts.filename.clone(),
            size: Arc::new(AtomicU64::new(size)),
            alignment,
            regular,
            read_only: opts.read_only,
            force_share,
            locking,
            locks: Mutex::new(None),
        })
    }

    /// The engine in use, as QEMU's `aio` names it: `io_uring` or `threads`.
    pub fn aio(&self) -> FileAio {
        match self.engine {
            Engine::Threads => FileAio::Threads,
            Engine::Uring { .. } => FileAio::IoUring,
        }
    }

    /// Takes the image locks of a user of this file that reads only
    /// (`read_only`, or the file itself is read-only) or also writes, on
    /// top of those already held; refused with QEMU's text on a conflict.
    pub fn take_locks(&self, read_only: bool) -> io::Result<()> {
        if self.locking == Locking::Off {
            return Ok(());
        }
        let want = ImagePerms::for_open(self.read_only || read_only, self.force_share);
        let mut held = self.locks.lock().unwrap();
        let before = held.unwrap_or(ImagePerms {
            perm: 0,
            shared: PERM_ALL,
        });
        let after = ImagePerms {
            perm: before.perm | want.perm,
            shared: before.shared & want.shared,
        };
        if let Err(e) = lock_image(&self.file, want, self.locking) {
            // The refused user's bytes go again; the file's other users keep theirs.
            let _ = release_locks(&self.file, after, before);
            return Err(e);
        }
        *held = Some(after);
        Ok(())
    }

    /// Sets the file's length now, on the calling thread (image creation).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    fn blocking<T, F>(&self, f: F) -> IoFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&file))
                .await
                .map_err(|e| io::Error::other(format!("I/O worker failed: {e}")))?
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> IoFuture<'_, ()> {
        match &self.engine {
            Engine::Uring {
                ring,
                file,
                direct: true,
            } => Box::pin(ring.fallocate(file, mode, offset, len)),
            _ => self.blocking(move |f| fallocate(f, mode, offset, len)),
        }
    }
}

/// The engine for `aio`: the shared ring unless threads are asked for or
/// the kernel refuses io_uring.
fn engine_for(aio: Option<FileAio>, filename: &str, file: &File) -> Engine {
    if aio == Some(FileAio::Threads) {
        return Engine::Threads;
    }
    match uring::shared().map_err(|e| e.to_string()).and_then(|u| {
        let io = reopen(file).map_err(|e| format!("reopening the file: {e}"))?;
        let (file, direct) = io;
        Ok(Engine::Uring {
            ring: u,
            file: Arc::new(file),
            direct,
        })
    }) {
        Ok(engine) => engine,
        Err(e) => {
            if let Some(aio) = aio {
                tracing::warn!(
                    "{filename}: aio={} served by the thread pool: io_uring is unavailable ({e})",
                    aio.as_str()
                );
            }
            Engine::Threads
        }
    }
}

/// A second open file description of `file`, with its access mode and
/// O_DIRECT (and whether it has O_DIRECT). io_uring requests hold the file they work on until the ring,
/// torn down asynchronously, lets them go; through their own description
/// they keep no image lock (those live on `file`'s), so a daemon killed
/// mid-I/O frees its image locks at its exit, as with the thread pool.
fn reopen(file: &File) -> io::Result<(File, bool)> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut oo = OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => oo.read(true),
        _ => oo.read(true).write(true),
    };
    let direct = flags & libc::O_DIRECT != 0;
    let io = oo
        .custom_flags(flags & libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    Ok((io, direct))
}

impl FileDriver {
    /// The open file and its request alignment, when it is a regular file
    /// (what copy offload needs; see [`crate::offload`]).
    pub(crate) fn offload_file(&self) -> Option<(Arc<File>, u32)> {
        self.regular.then(|| (self.file.clone(), self.alignment))
    }
}

/// An open the file driver refuses for what the file is; the text is the
/// whole error message.
#[derive(Debug)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

fn refusal(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, Refusal(text))
}

/// The name of the kernel pseudo filesystem `file` lives on, if it does:
/// their files claim to be regular but have no size and are no disk (reads of
/// `/proc/self/mem` read the daemon's own memory).
fn pseudo_filesystem(file: &File) -> io::Result<Option<&'static str>> {
    // SAFETY: statfs is plain data, filled in by fstatfs on an fd we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    const PSEUDO: &[(i64, &str)] = &[
        (0x9fa0, "procfs"),
        (0x6265_6572, "sysfs"),
        (0x6462_6720, "debugfs"),
        (0x7472_6163, "tracefs"),
        (0x7363_6673, "securityfs"),
        (0x6265_6570, "configfs"),
        (0x0027_e0eb, "cgroup"),
        (0x6367_7270, "cgroup2"),
        (0xcafe_4a11, "bpf"),
        (0xde5e_81e4, "efivarfs"),
    ];
    let magic = st.f_type as i64;
    Ok(PSEUDO.iter().find(|(m, _)| *m == magic).map(|(_, n)| *n))
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Size of a regular file or a block device.
fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 from metadata; seeking to the end asks the device.
    // SAFETY: lseek on an fd we own.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// Smallest O_DIRECT read size the file accepts (QEMU's `raw_probe_alignment`).
fn probe_direct_alignment(file: &File) -> u32 {
    let buf = IoBuf::zeroed(4096);
    for align in [512u32, 1024, 2048, 4096] {
        // SAFETY: buf is valid for `align` bytes and aligned to 4096.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_ptr() as *mut libc::c_void,
                align as usize,
                0,
            )
        };
        if r >= 0 {
            return align;
        }
    }
    4096
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

fn read_full(file: &File, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            // Past the end of the file reads as zeroes, as in QEMU.
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                offset += n as u64;
                buf = &mut buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn datasync(file: &File) -> io::Result<()> {
    // SAFETY: fdatasync on an fd we own.
    if unsafe { libc::fdatasync(file.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an fd we own; it does not move any position we rely on (we use pread).
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Allocation status from SEEK_DATA/SEEK_HOLE (QEMU's `find_allocation`).
fn seek_status(file: &File, offset: u64, len: u64, size: u64) -> io::Result<BlockStatus> {
    let end = offset + len;
    let data = match seek(file, offset, libc::SEEK_DATA) {
        Ok(d) => d,
        // No SEEK_DATA support: everything is data.
        Err(e) if is_unsupported(&e) => Some(offset),
        Err(e) => return Err(e),
    };
    match data {
        Some(d) if d <= offset => {
            let hole = seek(file, offset, libc::SEEK_HOLE)?
                .unwrap_or(size)
                .min(end);
            let hole = if hole <= offset { end } else { hole };
            Ok(BlockStatus {
                len: hole - offset,
                data: true,
                zero: false,
                depth: 1,
            })
        }
        Some(d) => Ok(BlockStatus {
            len: d.min(end) - offset,
            data: false,
            zero: true,
            depth: 1,
        }),
        None => Ok(BlockStatus {
            len,
            data: false,
            zero: true,
            depth: 1,
        }),
    }
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: self.alignment,
            ..Limits::default()
        }
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn frozen_read_only(&self) {
        let mut held = self.locks.lock().unwrap();
        let Some(h) = *held else { return };
        let reader = ImagePerms::for_open(true, self.force_share);
        match release_locks(&self.file, h, reader) {
            Ok(()) => *held = Some(reader),
            // Still locked as a writer: stricter than needed, never unsafe.
            Err(e) => tracing::warn!("{}: giving up the write lock failed: {e}", self.filename),
        }
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        match &self.engine {
            Engine::Uring { ring, file, .. } => Box::pin(ring.read(file, offset, buf)),
            Engine::Threads => self.blocking(move |f| {
                read_full(f, offset, &mut buf)?;
                Ok(buf)
            }),
        }
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture<'_, ()> {
        match &self.engine {
            Engine::Uring {
                ring,
                file,
                direct: true,
            } => Box::pin(ring.write(file, offset, buf, flags.fua)),
            _ => self.blocking(move |f| {
                f.write_all_at(&buf, offset)?;
                if flags.fua {
                    datasync(f)?;
                }
                Ok(())
            }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // A punched hole reads as zeroes on every Linux filesystem that
            // supports it; ZERO_RANGE keeps the allocation (NBD's NO_HOLE).
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            let modes: &[libc::c_int] = if flags.may_unmap {
                &[punch, zero]
            } else {
                &[zero]
            };
            let mut done = false;
            for &mode in modes {
                match self.fallocate(mode, offset, len).await {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(e) if is_unsupported(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            if !done {
                if flags.fast_only {
                    return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
                }
                let mut pos = offset;
                while pos < offset + len {
                    let n = ZERO_CHUNK.min(offset + len - pos) as usize;
                    // O_DIRECT needs aligned lengths; the node layer aligns offsets and lengths.
                    debug_assert!(
                        n.is_multiple_of(self.alignment as usize) || pos + n as u64 == offset + len
                    );
                    self.write(pos, IoBuf::zeroed(n), WriteFlags::default())
                        .await?;
                    pos += n as u64;
                }
            }
            if flags.fua {
                self.flush().await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len).await {
                // Discard is advisory: a filesystem without hole punching just keeps the data.
                Err(e) if is_unsupported(&e) => Ok(()),
                r => r,
            }
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        match &self.engine {
            Engine::Uring {
                ring,
                file,
                direct: true,
            } => Box::pin(ring.datasync(file)),
            _ => self.blocking(datasync),
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        let size = self.size();
        self.blocking(move |f| seek_status(f, offset, len, size))
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        if !self.regular {
            return Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) });
        }
        let size = self.size.clone();
        self.blocking(move |f| {
            f.set_len(len)?;
            size.store(len, Ordering::Release);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both engines: every test runs under each (io_uring only where the kernel allows it).
    const ENGINES: [FileAio; 2] = [FileAio::Threads, FileAio::IoUring];

    fn open_with(path: &std::path::Path, aio: FileAio, direct: bool) -> FileDriver {
        let opts = FileOptions {
            filename: path.to_str().unwrap().into(),
            direct,
            ..Default::default()
        };
        FileDriver::open_unlocked_aio(&opts, Locking::Auto, false, Some(aio)).unwrap()
    }

    fn disk(dir: &tempfile::TempDir, len: u64) -> std::path::PathBuf {
        let path = dir.path().join("disk");
        File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    #[test]
    fn io_uring_is_the_default_where_the_kernel_allows_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDriver::open(&FileOptions {
            filename: disk(&dir, 4096).to_str().unwrap().into(),
            ..Default::default()
        })
        .unwrap();
        let want = if uring::shared().is_ok() {
            FileAio::IoUring
        } else {
            FileAio::Threads
        };
        assert_eq!(d.aio(), want);
        drop(d);
        let threads = open_with(&dir.path().join("disk"), FileAio::Threads, false);
        assert_eq!(threads.aio(), FileAio::Threads);
        assert_eq!(FileAio::parse("io_uring"), Some(FileAio::IoUring));
        assert_eq!(FileAio::parse("bogus"), None);
    }

    #[tokio::test]
    async fn write_read_zero_and_status() {
        for aio in ENGINES {
            let dir = tempfile::tempdir().unwrap();
            let path = disk(&dir, 1 << 20);
            let d = open_with(&path, aio, false);
            assert_eq!(d.size(), 1 << 20);

            let st = d.block_status(0, 1 << 20).await.unwrap();
            assert_eq!((st.len, st.data, st.zero), (1 << 20, false, true));

            d.write(
                65536,
                IoBuf::from_slice(&[7u8; 65536]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            let b = d.read(65536 - 10, IoBuf::zeroed(20)).await.unwrap();
            assert_eq!(&b[..10], &[0; 10], "{aio:?}");
            assert_eq!(&b[10..], &[7; 10], "{aio:?}");

            let st = d.block_status(65536, 1 << 20).await.unwrap();
            assert!(st.data && !st.zero);
            assert_eq!(st.len, 65536);

            d.write_zeroes(
                65536,
                4096,
                ZeroFlags {
                    may_unmap: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let b = d.read(65536, IoBuf::zeroed(8192)).await.unwrap();
            assert!(b[..4096].iter().all(|&x| x == 0), "{aio:?}");
            assert!(b[4096..].iter().all(|&x| x == 7), "{aio:?}");
            d.flush().await.unwrap();
        }
    }

    #[tokio::test]
    async fn fua_zeroes_without_unmap_discard_and_reads_past_the_end() {
        for (aio, direct) in ENGINES.into_iter().flat_map(|a| [(a, false), (a, true)]) {
            let dir = tempfile::tempdir().unwrap();
            let path = disk(&dir, 1 << 20);
            let d = open_with(&path, aio, direct);
            d.write(
                0,
                IoBuf::from_slice(&[5u8; 1 << 16]),
                WriteFlags { fua: true },
            )
            .await
            .unwrap();
            d.write_zeroes(
                4096,
                8192,
                ZeroFlags {
                    fua: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            d.discard(32768, 4096).await.unwrap();
            let b = d.read(0, IoBuf::zeroed(1 << 16)).await.unwrap();
            assert!(b[..4096].iter().all(|&x| x == 5), "{aio:?}");
            assert!(b[4096..12288].iter().all(|&x| x == 0), "{aio:?}");
            assert!(b[12288..32768].iter().all(|&x| x == 5), "{aio:?}");
            // A punched hole reads as zeroes.
            assert!(b[32768..36864].iter().all(|&x| x == 0), "{aio:?}");
            assert!(b[36864..].iter().all(|&x| x == 5), "{aio:?}");
            assert_eq!(std::fs::read(&path).unwrap()[..4096], [5u8; 4096]);

            if direct {
                continue;
            }
            // A read across the end of the file reads zeroes past it.
            std::fs::write(&path, [9u8; 100]).unwrap();
            let b = d.read(50, IoBuf::from_slice(&[1u8; 200])).await.unwrap();
            assert!(b[..50].iter().all(|&x| x == 9), "{aio:?}");
            assert!(b[50..].iter().all(|&x| x == 0), "{aio:?}");
        }
    }

    #[tokio::test]
    async fn direct_io_round_trip() {
        for aio in ENGINES {
            let dir = tempfile::tempdir().unwrap();
            let path = disk(&dir, 4 << 20);
            let d = open_with(&path, aio, true);
            let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
            d.write(1 << 20, IoBuf::from_slice(&data), WriteFlags { fua: true })
                .await
                .unwrap();
            let b = d.read(1 << 20, IoBuf::zeroed(1 << 20)).await.unwrap();
            assert!(b[..] == data[..], "{aio:?}");
            d.write_zeroes(1 << 20, 4096, ZeroFlags::default())
                .await
                .unwrap();
            let b = d.read(1 << 20, IoBuf::zeroed(8192)).await.unwrap();
            assert!(b[..4096].iter().all(|&x| x == 0), "{aio:?}");
            assert_eq!(b[4096..], data[4096..8192], "{aio:?}");
        }
    }

    /// More requests at once than the ring has entries: the rest wait for
    /// room, and every one reads its own data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_requests_at_once() {
        for aio in ENGINES {
            let dir = tempfile::tempdir().unwrap();
            let path = disk(&dir, 0);
            let blocks: Vec<u8> = (0..1024u32).flat_map(|i| [i as u8; 4096]).collect();
            std::fs::write(&path, &blocks).unwrap();
            let d = Arc::new(open_with(&path, aio, false));
            let mut tasks = Vec::new();
            for i in 0..1024u64 {
                let d = d.clone();
                tasks.push(tokio::spawn(async move {
                    let b = d.read(i * 4096, IoBuf::zeroed(4096)).await.unwrap();
                    assert!(b.iter().all(|&x| x == i as u8), "block {i} ({aio:?})");
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    }

    /// A request whose future is dropped while the kernel still works on
    /// it: the buffer stays with the ring until the completion arrives, and
    /// the engine goes on serving.
    #[tokio::test]
    async fn dropped_requests_leave_the_engine_sound() {
        for aio in ENGINES {
            let dir = tempfile::tempdir().unwrap();
            let path = disk(&dir, 8 << 20);
            let d = open_with(&path, aio, true);
            for i in 0..32u64 {
                let mut read = d.read((i % 8) << 20, IoBuf::zeroed(1 << 20));
                let mut write = d.write(
                    (i % 8) << 20,
                    IoBuf::from_slice(&[i as u8; 1 << 20]),
                    WriteFlags::default(),
                );
                std::future::poll_fn(|cx| {
                    let _ = read.as_mut().poll(cx);
                    let _ = write.as_mut().poll(cx);
                    std::task::Poll::Ready(())
                })
                .await;
            }
            d.write(0, IoBuf::from_slice(&[0xaa; 4096]), WriteFlags::default())
                .await
                .unwrap();
            let b = d.read(0, IoBuf::zeroed(4096)).await.unwrap();
            assert!(b.iter().all(|&x| x == 0xaa), "{aio:?}");
            d.flush().await.unwrap();
        }
    }

    #[test]
    fn missing_file_is_enoent() {
        let e = FileDriver::open(&FileOptions {
            filename: "/nonexistent/x".into(),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
