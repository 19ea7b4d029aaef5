//! Write interception on a node: how block jobs see guest writes.
//!
//! QEMU puts a filter node (`mirror_top`, `copy-before-write`) above the
//! source so that every write passes through the job. livesnap attaches a
//! [`WriteHook`] to the source node instead: every write, write-zeroes and
//! discard that reaches the node's driver — from an export, a parent node or
//! anything else — runs inside the hook, which can act before the data lands
//! (copy the old content out) and after (mark the range dirty, copy the new
//! data to a mirror target). Attaching and detaching a hook waits until no
//! write is in flight on the node, so a job knows exactly which writes it saw.

use std::sync::{Arc, Mutex};

use crate::buf::IoBuf;
use crate::driver::IoFuture;

/// What kind of write a hooked request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// A data write; the node gives the hook a copy of the data if it asked for one.
    Data,
    /// A write-zeroes request.
    Zeroes,
    /// A discard: the range's content becomes unspecified.
    Discard,
}

/// One write-like request as a hook sees it: the range the driver will write
/// (already padded to the driver's alignment).
pub struct HookedWrite {
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Write, write-zeroes or discard.
    pub kind: WriteKind,
    /// A copy of the data of a [`WriteKind::Data`] request, when a hook
    /// wanted it ([`WriteHook::wants_data`]); a hook takes it with
    /// [`HookedWrite::take_data`], so it is copied once whoever uses it.
    pub data: Mutex<Option<IoBuf>>,
}

impl HookedWrite {
    /// A request as a hook sees it.
    pub fn new(offset: u64, len: u64, kind: WriteKind, data: Option<IoBuf>) -> HookedWrite {
        HookedWrite {
            offset,
            len,
            kind,
            data: Mutex::new(data),
        }
    }

    /// Takes the copy of the data, if there is one and no hook took it yet.
    pub fn take_data(&self) -> Option<IoBuf> {
        self.data.lock().unwrap().take()
    }
}

/// Something that runs around every write reaching a node's driver.
pub trait WriteHook: Send + Sync + 'static {
    /// True when [`HookedWrite::data`] must be filled (costs a copy of the
    /// write); asked before each write, so it may change as the hook's state does.
    fn wants_data(&self) -> bool {
        false
    }

    /// Runs the request: whatever must happen before, then `write` (the
    /// driver call, which does nothing until awaited), then whatever must
    /// happen after. The guest sees the returned result.
    fn intercept<'a>(&'a self, req: &'a HookedWrite, write: IoFuture<'a, ()>) -> IoFuture<'a, ()>;
}

/// The hooks of one node, oldest first.
pub type HookList = Vec<Arc<dyn WriteHook>>;
