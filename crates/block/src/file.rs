//! The `file` protocol driver: a host file or block device (QEMU's `block/file-posix.c`).
//!
//! Every system call runs on tokio's blocking pool, so a slow disk never stalls
//! the runtime threads that serve NBD and QMP.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::buf::IoBuf;
use crate::driver::{BlockDriver, BlockStatus, IoFuture, Limits, WriteFlags, ZeroFlags};
use crate::lock::{lock_image, release_locks, ImagePerms, Locking, PERM_ALL};

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

/// An open host file.
pub struct FileDriver {
    file: Arc<File>,
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
        let regular = kind.is_file();
        let alignment = if opts.direct {
            probe_direct_alignment(&file)
        } else {
            1
        };
        Ok(FileDriver {
            file: Arc::new(file),
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
        self.blocking(move |f| {
            read_full(f, offset, &mut buf)?;
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture<'_, ()> {
        self.blocking(move |f| {
            f.write_all_at(&buf, offset)?;
            if flags.fua {
                datasync(f)?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        let alignment = self.alignment as usize;
        self.blocking(move |f| {
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
                match fallocate(f, mode, offset, len) {
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
                let zeroes = IoBuf::zeroed(ZERO_CHUNK.min(len) as usize);
                let mut pos = offset;
                while pos < offset + len {
                    let n = ZERO_CHUNK.min(offset + len - pos) as usize;
                    // O_DIRECT needs aligned lengths; the node layer aligns offsets and lengths.
                    debug_assert!(n.is_multiple_of(alignment) || pos + n as u64 == offset + len);
                    f.write_all_at(&zeroes[..n], pos)?;
                    pos += n as u64;
                }
            }
            if flags.fua {
                datasync(f)?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.blocking(move |f| {
            match fallocate(
                f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                // Discard is advisory: a filesystem without hole punching just keeps the data.
                Err(e) if is_unsupported(&e) => Ok(()),
                r => r,
            }
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.blocking(datasync)
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

    fn open(path: &std::path::Path) -> FileDriver {
        FileDriver::open(&FileOptions {
            filename: path.to_str().unwrap().into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn write_read_zero_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let d = open(&path);
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
        assert_eq!(&b[..10], &[0; 10]);
        assert_eq!(&b[10..], &[7; 10]);

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
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 7));
        d.flush().await.unwrap();
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
