//! Crash safety of qcow2 at the daemon level (issue 3, "Crash safety").
//!
//! A writer drives livesnapd over NBD — several connections, each with
//! several requests in flight — with writes (some FUA), write-zeroes, trims
//! and flushes; livesnapd is killed with SIGKILL at a random moment, then:
//! - `qemu-img check` must exit 0 or 3 (leaked clusters only), never 2;
//! - every block written before a flush that was acknowledged (or written with
//!   FUA and acknowledged) must read back exactly (`qemu-img convert` of the
//!   chain), and every other block must hold a version the writer wrote since
//!   the last durable one, its zero or trim state, or the backing pattern it
//!   started from: never anything else.
//!
//! - the image's persistent dirty bitmap (added before the first run, never
//!   cleared) is consistent and covers every block a request was answered
//!   for or that no longer holds its first state: livesnapd keeps it as a
//!   write-intent log, so a kill never loses tracking.
//!
//! Then livesnapd is restarted on the same image and the writer goes on: the
//! image accumulates history across kills, as a real host's would.
//!
//! Every block the writer writes describes itself (magic, guest offset,
//! generation, checksum), so a misplaced, torn or stale block is recognised
//! by content alone. The backing file of the COW case holds generation 0.
//! Requests never overlap at block granularity (they do share clusters and
//! L2 tables), so each block has a clear order of versions; a model keeps,
//! per block, what is durable (settled by a FUA reply, or by a flush reply
//! for everything answered before that flush was sent) and what came after.
//!
//! Where the kill lands: at a random moment (10 % in the first 15 ms), or
//! right after the first FUA or flush reply that follows (the edge where a
//! lost write shows), or at the end of a probe that races a FUA write with
//! an allocation in the same cluster during a flush (see `probe`).
//!
//! The random choices (operations, offsets, kill delays) come from a seed
//! printed at the start; `LIVESNAP_CRASH_SEED=<seed>` repeats them (timing
//! still varies) and `LIVESNAP_CRASH_ITERATIONS=<n>` changes the kill count.

use livesnap_testkit as harness;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{run, run_status, Livesnapd};
use livesnap_nbd::proto::{CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_TRIM};
use livesnap_nbd::{ClientError, NbdClient};

/// First 8 bytes of every block the writer writes ("lscrash!").
const MAGIC: u64 = 0x6c73_6372_6173_6821;
/// NBD connections per daemon run.
const CONNECTIONS: usize = 4;
/// Requests in flight per connection (one task each).
const DEPTH: usize = 4;

/// One test case: an image layout.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    /// Virtual size.
    size: u64,
    /// Granularity of the model: each block is self-describing and written
    /// whole, so it must not span two clusters.
    blk: u64,
    cluster: u64,
    refcount_bits: Option<u32>,
    /// Size of the raw backing file (holding generation 0), if any.
    backing: Option<u64>,
    iterations: u64,
}

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reads as zeroes.
    Zero,
    /// A self-describing block of this generation (0: the backing pattern).
    Data(u64),
}

/// One operation on a block since its last durable state.
#[derive(Clone, Copy, Debug)]
struct Entry {
    state: State,
    /// Request number.
    op: u64,
    /// A trim: may also leave the block as it was.
    trim: bool,
    /// Model clock when the reply arrived (None: no reply before the kill).
    acked: Option<u64>,
}

#[derive(Clone, Debug)]
struct Block {
    /// What the block may hold durably (one state, or two after a trim).
    floor: Vec<State>,
    /// Operations since then, in order; only the last may lack a reply,
    /// because requests on one block never overlap.
    log: Vec<Entry>,
    busy: bool,
    /// The last events on this block, for failure messages.
    hist: Vec<Ev>,
}

/// One event in a block's history.
#[derive(Clone, Copy)]
struct Ev {
    iteration: u64,
    what: &'static str,
    op: u64,
    state: State,
}

impl std::fmt::Debug for Ev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it{} {} #{} {:?}",
            self.iteration, self.what, self.op, self.state
        )
    }
}

