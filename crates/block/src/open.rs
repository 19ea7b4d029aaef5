//! Opening a tree of nodes from QEMU's `BlockdevOptions` (`blockdev-add`):
//! each node's generic options and name, its driver with its children given
//! inline or by name, and a qcow2 image's backing chain from its header with
//! the header's format (never probed), with loop and depth checks. The
//! layer's own drivers (file, raw, qcow2, blkdebug) are opened here; others
//! (the jobs crate's filters) are opened by the [`DriverFactory`] registered
//! for their name in a [`Drivers`] table.
//!
//! The steps and their errors come in QEMU's order (`bdrv_open_inherit`): a
//! format driver's `file` child first, then the node's generic options and
//! name, then the driver itself, then its backing chain. A failure takes out
//! every node the open had added.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use crate::blkdebug::BlkdebugOpenOptions;
use crate::error::{Error, Result};
use crate::file::{FileAio, FileDriver, FileOptions, Refusal};
use crate::graph::BlockGraph;
use crate::lock::{as_conflict, Locking};
use crate::node::BlockNode;
use crate::qcow2::{check_chain_depth, resolve_backing_filename, BackingRef, Qcow2Cache};
use crate::qcow2::{Header, Qcow2Driver, Qcow2Options};
use crate::raw::{RawDriver, RawOptions};
use crate::BlockDriver;

/// QEMU's `BlockdevRef`: a child given inline or by node name.
pub enum BlockdevRef {
    /// Options of a node opened with its parent.
    Inline(Box<BlockdevOptions>),
    /// An existing node's name.
    Reference(String),
}

/// QEMU's `BlockdevRefOrNull` for `backing`, plus "not given".
pub enum BackingOption {
    /// Not given: opened from the image header, with the header's format.
    FromHeader,
    /// `null`: no backing image at all.
    Null,
    /// A node given inline or by name.
    Node(BlockdevRef),
}

/// The driver-specific part of `BlockdevOptions`.
pub enum DriverOptions {
    /// `file`.
    File {
        /// The host file.
        filename: String,
        /// `aio`: the I/O engine (`None`: io_uring where the kernel allows it).
        aio: Option<FileAio>,
        /// `locking`: image locks shared with QEMU.
        locking: Locking,
    },
    /// `raw`.
    Raw {
        /// The protocol child.
        file: BlockdevRef,
        /// QAPI `int`s, refused when negative only when the driver opens.
        offset: Option<i64>,
        /// See `offset`.
        size: Option<i64>,
    },
    /// `qcow2`.
    Qcow2 {
        /// The protocol child.
        file: BlockdevRef,
        /// The backing node.
        backing: BackingOption,
        /// The cache options, checked against the header.
        cache: Qcow2Cache,
    },
    /// `blkdebug`; `image` opens after the node is named, as in QEMU.
    Blkdebug {
        /// The filtered child.
        image: BlockdevRef,
        /// Its options.
        opts: BlkdebugOpenOptions,
    },
    /// A driver another crate registered in the [`Drivers`] table.
    Registered {
        /// Its name (`copy-before-write`).
        driver: String,
        /// The child opened before the node is named (a filter's `file`).
        file: Option<BlockdevRef>,
        /// Children its open opens after the node is named, by role.
        children: Vec<(&'static str, BlockdevRef)>,
        /// Its own options, for its factory.
        options: Box<dyn Any + Send + Sync>,
    },
}

impl DriverOptions {
    /// The child opened before the node is named.
    fn file_child(&self) -> Option<&BlockdevRef> {
        match self {
            DriverOptions::File { .. } | DriverOptions::Blkdebug { .. } => None,
            DriverOptions::Raw { file, .. } | DriverOptions::Qcow2 { file, .. } => Some(file),
            DriverOptions::Registered { file, .. } => file.as_ref(),
        }
    }
}

/// QEMU's `BlockdevOptions`, the parts livesnap acts on.
pub struct BlockdevOptions {
    /// `node-name` (an automatic name without it).
    pub node_name: Option<String>,
    /// `read-only`, inherited when not given.
    pub read_only: Option<bool>,
    /// `cache.direct`, inherited when not given.
    pub cache_direct: Option<bool>,
    /// `force-share`, inherited when not given.
    pub force_share: Option<bool>,
    /// The driver and its options.
    pub driver: DriverOptions,
}

impl BlockdevOptions {
    /// Options with nothing but the driver's.
    pub fn of(driver: DriverOptions) -> BlockdevOptions {
        BlockdevOptions {
            node_name: None,
            read_only: None,
            cache_direct: None,
            force_share: None,
            driver,
        }
    }
}

/// What a registered driver's open gets.
pub struct FactoryOpen<'a> {
    /// The graph (for lookups its errors name).
    pub graph: &'a BlockGraph,
    /// The `file` child, opened.
    pub file: Option<Arc<BlockNode>>,
    /// The other children, opened, in the order given.
    pub children: Vec<(&'static str, Arc<BlockNode>)>,
    /// The driver's own options.
    pub options: &'a (dyn Any + Send + Sync),
}

/// A boxed future of an open.
pub type OpenFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Opens the driver of one registered name.
pub trait DriverFactory: Send + Sync {
    /// Opens a driver over the children in `o`.
    fn open<'a>(&'a self, o: FactoryOpen<'a>) -> OpenFuture<'a, Box<dyn BlockDriver>>;
}

/// The drivers other crates registered, by name.
#[derive(Default, Clone)]
pub struct Drivers {
    factories: HashMap<String, Arc<dyn DriverFactory>>,
}

impl Drivers {
    /// No registered drivers: only the block layer's own.
    pub fn new() -> Drivers {
        Drivers::default()
    }

