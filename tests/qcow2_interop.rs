//! qcow2 chains served by livesnapd, checked with QEMU's own tools.
//!
//! Chains are made by `qemu-img create -b ... -F ...` and written by `qemu-io`
//! directly, so every layer is QEMU's. livesnapd serves the top (from the
//! command line or over QMP), `qemu-io` writes a script through it over NBD,
//! and the same script is run by `qemu-io` directly on a `cp` of the chain.
//! Afterwards `qemu-img check` must find every layer clean, the lower layers
//! must be untouched and `qemu-img compare` must find the two tops equal.
//! Snapshots taken by livesnapd are opened by `qemu-img` and by a real
//! qemu-storage-daemon, and its `query-named-block-nodes` is compared with
//! qsd's for the same chain.

use livesnap_testkit as harness;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::*;
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Virtual size of every test chain.
const SIZE: u64 = 64 * MIB;

/// What `qemu-io` writes into the raw base (the rest stays a hole).
const BASE_WRITES: &[&str] = &[
    "write -P 0xa1 0 4M",
    "write -P 0xa2 16M 2M",
    "write -P 0xa3 40M 8M",
    "write -P 0xa4 52M 4M",
];
/// What `qemu-io` writes into the middle layer: data over base data and
/// over holes, and zero clusters over base data.
const MID_WRITES: &[&str] = &[
    "write -P 0xb1 2M 4M",
    "write -z 17M 512k",
    "write -P 0xb2 30M 1M",
];
/// What `qemu-io` writes into the top layer before it is served.
const TOP_WRITES: &[&str] = &[
    "write -P 0xc1 5M 1M",
    "write -P 0xc2 42M 64k",
    "write -z 53M 64k",
];

/// The guest writes, through livesnapd over NBD and directly on the copy.
/// Offsets are chosen against the layers above (in bytes where unaligned).
const SCRIPT: &[&str] = &[
    // Partial clusters over base data: copy-on-write from two layers down.
    "write -P 0x11 4096 512",
    // Over the top's own data, across a cluster boundary (5M + 1000).
    "write -P 0x12 5243880 70000",
    // Over mid data, several clusters, unaligned at both ends (2M + 65 KiB).
    "write -P 0x13 2163712 300000",
    // Partial cluster over mid's zero cluster (17M + 4 KiB).
    "write -P 0x14 17829888 8192",
    // Partial cluster where no layer has data (20M + 100).
    "write -P 0x15 20971620 1000",
    // Zeroes: partial over mid data (3M + 512), aligned over base data,
    // with unmap over base data, partial with unmap (31M - 4 KiB).
    "write -z 3146240 102400",
    "write -z 41M 1M",
    "write -z -u 16M 1M",
    "write -z -u 32501760 12288",
    // Discard over lower layers' data and over the top's own data: both
    // read as zeroes afterwards (QEMU's qcow2 with a backing file).
    "discard 6M 2M",
    "discard 42M 64k",
    // Concurrent writes, never overlapping; two share one 64 KiB cluster
    // over base data (52M, 52M + 8 KiB).
    "aio_write -P 0x21 48M 64k",
    "aio_write -P 0x22 51380736 1000",
    "aio_write -P 0x23 52428288 4096",
    "aio_write -P 0x24 54525952 4096",
    "aio_write -P 0x25 54534144 4096",
    "aio_write -P 0x26 44M 1M",
    "aio_flush",
    // Overwrites in sequence of what the aio writes wrote.
    "write -P 0x27 50331904 256",
    // Up to the last byte of the disk (63M + 12345).
    "write -P 0x31 66072633 1036231",
    "flush",
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_img(dir: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new("qemu-img");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    run(cmd.args(args))
}

/// `qemu-img compare`: Ok when the guest-visible contents are equal.
fn compare(a_fmt: &str, a: &str, b_fmt: &str, b: &str) -> Result<(), String> {
    let (st, out, err) =
        run_status(Command::new("qemu-img").args(["compare", "-f", a_fmt, "-F", b_fmt, a, b]));
    match st.code() {
        Some(0) => Ok(()),
        Some(1) => Err(out),
        _ => panic!("qemu-img compare {a} {b} failed: {out}{err}"),
    }
}

/// `qemu-img check` finds no corruption, no leak and no error.
fn check_clean(image: &Path) {
    let (st, out, err) =
        run_status(Command::new("qemu-img").args(["check", "--output=json", s(image)]));
    assert!(
        st.success(),
        "qemu-img check {}: {st}\n{out}{err}",
        image.display()
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    for k in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v.get(k).and_then(Value::as_u64).unwrap_or(0), 0, "{out}");
    }
    assert_eq!(v["format"], "qcow2", "{out}");
}