impl Block {
    fn note(&mut self, iteration: u64, what: &'static str, op: u64, state: State) {
        if self.hist.len() >= 16 {
            self.hist.remove(0);
        }
        self.hist.push(Ev {
            iteration,
            what,
            op,
            state,
        });
    }

    /// Entry `k` (and so everything before it) is known durable.
    fn settle(&mut self, k: usize) {
        for e in self.log.drain(..=k) {
            if !e.trim {
                self.floor = vec![e.state];
            } else if !self.floor.contains(&State::Zero) {
                // A trim may leave the block as it was, or zero it.
                self.floor.push(State::Zero);
            }
        }
    }

    fn allowed(&self, s: State) -> bool {
        self.floor.contains(&s) || self.log.iter().any(|e| e.state == s)
    }
}

/// When an iteration kills the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    Random,
    OnAck,
    Probe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Write,
    Zero,
    Trim,
}

#[derive(Default, Debug)]
struct Stats {
    writes: u64,
    fua_writes: u64,
    zeroes: u64,
    trims: u64,
    flushes: u64,
    unanswered: u64,
    leaky_checks: u64,
    /// Times the header pointed at a new refcount table after a kill.
    reftable_moves: u64,
    /// Largest dirty share of the bitmap beyond the blocks written, in
    /// bytes (the write-intent regions' over-approximation).
    bitmap_over: u64,
}

/// What the writer knows about the disk; shared by all its tasks.
struct Model {
    blocks: Vec<Block>,
    clock: u64,
    next_gen: u64,
    iteration: u64,
    stats: Stats,
    /// Error replies from the server (a live server must never send one here).
    errors: Vec<String>,
    /// Blocks any request was answered for (what the bitmap must cover,
    /// with every block that no longer holds its first state).
    touched: Vec<bool>,
}

impl Model {
    fn new(case: &Case) -> Model {
        let n = case.size / case.blk;
        let blocks: Vec<Block> = (0..n)
            .map(|i| {
                let base = matches!(case.backing, Some(b) if (i + 1) * case.blk <= b);
                Block {
                    floor: vec![if base { State::Data(0) } else { State::Zero }],
                    log: Vec::new(),
                    busy: false,
                    hist: Vec::new(),
                }
            })
            .collect();
        Model {
            touched: vec![false; blocks.len()],
            blocks,
            clock: 0,
            next_gen: 1,
            iteration: 0,
            stats: Stats::default(),
            errors: Vec::new(),
        }
    }

