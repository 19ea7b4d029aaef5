//! Image creation (QEMU's `qemu-img create` / `blockdev-create`) for raw and
//! qcow2, used by everything that creates images: block jobs, the CLI and
//! `blockdev-snapshot-sync`.
//!
//! A new qcow2 image is laid out as QEMU lays it out: the header (with the
//! backing format and feature name extensions and the backing file name) in
//! cluster 0, then the refcount table, the refcount block(s) and the L1 table.

use std::fs::OpenOptions;
use std::io::Write;

use crate::file::{FileDriver, FileOptions};
use crate::node::BlockNode;
use crate::qcow2::header::{
    Header, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, MAGIC, MAX_BACKING_NAME,
};
use crate::qcow2::resolve_backing_filename;

/// Image formats [`create_image`] can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain bytes.
    Raw,
    /// qcow2 version 3 (compat 1.1).
    Qcow2,
}

impl ImageFormat {
    /// QEMU's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Path of the new image; an existing file is truncated, as QEMU does.
    pub filename: String,
    /// Format of the new image.
    pub format: ImageFormat,
    /// Virtual size; for qcow2 with a backing file it defaults to the backing image's size.
    pub size: Option<u64>,
    /// qcow2 cluster size (default 64 KiB).
    pub cluster_size: Option<u64>,
    /// Backing file name to write into the header (qcow2 only); relative names
    /// are relative to the new image's directory.
    pub backing_file: Option<String>,
    /// Format of the backing file (required with a backing file: never probed).
    pub backing_format: Option<String>,
}

/// Default qcow2 cluster size.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// Creates an image. Error texts are QEMU's where QEMU has one.
pub async fn create_image(opts: &CreateOptions) -> Result<(), String> {
    match opts.format {
        ImageFormat::Raw => {
            if opts.backing_file.is_some() {
                return Err("Backing file not supported for file format 'raw'".into());
            }
            let size = opts
                .size
                .ok_or_else(|| "Image creation needs a size parameter".to_string())?;
            let path = opts.filename.clone();
            blocking(move || {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| format!("Could not create '{path}': {}", os_text(&e)))?;
                f.set_len(size)
                    .map_err(|e| format!("Could not resize file: {}", os_text(&e)))
            })
            .await
        }
        ImageFormat::Qcow2 => create_qcow2(opts).await,
    }
}

fn os_text(e: &std::io::Error) -> String {
    let mut s = e.to_string();
    if let Some(i) = s.find(" (os error") {
        s.truncate(i);
    }
    s
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("worker failed: {e}"))?
}

