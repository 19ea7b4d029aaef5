//! Broken qcow2 images and chains given to livesnapd: every one is a clear
//! QMP error (or, for data pointers past the end of the file, an I/O error
//! to the NBD client), never a crash or a hang. Throughout, an NBD client
//! keeps reading another export of the same daemon.
//!
//! Each input is also given to a real qemu-storage-daemon (on its own copy:
//! qsd locks images). Where livesnapd's text is QEMU's (the checks of
//! `crates/block/src/qcow2/header.rs`), the two must be equal; where
//! livesnapd refuses what QEMU accepts (probing, repairs, reads past the end
//! of the file), livesnapd's own text is asserted and qsd's reply recorded.

use livesnap_testkit as harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::*;
use livesnap_nbd::NbdClient;
use serde_json::{json, Value};

const KIB: usize = 1 << 10;
/// Longest wait for one NBD read.
const NBD_WAIT: Duration = Duration::from_secs(10);
/// Size of the healthy raw image exported throughout.
const GOOD_SIZE: usize = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A 4 MiB qcow2 image made by qemu-img, with data in its first two
/// clusters (so it has an L2 table), as bytes.
fn qemu_image(dir: &Path) -> Vec<u8> {
    let path = dir.join("template.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s(&path), "4M"]));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 128k", s(&path)]));
    let b = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    b
}

/// `img` with a big-endian field of `width` bytes at `at` set to `v`.
fn patched(img: &[u8], at: usize, width: usize, v: u64) -> Vec<u8> {
    let mut b = img.to_vec();
    match width {
        1 => b[at] = v as u8,
        4 => put32(&mut b, at, v as u32),
        8 => put64(&mut b, at, v),
        _ => unreachable!(),
    }
    b
}

