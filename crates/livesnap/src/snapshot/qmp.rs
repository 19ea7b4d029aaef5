//! `livesnap snapshot`: the orchestration. Creates the target, runs a
//! backup or mirror job, follows it by its events (never by polling), fixes
//! the point in time, removes the target's nodes and reports. On a deadline,
//! an error event or a signal it force-cancels the job, removes the nodes and
//! the partial file, and leaves the source as it was.
//!
//! It never sends `job-complete` (a snapshot must not pivot the source onto
//! the copy) and never a soft cancel before READY (QEMU treats that as a
//! force cancel: the copy would be abandoned, not finished).

use std::path::{Path, PathBuf};
use std::time::Duration;

use livesnap_block::ImageFormat;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::disk::{self, Disk};
use crate::endpoint::{str_of, Caps, Endpoint, CONNECT_TIMEOUT};
use crate::error::{Failure, Kind, Result};
use crate::progress::{Progress, Sample, LINE_INTERVAL};
use crate::qga::Qga;
use crate::report::{Quiesce, Report};
use crate::signals::Interrupt;
use crate::target::{self, CreateVia, TargetSpec};
use crate::units::{bytes, duration, Stamp};
use crate::wait::{Clock, Waited};

/// Which job takes the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// Copy-before-write backup: point in time at the start.
    Backup,
    /// Mirror, then a soft cancel in READY: point in time at the cancel.
    Mirror,
    /// The best the endpoint supports.
    Auto,
}

/// A mirror copy mode the operator may ask for; a plain background mirror
/// is not among them (it may never converge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Every guest write also goes to the target, from the start.
    WriteBlocking,
    /// livesnapd's: background, write-blocking once it stops converging.
    Auto,
}

impl CopyMode {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CopyMode::WriteBlocking => "write-blocking",
            CopyMode::Auto => "auto",
        }
    }
}

/// Everything `livesnap snapshot` was asked.
#[derive(Clone, Debug)]
pub struct Options {
    /// QMP socket.
    pub qmp: PathBuf,
    /// Node name or drive/device id.
    pub disk: String,
    /// Target image path.
    pub target: PathBuf,
    /// Target format.
    pub format: ImageFormat,
    /// Only the top layer, backed by the source's backing file.
    pub shallow: bool,
    /// Method.
    pub method: MethodArg,
    /// The whole operation's bound.
    pub deadline: Duration,
    /// Job speed limit, bytes per second.
    pub speed: Option<u64>,
    /// qemu-guest-agent socket, to freeze around the instant.
    pub freeze: Option<PathBuf>,
    /// The longest the guest may stay frozen.
    pub freeze_hold: Duration,
    /// Backup `cbw-timeout` in seconds, where the endpoint takes it.
    pub cbw_timeout: u32,
    /// Where the target is created.
    pub create_via: CreateVia,
    /// Mirror copy mode, when not the best the endpoint has.
    pub copy_mode: Option<CopyMode>,
    /// Test hook: `inject-error` rules for a blkdebug node under the target.
    pub target_blkdebug: Option<Value>,
    /// No progress output.
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Backup,
    Mirror,
}

