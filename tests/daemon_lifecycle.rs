//! livesnapd as a process: its command line, start-up failures, the bare
//! QMP mode, how it stops (SIGTERM, SIGINT, QMP `quit`) without losing an
//! acknowledged write or leaving sockets behind, and the demo mode (run in
//! its own directory and on a free port, never on a developer's demo).

use livesnap_testkit as harness;

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::*;
use livesnap_nbd::proto::CMD_WRITE;
use livesnap_nbd::NbdClient;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Bound on every single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);
/// A start-up that fails must fail at least this fast.
const FAIL_FAST: Duration = Duration::from_secs(5);

fn livesnapd(args: &[&str]) -> (ExitStatus, String, String) {
    run_within(Command::new(livesnapd_bin()).args(args), WAIT)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn bounded<F: std::future::Future>(rt: &tokio::runtime::Runtime, what: &str, f: F) -> F::Output {
    rt.block_on(async {
        tokio::time::timeout(WAIT, f)
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
    })
}

// ---- command line -------------------------------------------------------------------

#[test]
fn help_explains_the_flags_and_exits_0() {
    let (st, out, err) = livesnapd(&["--help"]);
    assert!(st.success(), "--help: {st}\n{err}");
    for want in [
        "--qmp <PATH>",
        "QMP monitor socket to create (unix socket, mode 0600)",
        "--image <PATH>",
        "Image to export over NBD",
        "--format <FORMAT>",
        "--nbd <ADDR>",
        "NBD listen address: unix:PATH or HOST:PORT",
        "--read-only",
        "--max-connections <N>",
        "SIGINT or SIGTERM",
        "qemu-img info 'nbd+unix:///disk?socket=/tmp/nbd.sock'",
    ] {
        assert!(out.contains(want), "--help lacks {want:?}:\n{out}");
    }
    // The demo directory override is for tests, not for the help page.
    assert!(!out.contains("demo-dir"), "{out}");

    let (st, out, _) = livesnapd(&["--version"]);
    assert!(st.success());
    assert_eq!(
        out.trim(),
        format!("livesnapd {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_flags_exit_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_file(&image, MIB);
    let img = image.to_str().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let qmp = qmp.to_str().unwrap();
    let nbd = format!("unix:{}", dir.path().join("nbd.sock").display());
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--bogus"], 2, "unexpected argument '--bogus' found"),
        (&["--qmp"], 2, "a value is required for '--qmp <PATH>'"),
        (
            &["--max-connections", "abc"],
            2,
            "invalid value 'abc' for '--max-connections <N>'",
        ),
        (
            &["--image", img, "--nbd", "bogus"],
            1,
            "livesnapd: --nbd: 'bogus' is neither unix:PATH nor HOST:PORT",
        ),
        (
            &["--image", img, "--nbd", "unix:/nonexistent/dir/nbd.sock"],
            1,
            "Failed to bind socket to /nonexistent/dir/nbd.sock: No such file or directory",
        ),
        (
            &[
                "--image",
                img,
                "--nbd",
                &nbd,
                "--qmp",
                "/nonexistent/dir/q.sock",
            ],
            1,
            "cannot create QMP socket /nonexistent/dir/q.sock",
        ),
        (
            &["--qmp", qmp, "--read-only"],
            2,
            "--read-only applies to --image",
        ),
        (
            &["--qmp", qmp, "--export-name", "x"],
            2,
            "--export-name applies to --image",
        ),
        (
            &["--qmp", qmp, "--tls-creds", "/tmp"],
            2,
            "--tls-creds applies to the NBD server of --image or --nbd",
        ),
        (
            &["--qmp", qmp, "--demo-dir", "/tmp"],
            2,
            "the argument '--qmp <PATH>' cannot be used with '--demo-dir <DIR>'",
        ),
    ];
    for (args, code, msg) in cases {
        let start = Instant::now();
        let (st, out, err) = livesnapd(args);
        assert_eq!(st.code(), Some(*code), "{args:?}: {st}\n{out}\n{err}");
        assert!(err.contains(msg), "{args:?}: stderr lacks {msg:?}:\n{err}");
        assert!(
            start.elapsed() < FAIL_FAST,
            "{args:?} took {:?}",
            start.elapsed()
        );
        // Nothing is left behind by a failed start.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "disk.img")
            .collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
}

#[test]
fn missing_image_fails_fast_with_qemus_message() {
    let dir = tempfile::tempdir().unwrap();
    let nbd = format!("unix:{}", dir.path().join("nbd.sock").display());
    let qmp = dir.path().join("qmp.sock");
    let start = Instant::now();
    let (st, out, err) = livesnapd(&[
        "--image",
        "/nonexistent",
        "--nbd",
        &nbd,
        "--qmp",
        qmp.to_str().unwrap(),
    ]);
    assert!(start.elapsed() < FAIL_FAST, "took {:?}", start.elapsed());
    assert_eq!(st.code(), Some(1), "{st}\n{out}\n{err}");
    assert!(
        err.contains("Could not open '/nonexistent': No such file or directory"),
        "{err}"
    );
    assert!(!out.contains("ready"), "claims to be ready: {out}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ---- listeners -----------------------------------------------------------------------

/// The sockets `pid` listens on: "unix:PATH" and "tcp:HEXADDR:HEXPORT".
fn listeners(pid: u32) -> Vec<String> {
    let mut inodes = HashSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(target) = std::fs::read_link(e.unwrap().path()) else {
            continue;
        };
        if let Some(ino) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(ino.to_string());
        }
    }
    let mut out = Vec::new();
    // Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is __SO_ACCEPTCON.
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    for line in unix.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let listening = f
            .get(3)
            .and_then(|x| u32::from_str_radix(x, 16).ok())
            .is_some_and(|flags| flags & 0x10000 != 0);
        if listening && f.get(6).is_some_and(|i| inodes.contains(*i)) {
            out.push(format!("unix:{}", f.get(7).unwrap_or(&"")));
        }
    }
    // sl local_address rem_address st ... inode; state 0A is LISTEN.
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) == Some(&"0A") && f.get(9).is_some_and(|i| inodes.contains(*i)) {
                out.push(format!("tcp:{}", f[1]));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn qmp_only_mode_has_a_private_monitor_and_no_nbd_listener_until_asked() {
    let d = Livesnapd::bare();
    let md = std::fs::symlink_metadata(&d.qmp_path).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.mode() & 0o777, 0o600, "QMP socket mode {:o}", md.mode());
    let qmp = format!("unix:{}", d.qmp_path.display());
    let only_qmp = vec![qmp.clone()];
    assert_eq!(listeners(d.pid()), only_qmp);

    let mut m = RawQmp::connect(&d.qmp_path);
    m.negotiate();
    assert_eq!(m.ok("query-block-exports", Value::Null), json!([]));
    assert_eq!(listeners(d.pid()), only_qmp, "a monitor is no listener");

    let sock = d.dir.path().join("nbd.sock");
    m.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    let mut want = vec![qmp, format!("unix:{}", sock.display())];
    want.sort();
    assert_eq!(listeners(d.pid()), want);

    m.ok("nbd-server-stop", Value::Null);
    assert_eq!(listeners(d.pid()), only_qmp);
    assert!(!sock.exists(), "nbd-server-stop left {}", sock.display());

    m.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}),
    );
    let l = listeners(d.pid());
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(l.iter().any(|s| s.starts_with("tcp:0100007F:")), "{l:?}");
    drop(m);
    assert!(d.stop_with(libc::SIGTERM).success());
}