/// Offsets of the L1 table and of the first L2 table of `img`.
fn l1_l2(img: &[u8]) -> (usize, usize) {
    let l1 = get64(img, 40) as usize;
    let l2 = (get64(img, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    assert!(l2 != 0, "the template has no L2 table");
    (l1, l2)
}

/// livesnapd and qsd side by side, each with its own directory; livesnapd
/// exports a healthy raw image that an NBD client reads after every case.
struct Fixture {
    ls: Livesnapd,
    _qs: Qsd,
    lq: RawQmp,
    qq: RawQmp,
    ls_dir: PathBuf,
    qs_dir: PathBuf,
    rt: tokio::runtime::Runtime,
    nbd: NbdClient,
    good: Vec<u8>,
    nbd_sock: PathBuf,
    next: u32,
}

impl Fixture {
    fn new() -> Fixture {
        let ls = Livesnapd::bare();
        let qs = Qsd::bare();
        let ls_dir = ls.dir.path().join("img");
        let qs_dir = qs.dir.path().join("img");
        std::fs::create_dir(&ls_dir).unwrap();
        std::fs::create_dir(&qs_dir).unwrap();
        let good = pattern(42, GOOD_SIZE);
        let good_path = ls.dir.path().join("good.raw");
        std::fs::write(&good_path, &good).unwrap();
        let mut lq = RawQmp::connect(&ls.qmp_path);
        lq.negotiate();
        let mut qq = RawQmp::connect(&qs.qmp_path);
        qq.negotiate();
        let nbd_sock = ls.dir.path().join("nbd.sock");
        lq.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "good",
                   "file": {"driver": "file", "filename": s(&good_path)}}),
        );
        lq.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": s(&nbd_sock)}}}),
        );
        lq.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "good", "node-name": "good"}),
        );
        let qsock = qs.dir.path().join("nbd.sock");
        qq.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": s(&qsock)}}}),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr = format!("unix:{}", nbd_sock.display());
        let nbd = rt
            .block_on(NbdClient::connect(&addr, "good"))
            .expect("NBD connect to the healthy export");
        let mut f = Fixture {
            ls,
            _qs: qs,
            lq,
            qq,
            ls_dir,
            qs_dir,
            rt,
            nbd,
            good,
            nbd_sock,
            next: 0,
        };
        f.still_serving("start");
        f
    }

    /// Writes `name` with `bytes` into both directories.
    fn file(&self, name: &str, bytes: &[u8]) {
        for d in [&self.ls_dir, &self.qs_dir] {
            std::fs::write(d.join(name), bytes).unwrap();
        }
    }

    /// Runs `cmd` in both directories (the same files on both sides).
    fn both_run(&self, make: impl Fn(&Path)) {
        for d in [&self.ls_dir, &self.qs_dir] {
            make(d);
        }
    }

    /// `blockdev-add` of a qcow2 node over `name` (plus `extra` members) on
    /// both daemons, `@DIR@` in the replies for the directory.
    fn add(&mut self, name: &str, extra: Value) -> (Result<Value, String>, Result<Value, String>) {
        self.next += 1;
        let node = format!("n{}", self.next);
        let args = |dir: &Path| {
            let mut a = json!({"driver": "qcow2", "node-name": node,
                               "file": {"driver": "file", "filename": s(&dir.join(name))}});
            for (k, v) in extra.as_object().unwrap() {
                a[k] = v.clone();
            }
            let text = a.to_string().replace("@DIR@", s(dir));
            serde_json::from_str::<Value>(&text).unwrap()
        };
        let unsub = |r: Result<Value, (String, String)>, dir: &Path| {
            r.map_err(|(class, desc)| {
                assert_eq!(class, "GenericError", "{desc}");
                desc.replace(s(dir), "@DIR@")
            })
        };
        let l = self.lq.execute("blockdev-add", args(&self.ls_dir));
        let l = unsub(l, &self.ls_dir);
        let q = self.qq.execute("blockdev-add", args(&self.qs_dir));
        let q = unsub(q, &self.qs_dir);
        self.still_serving(name);
        (l, q)
    }

    /// `blockdev-add` as [`Fixture::add`], on livesnapd only.
    fn ls_only(&mut self, name: &str, extra: Value) -> Result<Value, String> {
        self.next += 1;
        let mut a = json!({"driver": "qcow2", "node-name": format!("n{}", self.next),
                           "file": {"driver": "file", "filename": s(&self.ls_dir.join(name))}});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        let r = self.lq.execute("blockdev-add", a).map_err(|(class, desc)| {
            assert_eq!(class, "GenericError", "{desc}");
            desc.replace(s(&self.ls_dir), "@DIR@")
        });
        self.still_serving(name);
        r
    }

    /// Both refuse `name` with the same text, which is `want`.
    fn same_error(&mut self, name: &str, extra: Value, want: &str) {
        let (l, q) = self.add(name, extra.clone());
        assert_eq!(l, Err(want.to_string()), "livesnapd, {name} {extra}");
        assert_eq!(q, Err(want.to_string()), "qsd, {name} {extra}");
    }

    /// livesnapd refuses `name` with `want`; what qsd does is returned.
    fn ls_error(&mut self, name: &str, extra: Value, want: &str) -> Result<Value, String> {
        let (l, q) = self.add(name, extra.clone());
        assert_eq!(l, Err(want.to_string()), "livesnapd, {name} {extra}");
        q
    }

    /// The monitor answers, no node was left behind by a failure, and the
    /// NBD client still reads the healthy export.
    fn still_serving(&mut self, case: &str) {
        self.lq.alive(case);
        let (off, len) = (123 * KIB, 64 * KIB);
        let read = self.rt.block_on(async {
            tokio::time::timeout(NBD_WAIT, self.nbd.read(off as u64, len as u32)).await
        });
        let data = read
            .unwrap_or_else(|_| panic!("after {case}: NBD read hangs"))
            .unwrap_or_else(|e| panic!("after {case}: NBD read failed: {e}"));
        assert!(
            data == self.good[off..off + len],
            "after {case}: wrong data"
        );
        assert!(self.ls.is_running(), "after {case}: livesnapd died");
    }

    /// Nodes livesnapd has, by name.
    fn ls_nodes(&mut self) -> Vec<String> {
        let v = self.lq.ok("query-named-block-nodes", Value::Null);
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .collect()
    }
}

