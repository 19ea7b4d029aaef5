//! Named dirty bitmaps against qemu-storage-daemon, command for command
//! (`livesnap_testkit::compat`): every `block-dirty-bitmap-*` command with
//! QEMU's argument checks, error classes and texts, the `dirty-bitmaps` of
//! `query-named-block-nodes`, `block-export-add` `bitmaps` with its rules,
//! and the `qemu:dirty-bitmap:NAME` contexts as nbdinfo and qemu-img see
//! them, on plain exports and on a fleecing (`snapshot-access`) export.
//!
//! Besides agreeing with qsd, each step asserts what the bitmaps must hold
//! (the writes made since a bitmap was created, by its granularity), so a
//! wrong answer shared by both would still fail.
//! `persistent_bitmaps_on_qcow2_match_qsd` does the same for bitmaps stored
//! in qcow2 images.

use livesnap_testkit as harness;

use std::collections::BTreeMap;
use std::process::Command;

use harness::compat::{Exchange, Pair, Side};
use harness::{create_image, run, run_status};
use livesnap_nbd::NbdClient;
use serde_json::{json, Value};

const K64: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// `raw` node `name` over `@DIR@/file` on both sides.
fn add_raw(p: &mut Pair, name: &str, file: &str) {
    p.same_ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": name,
               "file": {"driver": "file", "node-name": format!("{name}-file"),
                        "filename": format!("@DIR@/{file}")}}),
    );
}

fn start_nbd(p: &mut Pair) {
    p.same_ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "@DIR@/nbd.sock"}}}),
    );
}

/// The bitmaps of `node` as both daemons list them (the node's whole entry
/// compared, file sizes masked), as name → (count, recording, busy).
fn bitmaps(p: &mut Pair, node: &str) -> BTreeMap<String, (u64, bool, bool)> {
    let (l, q) = p.exchange("query-named-block-nodes", &json!({"flat": true}));
    let find = |e: &Exchange| {
        e.ret()
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == node)
            .unwrap_or_else(|| panic!("no node {node}"))
            .clone()
    };
    let (mut n, mut theirs) = (find(&l), find(&q));
    // The image's own bitmap directory: livesnapd writes a persistent
    // bitmap into it when the bitmap is added (its write-intent log), QEMU
    // at close, so the two differ while the image is open.
    for v in [&mut n, &mut theirs] {
        if let Some(data) = v["image"]["format-specific"]["data"].as_object_mut() {
            data.shift_remove("bitmaps");
        }
    }
    assert_eq!(
        p.ls.mask(&n, &["actual-size"]),
        p.qs.mask(&theirs, &["actual-size"]),
        "node {node}: livesnapd, then qsd"
    );
    n["dirty-bitmaps"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap().to_string(),
                        (
                            b["count"].as_u64().unwrap(),
                            b["recording"].as_bool().unwrap(),
                            b["busy"].as_bool().unwrap(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn count(p: &mut Pair, node: &str, name: &str) -> u64 {
    bitmaps(p, node)
        .get(name)
        .unwrap_or_else(|| panic!("no bitmap {name} on {node}"))
        .0
}

/// Writes `len` bytes 0xa5 at `offset` through export `export` on both sides.
fn write(p: &Pair, rt: &tokio::runtime::Runtime, export: &str, offset: u64, len: usize) {
    write_byte(p, rt, export, offset, len, 0xa5);
}

/// Writes `len` bytes `byte` at `offset` through export `export` on both sides.
fn write_byte(
    p: &Pair,
    rt: &tokio::runtime::Runtime,
    export: &str,
    offset: u64,
    len: usize,
    byte: u8,
) {
    for c in p.nbd_clients(rt, export) {
        rt.block_on(async {
            c.write(offset, &vec![byte; len], false).await.unwrap();
            c.disconnect().await.unwrap();
        });
    }
}

fn uri(side: &Side, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        side.dir.join("nbd.sock").display()
    )
}

/// `nbdinfo --map=CONTEXT` of `export` on both sides: the two must be the
/// same; gives the lines as (offset, length, state).
fn map(p: &Pair, export: &str, context: &str) -> Vec<(u64, u64, String)> {
    let out: Vec<String> = [&p.ls, &p.qs]
        .iter()
        .map(|side| {
            run(Command::new("nbdinfo")
                .arg(format!("--map={context}"))
                .arg(uri(side, export)))
        })
        .collect();
    assert_eq!(
        out[0], out[1],
        "nbdinfo --map={context} {export}: livesnapd, then qsd"
    );
    out[0]
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (
                w[0].parse().unwrap(),
                w[1].parse().unwrap(),
                w[3..].join(" "),
            )
        })
        .collect()
}

