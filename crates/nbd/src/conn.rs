//! Life of one client connection: handshake, attach to the export, serve
//! requests, and the two ways the server can end it (kill now, or drain).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::Notify;

use crate::export::ExportTable;
use crate::handshake;
use crate::transmission;

/// How long a client may take to finish option haggling (QEMU's
/// `handshake-max-seconds` default), so an idle socket cannot hold a slot forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Read buffer per connection: holds many pipelined request headers, and is
/// bypassed for payloads bigger than itself.
const READ_BUFFER: usize = 128 * 1024;

/// A one-way latch that async code can wait on.
#[derive(Default)]
pub(crate) struct Switch {
    on: AtomicBool,
    notify: Notify,
}

impl Switch {
    pub(crate) fn trigger(&self) {
        self.on.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before checking the flag so a trigger in between is not lost.
            notified.as_mut().enable();
            if self.is_on() {
                return;
            }
            notified.await;
        }
    }
}

/// Server-side handle on one connection.
pub(crate) struct ConnControl {
    id: u64,
    /// Drop the connection now, abandoning in-flight requests.
    kill: Switch,
    /// Stop reading requests, finish in-flight ones, then close.
    drain: Switch,
}

impl ConnControl {
    pub(crate) fn new(id: u64) -> Arc<ConnControl> {
        Arc::new(ConnControl {
            id,
            kill: Switch::default(),
            drain: Switch::default(),
        })
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn kill(&self) {
        self.kill.trigger();
    }

    pub(crate) fn drain(&self) {
        self.drain.trigger();
    }

    pub(crate) fn drain_switch(&self) -> &Switch {
        &self.drain
    }
}

/// Serves one client over any byte stream, from the greeting to the end of
/// its input, against `exports`: the whole of what a socket connection runs
/// (handshake, option parsing, request parsing and serving), without a
/// listener. It is the entry point of the NBD fuzz targets and property
/// tests, which feed it arbitrary bytes.
pub async fn serve_stream<R, W>(reader: R, writer: W, exports: Arc<ExportTable>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    run(reader, writer, exports, ConnControl::new(0)).await
}

/// Runs one connection to its end. Never panics on client input; every
/// protocol violation ends only this connection.
pub(crate) async fn run<R, W>(
    reader: R,
    mut writer: W,
    exports: Arc<ExportTable>,
    ctl: Arc<ConnControl>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = ctl.id();
    let serve = async {
        let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
        let negotiated = tokio::select! {
            r = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake::negotiate(&mut reader, &mut writer, &exports, &ctl),
            ) => r,
            // A server shutting down drops clients that have not attached yet.
            _ = ctl.drain.wait() => return,
        };
        let session = match negotiated {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(conn = id, "NBD handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(conn = id, "NBD handshake timed out");
                return;
            }
        };
        transmission::serve(reader, writer, session, &ctl).await;
    };
    tokio::select! {
        _ = serve => {}
        _ = ctl.kill.wait() => tracing::debug!(conn = id, "NBD connection closed by the server"),
    }
}
