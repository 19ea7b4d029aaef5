//! `nbd-server-start`, `nbd-server-stop`, `block-export-add`,
//! `block-export-del`, `query-block-exports` (QEMU's `blockdev-nbd.c` and
//! `block/export/export.c`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use livesnap_block::{lookup_bitmap, BitmapRef, BlockNode, Use};
use livesnap_nbd::{DirtyExtents, ExportBitmap, ExportConfig, ListenAddr, NbdServer, ServerTls};
use livesnap_qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::{empty, id_wellformed};
use crate::daemon::{export_user, Daemon, ExportEntry};
use livesnap_block::os_error_text;

/// QEMU's default `max-connections` for `nbd-server-start` since 10.0.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100;

/// Longest export name or description the NBD protocol allows.
const NBD_MAX_STRING: usize = 4096;

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc.into())
}

/// Reads QEMU's `SocketAddressLegacy` (`{"type": "unix"|"inet", "data": {...}}`).
fn parse_socket_address_legacy(args: &mut Args, key: &str) -> Result<ListenAddr, QmpError> {
    let mut addr = args.req_object(key)?;
    let kind = addr.req_enum("type", &["inet", "unix", "vsock", "fd"])?;
    let mut data = addr.req_object("data")?;
    let listen = match kind.as_str() {
        "unix" => {
            let path = data.req_str("path")?;
            if data.opt_bool("abstract")? == Some(true) {
                return Err(generic(
                    "Abstract unix sockets are not supported by livesnapd",
                ));
            }
            data.opt_bool("tight")?;
            ListenAddr::Unix(PathBuf::from(path))
        }
        "inet" => {
            let host = data.req_str("host")?;
            let port = data.req_str("port")?;
            data.opt_bool("numeric")?;
            data.opt_u32("to")?;
            data.opt_bool("ipv4")?;
            data.opt_bool("ipv6")?;
            data.opt_bool("keep-alive")?;
            ListenAddr::Tcp { host, port }
        }
        other => {
            return Err(generic(format!(
                "Socket address type '{other}' is not supported by livesnapd"
            )))
        }
    };
    data.finish()?;
    addr.finish()?;
    Ok(listen)
}

/// Parses a `--nbd` style address: `unix:PATH` or `HOST:PORT`.
pub fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' is neither unix:PATH nor HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(ListenAddr::Tcp {
        host: host.to_string(),
        port: port.to_string(),
    })
}

/// QEMU's error for a listener that could not be set up (`util/qemu-sockets.c`).
fn bind_error(addr: &ListenAddr, e: &std::io::Error) -> QmpError {
    match addr {
        ListenAddr::Unix(p) => generic(format!(
            "Failed to bind socket to {}: {}",
            p.display(),
            os_error_text(e)
        )),
        // An errno means the address resolved and bind() failed.
        ListenAddr::Tcp { .. } if e.raw_os_error().is_some() => generic(format!(
            "Failed to find an available port: {}",
            os_error_text(e)
        )),
        ListenAddr::Tcp { host, port } => {
            // getaddrinfo()'s text; livesnapd takes numeric ports only.
            let why = if port.parse::<u16>().is_err() {
                "Servname not supported for ai_socktype".to_string()
            } else {
                let text = e.to_string();
                text.strip_prefix("failed to lookup address information: ")
                    .unwrap_or(&text)
                    .to_string()
            };
            generic(format!(
                "address resolution failed for {host}:{port}: {why}"
            ))
        }
    }
}

/// Whether a write through `node` would reach a read-only node (QEMU refuses
/// the write permission with "Block node is read-only"). Backing images are
/// read-only by design and never written through, so they do not count.
fn chain_read_only(node: &BlockNode) -> bool {
    node.read_only()
        || node
            .children()
            .iter()
            .any(|c| c.role != "backing" && chain_read_only(&c.node))
}

/// Starts the NBD server, with TLS mandatory for every client when `tls` is
/// given; shared by QMP and the command line.
pub async fn start_nbd_server(
    d: &Daemon,
    addr: &ListenAddr,
    max_connections: u32,
    tls: Option<ServerTls>,
) -> Result<String, QmpError> {
    let mut slot = d.nbd_server.lock().await;
    if slot.is_some() {
        return Err(generic("NBD server already running"));
    }
    let server = NbdServer::start_with_tls(addr, max_connections, d.nbd_exports.clone(), tls)
        .await
        .map_err(|e| bind_error(addr, &e))?;
    let local = server.local_addr();
    *slot = Some(server);
    Ok(local)
}

pub(super) async fn nbd_server_start(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let addr = parse_socket_address_legacy(&mut args, "addr")?;
    // Accepted and ignored: the NBD handshake limit is fixed at QEMU's
    // default, livesnap_nbd::HANDSHAKE_TIMEOUT (docs/qmp.md).
    args.opt_u32("handshake-max-seconds")?;
    let tls_creds = args.opt_str("tls-creds")?;
    let tls_authz = args.opt_str("tls-authz")?;
    let max_connections = args
        .opt_u32("max-connections")?
        .unwrap_or(DEFAULT_MAX_CONNECTIONS);
    args.finish()?;
    let tls = match (&tls_creds, &tls_authz) {
        (Some(creds), authz) => Some(super::server_tls(d, creds, authz.as_deref())?),
        // QEMU accepts this and then serves in plain text with no check at
        // all; livesnapd refuses a setting that would protect nothing (docs/qmp.md).
        (None, Some(_)) => return Err(generic("'tls-authz' requires 'tls-creds'")),
        (None, None) => None,
    };
    start_nbd_server(d, &addr, max_connections, tls).await?;
    Ok(empty())
}