#[test]
fn corrupt_headers_get_qemus_errors() {
    let mut f = Fixture::new();
    let img = qemu_image(&f.ls_dir);
    let before = f.ls_nodes();
    // (file, bytes, QEMU's text), header field offsets from docs/interop/qcow2.rst.
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "Image is not in qcow2 format"),
        ("truncated", img[..50].to_vec(), "qcow2 header too short"),
        ("truncated72", img[..72].to_vec(), "qcow2 header too short"),
        (
            "bad-magic",
            patched(&img, 0, 4, 0x5146_49fa),
            "Image is not in qcow2 format",
        ),
        (
            "version1",
            patched(&img, 4, 4, 1),
            "Unsupported qcow2 version 1",
        ),
        (
            "version4",
            patched(&img, 4, 4, 4),
            "Unsupported qcow2 version 4",
        ),
        (
            "backing-offset",
            patched(&img, 8, 8, 0x20000),
            "Invalid backing file offset",
        ),
        (
            "cluster-bits",
            patched(&img, 20, 4, 30),
            "Unsupported cluster size: 2^30",
        ),
        (
            "huge-size",
            patched(&img, 24, 8, 1 << 62),
            "Image is too big",
        ),
        (
            "encrypted",
            patched(&img, 32, 4, 3),
            "Unsupported encryption method 3",
        ),
        (
            "huge-l1",
            patched(&img, 36, 4, 0x7fff_ffff),
            "Active L1 table too large",
        ),
        ("small-l1", patched(&img, 36, 4, 0), "L1 table is too small"),
        (
            "unaligned-l1",
            patched(&img, 40, 8, 0x30001),
            "Active L1 table offset invalid",
        ),
        (
            "no-refcounts",
            patched(&img, 56, 4, 0),
            "Image does not contain a reference count table",
        ),
        (
            "huge-refcounts",
            patched(&img, 56, 4, 0x10_0000),
            "Reference count table too large",
        ),
        (
            "unknown-feature",
            patched(&img, 72, 8, 1 << 7),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 80",
        ),
        (
            "corrupt-bit",
            patched(&img, 72, 8, 1 << 1),
            "qcow2: Image is corrupt; cannot be opened read/write",
        ),
        (
            "refcount-order",
            patched(&img, 96, 4, 7),
            "Reference count entry width too large; may not exceed 64 bits",
        ),
        (
            "header-length",
            patched(&img, 100, 4, 0x20000),
            "qcow2 header exceeds cluster size",
        ),
        (
            "compression-type",
            patched(&img, 104, 1, 2),
            "qcow2: unknown compression type: 2",
        ),
    ];
    // A backing format extension longer than a format name can be.
    let mut ext = img.clone();
    put32(&mut ext, 112, 0xe279_2aca);
    put32(&mut ext, 116, 200);
    for (name, bytes, want) in cases.iter().chain(
        [(
            "ext-length",
            ext,
            "ERROR: ext_backing_format: len=200 too large (>=16)",
        )]
        .iter(),
    ) {
        f.file(name, bytes);
        f.same_error(name, json!({}), want);
    }
    // Read-only opens make the same checks (the corrupt bit aside).
    f.same_error(
        "truncated",
        json!({"read-only": true}),
        "qcow2 header too short",
    );
    f.same_error(
        "huge-l1",
        json!({"read-only": true}),
        "Active L1 table too large",
    );
    let (l, q) = f.add("corrupt-bit", json!({"read-only": true}));
    assert!(l.is_ok() && q.is_ok(), "{l:?} {q:?}");
    assert_eq!(
        f.ls_nodes().len(),
        before.len() + 2,
        "only the corrupt-bit node and its file"
    );

    // The command line: a clear message and a non-zero exit, at once.
    let bad = f.ls_dir.join("bad-magic");
    let sock = f.ls.dir.path().join("cli-nbd.sock");
    let (st, out, err) = run_within(
        Command::new(livesnapd_bin()).args([
            "--image",
            s(&bad),
            "--format",
            "qcow2",
            "--nbd",
            &format!("unix:{}", sock.display()),
        ]),
        Duration::from_secs(10),
    );
    assert!(!st.success(), "{out}{err}");
    assert!(err.contains("Image is not in qcow2 format"), "{err}");
}

