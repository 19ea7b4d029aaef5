//! Quick in-process benchmark of the qcow2 driver through the node API:
//! random 4 KiB writes and reads at queue depth 32, on a fresh image and on
//! one with a raw backing file, against a raw image for reference.
//!
//! `cargo run --release -p livesnap-block --example qcow2_bench [DIR] [SECONDS]`
//! (`BENCH_QD=n` changes the queue depth of the one-write-per-cluster passes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livesnap_block::{
    create_image, BlockNode, CreateOptions, FileDriver, FileOptions, ImageFormat, IoBuf,
    Qcow2Driver, RawDriver, RawOptions, WriteFlags,
};

const SIZE: u64 = 1 << 30;
const BS: u64 = 4096;
const QD: usize = 32;

fn qd() -> usize {
    std::env::var("BENCH_QD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(QD)
}

fn file(path: &str, ro: bool) -> Arc<BlockNode> {
    let d = FileDriver::open(&FileOptions {
        filename: path.into(),
        direct: false,
        read_only: ro,
    })
    .unwrap();
    BlockNode::new(format!("f-{path}"), Box::new(d), ro, false)
}

fn raw(path: &str, ro: bool) -> Arc<BlockNode> {
    let d = RawDriver::open(file(path, ro), RawOptions::default()).unwrap();
    BlockNode::new(format!("r-{path}"), Box::new(d), ro, false)
}

async fn qcow2(path: &str, backing: Option<Arc<BlockNode>>) -> Arc<BlockNode> {
    let d = Qcow2Driver::open(file(path, false), backing, false)
        .await
        .unwrap();
    BlockNode::new(format!("q-{path}"), Box::new(d), false, false)
}

/// Runs QD workers doing random 4 KiB requests for `secs`; returns IOPS.
async fn run(node: Arc<BlockNode>, write: bool, secs: f64) -> f64 {
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..QD as u64 {
        let node = node.clone();
        let ops = ops.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1);
            while Instant::now() < deadline {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let off = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % (SIZE / BS)) * BS;
                if write {
                    node.write(off, IoBuf::zeroed(BS as usize), WriteFlags::default())
                        .await
                        .unwrap();
                } else {
                    node.read(off, BS as usize).await.unwrap();
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    ops.load(Ordering::Relaxed) as f64 / secs
}

/// One 4 KiB write into each 64 KiB cluster of the image (every write
/// allocates), QD workers; returns IOPS (like `qemu-img bench -w -s 4k -S 64k`).
async fn alloc_pass(node: Arc<BlockNode>) -> f64 {
    let start = Instant::now();
    let n = SIZE / 65536;
    let mut tasks = Vec::new();
    let qd = qd() as u64;
    for w in 0..qd {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                node.write(i * 65536, IoBuf::zeroed(BS as usize), WriteFlags::default())
                    .await
                    .unwrap();
                i += qd;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/tmp".into());
    let secs: f64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let p = |n: &str| format!("{dir}/bench-{n}");
    let mk = |n: &str, fmt, backing: Option<&str>| CreateOptions {
        filename: p(n),
        format: fmt,
        size: Some(SIZE),
        cluster_size: None,
        backing_file: backing.map(|b| b.to_string()),
        backing_format: backing.map(|_| "raw".to_string()),
    };

    create_image(&mk("raw.img", ImageFormat::Raw, None))
        .await
        .unwrap();
    let r = raw(&p("raw.img"), false);
    println!(
        "raw         randwrite 4k QD{QD}: {:>8.0} IOPS",
        run(r.clone(), true, secs).await
    );
    println!(
        "raw         randread  4k QD{QD}: {:>8.0} IOPS",
        run(r, false, secs).await
    );

    create_image(&mk("fresh.qcow2", ImageFormat::Qcow2, None))
        .await
        .unwrap();
    let q = qcow2(&p("fresh.qcow2"), None).await;
    println!(
        "qcow2 fresh 4k/64k-stride QD{QD}: {:>8.0} IOPS (each write allocates)",
        alloc_pass(q.clone()).await
    );
    println!(
        "qcow2 fresh randwrite 4k QD{QD}: {:>8.0} IOPS (allocating)",
        run(q.clone(), true, secs).await
    );
    println!(
        "qcow2 fresh randwrite 4k QD{QD}: {:>8.0} IOPS (second pass)",
        run(q.clone(), true, secs).await
    );
    println!(
        "qcow2 fresh randread  4k QD{QD}: {:>8.0} IOPS",
        run(q.clone(), false, secs).await
    );
    q.flush().await.unwrap();
    drop(q);

    // Backing file with data everywhere, so every first write copies 60 KiB from it.
    let b = raw(&p("raw.img"), false);
    for off in (0..SIZE).step_by(1 << 20) {
        b.write(
            off,
            IoBuf::from_slice(&vec![0x5a; 1 << 20]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    }
    drop(b);
    // Let the kernel write the backing file back before measuring.
    let _ = std::process::Command::new("sync").status();
    create_image(&mk(
        "overlay.qcow2",
        ImageFormat::Qcow2,
        Some("bench-raw.img"),
    ))
    .await
    .unwrap();
    let q = qcow2(&p("overlay.qcow2"), Some(raw(&p("raw.img"), true))).await;
    println!(
        "qcow2 backed 4k/64k-stride QD{QD}: {:>8.0} IOPS (each write copies 60 KiB)",
        alloc_pass(q.clone()).await
    );
    q.flush().await.unwrap();
    drop(q);
    create_image(&mk(
        "overlay.qcow2",
        ImageFormat::Qcow2,
        Some("bench-raw.img"),
    ))
    .await
    .unwrap();
    let q = qcow2(&p("overlay.qcow2"), Some(raw(&p("raw.img"), true))).await;
    println!(
        "qcow2 backed randwrite 4k QD{QD}: {:>8.0} IOPS (copy-on-write)",
        run(q.clone(), true, secs).await
    );
    println!(
        "qcow2 backed randread  4k QD{QD}: {:>8.0} IOPS",
        run(q.clone(), false, secs).await
    );
    q.flush().await.unwrap();
    for n in ["raw.img", "fresh.qcow2", "overlay.qcow2"] {
        let _ = std::fs::remove_file(p(n));
    }
}
