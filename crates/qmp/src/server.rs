//! The QMP server: a unix socket, any number of monitors, QEMU's protocol
//! rules, and a [`Dispatcher`] supplied by the daemon for the commands.
//!
//! Per monitor, as QEMU does it:
//! - the greeting, then only `qmp_capabilities` until negotiation succeeds
//!   (everything else gets `CommandNotFound` "Expecting capabilities
//!   negotiation with 'qmp_capabilities'");
//! - in-band commands run one at a time, in order; without the `oob`
//!   capability the next request is not even read before the reply is
//!   queued, with it up to 8 requests are queued and `exec-oob` requests
//!   are answered at once (no command supports OOB, as in qsd);
//! - every reply echoes `id`; bad input gets QEMU's error and the monitor
//!   goes on;
//! - events are sent to negotiated monitors, interleaved with replies in
//!   emission order.
//!
//! A command's future runs in its own task: it completes even if its
//! monitor disconnects (QEMU too finishes a command whose client left), and
//! a panic in it becomes an error reply instead of a dead monitor.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::args::Args;
use crate::error::{ErrorClass, QmpError};
use crate::event::{Event, EventBus};
use crate::order::qdict_entries;
use crate::stream::{JsonStream, Limits, Message};
use crate::wire::to_wire_line;

/// Commands of the daemon, called by the server for every in-band command
/// except `qmp_capabilities`.
pub trait Dispatcher: Send + Sync + 'static {
    /// Runs `command`. Unknown names must give
    /// [`QmpError::command_not_found`]; handlers read `args` with [`Args`]
    /// and must call [`Args::finish`]. `Ok(Value::Null)` is sent as
    /// `{"return": {}}`. The dispatcher implements `query-commands` (list
    /// `qmp_capabilities` too) and `query-version` itself.
    fn call<'a>(
        &'a self,
        command: &'a str,
        args: Args,
    ) -> Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send + 'a>>;

    /// Names of all commands, `qmp_capabilities` included.
    fn commands(&self) -> Vec<String>;
}

/// What the greeting announces. The `oob` capability is always offered,
/// as qemu-storage-daemon offers it on a socket monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU version triple `(major, minor, micro)` to report.
    pub qemu: (u64, u64, u64),
    /// The `package` string.
    pub package: String,
}

impl Greeting {
    /// A greeting for the given version and package string.
    pub fn new(qemu: (u64, u64, u64), package: impl Into<String>) -> Greeting {
        Greeting {
            qemu,
            package: package.into(),
        }
    }

    /// The `VersionInfo` object, also what `query-version` returns.
    pub fn version_info(&self) -> Value {
        let mut q = Map::new();
        q.insert("major".into(), self.qemu.0.into());
        q.insert("minor".into(), self.qemu.1.into());
        q.insert("micro".into(), self.qemu.2.into());
        let mut v = Map::new();
        v.insert("qemu".into(), Value::Object(q));
        v.insert("package".into(), self.package.clone().into());
        Value::Object(v)
    }

    /// `{"QMP": {"version": ..., "capabilities": ["oob"]}}`.
    pub fn to_json(&self) -> Value {
        let mut qmp = Map::new();
        qmp.insert("version".into(), self.version_info());
        qmp.insert("capabilities".into(), Value::Array(vec!["oob".into()]));
        let mut m = Map::new();
        m.insert("QMP".into(), Value::Object(qmp));
        Value::Object(m)
    }
}

/// QEMU's `QMP_REQ_QUEUE_LEN_MAX`: in-band requests queued with OOB on.
const REQ_QUEUE_MAX: usize = 8;
/// Bytes of replies a monitor may hold for a client that does not read
/// them; past this it stops reading that client's input (the client then
/// blocks in its own write) until the client reads. Memory, not a count: a
/// client may pipeline thousands of small commands (qsd takes them all in)
/// and reading only afterwards must not deadlock, while one that never
/// reads must not grow the daemon. 8 MiB holds the replies to about 1 MB
/// of the cheapest commands with room to spare (a `query-version` reply is
/// about three times its command).
pub const PENDING_REPLY_BYTES: usize = 8 << 20;
const READ_CHUNK: usize = 64 * 1024;
/// How long a monitor may take to write out owed replies when the server
/// shuts down; a client that does not read is cut off after that.
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

struct Ctx {
    greeting: Greeting,
    dispatcher: Arc<dyn Dispatcher>,
    events: EventBus,
    limits: Limits,
}

