//! The io_uring engine of the `file` driver (QEMU's `aio=io_uring`).
//!
//! One ring serves the whole process, whatever runtime or thread a request
//! comes from. The task that makes a request pushes and submits it itself,
//! and reaps what the kernel finished during the submission (a read from the
//! page cache): a request alone in flight crosses no thread. What finishes
//! later is reaped by one reaper thread, which sleeps on a condition variable
//! while no future waits for a completion, so requests that complete inline
//! do not wake it. After delivering a completion it lingers in the kernel
//! for [`LINGER`]: while requests keep waiting for it (O_DIRECT), parking
//! one costs no wake-up of the reaper.
//!
//! The kernel reads from or writes into a request's buffer until the request's
//! completion arrives, so the buffer (and the file) belong to the ring's slot
//! for the request, not to the future: a future dropped early leaves them
//! there and the completion frees them. At most [`ENTRIES`] requests are in
//! flight; more wait for a permit (back-pressure, and the completion queue,
//! twice as long, can never overflow).

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::buf::IoBuf;

/// Entries of the submission queue, and the most requests in flight at once.
const ENTRIES: u32 = 128;

/// Environment variable that, set to `1`, makes the probe fail as a refused
/// `io_uring_setup` does (`EPERM`, as with `kernel.io_uring_disabled=2`):
/// every `file` node then uses the thread pool.
pub const DISABLE_ENV: &str = "LIVESNAP_DISABLE_IO_URING";

/// `IORING_ENTER_GETEVENTS`: wait for completions.
const ENTER_GETEVENTS: u32 = 1;

/// How long the reaper keeps waiting in the kernel after it delivered a
/// completion a future waited for, before it sleeps on its condition variable.
const LINGER: Duration = Duration::from_millis(2);

/// The process's ring, set up at the first use; the error says why io_uring
/// cannot be used (probed once: the answer does not change while we run).
pub(super) fn shared() -> Result<&'static Uring, &'static io::Error> {
    static RING: OnceLock<io::Result<&'static Uring>> = OnceLock::new();
    RING.get_or_init(|| {
        let disabled = std::env::var(DISABLE_ENV).is_ok_and(|v| v == "1");
        let r = Uring::setup(disabled);
        match &r {
            Ok(_) => tracing::debug!("file driver: io_uring engine ready"),
            Err(e) => tracing::info!("file driver: io_uring unavailable ({e}); using threads"),
        }
        r
    })
    .as_ref()
    .map(|u| *u)
}

/// What the kernel may touch until a request's completion arrives.
struct Held {
    buf: Option<IoBuf>,
    _file: Arc<File>,
    _permit: OwnedSemaphorePermit,
}

enum Slot {
    Free,
    /// Submitted; `parked` once its future waits for the reaper.
    InFlight {
        held: Held,
        waker: Option<Waker>,
        parked: bool,
    },
    /// Its future was dropped: freed, with what it holds, by its completion.
    Abandoned {
        held: Held,
    },
    Done {
        held: Held,
        result: i32,
    },
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Requests in flight whose completion the reaper must deliver.
    parked: usize,
    /// The reaper sleeps on the condition variable (not in the kernel).
    reaper_idle: bool,
}

/// The shared ring.
pub(super) struct Uring {
    ring: IoUring,
    /// Serialises pushing to and submitting the submission queue.
    sq: Mutex<()>,
    /// The slots, and the completion queue's consumer side.
    state: Mutex<State>,
    reaper: Condvar,
    permits: Arc<Semaphore>,
}

