//! A chain's images read and written through the engine (`livesnap_block`):
//! opening a backup with its backing chain (formats from the headers,
//! never probed), its header's backing link, checksums, and copying a
//! chain's contents into a new image for `restore`. The engine reads
//! qcow2 as QEMU does, so restore and verify need no QEMU tool.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use livesnap_block::{
    create_image, BackingOption, BackingRef, BlockGraph, BlockNode, BlockdevOptions, BlockdevRef,
    CreateOptions, DriverOptions, Drivers, ImageFormat, IoBuf, Locking, Qcow2Cache, WriteFlags,
};
use sha2::{Digest, Sha256};

use crate::error::{Failure, Result};

/// Reads and writes of a copy go in pieces of this size.
const CHUNK: u64 = 4 << 20;

fn file_ref(path: &Path) -> BlockdevRef {
    BlockdevRef::Inline(Box::new(BlockdevOptions::of(DriverOptions::File {
        filename: path.to_string_lossy().into_owned(),
        aio: None,
        locking: Locking::Auto,
    })))
}

/// Opens the image at `path` (`format`) with the engine; a qcow2 with its
/// whole backing chain as its header names it.
pub async fn open(path: &Path, format: ImageFormat, read_only: bool) -> Result<Arc<BlockNode>> {
    let driver = match format {
        ImageFormat::Qcow2 => DriverOptions::Qcow2 {
            file: file_ref(path),
            backing: BackingOption::FromHeader,
            cache: Qcow2Cache::default(),
        },
        ImageFormat::Raw => DriverOptions::Raw {
            file: file_ref(path),
            offset: None,
            size: None,
        },
    };
    let mut opts = BlockdevOptions::of(driver);
    opts.read_only = Some(read_only);
    livesnap_block::open(&BlockGraph::new(), &Drivers::new(), &opts, false)
        .await
        .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))
}

/// The backing link in the qcow2 header of `path`, without opening the chain.
pub async fn header_backing(path: &Path) -> Result<Option<BackingRef>> {
    let file = open_file(path).await?;
    let r = livesnap_block::read_header_backing(&file)
        .await
        .map_err(|e| Failure::usage(format!("{}: {e}", path.display())));
    file.close().await;
    r
}

async fn open_file(path: &Path) -> Result<Arc<BlockNode>> {
    let mut opts = BlockdevOptions::of(DriverOptions::File {
        filename: path.to_string_lossy().into_owned(),
        aio: None,
        locking: Locking::Auto,
    });
    opts.read_only = Some(true);
    // A peek at the header, like `qemu-img info -U`: it works while the
    // image is in use (a backup target still attached to livesnapd).
    opts.force_share = Some(true);
    livesnap_block::open(&BlockGraph::new(), &Drivers::new(), &opts, false)
        .await
        .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))
}

/// SHA-256 of the file at `path`, lower-case hex (on the blocking pool).
pub async fn sha256(path: &Path) -> Result<String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(&p)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    })
    .await
    .map_err(|e| Failure::endpoint(format!("checksum of {}: {e}", path.display())))?
    .map_err(|e| Failure::usage(format!("checksum of {}: {e}", path.display())))
}

/// Copies what `src` reads as into the new image `dst` (raw or qcow2, of
/// `src`'s size); ranges that read as zeroes are left unwritten (a hole in
/// raw, unallocated in qcow2). `progress(done, total)` follows the copy.
pub async fn copy_into(
    src: &BlockNode,
    dst: &Path,
    format: ImageFormat,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64> {
    let size = src.size();
    create_image(&CreateOptions {
        filename: dst.to_string_lossy().into_owned(),
        format,
        size: Some(size),
        cluster_size: None,
        backing_file: None,
        backing_format: None,
    })
    .await
    .map_err(|e| Failure::endpoint(format!("creating {}: {e}", dst.display())))?;
    let out = open(dst, format, false).await?;
    let r = copy_data(src, &out, &mut progress).await;
    let flushed = out.flush().await;
    out.close().await;
    let written = r?;
    flushed.map_err(|e| Failure::endpoint(format!("flush of {}: {e}", dst.display())))?;
    Ok(written)
}

async fn copy_data(
    src: &BlockNode,
    out: &BlockNode,
    progress: &mut impl FnMut(u64, u64),
) -> Result<u64> {
    let size = src.size();
    let (mut at, mut written) = (0u64, 0u64);
    let read_err = |e: std::io::Error| Failure::usage(format!("reading the chain: {e}"));
    while at < size {
        let st = src
            .block_status(at, (size - at).min(CHUNK))
            .await
            .map_err(read_err)?;
        let len = st.len.clamp(1, size - at);
        if !st.zero {
            let mut off = at;
            while off < at + len {
                let n = (at + len - off).min(CHUNK) as usize;
                let buf = src.read(off, n).await.map_err(read_err)?;
                // A data cluster may still hold zeroes: nothing to write then.
                if buf.iter().any(|&b| b != 0) {
                    out.write(off, IoBuf::from_slice(&buf), WriteFlags::default())
                        .await
                        .map_err(|e| Failure::endpoint(format!("writing the image: {e}")))?;
                    written += n as u64;
                }
                off += n as u64;
            }
        }
        at += len;
        progress(at, size);
    }
    Ok(written)
}