pub(super) async fn nbd_server_stop(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let Some(server) = d.nbd_server.lock().await.take() else {
        return Err(generic("NBD server not running"));
    };
    // As QEMU's blk_exp_close_all_type(): newest export first, those without
    // clients at once, then wait for the others' clients to go, so that every
    // BLOCK_EXPORT_DELETED comes before the reply.
    let entries: Vec<_> = d.exports.lock().unwrap().iter().rev().cloned().collect();
    let mut busy = Vec::new();
    for entry in entries {
        d.nbd_exports.remove(&entry.nbd.config().name);
        if entry.nbd.connections() == 0 {
            d.finish_export_removal(entry);
        } else {
            entry.shutting_down.store(true, Ordering::SeqCst);
            entry.nbd.close_connections();
            busy.push(entry);
        }
    }
    for entry in busy {
        entry.nbd.wait_closed().await;
        d.finish_export_removal(entry);
    }
    server.stop().await;
    Ok(empty())
}

/// What `block-export-add` asks for, after argument checks.
pub struct ExportRequest {
    /// QMP id.
    pub id: String,
    /// Node to export.
    pub node_name: String,
    /// NBD export name; the node name when not given.
    pub name: Option<String>,
    /// NBD description.
    pub description: Option<String>,
    /// Whether clients may write.
    pub writable: bool,
    /// Offer the `qemu:allocation-depth` NBD metadata context.
    pub allocation_depth: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts.
    pub bitmaps: Vec<BitmapRef>,
}

/// A node's bitmap as the extents of an NBD metadata context.
struct NodeBitmap {
    node: Arc<BlockNode>,
    name: String,
}

impl DirtyExtents for NodeBitmap {
    fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        // The export holds the bitmap, so it cannot go while exported.
        self.node
            .bitmap_extents(&self.name, offset, len, max)
            .unwrap_or_default()
    }
}

/// Finds and checks the bitmaps of an export of `node` as QEMU's
/// `nbd_export_create` does, in order: a name alone is looked for on the
/// node and down what it filters or backs (and an enabled bitmap of a
/// writable node refused for a read-only export: its content would change
/// under the reader); `{node, name}` anywhere. Then all are held (busy)
/// until the export is gone; on any failure none is.
fn hold_export_bitmaps(
    d: &Daemon,
    node: &Arc<BlockNode>,
    refs: &[BitmapRef],
    read_only: bool,
) -> Result<Vec<(Arc<BlockNode>, String)>, QmpError> {
    let mut found = Vec::with_capacity(refs.len());
    for r in refs {
        let name = r.name();
        let holder = match r {
            BitmapRef::Local(_) => {
                let holder = node
                    .find_bitmap_below(name)
                    .ok_or_else(|| generic(format!("Bitmap '{name}' is not found")))?;
                let enabled = holder.bitmaps().get(name).is_some_and(|b| b.enabled());
                if read_only && !holder.read_only() && enabled {
                    return Err(generic(format!(
                        "Enabled bitmap '{name}' incompatible with readonly export"
                    )));
                }
                holder
            }
            BitmapRef::External { node, .. } => {
                lookup_bitmap(&d.graph, node, name).map_err(generic)?
            }
        };
        holder.bitmaps().checked(name, Use::Read).map_err(generic)?;
        found.push((holder, name.to_string()));
    }
    // A name given twice is one bitmap, held once.
    let mut held: Vec<(Arc<BlockNode>, String)> = Vec::new();
    for (n, name) in &found {
        if held.iter().any(|(h, hn)| Arc::ptr_eq(h, n) && hn == name) {
            continue;
        }
        if let Err(e) = n.bitmaps().hold(name, Use::Read) {
            release_bitmaps(&held);
            return Err(generic(e));
        }
        held.push((n.clone(), name.clone()));
    }
    Ok(found)
}

/// Ends the holds of [`hold_export_bitmaps`] (each bitmap once).
pub(crate) fn release_bitmaps(bitmaps: &[(Arc<BlockNode>, String)]) {
    let mut done: Vec<(&Arc<BlockNode>, &str)> = Vec::new();
    for (n, name) in bitmaps {
        if !done.iter().any(|(h, hn)| Arc::ptr_eq(h, n) && hn == name) {
            n.bitmaps().release(name);
            done.push((n, name));
        }
    }
}

