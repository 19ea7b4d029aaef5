//! Fixed newstyle negotiation, server side: from the greeting to the moment a
//! client is attached to an export (or leaves).
//!
//! Option data comes from an untrusted peer: every length is bounded before
//! anything is allocated, and every field is parsed with bounds checks.

use std::io;
use std::sync::{Arc, Weak};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::conn::ConnControl;
use crate::export::{AttachGuard, Export, ExportTable};
use crate::proto::*;

/// Largest option payload read into memory. The biggest legitimate options
/// (GO or SET_META_CONTEXT with a 4 KiB name and a few queries) are far below it.
const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Options longer than `MAX_OPTION_DATA` but at most this are skipped and
/// answered with `NBD_REP_ERR_TOO_BIG`; longer ones end the connection.
const MAX_OPTION_DRAIN: u32 = 32 << 20;

/// Context id given to `base:allocation` by `NBD_OPT_SET_META_CONTEXT`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// Context id given to `qemu:allocation-depth` by `NBD_OPT_SET_META_CONTEXT`.
pub(crate) const ALLOCATION_DEPTH_ID: u32 = 2;

/// Context id given to the export's first `qemu:dirty-bitmap:NAME`; the
/// bitmap at index `i` gets this plus `i`.
pub(crate) const DIRTY_BITMAP_ID: u32 = 3;

/// Handshake flags this server offers.
const SERVER_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// The outcome of a successful negotiation.
pub(crate) struct Session {
    /// Keeps the connection counted on its export until the session ends.
    pub(crate) attach: AttachGuard,
    /// Structured replies were negotiated.
    pub(crate) structured: bool,
    /// Extended headers were negotiated (they imply structured replies).
    pub(crate) extended: bool,
    /// Metadata contexts the client selected for this export.
    pub(crate) meta: MetaContexts,
}

/// Metadata contexts selected by `NBD_OPT_SET_META_CONTEXT`, by context id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MetaContexts {
    /// Id of `base:allocation`, when selected.
    pub(crate) base_allocation: Option<u32>,
    /// Id of `qemu:allocation-depth`, when selected.
    pub(crate) allocation_depth: Option<u32>,
    /// Selected `qemu:dirty-bitmap:NAME` contexts as (id, index in the
    /// export's bitmaps), in the export's order.
    pub(crate) bitmaps: Vec<(u32, usize)>,
}

impl MetaContexts {
    /// True when no context is selected (BLOCK_STATUS is then invalid).
    pub(crate) fn is_empty(&self) -> bool {
        self.base_allocation.is_none() && self.allocation_depth.is_none() && self.bitmaps.is_empty()
    }
}

impl Haggle {
    /// Replies may come in chunks: structured replies or extended headers.
    fn chunked(&self) -> bool {
        self.structured || self.extended
    }
}

impl Session {
    /// The export this session serves.
    pub(crate) fn export(&self) -> &Arc<Export> {
        self.attach.export()
    }
}

/// Transmission flags for `export` as seen by a client with or without
/// structured replies, and with or without extended headers and a metadata
/// context selected for this export (the payload form of BLOCK_STATUS).
pub(crate) fn transmission_flags(export: &Export, structured: bool, status_payload: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_CACHE
        // Every connection goes to the same node with no per-connection cache,
        // so a flush on one is a flush for all.
        | FLAG_CAN_MULTI_CONN;
    // As QEMU: a read-only export offers no command that changes data.
    if export.read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if status_payload {
        f |= FLAG_BLOCK_STATUS_PAYLOAD;
    }
    f
}

/// Minimum block size to advertise: the node's request alignment, as a power of two.
fn min_block(export: &Export) -> u32 {
    let a = export.config().backend.limits().request_alignment.max(1);
    a.next_power_of_two().min(65536)
}

pub(crate) fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Where TLS stands on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tls {
    /// The server has no TLS: STARTTLS is refused.
    Off,
    /// TLS is configured and not started yet: only STARTTLS and ABORT are
    /// served, since anything else would travel in plain text.
    Required,
    /// The rest of the negotiation runs over TLS.
    Active,
}

