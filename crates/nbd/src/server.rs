//! Listeners: accept clients on a Unix socket or TCP, enforce the connection
//! limit, and end connections on `stop` (at once) or `shutdown` (after their
//! in-flight requests).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::budget::Budget;
use crate::conn::{self, ConnControl};
use crate::export::ExportTable;
use crate::stats::ServerStats;
use crate::tls::ServerTls;

/// How long `shutdown` lets in-flight requests finish before closing anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long to wait for killed connections to unwind (they do so at their next poll).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Clients past the connection limit being told why at once; further ones
/// are just closed, so a flood cannot hold sockets through the refusals.
const MAX_REFUSALS: usize = 16;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP address; `port` "0" picks a free port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port number, as a string like QEMU's `InetSocketAddress`.
        port: String,
    },
}

/// State shared by the accept loops and connection tasks.
struct Shared {
    exports: Arc<ExportTable>,
    budget: Arc<Budget>,
    conns: Mutex<HashMap<u64, Arc<ConnControl>>>,
    live: watch::Sender<usize>,
    next_id: AtomicU64,
    max_connections: u32,
    stats: Arc<ServerStats>,
    refusals: Arc<AtomicUsize>,
    /// TLS every client must start before anything else, when configured.
    tls: Option<Arc<ServerTls>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnControl>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn all(&self) -> Vec<Arc<ConnControl>> {
        self.lock().values().cloned().collect()
    }

    async fn wait_idle(&self, limit: Duration) -> bool {
        let mut rx = self.live.subscribe();
        let idle = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0))
            .await
            .is_ok();
        idle
    }

    /// Starts serving one accepted client, unless the connection limit is reached.
    fn spawn<R, W>(self: &Arc<Self>, r: R, w: W)
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ctl = ConnControl::new(id);
        {
            let mut conns = self.lock();
            if self.max_connections != 0 && conns.len() >= self.max_connections as usize {
                tracing::debug!(
                    "NBD connection refused: limit of {} reached",
                    self.max_connections
                );
                self.stats.count_refused();
                // Not counted as a connection: the refusal is a greeting and
                // error replies, bounded in time and in number.
                if self.refusals.fetch_add(1, Ordering::SeqCst) < MAX_REFUSALS {
                    let (refusals, limit) = (self.refusals.clone(), self.max_connections);
                    tokio::spawn(async move {
                        conn::refuse(r, w, limit).await;
                        refusals.fetch_sub(1, Ordering::SeqCst);
                    });
                } else {
                    self.refusals.fetch_sub(1, Ordering::SeqCst);
                }
                return;
            }
            conns.insert(id, ctl.clone());
            self.stats.count_accepted();
            self.live.send_replace(conns.len());
        }
        // The guard lives inside the task's future, so it runs whether the
        // task ends, is aborted, or is dropped with the runtime.
        let guard = ConnGuard {
            shared: self.clone(),
            id,
        };
        let exports = self.exports.clone();
        let budget = self.budget.clone();
        let tls = self.tls.clone();
        tokio::spawn(async move {
            let _guard = guard;
            conn::run(r, w, exports, budget, ctl, tls).await;
        });
    }
}

struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut conns = self.shared.lock();
        conns.remove(&self.id);
        self.shared.live.send_replace(conns.len());
    }
}

