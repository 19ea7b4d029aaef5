//! livesnapd against qemu-storage-daemon, command for command: both
//! daemons get the same QMP sequence and their exchanges must agree
//! (`livesnap_testkit::compat` says how they are compared).
//!
//! Deliberate differences (docs/qmp.md, "Differences from QEMU") are not
//! compared: each is sent through [`Pair::deviation`], which asserts
//! livesnapd's own reply instead, and says why in a comment.

use livesnap_testkit as harness;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::compat::{Exchange, Mon, Pair, REPLY_TIMEOUT};
use harness::{run, shape_diff, Livesnapd};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
// ---------------------------------------------------------------------------
// The tests.

#[test]
fn greeting_negotiation_version_and_commands() {
    let mut p = Pair::unnegotiated();
    let (lg, qg) = (p.ls.mon.greeting.clone(), p.qs.mon.greeting.clone());
    assert_eq!(shape_diff(&lg, &qg, "greeting"), None, "{lg} / {qg}");
    assert_eq!(lg["QMP"]["capabilities"], qg["QMP"]["capabilities"]);
    assert_eq!(lg["QMP"]["version"]["qemu"]["major"], 10);

    // Before qmp_capabilities every command is refused, known or not.
    for cmd in ["query-version", "nosuch", "blockdev-add", "quit"] {
        p.same_err(
            cmd,
            Value::Null,
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        );
    }
    // Arguments are checked before the negotiation state.
    p.same_err(
        "qmp_capabilities",
        json!({"enable": ["bogus"]}),
        "Parameter 'null' does not accept value 'bogus'",
    );
    p.same_ok("qmp_capabilities", json!({"enable": ["oob"]}));
    let again = p.same("qmp_capabilities", Value::Null);
    assert_eq!(again.class(), "CommandNotFound");
    assert_eq!(
        again.desc(),
        "Capabilities negotiation is already complete, command ignored"
    );

    let v = p.same_ok("query-version", Value::Null);
    assert_eq!(v["qemu"]["major"], 10);
    assert_eq!(v["qemu"]["minor"], 0);
    assert_eq!(v["qemu"], lg["QMP"]["version"]["qemu"]);
    p.same_err(
        "query-version",
        json!({"x": 1}),
        "Parameter 'x' is unexpected",
    );
    let nosuch = p.same("nosuch", Value::Null);
    assert_eq!(nosuch.class(), "CommandNotFound");

    // query-commands: livesnapd lists a subset of qsd's commands, in the same shape.
    let (l, q) = p.exchange("query-commands", &Value::Null);
    let (l, q) = (l.ret().as_array().unwrap(), q.ret().as_array().unwrap());
    let qsd_names: Vec<&str> = q.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for c in l {
        assert_eq!(shape_diff(c, &q[0], "command"), None, "{c}");
        let name = c["name"].as_str().unwrap();
        // livesnap's own commands, documented as extensions in docs/qmp.md.
        let extension = name == "x-blkdebug-set-rules";
        assert!(
            qsd_names.contains(&name) || extension,
            "qsd has no command {name}"
        );
    }
    for name in [
        "qmp_capabilities",
        "blockdev-add",
        "block-export-del",
        "quit",
    ] {
        assert!(l.iter().any(|c| c["name"] == name), "{name} not listed");
    }
    p.both_quiet();
}

#[test]
fn blockdev_add_and_query_named_block_nodes() {
    let mut p = Pair::new();
    let empty = p.same_ok("query-named-block-nodes", Value::Null);
    assert_eq!(empty, json!([]));
    // file node by itself, raw over it by name.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f0", "filename": "@DIR@/a.img"}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    );
    // Inline child, read-only inherited by it.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r1", "read-only": true,
               "file": {"driver": "file", "filename": "@DIR@/b.img"}}),
    );
    // Named inline child with cache.direct; the parent's cache stays.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r2",
               "file": {"driver": "file", "node-name": "r2-file", "filename": "@DIR@/b.img",
                        "cache": {"direct": true}}}),
    );
    // cache.direct on the parent is inherited by the inline child.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r3", "cache": {"direct": true},
               "file": {"driver": "file", "filename": "@DIR@/b.img"}}),
    );
    // A writable raw over a read-only file node opens (only a writable
    // export of it is refused, see block_export_add_and_del).
    p.same_ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "fro", "filename": "@DIR@/b.img", "read-only": true}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "rw-over-ro", "file": "fro"}),
    );
    // Options accepted and ignored by livesnapd are accepted by both.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "opts", "filename": "@DIR@/b.img",
               "read-only": true, "auto-read-only": true, "force-share": true,
               "discard": "unmap", "detect-zeroes": "off", "locking": "off", "active": true,
               "aio": "threads", "aio-max-batch": 0, "drop-cache": true}),
    );

    let nodes = p.same_ok("query-named-block-nodes", Value::Null);
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 11, "{names:?}");
    assert_eq!(&names[..3], ["opts", "rw-over-ro", "fro"], "newest first");
    assert_eq!(nodes[0]["ro"], true);
    assert_eq!(nodes[1]["ro"], false);
    p.same_ok("query-named-block-nodes", json!({"flat": true}));
    p.same_ok("query-named-block-nodes", json!({"flat": false}));

    // A window of the file: QEMU names such a node by a `json:{...}`
    // pseudo-filename, livesnapd by the file's path (docs/qmp.md), so
    // `filename`/`file` are compared by type only.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "win", "offset": 512, "size": 4096,
               "file": {"driver": "file", "filename": "@DIR@/a.img"}}),
    );
    let l = p.same_masked(
        "query-named-block-nodes",
        json!({"flat": true}),
        &["filename", "file"],
    );
    let win = &l.ret()[0];
    assert_eq!(win["node-name"], "win");
    assert_eq!(win["image"]["virtual-size"], 4096);
    assert_eq!(
        p.ls.unsubst(win["image"]["filename"].as_str().unwrap()),
        "@DIR@/a.img"
    );
    p.both_quiet();
}

