//! How much of the disk the guest leaves to a job's background copy.
//!
//! A job must stay gentle with the guest (G4) without starving itself: a
//! guest writing 4 MiB/s on a disk that copies at 1 GB/s leaves nearly
//! everything, a guest writing flat out leaves little. Neither the disk's
//! speed nor the guest's demand is known in advance, so the job measures
//! what it costs the guest and adapts.
//!
//! **The measure.** A job's write hook sees every guest write
//! ([`GuestActivity`]): per period ([`PERIOD`]) it sums the writes' latency
//! and the time at least one was in flight (the guest's utilisation `u`).
//! Against a baseline latency `b` of the guest alone, a period whose mean
//! latency is `l` cost the guest
//!
//! ```text
//! loss = u × (1 − b / l)
//! ```
//!
//! of its throughput. For a guest that waits for each write before the next
//! (any queue depth, any think time between writes) this is exact: its
//! throughput is proportional to `1 / (think + l)`. A guest that writes at a
//! fixed rate loses less than that (nothing, until its queue fills), so the
//! estimate errs on the gentle side; a light writer has a small `u` and
//! therefore leaves nearly everything anyway.
//!
//! **The baseline** is measured by a probe: one period in which the job
//! has no copy in flight (it starts none, and the period starts once those
//! in flight have ended). It is trusted for [`BASE_TTL`], then measured
//! again; a busy guest's first period is a probe too, and so is the first
//! after the guest's own path changed (a mirror going write-blocking). An
//! idle guest costs the job nothing: no writes, no probes; nor does a light
//! one: a guest with a write in flight less than the target's share of the
//! time cannot lose more than that share (`loss ≤ u`), so it is not probed.
//!
//! **The knob** ([`Pacer`]) is the job's window: bytes of copies in flight,
//! starting at the job's maximum. Each period whose loss (smoothed over
//! about two periods) is above the target divides it by the excess (loss /
//! target, rounded down to a power of two, at least 2); one below half the
//! target grows it by an eighth, one below a quarter doubles it; a guest
//! that wrote nothing gives it the maximum at once. A window below one
//! paced chunk ([`PACED_CHUNK`]) becomes a duty cycle: one chunk, then an
//! idle pause so that the job copies `window / chunk` of the time, at least
//! a quarter. The target is the job's `x-busy-share`: the most of the
//! guest's throughput the job may take (default [`DEFAULT_LOSS`]; 1 turns
//! yielding off). Completion and copy-before-write are not paced, nor is a
//! mirror that can copy what is left within a period at its measured rate
//! (a probe would cost it more than the guest saves); a job with a `speed`
//! limit keeps at least one chunk in flight.
//!
//! docs/decisions.md has the measurements behind the numbers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Length of one measuring period, and of a probe.
pub const PERIOD: Duration = Duration::from_millis(100);

/// How long a measured baseline latency is trusted before a probe (a
/// tenth of a busy guest's time goes to probes, none of an idle one's).
pub const BASE_TTL: Duration = Duration::from_secs(1);

/// Size of one copy while the window is small: a guest write that hits a
/// chunk being copied waits for all of it.
pub const PACED_CHUNK: u64 = 256 << 10;

/// Default most of the guest's throughput a job's background copy may take.
pub const DEFAULT_LOSS: f64 = 0.1;

/// The smallest window, as a fraction of a paced chunk (a duty cycle of
/// 1/4): below that the job would last so long that what the guest pays
/// for its mere presence (copy-before-write, write-blocking) outweighs the
/// contention it saves.
const MIN_WINDOW_DIV: u64 = 4;

/// Longest idle pause a duty cycle takes at once (the pacer re-measures after).
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// What a job's write hook saw of the guest's writes over one period.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GuestSample {
    /// Writes that completed in the period.
    pub writes: u64,
    /// Their latencies, summed.
    pub latency: Duration,
    /// Time in the period with at least one guest write in flight.
    pub busy: Duration,
    /// Length of the period.
    pub span: Duration,
}

