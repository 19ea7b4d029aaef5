//! Corrupt and hostile qcow2 images: a clear error on open or EIO on the
//! request; never a panic, never a hang.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use livesnap_block::{read_header_backing, IoBuf, Qcow2Driver, WriteFlags};
use livesnap_testkit::block::*;

/// A 4 MiB image with one written cluster. Layout (64 KiB clusters): header,
/// refcount table at 0x10000, refblock 0x20000, L1 0x30000, L2 0x40000, data 0x50000.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"],
    );
    qemu_io(&p, "qcow2", &["write -P 0x42 0 64k".into()]);
    p
}

fn poke(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

async fn open(p: &Path, read_only: bool) -> Result<Qcow2Driver, String> {
    let f = file_node(p, read_only);
    tokio::time::timeout(
        Duration::from_secs(10),
        Qcow2Driver::open(f, None, read_only),
    )
    .await
    .expect("open hung")
    .map_err(String::from)
}

async fn open_err(p: &Path, read_only: bool) -> String {
    match open(p, read_only).await {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_headers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    let p = image(d, "trunc.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(50)
        .unwrap();
    assert_eq!(open_err(&p, true).await, "qcow2 header too short");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(2)
        .unwrap();
    assert_eq!(open_err(&p, true).await, "Image is not in qcow2 format");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(open_err(&p, false).await, "Image is not in qcow2 format");

    let p = image(d, "magic.qcow2");
    poke(&p, 0, b"QFI\x00");
    assert_eq!(open_err(&p, false).await, "Image is not in qcow2 format");

    let p = image(d, "v4.qcow2");
    poke(&p, 4, &4u32.to_be_bytes());
    assert_eq!(open_err(&p, false).await, "Unsupported qcow2 version 4");

    let p = image(d, "cb.qcow2");
    poke(&p, 20, &30u32.to_be_bytes());
    assert_eq!(open_err(&p, true).await, "Unsupported cluster size: 2^30");

    let p = image(d, "l1big.qcow2");
    poke(&p, 36, &0x1000_0000u32.to_be_bytes());
    assert_eq!(open_err(&p, true).await, "Active L1 table too large");

    let p = image(d, "l1small.qcow2");
    poke(&p, 24, &(1u64 << 40).to_be_bytes());
    assert_eq!(open_err(&p, true).await, "L1 table is too small");

    let p = image(d, "l1eof.qcow2");
    poke(&p, 40, &0x0100_0000u64.to_be_bytes());
    let e = open_err(&p, false).await;
    assert!(e.starts_with("Could not read L1 table"), "{e}");

    let p = image(d, "l1unaligned.qcow2");
    poke(&p, 40, &0x30008u64.to_be_bytes());
    assert_eq!(open_err(&p, true).await, "Active L1 table offset invalid");

    let p = image(d, "rteof.qcow2");
    poke(&p, 48, &0x0100_0000u64.to_be_bytes());
    let e = open_err(&p, false).await;
    assert!(
        e.starts_with("Could not initialize refcount handling"),
        "{e}"
    );

    let p = image(d, "rtzero.qcow2");
    poke(&p, 56, &0u32.to_be_bytes());
    assert_eq!(
        open_err(&p, true).await,
        "Image does not contain a reference count table"
    );

    let p = image(d, "rtgarbage.qcow2");
    poke(&p, 0x10000, &[0xa5; 4096]);
    let e = open_err(&p, false).await;
    assert!(
        e.starts_with("Could not initialize refcount handling"),
        "{e}"
    );

    let p = image(d, "ext.qcow2");
    // The first header extension (feature table after 112 bytes) claims 1 GiB.
    poke(&p, 112 + 4, &0x4000_0000u32.to_be_bytes());
    assert_eq!(open_err(&p, true).await, "Header extension too large");

    let p = image(d, "feat.qcow2");
    poke(&p, 72, &(1u64 << 9 | 1 << 2).to_be_bytes());
    assert_eq!(
        open_err(&p, true).await,
        "Unsupported qcow2 feature(s): external data file, Unknown incompatible feature: 200"
    );

    let p = image(d, "corrupt.qcow2");
    poke(&p, 72, &2u64.to_be_bytes());
    assert_eq!(
        open_err(&p, false).await,
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
    assert!(
        open(&p, true).await.is_ok(),
        "corrupt images open read-only"
    );

    let p = image(d, "backname.qcow2");
    poke(&p, 8, &0x200u64.to_be_bytes());
    poke(&p, 16, &5000u32.to_be_bytes());
    assert_eq!(open_err(&p, true).await, "Backing file name too long");
    let f = file_node(&p, true);
    assert_eq!(
        read_header_backing(&f).await.unwrap_err(),
        "Backing file name too long"
    );
}

async fn read_is_eio(p: &Path, off: u64, others_work: bool) {
    let node = tokio::time::timeout(Duration::from_secs(10), qcow2_node(p, None, false))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), node.read(off, 4096))
        .await
        .expect("read hung");
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        node.write(off + 512, IoBuf::zeroed(512), WriteFlags::default()),
    )
    .await
    .expect("write hung");
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    if others_work {
        // Other clusters mapped by the same (valid) L2 table still work.
        node.read(2 << 20, 4096).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_past_the_end_give_eio() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    // L1 entry pointing at an L2 table past the end of the file.
    let p = image(d, "l2eof.qcow2");
    poke(&p, 0x30000, &(0x8000_0000_0100_0000u64).to_be_bytes());
    read_is_eio(&p, 0, false).await;

    // L2 entry pointing at a data cluster past the end of the file.
    let p = image(d, "dataeof.qcow2");
    poke(&p, 0x40000, &(0x8000_0000_0200_0000u64).to_be_bytes());
    read_is_eio(&p, 0, true).await;

    // Compressed cluster whose bytes are not a deflate stream.
    let p = image(d, "badcomp.qcow2");
    poke(&p, 0x50000, &[0xff; 1024]);
    poke(
        &p,
        0x40000,
        &((1u64 << 62) | (1 << 54) | 0x50000).to_be_bytes(),
    );
    let node = qcow2_node(&p, None, true).await;
    let r = tokio::time::timeout(Duration::from_secs(10), node.read(0, 4096))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));

    // An L1 entry not aligned to a cluster is refused at open.
    let p = image(d, "l2unaligned.qcow2");
    poke(&p, 0x30000, &(0x8000_0000_0004_0200u64).to_be_bytes());
    let e = open_err(&p, true).await;
    assert!(e.contains("not cluster aligned"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_clusters_read() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.raw");
    let dst = tmp.path().join("c.qcow2");
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", src.to_str().unwrap(), "1M"],
    );
    qemu_io(
        &src,
        "raw",
        &[
            "write -P 0x31 0 300k".into(),
            "write -P 0x32 700k 10k".into(),
        ],
    );
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
    );
    let node = qcow2_node(&dst, None, false).await;
    let got = node.read(0, 1 << 20).await.unwrap();
    assert_eq!(&got[..], &std::fs::read(&src).unwrap()[..]);
    // Writing into a compressed cluster copies it out first.
    node.write(100, IoBuf::from_slice(&[9u8; 10]), WriteFlags::default())
        .await
        .unwrap();
    let b = node.read(0, 65536).await.unwrap();
    assert!(b[..100].iter().all(|&x| x == 0x31));
    assert!(b[100..110].iter().all(|&x| x == 9));
    assert!(b[110..].iter().all(|&x| x == 0x31));
    node.flush().await.unwrap();
    drop(node);
    check_clean(&dst, false);
    qemu_io(
        &dst,
        "qcow2",
        &[
            "read -P 0x9 100 10".into(),
            "read -P 0x31 110 307090".into(),
        ],
    );
}

