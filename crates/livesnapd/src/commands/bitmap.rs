//! `block-dirty-bitmap-add`, `-remove`, `-clear`, `-enable`, `-disable`,
//! `-merge` (QEMU's `block/monitor/bitmap-qmp-cmds.c`), and the
//! `dirty-bitmaps` member of the node queries.
//!
//! Each command is read into a typed request (`parse_*`, QEMU's argument
//! checks) and carried out apart from that (`apply` or a function of the
//! request), so `transaction` actions reuse both halves.

use std::sync::Arc;

use livesnap_block::bitmaps::check_name;
use livesnap_block::{lookup_bitmap, BitmapInfo, BitmapRef, BlockNode, DirtyBitmap};
use livesnap_qmp::{Args, Elem, QmpError};
use serde_json::{json, Value};

use super::empty;
use super::mirror::lookup_node;
use crate::daemon::Daemon;

/// `block-dirty-bitmap-add` (QEMU's `BlockDirtyBitmapAdd`).
#[derive(Clone, Debug)]
pub struct AddBitmap {
    /// The node's name.
    pub node: String,
    /// The new bitmap's name.
    pub name: String,
    /// Bytes per bit; the node's default when not given.
    pub granularity: Option<u64>,
    /// Stored in the image.
    pub persistent: bool,
    /// Created not recording.
    pub disabled: bool,
}

/// A bitmap of a node (QEMU's `BlockDirtyBitmap`): the arguments of
/// `-remove`, `-clear`, `-enable` and `-disable`.
#[derive(Clone, Debug)]
pub struct BitmapName {
    /// The node's name.
    pub node: String,
    /// The bitmap's name.
    pub name: String,
}

/// `block-dirty-bitmap-merge` (QEMU's `BlockDirtyBitmapMerge`).
#[derive(Clone, Debug)]
pub struct MergeBitmaps {
    /// The node of the target.
    pub node: String,
    /// The bitmap merged into.
    pub target: String,
    /// What is merged, in order.
    pub bitmaps: Vec<BitmapRef>,
}

/// Reads `block-dirty-bitmap-add`'s arguments.
pub fn parse_add(mut args: Args) -> Result<AddBitmap, QmpError> {
    let node = args.req_str("node")?;
    let name = args.req_str("name")?;
    let granularity = args.opt_u32("granularity")?.map(u64::from);
    let persistent = args.opt_bool("persistent")?.unwrap_or(false);
    let disabled = args.opt_bool("disabled")?.unwrap_or(false);
    args.finish()?;
    Ok(AddBitmap {
        node,
        name,
        granularity,
        persistent,
        disabled,
    })
}

/// Reads the `node`, `name` pair of `-remove`, `-clear`, `-enable`, `-disable`.
pub fn parse_bitmap(mut args: Args) -> Result<BitmapName, QmpError> {
    let node = args.req_str("node")?;
    let name = args.req_str("name")?;
    args.finish()?;
    Ok(BitmapName { node, name })
}

/// Reads `block-dirty-bitmap-merge`'s arguments.
pub fn parse_merge(mut args: Args) -> Result<MergeBitmaps, QmpError> {
    let node = args.req_str("node")?;
    let target = args.req_str("target")?;
    let bitmaps = parse_bitmap_refs(args.req_list("bitmaps")?)?;
    args.finish()?;
    Ok(MergeBitmaps {
        node,
        target,
        bitmaps,
    })
}

/// Reads a list of QEMU's `BlockDirtyBitmapOrStr`: a bitmap name, or
/// `{node, name}` (merge sources, export bitmaps).
pub fn parse_bitmap_refs(elems: Vec<Elem>) -> Result<Vec<BitmapRef>, QmpError> {
    elems
        .into_iter()
        .map(|e| match e.value() {
            Value::String(_) => e.into_str().map(BitmapRef::Local),
            Value::Object(_) => {
                let mut o = e.into_object()?;
                let node = o.req_str("node")?;
                let name = o.req_str("name")?;
                o.finish()?;
                Ok(BitmapRef::External { node, name })
            }
            _ => Err(e.invalid_alternate("BlockDirtyBitmapOrStr")),
        })
        .collect()
}

fn generic(e: impl Into<String>) -> QmpError {
    QmpError::generic(e.into())
}

impl AddBitmap {
    /// Adds the bitmap; a persistent one is in the image before this returns.
    pub async fn apply(&self, d: &Daemon) -> Result<(), QmpError> {
        // QEMU checks the name before it looks the node up.
        check_name(&self.name).map_err(generic)?;
        let node = lookup_node(d, &self.node)?;
        node.add_bitmap(&self.name, self.granularity, self.persistent, self.disabled)
            .await
            .map_err(generic)
    }
}

impl BitmapName {
    /// The node holding the bitmap, with QEMU's texts when either is missing.
    pub fn lookup(&self, d: &Daemon) -> Result<Arc<BlockNode>, QmpError> {
        lookup_bitmap(&d.graph, &self.node, &self.name).map_err(generic)
    }

    /// `block-dirty-bitmap-remove`.
    pub async fn remove(&self, d: &Daemon) -> Result<(), QmpError> {
        let node = self.lookup(d)?;
        node.remove_bitmap(&self.name).await.map_err(generic)
    }

    /// `block-dirty-bitmap-clear`; gives back the bits it held.
    pub fn clear(&self, d: &Daemon) -> Result<DirtyBitmap, QmpError> {
        let node = self.lookup(d)?;
        node.clear_bitmap(&self.name).map_err(generic)
    }

    /// `block-dirty-bitmap-enable` (`true`) or `-disable` (`false`).
    pub async fn set_enabled(&self, d: &Daemon, enabled: bool) -> Result<(), QmpError> {
        let node = self.lookup(d)?;
        node.set_bitmap_enabled(&self.name, enabled)
            .await
            .map_err(generic)
    }
}

impl MergeBitmaps {
    /// Merges; gives back the target's old bits.
    pub async fn apply(&self, d: &Daemon) -> Result<DirtyBitmap, QmpError> {
        let node = lookup_bitmap(&d.graph, &self.node, &self.target).map_err(generic)?;
        node.merge_bitmaps(&d.graph, &self.target, &self.bitmaps)
            .await
            .map_err(generic)
    }
}

pub(super) async fn add(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    parse_add(args)?.apply(d).await.map(|()| empty())
}

pub(super) async fn remove(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    parse_bitmap(args)?.remove(d).await.map(|()| empty())
}

pub(super) fn clear(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    parse_bitmap(args)?.clear(d).map(|_| empty())
}

pub(super) async fn enable(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    parse_bitmap(args)?
        .set_enabled(d, true)
        .await
        .map(|()| empty())
}

pub(super) async fn disable(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    parse_bitmap(args)?
        .set_enabled(d, false)
        .await
        .map(|()| empty())
}

pub(super) async fn merge(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    parse_merge(args)?.apply(d).await.map(|_| empty())
}

/// QEMU's `BlockDirtyInfo`, members in qsd's order; `name` only for a
/// named bitmap and `inconsistent` only when true, as QEMU leaves them out
/// otherwise.
pub(super) fn dirty_info(b: &BitmapInfo) -> Value {
    let mut v = json!({
        "recording": b.recording,
        "persistent": b.persistent,
        "busy": b.busy,
        "granularity": b.granularity,
        "count": b.count,
    });
    if b.inconsistent {
        v["inconsistent"] = json!(true);
    }
    if let (Some(name), Some(m)) = (&b.name, v.as_object_mut()) {
        m.shift_insert(0, "name".into(), json!(name));
    }
    v
}
