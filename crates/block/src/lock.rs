//! Image locking that QEMU's `file` driver understands: open file
//! description (OFD) read locks on single bytes of the image file, so QEMU's
//! tools and livesnapd refuse each other's conflicting opens.
//!
//! Each permission bit has two bytes: byte `100 + bit` is held while the
//! holder uses the permission, byte `200 + bit` while it refuses to share it.
//! All locks are shared (read) locks, so any number of holders coexist; an
//! opener tests for conflicts by asking whether an exclusive lock on a byte
//! would be refused. Locks are taken before the test, so two openers racing
//! each other see each other and at worst both fail.
//!
//! OFD locks belong to the open file, not the process: they go away when the
//! last descriptor of the file closes (blockdev-del, daemon exit, kill -9),
//! and a second open of the same image inside livesnapd conflicts with the
//! first exactly as it would between two processes, as in QEMU.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// `locking` of QEMU's file driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock where the kernel and filesystem support OFD locks (QEMU's default).
    #[default]
    Auto,
    /// Lock, and fail the open where locks cannot be taken.
    On,
    /// Take no locks and check none.
    Off,
}

impl Locking {
    /// The QAPI value (`auto`, `on`, `off`).
    pub fn parse(s: &str) -> Option<Locking> {
        match s {
            "auto" => Some(Locking::Auto),
            "on" => Some(Locking::On),
            "off" => Some(Locking::Off),
            _ => None,
        }
    }
}

/// QEMU's `BLK_PERM_CONSISTENT_READ`: reads see what was written.
pub const PERM_CONSISTENT_READ: u8 = 0x01;
/// QEMU's `BLK_PERM_WRITE`.
pub const PERM_WRITE: u8 = 0x02;
/// QEMU's `BLK_PERM_WRITE_UNCHANGED`: writes that leave the contents as they are.
pub const PERM_WRITE_UNCHANGED: u8 = 0x04;
/// QEMU's `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u8 = 0x08;
/// Every permission bit QEMU 10 knows.
pub const PERM_ALL: u8 = 0x0f;

/// Byte of the first "uses permission" lock.
const PERM_BASE: i64 = 100;
/// Byte of the first "does not share permission" lock.
const SHARED_BASE: i64 = 200;

/// What an open of an image file claims, in QEMU's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImagePerms {
    /// Permissions used.
    pub perm: u8,
    /// Permissions others may use at the same time.
    pub shared: u8,
}

impl ImagePerms {
    /// What QEMU's file node under a qcow2 image claims: a writer writes and
    /// may resize, and nobody else may do either; a reader needs consistent
    /// reads, so it also refuses writers unless `force_share` (read-only only)
    /// gives up that guarantee, as `qemu-img -U` does.
    pub fn for_open(read_only: bool, force_share: bool) -> ImagePerms {
        if read_only && force_share {
            return ImagePerms {
                perm: PERM_CONSISTENT_READ,
                shared: PERM_ALL,
            };
        }
        let perm = if read_only {
            PERM_CONSISTENT_READ
        } else {
            PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
        };
        ImagePerms {
            perm,
            shared: PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
        }
    }
}

/// An open refused because another user's locks conflict; the text is QEMU's.
#[derive(Debug)]
pub struct LockConflict(pub String);

impl fmt::Display for LockConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LockConflict {}

/// QEMU's name of one permission bit, as its lock errors print it.
fn perm_name(bit: u8) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

fn bits(mask: u8) -> impl Iterator<Item = (i64, u8)> {
    (0..4)
        .map(|i| (i, 1u8 << i))
        .filter(move |(_, b)| mask & b != 0)
}