    /// Registers `factory` for `name`.
    pub fn register(&mut self, name: &str, factory: Arc<dyn DriverFactory>) {
        self.factories.insert(name.to_string(), factory);
    }

    /// True when `name` can be opened (the layer's own or registered).
    pub fn has(&self, name: &str) -> bool {
        OWN_DRIVERS.contains(&name) || self.factories.contains_key(name)
    }
}

/// The drivers this layer opens itself.
pub const OWN_DRIVERS: &[&str] = &["file", "raw", "qcow2", "blkdebug"];

/// Options a child inherits from its parent unless it sets them (QEMU's
/// `bdrv_inherited_options`).
#[derive(Clone, Copy, Default)]
struct Inherited {
    read_only: bool,
    cache_direct: bool,
    force_share: bool,
}

struct Ctx<'a> {
    graph: &'a BlockGraph,
    drivers: &'a Drivers,
    /// Every node added, so a failure can take them all back out.
    created: Vec<String>,
}

/// Opens `opts` and everything inline below it, adding the nodes to
/// `graph`; the top node is monitor-owned (`blockdev-add`'s) when
/// `monitor_owned`. On failure every node it added is closed and removed.
pub async fn open(
    graph: &BlockGraph,
    drivers: &Drivers,
    opts: &BlockdevOptions,
    monitor_owned: bool,
) -> Result<Arc<BlockNode>> {
    let mut ctx = Ctx {
        graph,
        drivers,
        created: Vec::new(),
    };
    let result = open_tree(
        &mut ctx,
        opts,
        Inherited::default(),
        monitor_owned,
        Vec::new(),
    )
    .await;
    if result.is_err() {
        for name in ctx.created.iter().rev() {
            if let Some(node) = graph.get(name) {
                // A filter opened on the way detaches from its disk again.
                node.close().await;
            }
            graph.discard(name);
        }
    }
    result
}