/// The dirty ranges of `nbdinfo --map=qemu:dirty-bitmap:NAME`.
fn dirty(p: &Pair, export: &str, name: &str) -> Vec<(u64, u64)> {
    map(p, export, &format!("qemu:dirty-bitmap:{name}"))
        .into_iter()
        .filter(|(_, _, s)| s == "dirty")
        .map(|(o, l, _)| (o, l))
        .collect()
}

/// The metadata contexts `nbdinfo --list` shows per export, the same on both sides.
fn contexts(p: &Pair) -> BTreeMap<String, Vec<String>> {
    let lists: Vec<BTreeMap<String, Vec<String>>> = [&p.ls, &p.qs]
        .iter()
        .map(|side| {
            let out = run(Command::new("nbdinfo")
                .args(["--list", "--json"])
                .arg(uri(side, "")));
            let v: Value = serde_json::from_str(&out).unwrap();
            v["exports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let ctx = e["contexts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c.as_str().unwrap().to_string())
                        .collect();
                    (e["export-name"].as_str().unwrap().to_string(), ctx)
                })
                .collect()
        })
        .collect();
    assert_eq!(lists[0], lists[1], "nbdinfo --list: livesnapd, then qsd");
    lists[0].clone()
}

#[test]
fn commands_arguments_and_errors_match_qsd() {
    let mut p = Pair::new();
    add_raw(&mut p, "a", "a.img");
    add_raw(&mut p, "b", "b.img");

    let add = |extra: Value| {
        let mut a = json!({"node": "a", "name": "n"});
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        a
    };
    let long = "x".repeat(1024);
    let add_errors: Vec<(Value, String)> = vec![
        (json!({"name": "n"}), "Parameter 'node' is missing".into()),
        (json!({"node": "a"}), "Parameter 'name' is missing".into()),
        (
            json!({"node": 1, "name": "n"}),
            "Invalid parameter type for 'node', expected: string".into(),
        ),
        (
            add(json!({"bogus": 1})),
            "Parameter 'bogus' is unexpected".into(),
        ),
        (
            add(json!({"persistent": "yes"})),
            "Invalid parameter type for 'persistent', expected: boolean".into(),
        ),
        (
            add(json!({"granularity": 1u64 << 32})),
            "Parameter 'granularity' expects uint32_t".into(),
        ),
        (
            add(json!({"granularity": -1})),
            "Parameter 'granularity' expects uint32_t".into(),
        ),
        // The name is checked before the node is looked up.
        (
            json!({"node": "nosuch", "name": ""}),
            "Bitmap name cannot be empty".into(),
        ),
        (
            json!({"node": "nosuch", "name": "n"}),
            "Cannot find device='nosuch' nor node-name='nosuch'".into(),
        ),
        (
            add(json!({"granularity": 256})),
            "Granularity must be power of 2 and at least 512".into(),
        ),
        (
            add(json!({"granularity": 1000})),
            "Granularity must be power of 2 and at least 512".into(),
        ),
        (
            json!({"node": "a", "name": long, "granularity": 256}),
            "Granularity must be power of 2 and at least 512".into(),
        ),
        (
            json!({"node": "a", "name": long}),
            format!("Bitmap name too long: {long}"),
        ),
        // Raw images and file nodes cannot store bitmaps.
        (
            add(json!({"persistent": true})),
            "Can't store persistent bitmaps to a: Operation not supported".into(),
        ),
        (
            json!({"node": "a-file", "name": "n", "persistent": true}),
            "Can't store persistent bitmaps to a-file: Operation not supported".into(),
        ),
    ];
    for (args, desc) in add_errors {
        p.same_err("block-dirty-bitmap-add", args, &desc);
    }
    p.same_ok("block-dirty-bitmap-add", add(json!({})));
    p.same_err(
        "block-dirty-bitmap-add",
        add(json!({})),
        "Bitmap already exists: n",
    );
    p.same_ok(
        "block-dirty-bitmap-add",
        json!({"node": "a", "name": "x".repeat(1023), "granularity": 512}),
    );
    p.same_ok(
        "block-dirty-bitmap-add",
        json!({"node": "a", "name": "huge", "granularity": 1u64 << 31}),
    );
    p.same_ok(
        "block-dirty-bitmap-add",
        json!({"node": "a", "name": "off", "disabled": true, "persistent": false}),
    );
    p.same_ok(
        "block-dirty-bitmap-add",
        json!({"node": "b", "name": "other", "granularity": 4096}),
    );
    // Newest first, raw's default granularity 64 KiB.
    let nodes = p.same_ok("query-named-block-nodes", Value::Null);
    let a = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "a")
        .unwrap();
    let names: Vec<&str> = a["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["off", "huge", &"x".repeat(1023), "n"]);
    assert_eq!(
        a["dirty-bitmaps"][3],
        json!({"name": "n", "recording": true, "persistent": false, "busy": false,
               "granularity": 65536, "count": 0})
    );

    for cmd in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        for (args, desc) in [
            (json!({"node": "a"}), "Parameter 'name' is missing"),
            (json!({"name": "n"}), "Parameter 'node' is missing"),
            (
                json!({"node": "a", "name": "n", "x": 1}),
                "Parameter 'x' is unexpected",
            ),
            (
                json!({"node": "a", "name": true}),
                "Invalid parameter type for 'name', expected: string",
            ),
            (
                json!({"node": "nosuch", "name": "n"}),
                "Node 'nosuch' not found",
            ),
            (
                json!({"node": "a", "name": "nosuch"}),
                "Dirty bitmap 'nosuch' not found",
            ),
            // Bitmaps belong to the node they were added to, not its file.
            (
                json!({"node": "a-file", "name": "n"}),
                "Dirty bitmap 'n' not found",
            ),
        ] {
            p.same_err(cmd, args, desc);
        }
    }

    let merge =
        |target: &str, sources: Value| json!({"node": "a", "target": target, "bitmaps": sources});
    for (args, desc) in [
        (
            json!({"node": "a", "target": "n"}),
            "Parameter 'bitmaps' is missing",
        ),
        (
            merge("n", json!("off")),
            "Invalid parameter type for 'bitmaps', expected: array",
        ),
        (
            merge("n", json!([3])),
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
        ),
        (
            merge("n", json!(["off", null])),
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
        ),
        (
            merge("n", json!([{"node": "b"}])),
            "Parameter 'bitmaps[0].name' is missing",
        ),
        (
            merge("n", json!(["nosuch", {"node": "b", "name": 3}])),
            "Invalid parameter type for 'bitmaps[1].name', expected: string",
        ),
        (
            merge("n", json!([{"node": "b", "name": "other", "x": 1}])),
            "Parameter 'bitmaps[0].x' is unexpected",
        ),
        (
            json!({"node": "nosuch", "target": "n", "bitmaps": ["off"]}),
            "Node 'nosuch' not found",
        ),
        (
            merge("nosuch", json!(["off"])),
            "Dirty bitmap 'nosuch' not found",
        ),
        (
            merge("n", json!(["nosuch"])),
            "Dirty bitmap 'nosuch' not found",
        ),
        // A name alone is a bitmap of the target's node.
        (
            merge("n", json!(["other"])),
            "Dirty bitmap 'other' not found",
        ),
        (
            merge("n", json!([{"node": "nosuch", "name": "other"}, "nosuch"])),
            "Node 'nosuch' not found",
        ),
        (
            merge("n", json!(["nosuch", {"node": "nosuch", "name": "other"}])),
            "Dirty bitmap 'nosuch' not found",
        ),
        (
            merge("n", json!([{"node": "a-file", "name": "n"}])),
            "Dirty bitmap 'n' not found",
        ),
    ] {
        p.same_err("block-dirty-bitmap-merge", args, desc);
    }
    // Across nodes, into itself, several at once, different granularities.
    for sources in [
        json!([{"node": "b", "name": "other"}]),
        json!(["n"]),
        json!(["off", {"node": "b", "name": "other"}, "n", {"node": "a", "name": "huge"}]),
    ] {
        p.same_ok("block-dirty-bitmap-merge", merge("n", sources));
    }
    // Disabling twice is fine, as is enabling what records.
    for cmd in [
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-clear",
    ] {
        p.same_ok(cmd, json!({"node": "a", "name": "n"}));
    }
    p.same_ok(
        "block-dirty-bitmap-remove",
        json!({"node": "a", "name": "n"}),
    );
    p.same_err(
        "block-dirty-bitmap-remove",
        json!({"node": "a", "name": "n"}),
        "Dirty bitmap 'n' not found",
    );
    p.same_ok("query-named-block-nodes", json!({"flat": true}));

    // Merging an empty list: qsd 10.0.2 crashes (a null dereference), so it
    // is not sent there; livesnapd merges nothing (docs/qmp.md).
    let r =
        p.ls.mon
            .execute("block-dirty-bitmap-merge", Some(&merge("off", json!([]))));
    assert_eq!(r.reply, json!({"return": {}}));
    p.both_quiet();
}