impl GuestSample {
    /// Fraction of the period the guest had a write in flight.
    pub fn utilisation(&self) -> f64 {
        if self.span.is_zero() {
            return 0.0;
        }
        (self.busy.as_secs_f64() / self.span.as_secs_f64()).clamp(0.0, 1.0)
    }

    /// Mean latency of the period's writes; a write in flight all period
    /// with none completed counts as taking the whole period.
    pub fn mean_latency(&self) -> Option<f64> {
        if self.writes > 0 {
            Some(self.latency.as_secs_f64() / self.writes as f64)
        } else if !self.busy.is_zero() {
            Some(self.span.as_secs_f64())
        } else {
            None
        }
    }
}

#[derive(Debug)]
struct Counters {
    in_flight: usize,
    writes: u64,
    latency: Duration,
    busy: Duration,
    busy_since: Instant,
    since: Instant,
}

/// Guest writes seen by a job's write hook.
#[derive(Debug)]
pub struct GuestActivity {
    c: Mutex<Counters>,
}

/// One guest write in flight; dropping it marks the write done.
pub struct GuestWrite<'a> {
    guest: &'a GuestActivity,
    started: Instant,
}

impl GuestActivity {
    /// No write seen yet: idle.
    pub fn new() -> GuestActivity {
        let now = Instant::now();
        GuestActivity {
            c: Mutex::new(Counters {
                in_flight: 0,
                writes: 0,
                latency: Duration::ZERO,
                busy: Duration::ZERO,
                busy_since: now,
                since: now,
            }),
        }
    }

    /// Counts a guest write until the returned guard is dropped.
    pub fn write_started(&self) -> GuestWrite<'_> {
        let started = Instant::now();
        let mut c = self.c.lock().unwrap();
        if c.in_flight == 0 {
            c.busy_since = started;
        }
        c.in_flight += 1;
        GuestWrite {
            guest: self,
            started,
        }
    }

    /// True while a guest write is in flight.
    pub fn writing(&self) -> bool {
        self.c.lock().unwrap().in_flight > 0
    }

    /// What was seen since the last call (or since creation), up to `now`.
    pub fn take(&self, now: Instant) -> GuestSample {
        let mut c = self.c.lock().unwrap();
        if c.in_flight > 0 {
            let since = c.busy_since;
            c.busy += now.saturating_duration_since(since);
            c.busy_since = now;
        }
        let sample = GuestSample {
            writes: c.writes,
            latency: c.latency,
            busy: c.busy,
            span: now.saturating_duration_since(c.since),
        };
        c.writes = 0;
        c.latency = Duration::ZERO;
        c.busy = Duration::ZERO;
        c.since = now;
        sample
    }
}

impl Default for GuestActivity {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for GuestWrite<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut c = self.guest.c.lock().unwrap();
        c.writes += 1;
        c.latency += now.saturating_duration_since(self.started);
        c.in_flight -= 1;
        if c.in_flight == 0 {
            let since = c.busy_since;
            c.busy += now.saturating_duration_since(since);
        }
    }
}

/// A job's window of copies in flight, adapted each period to what the
/// guest loses (see the module doc). Pure: time and samples are inputs.
#[derive(Debug)]
pub struct Pacer {
    /// Most of the guest's throughput the job may take (1 = never yield).
    target: f64,
    chunk: u64,
    max: u64,
    window: u64,
    /// Lowest mean latency of the guest alone, and when it was measured.
    base: Option<(f64, Instant)>,
    /// A probe runs until this instant; the window to go back to after it.
    probe: Option<(Instant, u64)>,
    period_start: Instant,
    /// The guest's estimated loss, smoothed over the last periods.
    loss: f64,
    speed_limited: bool,
}

