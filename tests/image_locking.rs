//! Image locking against the real QEMU tools: livesnapd takes the byte locks
//! QEMU's `file` driver takes, so qemu-img/qemu-io and qemu-storage-daemon
//! refuse what livesnapd holds and livesnapd refuses what they hold, with
//! QEMU's texts, compared with what qemu-storage-daemon does in the same
//! place. Also the file driver's refusals of files it cannot serve: a FIFO
//! (without blocking the monitor) and kernel pseudo files.

use livesnap_testkit as harness;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const WRITE_LOCK: &str = "Failed to get \"write\" lock";
const SHARED_WRITE_LOCK: &str = "Failed to get shared \"write\" lock";

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-io with `args`; (success, stdout and stderr).
fn qemu_io_try(args: &[&str]) -> (bool, String) {
    let (st, out, err) = run_status(Command::new("qemu-io").args(args));
    (st.success(), format!("{out}{err}"))
}

fn write_with_qemu_io(img: &Path, fmt: &str) -> (bool, String) {
    qemu_io_try(&["-f", fmt, "-c", "write -P 0x5a 0 4k", path_str(img)])
}

fn qemu_img_info(img: &Path, force_share: bool) -> (bool, String) {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("info");
    if force_share {
        cmd.arg("-U");
    }
    let (st, out, err) = run_status(cmd.arg(img));
    (st.success(), format!("{out}{err}"))
}

/// A qcow2 file node and its format node, inline.
fn qcow2_node(name: &str, img: &Path, extra: Value) -> Value {
    let mut v = json!({
        "driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": path_str(img)},
    });
    for (k, x) in extra.as_object().unwrap() {
        if k == "locking" {
            v["file"]["locking"] = x.clone();
        } else {
            v[k] = x.clone();
        }
    }
    v
}

/// blockdev-add and immediate blockdev-del on success: the outcome only.
fn try_add(qmp: &mut Qmp, node: Value) -> Result<(), (String, String)> {
    let name = node["node-name"].as_str().unwrap().to_string();
    qmp.execute("blockdev-add", node)?;
    qmp.ok("blockdev-del", json!({"node-name": name}));
    Ok(())
}

/// Serves `img` (qcow2) writable over NBD from the daemon behind `qmp`, as a
/// guest's disk is served.
fn serve_writable(qmp: &mut Qmp, img: &Path, sock: &Path) {
    qmp.ok("blockdev-add", qcow2_node("disk", img, json!({})));
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": path_str(sock)}}}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "disk", "node-name": "disk", "writable": true}),
    );
}

/// What QEMU's tools get on an image the daemon serves writable.
fn tool_outcomes(img: &Path) -> Vec<(bool, bool)> {
    let io_write = write_with_qemu_io(img, "qcow2");
    let info = qemu_img_info(img, false);
    let info_u = qemu_img_info(img, true);
    let io_read_u = qemu_io_try(&["-r", "-U", "-c", "read 0 4k", path_str(img)]);
    let outcomes = [io_write, info, info_u, io_read_u];
    outcomes
        .iter()
        .map(|(ok, text)| {
            (
                *ok,
                text.contains(WRITE_LOCK) || text.contains(SHARED_WRITE_LOCK),
            )
        })
        .collect()
}

#[test]
fn qemu_tools_cannot_write_an_image_livesnapd_serves() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path().join("disk.qcow2"), "qcow2", 64 * MIB);

    let d = Livesnapd::bare();
    let mut qmp = d.qmp();
    serve_writable(&mut qmp, &img, &d.dir.path().join("nbd.sock"));
    let (ok, text) = write_with_qemu_io(&img, "qcow2");
    assert!(!ok, "qemu-io wrote an image livesnapd serves: {text}");
    assert!(text.contains(WRITE_LOCK), "qemu-io said: {text}");
    let (ok, text) = qemu_img_info(&img, false);
    assert!(!ok, "qemu-img info without -U opened it: {text}");
    assert!(
        text.contains(SHARED_WRITE_LOCK),
        "qemu-img info said: {text}"
    );
    let (ok, text) = qemu_img_info(&img, true);
    assert!(ok && text.contains("file format: qcow2"), "{text}");
    let ours = tool_outcomes(&img);
    drop(qmp);
    drop(d);

    let qsd = Qsd::bare();
    let mut qmp = qsd.qmp();
    serve_writable(&mut qmp, &img, &qsd.dir.path().join("nbd.sock"));
    let theirs = tool_outcomes(&img);
    assert_eq!(
        ours, theirs,
        "(succeeded, lock error) of qemu-io write, qemu-img info, info -U, qemu-io -r -U read"
    );
}