#[test]
fn bitmaps_record_writes_by_granularity_as_qsd() {
    let rt = runtime();
    let mut p = Pair::new();
    add_raw(&mut p, "a", "a.img");
    add_raw(&mut p, "b", "b.img");
    start_nbd(&mut p);
    for (node, name, extra) in [
        ("a", "coarse", json!({})),
        ("a", "fine", json!({"granularity": 512})),
        ("a", "later", json!({"disabled": true})),
        ("b", "other", json!({"granularity": 4096})),
    ] {
        let mut args = json!({"node": node, "name": name});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        p.same_ok("block-dirty-bitmap-add", args);
    }
    for n in ["a", "b"] {
        p.same_ok(
            "block-export-add",
            json!({"type": "nbd", "id": n, "node-name": n, "writable": true}),
        );
    }

    // 100 bytes inside the second 64 KiB chunk.
    write(&p, &rt, "a", 70000, 100);
    assert_eq!(count(&mut p, "a", "coarse"), K64);
    assert_eq!(count(&mut p, "a", "fine"), 512);
    assert_eq!(count(&mut p, "a", "later"), 0, "disabled: records nothing");
    assert_eq!(count(&mut p, "b", "other"), 0, "another node's write");
    // Across a chunk boundary: two more chunks.
    write(&p, &rt, "a", 4 * K64 - 10, 20);
    assert_eq!(count(&mut p, "a", "coarse"), 3 * K64);
    assert_eq!(count(&mut p, "a", "fine"), 3 * 512);
    // The same chunk again: nothing new.
    write(&p, &rt, "a", 70000 + 200, 1);
    assert_eq!(count(&mut p, "a", "coarse"), 3 * K64);
    assert_eq!(count(&mut p, "a", "fine"), 4 * 512);

    p.same_ok(
        "block-dirty-bitmap-enable",
        json!({"node": "a", "name": "later"}),
    );
    p.same_ok(
        "block-dirty-bitmap-disable",
        json!({"node": "a", "name": "coarse"}),
    );
    write(&p, &rt, "a", 10 * K64, 1);
    assert_eq!(count(&mut p, "a", "later"), K64, "enabled: records");
    assert_eq!(count(&mut p, "a", "coarse"), 3 * K64, "disabled: keeps");
    write(&p, &rt, "b", MIB - 1, 1);
    assert_eq!(count(&mut p, "b", "other"), 4096);

    // Merge: the 4 KiB bitmap of b into a 512-byte one and a 64 KiB one;
    // each source chunk dirties what it touches in the target.
    let merge = |target: &str| {
        json!({"node": "a", "target": target,
               "bitmaps": [{"node": "b", "name": "other"}, "later"]})
    };
    p.same_ok("block-dirty-bitmap-merge", merge("fine"));
    assert_eq!(count(&mut p, "a", "fine"), 4 * 512 + 4096 + K64);
    p.same_ok("block-dirty-bitmap-merge", merge("coarse"));
    assert_eq!(count(&mut p, "a", "coarse"), 5 * K64);
    assert_eq!(count(&mut p, "b", "other"), 4096, "sources unchanged");

    p.same_ok(
        "block-dirty-bitmap-clear",
        json!({"node": "a", "name": "coarse"}),
    );
    assert_eq!(count(&mut p, "a", "coarse"), 0);
    write(&p, &rt, "a", 0, 1);
    assert_eq!(
        count(&mut p, "a", "coarse"),
        0,
        "cleared and still disabled"
    );
    let all = bitmaps(&mut p, "a");
    assert_eq!(all["later"], (2 * K64, true, false));
    p.both_quiet();
}

