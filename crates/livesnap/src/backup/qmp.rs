//! `livesnap backup` through QMP (livesnapd, qemu-storage-daemon,
//! qemu-system-*): the chain owns one dirty bitmap on the disk's node,
//! persistent where the format can keep it (qcow2).
//!
//! - full: one `transaction` of `block-dirty-bitmap-add` and
//!   `blockdev-backup sync=full`, so the bitmap starts exactly at the
//!   backup's point in time;
//! - incremental: one `transaction` of `block-dirty-bitmap-add` (an undo
//!   bitmap, disabled), `block-dirty-bitmap-merge` of the chain's bitmap
//!   into it, and `blockdev-backup sync=incremental` with the chain's
//!   bitmap. QEMU's on-success mode gives the bits back to the chain's
//!   bitmap when the job fails; the undo bitmap gives them back when the
//!   job succeeded but the backup could not be committed (a failed check,
//!   the deadline, a signal, a kill): merged back, the chain's bitmap again
//!   covers everything since the last committed backup. It is removed once
//!   the backup is in the manifest.

use std::path::Path;

use serde_json::{json, Value};

use super::{
    open_dir, plan, recover_and_check, take, Dir, EndpointRun, Options, Report, RunState, Taken,
    Tracking,
};
use crate::chain;
use crate::chain::manifest::{Backup, BackupKind, DiskIdentity};
use crate::chain::run::{Pending, RunRecord};
use crate::disk::{self, Disk};
use crate::endpoint::{array, str_of, Endpoint};
use crate::error::{Failure, Result};
use crate::signals::Interrupt;
use crate::snapshot::during;
use crate::snapshot::qmp::{
    force_cancel, remove_after_job, revive, JobWatch, Want, CLEANUP_BUDGET, GONE_WAIT,
};
use crate::target::{self, TargetSpec};
use crate::units::{bytes, Stamp};
use crate::wait::Clock;

/// The commands a chain needs from the endpoint.
const NEEDED: &[&str] = &[
    "transaction",
    "blockdev-backup",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-merge",
    "block-dirty-bitmap-remove",
];

/// Runs `livesnap backup` against the QMP socket `qmp`.
pub async fn run(qmp: &Path, opts: &Options, interrupt: Interrupt) -> Result<Report> {
    let started = Stamp::now();
    let mut clock = Clock::new(opts.deadline, interrupt);
    let mut dir = open_dir(&opts.dir)?;
    let mut ep = clock.connect(|t| Endpoint::connect(qmp, t)).await?;
    let missing: Vec<&str> = NEEDED.iter().copied().filter(|c| !ep.caps.has(c)).collect();
    if !missing.is_empty() {
        return Err(Failure::usage(format!(
            "the endpoint has no {}: a backup chain needs dirty bitmaps and transactions (the bitmap must start at the backup's instant)",
            missing.join(", ")
        )));
    }
    let disk = disk::resolve(&mut ep, &opts.disk).await?;
    let identity = DiskIdentity {
        name: opts.disk.clone(),
        node: disk.node.clone(),
        file: disk.filename.clone(),
        size: disk.size,
        endpoint: format!("qmp {}", qmp.display()),
    };
    let recovered = recover_and_check(
        &mut dir,
        &identity,
        Tracking::Qmp,
        async |dir, stale, committed| undo_run(&mut ep, &disk.node, dir, stale, committed).await,
    )
    .await?;
    let mut notes: Vec<String> = recovered.into_iter().collect();
    let plan = plan(dir.manifest.as_ref(), opts.full);
    let present = bitmaps_of(&mut ep, &disk.node).await?;
    let current = dir
        .manifest
        .as_ref()
        .and_then(|m| m.last())
        .map(|b| b.bitmap.clone());
    let persistent = disk.driver == "qcow2";
    let mut pending = Pending::default();
    let tracking = match (plan.kind, &current) {
        (BackupKind::Incremental, Some(b)) => {
            usable(&present, b, &disk, &opts.disk)?;
            pending.undo = Some((chain::undo_bitmap_name(&plan.chain, plan.index), b.clone()));
            b.clone()
        }
        _ => {
            let new = chain::bitmap_name(&plan.chain, plan.index);
            pending.bitmap_added = Some(new.clone());
            pending.bitmap_replaced = current.filter(|b| find(&present, b).is_some());
            new
        }
    };
    if !persistent {
        notes.push(format!(
            "the disk's format ({}) cannot keep a persistent bitmap: the change tracking lives only as long as the endpoint runs; after a restart the next backup needs --full",
            disk.driver
        ));
    }
    let run = Run {
        st: RunState::begin(&dir, opts, clock, identity, plan, pending, notes)?,
        ep,
        disk,
        tracking,
        persistent,
        job: format!("{}-job", target::node_prefix()),
        added: Vec::new(),
        job_running: false,
    };
    take(run, &dir, started).await
}

