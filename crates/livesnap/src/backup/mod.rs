//! `livesnap backup DISK DIR`: one more backup in the chain kept in DIR.
//! The first run into an empty DIR takes a full backup and starts the
//! disk's change tracking at the same instant; each later run copies only
//! what changed since the previous backup, into a qcow2 backed by it. The
//! orchestration for each endpoint is its own module ([`qmp`]: a dirty
//! bitmap the chain owns; [`libvirt`]: libvirt checkpoints, each an
//! [`EndpointRun`]); what they share is here: the directory, the plan, the
//! run's state and record, committing a finished backup, and how every run
//! ends ([`take`]: the report, or the clean-up and what it left).
//!
//! A backup enters the manifest only once it is complete and verified; a
//! failed or interrupted run leaves DIR and the change tracking as they
//! were (the next incremental is still correct), and a run killed outright
//! leaves a record the next run undoes first ([`crate::chain::run`]).

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::chain::manifest::{Backup, BackupKind, DiskIdentity, Manifest, PointInTime, MANIFEST};
use crate::chain::run::{Pending, RunLock, RunRecord, RUN_RECORD};
use crate::chain::{self, image};
use crate::error::{Failure, Result};
use crate::progress::Progress;
use crate::signals::Interrupt;
use crate::snapshot::{absolute, after_cleanup, during, EndpointArg};
use crate::target::CreateVia;
use crate::units::{bytes, duration, rfc3339, Stamp};
use crate::wait::Clock;

/// Everything `livesnap backup` was asked.
#[derive(Clone, Debug)]
pub struct Options {
    /// The endpoint.
    pub endpoint: EndpointArg,
    /// The disk, as `snapshot` takes it.
    pub disk: String,
    /// The chain's directory.
    pub dir: PathBuf,
    /// Start a new full backup even where an incremental is possible, or
    /// where the change tracking was lost.
    pub full: bool,
    /// The whole operation's bound.
    pub deadline: Duration,
    /// Job speed limit, bytes per second.
    pub speed: Option<u64>,
    /// Where the target image is created (QMP endpoints).
    pub create_via: CreateVia,
    /// No progress output.
    pub quiet: bool,
}

/// Runs `livesnap backup` through the endpoint `opts` names.
pub async fn run(opts: &Options, interrupt: Interrupt) -> Result<Report> {
    let existed = opts.dir.exists();
    let r = run_at(opts, interrupt).await;
    if r.is_err() && !existed {
        // DIR as before: a directory this run created goes again if it
        // stayed empty (remove_dir leaves a non-empty one alone).
        let _ = std::fs::remove_dir(&opts.dir);
    }
    r
}

async fn run_at(opts: &Options, interrupt: Interrupt) -> Result<Report> {
    match &opts.endpoint {
        EndpointArg::Qmp(path) => qmp::run(path, opts, interrupt).await,
        #[cfg(feature = "libvirt")]
        EndpointArg::Libvirt { domain, uri } => {
            libvirt::run(domain, uri.as_deref(), opts, interrupt).await
        }
        #[cfg(not(feature = "libvirt"))]
        EndpointArg::Libvirt { .. } => Err(crate::snapshot::without_libvirt()),
    }
}

/// DIR as it is before a run: absolute, created if it was not there, and
/// holding a chain or nothing (but what an interrupted run left).
pub struct Dir {
    /// Absolute path.
    pub path: PathBuf,
    /// Its manifest, if a chain is there.
    pub manifest: Option<Manifest>,
    /// What a run that was killed left to undo.
    pub stale: Option<RunRecord>,
}

