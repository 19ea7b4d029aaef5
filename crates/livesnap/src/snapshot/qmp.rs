//! `livesnap snapshot` through QMP (livesnapd, qemu-storage-daemon,
//! qemu-system-*): creates the target, runs a backup or mirror job, follows
//! it by its events (never by polling), fixes the point in time, removes the
//! target's nodes and reports. On a deadline, an error event or a signal it
//! force-cancels the job, removes the nodes and the partial file, and
//! leaves the source as it was.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::quiesce::{Agent, Freezer};
use super::{
    during, failure_after_cleanup, new_target_path, remove_target_file, CopyMode, FreezeArg,
    MethodArg, Options, SyncMode,
};
use crate::disk::{self, Disk};
use crate::endpoint::{str_of, Caps, Endpoint};
use crate::error::{Failure, Kind, Result};
use crate::progress::{Progress, Sample, LINE_INTERVAL};
use crate::qga::Qga;
use crate::report::{Quiesce, Report};
use crate::signals::Interrupt;
use crate::target::{self, TargetSpec};
use crate::units::{bytes, duration, Stamp};
use crate::wait::{Clock, Waited};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Backup,
    Mirror,
}

/// What will be run, decided from the endpoint's capabilities.
#[derive(Clone, Debug)]
struct Plan {
    method: Method,
    sync: SyncMode,
    /// Mirror: `copy-mode` to start with.
    copy_mode: Option<CopyMode>,
    /// Mirror: switch to write-blocking with `block-job-change` when the
    /// remaining bytes have not reached a new low for this long.
    switch: Option<Duration>,
    /// Mirror: switch in READY before the soft cancel (QEMU's background
    /// mode waits for a clean instant that a busy guest may never give it).
    switch_at_ready: bool,
    /// Backup: send `on-cbw-error: break-snapshot` and `cbw-timeout`.
    cbw: bool,
    why: String,
}

/// How long the remaining bytes may fail to reach a new low before a
/// background mirror is switched to write-blocking.
const SWITCH_PATIENCE: Duration = Duration::from_secs(2);
/// The same for livesnapd's auto mode, which should switch by itself after
/// its own patience (1 s by default): a safety net, not the rule.
const AUTO_SAFETY_PATIENCE: Duration = Duration::from_secs(5);
/// A new low must be this much below the old one.
const SWITCH_PROGRESS: f64 = 0.95;
/// Budget of the clean-up after a failure (on top of the deadline).
pub(crate) const CLEANUP_BUDGET: Duration = Duration::from_secs(20);
/// How long a force-cancelled job may take to go.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// How long a finished job may take to be dismissed.
pub(crate) const GONE_WAIT: Duration = Duration::from_secs(5);
/// Connecting and syncing with the guest agent.
const QGA_CONNECT: Duration = Duration::from_secs(5);

