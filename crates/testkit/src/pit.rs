//! Point-in-time consistency checking: concurrent self-describing writers over
//! NBD, an exact verifier that decides whether a copy equals the disk at one
//! instant of a window, and block-job scenarios that run against any daemon
//! speaking QMP with an NBD export (qemu-storage-daemon or livesnapd).
//!
//! Why the verifier is exact: each block is owned by one writer that never has
//! two writes to it in flight, so the writes to a block are totally ordered.
//! If a copy holds the k-th write W_k of a block, the copy's instant T obeys
//! `W_k.sent <= T < W_{k+1}.acked`; the copy is consistent iff these intervals,
//! over all blocks, meet inside the window. Clocks are read so that every
//! measurement error widens the intervals (`sent` before the request leaves,
//! `acked` after the reply is seen), so timing noise can only make the check
//! more lenient, never fail a correct copy.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livesnap_nbd::{ClientError, NbdClient};
use serde_json::{json, Value};

use super::{run, Qmp};

/// Writer id of the content a block holds before any logged write.
pub const INITIAL: u32 = u32::MAX;

/// Size of one self-describing record; a block is a run of them.
const RECORD: usize = 64;
const MAGIC: u64 = u64::from_le_bytes(*b"LSNPPIT1");

/// How long a stopping writer waits for its in-flight writes.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// How often a waiting writer looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// Error messages a writer keeps (failures are counted beyond that).
const MAX_ERRORS: usize = 100;

/// Largest request the prefill and export reads use.
const CHUNK: usize = 1 << 20;

/// How the disk is cut into blocks and who owns which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes per block (a multiple of 64).
    pub block_size: usize,
    /// Number of blocks, from offset 0.
    pub blocks: u64,
    /// Number of writers; block b belongs to writer `b % writers`.
    pub writers: u32,
    /// Run tag written in every record, so content from another run is not mistaken for ours.
    pub tag: u64,
}

impl Layout {
    /// A layout of `blocks` blocks of `block_size` bytes shared by `writers` writers.
    pub fn new(block_size: usize, blocks: u64, writers: u32, tag: u64) -> Layout {
        assert!(
            block_size >= RECORD && block_size.is_multiple_of(RECORD),
            "block size must be a multiple of {RECORD}"
        );
        assert!(writers > 0 && writers < INITIAL, "bad writer count");
        assert!(blocks >= u64::from(writers), "fewer blocks than writers");
        Layout {
            block_size,
            blocks,
            writers,
            tag,
        }
    }

    /// Bytes covered by the blocks.
    pub fn size(&self) -> u64 {
        self.blocks * self.block_size as u64
    }

    /// The writer that owns block `b`.
    pub fn owner(&self, b: u64) -> u32 {
        (b % u64::from(self.writers)) as u32
    }

    /// The same layout with another run tag.
    pub fn with_tag(&self, tag: u64) -> Layout {
        Layout { tag, ..*self }
    }

    fn with_bs(self, block_size: usize) -> Layout {
        Layout { block_size, ..self }
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The record every copy in a block repeats. Identical copies keep
/// generating and checking a block down to one hash and a few memcpys (the
/// writers' main CPU cost in a debug build); a block mixing two writes, or
/// shifted across a block boundary, still differs from its first record.
fn record_words(layout: &Layout, writer: u32, seq: u64, block: u64) -> [u64; 8] {
    let id = [
        MAGIC,
        layout.tag,
        block,
        (u64::from(writer) << 32) | layout.block_size as u64,
        seq,
    ];
    let sum = id.iter().fold(0x6c69_7665_736e_6170, |h, &x| mix(h ^ x));
    [
        id[0],
        id[1],
        id[2],
        id[3],
        id[4],
        sum,
        !sum,
        sum.rotate_left(32),
    ]
}

fn record_bytes(words: &[u64; 8]) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    for (j, x) in words.iter().enumerate() {
        r[j * 8..j * 8 + 8].copy_from_slice(&x.to_le_bytes());
    }
    r
}

/// Fills `buf` (one block) with the records of write `seq` of `writer` to `block`.
pub fn encode_block(layout: &Layout, writer: u32, seq: u64, block: u64, buf: &mut [u8]) {
    assert_eq!(buf.len(), layout.block_size);
    buf[..RECORD].copy_from_slice(&record_bytes(&record_words(layout, writer, seq, block)));
    let mut done = RECORD;
    while done < buf.len() {
        let n = done.min(buf.len() - done);
        buf.copy_within(..n, done);
        done += n;
    }
}

/// One block's content as a fresh vector; see [`encode_block`].
pub fn block_bytes(layout: &Layout, writer: u32, seq: u64, block: u64) -> Vec<u8> {
    let mut v = vec![0; layout.block_size];
    encode_block(layout, writer, seq, block, &mut v);
    v
}

/// The whole disk holding only initial records, as a raw image.
pub fn initial_image(layout: &Layout) -> Vec<u8> {
    let mut v = vec![0; layout.size() as usize];
    for (b, chunk) in v.chunks_exact_mut(layout.block_size).enumerate() {
        encode_block(layout, INITIAL, 0, b as u64, chunk);
    }
    v
}

/// Which write a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Writer id, or [`INITIAL`].
    pub writer: u32,
    /// That writer's sequence number (0 for the initial content).
    pub seq: u64,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.writer == INITIAL {
            write!(f, "the initial content")
        } else {
            write!(f, "write seq {} of writer {}", self.seq, self.writer)
        }
    }
}

