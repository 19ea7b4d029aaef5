//! Resolving the disk to snapshot: a node name (`-blockdev` set-ups,
//! livesnapd, qemu-storage-daemon) or a drive/device id (`-drive` set-ups,
//! via `query-block`), down to the node the job will run on.

use std::path::Path;

use serde_json::Value;

use crate::endpoint::{str_of, Endpoint};
use crate::error::{Failure, Result};

/// The source's backing image, as its header names it.
#[derive(Clone, Debug)]
pub struct Backing {
    /// Full (absolute where the endpoint knows it) file name.
    pub filename: String,
    /// Its format, when known without probing.
    pub format: Option<String>,
}

/// The disk to snapshot.
#[derive(Clone, Debug)]
pub struct Disk {
    /// The node the job runs on.
    pub node: String,
    /// The drive or device name it was found under, if not a node name.
    pub device: Option<String>,
    /// The node's driver (`qcow2`, `raw`, ...).
    pub driver: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// The image file.
    pub filename: String,
    /// The backing image, if any.
    pub backing: Option<Backing>,
}

/// Finds `name` among the node names, then among `query-block`'s drive
/// names and device ids; a node whose size the endpoint does not report
/// cannot be copied.
pub async fn resolve(ep: &mut Endpoint, name: &str) -> Result<Disk> {
    let disk = find(ep, name).await?;
    if disk.size == 0 {
        return Err(Failure::endpoint(format!(
            "the endpoint reports no size for node {}",
            disk.node
        )));
    }
    Ok(disk)
}

async fn find(ep: &mut Endpoint, name: &str) -> Result<Disk> {
    // Not flat: a node's `image` then nests its backing image, whose
    // format is needed when the header does not name it.
    let nodes = crate::endpoint::array(ep.must("query-named-block-nodes", Value::Null).await?);
    if let Some(n) = nodes.iter().find(|n| str_of(n, "node-name") == name) {
        return Ok(from_info(name.to_string(), None, n));
    }
    if ep.caps.has("query-block") {
        let devices = crate::endpoint::array(ep.must("query-block", Value::Null).await?);
        for d in &devices {
            let device = str_of(d, "device");
            let qdev = str_of(d, "qdev");
            if device == name || qdev_matches(qdev, name) {
                let Some(inserted) = d.get("inserted") else {
                    return Err(Failure::usage(format!("device '{name}' has no medium")));
                };
                let node = str_of(inserted, "node-name");
                if node.is_empty() {
                    return Err(Failure::usage(format!(
                        "device '{name}' has no node name (QEMU too old for blockdev jobs?)"
                    )));
                }
                return Ok(from_info(
                    node.to_string(),
                    Some(name.to_string()),
                    inserted,
                ));
            }
        }
    }
    let mut known: Vec<&str> = nodes
        .iter()
        .map(|n| str_of(n, "node-name"))
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .collect();
    known.sort_unstable();
    known.dedup();
    Err(Failure::usage(format!(
        "no node or device named '{name}' on the endpoint (nodes: {})",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )))
}

/// `qdev` is a device id or a QOM path such as
/// `/machine/peripheral/virtio-disk0/virtio-backend`.
fn qdev_matches(qdev: &str, name: &str) -> bool {
    if qdev.is_empty() {
        return false;
    }
    qdev == name
        || qdev
            .strip_prefix("/machine/peripheral/")
            .is_some_and(|rest| rest.split('/').next() == Some(name))
}

/// Builds a [`Disk`] from a `BlockDeviceInfo` (named nodes, or `inserted`).
fn from_info(node: String, device: Option<String>, info: &Value) -> Disk {
    let image = &info["image"];
    let filename = str_of(info, "file").to_string();
    let backing = backing_of(image, info, &filename);
    Disk {
        node,
        device,
        driver: str_of(info, "drv").to_string(),
        size: image["virtual-size"].as_u64().unwrap_or(0),
        filename,
        backing,
    }
}

fn backing_of(image: &Value, info: &Value, filename: &str) -> Option<Backing> {
    let named = [
        str_of(image, "full-backing-filename"),
        str_of(image, "backing-filename"),
        str_of(info, "backing_file"),
    ]
    .into_iter()
    .find(|s| !s.is_empty())?;
    // A relative name in a header is relative to the image's directory.
    let full = if Path::new(named).is_absolute() || named.contains(':') {
        named.to_string()
    } else {
        Path::new(filename)
            .parent()
            .unwrap_or(Path::new(""))
            .join(named)
            .to_string_lossy()
            .into_owned()
    };
    let format = [
        str_of(image, "backing-filename-format"),
        str_of(&image["backing-image"], "format"),
    ]
    .into_iter()
    .find(|s| !s.is_empty())
    .map(String::from);
    Some(Backing {
        filename: full,
        format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qdev_paths() {
        assert!(qdev_matches(
            "/machine/peripheral/disk0/virtio-backend",
            "disk0"
        ));
        assert!(qdev_matches("disk0", "disk0"));
        assert!(!qdev_matches(
            "/machine/peripheral/disk01/virtio-backend",
            "disk0"
        ));
        assert!(!qdev_matches("", "disk0"));
    }

    #[test]
    fn backing_from_info() {
        let info = json!({
            "drv": "qcow2", "file": "/img/top.qcow2",
            "image": {"virtual-size": 1048576, "backing-filename": "base.raw",
                      "backing-image": {"format": "raw"}}
        });
        let d = from_info("top".into(), None, &info);
        let b = d.backing.unwrap();
        assert_eq!(b.filename, "/img/base.raw");
        assert_eq!(b.format.as_deref(), Some("raw"));
        assert_eq!(d.size, 1 << 20);
    }
}