fn decide(caps: &Caps, opts: &Options, disk: &Disk) -> Result<Plan> {
    let sync = if opts.shallow && disk.backing.is_some() {
        SyncMode::Top
    } else {
        SyncMode::Full
    };
    let backup = caps.has("blockdev-backup");
    let mirror = caps.has("blockdev-mirror");
    let backup_plan = |why: String| Plan {
        method: Method::Backup,
        sync,
        copy_mode: None,
        switch: None,
        switch_at_ready: false,
        cbw: caps.backup_cbw_args(),
        why,
    };
    // A mirror must have a way to converge under guest writes: livesnapd's
    // auto mode, a switch to write-blocking at run time, or write-blocking
    // from the start. A plain background mirror may never reach READY.
    let mirror_plan = |why: &str| -> Option<Plan> {
        let change = caps.has("block-job-change") && caps.mirror_mode("write-blocking");
        let (mode, switch, at_ready, how) = match opts.copy_mode {
            Some(CopyMode::WriteBlocking) if caps.mirror_mode("write-blocking") => {
                (CopyMode::WriteBlocking, None, false, "write-blocking from the start (requested)")
            }
            Some(CopyMode::Auto) if caps.mirror_mode("auto") => (
                CopyMode::Auto,
                change.then_some(AUTO_SAFETY_PATIENCE),
                false,
                "copy-mode auto (requested)",
            ),
            Some(_) => return None,
            None if caps.mirror_mode("auto") => (
                CopyMode::Auto,
                change.then_some(AUTO_SAFETY_PATIENCE),
                false,
                "copy-mode auto (livesnapd switches to write-blocking itself)",
            ),
            None if change => (
                CopyMode::Background,
                Some(SWITCH_PATIENCE),
                true,
                "background, switched to write-blocking with block-job-change when it stops converging",
            ),
            None if caps.mirror_mode("write-blocking") => (
                CopyMode::WriteBlocking,
                None,
                false,
                "write-blocking from the start (no block-job-change)",
            ),
            None => return None,
        };
        Some(Plan {
            method: Method::Mirror,
            sync,
            copy_mode: Some(mode),
            switch,
            switch_at_ready: at_ready,
            cbw: false,
            why: format!("{why}; {how}"),
        })
    };
    let no_safe_mirror = match opts.copy_mode {
        Some(m) => format!("the endpoint's blockdev-mirror has no copy-mode {}", m.name()),
        None => "the endpoint's blockdev-mirror has neither copy-mode write-blocking nor block-job-change: a background mirror may never converge under guest writes".into(),
    };
    match opts.method {
        MethodArg::Backup if backup => Ok(backup_plan("requested".into())),
        MethodArg::Backup => Err(Failure::usage(
            "the endpoint has no blockdev-backup; try --method mirror",
        )),
        MethodArg::Mirror if mirror => {
            mirror_plan("requested").ok_or_else(|| Failure::usage(no_safe_mirror.clone()))
        }
        MethodArg::Mirror => Err(Failure::usage(
            "the endpoint has no blockdev-mirror; try --method backup",
        )),
        MethodArg::Auto if backup => Ok(backup_plan(
            "auto: backup has no convergence loop (work bounded by the disk size)".into(),
        )),
        MethodArg::Auto => mirror_plan("auto: the endpoint has no blockdev-backup").ok_or_else(|| {
            Failure::usage(format!(
                "the endpoint supports no bounded snapshot method: no blockdev-backup, and {no_safe_mirror}"
            ))
        }),
    }
}

/// Where the snapshot stands, for the clean-up after a failure.
#[derive(Default)]
struct State {
    /// Nodes added, in order.
    added: Vec<String>,
    /// The target file may exist because we (tried to) create it.
    file_created: bool,
    /// The job was started and has not been seen to end.
    job_running: Option<String>,
    /// That job is a mirror not yet READY.
    mirror_early: bool,
    notes: Vec<String>,
}

/// How the job ended: the point-in-time window and what delimits it.
struct Outcome {
    window: (Stamp, Stamp),
    end_event: Value,
    defined_by: &'static str,
    copy_mode: Option<String>,
    switched: bool,
}

/// One snapshot through QMP: what every step reads and updates.
struct Run<'a> {
    ep: Endpoint,
    clock: Clock,
    progress: Progress,
    opts: &'a Options,
    disk: Disk,
    plan: Plan,
    spec: TargetSpec,
    freezer: Freezer,
    st: State,
    job: String,
}

/// Runs `livesnap snapshot` against the QMP socket `qmp`.
pub async fn run(qmp: &Path, opts: &Options, interrupt: Interrupt) -> Result<Report> {
    let started = Stamp::now();
    let mut clock = Clock::new(opts.deadline, interrupt);
    let progress = Progress::new(opts.quiet);
    let path = new_target_path(&opts.target)?;
    let mut ep = clock.connect(|t| Endpoint::connect(qmp, t)).await?;
    let disk = disk::resolve(&mut ep, &opts.disk).await?;
    let plan = decide(&ep.caps, opts, &disk)?;
    let backing = match (&plan.sync, &disk.backing) {
        (SyncMode::Top, Some(b)) => match &b.format {
            Some(f) => Some((b.filename.clone(), f.clone())),
            None => {
                return Err(Failure::usage(format!(
                    "the format of the backing file {} is unknown (formats are never probed); --shallow needs it",
                    b.filename
                )))
            }
        },
        _ => None,
    };
    if opts.shallow && backing.is_none() {
        progress.note(&format!(
            "note: {} has no backing image, so --shallow makes a full copy",
            opts.disk
        ));
    }
    let agent = match &opts.freeze {
        Some(FreezeArg::Qga(p)) => Some(Agent::Qga(Box::new(
            Qga::connect(p, QGA_CONNECT)
                .await
                .map_err(|e| Failure::new(Kind::GuestAgent, e))?,
        ))),
        Some(FreezeArg::Endpoint) => {
            return Err(Failure::usage(
                "--freeze needs the guest agent's socket (QGA_SOCKET) with --qmp",
            ))
        }
        None => None,
    };
    let spec = TargetSpec {
        path: path.clone(),
        format: opts.format,
        size: disk.size,
        backing,
        blkdebug: opts.target_blkdebug.clone(),
    };
    let mut run = Run {
        ep,
        clock,
        progress,
        opts,
        disk,
        plan,
        spec,
        freezer: Freezer::new(agent, opts.freeze_hold),
        st: State::default(),
        job: format!("{}-job", target::node_prefix()),
    };
    match run.snapshot().await {
        Ok(mut report) => {
            run.progress.finish();
            report.started = started;
            report.finished = Stamp::now();
            Ok(report)
        }
        Err(f) => {
            run.progress
                .note(&format!("livesnap: {}; cleaning up", f.reason));
            let (left, cancelled) = run.cleanup(&path).await;
            run.progress.finish();
            Err(failure_after_cleanup(
                f,
                cancelled.then_some("job force-cancelled"),
                &left,
                run.st.file_created,
            ))
        }
    }
}

