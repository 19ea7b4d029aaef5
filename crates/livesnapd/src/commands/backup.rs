//! `blockdev-backup` (QEMU's `qapi/block-core.json`, `blockdev.c`
//! `do_backup_common`, `block/backup.c` `backup_job_create`), with
//! `on-cbw-error`, `cbw-timeout` and `x-busy-share` as livesnap extensions
//! (docs/qmp.md).
//!
//! The copy-before-write filter is attached to the source before the reply:
//! the backup is the disk as of this command.

use std::sync::Arc;

use livesnap_block::{BlockNode, Use};
use livesnap_jobs::backup::{
    self, BackupOptions, BackupStart, BackupSync, BitmapMode, SyncBitmap, DEFAULT_BUSY_SHARE,
};
use livesnap_jobs::block_copy::{cluster_size_for, MAX_WORKERS};
use livesnap_jobs::cbw::{self, CbwDriver, CbwOptions, OnCbwError};
use livesnap_jobs::{Job, JobTxn, OnError};
use livesnap_qmp::{Args, QmpError};
use serde_json::Value;

use super::empty;
use super::mirror::{job_options, lookup_node, opt_on_error};
use super::snapshot::DRAIN_TIMEOUT;
use crate::daemon::Daemon;

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

/// QEMU's `BackupPerf` (`x-perf`).
#[derive(Clone, Copy, Default)]
struct Perf {
    max_workers: Option<i64>,
    max_chunk: Option<i64>,
    min_cluster_size: Option<u64>,
}

fn parse_perf(args: &mut Args) -> Result<Perf, QmpError> {
    let Some(mut p) = args.opt_object("x-perf")? else {
        return Ok(Perf::default());
    };
    // use-copy-range is accepted and has no effect: copies are read + write.
    p.opt_bool("use-copy-range")?;
    let perf = Perf {
        max_workers: p.opt_i64("max-workers")?,
        max_chunk: p.opt_i64("max-chunk")?,
        min_cluster_size: p.opt_u64("min-cluster-size")?,
    };
    p.finish()?;
    Ok(perf)
}

/// The filter node's name, checked in the order of QEMU's `bdrv_open_common`.
fn filter_name(d: &Daemon, name: Option<String>) -> Result<String, QmpError> {
    d.graph
        .claim_name(name.as_deref())
        .map_err(|e| generic(e.context("Could not create node")))
}

/// `blockdev-backup`'s arguments as read (QEMU's `BlockdevBackup`), before
/// anything is looked up: a `transaction` reads every action first.
pub(super) struct BackupArgs {
    job_id: Option<String>,
    device: String,
    sync: String,
    speed: Option<i64>,
    bitmap: Option<String>,
    bitmap_mode: Option<BitmapMode>,
    compress: bool,
    on_source_error: OnError,
    on_target_error: OnError,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    filter_node_name: Option<String>,
    discard_source: bool,
    perf: Perf,
    target: String,
    on_cbw_error: OnCbwError,
    cbw_timeout: u32,
    busy_share: Option<f64>,
}

impl BackupArgs {
    /// The node backed up, by name.
    pub(super) fn device(&self) -> &str {
        &self.device
    }
}

/// Reads `blockdev-backup`'s members (the caller checks for extra ones).
pub(super) fn parse_backup(args: &mut Args) -> Result<BackupArgs, QmpError> {
    // BackupCommon's members in schema order, then BlockdevBackup's own
    // `target`, then livesnap's extensions.
    Ok(BackupArgs {
        job_id: args.opt_str("job-id")?,
        device: args.req_str("device")?,
        sync: args.req_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?,
        speed: args.opt_i64("speed")?,
        bitmap: args.opt_str("bitmap")?,
        bitmap_mode: args
            .opt_enum("bitmap-mode", BitmapMode::NAMES)?
            .and_then(|m| BitmapMode::parse(&m)),
        compress: args.opt_bool("compress")?.unwrap_or(false),
        on_source_error: opt_on_error(args, "on-source-error")?,
        on_target_error: opt_on_error(args, "on-target-error")?,
        auto_finalize: args.opt_bool("auto-finalize")?,
        auto_dismiss: args.opt_bool("auto-dismiss")?,
        filter_node_name: args.opt_str("filter-node-name")?,
        discard_source: args.opt_bool("discard-source")?.unwrap_or(false),
        perf: parse_perf(args)?,
        target: args.req_str("target")?,
        // break-snapshot unless asked otherwise: a failing backup target
        // must not fail the guest's writes (docs/decisions.md).
        on_cbw_error: args
            .opt_enum("on-cbw-error", OnCbwError::NAMES)?
            .and_then(|s| OnCbwError::parse(&s))
            .unwrap_or(OnCbwError::BreakSnapshot),
        cbw_timeout: args.opt_u32("cbw-timeout")?.unwrap_or(0),
        busy_share: args.opt_f64("x-busy-share")?,
    })
}

