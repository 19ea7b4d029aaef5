//! In-flight request tracking by byte range (QEMU's `BdrvTrackedRequest`).
//!
//! Every request on a node is registered here for its lifetime. A *serialising*
//! request (a read-modify-write of a partial block, or a block job's copy of a
//! chunk) waits until nothing overlaps it, and later overlapping requests wait
//! for it; ordinary requests only wait for serialising ones. Block jobs use
//! [`RequestTracker::wait_range_idle`] and [`RequestTracker::drain`] to order
//! themselves against guest I/O.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

/// What kind of request a tracked range belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// A read.
    Read,
    /// A write, write-zeroes or discard: anything that changes data.
    Write,
}

#[derive(Clone, Copy, Debug)]
struct Tracked {
    offset: u64,
    end: u64,
    kind: RequestKind,
    serialising: bool,
}

impl Tracked {
    fn overlaps(&self, offset: u64, end: u64) -> bool {
        self.offset < end && offset < self.end
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    requests: HashMap<u64, Tracked>,
}

/// The set of requests in flight on one node.
#[derive(Default)]
pub struct RequestTracker {
    state: Mutex<State>,
    changed: Notify,
}

/// A registered request; dropping it ends the request and wakes waiters.
pub struct TrackedRequest<'a> {
    tracker: &'a RequestTracker,
    id: u64,
}

impl Drop for TrackedRequest<'_> {
    fn drop(&mut self) {
        self.tracker.state.lock().unwrap().requests.remove(&self.id);
        self.tracker.changed.notify_waiters();
    }
}

impl RequestTracker {
    /// A tracker with no requests.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until `f` is true of the current state, then runs `then` under the same lock.
    async fn wait_until<T>(
        &self,
        mut ready: impl FnMut(&State) -> bool,
        then: impl FnOnce(&mut State) -> T,
    ) -> T {
        let mut then = Some(then);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.state.lock().unwrap();
                if ready(&st) {
                    return (then.take().expect("called once"))(&mut st);
                }
            }
            notified.await;
        }
    }

    /// Registers a request over `[offset, offset + len)`, waiting first for conflicts.
    pub async fn begin(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        serialising: bool,
    ) -> TrackedRequest<'_> {
        let req = Tracked {
            offset,
            end: offset.saturating_add(len.max(1)),
            kind,
            serialising,
        };
        let id = self
            .wait_until(
                |st| {
                    !st.requests
                        .values()
                        .any(|r| r.overlaps(req.offset, req.end) && (r.serialising || serialising))
                },
                |st| Self::register(st, req),
            )
            .await;
        TrackedRequest { tracker: self, id }
    }

    /// Registers a request at once, without waiting for overlapping
    /// serialising ones. For a copy-before-write hook's reads: the hook runs
    /// inside the write it protects (a padded write holds a serialising
    /// request) and orders itself against writes by its own cluster claims.
    pub fn begin_unordered(&self, offset: u64, len: u64, kind: RequestKind) -> TrackedRequest<'_> {
        let req = Tracked {
            offset,
            end: offset.saturating_add(len.max(1)),
            kind,
            serialising: false,
        };
        let id = Self::register(&mut self.state.lock().unwrap(), req);
        TrackedRequest { tracker: self, id }
    }

    fn register(st: &mut State, req: Tracked) -> u64 {
        let id = st.next_id;
        st.next_id += 1;
        st.requests.insert(id, req);
        id
    }

    /// Waits until no request overlaps `[offset, offset + len)`.
    pub async fn wait_range_idle(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len.max(1));
        self.wait_until(
            |st| {
                !st.requests
                    .values()
                    .any(|r| r.kind == RequestKind::Write && r.overlaps(offset, end))
            },
            |_| (),
        )
        .await
    }

    /// Waits until no request at all is in flight.
    pub async fn drain(&self) {
        self.wait_until(|st| st.requests.is_empty(), |_| ()).await
    }

    /// Number of requests in flight.
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn serialising_waits_for_overlap_only() {
        let t = Arc::new(RequestTracker::new());
        let a = t.begin(0, 4096, RequestKind::Write, false).await;
        // Non-overlapping serialising request proceeds at once.
        let b = t.begin(4096, 4096, RequestKind::Write, true).await;
        drop(b);
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            let _r = t2.begin(100, 10, RequestKind::Write, true).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "overlapping serialising request must wait"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t.in_flight(), 0);
        t.drain().await;
    }

    #[tokio::test]
    async fn reads_do_not_block_range_idle() {
        let t = RequestTracker::new();
        let _r = t.begin(0, 10, RequestKind::Read, false).await;
        tokio::time::timeout(Duration::from_secs(1), t.wait_range_idle(0, 10))
            .await
            .unwrap();
    }
}
