//! `blockdev-create` on livesnapd against qemu-storage-daemon.
//!
//! The same commands go to both daemons; their replies, job errors and
//! `JOB_STATUS_CHANGE` sequences must be equal (paths aside). The images
//! livesnapd creates the way libvirt does (create file, add it, create qcow2
//! on the node, add the qcow2) must pass `qemu-img check`, read like the
//! ones qsd creates with `qemu-img info`, and open in qsd.

use livesnap_testkit as harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// One daemon under test, with a directory for its images.
struct Peer {
    qmp: Qmp,
    dir: PathBuf,
    name: &'static str,
    _ls: Option<Livesnapd>,
    _qsd: Option<Qsd>,
}

impl Peer {
    fn livesnapd() -> Peer {
        let d = Livesnapd::bare();
        Peer {
            qmp: d.qmp(),
            dir: d.dir.path().to_path_buf(),
            name: "livesnapd",
            _ls: Some(d),
            _qsd: None,
        }
    }

    fn qsd() -> Peer {
        let d = Qsd::bare();
        Peer {
            qmp: d.qmp(),
            dir: d.dir.path().to_path_buf(),
            name: "qsd",
            _ls: None,
            _qsd: Some(d),
        }
    }

    fn both() -> [Peer; 2] {
        [Peer::livesnapd(), Peer::qsd()]
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    /// `$D` in `v` becomes this peer's directory.
    fn subst(&self, v: &Value) -> Value {
        let text = v.to_string().replace("$D", self.dir.to_str().unwrap());
        serde_json::from_str(&text).unwrap()
    }

    /// This peer's directory in `text` becomes `$D`.
    fn unsubst(&self, text: &str) -> String {
        text.replace(self.dir.to_str().unwrap(), "$D")
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let args = self.subst(&args);
        let name = self.name;
        self.qmp
            .execute(cmd, args)
            .unwrap_or_else(|e| panic!("{name}: {cmd} failed: {e:?}"))
    }

    fn del_export(&mut self, id: &str) {
        del_export(&mut self.qmp, id);
    }

    /// Every event queued so far.
    fn events(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(e) = self.qmp.event(Duration::from_millis(0)) {
            out.push(e);
        }
        out
    }

    /// Waits (bounded) until job `id` has concluded; its `query-jobs` entry.
    fn wait_concluded(&mut self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let jobs = self.ok("query-jobs", Value::Null);
            let job = jobs
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["id"] == id)
                .cloned()
                .unwrap_or_else(|| panic!("{}: job {id} not in {jobs}", self.name));
            if job["status"] == "concluded" {
                return job;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}: job {id} did not conclude: {job}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `blockdev-create` with `options` as job `id` to its end and
    /// dismisses it: the command error, or the job's error (`None` when it
    /// succeeded) and its status sequence, the final `null` included.
    fn create(
        &mut self,
        id: &str,
        options: Value,
    ) -> Result<(Option<String>, Vec<String>), String> {
        self.events();
        let args = self.subst(&json!({"job-id": id, "options": options}));
        if let Err((_, desc)) = self.qmp.execute("blockdev-create", args) {
            return Err(self.unsubst(&desc));
        }
        let job = self.wait_concluded(id);
        assert_eq!(job["current-progress"], 1, "{}: {job}", self.name);
        assert_eq!(job["total-progress"], 1, "{}: {job}", self.name);
        assert_eq!(job["type"], "create", "{}: {job}", self.name);
        self.ok("job-dismiss", json!({ "id": id }));
        let error = job["error"].as_str().map(|e| self.unsubst(e));
        Ok((error, self.statuses(id)))
    }

    /// The statuses of job `id` from the events queued so far; fails on any
    /// block-job event (a create job is not a block job).
    fn statuses(&mut self, id: &str) -> Vec<String> {
        let name = self.name;
        // The final transitions may trail the reply that revealed them.
        std::thread::sleep(Duration::from_millis(50));
        self.events()
            .into_iter()
            .filter(|e| {
                let ev = e["event"].as_str().unwrap_or_default();
                assert!(!ev.starts_with("BLOCK_JOB"), "{name}: unexpected {e}");
                ev == "JOB_STATUS_CHANGE" && e["data"]["id"] == id
            })
            .map(|e| e["data"]["status"].as_str().unwrap().to_string())
            .collect()
    }

    /// Creates an empty file and adds it as node `node`.
    fn file_node(&mut self, file: &str, node: &str) {
        let (err, _) = self
            .create(
                &format!("mk-{node}"),
                json!({"driver": "file", "filename": format!("$D/{file}"), "size": 0}),
            )
            .unwrap();
        assert_eq!(err, None, "{}", self.name);
        self.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": node, "filename": format!("$D/{file}")}),
        );
    }
}