#[test]
fn qmp_with_nbd_flag_starts_the_nbd_server_without_exports() {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let sock = dir.path().join("nbd.sock");
    let image = dir.path().join("disk.img");
    sparse_file(&image, 4 * MIB);
    let mut p = spawn_daemon(&[
        "--qmp",
        qmp.to_str().unwrap(),
        "--nbd",
        &format!("unix:{}", sock.display()),
    ]);
    let banner = p.banner(WAIT);
    assert!(
        banner.iter().any(|l| l.contains(&format!(
            "NBD server: unix:{} (no exports yet",
            sock.display()
        ))),
        "{banner:?}"
    );
    let mut want = vec![
        format!("unix:{}", qmp.display()),
        format!("unix:{}", sock.display()),
    ];
    want.sort();
    assert_eq!(listeners(p.child.id()), want);

    let mut m = RawQmp::connect(&qmp);
    m.negotiate();
    assert_eq!(
        m.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/tmp/x"}}})
        ),
        Err((
            "GenericError".to_string(),
            "NBD server already running".to_string()
        ))
    );
    m.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "n0",
               "file": {"driver": "file", "filename": image.to_str().unwrap()}}),
    );
    m.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "n0"}),
    );
    let url = format!("nbd+unix:///n0?socket={}", sock.display());
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &url]));
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 4 * MIB);
    drop(m);
    assert!(stop(&mut p, libc::SIGTERM).success());
    assert!(!sock.exists() && !qmp.exists(), "sockets left behind");
}

// ---- stopping ------------------------------------------------------------------------