impl Run<'_> {
    fn method_name(&self) -> &'static str {
        match self.plan.method {
            Method::Backup => "backup",
            Method::Mirror => "mirror",
        }
    }

    /// Creates the target, runs the job to its end and reports.
    async fn snapshot(&mut self) -> Result<Report> {
        self.progress.note(&format!(
            "livesnap: {} ({}, {}) -> {} by {}{} (sync={}), deadline {}",
            self.opts.disk,
            self.disk.node,
            bytes(self.disk.size),
            self.spec.path.display(),
            self.method_name(),
            self.plan
                .copy_mode
                .map(|m| format!(" copy-mode={}", m.name()))
                .unwrap_or_default(),
            self.plan.sync.name(),
            duration(self.opts.deadline)
        ));
        self.clock.check()?;
        self.st.file_created = true;
        let target = target::create(
            &mut self.ep,
            &mut self.clock,
            &self.spec,
            self.opts.create_via,
            &mut self.st.added,
        )
        .await
        .map_err(|f| during(f, "creating the target"))?;
        self.clock
            .check()
            .map_err(|f| during(f, "creating the target"))?;
        let mut args = json!({
            "job-id": self.job, "device": self.disk.node, "target": target.node,
            "sync": self.plan.sync.name(),
        });
        if let Some(s) = self.opts.speed {
            args["speed"] = json!(s);
        }
        let outcome = match self.plan.method {
            Method::Backup => self.backup(args).await?,
            Method::Mirror => self.mirror(args).await?,
        };
        self.st.job_running = None;
        self.remove_target_nodes().await?;
        Ok(self.report(outcome, target.created_via))
    }

    /// blockdev-backup: the point in time is between the command and its reply.
    async fn backup(&mut self, mut args: Value) -> Result<Outcome> {
        if self.plan.cbw {
            args["on-cbw-error"] = json!("break-snapshot");
            args["cbw-timeout"] = json!(self.opts.cbw_timeout);
        }
        let mut watch = JobWatch::new(&self.job, &self.plan);
        self.freezer.freeze().await?;
        let t0 = Stamp::now();
        self.progress.start(self.disk.size);
        self.st.job_running = Some(self.job.clone());
        let interrupt = self.clock.interrupt.clone();
        let r = self
            .freezer
            .while_frozen(
                &interrupt,
                "blockdev-backup",
                self.ep.call("blockdev-backup", args),
            )
            .await;
        let t1 = Stamp::now();
        self.freezer.thaw(true).await;
        if let Err(e) = r? {
            self.st.job_running = None;
            return Err(Failure::endpoint(format!("blockdev-backup: {}", e.desc)));
        }
        self.progress
            .note("livesnap: point in time fixed (backup started); copying");
        let end_event = watch
            .wait(
                &mut self.ep,
                &mut self.clock,
                &mut self.progress,
                Want::Completed,
            )
            .await
            .map_err(|f| during(f, "the backup job ran"))?;
        Ok(Outcome {
            window: (t0, t1),
            end_event,
            defined_by: "blockdev-backup command to its reply",
            copy_mode: None,
            switched: false,
        })
    }

    /// blockdev-mirror to READY, then a soft cancel: the point in time is
    /// between the cancel and BLOCK_JOB_COMPLETED.
    async fn mirror(&mut self, mut args: Value) -> Result<Outcome> {
        if let Some(m) = self.plan.copy_mode {
            args["copy-mode"] = json!(m.name());
        }
        let mut watch = JobWatch::new(&self.job, &self.plan);
        self.st.job_running = Some(self.job.clone());
        self.st.mirror_early = true;
        self.progress.start(self.disk.size);
        if let Err(e) = self.ep.call("blockdev-mirror", args).await? {
            self.st.job_running = None;
            return Err(Failure::endpoint(format!("blockdev-mirror: {}", e.desc)));
        }
        watch
            .wait(
                &mut self.ep,
                &mut self.clock,
                &mut self.progress,
                Want::Ready,
            )
            .await
            .map_err(|f| during(f, "waiting for the mirror to reach READY"))?;
        self.st.mirror_early = false;
        // QEMU's soft cancel in a background mirror waits for a clean
        // instant that busy guests may never give it.
        if self.plan.switch_at_ready && !watch.switched {
            watch
                .switch(
                    &mut self.ep,
                    &mut self.progress,
                    "in READY, before the soft cancel",
                )
                .await?;
        }
        let copy_mode = match self.plan.copy_mode {
            Some(m) if watch.switched => Some(format!("{}, then write-blocking", m.name())),
            m => m.map(|m| m.name().to_string()),
        };
        self.freezer.freeze().await?;
        let t0 = Stamp::now();
        self.ep
            .must(
                "block-job-cancel",
                json!({"device": self.job, "force": false}),
            )
            .await?;
        let interrupt = self.clock.interrupt.clone();
        let end = self
            .freezer
            .while_frozen(
                &interrupt,
                "the soft cancel",
                watch.wait(
                    &mut self.ep,
                    &mut self.clock,
                    &mut self.progress,
                    Want::CompletedAfterCancel,
                ),
            )
            .await;
        let t1 = Stamp::now();
        self.freezer.thaw(true).await;
        let end_event = end.map_err(|f| during(f, "the mirror finished its soft cancel"))?;
        Ok(Outcome {
            window: (t0, t1),
            end_event,
            defined_by: "soft block-job-cancel sent to BLOCK_JOB_COMPLETED received",
            copy_mode,
            switched: watch.switched,
        })
    }

    /// After the job's end: the target's nodes go ([`remove_after_job`]);
    /// if one cannot, the complete copy is kept and the snapshot fails.
    async fn remove_target_nodes(&mut self) -> Result<()> {
        let left = remove_after_job(&mut self.ep, &self.job, &mut self.st.added).await;
        if !left.is_empty() {
            // The copy is complete, but a node still has the file open: keep it.
            self.st.file_created = false;
            return Err(Failure::endpoint(format!(
                "snapshot {} complete but could not remove {}",
                self.spec.path.display(),
                left.join(", ")
            )));
        }
        Ok(())
    }

    fn report(&mut self, o: Outcome, created_via: &'static str) -> Report {
        let data = &o.end_event["data"];
        let guest_effect = guest_effect(&self.plan, self.opts, o.switched, self.freezer.quiesce());
        let mut notes = std::mem::take(&mut self.st.notes);
        notes.extend(self.freezer.take_notes());
        Report {
            method: self.method_name(),
            copy_mode: o.copy_mode,
            sync: self.plan.sync.name(),
            disk: self.opts.disk.clone(),
            node: self.disk.node.clone(),
            driver: self.disk.driver.clone(),
            file: self.disk.filename.clone(),
            device: self.disk.device.clone(),
            size: self.disk.size,
            target: self.spec.path.to_string_lossy().into_owned(),
            format: self.spec.format.name(),
            backing: self.spec.backing.as_ref().map(|b| b.0.clone()),
            created_via,
            job_id: self.job.clone(),
            window: o.window,
            window_defined_by: o.defined_by,
            bytes_copied: data["offset"].as_u64().unwrap_or(0),
            bytes_total: data["len"].as_u64().unwrap_or(0),
            started: o.window.0,
            finished: o.window.1,
            quiesce: self.freezer.quiesce().cloned(),
            guest_effect,
            endpoint: self.ep.caps.endpoint_name(),
            why: self.plan.why.clone(),
            notes,
        }
    }
}