/// Virtual size of the backing image, opened read-only with the given format.
async fn backing_size(path: &str, format: &str) -> Result<u64, String> {
    let file = FileDriver::open(&FileOptions {
        filename: path.to_string(),
        direct: false,
        read_only: true,
    })
    .map_err(|e| format!("Could not open '{path}': {}", os_text(&e)))?;
    let node = BlockNode::new("#create-backing", Box::new(file), true, false);
    match format {
        "raw" => Ok(node.size()),
        "qcow2" => Ok(Header::read(&node, false)
            .await
            .map_err(|e| format!("Could not open '{path}': {e}"))?
            .size),
        other => Err(format!("Unknown driver '{other}'")),
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// QEMU's feature name table entries: (type, bit, name).
const FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

async fn create_qcow2(opts: &CreateOptions) -> Result<(), String> {
    let cs = opts.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    let cluster_bits = cs.trailing_zeros();
    if opts.backing_file.is_some() && opts.backing_format.is_none() {
        return Err("Backing file specified without backing format".into());
    }
    if opts.backing_file.is_none() && opts.backing_format.is_some() {
        return Err("Backing format cannot be used without backing file".into());
    }
    let size = match (opts.size, &opts.backing_file) {
        (Some(s), _) => s,
        (None, Some(b)) => {
            let path = resolve_backing_filename(&opts.filename, b);
            backing_size(&path, opts.backing_format.as_deref().unwrap_or("raw")).await?
        }
        (None, None) => return Err("Image creation needs a size parameter".into()),
    };
    if size % 512 != 0 {
        return Err("Image size must be a multiple of 512 bytes".into());
    }
    if let Some(b) = &opts.backing_file {
        if b.len() > MAX_BACKING_NAME {
            return Err("Backing file name too long".into());
        }
    }
    if let Some(f) = &opts.backing_format {
        if f.len() >= 16 {
            return Err(format!("Unknown driver '{f}'"));
        }
    }

    // Header cluster: fixed part, extensions, then the backing file name.
    let mut hdr = vec![0u8; cs as usize];
    put32(&mut hdr, 0, MAGIC);
    put32(&mut hdr, 4, 3);
    put32(&mut hdr, 20, cluster_bits);
    put64(&mut hdr, 24, size);
    put32(&mut hdr, 96, 4); // 16-bit refcounts
    put32(&mut hdr, 100, 112);
    let mut at = 112usize;
    let ext = |hdr: &mut Vec<u8>, at: &mut usize, magic: u32, data: &[u8]| {
        put32(hdr, *at, magic);
        put32(hdr, *at + 4, data.len() as u32);
        hdr[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
        *at += 8 + data.len().div_ceil(8) * 8;
    };
    if let Some(f) = &opts.backing_format {
        ext(&mut hdr, &mut at, EXT_BACKING_FORMAT, f.as_bytes());
    }
    let mut table = Vec::new();
    for &(t, bit, name) in FEATURES {
        let mut e = [0u8; 48];
        e[0] = t;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        table.extend_from_slice(&e);
    }
    // Like QEMU, only when it fits next to the backing file name.
    let name_len = opts.backing_file.as_ref().map_or(0, |b| b.len());
    if at + 8 + table.len() + 8 + name_len <= cs as usize {
        ext(&mut hdr, &mut at, EXT_FEATURE_TABLE, &table);
    }
    ext(&mut hdr, &mut at, 0, &[]);
    if let Some(b) = &opts.backing_file {
        if at + b.len() > cs as usize {
            return Err("Backing file name too long".into());
        }
        put64(&mut hdr, 8, at as u64);
        put32(&mut hdr, 16, b.len() as u32);
        hdr[at..at + b.len()].copy_from_slice(b.as_bytes());
    }

    // Layout: header | refcount table | refcount blocks | L1 table.
    let l2_span = cs * (cs / 8);
    let l1_entries = size.div_ceil(l2_span);
    if l1_entries * 8 > crate::qcow2::header::MAX_L1_BYTES {
        return Err("Image is too big".into());
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let rb_entries = cs * 8 / 16;
    let mut rt_clusters = 1u64;
    let (total, rbs) = loop {
        let fixed = 1 + rt_clusters + l1_clusters;
        let mut rbs = fixed.div_ceil(rb_entries);
        while (fixed + rbs).div_ceil(rb_entries) > rbs {
            rbs += 1;
        }
        if (rbs * 8).div_ceil(cs) <= rt_clusters {
            break (fixed + rbs, rbs);
        }
        rt_clusters += 1;
    };
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rbs * cs;
    put64(&mut hdr, 40, l1_off);
    put32(&mut hdr, 36, l1_entries as u32);
    put64(&mut hdr, 48, rt_off);
    put32(&mut hdr, 56, rt_clusters as u32);

    let mut body = vec![0u8; ((total - 1) * cs) as usize];
    for i in 0..rbs {
        put64(&mut body, (i * 8) as usize, rb_off + i * cs);
    }
    for c in 0..total {
        let at = ((rb_off - cs) + c * 2) as usize;
        body[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }

    let path = opts.filename.clone();
    blocking(move || {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("Could not create '{path}': {}", os_text(&e)))?;
        f.write_all(&hdr)
            .and_then(|_| f.write_all(&body))
            .and_then(|_| f.sync_data())
            .map_err(|e| format!("Could not write qcow2 header: {}", os_text(&e)))
    })
    .await?;
    // Checked by the same code that opens images.
    let check = FileDriver::open(&FileOptions {
        filename: opts.filename.clone(),
        direct: false,
        read_only: true,
    })
    .map_err(|e| os_text(&e))?;
    let node = BlockNode::new("#create-check", Box::new(check), true, false);
    Header::read(&node, true).await.map(|_| ())
}
