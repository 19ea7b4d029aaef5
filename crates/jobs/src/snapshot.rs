//! External snapshots (QEMU's `external_snapshot_action`): an overlay goes
//! over a node and takes its place under every export; the old node is
//! flushed and frozen read-only. No data is copied, so the snapshot is
//! exactly the disk at the swap, which happens while the exports are held.

use std::sync::Arc;

use livesnap_block::{BackendHold, BlockBackend, BlockGraph, BlockNode, Error};

use crate::exports::Exports;
use crate::job::JobFuture;
use crate::transaction::Prepared;

/// QEMU's first checks of an external snapshot of `node`: only the top of
/// a chain can be snapshotted (a node that is some image's backing is busy,
/// the newest parent's op blocker is the one reported); then the node is
/// flushed, so the frozen image holds every completed write.
pub async fn check_node(graph: &BlockGraph, node: &BlockNode) -> livesnap_block::Result<()> {
    if let Some((parent, _)) = graph
        .parents(node)
        .into_iter()
        .rev()
        .find(|(_, role)| *role == "backing")
    {
        return Err(Error::busy(format!(
            "Node '{}' is busy: node is used as backing hd of '{}'",
            node.name(),
            parent.name()
        )));
    }
    if !node.read_only() {
        node.flush()
            .await
            .map_err(|e| Error::io(format_args!("Write to node '{}' failed", node.name()), &e))?;
    }
    Ok(())
}

/// An overlay put over a node, the snapshot not yet final.
pub struct Appended {
    node: Arc<BlockNode>,
    overlay: Arc<BlockNode>,
    exports: Arc<dyn Exports>,
    moved: Vec<Arc<BlockBackend>>,
}

/// Puts `overlay` over `node` (checked in the order of QEMU's
/// `external_snapshot_action`) and moves onto it every backend of `node`
/// among `holds`, which must hold all of them: the instant of the move is
/// the snapshot's point in time.
pub fn append(
    graph: &BlockGraph,
    exports: Arc<dyn Exports>,
    node: Arc<BlockNode>,
    overlay: Arc<BlockNode>,
    holds: &[BackendHold],
) -> livesnap_block::Result<Appended> {
    if !overlay.users().is_empty() || !graph.parents(&overlay).is_empty() {
        return Err(Error::invalid("The overlay is already in use"));
    }
    if overlay.backing().is_some() {
        return Err(Error::invalid("The overlay already has a backing image"));
    }
    if overlay.driver::<livesnap_block::Qcow2Driver>().is_none() {
        return Err(Error::invalid(
            "The overlay does not support backing images",
        ));
    }
    if Arc::ptr_eq(&node, &overlay) {
        return Err(Error::invalid(format!(
            "Making '{}' a backing child of '{}' would create a cycle",
            node.name(),
            node.name()
        )));
    }
    // QEMU would attach a read-only overlay (and fail later on a writable
    // export); the exports move onto the overlay here, so it must take
    // writes (docs/qmp.md).
    if overlay.read_only() {
        return Err(Error::invalid("The overlay must be writable"));
    }
    overlay
        .set_backing(Some(node.clone()))
        .map_err(|_| Error::invalid("The overlay does not support backing images"))?;
    let mut moved = Vec::new();
    for h in holds {
        if Arc::ptr_eq(&h.backend().root(), &node) {
            h.replace_root(overlay.clone());
            moved.push(h.backend().clone());
        }
    }
    exports.pivoted(&node, &overlay);
    Ok(Appended {
        node,
        overlay,
        exports,
        moved,
    })
}

/// Makes `node` read-only with the children it opened inline (QEMU reopens
/// them read-only with it); backing images are read-only already, and
/// children added by name keep their own options.
fn freeze(node: &BlockNode) {
    node.set_read_only();
    for c in node.children() {
        if c.role != "backing" && !c.node.monitor_owned() {
            freeze(&c.node);
        }
    }
}

impl Prepared for Appended {
    fn commit<'a>(self: Box<Self>, _holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move { freeze(&self.node) })
    }

    fn abort<'a>(self: Box<Self>, holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move {
            // Still held since the move: nothing reached the overlay.
            for h in holds {
                if self.moved.iter().any(|b| Arc::ptr_eq(b, h.backend())) {
                    h.replace_root(self.node.clone());
                }
            }
            self.exports.pivoted(&self.overlay, &self.node);
            let _ = self.overlay.set_backing(None);
        })
    }
}
