//! livesnapd: a storage daemon that serves block nodes over NBD and is managed
//! over a QMP socket speaking QEMU's schema. The library is the daemon; the
//! `livesnapd` binary and `livesnap demo` (which embeds a daemon) run it.
//!
//! This crate only wires the layers together (graph, jobs, NBD, QMP, command
//! line) and implements the QMP commands; it must not implement image
//! formats, block jobs or protocol framing itself.

pub mod cli;
pub mod commands;
pub mod daemon;
pub mod metrics;
pub mod notify;

use std::path::Path;
use std::sync::Arc;

use livesnap_qmp::{Args, Dispatcher, Greeting, QmpServer};
use serde_json::{json, Value};

use commands::Commands;
use daemon::Daemon;

/// Runs a QMP command in-process, so start-up takes the same path as a monitor.
pub async fn qmp(commands: &Commands, name: &str, args: Value) -> anyhow::Result<Value> {
    let Value::Object(map) = args else {
        anyhow::bail!("{name}: arguments must be an object");
    };
    commands
        .call(name, Args::new(map))
        .await
        .map_err(|e| anyhow::anyhow!("{name}: {}", e.desc))
}

/// How [`export_image`] exports its image.
pub struct ImageExport<'a> {
    /// NBD export name.
    pub export_name: &'a str,
    /// Export (and open) read-only.
    pub read_only: bool,
    /// Open the image with O_DIRECT.
    pub cache_direct: bool,
    /// Most NBD clients at once (0 = no limit).
    pub max_connections: u32,
    /// TLS that every NBD client must use, if any.
    pub tls: Option<livesnap_nbd::ServerTls>,
}

/// Opens `image` as node `disk` (over `disk-file`), starts the NBD server on
/// `nbd` (`unix:PATH` or `HOST:PORT`) and exports the node as export
/// `export0`; returns the listener's address as the NBD server reports it.
pub async fn export_image(
    daemon: &Arc<Daemon>,
    commands: &Commands,
    image: &Path,
    format: &str,
    nbd: &str,
    how: ImageExport<'_>,
) -> anyhow::Result<String> {
    let addr = commands::parse_listen_addr(nbd).map_err(|e| anyhow::anyhow!("--nbd: {e}"))?;
    qmp(
        commands,
        "blockdev-add",
        json!({
            "driver": format, "node-name": "disk", "read-only": how.read_only,
            "file": {
                "driver": "file", "node-name": "disk-file",
                "filename": image.to_string_lossy(),
                "cache": { "direct": how.cache_direct },
            },
        }),
    )
    .await?;
    let local = commands::start_nbd_server(daemon, &addr, how.max_connections, how.tls)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.desc))?;
    qmp(
        commands,
        "block-export-add",
        json!({
            "type": "nbd", "id": "export0", "node-name": "disk",
            "name": how.export_name, "writable": !how.read_only,
        }),
    )
    .await?;
    Ok(local)
}

/// Opens the QMP monitor socket at `path`.
pub async fn bind_qmp(
    daemon: &Arc<Daemon>,
    commands: &Arc<Commands>,
    path: &Path,
) -> anyhow::Result<QmpServer> {
    QmpServer::bind(
        path,
        Greeting {
            qemu: commands::QEMU_COMPAT_VERSION,
            package: commands::package(),
        },
        commands.clone() as Arc<dyn Dispatcher>,
        daemon.events.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot create QMP socket {}: {e}", path.display()))
}

/// The NBD URI of an export on a listener reported by the NBD server.
pub fn nbd_uri(local: &str, export: &str, tls: bool) -> String {
    // `nbds` is libnbd's (and QEMU's) scheme for NBD over TLS.
    let scheme = if tls { "nbds" } else { "nbd" };
    match local.strip_prefix("unix:") {
        Some(path) => format!("{scheme}+unix:///{export}?socket={path}"),
        None => format!("{scheme}://{local}/{export}"),
    }
}

/// Creates the TLS objects the command line asks for (`--tls-creds DIR` as
/// object `tls0`, `--tls-authz DN` as object `authz0`, as if by `object-add`)
/// and returns the NBD server's TLS set-up.
pub async fn cli_tls(
    daemon: &Arc<Daemon>,
    commands: &Commands,
    creds_dir: &Path,
    authz: Option<&str>,
) -> anyhow::Result<livesnap_nbd::ServerTls> {
    qmp(
        commands,
        "object-add",
        json!({
            "qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
            "dir": creds_dir.to_string_lossy(),
        }),
    )
    .await?;
    if let Some(dn) = authz {
        qmp(
            commands,
            "object-add",
            json!({ "qom-type": "authz-simple", "id": "authz0", "identity": dn }),
        )
        .await?;
    }
    commands::server_tls(daemon, "tls0", authz.map(|_| "authz0"))
        .map_err(|e| anyhow::anyhow!("--tls-creds: {}", e.desc))
}

/// A daemon running inside another program: one image exported over NBD on
/// a unix socket and a QMP socket, as `livesnapd --image IMG --nbd unix:SOCK
/// --qmp QMP` would run it.
pub struct Embedded {
    /// The daemon.
    pub daemon: Arc<Daemon>,
    /// NBD URI of the export `disk`.
    pub nbd_url: String,
    qmp_server: QmpServer,
}

impl Embedded {
    /// Starts the daemon on the current tokio runtime.
    pub async fn start(
        image: &Path,
        format: &str,
        nbd_socket: &Path,
        qmp_path: &Path,
    ) -> anyhow::Result<Embedded> {
        let daemon = Daemon::new();
        let commands = Commands::new(daemon.clone());
        let nbd = format!("unix:{}", nbd_socket.display());
        let local = export_image(
            &daemon,
            &commands,
            image,
            format,
            &nbd,
            ImageExport {
                export_name: "disk",
                read_only: false,
                cache_direct: false,
                max_connections: 0,
                tls: None,
            },
        )
        .await?;
        let qmp_server = bind_qmp(&daemon, &commands, qmp_path).await?;
        Ok(Embedded {
            daemon,
            nbd_url: nbd_uri(&local, "disk", false),
            qmp_server,
        })
    }

    /// Stops it as a SIGTERM would: jobs cancelled, requests finished, nodes flushed.
    pub async fn stop(self) {
        self.qmp_server.close().await;
        self.daemon.shutdown().await;
    }
}
