//! The operator's verbs (jobs, cancel, watch, nodes, create, info), usage
//! errors and exit codes, against qemu-storage-daemon and livesnapd.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use livesnap_testkit::cli::{livesnap, spawn_livesnap, wait_out, Daemon, Kind};
use livesnap_testkit::pit::add_image_node;
use livesnap_testkit::{run, Qmp};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(60);

fn sock(d: &Daemon) -> &str {
    d.cli_sock.to_str().unwrap()
}

/// Prefills the disk with data (jobs skip zeroes) and starts a job that
/// runs for a long time (1 MiB/s over 16 MiB).
fn slow_job(d: &Daemon, q: &mut Qmp, kind: &str, id: &str) {
    let data = vec![0x5au8; 16 * MIB as usize];
    std::fs::write(&d.image, &data).unwrap();
    let target = d.path(&format!("{id}.raw"));
    add_image_node(q, &format!("{id}-tgt"), &target, "raw", 16 * MIB);
    let mut args = json!({"job-id": id, "device": "disk", "target": format!("{id}-tgt"),
                          "sync": "full", "speed": MIB});
    if kind == "mirror" {
        args["copy-mode"] = json!("background");
    }
    q.ok(&format!("blockdev-{kind}"), args);
}

fn wait_event(q: &mut Qmp, name: &str, id: &str) -> Value {
    loop {
        let ev = q
            .event(LIMIT)
            .unwrap_or_else(|| panic!("no {name} for {id}"));
        let d = &ev["data"];
        if ev["event"] == name && (d["device"] == id || d["id"] == id) {
            return ev;
        }
    }
}

fn jobs_and_cancel(kind: Kind) {
    let d = Daemon::raw(kind, 16 * MIB);
    let mut q = d.qmp();
    let out = livesnap(&["jobs", "--qmp", sock(&d)], LIMIT).expect(0);
    assert_eq!(out.stdout.trim(), "no jobs");
    slow_job(&d, &mut q, "backup", "slowjob");
    let out = livesnap(&["jobs", "--qmp", sock(&d)], LIMIT).expect(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("PROGRESS"),
        "{}",
        out.stdout
    );
    assert!(
        lines[1].starts_with("slowjob")
            && lines[1].contains("backup")
            && lines[1].contains("running"),
        "{}",
        out.stdout
    );
    assert!(lines[1].contains("1.0 MiB/s"), "{}", out.stdout);
    let j = livesnap(&["jobs", "--qmp", sock(&d), "--json"], LIMIT)
        .expect(0)
        .json();
    assert_eq!(j[0]["id"], "slowjob", "{j}");
    assert_eq!(j[0]["type"], "backup", "{j}");
    assert_eq!(j[0]["len"], 16 * MIB, "{j}");

    // A soft cancel of a running job is refused, and the job goes on.
    let out = livesnap(&["cancel", "--qmp", sock(&d), "slowjob"], LIMIT).expect(1);
    assert!(
        out.stderr.contains("not ready") && out.stderr.contains("--force"),
        "{}",
        out.stderr
    );
    assert_eq!(q.job_ids(), ["slowjob"]);
    let out = livesnap(&["cancel", "--qmp", sock(&d), "nosuchjob"], LIMIT).expect(1);
    assert!(out.stderr.contains("no job 'nosuchjob'"), "{}", out.stderr);
    let out = livesnap(&["cancel", "--qmp", sock(&d), "slowjob", "--force"], LIMIT).expect(0);
    assert!(out.stdout.contains("cancelled"), "{}", out.stdout);
    wait_event(&mut q, "BLOCK_JOB_CANCELLED", "slowjob");

    // A mirror in READY takes a soft cancel, which completes it.
    let d = Daemon::raw(kind, 4 * MIB);
    let mut q = d.qmp();
    let target = d.path("m.raw");
    add_image_node(&mut q, "m-tgt", &target, "raw", 4 * MIB);
    q.ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "disk", "target": "m-tgt", "sync": "full"}),
    );
    wait_event(&mut q, "BLOCK_JOB_READY", "m");
    let out = livesnap(&["jobs", "--qmp", sock(&d)], LIMIT).expect(0);
    assert!(out.stdout.contains("ready"), "{}", out.stdout);
    let out = livesnap(&["cancel", "--qmp", sock(&d), "m"], LIMIT).expect(0);
    assert!(out.stdout.contains("completed"), "{}", out.stdout);
    wait_event(&mut q, "BLOCK_JOB_COMPLETED", "m");
}

