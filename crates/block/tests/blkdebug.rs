//! The `blkdebug` filter in process: pass-through, error injection by
//! request type and sector, `once`, the `x-delay-ms` and `x-stall`
//! extensions, rule changes at run time, limits, and a qcow2 image over it.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use livesnap_block::blkdebug::{self, new_node};
use livesnap_block::{
    create_image, BlkdebugDriver, BlkdebugOptions, BlockNode, CreateOptions, FileDriver,
    FileOptions, ImageFormat, InjectError, IoBuf, IoType, Qcow2Driver, WriteFlags, ZeroFlags,
};

const EIO: i32 = libc::EIO;
const ENOSPC: i32 = libc::ENOSPC;

fn file_node(path: &std::path::Path) -> Arc<BlockNode> {
    let d = FileDriver::open(&FileOptions {
        filename: path.to_str().unwrap().into(),
        direct: false,
        read_only: false,
    })
    .unwrap();
    BlockNode::new("file", Box::new(d), false, false)
}

/// A blkdebug node over a fresh 4 MiB file.
fn setup(
    opts: BlkdebugOptions,
) -> (
    tempfile::TempDir,
    Arc<BlockNode>,
    Arc<blkdebug::BlkdebugRules>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let (node, rules) = new_node("dbg", file_node(&path), opts).unwrap();
    (dir, node, rules)
}

fn errno(r: io::Result<impl Sized>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().expect("an OS error"))
}

async fn write(node: &BlockNode, offset: u64, len: usize, byte: u8) -> io::Result<()> {
    node.write(
        offset,
        IoBuf::from_slice(&vec![byte; len]),
        WriteFlags::default(),
    )
    .await
}

#[tokio::test]
async fn without_rules_everything_passes_through() {
    let (_d, node, rules) = setup(BlkdebugOptions::default());
    assert_eq!(node.format_name(), "blkdebug");
    assert_eq!(node.size(), 4 << 20);
    assert_eq!(node.children()[0].role, "image");
    write(&node, 1000, 5000, 0xab).await.unwrap();
    assert!(node
        .read(1000, 5000)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0xab));
    node.write_zeroes(2048, 1024, ZeroFlags::default())
        .await
        .unwrap();
    assert!(node.read(2048, 1024).await.unwrap().iter().all(|&b| b == 0));
    node.discard(1 << 20, 1 << 20).await.unwrap();
    node.flush().await.unwrap();
    assert!(node.block_status(0, 4096).await.unwrap().data);
    assert_eq!(rules.hits(), 0);
    assert!(blkdebug::rules_of(&node).is_some());
}

#[tokio::test]
async fn write_at_the_injected_sector_fails() {
    let (_d, node, rules) = setup(BlkdebugOptions {
        inject_error: vec![InjectError::new(IoType::Write, ENOSPC).at_sector(8)],
        ..Default::default()
    });
    // Sector 8 is bytes 4096..4608: every write overlapping it fails.
    assert_eq!(errno(write(&node, 4096, 512, 1).await), Some(ENOSPC));
    assert_eq!(errno(write(&node, 0, 8192, 1).await), Some(ENOSPC));
    assert_eq!(errno(write(&node, 4600, 8, 1).await), Some(ENOSPC));
    // Elsewhere, and other request types, pass.
    write(&node, 0, 4096, 2).await.unwrap();
    write(&node, 4608, 512, 2).await.unwrap();
    node.read(4096, 512).await.unwrap();
    node.write_zeroes(4096, 512, ZeroFlags::default())
        .await
        .unwrap();
    node.flush().await.unwrap();
    assert_eq!(rules.hits(), 3);
}

#[tokio::test]
async fn once_fires_once() {
    let (_d, node, rules) = setup(BlkdebugOptions {
        inject_error: vec![InjectError::new(IoType::Read, EIO).once()],
        ..Default::default()
    });
    assert_eq!(errno(node.read(0, 512).await), Some(EIO));
    node.read(0, 512).await.unwrap();
    assert!(rules.rules().is_empty());
}

#[tokio::test]
async fn default_iotype_is_every_request_but_block_status() {
    let (_d, node, _rules) = setup(BlkdebugOptions {
        inject_error: vec![InjectError {
            iotype: None,
            ..InjectError::new(IoType::Read, EIO)
        }],
        ..Default::default()
    });
    assert_eq!(errno(node.read(0, 512).await), Some(EIO));
    assert_eq!(errno(write(&node, 0, 512, 1).await), Some(EIO));
    assert_eq!(
        errno(node.write_zeroes(0, 512, ZeroFlags::default()).await),
        Some(EIO)
    );
    assert_eq!(errno(node.discard(0, 4096).await), Some(EIO));
    assert_eq!(errno(node.flush().await), Some(EIO));
    node.block_status(0, 512).await.unwrap();
}

#[tokio::test]
async fn first_matching_rule_decides() {
    let (_d, node, _rules) = setup(BlkdebugOptions {
        inject_error: vec![
            // errno 0 matches and lets the request through: later rules are not consulted.
            InjectError::new(IoType::Write, 0).at_sector(0),
            InjectError::new(IoType::Write, EIO),
        ],
        ..Default::default()
    });
    write(&node, 0, 512, 1).await.unwrap();
    assert_eq!(errno(write(&node, 512, 512, 1).await), Some(EIO));
}