/// Opens DIR for a backup.
pub fn open_dir(dir: &Path) -> Result<Dir> {
    let path = absolute(dir)?;
    if !path.exists() {
        std::fs::create_dir(&path)
            .map_err(|e| Failure::usage(format!("cannot create {}: {e}", path.display())))?;
    }
    if !path.is_dir() {
        return Err(Failure::usage(format!(
            "{} is not a directory",
            path.display()
        )));
    }
    let manifest = Manifest::load(&path)?;
    let stale = chain::run::stale(&path)?;
    if manifest.is_none() {
        // Never mix a chain with other files: an empty DIR starts one.
        let pending = stale.as_ref().map(|r| r.file.as_str());
        let foreign: Vec<String> = std::fs::read_dir(&path)
            .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != RUN_RECORD && Some(n.as_str()) != pending)
            .collect();
        if !foreign.is_empty() {
            return Err(Failure::usage(format!(
                "{} has no {MANIFEST} but holds other files ({}): a new backup chain starts in an empty directory",
                path.display(),
                foreign.join(", ")
            )));
        }
    }
    Ok(Dir {
        path,
        manifest,
        stale,
    })
}

/// What this run takes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Full or incremental.
    pub kind: BackupKind,
    /// The new backup's index.
    pub index: u64,
    /// Its file in DIR.
    pub file: String,
    /// The previous backup's file (incremental).
    pub backing: Option<String>,
    /// The chain's id.
    pub chain: String,
    /// Why a full backup, when it is one.
    pub why: String,
}

/// The plan: a full backup into an empty DIR or when asked, else an
/// incremental over the last backup.
pub fn plan(m: Option<&Manifest>, full: bool) -> Plan {
    match m.and_then(|m| Some((m, m.last()?))) {
        Some((m, last)) => {
            let index = last.index + 1;
            let kind = if full {
                BackupKind::Full
            } else {
                BackupKind::Incremental
            };
            Plan {
                kind,
                index,
                file: chain::file_name(index, kind),
                backing: (!full).then(|| last.file.clone()),
                chain: m.chain.clone(),
                why: if full {
                    "--full".into()
                } else {
                    format!("incremental over backup {}", last.index)
                },
            }
        }
        None => Plan {
            kind: BackupKind::Full,
            index: 0,
            file: chain::file_name(0, BackupKind::Full),
            backing: None,
            chain: m.map_or_else(chain::new_chain_id, |m| m.chain.clone()),
            why: "the first backup of a new chain".into(),
        },
    }
}

/// How a chain keeps track of what changed between its backups, which
/// also says which kind of endpoint continues it (the manifest's
/// `tracking`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// A dirty bitmap the chain owns, on a QMP endpoint.
    Qmp,
    /// libvirt checkpoints.
    Libvirt,
}

impl Tracking {
    /// The manifest's name, also the option that selects the endpoint.
    pub fn name(self) -> &'static str {
        match self {
            Tracking::Qmp => "qmp",
            Tracking::Libvirt => "libvirt",
        }
    }

    /// A run that tracks changes this way recorded `p`: only this kind of
    /// endpoint can undo it.
    fn recorded(self, p: &Pending) -> bool {
        match self {
            Tracking::Qmp => {
                p.undo.is_some() || p.bitmap_added.is_some() || p.bitmap_replaced.is_some()
            }
            Tracking::Libvirt => p.checkpoint.is_some(),
        }
    }
}