fn checksum(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = DefaultHasher::new();
    h.write(&data);
    h.finish()
}

fn files_equal(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i}: {:#x} vs {:#x}",
            a.display(),
            b.display(),
            x[i],
            y[i]
        );
    }
}

/// Copies files as they are (sparse), keeping their names.
fn copy_files(from: &Path, to: &Path, names: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for n in names {
        run(Command::new("cp").args([s(&from.join(n)), s(&to.join(n))]));
    }
}

/// `qemu-img convert` of a qcow2 image (with its chain) to a new raw file.
fn to_raw(image: &Path, raw: &Path) {
    qemu_img(
        None,
        &["convert", "-f", "qcow2", "-O", "raw", s(image), s(raw)],
    );
}

/// The test chains; every name is relative, so a `cp` of the directory is
/// the same chain.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chain {
    /// base (raw) ← mid (qcow2) ← top (qcow2), 64 KiB clusters.
    Three,
    /// base (raw) ← top (qcow2 with 4 KiB clusters).
    TwoSmallClusters,
}

impl Chain {
    /// Layer file names, bottom first.
    fn names(self) -> &'static [&'static str] {
        match self {
            Chain::Three => &["base", "mid", "top"],
            Chain::TwoSmallClusters => &["base", "top"],
        }
    }

    /// Creates the chain in `dir` with QEMU's tools.
    fn build(self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let size = SIZE.to_string();
        qemu_img(Some(dir), &["create", "-q", "-f", "raw", "base", &size]);
        qemu_io(s(&dir.join("base")), "raw", BASE_WRITES);
        match self {
            Chain::Three => {
                qemu_img(
                    Some(dir),
                    &[
                        "create", "-q", "-f", "qcow2", "-b", "base", "-F", "raw", "mid",
                    ],
                );
                qemu_io(s(&dir.join("mid")), "qcow2", MID_WRITES);
                qemu_img(
                    Some(dir),
                    &[
                        "create", "-q", "-f", "qcow2", "-b", "mid", "-F", "qcow2", "top",
                    ],
                );
            }
            Chain::TwoSmallClusters => {
                qemu_img(
                    Some(dir),
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        "cluster_size=4096",
                        "-b",
                        "base",
                        "-F",
                        "raw",
                        "top",
                    ],
                );
            }
        }
        qemu_io(s(&dir.join("top")), "qcow2", TOP_WRITES);
        let info: Value = serde_json::from_str(&qemu_img(
            None,
            &["info", "--output=json", s(&dir.join("top"))],
        ))
        .unwrap();
        let cluster = if self == Chain::Three { 65536 } else { 4096 };
        assert_eq!(info["cluster-size"], cluster, "{info}");
    }
}

/// How livesnapd gets the chain.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Serve {
    /// `livesnapd --image top --format qcow2`: the chain from the headers.
    Cli,
    /// Bare livesnapd, `blockdev-add` over QMP: the file child by node name
    /// and the backing given explicitly (inline for the three-layer chain,
    /// by node name for the two-layer one).
    Qmp,
}

/// A daemon serving `dir/top` and the NBD URI of its writable export.
fn serve(chain: Chain, how: Serve, dir: &Path) -> (Livesnapd, String) {
    let top = dir.join("top");
    match how {
        Serve::Cli => {
            let d = Livesnapd::with_image(&top, &["--format", "qcow2"]);
            let url = d.url().to_string();
            (d, url)
        }
        Serve::Qmp => {
            let d = Livesnapd::bare();
            let mut q = d.qmp();
            q.ok(
                "blockdev-add",
                json!({"driver": "file", "node-name": "top-file", "filename": s(&top)}),
            );
            let backing = match chain {
                // Inline, itself opening its backing from its header.
                Chain::Three => json!({"driver": "qcow2",
                    "file": {"driver": "file", "filename": s(&dir.join("mid"))}}),
                Chain::TwoSmallClusters => {
                    q.ok(
                        "blockdev-add",
                        json!({"driver": "raw", "node-name": "base", "read-only": true,
                               "file": {"driver": "file", "filename": s(&dir.join("base"))}}),
                    );
                    json!("base")
                }
            };
            q.ok(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "top", "file": "top-file",
                       "backing": backing}),
            );
            let sock = d.dir.path().join("nbd.sock");
            q.ok(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": s(&sock)}}}),
            );
            q.ok(
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "top", "writable": true}),
            );
            // The chain livesnapd opened is the one in the headers.
            let nodes = q.ok("query-named-block-nodes", Value::Null);
            let top_node = nodes
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node-name"] == "top")
                .unwrap();
            let depth = chain.names().len() as u64 - 1;
            assert_eq!(top_node["backing_file_depth"], depth, "{top_node}");
            let url = format!("nbd+unix:///top?socket={}", sock.display());
            (d, url)
        }
    }
}

