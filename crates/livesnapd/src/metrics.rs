//! The Prometheus endpoint (`--metrics ADDR`): `GET /metrics` answers the
//! counters the engine keeps (NBD requests per export, connections, jobs) in
//! the text exposition format 0.0.4.
//!
//! The HTTP side is the smallest that Prometheus and curl need: one request
//! per connection, answered and closed, on the daemon's own runtime. A web
//! framework would bring a second server stack for one read-only page
//! (docs/decisions.md). Input is bounded (head size, time, concurrent
//! scrapes): whatever a client sends ends only its own connection.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use livesnap_jobs::{JobProgress, JobStatus};
use livesnap_nbd::stats::LATENCY_BOUNDS_NS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::daemon::Daemon;

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request head accepted; a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// A client must have sent its request and taken the answer within this.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

/// Scrapes served at once; more connections are closed unanswered, so a
/// flood of idle sockets holds neither memory nor tasks for long.
const MAX_SCRAPES: usize = 16;

/// A listening metrics endpoint; stops listening when dropped.
pub struct MetricsServer {
    local: SocketAddr,
    accept: JoinHandle<()>,
}

impl MetricsServer {
    /// Listens on `addr` (`HOST:PORT`; port 0 picks a free one).
    pub async fn bind(addr: &str, daemon: Arc<Daemon>) -> anyhow::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--metrics {addr}: {e}"))?;
        let local = listener.local_addr()?;
        let accept = tokio::spawn(accept_loop(listener, daemon));
        tracing::info!(addr = %local, "metrics endpoint listening");
        Ok(MetricsServer { local, accept })
    }

    /// The bound address, with the real port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, daemon: Arc<Daemon>) {
    let scrapes = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like pass; back off instead of spinning.
                tracing::warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = scrapes.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many scrapes at once; closing");
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(EXCHANGE_LIMIT, exchange(stream, &daemon)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "metrics request failed: {e}"),
                Err(_) => tracing::debug!(%peer, "metrics request timed out"),
            }
        });
    }
}

/// Reads one request head and answers it.
async fn exchange(mut stream: TcpStream, daemon: &Daemon) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                false,
            )
            .await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return respond(&mut stream, "400 Bad Request", "bad request line\n", false).await;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return respond(&mut stream, "400 Bad Request", "bad request line\n", false).await;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return respond(
                &mut stream,
                "405 Method Not Allowed",
                "only GET and HEAD\n",
                false,
            )
            .await
        }
    };
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return respond(&mut stream, "404 Not Found", "see /metrics\n", head_only).await;
    }
    let body = render(daemon).await;
    respond(&mut stream, "200 OK", &body, head_only).await
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let content_type = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// One metric family being written: its `# HELP` and `# TYPE` come first,
/// then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    /// One sample; `suffix` is `_bucket`, `_sum` or `_count` for histograms.
    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The whole page: every export, the NBD server's connections and every job.
pub async fn render(daemon: &Daemon) -> String {
    let mut out = String::with_capacity(16 * 1024);
    render_exports(daemon, &mut out);
    render_server(daemon, &mut out).await;
    render_jobs(daemon, &mut out);
    out
}

fn render_exports(daemon: &Daemon, out: &mut String) {
    let exports = daemon.exports.lock().unwrap().clone();
    let stats: Vec<_> = exports
        .iter()
        .map(|e| {
            (
                e.id.as_str(),
                e.nbd.config().name.as_str(),
                e.nbd.stats().commands(),
            )
        })
        .collect();
    let mut f = Family::new(
        out,
        "livesnap_nbd_requests_total",
        "counter",
        "NBD requests received, by export and command.",
    );
    for (id, name, cmds) in &stats {
        for c in cmds {
            let labels = [("export", *id), ("name", *name), ("command", c.command)];
            f.sample("", &labels, c.requests);
        }
    }
    let mut f = Family::new(
        out,
        "livesnap_nbd_request_bytes_total",
        "counter",
        "Bytes NBD requests covered (payload of read and write, range of trim, \
         write_zeroes and block_status), by export and command.",
    );
    for (id, name, cmds) in &stats {
        for c in cmds {
            let labels = [("export", *id), ("name", *name), ("command", c.command)];
            f.sample("", &labels, c.bytes);
        }
    }
    let mut f = Family::new(
        out,
        "livesnap_nbd_request_duration_seconds",
        "histogram",
        "Time from an NBD request's header to its reply being queued, by export and command.",
    );
    for (id, name, cmds) in &stats {
        for c in cmds {
            let bounds = LATENCY_BOUNDS_NS.iter().map(|&b| seconds(b).to_string());
            for (le, n) in bounds
                .chain(std::iter::once("+Inf".to_string()))
                .zip(&c.latency_buckets)
            {
                let labels = [
                    ("export", *id),
                    ("name", *name),
                    ("command", c.command),
                    ("le", le.as_str()),
                ];
                f.sample("_bucket", &labels, n);
            }
            let labels = [("export", *id), ("name", *name), ("command", c.command)];
            f.sample("_sum", &labels, seconds(c.latency_sum_ns));
            f.sample("_count", &labels, c.finished());
        }
    }
    let mut f = Family::new(
        out,
        "livesnap_nbd_export_connections",
        "gauge",
        "NBD clients attached to the export now.",
    );
    for e in &exports {
        let labels = [
            ("export", e.id.as_str()),
            ("name", e.nbd.config().name.as_str()),
        ];
        f.sample("", &labels, e.nbd.connections());
    }
}

