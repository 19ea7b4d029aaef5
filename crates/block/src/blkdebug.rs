//! The `blkdebug` fault-injection filter (QEMU's `block/blkdebug.c`,
//! `BlockdevOptionsBlkdebug` in `qapi/block-core.json`).
//!
//! A filter over an `image` child: every request is passed to the child
//! unless an `inject-error` rule matches it, in which case it fails with the
//! rule's errno. livesnap has no blkdebug event points inside its drivers, so
//! a rule's `event` is accepted (any of QEMU's `BlkdebugEvent` names) but
//! every request of a matching `iotype` counts as the event: a rule is
//! always active. `sector` (512-byte units, -1 = any) matches requests that
//! overlap that sector; flushes only match rules without a sector, as in QEMU.
//! The first matching rule, in the order given, decides.
//!
//! livesnap extensions, for tests of what happens around a slow or hung
//! device: `x-delay-ms` delays every matching request, `x-stall` holds
//! matching requests until the rules are changed ([`BlkdebugRules::set`],
//! QMP `x-blkdebug-set-rules`), after which they are checked again against
//! the new rules. With either, `errno` defaults to 0 (no error) instead of EIO.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::buf::IoBuf;
use crate::driver::{BlockDriver, BlockStatus, ChildRef, IoFuture, Limits, WriteFlags, ZeroFlags};
use crate::node::BlockNode;

/// QEMU's `BlkdebugEvent` names (QEMU 10); accepted, see the module docs.
pub const EVENT_NAMES: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// QEMU's `BlkdebugIOType`: the kind of request a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Data writes.
    Write,
    /// Write-zeroes requests.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
    /// Block-status queries.
    BlockStatus,
}

impl IoType {
    /// QEMU's names, in schema order.
    pub const NAMES: &'static [&'static str] = &[
        "read",
        "write",
        "write-zeroes",
        "discard",
        "flush",
        "block-status",
    ];

    /// Parses one of [`IoType::NAMES`].
    pub fn parse(s: &str) -> Option<IoType> {
        Some(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }

    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::WriteZeroes => "write-zeroes",
            IoType::Discard => "discard",
            IoType::Flush => "flush",
            IoType::BlockStatus => "block-status",
        }
    }
}

/// One `inject-error` rule (QEMU's `BlkdebugInjectErrorOptions` plus the
/// livesnap extensions `x-delay-ms` and `x-stall`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectError {
    /// QEMU's event name; every request counts as the event (module docs).
    pub event: String,
    /// Only active in this state; 0 = any. The state is always 1 (no `set-state`).
    pub state: i64,
    /// Requests of this type; `None` = QEMU's default (all but block-status).
    pub iotype: Option<IoType>,
    /// Error returned; 0 (or negative) injects no error.
    pub errno: i32,
    /// Sector (512 bytes) a request must overlap; -1 = any request.
    pub sector: i64,
    /// Remove the rule after it matched once.
    pub once: bool,
    /// Fail without first yielding to the runtime (QEMU: without a coroutine yield).
    pub immediately: bool,
    /// livesnap `x-delay-ms`: wait this long before going on.
    pub delay: Option<Duration>,
    /// livesnap `x-stall`: hold the request until the rules change.
    pub stall: bool,
}

impl InjectError {
    /// A rule failing every request of `iotype` with `errno` (event `none`, any sector).
    pub fn new(iotype: IoType, errno: i32) -> InjectError {
        InjectError {
            event: "none".into(),
            state: 0,
            iotype: Some(iotype),
            errno,
            sector: -1,
            once: false,
            immediately: false,
            delay: None,
            stall: false,
        }
    }

    /// A rule that only delays requests of `iotype` by `d`.
    pub fn delay(iotype: IoType, d: Duration) -> InjectError {
        InjectError {
            delay: Some(d),
            ..InjectError::new(iotype, 0)
        }
    }

    /// A rule that holds requests of `iotype` until the rules change.
    pub fn stall(iotype: IoType) -> InjectError {
        InjectError {
            stall: true,
            ..InjectError::new(iotype, 0)
        }
    }

    /// The same rule, limited to requests overlapping `sector`.
    pub fn at_sector(mut self, sector: i64) -> InjectError {
        self.sector = sector;
        self
    }

    /// The same rule, removed once it matched.
    pub fn once(mut self) -> InjectError {
        self.once = true;
        self
    }

    fn matches(&self, iotype: IoType, offset: u64, bytes: u64) -> bool {
        let type_ok = match self.iotype {
            Some(t) => t == iotype,
            None => iotype != IoType::BlockStatus,
        };
        // The state never leaves 1: no set-state rules.
        let state_ok = self.state == 0 || self.state == 1;
        let where_ok = match self.sector {
            -1 => true,
            s if s < 0 => false,
            s => {
                let at = (s as u64).saturating_mul(512);
                // Any overlap; QEMU wants the sector's first byte inside the request.
                bytes != 0 && at < offset.saturating_add(bytes) && offset < at.saturating_add(512)
            }
        };
        type_ok && state_ok && where_ok
    }
}