/// The whole round: serve, read, write the script through livesnapd and
/// directly on a copy, stop, check, compare.
fn script_through_daemon(chain: Chain, how: Serve) {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    let reference = tmp.path().join("reference");
    chain.build(&served);
    copy_files(&served, &reference, chain.names());
    let lower = &chain.names()[..chain.names().len() - 1];
    let sums: Vec<u64> = lower.iter().map(|n| checksum(&served.join(n))).collect();
    let before = tmp.path().join("before.raw");
    to_raw(&served.join("top"), &before);

    let (d, url) = serve(chain, how, &served);
    // Reads through the chain: every byte equals QEMU's own conversion.
    let read = tmp.path().join("read.raw");
    run(Command::new("nbdcopy").args([&url, s(&read)]));
    files_equal(&before, &read);

    qemu_io(&url, "raw", SCRIPT);
    let ref_top = reference.join("top");
    qemu_io(s(&ref_top), "qcow2", SCRIPT);
    // While the daemon runs, reads through it match the reference chain.
    compare("raw", &url, "qcow2", s(&ref_top))
        .unwrap_or_else(|e| panic!("{chain:?}/{how:?}: NBD export differs from reference: {e}"));

    let status = d.stop_with(libc::SIGTERM);
    assert!(status.success(), "SIGTERM must exit 0, got {status}");

    for n in chain.names().iter().filter(|n| **n != "base") {
        check_clean(&served.join(n));
    }
    check_clean(&ref_top);
    for (n, sum) in lower.iter().zip(&sums) {
        assert_eq!(
            checksum(&served.join(n)),
            *sum,
            "{chain:?}/{how:?}: lower layer {n} changed"
        );
    }
    compare("qcow2", s(&served.join("top")), "qcow2", s(&ref_top))
        .unwrap_or_else(|e| panic!("{chain:?}/{how:?}: image differs from reference: {e}"));
    // The header still names the same backing file and format.
    let info: Value = serde_json::from_str(&qemu_img(
        None,
        &["info", "--output=json", s(&served.join("top"))],
    ))
    .unwrap();
    let below = lower.last().unwrap();
    assert_eq!(info["backing-filename"], *below, "{info}");
}

#[test]
fn three_layer_chain_from_cli_matches_qemu_io() {
    script_through_daemon(Chain::Three, Serve::Cli);
}

#[test]
fn three_layer_chain_over_qmp_matches_qemu_io() {
    script_through_daemon(Chain::Three, Serve::Qmp);
}

#[test]
fn small_cluster_chain_from_cli_matches_qemu_io() {
    script_through_daemon(Chain::TwoSmallClusters, Serve::Cli);
}

#[test]
fn small_cluster_chain_over_qmp_matches_qemu_io() {
    script_through_daemon(Chain::TwoSmallClusters, Serve::Qmp);
}

/// Runs of (start, length, data, zero), adjacent runs with equal flags merged.
type Runs = Vec<(u64, u64, bool, bool)>;

fn push_run(runs: &mut Runs, start: u64, len: u64, data: bool, zero: bool) {
    if let Some(last) = runs.last_mut() {
        if last.2 == data && last.3 == zero && last.0 + last.1 == start {
            last.1 += len;
            return;
        }
    }
    runs.push((start, len, data, zero));
}

/// `nbdinfo --map` of base:allocation.
fn nbd_map(url: &str) -> Runs {
    let out = run(Command::new("nbdinfo").args(["--map", url]));
    let mut runs = Vec::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags: u32 = f[2].parse().unwrap();
        push_run(
            &mut runs,
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            flags & 1 == 0,
            flags & 2 != 0,
        );
    }
    runs
}