/// `block-export-del`, retried while the last NBD client's connection is
/// still being torn down on the server side.
fn del_export(q: &mut Qmp, id: &str) {
    let start = Instant::now();
    loop {
        match q.execute("block-export-del", json!({ "id": id })) {
            Ok(_) => return,
            Err((_, e))
                if e.ends_with("still in use") && start.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("block-export-del {id}: {e:?}"),
        }
    }
}

const OK: &[&str] = &[
    "created",
    "running",
    "waiting",
    "pending",
    "concluded",
    "null",
];
const FAILED: &[&str] = &["created", "running", "aborting", "concluded", "null"];

fn qemu_img_info(image: &str) -> Value {
    let out = run(Command::new("qemu-img").args(["info", "-U", "--output=json", image]));
    serde_json::from_str(&out).unwrap()
}

/// `qemu-img check` finds nothing wrong.
fn check_clean(image: &str) {
    let (st, out, err) =
        run_status(Command::new("qemu-img").args(["check", "-U", "--output=json", image]));
    assert!(st.success(), "qemu-img check {image}: {st}\n{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for k in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v.get(k).and_then(Value::as_u64).unwrap_or(0), 0, "{out}");
    }
}

/// What `qemu-img info` says about an image that must not depend on who made it.
fn image_facts(info: &Value) -> Value {
    json!({
        "format": info["format"],
        "virtual-size": info["virtual-size"],
        "cluster-size": info["cluster-size"],
        "backing-filename": info["backing-filename"],
        "backing-filename-format": info["backing-filename-format"],
        "format-specific": info["format-specific"],
    })
}

#[test]
fn libvirt_sequence_makes_images_qemu_accepts() {
    let mut facts = Vec::new();
    let mut images = Vec::new();
    for mut p in Peer::both() {
        let base = p.path("base.raw");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "raw", &base, "64M"]));
        qemu_io(
            &base,
            "raw",
            &["write -P 0xa1 0 1M", "write -P 0xa2 32M 1M"],
        );

        // The order libvirt uses for a new overlay.
        p.file_node("top.qcow2", "top-file");
        let (err, seq) = p
            .create(
                "create-top",
                json!({"driver": "qcow2", "file": "top-file", "size": 64 * MIB,
                       "backing-file": "base.raw", "backing-fmt": "raw"}),
            )
            .unwrap();
        assert_eq!(err, None, "{}", p.name);
        assert_eq!(seq, OK, "{}", p.name);
        p.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "top", "file": "top-file"}),
        );
        let nodes = p.ok("query-named-block-nodes", json!({"flat": true}));
        let top = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "top")
            .unwrap()
            .clone();
        assert_eq!(top["drv"], "qcow2", "{}", p.name);
        assert_eq!(top["image"]["backing-filename"], "base.raw", "{}", p.name);
        assert_eq!(top["image"]["backing-filename-format"], "raw", "{}", p.name);

        // Guest writes through an NBD export of the new image.
        let sock = p.path("nbd.sock");
        p.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        );
        p.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "top", "writable": true}),
        );
        let url = format!("nbd+unix:///top?socket={sock}");
        qemu_io(
            &url,
            "raw",
            &[
                "read -P 0xa1 0 1M",
                "write -P 0xb1 512k 1M",
                "read -P 0xa2 32M 1M",
                "write -z 32M 64k",
                "write -P 0xb2 63M 1M",
                "flush",
            ],
        );
        p.del_export("e");
        p.ok("blockdev-del", json!({"node-name": "top"}));
        p.ok("blockdev-del", json!({"node-name": "top-file"}));

        let image = p.path("top.qcow2");
        check_clean(&image);
        facts.push(image_facts(&qemu_img_info(&image)));
        images.push((p, image));
    }
    assert_eq!(
        facts[0], facts[1],
        "qemu-img info of livesnapd's and qsd's image"
    );
    let (ls_image, qsd_image) = (&images[0].1, &images[1].1);
    let (st, out, err) = run_status(Command::new("qemu-img").args([
        "compare", "-U", "-f", "qcow2", "-F", "qcow2", ls_image, qsd_image,
    ]));
    assert!(st.success(), "guest contents differ: {out}{err}");

    // A fresh qsd opens what livesnapd made and writes to it.
    let qsd = Qsd::bare();
    let mut q = qsd.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "img",
               "file": {"driver": "file", "filename": ls_image}}),
    );
    let sock = qsd.dir.path().join("nbd.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "img", "writable": true}),
    );
    let url = format!("nbd+unix:///img?socket={}", sock.display());
    qemu_io(
        &url,
        "raw",
        &["read -P 0xb1 512k 1M", "write -P 0xc1 8M 3M", "flush"],
    );
    del_export(&mut q, "e");
    q.ok("blockdev-del", json!({"node-name": "img"}));
    check_clean(ls_image);
}

