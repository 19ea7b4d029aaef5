//! Images made by `create_image`, and many concurrent requests on one qcow2
//! node (shared clusters, small clusters that make the refcount structures grow).

use std::sync::Arc;
use std::time::Duration;

use livesnap_block::{
    create_image, BlockNode, CreateOptions, ImageFormat, IoBuf, WriteFlags, ZeroFlags,
};
use livesnap_testkit::block::*;

fn opts(path: &std::path::Path, format: ImageFormat) -> CreateOptions {
    CreateOptions {
        filename: path.to_str().unwrap().into(),
        format,
        size: None,
        cluster_size: None,
        backing_file: None,
        backing_format: None,
    }
}

fn info_json(path: &std::path::Path) -> String {
    tool_ok(
        "qemu-img",
        &["info", "--output=json", "-U", path.to_str().unwrap()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_images_pass_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.raw");
    create_image(&CreateOptions {
        size: Some(3 << 20),
        ..opts(&base, ImageFormat::Raw)
    })
    .await
    .unwrap();
    assert_eq!(std::fs::metadata(&base).unwrap().len(), 3 << 20);
    qemu_io(&base, "raw", &["write -P 0x61 0 3M".into()]);

    // qcow2 over a raw backing, relative name, size taken from the backing.
    let mid = tmp.path().join("mid.qcow2");
    create_image(&CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..opts(&mid, ImageFormat::Qcow2)
    })
    .await
    .unwrap();
    check_clean(&mid, false);
    let info = info_json(&mid);
    assert!(info.contains("\"virtual-size\": 3145728"), "{info}");
    assert!(
        info.contains("\"backing-filename\": \"base.raw\""),
        "{info}"
    );
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    assert!(info.contains("\"compat\": \"1.1\""), "{info}");

    // qcow2 over qcow2, explicit size and cluster sizes from 512 B to 2 MiB.
    for cs in [512u64, 4096, 65536, 2 << 20] {
        let top = tmp.path().join(format!("top-{cs}.qcow2"));
        create_image(&CreateOptions {
            size: Some(4 << 20),
            cluster_size: Some(cs),
            backing_file: Some(mid.to_str().unwrap().into()),
            backing_format: Some("qcow2".into()),
            ..opts(&top, ImageFormat::Qcow2)
        })
        .await
        .unwrap();
        check_clean(&top, false);
        let info = info_json(&top);
        assert!(info.contains(&format!("\"cluster-size\": {cs}")), "{info}");
        let chain = tool_ok(
            "qemu-img",
            &["info", "--backing-chain", top.to_str().unwrap()],
        );
        assert!(chain.contains("base.raw"), "{chain}");
        // QEMU writes into it and reads the chain through it.
        qemu_io(
            &top,
            "qcow2",
            &[
                "write -P 0x62 1M 100k".into(),
                "read -P 0x61 0 1M".into(),
                "read -P 0x62 1M 100k".into(),
            ],
        );
        check_clean(&top, false);
        // And so do we.
        let node = open_chain(&top, false).await;
        let b = node.read(1 << 20, 100 << 10).await.unwrap();
        assert!(b.iter().all(|&x| x == 0x62));
        let b = node.read(3 << 20, 4096).await.unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "past the backing's end reads zeroes"
        );
    }

    // Errors with QEMU's texts.
    let e = create_image(&opts(&tmp.path().join("x.qcow2"), ImageFormat::Qcow2))
        .await
        .unwrap_err();
    assert_eq!(e, "Image creation needs a size parameter");
    let e = create_image(&CreateOptions {
        backing_file: Some("base.raw".into()),
        ..opts(&tmp.path().join("x.qcow2"), ImageFormat::Qcow2)
    })
    .await
    .unwrap_err();
    assert_eq!(e, "Backing file specified without backing format");
    let e = create_image(&CreateOptions {
        size: Some(1 << 20),
        cluster_size: Some(3000),
        ..opts(&tmp.path().join("x.qcow2"), ImageFormat::Qcow2)
    })
    .await
    .unwrap_err();
    assert_eq!(
        e,
        "Cluster size must be a power of two between 512 and 2048k"
    );

    // The image opens in qemu-storage-daemon too.
    let img = tmp.path().join("top-65536.qcow2");
    let out = tool(
        "timeout",
        &[
            "5",
            "qemu-storage-daemon",
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", img.display()),
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--chardev",
            "stdio,id=m",
            "--monitor",
            "m",
        ],
    );
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(so.contains("QMP") && !se.contains("rror"), "qsd: {so}{se}");
}