/// `qemu-img map` of a chain, in the same terms.
fn qemu_map(image: &Path) -> Runs {
    let out = qemu_img(None, &["map", "-U", "--output=json", s(image)]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut runs = Vec::new();
    for e in v.as_array().unwrap() {
        push_run(
            &mut runs,
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
        );
    }
    runs
}

#[test]
fn map_shows_data_of_every_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("chain");
    Chain::Three.build(&dir);
    let top = dir.join("top");
    let d = Livesnapd::with_image(&top, &["--format", "qcow2"]);
    let map = nbd_map(d.url());
    assert_eq!(map, qemu_map(&top), "nbdinfo --map vs qemu-img map");
    // By hand: data where any layer has data, zeroes where the topmost
    // layer that has the range says zero or where no layer has data.
    let data = |a: u64, b: u64| (a, b - a, true, false);
    let zero = |a: u64, b: u64| (a, b - a, false, true);
    assert_eq!(
        map,
        vec![
            data(0, 6 * MIB),
            zero(6 * MIB, 16 * MIB),
            data(16 * MIB, 17 * MIB),
            zero(17 * MIB, 17 * MIB + 512 * KIB),
            data(17 * MIB + 512 * KIB, 18 * MIB),
            zero(18 * MIB, 30 * MIB),
            data(30 * MIB, 31 * MIB),
            zero(31 * MIB, 40 * MIB),
            data(40 * MIB, 48 * MIB),
            zero(48 * MIB, 52 * MIB),
            data(52 * MIB, 53 * MIB),
            zero(53 * MIB, 53 * MIB + 64 * KIB),
            data(53 * MIB + 64 * KIB, 56 * MIB),
            zero(56 * MIB, SIZE),
        ]
    );

    // After the script (flushed, so the metadata is on disk), the map over
    // NBD still agrees with qemu-img's reading of the files.
    qemu_io(d.url(), "raw", SCRIPT);
    let after = nbd_map(d.url());
    assert_eq!(after, qemu_map(&top), "after the script");
    assert_ne!(after, map);
}

// ---------------------------------------------------------------------------
// External snapshots.

/// Applies `script` with qemu-io to a copy of `raw` named `to`.
fn raw_after(raw: &Path, to: &Path, script: &[&str]) {
    std::fs::copy(raw, to).unwrap();
    qemu_io(s(to), "raw", script);
}