#[test]
fn blockdev_add_errors() {
    let mut p = Pair::new();
    p.same_ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f0", "filename": "@DIR@/a.img"}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "fro", "filename": "@DIR@/b.img", "read-only": true}),
    );
    let inline_a = json!({"driver": "file", "filename": "@DIR@/a.img"});
    let cases: Vec<(Value, &str)> = vec![
        // Names.
        (
            json!({"driver": "raw", "node-name": "f0", "file": "fro"}),
            "Duplicate nodes with node-name='f0'",
        ),
        (
            json!({"driver": "raw", "node-name": "1bad", "file": "fro"}),
            "Invalid node-name: '1bad'",
        ),
        (
            json!({"driver": "raw", "node-name": "#block1", "file": "fro"}),
            "Invalid node-name: '#block1'",
        ),
        (
            json!({"driver": "raw", "node-name": "", "file": "fro"}),
            "Invalid node-name: ''",
        ),
        (
            json!({"driver": "raw", "node-name": "a23456789012345678901234567890123", "file": "fro"}),
            "Node name too long",
        ),
        (
            json!({"driver": "raw", "file": inline_a}),
            "'node-name' must be specified for the root node",
        ),
        // Drivers and files.
        (
            json!({"driver": "nosuch", "node-name": "x"}),
            "Parameter 'driver' does not accept value 'nosuch'",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": {"driver": "nosuch"}}),
            "Parameter 'driver' does not accept value 'nosuch'",
        ),
        (
            json!({"driver": "file", "node-name": "x", "filename": "@DIR@/missing.img"}),
            "Could not open '@DIR@/missing.img': No such file or directory",
        ),
        (
            json!({"driver": "file", "node-name": "x", "filename": "@DIR@"}),
            "Could not open '@DIR@': Is a directory",
        ),
        (
            json!({"driver": "file", "node-name": "x", "filename": "@DIR@", "read-only": true}),
            "'file' driver requires '@DIR@' to be a regular file",
        ),
        (
            json!({"driver": "file", "node-name": "x", "filename": ""}),
            "The 'file' block driver requires a file name",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "nosuch"}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        // Missing, unexpected and mistyped parameters, nested ones by path.
        (
            json!({"node-name": "x"}),
            "Parameter 'driver' is missing",
        ),
        (
            json!({"driver": "raw", "node-name": "x"}),
            "Parameter 'file' is missing",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": {"driver": "file"}}),
            "Parameter 'file.filename' is missing",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "f0", "bogus": 1}),
            "Parameter 'bogus' is unexpected",
        ),
        (
            json!({"driver": "raw", "node-name": "x",
                   "file": {"driver": "file", "filename": "@DIR@/a.img", "bogus": 1}}),
            "Parameter 'file.bogus' is unexpected",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "f0", "read-only": "yes"}),
            "Invalid parameter type for 'read-only', expected: boolean",
        ),
        (
            json!({"driver": "raw", "node-name": 5, "file": "f0"}),
            "Invalid parameter type for 'node-name', expected: string",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": 5}),
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            json!({"driver": "raw", "node-name": "x",
                   "file": {"driver": "file", "filename": "@DIR@/a.img", "cache": {"direct": 1}}}),
            "Invalid parameter type for 'file.cache.direct', expected: boolean",
        ),
        (
            json!({"driver": "raw", "node-name": "x",
                   "file": {"driver": "file", "filename": "@DIR@/a.img", "aio-max-batch": "x"}}),
            "Invalid parameter type for 'file.aio-max-batch', expected: integer",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "f0", "offset": "512"}),
            "Invalid parameter type for 'offset', expected: integer",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "f0", "offset": 9223372036854775808u64}),
            "Invalid parameter type for 'offset', expected: integer",
        ),
        (
            json!({"driver": "raw", "node-name": "x",
                   "file": {"driver": "file", "filename": "@DIR@/a.img", "aio": "bogus"}}),
            "Parameter 'aio' does not accept value 'bogus'",
        ),
        // Members are visited in schema order: the first bad one is reported.
        (
            json!({"driver": "file", "node-name": "x", "filename": "@DIR@/a.img",
                   "read-only": "x", "discard": 5}),
            "Invalid parameter type for 'discard', expected: string",
        ),
        (
            json!({"driver": "file", "node-name": "x", "filename": "@DIR@/a.img",
                   "read-only": 5, "active": "x"}),
            "Invalid parameter type for 'active', expected: boolean",
        ),
        // raw windows.
        (
            json!({"driver": "raw", "node-name": "x", "file": "f0", "offset": -1}),
            "Value '-1' is out of range for parameter 'offset'",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "f0", "offset": 2 * MIB}),
            "Offset (2097152) cannot be greater than size of the containing file (1048576)",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "f0", "offset": 512, "size": MIB}),
            "The sum of offset (512) and size (1048576) has to be smaller or equal to the  actual size of the containing file (1048576)",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "f0", "size": 1000}),
            "Specified size is not multiple of 512",
        ),
        // Option combinations QEMU refuses.
        (
            json!({"driver": "file", "node-name": "x", "filename": "@DIR@/a.img", "force-share": true}),
            "force-share=on can only be used with read-only images",
        ),
        (
            json!({"driver": "raw", "node-name": "x", "read-only": true, "force-share": true,
                   "file": {"driver": "file", "filename": "@DIR@/a.img", "read-only": false}}),
            "force-share=on can only be used with read-only images",
        ),
        (
            json!({"driver": "file", "node-name": "x", "filename": "@DIR@/a.img", "aio": "native"}),
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ),
        // The file child is opened before its parent's name is checked.
        (
            json!({"driver": "raw", "node-name": "f0",
                   "file": {"driver": "file", "filename": "@DIR@/missing.img"}}),
            "Could not open '@DIR@/missing.img': No such file or directory",
        ),
        (
            json!({"driver": "raw", "node-name": "1bad", "file": "nosuch"}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            json!({"driver": "raw", "node-name": "x",
                   "file": {"driver": "file", "node-name": "1bad", "filename": "@DIR@/a.img"}}),
            "Invalid node-name: '1bad'",
        ),
        (
            json!({"driver": "raw", "node-name": "x",
                   "file": {"driver": "file", "node-name": "f0", "filename": "@DIR@/a.img"}}),
            "Duplicate nodes with node-name='f0'",
        ),
        // A failing parent takes its freshly opened child with it.
        (
            json!({"driver": "raw", "node-name": "f0",
                   "file": {"driver": "file", "node-name": "child", "filename": "@DIR@/a.img"}}),
            "Duplicate nodes with node-name='f0'",
        ),
    ];
    for (args, desc) in cases {
        p.same_err("blockdev-add", args, desc);
    }
    p.same_err(
        "query-named-block-nodes",
        json!({"flat": 1}),
        "Invalid parameter type for 'flat', expected: boolean",
    );
    // No failure left a node behind.
    let nodes = p.same_ok("query-named-block-nodes", Value::Null);
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");

    // A raw file is not a qcow2 image (blockdev_add_qcow2 has the rest).
    p.same_err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": "f0"}),
        "Image is not in qcow2 format",
    );
    let nodes = p.same_ok("query-named-block-nodes", Value::Null);
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");

    // Deliberate differences, last because qsd's state may change.
    p.deviation(
        "blockdev-add",
        json!({"driver": "host_device", "node-name": "q", "filename": "/dev/null"}),
        "Driver 'host_device' is not supported by livesnapd",
    );
    // Inactive nodes (for migration) do not exist in livesnapd.
    p.deviation(
        "blockdev-add",
        json!({"driver": "file", "node-name": "inactive", "filename": "@DIR@/a.img", "active": false}),
        "Inactive nodes are not supported by livesnapd",
    );
    // Zero detection is not implemented; "off" is accepted (above).
    p.deviation(
        "blockdev-add",
        json!({"driver": "file", "node-name": "dz", "filename": "@DIR@/a.img", "detect-zeroes": "on"}),
        "detect-zeroes is not supported by livesnapd",
    );
}

