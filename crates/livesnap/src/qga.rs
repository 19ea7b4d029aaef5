//! A minimal qemu-guest-agent client over its unix socket: sync, then
//! `guest-fsfreeze-freeze` / `guest-fsfreeze-thaw`. Every call is bounded;
//! the agent answers one command at a time, so a command that timed out
//! may still be answered later: replies are matched by the sync id and
//! stale ones dropped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use livesnap_qmp::JsonStream;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A connected, synchronised guest agent.
pub struct Qga {
    sock: UnixStream,
    stream: JsonStream,
    replies: VecDeque<Value>,
    path: PathBuf,
    next_id: u64,
    // Replies still owed for commands sent since the last sync.
    pending: usize,
}

impl Qga {
    /// Connects and synchronises (`guest-sync-delimited`, else `guest-sync`),
    /// within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qga, String> {
        let work = async {
            let sock = UnixStream::connect(path).await.map_err(|e| {
                format!("cannot connect to the guest agent {}: {e}", path.display())
            })?;
            let mut q = Qga {
                sock,
                stream: JsonStream::new(),
                replies: VecDeque::new(),
                path: path.to_path_buf(),
                next_id: u64::from(std::process::id()) << 20,
                pending: 0,
            };
            q.sync().await?;
            Ok(q)
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "guest agent {} did not answer within {}",
                    path.display(),
                    crate::units::duration(timeout)
                ))
            })
    }

    /// Flushes whatever an earlier client left in the agent's parser and
    /// output: a 0xFF byte resets the agent's JSON parser, and every reply
    /// before the one carrying our id is stale (including the agent's
    /// complaint about the 0xFF byte itself).
    async fn sync(&mut self) -> Result<(), String> {
        self.next_id += 1;
        let id = self.next_id;
        self.send_bytes(&[0xff]).await?;
        let mut r = self.sync_with("guest-sync-delimited", id).await?;
        if matches!(&r, Err(e) if e.starts_with("CommandNotFound")) {
            r = self.sync_with("guest-sync", id).await?;
        }
        self.pending = 0;
        r.map_err(|e| format!("guest agent sync failed: {e}"))
    }

    async fn sync_with(&mut self, command: &str, id: u64) -> Result<Result<(), String>, String> {
        self.send_request(command, json!({ "id": id })).await?;
        loop {
            let reply = self.recv().await?;
            if let Some(e) = reply.get("error") {
                let e = error_text(e);
                if e.starts_with("CommandNotFound") {
                    return Ok(Err(e));
                }
                continue;
            }
            if reply.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(Ok(()));
            }
        }
    }

    async fn send_bytes(&mut self, b: &[u8]) -> Result<(), String> {
        self.sock
            .write_all(b)
            .await
            .map_err(|e| format!("guest agent {}: {e}", self.path.display()))
    }

    async fn send_request(&mut self, command: &str, args: Value) -> Result<(), String> {
        let mut text = json!({ "execute": command, "arguments": args }).to_string();
        text.push('\n');
        self.send_bytes(text.as_bytes()).await
    }

    /// Sends a command and returns its reply: `Ok(Ok(return))` or
    /// `Ok(Err("Class: desc"))`. The agent answers every command in order,
    /// so the replies still owed to earlier (timed-out) commands come first
    /// and are skipped.
    async fn request(&mut self, command: &str) -> Result<Result<Value, String>, String> {
        let mut skip = self.pending;
        self.pending += 1;
        self.send_request(command, json!({})).await?;
        loop {
            let reply = self.recv().await?;
            self.pending = self.pending.saturating_sub(1);
            if skip > 0 {
                skip -= 1;
                continue;
            }
            if let Some(e) = reply.get("error") {
                return Ok(Err(error_text(e)));
            }
            return Ok(Ok(reply.get("return").cloned().unwrap_or(Value::Null)));
        }
    }

    async fn recv(&mut self) -> Result<Value, String> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(r) = self.replies.pop_front() {
                return Ok(r);
            }
            let n = self
                .sock
                .read(&mut buf)
                .await
                .map_err(|e| format!("guest agent {}: {e}", self.path.display()))?;
            if n == 0 {
                return Err(format!(
                    "guest agent {} closed the connection",
                    self.path.display()
                ));
            }
            // The delimiter byte before a sync reply is not JSON.
            let bytes: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != 0xff).collect();
            let mut msgs = Vec::new();
            self.stream.feed(&bytes, &mut msgs);
            self.replies.extend(msgs.into_iter().filter_map(Result::ok));
        }
    }

    async fn command(&mut self, command: &str, timeout: Duration) -> Result<Value, String> {
        match tokio::time::timeout(timeout, self.request(command)).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(format!("{command}: {e}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "{command}: no answer from the guest agent within {}",
                crate::units::duration(timeout)
            )),
        }
    }

    /// Freezes the guest's filesystems; returns how many were frozen.
    pub async fn freeze(&mut self, timeout: Duration) -> Result<u64, String> {
        self.command("guest-fsfreeze-freeze", timeout)
            .await
            .map(|v| v.as_u64().unwrap_or(0))
    }

    /// Thaws the guest's filesystems; returns how many were thawed. Sent
    /// even while a freeze is still unanswered: the agent runs commands in
    /// order, so a freeze that completes late is still followed by this thaw.
    pub async fn thaw(&mut self, timeout: Duration) -> Result<u64, String> {
        self.command("guest-fsfreeze-thaw", timeout)
            .await
            .map(|v| v.as_u64().unwrap_or(0))
    }
}

fn error_text(e: &Value) -> String {
    format!(
        "{}: {}",
        e["class"].as_str().unwrap_or("Error"),
        e["desc"].as_str().unwrap_or("")
    )
}