impl Pacer {
    /// A pacer for copies of `chunk` bytes (when paced) up to `max` bytes in
    /// flight, starting at `max`. `target` is clamped to (0, 1].
    pub fn new(now: Instant, target: f64, chunk: u64, max: u64) -> Pacer {
        let chunk = chunk.max(1);
        let max = max.max(chunk);
        Pacer {
            target: target.clamp(0.01, 1.0),
            chunk,
            max,
            window: max,
            base: None,
            probe: None,
            period_start: now,
            loss: 0.0,
            speed_limited: false,
        }
    }

    fn enabled(&self) -> bool {
        self.target < 1.0
    }

    fn min_window(&self) -> u64 {
        if self.speed_limited {
            self.chunk
        } else {
            (self.chunk / MIN_WINDOW_DIV).max(1)
        }
    }

    /// Whether the job has a `speed` limit: then it keeps at least one
    /// chunk in flight (the user chose its rate; a duty cycle on top would
    /// make it miss that rate whenever the guest writes).
    pub fn set_speed_limited(&mut self, limited: bool) {
        self.speed_limited = limited;
        if self.window != 0 {
            self.window = self.window.max(self.min_window());
        }
    }

    /// Takes the guest's sample and adapts once a period has passed;
    /// `job_in_flight` is what the job still has in flight: a probe only
    /// starts measuring once that is nothing (the guest alone).
    pub fn tick(&mut self, now: Instant, guest: &GuestActivity, job_in_flight: u64) {
        if !self.enabled() {
            return;
        }
        if let Some((_, back)) = self.probe {
            if job_in_flight > 0 {
                guest.take(now);
                self.period_start = now;
                self.probe = Some((now + PERIOD, back));
                return;
            }
        }
        if now.saturating_duration_since(self.period_start) < PERIOD {
            return;
        }
        self.period_start = now;
        self.observe(now, guest.take(now));
    }

    /// When the next [`Pacer::tick`] has something to do (a loop waiting
    /// for nothing else should wake by then).
    pub fn next_tick(&self) -> Instant {
        self.period_start + PERIOD
    }

    /// Adapts the window to one period's sample.
    pub fn observe(&mut self, now: Instant, s: GuestSample) {
        if !self.enabled() {
            return;
        }
        let lat = s.mean_latency();
        if let Some((until, back)) = self.probe {
            if now < until {
                return;
            }
            self.probe = None;
            self.window = back;
            match lat {
                Some(l) => {
                    tracing::debug!("pacer: probe: the guest alone, {:.0} µs", l * 1e6);
                    self.base = Some((l, now));
                }
                // The guest wrote nothing while we looked: it leaves everything.
                None => self.window = self.max,
            }
            return;
        }
        let Some(lat) = lat else {
            self.window = self.max;
            self.loss = 0.0;
            return;
        };
        let u = s.utilisation();
        let base = match self.base {
            Some((b, at)) if now.saturating_duration_since(at) < BASE_TTL => Some(b),
            // A guest waiting that little cannot lose more than that: no
            // need to stop the job to look.
            _ if u <= self.target => None,
            // No baseline, or a stale one: look at the guest alone first.
            _ => {
                self.probe = Some((now + PERIOD, self.window));
                self.window = 0;
                return;
            }
        };
        // Smoothed over two periods or so: one period's mean moves by tens
        // of percent on its own on a busy machine.
        let loss = match base {
            Some(b) => u * (1.0 - b / lat).max(0.0),
            None => u,
        };
        self.loss = (self.loss + loss) / 2.0;
        tracing::debug!(
            "pacer: {} writes, mean {:.0} µs, base {:.0} µs, utilisation {u:.2}, loss {loss:.2} (smoothed {:.2}), window {}",
            s.writes,
            lat * 1e6,
            base.unwrap_or(0.0) * 1e6,
            self.loss,
            self.window
        );
        let grown = if self.loss > self.target {
            // In proportion to the excess, at least a half: a guest hit
            // hard (a job starting at its full window) is relieved within
            // a few periods instead of one halving per period, which on a
            // 1 GiB backup was most of the job's life.
            let excess = ((self.loss / self.target) as u64).clamp(2, 64);
            let div = 1u64 << (63 - excess.leading_zeros());
            (self.window / div).max(self.min_window())
        } else if self.loss < self.target / 4.0 {
            self.window * 2
        } else if self.loss < self.target / 2.0 {
            self.window + (self.window / 8).max(self.min_window())
        } else {
            self.window
        };
        self.window = grown.min(self.max);
    }