/// Pauses a running VM (qemu-system: `query-status` says running) before
/// a mirror is cancelled before READY. QEMU 10.0 frees a write-blocking
/// mirror's in-flight state on such a cancel while a guest write through it
/// may still be in flight, and that write then corrupts QEMU's heap
/// (measured: about one crash per 77 early cancels under a writing guest,
/// none of 200 with the VM stopped, which drains its I/O). Daemons without
/// vCPUs (livesnapd, qemu-storage-daemon) have no `stop`.
pub async fn pause_vm(ep: &mut Endpoint) -> bool {
    if !(ep.caps.has("stop") && ep.caps.has("cont") && ep.caps.has("query-status")) {
        return false;
    }
    let running = matches!(
        ep.call("query-status", json!({})).await,
        Ok(Ok(ref s)) if s["running"] == true
    );
    running && matches!(ep.call("stop", json!({})).await, Ok(Ok(_)))
}

fn guest_effect(plan: &Plan, opts: &Options, switched: bool, q: Option<&Quiesce>) -> String {
    let mut s = match (plan.method, plan.copy_mode) {
        (Method::Backup, _) if plan.cbw => format!(
            "copy-before-write: a guest write to a cluster not yet copied waited for that copy (at most cbw-timeout={} s); a target failure would have broken the snapshot, never a guest write (on-cbw-error=break-snapshot)",
            opts.cbw_timeout
        ),
        (Method::Backup, _) => "copy-before-write: a guest write to a cluster not yet copied waited for that copy; a target failure would have failed that guest write (QEMU's on-cbw-error=break-guest-write: this endpoint's blockdev-backup has no break-snapshot)".into(),
        (Method::Mirror, Some(CopyMode::Auto)) if switched => "mirror copy-mode auto, switched to write-blocking by livesnap after it stopped converging: guest writes then also waited for the target; the soft cancel held guest writes for a bounded time".into(),
        (Method::Mirror, Some(CopyMode::Auto)) => "mirror copy-mode auto: guest writes unaffected while the background copy converged, written through to the target once livesnapd switched to write-blocking; the soft cancel held guest writes for a bounded time".into(),
        (Method::Mirror, Some(CopyMode::Background)) if switched => "mirror: background copy, then write-blocking (every guest write also waited for the target) from the switch until the soft cancel".into(),
        (Method::Mirror, Some(CopyMode::Background)) => "mirror: background copy; guest writes were not delayed by the target".into(),
        (Method::Mirror, _) => "mirror write-blocking: every guest write also waited for the target while the job ran".into(),
    };
    if let Some(q) = q {
        s += &format!(
            "; {} filesystem(s) frozen for {:.1} ms",
            q.filesystems, q.frozen_ms
        );
    }
    s
}