/// What will be run, decided from the endpoint's capabilities.
#[derive(Clone, Debug)]
struct Plan {
    method: Method,
    sync: &'static str,
    /// Mirror: `copy-mode` to start with.
    copy_mode: Option<&'static str>,
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
const CLEANUP_BUDGET: Duration = Duration::from_secs(20);
/// How long a force-cancelled job may take to go.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// How long a finished job may take to be dismissed.
const GONE_WAIT: Duration = Duration::from_secs(5);
/// Connecting and syncing with the guest agent.
const QGA_CONNECT: Duration = Duration::from_secs(5);
/// A thaw's answer.
const THAW_TIMEOUT: Duration = Duration::from_secs(5);

fn decide(caps: &Caps, opts: &Options, disk: &Disk) -> Result<Plan> {
    let sync = if opts.shallow && disk.backing.is_some() {
        "top"
    } else {
        "full"
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
                ("write-blocking", None, false, "write-blocking from the start (requested)")
            }
            Some(CopyMode::Auto) if caps.mirror_mode("auto") => (
                "auto",
                change.then_some(AUTO_SAFETY_PATIENCE),
                false,
                "copy-mode auto (requested)",
            ),
            Some(_) => return None,
            None if caps.mirror_mode("auto") => (
                "auto",
                change.then_some(AUTO_SAFETY_PATIENCE),
                false,
                "copy-mode auto (livesnapd switches to write-blocking itself)",
            ),
            None if change => (
                "background",
                Some(SWITCH_PATIENCE),
                true,
                "background, switched to write-blocking with block-job-change when it stops converging",
            ),
            None if caps.mirror_mode("write-blocking") => (
                "write-blocking",
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
    /// The job's end was seen but it may not be dismissed yet.
    job_ended: Option<String>,
    /// When the guest was frozen, and how many filesystems.
    frozen: Option<(Stamp, u64)>,
    /// Set once the guest was thawed: (frozen count, frozen ms, in time).
    quiesce: Option<Quiesce>,
    notes: Vec<String>,
}

/// Appends where it happened to a deadline or interrupt reason.
fn during(f: Failure, what: &str) -> Failure {
    match f.kind {
        Kind::Deadline | Kind::Interrupted => {
            Failure::new(f.kind, format!("{} while {what}", f.reason))
        }
        _ => f,
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Failure::usage(format!("current directory: {e}")))?
            .join(p)
    };
    let parent = abs.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        return Err(Failure::usage(format!(
            "target directory {} does not exist",
            parent.display()
        )));
    }
    Ok(abs)
}

