//! The transmission phase: one reader parses requests and runs each as its
//! own task; one writer sends replies, so requests complete out of order but
//! reply frames never interleave.
//!
//! Memory per connection is bounded: at most `MAX_IN_FLIGHT` requests and
//! `BYTE_BUDGET` bytes of payload (write data read in, read data waiting to go
//! out) exist at once; the reader stops reading while the budget is spent.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};

use livesnap_block::{BlockBackend, IoBuf, WriteFlags, ZeroFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::conn::ConnControl;
use crate::export::ExportBitmap;
use crate::handshake::{MetaContexts, Session};
use crate::proto::*;

/// Requests of one connection being served at once.
const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes one connection may hold at once.
const BYTE_BUDGET: usize = 128 << 20;
/// Payload budget is counted in these units so it fits a semaphore comfortably.
const BUDGET_UNIT: usize = 4096;
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
/// Read buffers kept for reuse per connection, in bytes.
const POOL_BYTES: usize = 16 << 20;
/// Buffers smaller than this are cheap to allocate and not pooled.
const POOL_MIN_BUF: usize = 64 * 1024;

/// Bytes written before a reply's payload: a reply or chunk header and any fixed fields.
enum Head {
    Inline([u8; 32], u8),
    Heap(Vec<u8>),
}

impl Head {
    fn inline(parts: &[&[u8]]) -> Head {
        let mut b = [0u8; 32];
        let mut n = 0;
        for p in parts {
            b[n..n + p.len()].copy_from_slice(p);
            n += p.len();
        }
        Head::Inline(b, n as u8)
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Head::Inline(b, n) => &b[..*n as usize],
            Head::Heap(v) => v,
        }
    }
}

