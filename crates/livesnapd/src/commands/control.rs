//! `query-version`, `query-commands`, `quit`.

use std::sync::Arc;

use livesnap_qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::{command_names, empty};
use crate::daemon::Daemon;

/// The QEMU release whose QMP schema livesnapd follows; see docs/decisions.md.
pub const QEMU_COMPAT_VERSION: (u64, u64, u64) = (10, 0, 0);

/// Package string of the greeting and `query-version`.
pub fn package() -> String {
    format!("livesnap {}", env!("CARGO_PKG_VERSION"))
}

/// QEMU's `VersionInfo`.
pub fn version_info() -> Value {
    let (major, minor, micro) = QEMU_COMPAT_VERSION;
    json!({
        "qemu": { "micro": micro, "minor": minor, "major": major },
        "package": package(),
    })
}

pub(super) fn query_version(args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(version_info())
}

pub(super) fn query_commands(args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(Value::Array(
        command_names().map(|n| json!({ "name": n })).collect(),
    ))
}

pub(super) fn quit(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    d.request_quit();
    Ok(empty())
}
