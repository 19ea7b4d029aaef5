//! livesnapd as an operator runs it: the systemd unit in contrib/ (checked
//! by `systemd-analyze`, and its own ExecStart brought up under a
//! notification socket), sd_notify READY/STOPPING, JSON logs, and the
//! Prometheus endpoint, whose numbers must equal the I/O that real peers
//! (qemu-io, nbdsh) did and the job state that `query-block-jobs` reports.

use livesnap_testkit as harness;

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use livesnap_nbd::{NbdClient, RawConn};
use serde_json::{json, Value};

/// Bound on every single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

const UNIT: &str = include_str!("../contrib/livesnapd.service");
/// Where the unit expects the binary; tests put the built one there.
const UNIT_BIN: &str = "/usr/local/bin/livesnapd";

// ---- the systemd unit ---------------------------------------------------------------

/// The unit's `Key=value` assignments in order (comments and sections left out).
fn unit_settings() -> Vec<(String, String)> {
    UNIT.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn unit_value(key: &str) -> String {
    let all: Vec<String> = unit_settings()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(all.len(), 1, "the unit sets {key} once: {all:?}");
    all[0].clone()
}

fn systemd_analyze() -> Option<&'static str> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("systemd-analyze").is_file()))
        .unwrap_or(false);
    if !found {
        eprintln!("skipped: systemd-analyze is not installed (Debian package systemd)");
    }
    found.then_some("systemd-analyze")
}

/// Syscalls of a filter group, nested groups expanded.
fn syscall_group(tool: &str, group: &str, out: &mut std::collections::BTreeSet<String>) {
    let text = run(Command::new(tool).args(["syscall-filter", group]));
    for l in text.lines().skip(1).map(str::trim) {
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if l.starts_with('@') {
            syscall_group(tool, l, out);
        } else {
            out.insert(l.to_string());
        }
    }
}

#[test]
fn unit_passes_systemd_analyze_verify_and_allows_what_the_daemon_needs() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: point it at the one built.
    let unit = dir.path().join("livesnapd.service");
    let bin = livesnapd_bin().to_str().unwrap();
    std::fs::write(&unit, UNIT.replace(UNIT_BIN, bin)).unwrap();
    let (st, out, err) = run_status(Command::new(tool).arg("verify").arg(&unit));
    assert!(st.success(), "systemd-analyze verify: {st}\n{out}\n{err}");
    // Unknown keys and bad values are only warnings with exit 0: none allowed.
    assert_eq!(
        format!("{out}{err}").trim(),
        "",
        "systemd-analyze verify warns"
    );

    // The hardening is real: systemd's own score of the unit's exposure.
    let (_, out, err) = run_status(
        Command::new(tool)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit),
    );
    let text = format!("{out}{err}");
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for livesnapd.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(level <= 2.0, "exposure {level} (10 = unprotected):\n{text}");

    // The syscall filter leaves what serving images takes: OFD locks and
    // flock, O_DIRECT opens, fallocate, syncs, io_uring, sockets, notify.
    let (mut allowed, mut denied) = (Default::default(), Default::default());
    for (k, v) in unit_settings() {
        if k != "SystemCallFilter" {
            continue;
        }
        let (set, list) = match v.strip_prefix('~') {
            Some(list) => (&mut denied, list.to_string()),
            None => (&mut allowed, v),
        };
        for item in list.split_whitespace() {
            if item.starts_with('@') {
                syscall_group(tool, item, set);
            } else {
                set.insert(item.to_string());
            }
        }
    }
    for need in [
        "openat",
        "fcntl",
        "flock",
        "pread64",
        "pwrite64",
        "preadv",
        "pwritev",
        "fallocate",
        "fdatasync",
        "fsync",
        "ftruncate",
        "ioctl",
        "statx",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "socket",
        "bind",
        "listen",
        "accept4",
        "sendto",
        "sendmsg",
        "recvfrom",
        "epoll_wait",
        "epoll_ctl",
        "eventfd2",
        "futex",
        "clone3",
        "mmap",
        "munmap",
        "madvise",
        "sched_getaffinity",
        "rt_sigaction",
        "unlink",
        "unlinkat",
    ] {
        assert!(
            allowed.contains(need) && !denied.contains(need),
            "the unit's SystemCallFilter does not allow {need}"
        );
    }
    for key in ["Type", "NotifyAccess", "ProtectSystem", "NoNewPrivileges"] {
        eprintln!("{key}={}", unit_value(key));
    }
    assert_eq!(unit_value("Type"), "notify");
    assert_eq!(unit_value("ProtectSystem"), "strict");
    assert!(
        UNIT.contains("ReadWritePaths="),
        "images need a writable place"
    );
}