#[test]
fn tables_past_the_end_of_the_file() {
    let mut f = Fixture::new();
    let img = qemu_image(&f.ls_dir);
    // QEMU reads tables past the end of the file as zeroes and opens these;
    // livesnapd refuses them at open (docs/qmp.md).
    f.file("l1-past-eof", &patched(&img, 40, 8, 0x1000_0000));
    let q = f.ls_error(
        "l1-past-eof",
        json!({}),
        "Could not read L1 table: the table lies beyond the end of the image file (image is corrupt)",
    );
    assert!(q.is_ok(), "qsd: {q:?}");
    f.file("refcounts-past-eof", &patched(&img, 48, 8, 0x1000_0000));
    let q = f.ls_error(
        "refcounts-past-eof",
        json!({}),
        "Could not initialize refcount handling: the refcount table lies beyond the end of the \
         image file (image is corrupt)",
    );
    assert!(q.is_ok(), "qsd: {q:?}");

    // An L2 entry (data cluster) and an L1 entry (L2 table) past the end:
    // both open, as in QEMU; reading what they map is an I/O error to the
    // client (qsd reads zeroes), the rest of the image stays readable.
    let (l1, l2) = l1_l2(&img);
    let entry = get64(&img, l2);
    f.file(
        "l2-entry-past-eof",
        &patched(&img, l2, 8, (entry & 0xff00_0000_0000_0000) | 0x4000_0000),
    );
    let entry = get64(&img, l1);
    f.file(
        "l1-entry-past-eof",
        &patched(&img, l1, 8, (entry & 0xff00_0000_0000_0000) | 0x4000_0000),
    );
    let addr = format!("unix:{}", f.nbd_sock.display());
    for (name, second_cluster_ok) in [("l2-entry-past-eof", true), ("l1-entry-past-eof", false)] {
        let (l, q) = f.add(name, json!({}));
        assert!(l.is_ok() && q.is_ok(), "{name}: {l:?} {q:?}");
        let node = format!("n{}", f.next);
        f.lq.ok(
            "block-export-add",
            json!({"type": "nbd", "id": name, "node-name": node, "name": name, "writable": true}),
        );
        let client =
            f.rt.block_on(NbdClient::connect(&addr, name))
                .expect("NBD connect");
        let rt = &f.rt;
        let e = within(rt, name, client.read(0, 4096)).expect_err("read of a cluster past EOF");
        assert_eq!(e.code(), Some(libc::EIO as u32), "{name}: {e}");
        let e = within(rt, name, client.read(4096, 65536)).expect_err("read across it");
        assert_eq!(e.code(), Some(libc::EIO as u32), "{name}: {e}");
        // A partial write needs the old cluster: refused the same way.
        let e = within(rt, name, client.write(512, &[1u8; 512], false)).expect_err("partial write");
        assert_eq!(e.code(), Some(libc::EIO as u32), "{name}: {e}");
        let r = within(rt, name, client.read(65536, 65536));
        let far = within(rt, name, client.read(3 << 20, 4096));
        if second_cluster_ok {
            // The other entries of the table are still served.
            assert_eq!(r.unwrap(), vec![0x5a; 65536], "{name}: the healthy cluster");
            assert_eq!(far.unwrap(), vec![0; 4096], "{name}: unallocated");
        } else {
            // The one L2 table maps the whole disk.
            assert_eq!(r.unwrap_err().code(), Some(libc::EIO as u32), "{name}");
            assert_eq!(far.unwrap_err().code(), Some(libc::EIO as u32), "{name}");
        }
        drop(client);
        f.still_serving(name);
    }
    let status = f.ls.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
}

