//! QMP, the QEMU Machine Protocol, as qemu-storage-daemon speaks it.
//!
//! This crate owns the protocol and nothing else: framing of the JSON
//! stream (including QEMU's treatment of bad input and its limits), the
//! exact output format, capabilities negotiation, `id` echo, error classes
//! and texts, argument checking with QEMU's messages ([`Args`]), events
//! ([`EventBus`]), the unix-socket server ([`QmpServer`]) and a client
//! ([`QmpClient`]) that also works against QEMU itself.
//!
//! It must not know about block devices, jobs or any particular command
//! beyond `qmp_capabilities`: the daemon supplies its commands through the
//! [`Dispatcher`] trait. It must never let a client's input panic the
//! server, block other monitors, or use unbounded memory.
//!
//! Reference behaviour, recorded from qemu-storage-daemon 10.0.2, is in
//! `docs/qmp-qsd-transcript.md`; the tests compare against it.

mod args;
mod client;
mod error;
mod event;
mod order;
mod parse;
mod server;
mod stream;
mod wire;

pub use args::{Args, Elem};
pub use client::QmpClient;
pub use error::{ErrorClass, QmpError};
pub use event::{Event, EventBus, DEFAULT_EVENT_BACKLOG};
pub use server::{Dispatcher, Greeting, QmpServer, PENDING_REPLY_BYTES};
pub use stream::{JsonStream, Limits, Message};
pub use wire::{to_wire, to_wire_line};