// ---- sd_notify ----------------------------------------------------------------------

/// A notification socket as systemd binds it, at a path or an abstract name.
struct NotifySocket {
    sock: UnixDatagram,
    name: String,
}

impl NotifySocket {
    fn at_path(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            name: path.to_str().unwrap().to_string(),
        }
    }

    fn abstract_name() -> NotifySocket {
        let name = format!(
            "livesnap-ops-test-{}-{:?}",
            std::process::id(),
            Instant::now()
        );
        let addr = SocketAddr::from_abstract_name(&name).unwrap();
        NotifySocket {
            sock: UnixDatagram::bind_addr(&addr).unwrap(),
            name: format!("@{name}"),
        }
    }

    /// The next datagram, or `None` after `limit`.
    fn recv(&self, limit: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Datagrams until one has `line` as a line of its own; panics after WAIT
    /// saying what came.
    fn wait_for(&self, line: &str) -> (String, Vec<String>) {
        let start = Instant::now();
        let mut seen = Vec::new();
        while start.elapsed() < WAIT {
            if let Some(d) = self.recv(WAIT - start.elapsed()) {
                if d.lines().any(|l| l == line) {
                    return (d, seen);
                }
                seen.push(d);
            }
        }
        panic!("no {line} within {WAIT:?}; got {seen:?}");
    }
}

/// livesnapd started from a command line with `env` and `stderr`.
fn spawn_daemon(args: &[String], env: &[(&str, &str)], stderr: Stdio) -> Spawned {
    Spawned::spawn(
        Command::new(livesnapd_bin())
            .args(args)
            .envs(env.iter().copied())
            .stderr(stderr),
    )
}

/// A banner line's value after `key` (e.g. "NBD server:").
fn banner_value(banner: &[String], key: &str) -> String {
    banner
        .iter()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("no {key} in the banner: {banner:?}"))
}

/// The unit's ExecStart arguments, its paths moved into `dir` and its ports to free ones.
fn unit_exec_start_args(dir: &Path) -> Vec<String> {
    let exec = unit_value("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some(UNIT_BIN), "ExecStart: {exec}");
    words
        .map(|w| {
            w.replace("/run/livesnapd", dir.to_str().unwrap())
                .replace(":10809", ":0")
                .replace(":9810", ":0")
        })
        .collect()
}

#[test]
fn the_units_exec_start_notifies_ready_when_it_answers_and_stopping_at_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::at_path(dir.path());
    let args = unit_exec_start_args(dir.path());
    let qmp_path = dir.path().join("qmp.sock");
    assert!(
        args.iter().any(|a| Path::new(a) == qmp_path),
        "ExecStart has --qmp in the RuntimeDirectory: {args:?}"
    );
    let mut d = spawn_daemon(
        &args,
        &[("NOTIFY_SOCKET", &notify.name), ("LIVESNAP_LOG", "warn")],
        Stdio::null(),
    );
    let (ready, before) = notify.wait_for("READY=1");
    // Nothing announced before READY but status.
    assert!(
        before
            .iter()
            .all(|d| d.lines().all(|l| l.starts_with("STATUS="))),
        "{before:?}"
    );
    // At READY, before anything else, every listener the command line asked for answers.
    let mut qmp = Qmp::connect(&qmp_path);
    assert_eq!(qmp.greeting()["QMP"]["version"]["qemu"]["major"], json!(10));
    qmp.ok("query-block-exports", json!({}));
    let banner = d.banner(WAIT);
    let nbd = banner_value(&banner, "NBD server:");
    let mut greeting = [0u8; 8];
    TcpStream::connect(&nbd)
        .and_then(|mut s| s.read_exact(&mut greeting))
        .unwrap_or_else(|e| panic!("NBD server {nbd} at READY: {e}"));
    assert_eq!(&greeting, b"NBDMAGIC");
    let metrics = banner_value(&banner, "metrics:");
    let (status, _) = http_get(&metrics);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        ready.contains("STATUS=serving: QMP ") && ready.contains(&nbd),
        "READY's status says what serves where: {ready:?}"
    );

    d.signal(libc::SIGTERM);
    let (stopping, _) = notify.wait_for("STOPPING=1");
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    let st = d.wait_exit(WAIT);
    assert!(st.success(), "exit after SIGTERM: {st}");
    // Nothing more once stopped, READY least of all.
    assert_eq!(notify.recv(Duration::from_millis(100)), None);
}