#[test]
fn raw_images_served_writable_are_not_shared_for_writing() {
    // A deliberate difference: qemu-storage-daemon lets qemu-io write a raw
    // image it exports writable (its raw node passes the export's "share
    // everything" down); livesnapd keeps writers out of every image it writes.
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_file(dir.path().join("disk.raw"), 16 * MIB);
    let d = Livesnapd::with_image(&img, &[]);
    let (ok, text) = write_with_qemu_io(&img, "raw");
    assert!(!ok && text.contains(WRITE_LOCK), "qemu-io said: {text}");
    let (ok, text) = qemu_io_try(&["-f", "raw", "-r", "-U", "-c", "read 0 4k", path_str(&img)]);
    assert!(ok, "a shared read-only look failed: {text}");
    drop(d);
    let (ok, text) = write_with_qemu_io(&img, "raw");
    assert!(ok, "the lock outlived the daemon: {text}");
}

/// A qemu-io that holds `img` open (read-write unless `read_only`) until dropped.
struct QemuIoHolder {
    child: Child,
    stdin: ChildStdin,
}

impl QemuIoHolder {
    fn open(img: &Path, read_only: bool) -> QemuIoHolder {
        require_tool("qemu-io");
        let mut cmd = Command::new("qemu-io");
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        // Its answer to a read proves the image is open (and locked).
        writeln!(stdin, "read 0 512").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("qemu-io did not answer a read within 60 s");
        assert!(line.contains("read 512/512"), "qemu-io said: {line}");
        QemuIoHolder { child, stdin }
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The adds tried against an image a qemu-io holds for writing.
fn adds_against_a_writer(qmp: &mut Qmp, img: &Path) -> Vec<Result<(), (String, String)>> {
    let tries = [
        json!({}),
        json!({"read-only": true}),
        json!({"force-share": true}),
        json!({"read-only": true, "force-share": true}),
        json!({"locking": "off"}),
        json!({"locking": "on"}),
        json!({"read-only": true, "locking": "auto"}),
    ];
    tries
        .iter()
        .map(|extra| try_add(qmp, qcow2_node("n", img, extra.clone())))
        .collect()
}

#[test]
fn an_image_qemu_holds_is_refused_as_qsd_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path().join("held.qcow2"), "qcow2", 16 * MIB);
    let holder = QemuIoHolder::open(&img, false);

    let d = Livesnapd::bare();
    let ours = adds_against_a_writer(&mut d.qmp(), &img);
    let qsd = Qsd::bare();
    let theirs = adds_against_a_writer(&mut qsd.qmp(), &img);
    assert_eq!(ours, theirs, "livesnapd vs qemu-storage-daemon");
    let generic = |t: &str| Err(("GenericError".to_string(), t.to_string()));
    assert_eq!(ours[0], generic(WRITE_LOCK));
    assert_eq!(ours[1], generic(SHARED_WRITE_LOCK));
    assert_eq!(
        ours[2],
        generic("force-share=on can only be used with read-only images")
    );
    assert_eq!(ours[3], Ok(()), "read-only with force-share");
    assert_eq!(ours[4], Ok(()), "locking=off");
    assert_eq!(ours[5], generic(WRITE_LOCK));
    drop(holder);

    // A reader (qemu-io -r) keeps writers out but lets other readers in.
    let _reader = QemuIoHolder::open(&img, true);
    let mut qmp = d.qmp();
    assert_eq!(
        try_add(&mut qmp, qcow2_node("n", &img, json!({}))),
        generic(WRITE_LOCK)
    );
    assert_eq!(
        try_add(&mut qmp, qcow2_node("n", &img, json!({"read-only": true}))),
        Ok(())
    );
}