#[test]
fn jobs_and_cancel_qsd() {
    jobs_and_cancel(Kind::Qsd);
}

#[test]
fn jobs_and_cancel_livesnapd() {
    jobs_and_cancel(Kind::Livesnapd);
}

fn watch(kind: Kind) {
    let d = Daemon::raw(kind, 16 * MIB);
    for json_out in [true, false] {
        let mut args = vec!["watch", "--qmp", sock(&d), "--count", "3", "--for", "30s"];
        if json_out {
            args.push("--json");
        }
        let mut child = spawn_livesnap(&args);
        // Wait until it is subscribed, then make events.
        let err = child.stderr.take().unwrap();
        let mut lines = BufReader::new(err).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.contains("watching"), "{first}");
        let mut q = d.qmp();
        let id = if json_out { "w1" } else { "w2" };
        slow_job(&d, &mut q, "backup", id);
        q.ok("block-job-cancel", json!({"device": id, "force": true}));
        let out = wait_out(child, LIMIT).expect(0);
        let got: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(got.len(), 3, "{}", out.stdout);
        for l in got {
            if json_out {
                let ev: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
                assert!(
                    ev["event"].is_string() && ev["timestamp"].is_object(),
                    "{l}"
                );
            } else {
                // HH:MM:SS.mmm EVENT key=value ...
                let (t, rest) = l.split_once(' ').unwrap();
                assert_eq!(t.len(), 12, "{l}");
                assert!(
                    rest.starts_with("JOB_STATUS_CHANGE")
                        || rest.starts_with("BLOCK_JOB_CANCELLED"),
                    "{l}"
                );
                assert!(
                    rest.contains(&format!("id={id}")) || rest.contains(&format!("device={id}")),
                    "{l}"
                );
            }
        }
        wait_event(&mut q, "BLOCK_JOB_CANCELLED", id);
    }
    // --for ends a quiet watch with success.
    let out = livesnap(&["watch", "--qmp", sock(&d), "--for", "300ms"], LIMIT).expect(0);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

#[test]
fn watch_qsd() {
    watch(Kind::Qsd);
}

#[test]
fn watch_livesnapd() {
    watch(Kind::Livesnapd);
}

fn nodes(kind: Kind) {
    let d = Daemon::raw(kind, 16 * MIB);
    let out = livesnap(&["nodes", "--qmp", sock(&d)], LIMIT).expect(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("USED BY"),
        "{}",
        out.stdout
    );
    let disk = lines
        .iter()
        .find(|l| l.starts_with("disk "))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(
        disk.contains("raw") && disk.contains("16.0 MiB") && disk.contains("export "),
        "{disk}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("disk-file ") && l.contains("file")),
        "{}",
        out.stdout
    );
    let j = livesnap(&["nodes", "--qmp", sock(&d), "--json"], LIMIT)
        .expect(0)
        .json();
    let disk = j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk")
        .unwrap_or_else(|| panic!("{j}"));
    assert_eq!(disk["driver"], "raw", "{j}");
    assert_eq!(disk["virtual-size"], 16 * MIB, "{j}");
    assert_eq!(j["exports"][0]["node-name"], "disk", "{j}");
}

#[test]
fn nodes_qsd() {
    nodes(Kind::Qsd);
}

#[test]
fn nodes_livesnapd() {
    nodes(Kind::Livesnapd);
}

#[test]
fn info_shows_capabilities() {
    let d = Daemon::raw(Kind::Qsd, MIB);
    let j = livesnap(&["info", "--qmp", sock(&d), "--json"], LIMIT)
        .expect(0)
        .json();
    assert_eq!(j["livesnapd"], "no", "{j}");
    assert_eq!(j["block-job-change"], "yes", "{j}");
    assert_eq!(j["backup cbw options"], "no", "{j}");
    assert_eq!(j["copy-before-write driver options"], "yes", "{j}");
    let d = Daemon::raw(Kind::Livesnapd, MIB);
    let j = livesnap(&["info", "--qmp", sock(&d), "--json"], LIMIT)
        .expect(0)
        .json();
    assert_eq!(j["livesnapd"], "yes", "{j}");
    assert_eq!(j["backup cbw options"], "yes", "{j}");
    assert!(
        j["mirror copy modes"].as_str().unwrap().contains("auto"),
        "{j}"
    );
}

