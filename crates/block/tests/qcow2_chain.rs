//! qcow2 chains written through `Qcow2Driver` against the same writes done by
//! `qemu-io` on a copy of the chain: `qemu-img check` clean, `qemu-img compare` equal.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use livesnap_block::{BlockNode, IoBuf, WriteFlags, ZeroFlags};
use livesnap_testkit::block::*;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

impl Op {
    fn qemu_io(self) -> String {
        match self {
            Op::Write(o, l, p) => format!("write -P {p:#x} {o} {l}"),
            Op::Zero(o, l, true) => format!("write -z -u {o} {l}"),
            Op::Zero(o, l, false) => format!("write -z {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
        }
    }

    async fn apply(self, node: &BlockNode) {
        match self {
            Op::Write(o, l, p) => node
                .write(
                    o,
                    IoBuf::from_slice(&vec![p; l as usize]),
                    WriteFlags::default(),
                )
                .await
                .unwrap(),
            Op::Zero(o, l, unmap) => node
                .write_zeroes(
                    o,
                    l,
                    ZeroFlags {
                        may_unmap: unmap,
                        ..Default::default()
                    },
                )
                .await
                .unwrap(),
            Op::Discard(o, l) => node.discard(o, l).await.unwrap(),
        }
    }
}

fn ops() -> Vec<Op> {
    vec![
        Op::Write(100, 1000, 0x41),
        Op::Write(M + 60 * K, 10 * K, 0x42),
        Op::Write(2 * M + 512, 512, 0x43),
        Op::Write(3 * M - 2 * K, 8 * K, 0x44),
        Op::Zero(64 * K, 128 * K, true),
        Op::Zero(200 * K + 100, 5000, true),
        Op::Discard(256 * K, 128 * K),
        Op::Discard(400 * K + 1, 1000),
        Op::Write(512 * K, 256 * K, 0x45),
        Op::Discard(512 * K, 64 * K),
        Op::Write(516 * K, 4 * K, 0x46),
        Op::Zero(576 * K, 64 * K, false),
        Op::Write(576 * K + 100, 100, 0x47),
        Op::Write(4 * M - 512, 512, 0x48),
        Op::Zero(3 * M + 4 * K, 8 * K, true),
        Op::Write(3 * M + 100 * K, 300 * K, 0x49),
        Op::Zero(3 * M + 64 * K, 320 * K, false),
    ]
}

/// base.raw (3 MiB) <- mid.qcow2 (4 KiB clusters) <- top.qcow2, with data in every layer.
fn make_chain(dir: &Path) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", &p("base.raw"), "3M"],
    );
    qemu_io(&dir.join("base.raw"), "raw", &["write -P 0x11 0 3M".into()]);
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.raw",
            "-F",
            "raw",
            &p("mid.qcow2"),
            "4M",
        ],
    );
    qemu_io(
        &dir.join("mid.qcow2"),
        "qcow2",
        &["write -P 0x22 1M 512k".into(), "write -z 2M 128k".into()],
    );
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ],
    );
    qemu_io(
        &dir.join("top.qcow2"),
        "qcow2",
        &["write -P 0x33 3148800 8k".into()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_writes_match_qemu_io() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        make_chain(&a);
        tool_ok("cp", &["-a", a.to_str().unwrap(), b.to_str().unwrap()]);

        let top = open_chain(&a.join("top.qcow2"), false).await;
        assert_eq!(top.size(), 4 * M);
        assert_eq!(top.format_name(), "qcow2");
        let roles: Vec<&str> = top.children().iter().map(|c| c.role).collect();
        assert_eq!(roles, ["file", "backing"]);
        for op in ops() {
            op.apply(&top).await;
        }
        let cmds: Vec<String> = ops().iter().map(|o| o.qemu_io()).collect();
        qemu_io(&b.join("top.qcow2"), "qcow2", &cmds);

        // Allocation depth through three layers.
        let st = |o: u64| {
            let top = top.clone();
            async move { top.block_status(o, 4096).await.unwrap() }
        };
        let s = st(0).await;
        assert_eq!((s.data, s.zero, s.depth), (true, false, 1));
        let s = st(M + 256 * K).await;
        assert_eq!((s.data, s.zero, s.depth), (true, false, 2));
        let s = st(M + 768 * K).await;
        assert_eq!((s.data, s.depth), (true, 3));
        let s = st(2 * M + 64 * K).await;
        assert_eq!(
            (s.data, s.zero, s.depth),
            (false, true, 2),
            "zero cluster in mid"
        );
        let s = st(64 * K).await;
        assert_eq!((s.data, s.zero, s.depth), (false, true, 1), "zeroed in top");
        let s = st(3 * M + 896 * K).await;
        // Past the short base, the base layer answers zeroes (QEMU counts it as depth 3 here).
        assert_eq!((s.data, s.zero, s.depth), (false, true, 3), "past the base");

        // Our reads through the chain equal QEMU's view of the reference chain.
        let ours = top.read(0, (4 * M) as usize).await.unwrap();
        let ref_raw = tmp.path().join("ref.raw");
        tool_ok(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                b.join("top.qcow2").to_str().unwrap(),
                ref_raw.to_str().unwrap(),
            ],
        );
        let theirs = std::fs::read(&ref_raw).unwrap();
        let first_diff = ours.iter().zip(&theirs).position(|(x, y)| x != y);
        assert_eq!(first_diff, None, "content differs from qemu-io's");

        top.flush().await.unwrap();
        // Closed as blockdev-del closes it: its last metadata write is done
        // and its image lock gone before QEMU looks.
        top.close().await;
        drop(top);
        for n in ["top.qcow2", "mid.qcow2"] {
            check_clean(&a.join(n), false);
        }
        tool_ok(
            "qemu-img",
            &[
                "compare",
                a.join("top.qcow2").to_str().unwrap(),
                b.join("top.qcow2").to_str().unwrap(),
            ],
        );
        // The backing layers were not touched.
        tool_ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                a.join("mid.qcow2").to_str().unwrap(),
                b.join("mid.qcow2").to_str().unwrap(),
            ],
        );
        assert_eq!(
            std::fs::read(a.join("base.raw")).unwrap(),
            std::fs::read(b.join("base.raw")).unwrap()
        );
    })
    .await
    .expect("timed out");
}

