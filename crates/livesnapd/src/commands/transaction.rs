//! `transaction` (QEMU's `qapi/transaction.json`, `blockdev.c`
//! `qmp_transaction`): every action is read first, so a malformed one fails
//! the command before anything happens; then guest requests on every disk
//! the actions touch are held (bounded, [`DRAIN_TIMEOUT`]), the actions are
//! prepared in order by the engine (`livesnap_jobs::transaction`), and all
//! commit, or all abort when one fails. `completion-mode: grouped` puts the
//! backup jobs into one job transaction.
//!
//! livesnapd offers the actions the issue asks for; `drive-backup` and
//! `blockdev-snapshot-internal-sync` are refused as unknown types
//! (docs/qmp.md).

use std::sync::Arc;

use livesnap_block::{lookup_bitmap, BlockNode};
use livesnap_jobs::exports::Exports;
use livesnap_jobs::transaction::{
    BackupCreated, BitmapAdded, BitmapChanged, BitmapRemoval, BitmapToggled, Prepared, Transaction,
};
use livesnap_qmp::{Args, QmpError};
use serde_json::Value;

use super::backup::{parse_backup, prepare_backup, BackupArgs};
use super::bitmap::{parse_add, parse_bitmap, parse_merge, AddBitmap, BitmapName, MergeBitmaps};
use super::empty;
use super::mirror::{lookup_node, DaemonExports};
use super::snapshot::{
    parse_snapshot, parse_snapshot_sync, SnapshotArgs, SnapshotSyncArgs, DRAIN_TIMEOUT,
};
use crate::daemon::Daemon;

/// The action types livesnapd takes, in the order of QEMU's
/// `TransactionActionKind`.
const TYPES: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
];

/// One action, read.
pub(super) enum Action {
    /// Fails the transaction.
    Abort,
    /// `block-dirty-bitmap-add`.
    BitmapAdd(AddBitmap),
    /// `block-dirty-bitmap-remove`.
    BitmapRemove(BitmapName),
    /// `block-dirty-bitmap-clear`.
    BitmapClear(BitmapName),
    /// `block-dirty-bitmap-enable` (true) or `-disable` (false).
    BitmapEnable(BitmapName, bool),
    /// `block-dirty-bitmap-merge`.
    BitmapMerge(MergeBitmaps),
    /// `blockdev-backup`.
    Backup(Box<BackupArgs>),
    /// `blockdev-snapshot`.
    Snapshot(SnapshotArgs),
    /// `blockdev-snapshot-sync`.
    SnapshotSync(SnapshotSyncArgs),
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

/// Reads one `TransactionAction`: `type`, then `data` as that type's
/// arguments, then nothing else.
fn parse_action(elem: livesnap_qmp::Elem) -> Result<(String, Action), QmpError> {
    let mut a = elem.into_object()?;
    let kind = a.req_enum("type", TYPES)?;
    let data = a.req_object("data")?;
    let action = match kind.as_str() {
        "abort" => {
            data.finish()?;
            Action::Abort
        }
        "block-dirty-bitmap-add" => Action::BitmapAdd(parse_add(data)?),
        "block-dirty-bitmap-remove" => Action::BitmapRemove(parse_bitmap(data)?),
        "block-dirty-bitmap-clear" => Action::BitmapClear(parse_bitmap(data)?),
        "block-dirty-bitmap-enable" => Action::BitmapEnable(parse_bitmap(data)?, true),
        "block-dirty-bitmap-disable" => Action::BitmapEnable(parse_bitmap(data)?, false),
        "block-dirty-bitmap-merge" => Action::BitmapMerge(parse_merge(data)?),
        "blockdev-backup" => {
            let mut data = data;
            let b = parse_backup(&mut data)?;
            data.finish()?;
            Action::Backup(Box::new(b))
        }
        "blockdev-snapshot" => Action::Snapshot(parse_snapshot(data)?),
        "blockdev-snapshot-sync" => Action::SnapshotSync(parse_snapshot_sync(data)?),
        _ => unreachable!("checked against TYPES"),
    };
    a.finish()?;
    Ok((kind, action))
}

pub(super) async fn transaction(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let mut actions = Vec::new();
    for elem in args.req_list("actions")? {
        actions.push(parse_action(elem)?);
    }
    let grouped = match args.opt_object("properties")? {
        None => false,
        Some(mut p) => {
            let mode = p.opt_enum("completion-mode", &["individual", "grouped"])?;
            p.finish()?;
            mode.as_deref() == Some("grouped")
        }
    };
    args.finish()?;
    if grouped {
        // QEMU's JobTxn covers the backup jobs only.
        if let Some((kind, _)) = actions
            .iter()
            .find(|(_, a)| !matches!(a, Action::Backup(_)))
        {
            return Err(generic(format!(
                "Action '{kind}' does not support transaction property completion-mode = grouped"
            )));
        }
    }
    let actions = actions.into_iter().map(|(_, a)| a).collect();
    run(d, actions, grouped, "transaction not run").await
}

impl Action {
    /// The node whose guest writes must stop while the action runs, if it
    /// exists now (a missing one fails the action's own lookup later).
    fn node(&self, d: &Daemon) -> Option<Arc<BlockNode>> {
        match self {
            Action::Abort => None,
            Action::BitmapAdd(a) => d.graph.get(&a.node),
            Action::BitmapRemove(b) | Action::BitmapClear(b) | Action::BitmapEnable(b, _) => {
                d.graph.get(&b.node)
            }
            Action::BitmapMerge(m) => d.graph.get(&m.node),
            Action::Backup(b) => d.graph.get(b.device()),
            Action::Snapshot(s) => s.node(d),
            Action::SnapshotSync(s) => s.node(d),
        }
    }