#[test]
fn create_job_lifecycle_matches_qsd() {
    let mut transcripts = Vec::new();
    for mut p in Peer::both() {
        let mut t = Vec::new();
        let step = |p: &mut Peer, t: &mut Vec<Value>, cmd: &str, args: Value| {
            let args = p.subst(&args);
            let r = match p.qmp.execute(cmd, args) {
                Ok(v) => json!({ "return": v }),
                Err((class, desc)) => json!({"class": class, "desc": p.unsubst(&desc)}),
            };
            t.push(json!({ "cmd": cmd, "reply": r }));
        };
        step(
            &mut p,
            &mut t,
            "blockdev-create",
            json!({"job-id": "c1", "options": {"driver": "file", "filename": "$D/a", "size": MIB}}),
        );
        let job = p.wait_concluded("c1");
        t.push(json!({ "concluded": job }));
        step(&mut p, &mut t, "query-block-jobs", Value::Null);
        // Verbs a concluded create job refuses, and its id still taken.
        step(&mut p, &mut t, "job-cancel", json!({"id": "c1"}));
        step(&mut p, &mut t, "job-finalize", json!({"id": "c1"}));
        step(&mut p, &mut t, "job-complete", json!({"id": "c1"}));
        step(&mut p, &mut t, "block-job-dismiss", json!({"id": "c1"}));
        step(
            &mut p,
            &mut t,
            "blockdev-create",
            json!({"job-id": "c1", "options": {"driver": "file", "filename": "$D/b", "size": 0}}),
        );
        step(&mut p, &mut t, "job-dismiss", json!({"id": "c1"}));
        step(&mut p, &mut t, "job-dismiss", json!({"id": "c1"}));
        step(&mut p, &mut t, "query-jobs", Value::Null);
        t.push(json!({ "c1": p.statuses("c1") }));

        // A job that fails: the node does not exist.
        step(
            &mut p,
            &mut t,
            "blockdev-create",
            json!({"job-id": "c2", "options": {"driver": "qcow2", "file": "nosuch", "size": MIB}}),
        );
        let job = p.wait_concluded("c2");
        t.push(json!({ "concluded": job }));
        step(&mut p, &mut t, "job-dismiss", json!({"id": "c2"}));
        t.push(json!({ "c2": p.statuses("c2") }));
        assert_eq!(
            std::fs::metadata(p.dir.join("a")).unwrap().len(),
            MIB,
            "{}",
            p.name
        );
        transcripts.push(t);
    }
    assert_eq!(
        transcripts[0], transcripts[1],
        "livesnapd (left) and qsd (right) differ"
    );
    let t = &transcripts[0];
    let seq = |key: &str| {
        t.iter()
            .find_map(|e| e.get(key).cloned())
            .unwrap_or_else(|| panic!("no {key} in {t:?}"))
    };
    assert_eq!(seq("c1"), json!(OK));
    assert_eq!(seq("c2"), json!(FAILED));
}

