//! Harnesses that feed arbitrary bytes to livesnap's parsers, shared by the
//! cargo-fuzz targets (`fuzz/`, run by hand) and the property tests of the
//! normal suite, so both exercise exactly the same code.
//!
//! Each harness returns normally for any input: a parser that panics, hangs
//! or allocates without bound is the bug they exist to find. Where a
//! property holds for every input (a stream split anywhere gives the same
//! messages), the harness asserts it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use livesnap_block::driver::IoFuture;
use livesnap_block::{
    BlockBackend, BlockDriver, BlockNode, BlockStatus, IoBuf, Qcow2Driver, WriteFlags, ZeroFlags,
};
use livesnap_nbd::proto::*;
use livesnap_nbd::{serve_stream, ExportConfig, ExportTable};
use livesnap_qmp::{Args, JsonStream, Message};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of the NBD harness's export.
const EXPORT_SIZE: usize = 1 << 20;
/// Name of the NBD harness's export.
pub const EXPORT_NAME: &str = "fuzz";
/// Most block-status extents and reads the qcow2 harness walks.
const WALK_STEPS: usize = 64;
/// Most bytes read from one extent by the qcow2 harness.
const WALK_READ: u64 = 64 << 10;

/// The committed inputs of fuzz target `target`, sorted by path: its seed
/// corpus (`fuzz/seeds/TARGET`) and the fuzzer findings kept as regression
/// inputs (`fuzz/regressions/TARGET`).
pub fn committed_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files: Vec<PathBuf> = ["seeds", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(fuzz.join(kind).join(target)).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RT.with(|rt| rt.block_on(f))
}

/// A disk image held in memory: reads past the end give zeroes (as a
/// file's do when a table is padded), writes grow it.
pub struct MemDriver {
    data: Mutex<Vec<u8>>,
}

impl MemDriver {
    /// An image holding `data`.
    pub fn new(data: Vec<u8>) -> MemDriver {
        MemDriver {
            data: Mutex::new(data),
        }
    }

    /// The image as a node (`read_only` as given).
    pub fn node(data: Vec<u8>, read_only: bool) -> Arc<BlockNode> {
        BlockNode::new("mem", Box::new(MemDriver::new(data)), read_only, false)
    }
}

/// Most bytes a [`MemDriver`] grows to: a small disk, so that a write a
/// corrupt image sends far away fails (ENOSPC) instead of exhausting memory.
const MEM_MAX: u64 = 256 << 20;

fn range(offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= MEM_MAX)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
    Ok(offset as usize..end as usize)
}

impl BlockDriver for MemDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn filename(&self) -> String {
        "mem".into()
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let data = self.data.lock().unwrap();
            buf.fill(0);
            let start = offset.min(data.len() as u64) as usize;
            let end = offset
                .saturating_add(buf.len() as u64)
                .min(data.len() as u64) as usize;
            if start < end {
                buf[..end - start].copy_from_slice(&data[start..end]);
            }
            Ok(buf)
        })
    }
    fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = range(offset, buf.len() as u64)?;
            let mut data = self.data.lock().unwrap();
            if data.len() < r.end {
                data.resize(r.end, 0);
            }
            data[r].copy_from_slice(&buf);
            Ok(())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = range(offset, len)?;
            let mut data = self.data.lock().unwrap();
            let end = r.end.min(data.len());
            if r.start < end {
                data[r.start..end].fill(0);
            }
            Ok(())
        })
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            Ok(BlockStatus {
                len: len.min(self.size().saturating_sub(offset)).max(1),
                data: true,
                zero: false,
                depth: 1,
            })
        })
    }
    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = range(0, len)?;
            self.data.lock().unwrap().resize(r.end, 0);
            Ok(())
        })
    }
}

// ---- QMP ---------------------------------------------------------------------------

