//! `blockdev-mirror` (QEMU's `qapi/block-core.json`, `blockdev.c`), with
//! livesnap's `copy-mode: auto` and the completion bounds as `x-` members.

use std::sync::{Arc, Weak};
use std::time::Duration;

use livesnap_block::{BlockBackend, BlockNode, NodeUser};
use livesnap_jobs::exports::Exports;
use livesnap_jobs::mirror::{
    self, CopyMode, MirrorOptions, MirrorSync, MirrorTuning, DEFAULT_BUF_SIZE,
};
use livesnap_jobs::{JobOptions, OnError};
use livesnap_qmp::{Args, QmpError};
use serde_json::Value;

use super::empty;
use crate::daemon::Daemon;

/// The daemon's exports, as the engine sees them (held weakly: jobs live
/// inside the daemon).
pub struct DaemonExports(pub Weak<Daemon>);

impl Exports for DaemonExports {
    fn backends(&self) -> Vec<Arc<BlockBackend>> {
        let Some(d) = self.0.upgrade() else {
            return Vec::new();
        };
        let exports = d.exports.lock().unwrap();
        exports
            .iter()
            .map(|e| e.nbd.config().backend.clone())
            .collect()
    }

    fn pivoted(&self, old: &Arc<BlockNode>, new: &Arc<BlockNode>) {
        let Some(d) = self.0.upgrade() else {
            return;
        };
        for e in d.exports.lock().unwrap().iter() {
            if Arc::ptr_eq(&e.node(), new) {
                let user = NodeUser::Export(e.id.clone());
                old.remove_user(&user);
                new.add_user(user);
            }
        }
    }
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

/// Reads `on-source-error` / `on-target-error`.
pub fn opt_on_error(args: &mut Args, key: &str) -> Result<OnError, QmpError> {
    Ok(args
        .opt_enum(key, OnError::NAMES)?
        .and_then(|s| OnError::parse(&s))
        .unwrap_or_default())
}

/// Looks a node up by name the way `bdrv_lookup_bs(name, name)` does.
pub fn lookup_node(d: &Daemon, name: &str) -> Result<Arc<BlockNode>, QmpError> {
    d.graph.get(name).ok_or_else(|| {
        generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

/// Job options shared by every block job command.
pub fn job_options(
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    speed: Option<i64>,
) -> Result<JobOptions, QmpError> {
    let speed = match speed {
        Some(s) if s < 0 => {
            return Err(generic("Parameter 'speed' expects a non-negative value"));
        }
        s => s.unwrap_or(0) as u64,
    };
    Ok(JobOptions {
        auto_finalize: auto_finalize.unwrap_or(true),
        auto_dismiss: auto_dismiss.unwrap_or(true),
        speed,
    })
}

pub(super) async fn blockdev_mirror(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    // Members in the schema's order, so the first bad one is the one QEMU names.
    let job_id = args.opt_str("job-id")?;
    let device = args.req_str("device")?;
    let target = args.req_str("target")?;
    let replaces = args.opt_str("replaces")?;
    let sync = args.req_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?;
    let speed = args.opt_i64("speed")?;
    let granularity = args.opt_u32("granularity")?;
    let buf_size = args.opt_i64("buf-size")?;
    let on_source_error = opt_on_error(&mut args, "on-source-error")?;
    let on_target_error = opt_on_error(&mut args, "on-target-error")?;
    let filter_node_name = args.opt_str("filter-node-name")?;
    let copy_mode = args.opt_enum("copy-mode", &["background", "write-blocking", "auto"])?;
    let auto_finalize = args.opt_bool("auto-finalize")?;
    let auto_dismiss = args.opt_bool("auto-dismiss")?;
    // livesnap extensions (docs/qmp.md): the completion bounds and the guest's share.
    let defaults = MirrorTuning::default();
    let hold_ms = args.opt_u64("x-completion-hold-ms")?;
    let attempts = args.opt_u32("x-completion-attempts")?;
    let patience_ms = args.opt_u64("x-auto-patience-ms")?;
    let busy_share = args.opt_f64("x-busy-share")?;
    args.finish()?;

    let source = lookup_node(d, &device)?;
    let target = lookup_node(d, &target)?;
    // Checked again when the job starts; here for QEMU's order of errors.
    mirror::check_nodes(&source, &target).map_err(generic)?;
    let job_id = job_id.unwrap_or_default();
    let sync = match sync.as_str() {
        "full" => MirrorSync::Full,
        "top" => MirrorSync::Top,
        "none" => MirrorSync::None,
        other => {
            return Err(generic(format!("Sync mode '{other}' not supported")));
        }
    };
    let granularity = match granularity {
        None => default_granularity(&target),
        Some(g) if !(512..=64 << 20).contains(&g) => {
            return Err(generic(
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            ));
        }
        Some(g) if !g.is_power_of_two() => {
            return Err(generic("Parameter 'granularity' expects a power of 2"));
        }
        Some(g) => g as u64,
    };
    let buf_size = match buf_size {
        Some(b) if b < 0 => {
            return Err(generic("Parameter 'buf-size' expects a non-negative value"));
        }
        Some(0) | None => DEFAULT_BUF_SIZE,
        Some(b) => (b as u64).max(granularity),
    };
    if filter_node_name.is_some() {
        return Err(generic(
            "filter-node-name is not supported by livesnapd (the mirror needs no filter node)",
        ));
    }
    let replaces = match replaces {
        None => source.clone(),
        Some(name) => lookup_node(d, &name)?,
    };
    let job_opts = job_options(auto_finalize, auto_dismiss, speed)?;
    let tuning = MirrorTuning {
        hold: hold_ms.map(Duration::from_millis).unwrap_or(defaults.hold),
        attempts: attempts.unwrap_or(defaults.attempts),
        auto_patience: patience_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.auto_patience),
        busy_share: busy_share.unwrap_or(defaults.busy_share).clamp(0.05, 1.0),
    };
    let copy_mode = copy_mode
        .as_deref()
        .and_then(CopyMode::parse)
        .unwrap_or(d.settings.mirror_copy_mode);
    let opts = MirrorOptions {
        source,
        target: target.clone(),
        replaces,
        sync,
        granularity,
        buf_size,
        copy_mode,
        on_source_error,
        on_target_error,
        tuning,
        exports: Arc::new(DaemonExports(Arc::downgrade(d))),
        users: Vec::new(),
    };
    mirror::start(&d.jobs, &job_id, opts, job_opts).map_err(generic)?;
    Ok(empty())
}

/// QEMU's default: the target's cluster size, at least 4 KiB, or 64 KiB for formats without clusters.
fn default_granularity(target: &BlockNode) -> u64 {
    match target.format_specific() {
        Some(livesnap_block::FormatSpecific::Qcow2(info)) => info.cluster_size.max(4096),
        _ => 64 << 10,
    }
}