/// Before a run through `mine` changes anything: what a killed run left
/// is undone by `undo` (told whether that run committed, as DIR's manifest
/// says; it returns what it could not undo), or refused when only the
/// other kind of endpoint can undo it; then the chain in DIR must be of
/// the same disk and keep its change tracking through `mine`. Returns the
/// note that says what was undone.
pub async fn recover_and_check(
    dir: &mut Dir,
    identity: &DiskIdentity,
    mine: Tracking,
    undo: impl AsyncFnOnce(&Dir, &RunRecord, bool) -> Vec<String>,
) -> Result<Option<String>> {
    let mut note = None;
    if let Some(stale) = dir.stale.take() {
        let (other, through) = match mine {
            Tracking::Qmp => (Tracking::Libvirt, "libvirt"),
            Tracking::Libvirt => (Tracking::Qmp, "QMP"),
        };
        if other.recorded(&stale.pending) {
            return Err(Failure::usage(format!(
                "an earlier run through {through} (pid {}) was killed in {}: run the next backup with --{}, which undoes what it left",
                stale.pid,
                dir.path.display(),
                other.name()
            )));
        }
        let committed = stale.committed(dir.manifest.as_ref());
        let left = undo(dir, &stale, committed).await;
        note = Some(recovered(dir, &stale, left)?);
    }
    if let Some(m) = &dir.manifest {
        check_identity(m, identity)?;
        if m.tracking != mine.name() {
            let how = match mine {
                Tracking::Qmp => format!(
                    "through {0} checkpoints: continue it with --{0}",
                    m.tracking
                ),
                Tracking::Libvirt => {
                    "with a bitmap on a QMP endpoint: continue it with --qmp".to_string()
                }
            };
            return Err(Failure::usage(format!(
                "the chain in {} tracks changes {how}",
                dir.path.display()
            )));
        }
    }
    Ok(note)
}

/// Refuses a disk that is not the chain's (another size).
fn check_identity(m: &Manifest, now: &DiskIdentity) -> Result<()> {
    if m.disk.size != now.size {
        return Err(Failure::usage(format!(
            "the disk {} is {} but the chain in this directory is of a disk of {} ({} {}): not the same disk",
            now.name,
            bytes(now.size),
            bytes(m.disk.size),
            m.disk.endpoint,
            m.disk.name
        )));
    }
    Ok(())
}

/// After what a killed run left was undone (`left`: what could not be):
/// the note for the report, or the failure that stops this run.
fn recovered(dir: &Dir, stale: &RunRecord, left: Vec<String>) -> Result<String> {
    if !left.is_empty() {
        return Err(Failure::endpoint(format!(
            "an earlier run (pid {}) was killed and what it left cannot be undone: {}",
            stale.pid,
            left.join(", ")
        )));
    }
    chain::run::forget(&dir.path)?;
    Ok(format!(
        "undid what an earlier run (pid {}, backup {}) left when it was killed",
        stale.pid, stale.index
    ))
}

/// The failure of a run after its clean-up: how the job was stopped, and
/// DIR and the change tracking as they were, or what is left.
fn failure_after_cleanup(
    f: Failure,
    stopped: Option<&str>,
    left: &[String],
    dir: &Path,
) -> Failure {
    after_cleanup(
        f,
        stopped,
        left,
        &format!(
            ", {} and the disk's change tracking as they were",
            dir.display()
        ),
        &format!(
            " (the next backup into {} undoes what it can)",
            dir.display()
        ),
    )
}

/// What the job left, to be committed.
pub struct Taken {
    /// The point-in-time window.
    pub window: (Stamp, Stamp),
    /// What delimits it.
    pub defined_by: &'static str,
    /// Bytes the job copied.
    pub bytes_copied: u64,
    /// The bitmap or checkpoint that tracks changes since this backup.
    pub bitmap: String,
}

/// Where a backup run stands, whatever the endpoint: what it takes, its
/// record in DIR, what it will change on the endpoint, its notes.
pub struct RunState<'a> {
    /// The run's bound, and the signal that ends it early.
    pub clock: Clock,
    /// What the person watching sees.
    pub progress: Progress,
    /// What was asked.
    pub opts: &'a Options,
    /// The disk, as the manifest records it.
    pub identity: DiskIdentity,
    /// What this run takes.
    pub plan: Plan,
    /// The run record; `None` once released.
    lock: Option<RunLock>,
    /// What the run will change on the endpoint, recorded before it does.
    pub pending: Pending,
    /// Things the operator should know.
    pub notes: Vec<String>,
}

