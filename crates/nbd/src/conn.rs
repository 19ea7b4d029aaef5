//! Life of one client connection: handshake, attach to the export, serve
//! requests, and the two ways the server can end it (kill now, or drain).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

use crate::export::ExportTable;
use crate::handshake::{self, Negotiated, Session, Tls};
use crate::tls::ServerTls;
use crate::transmission;

/// How long a client may take to finish option haggling, TLS handshake
/// included (QEMU's `handshake-max-seconds` default), so an idle socket
/// cannot hold a slot forever.
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

/// A negotiated session and the stream it runs on: the accepted socket's
/// halves as they are, or TLS over them (chosen once per connection, so the
/// plain path costs nothing per request).
enum Attached<R, W> {
    Plain(BufReader<R>, W, Session),
    Tls(
        BufReader<TlsRead<R, W>>,
        tokio::io::WriteHalf<TlsStream<R, W>>,
        Session,
    ),
}

type TlsStream<R, W> = tokio_rustls::server::TlsStream<tokio::io::Join<R, W>>;
type TlsRead<R, W> = tokio::io::ReadHalf<TlsStream<R, W>>;

fn proto_err(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// The whole handshake: greeting, options, and with TLS the upgrade and the
/// options after it. `Ok(None)` when the client left cleanly.
async fn handshake<R, W>(
    mut reader: BufReader<R>,
    mut writer: W,
    exports: &ExportTable,
    ctl: &Arc<ConnControl>,
    tls: Option<&ServerTls>,
) -> std::io::Result<Option<Attached<R, W>>>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut st = handshake::greet(&mut reader, &mut writer, tls.is_some()).await?;
    match handshake::haggle(&mut reader, &mut writer, &mut st, exports, ctl).await? {
        Negotiated::Left => return Ok(None),
        Negotiated::Attach(s) => return Ok(Some(Attached::Plain(reader, writer, s))),
        Negotiated::StartTls => {}
    }
    let Some(tls) = tls else {
        return Err(proto_err("STARTTLS accepted without TLS credentials"));
    };
    // The client must wait for the ACK before its TLS hello: plain bytes
    // already read past it would be taken for TLS records otherwise.
    if !reader.buffer().is_empty() {
        return Err(proto_err(
            "data sent after NBD_OPT_STARTTLS before the TLS handshake",
        ));
    }
    let stream = tls
        .accept(tokio::io::join(reader.into_inner(), writer))
        .await?;
    st.tls = Tls::Active;
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    match handshake::haggle(&mut r, &mut w, &mut st, exports, ctl).await? {
        Negotiated::Left => Ok(None),
        Negotiated::Attach(s) => {
            // The last reply (GO's ACK) may still sit in the TLS buffer.
            w.flush().await?;
            Ok(Some(Attached::Tls(r, w, s)))
        }
        Negotiated::StartTls => Err(proto_err("second STARTTLS accepted")),
    }
}

/// Runs one connection to its end. Never panics on client input; every
/// protocol violation ends only this connection.
pub(crate) async fn run<R, W>(
    reader: R,
    writer: W,
    exports: Arc<ExportTable>,
    ctl: Arc<ConnControl>,
    tls: Option<Arc<ServerTls>>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = ctl.id();
    let serve = async {
        let reader = BufReader::with_capacity(READ_BUFFER, reader);
        let negotiated = tokio::select! {
            r = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake(reader, writer, &exports, &ctl, tls.as_deref()),
            ) => r,
            // A server shutting down drops clients that have not attached yet.
            _ = ctl.drain.wait() => return,
        };
        let attached = match negotiated {
            Ok(Ok(Some(a))) => a,
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
        match attached {
            Attached::Plain(r, w, s) => transmission::serve(r, w, s, &ctl).await,
            Attached::Tls(r, w, s) => transmission::serve(r, w, s, &ctl).await,
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = ctl.kill.wait() => tracing::debug!(conn = id, "NBD connection closed by the server"),
    }
}
