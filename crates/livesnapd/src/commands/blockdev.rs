//! `blockdev-add`, `blockdev-del`, `query-named-block-nodes` (QEMU's
//! `blockdev.c` and `qapi/block-core.json`).
//!
//! Arguments are parsed into [`BlockdevOptions`] in full before anything is
//! opened, so a bad argument anywhere in an inline tree is reported the way
//! QEMU's visitor reports it and nothing is left half-created.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use livesnap_block::{
    BackingOption, BlockNode, BlockdevOptions, BlockdevRef, DriverOptions, FileAio, FileDriver,
    FormatSpecific, Locking, Qcow2Cache,
};
use livesnap_qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::empty;
use crate::daemon::Daemon;

/// Every driver name of QEMU's `BlockdevDriver` enum; those livesnapd lacks get a clear error.
pub(super) const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Drivers livesnapd implements.
const DRIVERS: &[&str] = &[
    "file",
    "raw",
    "qcow2",
    "blkdebug",
    "copy-before-write",
    "snapshot-access",
];

/// QEMU's `Qcow2OverlapCheckMode`.
const OVERLAP_MODES: &[&str] = &["none", "constant", "cached", "all"];

/// Reads QEMU's `Qcow2OverlapChecks` alternate (a mode or a set of flags);
/// accepted and ignored.
fn parse_overlap_check(args: &mut Args) -> Result<(), QmpError> {
    match args.take_value("overlap-check") {
        None => Ok(()),
        Some(Value::String(mode)) if OVERLAP_MODES.contains(&mode.as_str()) => Ok(()),
        Some(Value::String(mode)) => Err(generic(format!(
            "Parameter 'overlap-check' does not accept value '{mode}'"
        ))),
        Some(Value::Object(map)) => {
            let mut flags = args.nested("overlap-check", map);
            flags.opt_enum("template", OVERLAP_MODES)?;
            for key in [
                "main-header",
                "active-l1",
                "active-l2",
                "refcount-table",
                "refcount-block",
                "snapshot-table",
                "inactive-l1",
                "inactive-l2",
                "bitmap-directory",
            ] {
                flags.opt_bool(key)?;
            }
            flags.finish()
        }
        Some(_) => Err(args.invalid_type("overlap-check", "Qcow2OverlapChecks")),
    }
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

fn parse_ref(args: &mut Args, key: &str) -> Result<BlockdevRef, QmpError> {
    let path = args.path_of(key);
    match args.take_value(key) {
        None => Err(generic(format!("Parameter '{path}' is missing"))),
        Some(v) => parse_ref_value(args, key, v, "BlockdevRef"),
    }
}

fn parse_ref_value(
    args: &Args,
    key: &str,
    value: Value,
    expected: &str,
) -> Result<BlockdevRef, QmpError> {
    match value {
        Value::String(name) => Ok(BlockdevRef::Reference(name)),
        Value::Object(map) => {
            let mut child = args.nested(key, map);
            let opts = parse_options(&mut child)?;
            child.finish()?;
            Ok(BlockdevRef::Inline(Box::new(opts)))
        }
        _ => Err(generic(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            args.path_of(key)
        ))),
    }
}

/// Reads QEMU's `BlockdevOptionsQcow2` members after `driver` and the common ones.
fn parse_qcow2(args: &mut Args) -> Result<DriverOptions, QmpError> {
    let file = parse_ref(args, "file")?;
    let backing = match args.take_value("backing") {
        None => BackingOption::FromHeader,
        Some(Value::Null) => BackingOption::Null,
        Some(v) => BackingOption::Node(parse_ref_value(args, "backing", v, "BlockdevRefOrNull")?),
    };
    // In schema order; all but l2-cache-size accepted for compatibility
    // and ignored once checked: see docs/qmp.md.
    let lazy_refcounts = args.opt_bool("lazy-refcounts")?.unwrap_or(false);
    for key in [
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
        "discard-no-unref",
    ] {
        args.opt_bool(key)?;
    }
    parse_overlap_check(args)?;
    let cache = Qcow2Cache {
        cache_size: args.opt_i64("cache-size")?,
        l2_cache_size: args.opt_i64("l2-cache-size")?,
        l2_cache_entry_size: args.opt_i64("l2-cache-entry-size")?,
        refcount_cache_size: args.opt_i64("refcount-cache-size")?,
        cache_clean_interval: args.opt_i64("cache-clean-interval")?,
        lazy_refcounts,
    };
    if args.take_value("encrypt").is_some() {
        return Err(generic(
            "Encrypted qcow2 images are not supported by livesnapd",
        ));
    }
    if args.take_value("data-file").is_some() {
        return Err(generic(
            "External data files are not supported by livesnapd",
        ));
    }
    Ok(DriverOptions::Qcow2 {
        file,
        backing,
        cache,
    })
}

