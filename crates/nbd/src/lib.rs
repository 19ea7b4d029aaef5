//! NBD server for livesnap (and a small client for tests).
//!
//! This crate owns the NBD wire protocol as `doc/proto.md` of the
//! NetworkBlockDevice project defines it: fixed newstyle negotiation, simple
//! and structured replies, extended headers, `base:allocation` block status (and QEMU's
//! `qemu:allocation-depth` on exports that enable it and
//! `qemu:dirty-bitmap:NAME` for the bitmaps an export offers, QEMU's
//! `docs/interop/nbd.rst`), TLS by `NBD_OPT_STARTTLS` (module [`tls`]), and the listeners and export table a daemon
//! needs to serve [`livesnap_block::BlockBackend`]s.
//!
//! It must not reach into block drivers (only [`livesnap_block::BlockBackend`]
//! methods), must not know about QMP or jobs, and must never let one client's
//! input — however malformed — panic, block or end anything but that client's
//! own connection. Memory held per connection and by all connections
//! together is bounded (`budget.rs`).

mod budget;
pub mod client;
mod conn;
pub mod export;
mod handshake;
pub mod proto;
pub mod server;
pub mod stats;
pub mod tls;
mod transmission;

pub use client::{ClientError, ExportInfo, NbdClient, Negotiator, RawConn};
pub use conn::{serve_stream, HANDSHAKE_TIMEOUT};
pub use export::{DirtyExtents, Export, ExportBitmap, ExportConfig, ExportTable};
pub use server::{ListenAddr, NbdServer, SHUTDOWN_GRACE};
pub use stats::{ExportStats, ServerStats};
pub use tls::{Authorizer, CredsError, Endpoint, ServerTls, TlsCreds};