/// Negotiation state carried between options (and across the STARTTLS upgrade).
pub(crate) struct Haggle {
    /// Where TLS stands; set to `Active` by the caller once the upgrade is done.
    pub(crate) tls: Tls,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export of the last successful SET_META_CONTEXT and what it selected,
    /// when it selected anything. Weak: a handshake must not keep a removed
    /// export alive, and a new export of the same name is another export.
    meta: Option<(Weak<Export>, MetaContexts)>,
}

/// What one option leads to.
enum Next {
    Continue,
    Close,
    Attach(Session),
    StartTls,
}

/// How option haggling ended.
pub(crate) enum Negotiated {
    /// The client left cleanly (ABORT or EOF during haggling).
    Left,
    /// The client is attached to an export.
    Attach(Session),
    /// STARTTLS was acknowledged: the caller runs the TLS handshake on the
    /// raw stream and then haggles on over TLS with the same state.
    StartTls,
}

/// Sends the greeting and reads the client's flags; `tls` says whether the
/// server requires TLS. `Err` means the client broke the protocol or the
/// socket failed.
/// The server's half of the fixed-newstyle greeting.
pub(crate) async fn send_greeting<W: AsyncWrite + Unpin>(w: &mut W) -> io::Result<()> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&SERVER_FLAGS.to_be_bytes());
    w.write_all(&greeting).await
}

pub(crate) async fn greet<R, W>(r: &mut BufReader<R>, w: &mut W, tls: bool) -> io::Result<Haggle>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send_greeting(w).await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The spec requires dropping the connection on unknown client flags.
        return Err(proto_err(format!("unknown client flags {client_flags:#x}")));
    }
    Ok(Haggle {
        tls: if tls { Tls::Required } else { Tls::Off },
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        extended: false,
        meta: None,
    })
}

/// Haggles over options until the client attaches, leaves, or starts TLS.
/// `Err` means it broke the protocol or the socket failed.
pub(crate) async fn haggle<R, W>(
    r: &mut BufReader<R>,
    w: &mut W,
    st: &mut Haggle,
    exports: &ExportTable,
    ctl: &Arc<ConnControl>,
) -> io::Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // Every reply goes out before the client is waited for: a TLS stream
        // may keep the tail of a write in its own buffer (free on a socket).
        w.flush().await?;
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        match r.read_exact(&mut hdr).await {
            Ok(_) => {}
            // A client may simply go away during haggling.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Negotiated::Left),
            Err(e) => return Err(e),
        }
        let (opt, len) = decode_option_header(&hdr).ok_or_else(|| proto_err("bad option magic"))?;
        if !st.fixed && opt != OPT_EXPORT_NAME {
            // Without fixed newstyle there is no way to send an option reply.
            return Err(proto_err(format!(
                "option {} from a client without fixed newstyle",
                option_name(opt)
            )));
        }
        if len > MAX_OPTION_DATA {
            if opt == OPT_EXPORT_NAME || len > MAX_OPTION_DRAIN {
                return Err(proto_err(format!(
                    "option {} too long ({len} bytes)",
                    option_name(opt)
                )));
            }
            tokio::io::copy(&mut (&mut *r).take(len as u64), &mut tokio::io::sink()).await?;
            let msg = format!("option {} too long ({len} bytes)", option_name(opt));
            reply(w, opt, REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        tracing::trace!(option = option_name(opt), len, "NBD option");
        if st.tls == Tls::Required && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                // It has no error reply: the spec's only refusal is to close.
                return Err(proto_err("NBD_OPT_EXPORT_NAME before TLS"));
            }
            reply(w, opt, REP_ERR_TLS_REQD, b"Option not permitted before TLS").await?;
            continue;
        }

        let done = match handle_option(w, st, opt, &data, exports, ctl).await? {
            Next::Continue => continue,
            Next::Close => Negotiated::Left,
            Next::Attach(s) => Negotiated::Attach(s),
            Next::StartTls => Negotiated::StartTls,
        };
        // The last reply (an ABORT's or GO's acknowledgement) too.
        w.flush().await?;
        return Ok(done);
    }
}

pub(crate) async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    typ: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    push_option_reply(&mut out, opt, typ, data);
    w.write_all(&out).await
}