/// Adds an NBD export; shared by QMP and the command line.
pub fn add_export(
    d: &Arc<Daemon>,
    req: ExportRequest,
    server_running: bool,
) -> Result<(), QmpError> {
    if !id_wellformed(&req.id) {
        return Err(generic("Invalid block export id"));
    }
    if d.exports.lock().unwrap().iter().any(|e| e.id == req.id) {
        return Err(generic(format!(
            "Block export id '{}' is already in use",
            req.id
        )));
    }
    let node = d.graph.find(&req.node_name).map_err(generic)?;
    if req.writable && node.read_only() {
        return Err(generic("Cannot export read-only node as writable"));
    }
    if req.writable && chain_read_only(&node) {
        return Err(generic("Block node is read-only"));
    }
    if !server_running {
        return Err(generic("NBD server not running"));
    }
    let name = req.name.unwrap_or_else(|| req.node_name.clone());
    if name.len() > NBD_MAX_STRING {
        return Err(generic(format!("export name '{name}' too long")));
    }
    if let Some(desc) = &req.description {
        if desc.len() > NBD_MAX_STRING {
            return Err(generic(format!("description '{desc}' too long")));
        }
    }
    if d.nbd_exports.get(&name).is_some() {
        return Err(generic(format!(
            "NBD server already has export named '{name}'"
        )));
    }
    let bitmaps = hold_export_bitmaps(d, &node, &req.bitmaps, !req.writable)?;
    // The export is the image's user: a writable one keeps other writers
    // out (QEMU's export shares writing; see docs/qmp.md). Taken after the
    // checks that can still fail, since a lock is given back only at close.
    livesnap_block::lock_for_user(&node, !req.writable).map_err(|e| {
        release_bitmaps(&bitmaps);
        generic(e.to_string())
    })?;
    let nbd = d
        .nbd_exports
        .add(ExportConfig {
            name,
            description: req.description,
            backend: livesnap_block::BlockBackend::new(node.clone()),
            writable: req.writable,
            allocation_depth: req.allocation_depth,
            bitmaps: bitmaps
                .iter()
                .map(|(n, name)| ExportBitmap {
                    name: name.clone(),
                    extents: Arc::new(NodeBitmap {
                        node: n.clone(),
                        name: name.clone(),
                    }),
                })
                .collect(),
        })
        .map_err(|e| {
            release_bitmaps(&bitmaps);
            generic(e)
        })?;
    node.add_user(export_user(&req.id));
    d.exports.lock().unwrap().push(Arc::new(ExportEntry {
        id: req.id,
        nbd,
        shutting_down: AtomicBool::new(false),
        bitmaps,
    }));
    Ok(())
}

pub(super) async fn block_export_add(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let kind = args.req_enum("type", &["nbd", "vhost-user-blk", "fuse", "vduse-blk"])?;
    let id = args.req_str("id")?;
    // Accepted and ignored: livesnapd has no iothreads (docs/qmp.md).
    args.opt_bool("fixed-iothread")?;
    args.opt_str("iothread")?;
    let node_name = args.req_str("node-name")?;
    let writable = args.opt_bool("writable")?.unwrap_or(false);
    let writethrough = args.opt_bool("writethrough")?.unwrap_or(false);
    args.opt_bool("allow-inactive")?;
    if kind != "nbd" {
        return Err(generic(format!(
            "Export type '{kind}' is not supported by livesnapd"
        )));
    }
    let name = args.opt_str("name")?;
    let description = args.opt_str("description")?;
    let bitmaps = match args.opt_list("bitmaps")? {
        Some(elems) => super::bitmap::parse_bitmap_refs(elems)?,
        None => Vec::new(),
    };
    let allocation_depth = args.opt_bool("allocation-depth")?.unwrap_or(false);
    args.finish()?;
    if writethrough {
        return Err(generic("writethrough is not supported by livesnapd"));
    }
    let running = d.nbd_server.lock().await.is_some();
    add_export(
        d,
        ExportRequest {
            id,
            node_name,
            name,
            description,
            writable,
            allocation_depth,
            bitmaps,
        },
        running,
    )?;
    Ok(empty())
}

pub(super) fn block_export_del(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let id = args.req_str("id")?;
    let mode = args
        .opt_enum("mode", &["safe", "hard"])?
        .unwrap_or_else(|| "safe".into());
    args.finish()?;
    let entry = d
        .exports
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.id == id)
        .cloned()
        .ok_or_else(|| generic(format!("Export '{id}' is not found")))?;
    if entry.shutting_down.load(Ordering::SeqCst) {
        return Err(generic(format!("Export '{id}' is already shutting down")));
    }
    if mode == "safe" && entry.nbd.connections() > 0 {
        return Err(generic(format!("export '{id}' still in use")));
    }
    d.nbd_exports.remove(&entry.nbd.config().name);
    if mode == "hard" {
        entry.nbd.close_connections();
    }
    d.finish_export_removal(entry);
    Ok(empty())
}

pub(super) fn query_block_exports(d: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let exports = d.exports.lock().unwrap();
    Ok(Value::Array(
        exports
            .iter()
            .rev()
            .map(|e| {
                json!({
                    "node-name": e.node().name(),
                    "shutting-down": e.shutting_down.load(Ordering::SeqCst),
                    "type": "nbd",
                    "id": e.id,
                })
            })
            .collect(),
    ))
}