    /// Leaves the job unpaced this turn (it can finish within a period:
    /// pacing would cost it more than the guest saves): a probe ends, the
    /// window is the maximum.
    pub fn finishing(&mut self) {
        self.probe = None;
        self.window = self.max;
    }

    /// Drops the baseline (the guest's path changed, e.g. a mirror went
    /// write-blocking): the next period in which the guest writes is a probe.
    pub fn forget_baseline(&mut self) {
        self.base = None;
    }

    /// Bytes the job may have in flight now; 0 while probing.
    pub fn window(&self) -> u64 {
        if !self.enabled() {
            return self.max;
        }
        self.window
    }

    /// The size of the next copy: the window, within one paced chunk and
    /// the job's largest.
    pub fn chunk(&self, largest: u64) -> u64 {
        self.window().clamp(self.chunk.min(largest), largest)
    }

    /// The pause after a copy that took `took`, when the window is below
    /// one chunk (the rest of the time is the guest's).
    pub fn pause_after(&self, took: Duration) -> Duration {
        let w = self.window();
        if w >= self.chunk || w == 0 {
            return Duration::ZERO;
        }
        let share = w as f64 / self.chunk as f64;
        took.mul_f64((1.0 - share) / share).min(MAX_PAUSE)
    }

    /// The estimated loss of guest throughput, smoothed (for logs).
    pub fn last_loss(&self) -> f64 {
        self.loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const CHUNK: u64 = 256 << 10;

    fn sample(writes: u64, mean_us: u64, busy_ms: u64) -> GuestSample {
        GuestSample {
            writes,
            latency: Duration::from_micros(mean_us * writes),
            busy: Duration::from_millis(busy_ms),
            span: PERIOD,
        }
    }

    /// A pacer past its first probe, which measured `base_us`.
    fn settled(t0: Instant, base_us: u64) -> (Pacer, Instant) {
        let mut p = Pacer::new(t0, 0.1, CHUNK, 16 * MIB);
        assert_eq!(p.window(), 16 * MIB, "an idle guest leaves everything");
        let mut t = t0 + PERIOD;
        p.observe(t, GuestSample::default());
        assert_eq!(p.window(), 16 * MIB);
        // The guest starts writing: the job stops for a period to measure it alone.
        t += PERIOD;
        p.observe(t, sample(100, base_us * 3, 100));
        assert_eq!(p.window(), 0, "the first writes start a probe");
        t += PERIOD;
        p.observe(t, sample(100, base_us, 100));
        assert_eq!(p.window(), 16 * MIB);
        (p, t)
    }

    /// `n` periods of a guest whose writes take `alone` while the job
    /// copies nothing (probes) and `loaded` otherwise; the windows seen.
    fn run(
        p: &mut Pacer,
        t: &mut Instant,
        n: usize,
        alone: GuestSample,
        loaded: GuestSample,
    ) -> Vec<u64> {
        let mut seen = Vec::new();
        for _ in 0..n {
            *t += PERIOD;
            let s = if p.window() == 0 { alone } else { loaded };
            p.observe(*t, s);
            seen.push(p.window());
        }
        seen
    }

    #[test]
    fn busy_guest_losing_throughput_shrinks_the_window_down_to_a_duty_cycle() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        // Saturated guest (u = 1) at twice its latency: it loses half.
        let seen = run(
            &mut p,
            &mut t,
            40,
            sample(1000, 100, 100),
            sample(500, 200, 100),
        );
        let paced: Vec<u64> = seen.iter().copied().filter(|&w| w != 0).collect();
        let floor = paced
            .iter()
            .position(|&w| w == CHUNK / 4)
            .expect("reaches the floor");
        // At least a half per period (more as the smoothed loss grows past
        // twice the target): 16 MiB down to a quarter chunk in under 8.
        assert!(
            paced[..=floor].windows(2).all(|w| w[1] <= w[0] / 2),
            "{paced:?}"
        );
        assert!(floor < 8, "{paced:?}");
        assert!(paced[floor..].iter().all(|&w| w == CHUNK / 4), "{paced:?}");
        assert!(
            seen.iter().filter(|&&w| w == 0).count() >= 3,
            "probes: {seen:?}"
        );
        assert!(p.last_loss() > 0.4);
        if p.window() == 0 {
            run(
                &mut p,
                &mut t,
                1,
                sample(1000, 100, 100),
                sample(500, 200, 100),
            );
        }
        // A quarter of the time: 2 ms of copying, 6 ms for the guest.
        assert_eq!(
            p.pause_after(Duration::from_millis(2)),
            Duration::from_millis(6)
        );
        assert_eq!(p.chunk(MIB), CHUNK);
    }

