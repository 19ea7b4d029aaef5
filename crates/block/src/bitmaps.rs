//! The named dirty bitmaps of a node (QEMU's `block/dirty-bitmap.c`): what
//! `block-dirty-bitmap-*` manage, what incremental backups copy from and what
//! NBD exports as `qemu:dirty-bitmap:NAME`.
//!
//! A node keeps a [`BitmapSet`]; every write, write-zeroes and discard that
//! reaches the node's driver marks the enabled bitmaps dirty. Persistent
//! bitmaps live in the image through the driver's [`BitmapStore`], which
//! keeps them crash-safe: a range is dirty on disk before the write that
//! dirties it is issued (a write-intent log, as md's bitmap), so a bitmap
//! reopened after `kill -9` may over-approximate but never misses a write.
//!
//! A bitmap in use by a job or an export is *busy* and refuses changes;
//! a job that consumes a bitmap *freezes* it (QEMU's successor): the content
//! at the job's start is set aside and new writes are recorded beside it,
//! and when the job ends the set-aside part is dropped or merged back.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use crate::bitmap::DirtyBitmap;
use crate::driver::{FormatSpecific, IoFuture};
use crate::graph::BlockGraph;
use crate::node::BlockNode;

/// Largest granularity QEMU accepts (`uint32`, a power of two).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// Smallest granularity QEMU accepts.
pub const MIN_GRANULARITY: u64 = 512;

/// Longest bitmap name a qcow2 image stores.
pub const MAX_NAME_LEN: usize = 1023;

/// One bitmap as QMP reports it (QEMU's `BlockDirtyInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name; none for the anonymous bitmap that records
    /// writes while a job holds the named one frozen (QEMU's successor).
    pub name: Option<String>,
    /// Dirty bytes.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Writes are being recorded.
    pub recording: bool,
    /// In use by a job or an export.
    pub busy: bool,
    /// Stored in the image.
    pub persistent: bool,
    /// Loaded from an image that was not closed cleanly by a writer that
    /// keeps its bitmaps crash-safe: its content cannot be trusted.
    pub inconsistent: bool,
}

/// A persistent bitmap as an image holds it.
#[derive(Clone, Debug)]
pub struct StoredBitmap {
    /// The bitmap's name.
    pub name: String,
    /// Writes are recorded into it (qcow2's `auto` flag).
    pub enabled: bool,
    /// The image says the content cannot be trusted (qcow2's `in_use`
    /// left by a writer that did not keep the bitmap crash-safe).
    pub inconsistent: bool,
    /// The dirty bits (granularity and size included).
    pub bits: DirtyBitmap,
}

/// Where a driver keeps persistent bitmaps (qcow2's bitmap extension).
///
/// The node owns the bitmaps in memory; the store owns their on-disk form
/// and the write-intent state (which bits are already durable).
pub trait BitmapStore: Send + Sync {
    /// The bitmaps the image held when it was opened (taken once, by the
    /// node, when it is created).
    fn take_loaded(&self) -> Vec<StoredBitmap>;

    /// True when the image was opened read-only: its bitmaps are loaded
    /// read-only and nothing is written back.
    fn read_only(&self) -> bool;

    /// QEMU's `can_store_new_dirty_bitmap` check for a new bitmap beside the
    /// ones the image holds, with QEMU's reason text (the node adds "Can't
    /// make bitmap ... persistent").
    fn check_storable(&self, name: &str, granularity: u64) -> crate::Result<()>;

    /// Writes `bitmaps`, the node's whole persistent set, to the image in
    /// place of what it held. While the image stays open (`closing` false)
    /// the bitmaps are marked in use and the write-intent state starts
    /// again from exactly these bits; on close they are marked clean.
    fn store(&self, bitmaps: Vec<StoredBitmap>, closing: bool) -> IoFuture<'_, ()>;