/// The same qcow2 files on both sides, made by qemu-img and qemu-io in
/// each directory: `base` (raw) ← `mid` ← `top`, copies `t1`..`t6` of
/// `top`, `v2` (a version 2 image) and `orphan` (over a missing file).
/// Every qcow2 image has data, so its file ends on a cluster boundary
/// (livesnapd completes a partly written last cluster when it opens an
/// image writable; docs/qmp.md).
fn qcow2_images(p: &Pair) {
    for dir in [&p.ls.dir, &p.qs.dir] {
        let sh = |args: &[&str]| {
            let (prog, rest) = args.split_first().unwrap();
            run(Command::new(prog).current_dir(dir).args(rest));
        };
        sh(&["qemu-img", "create", "-q", "-f", "raw", "base", "1M"]);
        sh(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base", "-F", "raw", "mid",
        ]);
        sh(&["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "mid"]);
        sh(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid", "-F", "qcow2", "top",
        ]);
        sh(&["qemu-io", "-f", "qcow2", "-c", "write 64k 64k", "top"]);
        for i in 1..=6 {
            sh(&["cp", "top", &format!("t{i}")]);
        }
        sh(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2",
            "1M",
        ]);
        sh(&["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "v2"]);
        sh(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "missing", "-F", "raw",
            "orphan", "1M",
        ]);
    }
}

