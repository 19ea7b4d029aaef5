//! External snapshots: `blockdev-snapshot` and `blockdev-snapshot-sync`
//! (QEMU's `external_snapshot_action` in `blockdev.c`).
//!
//! The overlay gets the node as its backing and takes its place under every
//! export; the old node is drained, flushed and frozen read-only. No data is
//! copied, so the snapshot is instant and exactly the disk at the swap.

use std::sync::Arc;
use std::time::Duration;

use livesnap_block::{create_image, BlockNode, CreateOptions, ImageFormat};
use livesnap_qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::empty;
use crate::daemon::{export_user, Daemon};

/// Longest wait for requests in flight on the old node before the swap.
///
/// A request stuck longer than this (a dead NFS server, say) fails the
/// snapshot instead of hanging the monitor: every operation is bounded.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

fn find(d: &Daemon, name: &str) -> Result<Arc<BlockNode>, QmpError> {
    d.graph.get(name).ok_or_else(|| {
        generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

/// QEMU's op blocker on backing images: only the top of a chain can be
/// snapshotted, a node that is some image's backing is busy (the newest
/// parent's blocker is the one reported).
fn check_not_backing(d: &Daemon, node: &BlockNode) -> Result<(), QmpError> {
    match d
        .graph
        .parents(node)
        .into_iter()
        .rev()
        .find(|(_, role)| *role == "backing")
    {
        Some((parent, _)) => Err(generic(format!(
            "Node '{}' is busy: node is used as backing hd of '{}'",
            node.name(),
            parent.name()
        ))),
        None => Ok(()),
    }
}

/// Puts `overlay` on top of `node`: the common part of both commands.
/// The checks come in the order of QEMU's `external_snapshot_action`.
async fn append_overlay(
    d: &Arc<Daemon>,
    node: Arc<BlockNode>,
    overlay: Arc<BlockNode>,
) -> Result<(), QmpError> {
    check_not_backing(d, &node)?;
    if !overlay.users().is_empty() || !d.graph.parents(&overlay).is_empty() {
        return Err(generic("The overlay is already in use"));
    }
    if overlay.backing().is_some() {
        return Err(generic("The overlay already has a backing image"));
    }
    if overlay.driver::<livesnap_block::Qcow2Driver>().is_none() {
        return Err(generic("The overlay does not support backing images"));
    }
    if Arc::ptr_eq(&node, &overlay) {
        return Err(generic(format!(
            "Making '{}' a backing child of '{}' would create a cycle",
            node.name(),
            node.name()
        )));
    }
    // QEMU would attach a read-only overlay (and fail later on a writable
    // export); livesnapd moves every export onto the overlay, so it must
    // take writes (docs/qmp.md).
    if overlay.read_only() {
        return Err(generic("The overlay must be writable"));
    }
    overlay
        .set_backing(Some(node.clone()))
        .map_err(|_| generic("The overlay does not support backing images"))?;
    // Every export on the node moves to the overlay once nothing is in flight.
    let exports: Vec<_> = d
        .exports
        .lock()
        .unwrap()
        .iter()
        .filter(|e| Arc::ptr_eq(&e.node(), &node))
        .cloned()
        .collect();
    for (moved, entry) in exports.iter().enumerate() {
        let backend = &entry.nbd.config().backend;
        if tokio::time::timeout(DRAIN_TIMEOUT, backend.replace_root(overlay.clone()))
            .await
            .is_err()
        {
            if moved == 0 {
                // Nothing points at the overlay yet: leave it as it was given.
                let _ = overlay.set_backing(None);
            }
            return Err(generic(format!(
                "Requests on '{}' did not finish within {} s; snapshot not taken",
                node.name(),
                DRAIN_TIMEOUT.as_secs()
            )));
        }
        node.remove_user(&export_user(&entry.id));
        overlay.add_user(export_user(&entry.id));
    }
    node.flush()
        .await
        .map_err(|e| generic(format!("Could not flush '{}': {e}", node.name())))?;
    freeze(&node);
    Ok(())
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

pub(super) async fn blockdev_snapshot(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let node = args.req_str("node")?;
    let overlay = args.req_str("overlay")?;
    args.finish()?;
    let node = find(d, &node)?;
    let overlay = find(d, &overlay)?;
    append_overlay(d, node, overlay).await?;
    Ok(empty())
}

pub(super) async fn blockdev_snapshot_sync(
    d: &Arc<Daemon>,
    mut args: Args,
) -> Result<Value, QmpError> {
    let device = args.opt_str("device")?;
    let node_name = args.opt_str("node-name")?;
    let snapshot_file = args.req_str("snapshot-file")?;
    let snapshot_node_name = args.opt_str("snapshot-node-name")?;
    let format = args.opt_str("format")?.unwrap_or_else(|| "qcow2".into());
    let mode = args
        .opt_enum("mode", &["existing", "absolute-paths"])?
        .unwrap_or_else(|| "absolute-paths".into());
    args.finish()?;
    // QEMU looks `device` up as a BlockBackend name; livesnapd has none and
    // takes a node name there too (docs/qmp.md), then `node-name`.
    let node = device
        .as_deref()
        .and_then(|n| d.graph.get(n))
        .or_else(|| node_name.as_deref().and_then(|n| d.graph.get(n)))
        .ok_or_else(|| {
            generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.as_deref().unwrap_or(""),
                node_name.as_deref().unwrap_or("")
            ))
        })?;
    check_not_backing(d, &node)?;
    // Before the file is created (or truncated).
    if node_name.is_some() && snapshot_node_name.is_none() {
        return Err(generic("New overlay node-name missing"));
    }
    if let Some(n) = &snapshot_node_name {
        if d.graph.get(n).is_some() {
            return Err(generic("New overlay node-name already in use"));
        }
    }
    match format.as_str() {
        "qcow2" => {}
        // QEMU's texts: creating a raw overlay fails, an existing one
        // cannot take a backing file.
        "raw" if mode == "existing" => {
            return Err(generic("The overlay does not support backing images"))
        }
        "raw" => return Err(generic("Backing file not supported for file format 'raw'")),
        f if !super::blockdev::QEMU_DRIVERS.contains(&f) => {
            return Err(generic(format!("Unknown file format '{f}'")))
        }
        f => {
            return Err(generic(format!(
                "Snapshot format '{f}' is not supported by livesnapd (only qcow2)"
            )))
        }
    }
    if mode == "absolute-paths" {
        // The mode's promise: the overlay names its backing by absolute path.
        let backing = std::fs::canonicalize(node.filename())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| node.filename());
        create_image(&CreateOptions {
            filename: snapshot_file.clone(),
            format: ImageFormat::Qcow2,
            size: Some(node.size()),
            cluster_size: None,
            backing_file: Some(backing),
            backing_format: Some(node.format_name().to_string()),
        })
        .await
        .map_err(generic)?;
    }
    let mut options = json!({
        "driver": "qcow2",
        "backing": null,
        "file": { "driver": "file", "filename": snapshot_file },
    });
    if let Some(n) = snapshot_node_name {
        options["node-name"] = json!(n);
    }
    let overlay = super::blockdev::add_node(d, options).await?;
    let overlay_name = overlay.name().to_string();
    if let Err(e) = append_overlay(d, node, overlay).await {
        let _ = d.graph.remove(&overlay_name);
        return Err(e);
    }
    Ok(empty())
}