#[test]
fn exported_bitmaps_match_qsd() {
    harness::require_tool("nbdinfo");
    let rt = runtime();
    let mut p = Pair::new();
    add_raw(&mut p, "a", "a.img");
    add_raw(&mut p, "b", "b.img");
    for (node, name, disabled) in [
        ("a", "on", false),
        ("a", "d", true),
        ("a-file", "under", false),
        ("b", "bb", false),
        ("b", "bb2", true),
    ] {
        p.same_ok(
            "block-dirty-bitmap-add",
            json!({"node": node, "name": name, "disabled": disabled}),
        );
    }
    let export = |id: &str, bitmaps: Value, writable: bool| {
        json!({"type": "nbd", "id": id, "node-name": "a", "name": id,
               "writable": writable, "bitmaps": bitmaps})
    };
    // Before the server runs, the server check comes first.
    p.same_err(
        "block-export-add",
        export("e", json!(["nosuch"]), false),
        "NBD server not running",
    );
    start_nbd(&mut p);
    for (args, desc) in [
        (
            export("e", json!("on"), false),
            "Invalid parameter type for 'bitmaps', expected: array",
        ),
        (
            export("e", json!([1]), false),
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
        ),
        (
            export("e", json!([{"node": "a"}]), false),
            "Parameter 'bitmaps[0].name' is missing",
        ),
        (
            export("e", json!(["nosuch"]), false),
            "Bitmap 'nosuch' is not found",
        ),
        // raw is no filter: its file's bitmaps are not found by name.
        (
            export("e", json!(["under"]), false),
            "Bitmap 'under' is not found",
        ),
        (
            export("e", json!(["bb"]), false),
            "Bitmap 'bb' is not found",
        ),
        // An enabled bitmap of a writable node changes under a reader.
        (
            export("e", json!(["d", "on"]), false),
            "Enabled bitmap 'on' incompatible with readonly export",
        ),
        (
            export("e", json!([{"node": "nosuch", "name": "on"}]), false),
            "Node 'nosuch' not found",
        ),
        (
            export("e", json!([{"node": "a", "name": "nosuch"}]), false),
            "Dirty bitmap 'nosuch' not found",
        ),
    ] {
        p.same_err("block-export-add", args, desc);
    }
    // A disabled bitmap read-only; an enabled one on a writable export; by
    // {node, name}, bitmaps of any node, enabled or not, and of another size.
    p.same_ok("block-export-add", export("ro", json!(["d"]), false));
    p.same_ok("block-export-add", export("rw", json!(["on"]), true));
    p.same_ok(
        "block-export-add",
        export(
            "ext",
            json!([{"node": "a-file", "name": "under"}, {"node": "b", "name": "bb"}]),
            false,
        ),
    );
    let busy = |name: &str| {
        format!("Bitmap '{name}' is currently in use by another operation and cannot be used")
    };
    p.same_err(
        "block-export-add",
        export("again", json!(["d"]), false),
        &busy("d"),
    );
    let on_a = bitmaps(&mut p, "a");
    assert!(
        on_a["d"].2 && on_a["on"].2,
        "exported bitmaps are busy: {on_a:?}"
    );
    for (cmd, args, name) in [
        (
            "block-dirty-bitmap-remove",
            json!({"node": "a", "name": "on"}),
            "on",
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "a", "name": "on"}),
            "on",
        ),
        (
            "block-dirty-bitmap-enable",
            json!({"node": "a", "name": "d"}),
            "d",
        ),
        (
            "block-dirty-bitmap-disable",
            json!({"node": "a", "name": "on"}),
            "on",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "b", "target": "bb2", "bitmaps": [{"node": "a", "name": "on"}]}),
            "on",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "a", "target": "d", "bitmaps": [{"node": "b", "name": "bb2"}]}),
            "d",
        ),
        // The target is checked before the sources.
        (
            "block-dirty-bitmap-merge",
            json!({"node": "a", "target": "on", "bitmaps": ["d"]}),
            "on",
        ),
    ] {
        p.same_err(cmd, args, &busy(name));
    }

    // Writes through the writable export: the enabled bitmap has them, the
    // disabled one not; clients see exactly those chunks.
    write(&p, &rt, "rw", 70000, 100);
    write(&p, &rt, "rw", 5 * K64, 3 * K64 as usize);
    let c = contexts(&p);
    assert_eq!(c["ro"], ["base:allocation", "qemu:dirty-bitmap:d"]);
    assert_eq!(c["rw"], ["base:allocation", "qemu:dirty-bitmap:on"]);
    assert_eq!(
        c["ext"],
        [
            "base:allocation",
            "qemu:dirty-bitmap:under",
            "qemu:dirty-bitmap:bb"
        ]
    );
    assert_eq!(
        dirty(&p, "rw", "on"),
        [(K64, K64), (5 * K64, 3 * K64)],
        "the chunks written"
    );
    assert_eq!(dirty(&p, "ro", "d"), []);
    // raw writes reach its file node, whose bitmap records them too.
    assert_eq!(dirty(&p, "ext", "under"), [(K64, K64), (5 * K64, 3 * K64)]);
    assert_eq!(dirty(&p, "ext", "bb"), []);
    // A client asking for one context by name.
    let ours = run(Command::new("nbdinfo")
        .arg("--map=qemu:dirty-bitmap:on")
        .arg("--totals")
        .arg(uri(&p.ls, "rw")));
    let theirs = run(Command::new("nbdinfo")
        .arg("--map=qemu:dirty-bitmap:on")
        .arg("--totals")
        .arg(uri(&p.qs, "rw")));
    assert_eq!(ours, theirs);
    // A context the export does not offer.
    for side in [&p.ls, &p.qs] {
        let (st, _, err) = run_status(
            Command::new("nbdinfo")
                .arg("--map=qemu:dirty-bitmap:on")
                .arg(uri(side, "ro")),
        );
        assert!(!st.success(), "{}: {err}", side.name);
    }
    // qemu-img sees the bitmap through its NBD client (x-dirty-bitmap: the
    // dirty chunks show as unallocated), the same from both.
    let maps: Vec<String> = [&p.ls, &p.qs]
        .iter()
        .map(|side| {
            let opts = format!(
                "driver=nbd,export=rw,server.type=unix,server.path={},\
                 x-dirty-bitmap=qemu:dirty-bitmap:on",
                side.dir.join("nbd.sock").display()
            );
            run(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]))
        })
        .collect();
    assert_eq!(maps[0], maps[1], "qemu-img map: livesnapd, then qsd");
    assert!(maps[0].contains("\"start\": 65536"), "{}", maps[0]);

    // The same name twice: two contexts, one bitmap.
    p.same_ok("block-export-del", json!({"id": "ro"}));
    p.same_ok(
        "block-export-add",
        export("twice", json!(["d", "d"]), false),
    );
    assert_eq!(
        contexts(&p)["twice"],
        [
            "base:allocation",
            "qemu:dirty-bitmap:d",
            "qemu:dirty-bitmap:d"
        ]
    );

    // Deleting an export releases its bitmaps; the others stay busy.
    for id in ["rw", "twice"] {
        p.same_ok("block-export-del", json!({"id": id}));
    }
    let on_a = bitmaps(&mut p, "a");
    assert!(!on_a["d"].2 && !on_a["on"].2, "released: {on_a:?}");
    assert!(bitmaps(&mut p, "b")["bb"].2, "still exported by ext");
    p.same_ok(
        "block-dirty-bitmap-clear",
        json!({"node": "a", "name": "on"}),
    );
    p.same_ok(
        "block-dirty-bitmap-remove",
        json!({"node": "a", "name": "d"}),
    );
    // nbd-server-stop ends the last export and releases its bitmaps.
    p.same_ok("nbd-server-stop", Value::Null);
    assert!(!bitmaps(&mut p, "b")["bb"].2);
    p.same_ok(
        "block-dirty-bitmap-remove",
        json!({"node": "b", "name": "bb"}),
    );
    p.both_quiet();
}