/// A listening QMP unix socket.
pub struct QmpServer {
    path: PathBuf,
    inode: (u64, u64),
    shutdown: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path)
            .finish()
    }
}

impl QmpServer {
    /// Listens on `path` (mode 0600) with QEMU's input limits. A stale
    /// socket file is replaced; a live one (something accepts on it) or a
    /// non-socket file is an error.
    pub async fn bind(
        path: &Path,
        greeting: Greeting,
        dispatcher: Arc<dyn Dispatcher>,
        events: EventBus,
    ) -> io::Result<QmpServer> {
        QmpServer::bind_with_limits(path, greeting, dispatcher, events, Limits::default()).await
    }

    /// Like [`QmpServer::bind`] with explicit per-message input limits.
    pub async fn bind_with_limits(
        path: &Path,
        greeting: Greeting,
        dispatcher: Arc<dyn Dispatcher>,
        events: EventBus,
        limits: Limits,
    ) -> io::Result<QmpServer> {
        let (std_listener, inode) = bind_socket(path)?;
        let listener = match UnixListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let ctx = Arc::new(Ctx {
            greeting,
            dispatcher,
            events,
            limits,
        });
        let (shutdown, rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, ctx, rx));
        tracing::info!(path = %path.display(), "QMP server listening");
        Ok(QmpServer {
            path: path.to_path_buf(),
            inode,
            shutdown,
            accept: Some(accept),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops listening, disconnects all monitors and removes the socket
    /// file. Commands already running finish in the background.
    pub async fn close(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.accept.take() {
            let _ = task.await;
        }
        self.remove_socket();
    }

    fn remove_socket(&self) {
        // Only our own socket: another server may have taken the path since.
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        if self.accept.is_some() {
            let _ = self.shutdown.send(true);
            self.remove_socket();
        }
    }
}

/// Creates the listening socket so that the path never exists with a mode
/// wider than 0600: on Linux `bind()` gives the new inode the socket's own
/// mode (minus umask), so the socket is `fchmod`ed before it is bound.
fn bind_socket(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, (u64, u64))> {
    let addr = sockaddr(path)?;
    remove_stale(path, &addr)?;
    let fd = new_socket()?;
    // SAFETY: fd is a valid socket owned by `fd`.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let (sa, len) = &addr;
    // SAFETY: `sa` is a properly initialised sockaddr_un of length `len`.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            sa as *const libc::sockaddr_un as *const libc::sockaddr,
            *len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let finish = || -> io::Result<(u64, u64)> {
        let md = std::fs::symlink_metadata(path)?;
        // A umask like 0277 narrows 0600 further; set exactly 0600 (never
        // wider) before anyone can connect, i.e. before listen().
        if md.mode() & 0o777 != 0o600 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        // SAFETY: fd is a bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((md.dev(), md.ino()))
    };
    match finish() {
        Ok(inode) => Ok((std::os::unix::net::UnixListener::from(fd), inode)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= sa.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unusable unix socket path {}", path.display()),
        ));
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((sa, len as libc::socklen_t))
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes a leftover socket file whose server is gone. A socket that
/// still accepts is left alone: two daemons on one path is a mistake.
fn remove_stale(path: &Path, addr: &(libc::sockaddr_un, libc::socklen_t)) -> io::Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !md.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    // Non-blocking probe: a full backlog must not hang us.
    let probe = new_socket()?;
    let (sa, len) = addr;
    // SAFETY: valid socket and sockaddr_un.
    let rc = unsafe {
        libc::connect(
            probe.as_raw_fd(),
            sa as *const libc::sockaddr_un as *const libc::sockaddr,
            *len,
        )
    };
    let err = io::Error::last_os_error();
    if rc == 0 || err.raw_os_error() == Some(libc::EAGAIN) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another server is listening there", path.display()),
        ));
    }
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => {
            tracing::info!(path = %path.display(), "removing stale QMP socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        _ => Err(err),
    }
}

async fn accept_loop(listener: UnixListener, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    let mut monitors = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    monitors.spawn(serve_monitor(stream, ctx.clone(), shutdown.clone()));
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "QMP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = monitors.join_next(), if !monitors.is_empty() => {}
        }
    }
    drop(listener);
    while monitors.join_next().await.is_some() {}
}

/// Per-monitor state shared by its reader and its executor.
#[derive(Default)]
struct MonState {
    negotiated: AtomicBool,
    oob: AtomicBool,
    /// The client is gone: queued requests are dropped, as QEMU does.
    closed: AtomicBool,
}