    /// Makes the chunks of `[offset, offset+len)` dirty on disk in every
    /// recording bitmap of the last [`BitmapStore::store`], durably, before
    /// the write that dirties them is issued. Cheap when they already are
    /// (the common case).
    fn mark_dirty(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
}

/// A named bitmap of a node.
#[derive(Clone, Debug)]
pub struct NamedBitmap {
    name: String,
    bits: DirtyBitmap,
    /// The content set aside by a job that froze the bitmap.
    frozen: Option<DirtyBitmap>,
    enabled: bool,
    persistent: bool,
    inconsistent: bool,
    readonly: bool,
    /// Users holding the bitmap (jobs, exports).
    busy: usize,
    /// Its place in the image's bitmap directory when the image was opened.
    loaded_at: Option<usize>,
    /// When it was made, and when it was last frozen, on the set's clock:
    /// QEMU lists bitmaps newest first, a job's successor among them.
    created: u64,
    frozen_at: u64,
}

impl NamedBitmap {
    /// The bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every dirty bit, including a frozen part.
    pub fn content(&self) -> DirtyBitmap {
        let mut all = self.bits.clone();
        if let Some(f) = &self.frozen {
            all.merge(f);
        }
        all
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.bits.granularity()
    }

    /// Writes are recorded into it.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Stored in the image.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// In use by a job or an export.
    pub fn busy(&self) -> bool {
        self.busy > 0 || self.frozen.is_some()
    }

    /// Size of the disk the bitmap covers (the node's size when it was made).
    pub fn size(&self) -> u64 {
        self.bits.size()
    }

    /// [`DirtyBitmap::extents`] of the whole content.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        match self.frozen {
            None => self.bits.extents(offset, len, max),
            Some(_) => self.content().extents(offset, len, max),
        }
    }

    /// QMP's view: the named bitmap and, while a job holds it frozen, the
    /// anonymous successor QEMU creates then, with the writes since the
    /// freeze; the named one shows the frozen content, busy, recording
    /// while its successor does.
    fn infos(&self) -> (BitmapInfo, Option<BitmapInfo>) {
        // QEMU counts whole chunks, past the disk's end too (a 2 GiB chunk
        // of a 1 MiB disk counts 2 GiB, as qsd reports).
        let count = |b: &DirtyBitmap| b.dirty_chunks() * self.granularity();
        let named = BitmapInfo {
            name: Some(self.name.clone()),
            count: count(self.frozen.as_ref().unwrap_or(&self.bits)),
            granularity: self.granularity(),
            recording: self.enabled,
            busy: self.busy(),
            persistent: self.persistent,
            inconsistent: self.inconsistent,
        };
        if self.frozen.is_none() {
            return (named, None);
        }
        let successor = BitmapInfo {
            name: None,
            count: count(&self.bits),
            busy: false,
            persistent: false,
            inconsistent: false,
            ..named.clone()
        };
        (named, Some(successor))
    }

    fn stored(&self) -> StoredBitmap {
        StoredBitmap {
            name: self.name.clone(),
            enabled: self.enabled,
            inconsistent: self.inconsistent,
            bits: self.content(),
        }
    }
}

/// What a frozen bitmap becomes when the job that froze it ends.
#[derive(Debug)]
pub enum Thaw {
    /// QEMU's abdicate (a successful `on-success` or `always` backup): the
    /// set-aside content is dropped, only the writes since the freeze stay,
    /// plus the given bits (what a failed `always` job did not copy). The
    /// successor takes the bitmap's name, so the bitmap is listed as made
    /// at the freeze.
    Abdicate(Option<DirtyBitmap>),
    /// QEMU's reclaim (a failed or `never` backup): the set-aside content
    /// comes back beside the writes since the freeze; the bitmap keeps its
    /// place.
    Reclaim,
}

/// What a bitmap operation wants checked before it changes anything
/// (QEMU's `BdrvBitmapFlags` for `bdrv_dirty_bitmap_check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Changing the content (clear, merge into, a job's freeze): busy,
    /// read-only and inconsistent bitmaps refuse (`BDRV_BITMAP_DEFAULT`).
    Modify,
    /// Reading the content or switching recording (merge from, export,
    /// enable, disable): busy and inconsistent bitmaps refuse
    /// (`BDRV_BITMAP_ALLOW_RO`).
    Read,
    /// Removing: busy and read-only bitmaps refuse; an inconsistent one
    /// may go, which is the way out of that state (`BUSY | RO`).
    Remove,
}

/// The named bitmaps of one node, newest first (the order QEMU lists them).
#[derive(Debug, Default)]
pub struct BitmapSet {
    list: Vec<NamedBitmap>,
    /// Counts bitmaps made and frozen, to list them in QEMU's order.
    clock: u64,
    /// Some persistent bit was cleared since the image last got the set:
    /// the next flush writes it (clean bits reach the disk lazily).
    cleared: bool,
}