#[test]
fn locks_go_with_blockdev_del_and_with_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path().join("disk.qcow2"), "qcow2", 16 * MIB);
    let d = Livesnapd::bare();
    let mut qmp = d.qmp();
    qmp.ok("blockdev-add", qcow2_node("disk", &img, json!({})));
    assert!(!write_with_qemu_io(&img, "qcow2").0, "written while held");
    qmp.ok("blockdev-del", json!({"node-name": "disk"}));
    let (ok, text) = write_with_qemu_io(&img, "qcow2");
    assert!(ok, "still locked after blockdev-del: {text}");

    // A second livesnapd sees the first one's locks, as a second QEMU would.
    qmp.ok("blockdev-add", qcow2_node("disk", &img, json!({})));
    let other = Livesnapd::bare();
    assert_eq!(
        other
            .qmp()
            .execute("blockdev-add", qcow2_node("disk", &img, json!({}))),
        Err(("GenericError".to_string(), WRITE_LOCK.to_string()))
    );
    drop(other);

    let st = d.stop_with(libc::SIGKILL);
    assert!(!st.success());
    let (ok, text) = write_with_qemu_io(&img, "qcow2");
    assert!(ok, "still locked after kill -9 of livesnapd: {text}");
    run(Command::new("qemu-img").args(["check", path_str(&img)]));
}

#[test]
fn backing_images_are_shared_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = create_image(dir.path().join("base.qcow2"), "qcow2", 16 * MIB);
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(&base),
        "-F",
        "qcow2",
        path_str(&top),
    ]));
    let outcomes = |qmp: &mut Qmp| {
        qmp.ok("blockdev-add", qcow2_node("top", &top, json!({})));
        let r = (
            qemu_img_info(&base, false).0,
            write_with_qemu_io(&base, "qcow2"),
            write_with_qemu_io(&top, "qcow2").0,
        );
        qmp.ok("blockdev-del", json!({"node-name": "top"}));
        (r.0, r.1 .0, r.1 .1.contains(WRITE_LOCK), r.2)
    };
    let d = Livesnapd::bare();
    let ours = outcomes(&mut d.qmp());
    assert_eq!(
        ours,
        (true, false, true, false),
        "(info of the backing image, write to it, refused for the write lock, write to the top)"
    );
    let qsd = Qsd::bare();
    assert_eq!(ours, outcomes(&mut qsd.qmp()), "livesnapd vs qsd");
    // Two chains over one base coexist.
    let mut qmp = d.qmp();
    qmp.ok("blockdev-add", qcow2_node("top", &top, json!({})));
    let top2 = dir.path().join("top2.qcow2");
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(&base),
        "-F",
        "qcow2",
        path_str(&top2),
    ]));
    qmp.ok("blockdev-add", qcow2_node("top2", &top2, json!({})));
}

#[test]
fn blockdev_create_refuses_an_image_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path().join("busy.qcow2"), "qcow2", 16 * MIB);
    qemu_io(path_str(&img), "qcow2", &["write -P 0x33 0 64k"]);
    let _holder = QemuIoHolder::open(&img, false);
    let d = Livesnapd::bare();
    let mut qmp = d.qmp();
    qmp.ok(
        "blockdev-create",
        json!({"job-id": "c", "options": {"driver": "file", "filename": path_str(&img), "size": 0}}),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let error = loop {
        let jobs = qmp.ok("query-jobs", json!({}));
        seen.push(jobs.clone());
        let job = &jobs[0];
        if job["status"] == "concluded" {
            break job["error"].clone();
        }
        assert!(Instant::now() < deadline, "job did not conclude: {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        error.as_str().unwrap_or("").contains("lock"),
        "blockdev-create over an image in use: {error}"
    );
    drop(_holder);
    // Nothing was emptied.
    qemu_io(path_str(&img), "qcow2", &["read -P 0x33 0 64k"]);
}

/// blockdev-add of `filename` as a `file` node on the daemon behind `qmp`.
fn add_file(qmp: &mut Qmp, filename: &Path, read_only: bool) -> Result<Value, (String, String)> {
    qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": path_str(filename),
               "read-only": read_only}),
    )
}

#[test]
fn a_fifo_is_refused_without_blocking_the_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    let d = Livesnapd::bare();
    // Generous: qemu-storage-daemon waits here until a writer shows up.
    let mut qmp = d.qmp().with_reply_limit(Duration::from_secs(60));
    for read_only in [true, false] {
        let r = add_file(&mut qmp, &fifo, read_only);
        assert_eq!(
            r,
            Err((
                "GenericError".to_string(),
                format!(
                    "'file' driver requires '{}' to be a regular file",
                    fifo.display()
                )
            )),
            "read-only: {read_only}"
        );
    }
    let mut other = d.qmp().with_reply_limit(Duration::from_secs(60));
    other.ok("query-version", json!({}));
    assert!(!qmp.node_names().contains("f"));

    // A character device gets qemu-storage-daemon's text.
    let dev_null = PathBuf::from("/dev/null");
    let ours = add_file(&mut qmp, &dev_null, false);
    let qsd = Qsd::bare();
    let theirs = add_file(&mut qsd.qmp(), &dev_null, false);
    assert!(ours.is_err(), "{ours:?}");
    assert_eq!(ours, theirs);
}

