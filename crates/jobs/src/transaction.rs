//! QMP's `transaction` (QEMU's `qmp_transaction`): several actions take
//! effect at one instant, or none does.
//!
//! Whoever runs one (livesnapd) reads every action first, then
//! [`Transaction::begin`] holds guest requests on every export through which
//! a write can reach a node the actions touch, within a bound: from then on
//! nothing is written to those disks, so every action sees the same disk
//! contents, which is what makes several disks' backups one instant. Each
//! action then *prepares* in order: it does its work so that it can still be
//! undone, and hands the transaction a [`Prepared`] undo/finish token (the
//! types here, for the engine's actions). If one fails, the prepared ones
//! abort; otherwise all commit. Both go newest first, as QEMU's
//! transactions do (two backup jobs start last-first). The hold ends after
//! that, and guest requests resume.

use std::sync::Arc;
use std::time::Duration;

use livesnap_block::{BackendHold, BlockBackend, BlockNode, DirtyBitmap, Use};

use crate::exports::hold_all;
use crate::job::{Job, JobFuture, JobTxn};

/// What a prepared action leaves to do once the transaction's outcome is known.
/// Both get the transaction's holds, which last until every action is done.
pub trait Prepared: Send + Sync {
    /// Every action prepared: make this one final.
    fn commit<'a>(self: Box<Self>, holds: &'a [BackendHold]) -> JobFuture<'a, ()>;
    /// Some action failed: undo this one.
    fn abort<'a>(self: Box<Self>, holds: &'a [BackendHold]) -> JobFuture<'a, ()>;
}

/// A transaction under way: the guest requests held, the actions prepared so far.
pub struct Transaction {
    holds: Vec<BackendHold>,
    prepared: Vec<Box<dyn Prepared>>,
    jobs: Option<Arc<JobTxn>>,
}

impl Transaction {
    /// Holds guest requests on `backends` (within `limit`, else `None` and
    /// nothing held); `grouped` makes the jobs the actions create one
    /// [`JobTxn`] (`completion-mode: grouped`).
    pub async fn begin(
        backends: Vec<Arc<BlockBackend>>,
        limit: Duration,
        grouped: bool,
    ) -> Option<Transaction> {
        let holds = hold_all(backends, limit).await?;
        Some(Transaction {
            holds,
            prepared: Vec::new(),
            jobs: grouped.then(JobTxn::new),
        })
    }

    /// The held backends (an external snapshot moves those of its node).
    pub fn holds(&self) -> &[BackendHold] {
        &self.holds
    }

    /// The job transaction new jobs join, for `completion-mode: grouped`.
    pub fn job_txn(&self) -> Option<&Arc<JobTxn>> {
        self.jobs.as_ref()
    }

    /// Records a prepared action.
    pub fn prepared(&mut self, p: Box<dyn Prepared>) {
        self.prepared.push(p);
    }

    /// Commits every action, newest first; then guest requests resume.
    pub async fn commit(self) {
        let Transaction {
            holds, prepared, ..
        } = self;
        for p in prepared.into_iter().rev() {
            p.commit(&holds).await;
        }
        drop(holds);
    }

    /// Undoes every prepared action, newest first; then guest requests resume.
    pub async fn abort(self) {
        let Transaction {
            holds, prepared, ..
        } = self;
        for p in prepared.into_iter().rev() {
            p.abort(&holds).await;
        }
        drop(holds);
    }
}

/// `block-dirty-bitmap-add`: the bitmap goes again on abort.
pub struct BitmapAdded {
    /// The node.
    pub node: Arc<BlockNode>,
    /// The bitmap added.
    pub name: String,
}

impl Prepared for BitmapAdded {
    fn commit<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async {})
    }

    fn abort<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self.node.remove_bitmap(&self.name).await {
                tracing::warn!("undoing the add of bitmap '{}': {e}", self.name);
            }
        })
    }
}

/// `block-dirty-bitmap-clear` or `-merge`: the target's old bits come back on abort.
pub struct BitmapChanged {
    /// The node.
    pub node: Arc<BlockNode>,
    /// The bitmap changed.
    pub name: String,
    /// Its bits before.
    pub old: DirtyBitmap,
}

impl Prepared for BitmapChanged {
    fn commit<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async {})
    }

    fn abort<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move { self.node.bitmaps().restore(&self.name, self.old) })
    }
}

/// `block-dirty-bitmap-enable` or `-disable`: recording as before on abort.
pub struct BitmapToggled {
    node: Arc<BlockNode>,
    name: String,
    was_enabled: bool,
}

impl BitmapToggled {
    /// Starts (`enabled`) or stops recording into bitmap `name` of `node`.
    pub async fn prepare(
        node: Arc<BlockNode>,
        name: &str,
        enabled: bool,
    ) -> livesnap_block::Result<BitmapToggled> {
        let was_enabled = node.bitmaps().get(name).is_some_and(|b| b.enabled());
        node.set_bitmap_enabled(name, enabled).await?;
        Ok(BitmapToggled {
            node,
            name: name.to_string(),
            was_enabled,
        })
    }
}

impl Prepared for BitmapToggled {
    fn commit<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async {})
    }

    fn abort<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self
                .node
                .set_bitmap_enabled(&self.name, self.was_enabled)
                .await
            {
                tracing::warn!(
                    "undoing the recording change of bitmap '{}': {e}",
                    self.name
                );
            }
        })
    }
}

/// `block-dirty-bitmap-remove` (QEMU's action): the bitmap is busy from
/// the prepare on, so later actions cannot use it, and goes at commit.
pub struct BitmapRemoval {
    node: Arc<BlockNode>,
    name: String,
}

impl BitmapRemoval {
    /// Checks that bitmap `name` of `node` may be removed and holds it.
    pub fn prepare(node: Arc<BlockNode>, name: &str) -> livesnap_block::Result<BitmapRemoval> {
        node.bitmaps().hold(name, Use::Remove)?;
        Ok(BitmapRemoval {
            node,
            name: name.to_string(),
        })
    }
}

impl Prepared for BitmapRemoval {
    fn commit<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move {
            self.node.bitmaps().release(&self.name);
            if let Err(e) = self.node.remove_bitmap(&self.name).await {
                tracing::warn!("removing bitmap '{}': {e}", self.name);
            }
        })
    }

    fn abort<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move { self.node.bitmaps().release(&self.name) })
    }
}

/// `blockdev-backup`: the job created by [`crate::backup::prepare`] starts
/// at commit; on abort it is cancelled before it ever ran, which removes its
/// filter and gives its bitmap back as it was.
pub struct BackupCreated(pub Arc<Job>);

impl Prepared for BackupCreated {
    fn commit<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move { self.0.start() })
    }

    fn abort<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move {
            let _ = self.0.cancel(true).await;
        })
    }
}