/// Runs `fut` on `rt`, failing the test if it takes longer than [`NBD_WAIT`].
fn within<T>(
    rt: &tokio::runtime::Runtime,
    case: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    rt.block_on(async { tokio::time::timeout(NBD_WAIT, fut).await })
        .unwrap_or_else(|_| panic!("{case}: NBD request hangs"))
}

/// Creates qcow2 `name` over `backing` (format `fmt`) without opening the
/// backing file (`-u`), in `dir`.
fn create_over(dir: &Path, name: &str, backing: &str, fmt: &str) {
    run(Command::new("qemu-img").current_dir(dir).args([
        "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, name, "1M",
    ]));
}

#[test]
fn broken_backing_chains() {
    let mut f = Fixture::new();
    let before = f.ls_nodes();

    // A missing backing file: QEMU's text.
    f.both_run(|d| create_over(d, "orphan.qcow2", "missing.raw", "raw"));
    f.same_error(
        "orphan.qcow2",
        json!({}),
        "Could not open backing file: Could not open '@DIR@/missing.raw': No such file or directory",
    );

    // Loops: QEMU has no loop check and stops at its own image lock;
    // livesnapd names the loop.
    f.both_run(|d| {
        create_over(d, "a.qcow2", "b.qcow2", "qcow2");
        create_over(d, "b.qcow2", "a.qcow2", "qcow2");
    });
    let q = f.ls_error(
        "a.qcow2",
        json!({}),
        "Could not open backing file: Could not open backing file: Backing file '@DIR@/a.qcow2' \
         creates a loop in the backing chain",
    );
    assert!(q.is_err(), "qsd opened a loop: {q:?}");
    // qemu-img refuses to create a self-loop: rename the backing in the header.
    f.both_run(|d| {
        create_over(d, "self.qcow2", "zelf.qcow2", "qcow2");
        let p = d.join("self.qcow2");
        let mut b = std::fs::read(&p).unwrap();
        let i = b.windows(10).position(|w| w == b"zelf.qcow2").unwrap();
        b[i] = b's';
        std::fs::write(&p, b).unwrap();
    });
    let self_loop = "Could not open backing file: Backing file '@DIR@/self.qcow2' creates a \
                     loop in the backing chain";
    let q = f.ls_error("self.qcow2", json!({}), self_loop);
    assert!(q.is_err(), "qsd opened a loop: {q:?}");
    // Read-only, nothing stops qsd (it recurses until it runs out of
    // memory): livesnapd only.
    assert_eq!(
        f.ls_only("self.qcow2", json!({"read-only": true})),
        Err(self_loop.into())
    );
    assert_eq!(
        f.ls_only("a.qcow2", json!({"read-only": true})),
        Err(
            "Could not open backing file: Could not open backing file: Backing file \
             '@DIR@/a.qcow2' creates a loop in the backing chain"
                .into()
        )
    );

    // A backing file named without a format is never probed, even when it
    // is a qcow2 image that probing would find (qsd probes and opens it).
    f.both_run(|d| {
        run(Command::new("qemu-img")
            .current_dir(d)
            .args(["create", "-q", "-f", "qcow2", "base.raw", "1M"]));
        run(Command::new("qemu-img").current_dir(d).args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "qcow2",
            "nofmt.qcow2",
        ]));
        // Rename the backing format extension to an unknown (ignored) one.
        let p = d.join("nofmt.qcow2");
        let mut b = std::fs::read(&p).unwrap();
        let i = b
            .windows(4)
            .position(|w| w == 0xe279_2acau32.to_be_bytes())
            .unwrap();
        put32(&mut b, i, 0x1234_5678);
        std::fs::write(&p, b).unwrap();
        let info = run(Command::new("qemu-img").args(["info", "-U", "--output=json", s(&p)]));
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["backing-filename"], "base.raw", "{info}");
        assert!(info.get("backing-filename-format").is_none(), "{info}");
    });
    let no_format = "Backing file 'base.raw' has no format in the image header and formats are \
                     never probed; set one with 'qemu-img rebase -u -F <format>' or give the \
                     backing node explicitly";
    let q = f.ls_error("nofmt.qcow2", json!({}), no_format);
    assert!(q.is_ok(), "qsd: {q:?}");
    // (qsd: its lock on the image opened above.)
    let _ = f.ls_error("nofmt.qcow2", json!({"read-only": true}), no_format);
    assert_eq!(f.ls_nodes(), before, "no failed open left a node");
    // Given explicitly, the backing node is used as given.
    let base = s(&f.ls_dir.join("base.raw")).to_string();
    f.lq.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "explicit",
               "file": {"driver": "file", "filename": s(&f.ls_dir.join("nofmt.qcow2"))},
               "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": base}}}),
    );
    f.still_serving("explicit backing");
}

