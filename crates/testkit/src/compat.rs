//! Two daemons side by side, command for command: livesnapd and
//! qemu-storage-daemon, each started bare with its own directory, get the
//! same QMP sequence and their exchanges are compared. For every command
//! the two must agree: the same events before the reply (name, keys and
//! JSON types recursively, data), the same reply kind; for a return the
//! same keys and JSON types recursively (lists element by element) and the
//! same values once the values that may differ are masked (paths,
//! `#blockNNN` auto names, timestamps, the version's micro and package);
//! for an error the same class and the same text.
//!
//! Deliberate differences (livesnapd's docs/qmp.md) are sent through
//! [`Pair::deviation`], which asserts livesnapd's own reply instead.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use livesnap_nbd::NbdClient;
use serde_json::{Map, Value};

use crate::{is_auto_name, json_type, shape_diff, sparse_file, Livesnapd, Qsd};

/// Longest wait for a reply or an expected event.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long "no further message" is waited for.
pub const QUIET: Duration = Duration::from_millis(300);
/// Size of the images each side starts with.
const MIB: u64 = 1 << 20;

/// What the next read of a monitor gave.
pub enum Next {
    /// A message.
    Msg(Value),
    /// Nothing within the wait.
    Timeout,
    /// The daemon closed the connection.
    Eof,
}

/// A QMP monitor connection, read line by line, so events are seen exactly
/// where they arrive relative to replies (the harness client files events
/// away separately). Nothing is negotiated on connect.
pub struct Mon {
    sock: UnixStream,
    buf: Vec<u8>,
    /// The QMP greeting.
    pub greeting: Value,
}

/// What one command produced: the events that came before its reply, and the reply.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Events before the reply, in order.
    pub events: Vec<Value>,
    /// The reply.
    pub reply: Value,
}

impl Exchange {
    /// The reply is a return.
    pub fn is_ok(&self) -> bool {
        self.reply.get("return").is_some()
    }

    /// The returned value; panics on an error.
    pub fn ret(&self) -> &Value {
        self.reply
            .get("return")
            .unwrap_or_else(|| panic!("expected a return, got {}", self.reply))
    }

    /// The error class; panics on a return.
    pub fn class(&self) -> &str {
        self.reply["error"]["class"]
            .as_str()
            .unwrap_or_else(|| panic!("expected an error, got {}", self.reply))
    }

    /// The error text; panics on a return.
    pub fn desc(&self) -> &str {
        self.reply["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("expected an error, got {}", self.reply))
    }
}

impl Mon {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> Mon {
        let sock = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        let mut m = Mon {
            sock,
            buf: Vec::new(),
            greeting: Value::Null,
        };
        m.greeting = m.recv(REPLY_TIMEOUT).expect("no QMP greeting");
        m
    }