/// Reopening after writes sees them; an image without backing reads zeroes
/// where nothing was written; re-pointing the backing changes what shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_and_set_backing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.raw");
    let top = tmp.path().join("top.qcow2");
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", base.to_str().unwrap(), "1M"],
    );
    qemu_io(&base, "raw", &["write -P 0x5a 0 1M".into()]);
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "1M"],
    );

    let node = qcow2_node(&top, None, false).await;
    let b = node.read(0, 4096).await.unwrap();
    assert!(b.iter().all(|&x| x == 0));
    node.write(
        4096,
        IoBuf::from_slice(&[7u8; 512]),
        WriteFlags { fua: true },
    )
    .await
    .unwrap();
    drop(node);
    check_clean(&top, false);

    let base_node = raw_node(&base, true);
    let f = file_node(&top, false);
    let drv = livesnap_block::Qcow2Driver::open(f, None, false)
        .await
        .unwrap();
    assert!(drv.backing().is_none());
    drv.set_backing(Some(base_node.clone()));
    assert!(Arc::ptr_eq(&drv.backing().unwrap(), &base_node));
    let info = drv.info();
    assert_eq!(
        (info.compat.as_str(), info.cluster_size, info.refcount_bits),
        ("1.1", 65536, 16)
    );
    let node = BlockNode::new("top", Box::new(drv), false, true);
    // The written cluster was allocated with zeroes around the write (no
    // backing then); the rest now shows the new backing.
    let b = node.read(4096 - 2, 516).await.unwrap();
    assert_eq!(&b[..2], &[0, 0]);
    assert!(b[2..514].iter().all(|&x| x == 7));
    assert_eq!(&b[514..], &[0, 0]);
    let b = node.read(64 * 1024 - 1, 2).await.unwrap();
    assert_eq!(&b[..], &[0, 0x5a]);
    let s = node.block_status(64 * 1024, 4096).await.unwrap();
    assert_eq!((s.depth, s.data), (2, true));
    let s = node.block_status(0, 4096).await.unwrap();
    assert_eq!((s.depth, s.data), (1, true));
}
