//! Wire constants of the NBD protocol and small encode/decode helpers.
//!
//! Every value here is checked against `doc/proto.md` of the
//! NetworkBlockDevice/nbd project (master of 2026, and its
//! `extension-ext-header` branch for extended headers).

use std::io;

// ---- Magic numbers ----------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle server magic, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC` of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REQUEST_MAGIC` of a request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_EXTENDED_REPLY_MAGIC` of every reply chunk once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- Handshake flags (server, 16 bits) and client flags (32 bits) -----------

/// `NBD_FLAG_FIXED_NEWSTYLE` handshake flag.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES` handshake flag.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// `NBD_FLAG_C_FIXED_NEWSTYLE` client flag.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES` client flag.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Transmission flags (16 bits) -------------------------------------------

/// `NBD_FLAG_HAS_FLAGS`, always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL`.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_RESIZE` (experimental; never set here).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_FLAG_SEND_CACHE`.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`: BLOCK_STATUS may name its contexts in a payload.
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---- Options ----------------------------------------------------------------

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_PEEK_EXPORT` (withdrawn).
pub const OPT_PEEK_EXPORT: u32 = 4;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- Option reply types -----------------------------------------------------

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---- NBD_REP_INFO information types -----------------------------------------

/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Commands and command flags ---------------------------------------------

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// `NBD_CMD_RESIZE` (experimental; answered with `EINVAL`).
pub const CMD_RESIZE: u16 = 8;

/// `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// `NBD_CMD_FLAG_PAYLOAD_LEN`: with extended headers, the length is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---- Structured replies ------------------------------------------------------

/// `NBD_REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`, the only block status chunk with extended headers.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15 marks every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---- Metadata contexts ---------------------------------------------------------

/// The `base:allocation` context, offered on every export.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// `NBD_STATE_HOLE` in `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` in `base:allocation`.
pub const STATE_ZERO: u32 = 1 << 1;
/// QEMU's `qemu:allocation-depth` context (QEMU `docs/interop/nbd.rst`),
/// offered on exports that enable it: an extent's whole 32-bit flags value is
/// the layer of the backing chain that allocates it (0 unallocated, 1 the
/// exported node, 2 its backing, and so on).
pub const META_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's `qemu:dirty-bitmap:NAME` contexts (QEMU
/// `docs/interop/nbd.rst`), one per bitmap an export offers: an extent is
/// dirty ([`STATE_DIRTY`]) or clean (0).
pub const META_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `NBD_STATE_DIRTY` in `qemu:dirty-bitmap:NAME`.
pub const STATE_DIRTY: u32 = 1 << 0;

// ---- Error values --------------------------------------------------------------

/// `NBD_EPERM`.
pub const NBD_EPERM: u32 = 1;
/// `NBD_EIO`.
pub const NBD_EIO: u32 = 5;
/// `NBD_ENOMEM`.
pub const NBD_ENOMEM: u32 = 12;
/// `NBD_EINVAL`.
pub const NBD_EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const NBD_ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`.
pub const NBD_EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`.
pub const NBD_ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---- Sizes ----------------------------------------------------------------------

/// Largest READ/WRITE payload accepted (2^25, the spec's interoperable maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest string (export name, query, message) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Size of a (compact) request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of a client option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Maps an errno from the block layer to the NBD error value sent on the wire.
///
/// The spec restricts the error field to a fixed set; anything outside it is
/// reported as `NBD_EIO` so a client never sees a host-specific number.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        // The spec asks for EDQUOT and EFBIG to be reported as ENOSPC.
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// Maps an `io::Error` from the block layer to an NBD error value.
pub fn io_error_to_nbd(e: &io::Error) -> u32 {
    e.raw_os_error().map_or(NBD_EIO, errno_to_nbd)
}

/// Name of an NBD error value, for messages and tests.
pub fn nbd_error_name(err: u32) -> &'static str {
    match err {
        0 => "success",
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Name of a command, for logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        CMD_RESIZE => "RESIZE",
        _ => "unknown",
    }
}

// ---- Requests ---------------------------------------------------------------------

/// A transmission-phase request header, compact or extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub typ: u16,
    /// Opaque client cookie, echoed in every reply to this request.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length of the effect, or of the payload for WRITE (and, with
    /// extended headers, for any command flagged `NBD_CMD_FLAG_PAYLOAD_LEN`).
    /// Compact headers carry 32 bits of it, extended ones 64.
    pub len: u64,
}

