//! The job verbs and queries: `query-jobs`, `job-*`, `query-block-jobs`,
//! `block-job-*` (QEMU's `job-qmp.c` and the `qmp_block_job_*` commands of
//! `blockdev.c`).
//!
//! `job-*` find any job by `id` and answer "Job not found" (GenericError);
//! `block-job-*` find only block jobs, by `device` (or `id` for finalize,
//! dismiss and change), and answer DeviceNotActive "Block job 'X' not
//! found". Arguments are read completely before the job is looked up, as
//! QEMU's visitor does.

use std::sync::Arc;

use livesnap_jobs::Job;
use livesnap_qmp::{Args, ErrorClass, QmpError};
use serde_json::{Map, Value};

use super::empty;
use crate::daemon::Daemon;

/// QEMU's `JobType` members: the values `block-job-change` accepts for `type`.
const JOB_TYPES: &[&str] = &[
    "commit",
    "stream",
    "mirror",
    "backup",
    "create",
    "amend",
    "snapshot-load",
    "snapshot-save",
    "snapshot-delete",
];

/// QEMU's `MirrorCopyMode`, plus livesnap's `auto` (blockdev-mirror's extension).
const COPY_MODES: &[&str] = &["background", "write-blocking", "auto"];

fn job_error(e: livesnap_block::Error) -> QmpError {
    QmpError::generic(e)
}

fn find_job(d: &Daemon, id: &str) -> Result<Arc<Job>, QmpError> {
    d.jobs
        .get(id)
        .ok_or_else(|| QmpError::generic("Job not found"))
}

fn find_block_job(d: &Daemon, id: &str) -> Result<Arc<Job>, QmpError> {
    d.jobs.get(id).filter(|j| j.is_block_job()).ok_or_else(|| {
        QmpError::new(
            ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        )
    })
}

/// Reads the one string member `key` of a command that takes nothing else.
fn only_str(mut args: Args, key: &str) -> Result<String, QmpError> {
    let v = args.req_str(key)?;
    args.finish()?;
    Ok(v)
}

/// `query-jobs`: every job.
pub(super) fn query_jobs(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(Value::Array(
        d.jobs.jobs().iter().map(|j| j.info()).collect(),
    ))
}

/// `query-block-jobs`: the block jobs, in QEMU's `BlockJobInfo`.
pub(super) fn query_block_jobs(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(Value::Array(
        d.jobs
            .jobs()
            .iter()
            .filter(|j| j.is_block_job())
            .map(|j| j.block_info())
            .collect(),
    ))
}

/// `job-pause`.
pub(super) fn job_pause(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_job(d, &only_str(args, "id")?)?;
    job.pause().map_err(job_error)?;
    Ok(empty())
}

/// `job-resume`.
pub(super) fn job_resume(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_job(d, &only_str(args, "id")?)?;
    job.resume().map_err(job_error)?;
    Ok(empty())
}

/// `job-cancel`.
pub(super) async fn job_cancel(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_job(d, &only_str(args, "id")?)?;
    job.cancel(true).await.map_err(job_error)?;
    Ok(empty())
}

/// `job-complete`.
pub(super) fn job_complete(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_job(d, &only_str(args, "id")?)?;
    job.complete().map_err(job_error)?;
    Ok(empty())
}

/// `job-finalize`.
pub(super) async fn job_finalize(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_job(d, &only_str(args, "id")?)?;
    job.finalize().await.map_err(job_error)?;
    Ok(empty())
}

/// `job-dismiss`.
pub(super) fn job_dismiss(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_job(d, &only_str(args, "id")?)?;
    job.dismiss().map_err(job_error)?;
    Ok(empty())
}

/// `block-job-cancel`.
pub(super) async fn block_job_cancel(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let device = args.req_str("device")?;
    let force = args.opt_bool("force")?.unwrap_or(false);
    args.finish()?;
    let job = find_block_job(d, &device)?;
    if job.user_paused() && !force {
        return Err(QmpError::generic(format!(
            "The block job for device '{device}' is currently paused"
        )));
    }
    job.cancel(force).await.map_err(job_error)?;
    Ok(empty())
}

/// `block-job-complete`.
pub(super) fn block_job_complete(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_block_job(d, &only_str(args, "device")?)?;
    job.complete().map_err(job_error)?;
    Ok(empty())
}

/// `block-job-pause`.
pub(super) fn block_job_pause(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_block_job(d, &only_str(args, "device")?)?;
    job.pause().map_err(job_error)?;
    Ok(empty())
}

/// `block-job-resume`.
pub(super) fn block_job_resume(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_block_job(d, &only_str(args, "device")?)?;
    job.resume().map_err(job_error)?;
    Ok(empty())
}

/// `block-job-set-speed`.
pub(super) fn block_job_set_speed(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let device = args.req_str("device")?;
    let speed = args.req_i64("speed")?;
    args.finish()?;
    let job = find_block_job(d, &device)?;
    job.set_speed(speed).map_err(job_error)?;
    Ok(empty())
}

/// `block-job-change`.
pub(super) fn block_job_change(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let id = args.req_str("id")?;
    let kind = args.req_enum("type", JOB_TYPES)?;
    // A union on `type`: only `mirror` has members (QEMU 10.0). The
    // type is not checked against the job's own (nor does QEMU).
    let mut options = Map::new();
    if kind == "mirror" {
        let mode = args.req_enum("copy-mode", COPY_MODES)?;
        options.insert("copy-mode".into(), Value::String(mode));
    }
    args.finish()?;
    let job = find_block_job(d, &id)?;
    job.change(&options).map_err(job_error)?;
    Ok(empty())
}

/// `block-job-finalize`.
pub(super) async fn block_job_finalize(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_block_job(d, &only_str(args, "id")?)?;
    job.finalize().await.map_err(job_error)?;
    Ok(empty())
}

/// `block-job-dismiss`.
pub(super) fn block_job_dismiss(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let job = find_block_job(d, &only_str(args, "id")?)?;
    job.dismiss().map_err(job_error)?;
    Ok(empty())
}
