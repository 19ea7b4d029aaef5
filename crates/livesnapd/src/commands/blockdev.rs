//! `blockdev-add`, `blockdev-del`, `query-named-block-nodes` (QEMU's
//! `blockdev.c` and `qapi/block-core.json`).
//!
//! Arguments are parsed into [`BlockdevOptions`] in full before anything is
//! opened, so a bad argument anywhere in an inline tree is reported the way
//! QEMU's visitor reports it and nothing is left half-created.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use livesnap_block::qcow2::Header;
use livesnap_block::{
    check_chain_depth, os_error_text, resolve_backing_filename, BackingRef, BlockNode, FileDriver,
    FileOptions, FormatSpecific, Qcow2Driver, Qcow2Options, RawDriver, RawOptions,
};
use livesnap_qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::{empty, id_wellformed};
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

/// Longest node name plus one: the size of QEMU's `BlockDriverState.node_name`.
const NODE_NAME_SIZE: usize = 32;

/// QEMU's `BlockdevRef`: a child given inline or by node name.
enum BlockdevRef {
    Inline(Box<BlockdevOptions>),
    Reference(String),
}

/// QEMU's `BlockdevRefOrNull` for `backing`, plus "not given".
enum BackingOption {
    /// Not given: opened from the image header, with the header's format.
    FromHeader,
    /// `null`: no backing image at all.
    Null,
    /// A node given inline or by name.
    Node(BlockdevRef),
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
    Qcow2 {
        file: BlockdevRef,
        backing: BackingOption,
        cache: Qcow2Cache,
    },
    /// QEMU's `BlockdevOptionsCbw`; `target` is opened inside the driver,
    /// after the node is named (`cbw_open`).
    Cbw {
        file: BlockdevRef,
        target: BlockdevRef,
        /// `bitmap` as (node, name): refused when the filter opens.
        bitmap: Option<(String, String)>,
        opts: livesnap_jobs::cbw::CbwOptions,
    },
    /// QEMU's `snapshot-access` (only `file`).
    SnapshotAccess {
        file: BlockdevRef,
    },
    /// QEMU opens blkdebug's `image` child inside the driver, after the node is named.
    Blkdebug {
        image: BlockdevRef,
        args: super::blkdebug::BlkdebugArgs,
    },
}

/// The cache options of `BlockdevOptionsQcow2` (QAPI `int`s), checked when
/// the image opens, as QEMU's `read_cache_sizes` does.
#[derive(Clone, Copy, Default)]
struct Qcow2Cache {
    cache_size: Option<i64>,
    l2_cache_size: Option<i64>,
    l2_cache_entry_size: Option<i64>,
    refcount_cache_size: Option<i64>,
    cache_clean_interval: Option<i64>,
    lazy_refcounts: bool,
}

