//! The livesnap block layer: a graph of named nodes, each a driver instance
//! (`file`, `raw`, `qcow2` with backing chains), with request tracking by
//! range, dirty bitmaps, write hooks for block jobs, and image creation
//! ([`create_image`]).
//!
//! This crate owns how bytes get to and from images. It knows nothing of NBD,
//! QMP or block jobs: those layers call [`BlockNode`] methods and never reach
//! into drivers directly.

pub mod backend;
pub mod bitmap;
pub mod bitmaps;
pub mod blkdebug;
pub mod buf;
pub mod create;
pub mod driver;
pub mod error;
pub mod file;
pub mod graph;
pub mod hook;
pub mod lock;
pub mod node;
pub mod offload;
pub mod open;
pub mod qcow2;
pub mod raw;
pub mod tracker;

pub use backend::{BackendHold, BlockBackend};
pub use bitmap::DirtyBitmap;
pub use bitmaps::{
    lookup_bitmap, BitmapInfo, BitmapRef, BitmapSet, BitmapStore, NamedBitmap, StoredBitmap, Thaw,
    Use,
};
pub use blkdebug::{
    BlkdebugDriver, BlkdebugOpenOptions, BlkdebugOptions, BlkdebugRules, InjectError, IoType,
};
pub use buf::IoBuf;
pub use create::{
    create_file, create_image, format_qcow2, CreateOptions, FileCreateOptions, ImageFormat,
    Prealloc, Qcow2CreateOptions,
};
pub use driver::{
    BlockDriver, BlockStatus, ChildRef, FormatSpecific, IoFuture, Limits, WriteFlags, ZeroFlags,
};
pub use error::{Error, ErrorKind, Result};
pub use file::{FileAio, FileDriver, FileOptions, Refusal, DISABLE_IO_URING_ENV};
pub use graph::{check_node_name, id_wellformed, BlockGraph};
pub use hook::{HookedWrite, WriteHook, WriteKind};
pub use lock::{LockConflict, Locking};
pub use node::{BlockNode, NodeUser};
pub use open::{
    lock_for_user, open, BackingOption, BlockdevOptions, BlockdevRef, DriverFactory, DriverOptions,
    Drivers, FactoryOpen, OpenFuture,
};
pub use qcow2::{
    check_chain_depth, read_header_backing, resolve_backing_filename, BackingRef, Qcow2BitmapInfo,
    Qcow2Cache, Qcow2Driver, Qcow2Info, Qcow2Options,
};
pub use raw::{RawDriver, RawOptions};
pub use tracker::{RequestKind, RequestTracker, TrackedRequest};

/// The text of an OS error without Rust's " (os error N)" suffix, as QEMU prints it.
pub fn os_error_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => {
            // SAFETY: strerror returns a pointer to a static or thread-local string.
            let s = unsafe { std::ffi::CStr::from_ptr(libc::strerror(errno)) };
            s.to_string_lossy().into_owned()
        }
        None => e.to_string(),
    }
}
