//! The target image: created on the endpoint with `blockdev-create` as
//! libvirt does (the `file` layer, then the format layer on it, each a job),
//! or locally when the endpoint has no `blockdev-create`; then added as
//! nodes, and removed again.

use std::path::PathBuf;
use std::time::Duration;

use livesnap_block::{create_image, CreateOptions, ImageFormat};
use serde_json::{json, Value};

use crate::endpoint::{str_of, Endpoint};
use crate::error::{Failure, Result};
use crate::wait::{Clock, Waited};

/// Where the target image is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateVia {
    /// `blockdev-create` where the endpoint has it, else locally.
    Auto,
    /// Always `blockdev-create` (the endpoint creates the file, as its user).
    Qmp,
    /// Always here, by livesnap's own image writer (same layout as qemu-img).
    Local,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    /// Absolute path.
    pub path: PathBuf,
    /// Image format.
    pub format: ImageFormat,
    /// Virtual size (the source's).
    pub size: u64,
    /// Backing file and its format written into a qcow2 header (`--shallow`).
    pub backing: Option<(String, String)>,
    /// Test hook: `inject-error` rules of a `blkdebug` node put between the
    /// format node and the file node.
    pub blkdebug: Option<Value>,
}

/// A created target and the nodes added for it.
#[derive(Debug)]
pub struct Target {
    /// Node the job writes to (the format node).
    pub node: String,
    /// "blockdev-create" or "local".
    pub created_via: &'static str,
}

/// How long one `blockdev-create` job may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Node names start with livesnap and the pid, so concurrent runs on one
/// endpoint never collide and leftovers are recognisable.
pub fn node_prefix() -> String {
    format!("livesnap-{}", std::process::id())
}

/// Creates the image here, with livesnap's own image writer (the layout
/// `qemu-img create` makes).
pub async fn create_local(spec: &TargetSpec) -> Result<()> {
    let path = spec.path.to_string_lossy().into_owned();
    let opts = CreateOptions {
        filename: path.clone(),
        format: spec.format,
        size: Some(spec.size),
        cluster_size: None,
        backing_file: spec.backing.as_ref().map(|b| b.0.clone()),
        backing_format: spec.backing.as_ref().map(|b| b.1.clone()),
    };
    create_image(&opts)
        .await
        .map_err(|e| Failure::endpoint(format!("creating {path}: {e}")))
}

/// Creates the image and adds its nodes. On failure, whatever was already
/// added is listed in `added` (and the file may exist) for the caller's
/// clean-up.
pub async fn create(
    ep: &mut Endpoint,
    clock: &mut Clock,
    spec: &TargetSpec,
    via: CreateVia,
    added: &mut Vec<String>,
) -> Result<Target> {
    let prefix = node_prefix();
    let file_node = format!("{prefix}-file");
    let dbg_node = format!("{prefix}-dbg");
    let fmt_node = format!("{prefix}-tgt");
    let path = spec.path.to_string_lossy().into_owned();
    let use_qmp = match via {
        CreateVia::Qmp => {
            if !ep.caps.has("blockdev-create") {
                return Err(Failure::usage(
                    "--create-via qmp: the endpoint has no blockdev-create",
                ));
            }
            true
        }
        CreateVia::Local => false,
        CreateVia::Auto => ep.caps.has("blockdev-create"),
    };
    if use_qmp {
        // The file layer has the full size for raw; qcow2 grows its file.
        let size = match spec.format {
            ImageFormat::Raw => spec.size,
            ImageFormat::Qcow2 => 0,
        };
        run_create(
            ep,
            clock,
            &format!("{prefix}-create-file"),
            json!({"driver": "file", "filename": path, "size": size}),
        )
        .await?;
    } else {
        create_local(spec).await?;
    }
    add(
        ep,
        added,
        json!({"driver": "file", "node-name": file_node, "filename": path}),
    )
    .await?;
    if use_qmp && spec.format == ImageFormat::Qcow2 {
        let mut opts = json!({"driver": "qcow2", "file": file_node, "size": spec.size});
        if let Some((file, format)) = &spec.backing {
            opts["backing-file"] = json!(file);
            opts["backing-fmt"] = json!(format);
        }
        run_create(ep, clock, &format!("{prefix}-create-fmt"), opts).await?;
    }
    let mut child = file_node.clone();
    if let Some(rules) = &spec.blkdebug {
        add(
            ep,
            added,
            json!({"driver": "blkdebug", "node-name": dbg_node, "image": file_node, "inject-error": rules}),
        )
        .await?;
        child = dbg_node;
    }
    // A qcow2 with a backing file opens it from its header, read-only: the
    // source's backing image is shared, never written.
    add(
        ep,
        added,
        json!({"driver": spec.format.name(), "node-name": fmt_node, "file": child}),
    )
    .await?;
    Ok(Target {
        node: fmt_node,
        created_via: if use_qmp { "blockdev-create" } else { "local" },
    })
}