impl Uring {
    /// Sets up the ring (refused as by seccomp or sysctl when `disabled`),
    /// checks the opcodes the driver needs, and starts the reaper.
    fn setup(disabled: bool) -> io::Result<&'static Uring> {
        if disabled {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("io_uring_setup refused: {DISABLE_ENV}=1"),
            ));
        }
        let ring = IoUring::new(ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Fallocate::CODE, "fallocate"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring has no {name}"),
                ));
            }
        }
        // Lives as long as the process: nodes come and go, the ring stays.
        let uring: &'static Uring = Box::leak(Box::new(Uring {
            ring,
            sq: Mutex::new(()),
            state: Mutex::new(State::default()),
            reaper: Condvar::new(),
            permits: Arc::new(Semaphore::new(ENTRIES as usize)),
        }));
        std::thread::Builder::new()
            .name("io_uring-reaper".into())
            .spawn(move || uring.reap_forever())?;
        Ok(uring)
    }

    /// Reads `buf.len()` bytes at `offset`; past the end of the file reads
    /// as zeroes, as the thread pool's `read_full`.
    pub(super) async fn read(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: IoBuf,
    ) -> io::Result<IoBuf> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let entry = opcode::Read::new(
                types::Fd(file.as_raw_fd()),
                rest.as_mut_ptr(),
                rest.len() as u32,
            )
            .offset(offset + done as u64)
            .build();
            let (r, back) = self.run(entry, file, Some(buf)).await?;
            buf = back.expect("the ring gives the buffer back");
            match r {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf)
    }

    /// Writes all of `buf` at `offset`; with `fua`, as `RWF_DSYNC`.
    pub(super) async fn write(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: IoBuf,
        fua: bool,
    ) -> io::Result<()> {
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            let entry = opcode::Write::new(
                types::Fd(file.as_raw_fd()),
                rest.as_ptr(),
                rest.len() as u32,
            )
            .offset(offset + done as u64)
            .rw_flags(flags as _)
            .build();
            let (r, back) = self.run(entry, file, Some(buf)).await?;
            buf = back.expect("the ring gives the buffer back");
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `fdatasync`.
    pub(super) async fn datasync(&self, file: &Arc<File>) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.run_retrying(entry, file).await
    }

    /// `fallocate(mode, offset, len)`.
    pub(super) async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let entry = opcode::Fallocate::new(types::Fd(file.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        self.run_retrying(entry, file).await
    }

    /// Runs a request that holds no buffer, again while it is interrupted.
    async fn run_retrying(&self, entry: squeue::Entry, file: &Arc<File>) -> io::Result<()> {
        loop {
            match self.run(entry.clone(), file, None).await?.0 {
                Err(e) if retry(&e) => {}
                r => return r.map(|_| ()),
            }
        }
    }

    /// Submits `entry` (whose pointers, if any, point into `buf`) and waits
    /// for its completion: the outer error is the ring's, the inner one the
    /// request's.
    async fn run(
        &self,
        entry: squeue::Entry,
        file: &Arc<File>,
        buf: Option<IoBuf>,
    ) -> io::Result<(io::Result<usize>, Option<IoBuf>)> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("io_uring closed"))?;
        let held = Held {
            buf,
            _file: file.clone(),
            _permit: permit,
        };
        let idx = self.start(entry, held)?;
        let (result, held) = Completion {
            uring: self,
            idx,
            finished: false,
        }
        .await;
        let r = if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok(result as usize)
        };
        Ok((r, held.buf))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts the request in a slot, pushes and submits it, and reaps what
    /// completed meanwhile (often the request itself).
    fn start(&self, entry: squeue::Entry, held: Held) -> io::Result<usize> {
        let idx = {
            let mut st = self.lock();
            let slot = Slot::InFlight {
                held,
                waker: None,
                parked: false,
            };
            match st.free.pop() {
                Some(i) => {
                    st.slots[i] = slot;
                    i
                }
                None => {
                    st.slots.push(slot);
                    st.slots.len() - 1
                }
            }
        };
        let entry = entry.user_data(idx as u64);
        {
            let _sq = self.sq.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the `sq` mutex makes this the only user of the
            // submission queue; what the entry points to lives in slot `idx`
            // until its completion is reaped.
            let pushed = unsafe { self.ring.submission_shared().push(&entry) };
            if pushed.is_err() {
                // Cannot happen: each queued entry holds one of ENTRIES permits.
                drop(_sq);
                let mut st = self.lock();
                let slot = std::mem::replace(&mut st.slots[idx], Slot::Free);
                st.free.push(idx);
                drop(st);
                drop(slot);
                return Err(io::Error::other("io_uring submission queue full"));
            }
            self.submit();
        }
        self.reap();
        Ok(idx)
    }

    /// Submits what the submission queue holds; the caller holds `sq`.
    fn submit(&self) {
        loop {
            match self.ring.submitter().submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // EAGAIN/EBUSY: the entries stay queued; their futures
                    // park, and the reaper submits again before it waits.
                    tracing::debug!("io_uring submit: {e}");
                    return;
                }
            }
        }
    }

    /// Delivers every completion in the completion queue to its slot; true
    /// when one of them was waited for by the reaper.
    fn reap(&self) -> bool {
        let mut for_reaper = false;
        let mut wake = Vec::new();
        let mut freed = Vec::new();
        {
            let mut st = self.lock();
            // SAFETY: the state mutex makes this the only consumer of the
            // completion queue.
            let cq = unsafe { self.ring.completion_shared() };
            for cqe in cq {
                let idx = cqe.user_data() as usize;
                match std::mem::replace(&mut st.slots[idx], Slot::Free) {
                    Slot::InFlight {
                        held,
                        waker,
                        parked,
                    } => {
                        if parked {
                            st.parked -= 1;
                            for_reaper = true;
                        }
                        st.slots[idx] = Slot::Done {
                            held,
                            result: cqe.result(),
                        };
                        wake.extend(waker);
                    }
                    Slot::Abandoned { held } => {
                        st.parked -= 1;
                        st.free.push(idx);
                        freed.push(held);
                    }
                    other => {
                        st.slots[idx] = other;
                        tracing::error!("io_uring: completion for idle slot {idx}");
                    }
                }
            }
        }
        drop(freed);
        for w in wake {
            w.wake();
        }
        for_reaper
    }

    /// The reaper thread: waits in the kernel for completions while some
    /// future waits for one (and for [`LINGER`] after), on the condition
    /// variable otherwise.
    fn reap_forever(&self) {
        let timed_waits = self.ring.params().is_feature_ext_arg();
        let mut linger_until = Instant::now();
        loop {
            let linger = {
                let mut st = self.lock();
                let linger = loop {
                    if st.parked > 0 {
                        break None;
                    }
                    let left = linger_until.saturating_duration_since(Instant::now());
                    if timed_waits && !left.is_zero() {
                        break Some(left);
                    }
                    st.reaper_idle = true;
                    st = self.reaper.wait(st).unwrap_or_else(|e| e.into_inner());
                };
                st.reaper_idle = false;
                linger
            };
            {
                let _sq = self.sq.lock().unwrap_or_else(|e| e.into_inner());
                self.submit();
            }
            let r = match linger {
                Some(left) => {
                    let ts = types::Timespec::from(left);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                // SAFETY: no submission (0 entries) and no argument: only
                // waits for one completion.
                None => unsafe {
                    self.ring
                        .submitter()
                        .enter::<libc::sigset_t>(0, 1, ENTER_GETEVENTS, None)
                },
            };
            if let Err(e) = r {
                let quiet = [libc::EINTR, libc::EBUSY, libc::ETIME];
                if !e.raw_os_error().is_some_and(|n| quiet.contains(&n)) {
                    tracing::warn!("io_uring wait: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if self.reap() {
                linger_until = Instant::now() + LINGER;
            }
        }
    }

    /// A future waits on the reaper from now on.
    fn park(&self, st: &mut State) {
        st.parked += 1;
        if st.reaper_idle {
            self.reaper.notify_one();
        }
    }
}

/// `EINTR` and `EAGAIN` are retried, as the thread pool retries `EINTR`.
fn retry(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

/// The completion of the request in slot `idx`.
struct Completion<'a> {
    uring: &'a Uring,
    idx: usize,
    finished: bool,
}

impl Future for Completion<'_> {
    type Output = (i32, Held);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, Held)> {
        let uring = self.uring;
        let idx = self.idx;
        let mut st = uring.lock();
        let st = &mut *st;
        match &mut st.slots[idx] {
            Slot::InFlight { waker, parked, .. } => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                if !*parked {
                    *parked = true;
                    uring.park(st);
                }
                Poll::Pending
            }
            Slot::Done { .. } => {
                let Slot::Done { held, result } = std::mem::replace(&mut st.slots[idx], Slot::Free)
                else {
                    unreachable!()
                };
                st.free.push(idx);
                self.finished = true;
                Poll::Ready((result, held))
            }
            Slot::Free | Slot::Abandoned { .. } => unreachable!("slot {idx} lost its request"),
        }
    }
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut guard = self.uring.lock();
        let st = &mut *guard;
        let freed = match std::mem::replace(&mut st.slots[self.idx], Slot::Free) {
            Slot::InFlight { held, parked, .. } => {
                // The kernel still owns the buffer: the completion frees it.
                st.slots[self.idx] = Slot::Abandoned { held };
                if !parked {
                    self.uring.park(st);
                }
                None
            }
            Slot::Done { held, .. } => {
                st.free.push(self.idx);
                Some(held)
            }
            other => {
                st.slots[self.idx] = other;
                None
            }
        };
        drop(guard);
        drop(freed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_probe_fails_as_a_refused_setup() {
        let e = Uring::setup(true).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains(DISABLE_ENV), "{e}");
    }
}