#[test]
fn blockdev_add_qcow2() {
    let mut p = Pair::new();
    qcow2_images(&p);
    // The chain from the headers: the image first, then its backing chain
    // (six nodes, in QEMU's order), with and without `flat`.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": "@DIR@/top"}}),
    );
    let nodes = p.same_ok("query-named-block-nodes", Value::Null);
    let drv: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["drv"].as_str().unwrap())
        .collect();
    assert_eq!(drv, ["raw", "file", "qcow2", "file", "qcow2", "file"]);
    assert_eq!(
        nodes[4]["image"]["backing-image"]["backing-image"]["format"],
        "raw"
    );
    p.same_ok("query-named-block-nodes", json!({"flat": true}));
    // The file child by name, options accepted and ignored, read-only.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "t1-file", "filename": "@DIR@/t1"}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t1", "file": "t1-file",
               "lazy-refcounts": true, "pass-discard-request": true,
               "pass-discard-snapshot": false, "pass-discard-other": false,
               "discard-no-unref": true, "overlap-check": {"template": "all", "main-header": false},
               "cache-size": 1048576, "l2-cache-size": 65536, "l2-cache-entry-size": 4096,
               "cache-clean-interval": 0}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t2", "read-only": true, "overlap-check": "cached",
               "refcount-cache-size": 65536,
               "file": {"driver": "file", "filename": "@DIR@/t2"}}),
    );
    p.same_ok("query-named-block-nodes", Value::Null);

    let file = |name: &str| json!({"driver": "file", "filename": format!("@DIR@/{name}")});
    let with = |name: &str, extra: Value| {
        let mut a = json!({"driver": "qcow2", "node-name": "x", "file": file(name)});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    let errors: Vec<(Value, &str)> = vec![
        (
            json!({"driver": "qcow2", "node-name": "x"}),
            "Parameter 'file' is missing",
        ),
        (with("t3", json!({"bogus": 1})), "Parameter 'bogus' is unexpected"),
        (
            with("t3", json!({"lazy-refcounts": "yes"})),
            "Invalid parameter type for 'lazy-refcounts', expected: boolean",
        ),
        (
            with("t3", json!({"backing": 5})),
            "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
        ),
        (
            with("t3", json!({"overlap-check": "bogus"})),
            "Parameter 'overlap-check' does not accept value 'bogus'",
        ),
        (
            with("t3", json!({"overlap-check": 5})),
            "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks",
        ),
        (
            with("t3", json!({"overlap-check": {"bogus": true}})),
            "Parameter 'overlap-check.bogus' is unexpected",
        ),
        (
            with("t3", json!({"overlap-check": {"main-header": 1}})),
            "Invalid parameter type for 'overlap-check.main-header', expected: boolean",
        ),
        (
            with("t3", json!({"l2-cache-size": 18446744073709551615u64})),
            "Invalid parameter type for 'l2-cache-size', expected: integer",
        ),
        (
            with("t3", json!({"l2-cache-size": -1})),
            "Value '-1' is out of range for parameter 'l2-cache-size'",
        ),
        (
            with("t3", json!({"refcount-cache-size": -5})),
            "Value '-5' is out of range for parameter 'refcount-cache-size'",
        ),
        (
            with("t3", json!({"cache-size": 1, "l2-cache-size": 1, "refcount-cache-size": 1})),
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
        ),
        (
            with("t3", json!({"cache-size": 1, "l2-cache-size": 2})),
            "l2-cache-size may not exceed cache-size",
        ),
        (
            with("t3", json!({"cache-size": 1, "refcount-cache-size": 2})),
            "refcount-cache-size may not exceed cache-size",
        ),
        (
            with("t3", json!({"l2-cache-entry-size": 1000})),
            "L2 cache entry size must be a power of two between 512 and the cluster size (65536)",
        ),
        (
            with("t3", json!({"l2-cache-entry-size": 131072})),
            "L2 cache entry size must be a power of two between 512 and the cluster size (65536)",
        ),
        (
            with("t3", json!({"cache-clean-interval": -1})),
            "Cache clean interval too big",
        ),
        (
            with("t3", json!({"cache-clean-interval": 4294967296u64})),
            "Cache clean interval too big",
        ),
        (
            with("v2", json!({"lazy-refcounts": true})),
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
        ),
        // The image is checked before its options.
        (
            with("base", json!({"cache-size": -1})),
            "Image is not in qcow2 format",
        ),
        (
            with("t3", json!({"backing": "nosuch"})),
            "Could not open backing file: Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            with("t3", json!({"backing": {"driver": "raw", "file": file("nosuch")}})),
            "Could not open backing file: Could not open '@DIR@/nosuch': No such file or directory",
        ),
        (
            with("t3", json!({"backing": {"driver": "qcow2", "file": file("base")}})),
            "Could not open backing file: Image is not in qcow2 format",
        ),
        (
            with("orphan", json!({})),
            "Could not open backing file: Could not open '@DIR@/missing': No such file or directory",
        ),
    ];
    for (args, desc) in errors {
        p.same_err("blockdev-add", args, desc);
    }

    // The backing node given by name, inline, or none. QEMU names such a
    // node by a json: pseudo-filename; livesnapd by its file (docs/qmp.md).
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "file": file("mid")}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t3", "file": file("t3"), "backing": "mid"}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t4", "file": file("t4"),
               "backing": {"driver": "raw", "file": file("base")}}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t5", "file": file("t5"), "backing": null}),
    );
    let l = p.same_masked(
        "query-named-block-nodes",
        json!({"flat": false}),
        &["filename", "file"],
    );
    let t5 = &l.ret()[0];
    assert_eq!(t5["node-name"], "t5");
    assert_eq!(t5["backing_file_depth"], 0);
    assert_eq!(
        t5["image"]["backing-filename"], "mid",
        "the header's name stays"
    );
    assert_eq!(p.ls.unsubst(t5["file"].as_str().unwrap()), "@DIR@/t5");
    p.same_masked(
        "query-named-block-nodes",
        json!({"flat": true}),
        &["filename", "file"],
    );
    // A node used as a backing image is busy.
    p.same_err(
        "blockdev-del",
        json!({"node-name": "mid"}),
        "Node 'mid' is busy: node is used as backing hd of 't3'",
    );

    // Deliberate differences, last because qsd's state may change.
    p.deviation(
        "blockdev-add",
        with(
            "t6",
            json!({"encrypt": {"format": "aes", "key-secret": "s"}}),
        ),
        "Encrypted qcow2 images are not supported by livesnapd",
    );
    p.deviation(
        "blockdev-add",
        with("t6", json!({"data-file": "f"})),
        "External data files are not supported by livesnapd",
    );
    p.both_quiet();
}