/// Options that must give the same command error, or the same job error
/// and status sequence, on both daemons (`f` is a file node, `fro` the same
/// file read-only).
const PARITY_CASES: &[&str] = &[
    // Argument checking (command errors).
    r#"{"driver": "file", "filename": "$D/x", "size": "1"}"#,
    r#"{"driver": "file", "filename": "$D/x", "size": 1.5}"#,
    r#"{"driver": "file", "filename": "$D/x", "size": 1000, "preallocation": "bogus"}"#,
    r#"{"driver": "file", "filename": "$D/x"}"#,
    r#"{"driver": "file", "size": 0}"#,
    r#"{"driver": "file", "filename": "$D/x", "size": 0, "nocow": 1}"#,
    r#"{"driver": "qcow2", "file": "f", "size": "1"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "cluster-size": "1"}"#,
    r#"{"driver": "qcow2", "file": 5, "size": 65536}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "backing-fmt": "bogus", "backing-file": "x"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "lazy-refcounts": "yes"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "version": "v4"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "refcount-bits": 1.0}"#,
    r#"{"driver": "qcow2", "size": 65536}"#,
    r#"{"driver": "qcow2", "file": "f"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "bogus": 1}"#,
    r#"{"driver": "bogus"}"#,
    r#"{"driver": "raw"}"#,
    r#"{"driver": "raw", "x": 1}"#,
    r#"{"driver": "blkdebug"}"#,
    r#"{"driver": "host_device"}"#,
    // Checks the job makes (job errors).
    r#"{"driver": "file", "filename": "$D/m", "size": 1048576, "preallocation": "metadata"}"#,
    r#"{"driver": "file", "filename": "$D/n", "size": -1}"#,
    r#"{"driver": "file", "filename": "$D/o", "size": 9223372036854775807}"#,
    r#"{"driver": "file", "filename": "$D/p", "size": 1000, "extent-size-hint": 4294967296}"#,
    r#"{"driver": "file", "filename": "$D/q", "size": 1000, "extent-size-hint": -1}"#,
    r#"{"driver": "file", "filename": "", "size": 1000}"#,
    r#"{"driver": "file", "filename": "$D", "size": 1000}"#,
    r#"{"driver": "file", "filename": "/nonexistent/x", "size": 0}"#,
    r#"{"driver": "qcow2", "file": "nosuch", "size": 65536}"#,
    r#"{"driver": "qcow2", "file": "fro", "size": 65536}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 1000}"#,
    r#"{"driver": "qcow2", "file": "f", "size": -1}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "cluster-size": 1000}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "cluster-size": 256}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "cluster-size": 4194304}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "cluster-size": -65536}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "version": "v2", "lazy-refcounts": true}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "refcount-bits": 3}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "refcount-bits": 0}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "refcount-bits": 128}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "refcount-bits": -16}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "version": "v2", "refcount-bits": 8}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "backing-fmt": "raw"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "backing-file": "/x", "preallocation": "metadata"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "data-file-raw": true}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 9223372036854775296}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 4611686018427387904}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 1099511627776, "cluster-size": 512}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "cluster-size": 512, "backing-file": "$LONG500", "backing-fmt": "raw"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "backing-file": "$LONG1024", "backing-fmt": "raw"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "backing-file": "$LONG1024"}"#,
    // Accepted the same way.
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "cluster-size": 512, "backing-file": "base.raw", "backing-fmt": "raw"}"#,
    r#"{"driver": "qcow2", "file": "f", "size": 65536, "extended-l2": false, "compression-type": "zlib", "data-file-raw": false}"#,
    r#"{"driver": "file", "filename": "$D/r", "size": 1000, "nocow": true, "extent-size-hint": 0}"#,
];