/// QEMU's `check_bitmap` texts.
fn busy_error(name: &str) -> crate::Error {
    crate::Error::busy(format!(
        "Bitmap '{name}' is currently in use by another operation and cannot be used"
    ))
}

impl BitmapSet {
    /// The bitmaps an image held when opened (`readonly` for a read-only
    /// open), in the image's order. QEMU lists them the other way round
    /// (each loaded bitmap goes to the front), and so does this. A
    /// read-only image's bitmaps keep their recording state, as in QEMU
    /// (nothing writes to such a node anyway).
    pub fn from_stored(stored: Vec<StoredBitmap>, readonly: bool) -> BitmapSet {
        let list = stored
            .into_iter()
            .enumerate()
            .rev()
            .map(|(i, s)| NamedBitmap {
                name: s.name,
                bits: s.bits,
                frozen: None,
                enabled: s.enabled && !s.inconsistent,
                persistent: true,
                inconsistent: s.inconsistent,
                readonly,
                busy: 0,
                loaded_at: Some(i),
                created: i as u64,
                frozen_at: 0,
            })
            .collect::<Vec<_>>();
        BitmapSet {
            clock: list.len() as u64,
            list,
            cleared: false,
        }
    }

    /// True when there is no bitmap.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The bitmap called `name`.
    pub fn get(&self, name: &str) -> Option<&NamedBitmap> {
        self.list.iter().find(|b| b.name == name)
    }

