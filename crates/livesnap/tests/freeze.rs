//! `--freeze QGA_SOCKET` against a fake qemu-guest-agent (a unix-socket
//! server speaking the agent's JSON protocol): the guest is frozen only
//! around the instant that fixes the point in time, always thawed (after a
//! failed freeze, a hung freeze, and SIGINT too), and a failed freeze fails
//! the snapshot with exit code 6 and leaves nothing behind.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livesnap_testkit::cli::{livesnap, spawn_livesnap, wait_out, Daemon, Kind};
use livesnap_testkit::monotonic_ns;
use livesnap_testkit::scenarios::{assert_nothing_left, before, snapshot_args, CLI_LIMIT};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// How the fake agent answers `guest-fsfreeze-freeze`.
#[derive(Clone, Copy)]
enum Freeze {
    Ok,
    Fail,
    Hang(Duration),
    /// Answers, then sends SIGINT to the pid in `FakeQga::pid`.
    OkThenSigint,
}

/// One command the agent received: name, when it arrived, when it was answered.
#[derive(Clone, Debug)]
struct Entry {
    command: String,
    received: u64,
    replied: u64,
}

struct FakeQga {
    path: PathBuf,
    log: Arc<Mutex<Vec<Entry>>>,
    pid: Arc<AtomicU32>,
    _dir: tempfile::TempDir,
}

impl FakeQga {
    fn start(freeze: Freeze) -> FakeQga {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let pid = Arc::new(AtomicU32::new(0));
        let (log2, pid2) = (log.clone(), pid.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                serve(conn, freeze, &log2, &pid2);
            }
        });
        FakeQga {
            path,
            log,
            pid,
            _dir: dir,
        }
    }

    fn log(&self) -> Vec<Entry> {
        self.log.lock().unwrap().clone()
    }

    fn commands(&self) -> Vec<String> {
        self.log().into_iter().map(|e| e.command).collect()
    }

    fn sock(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// One client, commands answered one at a time as the real agent does.
fn serve(conn: UnixStream, freeze: Freeze, log: &Mutex<Vec<Entry>>, pid: &AtomicU32) {
    let mut w = conn.try_clone().unwrap();
    // Left over from an earlier client: the sync must skip it.
    let _ = w.write_all(b"{\"return\": 7}\n");
    let mut r = BufReader::new(conn);
    let mut pending = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match r.read(&mut byte) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if byte[0] == 0xff {
            // The agent's parser resets and complains about the byte.
            let _ = w.write_all(
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"Invalid JSON syntax\"}}\n",
            );
            pending.clear();
            continue;
        }
        if byte[0] != b'\n' {
            pending.push(byte[0]);
            continue;
        }
        let line = String::from_utf8(std::mem::take(&mut pending)).unwrap();
        let req: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let received = monotonic_ns();
        let command = req["execute"].as_str().unwrap().to_string();
        let reply = match command.as_str() {
            "guest-sync-delimited" => {
                let _ = w.write_all(&[0xff]);
                json!({"return": req["arguments"]["id"]})
            }
            "guest-fsfreeze-freeze" => match freeze {
                Freeze::Ok | Freeze::OkThenSigint => json!({"return": 2}),
                Freeze::Fail => {
                    json!({"error": {"class": "GenericError", "desc": "failed to freeze /: Device or resource busy"}})
                }
                Freeze::Hang(d) => {
                    std::thread::sleep(d);
                    json!({"return": 2})
                }
            },
            "guest-fsfreeze-thaw" => json!({"return": 2}),
            _ => json!({"error": {"class": "CommandNotFound", "desc": "unknown"}}),
        };
        let replied = monotonic_ns();
        log.lock().unwrap().push(Entry {
            command: command.clone(),
            received,
            replied,
        });
        if w.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
        if command == "guest-fsfreeze-freeze" && matches!(freeze, Freeze::OkThenSigint) {
            let p = pid.load(Ordering::SeqCst);
            assert!(p != 0, "no pid to signal");
            // SAFETY: kill on the test's own child.
            unsafe { libc::kill(p as i32, libc::SIGINT) };
        }
    }
}

/// A disk with data, so jobs have something to copy.
fn daemon(kind: Kind) -> Daemon {
    let d = Daemon::raw(kind, 16 * MIB);
    std::fs::write(&d.image, vec![0x3cu8; 16 * MIB as usize]).unwrap();
    d
}

fn freeze_args<'a>(
    d: &'a Daemon,
    q: &'a FakeQga,
    target: &'a str,
    method: &'a str,
) -> Vec<&'a str> {
    let mut a = snapshot_args(d, target, method);
    a.extend(["--freeze", q.sock(), "--json"]);
    a
}