#[test]
fn an_abstract_notify_socket_gets_ready_and_stopping_at_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::abstract_name();
    let image = sparse_file(dir.path().join("disk.img"), 16 << 20);
    let nbd = dir.path().join("nbd.sock");
    let qmp_path = dir.path().join("qmp.sock");
    let args: Vec<String> = [
        "--image",
        image.to_str().unwrap(),
        "--nbd",
        &format!("unix:{}", nbd.display()),
        "--qmp",
        qmp_path.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut d = spawn_daemon(&args, &[("NOTIFY_SOCKET", &notify.name)], Stdio::null());
    notify.wait_for("READY=1");
    // The export is served at READY: a real client reads it at once.
    let url = format!("nbd+unix:///disk?socket={}", nbd.display());
    qemu_io(&url, "raw", &["read -P 0 0 64k"]);
    Qmp::connect(&qmp_path).ok("query-block-exports", json!({}));
    d.signal(libc::SIGINT);
    notify.wait_for("STOPPING=1");
    assert!(d.wait_exit(WAIT).success());
}

#[test]
fn a_failed_start_never_says_ready() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::at_path(dir.path());
    let args: Vec<String> = [
        "--image",
        dir.path().join("missing.img").to_str().unwrap(),
        "--nbd",
        &format!("unix:{}", dir.path().join("nbd.sock").display()),
        "--qmp",
        dir.path().join("qmp.sock").to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut d = spawn_daemon(&args, &[("NOTIFY_SOCKET", &notify.name)], Stdio::null());
    let st = d.wait_exit(WAIT);
    assert!(!st.success(), "a missing image must fail the start");
    let mut got = Vec::new();
    while let Some(m) = notify.recv(Duration::from_millis(100)) {
        got.push(m);
    }
    assert!(
        got.iter().all(|m| !m.lines().any(|l| l == "READY=1")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|m| m.starts_with("STATUS=start-up failed:") && m.contains("missing.img")),
        "the failure is told as STATUS: {got:?}"
    );
}

// ---- logs ---------------------------------------------------------------------------

#[test]
fn json_logs_are_one_object_per_line_with_level_target_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_file(dir.path().join("disk.img"), 16 << 20);
    let nbd = dir.path().join("nbd.sock");
    let qmp_path = dir.path().join("qmp.sock");
    let args: Vec<String> = [
        "--image",
        image.to_str().unwrap(),
        "--nbd",
        &format!("unix:{}", nbd.display()),
        "--qmp",
        qmp_path.to_str().unwrap(),
        "--log-format",
        "json",
    ]
    .map(String::from)
    .to_vec();
    let mut d = spawn_daemon(&args, &[("LIVESNAP_LOG", "debug")], Stdio::piped());
    let stderr = d.child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    d.banner(WAIT);
    // Work that logs: a client, a failing QMP command, a bad NBD handshake.
    let url = format!("nbd+unix:///disk?socket={}", nbd.display());
    qemu_io(&url, "raw", &["write -P 7 0 4k"]);
    let mut qmp = Qmp::connect(&qmp_path);
    assert!(qmp
        .execute("blockdev-del", json!({"node-name": "nope"}))
        .is_err());
    let mut raw = std::os::unix::net::UnixStream::connect(&nbd).unwrap();
    let _ = raw.write_all(&[0xff; 64]);
    drop(raw);
    drop(qmp);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).success());
    let text = log.join().unwrap();
    let mut messages = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\nall:\n{text}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v[key].is_string(), "no string {key:?} in {line}");
        }
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&v["level"].as_str().unwrap()),
            "{line}"
        );
        messages.push(v["message"].as_str().unwrap().to_string());
    }
    for want in ["QMP server listening", "livesnapd ready", "stopped"] {
        assert!(
            messages.iter().any(|m| m == want),
            "no {want:?} among {messages:?}"
        );
    }
    // Fields stay fields: the QMP line carries its path as a member.
    let qmp_line: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["message"] == "QMP server listening")
        .unwrap();
    assert_eq!(qmp_line["path"], json!(qmp_path.to_str().unwrap()));
}