/// Reads QEMU's `BlockdevOptionsCbw` members after `driver` and the common ones.
fn parse_cbw(args: &mut Args) -> Result<DriverOptions, QmpError> {
    use livesnap_jobs::cbw::{CbwOpenOptions, CbwOptions, OnCbwError};
    let file = parse_ref(args, "file")?;
    let target = parse_ref(args, "target")?;
    let bitmap = match args.opt_object("bitmap")? {
        None => None,
        Some(mut b) => {
            let node = b.req_str("node")?;
            let name = b.req_str("name")?;
            b.finish()?;
            Some((node, name))
        }
    };
    let on_cbw_error = args
        .opt_enum("on-cbw-error", OnCbwError::NAMES)?
        .and_then(|s| OnCbwError::parse(&s))
        .unwrap_or_default();
    let cbw_timeout = args.opt_u32("cbw-timeout")?.unwrap_or(0);
    let min_cluster_size = args.opt_u64("min-cluster-size")?.unwrap_or(0);
    Ok(DriverOptions::Registered {
        driver: "copy-before-write".into(),
        file: Some(file),
        children: vec![("target", target)],
        options: Box::new(CbwOpenOptions {
            opts: CbwOptions {
                on_cbw_error,
                cbw_timeout,
                min_cluster_size,
                discard_source: false,
            },
            bitmap,
            drain_timeout: super::snapshot::DRAIN_TIMEOUT,
        }),
    })
}

/// Reads one `BlockdevOptions` object; the caller calls `finish`.
fn parse_options(args: &mut Args) -> Result<BlockdevOptions, QmpError> {
    let driver = args.req_str("driver")?;
    if !QEMU_DRIVERS.contains(&driver.as_str()) {
        // Enum errors name the bare member, even nested (QEMU's visitor).
        return Err(generic(format!(
            "Parameter 'driver' does not accept value '{driver}'"
        )));
    }
    // The members of QEMU's BlockdevOptions base, in schema order.
    let node_name = args.opt_str("node-name")?;
    args.opt_enum("discard", &["ignore", "unmap"])?;
    let mut cache_direct = None;
    if let Some(mut cache) = args.opt_object("cache")? {
        cache_direct = cache.opt_bool("direct")?;
        cache.opt_bool("no-flush")?;
        cache.finish()?;
    }
    let active = args.opt_bool("active")?;
    let read_only = args.opt_bool("read-only")?;
    // Accepted for compatibility with what libvirt sends; see docs/qmp.md.
    args.opt_bool("auto-read-only")?;
    let force_share = args.opt_bool("force-share")?;
    let detect_zeroes = args.opt_enum("detect-zeroes", &["off", "on", "unmap"])?;
    if !DRIVERS.contains(&driver.as_str()) {
        return Err(generic(format!(
            "Driver '{driver}' is not supported by livesnapd"
        )));
    }
    let driver = match driver.as_str() {
        "file" => {
            let filename = args.req_str("filename")?;
            let locking = args.opt_enum("locking", &["auto", "on", "off"])?;
            let aio = args.opt_enum("aio", &["threads", "native", "io_uring"])?;
            args.opt_i64("aio-max-batch")?;
            args.opt_bool("drop-cache")?;
            DriverOptions::File {
                filename,
                aio: aio.as_deref().and_then(FileAio::parse),
                locking: locking
                    .as_deref()
                    .and_then(Locking::parse)
                    .unwrap_or_default(),
            }
        }
        "qcow2" => parse_qcow2(args)?,
        "copy-before-write" => parse_cbw(args)?,
        "snapshot-access" => DriverOptions::Registered {
            driver: "snapshot-access".into(),
            file: Some(parse_ref(args, "file")?),
            children: Vec::new(),
            options: Box::new(()),
        },
        "blkdebug" => DriverOptions::Blkdebug {
            image: parse_ref(args, "image")?,
            opts: super::blkdebug::parse_options(args)?,
        },
        _ => {
            let file = parse_ref(args, "file")?;
            let offset = args.opt_i64("offset")?;
            let size = args.opt_i64("size")?;
            DriverOptions::Raw { file, offset, size }
        }
    };
    if matches!(detect_zeroes.as_deref(), Some("on") | Some("unmap")) {
        return Err(generic("detect-zeroes is not supported by livesnapd"));
    }
    if active == Some(false) {
        return Err(generic("Inactive nodes are not supported by livesnapd"));
    }
    Ok(BlockdevOptions {
        node_name,
        read_only,
        cache_direct,
        force_share,
        driver,
    })
}

