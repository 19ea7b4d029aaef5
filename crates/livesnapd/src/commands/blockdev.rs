//! `blockdev-add`, `blockdev-del`, `query-named-block-nodes` (QEMU's
//! `blockdev.c` and `qapi/block-core.json`).
//!
//! Arguments are parsed into [`BlockdevOptions`] in full before anything is
//! opened, so a bad argument anywhere in an inline tree is reported the way
//! QEMU's visitor reports it and nothing is left half-created.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;

use livesnap_block::{BlockNode, FileDriver, FileOptions, RawDriver, RawOptions};
use livesnap_qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::{empty, id_wellformed};
use crate::daemon::Daemon;

/// Every driver name of QEMU's `BlockdevDriver` enum; those livesnapd lacks get a clear error.
const QEMU_DRIVERS: &[&str] = &[
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
const DRIVERS: &[&str] = &["file", "raw"];

/// Longest node name plus one: the size of QEMU's `BlockDriverState.node_name`.
const NODE_NAME_SIZE: usize = 32;

/// QEMU's `BlockdevRef`: a child given inline or by node name.
enum BlockdevRef {
    Inline(Box<BlockdevOptions>),
    Reference(String),
}

/// Driver-specific options (the union branches of `BlockdevOptions`).
enum DriverOptions {
    File {
        filename: String,
        aio_native: bool,
    },
    Raw {
        file: BlockdevRef,
        // QAPI type `int`; QEMU refuses negative values only when the driver opens.
        offset: Option<i64>,
        size: Option<i64>,
    },
}

/// QEMU's `BlockdevOptions`, the parts livesnapd acts on.
struct BlockdevOptions {
    node_name: Option<String>,
    read_only: Option<bool>,
    cache_direct: Option<bool>,
    force_share: Option<bool>,
    driver: DriverOptions,
}

/// Options a child inherits from its parent unless it sets them (QEMU's `bdrv_inherited_options`).
#[derive(Clone, Copy, Default)]
struct Inherited {
    read_only: bool,
    cache_direct: bool,
    force_share: bool,
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

fn parse_ref(args: &mut Args, key: &str) -> Result<BlockdevRef, QmpError> {
    let path = args.path_of(key);
    match args.take_value(key) {
        None => Err(generic(format!("Parameter '{path}' is missing"))),
        Some(Value::String(name)) => Ok(BlockdevRef::Reference(name)),
        Some(Value::Object(map)) => {
            let mut child = args.nested(key, map);
            let opts = parse_options(&mut child)?;
            child.finish()?;
            Ok(BlockdevRef::Inline(Box::new(opts)))
        }
        Some(_) => Err(generic(format!(
            "Invalid parameter type for '{path}', expected: BlockdevRef"
        ))),
    }
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
            args.opt_enum("locking", &["auto", "on", "off"])?;
            let aio = args.opt_enum("aio", &["threads", "native", "io_uring"])?;
            args.opt_i64("aio-max-batch")?;
            args.opt_bool("drop-cache")?;
            DriverOptions::File {
                filename,
                aio_native: aio.as_deref() == Some("native"),
            }
        }
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

/// The text of an OS error without Rust's " (os error N)" suffix, as QEMU prints it.
pub fn os_error_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => {
            // SAFETY: strerror returns a pointer to a static or thread-local string.
            let s = unsafe { std::ffi::CStr::from_ptr(libc::strerror(errno)) };
            s.to_string_lossy().into_owned()
        }
        None => e.to_string(),
    }
}

/// A `raw` window bound as QEMU reads it back as a size: negative is out of range.
fn raw_window(value: Option<i64>, name: &str) -> Result<Option<u64>, QmpError> {
    value
        .map(|v| {
            u64::try_from(v).map_err(|_| {
                generic(format!(
                    "Value '{v}' is out of range for parameter '{name}'"
                ))
            })
        })
        .transpose()
}

