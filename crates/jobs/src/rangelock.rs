//! Exclusive locks on byte ranges: a job's copy of a chunk and a guest write
//! to the same chunk take turns (QEMU's in-flight bitmap and
//! `mirror_wait_on_conflicts`).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A set of locked, pairwise disjoint byte ranges.
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// One locked range; dropping it unlocks.
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    start: u64,
    end: u64,
}

impl RangeLocks {
    /// An empty set.
    pub fn new() -> Arc<RangeLocks> {
        Arc::new(RangeLocks::default())
    }

    /// Tries to lock `[start, end)` without waiting.
    pub fn try_lock(self: &Arc<Self>, start: u64, end: u64) -> Option<RangeGuard> {
        let mut held = self.held.lock().unwrap();
        if held.iter().any(|&(s, e)| s < end && start < e) {
            return None;
        }
        held.push((start, end));
        Some(RangeGuard {
            locks: self.clone(),
            start,
            end,
        })
    }

    /// Locks `[start, end)`, waiting for overlapping holders to unlock.
    pub async fn lock(self: &Arc<Self>, start: u64, end: u64) -> RangeGuard {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so an unlock in between still wakes us.
            released.as_mut().enable();
            if let Some(g) = self.try_lock(start, end) {
                return g;
            }
            released.await;
        }
    }

    /// True when nothing is locked.
    pub fn is_idle(&self) -> bool {
        self.held.lock().unwrap().is_empty()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap();
        if let Some(i) = held
            .iter()
            .position(|&(s, e)| s == self.start && e == self.end)
        {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_lock_waits_for_unlock() {
        let locks = RangeLocks::new();
        let a = locks.lock(0, 100).await;
        assert!(locks.try_lock(99, 200).is_none());
        let b = locks
            .try_lock(100, 200)
            .expect("adjacent ranges do not overlap");
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(50, 150).await.start });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "still overlaps the second range");
        drop(b);
        assert_eq!(waiter.await.unwrap(), 50);
        assert!(locks.is_idle());
    }
}