/// Pull mode: the changes since the last backup, read through the fleecing
/// view. `d` is a disabled copy of the tracking bitmap `b`, made at the
/// fleecing instant; the export of the snapshot-access node offers it by
/// `{node, name}` (by name alone it is not found: snapshot-access is no
/// filter). Writes after the instant go to `b` only.
#[test]
fn fleecing_export_offers_the_source_bitmap() {
    harness::require_tool("nbdinfo");
    let rt = runtime();
    let mut p = Pair::new();
    add_raw(&mut p, "src", "a.img");
    for side in [&p.ls, &p.qs] {
        create_image(side.dir.join("scratch.qcow2"), "qcow2", MIB);
    }
    p.same_ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "scratch",
               "file": {"driver": "file", "filename": "@DIR@/scratch.qcow2"}}),
    );
    p.same_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b"}),
    );
    start_nbd(&mut p);
    // The changes since the bitmap was made (qsd refuses the filter while a
    // writable export uses the disk, so that export goes first).
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "src", "writable": true}),
    );
    write(&p, &rt, "src", 70000, 100);
    write(&p, &rt, "src", 512 * 1024, 4096);
    p.same_ok("block-export-del", json!({"id": "w"}));

    // The fleecing instant: a disabled copy of b, then the filter.
    p.same_ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "d", "disabled": true}),
    );
    p.same_ok(
        "block-dirty-bitmap-merge",
        json!({"node": "src", "target": "d", "bitmaps": ["b"]}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw",
               "file": "src", "target": "scratch"}),
    );
    p.same_ok(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}),
    );
    let fleece =
        |bitmaps: Value| json!({"type": "nbd", "id": "f", "node-name": "snap", "bitmaps": bitmaps});
    p.same_err(
        "block-export-add",
        fleece(json!(["d"])),
        "Bitmap 'd' is not found",
    );
    p.same_err(
        "block-export-add",
        json!({"type": "nbd", "id": "f", "node-name": "cbw", "bitmaps": ["b"]}),
        "Enabled bitmap 'b' incompatible with readonly export",
    );
    p.same_ok(
        "block-export-add",
        fleece(json!([{"node": "src", "name": "d"}])),
    );
    // The guest goes on writing through the filter.
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "g", "node-name": "cbw", "name": "guest", "writable": true}),
    );
    write_byte(&p, &rt, "guest", 0, 100, 0x5a);
    write_byte(&p, &rt, "guest", 70000, 10, 0x5a);

    assert_eq!(
        contexts(&p)["snap"],
        ["base:allocation", "qemu:dirty-bitmap:d"]
    );
    assert_eq!(
        dirty(&p, "snap", "d"),
        [(K64, K64), (8 * K64, K64)],
        "exactly the chunks written before the fleecing instant"
    );
    let b = bitmaps(&mut p, "src");
    assert_eq!(b["b"], (3 * K64, true, false), "b has the later write too");
    assert_eq!(b["d"], (2 * K64, false, true), "d: exported, unchanged");
    // What the reader gets is the content at the instant, the guest's later
    // writes (0x5a) not.
    for side in [&p.ls, &p.qs] {
        let addr = format!("unix:{}", side.dir.join("nbd.sock").display());
        let c = rt.block_on(NbdClient::connect(&addr, "snap")).unwrap();
        let first = rt.block_on(c.read(0, 2 * K64 as u32)).unwrap();
        assert_eq!(&first[..100], &[0; 100][..], "{}", side.name);
        assert_eq!(&first[70000..70100], &[0xa5; 100][..], "{}", side.name);
        rt.block_on(c.disconnect()).unwrap();
    }
    for id in ["f", "g"] {
        p.same_ok("block-export-del", json!({"id": id}));
    }
    for n in ["snap", "cbw"] {
        p.same_ok("blockdev-del", json!({"node-name": n}));
    }
    assert!(!bitmaps(&mut p, "src")["d"].2, "released with the export");
    // A filter copying only what a bitmap marks is QEMU's; livesnapd's
    // copies everything and refuses the option once the bitmap is found
    // (docs/qmp.md). qsd takes it, so its node goes again.
    let cbw = |bitmap: Value| {
        json!({"driver": "copy-before-write", "node-name": "cbw2", "file": "src",
               "target": "scratch", "bitmap": bitmap})
    };
    p.same_err(
        "blockdev-add",
        cbw(json!({"node": "src", "name": "nosuch"})),
        "Dirty bitmap 'nosuch' not found",
    );
    p.deviation(
        "blockdev-add",
        cbw(json!({"node": "src", "name": "b"})),
        "The copy-before-write bitmap option is not supported by livesnapd",
    );
    let del =
        p.qs.mon
            .execute("blockdev-del", Some(&json!({"node-name": "cbw2"})));
    assert!(del.is_ok(), "{del:?}");
    p.both_quiet();
}

