//! What an export served and what the server accepted, for a metrics
//! endpoint: plain atomic counters that the request path bumps without a
//! lock, read whenever someone asks. Nothing here formats or exports them;
//! that is the daemon's business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::proto::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
};

/// The commands counted, in the order [`ExportStats::commands`] gives them;
/// names as a metrics label would spell them.
pub const COMMANDS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
];

/// Upper bounds of the latency buckets, in nanoseconds (50 µs to 10 s: a
/// page-cache read to a flush behind a stalled disk). The last bucket,
/// unbounded, is implicit.
pub const LATENCY_BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

fn command_index(typ: u16) -> Option<usize> {
    Some(match typ {
        CMD_READ => 0,
        CMD_WRITE => 1,
        CMD_FLUSH => 2,
        CMD_TRIM => 3,
        CMD_WRITE_ZEROES => 4,
        CMD_BLOCK_STATUS => 5,
        CMD_CACHE => 6,
        _ => return None,
    })
}

/// Counters of one command on one export.
#[derive(Default)]
struct CommandCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    // Per bucket, not cumulative: one increment per request.
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    latency_sum_ns: AtomicU64,
}

/// A copy of one command's counters at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandStats {
    /// The command's name (one of [`COMMANDS`]).
    pub command: &'static str,
    /// Requests received.
    pub requests: u64,
    /// Bytes the requests covered: the payload of reads and writes, the
    /// range of trim, write-zeroes and block-status; 0 for flush.
    pub bytes: u64,
    /// Requests finished, per latency bucket of [`LATENCY_BOUNDS_NS`] plus
    /// the unbounded last one; cumulative (each count includes the smaller
    /// buckets), as a Prometheus histogram wants them.
    pub latency_buckets: Vec<u64>,
    /// Sum of the finished requests' latencies, in nanoseconds.
    pub latency_sum_ns: u64,
}

impl CommandStats {
    /// Requests finished (the count of the latency histogram).
    pub fn finished(&self) -> u64 {
        self.latency_buckets.last().copied().unwrap_or(0)
    }
}

/// Request counters of one export, shared by every connection attached to it.
#[derive(Default)]
pub struct ExportStats {
    commands: [CommandCounters; COMMANDS.len()],
}

impl ExportStats {
    /// Counts a request of type `typ` covering `len` bytes; the returned
    /// timer adds its latency when dropped (when the request's handler
    /// ends, its reply queued). Commands outside [`COMMANDS`] are not counted.
    pub(crate) fn begin(self: &Arc<Self>, typ: u16, len: u64) -> Option<RequestTimer> {
        let index = command_index(typ)?;
        let c = &self.commands[index];
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(len, Ordering::Relaxed);
        Some(RequestTimer {
            stats: self.clone(),
            index,
            start: Instant::now(),
        })
    }

    fn finish(&self, index: usize, ns: u64) {
        let c = &self.commands[index];
        let bucket = LATENCY_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        c.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
        c.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Every command's counters, in the order of [`COMMANDS`].
    pub fn commands(&self) -> Vec<CommandStats> {
        COMMANDS
            .iter()
            .zip(&self.commands)
            .map(|(&command, c)| {
                let mut total = 0;
                let latency_buckets = c
                    .buckets
                    .iter()
                    .map(|b| {
                        total += b.load(Ordering::Relaxed);
                        total
                    })
                    .collect();
                CommandStats {
                    command,
                    requests: c.requests.load(Ordering::Relaxed),
                    bytes: c.bytes.load(Ordering::Relaxed),
                    latency_buckets,
                    latency_sum_ns: c.latency_sum_ns.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// Measures one request from its header to the end of its handler.
pub(crate) struct RequestTimer {
    stats: Arc<ExportStats>,
    index: usize,
    start: Instant,
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.finish(self.index, ns);
    }
}

/// Connection counters of one NBD server.
#[derive(Default)]
pub struct ServerStats {
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl ServerStats {
    pub(crate) fn count_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections served since the server started.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because the connection limit was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_bytes_and_cumulative_latency() {
        let s = Arc::new(ExportStats::default());
        drop(s.begin(CMD_WRITE, 4096));
        drop(s.begin(CMD_WRITE, 512));
        drop(s.begin(CMD_FLUSH, 0));
        assert!(s.begin(crate::proto::CMD_DISC, 0).is_none());
        s.finish(0, 0);
        s.finish(0, 3_000_000);
        s.finish(0, u64::MAX);
        let all = s.commands();
        assert_eq!(all.len(), COMMANDS.len());
        let write = &all[1];
        assert_eq!(
            (write.command, write.requests, write.bytes),
            ("write", 2, 4608)
        );
        assert_eq!(write.finished(), 2);
        assert_eq!(all[2].requests, 1);
        let read = &all[0];
        // 0 ns in the first bucket, 3 ms in the 5 ms one, the rest only in +Inf.
        assert_eq!(read.latency_buckets[0], 1);
        assert_eq!(read.latency_buckets[5], 1);
        assert_eq!(read.latency_buckets[6], 2);
        assert_eq!(read.latency_buckets[LATENCY_BOUNDS_NS.len() - 1], 2);
        assert_eq!(read.finished(), 3);
        assert!(read.latency_buckets.windows(2).all(|w| w[0] <= w[1]));
    }
}