pub(super) async fn blockdev_backup(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let a = parse_backup(&mut args)?;
    args.finish()?;
    let job = prepare_backup(d, a, None).await?;
    job.start();
    Ok(empty())
}

/// QEMU's rules for `sync`, `bitmap` and `bitmap-mode` (`do_backup_common`),
/// in its order: `incremental` becomes `bitmap` with `on-success`.
fn sync_bitmap(
    source: &BlockNode,
    sync: &str,
    bitmap: Option<String>,
    mode: Option<BitmapMode>,
) -> Result<(BackupSync, Option<SyncBitmap>), QmpError> {
    if matches!(sync, "bitmap" | "incremental") && bitmap.is_none() {
        return Err(generic(format!(
            "must provide a valid bitmap name for '{sync}' sync mode"
        )));
    }
    let (sync, mode) = match sync {
        "incremental" => match mode {
            None | Some(BitmapMode::OnSuccess) => ("bitmap", Some(BitmapMode::OnSuccess)),
            Some(_) => {
                return Err(generic(
                    "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
                ))
            }
        },
        s => (s, mode),
    };
    let backup_sync = match sync {
        "full" => BackupSync::Full,
        "top" => BackupSync::Top,
        "bitmap" => BackupSync::Bitmap,
        _ => BackupSync::None,
    };
    let Some(name) = bitmap else {
        if mode.is_some() {
            return Err(generic("Cannot specify bitmap sync mode without a bitmap"));
        }
        return Ok((backup_sync, None));
    };
    if source.bitmaps().get(&name).is_none() {
        return Err(generic(format!("Bitmap '{name}' could not be found")));
    }
    let Some(mode) = mode else {
        return Err(generic(
            "Bitmap sync mode must be given when providing a bitmap",
        ));
    };
    source
        .bitmaps()
        .checked(&name, Use::Read)
        .map_err(generic)?;
    if backup_sync == BackupSync::None {
        return Err(generic(format!(
            "sync mode '{sync}' does not produce meaningful bitmap outputs"
        )));
    }
    if mode == BitmapMode::Never && backup_sync != BackupSync::Bitmap {
        return Err(generic(format!(
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync}'"
        )));
    }
    Ok((backup_sync, Some(SyncBitmap { name, mode })))
}

