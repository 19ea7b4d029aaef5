//! The command line: QEMU-style bare monitor mode, a one-image mode for people,
//! and the demo default.

use std::path::PathBuf;

use clap::Parser;

/// Where the demo keeps its image and sockets.
pub const DEMO_DIR: &str = "/tmp/livesnap-demo";

/// Size of the sparse demo image.
pub const DEMO_SIZE: u64 = 1 << 30;

/// livesnapd serves disk images over NBD and is managed over QMP, QEMU's
/// monitor protocol, like qemu-storage-daemon.
#[derive(Parser, Debug)]
#[command(
    name = "livesnapd",
    version,
    after_help = "\
MODES:
  livesnapd
      Demo: creates a sparse 1 GiB raw image in /tmp/livesnap-demo (unless it exists),
      exports it writable as 'disk' on 127.0.0.1:10809 and opens a QMP socket there.
  livesnapd --qmp /run/livesnapd.sock [--nbd ADDR]
      Only a QMP monitor; configure everything over QMP (blockdev-add,
      nbd-server-start, block-export-add), as with
      qemu-storage-daemon --chardev socket,path=PATH,server=on,wait=off,id=m --monitor chardev=m
      (--nbd starts the NBD server right away, like qemu-storage-daemon's --nbd-server).
  livesnapd --image disk.img [--format raw|qcow2] [--nbd ADDR] [--qmp PATH]
      Export one image (node 'disk' over node 'disk-file', export id 'export0').
      A qcow2 image's backing chain is opened from its header, with the
      header's backing format (never probed).

EXAMPLES:
  livesnapd --image vm.img --nbd unix:/tmp/nbd.sock --qmp /tmp/qmp.sock
  qemu-img info 'nbd+unix:///disk?socket=/tmp/nbd.sock'
  nbdinfo --map 'nbd+unix:///disk?socket=/tmp/nbd.sock'
  livesnapd --image vm.img --nbd 127.0.0.1:10809 --tls-creds /etc/pki/livesnapd
  nbdinfo 'nbds://localhost/disk?tls-certificates=/etc/pki/client'

SIGINT or SIGTERM: stop accepting clients, finish in-flight requests, flush, exit 0.

Under systemd (Type=notify, contrib/livesnapd.service): READY=1 once every
listener given on the command line listens, STOPPING=1 when a stop begins."
)]
pub struct Cli {
    /// QMP monitor socket to create (unix socket, mode 0600).
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,

    /// Image to export over NBD.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,

    /// Format of --image; never guessed from the contents (probing is a known security hole).
    #[arg(long, value_name = "FORMAT", value_parser = ["raw", "qcow2"])]
    pub format: Option<String>,

    /// NBD listen address: unix:PATH or HOST:PORT [default: 127.0.0.1:10809 with --image].
    /// With --qmp alone, starts the NBD server with no exports (as nbd-server-start).
    #[arg(long, value_name = "ADDR")]
    pub nbd: Option<String>,

    /// NBD export name of --image [default: disk].
    #[arg(long, value_name = "NAME")]
    pub export_name: Option<String>,

    /// Export --image read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Open --image with O_DIRECT (QEMU's cache.direct=on, Nova's cache=none).
    #[arg(long)]
    pub cache_direct: bool,

    /// Serve NBD over TLS only, with the X.509 files in DIR (ca-cert.pem,
    /// server-cert.pem, server-key.pem, as QEMU's tls-creds-x509): clients
    /// must present a certificate signed by ca-cert.pem (object id tls0).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,

    /// With --tls-creds: only the client whose certificate's distinguished
    /// name is DN may connect, written in the certificate's order as QEMU
    /// compares it ("C=GB,O=Example,CN=client") (QEMU's authz-simple, object id authz0).
    #[arg(long, value_name = "DN", requires = "tls_creds")]
    pub tls_authz: Option<String>,

    /// Most NBD clients at once (0 = no limit).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_connections: u32,

    /// Copy mode of a blockdev-mirror that names none. `auto` (livesnapd's
    /// default) converges under any guest load, so a caller that polls for
    /// READY and then cancels always ends; `background` is QEMU's default.
    #[arg(long, value_name = "MODE", default_value = "auto",
          value_parser = ["auto", "background", "write-blocking"])]
    pub default_copy_mode: String,

    /// Log line format on stderr: `text` for people, `json` (one object per
    /// line: timestamp, level, target, message and fields) for a log collector.
    /// The level comes from LIVESNAP_LOG (default: warn).
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Serve Prometheus metrics on HOST:PORT (plain HTTP, GET /metrics):
    /// NBD requests, bytes and latency per export, connections, job progress.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Demo only: keep the demo image and QMP socket in DIR instead of
    /// /tmp/livesnap-demo (tests use it, with `--nbd 127.0.0.1:0`, so they
    /// never touch a developer's running demo).
    #[arg(long, value_name = "DIR", hide = true, conflicts_with_all = ["image", "qmp"])]
    pub demo_dir: Option<PathBuf>,
}

impl Cli {
    /// True when neither --image nor --qmp is given: the demo.
    pub fn is_demo(&self) -> bool {
        self.image.is_none() && self.qmp.is_none()
    }

    /// Flags that only make sense with an image, given without one (outside
    /// the demo, which has its own image): they would be ignored silently.
    pub fn check(&self) -> Result<(), String> {
        if self.tls_creds.is_some() && self.image.is_none() && self.nbd.is_none() {
            // Nothing would use the credentials: an NBD server started
            // later over QMP names its own `tls-creds`.
            return Err(
                "--tls-creds applies to the NBD server of --image or --nbd; \
                        with --qmp alone, use object-add and nbd-server-start's tls-creds"
                    .into(),
            );
        }
        if self.is_demo() || self.image.is_some() {
            return Ok(());
        }
        let image_only = [
            (self.read_only, "--read-only"),
            (self.cache_direct, "--cache-direct"),
            (self.export_name.is_some(), "--export-name"),
            (self.format.is_some(), "--format"),
        ];
        match image_only.iter().find(|(set, _)| *set) {
            Some((_, flag)) => Err(format!(
                "{flag} applies to --image; without --image, set the export up over QMP \
                 (blockdev-add, block-export-add)"
            )),
            None => Ok(()),
        }
    }

    /// The format of --image.
    pub fn format(&self) -> &str {
        self.format.as_deref().unwrap_or("raw")
    }

    /// The NBD export name of --image.
    pub fn export_name(&self) -> &str {
        self.export_name.as_deref().unwrap_or("disk")
    }
}
