//! The manifest of a backup chain (`DIR/manifest.json`): what each backup
//! in DIR is, so that `restore` and `verify` need nothing but DIR. It is
//! JSON with a format name and a version; a reader refuses a version it
//! does not know rather than guess. It is only ever replaced whole
//! (write, fsync, rename, fsync of DIR), and only once a backup is
//! complete and verified: a crash leaves the old manifest or the new one.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Failure, Result};
use crate::units::{rfc3339, Stamp};

/// The manifest's file name in DIR.
pub const MANIFEST: &str = "manifest.json";
/// What `format` says.
pub const FORMAT: &str = "livesnap-backup-chain";
/// The version this livesnap writes and reads.
pub const VERSION: u32 = 1;

/// A full backup or an incremental one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// The whole disk, an image without a backing file.
    Full,
    /// What changed since the previous backup, over it as its backing file.
    Incremental,
}

impl BackupKind {
    /// The name in the manifest and in file names.
    pub fn name(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        }
    }
}

/// Which disk the chain is of, as the endpoint named it when the chain began.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// DISK as given on the command line.
    pub name: String,
    /// The node (QMP) or target name (libvirt) it resolved to.
    pub node: String,
    /// Its image file, as the endpoint reports it.
    pub file: String,
    /// Its virtual size in bytes: every backup of the chain has it.
    pub size: u64,
    /// `qmp SOCKET` or `libvirt DOMAIN` (with the domain's UUID).
    pub endpoint: String,
}

/// The point-in-time window of one backup: the backup is the disk at one
/// instant inside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointInTime {
    /// RFC 3339, UTC.
    pub start: String,
    /// RFC 3339, UTC.
    pub end: String,
    /// CLOCK_MONOTONIC of the host that took it (comparable on that host only, until it reboots).
    pub start_monotonic_ns: u64,
    /// See `start_monotonic_ns`.
    pub end_monotonic_ns: u64,
    /// `end - start` in milliseconds.
    pub width_ms: f64,
    /// What delimits the window.
    pub defined_by: String,
}

impl PointInTime {
    /// The window `[w0, w1]`, delimited as `defined_by` says.
    pub fn new(w0: &Stamp, w1: &Stamp, defined_by: &str) -> PointInTime {
        PointInTime {
            start: rfc3339(w0.wall),
            end: rfc3339(w1.wall),
            start_monotonic_ns: w0.mono_ns,
            end_monotonic_ns: w1.mono_ns,
            width_ms: crate::report::ms(w0, w1),
            defined_by: defined_by.into(),
        }
    }
}

/// One backup of the chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backup {
    /// 0, 1, 2...: its place in the chain.
    pub index: u64,
    /// Its image, a file name in DIR (qcow2).
    pub file: String,
    /// Full or incremental.
    pub kind: BackupKind,
    /// The file its image header names as backing file (the previous
    /// backup's, relative to DIR), `None` for a full backup.
    pub backing: Option<String>,
    /// When it was taken.
    pub point_in_time: PointInTime,
    /// The file's size in bytes.
    pub size: u64,
    /// Bytes the job copied (the job's `offset` at its end).
    pub bytes_copied: u64,
    /// SHA-256 of the file, lower-case hex.
    pub sha256: String,
    /// The dirty bitmap (QMP) or libvirt checkpoint that tracks what
    /// changed on the disk since this backup: the next incremental copies
    /// what it names.
    pub bitmap: String,
    /// The disk as it was when this backup was taken.
    pub disk: DiskIdentity,
    /// When the backup was complete (RFC 3339, UTC).
    pub finished: String,
}

/// `DIR/manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The chain's id: random, written once, kept when DIR moves.
    pub chain: String,
    /// The disk the chain is of (as the first backup found it).
    pub disk: DiskIdentity,
    /// `qmp` or `libvirt`: how change tracking is kept (a bitmap the chain
    /// owns, or libvirt checkpoints).
    pub tracking: String,
    /// Oldest first.
    pub backups: Vec<Backup>,
}