/// A write that needs a cluster on an image whose metadata lacks refcounts.
async fn alloc_refused(p: &Path) {
    let header = std::fs::read(p).unwrap()[..0x40000].to_vec();
    let node = tokio::time::timeout(Duration::from_secs(10), qcow2_node(p, None, false))
        .await
        .expect("open hung");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        node.write(1 << 20, IoBuf::zeroed(4096), WriteFlags::default()),
    )
    .await
    .expect("write hung");
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    // Header, refcount table, refblock and L1 are as they were.
    assert!(std::fs::read(p).unwrap()[..0x40000] == header[..]);
    // What was mapped still reads.
    assert_eq!(&node.read(0, 512).await.unwrap()[..], &[0x42; 512][..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_never_overwrites_metadata() {
    // Found by the qcow2 fuzz target (fuzz/regressions/qcow2_image): with
    // no refblock for the first clusters, a new refblock went over the
    // header, and allocation then never ended.
    let tmp = tempfile::tempdir().unwrap();
    let p = image(tmp.path(), "no-refblock-0.qcow2");
    poke(&p, 0x10000, &0u64.to_be_bytes());
    alloc_refused(&p).await;

    // The L1 table's cluster (3) with refcount 0: it must not be handed out.
    let p = image(tmp.path(), "l1-refcount-0.qcow2");
    poke(&p, 0x20000 + 3 * 2, &[0, 0]);
    alloc_refused(&p).await;
}
