//! An async QMP client over a unix socket, for the livesnap CLI and tests.
//! It speaks to livesnapd, qemu-storage-daemon and qemu-system-* alike.
//!
//! Requests carry a numeric `id` and replies are matched by it, so a reply
//! that arrives after its caller gave up (a timeout dropped the future) is
//! recognised and discarded. Events that arrive while waiting for a reply
//! are queued for [`QmpClient::next_event`]. Nothing here has a timeout of
//! its own: callers bound every call with `tokio::time::timeout`.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::error::QmpError;
use crate::stream::JsonStream;

/// Events kept for the caller at most; older ones are dropped (with a log).
const EVENT_QUEUE_MAX: usize = 65536;

/// A connected QMP client.
pub struct QmpClient {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    stream: JsonStream,
    buf: Vec<u8>,
    replies: VecDeque<Value>,
    events: VecDeque<Value>,
    greeting: Value,
    next_id: u64,
    // Set while a request is being written; still set at the next call
    // means a write was cancelled halfway and the stream is unusable.
    writing: bool,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("greeting", &self.greeting)
            .field("queued_events", &self.events.len())
            .finish()
    }
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<QmpClient> {
        let mut c = QmpClient::connect_unnegotiated(path).await?;
        match c.execute("qmp_capabilities", None).await? {
            Ok(_) => Ok(c),
            Err(e) => Err(other(format!("qmp_capabilities failed: {e}"))),
        }
    }

    /// Connects and reads the greeting, without `qmp_capabilities`.
    pub async fn connect_unnegotiated(path: impl AsRef<Path>) -> io::Result<QmpClient> {
        let sock = UnixStream::connect(path).await?;
        let (rd, wr) = sock.into_split();
        let mut c = QmpClient {
            rd,
            wr,
            stream: JsonStream::new(),
            buf: vec![0; 64 * 1024],
            replies: VecDeque::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 1,
            writing: false,
        };
        let g = c.recv_reply().await?;
        if g.get("QMP").is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a QMP greeting: {g}"),
            ));
        }
        c.greeting = g;
        Ok(c)
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs a command: `Ok(Ok(return))`, `Ok(Err(QMP error))`, or an I/O
    /// error when the connection fails. Events arriving meanwhile are queued.
    pub async fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> io::Result<Result<Value, QmpError>> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Map::new();
        req.insert("execute".into(), command.into());
        if let Some(a) = args {
            req.insert("arguments".into(), a);
        }
        req.insert("id".into(), id.into());
        let mut text = Value::Object(req).to_string();
        text.push('\n');
        self.send_raw(text.as_bytes()).await?;
        loop {
            let mut reply = self.recv_reply().await?;
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                tracing::debug!(%reply, "discarding QMP reply to an earlier request");
                continue;
            }
            if let Some(r) = reply.get_mut("return") {
                return Ok(Ok(r.take()));
            }
            return match reply.get("error").and_then(QmpError::from_json) {
                Some(e) => Ok(Err(e)),
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed QMP reply: {reply}"),
                )),
            };
        }
    }

    /// The next event (queued or new), or `None` after `timeout` or when the
    /// connection is gone.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.read_more()).await {
                Ok(Ok(())) => {
                    if let Some(e) = self.events.pop_front() {
                        return Some(e);
                    }
                }
                _ => return None,
            }
        }
    }

    /// The next event (queued or new): `Ok(None)` after `timeout`, an error
    /// when the connection is gone, so a caller that must not wait on a dead
    /// endpoint can tell the two apart. Cancel-safe: dropping the future
    /// loses no message.
    pub async fn wait_event(&mut self, timeout: Duration) -> io::Result<Option<Value>> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.read_more()).await {
                Ok(Ok(())) => {
                    if let Some(e) = self.events.pop_front() {
                        return Ok(Some(e));
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(None),
            }
        }
    }

    /// Events received so far and not yet taken.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Sends `text` as is and returns the next reply (not event) message;
    /// replies left unread by earlier calls come first. For tests.
    pub async fn execute_raw(&mut self, text: &str) -> io::Result<Value> {
        self.send_raw(text.as_bytes()).await?;
        self.recv_reply().await
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.writing {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier QMP request was cancelled while being sent",
            ));
        }
        self.writing = true;
        self.wr.write_all(bytes).await?;
        self.writing = false;
        Ok(())
    }

    /// The next reply (any non-event message), queued or new.
    pub async fn recv_reply(&mut self) -> io::Result<Value> {
        loop {
            if let Some(r) = self.replies.pop_front() {
                return Ok(r);
            }
            self.read_more().await?;
        }
    }

    /// Reads once and sorts what arrived into replies and events.
    async fn read_more(&mut self) -> io::Result<()> {
        let n = self.rd.read(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "QMP connection closed",
            ));
        }
        let mut msgs = Vec::new();
        self.stream.feed(&self.buf[..n], &mut msgs);
        for m in msgs {
            let v = m.map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad QMP output: {e}"))
            })?;
            if v.get("event").is_some() {
                if self.events.len() >= EVENT_QUEUE_MAX {
                    tracing::warn!("QMP client event queue full, dropping the oldest");
                    self.events.pop_front();
                }
                self.events.push_back(v);
            } else {
                self.replies.push_back(v);
            }
        }
        Ok(())
    }
}
