//! The transmission phase: one reader parses requests and runs each as its
//! own task; one writer sends replies, so requests complete out of order but
//! reply frames never interleave.
//!
//! Memory is bounded by the budgets of [`crate::budget`]: payload bytes (write
//! data read in, read data waiting to go out) are counted from the moment a
//! request is accepted until its last reply frame is written, and the reader
//! stops reading while its connection cannot get budget.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use livesnap_block::{BlockBackend, IoBuf, WriteFlags, ZeroFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinSet;

use crate::budget::{ConnBudget, Permits};
use crate::conn::ConnControl;
use crate::export::ExportBitmap;
use crate::handshake::{MetaContexts, Session};
use crate::proto::*;
use crate::stats::ExportStats;

/// Reads up to this size skip the block-status lookup: one read, and a hole
/// chunk only if the data turns out to be all zeroes.
const SMALL_READ: u32 = 64 * 1024;
/// Most extents a structured read is split into; the rest is sent as data.
const MAX_READ_SEGMENTS: usize = 64;
/// Most block-status lookups for one NBD_CMD_BLOCK_STATUS (the spec lets the
/// server answer with fewer extents than the request covers).
const MAX_STATUS_LOOKUPS: usize = 1024;
/// Most extents of one dirty-bitmap context in one reply: QEMU's bound, a
/// 1 MiB payload.
const MAX_BITMAP_EXTENTS: usize = (1 << 20) / 8;
/// Frames written with one vectored write at most.
const MAX_BATCH: usize = 256;
/// Linux's limit on iovecs per writev.
const MAX_IOV: usize = 1024;

/// Bytes written before a reply's payload: a reply or chunk header and any fixed fields.
enum Head {
    Inline([u8; 48], u8),
    Heap(Vec<u8>),
}

impl Head {
    fn inline(parts: &[&[u8]]) -> Head {
        Head::Inline([0u8; 48], 0).then(parts)
    }

    /// This head with `parts` appended (all fit: a header and a few fields).
    fn then(self, parts: &[&[u8]]) -> Head {
        match self {
            Head::Inline(mut b, n) => {
                let mut n = n as usize;
                for p in parts {
                    b[n..n + p.len()].copy_from_slice(p);
                    n += p.len();
                }
                Head::Inline(b, n as u8)
            }
            Head::Heap(mut v) => {
                for p in parts {
                    v.extend_from_slice(p);
                }
                Head::Heap(v)
            }
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Head::Inline(b, n) => &b[..*n as usize],
            Head::Heap(v) => v,
        }
    }
}

/// One message for the writer: a header and an optional payload.
struct Frame {
    head: Head,
    data: Option<IoBuf>,
    _permits: Option<Permits>,
}

impl Frame {
    /// Bytes on the wire.
    fn len(&self) -> usize {
        self.head.bytes().len() + self.data.as_ref().map_or(0, |d| d.len())
    }
}

/// Why a request failed: the NBD error value and a message for structured replies.
struct Fail {
    err: u32,
    msg: String,
}

impl Fail {
    fn new(err: u32, msg: impl Into<String>) -> Fail {
        Fail {
            err,
            msg: msg.into(),
        }
    }

    fn io(what: &str, e: &io::Error) -> Fail {
        Fail::new(io_error_to_nbd(e), format!("{what} failed: {e}"))
    }
}

/// A piece of a structured read reply.
enum Seg {
    Data(u64, IoBuf),
    Hole(u64, u32),
}

/// What every request task needs from its connection.
struct Ctx {
    backend: Arc<BlockBackend>,
    read_only: bool,
    /// Structured replies or extended headers: reads may come in chunks.
    structured: bool,
    /// Extended headers: 32-byte requests and replies, 64-bit lengths.
    extended: bool,
    meta: MetaContexts,
    /// The export's bitmaps; `meta.bitmaps` indexes into them.
    bitmaps: Vec<ExportBitmap>,
    stats: Arc<ExportStats>,
}

impl Ctx {
    /// BLOCK_STATUS may name the contexts it wants in a payload
    /// (`NBD_FLAG_BLOCK_STATUS_PAYLOAD`, offered as QEMU does: with extended
    /// headers and a context selected).
    fn status_payload(&self) -> bool {
        self.extended && !self.meta.is_empty()
    }
}

