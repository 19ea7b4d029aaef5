//! A small async NBD client, for tests and tools: fixed newstyle negotiation
//! (LIST, INFO, GO, EXPORT_NAME, structured replies, meta contexts), then
//! pipelined requests with replies matched by cookie, plus a raw mode that
//! sends arbitrary bytes for bad-input tests.
//!
//! It trusts nothing from the server either: a malformed reply ends the
//! connection with an error instead of panicking.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::proto::*;

/// A boxed read half of a connection.
pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// A boxed write half of a connection.
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// Largest reply payload the client accepts (a 32 MiB read plus chunk overhead).
const MAX_REPLY_PAYLOAD: u32 = MAX_PAYLOAD + 1024;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Opens a stream to `addr`: "unix:/path" or "host:port" (as [`crate::NbdServer::local_addr`] prints).
pub async fn connect_stream(addr: &str) -> io::Result<(BoxRead, BoxWrite)> {
    if let Some(path) = addr.strip_prefix("unix:") {
        let s = tokio::net::UnixStream::connect(path).await?;
        let (r, w) = s.into_split();
        return Ok((Box::new(r), Box::new(w)));
    }
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    Ok((Box::new(r), Box::new(w)))
}

/// A connection used byte by byte, for feeding a server malformed input.
pub struct RawConn {
    r: BufReader<BoxRead>,
    w: BoxWrite,
}

impl RawConn {
    /// Connects without sending anything.
    pub async fn connect(addr: &str) -> io::Result<RawConn> {
        let (r, w) = connect_stream(addr).await?;
        Ok(RawConn {
            r: BufReader::new(r),
            w,
        })
    }

    /// Sends bytes as they are.
    pub async fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b).await?;
        self.w.flush().await
    }

    /// Receives exactly `n` bytes.
    pub async fn recv_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.r.read_exact(&mut v).await?;
        Ok(v)
    }

    /// Reads and discards until the peer closes; true if that happens within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let wait = async {
            loop {
                match self.r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Closes the write side (the server sees EOF).
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.w.shutdown().await
    }
}

/// An option refused by the server: the error reply type and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptError {
    /// Reply type (`NBD_REP_ERR_*`).
    pub reply_type: u32,
    /// Message sent with the error, if any.
    pub message: String,
}

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptReply {
    /// Reply type (`NBD_REP_*`).
    pub reply_type: u32,
    /// Reply data.
    pub data: Vec<u8>,
}

/// What the server said about an export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// `NBD_INFO_NAME`, when sent.
    pub name: Option<String>,
    /// `NBD_INFO_DESCRIPTION`, when sent.
    pub description: Option<String>,
    /// `NBD_INFO_BLOCK_SIZE` (minimum, preferred, maximum), when sent.
    pub block_size: Option<(u32, u32, u32)>,
}

/// The handshake phase of a client connection.
pub struct Negotiator {
    conn: RawConn,
    server_flags: u16,
    client_flags: u32,
    structured: bool,
    /// (id, name) of the contexts the last SET_META_CONTEXT selected.
    meta: Vec<(u32, String)>,
    info: Option<ExportInfo>,
}

impl Negotiator {
    /// Connects and answers the greeting with fixed newstyle and (if offered) no-zeroes.
    pub async fn connect(addr: &str) -> io::Result<Negotiator> {
        Self::connect_with(addr, None).await
    }

    /// Connects and answers the greeting with exactly `client_flags`.
    pub async fn connect_with_flags(addr: &str, client_flags: u32) -> io::Result<Negotiator> {
        Self::connect_with(addr, Some(client_flags)).await
    }

    async fn connect_with(addr: &str, client_flags: Option<u32>) -> io::Result<Negotiator> {
        let mut conn = RawConn::connect(addr).await?;
        let g = conn.recv_exact(18).await?;
        if be64(&g, 0) != NBDMAGIC || be64(&g, 8) != IHAVEOPT {
            return Err(bad("not a newstyle NBD server"));
        }
        let server_flags = be16(&g, 16);
        let flags = client_flags.unwrap_or_else(|| {
            let mut f = FLAG_C_FIXED_NEWSTYLE;
            if server_flags & FLAG_NO_ZEROES != 0 {
                f |= FLAG_C_NO_ZEROES;
            }
            f
        });
        conn.send(&flags.to_be_bytes()).await?;
        Ok(Negotiator {
            conn,
            server_flags,
            client_flags: flags,
            structured: false,
            meta: Vec::new(),
            info: None,
        })
    }

