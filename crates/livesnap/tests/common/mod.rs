//! Test support for the `livesnap` CLI: daemons to run it against
//! (qemu-storage-daemon and livesnapd, each exporting node `disk` over NBD)
//! and running the CLI, on top of the interop tests' harness
//! (`tests/harness`: tools, the blocking QMP client, the daemons and the
//! point-in-time checker).
//!
//! A missing peer tool fails the test with the package to install: these
//! tests must never pass by skipping.

#![allow(dead_code)]

#[path = "../../../../tests/harness/mod.rs"]
pub mod harness;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

// Each test binary uses a different subset of these.
#[allow(unused_imports)]
pub use harness::{instant_of, monotonic_ns, pit, run, Qmp};
use harness::{wait_until, wait_within, Livesnapd, Qsd, START_TIMEOUT};

/// How long the test's QMP commands may wait for their reply.
const QMP_REPLY_LIMIT: Duration = Duration::from_secs(60);

/// The CLI under test.
pub fn livesnap_bin() -> &'static str {
    env!("CARGO_BIN_EXE_livesnap")
}

/// Which daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// qemu-storage-daemon, the reference.
    Qsd,
    /// livesnapd.
    Livesnapd,
}

/// The running daemon behind a [`Daemon`] (stopped when dropped).
enum Process {
    Qsd(Qsd),
    Livesnapd(Livesnapd),
}

/// A daemon exporting node `disk` (format over node `disk-file`) writable
/// over NBD on a unix socket.
pub struct Daemon {
    /// Which one.
    pub kind: Kind,
    /// Declared before `dir`, so the daemon stops before its files go.
    process: Process,
    /// The image's directory (tests put images and targets here too).
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
}

impl Daemon {
    /// Starts `kind` on `image` (of `format`), which must be in `dir`.
    pub fn start(kind: Kind, dir: tempfile::TempDir, image: &Path, format: &str) -> Daemon {
        let (cli_sock, test_sock, url, process) = match kind {
            Kind::Qsd => {
                let test_sock = dir.path().join("test.sock");
                let nbd_sock = dir.path().join("nbd.sock");
                let qsd = Qsd::start(&[
                    "--chardev".into(),
                    format!(
                        "socket,path={},server=on,wait=off,id=m1",
                        test_sock.display()
                    ),
                    "--monitor".into(),
                    "chardev=m1".into(),
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=disk-file,filename={}",
                        image.display()
                    ),
                    "--blockdev".into(),
                    format!("driver={format},node-name=disk,file=disk-file"),
                    "--nbd-server".into(),
                    format!("addr.type=unix,addr.path={}", nbd_sock.display()),
                    "--export".into(),
                    "type=nbd,id=e0,node-name=disk,name=disk,writable=on".into(),
                ]);
                wait_until(START_TIMEOUT, "qemu-storage-daemon's NBD socket", || {
                    std::os::unix::net::UnixStream::connect(&test_sock).is_ok() && nbd_sock.exists()
                });
                let url = format!("nbd+unix:///disk?socket={}", nbd_sock.display());
                (qsd.qmp_path.clone(), test_sock, url, Process::Qsd(qsd))
            }
            Kind::Livesnapd => {
                let d = Livesnapd::with_image(image, &["--format", format]);
                let (sock, url) = (d.qmp_path.clone(), d.url().to_string());
                // livesnapd serves any number of monitors on its one socket.
                (sock.clone(), sock, url, Process::Livesnapd(d))
            }
        };
        Daemon {
            kind,
            process,
            dir,
            cli_sock,
            test_sock,
            url,
            node: "disk".into(),
            image: image.to_path_buf(),
        }
    }

    /// A daemon on a fresh raw image of `size` bytes.
    pub fn raw(kind: Kind, size: u64) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        harness::sparse_file(&image, size);
        Daemon::start(kind, dir, &image, "raw")
    }

    /// A session on the test's monitor.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.test_sock).with_reply_limit(QMP_REPLY_LIMIT)
    }

    /// A path in the daemon's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
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
pub fn wait_out(child: Child, limit: Duration) -> Out {
    let (status, stdout, stderr) = wait_within(child, limit).unwrap_or_else(|err| {
        panic!(
            "livesnap did not finish within {limit:?}; stderr: {}",
            err.join().unwrap()
        )
    });
    let o = Out {
        status,
        stdout,
        stderr,
    };
    eprintln!("[livesnap stderr]\n{}", o.stderr);
    o
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
