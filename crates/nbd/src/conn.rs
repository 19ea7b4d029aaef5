//! Life of one client connection: handshake, attach to the export, serve
//! requests, and the two ways the server can end it (kill now, or drain).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

use crate::budget::Budget;
use crate::export::ExportTable;
use crate::handshake::{self, proto_err, Negotiated, Session, Tls};
use crate::proto::*;
use crate::tls::ServerTls;
use crate::transmission;

/// How long a refused client gets to send its options.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Options a refused client may send before it is closed.
const REFUSAL_OPTIONS: usize = 16;
/// Longest option a refused client may send (a GO with a 4 KiB name fits).
const MAX_REFUSED_OPTION: u32 = 8 * 1024;

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
        Negotiated::Attach(s) => Ok(Some(Attached::Tls(r, w, s))),
        Negotiated::StartTls => Err(proto_err("second STARTTLS accepted")),
    }
}

/// Serves one client over any byte stream, from the greeting to the end of
/// its input, against `exports`: the whole of what a socket connection runs
/// (handshake, option parsing, request parsing and serving), without a
/// listener or TLS. It is the entry point of the NBD fuzz targets and property
/// tests, which feed it arbitrary bytes.
pub async fn serve_stream<R, W>(reader: R, writer: W, exports: Arc<ExportTable>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    run(
        reader,
        writer,
        exports,
        Budget::new(),
        ConnControl::new(0),
        None,
    )
    .await
}

/// Runs one connection to its end. Never panics on client input; every
/// protocol violation ends only this connection.
pub(crate) async fn run<R, W>(
    reader: R,
    writer: W,
    exports: Arc<ExportTable>,
    budget: Arc<Budget>,
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
        let lane = budget.conn();
        match attached {
            Attached::Plain(r, w, s) => transmission::serve(r, w, s, lane, &ctl).await,
            Attached::Tls(r, w, s) => transmission::serve(r, w, s, lane, &ctl).await,
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = ctl.kill.wait() => tracing::debug!(conn = id, "NBD connection closed by the server"),
    }
}

/// Turns away a client past `max-connections` so that it learns why: the
/// greeting, then `NBD_REP_ERR_POLICY` with a message to each option until it
/// gives up (clients treat a refused optional option as "not supported" and go
/// on, so the message that counts is the one to `NBD_OPT_GO`). QEMU leaves
/// such clients waiting in the listen backlog instead. `NBD_OPT_EXPORT_NAME`,
/// which has no error reply, just gets the close.
pub(crate) async fn refuse<R, W>(mut r: R, mut w: W, limit: u32)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let talk = async {
        handshake::send_greeting(&mut w).await?;
        let _client_flags = r.read_u32().await?;
        let msg = format!("server is at its limit of {limit} connections (max-connections)");
        for _ in 0..REFUSAL_OPTIONS {
            let mut hdr = [0u8; OPTION_HEADER_LEN];
            r.read_exact(&mut hdr).await?;
            let Some((opt, len)) = decode_option_header(&hdr) else {
                break;
            };
            if opt == OPT_EXPORT_NAME || len > MAX_REFUSED_OPTION {
                break;
            }
            tokio::io::copy(&mut (&mut r).take(len.into()), &mut tokio::io::sink()).await?;
            let (typ, data) = if opt == OPT_ABORT {
                (REP_ACK, &[][..])
            } else {
                (REP_ERR_POLICY, msg.as_bytes())
            };
            handshake::reply(&mut w, opt, typ, data).await?;
            if opt == OPT_ABORT {
                break;
            }
        }
        w.flush().await
    };
    if let Ok(Err(e)) = tokio::time::timeout(REFUSAL_TIMEOUT, talk).await {
        tracing::debug!("NBD refusal not delivered: {e}");
    }
}