/// A running NBD server (QEMU's `nbd-server-start`).
pub struct NbdServer {
    shared: Arc<Shared>,
    local_addr: String,
    accept: Vec<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl NbdServer {
    /// Binds `addr` and starts accepting clients; `max_connections` 0 means unlimited.
    pub async fn start(
        addr: &ListenAddr,
        max_connections: u32,
        exports: Arc<ExportTable>,
    ) -> io::Result<NbdServer> {
        NbdServer::start_with_tls(addr, max_connections, exports, None).await
    }

    /// As [`NbdServer::start`]; with `tls`, every client must negotiate TLS
    /// (`NBD_OPT_STARTTLS`) before anything else.
    pub async fn start_with_tls(
        addr: &ListenAddr,
        max_connections: u32,
        exports: Arc<ExportTable>,
        tls: Option<ServerTls>,
    ) -> io::Result<NbdServer> {
        let shared = Arc::new(Shared {
            exports,
            budget: Budget::new(),
            conns: Mutex::new(HashMap::new()),
            live: watch::Sender::new(0),
            next_id: AtomicU64::new(1),
            max_connections,
            stats: Arc::default(),
            refusals: Arc::new(AtomicUsize::new(0)),
            tls: tls.map(Arc::new),
        });
        match addr {
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path)?;
                let s = shared.clone();
                let accept = tokio::spawn(async move { accept_unix(l, s).await });
                Ok(NbdServer {
                    shared,
                    local_addr: format!("unix:{}", path.display()),
                    accept: vec![accept],
                    unix_path: Some(path.clone()),
                })
            }
            ListenAddr::Tcp { host, port } => {
                let listeners = bind_tcp(host, port).await?;
                let local = listeners[0].local_addr()?;
                let accept = listeners
                    .into_iter()
                    .map(|l| {
                        let s = shared.clone();
                        tokio::spawn(async move { accept_tcp(l, s).await })
                    })
                    .collect();
                Ok(NbdServer {
                    shared,
                    local_addr: local.to_string(),
                    accept,
                    unix_path: None,
                })
            }
        }
    }

    /// The bound address: "unix:/path" or "host:port" with the real port.
    pub fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    /// The export table this server serves.
    pub fn exports(&self) -> &Arc<ExportTable> {
        &self.shared.exports
    }

    /// Clients currently connected, attached to an export or still negotiating.
    pub fn connections(&self) -> usize {
        self.shared.lock().len()
    }

    /// How many connections the server took and refused.
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.shared.stats
    }

    fn stop_listening(&mut self) {
        for a in self.accept.drain(..) {
            a.abort();
        }
        if let Some(p) = self.unix_path.take() {
            let _ = std::fs::remove_file(p);
        }
    }

    /// `nbd-server-stop`: stops listening and closes every client connection now.
    pub async fn stop(mut self) {
        self.stop_listening();
        for c in self.shared.all() {
            c.kill();
        }
        if !self.shared.wait_idle(KILL_WAIT).await {
            tracing::warn!("NBD connections still unwinding after stop");
        }
    }

    /// Graceful end (SIGTERM): stop listening and reading requests, let
    /// in-flight requests finish and their replies go out, then close; bounded
    /// by [`SHUTDOWN_GRACE`].
    pub async fn shutdown(mut self) {
        self.stop_listening();
        for c in self.shared.all() {
            c.drain();
        }
        if self.shared.wait_idle(SHUTDOWN_GRACE).await {
            return;
        }
        tracing::warn!(
            "NBD clients did not finish within {:?}; closing them",
            SHUTDOWN_GRACE
        );
        for c in self.shared.all() {
            c.kill();
        }
        let _ = self.shared.wait_idle(KILL_WAIT).await;
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        // Dropped without stop/shutdown: do not leave listeners or clients behind.
        self.stop_listening();
        for c in self.shared.all() {
            c.kill();
        }
    }
}

/// Removes a leftover socket file from an earlier run; other file types are left alone
/// so a typo cannot delete a regular file (bind then fails with EADDRINUSE).
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("address '{host}' not found"),
        ));
    }
    Ok(addrs)
}

/// Binds every address `host` resolves to (as QEMU does), all on one port.
async fn bind_tcp(host: &str, port: &str) -> io::Result<Vec<TcpListener>> {
    let port: u16 = port.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid port '{port}'"),
        )
    })?;
    let addrs = resolve(host, port).await?;
    let first = TcpListener::bind(addrs[0]).await?;
    // A port of 0 was resolved by the first bind; the others share it.
    let port = first.local_addr()?.port();
    let mut out = vec![first];
    for a in addrs.into_iter().skip(1) {
        let a = SocketAddr::new(a.ip(), port);
        match TcpListener::bind(a).await {
            Ok(l) => out.push(l),
            Err(e) => tracing::debug!("NBD server: not listening on {a}: {e}"),
        }
    }
    Ok(out)
}

/// Accept errors such as EMFILE are transient; back off instead of spinning.
async fn accept_error(e: io::Error) {
    tracing::warn!("NBD accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn accept_tcp(l: TcpListener, shared: Arc<Shared>) {
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                // Replies are written whole; Nagle would only add latency.
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!("NBD: TCP_NODELAY on {peer} failed: {e}");
                }
                let (r, w) = s.into_split();
                shared.spawn(r, w);
            }
            Err(e) => accept_error(e).await,
        }
    }
}

async fn accept_unix(l: UnixListener, shared: Arc<Shared>) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let (r, w) = s.into_split();
                shared.spawn(r, w);
            }
            Err(e) => accept_error(e).await,
        }
    }
}