/// Filenames and formats of `qemu-img info --backing-chain`, top first.
fn backing_chain(image: &Path) -> Vec<(String, String)> {
    let out = qemu_img(
        None,
        &["info", "-U", "--backing-chain", "--output=json", s(image)],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["filename"].as_str().unwrap().to_string(),
                i["format"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The (start, length) runs `qemu-img map` reports at depth 0 (allocated in
/// the image itself, data or zero).
fn own_runs(image: &Path) -> Vec<(u64, u64)> {
    let out = qemu_img(None, &["map", "-U", "--output=json", s(image)]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["depth"] != 0 || !e["present"].as_bool().unwrap() {
            continue;
        }
        let (a, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == a => last.1 += l,
            _ => runs.push((a, l)),
        }
    }
    runs
}

const P1: &[&str] = &[
    "write -P 0x51 1M 64k",
    "write -P 0x52 8389120 4096",
    "flush",
];
const P2: &[&str] = &[
    // Partial cluster over data the old top holds: copy-on-write from it.
    "write -P 0x61 1052672 4096",
    "write -P 0x62 20M 1M",
    "write -z 8M 64k",
    "flush",
];
const P3: &[&str] = &["write -P 0x71 30M 64k", "discard 1M 64k", "flush"];
const P4: &[&str] = &["write -P 0x81 60M 128k", "flush"];

#[test]
fn external_snapshots_make_a_chain_qemu_reads() {
    let tmp = tempfile::tempdir().unwrap();
    // Canonical, as the absolute backing names livesnapd writes.
    let dir = std::fs::canonicalize(tmp.path()).unwrap().join("chain");
    Chain::TwoSmallClusters.build(&dir);
    let (top, base) = (dir.join("top"), dir.join("base"));
    let base_sum = checksum(&base);
    // The expected contents after each step, made by qemu-io on raw copies.
    let r0 = tmp.path().join("r0.raw");
    to_raw(&top, &r0);
    let (r1, r2, r3, r4) = (
        tmp.path().join("r1.raw"),
        tmp.path().join("r2.raw"),
        tmp.path().join("r3.raw"),
        tmp.path().join("r4.raw"),
    );
    raw_after(&r0, &r1, P1);
    raw_after(&r1, &r2, P2);
    raw_after(&r2, &r3, P3);
    raw_after(&r3, &r4, P4);

    let d = Livesnapd::with_image(&top, &["--format", "qcow2"]);
    let url = d.url().to_string();
    let mut q = d.qmp();
    qemu_io(&url, "raw", P1);

    // blockdev-snapshot-sync by `device` (livesnapd takes a node name there).
    let snap1 = dir.join("snap1.qcow2");
    q.ok(
        "blockdev-snapshot-sync",
        json!({"device": "disk", "snapshot-file": s(&snap1),
               "snapshot-node-name": "snap1", "format": "qcow2"}),
    );
    let top_sum = checksum(&top);
    qemu_io(&url, "raw", P2);
    // The export now writes into the overlay; the old top is the disk at
    // the moment of the snapshot, and stays so.
    compare("raw", &url, "raw", s(&r2)).unwrap();
    compare("qcow2", s(&top), "raw", s(&r1)).unwrap();
    assert_eq!(
        checksum(&top),
        top_sum,
        "the old top changed after the snapshot"
    );
    let mut own = own_runs(&snap1);
    own.sort();
    assert_eq!(
        own,
        vec![(MIB, 64 * KIB), (8 * MIB, 64 * KIB), (20 * MIB, MIB)],
        "the overlay holds exactly what was written after the snapshot"
    );
    // The old top is read-only now: a writable export of it is refused; a
    // read-only one shows the point-in-time image.
    let e = q
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "old", "node-name": "disk", "writable": true}),
        )
        .unwrap_err();
    assert_eq!(e.1, "Cannot export read-only node as writable");
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "old", "node-name": "disk", "name": "old"}),
    );
    let old_url = url.replace("/disk?", "/old?");
    assert_ne!(old_url, url);
    compare("raw", &old_url, "raw", s(&r1)).unwrap();
    let (_, out, err) =
        run_status(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &old_url]));
    assert!(
        (out.clone() + &err).contains("Operation not permitted")
            || (out.clone() + &err).contains("Permission denied"),
        "{out}{err}"
    );
    // The clients above are gone, though the daemon may not have seen it yet.
    wait_until(Duration::from_secs(10), "export 'old' to be unused", || {
        q.execute("block-export-del", json!({"id": "old"})).is_ok()
    });

    // blockdev-snapshot with an overlay made by qemu-img, added with backing null.
    let snap2 = dir.join("snap2.qcow2");
    qemu_img(
        Some(&dir),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "snap1.qcow2",
            "-F",
            "qcow2",
            "snap2.qcow2",
        ],
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "snap2", "backing": null,
               "file": {"driver": "file", "filename": s(&snap2)}}),
    );
    q.ok(
        "blockdev-snapshot",
        json!({"node": "snap1", "overlay": "snap2"}),
    );
    let snap1_sum = checksum(&snap1);
    qemu_io(&url, "raw", P3);
    compare("raw", &url, "raw", s(&r3)).unwrap();
    compare("qcow2", s(&snap1), "raw", s(&r2)).unwrap();
    // Once attached the overlay cannot be used again, and only the top of
    // the chain can be snapshotted (QEMU's texts).
    let e = q
        .execute(
            "blockdev-snapshot",
            json!({"node": "snap1", "overlay": "snap2"}),
        )
        .unwrap_err();
    assert_eq!(
        e.1,
        "Node 'snap1' is busy: node is used as backing hd of 'snap2'"
    );
    let e = q
        .execute(
            "blockdev-snapshot",
            json!({"node": "snap2", "overlay": "snap2"}),
        )
        .unwrap_err();
    assert_eq!(e.1, "The overlay is already in use");

    // blockdev-snapshot-sync by node-name onto an existing image.
    let snap3 = dir.join("snap3.qcow2");
    qemu_img(
        Some(&dir),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "snap2.qcow2",
            "-F",
            "qcow2",
            "snap3.qcow2",
        ],
    );
    q.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "snap2", "snapshot-file": s(&snap3),
               "snapshot-node-name": "snap3", "mode": "existing"}),
    );
    qemu_io(&url, "raw", P4);
    compare("raw", &url, "raw", s(&r4)).unwrap();

    // The monitor shows the chain: snap3 → snap2 → snap1 → top → base.
    let nodes = q.ok("query-named-block-nodes", Value::Null);
    let snap3_node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "snap3")
        .unwrap();
    assert_eq!(snap3_node["backing_file_depth"], 4, "{snap3_node}");
    assert_eq!(snap3_node["ro"], false);
    let mut img = &snap3_node["image"];
    let mut files = Vec::new();
    while img.is_object() {
        files.push(img["filename"].as_str().unwrap().to_string());
        img = &img["backing-image"];
    }
    assert_eq!(
        files,
        [&snap3, &dir.join("snap2.qcow2"), &snap1, &top, &base]
            .iter()
            .map(|p| s(p).to_string())
            .collect::<Vec<_>>()
    );
    for n in ["disk", "snap1", "snap2"] {
        let node = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["node-name"] == n)
            .unwrap();
        assert_eq!(node["ro"], true, "{n} must be read-only after the snapshot");
    }
    let exports = q.ok("query-block-exports", Value::Null);
    assert_eq!(exports[0]["node-name"], "snap3", "{exports}");

    drop(q);
    assert!(d.stop_with(libc::SIGTERM).success());

    // QEMU's tools accept the images livesnapd created and attached.
    for img in [&top, &snap1, &snap2, &snap3] {
        check_clean(img);
    }
    assert_eq!(checksum(&base), base_sum, "base changed");
    assert_eq!(
        checksum(&snap1),
        snap1_sum,
        "snap1 changed after its snapshot"
    );
    let chain = backing_chain(&snap3);
    let want: Vec<(String, String)> = [
        (s(&snap3), "qcow2"),
        (s(&snap2), "qcow2"),
        (s(&snap1), "qcow2"),
        (s(&top), "qcow2"),
        (s(&base), "raw"),
    ]
    .iter()
    .map(|(f, t)| (f.to_string(), t.to_string()))
    .collect();
    assert_eq!(chain, want);
    // snapshot-sync in absolute-paths mode names the backing file absolutely.
    let info: Value =
        serde_json::from_str(&qemu_img(None, &["info", "--output=json", s(&snap1)])).unwrap();
    assert_eq!(
        info["backing-filename"],
        s(&std::fs::canonicalize(&top).unwrap())
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], SIZE);
    compare("qcow2", s(&snap3), "raw", s(&r4)).unwrap();

    // qemu-storage-daemon opens the chain livesnapd made and serves the data.
    let qsd = Qsd::bare();
    let mut qq = qsd.qmp();
    qq.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "snap1", "read-only": true,
               "file": {"driver": "file", "filename": s(&snap1)}}),
    );
    qq.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "snap3",
               "file": {"driver": "file", "filename": s(&snap3)}}),
    );
    let sock = qsd.dir.path().join("nbd.sock");
    qq.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s(&sock)}}}),
    );
    for n in ["snap1", "snap3"] {
        qq.ok(
            "block-export-add",
            json!({"type": "nbd", "id": n, "node-name": n}),
        );
    }
    let qsd_url = |n: &str| format!("nbd+unix:///{n}?socket={}", sock.display());
    qemu_io_opts(
        &qsd_url("snap1"),
        "raw",
        &["-r"],
        &[
            // P1 below, P2 over it (copied on write from the old top).
            "read -P 0x51 1M 4k",
            "read -P 0x61 1052672 4096",
            "read -P 0x51 1056768 57344",
            "read -P 0x62 20M 1M",
            "read -P 0 8M 64k",
            "read -P 0 30M 64k",
        ],
    );
    qemu_io_opts(
        &qsd_url("snap3"),
        "raw",
        &["-r"],
        &[
            "read -P 0 1M 64k",
            "read -P 0x62 20M 1M",
            "read -P 0x71 30M 64k",
            "read -P 0x81 60M 128k",
            "read -P 0 8M 64k",
        ],
    );
    compare("raw", &qsd_url("snap1"), "raw", s(&r2)).unwrap();
    compare("raw", &qsd_url("snap3"), "raw", s(&r4)).unwrap();
}