/// What a [`JobWatch`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// A mirror's BLOCK_JOB_READY.
    Ready,
    /// BLOCK_JOB_COMPLETED without an error.
    Completed,
    /// BLOCK_JOB_COMPLETED after a soft cancel.
    CompletedAfterCancel,
}

/// Follows one job by its events, showing progress between them.
pub(crate) struct JobWatch {
    job: String,
    switch: Option<Duration>,
    switched: bool,
    mode: Option<String>,
    mirror: bool,
    best: Option<(u64, Instant)>,
    /// A BLOCK_JOB_ERROR seen, waiting for the job's end event.
    error: Option<String>,
}

impl JobWatch {
    fn new(job: &str, plan: &Plan) -> JobWatch {
        JobWatch {
            job: job.to_string(),
            switch: plan.switch,
            switched: false,
            mode: plan.copy_mode.map(|m| m.name().to_string()),
            mirror: plan.method == Method::Mirror,
            best: None,
            error: None,
        }
    }

    /// Follows backup job `job` (no copy mode, no switch).
    pub(crate) fn backup(job: &str) -> JobWatch {
        JobWatch {
            job: job.to_string(),
            switch: None,
            switched: false,
            mode: None,
            mirror: false,
            best: None,
            error: None,
        }
    }

    fn about_job(&self, ev: &Value) -> bool {
        let d = &ev["data"];
        str_of(d, "device") == self.job || str_of(d, "id") == self.job
    }

