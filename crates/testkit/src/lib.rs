//! livesnap's test kit: what the tests of every crate share. It runs the
//! real peers (qemu-img, qemu-io, qemu-storage-daemon, libnbd's tools,
//! qemu-system with a writing guest, libvirtd), the daemons and the CLI
//! under test, a blocking QMP client, livesnapd and qsd side by side for the
//! parity tests, and the point-in-time checks on top of
//! `livesnap-pit`, each workload with its own record format.
//!
//! A missing peer tool fails the test with the package to install: these
//! tests must never pass by skipping. Nothing here is shipped; no product
//! crate may depend on it.

pub mod block;
pub mod chain;
pub mod cli;
pub mod compat;
pub mod disk;
pub mod fuzz;
pub mod libvirt;
pub mod nbd;
pub mod pit;
pub mod qmp;
pub mod scenarios;
pub mod transcript;
pub mod vm;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a daemon may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Nova's own live-snapshot calls through libvirt's Python binding.
pub const NOVA_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nova.py");

/// Path of the livesnapd binary under test.
pub fn livesnapd_bin() -> &'static Path {
    bin("livesnapd")
}

/// Path of the workspace binary `name` (livesnapd, livesnap) for the test
/// that runs now, built on first use. Cargo builds a package's binaries
/// before its own integration tests only, so the binary is taken as it is
/// when the running test belongs to its package, and otherwise built once
/// (`cargo build -p`, a no-op when fresh, e.g. under `cargo test
/// --workspace`) into the test's own target directory and profile.
pub fn bin(name: &'static str) -> &'static Path {
    static BINS: Mutex<Vec<(&'static str, &'static Path)>> = Mutex::new(Vec::new());
    let mut bins = BINS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = bins.iter().find(|(n, _)| *n == name) {
        return p;
    }
    let profile_dir = profile_dir();
    let path = profile_dir.join(name);
    let own = std::env::var("CARGO_PKG_NAME").is_ok_and(|p| p == name);
    if !own {
        build(name, &profile_dir);
    }
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build -p {name}`",
        path.display()
    );
    let path: &'static Path = Box::leak(path.into_boxed_path());
    bins.push((name, path));
    path
}

/// `target/<profile>` of the running test (`target/<profile>/deps/<test>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("a test binary under target/<profile>/deps")
        .to_path_buf()
}

/// Builds the binary `name` of package `name` into `profile_dir`'s target.
fn build(name: &str, profile_dir: &Path) {
    let target_dir = profile_dir.parent().expect("target directory");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", name, "--bin", name])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if name == "livesnap" {
        // The CLI's tests run with the libvirt endpoint; build it the same.
        cmd.arg("--all-features");
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let r = cmd.status();
    assert!(
        r.as_ref().is_ok_and(|s| s.success()) || profile_dir.join(name).is_file(),
        "cannot build {name} ({r:?}): run `cargo build -p {name}`"
    );
}

/// Fails the test unless `name` is on PATH; names the Debian package to install.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    let package = match name {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        // On Debian 12 nbdsh ships with the python binding, not libnbd-bin.
        "nbdsh" => "python3-libnbd",
        "fio" => "fio",
        _ => "qemu-utils",
    };
    assert!(
        found,
        "this test needs `{name}`: apt-get install -y {package} (.ci/run installs it)"
    );
}

/// An `nbdsh` command. nbdsh runs `python3 -m nbd`; the module comes with
/// Debian's python3-libnbd, which only the system python3 sees.
pub fn nbdsh() -> Command {
    require_tool("nbdsh");
    let mut c = Command::new("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:{path}"));
    c
}

/// Runs a command to completion, panics with its output unless it succeeded, returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = run_status(cmd);
    assert!(
        out.0.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.0,
        out.1,
        out.2
    );
    out.1
}

/// Runs a command to completion and returns (status, stdout, stderr).
pub fn run_status(cmd: &mut Command) -> (ExitStatus, String, String) {
    if let Some(prog) = cmd.get_program().to_str() {
        if !prog.contains('/') {
            require_tool(prog);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `script` with qemu-io on `target`; fails on any error or mismatch.
pub fn qemu_io(target: &str, format: &str, script: &[&str]) -> String {
    qemu_io_opts(target, format, &[], script)
}

/// [`qemu_io`] with extra options (`-r`: read-only).
pub fn qemu_io_opts(target: &str, format: &str, opts: &[&str], script: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]).args(opts);
    for c in script {
        cmd.args(["-c", c]);
    }
    cmd.arg(target);
    let out = run(&mut cmd);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {target}: {out}"
    );
    out
}