#[test]
fn blockdev_snapshot_and_sync() {
    let mut p = Pair::new();
    qcow2_images(&p);
    let file = |name: &str| json!({"driver": "file", "filename": format!("@DIR@/{name}")});
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": file("top")}),
    );
    // An export holds the chain: without a user QEMU drops an overlay once
    // the command is done (see the end of this test).
    p.same_ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nbd.sock"}}}),
    );
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top", "writable": true}),
    );
    let sync = |extra: Value| {
        let mut a = json!({"node-name": "top", "snapshot-file": "@DIR@/s1"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    let errors: Vec<(&str, Value, &str)> = vec![
        (
            "blockdev-snapshot",
            json!({}),
            "Parameter 'node' is missing",
        ),
        (
            "blockdev-snapshot",
            json!({"node": "top"}),
            "Parameter 'overlay' is missing",
        ),
        (
            "blockdev-snapshot",
            json!({"node": "top", "overlay": "x", "bogus": 1}),
            "Parameter 'bogus' is unexpected",
        ),
        (
            "blockdev-snapshot",
            json!({"node": "nosuch", "overlay": "top"}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            "blockdev-snapshot",
            json!({"node": "top", "overlay": "nosuch"}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "top"}),
            "Parameter 'snapshot-file' is missing",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({"mode": "bogus"})),
            "Parameter 'mode' does not accept value 'bogus'",
        ),
        (
            "blockdev-snapshot-sync",
            json!({"snapshot-file": "@DIR@/s1"}),
            "Cannot find device='' nor node-name=''",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({"node-name": "nosuch"})),
            "Cannot find device='' nor node-name='nosuch'",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({})),
            "New overlay node-name missing",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({"snapshot-node-name": "top"})),
            "New overlay node-name already in use",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({"snapshot-node-name": "1bad"})),
            "Invalid node-name: '1bad'",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({"snapshot-node-name": "s1", "format": "bogus"})),
            "Unknown file format 'bogus'",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({"snapshot-node-name": "s1", "format": "raw"})),
            "Backing file not supported for file format 'raw'",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({"snapshot-node-name": "s1", "snapshot-file": "@DIR@/nodir/s1"})),
            "Could not create '@DIR@/nodir/s1': No such file or directory",
        ),
        (
            "blockdev-snapshot-sync",
            sync(
                json!({"snapshot-node-name": "s1", "snapshot-file": "@DIR@/nofile",
                        "mode": "existing"}),
            ),
            "Could not open '@DIR@/nofile': No such file or directory",
        ),
    ];
    for (cmd, args, desc) in errors {
        p.same_err(cmd, args, desc);
    }
    // The overlay livesnapd creates is checked like qemu-img's below.
    p.same_ok(
        "blockdev-snapshot-sync",
        sync(json!({"snapshot-node-name": "s1", "format": "qcow2"})),
    );
    let exports = p.same_ok("query-block-exports", Value::Null);
    assert_eq!(exports[0]["node-name"], "s1");
    // Only the top of a chain can be snapshotted; an overlay must be free.
    p.same_err(
        "blockdev-snapshot-sync",
        json!({"node-name": "top", "snapshot-file": "@DIR@/s2", "snapshot-node-name": "s2"}),
        "Node 'top' is busy: node is used as backing hd of 's1'",
    );
    p.same_err(
        "blockdev-snapshot",
        json!({"node": "s1", "overlay": "top"}),
        "The overlay is already in use",
    );
    // Overlays made by qemu-img (qsd's image locks forbid opening them
    // over s1 while it is in use, so they come without their backing).
    for dir in [&p.ls.dir, &p.qs.dir] {
        run(Command::new("qemu-img").current_dir(dir).args([
            "create", "-q", "-f", "qcow2", "-b", "s1", "-F", "qcow2", "o2",
        ]));
    }
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": file("base")}),
    );
    p.same_err(
        "blockdev-snapshot",
        json!({"node": "s1", "overlay": "r"}),
        "The overlay does not support backing images",
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "o2", "file": file("o2"), "backing": null}),
    );
    p.same_err(
        "blockdev-snapshot",
        json!({"node": "o2", "overlay": "o2"}),
        "Making 'o2' a backing child of 'o2' would create a cycle",
    );
    p.same_ok("blockdev-snapshot", json!({"node": "s1", "overlay": "o2"}));
    let exports = p.same_ok("query-block-exports", Value::Null);
    assert_eq!(exports[0]["node-name"], "o2");
    p.same_err(
        "blockdev-snapshot",
        json!({"node": "s1", "overlay": "o2"}),
        "Node 's1' is busy: node is used as backing hd of 'o2'",
    );
    p.same_err(
        "blockdev-snapshot",
        json!({"node": "o2", "overlay": "o2"}),
        "The overlay is already in use",
    );
    p.same_err(
        "blockdev-del",
        json!({"node-name": "s1"}),
        "Node 's1' is busy: node is used as backing hd of 'o2'",
    );
    p.both_quiet();

    // Deliberate differences, last because qsd's state may change.
    // `device` names a node in livesnapd (which has no BlockBackends);
    // qsd finds no device.
    let (l, q) = p.exchange(
        "blockdev-snapshot-sync",
        &json!({"device": "o2", "snapshot-file": "@DIR@/s3"}),
    );
    assert!(l.is_ok(), "{l:?}");
    assert_eq!(q.desc(), "Cannot find device='o2' nor node-name=''");
    // A read-only overlay: QEMU attaches it; livesnapd moves the exports
    // onto the overlay, so refuses it.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t1", "file": file("t1"), "read-only": true,
               "backing": null}),
    );
    p.deviation(
        "blockdev-snapshot",
        json!({"node": "r", "overlay": "t1"}),
        "The overlay must be writable",
    );
    // Without a user, qsd drops the overlay blockdev-snapshot-sync made as
    // soon as the command is done; livesnapd keeps it as a node.
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t2", "file": file("t2")}),
    );
    p.same_ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "t2", "snapshot-file": "@DIR@/s4", "snapshot-node-name": "s4"}),
    );
    let (l, q) = p.exchange("query-named-block-nodes", &Value::Null);
    let has_s4 = |e: &Exchange| {
        e.ret()
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == "s4")
    };
    assert!(has_s4(&l) && !has_s4(&q));
}