/// Sends the frames of one reply; the request's budget goes with the last one.
struct Replier {
    cookie: u64,
    /// The request's offset, echoed by extended reply headers.
    offset: u64,
    structured: bool,
    extended: bool,
    tx: UnboundedSender<Frame>,
    permits: Option<Permits>,
}

impl Replier {
    /// A chunk header for a payload of `len` bytes followed by `fields`:
    /// a structured one, or an extended one once those were negotiated.
    fn chunk(&self, flags: u16, typ: u16, len: usize, fields: &[&[u8]]) -> Head {
        let head = if self.extended {
            let e = encode_extended_reply_header(flags, typ, self.cookie, self.offset, len as u64);
            Head::inline(&[&e])
        } else {
            Head::inline(&[&encode_chunk_header(flags, typ, self.cookie, len as u32)])
        };
        head.then(fields)
    }

    fn send(&mut self, head: Head, data: Option<IoBuf>, last: bool) {
        let permits = if last { self.permits.take() } else { None };
        // A closed channel means the writer is gone and the connection is ending.
        let _ = self.tx.send(Frame {
            head,
            data,
            _permits: permits,
        });
    }

    fn done(mut self) {
        // Extended headers leave no room for simple replies.
        let head = if self.extended {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0, &[])
        } else {
            Head::inline(&[&encode_simple_reply(0, self.cookie)])
        };
        self.send(head, None, true);
    }

    fn fail(mut self, f: Fail) {
        if self.structured {
            let payload = encode_error_payload(f.err, &f.msg);
            let mut v = self
                .chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, payload.len(), &[])
                .bytes()
                .to_vec();
            v.extend_from_slice(&payload);
            self.send(Head::Heap(v), None, true);
        } else {
            let head = Head::inline(&[&encode_simple_reply(f.err, self.cookie)]);
            self.send(head, None, true);
        }
    }

    fn finish(self, r: Result<(), Fail>) {
        match r {
            Ok(()) => self.done(),
            Err(f) => self.fail(f),
        }
    }
}

/// How the request loop ended.
enum Exit {
    /// Finish in-flight requests and send their replies, then close.
    Graceful,
    /// The client broke the protocol: close now.
    Abort,
}

