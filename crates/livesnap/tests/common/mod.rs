//! Test support for the `livesnap` CLI: daemons to run it against
//! (qemu-storage-daemon and livesnapd, each exporting node `disk` over NBD),
//! running the CLI, a blocking QMP client for the test's own checks, and
//! the point-in-time harness of the interop tests (`tests/harness/pit.rs`).
//!
//! A missing peer tool fails the test with the package to install: these
//! tests must never pass by skipping.

#![allow(dead_code)]

#[path = "../../../../tests/harness/pit.rs"]
pub mod pit;
pub mod scenarios;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a daemon may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The CLI under test.
pub fn livesnap_bin() -> &'static str {
    env!("CARGO_BIN_EXE_livesnap")
}

/// livesnapd, built next to the CLI. Cargo gives a test only its own
/// package's binaries, so this runs `cargo build -p livesnapd` once (a no-op
/// when it is fresh, e.g. under `cargo test --workspace`) into the same
/// target directory and profile.
pub fn livesnapd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cli = Path::new(livesnap_bin());
        let profile_dir = cli.parent().expect("binary directory");
        let bin = profile_dir.join("livesnapd");
        let target_dir = profile_dir.parent().expect("target directory");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "livesnapd", "--bin", "livesnapd"])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            r => assert!(
                bin.is_file(),
                "cannot build livesnapd ({r:?}) and {} does not exist: run `cargo build -p livesnapd`",
                bin.display()
            ),
        }
        bin
    })
    .clone()
}

/// Fails the test unless `name` is on PATH; names the Debian package to install.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{name}`: apt-get install -y qemu-utils (.ci/run installs it)"
    );
}

/// Runs a command to completion, panics with its output unless it succeeded, returns stdout.
pub fn run(cmd: &mut Command) -> String {
    if let Some(prog) = cmd.get_program().to_str() {
        if !prog.contains('/') {
            require_tool(prog);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A blocking QMP session (capabilities negotiated).
pub struct Qmp {
    rt: tokio::runtime::Runtime,
    client: livesnap_qmp::QmpClient,
}

impl Qmp {
    /// Connects to a QMP socket.
    pub fn connect(path: &Path) -> Qmp {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(livesnap_qmp::QmpClient::connect(path))
            .unwrap_or_else(|e| panic!("QMP connect to {}: {e}", path.display()));
        Qmp { rt, client }
    }

    /// Runs a command: Ok(return value) or Err((class, desc)).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, (String, String)> {
        let args = if args.is_null() { None } else { Some(args) };
        let r = self
            .rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(60), self.client.execute(cmd, args)).await
            })
            .unwrap_or_else(|_| panic!("QMP {cmd}: no reply within 60 s"))
            .unwrap_or_else(|e| panic!("QMP {cmd}: connection failed: {e}"));
        r.map_err(|e| (e.class.to_string(), e.desc))
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd} failed: {e:?}"))
    }

    /// The next event, waiting at most `timeout`.
    pub fn event(&mut self, timeout: Duration) -> Option<Value> {
        self.rt.block_on(self.client.next_event(timeout))
    }

    /// Names of all nodes.
    pub fn node_names(&mut self) -> BTreeSet<String> {
        self.ok("query-named-block-nodes", Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Ids of all jobs.
    pub fn job_ids(&mut self) -> Vec<String> {
        self.ok("query-jobs", Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Which daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// qemu-storage-daemon, the reference.
    Qsd,
    /// livesnapd.
    Livesnapd,
}

/// A daemon exporting node `disk` (format over node `disk-file`) writable
/// over NBD on a unix socket, in its own temporary directory.
pub struct Daemon {
    /// Which one.
    pub kind: Kind,
    child: Child,
    /// Its directory (sockets; tests put images and targets here too).
    pub dir: tempfile::TempDir,
    /// The monitor the CLI is pointed at.
    pub cli_sock: PathBuf,
    /// The test's own monitor (qsd serves one client per monitor).
    pub test_sock: PathBuf,
    /// NBD URL of the export.
    pub url: String,
    /// Node name of the disk.
    pub node: String,
    /// The image file.
    pub image: PathBuf,
    stderr: Option<mpsc::Receiver<String>>,
}

impl Daemon {
    /// Starts `kind` on `image` (of `format`), which must be in `dir`.
    pub fn start(kind: Kind, dir: tempfile::TempDir, image: &Path, format: &str) -> Daemon {
        let cli_sock = dir.path().join("qmp.sock");
        let nbd_sock = dir.path().join("nbd.sock");
        let mut cmd = match kind {
            Kind::Qsd => {
                require_tool("qemu-storage-daemon");
                let mut c = Command::new("qemu-storage-daemon");
                let test_sock = dir.path().join("test.sock");
                for (id, path) in [("m0", &cli_sock), ("m1", &test_sock)] {
                    c.arg("--chardev")
                        .arg(format!(
                            "socket,path={},server=on,wait=off,id={id}",
                            path.display()
                        ))
                        .arg("--monitor")
                        .arg(format!("chardev={id}"));
                }
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=disk-file,filename={}",
                        image.display()
                    ))
                    .arg("--blockdev")
                    .arg(format!("driver={format},node-name=disk,file=disk-file"))
                    .arg("--nbd-server")
                    .arg(format!("addr.type=unix,addr.path={}", nbd_sock.display()))
                    .arg("--export")
                    .arg("type=nbd,id=e0,node-name=disk,name=disk,writable=on");
                c
            }
            Kind::Livesnapd => {
                let mut c = Command::new(livesnapd_bin());
                c.arg("--image")
                    .arg(image)
                    .args(["--format", format])
                    .arg("--nbd")
                    .arg(format!("unix:{}", nbd_sock.display()))
                    .arg("--qmp")
                    .arg(&cli_sock);
                c
            }
        };
        let test_sock = match kind {
            Kind::Qsd => dir.path().join("test.sock"),
            // livesnapd serves any number of monitors on its one socket.
            Kind::Livesnapd => cli_sock.clone(),
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                let _ = tx.send(line);
            }
        });
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&test_sock).is_err() || !nbd_sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{kind:?} exited at start-up with {st}");
            }
            assert!(start.elapsed() < START_TIMEOUT, "{kind:?} did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = format!("nbd+unix:///disk?socket={}", nbd_sock.display());
        Daemon {
            kind,
            child,
            dir,
            cli_sock,
            test_sock,
            url,
            node: "disk".into(),
            image: image.to_path_buf(),
            stderr: Some(rx),
        }
    }

    /// A daemon on a fresh raw image of `size` bytes.
    pub fn raw(kind: Kind, size: u64) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .unwrap();
        Daemon::start(kind, dir, &image, "raw")
    }

    /// A session on the test's monitor.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.test_sock)
    }

    /// A path in the daemon's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates an image with qemu-img and adds it as node `node` (format over inline file).
    pub fn add_image(&self, qmp: &mut Qmp, node: &str, path: &Path, format: &str, size: u64) {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(path)
            .arg(size.to_string()));
        qmp.ok(
            "blockdev-add",
            json!({"driver": format, "node-name": node,
                   "file": {"driver": "file", "filename": path.to_str().unwrap()}}),
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a CLI run returned.
#[derive(Debug)]
pub struct Out {
    /// Exit status.
    pub status: ExitStatus,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

impl Out {
    /// The exit code (panics on death by signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("livesnap died by a signal: {self:?}"))
    }

    /// stdout as one JSON object.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {self:?}"))
    }

    /// Panics unless the exit code is `code`.
    pub fn expect(self, code: i32) -> Out {
        assert_eq!(self.code(), code, "unexpected exit code: {self:#?}");
        self
    }
}