#[test]
fn blockdev_del() {
    let mut p = Pair::new();
    p.same_ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f0", "filename": "@DIR@/a.img"}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r1",
               "file": {"driver": "file", "node-name": "r1-file", "filename": "@DIR@/b.img"}}),
    );
    p.same_ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nbd.sock"}}}),
    );
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "r1"}),
    );

    p.same_err(
        "blockdev-del",
        json!({"node-name": "f0"}),
        "Block device f0 is in use",
    );
    p.same_err(
        "blockdev-del",
        json!({"node-name": "r1"}),
        "Node r1 is in use",
    );
    p.same_err(
        "blockdev-del",
        json!({"node-name": "r1-file"}),
        "Node r1-file is not owned by the monitor",
    );
    p.same_err(
        "blockdev-del",
        json!({"node-name": "nosuch"}),
        "Failed to find node with node-name='nosuch'",
    );
    p.same_err(
        "blockdev-del",
        json!({}),
        "Parameter 'node-name' is missing",
    );
    p.same_err(
        "blockdev-del",
        json!({"node-name": 5}),
        "Invalid parameter type for 'node-name', expected: string",
    );

    let del = p.same("block-export-del", json!({"id": "e1"}));
    assert_eq!(del.events.len(), 1, "{del:?}");
    // The export is gone: the node and its inline child can go.
    p.same_ok("blockdev-del", json!({"node-name": "r1"}));
    p.same_ok("blockdev-del", json!({"node-name": "r0"}));
    p.same_ok("blockdev-del", json!({"node-name": "f0"}));
    let nodes = p.same_ok("query-named-block-nodes", Value::Null);
    assert_eq!(nodes, json!([]));
    p.same_err(
        "blockdev-del",
        json!({"node-name": "f0"}),
        "Failed to find node with node-name='f0'",
    );
    p.same_ok("nbd-server-stop", Value::Null);
    p.both_quiet();
}