enum Out {
    /// A reply, to be written after every event numbered below `events_before`.
    Reply { line: String, events_before: u64 },
    /// Start sending events (negotiation succeeded).
    Subscribe(broadcast::Receiver<Arc<Event>>),
}

/// The queue from a monitor's reader and executor to its writer, bounded by
/// the bytes of the replies in it ([`PENDING_REPLY_BYTES`]).
#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<(Out, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
}

/// Receiving end of an [`Outbox`]; dropping a permit gives its bytes back.
type OutRx = mpsc::UnboundedReceiver<(Out, OwnedSemaphorePermit)>;

impl Outbox {
    fn new() -> (Outbox, OutRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(PENDING_REPLY_BYTES));
        (Outbox { tx, budget }, rx)
    }

    /// Queues `out`, first waiting until its bytes fit. A reply larger than
    /// the whole budget waits for an empty queue. Fails once the writer is gone.
    async fn send(&self, out: Out) -> Result<(), ()> {
        let bytes = match &out {
            Out::Reply { line, .. } => line.len(),
            Out::Subscribe(_) => 0,
        };
        let cost = bytes.clamp(1, PENDING_REPLY_BYTES) as u32;
        let permit = tokio::select! {
            p = self.budget.clone().acquire_many_owned(cost) => p.map_err(|_| ())?,
            // A dead writer holds no permits, but one that is stuck for good
            // must not keep the sender waiting after the client is gone.
            _ = self.tx.closed() => return Err(()),
        };
        self.tx.send((out, permit)).map_err(|_| ())
    }
}

struct Request {
    msg: Message,
    done: Option<oneshot::Sender<()>>,
}