    #[test]
    fn light_writer_leaves_nearly_everything() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        // 100 writes of 4 KiB per period (4 MiB/s) at 3× latency: busy 3 %
        // of the time, so the job costs it under 2 %: the window stays full.
        let seen = run(&mut p, &mut t, 40, sample(100, 100, 1), sample(100, 300, 3));
        assert!(
            seen.iter().all(|&w| w == 16 * MIB),
            "no probe either: {seen:?}"
        );
        assert!(p.last_loss() < 0.05);
        assert_eq!(p.chunk(MIB), MIB);
        assert_eq!(p.pause_after(Duration::from_millis(5)), Duration::ZERO);
    }

    #[test]
    fn window_grows_back_by_an_eighth_once_the_guest_recovers() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        t += PERIOD;
        p.observe(t, sample(1000, 400, 100));
        assert_eq!(p.window(), 8 * MIB);
        // The smoothed loss falls within a few periods: an eighth more per
        // period below half the target, twice as much below a quarter.
        let alone = sample(1000, 100, 100);
        let seen = run(&mut p, &mut t, 6, alone, sample(1000, 104, 100));
        assert!(seen.iter().all(|&w| w != 0), "no probe yet: {seen:?}");
        assert!(*seen.iter().min().unwrap() >= MIB, "{seen:?}");
        let grew: Vec<_> = seen.windows(2).filter(|w| w[1] > w[0]).collect();
        assert!(grew.iter().any(|w| w[1] == w[0] + w[0] / 8), "{seen:?}");
        let seen = run(&mut p, &mut t, 2, alone, alone);
        assert!(
            seen.windows(2).all(|w| w[1] == (w[0] * 2).min(16 * MIB)),
            "{seen:?}"
        );
    }

    #[test]
    fn idle_guest_gives_the_maximum_at_once() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        run(
            &mut p,
            &mut t,
            9,
            sample(1000, 100, 100),
            sample(100, 1000, 100),
        );
        assert!(p.window() < MIB && p.window() > 0, "{}", p.window());
        t += PERIOD;
        p.observe(t, GuestSample::default());
        assert_eq!(p.window(), 16 * MIB);
    }

    #[test]
    fn the_baseline_is_measured_again_each_second_with_the_job_stopped() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        let mut steps = 0;
        while p.window() != 0 {
            t += PERIOD;
            p.observe(t, sample(1000, 105, 100));
            steps += 1;
            assert!(steps <= 11, "no probe within {steps} periods");
        }
        assert!(steps >= 10, "probe after {steps} periods");
        // The probe measures the guest alone: 150 µs is the new baseline.
        t += PERIOD;
        p.observe(t, sample(1000, 150, 100));
        assert_eq!(p.window(), 16 * MIB);
        t += PERIOD;
        p.observe(t, sample(1000, 300, 100));
        assert_eq!(p.window(), 8 * MIB);
    }

    #[test]
    fn a_forgotten_baseline_is_measured_again() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        p.forget_baseline();
        t += PERIOD;
        p.observe(t, sample(1000, 200, 100));
        assert_eq!(p.window(), 0);
        t += PERIOD;
        p.observe(t, sample(1000, 200, 100));
        assert_eq!(p.window(), 16 * MIB);
        t += PERIOD;
        p.observe(t, sample(1000, 205, 100));
        assert_eq!(
            p.window(),
            16 * MIB,
            "200 µs is the guest's own latency now"
        );
    }

    #[test]
    fn a_probe_measures_only_once_the_job_has_nothing_in_flight() {
        let g = GuestActivity::new();
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 0.1, CHUNK, 16 * MIB);
        p.observe(t0, sample(1000, 500, 100));
        assert_eq!(p.window(), 0, "probing");
        // Copies still in flight: the guest's writes now are not "alone".
        let mut t = t0;
        for _ in 0..5 {
            t += PERIOD;
            drop(g.write_started());
            p.tick(t, &g, 4 * MIB);
            assert_eq!(p.window(), 0);
        }
        // Drained: one more period, then the probe ends.
        p.tick(t + PERIOD / 2, &g, 0);
        assert_eq!(p.window(), 0);
        p.tick(t + PERIOD, &g, 0);
        assert_eq!(p.window(), 16 * MIB);
    }

    #[test]
    fn a_speed_limited_job_keeps_one_chunk_in_flight() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        p.set_speed_limited(true);
        run(
            &mut p,
            &mut t,
            9,
            sample(1000, 100, 100),
            sample(500, 200, 100),
        );
        assert_eq!(p.window(), CHUNK);
        assert_eq!(p.pause_after(Duration::from_millis(2)), Duration::ZERO);
        p.set_speed_limited(false);
        run(
            &mut p,
            &mut t,
            3,
            sample(1000, 100, 100),
            sample(500, 200, 100),
        );
        assert!(p.window() < CHUNK, "{}", p.window());
    }

    #[test]
    fn a_finishing_job_is_not_paced() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        run(
            &mut p,
            &mut t,
            4,
            sample(1000, 100, 100),
            sample(500, 400, 100),
        );
        assert!(p.window() < 4 * MIB, "{}", p.window());
        p.finishing();
        assert_eq!(p.window(), 16 * MIB);
        p.forget_baseline();
        t += PERIOD;
        p.observe(t, sample(500, 400, 100));
        assert_eq!(p.window(), 0, "probing");
        p.finishing();
        assert_eq!(p.window(), 16 * MIB, "the probe ended");
    }

    #[test]
    fn a_stalled_write_counts_as_a_whole_period_of_latency() {
        let t0 = Instant::now();
        let (mut p, mut t) = settled(t0, 100);
        t += PERIOD;
        p.observe(t, sample(0, 0, 100));
        // Counted as a loss far above the target: the window shrinks at once.
        assert!(p.window() <= 8 * MIB && p.window() > 0, "{}", p.window());
    }

    #[test]
    fn share_one_never_yields() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 1.0, CHUNK, 16 * MIB);
        assert_eq!(p.window(), 16 * MIB);
        p.observe(t0 + PERIOD, sample(1000, 10_000, 100));
        assert_eq!(p.window(), 16 * MIB);
    }

    #[test]
    fn activity_measures_latency_and_utilisation() {
        let g = GuestActivity::new();
        let t0 = Instant::now();
        let _ = g.take(t0);
        {
            let _w = g.write_started();
            assert!(g.writing());
        }
        assert!(!g.writing());
        let s = g.take(Instant::now());
        assert_eq!(s.writes, 1);
        assert!(s.busy >= s.latency && s.busy <= s.span);
        let held = g.write_started();
        let s = g.take(Instant::now() + Duration::from_millis(10));
        assert_eq!(s.writes, 0);
        assert!(s.busy >= Duration::from_millis(10));
        drop(held);
    }
}