    /// The next message, if one comes within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let v = serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("bad QMP output {:?}: {e}", String::from_utf8_lossy(&line))
                });
                return Next::Msg(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Timeout;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Next::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Next::Eof,
                Err(_) => return Next::Timeout,
            }
        }
    }

    /// The next message, or `None` after `timeout`; panics at end of stream.
    pub fn recv(&mut self, timeout: Duration) -> Option<Value> {
        match self.next(timeout) {
            Next::Msg(v) => Some(v),
            Next::Timeout => None,
            Next::Eof => panic!("QMP connection closed unexpectedly"),
        }
    }

    /// True once the server has closed the connection (within `timeout`).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Next::Eof => return true,
                Next::Timeout => return false,
                Next::Msg(_) => {}
            }
        }
    }

    /// Sends `cmd` and reads up to its reply, keeping the events before it.
    pub fn execute(&mut self, cmd: &str, args: Option<&Value>) -> Exchange {
        let mut req = Map::new();
        req.insert("execute".into(), cmd.into());
        if let Some(a) = args {
            req.insert("arguments".into(), a.clone());
        }
        let mut line = Value::Object(req).to_string();
        line.push('\n');
        self.sock.write_all(line.as_bytes()).unwrap();
        let mut events = Vec::new();
        loop {
            let m = self
                .recv(REPLY_TIMEOUT)
                .unwrap_or_else(|| panic!("no reply to {cmd} within {REPLY_TIMEOUT:?}"));
            if m.get("event").is_some() {
                events.push(m);
            } else {
                return Exchange { events, reply: m };
            }
        }
    }

    /// Events that arrive within `timeout` (stops early once `want` arrived).
    pub fn events(&mut self, want: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < want {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Some(m) if m.get("event").is_some() => out.push(m),
                Some(m) => panic!("unexpected message {m}"),
                None => break,
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Shape and value comparison.

/// Members whose values legitimately differ between the two daemons.
const VOLATILE: &[&str] = &["seconds", "microseconds", "micro", "package"];

/// One daemon's side: its directory, its own TCP port and its monitor.
pub struct Side {
    /// `livesnapd` or `qsd`.
    pub name: &'static str,
    /// Its directory (`@DIR@` in arguments).
    pub dir: PathBuf,
    /// A free TCP port of its own (`@PORT@` in arguments).
    pub port: u16,
    /// Its monitor.
    pub mon: Mon,
}

impl Side {
    /// The directory as a string.
    pub fn dir_str(&self) -> String {
        self.dir.to_str().unwrap().to_string()
    }

    /// `@DIR@` and `@PORT@` in every string of `v` replaced by this side's.
    pub fn subst(&self, v: &Value) -> Value {
        map_strings(v, &|s| {
            s.replace("@DIR@", &self.dir_str())
                .replace("@PORT@", &self.port.to_string())
        })
    }

    /// A text with this side's directory and port put back as `@DIR@`/`@PORT@`.
    pub fn unsubst(&self, s: &str) -> String {
        s.replace(&self.dir_str(), "@DIR@")
            .replace(&self.port.to_string(), "@PORT@")
    }

    /// `v` with this side's paths, auto node names and [`VOLATILE`] or
    /// `extra` members masked, for comparing values.
    pub fn mask(&self, v: &Value, extra: &[&str]) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| {
                        let x = if VOLATILE.contains(&k.as_str()) || extra.contains(&k.as_str()) {
                            Value::String(format!("<{}>", json_type(x)))
                        } else {
                            self.mask(x, extra)
                        };
                        (k.clone(), x)
                    })
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.mask(x, extra)).collect()),
            Value::String(s) if is_auto_name(s) => Value::String("#blockN".into()),
            Value::String(s) => Value::String(self.unsubst(s)),
            other => other.clone(),
        }
    }
}

