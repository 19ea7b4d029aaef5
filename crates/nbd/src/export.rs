//! The export registry: which names clients may attach to, and which clients
//! are attached to each export.
//!
//! The table is the only shared state between the listeners and the
//! management side (QMP `nbd-server-add`, `block-export-del`). A removed
//! export disappears for new clients at once; its attached clients keep
//! working until the owner closes them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use livesnap_block::BlockBackend;
use tokio::sync::watch;

use crate::conn::ConnControl;
use crate::stats::ExportStats;

/// What to export under one name.
#[derive(Clone)]
pub struct ExportConfig {
    /// Export name clients ask for; "" is a name like any other.
    pub name: String,
    /// Human-readable description sent with `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// The backend whose bytes are served; its root can change under the export.
    pub backend: Arc<BlockBackend>,
    /// Clients may write; otherwise the export is read-only (`NBD_FLAG_READ_ONLY`).
    pub writable: bool,
    /// Offer the `qemu:allocation-depth` metadata context (QEMU's
    /// `block-export-add` `allocation-depth: true`); `base:allocation` is always offered.
    pub allocation_depth: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts, in the
    /// order given (QEMU's `block-export-add` `bitmaps`); a name may repeat.
    pub bitmaps: Vec<ExportBitmap>,
}

/// Where the extents of a `qemu:dirty-bitmap:NAME` context come from: the
/// owner of the export gives one per bitmap, so this crate needs to know
/// nothing of where bitmaps live.
pub trait DirtyExtents: Send + Sync {
    /// Up to `max` runs covering `[offset, offset+len)` from `offset`, each
    /// (length, dirty), neighbours differing. Fewer bytes than asked is a
    /// valid, shorter answer; none at all reads as clean.
    fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)>;
}

/// A dirty bitmap an export offers.
#[derive(Clone)]
pub struct ExportBitmap {
    /// The bitmap's name: the context is `qemu:dirty-bitmap:` + name.
    pub name: String,
    /// Its content.
    pub extents: Arc<dyn DirtyExtents>,
}

impl ExportBitmap {
    /// The metadata context's name.
    pub fn context(&self) -> String {
        format!("{}{}", crate::proto::META_DIRTY_BITMAP_PREFIX, self.name)
    }
}

struct ExportState {
    conns: HashMap<u64, Arc<ConnControl>>,
    // Set by `ExportTable::remove` under this lock, so a client that looked the
    // export up just before removal cannot attach after `close_connections`.
    removed: bool,
}

/// One exported name and the clients attached to it.
pub struct Export {
    cfg: ExportConfig,
    state: Mutex<ExportState>,
    count: watch::Sender<usize>,
    stats: Arc<ExportStats>,
}

impl Export {
    fn new(cfg: ExportConfig) -> Export {
        Export {
            cfg,
            state: Mutex::new(ExportState {
                conns: HashMap::new(),
                removed: false,
            }),
            count: watch::Sender::new(0),
            stats: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ExportState> {
        // A poisoned lock only means another thread panicked mid-update of a
        // plain map; the data is still consistent enough to keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration this export was added with.
    pub fn config(&self) -> &ExportConfig {
        &self.cfg
    }

    /// What this export's clients asked for so far.
    pub fn stats(&self) -> &Arc<ExportStats> {
        &self.stats
    }

    /// True when clients may not write (by configuration or because the node is read-only).
    pub fn read_only(&self) -> bool {
        !self.cfg.writable || self.cfg.backend.read_only()
    }

    /// Clients currently attached to this export (past GO/EXPORT_NAME).
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Hard removal: drops every attached client; in-flight requests may be abandoned.
    pub fn close_connections(&self) {
        let conns: Vec<_> = self.lock().conns.values().cloned().collect();
        for c in conns {
            c.kill();
        }
    }

    /// Resolves when no client is attached any more.
    pub async fn wait_closed(&self) {
        let mut rx = self.count.subscribe();
        // The channel lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Records `conn` as attached; `None` when the export was removed meanwhile.
    pub(crate) fn attach(self: &Arc<Self>, conn: &Arc<ConnControl>) -> Option<AttachGuard> {
        let mut st = self.lock();
        if st.removed {
            return None;
        }
        st.conns.insert(conn.id(), conn.clone());
        let n = st.conns.len();
        drop(st);
        self.count.send_replace(n);
        Some(AttachGuard {
            export: self.clone(),
            id: conn.id(),
        })
    }

    fn detach(&self, id: u64) {
        let mut st = self.lock();
        st.conns.remove(&id);
        let n = st.conns.len();
        drop(st);
        self.count.send_replace(n);
    }

    fn mark_removed(&self) {
        self.lock().removed = true;
    }
}

/// Keeps a connection counted on its export; detaches on drop, whatever ends the connection.
pub(crate) struct AttachGuard {
    export: Arc<Export>,
    id: u64,
}

impl AttachGuard {
    /// The export attached to.
    pub(crate) fn export(&self) -> &Arc<Export> {
        &self.export
    }
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        self.export.detach(self.id);
    }
}

/// The set of exports, thread safe, in insertion order.
pub struct ExportTable {
    exports: Mutex<Vec<Arc<Export>>>,
}

impl ExportTable {
    /// An empty table.
    pub fn new() -> Arc<ExportTable> {
        Arc::new(ExportTable {
            exports: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Export>>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an export; `Err` with a message when the name is taken.
    pub fn add(&self, cfg: ExportConfig) -> Result<Arc<Export>, String> {
        let mut v = self.lock();
        if v.iter().any(|e| e.cfg.name == cfg.name) {
            return Err(format!("NBD export '{}' already exists", cfg.name));
        }
        let e = Arc::new(Export::new(cfg));
        v.push(e.clone());
        Ok(e)
    }

    /// Removes an export: new clients no longer find it; attached ones continue until closed.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut v = self.lock();
        let i = v.iter().position(|e| e.cfg.name == name)?;
        let e = v.remove(i);
        e.mark_removed();
        Some(e)
    }

    /// The export called `name` (exact match; "" only finds an export named "").
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.lock().iter().find(|e| e.cfg.name == name).cloned()
    }

    /// All exports, in insertion order.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.lock().clone()
    }
}
