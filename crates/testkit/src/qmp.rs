//! The QMP server's fixtures: a tiny dispatcher and raw-socket exchanges.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use livesnap_qmp::{Args, Dispatcher, EventBus, Greeting, QmpError, QmpServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Commands: query-version, query-commands, echo, add, nothing, slow,
/// emit, panic. Everything else is CommandNotFound.
pub struct TestDispatcher {
    /// What `query-version` answers from.
    pub greeting: Greeting,
    /// Where `emit` sends.
    pub events: EventBus,
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "echo",
    "add",
    "nothing",
    "slow",
    "emit",
    "panic",
];

impl Dispatcher for TestDispatcher {
    fn call<'a>(
        &'a self,
        command: &'a str,
        args: Args,
    ) -> Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send + 'a>> {
        Box::pin(async move {
            let mut args = args;
            match command {
                "query-version" => {
                    args.finish()?;
                    Ok(self.greeting.version_info())
                }
                "query-commands" => {
                    args.finish()?;
                    Ok(Value::Array(
                        COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
                    ))
                }
                "echo" => Ok(args.take_value("value").unwrap_or(Value::Null)),
                "add" => {
                    let a = args.req_i64("a")?;
                    let b = args.opt_i64("b")?.unwrap_or(0);
                    args.finish()?;
                    Ok(json!(a + b))
                }
                "nothing" => {
                    args.finish()?;
                    Ok(Value::Null)
                }
                "slow" => {
                    let ms = args.opt_u64("ms")?.unwrap_or(300);
                    args.finish()?;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(json!({"slept": ms}))
                }
                "emit" => {
                    let name = args.req_str("name")?;
                    let count = args.opt_u32("count")?.unwrap_or(1);
                    args.finish()?;
                    for i in 0..count {
                        self.events.emit(&name, Some(json!({ "n": i })));
                    }
                    Ok(Value::Null)
                }
                "panic" => panic!("test panic"),
                _ => Err(QmpError::command_not_found(command)),
            }
        })
    }

    fn commands(&self) -> Vec<String> {
        COMMANDS.iter().map(|c| c.to_string()).collect()
    }
}

/// A QMP server with a [`TestDispatcher`] on `path`.
pub async fn start_server(path: &Path, greeting: Greeting) -> (QmpServer, EventBus) {
    let events = EventBus::new();
    let d = Arc::new(TestDispatcher {
        greeting: greeting.clone(),
        events: events.clone(),
    });
    let server = QmpServer::bind(path, greeting, d, events.clone())
        .await
        .expect("bind");
    (server, events)
}

/// The greeting of the test servers.
pub fn test_greeting() -> Greeting {
    Greeting::new((10, 0, 2), "livesnap-test")
}

/// A socket path in `dir`.
pub fn sock_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Connects, sends `input`, half-closes, and returns everything the server
/// wrote until it closed (greeting included), split into CRLF lines.
pub async fn exchange_to_eof(path: &Path, input: &[u8]) -> Vec<String> {
    exchange_until_then_eof(path, input, None).await
}

/// Like [`exchange_to_eof`], but half-closes only after a line containing
/// `marker` arrived: with OOB on, requests still queued at EOF are dropped
/// (qsd too), so tests of queued requests wait for their replies first.
pub async fn exchange_until_then_eof(
    path: &Path,
    input: &[u8],
    marker: Option<&str>,
) -> Vec<String> {
    let mut s = UnixStream::connect(path).await.expect("connect");
    s.write_all(input).await.expect("write");
    let mut out = Vec::new();
    if let Some(marker) = marker {
        let mut chunk = [0u8; 65536];
        while !String::from_utf8_lossy(&out).contains(marker) {
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
                .await
                .expect("marker never came")
                .expect("read");
            assert!(n > 0, "closed before {marker}");
            out.extend_from_slice(&chunk[..n]);
        }
    }
    s.shutdown().await.expect("shutdown");
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("server did not close the connection")
        .expect("read");
    let text = String::from_utf8(out).expect("utf-8 output");
    assert!(
        text.is_empty() || text.ends_with("\r\n"),
        "no CRLF: {text:?}"
    );
    text.split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A raw monitor connection, for tests that interleave reads and writes.
pub struct Raw {
    /// The socket.
    pub s: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects to `path`.
    pub async fn connect(path: &Path) -> Raw {
        Raw {
            s: UnixStream::connect(path).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    /// Sends `text` as it is.
    pub async fn send(&mut self, text: &str) {
        self.s.write_all(text.as_bytes()).await.expect("write");
    }

    /// The next CRLF-terminated line, or None after `timeout`.
    pub async fn line(&mut self, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Some(String::from_utf8(line[..pos].to_vec()).expect("utf-8"));
            }
            let mut chunk = [0u8; 65536];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next line as JSON (5 s at most).
    pub async fn json(&mut self) -> Value {
        let l = self
            .line(Duration::from_secs(5))
            .await
            .expect("expected a message");
        serde_json::from_str(&l).expect("valid JSON from server")
    }
}