impl<'a> RunState<'a> {
    /// Records the run in DIR before it changes anything; the record is
    /// also the lock that keeps other runs out.
    pub fn begin(
        dir: &Dir,
        opts: &'a Options,
        clock: Clock,
        identity: DiskIdentity,
        plan: Plan,
        pending: Pending,
        notes: Vec<String>,
    ) -> Result<RunState<'a>> {
        let record = RunRecord {
            pid: std::process::id(),
            chain: plan.chain.clone(),
            index: plan.index,
            file: plan.file.clone(),
            kind: plan.kind,
            pending: Default::default(),
        };
        let lock = RunLock::create(&dir.path, record)?;
        Ok(RunState {
            clock,
            progress: Progress::new(opts.quiet),
            opts,
            identity,
            plan,
            lock: Some(lock),
            pending,
            notes,
        })
    }

    /// The new backup's file.
    pub fn path(&self, dir: &Dir) -> PathBuf {
        dir.path.join(&self.plan.file)
    }

    /// Says what the run takes (`what`: the disk, as the endpoint knows
    /// it), unless the deadline or a signal has ended it already.
    pub fn announce(&self, dir: &Dir, what: &str) -> Result<()> {
        self.progress.note(&format!(
            "livesnap: {} backup {} of {what} -> {} ({}), deadline {}",
            self.plan.kind.name(),
            self.plan.index,
            self.path(dir).display(),
            self.plan.why,
            duration(self.opts.deadline)
        ));
        self.clock.check()
    }

    /// Records [`RunState::pending`] before the run changes it on the
    /// endpoint, so that a killed run's successor undoes it.
    pub fn record_pending(&mut self) -> Result<()> {
        let pending = self.pending.clone();
        self.lock
            .as_mut()
            .expect("the run holds its record")
            .note(|p| *p = pending)
    }

    /// Checks the finished image and enters it in the manifest (see
    /// [`enter_in_manifest`]) of a chain that tracks changes by
    /// `tracking`. From then on nothing is undone.
    pub async fn commit(&mut self, dir: &Dir, tracking: Tracking, taken: Taken) -> Result<Backup> {
        enter_in_manifest(
            &mut self.clock,
            dir,
            &self.plan,
            &self.identity,
            tracking.name(),
            taken,
        )
        .await
        .map_err(|f| during(f, "committing the backup"))
    }

    /// After the commit: the run record goes, unless what the commit made
    /// obsolete could not be removed (`unfinished`, the note that says
    /// so); then the record stays, and the next run removes it.
    pub fn end_committed(&mut self, unfinished: Option<String>) {
        let lock = self.lock.take().expect("the run holds its record");
        match unfinished {
            None => {
                if let Err(f) = lock.release() {
                    self.notes.push(f.reason);
                }
            }
            Some(note) => self.notes.push(note),
        }
    }

    /// What the run changed, for its undo after a failure; `None` once it
    /// committed.
    pub fn to_undo(&self) -> Option<RunRecord> {
        let lock = self.lock.as_ref()?;
        Some(RunRecord {
            pending: self.pending.clone(),
            ..lock.record.clone()
        })
    }

    /// The end of a failed run's undo: the run record goes if nothing is
    /// `left`; else it stays, so that the next run undoes what it can.
    pub fn release_if_undone(&mut self, left: &mut Vec<String>) {
        if let Some(lock) = self.lock.take() {
            if left.is_empty() {
                if let Err(f) = lock.release() {
                    left.push(f.reason);
                }
            }
        }
    }
}

/// What taking a backup depends on the endpoint for; [`take`] runs it and
/// ends it the same way on every endpoint.
pub trait EndpointRun<'a> {
    /// Where the run stands.
    fn state(&mut self) -> &mut RunState<'a>;
    /// Takes the backup and commits it.
    async fn take(&mut self, dir: &Dir) -> Result<Backup>;
    /// After a failure: stops the job and undoes what the run changed.
    /// Returns what is left, and how the job was stopped if it was.
    async fn cleanup(&mut self, dir: &Dir) -> (Vec<String>, Option<&'static str>);
    /// The job, as the report names it.
    fn job_id(&self) -> String;
    /// The endpoint, as the report names it.
    fn endpoint_name(&self) -> String;
}

