//! QMP command dispatch: every command livesnapd implements, by QEMU's name.
//!
//! Handlers live next to what they manage: `blockdev` (nodes), `bitmap`
//! (named dirty bitmaps), `export` (the NBD server and block exports), `control` (version, command list, quit),
//! `job` (the job verbs and queries), `mirror`, `backup` and `create` (the
//! commands that start each kind of job), `object` (TLS credentials and
//! authorization objects).

mod backup;
pub mod bitmap;
mod blkdebug;
mod blockdev;
mod control;
mod create;
mod job;
mod mirror;
mod object;
pub use control::{package, QEMU_COMPAT_VERSION};
pub(crate) use export::release_bitmaps;
pub use export::{parse_listen_addr, start_nbd_server};
pub use object::{server_tls, Objects, UserObject};
mod export;
mod snapshot;
mod transaction;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use livesnap_qmp::{Args, Dispatcher, ErrorClass, QmpError};
use serde_json::Value;

use crate::daemon::Daemon;
use livesnap_block::id_wellformed;

/// What a handler returns: owned, so the table holds plain function pointers.
type Reply = Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send>>;

/// A command's handler.
type Handler = fn(Arc<Daemon>, Args) -> Reply;

/// A handler over a function of the daemon and the arguments.
macro_rules! on_daemon {
    (async $f:path) => {
        |d, a| Box::pin(async move { $f(&d, a).await })
    };
    ($f:path) => {
        |d, a| Box::pin(std::future::ready($f(&d, a)))
    };
}

/// The one table of commands: QEMU's name and its handler, in
/// `query-commands` order. `qmp_capabilities` is the QMP server's own
/// (negotiation) and comes first in `query-commands`.
const COMMANDS: &[(&str, Handler)] = &[
    ("query-version", |_, a| {
        Box::pin(std::future::ready(control::query_version(a)))
    }),
    ("query-commands", |_, a| {
        Box::pin(std::future::ready(control::query_commands(a)))
    }),
    ("quit", on_daemon!(control::quit)),
    ("transaction", on_daemon!(async transaction::transaction)),
    ("blockdev-add", on_daemon!(async blockdev::blockdev_add)),
    ("blockdev-del", on_daemon!(async blockdev::blockdev_del)),
    (
        "query-named-block-nodes",
        on_daemon!(blockdev::query_named_block_nodes),
    ),
    ("block-dirty-bitmap-add", on_daemon!(async bitmap::add)),
    (
        "block-dirty-bitmap-remove",
        on_daemon!(async bitmap::remove),
    ),
    ("block-dirty-bitmap-clear", on_daemon!(bitmap::clear)),
    (
        "block-dirty-bitmap-enable",
        on_daemon!(async bitmap::enable),
    ),
    (
        "block-dirty-bitmap-disable",
        on_daemon!(async bitmap::disable),
    ),
    ("block-dirty-bitmap-merge", on_daemon!(async bitmap::merge)),
    (
        "blockdev-snapshot",
        on_daemon!(async snapshot::blockdev_snapshot),
    ),
    (
        "blockdev-snapshot-sync",
        on_daemon!(async snapshot::blockdev_snapshot_sync),
    ),
    (
        "nbd-server-start",
        on_daemon!(async export::nbd_server_start),
    ),
    ("nbd-server-stop", on_daemon!(async export::nbd_server_stop)),
    (
        "block-export-add",
        on_daemon!(async export::block_export_add),
    ),
    ("block-export-del", on_daemon!(export::block_export_del)),
    (
        "query-block-exports",
        on_daemon!(export::query_block_exports),
    ),
    ("blockdev-mirror", on_daemon!(async mirror::blockdev_mirror)),
    ("blockdev-backup", on_daemon!(async backup::blockdev_backup)),
    ("blockdev-create", on_daemon!(async create::blockdev_create)),
    ("query-jobs", on_daemon!(job::query_jobs)),
    ("job-pause", on_daemon!(job::job_pause)),
    ("job-resume", on_daemon!(job::job_resume)),
    ("job-cancel", on_daemon!(async job::job_cancel)),
    ("job-complete", on_daemon!(job::job_complete)),
    ("job-finalize", on_daemon!(async job::job_finalize)),
    ("job-dismiss", on_daemon!(job::job_dismiss)),
    ("query-block-jobs", on_daemon!(job::query_block_jobs)),
    ("block-job-cancel", on_daemon!(async job::block_job_cancel)),
    ("block-job-complete", on_daemon!(job::block_job_complete)),
    ("block-job-pause", on_daemon!(job::block_job_pause)),
    ("block-job-resume", on_daemon!(job::block_job_resume)),
    ("block-job-set-speed", on_daemon!(job::block_job_set_speed)),
    ("block-job-change", on_daemon!(job::block_job_change)),
    (
        "block-job-finalize",
        on_daemon!(async job::block_job_finalize),
    ),
    ("block-job-dismiss", on_daemon!(job::block_job_dismiss)),
    ("object-add", on_daemon!(object::object_add)),
    ("object-del", on_daemon!(object::object_del)),
    ("x-blkdebug-set-rules", on_daemon!(blkdebug::set_rules)),
];

/// Every command this daemon answers, in `query-commands` order.
pub fn command_names() -> impl Iterator<Item = &'static str> {
    std::iter::once("qmp_capabilities").chain(COMMANDS.iter().map(|(n, _)| *n))
}

/// The QMP command table of one daemon.
pub struct Commands {
    daemon: Arc<Daemon>,
}

impl Commands {
    /// Commands acting on `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Arc<Commands> {
        Arc::new(Commands { daemon })
    }
}

/// The error QEMU gives for a command it does not know.
pub fn command_not_found(name: &str) -> QmpError {
    QmpError::new(
        ErrorClass::CommandNotFound,
        format!("The command {name} has not been found"),
    )
}

impl Dispatcher for Commands {
    fn call<'a>(
        &'a self,
        command: &'a str,
        args: Args,
    ) -> Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send + 'a>> {
        match COMMANDS.iter().find(|(n, _)| *n == command) {
            Some((_, handler)) => handler(self.daemon.clone(), args),
            None => Box::pin(std::future::ready(Err(command_not_found(command)))),
        }
    }

    fn commands(&self) -> Vec<String> {
        command_names().map(str::to_string).collect()
    }
}

/// `{}`: what QEMU returns for commands without a result.
fn empty() -> Value {
    Value::Object(Default::default())
}
