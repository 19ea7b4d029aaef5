//! The users outside the graph that guest I/O comes through (the daemon's
//! exports), as the engine sees them: what a job or a transaction holds to
//! stop guest requests at one instant, and moves onto another node (a
//! mirror's pivot, an external snapshot).

use std::sync::Arc;
use std::time::Duration;

use livesnap_block::{BackendHold, BlockBackend, BlockNode};

/// How the engine finds the backends it must hold and move.
pub trait Exports: Send + Sync + 'static {
    /// Every export's backend.
    fn backends(&self) -> Vec<Arc<BlockBackend>>;

    /// Called after the backends of `old` were moved to `new` (bookkeeping of users).
    fn pivoted(&self, old: &Arc<BlockNode>, new: &Arc<BlockNode>);

    /// The backends whose root is `node`.
    fn backends_of(&self, node: &Arc<BlockNode>) -> Vec<Arc<BlockBackend>> {
        self.backends()
            .into_iter()
            .filter(|b| Arc::ptr_eq(&b.root(), node))
            .collect()
    }

    /// The backends a write can reach `node` through: their root is `node`
    /// or has it below (a format node over its file, a filter).
    fn backends_reaching(&self, node: &Arc<BlockNode>) -> Vec<Arc<BlockBackend>> {
        self.backends()
            .into_iter()
            .filter(|b| below(&b.root(), node))
            .collect()
    }
}

/// True when `node` is `top` or a child of it, at any depth.
fn below(top: &Arc<BlockNode>, node: &Arc<BlockNode>) -> bool {
    Arc::ptr_eq(top, node) || top.children().iter().any(|c| below(&c.node, node))
}

/// Holds guest requests on every backend of `backends` (each once, in one
/// order every holder uses, so two holders cannot wait on each other for
/// ever) within `limit`; `None` when the bound ran out, and then nothing
/// stays held.
pub async fn hold_all(
    mut backends: Vec<Arc<BlockBackend>>,
    limit: Duration,
) -> Option<Vec<BackendHold>> {
    backends.sort_by_key(|b| Arc::as_ptr(b) as usize);
    backends.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let deadline = tokio::time::Instant::now() + limit;
    let mut held = Vec::with_capacity(backends.len());
    for b in backends {
        match tokio::time::timeout_at(deadline, b.hold()).await {
            Ok(h) => held.push(h),
            Err(_) => return None,
        }
    }
    Some(held)
}
