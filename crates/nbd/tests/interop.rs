//! Quick interop checks against real NBD clients (libnbd's nbdinfo, QEMU's
//! qemu-io and qemu-img), and `qemu:allocation-depth` against
//! qemu-storage-daemon serving the same qcow2 chains. A missing tool fails
//! the test (CI installs them); the full interop suite lives in the
//! workspace `tests/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use livesnap_block::{
    read_header_backing, resolve_backing_filename, BlockNode, FileDriver, FileOptions, Qcow2Driver,
    RawDriver, RawOptions,
};
use livesnap_testkit::nbd::*;

const MIB: u64 = 1 << 20;

fn require(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs `{tool}` (qemu-utils / libnbd-bin); .ci/run installs it"
    );
}

/// Runs a command off the runtime threads (the server runs on them) and returns (ok, stdout+stderr).
async fn run(cmd: &str, args: Vec<String>) -> (bool, String) {
    let cmd = cmd.to_string();
    tokio::task::spawn_blocking(move || {
        let o = Command::new(&cmd).args(&args).output().unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    })
    .await
    .unwrap()
}

fn uri(f: &Fixture, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", f.sock.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_info_and_map() {
    require("nbdinfo");
    let f = Fixture::new(0).await;
    let node = open_node(&sparse_file(f.dir.path().join("a.img"), 8 * MIB), false);
    f.add_node("disk", node, true, Some("a test disk"));
    f.add_file_export("second", MIB, false);
    let c = livesnap_nbd::NbdClient::connect(&f.addr, "disk")
        .await
        .unwrap();
    c.write(2 * MIB, &pattern(1, MIB as usize), false)
        .await
        .unwrap();
    c.disconnect().await.unwrap();

    let (ok, out) = run("nbdinfo", vec!["--list".into(), uri(&f, "")]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("export=\"disk\"") || out.contains("disk"),
        "{out}"
    );
    assert!(out.contains("a test disk"), "{out}");
    assert!(out.contains("second"), "{out}");

    let (ok, out) = run("nbdinfo", vec![uri(&f, "disk")]).await;
    assert!(ok, "{out}");
    assert!(out.contains("export-size: 8388608"), "{out}");
    assert!(
        out.contains("can_flush: true") || out.contains("can_flush"),
        "{out}"
    );
    assert!(out.contains("block_size_preferred: 4096"), "{out}");

    let (ok, out) = run("nbdinfo", vec!["--map".into(), uri(&f, "disk")]).await;
    assert!(ok, "{out}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // offset length type description
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(&lines[0][..3], &["0", "2097152", "3"], "{out}");
    assert_eq!(&lines[1][..3], &["2097152", "1048576", "0"], "{out}");
    assert_eq!(&lines[2][..3], &["3145728", "5242880", "3"], "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_reads_writes_and_zeroes() {
    require("qemu-io");
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 16 * MIB, true);
    let node = f.table.get("disk").unwrap().config().backend.root();
    f.add_node("ro", node, false, None);

    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), uri(&f, "disk")];
    for c in [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0xcd 1M 1M",
        "aio_write -P 0x11 4M 4k",
        "aio_write -P 0x22 5M 4k",
        "aio_flush",
        "read -P 0x11 4M 4k",
        "read -P 0x22 5M 4k",
        "write -z 1M 512k",
        "read -P 0 1M 512k",
        "read -P 0xcd 1536k 512k",
        "write -z -u 8M 1M",
        "read -P 0 8M 1M",
        "discard 0 4k",
        "write -P 0x5a 12345 1000",
        "read -P 0x5a 12345 1000",
        "flush",
        "write -f -P 0x66 10M 64k",
        "read -P 0x66 10M 64k",
    ] {
        args.push("-c".into());
        args.push(c.into());
    }
    let (ok, out) = run("qemu-io", args).await;
    assert!(ok, "{out}");
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");

    // Read-only export: reads work, writes are refused.
    let ro = vec![
        "-r".into(),
        "-f".into(),
        "raw".into(),
        uri(&f, "ro"),
        "-c".into(),
        "read -P 0xcd 1536k 512k".into(),
    ];
    let (ok, out) = run("qemu-io", ro).await;
    assert!(ok && !out.contains("failed"), "{out}");

    require("qemu-img");
    let (ok, out) = run(
        "qemu-img",
        vec![
            "map".into(),
            "--output=json".into(),
            "-f".into(),
            "raw".into(),
            uri(&f, "disk"),
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("\"data\": true") && out.contains("\"data\": false"),
        "{out}"
    );
}