fn words_at(data: &[u8], at: usize) -> [u64; 8] {
    let mut w = [0u64; 8];
    for (j, x) in w.iter_mut().enumerate() {
        *x = u64::from_le_bytes(data[at + j * 8..at + j * 8 + 8].try_into().unwrap());
    }
    w
}

/// Describes one record, for diagnostics.
fn describe_record(layout: &Layout, data: &[u8], at: usize) -> String {
    let w = words_at(data, at);
    if data[at..at + RECORD].iter().all(|&x| x == 0) {
        return "zeroes".into();
    }
    if w[0] != MAGIC {
        return format!("no record (first bytes {:02x?})", &data[at..at + 16]);
    }
    let writer = (w[3] >> 32) as u32;
    let theirs = layout.with_tag(w[1]).with_bs((w[3] & 0xffff_ffff) as usize);
    let expect = record_words(&theirs, writer, w[4], w[2]);
    if expect != w {
        return "a record with a bad checksum".into();
    }
    let held = Held { writer, seq: w[4] };
    let mut s = format!("{held} to block {}", w[2]);
    if w[1] != layout.tag {
        s += &format!(
            " of another run (tag {:#x}, expected {:#x})",
            w[1], layout.tag
        );
    }
    s
}

/// Decodes block `block` of a copy: which write it holds, or why it holds none.
pub fn decode_block(layout: &Layout, block: u64, data: &[u8]) -> Result<Held, String> {
    assert_eq!(data.len(), layout.block_size);
    let w = words_at(data, 0);
    let writer = (w[3] >> 32) as u32;
    let expect = record_words(layout, writer, w[4], block);
    if w != expect {
        return Err(format!("holds {}", describe_record(layout, data, 0)));
    }
    let held = Held { writer, seq: w[4] };
    if writer != INITIAL && writer >= layout.writers {
        return Err(format!("holds {held}, but there is no such writer"));
    }
    let first = &data[..RECORD];
    if let Some(i) = (RECORD..data.len())
        .step_by(RECORD)
        .find(|&i| &data[i..i + RECORD] != first)
    {
        return Err(format!(
            "is torn: it starts with {held} but bytes {i}.. hold {}",
            describe_record(layout, data, i)
        ));
    }
    Ok(held)
}

/// One logged write.
#[derive(Clone, Copy, Debug)]
pub struct WriteRecord {
    /// Writer id (the block's owner).
    pub writer: u32,
    /// Per-writer sequence number, from 1.
    pub seq: u64,
    /// Block index.
    pub block: u64,
    /// Taken just before the request was handed to the client.
    pub sent: Instant,
    /// When the successful reply was seen; `None` when the write failed or
    /// never got an answer, so it may or may not have reached the disk.
    pub acked: Option<Instant>,
}

/// Every write the writers made, with their timing.
#[derive(Clone, Debug)]
pub struct WriteLog {
    /// The layout written.
    pub layout: Layout,
    /// All writes, in no particular order.
    pub writes: Vec<WriteRecord>,
    /// What went wrong (failed writes, lost connections).
    pub errors: Vec<String>,
}

impl WriteLog {
    /// Writes that were acknowledged.
    pub fn acked(&self) -> usize {
        self.writes.iter().filter(|w| w.acked.is_some()).count()
    }

    /// Writes that failed or got no answer.
    pub fn failed(&self) -> usize {
        self.writes.len() - self.acked()
    }

    /// Panics unless every write was acknowledged.
    pub fn assert_no_failures(&self) {
        assert!(
            self.failed() == 0 && self.errors.is_empty(),
            "{} of {} writes failed; first errors: {:?}",
            self.failed(),
            self.writes.len(),
            &self.errors[..self.errors.len().min(5)]
        );
    }

    /// Writes acknowledged inside `[a, b]`.
    pub fn acked_between(&self, a: Instant, b: Instant) -> usize {
        self.writes
            .iter()
            .filter(|w| w.acked.is_some_and(|t| t >= a && t <= b))
            .count()
    }

    /// Writes sent inside `[a, b]`.
    pub fn sent_between(&self, a: Instant, b: Instant) -> usize {
        self.writes
            .iter()
            .filter(|w| w.sent >= a && w.sent <= b)
            .count()
    }

    /// Per block, its writes ordered by sequence number.
    fn histories(&self) -> Vec<Vec<WriteRecord>> {
        let mut h = vec![Vec::new(); self.layout.blocks as usize];
        for w in &self.writes {
            assert!(
                w.block < self.layout.blocks && self.layout.owner(w.block) == w.writer,
                "log entry {w:?} does not fit the layout"
            );
            h[w.block as usize].push(*w);
        }
        for v in &mut h {
            v.sort_by_key(|w| w.seq);
        }
        h
    }
}

/// A signed offset of `t` from `base`, for messages.
fn rel(t: Instant, base: Instant) -> String {
    if t >= base {
        format!("t0+{:.3}ms", (t - base).as_secs_f64() * 1e3)
    } else {
        format!("t0-{:.3}ms", (base - t).as_secs_f64() * 1e3)
    }
}

/// Where a point-in-time copy was found consistent.
#[derive(Clone, Debug)]
pub struct PitReport {
    /// Start of the window (the instant before the command).
    pub t0: Instant,
    /// End of the window.
    pub t1: Instant,
    /// Earliest instant the copy can be from.
    pub from: Instant,
    /// The copy is from before this instant (or at `t1`, when `until == t1`).
    pub until: Instant,
    /// Blocks holding a logged write: the copy had to carry writes made before its instant.
    pub carried: u64,
    /// Blocks written again after the window: a copy taken later would differ there.
    pub changed_after: u64,
    /// Blocks whose interval starts or ends inside the window: those that narrowed the instant down.
    pub pinning: u64,
}

