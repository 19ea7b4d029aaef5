//! External snapshots: `blockdev-snapshot` and `blockdev-snapshot-sync`
//! (QEMU's `external_snapshot_action` in `blockdev.c`), which are also
//! `transaction` actions; the engine's `snapshot` module does the work.
//!
//! The overlay gets the node as its backing and takes its place under every
//! export; the old node is flushed and frozen read-only. No data is copied,
//! so the snapshot is instant and exactly the disk at the swap. As in QEMU,
//! each command is a transaction of one action.

use std::sync::Arc;
use std::time::Duration;

use livesnap_block::{create_image, BackendHold, BlockNode, CreateOptions, ImageFormat};
use livesnap_jobs::job::JobFuture;
use livesnap_jobs::snapshot::{self, Appended};
use livesnap_jobs::transaction::{Prepared, Transaction};
use livesnap_qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::mirror::DaemonExports;
use super::transaction::{self, Action};
use crate::daemon::Daemon;

/// Longest wait for requests in flight on the nodes before a snapshot, a
/// backup's filter or a transaction's actions go on.
///
/// A request stuck longer than this (a dead NFS server, say) fails the
/// operation instead of hanging the monitor: every operation is bounded.
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

/// `blockdev-snapshot`'s arguments (QEMU's `BlockdevSnapshot`).
pub(super) struct SnapshotArgs {
    node: String,
    overlay: String,
}

/// Reads `blockdev-snapshot`'s arguments.
pub(super) fn parse_snapshot(mut args: Args) -> Result<SnapshotArgs, QmpError> {
    let node = args.req_str("node")?;
    let overlay = args.req_str("overlay")?;
    args.finish()?;
    Ok(SnapshotArgs { node, overlay })
}

/// `blockdev-snapshot-sync`'s arguments (QEMU's `BlockdevSnapshotSync`).
pub(super) struct SnapshotSyncArgs {
    device: Option<String>,
    node_name: Option<String>,
    snapshot_file: String,
    snapshot_node_name: Option<String>,
    format: String,
    mode: String,
}

/// Reads `blockdev-snapshot-sync`'s arguments.
pub(super) fn parse_snapshot_sync(mut args: Args) -> Result<SnapshotSyncArgs, QmpError> {
    let device = args.opt_str("device")?;
    let node_name = args.opt_str("node-name")?;
    let snapshot_file = args.req_str("snapshot-file")?;
    let snapshot_node_name = args.opt_str("snapshot-node-name")?;
    let format = args.opt_str("format")?.unwrap_or_else(|| "qcow2".into());
    let mode = args
        .opt_enum("mode", &["existing", "absolute-paths"])?
        .unwrap_or_else(|| "absolute-paths".into());
    args.finish()?;
    Ok(SnapshotSyncArgs {
        device,
        node_name,
        snapshot_file,
        snapshot_node_name,
        format,
        mode,
    })
}

impl SnapshotArgs {
    /// The node snapshotted, if it exists (its exports are held).
    pub(super) fn node(&self, d: &Daemon) -> Option<Arc<BlockNode>> {
        d.graph.get(&self.node)
    }

    /// Puts the overlay over the node; checks in QEMU's order.
    pub(super) async fn prepare(
        &self,
        d: &Arc<Daemon>,
        tx: &Transaction,
    ) -> Result<Box<dyn Prepared>, QmpError> {
        let node = find(d, &self.node)?;
        snapshot::check_node(&d.graph, &node)
            .await
            .map_err(generic)?;
        let overlay = find(d, &self.overlay)?;
        let appended = append(d, node, overlay, tx.holds())?;
        Ok(Box::new(appended))
    }
}

fn append(
    d: &Arc<Daemon>,
    node: Arc<BlockNode>,
    overlay: Arc<BlockNode>,
    holds: &[BackendHold],
) -> Result<Appended, QmpError> {
    let exports = Arc::new(DaemonExports(Arc::downgrade(d)));
    snapshot::append(&d.graph, exports, node, overlay, holds).map_err(generic)
}