// ---- metrics ------------------------------------------------------------------------

/// `GET /metrics` over plain HTTP/1.1: (status line, body); checks the content type.
fn http_get(base: &str) -> (String, String) {
    let url = base.strip_prefix("http://").unwrap_or(base);
    let (host, path) = url.split_once('/').unwrap_or((url, "metrics"));
    let mut s = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("a header end");
    let status = head.lines().next().unwrap_or("").to_string();
    if status.starts_with("HTTP/1.1 200") {
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.parse().ok())
            .expect("Content-Length");
        assert_eq!(len, body.len(), "Content-Length");
    }
    (status, body.to_string())
}

/// One scrape, parsed: (metric name, labels, value) for every sample.
struct Scrape(Vec<(String, BTreeMap<String, String>, f64)>, String);

impl Scrape {
    fn take(url: &str) -> Scrape {
        let (status, body) = http_get(url);
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut samples = Vec::new();
        for l in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            samples.push((name.to_string(), labels, value));
        }
        Scrape(samples, body)
    }

    /// The one sample of `name` whose labels include `labels`; `None` if there is none.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let hits: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|s| s.2)
            .collect();
        assert!(hits.len() <= 1, "{name} {labels:?} is ambiguous");
        hits.first().copied()
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", self.1))
    }
}

