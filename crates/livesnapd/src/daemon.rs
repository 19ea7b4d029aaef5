//! The daemon's state: one block graph, the NBD server and its exports, and the
//! event bus every monitor listens to. QMP commands act on this, and so does
//! the command line at start-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livesnap_block::{BlockGraph, BlockNode, Drivers, NodeUser};
use livesnap_jobs::mirror::CopyMode;
use livesnap_jobs::JobManager;
use livesnap_nbd::{Export, ExportTable, NbdServer};
use livesnap_qmp::EventBus;

use crate::commands::Objects;
use tokio::sync::watch;

/// A block export as QMP sees it (QEMU's `BlockExport`).
pub struct ExportEntry {
    /// QMP id of the export.
    pub id: String,
    /// The NBD side of the export.
    pub nbd: Arc<Export>,
    /// Set once deletion was requested and clients are still attached.
    pub shutting_down: AtomicBool,
    /// The dirty bitmaps it offers, held busy until the export is gone:
    /// (node holding the bitmap, name), in the order given.
    pub bitmaps: Vec<(Arc<BlockNode>, String)>,
}

impl ExportEntry {
    /// The node currently exported: the root of the export's backend, which
    /// moves to the overlay on an external snapshot.
    pub fn node(&self) -> Arc<BlockNode> {
        self.nbd.config().backend.root()
    }
}

/// Everything one livesnapd process manages.
pub struct Daemon {
    /// All block nodes.
    pub graph: Arc<BlockGraph>,
    /// What `blockdev-add` can open beyond the block layer's own drivers
    /// (the jobs crate's filters).
    pub drivers: Drivers,
    /// Events to every QMP monitor.
    pub events: EventBus,
    /// The NBD exports by name, shared with the NBD server.
    pub nbd_exports: Arc<ExportTable>,
    /// The running NBD server, if `nbd-server-start` was called.
    pub nbd_server: tokio::sync::Mutex<Option<NbdServer>>,
    /// Exports by QMP id, oldest first.
    pub exports: Mutex<Vec<Arc<ExportEntry>>>,
    /// Block jobs and `blockdev-create` jobs.
    pub jobs: Arc<JobManager>,
    /// Objects made by `object-add` (TLS credentials, authorization).
    pub objects: Objects,
    /// What the command line set for the whole process.
    pub settings: Settings,
    quit: watch::Sender<bool>,
}

/// Daemon-wide choices made on the command line.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// The copy mode of a `blockdev-mirror` that names none. QEMU's is
    /// `background`, which may never converge under guest writes; livesnapd's
    /// is `auto`, so callers that poll for READY and then cancel (Nova's
    /// loop) end (docs/qmp.md).
    pub mirror_copy_mode: CopyMode,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mirror_copy_mode: CopyMode::Auto,
        }
    }
}

/// How long a graceful shutdown waits for force-cancelled jobs to end.
pub const JOB_CANCEL_GRACE: Duration = Duration::from_secs(2);

/// How long a graceful shutdown waits for NBD clients' in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Daemon {
    /// A daemon with an empty graph, no NBD server and the default settings.
    pub fn new() -> Arc<Daemon> {
        Daemon::with_settings(Settings::default())
    }

    /// A daemon with an empty graph, no NBD server and `settings`.
    pub fn with_settings(settings: Settings) -> Arc<Daemon> {
        let events = EventBus::new();
        let sink = events.clone();
        Arc::new(Daemon {
            graph: Arc::new(BlockGraph::new()),
            drivers: {
                let mut drivers = Drivers::new();
                livesnap_jobs::register_drivers(&mut drivers);
                drivers
            },
            jobs: JobManager::new(Arc::new(move |name: &str, data| {
                sink.emit(name, Some(data))
            })),
            events,
            nbd_exports: ExportTable::new(),
            nbd_server: tokio::sync::Mutex::new(None),
            exports: Mutex::new(Vec::new()),
            objects: Objects::default(),
            settings,
            quit: watch::channel(false).0,
        })
    }

    /// Asks the daemon to shut down (QMP `quit`, SIGINT, SIGTERM).
    pub fn request_quit(&self) {
        self.quit.send_replace(true);
    }

    /// Resolves once a shutdown was requested.
    pub async fn quit_requested(&self) {
        let mut rx = self.quit.subscribe();
        let _ = rx.wait_for(|q| *q).await;
    }

    /// Ends an export: drops it from the registry, releases its node and emits
    /// `BLOCK_EXPORT_DELETED`, once its last client is gone.
    pub fn finish_export_removal(self: &Arc<Self>, entry: Arc<ExportEntry>) {
        entry.shutting_down.store(true, Ordering::SeqCst);
        let finish = {
            let daemon = self.clone();
            let entry = entry.clone();
            move || {
                daemon
                    .exports
                    .lock()
                    .unwrap()
                    .retain(|e| !Arc::ptr_eq(e, &entry));
                entry.node().remove_user(&export_user(&entry.id));
                crate::commands::release_bitmaps(&entry.bitmaps);
                daemon.events.emit(
                    "BLOCK_EXPORT_DELETED",
                    Some(serde_json::json!({ "id": entry.id })),
                );
            }
        };
        if entry.nbd.connections() == 0 {
            // Emitted before the command's reply, as QEMU does when no client is attached.
            finish();
        } else {
            tokio::spawn(async move {
                entry.nbd.wait_closed().await;
                finish();
            });
        }
    }

    /// Graceful stop: no new NBD clients, in-flight requests finish, every node is flushed.
    pub async fn shutdown(self: &Arc<Self>) {
        // Jobs first: a job's clean-up detaches its write hooks and gives the
        // exports back their nodes before the last requests are served.
        self.jobs.cancel_all(JOB_CANCEL_GRACE).await;
        if let Some(server) = self.nbd_server.lock().await.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("NBD clients did not finish within {SHUTDOWN_GRACE:?}");
            }
        }
        for node in self.graph.nodes() {
            if let Err(e) = node.flush().await {
                tracing::error!("flush of node {} failed: {e}", node.name());
            }
            // Persistent bitmaps left in use would read as inconsistent to
            // QEMU: the exact bits go to the image, marked clean.
            if let Err(e) = node.store_bitmaps(true).await {
                tracing::error!("storing the bitmaps of node {} failed: {e}", node.name());
            }
        }
    }
}

/// The mark an export puts on its node, so `blockdev-del` sees it.
pub fn export_user(id: &str) -> NodeUser {
    NodeUser::Export(id.to_string())
}