/// Feeds `input` to a QMP stream splitter whole and split at a point taken
/// from the input itself: both must give the same messages.
pub fn qmp_stream(input: &[u8]) -> Vec<Message> {
    let mut whole = Vec::new();
    JsonStream::new().feed(input, &mut whole);
    let split = input.first().map_or(0, |&b| b as usize % (input.len() + 1));
    let mut parts = Vec::new();
    let mut s = JsonStream::new();
    s.feed(&input[..split], &mut parts);
    s.feed(&input[split..], &mut parts);
    assert_eq!(
        whole.len(),
        parts.len(),
        "splitting at {split} changed the messages"
    );
    for (a, b) in whole.iter().zip(&parts) {
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "split at {split}"),
            (Err(a), Err(b)) => assert_eq!(a.desc, b.desc, "split at {split}"),
            _ => panic!("split at {split}: {a:?} vs {b:?}"),
        }
    }
    whole
}

/// Splits `input` into messages and runs every object, and the `arguments`
/// of every command, through the argument decoder ([`qmp_args`]).
pub fn qmp_commands(input: &[u8]) {
    let mut msgs = Vec::new();
    JsonStream::new().feed(input, &mut msgs);
    for m in msgs {
        if let Ok(Value::Object(o)) = m {
            if let Some(Value::Object(a)) = o.get("arguments") {
                qmp_args(a.clone());
            }
            qmp_args(o);
        }
    }
}

/// Reads every member of `map` with each of the argument decoder's typed
/// getters, recursing into objects and lists, then checks for leftovers
/// with [`Args::finish`] (QEMU's hash order for the first unexpected member).
pub fn qmp_args(map: Map<String, Value>) {
    let keys: Vec<String> = map.keys().cloned().collect();
    let _ = Args::new(map.clone()).finish();
    for (i, key) in keys.iter().enumerate() {
        let mut a = Args::new(map.clone());
        let _ = a.req_str(key);
        let _ = Args::new(map.clone()).req_bool(key);
        let _ = Args::new(map.clone()).req_i64(key);
        let _ = Args::new(map.clone()).req_u64(key);
        let _ = Args::new(map.clone()).req_u32(key);
        let _ = Args::new(map.clone()).req_f64(key);
        let _ = Args::new(map.clone()).req_enum(key, &["on", "off", "auto"]);
        if let Ok(Some(mut inner)) = Args::new(map.clone()).opt_object(key) {
            for k in &keys {
                let _ = inner.opt_str(k);
            }
            let _ = inner.finish();
        }
        if let Ok(Some(list)) = Args::new(map.clone()).opt_list(key) {
            for e in list {
                let _ = e.path().len();
                if let Ok(mut o) = e.into_object() {
                    let _ = o.opt_u32(key);
                    let _ = o.finish();
                }
            }
        }
        // Read some members, leave the others for finish to report.
        let mut a = Args::new(map.clone());
        for k in keys.iter().step_by(i + 1) {
            let _ = a.opt_u64(k);
        }
        let _ = a.finish();
    }
}

// ---- NBD ---------------------------------------------------------------------------

/// Client bytes that negotiate structured replies, `base:allocation` and
/// the harness's export, ready for transmission (what `qemu-img` sends).
pub fn nbd_handshake() -> Vec<u8> {
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    b.extend_from_slice(&encode_option_header(OPT_STRUCTURED_REPLY, 0));
    let name = EXPORT_NAME.as_bytes();
    let query = b"base:allocation";
    let mut meta = Vec::new();
    meta.extend_from_slice(&(name.len() as u32).to_be_bytes());
    meta.extend_from_slice(name);
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(query.len() as u32).to_be_bytes());
    meta.extend_from_slice(query);
    b.extend_from_slice(&encode_option_header(
        OPT_SET_META_CONTEXT,
        meta.len() as u32,
    ));
    b.extend_from_slice(&meta);
    let mut go = Vec::new();
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&encode_option_header(OPT_GO, go.len() as u32));
    b.extend_from_slice(&go);
    b
}