impl SnapshotSyncArgs {
    /// The node snapshotted, if it exists (its exports are held).
    pub(super) fn node(&self, d: &Daemon) -> Option<Arc<BlockNode>> {
        // QEMU looks `device` up as a BlockBackend name; livesnapd has none
        // and takes a node name there too (docs/qmp.md), then `node-name`.
        self.device
            .as_deref()
            .and_then(|n| d.graph.get(n))
            .or_else(|| self.node_name.as_deref().and_then(|n| d.graph.get(n)))
    }

    /// Creates (unless `existing`) and opens the overlay, and puts it over
    /// the node; checks in QEMU's order. On abort the overlay node goes
    /// again; a file created stays, as in QEMU.
    pub(super) async fn prepare(
        &self,
        d: &Arc<Daemon>,
        tx: &Transaction,
    ) -> Result<Box<dyn Prepared>, QmpError> {
        let node = self.node(d).ok_or_else(|| {
            generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                self.device.as_deref().unwrap_or(""),
                self.node_name.as_deref().unwrap_or("")
            ))
        })?;
        snapshot::check_node(&d.graph, &node)
            .await
            .map_err(generic)?;
        // Before the file is created (or truncated).
        if self.node_name.is_some() && self.snapshot_node_name.is_none() {
            return Err(generic("New overlay node-name missing"));
        }
        if let Some(n) = &self.snapshot_node_name {
            if d.graph.get(n).is_some() {
                return Err(generic("New overlay node-name already in use"));
            }
        }
        match self.format.as_str() {
            "qcow2" => {}
            // QEMU's texts: creating a raw overlay fails, an existing one
            // cannot take a backing file.
            "raw" if self.mode == "existing" => {
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
        if self.mode == "absolute-paths" {
            // The mode's promise: the overlay names its backing by absolute path.
            let backing = std::fs::canonicalize(node.filename())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| node.filename());
            create_image(&CreateOptions {
                filename: self.snapshot_file.clone(),
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
            "file": { "driver": "file", "filename": self.snapshot_file },
        });
        if let Some(n) = &self.snapshot_node_name {
            options["node-name"] = json!(n);
        }
        let overlay = super::blockdev::add_node(d, options).await?;
        match append(d, node, overlay.clone(), tx.holds()) {
            Ok(appended) => Ok(Box::new(OpenedOverlay {
                appended,
                daemon: d.clone(),
                overlay,
            })),
            Err(e) => {
                close_overlay(d, &overlay).await;
                Err(e)
            }
        }
    }
}

/// Takes an overlay the action opened out of the graph again.
async fn close_overlay(d: &Daemon, overlay: &BlockNode) {
    if d.graph.remove(overlay.name()).is_ok() {
        overlay.close().await;
    }
}

/// A snapshot whose overlay the action opened itself: it is closed again
/// if the transaction aborts.
struct OpenedOverlay {
    appended: Appended,
    daemon: Arc<Daemon>,
    overlay: Arc<BlockNode>,
}

impl Prepared for OpenedOverlay {
    fn commit<'a>(self: Box<Self>, holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::new(self.appended).commit(holds)
    }

    fn abort<'a>(self: Box<Self>, holds: &'a [BackendHold]) -> JobFuture<'a, ()> {
        Box::pin(async move {
            Box::new(self.appended).abort(holds).await;
            close_overlay(&self.daemon, &self.overlay).await;
        })
    }
}

pub(super) async fn blockdev_snapshot(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let action = Action::Snapshot(parse_snapshot(args)?);
    transaction::run(d, vec![action], false, "snapshot not taken").await
}

pub(super) async fn blockdev_snapshot_sync(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let action = Action::SnapshotSync(parse_snapshot_sync(args)?);
    transaction::run(d, vec![action], false, "snapshot not taken").await
}