/// Takes the backup through `run` and reports it; after a failure, cleans
/// up and says what is as it was or what is left.
pub async fn take<'a>(mut run: impl EndpointRun<'a>, dir: &Dir, started: Stamp) -> Result<Report> {
    match run.take(dir).await {
        Ok(backup) => {
            run.state().progress.finish();
            let (job_id, endpoint) = (run.job_id(), run.endpoint_name());
            let st = run.state();
            Ok(Report {
                backup,
                dir: dir.path.clone(),
                chain: st.plan.chain.clone(),
                why: st.plan.why.clone(),
                job_id,
                endpoint,
                started,
                finished: Stamp::now(),
                notes: std::mem::take(&mut st.notes),
            })
        }
        Err(f) => {
            run.state()
                .progress
                .note(&format!("livesnap: {}; cleaning up", f.reason));
            let (left, stopped) = run.cleanup(dir).await;
            run.state().progress.finish();
            Err(failure_after_cleanup(f, stopped, &left, &dir.path))
        }
    }
}

/// Checks the finished image and enters it in the manifest: its size, its
/// checksum, its own consistency as the engine opens it (qcow2, the disk's
/// size, backed by the previous backup as a qcow2), then the manifest
/// replaced atomically. Returns the new entry.
async fn enter_in_manifest(
    clock: &mut Clock,
    dir: &Dir,
    plan: &Plan,
    disk: &DiskIdentity,
    tracking: &str,
    taken: Taken,
) -> Result<Backup> {
    let path = dir.path.join(&plan.file);
    let f = std::fs::File::open(&path)
        .map_err(|e| Failure::job(format!("the backup {} is gone: {e}", path.display())))?;
    f.sync_all()
        .map_err(|e| Failure::endpoint(format!("fsync of {}: {e}", path.display())))?;
    let size = f
        .metadata()
        .map_err(|e| Failure::endpoint(format!("{}: {e}", path.display())))?
        .len();
    drop(f);
    clock.bound(check_image(&path, plan, disk.size)).await?;
    let sha256 = clock.bound(image::sha256(&path)).await?;
    let entry = Backup {
        index: plan.index,
        file: plan.file.clone(),
        kind: plan.kind,
        backing: plan.backing.clone(),
        point_in_time: PointInTime::new(&taken.window.0, &taken.window.1, taken.defined_by),
        size,
        bytes_copied: taken.bytes_copied,
        sha256,
        bitmap: taken.bitmap,
        disk: disk.clone(),
        finished: rfc3339(std::time::SystemTime::now()),
    };
    let mut m = dir
        .manifest
        .clone()
        .unwrap_or_else(|| Manifest::new(plan.chain.clone(), disk.clone(), tracking));
    m.backups.push(entry.clone());
    clock.check()?;
    m.save(&dir.path)?;
    Ok(entry)
}

/// The image as the engine sees it: a qcow2 of `size` whose header names
/// the previous backup (as a qcow2) or nothing, and whose chain opens.
pub async fn check_image(path: &Path, plan: &Plan, size: u64) -> Result<()> {
    let bad = |what: String| Failure::job(format!("the new backup {}: {what}", path.display()));
    let backing = image::header_backing(path)
        .await
        .map_err(|f| bad(f.reason))?;
    match (&plan.backing, &backing) {
        (None, None) => {}
        (Some(want), Some(b)) if &b.filename == want && b.format.as_deref() == Some("qcow2") => {}
        (want, got) => {
            return Err(bad(format!(
                "its header names backing file {:?}, expected {:?} (qcow2)",
                got.as_ref().map(|b| (&b.filename, &b.format)),
                want
            )))
        }
    }
    let node = image::open(path, livesnap_block::ImageFormat::Qcow2, true)
        .await
        .map_err(|f| bad(f.reason))?;
    let got = node.size();
    node.close().await;
    if got != size {
        return Err(bad(format!(
            "its virtual size is {got}, the disk's is {size}"
        )));
    }
    Ok(())
}

