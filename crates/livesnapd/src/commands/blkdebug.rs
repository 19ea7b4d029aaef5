//! The `blkdebug` driver's QMP side: its `blockdev-add` options (QEMU's
//! `BlockdevOptionsBlkdebug`) and livesnap's `x-blkdebug-set-rules`, which
//! replaces a blkdebug node's `inject-error` rules at run time.
//!
//! QEMU's members are read in schema order with QEMU's texts; the livesnap
//! extensions are `x-delay-ms` and `x-stall` in each rule (see
//! `livesnap_block::blkdebug` and docs/qmp.md).

use std::sync::Arc;
use std::time::Duration;

use livesnap_block::blkdebug::{self, BlkdebugOpenOptions, EVENT_NAMES};
use livesnap_block::{InjectError, IoType};
use livesnap_qmp::{Args, Elem, QmpError};
use serde_json::Value;

use super::empty;
use crate::daemon::Daemon;

/// QEMU's `BlockPermission` values.
const PERMISSIONS: &[&str] = &["consistent-read", "write", "write-unchanged", "resize"];

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

/// An `int32` member (QEMU's range error names the bare member).
fn opt_i32(args: &mut Args, key: &str) -> Result<Option<i64>, QmpError> {
    match args.opt_i64(key)? {
        Some(v) if i32::try_from(v).is_err() => {
            Err(generic(format!("Parameter '{key}' expects int32_t")))
        }
        v => Ok(v),
    }
}

/// One `BlkdebugInjectErrorOptions` list element, plus the extensions.
fn parse_rule(elem: Elem) -> Result<InjectError, QmpError> {
    let mut r = elem.into_object()?;
    let event = r.req_enum("event", EVENT_NAMES)?;
    let state = r.opt_i64("state")?.unwrap_or(0);
    let iotype = r
        .opt_enum("iotype", IoType::NAMES)?
        .map(|t| IoType::parse(&t).expect("checked against NAMES"));
    let errno = r.opt_i64("errno")?;
    let sector = r.opt_i64("sector")?.unwrap_or(-1);
    let once = r.opt_bool("once")?.unwrap_or(false);
    let immediately = r.opt_bool("immediately")?.unwrap_or(false);
    let delay_ms = r.opt_i64("x-delay-ms")?;
    if let Some(ms) = delay_ms.filter(|ms| *ms < 0) {
        return Err(generic(format!(
            "Value '{ms}' is out of range for parameter 'x-delay-ms'"
        )));
    }
    let stall = r.opt_bool("x-stall")?.unwrap_or(false);
    r.finish()?;
    // A delay or stall rule only slows the request down unless an errno is given.
    let default_errno = if delay_ms.is_some() || stall {
        0
    } else {
        libc::EIO as i64
    };
    let errno = errno.unwrap_or(default_errno);
    Ok(InjectError {
        event,
        state,
        iotype,
        // QEMU keeps only an int; values beyond it cannot name an errno anyway.
        errno: i32::try_from(errno).unwrap_or(0),
        sector,
        once,
        immediately,
        delay: delay_ms.map(|ms| Duration::from_millis(ms as u64)),
        stall,
    })
}

fn parse_rules(args: &mut Args) -> Result<Vec<InjectError>, QmpError> {
    args.opt_list("inject-error")?
        .unwrap_or_default()
        .into_iter()
        .map(parse_rule)
        .collect()
}

/// Reads the `BlockdevOptionsBlkdebug` members after `image`.
pub(super) fn parse_options(args: &mut Args) -> Result<BlkdebugOpenOptions, QmpError> {
    let config = args.opt_str("config")?;
    let sizes = [
        ("align", args.opt_i64("align")?),
        ("max-transfer", opt_i32(args, "max-transfer")?),
        ("opt-write-zero", opt_i32(args, "opt-write-zero")?),
        ("max-write-zero", opt_i32(args, "max-write-zero")?),
        ("opt-discard", opt_i32(args, "opt-discard")?),
        ("max-discard", opt_i32(args, "max-discard")?),
    ];
    let inject_error = parse_rules(args)?;
    let mut set_state = 0;
    for elem in args.opt_list("set-state")?.unwrap_or_default() {
        let mut s = elem.into_object()?;
        s.req_enum("event", EVENT_NAMES)?;
        s.opt_i64("state")?;
        s.req_i64("new_state")?;
        s.finish()?;
        set_state += 1;
    }
    let mut perms = None;
    for key in ["take-child-perms", "unshare-child-perms"] {
        if let Some(list) = args.opt_list(key)? {
            for elem in list {
                elem.into_enum(PERMISSIONS)?;
            }
            perms.get_or_insert(key);
        }
    }
    Ok(BlkdebugOpenOptions {
        config,
        sizes,
        inject_error,
        set_state,
        perms,
    })
}

/// `x-blkdebug-set-rules {node-name, inject-error}` (livesnap extension):
/// replaces the rules of a blkdebug node; requests held by `x-stall` rules
/// are checked again against the new rules.
pub(super) fn set_rules(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let name = args.req_str("node-name")?;
    let rules = parse_rules(&mut args)?;
    args.finish()?;
    let node = d.graph.get(&name).ok_or_else(|| {
        generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })?;
    let Some(set) = blkdebug::rules_of(&node) else {
        return Err(generic(format!("Node '{name}' is not a blkdebug node")));
    };
    set.set(rules);
    Ok(empty())
}