/// `chain` holds the host files of the images above, to refuse backing loops.
fn open_tree<'a>(
    ctx: &'a mut Ctx<'_>,
    opts: &'a BlockdevOptions,
    inherited: Inherited,
    monitor_owned: bool,
    chain: Vec<PathBuf>,
) -> OpenFuture<'a, Arc<BlockNode>> {
    Box::pin(async move {
        let read_only = opts.read_only.unwrap_or(inherited.read_only);
        let cache_direct = opts.cache_direct.unwrap_or(inherited.cache_direct);
        let force_share = opts.force_share.unwrap_or(inherited.force_share);
        let child_inherits = Inherited {
            read_only,
            cache_direct,
            force_share,
        };
        let file = match opts.driver.file_child() {
            None => None,
            Some(f) => Some(open_ref(ctx, f, child_inherits, chain.clone()).await?),
        };
        if force_share && !read_only {
            return Err(Error::invalid(
                "force-share=on can only be used with read-only images",
            ));
        }
        if matches!(&opts.driver, DriverOptions::File { filename, .. } if filename.is_empty()) {
            return Err(Error::invalid(
                "The 'file' block driver requires a file name",
            ));
        }
        let name = ctx.graph.claim_name(opts.node_name.as_deref())?;
        // Where the node goes in creation order: here, before any backing node.
        let mut position = ctx.graph.position();
        let driver: Box<dyn BlockDriver> = match &opts.driver {
            DriverOptions::File {
                filename,
                aio,
                locking,
            } => Box::new(open_file(
                filename,
                *aio,
                cache_direct,
                (read_only, force_share),
                *locking,
            )?),
            DriverOptions::Raw { offset, size, .. } => Box::new(RawDriver::open(
                file.expect("raw's file child was opened above"),
                RawOptions {
                    offset: raw_window(*offset, "offset")?,
                    size: raw_window(*size, "size")?,
                },
            )?),
            DriverOptions::Qcow2 { backing, cache, .. } => {
                let file = file.expect("qcow2's file child was opened above");
                // The options are checked against the header, as QEMU does
                // once it has read it, before anything is written.
                let header = Header::read(&file, !read_only).await?;
                let l2_cache_size = cache.check(header.cluster_size(), header.version >= 3)?;
                // qcow2 writes metadata whoever uses it: it locks its file
                // itself (after its option checks, where qsd reports a
                // conflict) and before it writes anything.
                lock_for_user(&file, read_only)?;
                let q = Qcow2Driver::open_with(
                    file.clone(),
                    None,
                    read_only,
                    Qcow2Options { l2_cache_size },
                )
                .await?;
                // QEMU names the image before it opens the backing chain.
                position = ctx.graph.position();
                let header_ref = q.header_backing().cloned();
                q.set_backing(
                    open_backing(ctx, &file, header_ref, backing, cache_direct, chain).await?,
                );
                Box::new(q)
            }
            DriverOptions::Blkdebug { image, opts: b } => {
                b.check_before_image()?;
                let image = open_ref(ctx, image, child_inherits, chain).await?;
                Box::new(b.open(image)?)
            }
            DriverOptions::Registered {
                driver,
                children,
                options,
                ..
            } => {
                let mut opened = Vec::with_capacity(children.len());
                for (role, r) in children {
                    opened.push((
                        *role,
                        open_ref(ctx, r, child_inherits, chain.clone()).await?,
                    ));
                }
                let factory = ctx
                    .drivers
                    .factories
                    .get(driver)
                    .ok_or_else(|| Error::unsupported(format!("Unknown driver '{driver}'")))?
                    .clone();
                factory
                    .open(FactoryOpen {
                        graph: ctx.graph,
                        file,
                        children: opened,
                        options: options.as_ref(),
                    })
                    .await?
            }
        };
        let node = BlockNode::new(name.clone(), driver, read_only, monitor_owned);
        node.set_cache_direct(cache_direct);
        if let Err(e) = ctx.graph.insert_at(node.clone(), position) {
            node.close().await;
            return Err(e);
        }
        ctx.created.push(name);
        Ok(node)
    })
}

/// A child given by name, or opened from its inline options.
async fn open_ref(
    ctx: &mut Ctx<'_>,
    r: &BlockdevRef,
    inherited: Inherited,
    chain: Vec<PathBuf>,
) -> Result<Arc<BlockNode>> {
    match r {
        BlockdevRef::Reference(n) => {
            let node = ctx.graph.get(n).ok_or_else(|| {
                Error::not_found(format!("Cannot find device='{n}' nor node-name='{n}'"))
            })?;
            Ok(node)
        }
        BlockdevRef::Inline(child) => open_tree(ctx, child, inherited, false, chain).await,
    }
}

