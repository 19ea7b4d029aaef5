//! `blockdev-create` (QEMU's `qapi/block-core.json`).

use std::sync::Arc;

use livesnap_qmp::{Args, QmpError};
use serde_json::Value;

use crate::daemon::Daemon;

pub(super) async fn blockdev_create(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let _ = (d, args);
    Err(QmpError::generic(
        "blockdev-create is not implemented yet".to_string(),
    ))
}