#[test]
fn bad_options_match_qsd() {
    let cases: Vec<Value> = PARITY_CASES
        .iter()
        .map(|c| {
            let c = c
                .replace("$LONG500", &"b".repeat(500))
                .replace("$LONG1024", &"b".repeat(1024));
            serde_json::from_str(&c).unwrap_or_else(|e| panic!("{c}: {e}"))
        })
        .collect();
    let mut results = Vec::new();
    for mut p in Peer::both() {
        p.file_node("img", "f");
        p.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": "fro", "filename": "$D/img", "read-only": true}),
        );
        let r: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| p.create(&format!("j{i}"), c.clone()))
            .collect();
        results.push(r);
    }
    let mut diffs = Vec::new();
    for ((c, a), b) in PARITY_CASES.iter().zip(&results[0]).zip(&results[1]) {
        if a != b {
            diffs.push(format!("{c}\n  livesnapd: {a:?}\n  qsd:       {b:?}"));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn qcow2_options_make_images_like_qsd() {
    let variants = [
        json!({}),
        json!({"cluster-size": 512}),
        json!({"cluster-size": 4096}),
        json!({"cluster-size": 2097152}),
        json!({"refcount-bits": 1}),
        json!({"refcount-bits": 4}),
        json!({"refcount-bits": 8}),
        json!({"refcount-bits": 64}),
        json!({"version": "v2"}),
        json!({"version": "v3", "lazy-refcounts": true}),
        json!({"preallocation": "metadata"}),
        json!({"preallocation": "falloc", "cluster-size": 4096}),
        json!({"preallocation": "full", "refcount-bits": 2}),
        json!({"size": 0}),
        json!({"size": 1536, "cluster-size": 512}),
        json!({"backing-file": "base.qcow2", "backing-fmt": "qcow2", "size": 3 * MIB}),
        json!({"backing-file": "base.raw"}),
        json!({"backing-file": "", "backing-fmt": "raw"}),
    ];
    let mut facts: Vec<Vec<Value>> = Vec::new();
    let mut peers = Peer::both();
    for p in peers.iter_mut() {
        let mut f = Vec::new();
        for (i, v) in variants.iter().enumerate() {
            let file = format!("v{i}.qcow2");
            let node = format!("n{i}");
            p.file_node(&file, &node);
            let mut opts = json!({"driver": "qcow2", "file": node, "size": 8 * MIB});
            for (k, val) in v.as_object().unwrap() {
                opts[k] = val.clone();
            }
            let (err, seq) = p.create(&format!("q{i}"), opts).unwrap();
            assert_eq!(err, None, "{}: {v}", p.name);
            assert_eq!(seq, OK, "{}: {v}", p.name);
            let image = p.path(&file);
            let info = qemu_img_info(&image);
            if info["backing-filename"].is_null() {
                check_clean(&image);
            }
            f.push(image_facts(&info));
        }
        facts.push(f);
    }
    for ((v, a), b) in variants.iter().zip(&facts[0]).zip(&facts[1]) {
        assert_eq!(a, b, "{v}: livesnapd (left) and qsd (right) images differ");
    }

    // livesnapd serves what it made: written through NBD, read back, checked.
    let p = &mut peers[0];
    let sock = p.path("nbd.sock");
    p.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    for (i, v) in variants.iter().enumerate() {
        if v.get("backing-file").is_some() || v.get("size").is_some() {
            continue;
        }
        let (node, id) = (format!("img{i}"), format!("e{i}"));
        p.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node, "file": format!("n{i}")}),
        );
        p.ok(
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node, "writable": true}),
        );
        let url = format!("nbd+unix:///{node}?socket={sock}");
        qemu_io(
            &url,
            "raw",
            &[
                "read -P 0 0 8M",
                "write -P 0x5a 1000 200000",
                "write -P 0x5b 7M 1M",
                "read -P 0x5a 1000 200000",
                "flush",
            ],
        );
        p.del_export(&id);
        p.ok("blockdev-del", json!({"node-name": node}));
        check_clean(&p.path(&format!("v{i}.qcow2")));
    }
}

#[test]
fn file_creation_matches_qsd() {
    // (size, preallocation): QEMU writes the first block of a new file, so a
    // tiny file grows to 512 bytes unless it was fully preallocated.
    let cases = [
        (0u64, "off"),
        (100, "off"),
        (1000, "off"),
        (5000, "off"),
        (100, "falloc"),
        (70000, "falloc"),
        (100, "full"),
        (3 * MIB + 5, "full"),
        (0, "falloc"),
    ];
    let mut sizes = Vec::new();
    for mut p in Peer::both() {
        // An existing file is emptied first.
        std::fs::write(p.dir.join("old"), vec![0x77u8; 10000]).unwrap();
        let (err, _) = p
            .create(
                "old",
                json!({"driver": "file", "filename": "$D/old", "size": 8192}),
            )
            .unwrap();
        assert_eq!(err, None);
        let old = std::fs::read(p.dir.join("old")).unwrap();
        assert_eq!(old, vec![0u8; 8192], "{}", p.name);
        let mut s = Vec::new();
        for (i, (size, prealloc)) in cases.iter().enumerate() {
            let file = format!("f{i}");
            let (err, seq) = p
                .create(
                    &format!("j{i}"),
                    json!({"driver": "file", "filename": format!("$D/{file}"),
                           "size": size, "preallocation": prealloc}),
                )
                .unwrap();
            assert_eq!(err, None, "{}: {size} {prealloc}", p.name);
            assert_eq!(seq, OK);
            let meta = std::fs::metadata(p.dir.join(&file)).unwrap();
            let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
            if *prealloc != "off" {
                assert!(
                    allocated >= *size,
                    "{}: {size} {prealloc}: {allocated} bytes allocated",
                    p.name
                );
            }
            s.push(meta.len());
        }
        sizes.push(s);
    }
    assert_eq!(sizes[0], sizes[1], "file lengths: livesnapd, qsd");
}