/// The persistent cases, on qcow2 images (they need the qcow2 bitmap
/// store): QEMU's rules when adding, what the node lists, and what a
/// reopened image holds after a clean close, read-write and read-only.
#[test]
fn persistent_bitmaps_on_qcow2_match_qsd() {
    let rt = runtime();
    let mut p = Pair::new();
    for side in [&p.ls, &p.qs] {
        create_image(side.dir.join("p.qcow2"), "qcow2", MIB);
    }
    start_nbd(&mut p);
    let open = |p: &mut Pair, read_only: bool| {
        p.same_ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "read-only": read_only,
                   "file": {"driver": "file", "node-name": "q-file",
                            "filename": "@DIR@/p.qcow2", "read-only": read_only}}),
        );
    };
    let close = |p: &mut Pair| {
        p.same_ok("blockdev-del", json!({"node-name": "q"}));
    };
    open(&mut p, false);
    for args in [
        json!({"node": "q", "name": "p1", "persistent": true}),
        json!({"node": "q", "name": "p2", "persistent": true, "disabled": true, "granularity": 512}),
        json!({"node": "q", "name": "p3", "persistent": true, "granularity": 1u64 << 31}),
        json!({"node": "q", "name": "t", "persistent": false}),
    ] {
        p.same_ok("block-dirty-bitmap-add", args);
    }
    let long = "x".repeat(1024);
    let r = p.same(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": long, "persistent": true}),
    );
    assert!(
        r.desc()
            .starts_with(&format!("Can't make bitmap '{long}' persistent in 'q': ")),
        "{}",
        r.desc()
    );
    p.same_err(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "p1", "persistent": true}),
        "Bitmap already exists: p1",
    );
    p.same_err(
        "block-dirty-bitmap-add",
        json!({"node": "q-file", "name": "p1", "persistent": true}),
        "Can't store persistent bitmaps to q-file: Operation not supported",
    );
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "q", "writable": true}),
    );
    write(&p, &rt, "q", 70000, 100);
    p.same_ok("block-export-del", json!({"id": "w"}));
    p.same_ok(
        "block-dirty-bitmap-merge",
        json!({"node": "q", "target": "p2", "bitmaps": ["t"]}),
    );
    let q = bitmaps(&mut p, "q");
    assert_eq!(q["p1"], (K64, true, false));
    assert_eq!(q["p2"], (K64, false, false), "merged from t");
    // QEMU counts whole chunks: one 2 GiB chunk of a 1 MiB disk is 2 GiB.
    assert_eq!(
        q["p3"],
        (1 << 31, true, false),
        "one bit for the whole disk"
    );
    close(&mut p);

    // Reopened: the persistent bitmaps are back with their content and
    // state (both daemons list them alike, in QEMU's order: oldest first
    // now); the one that was not persistent is gone.
    open(&mut p, false);
    let q = bitmaps(&mut p, "q");
    assert_eq!(q.keys().collect::<Vec<_>>(), ["p1", "p2", "p3"], "{q:?}");
    assert_eq!(q["p1"], (K64, true, false));
    assert_eq!(q["p2"], (K64, false, false));
    p.same_ok(
        "block-dirty-bitmap-clear",
        json!({"node": "q", "name": "p1"}),
    );
    p.same_ok(
        "block-dirty-bitmap-remove",
        json!({"node": "q", "name": "p3"}),
    );
    close(&mut p);

    // Read-only: the bitmaps can be read and exported, not changed; they
    // keep their recording state.
    open(&mut p, true);
    let q = bitmaps(&mut p, "q");
    assert_eq!(q["p1"], (0, true, false), "the clear was stored");
    assert_eq!(q["p2"], (K64, false, false));
    let ro = "Bitmap 'p2' is readonly and cannot be modified";
    p.same_err(
        "block-dirty-bitmap-clear",
        json!({"node": "q", "name": "p2"}),
        ro,
    );
    p.same_err(
        "block-dirty-bitmap-remove",
        json!({"node": "q", "name": "p2"}),
        ro,
    );
    p.same_err(
        "block-dirty-bitmap-merge",
        json!({"node": "q", "target": "p2", "bitmaps": ["p1"]}),
        ro,
    );
    p.same_ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "copy", "disabled": true}),
    );
    p.same_ok(
        "block-dirty-bitmap-merge",
        json!({"node": "q", "target": "copy", "bitmaps": ["p2", "p1"]}),
    );
    p.same_ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "q", "bitmaps": ["p1", "p2"]}),
    );
    assert_eq!(dirty(&p, "q", "p2"), [(K64, K64)]);
    let q = bitmaps(&mut p, "q");
    assert!(q["p1"].2 && q["p2"].2 && !q["copy"].2, "exported: {q:?}");
    assert_eq!(q["copy"].0, K64);
    p.same_ok("block-export-del", json!({"id": "e"}));
    close(&mut p);
    p.both_quiet();
}
