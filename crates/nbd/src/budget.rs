//! Memory the server's connections may hold: payload bytes of requests in
//! flight and of replies not yet written, per connection and in total. The
//! buffers themselves come from the block layer's pool (`IoBuf`).
//!
//! A client that pipelines large reads and never reads its replies pins
//! every buffer it was given until it goes away, so three bounds apply:
//! - each connection holds at most [`CONN_BUDGET`] bytes; past that its
//!   reader stops taking requests (backpressure, which the spec allows);
//! - all connections together hold at most [`SHARED_BUDGET`] bytes,
//!   handed out first come, first served;
//! - each connection also has a lane of [`CONN_RESERVE`] bytes that does not
//!   wait on the shared budget, so a client whose requests are not larger
//!   than that keeps being served while clients that never read their
//!   replies pin the whole shared budget. The lanes of all connections
//!   together are capped by [`RESERVE_TOTAL`].
//!
//! The payload memory of the whole server is thus at most
//! `SHARED_BUDGET + RESERVE_TOTAL` (plus the process's buffer pool,
//! `livesnap_block::buf::POOL_BYTES`), whatever the
//! number of clients. What is left: once the shared budget and
//! `RESERVE_TOTAL / CONN_RESERVE` lanes are all pinned by clients that do
//! not read, further requests wait until those clients read or leave
//! (`max-connections` bounds how many there can be).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests of one connection being served at once.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes one connection may hold at once: one request of the largest
/// payload and some room to pipeline smaller ones.
pub(crate) const CONN_BUDGET: usize = 40 << 20;
/// Payload bytes all connections together may hold outside their lanes:
/// four maximum-size reads.
pub(crate) const SHARED_BUDGET: usize = 128 << 20;
/// Bytes of each connection's lane, outside the shared budget: one request
/// of the size QEMU's and libnbd's copy tools use.
pub(crate) const CONN_RESERVE: usize = 2 << 20;
/// Cap on the lanes of all connections together.
pub(crate) const RESERVE_TOTAL: usize = 64 << 20;
/// Budget is counted in these units so it fits a semaphore comfortably.
const UNIT: usize = 4096;

fn units(bytes: usize) -> u32 {
    bytes.div_ceil(UNIT) as u32
}

/// The server-wide budgets, shared by every connection.
pub(crate) struct Budget {
    shared: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    /// Connections in the transmission phase.
    conns: AtomicUsize,
    /// A trim is queued: connections that end together share one.
    trim_queued: Arc<AtomicBool>,
}

