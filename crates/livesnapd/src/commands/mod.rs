//! QMP command dispatch: every command livesnapd implements, by QEMU's name.
//!
//! Handlers live next to what they manage: `blockdev` (nodes), `export` (the
//! NBD server and block exports), `control` (version, command list, quit),
//! `job` (the job verbs and queries), `mirror`, `backup` and `create` (the
//! commands that start each kind of job).

mod backup;
mod blkdebug;
mod blockdev;
mod control;
mod create;
mod job;
mod mirror;
pub use control::{package, QEMU_COMPAT_VERSION};
pub use export::{parse_listen_addr, start_nbd_server};
mod export;
mod snapshot;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use livesnap_qmp::{Args, Dispatcher, ErrorClass, QmpError};
use serde_json::Value;

use crate::daemon::Daemon;
use livesnap_block::id_wellformed;

/// Every command this dispatcher answers, in `query-commands` order.
pub const COMMAND_NAMES: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "blockdev-mirror",
    "blockdev-backup",
    "blockdev-create",
    "query-jobs",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "query-block-jobs",
    "block-job-cancel",
    "block-job-complete",
    "block-job-pause",
    "block-job-resume",
    "block-job-set-speed",
    "block-job-change",
    "block-job-finalize",
    "block-job-dismiss",
    "x-blkdebug-set-rules",
];

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
        let d = &self.daemon;
        Box::pin(async move {
            match command {
                "query-version" => control::query_version(args),
                "query-commands" => control::query_commands(args),
                "quit" => control::quit(d, args),
                "blockdev-add" => blockdev::blockdev_add(d, args).await,
                "blockdev-del" => blockdev::blockdev_del(d, args).await,
                "blockdev-snapshot" => snapshot::blockdev_snapshot(d, args).await,
                "blockdev-snapshot-sync" => snapshot::blockdev_snapshot_sync(d, args).await,
                "query-named-block-nodes" => blockdev::query_named_block_nodes(d, args),
                "nbd-server-start" => export::nbd_server_start(d, args).await,
                "nbd-server-stop" => export::nbd_server_stop(d, args).await,
                "block-export-add" => export::block_export_add(d, args).await,
                "block-export-del" => export::block_export_del(d, args),
                "query-block-exports" => export::query_block_exports(d, args),
                "blockdev-mirror" => mirror::blockdev_mirror(d, args).await,
                "blockdev-backup" => backup::blockdev_backup(d, args).await,
                "blockdev-create" => create::blockdev_create(d, args).await,
                "query-jobs"
                | "job-pause"
                | "job-resume"
                | "job-cancel"
                | "job-complete"
                | "job-finalize"
                | "job-dismiss"
                | "query-block-jobs"
                | "block-job-cancel"
                | "block-job-complete"
                | "block-job-pause"
                | "block-job-resume"
                | "block-job-set-speed"
                | "block-job-change"
                | "block-job-finalize"
                | "block-job-dismiss" => job::dispatch(d, command, args).await,
                "x-blkdebug-set-rules" => blkdebug::set_rules(d, args),
                _ => Err(command_not_found(command)),
            }
        })
    }

    fn commands(&self) -> Vec<String> {
        COMMAND_NAMES.iter().map(|s| s.to_string()).collect()
    }
}

/// `{}`: what QEMU returns for commands without a result.
fn empty() -> Value {
    Value::Object(Default::default())
}