/// Serves requests until the client disconnects, breaks the protocol, or the server drains.
pub(crate) async fn serve<R, W>(
    reader: BufReader<R>,
    writer: W,
    session: Session,
    budget: ConnBudget,
    ctl: &Arc<ConnControl>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = session.export().clone();
    let ctx = Arc::new(Ctx {
        backend: export.config().backend.clone(),
        read_only: export.read_only(),
        structured: session.structured || session.extended,
        extended: session.extended,
        meta: session.meta.clone(),
        bitmaps: export.config().bitmaps.clone(),
        stats: export.stats().clone(),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = write_loop(writer, rx, session);
    let reader = read_loop(reader, ctx, tx, &budget, ctl);
    tokio::pin!(writer, reader);
    tokio::select! {
        exit = &mut reader => {
            if let Exit::Graceful = exit {
                // Ends once every reply is written: all senders are gone by now.
                if let Err(e) = writer.await {
                    tracing::debug!(conn = ctl.id(), "NBD reply write failed: {e}");
                }
            }
        }
        r = &mut writer => {
            if let Err(e) = r {
                tracing::debug!(conn = ctl.id(), "NBD reply write failed: {e}");
            }
        }
    }
}

async fn read_loop<R>(
    mut r: BufReader<R>,
    ctx: Arc<Ctx>,
    tx: UnboundedSender<Frame>,
    budget: &ConnBudget,
    ctl: &Arc<ConnControl>,
) -> Exit
where
    R: AsyncRead + Unpin,
{
    let mut tasks = JoinSet::new();
    let exit = loop {
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
        let hdr_len = if ctx.extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        };
        let got = tokio::select! {
            biased;
            _ = ctl.drain_switch().wait() => break Exit::Graceful,
            r = r.read_exact(&mut hdr[..hdr_len]) => r,
        };
        if let Err(e) = got {
            // EOF between requests is a client going away without DISC; treat
            // it like DISC so queued replies still get their chance.
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::debug!(conn = ctl.id(), "NBD read failed: {e}");
            }
            break Exit::Graceful;
        }
        let Some(mut req) = decode_request(&hdr, ctx.extended) else {
            tracing::debug!(conn = ctl.id(), "NBD request with bad magic; closing");
            break Exit::Abort;
        };
        tracing::trace!(
            conn = ctl.id(),
            cmd = command_name(req.typ),
            req.offset,
            req.len,
            "NBD request"
        );
        if req.typ == CMD_DISC {
            break Exit::Graceful;
        }
        // With extended headers any command may carry a payload when flagged;
        // WRITE always does.
        let payload_len =
            if req.typ == CMD_WRITE || (ctx.extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
                req.len
            } else {
                0
            };
        let held = match req.typ {
            CMD_READ => req.len,
            _ => payload_len,
        }
        .min(MAX_PAYLOAD.into());
        let permits = tokio::select! {
            biased;
            _ = ctl.drain_switch().wait() => break Exit::Graceful,
            p = budget.acquire(held as usize) => p,
        };
        let Some(permits) = permits else {
            break Exit::Abort;
        };
        let rep = Replier {
            cookie: req.cookie,
            offset: req.offset,
            structured: ctx.structured,
            extended: ctx.extended,
            tx: tx.clone(),
            permits: Some(permits),
        };
        let mut payload = None;
        if payload_len > 0 {
            if payload_len > MAX_PAYLOAD.into() {
                // The payload cannot be skipped safely without trusting its
                // length (the spec asks for a hard disconnect), so answer
                // EINVAL and stop reading, as QEMU does.
                tracing::debug!(
                    conn = ctl.id(),
                    len = payload_len,
                    "NBD payload larger than the maximum"
                );
                rep.fail(Fail::new(
                    NBD_EINVAL,
                    format!(
                        "{} payload of {payload_len} bytes exceeds the maximum of {MAX_PAYLOAD}",
                        command_name(req.typ)
                    ),
                ));
                break Exit::Graceful;
            }
            // Filled completely, or dropped on a short read.
            let mut buf = IoBuf::for_overwrite(payload_len as usize);
            if let Err(e) = r.read_exact(&mut buf).await {
                tracing::debug!(conn = ctl.id(), "NBD payload truncated: {e}");
                break Exit::Abort;
            }
            if req.typ == CMD_WRITE || (req.typ == CMD_BLOCK_STATUS && ctx.status_payload()) {
                payload = Some(buf);
            } else {
                // No other command takes a payload here: it was consumed so
                // the stream stays in step, and the flag fails the request
                // (its length described the payload, not the export).
                req.len = 0;
            }
        }
        let timer = ctx.stats.begin(req.typ, req.len);
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let _timer = timer;
            match req.typ {
                CMD_READ => read(&ctx, &req, rep).await,
                CMD_BLOCK_STATUS => match block_status(&ctx, &req, payload).await {
                    Ok(chunks) => {
                        let mut rep = rep;
                        let v = encode_status_chunks(&rep, &chunks);
                        rep.send(Head::Heap(v), None, true);
                    }
                    Err(f) => rep.fail(f),
                },
                _ => {
                    let r = execute(&ctx, &req, payload).await;
                    rep.finish(r);
                }
            }
        });
    };
    drop(tx);
    match exit {
        Exit::Graceful => while tasks.join_next().await.is_some() {},
        Exit::Abort => tasks.abort_all(),
    }
    exit
}