/// `blockdev-add` of options built in-process (external snapshots): without
/// `node-name`, the node gets an automatic name, as QEMU's overlays do.
pub async fn add_node(d: &Arc<Daemon>, options: Value) -> Result<Arc<BlockNode>, QmpError> {
    let Value::Object(map) = options else {
        return Err(generic("blockdev options must be an object"));
    };
    let mut args = Args::new(map);
    let opts = parse_options(&mut args)?;
    args.finish()?;
    open_root(d, &opts).await
}

pub(super) async fn blockdev_add(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let opts = parse_options(&mut args)?;
    args.finish()?;
    if opts.node_name.is_none() {
        return Err(generic("'node-name' must be specified for the root node"));
    }
    open_root(d, &opts).await.map(|_| empty())
}

/// Opens a monitor-owned node and everything below it; a failure removes
/// every node it had opened, as in QEMU.
async fn open_root(d: &Arc<Daemon>, opts: &BlockdevOptions) -> Result<Arc<BlockNode>, QmpError> {
    livesnap_block::open(&d.graph, &d.drivers, opts, true)
        .await
        .map_err(generic)
}

pub(super) async fn blockdev_del(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let name = args.req_str("node-name")?;
    args.finish()?;
    // Metadata still in a write-back cache (qcow2) must reach the disk before
    // the node goes; a refused deletion loses nothing by the flush.
    if let Some(node) = d.graph.get(&name) {
        if let Err(e) = node.flush().await {
            tracing::warn!("flush of {name} before blockdev-del failed: {e}");
        }
    }
    let node = d.graph.get(&name);
    d.graph.remove(&name).map_err(generic)?;
    if let Some(node) = node {
        node.close().await;
    }
    Ok(empty())
}