    fn get_mut(&mut self, name: &str) -> crate::Result<&mut NamedBitmap> {
        self.list
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| crate::Error::not_found(format!("Dirty bitmap '{name}' not found")))
    }

    /// The bitmap called `name`, checked for `what` as QEMU's
    /// `bdrv_dirty_bitmap_check` does (busy, read-only, inconsistent).
    pub fn checked(&self, name: &str, what: Use) -> crate::Result<&NamedBitmap> {
        let b = self
            .get(name)
            .ok_or_else(|| crate::Error::not_found(format!("Dirty bitmap '{name}' not found")))?;
        check(b, what)?;
        Ok(b)
    }

    /// QMP's view of every bitmap, newest first.
    pub fn infos(&self) -> Vec<BitmapInfo> {
        // A successor is a bitmap of its own in QEMU, made at the freeze:
        // it comes before every bitmap made earlier.
        let infos: Vec<_> = self.list.iter().map(NamedBitmap::infos).collect();
        let mut successors: Vec<(u64, BitmapInfo)> = self
            .list
            .iter()
            .zip(&infos)
            .filter_map(|(b, (_, s))| s.clone().map(|s| (b.frozen_at, s)))
            .collect();
        successors.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        let mut successors = successors.into_iter().peekable();
        let mut out = Vec::new();
        for (b, (named, _)) in self.list.iter().zip(infos) {
            while let Some((_, s)) = successors.next_if(|(at, _)| *at > b.created) {
                out.push(s);
            }
            out.push(named);
        }
        out.extend(successors.map(|(_, s)| s));
        out
    }

    /// The persistent bitmaps as the image must hold them, in the order
    /// QEMU's bitmap directory has them once it closes the image: those it
    /// held when opened in their places, then the new ones as listed
    /// (newest first). A reopened image lists the directory the other way
    /// round ([`BitmapSet::from_stored`]), so both daemons list alike.
    pub fn stored(&self) -> Vec<StoredBitmap> {
        let mut loaded: Vec<&NamedBitmap> = self
            .list
            .iter()
            .filter(|b| b.persistent && b.loaded_at.is_some())
            .collect();
        loaded.sort_by_key(|b| b.loaded_at);
        let new = self
            .list
            .iter()
            .filter(|b| b.persistent && b.loaded_at.is_none());
        loaded
            .into_iter()
            .chain(new)
            .map(NamedBitmap::stored)
            .collect()
    }

    /// Checks a new bitmap `name` as QEMU's `block-dirty-bitmap-add` does
    /// (the store's check for persistent ones is the caller's).
    pub fn check_new(&self, name: &str, granularity: u64) -> crate::Result<()> {
        check_name(name)?;
        check_granularity(granularity)?;
        self.check_name_free(name)
    }

    /// The checks QEMU makes when it creates the bitmap, after the
    /// persistence check: the name is not taken, and not too long.
    fn check_name_free(&self, name: &str) -> crate::Result<()> {
        if self.get(name).is_some() {
            return Err(crate::Error::invalid(format!(
                "Bitmap already exists: {name}"
            )));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(crate::Error::invalid(format!(
                "Bitmap name too long: {name}"
            )));
        }
        Ok(())
    }

    /// Adds a bitmap over `size` bytes, after [`BitmapSet::check_new`].
    pub fn add(
        &mut self,
        name: &str,
        size: u64,
        granularity: u64,
        persistent: bool,
        enabled: bool,
    ) {
        self.list.insert(
            0,
            NamedBitmap {
                name: name.to_owned(),
                bits: DirtyBitmap::new(size, granularity),
                frozen: None,
                enabled,
                persistent,
                inconsistent: false,
                readonly: false,
                busy: 0,
                loaded_at: None,
                created: self.clock,
                frozen_at: 0,
            },
        );
        self.clock += 1;
    }

    /// Removes `name`; gives back whether it was persistent.
    pub fn remove(&mut self, name: &str) -> crate::Result<bool> {
        self.checked(name, Use::Remove)?;
        let i = self
            .list
            .iter()
            .position(|b| b.name == name)
            .expect("checked");
        Ok(self.list.remove(i).persistent)
    }

    /// Clears `name`; gives back the bits it held (to undo a transaction).
    pub fn clear(&mut self, name: &str) -> crate::Result<DirtyBitmap> {
        self.checked(name, Use::Modify)?;
        let b = self.get_mut(name)?;
        let old = b.bits.clone();
        b.bits.reset(0, u64::MAX);
        self.cleared |= b.persistent;
        Ok(old)
    }

    /// Puts back bits taken by [`BitmapSet::clear`] or changed by a merge.
    pub fn restore(&mut self, name: &str, bits: DirtyBitmap) {
        if let Ok(b) = self.get_mut(name) {
            b.bits = bits;
            self.cleared |= b.persistent;
        }
    }

    /// Starts or stops recording into `name`.
    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> crate::Result<()> {
        self.checked(name, Use::Read)?;
        self.get_mut(name)?.enabled = enabled;
        Ok(())
    }

    /// ORs `source` into `target`; gives back `target`'s old bits.
    pub fn merge_into(&mut self, target: &str, source: &DirtyBitmap) -> crate::Result<DirtyBitmap> {
        self.checked(target, Use::Modify)?;
        let b = self.get_mut(target)?;
        let old = b.bits.clone();
        b.bits.merge(source);
        Ok(old)
    }

    /// Marks `name` in use by a job or an export (QEMU's busy bitmaps).
    pub fn hold(&mut self, name: &str, what: Use) -> crate::Result<()> {
        self.checked(name, what)?;
        self.get_mut(name)?.busy += 1;
        Ok(())
    }

    /// Ends one [`BitmapSet::hold`].
    pub fn release(&mut self, name: &str) {
        if let Ok(b) = self.get_mut(name) {
            b.busy = b.busy.saturating_sub(1);
        }
    }

    /// Sets the current content of `name` aside for a job and records new
    /// writes beside it; gives the job a copy of the set-aside bits. Only
    /// a busy bitmap refuses (QEMU's `create_successor`): a job that never
    /// changes the bitmap may freeze a read-only one.
    pub fn freeze(&mut self, name: &str) -> crate::Result<DirtyBitmap> {
        let clock = self.clock;
        let b = self.get_mut(name)?;
        if b.busy() {
            return Err(busy_error(name));
        }
        let size = b.bits.size();
        let gran = b.granularity();
        let content = std::mem::replace(&mut b.bits, DirtyBitmap::new(size, gran));
        b.frozen = Some(content.clone());
        b.frozen_at = clock;
        self.clock += 1;
        Ok(content)
    }

    /// Ends a freeze as the job's outcome says.
    pub fn thaw(&mut self, name: &str, how: Thaw) {
        let Some(i) = self.list.iter().position(|b| b.name == name) else {
            return;
        };
        let b = &mut self.list[i];
        let Some(frozen) = b.frozen.take() else {
            return;
        };
        self.cleared |= b.persistent;
        match how {
            Thaw::Reclaim => b.bits.merge(&frozen),
            Thaw::Abdicate(extra) => {
                if let Some(bits) = extra {
                    b.bits.merge(&bits);
                }
                b.created = b.frozen_at;
                let b = self.list.remove(i);
                let at = self
                    .list
                    .iter()
                    .position(|o| o.created < b.created)
                    .unwrap_or(self.list.len());
                self.list.insert(at, b);
            }
        }
    }

    /// Marks `[offset, offset+len)` dirty in every enabled bitmap.
    pub fn mark(&mut self, offset: u64, len: u64) {
        for b in self.list.iter_mut().filter(|b| b.enabled) {
            b.bits.set(offset, len);
        }
    }

    /// Takes the "some persistent bit was cleared" flag.
    pub fn take_cleared(&mut self) -> bool {
        std::mem::take(&mut self.cleared)
    }

    /// Sets the flag again after a store that failed.
    fn restore_cleared(&mut self) {
        self.cleared = true;
    }
}

