//! livesnapd served to the real NBD clients: qemu-io, qemu-img, nbdinfo and
//! nbdcopy, over `nbd+unix://` and `nbd://`. Every write made through the
//! daemon is replayed with qemu-io directly on a plain copy, and the two files
//! must end up byte for byte equal.

use livesnap_testkit as harness;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use harness::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A qemu-io script covering each request type, with unaligned and overlapping writes.
const SCRIPT: &[&str] = &[
    "write -P 0x11 0 1M",
    "aio_write -P 0x22 2M 512k",
    "aio_write -P 0x23 3M 64k",
    "aio_write -P 0x24 3211264 64k",
    "aio_flush",
    // Overlapping writes only in sequence: concurrent ones have no defined order.
    "write -P 0x25 3178496 64k",
    "write -P 0x33 7340155 4097",
    "write -z 4M 1M",
    "write -P 0x44 5M 2M",
    "discard 5M 1M",
    "write -z 6291968 4096",
    "write -P 0x55 63M 1M",
    "write -f -P 0x66 12M 8k",
    "flush",
];

/// `qemu-img compare` of two raw images: Ok when equal, Err(output) otherwise.
fn qemu_img_compare(a: &str, b: &str) -> Result<(), String> {
    let (st, out, err) =
        run_status(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
    match st.code() {
        Some(0) => Ok(()),
        Some(1) => Err(out),
        _ => panic!("qemu-img compare {a} {b} failed: {out}{err}"),
    }
}

fn files_equal(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(x.len(), y.len(), "sizes differ");
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i}: {} vs {}",
            a.display(),
            b.display(),
            x[i],
            y[i]
        );
    }
}

/// Runs SCRIPT through the daemon and directly on a copy; returns (daemon image, reference).
fn write_through_daemon(tcp: bool, extra: &[&str]) -> (tempfile::TempDir, Livesnapd) {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    let reference = dir.path().join("reference.img");
    sparse_file(&served, SIZE);
    sparse_file(&reference, SIZE);
    let d = if tcp {
        Livesnapd::with_image_tcp(&served)
    } else {
        Livesnapd::with_image(&served, extra)
    };
    qemu_io(d.url(), "raw", SCRIPT);
    qemu_io(reference.to_str().unwrap(), "raw", SCRIPT);
    // Reads through the daemon see the same bytes as the reference file.
    qemu_img_compare(d.url(), reference.to_str().unwrap()).unwrap();
    (dir, d)
}

#[test]
fn qemu_io_over_unix_socket_matches_plain_file() {
    let (dir, d) = write_through_daemon(false, &[]);
    let status = d.stop_with(libc::SIGTERM);
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    files_equal(
        &dir.path().join("served.img"),
        &dir.path().join("reference.img"),
    );
}

#[test]
fn qemu_io_over_tcp_matches_plain_file() {
    let (dir, d) = write_through_daemon(true, &[]);
    assert!(d.url().starts_with("nbd://127.0.0.1:"), "{}", d.url());
    assert!(d.stop_with(libc::SIGINT).success());
    files_equal(
        &dir.path().join("served.img"),
        &dir.path().join("reference.img"),
    );
}

#[test]
fn qemu_io_with_cache_direct_matches_plain_file() {
    // O_DIRECT needs aligned I/O; the unaligned writes of SCRIPT go through
    // the block layer's read-modify-write.
    let (dir, d) = write_through_daemon(false, &["--cache-direct"]);
    assert!(d.stop_with(libc::SIGTERM).success());
    files_equal(
        &dir.path().join("served.img"),
        &dir.path().join("reference.img"),
    );
}

/// True when process `pid` has an io_uring instance open.
fn has_io_uring(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_string_lossy().contains("io_uring"))
}

/// Serves a raw image through a `file` node added over QMP with `file`'s
/// options (`aio`, `cache`), in a daemon with `env`; runs SCRIPT through it
/// and on a plain copy, and checks reads through the daemon and, after it
/// stops, the files are the same. `ring`: whether the daemon must have set
/// up io_uring.
fn script_through_file_node(env: &[(&str, &str)], file: Value, ring: bool) {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    let reference = dir.path().join("reference.img");
    sparse_file(&served, SIZE);
    sparse_file(&reference, SIZE);
    let d = Livesnapd::bare_with_env(env);
    let mut file_opts = json!({"driver": "file", "filename": served.to_str().unwrap()});
    file_opts
        .as_object_mut()
        .unwrap()
        .extend(file.as_object().unwrap().clone());
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "disk", "file": file_opts}),
    );
    let sock = d.dir.path().join("nbd.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true}),
    );
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    qemu_io(&url, "raw", SCRIPT);
    qemu_io(reference.to_str().unwrap(), "raw", SCRIPT);
    if let Err(out) = qemu_img_compare(&url, reference.to_str().unwrap()) {
        panic!("{file}: reads through the daemon differ: {out}");
    }
    drop(q);
    assert_eq!(has_io_uring(d.pid()), ring, "io_uring set up with {file}");
    assert!(d.stop_with(libc::SIGTERM).success(), "{file}");
    files_equal(&served, &reference);
}