impl fmt::Display for PitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "consistent at one instant in [{}, {}{} (window t0..{}); {} blocks carry logged writes, {} changed after the window, {} pin the instant",
            rel(self.from, self.t0),
            rel(self.until, self.t0),
            if self.until == self.t1 { "]" } else { ")" },
            rel(self.t1, self.t0),
            self.carried,
            self.changed_after,
            self.pinning
        )
    }
}

/// Why a copy is not a point-in-time copy.
#[derive(Clone, Debug)]
pub enum PitError {
    /// The image does not cover the layout.
    Size {
        /// Bytes the layout needs.
        want: u64,
        /// Bytes the image has.
        got: u64,
    },
    /// A block holds no write of this run, or one the log never sent.
    Unknown {
        /// Block index.
        block: u64,
        /// What was found.
        detail: String,
    },
    /// Every block holds a known write, but no single instant in the window explains them all.
    Inconsistent {
        /// The message, naming the blocks that conflict.
        detail: String,
        /// The blocks named.
        blocks: Vec<u64>,
    },
}

impl fmt::Display for PitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PitError::Size { want, got } => {
                write!(f, "image has {got} bytes, the layout needs {want}")
            }
            PitError::Unknown { block, detail } => write!(f, "block {block} {detail}"),
            PitError::Inconsistent { detail, .. } => {
                write!(f, "not a point-in-time copy: {detail}")
            }
        }
    }
}

/// The instants a block's content allows: `[lower, upper)`, `None` meaning unbounded.
struct Interval {
    held: Held,
    lower: Option<Instant>,
    upper: Option<Instant>,
    /// The write whose acknowledgement sets `upper`.
    next: Option<WriteRecord>,
}

fn block_interval(
    log: &WriteLog,
    hist: &[WriteRecord],
    b: u64,
    data: &[u8],
) -> Result<Interval, PitError> {
    let held = decode_block(&log.layout, b, data)
        .map_err(|detail| PitError::Unknown { block: b, detail })?;
    let (lower, after) = if held.writer == INITIAL {
        (None, 0)
    } else {
        if held.writer != log.layout.owner(b) {
            return Err(PitError::Unknown {
                block: b,
                detail: format!(
                    "holds {held}, but block {b} belongs to writer {}",
                    log.layout.owner(b)
                ),
            });
        }
        match hist.binary_search_by_key(&held.seq, |w| w.seq) {
            Ok(i) => (Some(hist[i].sent), i + 1),
            Err(_) => {
                return Err(PitError::Unknown {
                    block: b,
                    detail: format!("holds {held}, which the log does not contain (never sent)"),
                })
            }
        }
    };
    // A failed write may or may not have landed, so only the next acknowledged one bounds T.
    let next = hist[after..].iter().find(|w| w.acked.is_some()).copied();
    Ok(Interval {
        held,
        lower,
        upper: next.and_then(|w| w.acked),
        next,
    })
}

/// Decides whether `image` (raw bytes from offset 0) equals the disk the
/// writers wrote at one instant T with `t0 <= T <= t1`.
pub fn verify_point_in_time(
    log: &WriteLog,
    image: &[u8],
    t0: Instant,
    t1: Instant,
) -> Result<PitReport, PitError> {
    assert!(t0 <= t1, "window ends before it starts");
    let layout = &log.layout;
    if (image.len() as u64) < layout.size() {
        return Err(PitError::Size {
            want: layout.size(),
            got: image.len() as u64,
        });
    }
    let hist = log.histories();
    // What each block allows, and why: its held write and the later one it misses.
    let mut instants = livesnap_pit::Instants::new();
    let mut why: Vec<(Held, Option<WriteRecord>)> = Vec::new();
    let mut after_window = Vec::new();
    let mut before_window = Vec::new();
    let mut carried = 0;
    let mut changed_after = 0;
    let mut pinning = 0;
    for (b, data) in image[..layout.size() as usize]
        .chunks_exact(layout.block_size)
        .enumerate()
    {
        let b = b as u64;
        let iv = block_interval(log, &hist[b as usize], b, data)?;
        if iv.held.writer != INITIAL {
            carried += 1;
        }
        if hist[b as usize].last().is_some_and(|w| w.sent > t1) {
            changed_after += 1;
        }
        if iv.lower.is_some_and(|l| l > t0) || iv.upper.is_some_and(|u| u <= t1) {
            pinning += 1;
        }
        if iv.lower.is_some_and(|l| l > t1) {
            after_window.push(b);
        }
        if iv.upper.is_some_and(|u| u <= t0) {
            before_window.push(b);
        }
        instants.add(b, iv.lower, iv.upper);
        why.push((iv.held, iv.next));
    }
    if let Some((from, until)) = instants.within(t0, t1) {
        return Ok(PitReport {
            t0,
            t1,
            from,
            until,
            carried,
            changed_after,
            pinning,
        });
    }
    let latest = instants
        .latest()
        .map(|l| (l.at, l.block, why[l.block as usize].0));
    let earliest = instants.earliest().and_then(|e| {
        let (held, next) = why[e.block as usize];
        next.map(|n| (e.at, e.block, held, n))
    });
    let mut parts = vec![format!("window is [t0, {}]", rel(t1, t0))];
    let mut blocks = Vec::new();
    if let Some((l, b, held)) = latest {
        parts.push(format!(
            "block {b} holds {held}, sent at {}, so T >= that{}",
            rel(l, t0),
            if l > t1 {
                format!(
                    " (after the window; {} blocks hold writes sent after it, first {:?})",
                    after_window.len(),
                    &after_window[..after_window.len().min(8)]
                )
            } else {
                String::new()
            }
        ));
        blocks.push(b);
    }
    if let Some((u, b, held, next)) = earliest {
        parts.push(format!(
            "block {b} holds {held} but not the later write seq {} acknowledged at {}, so T < that{}",
            next.seq,
            rel(u, t0),
            if u <= t0 {
                format!(" (before the window; {} blocks miss writes acknowledged before it, first {:?})", before_window.len(), &before_window[..before_window.len().min(8)])
            } else {
                String::new()
            }
        ));
        blocks.push(b);
    }
    Err(PitError::Inconsistent {
        detail: parts.join("; "),
        blocks,
    })
}

