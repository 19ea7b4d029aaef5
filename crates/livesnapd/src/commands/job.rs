//! The job verbs and queries: `query-jobs`, `job-*`, `query-block-jobs`,
//! `block-job-*` (QEMU's `qapi/job.json` and `qapi/block-core.json`).

use std::sync::Arc;

use livesnap_qmp::{Args, QmpError};
use serde_json::Value;

use crate::daemon::Daemon;

pub(super) async fn dispatch(
    d: &Arc<Daemon>,
    command: &str,
    args: Args,
) -> Result<Value, QmpError> {
    let _ = (d, args);
    Err(QmpError::generic(format!(
        "{command} is not implemented yet"
    )))
}