/// Checks flags, permissions and range shared by every command.
fn validate(ctx: &Ctx, req: &Request) -> Result<(), Fail> {
    let mut valid = CMD_FLAG_FUA;
    let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if req.typ == CMD_WRITE && ctx.extended {
        valid |= CMD_FLAG_PAYLOAD_LEN;
    }
    match req.typ {
        CMD_READ if ctx.structured => valid |= CMD_FLAG_DF,
        CMD_WRITE_ZEROES => valid |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => valid |= CMD_FLAG_REQ_ONE,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
        t => return Err(Fail::new(NBD_EINVAL, format!("unknown command {t}"))),
    }
    if writes && ctx.read_only {
        return Err(Fail::new(NBD_EPERM, "export is read-only"));
    }
    if req.typ != CMD_FLUSH {
        let size = ctx.backend.size();
        let in_range = req.offset <= size && req.len <= size - req.offset;
        if !in_range {
            // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
            let err = if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
                NBD_ENOSPC
            } else {
                NBD_EINVAL
            };
            return Err(Fail::new(
                err,
                format!(
                    "request at {} length {} is beyond the export size {size}",
                    req.offset, req.len
                ),
            ));
        }
    }
    if req.flags & !valid != 0 {
        return Err(Fail::new(
            NBD_EINVAL,
            format!("unsupported flags {:#x}", req.flags & !valid),
        ));
    }
    if req.typ == CMD_READ && req.len > MAX_PAYLOAD.into() {
        return Err(Fail::new(
            NBD_EINVAL,
            format!(
                "read of {} bytes exceeds the maximum payload of {MAX_PAYLOAD}",
                req.len
            ),
        ));
    }
    Ok(())
}

/// Runs every command except READ (which has its own reply shape).
async fn execute(ctx: &Ctx, req: &Request, payload: Option<IoBuf>) -> Result<(), Fail> {
    validate(ctx, req)?;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let node = &*ctx.backend;
    match req.typ {
        CMD_WRITE => {
            let buf = payload.unwrap_or_else(|| IoBuf::zeroed(0));
            node.write(req.offset, buf, WriteFlags { fua })
                .await
                .map_err(|e| Fail::io("write", &e))
        }
        CMD_FLUSH => node.flush().await.map_err(|e| Fail::io("flush", &e)),
        CMD_TRIM => {
            match node.discard(req.offset, req.len).await {
                // Trim is advisory: a backend that cannot discard just keeps the data.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                r => r.map_err(|e| Fail::io("trim", &e))?,
            }
            if fua {
                node.flush().await.map_err(|e| Fail::io("flush", &e))?;
            }
            Ok(())
        }
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                fua,
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            node.write_zeroes(req.offset, req.len, flags)
                .await
                .map_err(|e| {
                    if !flags.fast_only && e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        // ENOTSUP is reserved for FAST_ZERO by the spec.
                        Fail::new(NBD_EIO, format!("write zeroes failed: {e}"))
                    } else {
                        Fail::io("write zeroes", &e)
                    }
                })
        }
        // Nothing to prefetch into: the node has no cache of its own.
        CMD_CACHE => Ok(()),
        CMD_BLOCK_STATUS => Err(Fail::new(
            NBD_EINVAL,
            "internal: block status routed wrongly",
        )),
        t => Err(Fail::new(NBD_EINVAL, format!("unknown command {t}"))),
    }
}

/// Answers a READ: a simple reply with data, or structured chunks with holes.
async fn read(ctx: &Ctx, req: &Request, rep: Replier) {
    if let Err(f) = validate(ctx, req) {
        return rep.fail(f);
    }
    if !ctx.structured {
        let buf = IoBuf::for_overwrite(req.len as usize);
        return match ctx.backend.read_into(req.offset, buf).await {
            Ok(buf) => {
                let mut rep = rep;
                let head = Head::inline(&[&encode_simple_reply(0, req.cookie)]);
                rep.send(head, Some(buf), true);
            }
            Err(e) => rep.fail(Fail::io("read", &e)),
        };
    }
    match read_segments(ctx, req).await {
        Ok(segs) => send_segments(rep, segs),
        Err(f) => rep.fail(f),
    }
}

fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    for c in &mut chunks {
        let mut w = [0u8; 16];
        w.copy_from_slice(c);
        if u128::from_ne_bytes(w) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Reads `len` bytes at `offset` as one segment, a hole if they are all zero.
async fn read_one(ctx: &Ctx, offset: u64, len: u32) -> Result<Seg, Fail> {
    let buf = IoBuf::for_overwrite(len as usize);
    let buf = ctx
        .backend
        .read_into(offset, buf)
        .await
        .map_err(|e| Fail::io("read", &e))?;
    if is_zero(&buf) {
        return Ok(Seg::Hole(offset, len));
    }
    Ok(Seg::Data(offset, buf))
}

async fn read_segments(ctx: &Ctx, req: &Request) -> Result<Vec<Seg>, Fail> {
    // Validated: at most MAX_PAYLOAD.
    let (offset, len) = (req.offset, req.len as u32);
    if len == 0 {
        return Ok(Vec::new());
    }
    let df = req.flags & CMD_FLAG_DF != 0;
    if df || len <= SMALL_READ {
        // DF allows one content chunk only: a hole is fine if all of it is zero.
        return Ok(vec![read_one(ctx, offset, len).await?]);
    }
    let mut segs = Vec::new();
    for (off, n, zero) in read_extents(&ctx.backend, offset, len).await {
        if zero {
            segs.push(Seg::Hole(off, n));
        } else {
            segs.push(read_one(ctx, off, n).await?);
        }
    }
    Ok(segs)
}

/// Splits a read range into (offset, length, reads-as-zero) extents. Lookup
/// failures are not read failures: the rest is simply treated as data.
async fn read_extents(node: &BlockBackend, offset: u64, len: u32) -> Vec<(u64, u32, bool)> {
    let end = offset + u64::from(len);
    let mut out: Vec<(u64, u32, bool)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let st = if out.len() + 1 < MAX_READ_SEGMENTS {
            node.block_status(pos, end - pos).await.ok()
        } else {
            None
        };
        let (n, zero) = match st {
            Some(st) => (st.len.min(end - pos), st.zero),
            None => (end - pos, false),
        };
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 += n as u32,
            _ => out.push((pos, n as u32, zero)),
        }
        pos += n;
    }
    out
}

fn send_segments(mut rep: Replier, segs: Vec<Seg>) {
    if segs.is_empty() {
        let head = rep.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0, &[]);
        return rep.send(head, None, true);
    }
    let n = segs.len();
    for (i, s) in segs.into_iter().enumerate() {
        let last = i + 1 == n;
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        match s {
            Seg::Data(off, buf) => {
                let off = off.to_be_bytes();
                let h = rep.chunk(flags, REPLY_TYPE_OFFSET_DATA, 8 + buf.len(), &[&off]);
                rep.send(h, Some(buf), last);
            }
            Seg::Hole(off, len) => {
                let (off, len) = (off.to_be_bytes(), len.to_be_bytes());
                let h = rep.chunk(flags, REPLY_TYPE_OFFSET_HOLE, 12, &[&off, &len]);
                rep.send(h, None, last);
            }
        }
    }
}

/// Extents (length, flags) of one metadata context, merging neighbours with equal flags.
#[derive(Default)]
struct Extents(Vec<(u64, u32)>);

impl Extents {
    fn push(&mut self, len: u64, flags: u32) {
        match self.0.last_mut() {
            Some(last) if last.1 == flags => last.0 += len,
            _ => self.0.push((len, flags)),
        }
    }
}

/// Encodes one status chunk per context, the last with `NBD_REPLY_FLAG_DONE`:
/// `NBD_REPLY_TYPE_BLOCK_STATUS` (32-bit lengths; the request's length, which
/// bounds them, is 32-bit too) or, with extended headers, `_EXT`.
fn encode_status_chunks(rep: &Replier, chunks: &[(u32, Extents)]) -> Vec<u8> {
    let per = if rep.extended { 16 } else { 8 };
    let mut out = Vec::with_capacity(
        chunks
            .iter()
            .map(|(_, e)| EXTENDED_REPLY_LEN + 8 + per * e.0.len())
            .sum(),
    );
    for (i, (id, e)) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let id = id.to_be_bytes();
        if rep.extended {
            let count = (e.0.len() as u32).to_be_bytes();
            let len = 8 + per * e.0.len();
            let h = rep.chunk(flags, REPLY_TYPE_BLOCK_STATUS_EXT, len, &[&id, &count]);
            out.extend_from_slice(h.bytes());
            for (n, f) in &e.0 {
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(&u64::from(*f).to_be_bytes());
            }
        } else {
            let len = 4 + per * e.0.len();
            let h = rep.chunk(flags, REPLY_TYPE_BLOCK_STATUS, len, &[&id]);
            out.extend_from_slice(h.bytes());
            for (n, f) in &e.0 {
                out.extend_from_slice(&(*n as u32).to_be_bytes());
                out.extend_from_slice(&f.to_be_bytes());
            }
        }
    }
    out
}