async fn handle_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    st: &mut Haggle,
    opt: u32,
    data: &[u8],
    exports: &ExportTable,
    ctl: &Arc<ConnControl>,
) -> io::Result<Next> {
    match opt {
        OPT_EXPORT_NAME => export_name(w, st, data, exports, ctl).await,
        OPT_ABORT => {
            // The client may already have closed its end; a failed ACK is fine.
            let _ = reply(w, opt, REP_ACK, &[]).await;
            Ok(Next::Close)
        }
        OPT_LIST => {
            if !data.is_empty() {
                reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST must not carry data").await?;
                return Ok(Next::Continue);
            }
            let mut out = Vec::new();
            for e in exports.list() {
                let name = e.config().name.as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name);
                if let Some(desc) = &e.config().description {
                    d.extend_from_slice(truncate_str(desc, MAX_STRING).as_bytes());
                }
                push_option_reply(&mut out, opt, REP_SERVER, &d);
            }
            push_option_reply(&mut out, opt, REP_ACK, &[]);
            w.write_all(&out).await?;
            Ok(Next::Continue)
        }
        OPT_STARTTLS => match st.tls {
            Tls::Off => {
                reply(w, opt, REP_ERR_POLICY, b"TLS not configured").await?;
                Ok(Next::Continue)
            }
            Tls::Active => {
                reply(w, opt, REP_ERR_INVALID, b"TLS already negotiated").await?;
                Ok(Next::Continue)
            }
            Tls::Required if !data.is_empty() => {
                reply(
                    w,
                    opt,
                    REP_ERR_INVALID,
                    b"NBD_OPT_STARTTLS must not carry data",
                )
                .await?;
                Ok(Next::Continue)
            }
            Tls::Required => {
                reply(w, opt, REP_ACK, &[]).await?;
                Ok(Next::StartTls)
            }
        },
        OPT_INFO | OPT_GO => info_or_go(w, st, opt, data, exports, ctl).await,
        OPT_EXTENDED_HEADERS => {
            extended_headers(w, st, opt, data).await?;
            Ok(Next::Continue)
        }
        OPT_STRUCTURED_REPLY => {
            if st.extended {
                // The spec's answer: extended headers take precedence.
                let msg = "extended headers already negotiated";
                reply(w, opt, REP_ERR_EXT_HEADER_REQD, msg.as_bytes()).await?;
            } else if !data.is_empty() {
                reply(
                    w,
                    opt,
                    REP_ERR_INVALID,
                    b"NBD_OPT_STRUCTURED_REPLY must not carry data",
                )
                .await?;
            } else if st.structured {
                reply(
                    w,
                    opt,
                    REP_ERR_INVALID,
                    b"structured reply already negotiated",
                )
                .await?;
            } else {
                st.structured = true;
                reply(w, opt, REP_ACK, &[]).await?;
            }
            Ok(Next::Continue)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(w, st, opt, data, exports).await?;
            Ok(Next::Continue)
        }
        _ => {
            let msg = format!("Unsupported option {opt} ({})", option_name(opt));
            reply(w, opt, REP_ERR_UNSUP, msg.as_bytes()).await?;
            Ok(Next::Continue)
        }
    }
}

/// Builds the session for `export` once the client is attached to it.
fn session(st: &Haggle, attach: AttachGuard) -> Session {
    // Contexts only count when negotiated for the export finally chosen (as
    // QEMU, which compares the export itself, not its name).
    let meta = match &st.meta {
        Some((e, m)) if st.chunked() && Weak::ptr_eq(e, &Arc::downgrade(attach.export())) => {
            m.clone()
        }
        _ => MetaContexts::default(),
    };
    Session {
        attach,
        structured: st.structured,
        extended: st.extended,
        meta,
    }
}

/// `NBD_OPT_EXTENDED_HEADERS`: 32-byte request and reply headers from the
/// transmission phase on.
async fn extended_headers<W: AsyncWrite + Unpin>(
    w: &mut W,
    st: &mut Haggle,
    opt: u32,
    data: &[u8],
) -> io::Result<()> {
    if !data.is_empty() {
        let msg = "NBD_OPT_EXTENDED_HEADERS must not carry data";
        return reply(w, opt, REP_ERR_INVALID, msg.as_bytes()).await;
    }
    if st.extended {
        let msg = "extended headers already negotiated";
        return reply(w, opt, REP_ERR_INVALID, msg.as_bytes()).await;
    }
    st.extended = true;
    reply(w, opt, REP_ACK, &[]).await
}