impl Request {
    /// Decodes a compact header; `None` when the magic is not `NBD_REQUEST_MAGIC`.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        (be32(b, 0) == REQUEST_MAGIC).then(|| Request::with_len(b, be32(b, 24).into()))
    }

    /// Decodes an extended header; `None` when the magic is not
    /// `NBD_EXTENDED_REQUEST_MAGIC`.
    pub fn decode_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Option<Request> {
        (be32(b, 0) == EXTENDED_REQUEST_MAGIC).then(|| Request::with_len(b, be64(b, 24)))
    }

    /// The fields both header forms place alike (bytes 4..24), and `len`.
    fn with_len(b: &[u8], len: u64) -> Request {
        Request {
            flags: be16(b, 4),
            typ: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            len,
        }
    }

    /// Encodes a compact header (client side); `len` must fit 32 bits.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        self.encode_common(REQUEST_MAGIC, &mut b);
        b[24..28].copy_from_slice(&(self.len as u32).to_be_bytes());
        b
    }

    /// Encodes an extended header (client side).
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        self.encode_common(EXTENDED_REQUEST_MAGIC, &mut b);
        b[24..32].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// `magic` and the fields both header forms place alike (bytes 0..24).
    fn encode_common(&self, magic: u32, b: &mut [u8]) {
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
    }
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured reply chunk header for a payload of `len` bytes.
pub fn encode_chunk_header(flags: u16, typ: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encodes an extended reply chunk header: `offset` is the request's, as
/// the spec asks, whatever the payload says.
pub fn encode_extended_reply_header(
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> [u8; EXTENDED_REPLY_LEN] {
    let mut b = [0u8; EXTENDED_REPLY_LEN];
    b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// A decoded structured reply chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`NBD_REPLY_FLAG_*`).
    pub flags: u16,
    /// Chunk type (`NBD_REPLY_TYPE_*`).
    pub typ: u16,
    /// Cookie of the request this chunk answers.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

/// Decodes the 20 bytes after the magic-checked start of a structured chunk.
pub fn decode_chunk_header(b: &[u8; CHUNK_HEADER_LEN]) -> Option<ChunkHeader> {
    if be32(b, 0) != STRUCTURED_REPLY_MAGIC {
        return None;
    }
    Some(ChunkHeader {
        flags: be16(b, 4),
        typ: be16(b, 6),
        cookie: be64(b, 8),
        len: be32(b, 16),
    })
}

/// Payload of an error chunk: error, message length, message (truncated to the spec's limit).
pub fn encode_error_payload(error: u32, message: &str) -> Vec<u8> {
    let msg = truncate_str(message, MAX_STRING);
    let mut p = Vec::with_capacity(6 + msg.len());
    p.extend_from_slice(&error.to_be_bytes());
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p
}

/// Longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- Options ---------------------------------------------------------------------

/// Encodes an option request header (client side).
pub fn encode_option_header(option: u32, len: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&len.to_be_bytes());
    b
}

/// Decodes an option request header into (option, length); `None` on a bad magic.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Option<(u32, u32)> {
    if be64(b, 0) != IHAVEOPT {
        return None;
    }
    Some((be32(b, 8), be32(b, 12)))
}

/// Appends one option reply (header and data) to `out`.
pub fn push_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A decoded option reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Option this replies to.
    pub option: u32,
    /// Reply type (`NBD_REP_*`).
    pub reply_type: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// Decodes an option reply header; `None` on a bad magic.
pub fn decode_option_reply_header(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Option<OptionReplyHeader> {
    if be64(b, 0) != OPT_REPLY_MAGIC {
        return None;
    }
    Some(OptionReplyHeader {
        option: be32(b, 8),
        reply_type: be32(b, 12),
        len: be32(b, 16),
    })
}

/// Name of an option, for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_PEEK_EXPORT => "PEEK_EXPORT",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

// ---- Big-endian field access --------------------------------------------------------
// Callers pass fixed-size arrays or checked slices, so the indexing cannot fail.

/// Reads a big-endian u16 at `at`.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian u32 at `at`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian u64 at `at`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// A cursor over untrusted option data: every read is bounds-checked.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// Starts reading `buf` from its beginning.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Takes the next `n` bytes, or `None` if fewer are left.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.remaining() {
            return None;
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Some(s)
    }

    /// Takes a big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| be16(b, 0))
    }

    /// Takes a big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| be32(b, 0))
    }

    /// Takes a big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| be64(b, 0))
    }

    /// Takes a u32 length followed by that many bytes of UTF-8.
    pub fn string32(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_values() {
        // Spot checks against the numbers printed in doc/proto.md.
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPT_REPLY_MAGIC, 0x3e889045565a9);
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);
        assert_eq!(REPLY_TYPE_ERROR, 32769);
        assert_eq!(REPLY_TYPE_ERROR_OFFSET, 32770);
        assert_eq!(CMD_BLOCK_STATUS, 7);
        assert_eq!(REPLY_TYPE_OFFSET_HOLE, 2);
        assert_eq!(REPLY_TYPE_BLOCK_STATUS, 5);
        assert_eq!(OPT_STRUCTURED_REPLY, 8);
        assert_eq!(OPT_LIST_META_CONTEXT, 9);
        assert_eq!(OPT_SET_META_CONTEXT, 10);
        assert_eq!(FLAG_SEND_FAST_ZERO, 0x800);
        assert_eq!(CMD_FLAG_FAST_ZERO, 0x10);
    }

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(Request::decode(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);

        let r = Request {
            len: (1 << 40) + 3,
            ..r
        };
        let b = r.encode_extended();
        assert_eq!(&b[0..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(be64(&b, 24), (1 << 40) + 3);
        assert_eq!(Request::decode_extended(&b), Some(r));
        let mut bad = b;
        bad[3] ^= 1;
        assert_eq!(Request::decode_extended(&bad), None);

        let h = encode_extended_reply_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, 4096, 0);
        assert_eq!(be32(&h, 0), EXTENDED_REPLY_MAGIC);
        assert_eq!((be16(&h, 4), be16(&h, 6)), (1, 0));
        assert_eq!((be64(&h, 8), be64(&h, 16), be64(&h, 24)), (9, 4096, 0));
    }

    #[test]
    fn reply_headers() {
        let s = encode_simple_reply(NBD_EPERM, 42);
        assert_eq!(&s[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(be32(&s, 4), 1);
        assert_eq!(be64(&s, 8), 42);

        let c = encode_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 4104);
        assert_eq!(&c[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        let h = decode_chunk_header(&c).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                flags: 1,
                typ: 1,
                cookie: 7,
                len: 4104
            }
        );
    }

    #[test]
    fn option_headers() {
        let h = encode_option_header(OPT_GO, 10);
        assert_eq!(decode_option_header(&h), Some((7, 10)));
        let mut bad = h;
        bad[3] = 0;
        assert_eq!(decode_option_header(&bad), None);

        let mut out = Vec::new();
        push_option_reply(&mut out, OPT_LIST, REP_SERVER, b"abc");
        assert_eq!(out.len(), 23);
        let hdr: [u8; 20] = out[..20].try_into().unwrap();
        let r = decode_option_reply_header(&hdr).unwrap();
        assert_eq!((r.option, r.reply_type, r.len), (3, 2, 3));
        assert_eq!(&out[20..], b"abc");
    }

    #[test]
    fn error_payload_and_truncation() {
        let p = encode_error_payload(NBD_EIO, "boom");
        assert_eq!(p, [0, 0, 0, 5, 0, 4, b'b', b'o', b'o', b'm']);
        let long = "é".repeat(3000); // 6000 bytes, 2-byte chars
        let p = encode_error_payload(NBD_EIO, &long);
        let n = be16(&p, 4) as usize;
        assert!(n <= MAX_STRING);
        assert_eq!(p.len(), 6 + n);
        assert!(std::str::from_utf8(&p[6..]).is_ok());
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_to_nbd(libc::ENOSPC), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(libc::EFBIG), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(libc::EIO), NBD_EIO);
        assert_eq!(errno_to_nbd(libc::EPERM), NBD_EPERM);
        assert_eq!(errno_to_nbd(libc::EROFS), NBD_EPERM);
        assert_eq!(errno_to_nbd(libc::EINVAL), NBD_EINVAL);
        assert_eq!(errno_to_nbd(libc::ENOMEM), NBD_ENOMEM);
        assert_eq!(errno_to_nbd(libc::EOVERFLOW), NBD_EOVERFLOW);
        assert_eq!(errno_to_nbd(libc::EOPNOTSUPP), NBD_ENOTSUP);
        assert_eq!(errno_to_nbd(libc::ESHUTDOWN), NBD_ESHUTDOWN);
        assert_eq!(errno_to_nbd(libc::ENOENT), NBD_EIO);
        assert_eq!(io_error_to_nbd(&io::Error::other("x")), NBD_EIO);
        assert_eq!(
            io_error_to_nbd(&io::Error::from_raw_os_error(libc::ENOSPC)),
            NBD_ENOSPC
        );
    }

    #[test]
    fn cursor_is_bounds_checked() {
        let data = [0, 0, 0, 3, b'a', b'b', b'c', 0, 2, 0xff];
        let mut c = Cursor::new(&data);
        assert_eq!(c.string32(), Some("abc"));
        assert_eq!(c.u16(), Some(2));
        assert_eq!(c.u16(), None);
        assert_eq!(c.remaining(), 1);
        let huge = [0xff, 0xff, 0xff, 0xff, 1];
        assert_eq!(Cursor::new(&huge).string32(), None);
        let bad_utf8 = [0, 0, 0, 1, 0xff];
        assert_eq!(Cursor::new(&bad_utf8).string32(), None);
    }
}