/// Opens the `file` driver with QEMU's checks; `access` is (read-only,
/// force-share), which decide the image locks its users take.
fn open_file(
    filename: &str,
    aio: Option<FileAio>,
    cache_direct: bool,
    access: (bool, bool),
    locking: Locking,
) -> Result<FileDriver> {
    let (read_only, force_share) = access;
    let opts = FileOptions {
        filename: filename.to_string(),
        direct: cache_direct,
        read_only,
    };
    let f = FileDriver::open_unlocked_aio(&opts, locking, force_share, aio).map_err(|e| {
        // QEMU words these without the "Could not open" prefix.
        match e.get_ref().and_then(|i| i.downcast_ref::<Refusal>()) {
            Some(r) => Error::invalid(r.0.clone()),
            None => Error::io(format!("Could not open '{filename}'"), &e),
        }
    })?;

    if aio == Some(FileAio::Native) && !cache_direct {
        return Err(Error::invalid(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
    }
    Ok(f)
}

/// Takes the image locks of a user of `node` that reads only or also
/// writes: on the file under it, through `raw` and filters, as QEMU passes
/// its users' permissions down (a qcow2 node took its own at open). A node
/// nobody uses locks nothing, as in QEMU; livesnapd's users are qcow2
/// parents, backing links and NBD exports. Conflicts get QEMU's texts.
pub fn lock_for_user(node: &BlockNode, read_only: bool) -> Result<()> {
    if let Some(f) = node.driver::<FileDriver>() {
        return f.take_locks(read_only).map_err(lock_error);
    }
    if node.format_name() == "qcow2" {
        return Ok(());
    }
    for c in node.children() {
        if matches!(c.role, "file" | "image") {
            lock_for_user(&c.node, read_only)?;
        }
    }
    Ok(())
}

/// A failure to take image locks: a conflict in QEMU's words (without the
/// "Could not open" prefix, as QEMU), anything else as the system said.
fn lock_error(e: std::io::Error) -> Error {
    match as_conflict(&e) {
        Some(c) => Error::invalid(c.0.clone()),
        None => Error::io("Failed to lock the image", &e),
    }
}

/// A `raw` window bound as QEMU reads it back as a size: negative is out of range.
fn raw_window(value: Option<i64>, name: &str) -> Result<Option<u64>> {
    value
        .map(|v| {
            u64::try_from(v).map_err(|_| {
                Error::invalid(format!(
                    "Value '{v}' is out of range for parameter '{name}'"
                ))
            })
        })
        .transpose()
}

/// The backing node of a qcow2 image: none, the one given, or the chain named
/// in the header, opened read-only with the header's format (never probed).
async fn open_backing(
    ctx: &mut Ctx<'_>,
    file: &Arc<BlockNode>,
    header_ref: Option<BackingRef>,
    backing: &BackingOption,
    cache_direct: bool,
    mut chain: Vec<PathBuf>,
) -> Result<Option<Arc<BlockNode>>> {
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
            let node = open_ref(ctx, r, inherited, chain)
                .await
                .map_err(|e| e.context("Could not open backing file"))?;
            lock_for_user(&node, true)?;
            return Ok(Some(node));
        }
        BackingOption::FromHeader => header_ref,
    };
    let Some(bref) = header_ref else {
        return Ok(None);
    };
    let format = bref.require_format()?.to_string();
    let path = resolve_backing_filename(&file.filename(), &bref.filename);
    let here = std::fs::canonicalize(file.filename()).unwrap_or_else(|_| file.filename().into());
    chain.push(here);
    // The images above and this one, plus the backing image about to open.
    check_chain_depth(chain.len() + 1)?;
    if let Ok(target) = std::fs::canonicalize(&path) {
        if chain.contains(&target) {
            return Err(Error::invalid(format!(
                "Could not open backing file: Backing file '{path}' creates a loop in the backing chain"
            )));
        }
    }
    let file_opts = BlockdevRef::Inline(Box::new(BlockdevOptions::of(DriverOptions::File {
        filename: path.clone(),
        aio: None,
        locking: Locking::Auto,
    })));
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
            return Err(Error::unsupported(format!(
                "Could not open backing file: Unknown driver '{other}'"
            )))
        }
    };
    let node = open_tree(ctx, &BlockdevOptions::of(driver), inherited, false, chain)
        .await
        .map_err(|e| e.context("Could not open backing file"))?;
    lock_for_user(&node, true).map_err(|e| e.context("Could not open backing file"))?;
    Ok(Some(node))
}