/// Many concurrent writes, zeroes and discards to interleaved (but not
/// overlapping) ranges that share clusters; the result read back through the
/// driver and through QEMU equals the model, and `qemu-img check` is clean.
async fn stress(cluster_size: u64, with_backing: bool, seed: u64, l2_cache: Option<u64>) {
    let tmp = tempfile::tempdir().unwrap();
    let size: u64 = 24 << 20;
    let base = tmp.path().join("base.raw");
    let img = tmp.path().join("img.qcow2");
    let mut model = vec![0u8; size as usize];
    if with_backing {
        tool_ok(
            "qemu-img",
            &["create", "-q", "-f", "raw", base.to_str().unwrap(), "20M"],
        );
        qemu_io(&base, "raw", &["write -P 0x77 0 20M".into()]);
        model[..20 << 20].fill(0x77);
        create_image(&CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster_size),
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..opts(&img, ImageFormat::Qcow2)
        })
        .await
        .unwrap();
    } else {
        create_image(&CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster_size),
            ..opts(&img, ImageFormat::Qcow2)
        })
        .await
        .unwrap();
    }
    let node = match l2_cache {
        None => open_chain(&img, false).await,
        Some(bytes) => {
            let backing = with_backing.then(|| raw_node(&base, true));
            let d = livesnap_block::Qcow2Driver::open_with(
                file_node(&img, false),
                backing,
                false,
                livesnap_block::Qcow2Options {
                    l2_cache_size: Some(bytes),
                },
            )
            .await
            .unwrap();
            BlockNode::new("small-cache", Box::new(d), false, false)
        }
    };

    // Task t owns the 512-byte sectors s with s % TASKS == t; each op covers
    // one or more owned sectors spaced TASKS apart... which would fragment,
    // so instead each task owns stripes of 8 KiB: stripe % TASKS == t.
    const TASKS: u64 = 16;
    const STRIPE: u64 = 8192;
    let stripes = size / STRIPE;
    let model = Arc::new(std::sync::Mutex::new(model));
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let node = node.clone();
        let model = model.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x1234_5678_9abc_def1));
            for i in 0..150u64 {
                let stripe = rng.below(stripes / TASKS) * TASKS + t;
                let base_off = stripe * STRIPE;
                let start = rng.below(STRIPE / 512) * 512;
                let len = (rng.below((STRIPE - start) / 512) + 1) * 512;
                let off = base_off + start + rng.below(2) * 7 % 7;
                let len = len.min(base_off + STRIPE - off);
                match rng.below(10) {
                    0 => {
                        node.write_zeroes(
                            off,
                            len,
                            ZeroFlags {
                                may_unmap: rng.below(2) == 0,
                                ..Default::default()
                            },
                        )
                        .await
                        .unwrap();
                        model.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
                    }
                    _ => {
                        let data = pattern(seed + t * 1000 + i, off, len as usize);
                        node.write(
                            off,
                            IoBuf::from_slice(&data),
                            WriteFlags { fua: i % 50 == 0 },
                        )
                        .await
                        .unwrap();
                        model.lock().unwrap()[off as usize..(off + len) as usize]
                            .copy_from_slice(&data);
                    }
                }
                if i % 40 == 39 {
                    node.flush().await.unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    // Whole-cluster discards on clusters no task will touch again: reads as zeroes after.
    let cs = cluster_size;
    for c in [3u64, 17, 40] {
        let off = c * cs * 7 % size / cs * cs;
        node.discard(off, cs).await.unwrap();
        model.lock().unwrap()[off as usize..(off + cs) as usize].fill(0);
    }
    let model = model.lock().unwrap().clone();
    let got = node.read(0, size as usize).await.unwrap();
    let diff = got.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(diff, None, "driver read differs from the model");
    node.flush().await.unwrap();
    // Closed as blockdev-del closes it: its last metadata write is done
    // and its image lock gone before QEMU looks.
    node.close().await;
    drop(node);
    check_clean(&img, false);
    let raw = tmp.path().join("out.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let theirs = std::fs::read(&raw).unwrap();
    let diff = theirs.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(diff, None, "QEMU's view differs from the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_64k_clusters() {
    tokio::time::timeout(Duration::from_secs(120), stress(65536, true, 1, None))
        .await
        .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_small_clusters_grow_refcounts() {
    // 512-byte clusters: a refblock covers 128 KiB and the first refcount
    // table 8 MiB of file, so both get created and the table grows.
    tokio::time::timeout(Duration::from_secs(120), stress(512, false, 2, None))
        .await
        .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_4k_clusters_backing() {
    tokio::time::timeout(Duration::from_secs(120), stress(4096, true, 3, None))
        .await
        .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_tiny_l2_cache_evicts() {
    // Four 4 KiB L2 tables cached for 12 tables' worth of disk: constant
    // eviction of dirty tables (refcounts written first) under load.
    tokio::time::timeout(
        Duration::from_secs(120),
        stress(4096, true, 4, Some(4 * 4096)),
    )
    .await
    .expect("timed out");
}

#[tokio::test]
async fn node_is_used_as_a_block_node() {
    // A qcow2 node is an ordinary node: bounds and read-only checks apply.
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("x.qcow2");
    create_image(&CreateOptions {
        size: Some(1 << 20),
        ..opts(&img, ImageFormat::Qcow2)
    })
    .await
    .unwrap();
    let node: Arc<BlockNode> = qcow2_node(&img, None, true).await;
    assert!(node.read(1 << 20, 1).await.is_err());
    assert!(node
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .is_err());
}