/// After the writers stopped: every block of `image` holds its last
/// acknowledged write (or a later one whose outcome is unknown), so no
/// acknowledged write was lost.
pub fn check_source_complete(log: &WriteLog, image: &[u8]) -> Result<(), PitError> {
    let layout = &log.layout;
    if (image.len() as u64) < layout.size() {
        return Err(PitError::Size {
            want: layout.size(),
            got: image.len() as u64,
        });
    }
    let hist = log.histories();
    let mut lost = Vec::new();
    for (b, data) in image[..layout.size() as usize]
        .chunks_exact(layout.block_size)
        .enumerate()
    {
        let iv = block_interval(log, &hist[b], b as u64, data)?;
        if let Some(next) = iv.next {
            lost.push((b as u64, iv.held, next));
        }
    }
    match lost.first() {
        None => Ok(()),
        Some(&(b, held, next)) => Err(PitError::Inconsistent {
            detail: format!(
                "{} blocks lost acknowledged writes; block {b} holds {held}, but write seq {} of writer {} to it was acknowledged",
                lost.len(),
                next.seq,
                next.writer
            ),
            blocks: lost.iter().map(|l| l.0).collect(),
        }),
    }
}

/// An NBD URL split into what [`NbdClient::connect`] takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdAddr {
    /// "unix:/path" or "host:port".
    pub addr: String,
    /// Export name.
    pub export: String,
}