async fn export_name<W: AsyncWrite + Unpin>(
    w: &mut W,
    st: &mut Haggle,
    data: &[u8],
    exports: &ExportTable,
    ctl: &Arc<ConnControl>,
) -> io::Result<Next> {
    if st.extended {
        // The spec forbids it: EXPORT_NAME has no reply that could tell the
        // client its headers are extended.
        return Err(proto_err("NBD_OPT_EXPORT_NAME after extended headers"));
    }
    let name = std::str::from_utf8(data).map_err(|_| proto_err("export name is not UTF-8"))?;
    // EXPORT_NAME cannot return an error: the only refusal is closing the socket.
    let export = exports
        .get(name)
        .ok_or_else(|| proto_err(format!("export '{name}' not present")))?;
    let attach = export
        .attach(ctl)
        .ok_or_else(|| proto_err(format!("export '{name}' not present")))?;
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&export.config().backend.size().to_be_bytes());
    out.extend_from_slice(&transmission_flags(&export, st.chunked(), false).to_be_bytes());
    if !st.no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    w.write_all(&out).await?;
    Ok(Next::Attach(session(st, attach)))
}

async fn info_or_go<W: AsyncWrite + Unpin>(
    w: &mut W,
    st: &mut Haggle,
    opt: u32,
    data: &[u8],
    exports: &ExportTable,
    ctl: &Arc<ConnControl>,
) -> io::Result<Next> {
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name = c.string32()?;
        let n = c.u16()? as usize;
        let mut reqs = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            reqs.push(c.u16()?);
        }
        (c.remaining() == 0).then_some((name, reqs))
    })();
    let Some((name, reqs)) = parsed else {
        reply(
            w,
            opt,
            REP_ERR_INVALID,
            b"malformed NBD_OPT_INFO/NBD_OPT_GO request",
        )
        .await?;
        return Ok(Next::Continue);
    };
    let Some(export) = exports.get(name) else {
        let msg = format!("export '{name}' not present");
        reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
        return Ok(Next::Continue);
    };

    let cfg = export.config();
    let mut out = Vec::new();
    let mut info = |payload: &[u8]| push_option_reply(&mut out, opt, REP_INFO, payload);
    if reqs.contains(&INFO_NAME) {
        let mut p = INFO_NAME.to_be_bytes().to_vec();
        p.extend_from_slice(cfg.name.as_bytes());
        info(&p);
    }
    if reqs.contains(&INFO_DESCRIPTION) {
        if let Some(desc) = &cfg.description {
            let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
            p.extend_from_slice(truncate_str(desc, MAX_STRING).as_bytes());
            info(&p);
        }
    }
    // Sent whether asked or not (the client may ignore it), as QEMU does.
    let min = min_block(&export);
    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    p.extend_from_slice(&min.to_be_bytes());
    p.extend_from_slice(&PREFERRED_BLOCK.max(min).to_be_bytes());
    p.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    info(&p);
    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&cfg.backend.size().to_be_bytes());
    let status_payload = st.extended
        && matches!(&st.meta, Some((e, _)) if Weak::ptr_eq(e, &Arc::downgrade(&export)));
    p.extend_from_slice(&transmission_flags(&export, st.chunked(), status_payload).to_be_bytes());
    info(&p);

    if opt == OPT_INFO {
        push_option_reply(&mut out, opt, REP_ACK, &[]);
        w.write_all(&out).await?;
        return Ok(Next::Continue);
    }
    // Attach before the ACK so connections() is right by the time the client sees success.
    let Some(attach) = export.attach(ctl) else {
        let msg = format!("export '{name}' not present");
        reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
        return Ok(Next::Continue);
    };
    push_option_reply(&mut out, opt, REP_ACK, &[]);
    w.write_all(&out).await?;
    Ok(Next::Attach(session(st, attach)))
}