#[test]
fn create_images() {
    let dir = tempfile::tempdir().unwrap();
    let info = |p: &std::path::Path| -> Value {
        serde_json::from_str(&run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(p)))
        .unwrap()
    };
    let raw = dir.path().join("a.raw");
    livesnap(
        &[
            "create",
            raw.to_str().unwrap(),
            "--format",
            "raw",
            "--size",
            "3M",
        ],
        LIMIT,
    )
    .expect(0);
    assert_eq!(info(&raw)["virtual-size"], 3 * MIB);
    let base = dir.path().join("b.qcow2");
    livesnap(
        &[
            "create",
            base.to_str().unwrap(),
            "--format",
            "qcow2",
            "--size",
            "64M",
        ],
        LIMIT,
    )
    .expect(0);
    let i = info(&base);
    assert_eq!(
        (i["format"].clone(), i["virtual-size"].clone()),
        (json!("qcow2"), json!(64 * MIB))
    );
    let top = dir.path().join("c.qcow2");
    livesnap(
        &[
            "create",
            top.to_str().unwrap(),
            "--format",
            "qcow2",
            "--backing",
            base.to_str().unwrap(),
            "--backing-format",
            "qcow2",
        ],
        LIMIT,
    )
    .expect(0);
    let i = info(&top);
    assert_eq!(i["virtual-size"], 64 * MIB, "{i}");
    assert_eq!(i["backing-filename"], base.to_str().unwrap(), "{i}");
    assert_eq!(i["backing-filename-format"], "qcow2", "{i}");
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&top));
    // Formats are never probed: a backing file needs its format.
    let out = livesnap(
        &[
            "create",
            dir.path().join("d.qcow2").to_str().unwrap(),
            "--format",
            "qcow2",
            "--backing",
            base.to_str().unwrap(),
        ],
        LIMIT,
    )
    .expect(1);
    assert!(out.stderr.contains("--backing-format"), "{}", out.stderr);
    livesnap(
        &[
            "create",
            dir.path().join("e.raw").to_str().unwrap(),
            "--format",
            "raw",
        ],
        LIMIT,
    )
    .expect(1);
}

#[test]
fn usage_errors_and_exit_codes() {
    let out = livesnap(&["--help"], LIMIT).expect(0);
    assert!(
        out.stdout.contains("Exit codes") && out.stdout.contains("Examples"),
        "{}",
        out.stdout
    );
    let out = livesnap(&["snapshot", "--help"], LIMIT).expect(0);
    assert!(
        out.stdout.contains("--deadline") && out.stdout.contains("point in time"),
        "{}",
        out.stdout
    );
    livesnap(&["snapshot"], LIMIT).expect(1);
    livesnap(
        &["snapshot", "--qmp", "x", "d", "t", "--deadline", "soon"],
        LIMIT,
    )
    .expect(1);

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let out = livesnap(
        &[
            "snapshot",
            "--qmp",
            missing.to_str().unwrap(),
            "disk",
            dir.path().join("t.qcow2").to_str().unwrap(),
            "--json",
        ],
        LIMIT,
    )
    .expect(2);
    assert_eq!(out.json()["error"], "endpoint");

    let d = Daemon::raw(Kind::Qsd, MIB);
    let before = d.qmp().node_names();
    let t = d.path("t.qcow2");
    let out = livesnap(
        &["snapshot", "--qmp", sock(&d), "nodisk", t.to_str().unwrap()],
        LIMIT,
    )
    .expect(1);
    assert!(
        out.stderr.contains("no node or device named 'nodisk'") && out.stderr.contains("disk"),
        "{}",
        out.stderr
    );
    // An existing target is never overwritten.
    std::fs::write(&t, b"precious").unwrap();
    let out = livesnap(
        &["snapshot", "--qmp", sock(&d), "disk", t.to_str().unwrap()],
        LIMIT,
    )
    .expect(1);
    assert!(out.stderr.contains("exists"), "{}", out.stderr);
    assert_eq!(std::fs::read(&t).unwrap(), b"precious");
    let r = d.path("t.raw");
    let out = livesnap(
        &[
            "snapshot",
            "--qmp",
            sock(&d),
            "disk",
            r.to_str().unwrap(),
            "--format",
            "raw",
            "--shallow",
        ],
        LIMIT,
    )
    .expect(1);
    assert!(
        out.stderr.contains("--shallow needs a qcow2 target"),
        "{}",
        out.stderr
    );
    assert!(!r.exists());
    assert_eq!(d.qmp().node_names(), before);
}