#[test]
fn sigterm_with_writes_in_flight_keeps_every_acknowledged_write() {
    const BLOCK: usize = 64 * 1024;
    const BLOCKS: u64 = 4096;
    const CLIENTS: usize = 4;
    let img_dir = tempfile::tempdir().unwrap();
    let image = img_dir.path().join("disk.img");
    sparse_file(&image, BLOCKS * BLOCK as u64);
    let mut d = Livesnapd::with_image(&image, &[]);
    let nbd_sock = d.dir.path().join("nbd.sock");
    let addr = format!("unix:{}", nbd_sock.display());
    let rt = runtime();
    // Several connections, so that many writes are in flight in the daemon.
    let clients: Vec<NbdClient> = (0..CLIENTS)
        .map(|_| bounded(&rt, "connect", NbdClient::connect(&addr, "disk")).unwrap())
        .collect();

    // Every block is one pattern stamped with its number at both ends, so a
    // write that landed in the wrong place, or torn, shows.
    let base = Arc::new(pattern(42, BLOCK));
    let block = move |i: u64| {
        let mut b = base.to_vec();
        b[..8].copy_from_slice(&i.to_le_bytes());
        b[BLOCK - 8..].copy_from_slice(&i.to_le_bytes());
        b
    };
    let submitted = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let submitters: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, client)| {
            let (tx, submitted, block) = (tx.clone(), submitted.clone(), block.clone());
            rt.spawn(async move {
                for i in (k as u64..BLOCKS).step_by(CLIENTS) {
                    let data = block(i);
                    let off = i * BLOCK as u64;
                    match client
                        .submit(CMD_WRITE, 0, off, BLOCK as u32, Some(&data))
                        .await
                    {
                        Ok(p) => {
                            submitted.fetch_add(1, Ordering::SeqCst);
                            let _ = tx.send((i, p));
                        }
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let collector = rt.spawn({
        let acked = acked.clone();
        async move {
            let mut errors = Vec::new();
            while let Some((i, p)) = rx.recv().await {
                match p.wait().await {
                    Ok(r) if r.error == 0 => acked.lock().unwrap().push(i),
                    Ok(r) => errors.push(r.error),
                    Err(_) => {} // the connection ended first: not acknowledged
                }
            }
            errors
        }
    });

    wait_until(WAIT, "the first 100 acknowledged writes", || {
        acked.lock().unwrap().len() >= 100
    });
    let at_signal = (
        submitted.load(Ordering::SeqCst),
        acked.lock().unwrap().len() as u64,
    );
    let start = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(20));
    let took = start.elapsed();
    for s in submitters {
        bounded(&rt, "a submitting task", s).unwrap();
    }
    let errors = bounded(&rt, "the collecting task", collector).unwrap();
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "at SIGTERM {} submitted, {} acknowledged; in the end {} submitted, {} acknowledged, \
         {} refused {errors:?}; exit after {took:?}",
        at_signal.0,
        at_signal.1,
        submitted.load(Ordering::SeqCst),
        acked.len(),
        errors.len()
    );
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
    assert!(
        at_signal.0 > at_signal.1,
        "no write was in flight at SIGTERM"
    );
    assert!(
        (acked.len() as u64) < BLOCKS,
        "every write finished before SIGTERM took effect: nothing was tested"
    );
    assert!(!nbd_sock.exists(), "NBD socket left behind");
    assert!(!d.qmp_path.exists(), "QMP socket left behind");

    let file = std::fs::read(&image).unwrap();
    for &i in &acked {
        let at = i as usize * BLOCK;
        assert!(
            file[at..at + BLOCK] == block(i)[..],
            "acknowledged write {i} (offset {at}) is not in the image"
        );
    }
    drop(d);
}

#[test]
fn qmp_quit_answers_and_exits_0() {
    // Repeated: the reply to quit must never be lost to the shutdown race.
    for round in 0..8 {
        let img_dir = tempfile::tempdir().unwrap();
        let image = img_dir.path().join("disk.img");
        sparse_file(&image, 4 * MIB);
        let mut d = Livesnapd::with_image(&image, &[]);
        let nbd_sock = d.dir.path().join("nbd.sock");
        let rt = runtime();
        let data = pattern(round, 256 * 1024);
        // The client stays connected while quit runs.
        let client = bounded(&rt, "write before quit", async {
            let c = NbdClient::connect(&format!("unix:{}", nbd_sock.display()), "disk")
                .await
                .unwrap();
            c.write(MIB, &data, false).await.unwrap();
            c
        });
        let mut m = RawQmp::connect(&d.qmp_path);
        m.negotiate();
        m.send(b"{\"execute\":\"quit\",\"id\":\"bye\"}\n");
        assert_eq!(
            m.recv(),
            json!({"return": {}, "id": "bye"}),
            "round {round}"
        );
        let status = d.wait_exit(WAIT);
        assert!(
            status.success(),
            "round {round}: quit must exit 0: {status}"
        );
        assert!(!nbd_sock.exists() && !d.qmp_path.exists(), "sockets left");
        drop(client);
        let file = std::fs::read(&image).unwrap();
        assert!(file[MIB as usize..][..data.len()] == data[..], "write lost");
    }
}

#[test]
fn qmp_quit_piped_through_socat_style_eof_still_answers() {
    // `printf '{...}{"execute":"quit"}' | socat - UNIX-CONNECT:...`: the
    // client stops writing right after the request and then only reads.
    for round in 0..8 {
        let mut d = Livesnapd::bare();
        let mut m = RawQmp::connect(&d.qmp_path);
        m.send(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"quit\"}");
        m.w.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(m.recv(), json!({"return": {}}), "round {round}");
        assert_eq!(m.recv(), json!({"return": {}}), "round {round}: quit");
        assert!(d.wait_exit(WAIT).success());
    }
}

#[test]
fn sigint_and_early_sigterm_exit_0_and_remove_sockets() {
    let img_dir = tempfile::tempdir().unwrap();
    let image = img_dir.path().join("disk.img");
    sparse_file(&image, 4 * MIB);
    let d = Livesnapd::with_image_tcp(&image);
    let qmp = d.qmp_path.clone();
    let status = d.stop_with(libc::SIGINT);
    assert!(status.success(), "SIGINT must exit 0, got {status}");
    assert!(!qmp.exists(), "QMP socket left behind");

    // A signal right after the banner is a graceful stop too.
    for _ in 0..10 {
        let mut d = Livesnapd::with_image(&image, &[]);
        d.signal(libc::SIGTERM);
        let status = d.wait_exit(WAIT);
        assert!(status.success(), "SIGTERM after the banner: {status}");
        assert!(!d.dir.path().join("nbd.sock").exists());
        assert!(!d.qmp_path.exists());
    }
}

// ---- demo -----------------------------------------------------------------------------

/// livesnapd started from a command line.
fn spawn_daemon(args: &[&str]) -> Spawned {
    Spawned::spawn(Command::new(livesnapd_bin()).args(args))
}

/// Sends `signal` and waits, bounded, for the exit status.
fn stop(p: &mut Spawned, signal: i32) -> ExitStatus {
    p.signal(signal);
    p.wait_exit(WAIT)
}

/// The value after `label` on a banner line.
fn banner_value(banner: &[String], label: &str) -> String {
    banner
        .iter()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("banner lacks {label:?}: {banner:?}"))
}

#[test]
fn demo_creates_a_sparse_image_and_says_how_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let image = demo.join("disk.img");
    let qmp = demo.join("qmp.sock");
    // The demo's own flags: a private directory and a free port.
    let args = ["--demo-dir", demo.to_str().unwrap(), "--nbd", "127.0.0.1:0"];
    let mut p = spawn_daemon(&args);
    let banner = p.banner(WAIT);
    let text = banner.join("\n");

    let url = banner_value(&banner, "NBD:");
    assert!(
        url.starts_with("nbd://127.0.0.1:") && url.ends_with("/disk") && !url.contains(":0/"),
        "NBD URI {url}"
    );
    assert_eq!(PathBuf::from(banner_value(&banner, "QMP:")), qmp);
    assert!(
        text.contains(&format!("qemu-img info '{url}'")),
        "no qemu-img info line: {text}"
    );
    assert!(text.contains("(raw, writable)"), "{text}");
    assert!(!text.contains("/tmp/livesnap-demo"), "{text}");

    // A sparse 1 GiB image.
    let md = std::fs::metadata(&image).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(
        md.blocks() * 512 < MIB,
        "demo image is not sparse: {} bytes allocated",
        md.blocks() * 512
    );
    let qmd = std::fs::symlink_metadata(&qmp).unwrap();
    assert_eq!(qmd.permissions().mode() & 0o777, 0o600);

    // The printed command works.
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &url]));
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 1u64 << 30, "{info}");
    assert_eq!(info["format"], "raw", "{info}");
    let plain = run(Command::new("qemu-img").args(["info", &url]));
    assert!(plain.contains("virtual size: 1 GiB"), "{plain}");

    // The demo's QMP socket answers.
    let mut m = RawQmp::connect(&qmp);
    m.negotiate();
    let exports = m.ok("query-block-exports", Value::Null);
    assert_eq!(exports[0]["node-name"], "disk", "{exports}");
    drop(m);

    // Data written to the demo survives a restart: the image is kept.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 512M 1M", &url]));
    assert!(stop(&mut p, libc::SIGTERM).success());
    assert!(!qmp.exists(), "QMP socket left behind");
    let mut p = spawn_daemon(&args);
    let banner = p.banner(WAIT);
    let url = banner_value(&banner, "NBD:");
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5c 512M 1M", &url]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 30);
    assert!(stop(&mut p, libc::SIGINT).success());
}