/// Runs the CLI with `args`; panics if it runs longer than `limit`.
pub fn livesnap(args: &[&str], limit: Duration) -> Out {
    let child = spawn_livesnap(args);
    wait_out(child, limit)
}

/// Starts the CLI with piped stdout and stderr.
pub fn spawn_livesnap(args: &[&str]) -> Child {
    Command::new(livesnap_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn livesnap")
}

/// Waits for a spawned CLI (killing it and panicking after `limit`).
pub fn wait_out(mut child: Child, limit: Duration) -> Out {
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = std::io::Read::read_to_end(&mut r, &mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "livesnap did not finish within {limit:?}; stderr: {}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let o = Out {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    eprintln!("[livesnap stderr]\n{}", o.stderr);
    o
}

/// CLOCK_MONOTONIC now, in nanoseconds (what `Instant` reads on Linux).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This process's `Instant` for a CLOCK_MONOTONIC reading of another
/// process on this machine.
pub fn instant_of(ns: u64) -> Instant {
    let (i, m) = (Instant::now(), mono_ns());
    if ns >= m {
        i + Duration::from_nanos(ns - m)
    } else {
        i - Duration::from_nanos(m - ns)
    }
}

/// The report's point-in-time window as `Instant`s, widened by 1 ms on each
/// side for the nanoseconds between reading `Instant` and the raw clock.
pub fn window_of(report: &Value) -> (Instant, Instant) {
    let p = &report["point_in_time"];
    let slack = Duration::from_millis(1);
    (
        instant_of(
            p["start_monotonic_ns"]
                .as_u64()
                .expect("start_monotonic_ns"),
        ) - slack,
        instant_of(p["end_monotonic_ns"].as_u64().expect("end_monotonic_ns")) + slack,
    )
}
