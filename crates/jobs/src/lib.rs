//! Block jobs for livesnap: QEMU's job model ([`job`]), the rate limiter,
//! the jobs themselves — mirror, backup with copy-before-write (full or
//! incremental), image creation — and what acts on the graph at one
//! instant: external snapshots and `transaction`.
//!
//! This crate owns how data moves between nodes while guests keep writing,
//! and the state machine QMP sees. It acts on nodes only through
//! `livesnap_block`'s public API (nodes, backends, write hooks, bitmaps) and
//! knows nothing of NBD or of the QMP wire: events leave through an
//! [`job::EventSink`], commands arrive as method calls.

pub mod backup;
pub mod block_copy;
pub mod cbw;
pub mod create;
pub mod exports;
pub mod guest;
pub mod job;
pub mod mirror;
pub mod rangelock;
pub mod ratelimit;
pub mod snapshot;
pub mod snapshot_access;
pub mod transaction;

pub use job::{
    ErrorVerdict, EventSink, Job, JobCtx, JobDriver, JobFuture, JobManager, JobOptions,
    JobProgress, JobStatus, JobTxn, JobType, JobVerb, OnError,
};
pub use livesnap_block::os_error_text;

/// Registers the drivers this crate adds to the block layer's open
/// (`copy-before-write`, `snapshot-access`).
pub fn register_drivers(drivers: &mut livesnap_block::Drivers) {
    drivers.register("copy-before-write", std::sync::Arc::new(cbw::CbwFactory));
    drivers.register(
        "snapshot-access",
        std::sync::Arc::new(snapshot_access::SnapshotAccessFactory),
    );
}
pub use ratelimit::RateLimit;