/// Runs `livesnap snapshot`.
pub async fn run(opts: &Options, interrupt: Interrupt) -> Result<Report> {
    let started = Stamp::now();
    let mut clock = Clock::new(opts.deadline, interrupt);
    let mut progress = Progress::new(opts.quiet);
    if opts.shallow && opts.format == ImageFormat::Raw {
        return Err(Failure::usage(
            "--shallow needs a qcow2 target: a raw image has no backing file",
        ));
    }
    let path = absolute(&opts.target)?;
    let mut ep = Endpoint::connect(&opts.qmp, CONNECT_TIMEOUT.min(clock.left())).await?;
    clock.check()?;
    let disk = disk::resolve(&mut ep, &opts.disk).await?;
    if disk.size == 0 {
        return Err(Failure::endpoint(format!(
            "the endpoint reports no size for node {}",
            disk.node
        )));
    }
    let plan = decide(&ep.caps, opts, &disk)?;
    let backing = match (&plan.sync, &disk.backing) {
        (&"top", Some(b)) => match &b.format {
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
    if path.symlink_metadata().is_ok() {
        return Err(Failure::usage(format!(
            "target {} exists; livesnap never overwrites a file",
            path.display()
        )));
    }
    let mut qga = match &opts.freeze {
        Some(p) => Some(
            Qga::connect(p, QGA_CONNECT)
                .await
                .map_err(|e| Failure::new(Kind::GuestAgent, e))?,
        ),
        None => None,
    };
    let spec = TargetSpec {
        path: path.clone(),
        format: opts.format,
        size: disk.size,
        backing,
        blkdebug: opts.target_blkdebug.clone(),
    };
    let mut st = State::default();
    let r = body(
        &mut ep,
        &mut clock,
        &mut progress,
        opts,
        &disk,
        &plan,
        &spec,
        qga.as_mut(),
        &mut st,
    )
    .await;
    match r {
        Ok(mut report) => {
            progress.finish();
            report.started = started;
            report.finished = Stamp::now();
            Ok(report)
        }
        Err(f) => {
            progress.note(&format!("livesnap: {}; cleaning up", f.reason));
            let (left, cancelled) = cleanup(&mut ep, &mut st, qga.as_mut(), &path).await;
            progress.finish();
            let mut reason = f.reason;
            if cancelled {
                reason += "; job force-cancelled";
            }
            if left.is_empty() {
                reason += if st.file_created {
                    ", target removed, source untouched"
                } else {
                    ", source untouched"
                };
            } else {
                reason += &format!("; LEFT BEHIND: {}", left.join(", "));
            }
            Err(Failure::new(f.kind, reason))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn body(
    ep: &mut Endpoint,
    clock: &mut Clock,
    progress: &mut Progress,
    opts: &Options,
    disk: &Disk,
    plan: &Plan,
    spec: &TargetSpec,
    mut qga: Option<&mut Qga>,
    st: &mut State,
) -> Result<Report> {
    let method_name = match plan.method {
        Method::Backup => "backup",
        Method::Mirror => "mirror",
    };
    progress.note(&format!(
        "livesnap: {} ({}, {}) -> {} by {}{} (sync={}), deadline {}",
        opts.disk,
        disk.node,
        bytes(disk.size),
        spec.path.display(),
        method_name,
        plan.copy_mode
            .map(|m| format!(" copy-mode={m}"))
            .unwrap_or_default(),
        plan.sync,
        duration(opts.deadline)
    ));
    clock.check()?;
    st.file_created = true;
    let target = target::create(ep, clock, spec, opts.create_via, &mut st.added)
        .await
        .map_err(|f| during(f, "creating the target"))?;
    clock
        .check()
        .map_err(|f| during(f, "creating the target"))?;
    let job = format!("{}-job", target::node_prefix());
    let mut args = json!({
        "job-id": job, "device": disk.node, "target": target.node, "sync": plan.sync,
    });
    if let Some(s) = opts.speed {
        args["speed"] = json!(s);
    }
    let mut copy_mode = plan.copy_mode.map(String::from);
    let mut watch = JobWatch::new(&job, plan);
    let (window, end_event, defined_by) = match plan.method {
        Method::Backup => {
            if plan.cbw {
                args["on-cbw-error"] = json!("break-snapshot");
                args["cbw-timeout"] = json!(opts.cbw_timeout);
            }
            freeze(qga.as_deref_mut(), st, opts.freeze_hold).await?;
            let t0 = Stamp::now();
            progress.start(disk.size);
            st.job_running = Some(job.clone());
            let r = command_frozen(
                ep,
                clock,
                qga.as_deref_mut(),
                st,
                opts.freeze_hold,
                "blockdev-backup",
                args,
            )
            .await;
            let t1 = Stamp::now();
            thaw(qga.as_deref_mut(), st, true).await;
            if let Err(e) = r? {
                st.job_running = None;
                return Err(Failure::endpoint(format!("blockdev-backup: {}", e.desc)));
            }
            progress.note("livesnap: point in time fixed (backup started); copying");
            let end = watch
                .wait(ep, clock, progress, None, None, Want::Completed, st)
                .await
                .map_err(|f| during(f, "the backup job ran"))?;
            ((t0, t1), end, "blockdev-backup command to its reply")
        }
        Method::Mirror => {
            if let Some(m) = plan.copy_mode {
                args["copy-mode"] = json!(m);
            }
            st.job_running = Some(job.clone());
            progress.start(disk.size);
            if let Err(e) = ep.call("blockdev-mirror", args).await? {
                st.job_running = None;
                return Err(Failure::endpoint(format!("blockdev-mirror: {}", e.desc)));
            }
            watch
                .wait(ep, clock, progress, None, None, Want::Ready, st)
                .await
                .map_err(|f| during(f, "waiting for the mirror to reach READY"))?;
            // QEMU's soft cancel in a background mirror waits for a clean
            // instant that busy guests may never give it.
            if plan.switch_at_ready && !watch.switched {
                watch
                    .switch(ep, progress, "in READY, before the soft cancel")
                    .await?;
            }
            if watch.switched {
                copy_mode = Some(format!(
                    "{}, then write-blocking",
                    plan.copy_mode.unwrap_or("")
                ));
            }
            freeze(qga.as_deref_mut(), st, opts.freeze_hold).await?;
            let t0 = Stamp::now();
            let hold = st.frozen.map(|_| Instant::now() + opts.freeze_hold);
            ep.must("block-job-cancel", json!({"device": job, "force": false}))
                .await?;
            let end = watch
                .wait(
                    ep,
                    clock,
                    progress,
                    qga.as_deref_mut(),
                    hold,
                    Want::CompletedAfterCancel,
                    st,
                )
                .await;
            let t1 = Stamp::now();
            thaw(qga, st, true).await;
            let end = end.map_err(|f| during(f, "the mirror finished its soft cancel"))?;
            (
                (t0, t1),
                end,
                "soft block-job-cancel sent to BLOCK_JOB_COMPLETED received",
            )
        }
    };
    st.job_running = None;
    st.job_ended = Some(job.clone());
    wait_gone(ep, &job).await;
    let left = target::remove_nodes(
        ep,
        &st.added.iter().rev().cloned().collect::<Vec<_>>(),
        GONE_WAIT,
    )
    .await;
    if !left.is_empty() {
        // The copy is complete, but a node still has the file open: keep it.
        st.added.clear();
        st.file_created = false;
        return Err(Failure::endpoint(format!(
            "snapshot {} complete but could not remove {}",
            spec.path.display(),
            left.join(", ")
        )));
    }
    st.added.clear();
    st.job_ended = None;
    let data = &end_event["data"];
    let guest_effect = guest_effect(plan, opts, watch.switched, st.quiesce.as_ref());
    Ok(Report {
        method: method_name,
        copy_mode,
        sync: plan.sync,
        disk: opts.disk.clone(),
        node: disk.node.clone(),
        driver: disk.driver.clone(),
        file: disk.filename.clone(),
        device: disk.device.clone(),
        size: disk.size,
        target: spec.path.to_string_lossy().into_owned(),
        format: spec.format.name(),
        backing: spec.backing.as_ref().map(|b| b.0.clone()),
        created_via: target.created_via,
        job_id: job,
        window,
        window_defined_by: defined_by,
        bytes_copied: data["offset"].as_u64().unwrap_or(0),
        bytes_total: data["len"].as_u64().unwrap_or(0),
        started: window.0,
        finished: window.1,
        quiesce: st.quiesce.clone(),
        guest_effect,
        endpoint: format!(
            "{}.{}.{} {}",
            ep.caps.version.0, ep.caps.version.1, ep.caps.version.2, ep.caps.package
        ),
        why: plan.why.clone(),
        notes: std::mem::take(&mut st.notes),
    })
}

fn guest_effect(plan: &Plan, opts: &Options, switched: bool, q: Option<&Quiesce>) -> String {
    let mut s = match (plan.method, plan.copy_mode) {
        (Method::Backup, _) if plan.cbw => format!(
            "copy-before-write: a guest write to a cluster not yet copied waited for that copy (at most cbw-timeout={} s); a target failure would have broken the snapshot, never a guest write (on-cbw-error=break-snapshot)",
            opts.cbw_timeout
        ),
        (Method::Backup, _) => "copy-before-write: a guest write to a cluster not yet copied waited for that copy; a target failure would have failed that guest write (QEMU's on-cbw-error=break-guest-write: this endpoint's blockdev-backup has no break-snapshot)".into(),
        (Method::Mirror, Some("auto")) if switched => "mirror copy-mode auto, switched to write-blocking by livesnap after it stopped converging: guest writes then also waited for the target; the soft cancel held guest writes for a bounded time".into(),
        (Method::Mirror, Some("auto")) => "mirror copy-mode auto: guest writes unaffected while the background copy converged, written through to the target once livesnapd switched to write-blocking; the soft cancel held guest writes for a bounded time".into(),
        (Method::Mirror, Some("background")) if switched => "mirror: background copy, then write-blocking (every guest write also waited for the target) from the switch until the soft cancel".into(),
        (Method::Mirror, Some("background")) => "mirror: background copy; guest writes were not delayed by the target".into(),
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

/// Freezes the guest (when asked), bounded by `hold`.
async fn freeze(qga: Option<&mut Qga>, st: &mut State, hold: Duration) -> Result<()> {
    let Some(q) = qga else {
        return Ok(());
    };
    match q.freeze(hold).await {
        Ok(n) => {
            st.frozen = Some((Stamp::now(), n));
            Ok(())
        }
        Err(e) => {
            // A freeze that timed out may still happen: the thaw follows it.
            st.frozen = Some((Stamp::now(), 0));
            thaw(Some(q), st, false).await;
            st.quiesce = None;
            Err(Failure::new(
                Kind::GuestAgent,
                format!("freezing the guest failed: {e}"),
            ))
        }
    }
}

/// Thaws the guest if it is frozen; a failed thaw is noted, not fatal.
async fn thaw(qga: Option<&mut Qga>, st: &mut State, in_time: bool) {
    let (Some(q), Some((since, n))) = (qga, st.frozen.take()) else {
        return;
    };
    let r = q.thaw(THAW_TIMEOUT).await;
    let frozen_ms = since.instant.elapsed().as_secs_f64() * 1e3;
    if let Err(e) = r {
        st.notes
            .push(format!("thaw failed, the guest may still be frozen: {e}"));
        eprintln!("livesnap: WARNING: thaw failed, the guest may still be frozen: {e}");
    }
    st.quiesce = Some(Quiesce {
        filesystems: n,
        frozen_ms,
        covered_point_in_time: in_time,
    });
}

/// Runs a command while the guest is frozen: past `hold` the guest is
/// thawed early (the command still completes, the snapshot is then not
/// quiesced), and a signal thaws at once.
#[allow(clippy::too_many_arguments)]
async fn command_frozen(
    ep: &mut Endpoint,
    clock: &mut Clock,
    mut qga: Option<&mut Qga>,
    st: &mut State,
    hold: Duration,
    command: &str,
    args: Value,
) -> Result<std::result::Result<Value, livesnap_qmp::QmpError>> {
    if st.frozen.is_none() {
        return ep.call(command, args).await;
    }
    let hold_end = Instant::now() + hold;
    let mut interrupt = clock.interrupt.clone();
    let fut = ep.call(command, args);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tokio::time::sleep_until(hold_end), if st.frozen.is_some() => {
                thaw(qga.as_deref_mut(), st, false).await;
                st.notes.push(format!("{command} took longer than --freeze-hold {}: the guest was thawed before the point in time was fixed", duration(hold)));
            }
            _ = interrupt.wait(), if st.frozen.is_some() => {
                thaw(qga.as_deref_mut(), st, false).await;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Ready,
    Completed,
    CompletedAfterCancel,
}

/// Follows one job by its events, showing progress between them.
struct JobWatch {
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
            mode: plan.copy_mode.map(String::from),
            mirror: plan.method == Method::Mirror,
            best: None,
            error: None,
        }
    }

    fn about_job(&self, ev: &Value) -> bool {
        let d = &ev["data"];
        str_of(d, "device") == self.job || str_of(d, "id") == self.job
    }

    /// Waits for `want`; any other ending of the job is a failure. With
    /// `hold`, the guest is thawed when it passes.
    #[allow(clippy::too_many_arguments)]
    async fn wait(
        &mut self,
        ep: &mut Endpoint,
        clock: &mut Clock,
        progress: &mut Progress,
        mut qga: Option<&mut Qga>,
        hold: Option<Instant>,
        want: Want,
        st: &mut State,
    ) -> Result<Value> {
        let sampling = progress.enabled() || self.switch.is_some();
        let mut next_tick = Instant::now() + LINE_INTERVAL;
        loop {
            let mut until = if sampling { next_tick } else { clock.deadline };
            let hold_pending = hold.filter(|_| st.frozen.is_some());
            if let Some(h) = hold_pending {
                until = until.min(h);
            }
            let ev = match clock.next_event(ep, until).await? {
                Waited::Event(ev) => ev,
                Waited::Tick => {
                    let now = Instant::now();
                    if hold_pending.is_some_and(|h| now >= h) {
                        // The hold is the guest's bound, the job goes on.
                        thaw(qga.as_deref_mut(), st, false).await;
                        st.notes.push("the soft cancel took longer than --freeze-hold: the guest was thawed before the point in time was fixed".into());
                    }
                    if sampling && now >= next_tick {
                        next_tick = now + LINE_INTERVAL;
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

/// After a failure: thaw, force-cancel the job and wait (bounded) for it to
/// go, remove the nodes, delete the partial file. Returns what is left.
async fn cleanup(
    ep: &mut Endpoint,
    st: &mut State,
    qga: Option<&mut Qga>,
    path: &Path,
) -> (Vec<String>, bool) {
    thaw(qga, st, false).await;
    let end = Instant::now() + CLEANUP_BUDGET;
    let mut left = Vec::new();
    // A timed-out command may have left the connection unusable.
    let alive = matches!(
        ep.call_within("query-version", Value::Null, Duration::from_secs(5))
            .await,
        Ok(Ok(_))
    );
    if !alive {
        if let Err(f) = ep.reconnect(Duration::from_secs(5)).await {
            let mut what: Vec<String> = st.added.iter().map(|n| format!("node {n}")).collect();
            if let Some(j) = &st.job_running {
                what.push(format!("job {j}"));
            }
            what.push(format!("({})", f.reason));
            return (what, false);
        }
    }
    let mut cancelled = false;
    if let Some(job) = st.job_running.take() {
        match ep
            .call("block-job-cancel", json!({"device": job, "force": true}))
            .await
        {
            Ok(Ok(_)) => {
                cancelled = true;
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
            }
            // Already gone (it failed or ended by itself).
            Ok(Err(_)) => {}
            Err(f) => left.push(format!("job {job} ({})", f.reason)),
        }
    }
    st.job_ended = None;
    let budget = end
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let nodes: Vec<String> = st.added.iter().rev().cloned().collect();
    let nodes_left = target::remove_nodes(ep, &nodes, budget).await;
    st.added.clear();
    let kept = !nodes_left.is_empty();
    left.extend(nodes_left);
    if st.file_created {
        if kept {
            left.push(format!("file {} (a node still uses it)", path.display()));
        } else if path.symlink_metadata().is_ok() {
            if let Err(e) = std::fs::remove_file(path) {
                left.push(format!("file {} ({e})", path.display()));
            }
        }
    }
    (left, cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(method: MethodArg) -> Options {
        Options {
            qmp: "q".into(),
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
            create_via: CreateVia::Auto,
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
        assert_eq!(p.copy_mode, Some("auto"));
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
        assert_eq!(p.copy_mode, Some("background"));
        assert_eq!(p.switch, Some(SWITCH_PATIENCE));
        assert!(p.switch_at_ready);
        // QEMU 3.0-8.1: write-blocking from the start.
        let c = caps("", (7, 2), &["blockdev-mirror"]);
        let p = decide(&c, &opts(MethodArg::Auto), &disk()).unwrap();
        assert_eq!(
            (p.method, p.copy_mode, p.switch),
            (Method::Mirror, Some("write-blocking"), None)
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
        assert_eq!(decide(&c, &o, &disk()).unwrap().sync, "full");
        let mut d = disk();
        d.backing = Some(disk::Backing {
            filename: "/base".into(),
            format: Some("raw".into()),
        });
        assert_eq!(decide(&c, &o, &d).unwrap().sync, "top");
        assert_eq!(
            decide(&c, &opts(MethodArg::Backup), &d).unwrap().sync,
            "full"
        );
    }
}