    /// Waits for `want`; any other ending of the job is a failure.
    pub(crate) async fn wait(
        &mut self,
        ep: &mut Endpoint,
        clock: &mut Clock,
        progress: &mut Progress,
        want: Want,
    ) -> Result<Value> {
        let sampling = progress.enabled() || self.switch.is_some();
        let mut next_tick = Instant::now() + LINE_INTERVAL;
        loop {
            let until = if sampling { next_tick } else { clock.deadline };
            let ev = match clock.next_event(ep, until).await? {
                Waited::Event(ev) => ev,
                Waited::Tick => {
                    if sampling && Instant::now() >= next_tick {
                        next_tick = Instant::now() + LINE_INTERVAL;
                        self.sample(ep, progress, want).await?;
                    }
                    continue;
                }
            };
            if !self.about_job(&ev) {
                continue;
            }
            let data = &ev["data"];
            match str_of(&ev, "event") {
                "BLOCK_JOB_READY" if want == Want::Ready => return Ok(ev),
                "BLOCK_JOB_COMPLETED" => {
                    if let Some(e) = data.get("error").and_then(Value::as_str) {
                        let during = self
                            .error
                            .take()
                            .map(|w| format!(" ({w})"))
                            .unwrap_or_default();
                        return Err(Failure::job(format!("the job failed: {e}{during}")));
                    }
                    if want == Want::Ready {
                        return Err(Failure::job(
                            "the mirror completed before READY (completed by another client?)",
                        ));
                    }
                    return Ok(ev);
                }
                "BLOCK_JOB_CANCELLED" => {
                    return Err(Failure::job(if want == Want::CompletedAfterCancel {
                        "the mirror was cancelled instead of finishing its soft cancel (it was not in sync)"
                    } else {
                        "the job was cancelled by another client"
                    }))
                }
                "BLOCK_JOB_ERROR" => {
                    let what = format!(
                        "{} error on the job (action {})",
                        str_of(data, "operation"),
                        str_of(data, "action")
                    );
                    // With `report` the job ends next, with the error text.
                    if str_of(data, "action") != "report" {
                        return Err(Failure::job(what));
                    }
                    self.error = Some(what);
                }
                "JOB_STATUS_CHANGE" if str_of(data, "status") == "null" => {
                    return Err(Failure::job("the job went away without an end event"))
                }
                _ => {}
            }
        }
    }