/// Budget held by one request until its last reply frame has been written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// One message for the writer: a header and an optional payload.
struct Frame {
    head: Head,
    data: Option<IoBuf>,
    _permits: Option<Permits>,
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

/// Read buffers kept for reuse, keyed by exact length: fresh large
/// allocations cost page faults and zeroing on every request.
struct BufPool {
    free: Mutex<(HashMap<usize, Vec<IoBuf>>, usize)>,
}

impl BufPool {
    fn new() -> BufPool {
        BufPool {
            free: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// A buffer of exactly `len` bytes; its contents are stale and must be overwritten.
    fn take(&self, len: usize) -> IoBuf {
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = g.0.get_mut(&len).and_then(Vec::pop) {
            g.1 -= len;
            return b;
        }
        drop(g);
        IoBuf::zeroed(len)
    }

    fn give(&self, b: IoBuf) {
        let len = b.len();
        if len < POOL_MIN_BUF {
            return;
        }
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 + len <= POOL_BYTES {
            g.0.entry(len).or_default().push(b);
            g.1 += len;
        }
    }
}

/// What every request task needs from its connection.
struct Ctx {
    backend: Arc<BlockBackend>,
    pool: Arc<BufPool>,
    read_only: bool,
    structured: bool,
    meta: MetaContexts,
    /// The export's bitmaps; `meta.bitmaps` indexes into them.
    bitmaps: Vec<ExportBitmap>,
}

/// Sends the frames of one reply; the request's budget goes with the last one.
struct Replier {
    cookie: u64,
    structured: bool,
    tx: UnboundedSender<Frame>,
    permits: Option<Permits>,
}

impl Replier {
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
        let head = Head::inline(&[&encode_simple_reply(0, self.cookie)]);
        self.send(head, None, true);
    }

    fn fail(mut self, f: Fail) {
        if self.structured {
            let payload = encode_error_payload(f.err, &f.msg);
            let mut v = encode_chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                self.cookie,
                payload.len() as u32,
            )
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
    ctl: &Arc<ConnControl>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = session.export().clone();
    let pool = Arc::new(BufPool::new());
    let ctx = Arc::new(Ctx {
        backend: export.config().backend.clone(),
        pool: pool.clone(),
        read_only: export.read_only(),
        structured: session.structured,
        meta: session.meta.clone(),
        bitmaps: export.config().bitmaps.clone(),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = write_loop(writer, rx, pool);
    let reader = read_loop(reader, ctx, tx, ctl);
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
    // `session` (and with it the export attachment) is dropped only here, after
    // the last reply went out.
    drop(session);
}

/// A request cannot be served without these permits; the semaphores are never
/// closed, so acquisition only fails if that invariant is broken.
async fn acquire(count: &Arc<Semaphore>, bytes: &Arc<Semaphore>, len: u32) -> Option<Permits> {
    let c = count.clone().acquire_owned().await.ok()?;
    let b = if len > 0 {
        let units = (len as usize).div_ceil(BUDGET_UNIT) as u32;
        Some(bytes.clone().acquire_many_owned(units).await.ok()?)
    } else {
        None
    };
    Some(Permits {
        _count: c,
        _bytes: b,
    })
}

async fn read_loop<R>(
    mut r: BufReader<R>,
    ctx: Arc<Ctx>,
    tx: UnboundedSender<Frame>,
    ctl: &Arc<ConnControl>,
) -> Exit
where
    R: AsyncRead + Unpin,
{
    let count = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(BYTE_BUDGET / BUDGET_UNIT));
    let mut tasks = JoinSet::new();
    let exit = loop {
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            biased;
            _ = ctl.drain_switch().wait() => break Exit::Graceful,
            r = r.read_exact(&mut hdr) => r,
        };
        if let Err(e) = got {
            // EOF between requests is a client going away without DISC; treat
            // it like DISC so queued replies still get their chance.
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::debug!(conn = ctl.id(), "NBD read failed: {e}");
            }
            break Exit::Graceful;
        }
        let Some(req) = Request::decode(&hdr) else {
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
        let budget = match req.typ {
            CMD_READ | CMD_WRITE => req.len.min(MAX_PAYLOAD),
            _ => 0,
        };
        let Some(permits) = acquire(&count, &bytes, budget).await else {
            break Exit::Abort;
        };
        let rep = Replier {
            cookie: req.cookie,
            structured: ctx.structured,
            tx: tx.clone(),
            permits: Some(permits),
        };
        let mut payload = None;
        if req.typ == CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                // The payload cannot be skipped safely without trusting its
                // length, so answer EINVAL and stop reading, as QEMU does.
                tracing::debug!(
                    conn = ctl.id(),
                    len = req.len,
                    "NBD write larger than the maximum payload"
                );
                rep.fail(Fail::new(
                    NBD_EINVAL,
                    format!(
                        "write of {} bytes exceeds the maximum payload of {MAX_PAYLOAD}",
                        req.len
                    ),
                ));
                break Exit::Graceful;
            }
            let mut buf = IoBuf::zeroed(req.len as usize);
            if let Err(e) = r.read_exact(&mut buf).await {
                tracing::debug!(conn = ctl.id(), "NBD write payload truncated: {e}");
                break Exit::Abort;
            }
            payload = Some(buf);
        }
        let ctx = ctx.clone();
        tasks.spawn(async move {
            match req.typ {
                CMD_READ => read(&ctx, &req, rep).await,
                CMD_BLOCK_STATUS => match block_status(&ctx, &req).await {
                    Ok(v) => {
                        let mut rep = rep;
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
        let in_range = req.offset <= size && u64::from(req.len) <= size - req.offset;
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
    if req.typ == CMD_READ && req.len > MAX_PAYLOAD {
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
            match node.discard(req.offset, req.len.into()).await {
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
            node.write_zeroes(req.offset, req.len.into(), flags)
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
        let buf = ctx.pool.take(req.len as usize);
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
        Ok(segs) => send_segments(rep, req.cookie, segs),
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
    let buf = ctx.pool.take(len as usize);
    let buf = ctx
        .backend
        .read_into(offset, buf)
        .await
        .map_err(|e| Fail::io("read", &e))?;
    if is_zero(&buf) {
        ctx.pool.give(buf);
        return Ok(Seg::Hole(offset, len));
    }
    Ok(Seg::Data(offset, buf))
}

async fn read_segments(ctx: &Ctx, req: &Request) -> Result<Vec<Seg>, Fail> {
    let (offset, len) = (req.offset, req.len);
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

fn send_segments(mut rep: Replier, cookie: u64, segs: Vec<Seg>) {
    if segs.is_empty() {
        let head = Head::inline(&[&encode_chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            cookie,
            0,
        )]);
        return rep.send(head, None, true);
    }
    let n = segs.len();
    for (i, s) in segs.into_iter().enumerate() {
        let last = i + 1 == n;
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        match s {
            Seg::Data(off, buf) => {
                let h = encode_chunk_header(
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + buf.len() as u32,
                );
                rep.send(Head::inline(&[&h, &off.to_be_bytes()]), Some(buf), last);
            }
            Seg::Hole(off, len) => {
                let h = encode_chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                rep.send(
                    Head::inline(&[&h, &off.to_be_bytes(), &len.to_be_bytes()]),
                    None,
                    last,
                );
            }
        }
    }
}

/// Extents (length, flags) of one metadata context, merging neighbours with equal flags.
#[derive(Default)]
struct Extents(Vec<(u32, u32)>);

impl Extents {
    fn push(&mut self, len: u32, flags: u32) {
        match self.0.last_mut() {
            Some(last) if last.1 == flags => last.0 += len,
            _ => self.0.push((len, flags)),
        }
    }

    /// Appends one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for context `id`.
    fn encode_chunk(&self, out: &mut Vec<u8>, cookie: u64, id: u32, last: bool) {
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        let payload_len = 4 + 8 * self.0.len() as u32;
        out.extend_from_slice(&encode_chunk_header(
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            payload_len,
        ));
        out.extend_from_slice(&id.to_be_bytes());
        for (n, f) in &self.0 {
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
}

/// Answers BLOCK_STATUS: one chunk per negotiated context (`base:allocation`
/// first, then `qemu:allocation-depth`, then the dirty bitmaps in the
/// export's order, as QEMU), the last one with `NBD_REPLY_FLAG_DONE`. One
/// lookup serves the first two contexts, so their extents cover the same
/// range; each bitmap answers on its own.
async fn block_status(ctx: &Ctx, req: &Request) -> Result<Vec<u8>, Fail> {
    validate(ctx, req)?;
    let meta = &ctx.meta;
    if meta.is_empty() {
        return Err(Fail::new(NBD_EINVAL, "no metadata context was negotiated"));
    }
    if req.len == 0 {
        return Err(Fail::new(NBD_EINVAL, "block status of zero length"));
    }
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let end = req.offset + u64::from(req.len);
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
        let n = st.len.min(end - pos) as u32;
        let flags = if st.data { 0 } else { STATE_HOLE } | if st.zero { STATE_ZERO } else { 0 };
        alloc.push(n, flags);
        depth.push(n, st.depth);
        pos += u64::from(n);
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
            let mut left = u64::from(req.len);
            for (n, d) in ctx.bitmaps[i].extents.extents(req.offset, left, max) {
                // Never more than asked, whatever the source answers.
                let n = n.min(left);
                if n == 0 {
                    break;
                }
                e.push(n as u32, if d { STATE_DIRTY } else { 0 });
                left -= n;
            }
            if e.0.is_empty() {
                e.push(req.len, 0);
            }
            (id, e)
        })
        .collect();
    let chunks: Vec<(u32, &Extents)> = [
        meta.base_allocation.map(|id| (id, &alloc)),
        meta.allocation_depth.map(|id| (id, &depth)),
    ]
    .into_iter()
    .flatten()
    .chain(dirty.iter().map(|(id, e)| (*id, e)))
    .collect();
    let mut v = Vec::with_capacity(
        chunks
            .iter()
            .map(|(_, e)| CHUNK_HEADER_LEN + 4 + 8 * e.0.len())
            .sum(),
    );
    for (i, (id, e)) in chunks.iter().enumerate() {
        e.encode_chunk(&mut v, req.cookie, *id, i + 1 == chunks.len());
    }
    Ok(v)
}

/// Sends frames as they come, batching whatever is queued into one vectored write.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: UnboundedReceiver<Frame>,
    pool: Arc<BufPool>,
) -> io::Result<()> {
    let mut batch: Vec<Frame> = Vec::with_capacity(MAX_BATCH);
    while let Some(f) = rx.recv().await {
        batch.push(f);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        write_frames(&mut w, &batch).await?;
        // A TLS stream may keep the tail of a write in its own buffer when
        // the socket is full; only a flush is sure to send it. On a plain
        // socket half this is free.
        w.flush().await?;
        // Dropping the frames returns their budget to the reader.
        for f in batch.drain(..) {
            if let Some(d) = f.data {
                pool.give(d);
            }
        }
    }
    w.flush().await?;
    // The peer may already be gone; closing our side is all that is left.
    let _ = w.shutdown().await;
    Ok(())
}

async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, frames: &[Frame]) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(frames.len() * 2);
    for f in frames {
        parts.push(f.head.bytes());
        if let Some(d) = &f.data {
            if !d.is_empty() {
                parts.push(d);
            }
        }
    }
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < parts.len() {
        let iov: Vec<IoSlice<'_>> = std::iter::once(&parts[idx][off..])
            .chain(parts[idx + 1..].iter().copied())
            .take(MAX_IOV)
            .map(IoSlice::new)
            .collect();
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
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
        let frames: Vec<Frame> = (0..5u8)
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
            write_frames(&mut w, &frames).await.unwrap();
            assert_eq!(w.out, expect, "max {max}");
        }
    }
}
