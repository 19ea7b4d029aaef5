//! `livesnap backup --libvirt DOMAIN`: the chain's change tracking is
//! libvirt's checkpoints (persistent qcow2 bitmaps libvirt names after
//! them), as libvirt's own backup tools keep it:
//!
//! - every backup is a push-mode `virDomainBackupBegin` that creates the
//!   checkpoint of this backup in the same call (libvirt starts QEMU's
//!   backup and adds the bitmap in one transaction); an incremental names
//!   the previous backup's checkpoint in `<incremental>`;
//! - the image is created here first (a qcow2 backed by the previous
//!   backup, relative names) and handed to libvirt with `REUSE_EXTERNAL`;
//! - once the backup is in the manifest, the previous checkpoint is
//!   deleted (`virDomainCheckpointDelete`): only the newest one is needed.
//!   A run that fails deletes the checkpoint it created, which leaves the
//!   previous one tracking everything since the last committed backup.
//!
//! DIR must be on the libvirt host (the URI local): livesnap writes the
//! image's header and reads it back to check and checksum it.

use tokio::time::Instant;
use virt_sys as sys;

use super::{
    open_dir, plan, recover_and_check, take, Dir, EndpointRun, Options, Report, RunState, Taken,
    Tracking,
};
use crate::chain::manifest::{Backup, BackupKind, DiskIdentity};
use crate::chain::run::{Pending, RunRecord};
use crate::error::{Failure, Result};
use crate::libvirt::xml::{self, DiskDef};
use crate::libvirt::{resolve_uri, Libvirt};
use crate::signals::Interrupt;
use crate::snapshot::during;
use crate::snapshot::libvirt::{
    job_gone, limit_backup_speed, wait_backup_job, Running, CLEANUP_BUDGET, CLOSE_WAIT,
};
use crate::target::{self, TargetSpec};
use crate::units::{bytes, Stamp};
use crate::wait::Clock;

/// The libvirt checkpoint taken with backup `index` of chain `chain`.
pub fn checkpoint_name(chain: &str, index: u64) -> String {
    format!("livesnap-chain-{chain}-{index}")
}