    /// Handshake flags the server sent.
    pub fn server_flags(&self) -> u16 {
        self.server_flags
    }

    /// Sends an option and collects replies up to the final one (ACK or an error).
    pub async fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<Vec<OptReply>> {
        let mut out = encode_option_header(opt, data.len() as u32).to_vec();
        out.extend_from_slice(data);
        self.conn.send(&out).await?;
        let mut replies = Vec::new();
        loop {
            let h = self.conn.recv_exact(OPTION_REPLY_HEADER_LEN).await?;
            let mut hb = [0u8; OPTION_REPLY_HEADER_LEN];
            hb.copy_from_slice(&h);
            let hdr =
                decode_option_reply_header(&hb).ok_or_else(|| bad("bad option reply magic"))?;
            if hdr.option != opt {
                return Err(bad(format!(
                    "reply for option {} to option {opt}",
                    hdr.option
                )));
            }
            if hdr.len > 1 << 20 {
                return Err(bad("option reply too long"));
            }
            let data = self.conn.recv_exact(hdr.len as usize).await?;
            let last = hdr.reply_type == REP_ACK || hdr.reply_type & REP_FLAG_ERROR != 0;
            replies.push(OptReply {
                reply_type: hdr.reply_type,
                data,
            });
            if last {
                return Ok(replies);
            }
        }
    }

    fn split(mut replies: Vec<OptReply>) -> Result<Vec<OptReply>, OptError> {
        match replies.pop() {
            Some(r) if r.reply_type == REP_ACK => Ok(replies),
            Some(r) => Err(OptError {
                reply_type: r.reply_type,
                message: String::from_utf8_lossy(&r.data).into_owned(),
            }),
            None => Err(OptError {
                reply_type: 0,
                message: "no reply".into(),
            }),
        }
    }

    /// `NBD_OPT_LIST`: (name, description) of every export.
    pub async fn list(&mut self) -> io::Result<Result<Vec<(String, String)>, OptError>> {
        let replies = self.option(OPT_LIST, &[]).await?;
        let replies = match Self::split(replies) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut out = Vec::new();
        for r in replies {
            let mut c = Cursor::new(&r.data);
            let name = c.string32().ok_or_else(|| bad("bad NBD_REP_SERVER"))?;
            let rest = c.take(c.remaining()).unwrap_or_default();
            out.push((name.to_string(), String::from_utf8_lossy(rest).into_owned()));
        }
        Ok(Ok(out))
    }

    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub async fn structured_reply(&mut self) -> io::Result<Result<(), OptError>> {
        let r = Self::split(self.option(OPT_STRUCTURED_REPLY, &[]).await?).map(|_| ());
        if r.is_ok() {
            self.structured = true;
        }
        Ok(r)
    }

    fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    fn contexts(replies: Vec<OptReply>) -> io::Result<Vec<(u32, String)>> {
        replies
            .into_iter()
            .map(|r| {
                if r.reply_type != REP_META_CONTEXT || r.data.len() < 4 {
                    return Err(bad("unexpected meta context reply"));
                }
                Ok((
                    be32(&r.data, 0),
                    String::from_utf8_lossy(&r.data[4..]).into_owned(),
                ))
            })
            .collect()
    }