/// The `dirty-bitmaps` of node `node`.
async fn bitmaps_of(ep: &mut Endpoint, node: &str) -> Result<Vec<Value>> {
    let nodes = ep.named_nodes().await?;
    Ok(nodes
        .into_iter()
        .find(|n| str_of(n, "node-name") == node)
        .map(|n| array(n["dirty-bitmaps"].clone()))
        .unwrap_or_default())
}

fn find<'a>(bitmaps: &'a [Value], name: &str) -> Option<&'a Value> {
    bitmaps.iter().find(|b| str_of(b, "name") == name)
}

/// The chain's bitmap can carry an incremental backup: it is there,
/// consistent, recording, and no job or export holds it.
fn usable(bitmaps: &[Value], name: &str, disk: &Disk, given: &str) -> Result<()> {
    let hint = "an incremental backup now could miss changes; `livesnap backup --full` starts a new full backup in this chain";
    let Some(b) = find(bitmaps, name) else {
        return Err(Failure::usage(format!(
            "the disk {given} (node {}) has no bitmap {name}: the chain's change tracking is lost (the VM or daemon restarted without it, or it was removed); {hint}",
            disk.node
        )));
    };
    if b["inconsistent"] == true {
        return Err(Failure::usage(format!(
            "the bitmap {name} on {given} is inconsistent (the process that had the image open ended without saving it, e.g. a crash); {hint}"
        )));
    }
    if b["busy"] == true {
        return Err(Failure::usage(format!(
            "the bitmap {name} on {given} is in use by a job or an export; try again once that has ended"
        )));
    }
    if b["recording"] == false {
        return Err(Failure::usage(format!(
            "the bitmap {name} on {given} is disabled (someone ran block-dirty-bitmap-disable): it did not record every change; {hint}"
        )));
    }
    Ok(())
}

/// One backup run through QMP.
struct Run<'a> {
    st: RunState<'a>,
    ep: Endpoint,
    disk: Disk,
    /// The bitmap that tracks changes after this backup.
    tracking: String,
    persistent: bool,
    job: String,
    added: Vec<String>,
    job_running: bool,
}