#[test]
fn nbd_server_start_and_stop() {
    let mut p = Pair::new();
    p.same_err("nbd-server-stop", Value::Null, "NBD server not running");
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nodir/nbd.sock"}}}),
        "Failed to bind socket to @DIR@/nodir/nbd.sock: No such file or directory",
    );
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {}}}),
        "Parameter 'addr.data.path' is missing",
    );
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": 5}}}),
        "Invalid parameter type for 'addr.data.path', expected: string",
    );
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "bogus", "data": {}}}),
        "Parameter 'type' does not accept value 'bogus'",
    );
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nbd.sock"}},
               "max-connections": 4294967296u64}),
        "Parameter 'max-connections' expects uint32_t",
    );
    // A TCP port that is taken (the same one on both sides: both fail).
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": busy_port.to_string()}}}),
        "Failed to find an available port: Address already in use",
    );
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "notaport"}}}),
        "address resolution failed for 127.0.0.1:notaport: Servname not supported for ai_socktype",
    );
    drop(busy);

    // TCP on a free port of each side's own (qsd does not report the port).
    let inet = json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "@PORT@"}}});
    p.same_ok("nbd-server-start", inet.clone());
    for side in [&p.ls, &p.qs] {
        std::net::TcpStream::connect(("127.0.0.1", side.port))
            .unwrap_or_else(|e| panic!("{} does not listen on its port: {e}", side.name));
    }
    p.same_err("nbd-server-start", inet, "NBD server already running");
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nbd.sock"}}}),
        "NBD server already running",
    );
    p.same_ok("nbd-server-stop", Value::Null);
    p.same_err("nbd-server-stop", Value::Null, "NBD server not running");

    // Unix socket, with max-connections; ignored arguments are accepted.
    p.same_ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nbd.sock", "abstract": false}},
               "max-connections": 4, "handshake-max-seconds": 5}),
    );
    p.same_ok("nbd-server-stop", Value::Null);
    p.same_err("nbd-server-stop", Value::Null, "NBD server not running");

    // TLS credentials are objects (tests/nbd_tls.rs covers them in full).
    p.same_err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/tls.sock"}}, "tls-creds": "tls0"}),
        "No TLS credentials with id 'tls0'",
    );
    // Deliberate: no vsock/fd listeners (docs/qmp.md).
    p.deviation(
        "nbd-server-start",
        json!({"addr": {"type": "vsock", "data": {"cid": "1", "port": "1"}}}),
        "Socket address type 'vsock' is not supported by livesnapd",
    );
    p.both_quiet();
    // Last: qsd starts a server here.
    p.deviation(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/abstract", "abstract": true}}}),
        "Abstract unix sockets are not supported by livesnapd",
    );
}