fn wait_scrape(url: &str, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let start = Instant::now();
    loop {
        let s = Scrape::take(url);
        if ok(&s) {
            return s;
        }
        assert!(
            start.elapsed() < WAIT,
            "no {what} within {WAIT:?}; last scrape:\n{}",
            s.1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one export command did, as the test counts it.
#[derive(Default, Debug)]
struct Did {
    requests: u64,
    bytes: u64,
}

#[test]
fn metrics_match_the_io_real_clients_did_and_the_jobs_qmp_reports() {
    let dir = tempfile::tempdir().unwrap();
    let image = create_image(dir.path().join("disk.img"), "raw", 64 << 20);
    let d = Livesnapd::with_image(
        &image,
        &["--metrics", "127.0.0.1:0", "--max-connections", "1"],
    );
    let metrics = banner_value(&d.banner, "metrics:");
    let url = d.url().to_string();
    let export = [("export", "export0"), ("name", "disk")];
    let conns_idle = |s: &Scrape| s.get("livesnap_nbd_connections", &[]) == 0.0;

    let before = Scrape::take(&metrics);
    assert_eq!(
        before.get("livesnap_nbd_connections_accepted_total", &[]),
        0.0
    );
    let mut did: BTreeMap<&str, Did> = BTreeMap::new();
    let mut count = |cmd: &'static str, n: u64| {
        let e = did.entry(cmd).or_default();
        e.requests += 1;
        e.bytes += n;
    };

    // qemu-io: writes of several sizes, reads, one flush, and the flush
    // qemu-io sends whenever it closes an image (even after only reads).
    let writes: [(u64, u64); 5] = [
        (0, 4096),
        (1 << 20, 65536),
        (2 << 20, 1 << 20),
        (8 << 20, 12288),
        (9 << 20, 4096),
    ];
    let reads: [(u64, u64); 3] = [(0, 4096), (1 << 20, 65536), (2 << 20, 1 << 20)];
    let mut script: Vec<String> = Vec::new();
    for (off, len) in writes {
        script.push(format!("write -P 0x5a {off} {len}"));
        count("write", len);
    }
    for (off, len) in reads {
        script.push(format!("read -P 0x5a {off} {len}"));
        count("read", len);
    }
    script.push("flush".into());
    count("flush", 0);
    count("flush", 0);
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    qemu_io(&url, "raw", &script);
    // The limit is one connection: the next client waits until this one is gone.
    wait_scrape(&metrics, "qemu-io's connection closed", conns_idle);

    // nbdsh: the commands qemu-io does not send on request.
    let py = "h.add_meta_context('base:allocation')\n\
              h.connect_uri(url)\n\
              h.zero(65536, 16777216)\n\
              h.zero(4096, 17825792)\n\
              h.trim(131072, 20971520)\n\
              n = [0]\n\
              def cb(ctx, off, ents, err):\n\
              \x20   n[0] += 1\n\
              h.block_status(1048576, 0, cb)\n\
              h.block_status(4096, 33554432, cb)\n\
              h.flush()\n\
              h.shutdown()\n\
              assert n[0] == 2\n";
    run(nbdsh().args(["-c", &format!("url = {url:?}"), "-c", py]));
    count("write_zeroes", 65536);
    count("write_zeroes", 4096);
    count("trim", 131072);
    count("block_status", 1 << 20);
    count("block_status", 4096);
    count("flush", 0);
    let s = wait_scrape(&metrics, "nbdsh's connection closed", conns_idle);

    for cmd in [
        "read",
        "write",
        "flush",
        "trim",
        "write_zeroes",
        "block_status",
        "cache",
    ] {
        let want = did.get(cmd).map_or((0, 0), |d| (d.requests, d.bytes));
        let labels = [export[0], export[1], ("command", cmd)];
        let got = (
            s.get("livesnap_nbd_requests_total", &labels) as u64,
            s.get("livesnap_nbd_request_bytes_total", &labels) as u64,
        );
        eprintln!("{cmd}: requests, bytes = {got:?}");
        assert_eq!(got, want, "{cmd}: (requests, bytes) scraped vs done");
        // Every request finished: the histogram counts each once.
        let count = s.get("livesnap_nbd_request_duration_seconds_count", &labels);
        assert_eq!(count as u64, want.0, "{cmd}: latency count");
        let inf = s.get(
            "livesnap_nbd_request_duration_seconds_bucket",
            &[export[0], export[1], ("command", cmd), ("le", "+Inf")],
        );
        assert_eq!(inf, count, "{cmd}: +Inf bucket");
        let buckets: Vec<f64> =
            s.0.iter()
                .filter(|(n, l, _)| {
                    n == "livesnap_nbd_request_duration_seconds_bucket"
                        && l.get("command").map(String::as_str) == Some(cmd)
                })
                .map(|x| x.2)
                .collect();
        assert_eq!(buckets.len(), 18, "{cmd}: buckets");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{cmd}: cumulative"
        );
        let sum = s.get("livesnap_nbd_request_duration_seconds_sum", &labels);
        assert_eq!(sum > 0.0, want.0 > 0, "{cmd}: latency sum {sum}");
    }
    assert_eq!(s.get("livesnap_nbd_export_connections", &export), 0.0);
    assert_eq!(s.get("livesnap_nbd_connections_accepted_total", &[]), 2.0);
    assert_eq!(s.get("livesnap_nbd_connections_refused_total", &[]), 0.0);

    // One client attached fills the limit; the next is refused and counted.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nbd_addr = format!("unix:{}", d.dir.path().join("nbd.sock").display());
    let held = rt
        .block_on(NbdClient::connect(&nbd_addr, "disk"))
        .expect("attach within the limit");
    let s = wait_scrape(&metrics, "one attached client", |s| {
        s.get("livesnap_nbd_export_connections", &export) == 1.0
    });
    assert_eq!(s.get("livesnap_nbd_connections", &[]), 1.0);
    let closed = rt.block_on(async {
        let mut c = RawConn::connect(&nbd_addr).await.unwrap();
        c.closed_within(WAIT).await
    });
    assert!(closed, "a client past max-connections is closed");
    let s = wait_scrape(&metrics, "the refusal counted", |s| {
        s.get("livesnap_nbd_connections_refused_total", &[]) == 1.0
    });
    assert_eq!(s.get("livesnap_nbd_connections_accepted_total", &[]), 3.0);
    drop(held);
    wait_scrape(&metrics, "the held client gone", conns_idle);

    job_metrics_match_query_block_jobs(&d, &metrics, dir.path());
}

/// Polls `query-block-jobs` until job bk (Null when absent) satisfies `ok`.
fn wait_job(qmp: &mut Qmp, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let jobs = qmp.ok("query-block-jobs", json!({}));
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == "bk"))
            .cloned()
            .unwrap_or(Value::Null);
        if ok(&job) {
            return job;
        }
        assert!(start.elapsed() < WAIT, "no {what} within {WAIT:?}: {job}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A backup held at a speed of 1 byte/s and paused: its scraped progress,
/// speed and state equal `query-block-jobs`; once cancelled it is gone.
fn job_metrics_match_query_block_jobs(d: &Livesnapd, metrics: &str, dir: &Path) {
    let target: PathBuf = create_image(dir.join("target.raw"), "raw", 64 << 20);
    let mut qmp = d.qmp();
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "tgt",
               "file": {"driver": "file", "filename": target.to_str().unwrap()}}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "bk", "device": "disk", "target": "tgt", "sync": "full", "speed": 1}),
    );
    qmp.ok("block-job-pause", json!({"device": "bk"}));
    wait_job(&mut qmp, "backup bk paused", |j| j["status"] == "paused");
    let labels = [("id", "bk"), ("type", "backup")];
    let fields = [
        ("livesnap_job_offset_bytes", "offset"),
        ("livesnap_job_len_bytes", "len"),
        ("livesnap_job_speed_limit_bytes_per_second", "speed"),
    ];
    // A chunk in flight at the pause may still land (measured: offset 0 at
    // "paused", 1 MiB just after), so compare a scrape taken between two
    // equal query-block-jobs answers; every scrape lies between its two.
    let start = Instant::now();
    let (info, s) = loop {
        let q1 = wait_job(&mut qmp, "bk", |j| !j.is_null());
        let s = Scrape::take(metrics);
        let q2 = wait_job(&mut qmp, "bk", |j| !j.is_null());
        for (metric, field) in fields {
            let (lo, got, hi) = (
                q1[field].as_u64(),
                s.get(metric, &labels) as u64,
                q2[field].as_u64(),
            );
            assert!(
                lo.unwrap() <= got && Some(got) <= hi,
                "{metric} {got} outside query-block-jobs' {field} {lo:?}..{hi:?}"
            );
        }
        if q1 == q2 {
            break (q1, s);
        }
        assert!(
            start.elapsed() < WAIT,
            "bk never held still: {q1} then {q2}"
        );
    };
    for (metric, field) in fields {
        assert_eq!(
            s.get(metric, &labels) as u64,
            info[field].as_u64().unwrap(),
            "{metric} vs query-block-jobs {field}: {info}"
        );
    }
    assert_eq!(info["status"], "paused", "{info}");
    assert_eq!(info["len"], json!(64 << 20), "{info}");
    let rate = s.get("livesnap_job_rate_bytes_per_second", &labels);
    assert!(rate >= 0.0 && rate.is_finite(), "rate {rate}");
    let state = |st: &str| s.get("livesnap_job_state", &[labels[0], labels[1], ("state", st)]);
    assert_eq!(state("paused"), 1.0);
    assert_eq!(state("running"), 0.0);
    let on: f64 =
        s.0.iter()
            .filter(|(n, l, _)| {
                n == "livesnap_job_state" && l.get("id").map(String::as_str) == Some("bk")
            })
            .map(|x| x.2)
            .sum();
    assert_eq!(on, 1.0, "exactly one state is on");

    qmp.ok("block-job-cancel", json!({"device": "bk", "force": true}));
    wait_job(&mut qmp, "bk gone from query-block-jobs", Value::is_null);
    wait_scrape(metrics, "bk gone from the metrics", |s| {
        s.find("livesnap_job_offset_bytes", &labels).is_none()
    });
}

#[test]
fn the_metrics_endpoint_answers_bad_requests_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = Livesnapd::with_image(
        &sparse_file(dir.path().join("d.img"), 1 << 20),
        &["--metrics", "127.0.0.1:0"],
    );
    let metrics = banner_value(&d.banner, "metrics:");
    let host = metrics
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap();
    let ask = |req: &[u8]| -> String {
        let mut s = TcpStream::connect(host).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = s.write_all(req);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines().next().unwrap_or("").to_string()
    };
    assert_eq!(ask(b"GET /nope HTTP/1.1\r\n\r\n"), "HTTP/1.1 404 Not Found");
    assert_eq!(
        ask(b"POST /metrics HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(ask(b"garbage\r\n\r\n"), "HTTP/1.1 400 Bad Request");
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    assert_eq!(ask(&huge), "HTTP/1.1 431 Request Header Fields Too Large");
    // A client that connects and says nothing does not hold the endpoint.
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(host).unwrap()).collect();
    let (status, body) = http_get(&metrics);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        body.contains("# TYPE livesnap_nbd_requests_total counter"),
        "{body}"
    );
    drop(idle);
}