#[test]
fn qemu_io_through_each_aio_engine() {
    for (aio, direct) in [
        ("io_uring", false),
        ("io_uring", true),
        ("threads", false),
        ("threads", true),
        // Served by io_uring (QEMU's Linux AIO needs O_DIRECT, so does livesnapd's).
        ("native", true),
    ] {
        let file = json!({"aio": aio, "cache": {"direct": direct}});
        script_through_file_node(&[], file, aio != "threads");
    }
    // No `aio`: io_uring, where the kernel allows it (it does where these tests run).
    script_through_file_node(&[], json!({}), true);
}

#[test]
fn aio_native_needs_cache_direct() {
    let d = Livesnapd::bare();
    let img = sparse_file(d.dir.path().join("a.img"), MIB);
    let e = d
        .qmp()
        .execute(
            "blockdev-add",
            json!({"driver": "file", "node-name": "f", "filename": img.to_str().unwrap(),
                   "aio": "native"}),
        )
        .unwrap_err();
    assert_eq!(
        e,
        (
            "GenericError".to_string(),
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .to_string()
        )
    );
}

/// With io_uring refused (as by seccomp or `kernel.io_uring_disabled`), the
/// daemon serves through its thread pool, also to a node that asks for
/// io_uring (QEMU 10 falls back the same way).
#[test]
fn serves_where_io_uring_is_refused() {
    let off = [("LIVESNAP_DISABLE_IO_URING", "1")];
    script_through_file_node(&off, json!({}), false);
    let file = json!({"aio": "io_uring", "cache": {"direct": true}});
    script_through_file_node(&off, file, false);
}

#[test]
fn qemu_img_info_compare_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    sparse_file(&served, SIZE);
    let d = Livesnapd::with_image(&served, &[]);
    let url = d.url().to_string();

    let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img").args([
        "info",
        "--output=json",
        &url,
    ])))
    .unwrap();
    assert_eq!(info["virtual-size"], SIZE);
    assert_eq!(info["format"], "raw");

    // convert into the daemon: a random-ish source image written over NBD.
    let source = dir.path().join("source.img");
    let mut data = pattern(7, SIZE as usize);
    data[(8 * MIB) as usize..(16 * MIB) as usize].fill(0);
    std::fs::write(&source, &data).unwrap();
    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        source.to_str().unwrap(),
        &url,
    ]));
    qemu_img_compare(source.to_str().unwrap(), &url).unwrap();

    // convert out of the daemon, into a new file.
    let copy = dir.path().join("copy.img");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &url,
        copy.to_str().unwrap(),
    ]));
    files_equal(&source, &copy);

    // qemu-img compare notices a difference made through the daemon.
    qemu_io(&url, "raw", &["write -P 0x99 1M 4k"]);
    assert!(
        qemu_img_compare(source.to_str().unwrap(), &url).is_err(),
        "compare must report a difference made through the daemon"
    );
}

#[test]
fn nbdinfo_list_map_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    sparse_file(&served, SIZE);
    let d = Livesnapd::with_image(&served, &[]);
    let url = d.url().to_string();
    qemu_io(
        &url,
        "raw",
        &["write -P 0x01 1M 1M", "write -P 0x02 10M 64k"],
    );

    let list = run(Command::new("nbdinfo").args(["--list", &url]));
    assert!(list.contains("export=\"disk\""), "{list}");

    let json: serde_json::Value =
        serde_json::from_str(&run(Command::new("nbdinfo").args(["--json", &url]))).unwrap();
    let export = &json["exports"][0];
    assert_eq!(export["export-size"], SIZE);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_fast_zero"], true);
    assert_eq!(export["can_cache"], true);
    assert_eq!(export["block_size_preferred"], 4096);
    assert!(json["protocol"] == "newstyle-fixed", "{json}");
    assert_eq!(json["TLS"], false);

    // --map: data exactly where written, holes elsewhere (HOLE|ZERO = 3).
    let map = run(Command::new("nbdinfo").args(["--map", &url]));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, MIB, 3),
            (MIB, MIB, 0),
            (2 * MIB, 8 * MIB, 3),
            (10 * MIB, 64 * 1024, 0),
            (10 * MIB + 64 * 1024, SIZE - 10 * MIB - 64 * 1024, 3),
        ],
        "{map}"
    );
}