/// The live rule set of one blkdebug node; clone the `Arc` to change rules
/// while the node is in use.
pub struct BlkdebugRules {
    rules: Mutex<Vec<InjectError>>,
    // Bumped by every change from outside; stalled requests wait on it.
    generation: watch::Sender<u64>,
    hits: AtomicU64,
    stalled: AtomicUsize,
}

impl BlkdebugRules {
    fn new(rules: Vec<InjectError>) -> Arc<BlkdebugRules> {
        Arc::new(BlkdebugRules {
            rules: Mutex::new(rules),
            generation: watch::channel(0).0,
            hits: AtomicU64::new(0),
            stalled: AtomicUsize::new(0),
        })
    }

    /// Replaces every rule; stalled requests are checked again against the new ones.
    pub fn set(&self, rules: Vec<InjectError>) {
        *self.rules.lock().unwrap() = rules;
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Appends a rule (it applies after the existing ones).
    pub fn add(&self, rule: InjectError) {
        self.rules.lock().unwrap().push(rule);
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Removes every rule and lets stalled requests go on.
    pub fn clear(&self) {
        self.set(Vec::new());
    }

    /// The current rules.
    pub fn rules(&self) -> Vec<InjectError> {
        self.rules.lock().unwrap().clone()
    }

    /// How many requests matched a rule so far (each stall or delay counts once per match).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// How many requests are held by an `x-stall` rule right now.
    pub fn stalled(&self) -> usize {
        self.stalled.load(Ordering::SeqCst)
    }

    /// QEMU's `rule_check`, with the extensions: Ok(()) lets the request through.
    async fn check(&self, iotype: IoType, offset: u64, bytes: u64) -> io::Result<()> {
        loop {
            let mut rx = self.generation.subscribe();
            let rule = {
                let mut rules = self.rules.lock().unwrap();
                let Some(i) = rules.iter().position(|r| r.matches(iotype, offset, bytes)) else {
                    return Ok(());
                };
                let rule = rules[i].clone();
                if rule.once {
                    rules.remove(i);
                }
                rule
            };
            self.hits.fetch_add(1, Ordering::SeqCst);
            if rule.stall {
                self.stalled.fetch_add(1, Ordering::SeqCst);
                let _ = rx.changed().await;
                self.stalled.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            if let Some(d) = rule.delay {
                tokio::time::sleep(d).await;
            }
            if rule.errno <= 0 {
                return Ok(());
            }
            if !rule.immediately {
                tokio::task::yield_now().await;
            }
            return Err(io::Error::from_raw_os_error(rule.errno));
        }
    }
}

/// Options of the `blkdebug` driver that livesnap acts on (QEMU's
/// `BlockdevOptionsBlkdebug`; the QMP layer refuses the others).
#[derive(Clone, Debug, Default)]
pub struct BlkdebugOptions {
    /// `align`: request alignment in bytes (power of two).
    pub align: Option<u64>,
    /// `max-transfer`: largest request passed to the child; bigger ones are split.
    pub max_transfer: Option<u64>,
    /// `max-write-zero`: largest write-zeroes passed to the child.
    pub max_write_zero: Option<u64>,
    /// `max-discard`: largest discard passed to the child.
    pub max_discard: Option<u64>,
    /// `inject-error` rules, in order.
    pub inject_error: Vec<InjectError>,
}

/// Largest value QEMU accepts for the size options (`INT_MAX`, exclusive).
const INT_MAX: u64 = i32::MAX as u64;

/// The blkdebug filter over one `image` node.
pub struct BlkdebugDriver {
    image: Arc<BlockNode>,
    rules: Arc<BlkdebugRules>,
    align: u64,
    max_transfer: u64,
    max_write_zero: u64,
    max_discard: u64,
}

impl BlkdebugDriver {
    /// Opens the filter over `image`, with QEMU's checks of the limits (and its texts).
    pub fn open(image: Arc<BlockNode>, opts: BlkdebugOptions) -> crate::Result<BlkdebugDriver> {
        let align_opt = opts.align.unwrap_or(0);
        if align_opt != 0 && (align_opt >= INT_MAX || !align_opt.is_power_of_two()) {
            return Err(crate::Error::invalid(format!(
                "Cannot meet constraints with align {align_opt}"
            )));
        }
        let child_align = image.limits().request_alignment.max(1) as u64;
        let align = align_opt.max(child_align);
        let check = |v: Option<u64>, unit: u64, name: &str| -> crate::Result<u64> {
            let v = v.unwrap_or(0);
            if v != 0 && (v >= INT_MAX || !v.is_multiple_of(unit)) {
                return Err(crate::Error::invalid(format!(
                    "Cannot meet constraints with {name} {v}"
                )));
            }
            Ok(v)
        };
        let max_transfer = check(opts.max_transfer, align, "max-transfer")?;
        let max_write_zero = check(opts.max_write_zero, align, "max-write-zero")?;
        let max_discard = check(opts.max_discard, align, "max-discard")?;
        Ok(BlkdebugDriver {
            image,
            rules: BlkdebugRules::new(opts.inject_error),
            align: if align_opt != 0 { align } else { child_align },
            max_transfer,
            max_write_zero,
            max_discard,
        })
    }

    /// The node's rule set, to change rules at run time.
    pub fn rules(&self) -> Arc<BlkdebugRules> {
        self.rules.clone()
    }

    /// Splits `[offset, offset + len)` into pieces of at most `max` bytes (0 = no limit).
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let step = if max == 0 { len.max(1) } else { max };
        (0..len.div_ceil(step)).map(move |i| {
            let at = i * step;
            (offset + at, step.min(len - at))
        })
    }
}

/// The blkdebug members after `image` as `blockdev-add` gives them, checked
/// in QEMU's order when the node opens: [`Self::check_before_image`], then
/// [`Self::open`].
pub struct BlkdebugOpenOptions {
    /// `config`: a file name (refused once it is found readable).
    pub config: Option<String>,
    /// `align`, `max-transfer`, `opt-write-zero`, `max-write-zero`,
    /// `opt-discard`, `max-discard`, in that order, as given.
    pub sizes: [(&'static str, Option<i64>); 6],
    /// `inject-error`.
    pub inject_error: Vec<InjectError>,
    /// How many `set-state` rules were given (refused).
    pub set_state: usize,
    /// `take-child-perms` or `unshare-child-perms`, if given (refused).
    pub perms: Option<&'static str>,
}

/// A size QEMU reads back through QemuOpts: negative is out of range.
fn size_option(value: Option<i64>, key: &str) -> crate::Result<Option<u64>> {
    value
        .map(|v| {
            u64::try_from(v).map_err(|_| {
                crate::Error::invalid(format!("Value '{v}' is out of range for parameter '{key}'"))
            })
        })
        .transpose()
}

impl BlkdebugOpenOptions {
    /// What QEMU's `blkdebug_open` checks before it opens the image: the
    /// options as sizes, then the config file.
    pub fn check_before_image(&self) -> crate::Result<()> {
        for (key, v) in self.sizes {
            size_option(v, key)?;
        }
        let Some(path) = &self.config else {
            return Ok(());
        };
        std::fs::File::open(path)
            .map_err(|e| crate::Error::io("Could not read blkdebug config file", &e))?;
        Err(crate::Error::unsupported(
            "blkdebug config files are not supported by livesnapd; give inject-error rules instead",
        ))
    }

    /// Opens the filter over `image`: QEMU's limit checks, then the options
    /// QEMU leaves unused, then what livesnapd refuses.
    pub fn open(&self, image: Arc<BlockNode>) -> crate::Result<BlkdebugDriver> {
        let v = |i: usize| self.sizes[i].1.map(|v| v as u64);
        let drv = BlkdebugDriver::open(
            image,
            BlkdebugOptions {
                align: v(0),
                max_transfer: v(1),
                max_write_zero: v(3),
                max_discard: v(5),
                inject_error: self.inject_error.clone(),
            },
        )?;
        // QEMU's own limit checks for the two options refused below.
        let align = drv.limits().request_alignment as u64;
        for i in [2, 4] {
            let (key, value) = (self.sizes[i].0, v(i).unwrap_or(0));
            if value != 0 && (value >= i32::MAX as u64 || !value.is_multiple_of(align)) {
                return Err(crate::Error::invalid(format!(
                    "Cannot meet constraints with {key} {value}"
                )));
            }
        }
        if let Some(key) = self.perms {
            // QEMU 10 itself refuses these once flattened (even empty lists).
            return Err(crate::Error::unsupported(format!(
                "Block protocol 'blkdebug' doesn't support the option '{key}'"
            )));
        }
        if self.set_state > 0 {
            return Err(crate::Error::unsupported(
                "blkdebug set-state rules are not supported by livesnapd",
            ));
        }
        for i in [2, 4] {
            if v(i).is_some_and(|v| v != 0) {
                return Err(crate::Error::unsupported(format!(
                    "blkdebug {} is not supported by livesnapd",
                    self.sizes[i].0
                )));
            }
        }
        Ok(drv)
    }
}

/// The rules of `node`, if it is a blkdebug node.
pub fn rules_of(node: &BlockNode) -> Option<Arc<BlkdebugRules>> {
    node.driver::<BlkdebugDriver>().map(BlkdebugDriver::rules)
}

/// Opens a blkdebug filter over `image` as node `name`; returns the node
/// and its rules (the in-process way to build one).
pub fn new_node(
    name: &str,
    image: Arc<BlockNode>,
    opts: BlkdebugOptions,
) -> crate::Result<(Arc<BlockNode>, Arc<BlkdebugRules>)> {
    let read_only = image.read_only();
    let drv = BlkdebugDriver::open(image, opts)?;
    let rules = drv.rules();
    let node = BlockNode::new(name, Box::new(drv), read_only, false);
    Ok((node, rules))
}

impl BlockDriver for BlkdebugDriver {
    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    fn limits(&self) -> Limits {
        let child = self.image.limits();
        Limits {
            request_alignment: self.align as u32,
            max_transfer: if self.max_transfer != 0 {
                self.max_transfer as u32
            } else {
                child.max_transfer
            },
        }
    }

    fn filename(&self) -> String {
        // The image's file, so path-based users (backing names, snapshots)
        // keep working; QEMU reports "blkdebug::FILE" (docs/qmp.md).
        self.image.filename()
    }

    fn children(&self) -> Vec<ChildRef> {
        vec![ChildRef {
            role: "image",
            node: self.image.clone(),
        }]
    }

    fn filtered(&self) -> Option<Arc<BlockNode>> {
        Some(self.image.clone())
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.rules.check(IoType::Read, offset, len).await?;
            if self.max_transfer == 0 || len <= self.max_transfer {
                return self.image.read_into(offset, buf).await;
            }
            let mut buf = buf;
            for (at, n) in Self::pieces(offset, len, self.max_transfer) {
                let part = self.image.read(at, n as usize).await?;
                let skip = (at - offset) as usize;
                buf[skip..skip + n as usize].copy_from_slice(&part);
            }
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.rules.check(IoType::Write, offset, len).await?;
            if self.max_transfer == 0 || len <= self.max_transfer {
                return self.image.write(offset, buf, flags).await;
            }
            for (at, n) in Self::pieces(offset, len, self.max_transfer) {
                let skip = (at - offset) as usize;
                let part = IoBuf::from_slice(&buf[skip..skip + n as usize]);
                self.image.write(at, part, flags).await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.rules.check(IoType::WriteZeroes, offset, len).await?;
            for (at, n) in Self::pieces(offset, len, self.max_write_zero) {
                self.image.write_zeroes(at, n, flags).await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.rules.check(IoType::Discard, offset, len).await?;
            for (at, n) in Self::pieces(offset, len, self.max_discard) {
                self.image.discard(at, n).await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.rules.check(IoType::Flush, 0, 0).await?;
            self.image.flush().await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            self.rules.check(IoType::BlockStatus, offset, len).await?;
            self.image.block_status(offset, len).await
        })
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        // A filter passes resizes through (QEMU's bdrv_co_truncate on filters).
        Box::pin(self.image.truncate(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_matching() {
        let r = InjectError::new(IoType::Write, 5).at_sector(8);
        assert!(r.matches(IoType::Write, 4096, 512));
        assert!(r.matches(IoType::Write, 0, 4608));
        assert!(!r.matches(IoType::Write, 0, 4096));
        assert!(!r.matches(IoType::Write, 4608, 512));
        assert!(r.matches(IoType::Write, 4600, 8));
        assert!(r.matches(IoType::Write, 4000, 97));
        assert!(!r.matches(IoType::Read, 4096, 512));
        let any = InjectError {
            iotype: None,
            ..InjectError::new(IoType::Read, 5)
        };
        assert!(any.matches(IoType::Flush, 0, 0));
        assert!(!any.matches(IoType::BlockStatus, 0, 512));
        // A flush covers no sector: only sector-less rules apply.
        let flush_at = InjectError::new(IoType::Flush, 5).at_sector(0);
        assert!(!flush_at.matches(IoType::Flush, 0, 0));
        let other_state = InjectError {
            state: 2,
            ..InjectError::new(IoType::Read, 5)
        };
        assert!(!other_state.matches(IoType::Read, 0, 512));
    }

    #[test]
    fn pieces_cover_the_range() {
        let p: Vec<_> = BlkdebugDriver::pieces(100, 1000, 300).collect();
        assert_eq!(p, vec![(100, 300), (400, 300), (700, 300), (1000, 100)]);
        let p: Vec<_> = BlkdebugDriver::pieces(0, 4096, 0).collect();
        assert_eq!(p, vec![(0, 4096)]);
        assert_eq!(BlkdebugDriver::pieces(0, 0, 0).count(), 0);
    }
}