// ---------------------------------------------------------------------------
// query-named-block-nodes against qsd.

/// `v` with `dir` written as `@DIR@`, auto node names as `#blockN`, and
/// `actual-size` and the members `mask` says differ on purpose replaced by
/// their JSON type.
fn normalize(v: &Value, dir: &str, mask: &dyn Fn(&Value, &str) -> bool) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| {
                    // The file system decides allocation (and when it shows):
                    // never a daemon's answer to compare.
                    let x = if k == "actual-size" || mask(v, k) {
                        Value::String(format!("<{}>", json_type(x)))
                    } else {
                        normalize(x, dir, mask)
                    };
                    (k.clone(), x)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|x| normalize(x, dir, mask)).collect()),
        Value::String(t) if is_auto_name(t) => Value::String("#blockN".into()),
        Value::String(t) => Value::String(t.replace(dir, "@DIR@")),
        other => other.clone(),
    }
}

/// The two daemons with the same chain in their own directories (qsd locks
/// its images: never the same files).
struct Both {
    ls: Livesnapd,
    qs: Qsd,
    lq: Qmp,
    qq: Qmp,
    ls_dir: PathBuf,
    qs_dir: PathBuf,
}

impl Both {
    /// `cmd` with `@DIR@` set per side; both must succeed.
    fn ok(&mut self, cmd: &str, args: &str) -> (Value, Value) {
        let l = self.lq.ok(
            cmd,
            serde_json::from_str(&args.replace("@DIR@", s(&self.ls_dir))).unwrap(),
        );
        let q = self.qq.ok(
            cmd,
            serde_json::from_str(&args.replace("@DIR@", s(&self.qs_dir))).unwrap(),
        );
        (l, q)
    }