/// Runs a tool to completion; panics with its output if it fails.
fn tool(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Builds, with qemu-img and qemu-io, two backing chains in `dir` (backing
/// names relative, so a copy of `dir` is a copy of the chains):
///
/// - `base.raw` ← `mid.qcow2` ← `top.qcow2`, 4 MiB each, with data and zero
///   clusters in each layer;
/// - `base0.qcow2` ← `top0.qcow2`, 2 MiB, whose unallocated ranges are
///   unallocated in the whole chain (a raw base allocates everything).
fn make_chains(dir: &Path) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let qemu_io = |img: &str, fmt: &str, cmds: &[&str]| {
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.extend(["-c", c]);
        }
        let img = p(img);
        args.push(&img);
        tool("qemu-io", &args);
    };
    tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", &p("base.raw"), "4M"],
    );
    #[rustfmt::skip]
    tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &p("mid.qcow2")]);
    #[rustfmt::skip]
    tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", &p("top.qcow2")]);
    qemu_io("base.raw", "raw", &["write -P 0x11 0 1M"]);
    qemu_io(
        "mid.qcow2",
        "qcow2",
        &["write -P 0x22 1M 1M", "write -z 3M 512k"],
    );
    qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x33 2M 512k",
            "write -P 0x33 512k 64k",
            "write -z 3584k 256k",
        ],
    );

    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &p("base0.qcow2"), "2M"],
    );
    #[rustfmt::skip]
    tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base0.qcow2", "-F", "qcow2", &p("top0.qcow2")]);
    qemu_io("base0.qcow2", "qcow2", &["write -P 0x44 0 512k"]);
    qemu_io("top0.qcow2", "qcow2", &["write -P 0x55 1M 64k"]);
}

fn file_node(path: &Path) -> Arc<BlockNode> {
    let fd = FileDriver::open(&FileOptions {
        filename: path.to_str().unwrap().into(),
        direct: false,
        read_only: true,
    })
    .unwrap();
    BlockNode::new(
        format!("file-{}", path.display()),
        Box::new(fd),
        true,
        false,
    )
}

/// Opens a qcow2 image and its chain read-only through `Qcow2Driver`, each
/// backing as its header names it (relative names against the image's directory).
async fn open_chain(path: &Path) -> Arc<BlockNode> {
    let file = file_node(path);
    let backing = match read_header_backing(&file).await.unwrap() {
        None => None,
        Some(b) => {
            let bp = PathBuf::from(resolve_backing_filename(
                path.to_str().unwrap(),
                &b.filename,
            ));
            Some(match b.format.as_deref() {
                Some("raw") => {
                    let raw = RawDriver::open(file_node(&bp), RawOptions::default()).unwrap();
                    BlockNode::new(format!("raw-{}", bp.display()), Box::new(raw), true, false)
                }
                Some("qcow2") => Box::pin(open_chain(&bp)).await,
                other => panic!("backing format {other:?}"),
            })
        }
    };
    let d = Qcow2Driver::open(file, backing, true).await.unwrap();
    BlockNode::new(
        format!("qcow2-{}", path.display()),
        Box::new(d),
        true,
        false,
    )
}

/// A qemu-storage-daemon serving `exports` (name, image) of qcow2 chains over
/// a Unix socket, each with `allocation-depth: true`; killed on drop.
struct Qsd {
    child: std::process::Child,
    sock: PathBuf,
}

