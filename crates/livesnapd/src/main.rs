//! The `livesnapd` command: parses the command line, sets up logging and
//! signals, and runs the daemon of the `livesnapd` library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser};
use tokio::signal::unix::{signal, Signal, SignalKind};

use livesnap_jobs::mirror::CopyMode;
use livesnapd::cli::{Cli, DEMO_DIR, DEMO_SIZE};
use livesnapd::commands::{self, Commands};
use livesnapd::daemon::{Daemon, Settings};
use livesnapd::metrics::MetricsServer;
use livesnapd::notify::Notifier;
use livesnapd::{bind_qmp, cli_tls, export_image, nbd_uri, ImageExport};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(msg) = cli.check() {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit();
    }
    init_logging(&cli.log_format);
    // Read before any thread starts; a stop or failure is reported there too.
    let notifier = Notifier::from_env();
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
    match rt.block_on(run(cli, &notifier)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            notifier.status(&format!("start-up failed: {e}"));
            eprintln!("livesnapd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (the journal, under systemd) in `format`, at the level LIVESNAP_LOG sets.
fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIVESNAP_LOG")
        .unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        // Message and fields at the top level, next to level and target, so
        // a collector needs no knowledge of tracing's nesting.
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
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

async fn run(mut cli: Cli, notifier: &Notifier) -> anyhow::Result<()> {
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
    let daemon = Daemon::with_settings(Settings {
        mirror_copy_mode: CopyMode::parse(&cli.default_copy_mode).unwrap_or(CopyMode::Auto),
    });
    let commands = Commands::new(daemon.clone());

    let tls = match &cli.tls_creds {
        Some(dir) => Some(cli_tls(&daemon, &commands, dir, cli.tls_authz.as_deref()).await?),
        None => None,
    };
    let mut nbd_url = None;
    let mut nbd_server = None;
    if let Some(image) = &cli.image {
        let nbd = cli.nbd.clone().unwrap_or_else(|| "127.0.0.1:10809".into());
        let local = export_image(
            &daemon,
            &commands,
            image,
            cli.format(),
            &nbd,
            ImageExport {
                export_name: cli.export_name(),
                read_only: cli.read_only,
                cache_direct: cli.cache_direct,
                max_connections: cli.max_connections,
                tls,
            },
        )
        .await?;
        let url = nbd_uri(&local, cli.export_name(), cli.tls_creds.is_some());
        tracing::info!(url = %url, "NBD export listening");
        nbd_url = Some(url);
    } else if let Some(nbd) = &cli.nbd {
        // --qmp with --nbd: qemu-storage-daemon's --nbd-server; exports come over QMP.
        let addr = commands::parse_listen_addr(nbd).map_err(|e| anyhow::anyhow!("--nbd: {e}"))?;
        let local = commands::start_nbd_server(&daemon, &addr, cli.max_connections, tls)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.desc))?;
        tracing::info!(addr = %local, "NBD server listening");
        nbd_server = Some(local);
    }

    let qmp_server = match &cli.qmp {
        Some(path) => Some(bind_qmp(&daemon, &commands, path).await?),
        None => None,
    };

    let metrics = match &cli.metrics {
        Some(addr) => Some(MetricsServer::bind(addr, daemon.clone()).await?),
        None => None,
    };
    let metrics_addr = metrics.as_ref().map(MetricsServer::local_addr);

    print_banner(
        &cli,
        nbd_url.as_deref(),
        nbd_server.as_deref(),
        metrics_addr,
    );
    // Every listener asked for is bound, so a unit ordered after this one finds them.
    notifier.ready(&ready_status(
        &cli,
        nbd_url.as_deref(),
        nbd_server.as_deref(),
    ));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "livesnapd ready");

    signals.wait(&daemon).await;
    notifier.stopping("stopping: finishing in-flight requests and flushing");
    tracing::info!("stopping: finishing in-flight requests and flushing");
    drop(metrics);
    if let Some(server) = qmp_server {
        server.close().await;
    }
    daemon.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// The `STATUS=` a service manager shows once the daemon is ready.
fn ready_status(cli: &Cli, nbd_url: Option<&str>, nbd_server: Option<&str>) -> String {
    let mut parts = Vec::new();
    if let Some(qmp) = &cli.qmp {
        parts.push(format!("QMP {}", qmp.display()));
    }
    if let Some(nbd) = nbd_url.or(nbd_server) {
        parts.push(format!("NBD {nbd}"));
    }
    format!("serving: {}", parts.join(", "))
}

fn print_banner(
    cli: &Cli,
    nbd_url: Option<&str>,
    nbd_server: Option<&str>,
    metrics: Option<std::net::SocketAddr>,
) {
    println!("livesnapd {} ready", env!("CARGO_PKG_VERSION"));
    if let (Some(image), Some(url)) = (&cli.image, nbd_url) {
        let mode = if cli.read_only {
            "read-only"
        } else {
            "writable"
        };
        println!("  image: {} ({}, {mode})", image.display(), cli.format());
        println!("  NBD:   {url}");
        if cli.tls_creds.is_some() {
            // A client needs its own credentials directory (CA, and with
            // verify-peer its certificate and key).
            let sep = if url.contains('?') { '&' } else { '?' };
            println!("  try:   nbdinfo --map '{url}{sep}tls-certificates=CLIENT-DIR'");
        } else {
            println!("  try:   qemu-img info '{url}'");
            println!("         nbdinfo --map '{url}'");
        }
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
    if let Some(addr) = metrics {
        println!("  metrics: http://{addr}/metrics");
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
