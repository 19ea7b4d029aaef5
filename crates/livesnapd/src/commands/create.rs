//! `blockdev-create` (QEMU's `qmp_blockdev_create` in `block/create.c`,
//! `BlockdevCreateOptions` in `qapi/block-core.json`).
//!
//! The arguments are read completely, then the driver is checked, then the
//! job is created; everything QEMU checks inside `bdrv_co_create` (sizes,
//! cluster sizes, the `file` node) fails the job instead, with QEMU's texts
//! in `query-jobs`. Drivers: `file` and `qcow2`; the way libvirt uses them
//! is create file → blockdev-add file → create qcow2 on that node →
//! blockdev-add qcow2.

use std::sync::Arc;

use livesnap_block::{FileCreateOptions, Prealloc, Qcow2CreateOptions};
use livesnap_jobs::create::{CreateJob, CreateWork, OpenNode, OpenedNode, CREATE_JOB_OPTIONS};
use livesnap_qmp::{Args, QmpError};
use serde_json::Value;

use super::blockdev::QEMU_DRIVERS;
use super::empty;
use crate::daemon::Daemon;

/// Drivers whose `BlockdevCreateOptions` branch has members: QEMU can create
/// these, livesnapd only `file` and `qcow2`.
const CREATE_DRIVERS: &[&str] = &[
    "file",
    "gluster",
    "luks",
    "nfs",
    "parallels",
    "qcow",
    "qcow2",
    "qed",
    "rbd",
    "ssh",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
];

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

fn opt_prealloc(o: &mut Args) -> Result<Prealloc, QmpError> {
    Ok(o.opt_enum("preallocation", Prealloc::NAMES)?
        .map(|p| Prealloc::parse(&p).expect("checked against NAMES"))
        .unwrap_or_default())
}

/// QEMU's `BlockdevCreateOptionsFile`.
fn parse_file(o: &mut Args) -> Result<CreateWork, QmpError> {
    let filename = o.req_str("filename")?;
    let size = o.req_u64("size")?;
    let preallocation = opt_prealloc(o)?;
    let nocow = o.opt_bool("nocow")?.unwrap_or(false);
    let extent_size_hint = o.opt_u64("extent-size-hint")?;
    Ok(CreateWork::File(FileCreateOptions {
        filename,
        size,
        preallocation,
        nocow,
        extent_size_hint,
    }))
}

/// The `file` member of a format: a node name, looked up when the job runs,
/// or inline options, opened then as an unnamed node that goes with the job.
fn node_source(d: &Arc<Daemon>, file: Value) -> OpenNode {
    let d = d.clone();
    Box::new(move || {
        Box::pin(async move {
            match file {
                Value::String(name) => {
                    let node = d.graph.get(&name).ok_or_else(|| {
                        livesnap_block::Error::not_found(format!(
                            "Cannot find device='{name}' nor node-name='{name}'"
                        ))
                    })?;
                    Ok(OpenedNode {
                        node,
                        release: None,
                    })
                }
                options => {
                    let node = super::blockdev::add_node(&d, options)
                        .await
                        .map_err(|e| livesnap_block::Error::invalid(e.desc))?;
                    let name = node.name().to_string();
                    let graph_owner = d.clone();
                    Ok(OpenedNode {
                        node,
                        release: Some(Box::new(move || {
                            let _ = graph_owner.graph.remove(&name);
                        })),
                    })
                }
            }
        })
    })
}

/// QEMU's `BlockdevCreateOptionsQcow2`, in schema order.
fn parse_qcow2(d: &Arc<Daemon>, o: &mut Args) -> Result<CreateWork, QmpError> {
    let file = match o.take_value("file") {
        None => return Err(o.missing("file")),
        Some(v @ (Value::String(_) | Value::Object(_))) => v,
        // QEMU names the alternate by its bare member name here.
        Some(_) => {
            return Err(generic(
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ))
        }
    };
    let data_file = match o.take_value("data-file") {
        None => false,
        Some(Value::String(_) | Value::Object(_)) => true,
        Some(_) => {
            return Err(generic(
                "Invalid parameter type for 'data-file', expected: BlockdevRef",
            ))
        }
    };
    let data_file_raw = o.opt_bool("data-file-raw")?.unwrap_or(false);
    let extended_l2 = o.opt_bool("extended-l2")?.unwrap_or(false);
    let size = o.req_u64("size")?;
    let version = o
        .opt_enum("version", &["v2", "v3"])?
        .map(|v| if v == "v2" { 2 } else { 3 });
    let backing_file = o.opt_str("backing-file")?;
    let backing_fmt = o.opt_enum("backing-fmt", QEMU_DRIVERS)?;
    let encrypt = o.take_value("encrypt").is_some();
    let cluster_size = o.opt_u64("cluster-size")?;
    let preallocation = opt_prealloc(o)?;
    let lazy_refcounts = o.opt_bool("lazy-refcounts")?.unwrap_or(false);
    let refcount_bits = o.opt_i64("refcount-bits")?;
    let compression = o.opt_enum("compression-type", &["zlib", "zstd"])?;
    // What livesnapd's qcow2 driver cannot open, refused before a job exists.
    if data_file {
        return Err(generic(
            "External data files are not supported by livesnapd",
        ));
    }
    if extended_l2 {
        return Err(generic(
            "Extended L2 entries are not supported by livesnapd",
        ));
    }
    if encrypt {
        return Err(generic(
            "Encrypted qcow2 images are not supported by livesnapd",
        ));
    }
    if compression.as_deref() == Some("zstd") {
        return Err(generic(
            "qcow2 compression type 'zstd' is not supported by livesnapd",
        ));
    }
    Ok(CreateWork::Qcow2 {
        file: node_source(d, file),
        opts: Qcow2CreateOptions {
            size,
            version,
            backing_file,
            backing_fmt,
            cluster_size,
            preallocation,
            lazy_refcounts,
            refcount_bits,
            data_file_raw,
        },
    })
}

pub(super) async fn blockdev_create(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let job_id = args.req_str("job-id")?;
    let mut o = args.req_object("options")?;
    let driver = o.req_enum("driver", QEMU_DRIVERS)?;
    let work = match driver.as_str() {
        "file" => Some(parse_file(&mut o)?),
        "qcow2" => Some(parse_qcow2(d, &mut o)?),
        other if CREATE_DRIVERS.contains(&other) => {
            return Err(generic(format!(
            "Driver '{other}' is not supported by livesnapd blockdev-create (only file and qcow2)"
        )))
        }
        // Every other branch is empty.
        _ => None,
    };
    o.finish()?;
    args.finish()?;
    let Some(work) = work else {
        return Err(generic("Driver does not support blockdev-create"));
    };
    d.jobs
        .spawn(&job_id, CreateJob::new(work), CREATE_JOB_OPTIONS)
        .map_err(generic)?;
    Ok(empty())
}