/// `qemu-img create -f format path size`; returns the path.
pub fn create_image(path: impl AsRef<Path>, format: &str, size: u64) -> PathBuf {
    let path = path.as_ref();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string()));
    path.to_path_buf()
}

/// Creates a sparse file of `size` bytes; returns its path.
pub fn sparse_file(path: impl AsRef<Path>, size: u64) -> PathBuf {
    let path = path.as_ref();
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    path.to_path_buf()
}

/// Waits until `ready` holds, or panics after `timeout` with `what`.
pub fn wait_until(timeout: Duration, what: &str, ready: impl FnMut() -> bool) {
    wait_until_or(timeout, what, ready, String::new);
}

/// [`wait_until`], the panic saying what `seen` returns then.
pub fn wait_until_or(
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
    seen: impl Fn() -> String,
) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}\n{}",
            seen()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A blocking QMP session (capabilities already negotiated).
pub struct Qmp {
    rt: tokio::runtime::Runtime,
    client: livesnap_qmp::QmpClient,
    path: PathBuf,
    /// How long a command may wait for its reply.
    reply_limit: Duration,
}

/// How long a command may wait for its reply unless a test says otherwise:
/// a hung daemon fails the test with a diagnosis instead of stalling CI.
pub const DEFAULT_REPLY_LIMIT: Duration = Duration::from_secs(120);

impl Qmp {
    /// Connects to a QMP socket and negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(livesnap_qmp::QmpClient::connect(path))
            .unwrap_or_else(|e| panic!("QMP connect to {}: {e}", path.display()));
        Qmp {
            rt,
            client,
            path: path.to_path_buf(),
            reply_limit: DEFAULT_REPLY_LIMIT,
        }
    }

    /// Panics when a command's reply takes longer than `limit`.
    pub fn with_reply_limit(mut self, limit: Duration) -> Qmp {
        self.reply_limit = limit;
        self
    }

    /// What a second monitor sees when this one got no reply: tells a hung
    /// daemon from a lost reply on this connection.
    fn diagnose_missing_reply(&mut self) -> String {
        let path = self.path.clone();
        let other = self.rt.block_on(async {
            let c = tokio::time::timeout(Duration::from_secs(5), async {
                let mut c = livesnap_qmp::QmpClient::connect(&path).await?;
                c.execute("query-jobs", None).await
            })
            .await;
            match c {
                Ok(Ok(Ok(v))) => format!("a second monitor got query-jobs = {v}"),
                Ok(Ok(Err(e))) => format!("a second monitor got an error: {}", e.desc),
                Ok(Err(e)) => format!("a second monitor failed: {e}"),
                Err(_) => "a second monitor got no answer within 5 s either".to_string(),
            }
        });
        let late = self
            .rt
            .block_on(self.client.next_event(Duration::from_secs(5)))
            .map(|e| format!("; then this monitor received {e}"))
            .unwrap_or_default();
        format!("{other}{late}")
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> Value {
        self.client.greeting().clone()
    }

    /// Runs a command: Ok(return value) or Err((class, desc)).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, (String, String)> {
        let args = if args.is_null() { None } else { Some(args) };
        let limit = self.reply_limit;
        let reply = self.client.execute(cmd, args);
        let r = self
            .rt
            .block_on(async { tokio::time::timeout(limit, reply).await });
        let r = match r {
            Ok(r) => r,
            Err(_) => {
                let why = self.diagnose_missing_reply();
                panic!("QMP {cmd}: no reply within {} s; {why}", limit.as_secs())
            }
        }
        .unwrap_or_else(|e| panic!("QMP {cmd}: connection failed: {e}"));
        r.map_err(|e| (e.class.to_string(), e.desc))
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd} failed: {e:?}"))
    }

    /// Sends raw text and returns the next reply that is not an event.
    pub fn raw(&mut self, text: &str) -> Value {
        self.rt
            .block_on(self.client.execute_raw(text))
            .unwrap_or_else(|e| panic!("QMP raw send failed: {e}"))
    }

    /// The next event, waiting at most `timeout`.
    pub fn event(&mut self, timeout: Duration) -> Option<Value> {
        self.rt.block_on(self.client.next_event(timeout))
    }

    /// Names of all nodes.
    pub fn node_names(&mut self) -> BTreeSet<String> {
        self.list_field("query-named-block-nodes", "node-name")
    }

    /// Ids of all jobs.
    pub fn job_ids(&mut self) -> Vec<String> {
        self.list_field("query-jobs", "id")
    }

    /// String field `field` of every element `query` returns.
    fn list_field<C: FromIterator<String>>(&mut self, query: &str, field: &str) -> C {
        self.ok(query, Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[field].as_str().unwrap().to_string())
            .collect()
    }
}