    /// `cmd` fails on both with the same text, which is returned.
    fn same_err(&mut self, cmd: &str, args: &str) -> String {
        let l = self
            .lq
            .execute(
                cmd,
                serde_json::from_str(&args.replace("@DIR@", s(&self.ls_dir))).unwrap(),
            )
            .unwrap_err();
        let q = self
            .qq
            .execute(
                cmd,
                serde_json::from_str(&args.replace("@DIR@", s(&self.qs_dir))).unwrap(),
            )
            .unwrap_err();
        let l1 = l.1.replace(s(&self.ls_dir), "@DIR@");
        assert_eq!(
            (l.0.as_str(), l1.as_str()),
            (q.0.as_str(), q.1.replace(s(&self.qs_dir), "@DIR@").as_str()),
            "{cmd} {args}"
        );
        l1
    }

    /// query-named-block-nodes agrees in shape and, masked, in values, with
    /// and without `flat`; returns livesnapd's nested listing.
    fn same_nodes(&mut self, mask: &dyn Fn(&Value, &str) -> bool) -> Value {
        let mut nested = Value::Null;
        for flat in [false, true] {
            let (l, q) = self.ok("query-named-block-nodes", &format!("{{\"flat\": {flat}}}"));
            if let Some(d) = shape_diff(&l, &q, "return") {
                panic!("flat={flat}: {d}\n  livesnapd: {l}\n  qsd:       {q}");
            }
            let (ln, qn) = (
                normalize(&l, s(&self.ls_dir), mask),
                normalize(&q, s(&self.qs_dir), mask),
            );
            let (la, qa) = (ln.as_array().unwrap(), qn.as_array().unwrap());
            for (i, (x, y)) in la.iter().zip(qa).enumerate() {
                assert_eq!(x, y, "flat={flat}: node {i} differs");
            }
            if !flat {
                nested = l;
            }
        }
        nested
    }
}

/// Nothing masked.
fn no_mask(_: &Value, _: &str) -> bool {
    false
}