/// Runs `livesnap backup --libvirt DOMAIN`.
pub async fn run(
    domain: &str,
    uri: Option<&str>,
    opts: &Options,
    interrupt: Interrupt,
) -> Result<Report> {
    let started = Stamp::now();
    let mut clock = Clock::new(opts.deadline, interrupt);
    let mut dir = open_dir(&opts.dir)?;
    let uri = resolve_uri(uri);
    let mut lv = clock.connect(|t| Libvirt::open(&uri, domain, t)).await?;
    if !lv.is_local() {
        return Err(Failure::usage(
            "a backup chain through libvirt needs a local URI: DIR must be on the libvirt host",
        ));
    }
    if lv.versions.0 < (6, 0, 0) {
        return Err(Failure::usage(
            "this libvirt has no backup API with checkpoints (libvirt 6.0 or later)",
        ));
    }
    let disks = lv.disks().await?;
    let Some(disk) = xml::find(&disks, &opts.disk).cloned() else {
        return Err(Failure::usage(format!(
            "domain {} has no disk {} (disks: {})",
            lv.name,
            opts.disk,
            disks
                .iter()
                .map(|d| d.target.clone())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    if disk.format.as_deref() != Some("qcow2") {
        return Err(Failure::usage(format!(
            "disk {} of domain {} is {}: libvirt keeps checkpoints only in qcow2 images",
            disk.target,
            lv.name,
            disk.format.as_deref().unwrap_or("of unknown format")
        )));
    }
    let size = lv.capacity(&disk.target).await?;
    let identity = DiskIdentity {
        name: opts.disk.clone(),
        node: disk.target.clone(),
        file: disk.source.clone().unwrap_or_default(),
        size,
        endpoint: format!("libvirt {} {}", lv.uri, lv.name),
    };
    let recovered = recover_and_check(
        &mut dir,
        &identity,
        Tracking::Libvirt,
        async |dir, stale, committed| undo_run(&mut lv, dir, stale, committed).await,
    )
    .await?;
    let notes: Vec<String> = recovered.into_iter().collect();
    let plan = plan(dir.manifest.as_ref(), opts.full);
    let previous = dir
        .manifest
        .as_ref()
        .and_then(|m| m.last())
        .map(|b| b.bitmap.clone());
    let previous_there = match &previous {
        Some(p) => lv.checkpoint_exists(p).await?,
        None => false,
    };
    if plan.kind == BackupKind::Incremental && !previous_there {
        return Err(Failure::usage(format!(
            "domain {} has no checkpoint {}: the chain's change tracking is lost (a transient domain restarted, or the checkpoint was deleted); an incremental backup now could miss changes; `livesnap backup --full` starts a new full backup in this chain",
            lv.name,
            previous.unwrap_or_default()
        )));
    }
    let checkpoint = checkpoint_name(&plan.chain, plan.index);
    let pending = Pending {
        checkpoint: Some(checkpoint.clone()),
        checkpoint_replaced: previous.filter(|_| previous_there),
        ..Pending::default()
    };
    let run = Run {
        st: RunState::begin(&dir, opts, clock, identity, plan, pending, notes)?,
        lv,
        disk,
        disks,
        checkpoint,
        job_running: false,
    };
    take(run, &dir, started).await
}

/// One backup run through libvirt.
struct Run<'a> {
    st: RunState<'a>,
    lv: Libvirt,
    disk: DiskDef,
    disks: Vec<DiskDef>,
    /// This backup's checkpoint.
    checkpoint: String,
    job_running: bool,
}

impl<'a> EndpointRun<'a> for Run<'a> {
    fn state(&mut self) -> &mut RunState<'a> {
        &mut self.st
    }

    async fn take(&mut self, dir: &Dir) -> Result<Backup> {
        let what = format!(
            "{} of domain {} ({})",
            self.disk.target,
            self.lv.name,
            bytes(self.st.identity.size)
        );
        self.st.announce(dir, &what)?;
        let plan = &self.st.plan;
        target::create_local(&TargetSpec {
            path: self.st.path(dir),
            format: livesnap_block::ImageFormat::Qcow2,
            size: self.st.identity.size,
            backing: plan.backing.clone().map(|b| (b, "qcow2".to_string())),
            blkdebug: None,
        })
        .await
        .map_err(|f| during(f, "creating the target"))?;
        let incremental = match plan.kind {
            BackupKind::Incremental => self.st.pending.checkpoint_replaced.clone(),
            BackupKind::Full => None,
        };
        let backup = xml::push_backup(
            &self.disks,
            &self.disk.target,
            &self.st.path(dir).to_string_lossy(),
            "qcow2",
            incremental.as_deref(),
        );
        let checkpoint = xml::checkpoint(
            &self.disks,
            &self.disk.target,
            &self.checkpoint,
            &format!(
                "livesnap backup chain {}, backup {}",
                plan.chain, plan.index
            ),
        );
        self.st.record_pending()?;
        self.st.clock.check()?;
        self.st.progress.start(self.st.identity.size);
        self.job_running = true;
        let t0 = Stamp::now();
        let r = self
            .lv
            .backup_begin_checkpoint(
                backup,
                checkpoint,
                sys::VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL,
            )
            .await;
        let t1 = Stamp::now();
        if let Err(f) = r {
            self.job_running = false;
            return Err(f);
        }
        self.st
            .progress
            .note("livesnap: point in time fixed (backup started, checkpoint created); copying");
        if let Some(speed) = self.st.opts.speed {
            let note = limit_backup_speed(&self.lv, &self.disk.target, speed).await;
            self.st.notes.push(note);
        }
        let copied = wait_backup_job(&mut self.lv, &mut self.st.clock, &mut self.st.progress).await;
        let (done, _) = match copied {
            Ok(c) => c,
            Err(f) => {
                if f.kind == crate::error::Kind::Job {
                    self.job_running = false;
                }
                return Err(during(f, "the backup job ran"));
            }
        };
        self.job_running = false;
        target::wait_closed(&self.st.path(dir), CLOSE_WAIT)
            .await
            .map_err(|f| during(f, "waiting for libvirt to close the backup"))?;
        let taken = Taken {
            window: (t0, t1),
            defined_by: "virDomainBackupBegin (with its checkpoint) call to its return",
            bytes_copied: done,
            bitmap: self.checkpoint.clone(),
        };
        let entry = self.st.commit(dir, Tracking::Libvirt, taken).await?;
        self.after_commit().await;
        Ok(entry)
    }

    /// After a failure: the backup aborted and gone, the checkpoint it
    /// created deleted, the partial file removed.
    async fn cleanup(&mut self, dir: &Dir) -> (Vec<String>, Option<&'static str>) {
        let end = Instant::now() + CLEANUP_BUDGET;
        let mut left = Vec::new();
        let mut aborted = false;
        if self.job_running {
            aborted = self.lv.abort_job().await.is_ok();
            if let Some(seen) =
                job_gone(&mut self.lv, &self.disk.target, Running::Backup, end).await
            {
                left.push(format!(
                    "the backup job (still there after its abort: {seen})"
                ));
            }
            self.job_running = false;
        }
        let stopped = aborted.then_some("backup aborted");
        let Some(record) = self.st.to_undo() else {
            return (left, stopped);
        };
        if !left.is_empty() {
            left.push(format!(
                "file {} (the job still uses it)",
                self.st.path(dir).display()
            ));
            return (left, stopped);
        }
        left.extend(undo_run(&mut self.lv, dir, &record, false).await);
        self.st.release_if_undone(&mut left);
        (left, stopped)
    }

    fn job_id(&self) -> String {
        "backup".into()
    }

    fn endpoint_name(&self) -> String {
        self.lv.endpoint_name()
    }
}

impl Run<'_> {
    /// After the manifest has the backup, the previous checkpoint goes:
    /// the new one tracks from here on.
    async fn after_commit(&mut self) {
        let mut failed = None;
        if let Some(old) = self.st.pending.checkpoint_replaced.clone() {
            if let Err(f) = self.lv.checkpoint_delete(&old).await {
                failed = Some(format!("checkpoint {old} ({})", f.reason));
            }
        }
        self.st.end_committed(failed.map(|what| {
            format!(
                "the backup is committed, but {what} could not be deleted; the next backup run deletes it"
            )
        }));
    }
}