impl Qcow2Cache {
    /// QEMU's checks (`qcow2_update_options_prepare`), in its order, for
    /// an image with `cluster_size` and `version`; returns the L2 cache
    /// size in bytes, the only one livesnapd uses.
    fn check(&self, cluster_size: u64, version_3: bool) -> Result<Option<u64>, QmpError> {
        let sizes = [
            ("cache-size", self.cache_size),
            ("l2-cache-size", self.l2_cache_size),
            ("l2-cache-entry-size", self.l2_cache_entry_size),
            ("refcount-cache-size", self.refcount_cache_size),
        ];
        for (name, v) in sizes {
            if let Some(v) = v.filter(|v| *v < 0) {
                return Err(generic(format!(
                    "Value '{v}' is out of range for parameter '{name}'"
                )));
            }
        }
        if let Some(combined) = self.cache_size {
            if self.l2_cache_size.is_some() && self.refcount_cache_size.is_some() {
                return Err(generic(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
                ));
            }
            if self.l2_cache_size.is_some_and(|l2| l2 > combined) {
                return Err(generic("l2-cache-size may not exceed cache-size"));
            }
            if self.refcount_cache_size.is_some_and(|r| r > combined) {
                return Err(generic("refcount-cache-size may not exceed cache-size"));
            }
        }
        let entry = self.l2_cache_entry_size.unwrap_or(cluster_size as i64);
        if entry < 512 || entry as u64 > cluster_size || !(entry as u64).is_power_of_two() {
            return Err(generic(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size \
                 ({cluster_size})"
            )));
        }
        // A negative number reads as a huge unsigned one in QEMU.
        if self
            .cache_clean_interval
            .is_some_and(|i| i < 0 || i > u32::MAX as i64)
        {
            return Err(generic("Cache clean interval too big"));
        }
        if self.lazy_refcounts && !version_3 {
            return Err(generic(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        Ok(self.l2_cache_size.map(|v| v as u64))
    }
}

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

impl DriverOptions {
    /// The `file` child of a format driver.
    fn file_child(&self) -> Option<&BlockdevRef> {
        match self {
            DriverOptions::File { .. } | DriverOptions::Blkdebug { .. } => None,
            DriverOptions::Raw { file, .. }
            | DriverOptions::Qcow2 { file, .. }
            | DriverOptions::Cbw { file, .. }
            | DriverOptions::SnapshotAccess { file } => Some(file),
        }
    }
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
    use livesnap_jobs::cbw::{CbwOptions, OnCbwError};
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
    Ok(DriverOptions::Cbw {
        file,
        target,
        bitmap,
        opts: CbwOptions {
            on_cbw_error,
            cbw_timeout,
            min_cluster_size,
            discard_source: false,
        },
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
            args.opt_enum("locking", &["auto", "on", "off"])?;
            let aio = args.opt_enum("aio", &["threads", "native", "io_uring"])?;
            args.opt_i64("aio-max-batch")?;
            args.opt_bool("drop-cache")?;
            DriverOptions::File {
                filename,
                aio_native: aio.as_deref() == Some("native"),
            }
        }
        "qcow2" => parse_qcow2(args)?,
        "copy-before-write" => parse_cbw(args)?,
        "snapshot-access" => DriverOptions::SnapshotAccess {
            file: parse_ref(args, "file")?,
        },
        "blkdebug" => DriverOptions::Blkdebug {
            image: parse_ref(args, "image")?,
            args: super::blkdebug::parse_options(args)?,
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

/// What an open passes down to the nodes it opens below it.
struct OpenCtx<'a> {
    d: &'a Daemon,
    /// Every node added, so a failure can take them all back out.
    created: Vec<String>,
}

/// A boxed future of [`open_tree`], which recurses.
type OpenFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<BlockNode>, QmpError>> + Send + 'a>>;

/// Opens `opts` and everything inline below it, adding the nodes to the graph.
///
/// The steps and their errors come in QEMU's order: a format driver's `file`
/// child first (`bdrv_open_inherit`), then the node's generic options and
/// name (`bdrv_open_common`), then the driver itself, then its backing chain.
/// `chain` holds the host files of the images above, to refuse backing loops.
fn open_tree<'a>(
    ctx: &'a mut OpenCtx<'_>,
    opts: &'a BlockdevOptions,
    inherited: Inherited,
    monitor_owned: bool,
    chain: Vec<PathBuf>,
) -> OpenFuture<'a> {
    Box::pin(async move {
        let d = ctx.d;
        let read_only = opts.read_only.unwrap_or(inherited.read_only);
        let cache_direct = opts.cache_direct.unwrap_or(inherited.cache_direct);
        let force_share = opts.force_share.unwrap_or(inherited.force_share);
        let child_inherits = Inherited {
            read_only,
            cache_direct,
            force_share,
        };
        let child = match opts.driver.file_child() {
            None => None,
            Some(file) => Some(open_ref(ctx, file, child_inherits, chain.clone()).await?),
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
                d.graph.check_free(n).map_err(generic)?;
                if n.len() >= NODE_NAME_SIZE {
                    return Err(generic("Node name too long"));
                }
                n.clone()
            }
            None => d.graph.auto_name(),
        };
        // Where the node goes in creation order: here, before any backing node.
        let mut position = d.graph.position();
        let mut cbw_state = None;
        let driver: Box<dyn livesnap_block::BlockDriver> = match &opts.driver {
            DriverOptions::File {
                filename,
                aio_native,
            } => Box::new(open_file(filename, *aio_native, cache_direct, read_only)?),
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
            DriverOptions::Qcow2 { backing, cache, .. } => {
                let file = child.expect("qcow2's file child was resolved above");
                // QEMU's order: the image itself (header, tables) is opened and
                // named first, its backing chain after it (bdrv_open_inherit).
                // The options are checked against the header, as QEMU does
                // once it has read it, before anything is written.
                let header = Header::read(&file, !read_only).await.map_err(generic)?;
                let l2_cache_size = cache.check(header.cluster_size(), header.version >= 3)?;
                let q = Qcow2Driver::open_with(
                    file.clone(),
                    None,
                    read_only,
                    Qcow2Options { l2_cache_size },
                )
                .await
                .map_err(generic)?;
                position = d.graph.position();
                let header_ref = q.header_backing().cloned();
                q.set_backing(
                    open_backing(ctx, &file, header_ref, backing, cache_direct, chain).await?,
                );
                Box::new(q)
            }
            DriverOptions::Cbw {
                target,
                bitmap,
                opts: cbw_opts,
                ..
            } => {
                let file = child.expect("the filter's file child was resolved above");
                let target = open_ref(ctx, target, child_inherits, chain).await?;
                // livesnapd has no named dirty bitmaps (QEMU's lookup texts).
                if let Some((node, name)) = bitmap {
                    return Err(generic(match d.graph.get(node) {
                        None => format!("Node '{node}' not found"),
                        Some(_) => format!("Dirty bitmap '{name}' not found"),
                    }));
                }
                let cbw = open_cbw(file, target, *cbw_opts).await?;
                cbw_state = Some(cbw.clone());
                Box::new(livesnap_jobs::cbw::CbwDriver::new(cbw))
            }
            DriverOptions::SnapshotAccess { .. } => {
                let file = child.expect("snapshot-access's file child was resolved above");
                Box::new(livesnap_jobs::snapshot_access::SnapshotAccessDriver::open(
                    file,
                ))
            }
            DriverOptions::Blkdebug { image, args } => {
                super::blkdebug::check_before_image(args)?;
                let image = open_ref(ctx, image, child_inherits, chain).await?;
                let drv = super::blkdebug::open(image, args)?;
                Box::new(drv)
            }
        };
        let node = BlockNode::new(name.clone(), driver, read_only, monitor_owned);
        node.set_cache_direct(cache_direct);
        if let Err(e) = d.graph.insert_at(node.clone(), position) {
            if let Some(cbw) = &cbw_state {
                cbw.close().await;
            }
            return Err(generic(e));
        }
        ctx.created.push(name);
        Ok(node)
    })
}

/// Attaches a copy-before-write filter to `file` (its point in time is now).
async fn open_cbw(
    file: Arc<BlockNode>,
    target: Arc<BlockNode>,
    opts: livesnap_jobs::cbw::CbwOptions,
) -> Result<Arc<livesnap_jobs::cbw::Cbw>, QmpError> {
    // A target that is the disk itself would wait on its own copies.
    if Arc::ptr_eq(&file, &target) {
        return Err(generic(
            "The copy-before-write target must not be the filtered node itself",
        ));
    }
    let drain = super::snapshot::DRAIN_TIMEOUT;
    match tokio::time::timeout(
        drain,
        livesnap_jobs::cbw::Cbw::attach(file.clone(), target, opts),
    )
    .await
    {
        Ok(r) => r.map_err(|e| generic(format!("Cannot create block-copy-state: {e}"))),
        Err(_) => Err(generic(format!(
            "Requests on '{}' did not finish within {} s; filter not added",
            file.name(),
            drain.as_secs()
        ))),
    }
}

/// A child given by name, or opened from its inline options.
async fn open_ref(
    ctx: &mut OpenCtx<'_>,
    r: &BlockdevRef,
    inherited: Inherited,
    chain: Vec<PathBuf>,
) -> Result<Arc<BlockNode>, QmpError> {
    match r {
        BlockdevRef::Reference(n) => ctx
            .d
            .graph
            .get(n)
            .ok_or_else(|| generic(format!("Cannot find device='{n}' nor node-name='{n}'"))),
        BlockdevRef::Inline(child_opts) => {
            open_tree(ctx, child_opts, inherited, false, chain).await
        }
    }
}

/// Opens the `file` driver with QEMU's checks.
fn open_file(
    filename: &str,
    aio_native: bool,
    cache_direct: bool,
    read_only: bool,
) -> Result<FileDriver, QmpError> {
    let f = FileDriver::open(&FileOptions {
        filename: filename.to_string(),
        direct: cache_direct,
        read_only,
    })
    .map_err(|e| {
        generic(format!(
            "Could not open '{filename}': {}",
            os_error_text(&e)
        ))
    })?;
    if aio_native && !cache_direct {
        return Err(generic(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
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
    Ok(f)
}

/// The backing node of a qcow2 image: none, the one given, or the chain named
/// in the header, opened read-only with the header's format (never probed).
async fn open_backing(
    ctx: &mut OpenCtx<'_>,
    file: &Arc<BlockNode>,
    header_ref: Option<BackingRef>,
    backing: &BackingOption,
    cache_direct: bool,
    mut chain: Vec<PathBuf>,
) -> Result<Option<Arc<BlockNode>>, QmpError> {
    // Backing images are opened read-only and inherit the cache mode (QEMU's
    // bdrv_backing_options).
    let inherited = Inherited {
        read_only: true,
        cache_direct,
        force_share: false,
    };
    let header_ref = match backing {
        BackingOption::Null => return Ok(None),
        BackingOption::Node(r) => {
            return open_ref(ctx, r, inherited, chain)
                .await
                .map(Some)
                .map_err(|e| generic(format!("Could not open backing file: {}", e.desc)))
        }
        BackingOption::FromHeader => header_ref,
    };
    let Some(bref) = header_ref else {
        return Ok(None);
    };
    let format = bref.require_format().map_err(generic)?.to_string();
    let path = resolve_backing_filename(&file.filename(), &bref.filename);
    let here = std::fs::canonicalize(file.filename()).unwrap_or_else(|_| file.filename().into());
    chain.push(here);
    // The images above and this one, plus the backing image about to open.
    check_chain_depth(chain.len() + 1).map_err(generic)?;
    if let Ok(target) = std::fs::canonicalize(&path) {
        if chain.contains(&target) {
            return Err(generic(format!(
                "Could not open backing file: Backing file '{path}' creates a loop in the backing chain"
            )));
        }
    }
    let file_opts = BlockdevRef::Inline(Box::new(BlockdevOptions {
        node_name: None,
        read_only: None,
        cache_direct: None,
        force_share: None,
        driver: DriverOptions::File {
            filename: path.clone(),
            aio_native: false,
        },
    }));
    let driver = match format.as_str() {
        "raw" => DriverOptions::Raw {
            file: file_opts,
            offset: None,
            size: None,
        },
        "qcow2" => DriverOptions::Qcow2 {
            file: file_opts,
            backing: BackingOption::FromHeader,
            cache: Qcow2Cache::default(),
        },
        other => {
            return Err(generic(format!(
                "Could not open backing file: Unknown driver '{other}'"
            )))
        }
    };
    let opts = BlockdevOptions {
        node_name: None,
        read_only: None,
        cache_direct: None,
        force_share: None,
        driver,
    };
    open_tree(ctx, &opts, inherited, false, chain)
        .await
        .map(Some)
        .map_err(|e| generic(format!("Could not open backing file: {}", e.desc)))
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
    let mut ctx = OpenCtx {
        d,
        created: Vec::new(),
    };
    let result = open_tree(&mut ctx, opts, Inherited::default(), true, Vec::new()).await;
    if result.is_err() {
        for name in ctx.created.iter().rev() {
            // A filter opened on the way detaches from its disk again.
            let cbw = d
                .graph
                .get(name)
                .and_then(|n| livesnap_jobs::cbw::cbw_of(&n));
            if let Some(cbw) = cbw {
                cbw.close().await;
            }
            d.graph.discard(name);
        }
    }
    result
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
    let cbw = d
        .graph
        .get(&name)
        .and_then(|n| livesnap_jobs::cbw::cbw_of(&n));
    d.graph.remove(&name).map_err(generic)?;
    if let Some(cbw) = cbw {
        cbw.close().await;
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
        image["format-specific"] = json!({
            "type": "qcow2",
            "data": {
                "compat": q.compat,
                "compression-type": q.compression_type,
                "lazy-refcounts": q.lazy_refcounts,
                "refcount-bits": q.refcount_bits,
                "corrupt": q.corrupt,
                "extended-l2": false,
            },
        });
        if let Some(backing) = &q.backing_filename {
            image["backing-filename"] = json!(backing);
            image["full-backing-filename"] = json!(resolve_backing_filename(&filename, backing));
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