/// A spawned daemon whose stdout is collected line by line; killed when
/// dropped. Its stderr is whatever the command says (inherited by default).
pub struct Spawned {
    /// The process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Spawned {
    /// Spawns `cmd` with stdin closed and stdout read by a thread.
    pub fn spawn(cmd: &mut Command) -> Spawned {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Spawned { child, lines }
    }

    /// The start-up banner, up to its `stop:` line; panics with what came
    /// (and the exit status, if the daemon ended) when it is not complete
    /// within `limit`.
    pub fn banner(&mut self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut banner = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.trim_start().starts_with("stop:");
                    banner.push(line);
                    if done {
                        return banner;
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "livesnapd did not come up within {limit:?} (exit status {status:?}); \
                         banner so far: {banner:?}"
                    );
                }
            }
        }
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits at most `timeout` for the process to exit (killing it and
    /// panicking after that).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running livesnapd in its own temporary directory.
pub struct Livesnapd {
    proc: Spawned,
    /// Temporary directory holding sockets (and images the test puts there).
    pub dir: tempfile::TempDir,
    /// The QMP socket.
    pub qmp_path: PathBuf,
    /// The NBD URI of the default export, when started with an image.
    pub nbd_url: Option<String>,
    /// The banner lines printed at start-up.
    pub banner: Vec<String>,
}

impl Livesnapd {
    /// Starts livesnapd with only a QMP socket (configure everything over QMP).
    pub fn bare() -> Livesnapd {
        Self::start(&[], None)
    }

    /// Starts livesnapd exporting `image` as `disk` on a unix socket in its directory.
    pub fn with_image(image: &Path, extra: &[&str]) -> Livesnapd {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let mut args = vec![
            "--image".to_string(),
            image.to_str().unwrap().to_string(),
            "--nbd".to_string(),
            format!("unix:{}", sock.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start(&args, Some(dir))
    }

    /// Starts livesnapd exporting `image` as `disk` on 127.0.0.1 at a free TCP port.
    pub fn with_image_tcp(image: &Path) -> Livesnapd {
        Self::with_image_tcp_args(image, &[])
    }

    /// [`Livesnapd::with_image_tcp`] with extra command-line arguments.
    pub fn with_image_tcp_args(image: &Path, extra: &[&str]) -> Livesnapd {
        let mut args = vec![
            "--image".to_string(),
            image.to_str().unwrap().to_string(),
            "--nbd".to_string(),
            "127.0.0.1:0".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start(&args, None)
    }

    /// Starts livesnapd with only a QMP socket and `env` added to its environment.
    pub fn bare_with_env(env: &[(&str, &str)]) -> Livesnapd {
        Self::start_env(&[], None, env)
    }

    fn start(args: &[String], dir: Option<tempfile::TempDir>) -> Livesnapd {
        Self::start_env(args, dir, &[])
    }

    fn start_env(
        args: &[String],
        dir: Option<tempfile::TempDir>,
        env: &[(&str, &str)],
    ) -> Livesnapd {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let qmp_path = dir.path().join("qmp.sock");
        let mut cmd = Command::new(livesnapd_bin());
        cmd.args(args).arg("--qmp").arg(&qmp_path);
        cmd.envs(env.iter().copied());
        let proc = Spawned::spawn(&mut cmd);
        let mut d = Livesnapd {
            proc,
            dir,
            qmp_path,
            nbd_url: None,
            banner: Vec::new(),
        };
        d.read_banner();
        d
    }

    fn read_banner(&mut self) {
        self.banner = self.proc.banner(START_TIMEOUT);
        self.nbd_url = self
            .banner
            .iter()
            .find_map(|l| l.trim().strip_prefix("NBD:"))
            .map(|url| url.trim().to_string());
    }

    /// The NBD URI of the default export.
    pub fn url(&self) -> &str {
        self.nbd_url.as_deref().expect("started with an image")
    }

    /// A new QMP session.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.child.try_wait().unwrap().is_none()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Sends `signal` and waits (bounded) for the exit status.
    pub fn stop_with(mut self, signal: i32) -> ExitStatus {
        self.signal(signal);
        self.proc.wait_exit(Duration::from_secs(20))
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: i32) {
        self.proc.signal(signal);
    }

    /// Waits at most `timeout` for the process to exit (killing it and
    /// panicking after that); the temporary directory stays, so a test can
    /// still look at what the daemon left there.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.proc.wait_exit(timeout)
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("daemon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running qemu-storage-daemon with a QMP monitor, the reference peer.
pub struct Qsd {
    child: Child,
    /// Temporary directory holding its sockets.
    pub dir: tempfile::TempDir,
    /// The QMP socket.
    pub qmp_path: PathBuf,
}

impl Qsd {
    /// Starts qemu-storage-daemon with only a QMP monitor, as livesnapd's bare mode.
    pub fn bare() -> Qsd {
        Self::start(&[])
    }

    /// Starts qemu-storage-daemon with extra command-line arguments.
    pub fn start(extra: &[String]) -> Qsd {
        require_tool("qemu-storage-daemon");
        let dir = tempfile::tempdir().unwrap();
        let qmp_path = dir.path().join("qmp.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                qmp_path.display()
            ))
            .args(["--monitor", "chardev=m"])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        wait_until(START_TIMEOUT, "qemu-storage-daemon QMP socket", || {
            std::os::unix::net::UnixStream::connect(&qmp_path).is_ok()
        });
        Qsd {
            child,
            dir,
            qmp_path,
        }
    }

    /// A new QMP session.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path)
    }

    /// Its process id (for memory figures, and for a crash test's SIGKILL).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it has: qsd 10.0.2 crashes in some fault scripts,
    /// and a test that compares with it must tell that from a wrong answer.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// Peak resident memory of process `pid` in KiB (`VmHWM`).
pub fn hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

/// A memory figure (`VmRSS`, `VmHWM`, ...) of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic bytes for `len` bytes at offset `off` of a region
/// written with `seed`: any sub-range can be checked on its own, and a
/// failing comparison can be reproduced.
pub fn pattern_at(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (off + i).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ seed.wrapping_mul(0xff51_afd7_ed55_8ccd);
            (x >> 29) as u8 ^ (x >> 7) as u8
        })
        .collect()
}

/// [`pattern_at`] from offset 0.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    pattern_at(seed, 0, len)
}

/// Runs a command with a time limit and returns (status, stdout, stderr);
/// panics (after killing it) if it runs longer.
pub fn run_within(cmd: &mut Command, limit: Duration) -> (ExitStatus, String, String) {
    if let Some(prog) = cmd.get_program().to_str() {
        if !prog.contains('/') {
            require_tool(prog);
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    wait_within(child, limit).unwrap_or_else(|_| panic!("{cmd:?} did not finish within {limit:?}"))
}

/// Waits for a spawned child, reading its piped stdout and stderr (a pipe
/// taken already reads as empty): (status, stdout, stderr). After `limit`
/// the child is killed and reaped, and the error is the thread still
/// reading its stderr.
pub fn wait_within(
    mut child: Child,
    limit: Duration,
) -> Result<(ExitStatus, String, String), JoinHandle<String>> {
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
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok((status, out.join().unwrap(), err.join().unwrap()))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `livesnap --json` reports its
/// point-in-time window in (and Rust's `Instant` reads on Linux), so the
/// two can be compared.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This process's `Instant` for a CLOCK_MONOTONIC reading of another
/// process on this machine.
pub fn instant_of(ns: u64) -> Instant {
    let (i, m) = (Instant::now(), monotonic_ns());
    if ns >= m {
        i + Duration::from_nanos(ns - m)
    } else {
        i - Duration::from_nanos(m - ns)
    }
}

/// How long a `RawQmp` waits for any one read or write. It only decides when
/// a hung daemon is declared hung: the 65 MiB input in `bad_input` took over
/// 10 s to go through on this 2-core machine at load average 12-17.
pub const QMP_WAIT: Duration = Duration::from_secs(60);

/// A QMP connection used byte by byte, for bad input; every read and write
/// is bounded by `QMP_WAIT`.
pub struct RawQmp {
    r: BufReader<UnixStream>,
    /// The socket, for writing (and shutting down).
    pub w: UnixStream,
    next_id: u64,
}

impl RawQmp {
    /// Connects and reads the greeting (no negotiation).
    pub fn connect(path: &Path) -> RawQmp {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("QMP connect {}: {e}", path.display()));
        s.set_read_timeout(Some(QMP_WAIT)).unwrap();
        s.set_write_timeout(Some(QMP_WAIT)).unwrap();
        let mut m = RawQmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            next_id: 0,
        };
        let g = m.recv();
        assert!(g.get("QMP").is_some(), "not a greeting: {g}");
        m
    }

    /// Runs `qmp_capabilities`.
    pub fn negotiate(&mut self) {
        self.send(b"{\"execute\":\"qmp_capabilities\"}\n");
        assert_eq!(self.recv(), json!({"return": {}}));
    }

    /// Sends bytes as they are.
    pub fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }

    /// The next message that is not an event.
    pub fn recv(&mut self) -> Value {
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) => panic!("QMP connection closed"),
                Ok(_) => {}
                Err(e) => panic!("no QMP message within {QMP_WAIT:?}: {e}"),
            }
            assert!(line.ends_with("\r\n"), "QMP line without CRLF: {line:?}");
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("bad QMP output {line:?}: {e}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Runs a command with a fresh id; Ok(return) or Err((class, desc)).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, (String, String)> {
        self.next_id += 1;
        let id = format!("t{}", self.next_id);
        let mut req = json!({"execute": cmd, "id": id});
        if !args.is_null() {
            req["arguments"] = args;
        }
        self.send(format!("{req}\n").as_bytes());
        let r = self.recv();
        assert_eq!(r["id"], json!(id), "reply out of order: {r}");
        match r.get("return") {
            Some(v) => Ok(v.clone()),
            None => Err(class_desc(&r)),
        }
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd} failed: {e:?}"))
    }

    /// The monitor still answers, and nothing else is queued before the answer.
    pub fn alive(&mut self, case: &str) {
        self.next_id += 1;
        let id = format!("alive{}", self.next_id);
        self.send(format!("{{\"execute\":\"query-version\",\"id\":\"{id}\"}}\n").as_bytes());
        let r = self.recv();
        assert_eq!(r["id"], json!(id), "after {case}: unexpected reply {r}");
        assert_eq!(r["return"]["qemu"]["major"], 10, "after {case}: {r}");
    }
}