fn flock_at(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_byte(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_at(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: fcntl on an fd we own with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True when some other open file holds a lock on `byte`.
fn byte_taken(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: fcntl on an fd we own with a valid flock it fills in.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// True for the errors of a kernel or filesystem without OFD locks.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Takes the locks of `perms` on `file` and checks nobody else's conflict
/// with them. A [`LockConflict`] payload in the error carries QEMU's text.
pub fn lock_image(file: &File, perms: ImagePerms, locking: Locking) -> io::Result<()> {
    if locking == Locking::Off {
        return Ok(());
    }
    let take = bits(perms.perm)
        .map(|(i, _)| PERM_BASE + i)
        .chain(bits(!perms.shared & PERM_ALL).map(|(i, _)| SHARED_BASE + i));
    for byte in take {
        match set_byte(file, byte) {
            Ok(()) => {}
            Err(e) if locking == Locking::Auto && unsupported(&e) => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("Failed to lock byte {byte}: {e}"),
                ))
            }
        }
    }
    let checked = |byte: i64| {
        byte_taken(file, byte)
            .map_err(|e| io::Error::new(e.kind(), format!("Failed to check byte {byte}: {e}")))
    };
    // Someone refuses to share a permission this open uses.
    for (i, bit) in bits(perms.perm) {
        if checked(SHARED_BASE + i)? {
            return Err(conflict(format!(
                "Failed to get \"{}\" lock",
                perm_name(bit)
            )));
        }
    }
    // Someone uses a permission this open refuses to share.
    for (i, bit) in bits(!perms.shared & PERM_ALL) {
        if checked(PERM_BASE + i)? {
            return Err(conflict(format!(
                "Failed to get shared \"{}\" lock",
                perm_name(bit)
            )));
        }
    }
    Ok(())
}

/// Gives up the locks `from` holds beyond `to` (a node frozen read-only by
/// an external snapshot stops using write, as QEMU's reopen does). Only
/// ever fewer permissions: nothing new to check.
pub fn release_locks(file: &File, from: ImagePerms, to: ImagePerms) -> io::Result<()> {
    let used = bits(from.perm & !to.perm).map(|(i, _)| PERM_BASE + i);
    let unshared = bits(!from.shared & to.shared & PERM_ALL).map(|(i, _)| SHARED_BASE + i);
    for byte in used.chain(unshared) {
        let fl = flock_at(libc::F_UNLCK as libc::c_short, byte);
        // SAFETY: fcntl on an fd we own with a valid flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn conflict(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::ResourceBusy, LockConflict(text))
}

/// The conflict an open failed on, if that is why it failed.
pub fn as_conflict(e: &io::Error) -> Option<&LockConflict> {
    e.get_ref().and_then(|i| i.downcast_ref::<LockConflict>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writers_and_readers_conflict_as_in_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        File::create(&path).unwrap();
        let rw = ImagePerms::for_open(false, false);
        let ro = ImagePerms::for_open(true, false);
        let shared = ImagePerms::for_open(true, true);

        // A refused open keeps what it locked until it closes: each try
        // below is its own open file, closed before the next.
        let try_open = |perms: ImagePerms, locking: Locking| {
            let f = open(&path);
            lock_image(&f, perms, locking).map(|()| f)
        };
        let writer = try_open(rw, Locking::On).unwrap();
        let e = try_open(rw, Locking::On).unwrap_err();
        assert_eq!(as_conflict(&e).unwrap().0, "Failed to get \"write\" lock");
        let e = try_open(ro, Locking::On).unwrap_err();
        assert_eq!(
            as_conflict(&e).unwrap().0,
            "Failed to get shared \"write\" lock"
        );
        let peek = try_open(shared, Locking::On).unwrap();
        let unlocked = try_open(rw, Locking::Off).unwrap();
        drop((writer, peek, unlocked));

        // Readers share with each other but keep writers out.
        let r1 = try_open(ro, Locking::On).unwrap();
        let r2 = try_open(ro, Locking::Auto).unwrap();
        let e = try_open(rw, Locking::On).unwrap_err();
        assert_eq!(as_conflict(&e).unwrap().0, "Failed to get \"write\" lock");
        drop((r1, r2));
        let w = try_open(rw, Locking::On).unwrap();

        // A writer frozen read-only lets readers in and still keeps writers out.
        release_locks(&w, rw, ro).unwrap();
        let r = try_open(ro, Locking::On).unwrap();
        let e = try_open(rw, Locking::On).unwrap_err();
        assert_eq!(as_conflict(&e).unwrap().0, "Failed to get \"write\" lock");
        drop((w, r));
    }
}
