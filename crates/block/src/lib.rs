//! The livesnap block layer: a graph of named nodes, each a driver instance
//! (`file`, `raw`; `qcow2` next), with request tracking by range.
//!
//! This crate owns how bytes get to and from images. It knows nothing of NBD,
//! QMP or block jobs: those layers call [`BlockNode`] methods and never reach
//! into drivers directly.

pub mod buf;
pub mod driver;
pub mod file;
pub mod graph;
pub mod node;
pub mod raw;
pub mod tracker;

pub use buf::IoBuf;
pub use driver::{BlockDriver, BlockStatus, ChildRef, IoFuture, Limits, WriteFlags, ZeroFlags};
pub use file::{FileDriver, FileOptions};
pub use graph::{check_node_name, BlockGraph, GraphError};
pub use node::BlockNode;
pub use raw::{RawDriver, RawOptions};
pub use tracker::{RequestKind, RequestTracker, TrackedRequest};