/// Answers BLOCK_STATUS: one chunk per negotiated context (`base:allocation`
/// first, then `qemu:allocation-depth`, then the dirty bitmaps in the
/// export's order, as QEMU), the last one with `NBD_REPLY_FLAG_DONE`. One
/// lookup serves the first two contexts, so their extents cover the same
/// range; each bitmap answers on its own.
async fn block_status(
    ctx: &Ctx,
    req: &Request,
    payload: Option<IoBuf>,
) -> Result<Vec<(u32, Extents)>, Fail> {
    let mut req = *req;
    let only = match payload {
        Some(p) => {
            let (len, ids) = status_payload(&ctx.meta, &p)?;
            req.len = len;
            req.flags &= !CMD_FLAG_PAYLOAD_LEN;
            Some(ids)
        }
        None => None,
    };
    let req = &req;
    validate(ctx, req)?;
    let meta = &ctx.meta;
    if meta.is_empty() {
        return Err(Fail::new(NBD_EINVAL, "no metadata context was negotiated"));
    }
    if req.len == 0 {
        return Err(Fail::new(NBD_EINVAL, "block status of zero length"));
    }
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let end = req.offset + req.len;
    let mut alloc = Extents::default();
    let mut depth = Extents::default();
    let mut pos = req.offset;
    let mut lookups = 0;
    let lookup = meta.base_allocation.is_some() || meta.allocation_depth.is_some();
    while lookup && pos < end && lookups < MAX_STATUS_LOOKUPS {
        let st = match ctx.backend.block_status(pos, end - pos).await {
            Ok(st) => st,
            Err(e) if lookups == 0 => return Err(Fail::io("block status", &e)),
            // What was found so far is a valid, shorter answer.
            Err(_) => break,
        };
        lookups += 1;
        let n = st.len.min(end - pos);
        let flags = if st.data { 0 } else { STATE_HOLE } | if st.zero { STATE_ZERO } else { 0 };
        alloc.push(n, flags);
        depth.push(n, st.depth);
        pos += n;
        if req_one {
            // At most one extent per context.
            break;
        }
    }
    let max = if req_one { 1 } else { MAX_BITMAP_EXTENTS };
    let dirty: Vec<(u32, Extents)> = meta
        .bitmaps
        .iter()
        .map(|&(id, i)| {
            let mut e = Extents::default();
            let mut left = req.len;
            for (n, d) in ctx.bitmaps[i].extents.extents(req.offset, left, max) {
                // Never more than asked, whatever the source answers.
                let n = n.min(left);
                if n == 0 {
                    break;
                }
                e.push(n, if d { STATE_DIRTY } else { 0 });
                left -= n;
            }
            if e.0.is_empty() {
                e.push(req.len, 0);
            }
            (id, e)
        })
        .collect();
    Ok([
        meta.base_allocation.map(|id| (id, alloc)),
        meta.allocation_depth.map(|id| (id, depth)),
    ]
    .into_iter()
    .flatten()
    .chain(dirty)
    .filter(|(id, _)| only.as_ref().is_none_or(|o| o.contains(id)))
    .collect())
}

/// Reads the payload form of BLOCK_STATUS: an effect length and the
/// context ids to answer for, each one selected and named once.
fn status_payload(meta: &MetaContexts, p: &[u8]) -> Result<(u64, Vec<u32>), Fail> {
    let bad = |why: &str| Fail::new(NBD_EINVAL, format!("block status payload {why}"));
    if p.len() < 12 || !(p.len() - 8).is_multiple_of(4) {
        return Err(bad(&format!("of {} bytes is not 8 + 4n, n > 0", p.len())));
    }
    let selected: Vec<u32> = [meta.base_allocation, meta.allocation_depth]
        .into_iter()
        .flatten()
        .chain(meta.bitmaps.iter().map(|&(id, _)| id))
        .collect();
    let mut ids = Vec::with_capacity((p.len() - 8) / 4);
    for at in (8..p.len()).step_by(4) {
        let id = be32(p, at);
        if !selected.contains(&id) {
            return Err(bad(&format!(
                "names context {id}, which was not negotiated"
            )));
        }
        if ids.contains(&id) {
            return Err(bad(&format!("names context {id} twice")));
        }
        ids.push(id);
    }
    Ok((be64(p, 0), ids))
}

