//! `blockdev-backup` (QEMU's `qapi/block-core.json`, `blockdev.c`
//! `do_backup_common`, `block/backup.c` `backup_job_create`), with
//! `on-cbw-error`, `cbw-timeout` and `x-busy-share` as livesnap extensions
//! (docs/qmp.md).
//!
//! The copy-before-write filter is attached to the source before the reply:
//! the backup is the disk as of this command.

use std::sync::Arc;

use livesnap_block::BlockNode;
use livesnap_jobs::backup::{self, BackupOptions, BackupStart, BackupSync, DEFAULT_BUSY_SHARE};
use livesnap_jobs::block_copy::{cluster_size_for, MAX_WORKERS};
use livesnap_jobs::cbw::{self, CbwDriver, CbwOptions, OnCbwError};
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
#[derive(Default)]
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

pub(super) async fn blockdev_backup(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    // BackupCommon's members in schema order, then BlockdevBackup's own
    // `target`, then livesnap's extensions.
    let job_id = args.opt_str("job-id")?;
    let device = args.req_str("device")?;
    let sync = args.req_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?;
    let speed = args.opt_i64("speed")?;
    let bitmap = args.opt_str("bitmap")?;
    let bitmap_mode = args.opt_enum("bitmap-mode", &["on-success", "never", "always"])?;
    let compress = args.opt_bool("compress")?.unwrap_or(false);
    let on_source_error = opt_on_error(&mut args, "on-source-error")?;
    let on_target_error = opt_on_error(&mut args, "on-target-error")?;
    let auto_finalize = args.opt_bool("auto-finalize")?;
    let auto_dismiss = args.opt_bool("auto-dismiss")?;
    let filter_node_name = args.opt_str("filter-node-name")?;
    let discard_source = args.opt_bool("discard-source")?.unwrap_or(false);
    let perf = parse_perf(&mut args)?;
    let target = args.req_str("target")?;
    let on_cbw_error = args
        .opt_enum("on-cbw-error", OnCbwError::NAMES)?
        .and_then(|s| OnCbwError::parse(&s))
        .unwrap_or_default();
    let cbw_timeout = args.opt_u32("cbw-timeout")?.unwrap_or(0);
    let busy_share = args.opt_f64("x-busy-share")?;
    args.finish()?;
    let busy_share = match busy_share {
        None => DEFAULT_BUSY_SHARE,
        Some(s) if s > 0.0 && s <= 1.0 => s,
        Some(_) => {
            return Err(generic(
                "Parameter 'x-busy-share' expects a number greater than 0 and at most 1",
            ))
        }
    };

    let source = lookup_node(d, &device)?;
    let target = lookup_node(d, &target)?;
    if matches!(sync.as_str(), "bitmap" | "incremental") && bitmap.is_none() {
        return Err(generic(format!(
            "must provide a valid bitmap name for '{sync}' sync mode"
        )));
    }
    // livesnapd has no named dirty bitmaps, so none can be found.
    if let Some(b) = bitmap {
        return Err(generic(format!("Bitmap '{b}' could not be found")));
    }
    if bitmap_mode.is_some() {
        return Err(generic("Cannot specify bitmap sync mode without a bitmap"));
    }
    if let Some(m) = perf.min_cluster_size.filter(|&m| m > i64::MAX as u64) {
        return Err(generic(format!(
            "min-cluster-size too large: {m} > {}",
            i64::MAX
        )));
    }
    let sync = match sync.as_str() {
        "full" => BackupSync::Full,
        "top" => BackupSync::Top,
        _ => BackupSync::None,
    };
    if Arc::ptr_eq(&source, &target) {
        return Err(generic("Source and target cannot be the same"));
    }
    // qcow2 takes compressed writes in QEMU; livesnapd writes them
    // uncompressed (docs/qmp.md). The drive name is empty for nodes.
    if compress && target.driver::<livesnap_block::Qcow2Driver>().is_none() {
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
    if source.size() != target.size() {
        return Err(generic("Source and target image have different sizes"));
    }
    let name = filter_name(d, filter_node_name)?;
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
    let job_id = job_id.unwrap_or_default();
    d.jobs.check_id(&job_id).map_err(generic)?;
    let job_opts = job_options(auto_finalize, auto_dismiss, speed)?;
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
            on_cbw_error,
            cbw_timeout,
            min_cluster_size: perf.min_cluster_size.unwrap_or(0),
            discard_source,
        },
        backup: BackupOptions {
            sync,
            on_source_error,
            on_target_error,
            max_workers: max_workers as usize,
            max_chunk: max_chunk as u64,
            busy_share,
        },
        job: job_opts,
        drain_timeout: DRAIN_TIMEOUT,
    };
    backup::start(&d.graph, &d.jobs, start)
        .await
        .map_err(generic)?;
    Ok(empty())
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