    /// Claims blocks `[first, first + n)` for one request and records what it
    /// will leave there; None if another request holds one of them.
    fn begin(&mut self, first: usize, n: usize, op: Op) -> Option<u64> {
        if self.blocks[first..first + n].iter().any(|b| b.busy) {
            return None;
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        self.clock += 1;
        let state = match op {
            Op::Write => State::Data(gen),
            Op::Zero | Op::Trim => State::Zero,
        };
        let what = match op {
            Op::Write => "write",
            Op::Zero => "zero",
            Op::Trim => "trim",
        };
        for b in &mut self.blocks[first..first + n] {
            b.busy = true;
            b.log.push(Entry {
                state,
                op: gen,
                trim: op == Op::Trim,
                acked: None,
            });
            b.note(self.iteration, what, gen, state);
        }
        Some(gen)
    }

    /// The request on `[first, first + n)` was answered with success.
    fn finish(&mut self, first: usize, n: usize, op: Op, fua: bool) {
        self.touched[first..first + n].fill(true);
        self.clock += 1;
        let now = self.clock;
        for b in &mut self.blocks[first..first + n] {
            let k = b.log.len() - 1;
            b.log[k].acked = Some(now);
            b.busy = false;
            let e = b.log[k];
            b.note(
                self.iteration,
                if fua { "ack+fua" } else { "ack" },
                e.op,
                e.state,
            );
            if fua {
                b.settle(k);
            }
        }
        match op {
            Op::Write if fua => self.stats.fua_writes += 1,
            Op::Write => self.stats.writes += 1,
            Op::Zero => self.stats.zeroes += 1,
            Op::Trim => self.stats.trims += 1,
        }
    }

    /// A flush is about to be sent: returns its send time.
    fn flush_sent(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The flush sent at `sent` succeeded: everything answered before is durable.
    fn flush_done(&mut self, sent: u64) {
        self.stats.flushes += 1;
        for b in &mut self.blocks {
            let last = b
                .log
                .iter()
                .rposition(|e| matches!(e.acked, Some(a) if a < sent));
            if let Some(k) = last {
                let e = b.log[k];
                b.note(self.iteration, "flushed", e.op, e.state);
                b.settle(k);
            }
        }
    }
}

/// Deterministic random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Checksum of a block header (offset and generation).
fn header_sum(off: u64, gen: u64) -> u64 {
    let mut r = Rng(off.rotate_left(17) ^ gen ^ MAGIC);
    r.next()
}

/// Fills `b` with the block of generation `gen` at guest offset `off`:
/// magic, offset, generation, header checksum, then filler derived from
/// them (a 32-byte unit repeated, built with a few copies: cheap even in
/// an unoptimised test build).
fn fill_block(b: &mut [u8], off: u64, gen: u64) {
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&off.to_le_bytes());
    b[16..24].copy_from_slice(&gen.to_le_bytes());
    b[24..32].copy_from_slice(&header_sum(off, gen).to_le_bytes());
    let mut r = Rng(off ^ gen.rotate_left(32));
    for i in 0..4 {
        b[32 + 8 * i..40 + 8 * i].copy_from_slice(&r.next().to_le_bytes());
    }
    let mut have = 32;
    while 32 + have < b.len() {
        let n = have.min(b.len() - 32 - have);
        b.copy_within(32..32 + n, 32 + have);
        have += n;
    }
}

/// What the block `b` read at guest offset `off` holds, or why it is garbage.
fn decode(b: &[u8], off: u64) -> Result<State, String> {
    static ZEROES: [u8; 4096] = [0; 4096];
    if b == &ZEROES[..b.len()] {
        return Ok(State::Zero);
    }
    let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    if word(0) != MAGIC || word(3) != header_sum(word(1), word(2)) {
        return Err(format!("no valid header (first bytes {:02x?})", &b[..32]));
    }
    let (boff, gen) = (word(1), word(2));
    let mut want = vec![0u8; b.len()];
    fill_block(&mut want, boff, gen);
    if b != want {
        let i = (0..b.len()).find(|&i| b[i] != want[i]).unwrap_or(0);
        return Err(format!(
            "torn block: header of generation {gen} at offset {boff:#x}, contents differ \
             from byte {i}"
        ));
    }
    if boff != off {
        return Err(format!(
            "misplaced block: generation {gen} written at offset {boff:#x}"
        ));
    }
    Ok(State::Data(gen))
}

fn seed_from_env() -> u64 {
    match std::env::var("LIVESNAP_CRASH_SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            v.unwrap_or_else(|_| panic!("LIVESNAP_CRASH_SEED={s:?} is not a number"))
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

fn iterations(default: u64) -> u64 {
    std::env::var("LIVESNAP_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Shared by the writer tasks of one daemon run.
struct Writer {
    model: Mutex<Model>,
    case: Case,
    /// The daemon's pid, for a kill right after an acknowledgement.
    pid: i32,
    /// Set: the next FUA or flush reply kills the daemon at once.
    armed: AtomicBool,
    killed: AtomicBool,
    /// Set: the random workers stop sending.
    pause: AtomicBool,
}

impl Writer {
    /// Called right after a reply that made something durable was recorded:
    /// kills the daemon if armed, so the check runs exactly at that edge.
    fn kill_if_armed(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            // SAFETY: kill(2) on our own child, which nobody has reaped yet.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.killed.store(true, Ordering::SeqCst);
        }
    }

    /// A range of blocks for `op`: a quarter of the writes go next to the
    /// task's previous request (into a cluster it may just have allocated),
    /// the rest half into a small hot window (so requests meet in the same
    /// clusters and L2 tables), half anywhere.
    fn pick(&self, rng: &mut Rng, op: Op, hot: usize, recent: usize) -> (usize, usize) {
        let c = &self.case;
        let blocks = (c.size / c.blk) as usize;
        let per_cluster = (c.cluster / c.blk).max(1) as usize;
        let hot_len = 8 * per_cluster;
        if op == Op::Write && rng.chance(25) {
            let first = recent - recent % per_cluster + rng.below(per_cluster as u64) as usize;
            let n = 1 + rng.below(4) as usize;
            return (first, n.min(blocks - first));
        }
        let mut first = if rng.chance(50) {
            (hot + rng.below(hot_len as u64) as usize) % blocks
        } else {
            rng.below(blocks as u64) as usize
        };
        let n = match op {
            Op::Write => match rng.below(10) {
                0..=5 => 1 + rng.below(4) as usize,
                6..=8 => 1 + rng.below(2 * per_cluster as u64) as usize,
                _ => 1 + rng.below((256 << 10) / c.blk) as usize,
            },
            Op::Zero | Op::Trim => {
                if rng.chance(60) {
                    first -= first % per_cluster;
                    per_cluster * (1 + rng.below(4) as usize)
                } else {
                    1 + rng.below(2 * per_cluster as u64) as usize
                }
            }
        };
        (first, n.min(blocks - first))
    }

    fn failed(&self, what: String) {
        self.model.lock().unwrap().errors.push(what);
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// Answered with success.
    Done,
    /// Another request holds one of the blocks: nothing was sent.
    Busy,
    /// The connection died (the daemon was killed), or an error reply was
    /// recorded in the model.
    Dead,
}

/// Sends one request (`flags`: FUA, NO_HOLE) and records it in the model.
async fn send(w: &Writer, client: &NbdClient, op: Op, first: usize, n: usize, flags: u16) -> Sent {
    let blk = w.case.blk;
    let fua = flags & CMD_FLAG_FUA != 0;
    let Some(gen) = w.model.lock().unwrap().begin(first, n, op) else {
        return Sent::Busy;
    };
    let (off, len) = (first as u64 * blk, n as u64 * blk);
    let r = match op {
        Op::Write => {
            let mut buf = vec![0u8; len as usize];
            for (i, b) in buf.chunks_exact_mut(blk as usize).enumerate() {
                fill_block(b, off + i as u64 * blk, gen);
            }
            client.write(off, &buf, fua).await
        }
        Op::Zero => client.write_zeroes(off, len as u32, flags).await,
        Op::Trim => match client.request(CMD_TRIM, flags, off, len as u32, None).await {
            Ok(r) if r.error != 0 => Err(ClientError::Nbd {
                code: r.error,
                message: r.message.unwrap_or_default(),
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(ClientError::Io(e)),
        },
    };
    match r {
        Ok(()) => {
            w.model.lock().unwrap().finish(first, n, op, fua);
            Sent::Done
        }
        // The daemon was killed: this request may or may not have landed.
        Err(ClientError::Io(_)) => Sent::Dead,
        Err(e) => {
            w.failed(format!("{op:?} at {off:#x}+{len:#x}: {e}"));
            Sent::Dead
        }
    }
}

/// Sends a flush and records it in the model; false if the connection died.
async fn flush(w: &Writer, client: &NbdClient) -> bool {
    let sent = w.model.lock().unwrap().flush_sent();
    match client.flush().await {
        Ok(()) => {
            w.model.lock().unwrap().flush_done(sent);
            true
        }
        Err(ClientError::Io(_)) => false,
        Err(e) => {
            w.failed(format!("flush: {e}"));
            false
        }
    }
}

/// One task: requests one after another (the other tasks on the same
/// connection keep it pipelined) until the connection dies or the writer
/// is paused.
async fn worker(w: Arc<Writer>, client: Arc<NbdClient>, mut rng: Rng, hot: usize) {
    let mut recent = hot;
    while !w.pause.load(Ordering::SeqCst) {
        let roll = rng.below(100);
        if roll < 5 {
            if !flush(&w, &client).await {
                return;
            }
            w.kill_if_armed();
            continue;
        }
        let op = match roll {
            0..=69 => Op::Write,
            70..=84 => Op::Zero,
            _ => Op::Trim,
        };
        let fua = rng.chance(if op == Op::Write { 25 } else { 10 });
        let mut flags = if fua { CMD_FLAG_FUA } else { 0 };
        if op == Op::Zero && rng.chance(30) {
            flags |= CMD_FLAG_NO_HOLE;
        }
        let (first, n) = w.pick(&mut rng, op, hot, recent);
        recent = first;
        match send(&w, &client, op, first, n, flags).await {
            Sent::Done if fua => w.kill_if_armed(),
            Sent::Done => {}
            Sent::Busy => tokio::task::yield_now().await,
            Sent::Dead => return,
        }
    }
}

/// A kill at a known edge (the random workers stopped): a flush writing
/// metadata back, a write allocating a cluster while the flush holds the
/// metadata, and a FUA write into another block of that cluster, which waits
/// for the allocation and then goes in place. The daemon dies the moment the
/// FUA write is answered; that write must be on disk, so the new cluster's
/// L2 entry must be too. Returns whether the kill happened.
async fn probe(w: &Writer, clients: &[Arc<NbdClient>], rng: &mut Rng) -> bool {
    let per = (w.case.cluster / w.case.blk) as usize;
    let clusters = (w.case.size / w.case.cluster) as usize;
    let a = rng.below(clusters as u64) as usize;
    let b = (a + 1 + rng.below(clusters as u64 - 1) as usize) % clusters;
    // Both clusters read as zeroes without data (trimmed), and all is clean.
    for c in [a, b] {
        if send(w, &clients[0], Op::Trim, c * per, per, CMD_FLAG_FUA).await != Sent::Done {
            return false;
        }
    }
    if !flush(w, &clients[0]).await {
        return false;
    }
    // Dirty metadata for the flush to write back: one new cluster.
    let d = b * per + rng.below(per as u64) as usize;
    if send(w, &clients[0], Op::Write, d, 1, 0).await != Sent::Done {
        return false;
    }
    let x = a * per + rng.below(per as u64) as usize;
    let mut y = a * per + rng.below(per as u64 - 1) as usize;
    if y >= x {
        y += 1;
    }
    w.armed.store(true, Ordering::SeqCst);
    let fua_write = async {
        if send(w, &clients[2], Op::Write, y, 1, CMD_FLAG_FUA).await == Sent::Done {
            w.kill_if_armed();
        }
    };
    tokio::join!(
        flush(w, &clients[0]),
        send(w, &clients[1], Op::Write, x, 1, 0),
        fua_write
    );
    w.killed.load(Ordering::SeqCst)
}

/// Reads the chain with QEMU and checks every block against the model; then
/// makes what QEMU read the new durable state (the image is at rest until
/// the next daemon opens it).
fn verify(case: &Case, img: &Path, dir: &Path, model: &mut Model, ctx: &str) {
    let (st, out, err) =
        run_status(Command::new("qemu-img").args(["check", "-f", "qcow2", img.to_str().unwrap()]));
    match st.code() {
        Some(0) => {}
        Some(3) => model.stats.leaky_checks += 1,
        _ => panic!("{ctx}: qemu-img check: {st} (2 = corruption):\n{err}{out}"),
    }
    let raw = dir.join("view.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]));
    let data = std::fs::read(&raw).unwrap();
    assert_eq!(data.len() as u64, case.size, "{ctx}: converted size");
    let mut bad = Vec::new();
    for (i, b) in model.blocks.iter_mut().enumerate() {
        let off = i as u64 * case.blk;
        let bytes = &data[off as usize..(off + case.blk) as usize];
        let first = match case.backing {
            Some(base) if off + case.blk <= base => State::Data(0),
            _ => State::Zero,
        };
        if decode(bytes, off) != Ok(first) {
            model.touched[i] = true;
        }
        match decode(bytes, off) {
            Ok(s) if b.allowed(s) => {
                if !b.log.is_empty() || b.floor != [s] {
                    b.note(model.iteration, "seen", 0, s);
                }
                b.floor = vec![s];
                b.log.clear();
                b.busy = false;
            }
            got => {
                let durable = b.log.is_empty();
                bad.push(format!(
                    "block {off:#x}: holds {got:?}; allowed: durable {:?}, since then {:?}{}\n  history: {:?}",
                    b.floor,
                    b.log,
                    if durable { " (its durable state was lost)" } else { "" },
                    b.hist
                ))
            }
        }
    }
    let _ = std::fs::remove_file(&raw);
    check_bitmap(case, img, model, ctx);
    assert!(
        bad.is_empty(),
        "{ctx}: {} blocks read back wrong (first 20):\n{}",
        bad.len(),
        bad[..bad.len().min(20)].join("\n")
    );
}

/// The persistent bitmap must have come through the kill consistent and
/// covering every block that was written: answered, or found changed
/// (read with livesnap's engine: QEMU, by design, calls a bitmap left in
/// use inconsistent).
fn check_bitmap(case: &Case, img: &Path, model: &mut Model, ctx: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let node = rt.block_on(harness::block::qcow2_node(img, None, true));
    let info = node.bitmaps().infos();
    assert!(
        info.len() == 1 && !info[0].inconsistent,
        "{ctx}: bitmap after the kill: {info:?}"
    );
    let bits = node.bitmaps().get(BITMAP).unwrap().content();
    let missed: Vec<u64> = (0..model.touched.len() as u64)
        .filter(|&i| model.touched[i as usize] && !bits.all(i * case.blk, case.blk))
        .map(|i| i * case.blk)
        .collect();
    assert!(
        missed.is_empty(),
        "{ctx}: the bitmap misses {} written blocks, first at {:#x?}",
        missed.len(),
        &missed[..missed.len().min(10)]
    );
    let written = model.touched.iter().filter(|t| **t).count() as u64 * case.blk;
    model.stats.bitmap_over = model
        .stats
        .bitmap_over
        .max(bits.dirty_bytes().saturating_sub(written));
}

/// The persistent bitmap every case's image carries.
const BITMAP: &str = "crash";

/// Offset and cluster count of the refcount table, from the qcow2 header.
fn reftable_of(img: &Path) -> (u64, u32) {
    let h = std::fs::read(img).unwrap();
    (
        u64::from_be_bytes(h[48..56].try_into().unwrap()),
        u32::from_be_bytes(h[56..60].try_into().unwrap()),
    )
}

fn create_images(case: &Case, dir: &Path) -> std::path::PathBuf {
    let img = dir.join("top.qcow2");
    let mut opts = format!("cluster_size={}", case.cluster);
    if let Some(bits) = case.refcount_bits {
        opts += &format!(",refcount_bits={bits}");
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-o", &opts]);
    if let Some(bsize) = case.backing {
        let base = dir.join("base.raw");
        let mut data = vec![0u8; bsize as usize];
        for (i, b) in data.chunks_exact_mut(case.blk as usize).enumerate() {
            fill_block(b, i as u64 * case.blk, 0);
        }
        std::fs::write(&base, data).unwrap();
        cmd.args(["-b", "base.raw", "-F", "raw"]);
    }
    cmd.arg(&img).arg(case.size.to_string());
    run(&mut cmd);
    run(Command::new("qemu-img").args(["bitmap", "--add", img.to_str().unwrap(), BITMAP]));
    img
}

fn crash_case(case: Case) {
    let base_seed = seed_from_env();
    eprintln!(
        "{}: seed {base_seed} (LIVESNAP_CRASH_SEED={base_seed} repeats the random choices)",
        case.name
    );
    let salt = case
        .name
        .bytes()
        .fold(0u64, |h, c| h.rotate_left(8) ^ c as u64);
    let mut rng = Rng(base_seed ^ salt);
    let iterations = iterations(case.iterations);
    let tmp = tempfile::tempdir().unwrap();
    let img = create_images(&case, tmp.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut model = Model::new(&case);
    let mut reftable = reftable_of(&img);
    let started = Instant::now();
    let mut delays = Vec::new();
    let mut kills_on_ack = 0;
    let mut kills_probe = 0;
    for it in 0..iterations {
        let ctx = format!(
            "{} iteration {it} (LIVESNAP_CRASH_SEED={base_seed})",
            case.name
        );
        model.iteration = it;
        let mut d = Livesnapd::with_image(&img, &["--format", "qcow2"]);
        let addr = format!("unix:{}", d.dir.path().join("nbd.sock").display());
        let writer = Arc::new(Writer {
            model: Mutex::new(std::mem::replace(&mut model, Model::new(&case))),
            case,
            pid: d.pid() as i32,
            armed: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            pause: AtomicBool::new(false),
        });
        // Mostly mid-run kills; now and then one right after the start.
        let delay = if rng.chance(10) {
            rng.below(15)
        } else {
            15 + rng.below(200)
        };
        delays.push(delay);
        // Kills land at a random moment, or right after the first FUA or
        // flush reply that follows it (where a lost write shows), or at the
        // end of a probe (see `probe`; it needs two blocks per cluster).
        let mode = match rng.below(10) {
            0..=3 => Kill::Random,
            4..=6 => Kill::OnAck,
            _ if case.cluster > case.blk => Kill::Probe,
            _ => Kill::OnAck,
        };
        let hot = rng.below(case.size / case.blk) as usize;
        let task_seeds: Vec<u64> = (0..CONNECTIONS * DEPTH).map(|_| rng.next()).collect();
        rt.block_on(async {
            let mut tasks = Vec::new();
            let mut clients = Vec::new();
            for c in 0..CONNECTIONS {
                let client = Arc::new(
                    NbdClient::connect(&addr, "disk")
                        .await
                        .unwrap_or_else(|e| panic!("{ctx}: NBD connect: {e}")),
                );
                clients.push(client.clone());
                for t in 0..DEPTH {
                    tasks.push(tokio::spawn(worker(
                        writer.clone(),
                        client.clone(),
                        Rng(task_seeds[c * DEPTH + t]),
                        hot,
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(delay)).await;
            assert!(d.is_running(), "{ctx}: livesnapd exited on its own");
            match mode {
                Kill::Random => {}
                Kill::OnAck => {
                    writer.armed.store(true, Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while !writer.killed.load(Ordering::SeqCst) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    writer.armed.store(false, Ordering::SeqCst);
                    if writer.killed.load(Ordering::SeqCst) {
                        kills_on_ack += 1;
                    }
                }
                Kill::Probe => {
                    writer.pause.store(true, Ordering::SeqCst);
                    for t in tasks.drain(..) {
                        tokio::time::timeout(Duration::from_secs(20), t)
                            .await
                            .unwrap_or_else(|_| panic!("{ctx}: writer task hangs"))
                            .unwrap();
                    }
                    assert!(
                        probe(&writer, &clients, &mut rng).await,
                        "{ctx}: the probe did not get its FUA write answered"
                    );
                    kills_probe += 1;
                }
            }
            // Reaps the child (after sending SIGKILL again if it still runs).
            let st = d.stop_with(libc::SIGKILL);
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&st),
                Some(libc::SIGKILL),
                "{ctx}: livesnapd exit status {st}"
            );
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(20), t)
                    .await
                    .unwrap_or_else(|_| panic!("{ctx}: writer task hangs after the kill"))
                    .unwrap();
            }
        });
        model = Arc::into_inner(writer)
            .expect("writer tasks are done")
            .model
            .into_inner()
            .unwrap();
        assert!(
            model.errors.is_empty(),
            "{ctx}: livesnapd answered with errors: {:?}",
            model.errors
        );
        model.stats.unanswered += model
            .blocks
            .iter()
            .filter(|b| b.log.last().is_some_and(|e| e.acked.is_none()))
            .count() as u64;
        verify(&case, &img, tmp.path(), &mut model, &ctx);
        let now = reftable_of(&img);
        if now != reftable {
            model.stats.reftable_moves += 1;
            reftable = now;
        }
    }
    let s = &model.stats;
    eprintln!(
        "{}: {iterations} kills in {:.1?} (delays {}..{} ms, {kills_on_ack} right after a \
         FUA or flush reply, {kills_probe} at the end of a probe); answered: {} writes, {} FUA \
         writes, {} write-zeroes, {} trims, {} flushes; {} blocks had a request in \
         flight at a kill; the refcount table moved {} times; qemu-img check found leaks \
         after {} kills, corruption never; the bitmap missed no write, over by at most {} KiB",
        case.name,
        started.elapsed(),
        delays.iter().min().unwrap_or(&0),
        delays.iter().max().unwrap_or(&0),
        s.writes,
        s.fua_writes,
        s.zeroes,
        s.trims,
        s.flushes,
        s.unanswered,
        s.reftable_moves,
        s.leaky_checks,
        s.bitmap_over >> 10,
    );
    // The test means nothing if the writer hardly got anything done.
    assert!(
        s.writes + s.fua_writes >= iterations * 20 && s.flushes >= iterations,
        "{}: the writer hardly ran: {s:?}",
        case.name
    );
    let (st, out, err) = run_status(Command::new("qemu-img").args([
        "info",
        "--backing-chain",
        img.to_str().unwrap(),
    ]));
    assert!(st.success(), "qemu-img info: {out}{err}");
}

/// (a) A fresh qcow2 (64 KiB clusters, no backing file): first allocations
/// of L2 tables and data clusters, later in-place writes, zero clusters and
/// discards that free clusters for reuse.
#[test]
fn kill9_fresh_qcow2() {
    crash_case(Case {
        name: "fresh",
        size: 32 << 20,
        blk: 4096,
        cluster: 64 << 10,
        refcount_bits: None,
        backing: None,
        iterations: 40,
    });
}

/// (b) A qcow2 over a raw backing file holding a known pattern (generation
/// 0) on its first 24 MiB: 4 KiB writes into 64 KiB clusters copy the rest
/// of the cluster from the backing file.
#[test]
fn kill9_qcow2_over_raw_backing_cow() {
    crash_case(Case {
        name: "backing-cow",
        size: 32 << 20,
        blk: 4096,
        cluster: 64 << 10,
        refcount_bits: None,
        backing: Some(24 << 20),
        iterations: 40,
    });
}

/// (c) 4 KiB clusters with 64-bit refcounts (one refcount block covers only
/// 2 MiB of file): many allocations, new L2 tables and new refcount blocks.
#[test]
fn kill9_qcow2_4k_clusters() {
    crash_case(Case {
        name: "4k-clusters",
        size: 32 << 20,
        blk: 4096,
        cluster: 4096,
        refcount_bits: Some(64),
        backing: None,
        iterations: 40,
    });
}

/// (d) 512-byte clusters with 64-bit refcounts: a refcount block covers 32
/// KiB of file and the first refcount table 2 MiB, so the table itself is
/// replaced (grown) several times across the kills.
#[test]
fn kill9_qcow2_512_clusters_reftable_growth() {
    crash_case(Case {
        name: "512-clusters",
        size: 8 << 20,
        blk: 512,
        cluster: 512,
        refcount_bits: Some(64),
        backing: None,
        iterations: 40,
    });
}