async fn meta_context<W: AsyncWrite + Unpin>(
    w: &mut W,
    st: &mut Haggle,
    opt: u32,
    data: &[u8],
    exports: &ExportTable,
) -> io::Result<()> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set {
        // A SET replaces the previous selection even when it fails.
        st.meta = None;
    }
    if !st.chunked() {
        let msg = "request not valid prior to negotiating structured replies";
        return reply(w, opt, REP_ERR_INVALID, msg.as_bytes()).await;
    }
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name = c.string32()?;
        let n = c.u32()?;
        let mut queries = Vec::new();
        // Each query takes at least 4 bytes, so this ends quickly on a lying count.
        for _ in 0..n {
            queries.push(c.string32()?);
        }
        (c.remaining() == 0).then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply(w, opt, REP_ERR_INVALID, b"malformed meta context request").await;
    };
    let Some(export) = exports.get(name) else {
        let msg = format!("export '{name}' not present");
        return reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await;
    };
    let cfg = export.config();
    let names: Vec<&str> = cfg.bitmaps.iter().map(|b| b.name.as_str()).collect();
    let wanted = match_queries(&queries, set, cfg.allocation_depth, &names);
    let mut out = Vec::new();
    let mut selected = MetaContexts::default();
    // LIST replies carry the reserved id 0, as the spec asks.
    let mut offer = |ctx: &str, id: u32| {
        let sent_id = if set { id } else { 0 };
        let mut p = sent_id.to_be_bytes().to_vec();
        p.extend_from_slice(ctx.as_bytes());
        push_option_reply(&mut out, opt, REP_META_CONTEXT, &p);
        id
    };
    // Same order as QEMU: base:allocation, qemu:allocation-depth, then the
    // bitmaps in the export's order.
    if wanted.base_allocation {
        selected.base_allocation = Some(offer(META_BASE_ALLOCATION, BASE_ALLOCATION_ID));
    }
    if wanted.allocation_depth {
        selected.allocation_depth = Some(offer(META_ALLOCATION_DEPTH, ALLOCATION_DEPTH_ID));
    }
    for (i, b) in cfg.bitmaps.iter().enumerate() {
        if wanted.bitmaps[i] {
            let id = offer(&b.context(), DIRTY_BITMAP_ID + i as u32);
            selected.bitmaps.push((id, i));
        }
    }
    if set && !selected.is_empty() {
        st.meta = Some((Arc::downgrade(&export), selected));
    }
    push_option_reply(&mut out, opt, REP_ACK, &[]);
    w.write_all(&out).await
}

/// Which contexts a LIST or SET query list names.
struct Wanted {
    base_allocation: bool,
    allocation_depth: bool,
    /// One per bitmap the export offers, in its order.
    bitmaps: Vec<bool>,
}

/// Which contexts a LIST or SET query list names, as QEMU matches them.
/// LIST with no queries lists every context, and takes the wildcards
/// `base:`, `qemu:` and `qemu:dirty-bitmap:`; SET takes full names only.
/// `qemu:allocation-depth` exists only on exports that offer it, and a
/// bitmap name selects the first bitmap of that name; unknown names and
/// namespaces are ignored, as the spec asks.
fn match_queries(queries: &[&str], set: bool, offer_depth: bool, bitmaps: &[&str]) -> Wanted {
    let mut w = Wanted {
        base_allocation: false,
        allocation_depth: false,
        bitmaps: vec![false; bitmaps.len()],
    };
    if !set && queries.is_empty() {
        w.base_allocation = true;
        w.allocation_depth = offer_depth;
        w.bitmaps.fill(true);
        return w;
    }
    for q in queries {
        match *q {
            META_BASE_ALLOCATION => w.base_allocation = true,
            "base:" if !set => w.base_allocation = true,
            META_ALLOCATION_DEPTH => w.allocation_depth |= offer_depth,
            "qemu:" if !set => {
                w.allocation_depth |= offer_depth;
                w.bitmaps.fill(true);
            }
            META_DIRTY_BITMAP_PREFIX if !set => w.bitmaps.fill(true),
            q => {
                let name = q
                    .strip_prefix(META_DIRTY_BITMAP_PREFIX)
                    .filter(|n| !n.is_empty());
                if let Some(i) = name.and_then(|n| bitmaps.iter().position(|b| *b == n)) {
                    w.bitmaps[i] = true;
                }
            }
        }
    }
    w
}