#[test]
fn chain_deeper_than_the_limit() {
    let mut f = Fixture::new();
    // l0 (raw) ← l1 ← ... ← l64: l63 is a chain of 64 images, l64 of 65.
    f.both_run(|d| {
        run(Command::new("qemu-img")
            .current_dir(d)
            .args(["create", "-q", "-f", "raw", "l0", "1M"]));
        for i in 1..=64 {
            let fmt = if i == 1 { "raw" } else { "qcow2" };
            create_over(d, &format!("l{i}"), &format!("l{}", i - 1), fmt);
        }
    });
    let (l, q) = f.add("l63", json!({"read-only": true}));
    assert!(l.is_ok() && q.is_ok(), "{l:?} {q:?}");
    let (l, q) = f.add("l64", json!({"read-only": true}));
    let want = format!(
        "{}Backing chain is too deep (more than 64 images); is there a loop?",
        "Could not open backing file: ".repeat(63)
    );
    assert_eq!(l, Err(want));
    // QEMU has no such limit.
    assert!(q.is_ok(), "qsd: {q:?}");
}

#[test]
fn unsupported_and_unrepaired_images() {
    let mut f = Fixture::new();
    let img = qemu_image(&f.ls_dir);
    // Valid qcow2 that livesnapd does not implement or repair: its own text.
    f.file("extended-l2", &patched(&img, 72, 8, 1 << 4));
    let q = f.ls_error(
        "extended-l2",
        json!({}),
        "Unsupported qcow2 feature(s): extended L2 entries",
    );
    assert!(q.is_ok(), "qsd: {q:?}");
    f.file("data-file", &patched(&img, 72, 8, 1 << 2));
    let q = f.ls_error(
        "data-file",
        json!({}),
        "Unsupported qcow2 feature(s): external data file",
    );
    assert_eq!(q, Err("'data-file' is required for this image".into()));
    f.file("dirty", &patched(&img, 72, 8, 1));
    let q = f.ls_error(
        "dirty",
        json!({}),
        "Could not repair dirty image: the image has lazy refcounts that were not written back; \
         repair it with 'qemu-img check -r all'",
    );
    assert!(q.is_ok(), "qsd repairs it: {q:?}");
    // Read-only, a dirty image opens (nothing to repair for reading).
    f.file("dirty-ro", &patched(&img, 72, 8, 1));
    let (l, q) = f.add("dirty-ro", json!({"read-only": true}));
    assert!(l.is_ok() && q.is_ok(), "{l:?} {q:?}");
    // Options for what livesnapd does not implement are refused by name.
    let _ = f.ls_error(
        "dirty-ro",
        json!({"data-file": "x"}),
        "External data files are not supported by livesnapd",
    );
    let _ = f.ls_error(
        "dirty-ro",
        json!({"encrypt": {"format": "aes", "key-secret": "k"}}),
        "Encrypted qcow2 images are not supported by livesnapd",
    );
}