fn freeze_covers_the_instant(kind: Kind, method: &str) {
    let d = daemon(kind);
    let q = FakeQga::start(Freeze::Ok);
    let target = d.path("t.qcow2");
    let out = livesnap(
        &freeze_args(&d, &q, target.to_str().unwrap(), method),
        CLI_LIMIT,
    )
    .expect(0);
    let r = out.json();
    assert_eq!(
        q.commands(),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw"
        ]
    );
    let log = q.log();
    let p = &r["point_in_time"];
    let (w0, w1) = (
        p["start_monotonic_ns"].as_u64().unwrap(),
        p["end_monotonic_ns"].as_u64().unwrap(),
    );
    assert!(
        log[1].replied <= w0,
        "the window started before the freeze: {log:?} {r}"
    );
    assert!(
        w1 <= log[2].received,
        "the thaw came before the window ended: {log:?} {r}"
    );
    assert_eq!(r["quiesce"]["filesystems"], 2, "{r}");
    assert_eq!(r["quiesce"]["covered_point_in_time"], true, "{r}");
    // Frozen only around the instant, not for the copy.
    let frozen_ms = (log[2].received - log[1].replied) as f64 / 1e6;
    assert!(frozen_ms < 2000.0, "frozen for {frozen_ms} ms");
    assert!(target.exists());
}

#[test]
fn backup_freeze_covers_the_instant_livesnapd() {
    freeze_covers_the_instant(Kind::Livesnapd, "backup");
}

#[test]
fn mirror_freeze_covers_the_instant_livesnapd() {
    freeze_covers_the_instant(Kind::Livesnapd, "mirror");
}

#[test]
fn backup_freeze_covers_the_instant_qsd() {
    freeze_covers_the_instant(Kind::Qsd, "backup");
}

#[test]
fn mirror_freeze_covers_the_instant_qsd() {
    freeze_covers_the_instant(Kind::Qsd, "mirror");
}

#[test]
fn failed_freeze_fails_the_snapshot_and_thaws() {
    let d = daemon(Kind::Livesnapd);
    for method in ["backup", "mirror"] {
        let q = FakeQga::start(Freeze::Fail);
        let b = before(&d);
        let target = d.path(&format!("fail-{method}.qcow2"));
        let out = livesnap(
            &freeze_args(&d, &q, target.to_str().unwrap(), method),
            CLI_LIMIT,
        )
        .expect(6);
        let j = out.json();
        assert_eq!(j["error"], "guest-agent", "{j}");
        assert!(
            j["reason"]
                .as_str()
                .unwrap()
                .contains("Device or resource busy"),
            "{j}"
        );
        assert_eq!(
            q.commands(),
            [
                "guest-sync-delimited",
                "guest-fsfreeze-freeze",
                "guest-fsfreeze-thaw"
            ]
        );
        assert_nothing_left(&d, &b, &target);
    }
}

#[test]
fn hung_freeze_is_bounded_and_thawed() {
    let d = daemon(Kind::Livesnapd);
    let q = FakeQga::start(Freeze::Hang(Duration::from_secs(3)));
    let b = before(&d);
    let target = d.path("hang.qcow2");
    let mut args = freeze_args(&d, &q, target.to_str().unwrap(), "backup");
    args.extend(["--freeze-hold", "1s"]);
    let start = std::time::Instant::now();
    let out = livesnap(&args, CLI_LIMIT).expect(6);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert!(
        out.json()["reason"].as_str().unwrap().contains("no answer"),
        "{}",
        out.stdout
    );
    // The thaw was sent behind the hung freeze, so a late freeze is undone.
    assert_eq!(
        q.commands(),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw"
        ]
    );
    assert_nothing_left(&d, &b, &target);
}

#[test]
fn sigint_while_frozen_thaws_and_cleans_up() {
    let d = daemon(Kind::Livesnapd);
    for method in ["backup", "mirror"] {
        let q = FakeQga::start(Freeze::OkThenSigint);
        let b = before(&d);
        let target = d.path(&format!("int-{method}.qcow2"));
        let mut args = freeze_args(&d, &q, target.to_str().unwrap(), method);
        // Slow enough that the job is still running when the signal lands.
        args.extend(["--speed", "1M"]);
        if method == "mirror" {
            // The mirror freezes at READY: let it get there quickly.
            args.truncate(args.len() - 2);
        }
        let child = spawn_livesnap(&args);
        q.pid.store(child.id(), Ordering::SeqCst);
        let out = wait_out(child, CLI_LIMIT);
        let cmds = q.commands();
        assert!(
            cmds.iter().any(|c| c == "guest-fsfreeze-thaw"),
            "no thaw: {cmds:?}; {out:?}"
        );
        if out.code() == 0 {
            // The mirror's soft cancel may finish before the signal lands.
            assert_eq!(method, "mirror", "{out:?}");
            continue;
        }
        let j = out.expect(5).json();
        assert!(j["reason"].as_str().unwrap().contains("SIGINT"), "{j}");
        assert_nothing_left(&d, &b, &target);
    }
}

#[test]
fn agent_that_does_not_answer_fails_fast() {
    let d = daemon(Kind::Livesnapd);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Accepts and never answers.
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            h.lock().unwrap().push(c);
        }
    });
    let b = before(&d);
    let target = d.path("silent.qcow2");
    let args = [
        "snapshot",
        "--qmp",
        d.cli_sock.to_str().unwrap(),
        "disk",
        target.to_str().unwrap(),
        "--freeze",
        path.to_str().unwrap(),
    ];
    let out = livesnap(&args, CLI_LIMIT).expect(6);
    assert!(out.stderr.contains("did not answer"), "{}", out.stderr);
    assert_nothing_left(&d, &b, &target);
}