async fn render_server(daemon: &Daemon, out: &mut String) {
    let server = daemon.nbd_server.lock().await;
    let (live, accepted, refused) = match &*server {
        Some(s) => (s.connections(), s.stats().accepted(), s.stats().refused()),
        None => (0, 0, 0),
    };
    drop(server);
    Family::new(
        out,
        "livesnap_nbd_connections",
        "gauge",
        "NBD client connections open now, negotiating or attached.",
    )
    .sample("", &[], live);
    Family::new(
        out,
        "livesnap_nbd_connections_accepted_total",
        "counter",
        "NBD client connections accepted since the NBD server started.",
    )
    .sample("", &[], accepted);
    Family::new(
        out,
        "livesnap_nbd_connections_refused_total",
        "counter",
        "NBD client connections closed at once because max-connections was reached.",
    )
    .sample("", &[], refused);
}

/// How one job gauge is read from a job's progress.
type JobValue = fn(&JobProgress) -> f64;

fn render_jobs(daemon: &Daemon, out: &mut String) {
    let jobs: Vec<_> = daemon
        .jobs
        .jobs()
        .into_iter()
        .map(|j| (j.id().to_string(), j.job_type().as_str(), j.progress()))
        .collect();
    let families: [(&'static str, &str, JobValue); 4] = [
        (
            "livesnap_job_offset_bytes",
            "Bytes the job has done (offset of query-block-jobs).",
            |p| p.offset as f64,
        ),
        (
            "livesnap_job_len_bytes",
            "Bytes the job has to do in all (len of query-block-jobs).",
            |p| p.len as f64,
        ),
        (
            "livesnap_job_speed_limit_bytes_per_second",
            "The job's speed limit, 0 for none (speed of query-block-jobs).",
            |p| p.speed as f64,
        ),
        (
            "livesnap_job_rate_bytes_per_second",
            "Bytes done per second since the job started, pauses included.",
            |p| {
                let secs = p.running_for.as_secs_f64();
                if secs > 0.0 {
                    p.offset as f64 / secs
                } else {
                    0.0
                }
            },
        ),
    ];
    for (name, help, value) in families {
        let mut f = Family::new(out, name, "gauge", help);
        for (id, typ, p) in &jobs {
            f.sample("", &[("id", id), ("type", typ)], value(p));
        }
    }
    let mut f = Family::new(
        out,
        "livesnap_job_state",
        "gauge",
        "1 for the job's current state (status of query-jobs), 0 for the others.",
    );
    for (id, typ, p) in &jobs {
        for s in JobStatus::ALL {
            let on = u8::from(p.status == s);
            f.sample("", &[("id", id), ("type", typ), ("state", s.as_str())], on);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), r"x\ny");
    }

    #[test]
    fn a_family_writes_help_type_and_samples() {
        let mut out = String::new();
        let mut f = Family::new(&mut out, "m_total", "counter", "Things.");
        f.sample("", &[("a", "1"), ("b", "q\"")], 7);
        f.sample("_sum", &[], 0.5);
        assert_eq!(
            out,
            "# HELP m_total Things.\n# TYPE m_total counter\nm_total{a=\"1\",b=\"q\\\"\"} 7\nm_total_sum 0.5\n"
        );
    }
}
