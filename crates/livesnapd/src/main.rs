//! livesnapd: a storage daemon that serves block nodes over NBD and is managed
//! over a QMP socket speaking QEMU's schema.
//!
//! This crate only wires the layers together (graph, NBD, QMP, command line)
//! and implements the QMP commands; it must not implement image formats or
//! protocol framing itself.

mod cli;
mod commands;
mod daemon;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser};
use livesnap_qmp::{Args, Dispatcher, Greeting, QmpServer};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, Signal, SignalKind};

use cli::{Cli, DEMO_DIR, DEMO_SIZE};
use commands::Commands;
use daemon::Daemon;

/// Allocations below this come from malloc's heap instead of fresh mmaps.
///
/// NBD payloads up to 32 MiB are allocated per request; with glibc's default
/// threshold every 1 MiB write buffer is mapped, faulted in and unmapped again,
/// which halved sequential write throughput (docs/decisions.md).
const MMAP_THRESHOLD: libc::c_int = 64 << 20;

fn main() -> ExitCode {
    // SAFETY: mallopt only tunes glibc's allocator; called before any thread starts.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    let cli = Cli::parse();
    if let Err(msg) = cli.check() {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIVESNAP_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("livesnapd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livesnapd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a QMP command from the command line, so start-up takes the same path as a monitor.
async fn qmp(commands: &Commands, name: &str, args: Value) -> anyhow::Result<()> {
    let Value::Object(map) = args else {
        unreachable!("arguments are an object")
    };
    commands
        .call(name, Args::new(map))
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{name}: {}", e.desc))
}

/// Creates the sparse demo image unless it exists.
fn ensure_demo_image(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    std::fs::File::create(path)?.set_len(DEMO_SIZE)?;
    Ok(())
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    // Before anything is created: a SIGTERM from here on is a graceful stop
    // (exit 0, sockets removed), never the default action of dying at once.
    let signals = Signals::new();
    let demo = cli.is_demo();
    if demo {
        let dir = cli
            .demo_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEMO_DIR));
        let image = dir.join("disk.img");
        ensure_demo_image(&image)?;
        cli.image = Some(image);
        cli.qmp = Some(dir.join("qmp.sock"));
    }
    let daemon = Daemon::new();
    let commands = Commands::new(daemon.clone());

    let mut nbd_url = None;
    let mut nbd_server = None;
    if let Some(image) = &cli.image {
        let nbd = cli.nbd.clone().unwrap_or_else(|| "127.0.0.1:10809".into());
        let addr = commands::parse_listen_addr(&nbd).map_err(|e| anyhow::anyhow!("--nbd: {e}"))?;
        qmp(
            &commands,
            "blockdev-add",
            json!({
                "driver": cli.format(), "node-name": "disk", "read-only": cli.read_only,
                "file": {
                    "driver": "file", "node-name": "disk-file",
                    "filename": image.to_string_lossy(),
                    "cache": { "direct": cli.cache_direct },
                },
            }),
        )
        .await?;
        let local = commands::start_nbd_server(&daemon, &addr, cli.max_connections)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.desc))?;
        qmp(
            &commands,
            "block-export-add",
            json!({
                "type": "nbd", "id": "export0", "node-name": "disk",
                "name": cli.export_name(), "writable": !cli.read_only,
            }),
        )
        .await?;
        nbd_url = Some(nbd_uri(&local, cli.export_name()));
    } else if let Some(nbd) = &cli.nbd {
        // --qmp with --nbd: qemu-storage-daemon's --nbd-server; exports come over QMP.
        let addr = commands::parse_listen_addr(nbd).map_err(|e| anyhow::anyhow!("--nbd: {e}"))?;
        let local = commands::start_nbd_server(&daemon, &addr, cli.max_connections)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.desc))?;
        nbd_server = Some(local);
    }

    let qmp_server = match &cli.qmp {
        Some(path) => Some(
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
            .map_err(|e| anyhow::anyhow!("cannot create QMP socket {}: {e}", path.display()))?,
        ),
        None => None,
    };

    print_banner(&cli, nbd_url.as_deref(), nbd_server.as_deref());

    signals.wait(&daemon).await;
    if let Some(server) = qmp_server {
        server.close().await;
    }
    daemon.shutdown().await;
    Ok(())
}

/// The NBD URI of an export on a listener reported by the NBD server.
fn nbd_uri(local: &str, export: &str) -> String {
    match local.strip_prefix("unix:") {
        Some(path) => format!("nbd+unix:///{export}?socket={path}"),
        None => format!("nbd://{local}/{export}"),
    }
}

fn print_banner(cli: &Cli, nbd_url: Option<&str>, nbd_server: Option<&str>) {
    println!("livesnapd {} ready", env!("CARGO_PKG_VERSION"));
    if let (Some(image), Some(url)) = (&cli.image, nbd_url) {
        let mode = if cli.read_only {
            "read-only"
        } else {
            "writable"
        };
        println!("  image: {} ({}, {mode})", image.display(), cli.format());
        println!("  NBD:   {url}");
        println!("  try:   qemu-img info '{url}'");
        println!("         nbdinfo --map '{url}'");
    }
    if let Some(local) = nbd_server {
        println!("  NBD server: {local} (no exports yet: add them with block-export-add)");
    }
    if let Some(qmp) = &cli.qmp {
        println!("  QMP:   {}", qmp.display());
        println!(
            "  try:   echo '{{\"execute\":\"qmp_capabilities\"}}{{\"execute\":\"query-block-exports\"}}' | socat - UNIX-CONNECT:{}",
            qmp.display()
        );
    }
    println!("  stop:  Ctrl-C (finishes in-flight requests and flushes)");
}

/// SIGTERM and SIGINT, caught from the moment this is created.
struct Signals(Option<(Signal, Signal)>);

impl Signals {
    fn new() -> Signals {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Signals(Some((term, int))),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("cannot catch SIGTERM/SIGINT ({e}); only QMP quit stops gracefully");
                Signals(None)
            }
        }
    }

    /// Resolves on SIGTERM, SIGINT or QMP `quit`.
    async fn wait(self, daemon: &Arc<Daemon>) {
        let Some((mut term, mut int)) = self.0 else {
            daemon.quit_requested().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = daemon.quit_requested() => {}
        }
    }
}