impl Manifest {
    /// A manifest for a new chain with no backup yet.
    pub fn new(chain: String, disk: DiskIdentity, tracking: &str) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            chain,
            disk,
            tracking: tracking.into(),
            backups: Vec::new(),
        }
    }

    /// The newest backup.
    pub fn last(&self) -> Option<&Backup> {
        self.backups.last()
    }

    /// Backup `index`.
    pub fn get(&self, index: u64) -> Option<&Backup> {
        self.backups.iter().find(|b| b.index == index)
    }

    /// The backups an image of backup `index` reads through, from the full
    /// one it rests on up to `index` itself.
    pub fn chain_to(&self, index: u64) -> Result<Vec<&Backup>> {
        let mut out = Vec::new();
        let mut at = self
            .get(index)
            .ok_or_else(|| Failure::usage(format!("the chain has no backup {index}")))?;
        loop {
            out.push(at);
            match (&at.kind, &at.backing) {
                (BackupKind::Full, _) => break,
                (BackupKind::Incremental, Some(b)) => {
                    at = self.backups.iter().find(|x| &x.file == b).ok_or_else(|| {
                        Failure::usage(format!(
                            "backup {} names {b} as its backing file, which the manifest does not list",
                            at.index
                        ))
                    })?;
                }
                (BackupKind::Incremental, None) => {
                    return Err(Failure::usage(format!(
                        "incremental backup {} has no backing file in the manifest",
                        at.index
                    )))
                }
            }
            if out.len() > self.backups.len() {
                return Err(Failure::usage("the manifest's backing links form a loop"));
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Reads `DIR/manifest.json`; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.join(MANIFEST);
        let Some(text) = super::read_if_there(&path)? else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Failure::usage(format!("{}: not JSON: {e}", path.display())))?;
        if v["format"] != FORMAT {
            return Err(Failure::usage(format!(
                "{}: not a livesnap backup chain manifest (format {})",
                path.display(),
                v["format"]
            )));
        }
        if v["version"] != VERSION {
            return Err(Failure::usage(format!(
                "{}: manifest version {} is not the version {VERSION} this livesnap reads",
                path.display(),
                v["version"]
            )));
        }
        let m: Manifest = serde_json::from_value(v)
            .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
        Ok(Some(m))
    }

    /// Replaces `DIR/manifest.json` atomically: a temporary file written and
    /// fsynced, renamed over the manifest, and DIR fsynced, so that a crash
    /// at any point leaves either the old manifest or this one.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(format!(".{MANIFEST}.tmp"));
        let io = |what: &str, e: std::io::Error| {
            Failure::endpoint(format!("{what} in {}: {e}", dir.display()))
        };
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| Failure::endpoint(format!("manifest: {e}")))?;
        text.push('\n');
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("writing the manifest", e))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("writing the manifest", e))?;
        drop(f);
        std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(|e| io("renaming the manifest", e))?;
        sync_dir(dir).map_err(|e| io("syncing the directory", e))
    }
}

/// fsync of a directory, so a rename or removal in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// What unit tests build manifests from.
#[cfg(test)]
pub mod fixtures {
    use super::*;

    /// Backup `index` over `backing`, of the disk [`disk`].
    pub fn backup(index: u64, kind: BackupKind, backing: Option<&str>) -> Backup {
        Backup {
            index,
            file: crate::chain::file_name(index, kind),
            kind,
            backing: backing.map(String::from),
            point_in_time: PointInTime {
                start: "2026-01-01T00:00:00.000000Z".into(),
                end: "2026-01-01T00:00:00.001000Z".into(),
                start_monotonic_ns: 1,
                end_monotonic_ns: 2,
                width_ms: 1.0,
                defined_by: "test".into(),
            },
            size: 1,
            bytes_copied: 1,
            sha256: "00".into(),
            bitmap: "b".into(),
            disk: disk(),
            finished: "2026-01-01T00:00:01.000000Z".into(),
        }
    }

    /// A disk of 1 MiB on a QMP endpoint.
    pub fn disk() -> DiskIdentity {
        DiskIdentity {
            name: "disk".into(),
            node: "disk".into(),
            file: "/d".into(),
            size: 1 << 20,
            endpoint: "qmp /q".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{backup, disk};
    use super::*;

    #[test]
    fn chain_to_follows_backing_links_to_the_full_backup() {
        let mut m = Manifest::new("c".into(), disk(), "qmp");
        m.backups.push(backup(0, BackupKind::Full, None));
        m.backups
            .push(backup(1, BackupKind::Incremental, Some("0000-full.qcow2")));
        m.backups.push(backup(2, BackupKind::Full, None));
        m.backups
            .push(backup(3, BackupKind::Incremental, Some("0002-full.qcow2")));
        let idx = |n| -> Vec<u64> { m.chain_to(n).unwrap().iter().map(|b| b.index).collect() };
        assert_eq!(idx(1), [0, 1]);
        assert_eq!(idx(3), [2, 3]);
        assert_eq!(idx(2), [2]);
        assert!(m.chain_to(9).is_err());
    }

    #[test]
    fn saves_and_loads_and_refuses_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Manifest::load(dir.path()).unwrap().is_none());
        let mut m = Manifest::new("c".into(), disk(), "qmp");
        m.backups.push(backup(0, BackupKind::Full, None));
        m.save(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), Some(m));
        let text = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
        std::fs::write(
            dir.path().join(MANIFEST),
            text.replace("\"version\": 1", "\"version\": 2"),
        )
        .unwrap();
        let e = Manifest::load(dir.path()).unwrap_err();
        assert!(e.reason.contains("version 2"), "{}", e.reason);
    }
}