    /// The action's prepare: QEMU's checks and texts, then the engine's work.
    async fn prepare(
        self,
        d: &Arc<Daemon>,
        tx: &Transaction,
    ) -> Result<Box<dyn Prepared>, QmpError> {
        Ok(match self {
            Action::Abort => return Err(generic("Transaction aborted using Abort action")),
            Action::BitmapAdd(a) => {
                a.apply(d).await?;
                Box::new(BitmapAdded {
                    node: lookup_node(d, &a.node)?,
                    name: a.name,
                })
            }
            Action::BitmapRemove(b) => {
                let node = b.lookup(d)?;
                Box::new(BitmapRemoval::prepare(node, &b.name).map_err(generic)?)
            }
            Action::BitmapClear(b) => {
                let old = b.clear(d)?;
                Box::new(BitmapChanged {
                    node: b.lookup(d)?,
                    name: b.name,
                    old,
                })
            }
            Action::BitmapEnable(b, enabled) => {
                let node = b.lookup(d)?;
                Box::new(
                    BitmapToggled::prepare(node, &b.name, enabled)
                        .await
                        .map_err(generic)?,
                )
            }
            Action::BitmapMerge(m) => {
                let old = m.apply(d).await?;
                Box::new(BitmapChanged {
                    node: lookup_bitmap(&d.graph, &m.node, &m.target).map_err(generic)?,
                    name: m.target,
                    old,
                })
            }
            Action::Backup(b) => {
                Box::new(BackupCreated(prepare_backup(d, *b, tx.job_txn()).await?))
            }
            Action::Snapshot(s) => s.prepare(d, tx).await?,
            Action::SnapshotSync(s) => s.prepare(d, tx).await?,
        })
    }
}

/// Runs `actions` as one transaction: guest requests on their disks held
/// (within [`DRAIN_TIMEOUT`], else the error ends with `not_run`), each
/// prepared in order, then all committed or, if one fails, all undone.
pub(super) async fn run(
    d: &Arc<Daemon>,
    actions: Vec<Action>,
    grouped: bool,
    not_run: &str,
) -> Result<Value, QmpError> {
    let exports = DaemonExports(Arc::downgrade(d));
    let nodes: Vec<Arc<BlockNode>> = actions.iter().filter_map(|a| a.node(d)).collect();
    let backends = nodes
        .iter()
        .flat_map(|n| exports.backends_reaching(n))
        .collect();
    let Some(mut tx) = Transaction::begin(backends, DRAIN_TIMEOUT, grouped).await else {
        let names: Vec<String> = nodes.iter().map(|n| format!("'{}'", n.name())).collect();
        return Err(generic(format!(
            "Requests on {} did not finish within {} s; {not_run}",
            names.join(", "),
            DRAIN_TIMEOUT.as_secs()
        )));
    };
    for action in actions {
        match action.prepare(d, &tx).await {
            Ok(p) => tx.prepared(p),
            Err(e) => {
                tx.abort().await;
                return Err(e);
            }
        }
    }
    tx.commit().await;
    Ok(empty())
}