#[test]
fn nbdcopy_in_and_out_with_several_connections() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    sparse_file(&served, SIZE);
    let source = dir.path().join("source.img");
    std::fs::write(&source, pattern(3, SIZE as usize)).unwrap();
    let d = Livesnapd::with_image(&served, &[]);
    let url = d.url().to_string();
    run(Command::new("nbdcopy").args([
        "--connections=4",
        "--flush",
        source.to_str().unwrap(),
        &url,
    ]));
    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").args(["--connections=4", &url, back.to_str().unwrap()]));
    files_equal(&source, &back);
    assert!(d.stop_with(libc::SIGTERM).success());
    files_equal(&source, &served);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    std::fs::write(&served, pattern(5, MIB as usize)).unwrap();
    let d = Livesnapd::with_image(&served, &["--read-only"]);
    let url = d.url().to_string();
    let json: serde_json::Value =
        serde_json::from_str(&run(Command::new("nbdinfo").args(["--json", &url]))).unwrap();
    assert_eq!(json["exports"][0]["is_read_only"], true);
    assert_eq!(
        json["exports"][0]["can_trim"], false,
        "as qemu-storage-daemon"
    );
    assert_eq!(
        json["exports"][0]["can_zero"], false,
        "as qemu-storage-daemon"
    );
    let (_, out, err) =
        run_status(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 0 4k", &url]));
    let text = out + &err;
    assert!(
        text.contains("Operation not permitted") || text.contains("Permission denied"),
        "write to a read-only export must fail: {text}"
    );
    drop(d);
    assert_eq!(std::fs::read(&served).unwrap(), pattern(5, MIB as usize));
}

/// qemu-io and qemu-img 10.0 ask for extended headers and get them: the
/// trace shows the ACK and extended reply chunks (never a simple reply),
/// and writes, reads, zeroes and the allocation map come out right.
#[test]
fn qemu_negotiates_extended_headers() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    sparse_file(&served, SIZE);
    let d = Livesnapd::with_image(&served, &[]);
    let (st, out, err) = run_status(Command::new("qemu-io").args([
        "--trace",
        "nbd_receive_option_reply",
        "--trace",
        "nbd_receive_reply_chunk_header",
        "--trace",
        "nbd_receive_simple_reply",
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 1M",
        "-c",
        "write -z 3M 64k",
        "-c",
        "read -P 0x5a 1M 1M",
        "-c",
        "read -P 0 0 1M",
        "-c",
        "flush",
        d.url(),
    ]));
    let text = format!("{out}{err}");
    assert!(st.success(), "qemu-io over extended headers failed: {text}");
    assert!(
        text.contains("Received option reply 11 (extended headers), type 1 (ack)"),
        "qemu-io did not get extended headers: {text}"
    );
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("nbd_receive_simple_reply"),
        "{text}"
    );
    assert!(
        text.contains("type = 0 (none)") && text.contains("type = 1 (data)"),
        "replies should be extended chunks: {text}"
    );
    // Block status over extended headers: exactly the written megabyte is data.
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", d.url()]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(MIB, MIB)], "qemu-img map: {map}");
}

/// A client past `--max-connections` is told why, in qemu-img's and
/// nbdinfo's own error output.
#[test]
fn client_past_max_connections_gets_a_clear_refusal() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.img");
    sparse_file(&served, SIZE);
    let d = Livesnapd::with_image(&served, &["--max-connections", "1"]);
    let mut held = std::os::unix::net::UnixStream::connect(d.dir.path().join("nbd.sock")).unwrap();
    held.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // The greeting proves the daemon counted this connection.
    let mut greeting = [0u8; 18];
    held.read_exact(&mut greeting).unwrap();
    let (st, out, err) = run_status(Command::new("qemu-img").args(["info", d.url()]));
    let text = format!("{out}{err}");
    assert!(!st.success(), "a client past the limit was served: {text}");
    assert!(
        text.contains("server is at its limit of 1 connections (max-connections)"),
        "qemu-img should print why it was refused: {text}"
    );
    // libnbd 1.14 reports the refusal of NBD_OPT_GO without the server's text.
    let (st, out, err) = run_status(Command::new("nbdinfo").arg(d.url()));
    let text = format!("{out}{err}");
    assert!(!st.success(), "a client past the limit was served: {text}");
    assert!(
        text.contains("server replied with error to opt_go request"),
        "nbdinfo should report the refusal: {text}"
    );
    drop(held);
    // The slot is free again once the held client leaves.
    let t0 = std::time::Instant::now();
    loop {
        let (st, out, err) = run_status(Command::new("nbdinfo").arg("--size").arg(d.url()));
        if st.success() {
            assert_eq!(out.trim(), SIZE.to_string());
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "the slot never came back: {out}{err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