impl<'a> EndpointRun<'a> for Run<'a> {
    fn state(&mut self) -> &mut RunState<'a> {
        &mut self.st
    }

    async fn take(&mut self, dir: &Dir) -> Result<Backup> {
        let what = format!(
            "{} ({}, {})",
            self.st.opts.disk,
            self.disk.node,
            bytes(self.disk.size)
        );
        self.st.announce(dir, &what)?;
        let spec = TargetSpec {
            path: self.st.path(dir),
            format: livesnap_block::ImageFormat::Qcow2,
            size: self.disk.size,
            // Relative, so that DIR can move with its chain.
            backing: self
                .st
                .plan
                .backing
                .clone()
                .map(|b| (b, "qcow2".to_string())),
            blkdebug: None,
        };
        let target = target::create(
            &mut self.ep,
            &mut self.st.clock,
            &spec,
            self.st.opts.create_via,
            &mut self.added,
        )
        .await
        .map_err(|f| during(f, "creating the target"))?;
        self.st
            .clock
            .check()
            .map_err(|f| during(f, "creating the target"))?;
        let actions = self.actions(&target.node);
        self.st.record_pending()?;
        let mut watch = JobWatch::backup(&self.job);
        self.st.progress.start(self.disk.size);
        self.job_running = true;
        let t0 = Stamp::now();
        let r = self
            .ep
            .call("transaction", json!({ "actions": actions }))
            .await;
        let t1 = Stamp::now();
        if let Err(e) = r? {
            self.job_running = false;
            return Err(Failure::endpoint(format!("transaction: {}", e.desc)));
        }
        self.st.progress.note(
            "livesnap: point in time fixed (backup started, change tracking from here on); copying",
        );
        let end = watch
            .wait(
                &mut self.ep,
                &mut self.st.clock,
                &mut self.st.progress,
                Want::Completed,
            )
            .await
            .map_err(|f| during(f, "the backup job ran"))?;
        self.job_running = false;
        let left = remove_after_job(&mut self.ep, &self.job, &mut self.added).await;
        if !left.is_empty() {
            return Err(Failure::endpoint(format!(
                "could not remove the target's nodes: {}",
                left.join(", ")
            )));
        }
        let taken = Taken {
            window: (t0, t1),
            defined_by:
                "transaction (block-dirty-bitmap-add, blockdev-backup) command to its reply",
            bytes_copied: end["data"]["offset"].as_u64().unwrap_or(0),
            bitmap: self.tracking.clone(),
        };
        let entry = self.st.commit(dir, Tracking::Qmp, taken).await?;
        self.after_commit().await;
        Ok(entry)
    }

    /// After a failure: the job cancelled, the target's nodes and file
    /// removed, the bitmaps as they were.
    async fn cleanup(&mut self, dir: &Dir) -> (Vec<String>, Option<&'static str>) {
        let mut left = Vec::new();
        if let Err(f) = revive(&mut self.ep).await {
            left.push(format!("everything on the endpoint ({})", f.reason));
            return (left, None);
        }
        let mut cancelled = false;
        if self.job_running {
            cancelled = force_cancel(&mut self.ep, &self.job, &mut left).await;
            self.job_running = false;
        }
        let stopped = cancelled.then_some("job force-cancelled");
        let nodes_left = target::remove_added(&mut self.ep, &mut self.added, CLEANUP_BUDGET).await;
        let kept = !nodes_left.is_empty();
        left.extend(nodes_left);
        let Some(record) = self.st.to_undo() else {
            return (left, stopped);
        };
        if kept {
            left.push(format!(
                "file {} (a node still uses it)",
                self.st.path(dir).display()
            ));
        } else {
            left.extend(undo_run(&mut self.ep, &self.disk.node, dir, &record, false).await);
        }
        self.st.release_if_undone(&mut left);
        (left, stopped)
    }

    fn job_id(&self) -> String {
        self.job.clone()
    }

    fn endpoint_name(&self) -> String {
        self.ep.caps.endpoint_name()
    }
}

impl Run<'_> {
    /// The transaction's actions.
    fn actions(&self, target: &str) -> Vec<Value> {
        let node = &self.disk.node;
        let mut backup = json!({
            "job-id": self.job, "device": node, "target": target,
        });
        if let Some(s) = self.st.opts.speed {
            backup["speed"] = json!(s);
        }
        if self.ep.caps.backup_cbw_args() {
            // A failing target breaks the backup, never a guest write.
            backup["on-cbw-error"] = json!("break-snapshot");
        }
        let mut actions = Vec::new();
        match &self.st.pending.undo {
            Some((undo, chain_bitmap)) => {
                actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                    "node": node, "name": undo, "persistent": self.persistent, "disabled": true}}));
                actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                    "node": node, "target": undo, "bitmaps": [chain_bitmap]}}));
                backup["sync"] = json!("incremental");
                backup["bitmap"] = json!(chain_bitmap);
            }
            None => {
                actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                    "node": node, "name": self.tracking, "persistent": self.persistent}}));
                backup["sync"] = json!("full");
            }
        }
        actions.push(json!({"type": "blockdev-backup", "data": backup}));
        actions
    }

    /// After the manifest has the backup: the undo bitmap and a replaced
    /// chain bitmap go. A failure here leaves the run record, so the next
    /// run removes them (the backup itself stands).
    async fn after_commit(&mut self) {
        let mut gone = Vec::new();
        if let Some((undo, _)) = &self.st.pending.undo {
            gone.push(undo.clone());
        }
        if let Some(old) = &self.st.pending.bitmap_replaced {
            gone.push(old.clone());
        }
        let mut failed = Vec::new();
        for b in gone {
            failed.extend(remove_bitmap(&mut self.ep, &self.disk.node, &b).await);
        }
        self.st.end_committed((!failed.is_empty()).then(|| {
            format!(
                "the backup is committed, but {} could not be removed; the next backup run removes it",
                failed.join(", ")
            )
        }));
    }
}

