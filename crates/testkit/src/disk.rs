//! A disk served over NBD by either daemon, for tests that run the same
//! sequence against livesnapd and qemu-storage-daemon: node `disk` (format
//! over node `disk-file`) exported writable as `disk` on a unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{pattern, sparse_file, wait_until, Livesnapd, Qmp, Qsd, START_TIMEOUT};

/// How long the test's QMP commands may wait for their reply.
const QMP_REPLY_LIMIT: Duration = Duration::from_secs(60);

/// Which daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// qemu-storage-daemon, the reference.
    Qsd,
    /// livesnapd.
    Livesnapd,
}

/// The running daemon behind a [`DiskDaemon`]: held only to stop it when
/// dropped.
#[allow(dead_code)]
enum Process {
    Qsd(Qsd),
    Livesnapd(Livesnapd),
}

/// A daemon exporting node `disk` (format over node `disk-file`) writable
/// over NBD on a unix socket.
pub struct DiskDaemon {
    /// Which one.
    pub kind: Kind,
    /// Declared before `dir`, so the daemon stops before its files go.
    _process: Process,
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

impl DiskDaemon {
    /// Starts `kind` on `image` (of `format`), which must be in `dir`.
    pub fn start(kind: Kind, dir: tempfile::TempDir, image: &Path, format: &str) -> DiskDaemon {
        DiskDaemon::start_with(kind, dir, image, format, false)
    }

    /// [`DiskDaemon::start`], the image opened with O_DIRECT when
    /// `cache_direct` (QEMU's `cache.direct`, Nova's `cache=none`).
    pub fn start_with(
        kind: Kind,
        dir: tempfile::TempDir,
        image: &Path,
        format: &str,
        cache_direct: bool,
    ) -> DiskDaemon {
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
                        "driver=file,node-name=disk-file,filename={},cache.direct={}",
                        image.display(),
                        if cache_direct { "on" } else { "off" }
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
                let mut args = vec!["--format", format];
                if cache_direct {
                    args.push("--cache-direct");
                }
                let d = Livesnapd::with_image(image, &args);
                let (sock, url) = (d.qmp_path.clone(), d.url().to_string());
                // livesnapd serves any number of monitors on its one socket.
                (sock.clone(), sock, url, Process::Livesnapd(d))
            }
        };
        DiskDaemon {
            kind,
            _process: process,
            dir,
            cli_sock,
            test_sock,
            url,
            node: "disk".into(),
            image: image.to_path_buf(),
        }
    }

    /// A daemon on a fresh raw image of `size` bytes.
    pub fn raw(kind: Kind, size: u64) -> DiskDaemon {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        sparse_file(&image, size);
        DiskDaemon::start(kind, dir, &image, "raw")
    }

    /// A daemon on a raw image of `size` bytes of data: no zeroes for a job
    /// to skip, so every byte must be copied (at `speed`, if one is set).
    pub fn raw_with_data(kind: Kind, size: u64) -> DiskDaemon {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, pattern(0xda7a, size as usize)).unwrap();
        DiskDaemon::start(kind, dir, &image, "raw")
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
