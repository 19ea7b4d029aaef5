//! The record of a backup run in progress (`DIR/.livesnap-run.json`): made
//! before anything is changed (created exclusively, so it is also the lock
//! that keeps two runs out of one DIR) and updated as the run adds bitmaps
//! or checkpoints; removed when the run has committed its backup or undone
//! everything. A run killed outright (SIGKILL, a host crash) leaves it, and
//! the next run reads from it what to undo on the endpoint and in DIR
//! before it starts: a partial file, a bitmap it had added, bits it had
//! taken from the chain's bitmap.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::manifest::{sync_dir, BackupKind, Manifest};
use crate::error::{Failure, Result};

/// The record's file name in DIR.
pub const RUN_RECORD: &str = ".livesnap-run.json";

/// What a run changed outside DIR that must be undone unless it commits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// A bitmap the run added: removed unless the run committed.
    pub bitmap_added: Option<String>,
    /// The bitmap a new full backup replaces: removed once it committed.
    pub bitmap_replaced: Option<String>,
    /// `(undo, into)`: the copy of the bits the job takes from `into`,
    /// merged back into it unless the run committed, removed either way.
    pub undo: Option<(String, String)>,
    /// A libvirt checkpoint the run created: deleted unless the run committed.
    pub checkpoint: Option<String>,
    /// The libvirt checkpoint of the previous backup: deleted once the run
    /// committed (the new one tracks from here on).
    pub checkpoint_replaced: Option<String>,
}

/// A run in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The process taking the backup.
    pub pid: u32,
    /// The chain.
    pub chain: String,
    /// The backup's index.
    pub index: u64,
    /// Its file in DIR.
    pub file: String,
    /// Full or incremental.
    pub kind: BackupKind,
    /// What to undo.
    pub pending: Pending,
}

impl RunRecord {
    /// True when `manifest` lists this run's backup: it committed.
    pub fn committed(&self, manifest: Option<&Manifest>) -> bool {
        manifest.is_some_and(|m| {
            m.chain == self.chain
                && m.backups
                    .iter()
                    .any(|b| b.index == self.index && b.file == self.file)
        })
    }
}

/// The record of this process's run, held while it runs.
pub struct RunLock {
    path: PathBuf,
    /// What is recorded.
    pub record: RunRecord,
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A record left by a run that no longer runs, if there is one; an error if
/// a run is still going on in DIR.
pub fn stale(dir: &Path) -> Result<Option<RunRecord>> {
    let path = dir.join(RUN_RECORD);
    let Some(text) = super::read_if_there(&path)? else {
        return Ok(None);
    };
    let r: RunRecord = serde_json::from_str(&text).map_err(|e| {
        Failure::usage(format!(
            "{}: not a run record ({e}); remove it if no livesnap backup runs into {}",
            path.display(),
            dir.display()
        ))
    })?;
    if r.pid != std::process::id() && pid_alive(r.pid) {
        return Err(Failure::usage(format!(
            "another livesnap backup (pid {}) is running into {} (its record is {})",
            r.pid,
            dir.display(),
            path.display()
        )));
    }
    Ok(Some(r))
}

/// Removes a stale record once what it names has been undone.
pub fn forget(dir: &Path) -> Result<()> {
    let path = dir.join(RUN_RECORD);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Failure::endpoint(format!("{}: {e}", path.display()))),
    }
}

fn write(path: &Path, r: &RunRecord, new: bool) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(r).map_err(std::io::Error::other)? + "\n";
    if new {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    } else {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

impl RunLock {
    /// Records a new run in DIR; fails if another record is there (see [`stale`]).
    pub fn create(dir: &Path, record: RunRecord) -> Result<RunLock> {
        let path = dir.join(RUN_RECORD);
        write(&path, &record, true).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Failure::usage(format!(
                    "{} exists: another livesnap backup runs into {}",
                    path.display(),
                    dir.display()
                ))
            } else {
                Failure::endpoint(format!("{}: {e}", path.display()))
            }
        })?;
        Ok(RunLock { path, record })
    }

    /// Records `change` before the run makes it on the endpoint, so that a
    /// killed run's successor knows to undo it.
    pub fn note(&mut self, change: impl FnOnce(&mut Pending)) -> Result<()> {
        change(&mut self.record.pending);
        write(&self.path, &self.record, false)
            .map_err(|e| Failure::endpoint(format!("{}: {e}", self.path.display())))
    }

    /// The run is over (committed or undone): the record goes.
    pub fn release(self) -> Result<()> {
        std::fs::remove_file(&self.path)
            .map_err(|e| Failure::endpoint(format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32) -> RunRecord {
        RunRecord {
            pid,
            chain: "c".into(),
            index: 1,
            file: "0001-incremental.qcow2".into(),
            kind: BackupKind::Incremental,
            pending: Pending::default(),
        }
    }

    #[test]
    fn one_run_at_a_time_and_stale_records_are_found() {
        let dir = tempfile::tempdir().unwrap();
        assert!(stale(dir.path()).unwrap().is_none());
        let mut lock = RunLock::create(dir.path(), record(std::process::id())).unwrap();
        assert!(RunLock::create(dir.path(), record(std::process::id())).is_err());
        lock.note(|p| p.undo = Some(("u".into(), "b".into())))
            .unwrap();
        // Our own record is ours to recover.
        let r = stale(dir.path()).unwrap().unwrap();
        assert_eq!(r.pending.undo, Some(("u".into(), "b".into())));
        lock.release().unwrap();
        // A live process's record stops the run; pid 1 is always alive.
        RunLock::create(dir.path(), record(1)).unwrap();
        assert!(stale(dir.path()).unwrap_err().reason.contains("pid 1"));
    }
}