/// Decodes the request header the connection negotiated.
fn decode_request(hdr: &[u8; EXTENDED_REQUEST_LEN], extended: bool) -> Option<Request> {
    if extended {
        return Request::decode_extended(hdr);
    }
    let mut compact = [0u8; REQUEST_LEN];
    compact.copy_from_slice(&hdr[..REQUEST_LEN]);
    Request::decode(&compact)
}

/// Sends frames as they come, batching whatever is queued into one vectored
/// write. It owns the `session` (and with it the export attachment), which
/// ends after the last reply went out and before the client sees the close,
/// so a QMP `block-export-del` issued once a client has seen its
/// disconnect complete finds the export free.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: UnboundedReceiver<Frame>,
    session: Session,
) -> io::Result<()> {
    let mut batch: VecDeque<Frame> = VecDeque::with_capacity(MAX_BATCH);
    while let Some(f) = rx.recv().await {
        batch.push_back(f);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push_back(f),
                Err(_) => break,
            }
        }
        write_frames(&mut w, &mut batch).await?;
        // A TLS stream may keep the tail of a write in its own buffer when
        // the socket is full; only a flush is sure to send it. On a plain
        // socket half this is free.
        w.flush().await?;
    }
    w.flush().await?;
    drop(session);
    // The peer may already be gone; closing our side is all that is left.
    let _ = w.shutdown().await;
    Ok(())
}

/// Writes `frames` in order with as few vectored writes as the socket
/// allows. Each frame is dropped as soon as its last byte is written, so its
/// buffer and budget come back while the rest of the batch is still going
/// out (a client that got its reply may already be sending the next request).
async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &mut VecDeque<Frame>,
) -> io::Result<()> {
    // Bytes of the front frame already written.
    let mut done = 0usize;
    while !frames.is_empty() {
        let mut n = {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity((frames.len() * 2).min(MAX_IOV));
            let mut skip = done;
            'frames: for f in frames.iter() {
                for part in [f.head.bytes(), f.data.as_deref().unwrap_or(&[])] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    iov.push(IoSlice::new(&part[skip..]));
                    skip = 0;
                    if iov.len() == MAX_IOV {
                        break 'frames;
                    }
                }
            }
            w.write_vectored(&iov).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(f) = frames.front() else { break };
            let left = f.len() - done;
            if n < left {
                done += n;
                break;
            }
            n -= left;
            done = 0;
            frames.pop_front();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4096]));
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 0x80;
        assert!(!is_zero(&b));
    }

    #[test]
    fn inline_head() {
        let h = Head::inline(&[&[1, 2], &[3]]);
        assert_eq!(h.bytes(), &[1, 2, 3]);
    }

    struct Chunked {
        out: Vec<u8>,
        max: usize,
    }

    impl AsyncWrite for Chunked {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_vectored_writes_keep_bytes_in_order() {
        let frames: VecDeque<Frame> = (0..5u8)
            .map(|i| Frame {
                head: Head::inline(&[&[i; 3]]),
                data: (i % 2 == 0).then(|| IoBuf::from_slice(&[i + 100; 7])),
                _permits: None,
            })
            .collect();
        let mut expect = Vec::new();
        for f in &frames {
            expect.extend_from_slice(f.head.bytes());
            if let Some(d) = &f.data {
                expect.extend_from_slice(d);
            }
        }
        for max in [1, 2, 5, 64] {
            let mut w = Chunked {
                out: Vec::new(),
                max,
            };
            let mut batch: VecDeque<Frame> = frames
                .iter()
                .map(|f| Frame {
                    head: Head::inline(&[f.head.bytes()]),
                    data: f.data.as_deref().map(IoBuf::from_slice),
                    _permits: None,
                })
                .collect();
            write_frames(&mut w, &mut batch).await.unwrap();
            assert_eq!(w.out, expect, "max {max}");
            assert!(batch.is_empty(), "written frames are let go");
        }
    }
}