/// Runs one NBD server connection on `input` as everything the client
/// sends (client flags, options, then requests), against a writable 1 MiB
/// export named [`EXPORT_NAME`]; returns what the server sent.
pub fn nbd_session(input: &[u8]) -> Vec<u8> {
    let input = input.to_vec();
    block_on(async move {
        let table = ExportTable::new();
        table
            .add(ExportConfig {
                name: EXPORT_NAME.into(),
                description: Some("fuzz".into()),
                backend: BlockBackend::new(MemDriver::node(vec![0; EXPORT_SIZE], false)),
                writable: true,
                allocation_depth: true,
                bitmaps: Vec::new(),
            })
            .expect("export");
        let (client, server) = tokio::io::duplex(64 << 10);
        let (sr, sw) = tokio::io::split(server);
        let serve = tokio::spawn(serve_stream(sr, sw, table));
        let (mut cr, mut cw) = tokio::io::split(client);
        let write = async move {
            // The server may hang up early: the rest of the input is moot.
            let _ = cw.write_all(&input).await;
            let _ = cw.shutdown().await;
        };
        let read = async move {
            let mut out = Vec::new();
            let _ = cr.read_to_end(&mut out).await;
            out
        };
        let ((), out) = tokio::join!(write, read);
        serve.await.expect("NBD connection task panicked");
        out
    })
}

/// [`nbd_session`] with `requests` sent after [`nbd_handshake`].
pub fn nbd_requests(requests: &[u8]) -> Vec<u8> {
    let mut input = nbd_handshake();
    input.extend_from_slice(requests);
    nbd_session(&input)
}

// ---- qcow2 -------------------------------------------------------------------------

/// Opens `image` as a read-only qcow2 image in memory (header, extensions,
/// L1 and refcount tables, bitmap directory and tables), then walks it:
/// block status and reads through the L2 tables, a bounded number of steps.
/// Then opens a copy writable (the checks only a writer makes) and writes
/// at both ends of the disk and flushes, which reads and updates refcount
/// blocks and L2 tables. Returns (the read-only open succeeded, both
/// writes and the flush succeeded).
pub fn qcow2_image(image: &[u8]) -> (bool, bool) {
    (qcow2_read(image.to_vec()), qcow2_write(image.to_vec()))
}

fn qcow2_write(image: Vec<u8>) -> bool {
    block_on(async move {
        let file = MemDriver::node(image, false);
        let Ok(q) = Qcow2Driver::open(file, None, false).await else {
            return false;
        };
        let node = BlockNode::new("fuzz-qcow2-rw", Box::new(q), false, false);
        let size = node.size();
        let len = size.min(4096);
        let mut ok = true;
        for off in [0, size - len] {
            let data = IoBuf::from_slice(&vec![0x5a; len as usize]);
            ok = ok && node.write(off, data, WriteFlags::default()).await.is_ok();
        }
        ok = ok && node.flush().await.is_ok();
        node.close().await;
        ok
    })
}

fn qcow2_read(image: Vec<u8>) -> bool {
    block_on(async move {
        let file = MemDriver::node(image, true);
        let Ok(q) = Qcow2Driver::open(file, None, true).await else {
            return false;
        };
        let _ = q.info();
        let node = BlockNode::new("fuzz-qcow2", Box::new(q), true, false);
        let size = node.size();
        let mut off = 0;
        for _ in 0..WALK_STEPS {
            if off >= size {
                break;
            }
            let Ok(st) = node.block_status(off, size - off).await else {
                break;
            };
            let _ = node.read(off, st.len.min(WALK_READ) as usize).await;
            off += st.len.max(1);
        }
        // The end of the disk too, where the last L2 table is.
        if size > 0 {
            let _ = node
                .read(size - size.min(4096), size.min(4096) as usize)
                .await;
        }
        true
    })
}