/// (class, desc) of an error reply.
pub fn class_desc(r: &Value) -> (String, String) {
    let e = r
        .get("error")
        .unwrap_or_else(|| panic!("not an error reply: {r}"));
    (
        e["class"].as_str().unwrap_or_default().to_string(),
        e["desc"].as_str().unwrap_or_default().to_string(),
    )
}

/// The QAPI name of a JSON value's type, for shape comparisons.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "double",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Where `a` (livesnapd's) and `b` (qsd's) differ in shape: object keys, JSON types, list lengths
/// (lists are compared element by element). `None` when they agree.
pub fn shape_diff(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let only_a: Vec<_> = x.keys().filter(|k| !y.contains_key(*k)).collect();
            let only_b: Vec<_> = y.keys().filter(|k| !x.contains_key(*k)).collect();
            if !only_a.is_empty() || !only_b.is_empty() {
                return Some(format!(
                    "{path}: keys only in livesnapd {only_a:?}, only in qsd {only_b:?}"
                ));
            }
            x.iter()
                .find_map(|(k, v)| shape_diff(v, &y[k], &format!("{path}.{k}")))
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Some(format!(
                    "{path}: {} elements in livesnapd, {} in qsd",
                    x.len(),
                    y.len()
                ));
            }
            x.iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (p, q))| shape_diff(p, q, &format!("{path}[{i}]")))
        }
        _ if json_type(a) != json_type(b) => Some(format!(
            "{path}: {} in livesnapd, {} in qsd",
            json_type(a),
            json_type(b)
        )),
        _ => None,
    }
}

/// QEMU's and livesnapd's names for unnamed nodes: `#block` and digits.
pub fn is_auto_name(s: &str) -> bool {
    s.strip_prefix("#block")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}