    async fn sample(
        &mut self,
        ep: &mut Endpoint,
        progress: &mut Progress,
        want: Want,
    ) -> Result<()> {
        let jobs = ep.block_jobs().await?;
        let Some(j) = jobs.iter().find(|j| str_of(j, "device") == self.job) else {
            return Ok(());
        };
        let done = j["offset"].as_u64().unwrap_or(0);
        let total = j["len"].as_u64().unwrap_or(0);
        let remaining = total.saturating_sub(done);
        let status = str_of(j, "status").to_string();
        let mut mode = self.mode.clone();
        if j.get("actively-synced").and_then(Value::as_bool) == Some(true) {
            mode = mode.map(|m| format!("{m}, actively synced"));
        }
        progress.update(&Sample {
            done,
            total,
            remaining: self.mirror.then_some(remaining),
            mode: if self.mirror { mode } else { None },
            status: status.clone(),
        });
        let patience = self
            .switch
            .filter(|_| !self.switched && want == Want::Ready);
        if let Some(patience) = patience.filter(|_| status == "running") {
            let now = Instant::now();
            match self.best {
                Some((b, _)) if (remaining as f64) < b as f64 * SWITCH_PROGRESS => {
                    self.best = Some((remaining, now))
                }
                None => self.best = Some((remaining, now)),
                Some((_, at)) if now.duration_since(at) >= patience && remaining > 0 => {
                    self.switch(ep, progress, "the remaining bytes stopped falling")
                        .await?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn switch(
        &mut self,
        ep: &mut Endpoint,
        progress: &mut Progress,
        why: &str,
    ) -> Result<()> {
        ep.must(
            "block-job-change",
            json!({"id": self.job, "type": "mirror", "copy-mode": "write-blocking"}),
        )
        .await?;
        self.switched = true;
        self.mode = Some("write-blocking".into());
        progress.note(&format!(
            "livesnap: switched the mirror to write-blocking ({why})"
        ));
        Ok(())
    }
}

/// After the job's end: waits (bounded) for it to be dismissed, then
/// removes the target's nodes (which flushes a qcow2 target). Returns the
/// nodes that could not be removed, with why.
pub(crate) async fn remove_after_job(
    ep: &mut Endpoint,
    job: &str,
    added: &mut Vec<String>,
) -> Vec<String> {
    wait_gone(ep, job).await;
    target::remove_added(ep, added, GONE_WAIT).await
}

/// Waits (bounded) for an ended job to be dismissed, so its nodes are free.
async fn wait_gone(ep: &mut Endpoint, job: &str) {
    if !ep.caps.has("query-jobs") {
        return;
    }
    let end = Instant::now() + GONE_WAIT;
    while let Ok(Some(ev)) = ep
        .event(end.saturating_duration_since(Instant::now()))
        .await
    {
        if str_of(&ev, "event") == "JOB_STATUS_CHANGE"
            && str_of(&ev["data"], "id") == job
            && str_of(&ev["data"], "status") == "null"
        {
            return;
        }
    }
}

/// Makes sure the connection answers, reconnecting once: a timed-out
/// command may have left it unusable.
pub(crate) async fn revive(ep: &mut Endpoint) -> Result<()> {
    let alive = matches!(
        ep.call_within("query-version", Value::Null, Duration::from_secs(5))
            .await,
        Ok(Ok(_))
    );
    if alive {
        return Ok(());
    }
    ep.reconnect(Duration::from_secs(5)).await
}

/// `block-job-cancel force=true` of `job` and a bounded wait for it to go;
/// true when it was cancelled. What could not be done goes into `left`.
pub(crate) async fn force_cancel(ep: &mut Endpoint, job: &str, left: &mut Vec<String>) -> bool {
    let r = ep
        .call("block-job-cancel", json!({"device": job, "force": true}))
        .await;
    match r {
        Ok(Ok(_)) => {
            let until = Instant::now() + CANCEL_WAIT;
            let mut gone = false;
            while let Ok(Some(ev)) = ep
                .event(until.saturating_duration_since(Instant::now()))
                .await
            {
                let d = &ev["data"];
                let about = str_of(d, "device") == job || str_of(d, "id") == job;
                let name = str_of(&ev, "event");
                if about
                    && (name == "BLOCK_JOB_CANCELLED"
                        || name == "BLOCK_JOB_COMPLETED"
                        || (name == "JOB_STATUS_CHANGE" && str_of(d, "status") == "null"))
                {
                    gone = true;
                    break;
                }
            }
            if !gone {
                left.push(format!(
                    "job {job} (did not end within {} of a force cancel)",
                    duration(CANCEL_WAIT)
                ));
            }
            true
        }
        // Already gone (it failed or ended by itself).
        Ok(Err(_)) => false,
        Err(f) => {
            left.push(format!("job {job} ({})", f.reason));
            false
        }
    }
}

/// After a failure: thaw, force-cancel the job and wait (bounded) for it to
/// go, remove the nodes, delete the partial file. Returns what is left.
impl Run<'_> {
    async fn cleanup(&mut self, path: &Path) -> (Vec<String>, bool) {
        self.freezer.thaw(false).await;
        let (ep, st) = (&mut self.ep, &mut self.st);
        let end = Instant::now() + CLEANUP_BUDGET;
        let mut left = Vec::new();
        if let Err(f) = revive(ep).await {
            let mut what: Vec<String> = st.added.iter().map(|n| format!("node {n}")).collect();
            if let Some(j) = &st.job_running {
                what.push(format!("job {j}"));
            }
            what.push(format!("({})", f.reason));
            return (what, false);
        }
        let mut cancelled = false;
        if let Some(job) = st.job_running.take() {
            let paused = st.mirror_early && pause_vm(ep).await;
            let since = Instant::now();
            cancelled = force_cancel(ep, &job, &mut left).await;
            if paused {
                match ep.call("cont", json!({})).await {
                    Ok(Ok(_)) => self.progress.note(&format!(
                        "livesnap: the VM was paused for {} around the early cancel (QEMU 10.0 can crash when a write-blocking mirror is cancelled before READY under guest writes)",
                        duration(since.elapsed())
                    )),
                    Ok(Err(e)) => left.push(format!("the VM paused (cont: {})", e.desc)),
                    Err(f) => left.push(format!("the VM paused (cont: {})", f.reason)),
                }
            }
        }
        let budget = end
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let nodes_left = target::remove_added(ep, &mut st.added, budget).await;
        let kept = !nodes_left.is_empty();
        left.extend(nodes_left);
        if st.file_created {
            if kept {
                left.push(format!("file {} (a node still uses it)", path.display()));
            } else {
                left.extend(remove_target_file(path));
            }
        }
        (left, cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livesnap_block::ImageFormat;
    use serde_json::json;

    fn opts(method: MethodArg) -> Options {
        Options {
            endpoint: super::super::EndpointArg::Qmp("q".into()),
            disk: "disk".into(),
            target: "t".into(),
            format: ImageFormat::Qcow2,
            shallow: false,
            method,
            deadline: Duration::from_secs(60),
            speed: None,
            freeze: None,
            freeze_hold: Duration::from_secs(10),
            cbw_timeout: 30,
            copy_mode: None,
            create_via: crate::target::CreateVia::Auto,
            target_blkdebug: None,
            quiet: true,
        }
    }

    fn disk() -> Disk {
        Disk {
            node: "disk".into(),
            device: None,
            driver: "raw".into(),
            size: 1 << 20,
            filename: "/d".into(),
            backing: None,
        }
    }

    fn caps(package: &str, version: (u64, u64), commands: &[&str]) -> Caps {
        let cmds: Vec<Value> = commands.iter().map(|c| json!({ "name": c })).collect();
        Caps::from_replies(
            &json!({"qemu": {"major": version.0, "minor": version.1, "micro": 0}, "package": package}),
            &Value::Array(cmds),
            None,
        )
    }

    #[test]
    fn livesnapd_backup_has_break_snapshot_and_mirror_is_auto() {
        let c = caps(
            "livesnap 0.1.0",
            (10, 0),
            &["blockdev-backup", "blockdev-mirror", "block-job-change"],
        );
        let p = decide(&c, &opts(MethodArg::Auto), &disk()).unwrap();
        assert_eq!((p.method, p.cbw), (Method::Backup, true));
        let p = decide(&c, &opts(MethodArg::Mirror), &disk()).unwrap();
        assert_eq!(p.copy_mode, Some(CopyMode::Auto));
        assert_eq!(p.switch, Some(AUTO_SAFETY_PATIENCE));
        assert!(!p.switch_at_ready);
    }

    #[test]
    fn qemu_mirror_switches_or_blocks_never_plain_background() {
        let c = caps(
            "",
            (10, 0),
            &["blockdev-backup", "blockdev-mirror", "block-job-change"],
        );
        let p = decide(&c, &opts(MethodArg::Mirror), &disk()).unwrap();
        assert_eq!(p.copy_mode, Some(CopyMode::Background));
        assert_eq!(p.switch, Some(SWITCH_PATIENCE));
        assert!(p.switch_at_ready);
        // QEMU 3.0-8.1: write-blocking from the start.
        let c = caps("", (7, 2), &["blockdev-mirror"]);
        let p = decide(&c, &opts(MethodArg::Auto), &disk()).unwrap();
        assert_eq!(
            (p.method, p.copy_mode, p.switch),
            (Method::Mirror, Some(CopyMode::WriteBlocking), None)
        );
        // Older: refused.
        let c = caps("", (2, 12), &["blockdev-mirror"]);
        let e = decide(&c, &opts(MethodArg::Mirror), &disk()).unwrap_err();
        assert_eq!(e.kind, Kind::Usage);
        let mut o = opts(MethodArg::Mirror);
        o.copy_mode = Some(CopyMode::Auto);
        let c = caps("", (10, 0), &["blockdev-mirror", "block-job-change"]);
        assert!(decide(&c, &o, &disk()).is_err(), "auto is livesnapd's");
    }

    #[test]
    fn shallow_uses_sync_top_only_with_a_backing_image() {
        let c = caps("", (10, 0), &["blockdev-backup"]);
        let mut o = opts(MethodArg::Backup);
        o.shallow = true;
        assert_eq!(decide(&c, &o, &disk()).unwrap().sync, SyncMode::Full);
        let mut d = disk();
        d.backing = Some(disk::Backing {
            filename: "/base".into(),
            format: Some("raw".into()),
        });
        assert_eq!(decide(&c, &o, &d).unwrap().sync, SyncMode::Top);
        assert_eq!(
            decide(&c, &opts(MethodArg::Backup), &d).unwrap().sync,
            SyncMode::Full
        );
    }
}
