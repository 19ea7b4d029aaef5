//! A byte-rate limiter whose speed can change while a job runs (QEMU's
//! `util/throttle`-free `RateLimit`: a quota per 100 ms slice).

use std::time::{Duration, Instant};

/// Length of one accounting slice.
const SLICE: Duration = Duration::from_millis(100);

/// Bytes allowed per slice at a given speed; 0 means unlimited.
#[derive(Debug)]
pub struct RateLimit {
    speed: u64,
    slice_start: Instant,
    dispatched: u64,
}

impl RateLimit {
    /// A limiter at `speed` bytes per second (0 = unlimited).
    pub fn new(speed: u64) -> RateLimit {
        RateLimit {
            speed,
            slice_start: Instant::now(),
            dispatched: 0,
        }
    }

    /// The current speed in bytes per second (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Changes the speed; takes effect from the next accounting.
    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
        self.slice_start = Instant::now();
        self.dispatched = 0;
    }

    fn quota(&self) -> u64 {
        (self.speed as u128 * SLICE.as_nanos() / 1_000_000_000).max(1) as u64
    }

    /// Records `bytes` as done.
    pub fn account(&mut self, bytes: u64) {
        if self.speed == 0 {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.slice_start) >= SLICE {
            // Carry over what the last slices overspent, so a burst of big
            // chunks still averages out at the speed.
            let slices =
                (now.duration_since(self.slice_start).as_nanos() / SLICE.as_nanos()) as u64;
            self.dispatched = self.dispatched.saturating_sub(slices * self.quota());
            self.slice_start += SLICE * slices as u32;
        }
        self.dispatched += bytes;
    }

    /// How long to wait before the next request may go (zero when under quota).
    pub fn delay(&self) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        let quota = self.quota();
        if self.dispatched < quota {
            return Duration::ZERO;
        }
        // Whole slices needed to pay off what was dispatched beyond the quota.
        let slices = self.dispatched / quota;
        let until = self.slice_start + SLICE * slices as u32;
        until.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::new(0);
        r.account(1 << 30);
        assert_eq!(r.delay(), Duration::ZERO);
    }

    #[test]
    fn over_quota_waits_in_proportion() {
        let mut r = RateLimit::new(10 << 20); // 1 MiB per slice
        r.account(512 << 10);
        assert_eq!(r.delay(), Duration::ZERO);
        r.account(4 << 20);
        let d = r.delay();
        assert!(
            d > Duration::from_millis(300) && d <= Duration::from_millis(400),
            "{d:?}"
        );
        r.set_speed(0);
        assert_eq!(r.delay(), Duration::ZERO);
    }
}