#[test]
fn query_named_block_nodes_matches_qsd() {
    let ls = Livesnapd::bare();
    let qs = Qsd::bare();
    let (ls_dir, qs_dir) = (ls.dir.path().join("chain"), qs.dir.path().join("chain"));
    // The same commands make the same files, allocation included (a copy
    // would not keep which zero blocks are allocated).
    Chain::Three.build(&ls_dir);
    Chain::Three.build(&qs_dir);
    let (lq, qq) = (ls.qmp(), qs.qmp());
    let mut b = Both {
        ls,
        qs,
        lq,
        qq,
        ls_dir,
        qs_dir,
    };
    // The chain opened from the headers: six nodes, in QEMU's order.
    b.ok(
        "blockdev-add",
        r#"{"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": "@DIR@/top"}}"#,
    );
    let nodes = b.same_nodes(&no_mask);
    let drv: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["drv"].as_str().unwrap())
        .collect();
    assert_eq!(drv, ["raw", "file", "qcow2", "file", "qcow2", "file"]);
    assert_eq!(nodes[4]["node-name"], "top");
    assert_eq!(nodes[4]["backing_file_depth"], 2);

    // A snapshot: the overlay each daemon creates. QEMU writes a new
    // image's last cluster only partly and livesnapd whole (docs/qmp.md),
    // so the overlay file's length and allocation differ.
    let sock = "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"@DIR@/nbd.sock\"}}}";
    b.ok("nbd-server-start", sock);
    b.ok(
        "block-export-add",
        r#"{"type": "nbd", "id": "e0", "node-name": "top", "writable": true}"#,
    );
    b.ok(
        "blockdev-snapshot-sync",
        r#"{"node-name": "top", "snapshot-file": "@DIR@/s1", "snapshot-node-name": "s1"}"#,
    );
    let overlay_size = |image: &Value, k: &str| {
        let overlay = image["filename"]
            .as_str()
            .is_some_and(|f| f.ends_with("/s1") || f.ends_with("/s2") || f.starts_with("json:"));
        overlay && k == "virtual-size" && image["format"] == "file"
    };
    let nodes = b.same_nodes(&overlay_size);
    assert_eq!(nodes[0]["node-name"], "s1");
    assert_eq!(nodes[0]["backing_file"], s(&b.ls_dir.join("top")));
    // The old top and the file below it are read-only now.
    assert_eq!(nodes[6]["node-name"], "top");
    assert_eq!(nodes[6]["ro"], true);
    assert_eq!(nodes[7]["drv"], "file");
    assert_eq!(nodes[7]["ro"], true);

    // blockdev-snapshot with an overlay qemu-img made, added with backing null.
    for dir in [&b.ls_dir, &b.qs_dir] {
        qemu_img(
            Some(dir),
            &[
                "create", "-q", "-f", "qcow2", "-b", "s1", "-F", "qcow2", "s2",
            ],
        );
    }
    b.ok(
        "blockdev-add",
        r#"{"driver": "qcow2", "node-name": "s2", "backing": null,
            "file": {"driver": "file", "filename": "@DIR@/s2"}}"#,
    );
    // QEMU names an overlay opened without its backing (and attached later)
    // by a json: pseudo-filename; livesnapd by its file (docs/qmp.md).
    let attached = |node: &Value, k: &str| {
        overlay_size(node, k)
            || ((k == "filename" || k == "file")
                && node
                    .get(k)
                    .and_then(Value::as_str)
                    .is_some_and(|f| f.starts_with("json:") || f.ends_with("/s2")))
    };
    b.same_nodes(&attached);
    b.ok("blockdev-snapshot", r#"{"node": "s1", "overlay": "s2"}"#);
    let nodes = b.same_nodes(&attached);
    assert_eq!(nodes[0]["node-name"], "s2");
    assert_eq!(nodes[0]["backing_file_depth"], 4);
    assert_eq!(nodes[0]["file"], s(&b.ls_dir.join("s2")));
    // The errors of a second snapshot onto the same overlay.
    assert_eq!(
        b.same_err("blockdev-snapshot", r#"{"node": "s1", "overlay": "s2"}"#),
        "Node 's1' is busy: node is used as backing hd of 's2'"
    );
    assert_eq!(
        b.same_err("blockdev-snapshot", r#"{"node": "s2", "overlay": "s1"}"#),
        "The overlay is already in use"
    );
    assert_eq!(
        b.same_err(
            "blockdev-snapshot-sync",
            r#"{"node-name": "s2", "snapshot-file": "@DIR@/s3", "snapshot-node-name": "s1"}"#
        ),
        "New overlay node-name already in use"
    );
    assert!(!b.ls_dir.join("s3").exists() && !b.qs_dir.join("s3").exists());
    assert_eq!(
        b.same_err(
            "blockdev-snapshot-sync",
            r#"{"node-name": "nosuch", "snapshot-file": "@DIR@/s3"}"#
        ),
        "Cannot find device='' nor node-name='nosuch'"
    );
    drop(b.ls);
    drop(b.qs);
}