#[tokio::test]
async fn delay_delays_matching_requests_only() {
    let (_d, node, _rules) = setup(BlkdebugOptions {
        inject_error: vec![InjectError::delay(
            IoType::Write,
            Duration::from_millis(1000),
        )],
        ..Default::default()
    });
    let t = Instant::now();
    let n = node.clone();
    let delayed = tokio::spawn(async move { write(&n, 0, 4096, 1).await });
    // A read, which no rule delays, ends while the delayed write waits.
    node.read(0, 4096).await.unwrap();
    assert!(
        !delayed.is_finished() || t.elapsed() >= Duration::from_millis(1000),
        "the write was not delayed"
    );
    delayed.await.unwrap().unwrap();
    assert!(t.elapsed() >= Duration::from_millis(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_holds_requests_until_the_rules_change() {
    let (_d, node, rules) = setup(BlkdebugOptions {
        inject_error: vec![InjectError::stall(IoType::Write).at_sector(0)],
        ..Default::default()
    });
    let n = node.clone();
    let stalled = tokio::spawn(async move { write(&n, 0, 512, 7).await });
    let t = Instant::now();
    while rules.stalled() == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "never stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Other requests go on meanwhile.
    write(&node, 4096, 512, 1).await.unwrap();
    node.read(0, 512).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!stalled.is_finished());
    // Released into a failing rule: the held write is checked again and fails.
    rules.set(vec![InjectError::new(IoType::Write, EIO)]);
    assert_eq!(errno(stalled.await.unwrap()), Some(EIO));
    assert_eq!(rules.stalled(), 0);

    // Released with no rules: it completes.
    rules.set(vec![InjectError::stall(IoType::Write)]);
    let n = node.clone();
    let stalled = tokio::spawn(async move { write(&n, 0, 512, 9).await });
    while rules.stalled() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rules.clear();
    stalled.await.unwrap().unwrap();
    assert!(node.read(0, 512).await.unwrap().iter().all(|&b| b == 9));
}

#[tokio::test]
async fn rules_change_at_run_time() {
    let (_d, node, rules) = setup(BlkdebugOptions::default());
    write(&node, 0, 512, 1).await.unwrap();
    rules.add(InjectError::new(IoType::Write, EIO));
    assert_eq!(errno(write(&node, 0, 512, 1).await), Some(EIO));
    rules.clear();
    write(&node, 0, 512, 1).await.unwrap();
}

#[tokio::test]
async fn limits_split_requests_and_keep_data_intact() {
    let (_d, node, _rules) = setup(BlkdebugOptions {
        align: Some(4096),
        max_transfer: Some(8192),
        max_write_zero: Some(4096),
        max_discard: Some(4096),
        inject_error: Vec::new(),
    });
    assert_eq!(node.limits().request_alignment, 4096);
    assert_eq!(node.limits().max_transfer, 8192);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    // Unaligned: the node layer pads to 4 KiB, the filter splits in 8 KiB pieces.
    node.write(1234, IoBuf::from_slice(&data), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(&node.read(1234, data.len()).await.unwrap()[..], &data[..]);
    node.write_zeroes(4096, 32768, ZeroFlags::default())
        .await
        .unwrap();
    assert!(node
        .read(4096, 32768)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    node.discard(65536, 65536).await.unwrap();
}

#[test]
fn limits_are_checked_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let open = |opts: BlkdebugOptions| {
        BlkdebugDriver::open(file_node(&path), opts)
            .err()
            .map(String::from)
            .unwrap_or_default()
    };
    assert_eq!(
        open(BlkdebugOptions {
            align: Some(3),
            ..Default::default()
        }),
        "Cannot meet constraints with align 3"
    );
    assert_eq!(
        open(BlkdebugOptions {
            align: Some(1 << 31),
            ..Default::default()
        }),
        "Cannot meet constraints with align 2147483648"
    );
    assert_eq!(
        open(BlkdebugOptions {
            align: Some(4096),
            max_transfer: Some(512),
            ..Default::default()
        }),
        "Cannot meet constraints with max-transfer 512"
    );
    assert_eq!(
        open(BlkdebugOptions {
            align: Some(512),
            max_discard: Some(1000),
            ..Default::default()
        }),
        "Cannot meet constraints with max-discard 1000"
    );
    assert_eq!(open(BlkdebugOptions::default()), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_over_blkdebug_sees_the_injected_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    create_image(&CreateOptions {
        filename: path.to_str().unwrap().into(),
        format: ImageFormat::Qcow2,
        size: Some(8 << 20),
        cluster_size: None,
        backing_file: None,
        backing_format: None,
    })
    .await
    .unwrap();
    let (dbg, rules) = new_node("dbg", file_node(&path), BlkdebugOptions::default()).unwrap();
    let q = Qcow2Driver::open(dbg.clone(), None, false).await.unwrap();
    let qcow2 = BlockNode::new("img", Box::new(q), false, false);
    write(&qcow2, 0, 65536, 0x11).await.unwrap();
    rules.set(vec![InjectError::new(IoType::Write, EIO)]);
    assert_eq!(errno(write(&qcow2, 1 << 20, 65536, 0x22).await), Some(EIO));
    rules.set(vec![InjectError::new(IoType::Read, EIO)]);
    assert_eq!(errno(qcow2.read(0, 4096).await), Some(EIO));
    rules.clear();
    assert!(qcow2
        .read(0, 65536)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x11));
    write(&qcow2, 1 << 20, 65536, 0x22).await.unwrap();
    qcow2.flush().await.unwrap();
    // Closed before the check: an open image is locked against it, as in QEMU.
    drop((qcow2, dbg));
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path.to_str().unwrap()])
        .output()
        .expect("qemu-img (Debian package qemu-utils) is required");
    // A write that failed before its L2 update may leave a leaked cluster (exit 3).
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