/// A backup taken.
#[derive(Debug)]
pub struct Report {
    /// The manifest's new entry.
    pub backup: Backup,
    /// DIR.
    pub dir: PathBuf,
    /// The chain's id.
    pub chain: String,
    /// Why this kind of backup.
    pub why: String,
    /// The job's id (QMP) or `backup` (libvirt).
    pub job_id: String,
    /// The endpoint's version and package.
    pub endpoint: String,
    /// Command start.
    pub started: Stamp,
    /// When the report was made.
    pub finished: Stamp,
    /// Things the operator should know.
    pub notes: Vec<String>,
}

impl Report {
    /// The `--json` object: the manifest's entry and the run's facts.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"result": "ok"});
        if let (Value::Object(o), Ok(Value::Object(b))) =
            (&mut v, serde_json::to_value(&self.backup))
        {
            o.extend(b);
        }
        v["path"] = json!(self.dir.join(&self.backup.file));
        v["dir"] = json!(self.dir);
        v["chain"] = json!(self.chain);
        v["kind_reason"] = json!(self.why);
        v["job_id"] = json!(self.job_id);
        v["endpoint"] = json!(self.endpoint);
        v["started"] = json!(rfc3339(self.started.wall));
        v["duration_ms"] = json!(crate::report::ms(&self.started, &self.finished));
        v["notes"] = json!(self.notes);
        v
    }

    /// Lines for a person.
    pub fn human(&self) -> String {
        let b = &self.backup;
        let took = self
            .finished
            .instant
            .saturating_duration_since(self.started.instant);
        let mut s = format!(
            "backup {} ({}) of '{}' complete: {} ({}, {})\n",
            b.index,
            b.kind.name(),
            b.disk.name,
            self.dir.join(&b.file).display(),
            bytes(b.size),
            match &b.backing {
                Some(p) => format!("over {p}"),
                None => "no backing file".into(),
            }
        );
        s += &format!("  chain          {} ({})\n", self.chain, self.why);
        s += &format!(
            "  point in time  {} .. {} ({:.3} ms, {})\n",
            b.point_in_time.start,
            b.point_in_time.end,
            b.point_in_time.width_ms,
            b.point_in_time.defined_by
        );
        s += &format!(
            "  copied         {} in {}, job {}\n",
            bytes(b.bytes_copied),
            duration(took),
            self.job_id
        );
        s += &format!("  tracking       {}\n", b.bitmap);
        s += &format!("  sha256         {}\n", b.sha256);
        for n in &self.notes {
            s += &format!("  note           {n}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::manifest::fixtures::{backup, disk};

    fn with_backups(kinds: &[BackupKind]) -> Manifest {
        let mut m = Manifest::new("c0ffee".into(), disk(), "qmp");
        for (i, k) in kinds.iter().enumerate() {
            let backing = match k {
                BackupKind::Incremental => m.backups.last().map(|b| b.file.clone()),
                BackupKind::Full => None,
            };
            m.backups.push(backup(i as u64, *k, backing.as_deref()));
        }
        m
    }

    #[test]
    fn the_first_backup_is_full_then_incremental_over_the_last() {
        let p = plan(None, false);
        assert_eq!((p.kind, p.index, p.backing), (BackupKind::Full, 0, None));
        assert_eq!(p.file, "0000-full.qcow2");
        let m = with_backups(&[BackupKind::Full, BackupKind::Incremental]);
        let p = plan(Some(&m), false);
        assert_eq!((p.kind, p.index), (BackupKind::Incremental, 2));
        assert_eq!(p.backing.as_deref(), Some("0001-incremental.qcow2"));
        assert_eq!(p.chain, "c0ffee");
        let p = plan(Some(&m), true);
        assert_eq!((p.kind, p.index, p.backing), (BackupKind::Full, 2, None));
        assert_eq!(p.file, "0002-full.qcow2");
    }

    /// Leaves in `dir` the record of a run killed after it recorded `pending`.
    fn killed_run(dir: &Path, pending: Pending) {
        let record = RunRecord {
            pid: std::process::id(),
            chain: "c0ffee".into(),
            index: 1,
            file: "0001-incremental.qcow2".into(),
            kind: BackupKind::Incremental,
            pending: Pending::default(),
        };
        let mut lock = RunLock::create(dir, record).unwrap();
        lock.note(|p| *p = pending).unwrap();
    }

    /// Why a run through `mine` does not start in `dir`, where it must not
    /// undo what a killed run left.
    async fn refusal(dir: &Path, mine: Tracking) -> String {
        let mut dir = open_dir(dir).unwrap();
        let not_undone = async |_: &Dir, _: &RunRecord, _: bool| -> Vec<String> {
            panic!("undone by the wrong endpoint kind")
        };
        let e = recover_and_check(&mut dir, &disk(), mine, not_undone).await;
        e.unwrap_err().reason
    }

    #[tokio::test]
    async fn a_killed_run_is_undone_only_through_its_endpoint_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let (at, pid) = (tmp.path().display(), std::process::id());
        let cases = [
            (
                Pending {
                    checkpoint: Some("cp".into()),
                    ..Pending::default()
                },
                Tracking::Qmp,
                format!("an earlier run through libvirt (pid {pid}) was killed in {at}: run the next backup with --libvirt, which undoes what it left"),
            ),
            (
                Pending {
                    bitmap_added: Some("b".into()),
                    ..Pending::default()
                },
                Tracking::Libvirt,
                format!("an earlier run through QMP (pid {pid}) was killed in {at}: run the next backup with --qmp, which undoes what it left"),
            ),
        ];
        for (pending, mine, why) in cases {
            killed_run(tmp.path(), pending);
            assert_eq!(refusal(tmp.path(), mine).await, why);
            chain::run::forget(tmp.path()).unwrap();
        }
    }

    #[tokio::test]
    async fn a_chain_goes_on_only_through_its_endpoint_kind() {
        let tmp = tempfile::tempdir().unwrap();
        with_backups(&[BackupKind::Full]).save(tmp.path()).unwrap();
        killed_run(
            tmp.path(),
            Pending {
                checkpoint: Some("cp".into()),
                ..Pending::default()
            },
        );
        // The killed libvirt run is undone (it had not committed), but the
        // chain is a QMP endpoint's.
        let mut dir = open_dir(tmp.path()).unwrap();
        let e = recover_and_check(
            &mut dir,
            &disk(),
            Tracking::Libvirt,
            async |_: &Dir, r: &RunRecord, committed: bool| {
                assert_eq!((r.index, committed), (1, false));
                Vec::new()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.reason,
            format!(
                "the chain in {} tracks changes with a bitmap on a QMP endpoint: continue it with --qmp",
                tmp.path().display()
            )
        );
        let mut dir = open_dir(tmp.path()).unwrap();
        assert!(dir.stale.is_none(), "the undone run's record is gone");
        let nothing_to_undo = async |_: &Dir, _: &RunRecord, _: bool| Vec::new();
        let note = recover_and_check(&mut dir, &disk(), Tracking::Qmp, nothing_to_undo).await;
        assert_eq!(note.unwrap(), None);
    }

    #[test]
    fn another_disk_size_is_refused() {
        let m = with_backups(&[BackupKind::Full]);
        let mut other = disk();
        other.size *= 2;
        assert!(check_identity(&m, &other).is_err());
        assert!(check_identity(&m, &disk()).is_ok());
    }
}