impl Qsd {
    fn start(dir: &Path, exports: &[(&str, &Path)]) -> Qsd {
        let sock = dir.join("qsd.sock");
        // Written once every option is applied: the exports exist by then.
        let pidfile = dir.join("qsd.pid");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--pidfile").arg(&pidfile);
        // qsd applies its options in order: the server before its exports.
        cmd.arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock.display()));
        for (i, (name, img)) in exports.iter().enumerate() {
            cmd.arg("--blockdev").arg(format!(
                "driver=qcow2,node-name=n{i},read-only=on,file.driver=file,file.filename={}",
                img.display()
            ));
            cmd.arg("--export").arg(format!(
                "type=nbd,id=e{i},node-name=n{i},name={name},allocation-depth=on"
            ));
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon");
        let mut q = Qsd { child, sock };
        let t0 = std::time::Instant::now();
        while !pidfile.exists() {
            if let Some(st) = q.child.try_wait().unwrap() {
                panic!("qemu-storage-daemon exited with {st} (its stderr is above)");
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(20),
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        q
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (offset, length, value) of one `nbdinfo --map` line.
type MapLine = (u64, u64, u32);

/// The lines of `nbdinfo --map` output.
fn map_lines(out: &str) -> Vec<MapLine> {
    out.lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert!(w.len() >= 3, "bad nbdinfo --map line {l:?}");
            (
                w[0].parse().unwrap(),
                w[1].parse().unwrap(),
                w[2].parse().unwrap(),
            )
        })
        .collect()
}

async fn nbdinfo(args: &[&str]) -> String {
    let (ok, out) = run("nbdinfo", args.iter().map(|s| s.to_string()).collect()).await;
    assert!(ok, "nbdinfo {args:?}: {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_allocation_depth_matches_qemu_storage_daemon() {
    for t in ["qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo"] {
        require(t);
    }
    tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let f = Fixture::new(0).await;
        let ours_dir = f.dir.path().join("ours");
        let qsd_dir = f.dir.path().join("qsd");
        std::fs::create_dir(&ours_dir).unwrap();
        make_chains(&ours_dir);
        tool(
            "cp",
            &["-a", ours_dir.to_str().unwrap(), qsd_dir.to_str().unwrap()],
        );

        let top = open_chain(&ours_dir.join("top.qcow2")).await;
        let top0 = open_chain(&ours_dir.join("top0.qcow2")).await;
        f.add_depth_node("top", top.clone());
        f.add_depth_node("top0", top0);
        f.add_node("plain", top, false, None);
        let qsd = Qsd::start(
            &qsd_dir,
            &[
                ("top", &qsd_dir.join("top.qcow2")),
                ("top0", &qsd_dir.join("top0.qcow2")),
            ],
        );

        const K: u64 = 1024;
        const M: u64 = 1024 * K;
        let expected: [(&str, Vec<MapLine>); 2] = [
            (
                "top",
                vec![
                    (0, 512 * K, 3),
                    (512 * K, 64 * K, 1),
                    (576 * K, 448 * K, 3),
                    (M, M, 2),
                    (2 * M, 512 * K, 1),
                    (2560 * K, 512 * K, 3),
                    (3 * M, 512 * K, 2),
                    (3584 * K, 256 * K, 1),
                    (3840 * K, 256 * K, 3),
                ],
            ),
            (
                "top0",
                vec![
                    (0, 512 * K, 2),
                    (512 * K, 512 * K, 0),
                    (M, 64 * K, 1),
                    (M + 64 * K, M - 64 * K, 0),
                ],
            ),
        ];
        for (export, want) in expected {
            let ours_uri = uri(&f, export);
            let qsd_uri = qsd.uri(export);
            let ours = nbdinfo(&["--map=qemu:allocation-depth", &ours_uri]).await;
            let theirs = nbdinfo(&["--map=qemu:allocation-depth", &qsd_uri]).await;
            assert_eq!(map_lines(&theirs), want, "qsd, {export}:\n{theirs}");
            assert_eq!(ours, theirs, "{export}: livesnap vs qemu-storage-daemon");
            // base:allocation answers alongside are the same as QEMU's too.
            let ours = nbdinfo(&["--map", &ours_uri]).await;
            let theirs = nbdinfo(&["--map", &qsd_uri]).await;
            assert_eq!(ours, theirs, "{export}: base:allocation");
            // Both contexts are listed for the export.
            let info = nbdinfo(&[&ours_uri]).await;
            assert!(
                info.contains("base:allocation") && info.contains("qemu:allocation-depth"),
                "{info}"
            );
        }

        // Same chain, exported without allocation-depth: not offered.
        let plain = uri(&f, "plain");
        let info = nbdinfo(&[&plain]).await;
        assert!(
            info.contains("base:allocation") && !info.contains("qemu:allocation-depth"),
            "{info}"
        );
        let (ok, out) = run(
            "nbdinfo",
            vec!["--map=qemu:allocation-depth".into(), plain.clone()],
        )
        .await;
        assert!(!ok && out.contains("qemu:allocation-depth"), "{out}");
        drop(qsd);
    })
    .await
    .expect("timed out");
}