/// Undoes what run `r` changed unless it `committed`: a killed run's backup job
/// aborted, the checkpoint it created deleted (the previous one then
/// tracks everything since the last committed backup), its partial file
/// removed; once committed, only the checkpoint it replaced goes.
/// Returns what could not be undone.
async fn undo_run(lv: &mut Libvirt, dir: &Dir, r: &RunRecord, committed: bool) -> Vec<String> {
    let mut left = Vec::new();
    if r.pid != std::process::id() {
        if let Ok(j) = lv.job_stats(false).await {
            if j.kind != sys::VIR_DOMAIN_JOB_NONE as i32 && j.operation() == Some("backup") {
                let _ = lv.abort_job().await;
                let until = Instant::now() + CLEANUP_BUDGET;
                if let Some(seen) = job_gone(lv, "", Running::Backup, until).await {
                    left.push(format!("the killed run's backup job ({seen})"));
                    return left;
                }
            }
        }
    }
    let p = &r.pending;
    if let Some(cp) = &p.checkpoint {
        if !committed {
            if let Err(f) = lv.checkpoint_delete(cp).await {
                left.push(format!("checkpoint {cp} ({})", f.reason));
            }
        }
    }
    if let Some(cp) = &p.checkpoint_replaced {
        if committed {
            if let Err(f) = lv.checkpoint_delete(cp).await {
                left.push(format!("checkpoint {cp} ({})", f.reason));
            }
        }
    }
    if !committed {
        left.extend(crate::snapshot::remove_target_file(&dir.path.join(&r.file)));
    }
    left
}
