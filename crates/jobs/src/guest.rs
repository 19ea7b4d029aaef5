//! Whether the guest is writing right now: how a job's background copy
//! knows to yield (a job must stay gentle with the guest).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a guest counts as busy after its last write (a writer at queue
/// depth 1 has gaps between requests that are not idleness).
pub const BUSY_HOLD: Duration = Duration::from_millis(20);

/// Guest writes seen by a job's write hook.
pub struct GuestActivity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

/// One guest write in flight; dropping it marks the write done.
pub struct GuestWrite<'a>(&'a GuestActivity);

impl GuestActivity {
    /// No write seen yet: idle.
    pub fn new() -> GuestActivity {
        GuestActivity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now() - BUSY_HOLD * 2),
        }
    }

    /// Counts a guest write until the returned guard is dropped.
    pub fn write_started(&self) -> GuestWrite<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        GuestWrite(self)
    }

    /// True while a guest write is in flight or one ended within [`BUSY_HOLD`].
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0 || self.last.lock().unwrap().elapsed() < BUSY_HOLD
    }
}

impl Default for GuestActivity {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for GuestWrite<'_> {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