impl Budget {
    pub(crate) fn new() -> Arc<Budget> {
        Arc::new(Budget {
            shared: Arc::new(Semaphore::new(SHARED_BUDGET / UNIT)),
            reserve: Arc::new(Semaphore::new(RESERVE_TOTAL / UNIT)),
            conns: AtomicUsize::new(0),
            trim_queued: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts accounting for one connection; its budget ends with the value.
    pub(crate) fn conn(self: &Arc<Self>) -> ConnBudget {
        self.conns.fetch_add(1, Ordering::SeqCst);
        ConnBudget {
            server: self.clone(),
            count: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            bytes: Arc::new(Semaphore::new(CONN_BUDGET / UNIT)),
            lane: Arc::new(Semaphore::new(CONN_RESERVE / UNIT)),
            used_shared: AtomicBool::new(false),
        }
    }

    /// Shared budget bytes currently handed out (for tests and logs).
    #[cfg(test)]
    pub(crate) fn shared_in_use(&self) -> usize {
        (SHARED_BUDGET / UNIT - self.shared.available_permits()) * UNIT
    }
}

/// Budget held by one request until its last reply frame has been written.
pub(crate) struct Permits {
    _count: OwnedSemaphorePermit,
    _conn: Option<OwnedSemaphorePermit>,
    _lane: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    _shared: Option<OwnedSemaphorePermit>,
}

/// One connection's view of the budgets.
pub(crate) struct ConnBudget {
    server: Arc<Budget>,
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    lane: Arc<Semaphore>,
    /// Whether this connection ever held shared budget (large buffers).
    used_shared: AtomicBool,
}

impl ConnBudget {
    /// Waits until a request with `len` payload bytes may proceed. The
    /// semaphores are never closed, so `None` only if that invariant broke.
    pub(crate) async fn acquire(&self, len: usize) -> Option<Permits> {
        let count = self.count.clone().acquire_owned().await.ok()?;
        if len == 0 {
            return Some(Permits {
                _count: count,
                _conn: None,
                _lane: None,
                _shared: None,
            });
        }
        let n = units(len);
        let conn = self.bytes.clone().acquire_many_owned(n).await.ok()?;
        // Whichever frees first: the connection's lane (when the request
        // fits it) or the shared budget, where waiters are served in order.
        let (lane, shared) = tokio::select! {
            biased;
            l = self.lane(len, n) => (Some(l?), None),
            s = self.server.shared.clone().acquire_many_owned(n) => (None, Some(s.ok()?)),
        };
        if shared.is_some() {
            self.used_shared.store(true, Ordering::Relaxed);
        }
        Some(Permits {
            _count: count,
            _conn: Some(conn),
            _lane: lane,
            _shared: shared,
        })
    }

    /// Waits for `n` units of this connection's lane; never ready for
    /// requests larger than the lane.
    async fn lane(
        &self,
        len: usize,
        n: u32,
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        if len > CONN_RESERVE {
            return std::future::pending().await;
        }
        let own = self.lane.clone().acquire_many_owned(n).await.ok()?;
        let total = self
            .server
            .reserve
            .clone()
            .acquire_many_owned(n)
            .await
            .ok()?;
        Some((own, total))
    }
}

impl Drop for ConnBudget {
    fn drop(&mut self) {
        let left = self.server.conns.fetch_sub(1, Ordering::SeqCst) - 1;
        // With the last connection gone, so go the pool's buffers.
        let wanted = left == 0 || self.used_shared.load(Ordering::Relaxed);
        if wanted && !self.server.trim_queued.swap(true, Ordering::SeqCst) {
            // The large buffers this connection pinned are free now; give
            // their pages back without holding up a runtime thread.
            let queued = self.server.trim_queued.clone();
            let trim = move || {
                queued.store(false, Ordering::SeqCst);
                livesnap_block::buf::release_free_memory();
            };
            if tokio::runtime::Handle::try_current().is_ok() {
                drop(tokio::task::spawn_blocking(trim));
            } else {
                trim();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn small_lane_does_not_wait_on_a_spent_shared_budget() {
        let b = Budget::new();
        let greedy: Vec<ConnBudget> = (0..5).map(|_| b.conn()).collect();
        let mut held = Vec::new();
        // Four greedy connections take a maximum-size request each...
        for g in &greedy[..4] {
            held.push(g.acquire(32 << 20).await.unwrap());
        }
        assert_eq!(b.shared_in_use(), 128 << 20);
        // ...and a fifth cannot take one beyond the shared budget.
        let more = tokio::time::timeout(Duration::from_millis(50), greedy[4].acquire(32 << 20));
        assert!(more.await.is_err(), "shared budget should be spent");
        // Requests up to the lane size of another connection still go through,
        // one after the other as their budget comes back.
        let normal = b.conn();
        for len in [4096, 64 << 10, 1 << 20, 2 << 20, 2 << 20] {
            let p = tokio::time::timeout(Duration::from_secs(5), normal.acquire(len))
                .await
                .expect("a request within the lane must not wait on the shared budget");
            assert!(p.is_some());
        }
        // Budget comes back when the permits go.
        drop(held);
        assert_eq!(b.shared_in_use(), 0);
    }

    #[tokio::test]
    async fn one_connection_stops_at_its_own_budget() {
        let b = Budget::new();
        let c = b.conn();
        let _a = c.acquire(32 << 20).await.unwrap();
        let more = tokio::time::timeout(Duration::from_millis(50), c.acquire(32 << 20));
        assert!(
            more.await.is_err(),
            "connection budget should stop a second 32 MiB"
        );
        assert_eq!(b.shared_in_use(), 32 << 20);
    }
}