#[test]
fn block_export_add_and_del() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut p = Pair::new();
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "disk",
               "file": {"driver": "file", "filename": "@DIR@/a.img"}}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "ro", "filename": "@DIR@/b.img", "read-only": true}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "rw-over-ro", "file": "ro"}),
    );
    p.same_err(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk"}),
        "NBD server not running",
    );
    p.same_ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nbd.sock"}}}),
    );
    p.same_ok("query-block-exports", Value::Null);

    let long_name = "n".repeat(4097);
    let too_long = format!("export name '{long_name}' too long");
    let errors: Vec<(Value, &str)> = vec![
        (
            json!({"type": "nbd", "id": "#e", "node-name": "disk"}),
            "Invalid block export id",
        ),
        (
            json!({"type": "nbd", "id": "e0", "node-name": "nosuch"}),
            "Cannot find device='' nor node-name='nosuch'",
        ),
        (
            json!({"type": "nbd", "id": "e0", "node-name": "ro", "writable": true}),
            "Cannot export read-only node as writable",
        ),
        (
            json!({"type": "nbd", "id": "e0", "node-name": "rw-over-ro", "writable": true}),
            "Block node is read-only",
        ),
        (
            json!({"type": "nbd", "node-name": "disk"}),
            "Parameter 'id' is missing",
        ),
        (
            json!({"type": "nbd", "id": "e0", "node-name": "disk", "bogus": 1}),
            "Parameter 'bogus' is unexpected",
        ),
        (
            json!({"type": "nbd", "id": "e0", "node-name": "disk", "writable": "yes"}),
            "Invalid parameter type for 'writable', expected: boolean",
        ),
        (
            json!({"type": "nbd", "id": "e0", "node-name": "disk", "writable": 5, "iothread": 5}),
            "Invalid parameter type for 'iothread', expected: string",
        ),
        (
            json!({"type": "bogus", "id": "e0", "node-name": "disk"}),
            "Parameter 'type' does not accept value 'bogus'",
        ),
        (
            json!({"type": "nbd", "id": "e0", "node-name": "disk", "name": long_name}),
            &too_long,
        ),
    ];
    for (args, desc) in errors {
        p.same_err("block-export-add", args, desc);
    }

    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk", "name": "disk",
               "description": "the disk", "writable": true}),
    );
    p.same_err(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "ro"}),
        "Block export id 'e0' is already in use",
    );
    p.same_err(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "ro", "name": "disk"}),
        "NBD server already has export named 'disk'",
    );
    // Read-only export of a writable raw over a read-only file is fine.
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "rw-over-ro", "writable": false}),
    );
    let exports = p.same_ok("query-block-exports", Value::Null);
    assert_eq!(
        exports,
        json!([
            {"node-name": "rw-over-ro", "shutting-down": false, "type": "nbd", "id": "e1"},
            {"node-name": "disk", "shutting-down": false, "type": "nbd", "id": "e0"},
        ])
    );

    p.same_err(
        "block-export-del",
        json!({"id": "nosuch"}),
        "Export 'nosuch' is not found",
    );
    p.same_err(
        "block-export-del",
        json!({"id": "e0", "mode": "bogus"}),
        "Parameter 'mode' does not accept value 'bogus'",
    );

    // Without clients the export goes at once: the event comes before the reply.
    let del = p.same("block-export-del", json!({"id": "e1"}));
    assert_eq!(del.events.len(), 1);
    assert_eq!(del.events[0]["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(del.events[0]["data"], json!({"id": "e1"}));
    let ts = &del.events[0]["timestamp"];
    assert!(
        ts["seconds"].is_u64() && ts["microseconds"].is_u64(),
        "{ts}"
    );

    // Safe mode refuses while a client is attached; hard mode drops it and
    // the event follows once the client is gone.
    let clients = p.nbd_clients(&rt, "disk");
    p.same_err(
        "block-export-del",
        json!({"id": "e0"}),
        "export 'e0' still in use",
    );
    p.same_err(
        "block-export-del",
        json!({"id": "e0", "mode": "safe"}),
        "export 'e0' still in use",
    );
    let (l, q) = p.exchange("block-export-del", &json!({"id": "e0", "mode": "hard"}));
    assert!(l.is_ok() && q.is_ok(), "{l:?} {q:?}");
    // The event may race with the reply in either daemon: take both together.
    let mut ls_events = l.events.clone();
    ls_events.extend(p.ls.mon.events(1 - l.events.len(), REPLY_TIMEOUT));
    let mut qs_events = q.events.clone();
    qs_events.extend(p.qs.mon.events(1 - q.events.len(), REPLY_TIMEOUT));
    assert_eq!(ls_events.len(), 1);
    assert_eq!(qs_events.len(), 1);
    assert_eq!(shape_diff(&ls_events[0], &qs_events[0], "event"), None);
    assert_eq!(ls_events[0]["data"], qs_events[0]["data"]);
    assert_eq!(p.ls.mask(&ls_events[0], &[]), p.qs.mask(&qs_events[0], &[]));
    drop(clients);
    p.same_err(
        "block-export-del",
        json!({"id": "e0"}),
        "Export 'e0' is not found",
    );
    let exports = p.same_ok("query-block-exports", Value::Null);
    assert_eq!(exports, json!([]));

    // nbd-server-stop removes every export: those without clients at once,
    // newest first, then the others once their clients are dropped; all
    // events come before the reply.
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk", "writable": true}),
    );
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "ro"}),
    );
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e2", "node-name": "rw-over-ro"}),
    );
    let clients = p.nbd_clients(&rt, "disk");
    let stop = p.same("nbd-server-stop", Value::Null);
    let ids: Vec<&Value> = stop.events.iter().map(|e| &e["data"]["id"]).collect();
    assert_eq!(ids, ["e2", "e1", "e0"]);
    drop(clients);
    p.same_ok("query-block-exports", Value::Null);
    p.same_err("nbd-server-stop", Value::Null, "NBD server not running");
    p.both_quiet();
}

#[test]
fn quit_answers_then_closes() {
    let mut p = Pair::new();
    p.same_err("quit", json!({"x": 1}), "Parameter 'x' is unexpected");
    p.same_ok("quit", Value::Null);
    for side in [&mut p.ls, &mut p.qs] {
        assert!(
            side.mon.closed_within(REPLY_TIMEOUT),
            "{}: monitor still open after quit",
            side.name
        );
    }
    let ls = &mut p.ls_proc;
    let start = Instant::now();
    while ls.is_running() {
        assert!(
            start.elapsed() < REPLY_TIMEOUT,
            "livesnapd still runs after quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Protocol-level deliberate differences (docs/qmp.md): asserted on
/// livesnapd only, since qsd behaves otherwise by design.
#[test]
fn deliberate_monitor_differences() {
    let ls = Livesnapd::bare();
    // The socket is created 0600 whatever the umask; qsd uses the umask.
    let mode = std::fs::metadata(&ls.qmp_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Several monitors on one socket at once; qsd serves one client at a
    // time per socket (the next one waits in the backlog).
    let mut a = Mon::connect(&ls.qmp_path);
    let mut b = Mon::connect(&ls.qmp_path);
    assert!(b.greeting.get("QMP").is_some());
    for m in [&mut a, &mut b] {
        let r = m.execute("qmp_capabilities", None);
        assert!(r.is_ok(), "{r:?}");
    }
}