async fn add(ep: &mut Endpoint, added: &mut Vec<String>, opts: Value) -> Result<()> {
    let name = str_of(&opts, "node-name").to_string();
    ep.must("blockdev-add", opts).await?;
    added.push(name);
    Ok(())
}

/// Runs one `blockdev-create` job to its end and dismisses it; its error,
/// if any, comes from `query-jobs` once the job has concluded.
async fn run_create(ep: &mut Endpoint, clock: &mut Clock, id: &str, options: Value) -> Result<()> {
    ep.must("blockdev-create", json!({"job-id": id, "options": options}))
        .await?;
    let until = tokio::time::Instant::now() + CREATE_TIMEOUT;
    loop {
        let ev = match clock.next_event(ep, until).await {
            Ok(Waited::Event(ev)) => ev,
            Ok(Waited::Tick) => {
                let _ = ep.call("job-cancel", json!({"id": id})).await;
                return Err(Failure::endpoint(format!(
                    "blockdev-create did not finish within {}",
                    crate::units::duration(CREATE_TIMEOUT)
                )));
            }
            Err(f) => {
                // Deadline or interrupt: do not leave a creation job behind.
                let _ = ep.call("job-cancel", json!({"id": id})).await;
                let _ = ep.call("job-dismiss", json!({"id": id})).await;
                return Err(f);
            }
        };
        if str_of(&ev, "event") != "JOB_STATUS_CHANGE" || str_of(&ev["data"], "id") != id {
            continue;
        }
        match str_of(&ev["data"], "status") {
            "concluded" => break,
            "null" => return Ok(()),
            _ => {}
        }
    }
    let jobs = crate::endpoint::array(ep.must("query-jobs", Value::Null).await?);
    let error = jobs
        .iter()
        .find(|j| str_of(j, "id") == id)
        .and_then(|j| j.get("error"))
        .and_then(Value::as_str)
        .map(String::from);
    let _ = ep.call("job-dismiss", json!({"id": id})).await?;
    match error {
        Some(e) => Err(Failure::endpoint(format!("blockdev-create: {e}"))),
        None => Ok(()),
    }
}

/// Removes `nodes` (top first), retrying while a job that just ended still
/// holds them; returns the ones that could not be removed, with why.
pub async fn remove_nodes(ep: &mut Endpoint, nodes: &[String], budget: Duration) -> Vec<String> {
    let end = tokio::time::Instant::now() + budget;
    let mut left = Vec::new();
    for n in nodes {
        loop {
            match ep.call("blockdev-del", json!({"node-name": n})).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) if e.desc.starts_with("Failed to find node") => break,
                Ok(Err(e)) if tokio::time::Instant::now() < end => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => {
                    left.push(format!("node {n} ({})", e.desc));
                    break;
                }
                Err(f) => {
                    left.push(format!("node {n} ({})", f.reason));
                    break;
                }
            }
        }
    }
    left
}

/// Removes the nodes a run added (`added`, in the order it added them):
/// the newest first, each before the node under it; `added` is emptied.
/// Returns the ones that could not be removed, with why.
pub async fn remove_added(
    ep: &mut Endpoint,
    added: &mut Vec<String>,
    budget: Duration,
) -> Vec<String> {
    let nodes: Vec<String> = added.iter().rev().cloned().collect();
    let left = remove_nodes(ep, &nodes, budget).await;
    added.clear();
    left
}

/// The processes that have `path` open, from `/proc/*/fd` (those this
/// process may look at).
fn holders(path: &std::path::Path) -> Vec<u32> {
    let Ok(want) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == want))
        {
            out.push(pid);
        }
    }
    out
}

/// Waits (at most `timeout`) until no process has `path` open. libvirt
/// reports a backup job's end before it removes the target's nodes, and
/// QEMU writes a qcow2's last metadata when it closes the image: the file
/// is complete only once nobody holds it.
pub async fn wait_closed(path: &std::path::Path, timeout: Duration) -> Result<()> {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let p = path.to_path_buf();
        let held = tokio::task::spawn_blocking(move || holders(&p))
            .await
            .unwrap_or_default();
        if held.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            return Err(Failure::endpoint(format!(
                "{} is still open (pid {}) {} after its job ended",
                path.display(),
                held.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                crate::units::duration(timeout)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