/// `block-dirty-bitmap-remove`; a bitmap that is not there counts as
/// removed. Returns what is left if it could not be removed.
async fn remove_bitmap(ep: &mut Endpoint, node: &str, name: &str) -> Option<String> {
    let why = match ep
        .call(
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": name}),
        )
        .await
    {
        Ok(Ok(_)) => return None,
        Ok(Err(e)) if e.desc.contains("not found") => return None,
        Ok(Err(e)) => e.desc,
        Err(f) => f.reason,
    };
    Some(format!("bitmap {name} ({why})"))
}

/// Undoes what the run `r` changed, unless it `committed`: a job
/// and nodes of a killed run, the undo bitmap merged back into the chain's
/// bitmap, a bitmap it added, its partial file. Once it committed, only
/// what commit makes obsolete goes (the undo bitmap, a replaced bitmap).
/// Returns what could not be undone.
async fn undo_run(
    ep: &mut Endpoint,
    node: &str,
    dir: &Dir,
    r: &RunRecord,
    committed: bool,
) -> Vec<String> {
    let mut left = Vec::new();
    if r.pid != std::process::id() {
        // A killed run's job may still run, its nodes still hold the file.
        let prefix = format!("livesnap-{}-", r.pid);
        let job = format!("{prefix}job");
        if let Ok(jobs) = ep.block_jobs().await {
            if jobs.iter().any(|j| str_of(j, "device") == job) {
                force_cancel(ep, &job, &mut left).await;
            }
        }
        let mut nodes: Vec<String> = ep
            .named_nodes()
            .await
            .unwrap_or_default()
            .iter()
            .map(|n| str_of(n, "node-name").to_string())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        // The format node first, then what is under it.
        nodes.sort_by_key(|n| !n.ends_with("-tgt"));
        left.extend(target::remove_nodes(ep, &nodes, GONE_WAIT).await);
    }
    let present = match bitmaps_of(ep, node).await {
        Ok(b) => b,
        Err(f) => {
            left.push(format!("the bitmaps of {node} ({})", f.reason));
            return left;
        }
    };
    let p = &r.pending;
    if let Some((undo, into)) = &p.undo {
        if find(&present, undo).is_some() {
            let merged = if !committed && find(&present, into).is_some() {
                match ep
                    .call(
                        "block-dirty-bitmap-merge",
                        json!({"node": node, "target": into, "bitmaps": [undo]}),
                    )
                    .await
                {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => {
                        left.push(format!(
                            "the bits of {undo} not merged back into {into} ({})",
                            e.desc
                        ));
                        false
                    }
                    Err(f) => {
                        left.push(format!(
                            "the bits of {undo} not merged back into {into} ({})",
                            f.reason
                        ));
                        false
                    }
                }
            } else {
                true
            };
            if merged {
                left.extend(remove_bitmap(ep, node, undo).await);
            }
        }
    }
    if let Some(b) = &p.bitmap_added {
        if !committed && find(&present, b).is_some() {
            left.extend(remove_bitmap(ep, node, b).await);
        }
    }
    if let Some(b) = &p.bitmap_replaced {
        if committed && find(&present, b).is_some() {
            left.extend(remove_bitmap(ep, node, b).await);
        }
    }
    if !committed {
        left.extend(crate::snapshot::remove_target_file(&dir.path.join(&r.file)));
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> Disk {
        Disk {
            node: "disk".into(),
            device: None,
            driver: "qcow2".into(),
            size: 1 << 20,
            filename: "/d".into(),
            backing: None,
        }
    }

    #[test]
    fn tracking_that_cannot_be_trusted_stops_an_incremental() {
        let ok = json!({"name": "b", "recording": true, "busy": false, "persistent": true});
        assert!(usable(std::slice::from_ref(&ok), "b", &disk(), "disk").is_ok());
        let why = |b: Value| usable(&[b], "b", &disk(), "disk").unwrap_err().reason;
        assert!(why(json!({"name": "x"})).contains("no bitmap b"));
        let mut bad = ok.clone();
        bad["inconsistent"] = json!(true);
        assert!(why(bad).contains("inconsistent"));
        let mut bad = ok.clone();
        bad["recording"] = json!(false);
        assert!(why(bad).contains("disabled"));
        let mut bad = ok;
        bad["busy"] = json!(true);
        assert!(why(bad).contains("in use"));
    }
}