async fn serve_monitor(stream: UnixStream, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    tracing::debug!("QMP monitor connected");
    let (mut rd, wr) = stream.into_split();
    let state = Arc::new(MonState::default());
    let (out_tx, out_rx) = Outbox::new();
    let (writer_done_tx, mut writer_done) = watch::channel(false);
    let mut writer = tokio::spawn(write_loop(wr, out_rx, writer_done_tx));
    let (req_tx, req_rx) = mpsc::channel(REQ_QUEUE_MAX);
    tokio::spawn(execute_loop(
        req_rx,
        ctx.clone(),
        state.clone(),
        out_tx.clone(),
    ));

    let greeting = Out::Reply {
        line: to_wire_line(&ctx.greeting.to_json()),
        events_before: 0,
    };
    let mut graceful = out_tx.send(greeting).await.is_ok();
    // Set when the server shuts down (QMP `quit`, a signal): replies already
    // owed still go out, within SHUTDOWN_FLUSH.
    let mut closing = false;
    let mut stream = JsonStream::with_limits(ctx.limits);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut msgs = Vec::new();
    // `graceful` stays true when the loop ends at a clean end of input:
    // replies still owed are written before the socket closes, as qsd does
    // (`printf '...' | socat - UNIX-CONNECT:...` relies on it).
    'conn: while graceful {
        let n = tokio::select! {
            _ = shutdown.changed() => { graceful = false; closing = true; break }
            _ = writer_done.changed() => { graceful = false; break }
            r = rd.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) => { graceful = false; break }
            },
        };
        stream.feed(&buf[..n], &mut msgs);
        for msg in msgs.drain(..) {
            let oob_request = matches!(&msg, Ok(Value::Object(d))
                if d.contains_key("exec-oob") && !d.contains_key("execute"));
            if oob_request {
                // Out-of-band: answered now, ahead of queued commands.
                let reply = match precheck(&ctx, &state, msg) {
                    Step::Reply(v) => v,
                    _ => response(Err(QmpError::generic("internal error")), None),
                };
                let out = Out::Reply {
                    line: to_wire_line(&reply),
                    events_before: ctx.events.emitted(),
                };
                tokio::select! {
                    _ = shutdown.changed() => { graceful = false; closing = true; break 'conn }
                    _ = writer_done.changed() => { graceful = false; break 'conn }
                    r = out_tx.send(out) => if r.is_err() { graceful = false; break 'conn },
                }
                continue;
            }
            let (done, wait) = if state.oob.load(Ordering::Acquire) {
                (None, None)
            } else {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            };
            tokio::select! {
                _ = shutdown.changed() => { graceful = false; closing = true; break 'conn }
                _ = writer_done.changed() => { graceful = false; break 'conn }
                r = req_tx.send(Request { msg, done }) => if r.is_err() { graceful = false; break 'conn },
            }
            // Without OOB, QEMU reads nothing more until the command is done.
            if let Some(wait) = wait {
                tokio::select! {
                    _ = shutdown.changed() => { graceful = false; closing = true; break 'conn }
                    _ = writer_done.changed() => { graceful = false; break 'conn }
                    _ = wait => {}
                }
            }
        }
    }
    // Requests still queued (only possible with OOB) are dropped, as QEMU
    // drops them when the client goes away; a running one completes.
    state.closed.store(true, Ordering::Release);
    drop(req_tx);
    drop(out_tx);
    let mut written = false;
    if graceful {
        tokio::select! {
            _ = &mut writer => written = true,
            _ = shutdown.changed() => closing = true,
        }
    }
    if !written {
        if closing {
            // QEMU flushes its monitors before exiting: the reply to `quit`
            // (and any other reply already made) reaches the client, unless
            // it does not read.
            let _ = tokio::time::timeout(SHUTDOWN_FLUSH, &mut writer).await;
        }
        writer.abort();
    }
    tracing::debug!("QMP monitor disconnected");
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: OutRx, done: watch::Sender<bool>) {
    let mut events: Option<broadcast::Receiver<Arc<Event>>> = None;
    let mut pending: Option<Arc<Event>> = None;
    let result: Result<(), String> = async {
        loop {
            let next = tokio::select! {
                biased;
                o = rx.recv() => Ok(o),
                e = next_event(&mut events, &mut pending), if events.is_some() => Err(e),
            };
            match next {
                Ok(None) => return Ok(()),
                Ok(Some((Out::Subscribe(r), _))) => events = Some(r),
                // The permit lives until the reply is written: a reply
                // stuck in a full socket still counts against the budget.
                Ok(Some((
                    Out::Reply {
                        line,
                        events_before,
                    },
                    _permit,
                ))) => {
                    // Events emitted before the reply was made go first.
                    if let Some(r) = events.as_mut() {
                        loop {
                            let ev = match pending.take() {
                                Some(ev) => ev,
                                None => match r.try_recv() {
                                    Ok(ev) => ev,
                                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                        return Err(format!("lagged {n} events"))
                                    }
                                    Err(_) => break,
                                },
                            };
                            if ev.seq() >= events_before {
                                pending = Some(ev);
                                break;
                            }
                            write(&mut wr, ev.line()).await?;
                        }
                    }
                    write(&mut wr, &line).await?;
                }
                Err(Ok(ev)) => write(&mut wr, ev.line()).await?,
                Err(Err(broadcast::error::RecvError::Lagged(n))) => {
                    return Err(format!("lagged {n} events"))
                }
                Err(Err(broadcast::error::RecvError::Closed)) => events = None,
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "closing QMP monitor");
    }
    let _ = wr.shutdown().await;
    let _ = done.send(true);
}

async fn next_event(
    events: &mut Option<broadcast::Receiver<Arc<Event>>>,
    pending: &mut Option<Arc<Event>>,
) -> Result<Arc<Event>, broadcast::error::RecvError> {
    if let Some(ev) = pending.take() {
        return Ok(ev);
    }
    match events.as_mut() {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn write(wr: &mut OwnedWriteHalf, line: &str) -> Result<(), String> {
    wr.write_all(line.as_bytes())
        .await
        .map_err(|e| format!("write failed: {e}"))
}

async fn execute_loop(
    mut rx: mpsc::Receiver<Request>,
    ctx: Arc<Ctx>,
    state: Arc<MonState>,
    out: Outbox,
) {
    while let Some(req) = rx.recv().await {
        if state.closed.load(Ordering::Acquire) {
            continue;
        }
        let (reply, events_before) = match precheck(&ctx, &state, req.msg) {
            Step::Reply(v) => (v, ctx.events.emitted()),
            Step::Capabilities { args, id } => {
                // Nothing may come between qmp_capabilities and its reply
                // (python's qemu.qmp asserts it): the subscription starts
                // after this count, so no event is written ahead.
                let before = ctx.events.emitted();
                let r = capabilities(&ctx, &state, &out, args).await;
                (response(r, id), before)
            }
            Step::Call { command, args, id } => {
                let r = call(&ctx, command, args).await;
                // Events the command caused are already counted: they go first.
                (response(r, id), ctx.events.emitted())
            }
        };
        let line = to_wire_line(&reply);
        let _ = out
            .send(Out::Reply {
                line,
                events_before,
            })
            .await;
        if let Some(done) = req.done {
            let _ = done.send(());
        }
    }
}

enum Step {
    Reply(Value),
    Capabilities {
        args: Map<String, Value>,
        id: Option<Value>,
    },
    Call {
        command: String,
        args: Map<String, Value>,
        id: Option<Value>,
    },
}

fn response(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(Value::Null) => m.insert("return".into(), Value::Object(Map::new())),
        Ok(v) => m.insert("return".into(), v),
        Err(e) => m.insert("error".into(), e.to_json()),
    };
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// QEMU's `qmp_dispatch_check_obj()`, members in QDict order.
fn check_obj(dict: &Map<String, Value>, allow_oob: bool) -> Result<(String, bool), QmpError> {
    let mut exec_key: Option<&str> = None;
    for (name, v) in qdict_entries(dict) {
        match name.as_str() {
            "execute" | "exec-oob" if name == "execute" || allow_oob => {
                if !v.is_string() {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{name}' must be a string"
                    )));
                }
                if let Some(prev) = exec_key {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{name}' clashes with '{prev}'"
                    )));
                }
                exec_key = Some(name);
            }
            "arguments" => {
                if !v.is_object() {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            }
            "id" => {}
            _ => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{name}' is unexpected"
                )))
            }
        }
    }
    let key = exec_key.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    let command = dict[key].as_str().unwrap_or_default().to_string();
    Ok((command, key == "exec-oob"))
}