#[test]
fn inline_file_reference_is_opened_for_the_job_only() {
    let mut nodes = Vec::new();
    for mut p in Peer::both() {
        let (err, _) = p
            .create(
                "f",
                json!({"driver": "file", "filename": "$D/i.qcow2", "size": 0}),
            )
            .unwrap();
        assert_eq!(err, None);
        let (err, seq) = p
            .create(
                "q",
                json!({"driver": "qcow2", "size": 4 * MIB,
                       "file": {"driver": "file", "filename": "$D/i.qcow2"}}),
            )
            .unwrap();
        assert_eq!(err, None, "{}", p.name);
        assert_eq!(seq, OK);
        check_clean(&p.path("i.qcow2"));
        nodes.push(p.ok("query-named-block-nodes", Value::Null));
    }
    assert_eq!(nodes, [json!([]), json!([])], "the temporary node stays");
}

#[test]
fn failing_protocol_node_fails_the_job_like_qsd() {
    let rules = [
        json!([{"event": "none", "iotype": "write"}]),
        json!([{"event": "pwritev", "iotype": "write", "errno": 28}]),
    ];
    let mut results = Vec::new();
    for mut p in Peer::both() {
        let mut r = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let file = format!("d{i}");
            let (err, _) = p
                .create(
                    &format!("f{i}"),
                    json!({"driver": "file", "filename": format!("$D/{file}"), "size": 0}),
                )
                .unwrap();
            assert_eq!(err, None);
            let node = format!("dbg{i}");
            p.ok(
                "blockdev-add",
                json!({"driver": "blkdebug", "node-name": node, "inject-error": rule,
                       "image": {"driver": "file", "filename": format!("$D/{file}")}}),
            );
            r.push(p.create(
                &format!("q{i}"),
                json!({"driver": "qcow2", "file": node, "size": MIB}),
            ));
        }
        results.push(r);
    }
    assert_eq!(results[0], results[1], "livesnapd (left), qsd (right)");
    assert_eq!(
        results[0][0],
        Ok((
            Some("Could not write qcow2 header: Input/output error".to_string()),
            FAILED.iter().map(|s| s.to_string()).collect()
        ))
    );
}

#[test]
fn what_livesnapd_cannot_create_is_refused_by_name() {
    let mut p = Peer::livesnapd();
    p.file_node("img", "f");
    let cases = [
        (
            json!({"driver": "qcow2", "file": "f", "size": 65536, "data-file": "f"}),
            "External data files are not supported by livesnapd",
        ),
        (
            json!({"driver": "qcow2", "file": "f", "size": 65536, "encrypt": {"format": "luks"}}),
            "Encrypted qcow2 images are not supported by livesnapd",
        ),
        (
            json!({"driver": "qcow2", "file": "f", "size": 65536, "compression-type": "zstd"}),
            "qcow2 compression type 'zstd' is not supported by livesnapd",
        ),
        (
            json!({"driver": "qcow2", "file": "f", "size": 65536, "extended-l2": true}),
            "Extended L2 entries are not supported by livesnapd",
        ),
        (
            json!({"driver": "vmdk", "file": "f", "size": 65536}),
            "Driver 'vmdk' is not supported by livesnapd blockdev-create (only file and qcow2)",
        ),
    ];
    for (i, (opts, text)) in cases.into_iter().enumerate() {
        assert_eq!(
            p.create(&format!("j{i}"), opts.clone()),
            Err(text.to_string()),
            "{opts}"
        );
        assert_eq!(p.ok("query-jobs", Value::Null), json!([]), "{opts}");
    }
    // The image stays untouched by refused commands.
    assert_eq!(
        std::fs::metadata(Path::new(&p.path("img"))).unwrap().len(),
        0
    );
}