fn map_strings(v: &Value, f: &dyn Fn(&str) -> String) -> Value {
    match v {
        Value::String(s) => Value::String(f(s)),
        Value::Array(a) => Value::Array(a.iter().map(|x| map_strings(x, f)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), map_strings(x, f)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A free TCP port on 127.0.0.1, for a server that takes its port on the
/// command line or in QMP (qemu-storage-daemon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------
// The two daemons side by side.

/// livesnapd and qsd, both bare, each with `a.img` and `b.img` (1 MiB, sparse)
/// in its own directory.
pub struct Pair {
    /// livesnapd's side.
    pub ls: Side,
    /// qsd's side.
    pub qs: Side,
    // Kept last: dropping them stops the daemons.
    /// The livesnapd process.
    pub ls_proc: Livesnapd,
    _qs_proc: Qsd,
}

impl Default for Pair {
    fn default() -> Pair {
        Pair::new()
    }
}

impl Pair {
    /// Both daemons, monitors connected but not negotiated.
    pub fn unnegotiated() -> Pair {
        let ls_proc = Livesnapd::bare();
        let qs_proc = Qsd::bare();
        let side = |name, dir: &Path, qmp: &Path| {
            for img in ["a.img", "b.img"] {
                sparse_file(dir.join(img), MIB);
            }
            Side {
                name,
                dir: dir.to_path_buf(),
                port: free_port(),
                mon: Mon::connect(qmp),
            }
        };
        let ls = side("livesnapd", ls_proc.dir.path(), &ls_proc.qmp_path);
        let qs = side("qsd", qs_proc.dir.path(), &qs_proc.qmp_path);
        Pair {
            ls,
            qs,
            ls_proc,
            _qs_proc: qs_proc,
        }
    }

    /// Both daemons with capabilities negotiated.
    pub fn new() -> Pair {
        let mut p = Pair::unnegotiated();
        p.same_ok("qmp_capabilities", Value::Null);
        p
    }

    /// Sends `cmd` with `args` (`@DIR@`/`@PORT@` substituted per side) to both.
    pub fn exchange(&mut self, cmd: &str, args: &Value) -> (Exchange, Exchange) {
        let send = |side: &mut Side| {
            let a = (!args.is_null()).then(|| side.subst(args));
            side.mon.execute(cmd, a.as_ref())
        };
        (send(&mut self.ls), send(&mut self.qs))
    }

    /// Sends `cmd` to both and asserts the exchanges agree (module doc);
    /// members named in `mask` are compared by type only. Returns livesnapd's.
    pub fn same_masked(&mut self, cmd: &str, args: Value, mask: &[&str]) -> Exchange {
        let (l, q) = self.exchange(cmd, &args);
        let ctx = format!("{cmd} {args}\n  livesnapd: {l:?}\n  qsd:       {q:?}");
        assert_eq!(
            l.events.len(),
            q.events.len(),
            "different events before the reply: {ctx}"
        );
        for (a, b) in l.events.iter().zip(&q.events) {
            assert_eq!(a["event"], b["event"], "event names differ: {ctx}");
            if let Some(d) = shape_diff(a, b, "event") {
                panic!("{d}: {ctx}");
            }
            assert_eq!(
                self.ls.mask(a, mask),
                self.qs.mask(b, mask),
                "event values differ: {ctx}"
            );
        }
        assert_eq!(l.is_ok(), q.is_ok(), "one returned, one failed: {ctx}");
        if l.is_ok() {
            if let Some(d) = shape_diff(l.ret(), q.ret(), "return") {
                panic!("{d}: {ctx}");
            }
            assert_eq!(
                self.ls.mask(l.ret(), mask),
                self.qs.mask(q.ret(), mask),
                "return values differ: {ctx}"
            );
        } else {
            if let Some(d) = shape_diff(&l.reply, &q.reply, "reply") {
                panic!("{d}: {ctx}");
            }
            assert_eq!(l.class(), q.class(), "error classes differ: {ctx}");
            assert_eq!(
                self.ls.unsubst(l.desc()),
                self.qs.unsubst(q.desc()),
                "error texts differ: {ctx}"
            );
        }
        l
    }

    /// [`Pair::same_masked`] with nothing masked.
    pub fn same(&mut self, cmd: &str, args: Value) -> Exchange {
        self.same_masked(cmd, args, &[])
    }

    /// Both return, alike; livesnapd's return value.
    pub fn same_ok(&mut self, cmd: &str, args: Value) -> Value {
        let l = self.same(cmd, args.clone());
        assert!(l.is_ok(), "{cmd} {args} failed on both: {:?}", l.reply);
        l.ret().clone()
    }

    /// Both fail with the same class and text, which must be `desc` (with `@DIR@`).
    pub fn same_err(&mut self, cmd: &str, args: Value, desc: &str) {
        let l = self.same(cmd, args.clone());
        assert!(!l.is_ok(), "{cmd} {args} succeeded on both");
        assert_eq!(self.ls.unsubst(l.desc()), desc, "{cmd} {args}");
    }

    /// A deliberate difference (docs/qmp.md): only livesnapd's reply is
    /// checked, as a GenericError with `desc`; qsd gets the command too so
    /// both keep the same state where qsd fails as well.
    pub fn deviation(&mut self, cmd: &str, args: Value, desc: &str) {
        let (l, _q) = self.exchange(cmd, &args);
        assert!(l.events.is_empty(), "{cmd}: {l:?}");
        assert_eq!(l.class(), "GenericError", "{cmd} {args}");
        assert_eq!(self.ls.unsubst(l.desc()), desc, "{cmd} {args}");
    }

    /// Neither side sends anything more for a while.
    pub fn both_quiet(&mut self) {
        for side in [&mut self.ls, &mut self.qs] {
            if let Some(m) = side.mon.recv(QUIET) {
                panic!("{}: unexpected message {m}", side.name);
            }
        }
    }

    /// NBD clients attached to export `name` on each side's `@DIR@/nbd.sock`.
    pub fn nbd_clients(&self, rt: &tokio::runtime::Runtime, name: &str) -> Vec<NbdClient> {
        [&self.ls, &self.qs]
            .iter()
            .map(|side| {
                let addr = format!("unix:{}", side.dir.join("nbd.sock").display());
                rt.block_on(NbdClient::connect(&addr, name))
                    .unwrap_or_else(|e| panic!("{}: NBD connect: {e}", side.name))
            })
            .collect()
    }
}