/// QEMU's first check of `block-dirty-bitmap-add`, made before the node
/// is looked up.
pub fn check_name(name: &str) -> crate::Result<()> {
    if name.is_empty() {
        return Err(crate::Error::invalid("Bitmap name cannot be empty"));
    }
    Ok(())
}

/// QEMU's granularity rule for `block-dirty-bitmap-add`.
pub fn check_granularity(granularity: u64) -> crate::Result<()> {
    if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
    {
        return Err(crate::Error::invalid(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    Ok(())
}

/// QEMU's `bdrv_dirty_bitmap_check`.
fn check(b: &NamedBitmap, what: Use) -> crate::Result<()> {
    if b.busy() {
        return Err(busy_error(&b.name));
    }
    if what != Use::Read && b.readonly {
        return Err(crate::Error::invalid(format!(
            "Bitmap '{}' is readonly and cannot be modified",
            b.name
        )));
    }
    if what != Use::Remove && b.inconsistent {
        return Err(crate::Error::invalid(format!(
            "Bitmap '{}' is inconsistent and cannot be used",
            b.name
        )));
    }
    Ok(())
}

/// A bitmap named in `block-dirty-bitmap-merge` or `block-export-add`
/// (QEMU's `BlockDirtyBitmapOrStr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapRef {
    /// A bitmap by name only: of the merge target's node, or of the
    /// exported node or what it filters or backs.
    Local(String),
    /// A bitmap of any node.
    External {
        /// The node's name.
        node: String,
        /// The bitmap's name.
        name: String,
    },
}

impl BitmapRef {
    /// The bitmap's name.
    pub fn name(&self) -> &str {
        match self {
            BitmapRef::Local(name) | BitmapRef::External { name, .. } => name,
        }
    }
}

fn bitmap_not_found(name: &str) -> crate::Error {
    crate::Error::not_found(format!("Dirty bitmap '{name}' not found"))
}

/// QEMU's `block_dirty_bitmap_lookup`: the node called `node`, which holds
/// a bitmap `name`.
pub fn lookup_bitmap(graph: &BlockGraph, node: &str, name: &str) -> crate::Result<Arc<BlockNode>> {
    let n = graph
        .get(node)
        .ok_or_else(|| crate::Error::not_found(format!("Node '{node}' not found")))?;
    if n.bitmaps().get(name).is_none() {
        return Err(bitmap_not_found(name));
    }
    Ok(n)
}

/// The bitmap operations of a node: the in-memory set plus what must reach
/// the image for persistent bitmaps.
impl BlockNode {
    /// The node's bitmaps, locked (queries, transactions, jobs).
    pub fn bitmaps(&self) -> MutexGuard<'_, BitmapSet> {
        self.bitmaps.lock().unwrap()
    }

    /// QEMU's default granularity (`bdrv_get_default_bitmap_granularity`):
    /// the cluster size, kept between 4 KiB and 64 KiB; 64 KiB without one.
    pub fn default_bitmap_granularity(&self) -> u64 {
        match self.format_specific() {
            Some(FormatSpecific::Qcow2(q)) => q.cluster_size.clamp(4096, 65536),
            None => 65536,
        }
    }

    /// `block-dirty-bitmap-add`: a new bitmap, recording unless `disabled`;
    /// a persistent one is in the image before this returns.
    pub async fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> crate::Result<()> {
        check_name(name)?;
        let granularity = match granularity {
            Some(g) => {
                check_granularity(g)?;
                g
            }
            None => self.default_bitmap_granularity(),
        };
        if persistent {
            let store = self.bitmap_store().ok_or_else(|| {
                crate::Error::unsupported(format!(
                    "Can't store persistent bitmaps to {}: Operation not supported",
                    self.name()
                ))
            })?;
            store.check_storable(name, granularity).map_err(|e| {
                crate::Error::new(
                    e.kind(),
                    format!(
                        "Can't make bitmap '{name}' persistent in '{}': {e}",
                        self.name()
                    ),
                )
            })?;
        }
        let size = self.size();
        {
            let mut set = self.bitmaps();
            set.check_name_free(name)?;
            set.add(name, size, granularity, persistent, !disabled);
        }
        self.has_bitmaps.store(true, Ordering::SeqCst);
        if persistent {
            if let Err(e) = self.store_bitmaps(false).await {
                let _ = self.bitmaps().remove(name);
                return Err(crate::Error::io(
                    format!("Can't make bitmap '{name}' persistent in '{}'", self.name()),
                    &e,
                ));
            }
        }
        Ok(())
    }

    /// `block-dirty-bitmap-remove`; a persistent bitmap leaves the image too.
    pub async fn remove_bitmap(&self, name: &str) -> crate::Result<()> {
        let persistent = self.bitmaps().remove(name)?;
        if self.bitmaps().is_empty() {
            self.has_bitmaps.store(false, Ordering::SeqCst);
        }
        if persistent {
            self.store_bitmaps(false)
                .await
                .map_err(|e| crate::Error::io("Failed to remove bitmap from the image", &e))?;
        }
        Ok(())
    }

    /// `block-dirty-bitmap-enable` / `-disable`.
    pub async fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> crate::Result<()> {
        let persistent = {
            let mut set = self.bitmaps();
            set.set_enabled(name, enabled)?;
            set.get(name).is_some_and(NamedBitmap::persistent)
        };
        if persistent {
            self.store_bitmaps(false)
                .await
                .map_err(|e| crate::Error::io("Failed to store bitmap state", &e))?;
        }
        Ok(())
    }

    /// `block-dirty-bitmap-clear`; gives back the bits it held. A persistent
    /// bitmap reaches the image at the next flush or close (clean bits may
    /// reach the disk late: the bitmap then over-approximates, never misses).
    pub fn clear_bitmap(&self, name: &str) -> crate::Result<DirtyBitmap> {
        self.bitmaps().clear(name)
    }

    /// `block-dirty-bitmap-merge` into this node's bitmap `target` (looked
    /// up first, [`lookup_bitmap`]): `target` is checked, then each source
    /// is found and checked in order, with QEMU's text for the first that
    /// fails (qsd's order), then `target` gets
    /// the union of all of them, whatever their granularities. Gives back
    /// `target`'s old bits. A persistent target is written to the image
    /// before this returns, so the merged bits survive a crash.
    pub async fn merge_bitmaps(
        &self,
        graph: &BlockGraph,
        target: &str,
        sources: &[BitmapRef],
    ) -> crate::Result<DirtyBitmap> {
        let (size, granularity) = {
            let set = self.bitmaps();
            let b = set.checked(target, Use::Modify)?;
            (b.size(), b.granularity())
        };
        let mut union = DirtyBitmap::new(size, granularity);
        for source in sources {
            let node = match source {
                BitmapRef::Local(name) => {
                    if self.bitmaps().get(name).is_none() {
                        return Err(bitmap_not_found(name));
                    }
                    None
                }
                BitmapRef::External { node, name } => Some(lookup_bitmap(graph, node, name)?),
            };
            let set = node.as_deref().unwrap_or(self).bitmaps();
            let b = set.checked(source.name(), Use::Read)?;
            if b.size() != size {
                return Err(crate::Error::invalid(format!(
                    "Bitmaps are of different sizes (destination size is {size}, \
                     source size is {}) and can't be merged",
                    b.size()
                )));
            }
            union.merge(&b.content());
        }
        let (old, persistent) = {
            let mut set = self.bitmaps();
            let old = set.merge_into(target, &union)?;
            (old, set.get(target).is_some_and(NamedBitmap::persistent))
        };
        if persistent {
            if let Err(e) = self.store_bitmaps(false).await {
                self.bitmaps().restore(target, old);
                return Err(crate::Error::io(
                    format!("Failed to store bitmap '{target}'"),
                    &e,
                ));
            }
        }
        Ok(old)
    }

    /// Where `block-export-add` finds a bitmap given by name only: this
    /// node, else down the chain of what each node filters or backs
    /// (QEMU's `bdrv_filter_or_cow_bs`; not through `raw` or
    /// `snapshot-access`, which are not filters).
    pub fn find_bitmap_below(self: &Arc<Self>, name: &str) -> Option<Arc<BlockNode>> {
        let mut node = Some(self.clone());
        while let Some(n) = node {
            if n.bitmaps().get(name).is_some() {
                return Some(n);
            }
            node = n.filtered_or_backing();
        }
        None
    }

    /// [`NamedBitmap::extents`] of bitmap `name`; `None` when it is gone.
    pub fn bitmap_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Option<Vec<(u64, bool)>> {
        Some(self.bitmaps().get(name)?.extents(offset, len, max))
    }

    /// Writes the persistent bitmaps to the image (see [`BitmapStore::store`]).
    pub async fn store_bitmaps(&self, closing: bool) -> io::Result<()> {
        let Some(store) = self.bitmap_store() else {
            return Ok(());
        };
        if store.read_only() {
            return Ok(());
        }
        let _quiet = self.bitmap_io.write().await;
        let stored = {
            let mut set = self.bitmaps();
            set.take_cleared();
            set.stored()
        };
        // The store makes an empty set on an image without bitmaps a no-op.
        store.store(stored, closing).await
    }

    /// A flush writes persistent bitmaps again only when bits were cleared:
    /// bits only ever set are durable already (the write-intent marks).
    pub(crate) async fn store_bitmaps_if_cleared(&self) -> io::Result<()> {
        if !self.has_bitmaps.load(Ordering::SeqCst) || !self.bitmaps().take_cleared() {
            return Ok(());
        }
        let r = self.store_bitmaps(false).await;
        if r.is_err() {
            // Try again at the next flush.
            self.bitmaps().restore_cleared();
        }
        r
    }

    /// Runs a write-like request `write` over `[offset, offset+len)` with
    /// the enabled bitmaps marked: durably first for persistent ones, and
    /// again once it is done (a clear that raced with it must not hide it).
    pub(crate) async fn dirtying(
        &self,
        offset: u64,
        len: u64,
        write: IoFuture<'_, ()>,
    ) -> io::Result<()> {
        if !self.has_bitmaps.load(Ordering::Acquire) {
            return write.await;
        }
        let _marking = self.bitmap_io.read().await;
        self.bitmaps().mark(offset, len);
        if let Some(store) = self.bitmap_store() {
            store.mark_dirty(offset, len).await?;
        }
        let r = write.await;
        self.bitmaps().mark(offset, len);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freeze_then_thaw_keeps_every_write() {
        let mut s = BitmapSet::default();
        s.check_new("b", 65536).unwrap();
        s.add("b", 1 << 20, 65536, false, true);
        s.mark(0, 1);
        let frozen = s.freeze("b").unwrap();
        assert_eq!(frozen.dirty_chunks(), 1);
        assert!(s.checked("b", Use::Read).is_err(), "frozen is busy");
        s.mark(65536 * 3, 1);
        assert_eq!(s.get("b").unwrap().content().dirty_chunks(), 2);
        s.thaw("b", Thaw::Reclaim);
        assert_eq!(s.get("b").unwrap().content().dirty_chunks(), 2);
        s.freeze("b").unwrap();
        s.thaw("b", Thaw::Abdicate(None));
        assert!(s.get("b").unwrap().content().is_clean());
    }

    /// A job's successor is listed as QEMU lists it: as the newest bitmap
    /// from the freeze on; after an abdicate the bitmap takes its place,
    /// after a reclaim it keeps its own.
    #[test]
    fn frozen_bitmaps_list_as_qemu() {
        let mut s = BitmapSet::default();
        s.add("old", 1 << 20, 65536, false, true);
        s.add("mid", 1 << 20, 65536, false, true);
        s.mark(0, 1);
        s.freeze("old").unwrap();
        s.add("new", 1 << 20, 65536, false, true);
        s.mark(65536, 1);
        let names = |s: &BitmapSet| {
            s.infos()
                .into_iter()
                .map(|i| format!("{}:{}", i.name.as_deref().unwrap_or("-"), i.count / 65536))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&s), ["new:1", "-:1", "mid:2", "old:1"]);
        s.thaw("old", Thaw::Reclaim);
        assert_eq!(names(&s), ["new:1", "mid:2", "old:2"]);
        s.freeze("old").unwrap();
        s.thaw("old", Thaw::Abdicate(None));
        assert_eq!(names(&s), ["old:0", "new:1", "mid:2"]);
    }

    #[test]
    fn qemu_checks() {
        let mut s = BitmapSet::default();
        assert_eq!(
            s.check_new("", 65536).unwrap_err().to_string(),
            "Bitmap name cannot be empty"
        );
        assert!(s.check_new("a", 256).is_err() && s.check_new("a", 1000).is_err());
        s.add("a", 4096, 512, false, false);
        assert_eq!(
            s.check_new("a", 512).unwrap_err().to_string(),
            "Bitmap already exists: a"
        );
        s.mark(0, 4096);
        assert!(
            s.get("a").unwrap().content().is_clean(),
            "disabled records nothing"
        );
        s.hold("a", Use::Read).unwrap();
        assert_eq!(
            s.clear("a").unwrap_err().to_string(),
            "Bitmap 'a' is currently in use by another operation and cannot be used"
        );
        s.release("a");
        assert!(!s.remove("a").unwrap());
        assert!(s.is_empty());
        assert_eq!(
            s.check_new(&"x".repeat(MAX_NAME_LEN + 1), 512)
                .unwrap_err()
                .to_string(),
            format!("Bitmap name too long: {}", "x".repeat(MAX_NAME_LEN + 1))
        );
        s.check_new(&"x".repeat(MAX_NAME_LEN), 512).unwrap();
    }

    /// The image keeps QEMU's directory order: what it held in place, new
    /// bitmaps after them newest first; a reopen lists it reversed.
    #[test]
    fn directory_order_as_qemu() {
        let stored = |name: &str| StoredBitmap {
            name: name.into(),
            enabled: true,
            inconsistent: false,
            bits: DirtyBitmap::new(4096, 512),
        };
        let mut s = BitmapSet::from_stored(vec![stored("a"), stored("b"), stored("c")], false);
        let names = |v: Vec<StoredBitmap>| v.into_iter().map(|b| b.name).collect::<Vec<_>>();
        assert_eq!(
            s.infos()
                .into_iter()
                .filter_map(|i| i.name)
                .collect::<Vec<_>>(),
            ["c", "b", "a"]
        );
        s.add("d", 4096, 512, true, true);
        s.add("e", 4096, 512, true, true);
        s.add("t", 4096, 512, false, true);
        s.remove("b").unwrap();
        assert_eq!(names(s.stored()), ["a", "c", "e", "d"]);
    }

    /// Which checks each use makes, as QEMU's flags for each command:
    /// an inconsistent bitmap can only be removed, a read-only one only
    /// read or switched.
    #[test]
    fn checks_per_use() {
        let stored = |name: &str, inconsistent| StoredBitmap {
            name: name.into(),
            enabled: true,
            inconsistent,
            bits: DirtyBitmap::new(4096, 512),
        };
        let mut ro = BitmapSet::from_stored(vec![stored("r", false)], true);
        let text = "Bitmap 'r' is readonly and cannot be modified";
        assert_eq!(ro.clear("r").unwrap_err().to_string(), text);
        assert_eq!(ro.remove("r").unwrap_err().to_string(), text);
        ro.set_enabled("r", false).unwrap();
        ro.hold("r", Use::Read).unwrap();

        let mut bad = BitmapSet::from_stored(vec![stored("i", true)], false);
        assert!(
            !bad.infos()[0].recording,
            "inconsistent bitmaps never record"
        );
        let text = "Bitmap 'i' is inconsistent and cannot be used";
        assert_eq!(bad.clear("i").unwrap_err().to_string(), text);
        assert_eq!(bad.set_enabled("i", true).unwrap_err().to_string(), text);
        assert_eq!(bad.hold("i", Use::Read).unwrap_err().to_string(), text);
        assert!(bad.remove("i").unwrap());
    }
}