/// Everything QEMU decides before running a command.
fn precheck(ctx: &Ctx, state: &MonState, msg: Message) -> Step {
    let negotiated = state.negotiated.load(Ordering::Acquire);
    let mut dict = match msg {
        Err(e) => return Step::Reply(response(Err(e), None)),
        Ok(Value::Object(d)) => d,
        Ok(_) => {
            let e = QmpError::generic("QMP input must be a JSON object");
            return Step::Reply(response(Err(e), None));
        }
    };
    let id = dict.get("id").cloned();
    let (command, oob) = match check_obj(&dict, state.oob.load(Ordering::Acquire)) {
        Ok(x) => x,
        Err(e) => return Step::Reply(response(Err(e), id)),
    };
    let args = match dict.remove("arguments") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    if !negotiated {
        if command != "qmp_capabilities" {
            let e = QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return Step::Reply(response(Err(e), id));
        }
        return Step::Capabilities { args, id };
    }
    if oob {
        let known = command == "qmp_capabilities" || ctx.dispatcher.commands().contains(&command);
        let e = if known {
            QmpError::generic(format!("The command {command} does not support OOB"))
        } else {
            QmpError::command_not_found(&command)
        };
        return Step::Reply(response(Err(e), id));
    }
    if command == "qmp_capabilities" {
        return Step::Capabilities { args, id };
    }
    Step::Call { command, args, id }
}

async fn capabilities(
    ctx: &Ctx,
    state: &MonState,
    out: &Outbox,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    // Arguments first: QEMU's marshaller checks them before the command
    // looks at the negotiation state.
    let mut a = Args::new(args);
    let mut enable = Vec::new();
    if let Some(list) = a.opt_list("enable")? {
        for e in list {
            enable.push(e.into_enum(&["oob"])?);
        }
    }
    a.finish()?;
    if state.negotiated.load(Ordering::Acquire) {
        return Err(QmpError::new(
            ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        ));
    }
    // "oob" is the only capability QEMU defines and it is always offered,
    // so QEMU's "Capability %s not available" cannot happen here.
    state
        .oob
        .store(enable.iter().any(|c| c == "oob"), Ordering::Release);
    state.negotiated.store(true, Ordering::Release);
    let _ = out.send(Out::Subscribe(ctx.events.subscribe())).await;
    Ok(Value::Null)
}

async fn call(ctx: &Ctx, command: String, args: Map<String, Value>) -> Result<Value, QmpError> {
    let dispatcher = ctx.dispatcher.clone();
    let name = command.clone();
    let task = tokio::spawn(async move { dispatcher.call(&command, Args::new(args)).await });
    match task.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(command = %name, error = %e, "QMP command failed");
            Err(QmpError::generic(format!(
                "internal error in command {name}"
            )))
        }
    }
}