    /// `NBD_OPT_LIST_META_CONTEXT`: (id, name) of matching contexts.
    pub async fn list_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Vec<(u32, String)>, OptError>> {
        let replies = self
            .option(OPT_LIST_META_CONTEXT, &Self::meta_data(export, queries))
            .await?;
        match Self::split(replies) {
            Ok(r) => Ok(Ok(Self::contexts(r)?)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT`: (id, name) of selected contexts.
    pub async fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Vec<(u32, String)>, OptError>> {
        // A SET replaces the selection even when it fails.
        self.meta.clear();
        let replies = self
            .option(OPT_SET_META_CONTEXT, &Self::meta_data(export, queries))
            .await?;
        match Self::split(replies) {
            Ok(r) => {
                let ctx = Self::contexts(r)?;
                for (i, (id, name)) in ctx.iter().enumerate() {
                    if ctx[..i].iter().any(|(j, n)| j == id || n == name) {
                        return Err(bad(format!(
                            "SET_META_CONTEXT selected {name} (id {id}) twice"
                        )));
                    }
                }
                self.meta = ctx.clone();
                Ok(Ok(ctx))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    async fn info_or_go(
        &mut self,
        opt: u32,
        export: &str,
        reqs: &[u16],
    ) -> io::Result<Result<ExportInfo, OptError>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        let replies = match Self::split(self.option(opt, &d).await?) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut info = ExportInfo::default();
        let mut got_export = false;
        for r in replies {
            if r.reply_type != REP_INFO || r.data.len() < 2 {
                return Err(bad("unexpected reply to INFO/GO"));
            }
            let p = &r.data[2..];
            match be16(&r.data, 0) {
                INFO_EXPORT if p.len() == 10 => {
                    info.size = be64(p, 0);
                    info.flags = be16(p, 8);
                    got_export = true;
                }
                INFO_NAME => info.name = Some(String::from_utf8_lossy(p).into_owned()),
                INFO_DESCRIPTION => {
                    info.description = Some(String::from_utf8_lossy(p).into_owned())
                }
                INFO_BLOCK_SIZE if p.len() == 12 => {
                    info.block_size = Some((be32(p, 0), be32(p, 4), be32(p, 8)));
                }
                INFO_EXPORT | INFO_BLOCK_SIZE => return Err(bad("bad NBD_REP_INFO length")),
                _ => {}
            }
        }
        if !got_export {
            return Err(bad("INFO/GO succeeded without NBD_INFO_EXPORT"));
        }
        Ok(Ok(info))
    }

    /// `NBD_OPT_INFO`.
    pub async fn info(
        &mut self,
        export: &str,
        reqs: &[u16],
    ) -> io::Result<Result<ExportInfo, OptError>> {
        self.info_or_go(OPT_INFO, export, reqs).await
    }

    /// `NBD_OPT_GO`; on success call [`Negotiator::into_client`] (or `into_raw`).
    pub async fn go(
        &mut self,
        export: &str,
        reqs: &[u16],
    ) -> io::Result<Result<ExportInfo, OptError>> {
        let r = self.info_or_go(OPT_GO, export, reqs).await?;
        if let Ok(info) = &r {
            self.info = Some(info.clone());
        }
        Ok(r)
    }

    /// `NBD_OPT_EXPORT_NAME`: enters transmission or fails when the server closes.
    pub async fn export_name(mut self, export: &str) -> io::Result<NbdClient> {
        let mut out = encode_option_header(OPT_EXPORT_NAME, export.len() as u32).to_vec();
        out.extend_from_slice(export.as_bytes());
        self.conn.send(&out).await?;
        let b = self.conn.recv_exact(10).await?;
        if self.client_flags & FLAG_C_NO_ZEROES == 0 {
            self.conn.recv_exact(124).await?;
        }
        self.info = Some(ExportInfo {
            size: be64(&b, 0),
            flags: be16(&b, 8),
            ..Default::default()
        });
        self.into_client()
    }

    /// `NBD_OPT_ABORT`; returns the server's reply if it sent one.
    pub async fn abort(mut self) -> io::Result<Option<OptReply>> {
        match self.option(OPT_ABORT, &[]).await {
            Ok(mut r) => Ok(r.pop()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Switches to the transmission phase after a successful GO or EXPORT_NAME.
    pub fn into_client(self) -> io::Result<NbdClient> {
        let info = self
            .info
            .ok_or_else(|| io::Error::other("transmission phase not entered"))?;
        Ok(NbdClient::start(
            self.conn,
            info,
            self.structured,
            self.meta,
        ))
    }

    /// Gives up structure: the raw connection, wherever the handshake is.
    pub fn into_raw(self) -> RawConn {
        self.conn
    }
}

/// A reply to one request, as the client reassembled it.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    /// Cookie of the request.
    pub cookie: u64,
    /// NBD error value; 0 on success.
    pub error: u32,
    /// Message of a structured error chunk.
    pub message: Option<String>,
    /// Read data, with holes filled with zeroes.
    pub data: Vec<u8>,
    /// (type, flags, offset, length) of every structured chunk, in arrival order.
    pub chunks: Vec<(u16, u16, u64, u64)>,
    /// Block status extents (length, flags) of the first block status chunk.
    pub extents: Vec<(u32, u32)>,
    /// Metadata context id of the first block status chunk.
    pub context_id: Option<u32>,
    /// (context id, extents) of every block status chunk, in arrival order.
    pub statuses: Vec<(u32, Vec<(u32, u32)>)>,
}

/// A request error: the transport failed, or the server answered with an NBD error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed or the server broke the protocol.
    #[error("NBD client I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server replied with an error.
    #[error("NBD error {code} ({}): {message}", nbd_error_name(*code))]
    Nbd {
        /// NBD error value.
        code: u32,
        /// Server's message, if any.
        message: String,
    },
}

impl ClientError {
    /// The NBD error value, when the server sent one.
    pub fn code(&self) -> Option<u32> {
        match self {
            ClientError::Nbd { code, .. } => Some(*code),
            ClientError::Io(_) => None,
        }
    }
}

fn check(r: Reply) -> Result<Reply, ClientError> {
    if r.error != 0 {
        return Err(ClientError::Nbd {
            code: r.error,
            message: r.message.unwrap_or_default(),
        });
    }
    Ok(r)
}

struct Pending {
    typ: u16,
    offset: u64,
    len: u32,
    reply: Reply,
    tx: oneshot::Sender<io::Result<Reply>>,
}

#[derive(Default)]
struct ClientShared {
    /// Ids of the negotiated metadata contexts; block status chunks must name one.
    meta_ids: Vec<u32>,
    pending: Mutex<HashMap<u64, Pending>>,
    order: Mutex<Vec<u64>>,
    dead: Mutex<Option<String>>,
}

impl ClientShared {
    fn fail_all(&self, why: &str) {
        *self.dead.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
        let pending: Vec<Pending> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in pending {
            let _ = p.tx.send(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                why.to_string(),
            )));
        }
    }
}

/// A reply not yet received.
pub struct PendingReply {
    cookie: u64,
    rx: oneshot::Receiver<io::Result<Reply>>,
}

impl PendingReply {
    /// Cookie of the request.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Waits for the whole reply.
    pub async fn wait(self) -> io::Result<Reply> {
        self.rx
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed"))?
    }
}

/// The transmission phase of a client connection; requests may be issued concurrently.
pub struct NbdClient {
    w: tokio::sync::Mutex<BoxWrite>,
    shared: Arc<ClientShared>,
    next_cookie: AtomicU64,
    info: ExportInfo,
    structured: bool,
    meta: Vec<(u32, String)>,
    reader: JoinHandle<()>,
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NbdClient {
    /// Connects to `export` with structured replies and `base:allocation`, via GO.
    pub async fn connect(addr: &str, export: &str) -> io::Result<NbdClient> {
        Self::connect_with_contexts(addr, export, &[META_BASE_ALLOCATION]).await
    }

    /// Connects to `export` with structured replies, selecting the metadata
    /// contexts `queries` name (whatever the server grants), via GO.
    pub async fn connect_with_contexts(
        addr: &str,
        export: &str,
        queries: &[&str],
    ) -> io::Result<NbdClient> {
        let mut n = Negotiator::connect(addr).await?;
        n.structured_reply()
            .await?
            .map_err(|e| io::Error::other(e.message))?;
        n.set_meta_context(export, queries)
            .await?
            .map_err(|e| io::Error::other(e.message))?;
        n.go(export, &[INFO_BLOCK_SIZE]).await?.map_err(|e| {
            io::Error::other(format!("GO failed ({:#x}): {}", e.reply_type, e.message))
        })?;
        n.into_client()
    }

    fn start(
        conn: RawConn,
        info: ExportInfo,
        structured: bool,
        meta: Vec<(u32, String)>,
    ) -> NbdClient {
        let shared = Arc::new(ClientShared {
            meta_ids: meta.iter().map(|(id, _)| *id).collect(),
            ..Default::default()
        });
        let RawConn { r, w } = conn;
        let s = shared.clone();
        let reader = tokio::spawn(async move {
            let why = match read_replies(r, &s).await {
                Ok(()) => "server closed the connection".to_string(),
                Err(e) => e.to_string(),
            };
            s.fail_all(&why);
        });
        NbdClient {
            w: tokio::sync::Mutex::new(w),
            shared,
            next_cookie: AtomicU64::new(1),
            info,
            structured,
            meta,
            reader,
        }
    }

    /// Export size and flags as negotiated.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// True when structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Context id of `base:allocation`, when negotiated.
    pub fn base_allocation(&self) -> Option<u32> {
        self.context_id(META_BASE_ALLOCATION)
    }

    /// Context id of `qemu:allocation-depth`, when negotiated.
    pub fn allocation_depth(&self) -> Option<u32> {
        self.context_id(META_ALLOCATION_DEPTH)
    }

    /// Context id of the metadata context called `name`, when negotiated.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.meta.iter().find(|(_, n)| n == name).map(|(id, _)| *id)
    }

    /// (id, name) of every negotiated metadata context, as the server listed them.
    pub fn meta_contexts(&self) -> &[(u32, String)] {
        &self.meta
    }

    /// Cookies in the order their replies completed.
    pub fn reply_order(&self) -> Vec<u64> {
        self.shared
            .order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends one request and returns a handle on its reply.
    pub async fn submit(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> io::Result<PendingReply> {
        if let Some(why) = self
            .shared
            .dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, why));
        }
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let reply = Reply {
            cookie,
            data: if typ == CMD_READ {
                vec![0; len as usize]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                cookie,
                Pending {
                    typ,
                    offset,
                    len,
                    reply,
                    tx,
                },
            );
        let req = Request {
            flags,
            typ,
            cookie,
            offset,
            len: len.into(),
        };
        let mut w = self.w.lock().await;
        let sent = async {
            w.write_all(&req.encode()).await?;
            if let Some(p) = payload {
                w.write_all(p).await?;
            }
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&cookie);
            return Err(e);
        }
        Ok(PendingReply { cookie, rx })
    }

    /// Sends one request and waits for its reply (errors are in `Reply::error`).
    pub async fn request(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> io::Result<Reply> {
        self.submit(typ, flags, offset, len, payload)
            .await?
            .wait()
            .await
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        Ok(check(self.request(CMD_READ, 0, offset, len, None).await?)?.data)
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        check(
            self.request(CMD_WRITE, flags, offset, data.len() as u32, Some(data))
                .await?,
        )?;
        Ok(())
    }

    /// Flushes.
    pub async fn flush(&self) -> Result<(), ClientError> {
        check(self.request(CMD_FLUSH, 0, 0, 0, None).await?)?;
        Ok(())
    }

    /// Trims a range.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        check(self.request(CMD_TRIM, 0, offset, len, None).await?)?;
        Ok(())
    }

    /// Writes zeroes with the given command flags (`NO_HOLE`, `FAST_ZERO`, `FUA`).
    pub async fn write_zeroes(&self, offset: u64, len: u32, flags: u16) -> Result<(), ClientError> {
        check(
            self.request(CMD_WRITE_ZEROES, flags, offset, len, None)
                .await?,
        )?;
        Ok(())
    }

    /// Sends a cache hint.
    pub async fn cache(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        check(self.request(CMD_CACHE, 0, offset, len, None).await?)?;
        Ok(())
    }

    /// `base:allocation` extents (length, flags) from `offset`; with another
    /// single context negotiated instead, that context's extents.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Result<Vec<(u32, u32)>, ClientError> {
        let mut all = self.block_status_all(offset, len, req_one).await?;
        let i = self
            .base_allocation()
            .and_then(|id| all.iter().position(|(c, _)| *c == id))
            .unwrap_or(0);
        Ok(if i < all.len() {
            all.swap_remove(i).1
        } else {
            Vec::new()
        })
    }

    /// Extents of one metadata context: (length, flags) from `offset`.
    pub async fn block_status_of(
        &self,
        context: &str,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Result<Vec<(u32, u32)>, ClientError> {
        let id = self.context_id(context).ok_or_else(|| {
            ClientError::Io(io::Error::other(format!("{context} was not negotiated")))
        })?;
        let all = self.block_status_all(offset, len, req_one).await?;
        all.into_iter()
            .find(|(c, _)| *c == id)
            .map(|(_, e)| e)
            .ok_or_else(|| ClientError::Io(bad(format!("no block status chunk for {context}"))))
    }

    /// Every block status chunk of one request: (context id, extents), in
    /// arrival order. The client checked there is exactly one per negotiated context.
    pub async fn block_status_all(
        &self,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Result<Vec<(u32, Vec<(u32, u32)>)>, ClientError> {
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let r = check(
            self.request(CMD_BLOCK_STATUS, flags, offset, len, None)
                .await?,
        )?;
        let mut ids: Vec<u32> = r.statuses.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        let mut want = self.shared.meta_ids.clone();
        want.sort_unstable();
        if ids != want {
            return Err(ClientError::Io(bad(format!(
                "block status chunks for contexts {ids:?}, negotiated {want:?}"
            ))));
        }
        Ok(r.statuses)
    }

    /// Sends NBD_CMD_DISC and waits for the server to close the connection.
    pub async fn disconnect(mut self) -> io::Result<()> {
        let req = Request {
            flags: 0,
            typ: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        {
            let mut w = self.w.lock().await;
            w.write_all(&req.encode()).await?;
            w.flush().await?;
        }
        let reader = std::mem::replace(&mut self.reader, tokio::spawn(async {}));
        tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "server did not close after DISC")
            })?
            .map_err(io::Error::other)
    }
}

async fn read_replies(mut r: BufReader<BoxRead>, s: &ClientShared) -> io::Result<()> {
    loop {
        let mut magic = [0u8; 4];
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let error = r.read_u32().await?;
                let cookie = r.read_u64().await?;
                let mut p = take_pending(s, cookie)?;
                if p.typ == CMD_READ && error == 0 {
                    r.read_exact(&mut p.reply.data).await?;
                }
                p.reply.error = error;
                complete(s, p);
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; CHUNK_HEADER_LEN - 4];
                r.read_exact(&mut rest).await?;
                let mut hb = [0u8; CHUNK_HEADER_LEN];
                hb[..4].copy_from_slice(&magic);
                hb[4..].copy_from_slice(&rest);
                let h = decode_chunk_header(&hb).ok_or_else(|| bad("bad chunk magic"))?;
                if h.len > MAX_REPLY_PAYLOAD {
                    return Err(bad(format!("chunk payload of {} bytes", h.len)));
                }
                let mut payload = vec![0u8; h.len as usize];
                r.read_exact(&mut payload).await?;
                let done = h.flags & REPLY_FLAG_DONE != 0;
                let mut map = s.pending.lock().unwrap_or_else(|e| e.into_inner());
                let p = map
                    .get_mut(&h.cookie)
                    .ok_or_else(|| bad(format!("reply for unknown cookie {}", h.cookie)))?;
                apply_chunk(p, &h, &payload, &s.meta_ids)?;
                if done {
                    let p = map.remove(&h.cookie).ok_or_else(|| bad("vanished"))?;
                    drop(map);
                    complete(s, p);
                }
            }
            m => return Err(bad(format!("bad reply magic {m:#x}"))),
        }
    }
}

fn take_pending(s: &ClientShared, cookie: u64) -> io::Result<Pending> {
    s.pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&cookie)
        .ok_or_else(|| bad(format!("reply for unknown cookie {cookie}")))
}

fn complete(s: &ClientShared, p: Pending) {
    s.order
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(p.reply.cookie);
    let _ = p.tx.send(Ok(p.reply));
}

/// Folds one structured chunk into the pending reply, checking it against the request.
fn apply_chunk(
    p: &mut Pending,
    h: &ChunkHeader,
    payload: &[u8],
    meta_ids: &[u32],
) -> io::Result<()> {
    let mut c = Cursor::new(payload);
    let in_request =
        |off: u64, len: u64| off >= p.offset && off + len <= p.offset + u64::from(p.len);
    match h.typ {
        REPLY_TYPE_NONE => {
            if !payload.is_empty() || h.flags & REPLY_FLAG_DONE == 0 {
                return Err(bad("bad NBD_REPLY_TYPE_NONE"));
            }
            p.reply.chunks.push((h.typ, h.flags, 0, 0));
        }
        REPLY_TYPE_OFFSET_DATA => {
            let off = c.u64().ok_or_else(|| bad("short OFFSET_DATA"))?;
            let data = &payload[8..];
            if p.typ != CMD_READ || data.is_empty() || !in_request(off, data.len() as u64) {
                return Err(bad("OFFSET_DATA outside the request"));
            }
            let at = (off - p.offset) as usize;
            p.reply.data[at..at + data.len()].copy_from_slice(data);
            p.reply
                .chunks
                .push((h.typ, h.flags, off, data.len() as u64));
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let off = c.u64().ok_or_else(|| bad("short OFFSET_HOLE"))?;
            let len = c.u32().ok_or_else(|| bad("short OFFSET_HOLE"))?;
            if payload.len() != 12 || p.typ != CMD_READ || len == 0 || !in_request(off, len.into())
            {
                return Err(bad("bad OFFSET_HOLE"));
            }
            let at = (off - p.offset) as usize;
            p.reply.data[at..at + len as usize].fill(0);
            p.reply.chunks.push((h.typ, h.flags, off, len.into()));
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if p.typ != CMD_BLOCK_STATUS
                || payload.len() < 12
                || !(payload.len() - 4).is_multiple_of(8)
            {
                return Err(bad("bad BLOCK_STATUS chunk"));
            }
            let id = c.u32().ok_or_else(|| bad("short BLOCK_STATUS chunk"))?;
            if !meta_ids.contains(&id) {
                return Err(bad(format!("block status for unknown context id {id}")));
            }
            if p.reply.statuses.iter().any(|(c, _)| *c == id) {
                return Err(bad(format!("two block status chunks for context id {id}")));
            }
            let mut extents = Vec::with_capacity(c.remaining() / 8);
            while c.remaining() > 0 {
                let len = c.u32().ok_or_else(|| bad("short extent"))?;
                let flags = c.u32().ok_or_else(|| bad("short extent"))?;
                if len == 0 {
                    return Err(bad("zero-length extent"));
                }
                extents.push((len, flags));
            }
            if p.reply.context_id.is_none() {
                p.reply.context_id = Some(id);
                p.reply.extents = extents.clone();
            }
            p.reply.statuses.push((id, extents));
            p.reply.chunks.push((h.typ, h.flags, p.offset, 0));
        }
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
            let err = c.u32().ok_or_else(|| bad("short error chunk"))?;
            let n = c.u16().ok_or_else(|| bad("short error chunk"))?;
            let msg = c
                .take(n.into())
                .ok_or_else(|| bad("error message overruns chunk"))?;
            let off = if t == REPLY_TYPE_ERROR_OFFSET {
                c.u64().unwrap_or(0)
            } else {
                0
            };
            if err == 0 {
                return Err(bad("error chunk with error 0"));
            }
            p.reply.error = err;
            p.reply.message = Some(String::from_utf8_lossy(msg).into_owned());
            p.reply.chunks.push((t, h.flags, off, 0));
        }
        t => return Err(bad(format!("unknown chunk type {t}"))),
    }
    Ok(())
}