/// Checks a backup as QEMU's `do_backup_common` and `backup_job_create` do,
/// in their order, and creates its job (in `txn` for grouped completion)
/// with the filter attached: the backup is the disk as of this call. The
/// job is not started.
pub(super) async fn prepare_backup(
    d: &Arc<Daemon>,
    a: BackupArgs,
    txn: Option<&Arc<JobTxn>>,
) -> Result<Arc<Job>, QmpError> {
    let busy_share = match a.busy_share {
        None => DEFAULT_BUSY_SHARE,
        Some(s) if s > 0.0 && s <= 1.0 => s,
        Some(_) => {
            return Err(generic(
                "Parameter 'x-busy-share' expects a number greater than 0 and at most 1",
            ))
        }
    };
    let perf = a.perf;
    let source = lookup_node(d, &a.device)?;
    let target = lookup_node(d, &a.target)?;
    let (sync, bitmap) = sync_bitmap(&source, &a.sync, a.bitmap, a.bitmap_mode)?;
    if let Some(m) = perf.min_cluster_size.filter(|&m| m > i64::MAX as u64) {
        return Err(generic(format!(
            "min-cluster-size too large: {m} > {}",
            i64::MAX
        )));
    }
    if Arc::ptr_eq(&source, &target) {
        return Err(generic("Source and target cannot be the same"));
    }
    // qcow2 takes compressed writes in QEMU; livesnapd writes them
    // uncompressed (docs/qmp.md). The drive name is empty for nodes.
    if a.compress && target.driver::<livesnap_block::Qcow2Driver>().is_none() {
        return Err(generic("Compression is not supported for this drive "));
    }
    source.check_not_blocked().map_err(generic)?;
    target.check_not_blocked().map_err(generic)?;
    let max_workers = perf.max_workers.unwrap_or(MAX_WORKERS as i64);
    if !(1..=i32::MAX as i64).contains(&max_workers) {
        return Err(generic(format!(
            "max-workers must be between 1 and {}",
            i32::MAX
        )));
    }
    let max_chunk = perf.max_chunk.unwrap_or(0);
    if max_chunk < 0 {
        return Err(generic(
            "max-chunk must be zero (which means no limit) or positive",
        ));
    }
    if let Some(b) = &bitmap {
        backup::check_bitmap(&source, b).map_err(generic)?;
    }
    if source.size() != target.size() {
        return Err(generic("Source and target image have different sizes"));
    }
    let name = filter_name(d, a.filter_node_name)?;
    let cluster = cluster_size_for(&target, perf.min_cluster_size.unwrap_or(0)).map_err(|e| {
        generic(format!(
            "Could not create node: Cannot create block-copy-state: {e}"
        ))
    })?;
    if max_chunk != 0 && (max_chunk as u64) < cluster {
        return Err(generic(format!(
            "Required max-chunk ({max_chunk}) is less than backup cluster size ({cluster})"
        )));
    }
    // QEMU names the job after the device's BlockBackend, which a node has not.
    let job_id = a.job_id.unwrap_or_default();
    d.jobs.check_id(&job_id).map_err(generic)?;
    let job_opts = job_options(a.auto_finalize, a.auto_dismiss, a.speed)?;
    if target.read_only() {
        return Err(generic(format!(
            "Block node '{}' is read-only",
            target.name()
        )));
    }

    let start = BackupStart {
        job_id,
        source,
        target,
        filter_name: name,
        cbw: CbwOptions {
            on_cbw_error: a.on_cbw_error,
            cbw_timeout: a.cbw_timeout,
            min_cluster_size: perf.min_cluster_size.unwrap_or(0),
            discard_source: a.discard_source,
        },
        backup: BackupOptions {
            sync,
            on_source_error: a.on_source_error,
            on_target_error: a.on_target_error,
            max_workers: max_workers as usize,
            max_chunk: max_chunk as u64,
            busy_share,
        },
        bitmap,
        job: job_opts,
        drain_timeout: DRAIN_TIMEOUT,
    };
    backup::prepare(&d.graph, &d.jobs, start, txn)
        .await
        .map_err(generic)
}

/// The child a filter node shows as its backing image in
/// `query-named-block-nodes` (QEMU's `bdrv_filter_or_cow_bs`).
pub(super) fn filtered_child(node: &BlockNode) -> Option<Arc<BlockNode>> {
    node.driver::<CbwDriver>()?;
    node.children()
        .into_iter()
        .find(|c| c.role == "file")
        .map(|c| c.node)
}

/// What QEMU's `BlockDeviceInfo` has for the filter drivers beyond the
/// common members: a snapshot-access image without `dirty-flag` (its
/// driver has no info).
pub(super) fn filter_node_info(node: &BlockNode, info: &mut Value) {
    if node
        .driver::<livesnap_jobs::snapshot_access::SnapshotAccessDriver>()
        .is_some()
    {
        if let Some(image) = info["image"].as_object_mut() {
            image.shift_remove("dirty-flag");
        }
    }
}

/// A copy-before-write node's internal dirty bitmaps as QEMU lists them
/// (unnamed, after any named one); none for other nodes.
pub(super) fn filter_bitmaps(node: &BlockNode) -> Vec<Value> {
    let Some(cbw) = cbw::cbw_of(node) else {
        return Vec::new();
    };
    cbw.bitmap_counts()
        .iter()
        .map(|&(granularity, count)| {
            serde_json::json!({
                "recording": false,
                "persistent": false,
                "busy": false,
                "granularity": granularity,
                "count": count,
            })
        })
        .collect()
}