/// QEMU's `ImageInfo` of a node; the backing chain is nested unless `flat`.
fn image_info(node: &BlockNode, flat: bool) -> Value {
    let filename = node.filename();
    let actual_size = std::fs::metadata(&filename)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    let mut image = json!({
        "virtual-size": node.size(),
        "filename": filename,
        "format": node.format_name(),
        "actual-size": actual_size,
        "dirty-flag": false,
    });
    if let Some(m) = image.as_object_mut().filter(|_| !has_allocated_size(node)) {
        m.shift_remove("actual-size");
    }
    if node.driver::<FileDriver>().is_some() {
        image["format-specific"] = json!({ "type": "file", "data": {} });
    }
    if let Some(FormatSpecific::Qcow2(q)) = node.format_specific() {
        image["cluster-size"] = json!(q.cluster_size);
        let mut data = json!({
            "compat": q.compat,
            "compression-type": q.compression_type,
            "lazy-refcounts": q.lazy_refcounts,
            "refcount-bits": q.refcount_bits,
            "corrupt": q.corrupt,
            "extended-l2": false,
        });
        if !q.bitmaps.is_empty() {
            let bitmaps: Vec<Value> = q.bitmaps.iter().map(qcow2_bitmap_info).collect();
            if let Some(m) = data.as_object_mut() {
                // QEMU's place for it: after lazy-refcounts.
                m.shift_insert(3, "bitmaps".into(), Value::Array(bitmaps));
            }
        }
        image["format-specific"] = json!({ "type": "qcow2", "data": data });
        if let Some(backing) = &q.backing_filename {
            image["backing-filename"] = json!(backing);
            image["full-backing-filename"] = json!(q.full_backing_filename);
            if let Some(format) = &q.backing_format {
                image["backing-filename-format"] = json!(format);
            }
        }
    }
    if !flat {
        if let Some(backing) = node.backing() {
            image["backing-image"] = image_info(&backing, false);
        }
        if let Some(file) = super::backup::filtered_child(node) {
            image["backing-image"] = image_info(&file, false);
        }
    }
    image
}

/// False when QEMU's `bdrv_get_allocated_file_size` fails for `node`: a
/// blkdebug node (a protocol driver with a child) anywhere below it.
fn has_allocated_size(node: &BlockNode) -> bool {
    node.driver::<livesnap_block::BlkdebugDriver>().is_none()
        && node
            .children()
            .iter()
            .filter(|c| matches!(c.role, "file" | "image"))
            .all(|c| has_allocated_size(&c.node))
}

/// Number of images below `node` in its backing chain.
fn backing_depth(node: &BlockNode) -> u64 {
    node.backing()
        .or_else(|| super::backup::filtered_child(node))
        .map_or(0, |b| 1 + backing_depth(&b))
}

/// QEMU's `BlockDeviceInfo` for one node.
pub fn node_info(node: &BlockNode, flat: bool) -> Value {
    let filename = node.filename();
    let mut info = json!({
        "iops_rd": 0,
        "detect_zeroes": "off",
        "active": true,
        "image": image_info(node, flat),
        "iops_wr": 0,
        "ro": node.read_only(),
        "node-name": node.name(),
        "backing_file_depth": if flat { 0 } else { backing_depth(node) },
        "drv": node.format_name(),
        "iops": 0,
        "bps_wr": 0,
        "write_threshold": 0,
        "encrypted": false,
        "bps": 0,
        "bps_rd": 0,
        "cache": { "no-flush": false, "direct": node.cache_direct(), "writeback": true },
        "file": filename,
    });
    if let Some(b) = node.backing() {
        info["backing_file"] = json!(b.filename());
    }
    super::backup::filter_node_info(node, &mut info);
    // QEMU lists `dirty-bitmaps` only when the node has any, after
    // `write_threshold`: the named ones newest first, then a filter's own.
    let bitmaps: Vec<Value> = node
        .bitmaps()
        .infos()
        .iter()
        .map(super::bitmap::dirty_info)
        .chain(super::backup::filter_bitmaps(node))
        .collect();
    if let (false, Some(m)) = (bitmaps.is_empty(), info.as_object_mut()) {
        let at = m
            .keys()
            .position(|k| k == "write_threshold")
            .map_or(m.len(), |i| i + 1);
        m.shift_insert(at, "dirty-bitmaps".into(), Value::Array(bitmaps));
    }
    info
}

pub(super) fn query_named_block_nodes(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let flat = args.opt_bool("flat")?.unwrap_or(false);
    args.finish()?;
    Ok(Value::Array(
        d.graph
            .nodes()
            .iter()
            .rev()
            .map(|n| node_info(n, flat))
            .collect(),
    ))
}

/// One persistent bitmap of a qcow2 image as QEMU's `Qcow2BitmapInfo`.
fn qcow2_bitmap_info(b: &livesnap_block::Qcow2BitmapInfo) -> Value {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.auto {
        flags.push("auto");
    }
    json!({ "flags": flags, "name": b.name, "granularity": b.granularity })
}