#[test]
fn kernel_pseudo_files_are_refused() {
    let d = Livesnapd::bare();
    let mut qmp = d.qmp();
    for (path, fs) in [
        ("/proc/self/mem", "procfs"),
        ("/proc/self/status", "procfs"),
        ("/sys/kernel/mm/transparent_hugepage/enabled", "sysfs"),
    ] {
        if !Path::new(path).exists() {
            continue;
        }
        let r = add_file(&mut qmp, Path::new(path), true);
        let want =
            format!("'file' driver cannot serve '{path}': it is a {fs} pseudo file, not an image");
        assert_eq!(r, Err(("GenericError".to_string(), want)), "{path}");
    }
    assert!(qmp.node_names().is_empty());
    qmp.ok("query-version", json!({}));
}

#[test]
fn a_file_node_locks_when_a_node_is_opened_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path().join("disk.qcow2"), "qcow2", 16 * MIB);
    let steps = |qmp: &mut Qmp| {
        let file = json!({"driver": "file", "node-name": "f", "filename": path_str(&img)});
        qmp.ok("blockdev-add", file);
        // Nobody uses the file node yet: QEMU's file node holds no permission.
        let alone = write_with_qemu_io(&img, "qcow2").0;
        qmp.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "file": "f"}),
        );
        let used = write_with_qemu_io(&img, "qcow2");
        let peek = qemu_img_info(&img, true).0;
        qmp.ok("blockdev-del", json!({"node-name": "q"}));
        qmp.ok("blockdev-del", json!({"node-name": "f"}));
        let after = write_with_qemu_io(&img, "qcow2").0;
        (alone, used.0, used.1.contains(WRITE_LOCK), peek, after)
    };
    let d = Livesnapd::bare();
    let ours = steps(&mut d.qmp());
    assert_eq!(
        ours,
        (true, false, true, true, true),
        "(write with a lone file node, write with qcow2 on it, refused for the write lock, info -U, write after del)"
    );
    let qsd = Qsd::bare();
    assert_eq!(ours, steps(&mut qsd.qmp()), "livesnapd vs qsd");
}

#[test]
fn a_snapshot_gives_up_the_old_top_write_lock() {
    let dir = tempfile::tempdir().unwrap();
    let base = create_image(dir.path().join("base.qcow2"), "qcow2", 16 * MIB);
    let overlay = dir.path().join("overlay.qcow2");
    let steps = |qmp: &mut Qmp| {
        let _ = std::fs::remove_file(&overlay);
        run(Command::new("qemu-img").args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(&base),
            "-F",
            "qcow2",
            path_str(&overlay),
        ]));
        qmp.ok("blockdev-add", qcow2_node("disk", &base, json!({})));
        let before = qemu_img_info(&base, false).0;
        let mut ov = qcow2_node("ov", &overlay, json!({}));
        ov["backing"] = Value::Null;
        qmp.ok("blockdev-add", ov);
        qmp.ok(
            "blockdev-snapshot",
            json!({"node": "disk", "overlay": "ov"}),
        );
        let info_base = qemu_img_info(&base, false).0;
        let write_base = write_with_qemu_io(&base, "qcow2");
        let write_ov = write_with_qemu_io(&overlay, "qcow2").0;
        (
            before,
            info_base,
            write_base.0,
            write_base.1.contains(WRITE_LOCK),
            write_ov,
        )
    };
    let d = Livesnapd::bare();
    let ours = steps(&mut d.qmp());
    assert_eq!(
        ours,
        (false, true, false, true, false),
        "(info of the top, info of it once a backing image, write to it, refused for the write lock, write to the overlay)"
    );
    drop(d);
    let qsd = Qsd::bare();
    assert_eq!(ours, steps(&mut qsd.qmp()), "livesnapd vs qsd");
}