/// Opens `opts` and everything inline below it, adding the nodes to the graph.
///
/// The steps and their errors come in QEMU's order: a format driver's `file`
/// child first (`bdrv_open_inherit`), then the node's generic options and
/// name (`bdrv_open_common`), then the driver's own options.
/// `created` collects every node added, so a failure can take them all back out.
fn open_tree(
    d: &Daemon,
    opts: &BlockdevOptions,
    inherited: Inherited,
    monitor_owned: bool,
    created: &mut Vec<String>,
) -> Result<Arc<BlockNode>, QmpError> {
    let read_only = opts.read_only.unwrap_or(inherited.read_only);
    let cache_direct = opts.cache_direct.unwrap_or(inherited.cache_direct);
    let force_share = opts.force_share.unwrap_or(inherited.force_share);
    let child = match &opts.driver {
        DriverOptions::File { .. } => None,
        DriverOptions::Raw { file, .. } => Some(match file {
            BlockdevRef::Reference(n) => d
                .graph
                .get(n)
                .ok_or_else(|| generic(format!("Cannot find device='{n}' nor node-name='{n}'")))?,
            BlockdevRef::Inline(child_opts) => open_tree(
                d,
                child_opts,
                Inherited {
                    read_only,
                    cache_direct,
                    force_share,
                },
                false,
                created,
            )?,
        }),
    };
    if force_share && !read_only {
        return Err(generic(
            "force-share=on can only be used with read-only images",
        ));
    }
    if matches!(&opts.driver, DriverOptions::File { filename, .. } if filename.is_empty()) {
        return Err(generic("The 'file' block driver requires a file name"));
    }
    let name = match &opts.node_name {
        Some(n) => {
            if !id_wellformed(n) {
                return Err(generic(format!("Invalid node-name: '{n}'")));
            }
            d.graph.check_free(n).map_err(|e| generic(e.0))?;
            if n.len() >= NODE_NAME_SIZE {
                return Err(generic("Node name too long"));
            }
            n.clone()
        }
        None => d.graph.auto_name(),
    };
    let driver: Box<dyn livesnap_block::BlockDriver> = match &opts.driver {
        DriverOptions::File {
            filename,
            aio_native,
        } => {
            let f = FileDriver::open(&FileOptions {
                filename: filename.clone(),
                direct: cache_direct,
                read_only,
            })
            .map_err(|e| {
                generic(format!(
                    "Could not open '{filename}': {}",
                    os_error_text(&e)
                ))
            })?;
            if *aio_native && !cache_direct {
                return Err(generic("aio=native was specified, but it requires cache.direct=on, which was not specified."));
            }
            // Block devices are accepted too (QEMU wants host_device for them); see docs/qmp.md.
            let usable = std::fs::metadata(filename)
                .map(|m| m.file_type().is_file() || m.file_type().is_block_device())
                .unwrap_or(false);
            if !usable {
                return Err(generic(format!(
                    "'file' driver requires '{filename}' to be a regular file"
                )));
            }
            Box::new(f)
        }
        DriverOptions::Raw { offset, size, .. } => {
            let raw = RawDriver::open(
                child.expect("raw's file child was resolved above"),
                RawOptions {
                    offset: raw_window(*offset, "offset")?,
                    size: raw_window(*size, "size")?,
                },
            )
            .map_err(generic)?;
            Box::new(raw)
        }
    };
    let node = BlockNode::new(name.clone(), driver, read_only, monitor_owned);
    node.set_cache_direct(cache_direct);
    d.graph.insert(node.clone()).map_err(|e| generic(e.0))?;
    created.push(name);
    Ok(node)
}

pub(super) fn blockdev_add(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let opts = parse_options(&mut args)?;
    args.finish()?;
    if opts.node_name.is_none() {
        return Err(generic("'node-name' must be specified for the root node"));
    }
    let mut created = Vec::new();
    match open_tree(d, &opts, Inherited::default(), true, &mut created) {
        Ok(_) => Ok(empty()),
        Err(e) => {
            // Children opened before the failure go away with it, as in QEMU.
            for name in created.iter().rev() {
                d.graph.discard(name);
            }
            Err(e)
        }
    }
}

pub(super) fn blockdev_del(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let name = args.req_str("node-name")?;
    args.finish()?;
    d.graph.remove(&name).map_err(|e| generic(e.0))?;
    Ok(empty())
}

/// QEMU's `BlockDeviceInfo` for one node.
pub fn node_info(node: &BlockNode) -> Value {
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
    if node.format_name() == "file" {
        image["format-specific"] = json!({ "type": "file", "data": {} });
    }
    json!({
        "iops_rd": 0,
        "detect_zeroes": "off",
        "active": true,
        "image": image,
        "iops_wr": 0,
        "ro": node.read_only(),
        "node-name": node.name(),
        "backing_file_depth": 0,
        "drv": node.format_name(),
        "iops": 0,
        "bps_wr": 0,
        "write_threshold": 0,
        "encrypted": false,
        "bps": 0,
        "bps_rd": 0,
        "cache": { "no-flush": false, "direct": node.cache_direct(), "writeback": true },
        "file": filename,
    })
}

pub(super) fn query_named_block_nodes(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    // Without backing chains, flat and nested listings are the same.
    args.opt_bool("flat")?;
    args.finish()?;
    Ok(Value::Array(
        d.graph.nodes().iter().rev().map(|n| node_info(n)).collect(),
    ))
}