impl NbdAddr {
    /// Parses `nbd+unix:///name?socket=/path` or `nbd://host[:port]/name`.
    pub fn parse(url: &str) -> NbdAddr {
        if let Some(rest) = url.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .unwrap_or_else(|| panic!("no socket in {url}"));
            let sock = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .unwrap_or_else(|| panic!("no socket in {url}"));
            return NbdAddr {
                addr: format!("unix:{sock}"),
                export: path.trim_start_matches('/').to_string(),
            };
        }
        if let Some(rest) = url.strip_prefix("nbd://") {
            let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
            let addr = if host.contains(':') {
                host.to_string()
            } else {
                format!("{host}:10809")
            };
            return NbdAddr {
                addr,
                export: export.to_string(),
            };
        }
        panic!("unsupported NBD URL {url}")
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(url: &str) -> NbdClient {
    let a = NbdAddr::parse(url);
    tokio::time::timeout(
        Duration::from_secs(10),
        NbdClient::connect(&a.addr, &a.export),
    )
    .await
    .unwrap_or_else(|_| panic!("NBD connect to {url} timed out"))
    .unwrap_or_else(|e| panic!("NBD connect to {url}: {e}"))
}

/// Request size for bulk transfers: [`CHUNK`] or the server's maximum, if smaller.
fn chunk(c: &NbdClient) -> usize {
    c.info()
        .block_size
        .map_or(CHUNK, |(_, _, max)| (max as usize).min(CHUNK))
}

/// Writes the initial record to every block of the export at `url`.
pub fn prefill(url: &str, layout: &Layout) {
    runtime().block_on(async {
        let c = Arc::new(connect(url).await);
        assert!(
            c.info().size >= layout.size(),
            "export {url} is smaller than the layout"
        );
        let per = (chunk(&c) / layout.block_size).max(1) as u64;
        let mut set = tokio::task::JoinSet::new();
        for first in (0..layout.blocks).step_by(per as usize) {
            let n = per.min(layout.blocks - first);
            let mut buf = vec![0; n as usize * layout.block_size];
            for (i, chunk) in buf.chunks_exact_mut(layout.block_size).enumerate() {
                encode_block(layout, INITIAL, 0, first + i as u64, chunk);
            }
            let c = c.clone();
            let off = first * layout.block_size as u64;
            if set.len() >= 4 {
                set.join_next().await.unwrap().unwrap();
            }
            set.spawn(async move {
                c.write(off, &buf, false)
                    .await
                    .unwrap_or_else(|e| panic!("prefill write at {off}: {e}"))
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        c.flush()
            .await
            .unwrap_or_else(|e| panic!("prefill flush: {e}"));
    })
}

/// Reads `len` bytes from offset 0 of the export at `url`.
pub fn read_export(url: &str, len: u64) -> Vec<u8> {
    read_export_at(url, 0, len)
}

/// Reads `len` bytes at `offset` of the export at `url`.
pub fn read_export_at(url: &str, offset: u64, len: u64) -> Vec<u8> {
    runtime().block_on(async {
        let c = connect(url).await;
        let mut out = Vec::with_capacity(len as usize);
        while (out.len() as u64) < len {
            let n = (len - out.len() as u64).min(chunk(&c) as u64) as u32;
            let d = c
                .read(offset + out.len() as u64, n)
                .await
                .unwrap_or_else(|e| panic!("read of {url}: {e}"));
            out.extend_from_slice(&d);
        }
        out
    })
}

/// Sends one NBD flush to the export at `url` on a connection of its own
/// (a flush covers every connection's completed writes: CAN_MULTI_CONN);
/// whether it was answered.
pub fn flush_export(url: &str) -> bool {
    runtime().block_on(async { connect(url).await.flush().await.is_ok() })
}

/// The guest-visible bytes of an image file (raw read directly, other formats
/// through `qemu-img convert -U`, which ignores the daemon's lock).
pub fn read_image(path: &Path, format: &str) -> Vec<u8> {
    if format == "raw" {
        return std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    }
    let tmp = tempfile::NamedTempFile::new().unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(tmp.path()));
    std::fs::read(tmp.path()).unwrap()
}

/// How the writers run.
#[derive(Clone, Copy, Debug)]
pub struct WriterOpts {
    /// Writes each writer keeps in flight (to different blocks).
    pub queue_depth: usize,
    /// Total writes per second over all writers; `None` for as fast as the server goes.
    pub rate: Option<f64>,
    /// Seed of the block choice.
    pub seed: u64,
    /// Send every write with FUA, so an acknowledged write must survive a daemon kill.
    pub fua: bool,
}

impl Default for WriterOpts {
    fn default() -> Self {
        WriterOpts {
            queue_depth: 8,
            rate: None,
            seed: 1,
            fua: false,
        }
    }
}

struct Shared {
    stop: AtomicBool,
    acked: AtomicU64,
    failed: AtomicU64,
}

struct Outcome {
    writes: Vec<WriteRecord>,
    errors: Vec<String>,
}

/// Running writers; [`Writers::stop`] ends them and returns the log.
pub struct Writers {
    layout: Layout,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Outcome>>,
}

impl Writers {
    /// Starts `layout.writers` writers, writer i on its own connection to
    /// `urls[i % urls.len()]`; returns once all are connected.
    pub fn start(urls: &[&str], layout: &Layout, opts: &WriterOpts) -> Writers {
        assert!(!urls.is_empty());
        let owned = layout.blocks / u64::from(layout.writers);
        assert!(
            owned >= 2 * opts.queue_depth as u64,
            "each writer needs at least twice its queue depth of blocks"
        );
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let threads = (0..layout.writers)
            .map(|id| {
                let url = urls[id as usize % urls.len()].to_string();
                let (layout, opts, shared, tx) = (*layout, *opts, shared.clone(), tx.clone());
                std::thread::Builder::new()
                    .name(format!("pit-writer-{id}"))
                    .spawn(move || runtime().block_on(writer(id, url, layout, opts, shared, tx)))
                    .unwrap()
            })
            .collect();
        for _ in 0..layout.writers {
            rx.recv_timeout(Duration::from_secs(20))
                .expect("writer did not connect");
        }
        Writers {
            layout: *layout,
            shared,
            threads,
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// Writes failed so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` writes were acknowledged; panics after `timeout`
    /// or when writes fail.
    pub fn wait_acked(&self, n: u64, timeout: Duration) {
        let start = Instant::now();
        while self.acked() < n {
            assert_eq!(
                self.failed(),
                0,
                "writes failed while waiting for {n} acknowledged writes"
            );
            assert!(
                start.elapsed() < timeout,
                "only {} of {n} writes acknowledged within {timeout:?}",
                self.acked()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the writers, waits for their in-flight writes, returns the log.
    pub fn stop(mut self) -> WriteLog {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut log = WriteLog {
            layout: self.layout,
            writes: Vec::new(),
            errors: Vec::new(),
        };
        for t in self.threads.drain(..) {
            let o = t
                .join()
                .unwrap_or_else(|_| panic!("a writer thread panicked"));
            log.writes.extend(o.writes);
            log.errors.extend(o.errors);
        }
        log
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        // Not joined: a test that panics must not wait for a stuck server.
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

type Done = (u64, u64, Instant, Instant, Result<(), ClientError>);

async fn writer(
    id: u32,
    url: String,
    layout: Layout,
    opts: WriterOpts,
    shared: Arc<Shared>,
    ready: mpsc::Sender<()>,
) -> Outcome {
    let client = Arc::new(connect(&url).await);
    let _ = ready.send(());
    let owned: Vec<u64> = (u64::from(id)..layout.blocks)
        .step_by(layout.writers as usize)
        .collect();
    let mut rng = mix(opts.seed ^ (u64::from(id) + 1).wrapping_mul(0x9e37_79b9)) | 1;
    let gap = opts
        .rate
        .map(|r| Duration::from_secs_f64(f64::from(layout.writers) / r));
    let mut out = Outcome {
        writes: Vec::new(),
        errors: Vec::new(),
    };
    // Block -> (seq, sent) of the write in flight there; the block is busy until it ends.
    let mut busy: HashMap<u64, (u64, Instant)> = HashMap::new();
    let mut set: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
    let mut seq = 0u64;
    let mut dead = false;
    let start = Instant::now();
    let finish =
        |d: Done, busy: &mut HashMap<u64, (u64, Instant)>, out: &mut Outcome, dead: &mut bool| {
            let (block, seq, sent, at, r) = d;
            busy.remove(&block);
            let acked = match r {
                Ok(()) => {
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                    Some(at)
                }
                Err(e) => {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    *dead |= matches!(e, ClientError::Io(_));
                    if out.errors.len() < MAX_ERRORS {
                        out.errors
                            .push(format!("writer {id} seq {seq} block {block}: {e}"));
                    }
                    None
                }
            };
            out.writes.push(WriteRecord {
                writer: id,
                seq,
                block,
                sent,
                acked,
            });
        };
    let mut stopped_at: Option<Instant> = None;
    loop {
        let stopping = dead || shared.stop.load(Ordering::Relaxed);
        if stopping && set.is_empty() {
            break;
        }
        if stopping && stopped_at.get_or_insert_with(Instant::now).elapsed() > STOP_GRACE {
            // Abandoned writes stay in the log as unanswered: they may or may not have landed.
            out.errors.push(format!(
                "writer {id}: {} writes unanswered after {STOP_GRACE:?}",
                busy.len()
            ));
            for (&block, &(seq, sent)) in &busy {
                out.writes.push(WriteRecord {
                    writer: id,
                    seq,
                    block,
                    sent,
                    acked: None,
                });
            }
            set.abort_all();
            break;
        }
        if !stopping && set.len() < opts.queue_depth {
            let due = gap.map(|g| start + g.mul_f64(seq as f64));
            if let Some(due) = due.filter(|&d| d > Instant::now()) {
                let until = due.min(Instant::now() + POLL);
                tokio::select! {
                    Some(r) = set.join_next(), if !set.is_empty() => finish(r.unwrap(), &mut busy, &mut out, &mut dead),
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
                continue;
            }
            let block = loop {
                let b = owned[(next_rand(&mut rng) % owned.len() as u64) as usize];
                if !busy.contains_key(&b) {
                    break b;
                }
            };
            seq += 1;
            let data = block_bytes(&layout, id, seq, block);
            let off = block * layout.block_size as u64;
            let c = client.clone();
            let (s, fua) = (seq, opts.fua);
            busy.insert(block, (s, Instant::now()));
            set.spawn(async move {
                let sent = Instant::now();
                let r = c.write(off, &data, fua).await;
                (block, s, sent, Instant::now(), r)
            });
            continue;
        }
        // Bounded, so a stop request is seen even while the server sits on every write.
        if let Ok(Some(r)) = tokio::time::timeout(POLL, set.join_next()).await {
            finish(r.unwrap(), &mut busy, &mut out, &mut dead);
        }
    }
    // A flush makes the acknowledged writes durable and pushes image metadata
    // (qcow2 tables) to the file, so the file can be read behind the daemon.
    if !dead && set.is_empty() {
        match tokio::time::timeout(STOP_GRACE, client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => out.errors.push(format!("writer {id}: flush: {e}")),
            Err(_) => out.errors.push(format!(
                "writer {id}: flush unanswered after {STOP_GRACE:?}"
            )),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Block-job scenarios, generic over the daemon.

/// The daemon under test, as the scenarios see it.
pub struct PitDaemon<'a> {
    /// A QMP session on it.
    pub qmp: &'a mut Qmp,
    /// NBD URL of the writable export of `node`.
    pub url: String,
    /// Node name the jobs take as `device` (the exported node).
    pub node: String,
    /// The source image file and its format, when the test knows it: checked
    /// as frozen at the pivot, read behind the daemon (so best raw).
    pub source_file: Option<(PathBuf, String)>,
    /// Where target images are created.
    pub dir: PathBuf,
}

/// Knobs of a scenario.
#[derive(Clone, Debug)]
pub struct PitOpts {
    /// Disk layout; each scenario uses its own run tag on top of it.
    pub layout: Layout,
    /// How the writers run.
    pub writers: WriterOpts,
    /// Writes acknowledged before the job starts.
    pub warmup: u64,
    /// Writes acknowledged after the point in time before the writers stop.
    pub after: u64,
    /// Format of the target image ("raw" or "qcow2").
    pub target_format: String,
    /// Job `speed` in bytes per second (0: unlimited). A limit keeps the job
    /// running long enough for many writes to race it.
    pub speed: u64,
    /// Deadline of every wait on the job.
    pub timeout: Duration,
    /// `copy-mode` of the mirror scenarios.
    pub mirror_mode: &'static str,
}

impl PitOpts {
    /// 4 KiB blocks over `size` bytes, 4 writers at queue depth 8, raw target.
    pub fn new(size: u64) -> PitOpts {
        PitOpts {
            layout: Layout::new(4096, size / 4096, 4, 0),
            writers: WriterOpts::default(),
            warmup: 2000,
            after: 2000,
            target_format: "raw".into(),
            speed: 256 << 20,
            timeout: Duration::from_secs(60),
            mirror_mode: "write-blocking",
        }
    }
}

/// What a scenario found.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    /// Scenario name.
    pub name: &'static str,
    /// The point-in-time check of the copy (`None` when nothing was checkable).
    pub pit: Option<PitReport>,
    /// Writes made, all acknowledged.
    pub writes: usize,
    /// Writes sent while the job ran (backup: after the start command's reply) until its end event.
    pub during_job: usize,
    /// Job start command to its end event.
    pub job_time: Duration,
}

impl fmt::Display for ScenarioReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} writes, {} sent during the job ({:.1} ms); {}",
            self.name,
            self.writes,
            self.during_job,
            self.job_time.as_secs_f64() * 1e3,
            match &self.pit {
                Some(p) => p.to_string(),
                None => "no point-in-time check".into(),
            }
        )
    }
}

/// Waits for `want` (a block job event) about job `job`; panics on another
/// ending of that job, on an `error` field, or after `timeout`. Returns the
/// event and the instant it was read.
pub fn wait_job_event(qmp: &mut Qmp, job: &str, want: &str, timeout: Duration) -> (Value, Instant) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = qmp
            .event(left)
            .unwrap_or_else(|| panic!("no {want} for job {job} within {timeout:?}"));
        let at = Instant::now();
        let name = ev["event"].as_str().unwrap_or_default();
        let data = &ev["data"];
        let about = data["device"].as_str().or(data["id"].as_str());
        if about != Some(job) {
            continue;
        }
        if name == want {
            assert!(
                data.get("error").is_none(),
                "job {job} ended with an error: {ev}"
            );
            return (ev, at);
        }
        assert!(
            !matches!(
                name,
                "BLOCK_JOB_COMPLETED"
                    | "BLOCK_JOB_CANCELLED"
                    | "BLOCK_JOB_ERROR"
                    | "BLOCK_JOB_READY"
            ),
            "job {job}: waiting for {want}, got {ev}"
        );
    }
}

/// Creates an image file with qemu-img and adds it as node `node`.
pub fn add_image_node(qmp: &mut Qmp, node: &str, path: &Path, format: &str, size: u64) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string()));
    qmp.ok(
        "blockdev-add",
        json!({
            "driver": format,
            "node-name": node,
            "file": {"driver": "file", "filename": path.to_str().unwrap()},
        }),
    );
}

/// Prefills the disk with a fresh tag, creates the target and starts the writers.
fn setup(d: &mut PitDaemon, o: &PitOpts, name: &str, tag: u64) -> (PathBuf, String, Writers) {
    let layout = o.layout.with_tag(mix(o.layout.tag ^ tag ^ o.writers.seed));
    prefill(&d.url, &layout);
    let target = d.dir.join(format!("pit-{name}.{}", o.target_format));
    let node = format!("pit-{name}-target");
    add_image_node(d.qmp, &node, &target, &o.target_format, layout.size());
    let w = Writers::start(&[&d.url], &layout, &o.writers);
    w.wait_acked(o.warmup, o.timeout);
    (target, node, w)
}

/// Lets `n` more writes be acknowledged, then stops the writers; panics on any failed write.
fn finish_writes(w: Writers, n: u64, timeout: Duration) -> WriteLog {
    w.wait_acked(w.acked() + n, timeout);
    let log = w.stop();
    log.assert_no_failures();
    log
}

fn must<T>(what: &str, r: Result<T, PitError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Deletes node `node` once no job holds it any more, which also writes its
/// cached metadata to the file (a qcow2 target read behind the daemon's back
/// would miss its tables otherwise).
pub fn release_node(qmp: &mut Qmp, node: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        match qmp.execute("blockdev-del", json!({"node-name": node})) {
            Ok(_) => return,
            // The job that used it may still be concluding (auto-dismiss runs after the event).
            Err(_) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("blockdev-del {node}: {e:?}"),
        }
    }
}

/// Checks that the exported disk holds every acknowledged write, and that the
/// verifier would reject it as a copy from the window: the writes after the
/// window are enough to tell a copy from a later instant apart.
fn check_export_and_teeth(d: &PitDaemon, log: &WriteLog, t0: Instant, t1: Instant) {
    let end = read_export(&d.url, log.layout.size());
    must(
        "export after the writers stopped",
        check_source_complete(log, &end),
    );
    if let Ok(r) = verify_point_in_time(log, &end, t0, t1) {
        panic!("the disk as it is at the end passes as a copy from the window, so the check proves nothing: {r}");
    }
}

/// `blockdev-backup` sync=full under writes: the target must equal the disk at
/// one instant between the command and its reply, and the source keeps every write.
pub fn scenario_backup(d: &mut PitDaemon, o: &PitOpts) -> ScenarioReport {
    let (target, node, w) = setup(d, o, "backup", 1);
    let job = "pit-backup";
    let t0 = Instant::now();
    d.qmp.ok(
        "blockdev-backup",
        json!({"job-id": job, "device": d.node, "target": node, "sync": "full", "speed": o.speed}),
    );
    let t1 = Instant::now();
    let (_, done) = wait_job_event(d.qmp, job, "BLOCK_JOB_COMPLETED", o.timeout);
    let log = finish_writes(w, o.after, o.timeout);
    release_node(d.qmp, &node, o.timeout);
    let copy = read_image(&target, &o.target_format);
    let pit = must("backup target", verify_point_in_time(&log, &copy, t0, t1));
    check_export_and_teeth(d, &log, t0, t1);
    // Unless writes acknowledged during the copy are missing from the target,
    // it would equally pass as a copy taken at the end: copy-before-write
    // would not have been exercised.
    if let Ok(r) = verify_point_in_time(&log, &copy, done, done) {
        panic!("the backup target passes as a copy from the job's end too, so no write raced the copier: {r}");
    }
    ScenarioReport {
        name: "backup",
        pit: Some(pit),
        writes: log.writes.len(),
        during_job: log.sent_between(t1, done),
        job_time: done - t0,
    }
}

/// Starts a `blockdev-mirror` in `o.mirror_mode`, waits for READY, then for some
/// writes in READY (so they take the write-blocking path); returns the instant
/// of the start command.
fn mirror_to_ready(d: &mut PitDaemon, o: &PitOpts, w: &Writers, job: &str, node: &str) -> Instant {
    let start = Instant::now();
    d.qmp.ok(
        "blockdev-mirror",
        json!({
            "job-id": job, "device": d.node, "target": node, "sync": "full",
            "copy-mode": o.mirror_mode, "speed": o.speed,
        }),
    );
    wait_job_event(d.qmp, job, "BLOCK_JOB_READY", o.timeout);
    w.wait_acked(w.acked() + o.after / 2, o.timeout);
    start
}

/// Mirror to READY, then soft `block-job-cancel`: the target
/// must equal the disk at one instant between the cancel and BLOCK_JOB_COMPLETED.
pub fn scenario_mirror_cancel(d: &mut PitDaemon, o: &PitOpts) -> ScenarioReport {
    let (target, node, w) = setup(d, o, "mirror-cancel", 2);
    let job = "pit-mirror-cancel";
    let start = mirror_to_ready(d, o, &w, job, &node);
    let t0 = Instant::now();
    d.qmp.ok("block-job-cancel", json!({"device": job}));
    let (_, t1) = wait_job_event(d.qmp, job, "BLOCK_JOB_COMPLETED", o.timeout);
    let log = finish_writes(w, o.after, o.timeout);
    release_node(d.qmp, &node, o.timeout);
    let copy = read_image(&target, &o.target_format);
    let pit = must(
        "mirror target after a soft cancel",
        verify_point_in_time(&log, &copy, t0, t1),
    );
    check_export_and_teeth(d, &log, t0, t1);
    ScenarioReport {
        name: "mirror-cancel",
        pit: Some(pit),
        writes: log.writes.len(),
        during_job: log.sent_between(start, t1),
        job_time: t1 - start,
    }
}

/// Mirror to READY, then `block-job-complete`: the export moves
/// onto the target, which must then hold every acknowledged write (including
/// those before the pivot); the source file, when known, must be frozen at one
/// instant between the command and BLOCK_JOB_COMPLETED. Afterwards the export
/// serves the target node, so run this scenario last on a daemon.
pub fn scenario_mirror_complete(d: &mut PitDaemon, o: &PitOpts) -> ScenarioReport {
    let (target, node, w) = setup(d, o, "mirror-complete", 3);
    let job = "pit-mirror-complete";
    let start = mirror_to_ready(d, o, &w, job, &node);
    let t0 = Instant::now();
    d.qmp.ok("block-job-complete", json!({"device": job}));
    let (_, t1) = wait_job_event(d.qmp, job, "BLOCK_JOB_COMPLETED", o.timeout);
    // These writes reach the target only if the pivot moved the export onto
    // it; the writers' final flush puts its metadata in the file.
    let log = finish_writes(w, o.after, o.timeout);
    let copy = read_image(&target, &o.target_format);
    must(
        "mirror target after the pivot",
        check_source_complete(&log, &copy),
    );
    check_export_and_teeth(d, &log, t0, t1);
    let pit = d.source_file.as_ref().map(|(path, format)| {
        let src = read_image(path, format);
        must(
            "source left behind by the pivot",
            verify_point_in_time(&log, &src, t0, t1),
        )
    });
    ScenarioReport {
        name: "mirror-complete",
        pit,
        writes: log.writes.len(),
        during_job: log.sent_between(start, t1),
        job_time: t1 - start,
    }
}

/// How a READY mirror is ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorEnd {
    /// A soft `block-job-cancel`: the target is the disk at that instant.
    Cancel,
    /// `block-job-complete`: the export moves to the target.
    Complete,
}

/// Where a mirror's end is checked.
pub struct MirrorRig<'a> {
    /// The test's monitor.
    pub qmp: &'a mut Qmp,
    /// The export's NBD URL.
    pub url: &'a str,
    /// The job.
    pub job: &'a str,
    /// The target's node and its raw image file.
    pub target: (&'a str, &'a Path),
    /// The source's raw image file (checked after a pivot), if raw.
    pub source: Option<&'a Path>,
}

/// Ends the READY mirror with `end` while `w` writes, lets the writers go on
/// and stops them (no write may fail), then checks what the end left: after
/// a cancel the target is the disk at one instant between the command and
/// BLOCK_JOB_COMPLETED and the disk keeps every write; after a pivot the
/// export and the target keep every write and the old source is frozen at
/// one instant. Returns how long the end took.
pub fn end_mirror_checked(r: &mut MirrorRig, end: MirrorEnd, w: Writers) -> Duration {
    let before = w.acked();
    let t0 = Instant::now();
    let cmd = match end {
        MirrorEnd::Cancel => "block-job-cancel",
        MirrorEnd::Complete => "block-job-complete",
    };
    r.qmp.ok(cmd, json!({ "device": r.job }));
    let (_, t1) = wait_job_event(r.qmp, r.job, "BLOCK_JOB_COMPLETED", Duration::from_secs(60));
    let took = t1 - t0;
    w.wait_acked(w.acked() + 2000, Duration::from_secs(60));
    let log = w.stop();
    log.assert_no_failures();
    assert!(
        log.acked() as u64 > before,
        "the writers did not go on after the {cmd}"
    );
    assert!(
        log.sent_between(t0, t1) > 0 || took < Duration::from_millis(5),
        "the guest did not keep writing during the {cmd}"
    );
    let size = log.layout.size();
    let (node, target) = r.target;
    match end {
        MirrorEnd::Cancel => {
            release_node(r.qmp, node, Duration::from_secs(10));
            let copy = read_image(target, "raw");
            let p = verify_point_in_time(&log, &copy, t0, t1)
                .unwrap_or_else(|e| panic!("the target after the soft cancel: {e}"));
            eprintln!("  {cmd} ended in {took:?}; {p}");
            check_source_complete(&log, &read_export(r.url, size))
                .expect("the disk keeps every acknowledged write");
        }
        MirrorEnd::Complete => {
            check_source_complete(&log, &read_export(r.url, size))
                .expect("the pivoted disk keeps every acknowledged write");
            check_source_complete(&log, &read_image(target, "raw"))
                .expect("the target file holds every acknowledged write");
            if let Some(old) = r.source {
                let p = verify_point_in_time(&log, &read_image(old, "raw"), t0, t1)
                    .unwrap_or_else(|e| panic!("the source left behind by the pivot: {e}"));
                eprintln!("  {cmd} ended in {took:?}; the old source: {p}");
            }
        }
    }
    took
}
