//! `livesnap snapshot` of a libvirt-managed domain, through libvirt's
//! public API (never its QEMU monitor, which libvirtd owns):
//!
//! - **backup**: `virDomainBackupBegin` in push mode; the point in time is
//!   the call (libvirt starts QEMU's backup in one transaction before it
//!   returns); the end is the `JOB_COMPLETED` event, checked against
//!   `virDomainGetJobStats`; a failure or the deadline aborts it with
//!   `virDomainAbortJob` (libvirt then deletes the target it created).
//! - **mirror**: `virDomainBlockCopy` with `SYNCHRONOUS_WRITES` (QEMU's
//!   write-blocking mirror, which converges under any guest load), READY
//!   from the `BLOCK_JOB_2` event, then `virDomainBlockJobAbort` with
//!   `ABORT_ASYNC` (QEMU's soft cancel: the copy is the disk at that
//!   instant) and its end event, within the deadline. Never the
//!   synchronous abort, which waits without bound, and never a pivot.
//!
//! Afterwards nothing may be left: no domain job, no block job, the
//! domain's disks as they were; the clean-up says what it could not undo.

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use super::quiesce::{Agent, Freezer};
use super::{
    during, failure_after_cleanup, new_target_path, remove_target_file, CopyMode, FreezeArg,
    MethodArg, Options,
};
use crate::error::{Failure, Result};
use crate::libvirt::xml::{self, DiskDef};
use crate::libvirt::{
    block_job_kind, block_job_status, job_type, resolve_uri, DomainEvent, JobStats, Libvirt,
    Received,
};
use crate::progress::{Progress, Sample, LINE_INTERVAL};
use crate::report::Report;
use crate::signals::Interrupt;
use crate::target::{self, CreateVia, TargetSpec};
use crate::units::{bytes, duration, Stamp};
use crate::wait::{Clock, Waited};

use virt_sys as sys;

/// Budget of the clean-up after a failure (on top of the deadline); the
/// aborted job may take all of it to end. libvirt lets any call wait 30 s
/// for a domain's job lock, and an aborted job ends only once libvirt's
/// event worker (one for all domains) has handled its end: a budget under
/// that reports a job as left that a busy host ends a little later.
pub(crate) const CLEANUP_BUDGET: Duration = Duration::from_secs(40);
/// How long libvirt may take to close a backup's target after the job's end.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long a job that vanished from the job queries may take to send the
/// event that says how it ended.
const EVENT_GRACE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Backup,
    Mirror,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Backup => "backup",
            Method::Mirror => "mirror",
        }
    }
}

/// Which job of the domain livesnap started and must stop on a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Running {
    /// The domain's backup job.
    Backup,
    /// The block copy job on the disk.
    Copy,
}

/// What will be run.
#[derive(Debug)]
struct Plan {
    method: Method,
    /// `--shallow` over a backing image: only the top layer.
    shallow: bool,
    /// The target is made here (`REUSE_EXT`), not by libvirt.
    create_here: bool,
    why: String,
}

/// What libvirt offers for live snapshots on this host.
struct Offer {
    /// `virDomainBackupBegin` (libvirt ≥ 6.0, and the domain's
    /// capabilities do not say `<backup supported='no'/>`).
    backup: bool,
    /// `VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES` (libvirt ≥ 8.0).
    sync_copy: bool,
}

fn offer(lv: &Libvirt, domcaps: Option<&str>) -> Offer {
    let v = lv.versions.0;
    let backup_cap = domcaps.is_none_or(|c| !c.contains("<backup supported='no'/>"));
    Offer {
        backup: v >= (6, 0, 0) && backup_cap,
        sync_copy: v >= (8, 0, 0),
    }
}

/// What `livesnap info --libvirt` shows: the versions and what
/// `snapshot` would use.
pub fn describe(lv: &Libvirt, domcaps: Option<&str>) -> Vec<(String, String)> {
    let o = offer(lv, domcaps);
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let ((a, b, c), (x, y, z)) = lv.versions;
    vec![
        ("libvirt".into(), format!("{a}.{b}.{c}")),
        ("hypervisor".into(), format!("{x}.{y}.{z}")),
        ("uri".into(), lv.uri.clone()),
        ("domain".into(), lv.name.clone()),
        ("backup (virDomainBackupBegin)".into(), yes(o.backup)),
        (
            "block copy with synchronous writes".into(),
            yes(o.sync_copy),
        ),
        (
            "--method auto picks".into(),
            if o.backup {
                "backup (mirror with --shallow)"
            } else if o.sync_copy {
                "mirror"
            } else {
                "none (no bounded method)"
            }
            .into(),
        ),
    ]
}

fn decide(offer: &Offer, opts: &Options, disk: &DiskDef, local: bool) -> Result<Plan> {
    let shallow = opts.shallow && disk.backing.is_some();
    let mirror_unsafe = "this libvirt has no VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES (libvirt 8.0 or later): a block copy without it may never converge under guest writes";
    if opts.copy_mode == Some(CopyMode::Auto) {
        return Err(Failure::usage(
            "--copy-mode auto is livesnapd's; libvirt's block copy runs write-blocking (synchronous writes)",
        ));
    }
    let method = match opts.method {
        MethodArg::Backup if shallow => {
            return Err(Failure::usage(
                "libvirt's push backup copies the whole disk (it has no sync=top): use --method mirror with --shallow",
            ))
        }
        MethodArg::Backup if !offer.backup => {
            return Err(Failure::usage(
                "this libvirt has no backup API (virDomainBackupBegin, libvirt 6.0 or later): try --method mirror",
            ))
        }
        MethodArg::Backup => (Method::Backup, "requested".to_string()),
        MethodArg::Mirror if !offer.sync_copy => return Err(Failure::usage(mirror_unsafe)),
        MethodArg::Mirror => (
            Method::Mirror,
            "requested; write-blocking (libvirt's synchronous writes)".into(),
        ),
        MethodArg::Auto if offer.backup && !shallow => (
            Method::Backup,
            "auto: backup has no convergence loop (work bounded by the disk size)".into(),
        ),
        MethodArg::Auto if offer.sync_copy => (
            Method::Mirror,
            if shallow {
                "auto: --shallow needs a block copy (libvirt's backup copies the whole disk); write-blocking".into()
            } else {
                "auto: this libvirt has no backup API; block copy with synchronous writes".into()
            },
        ),
        MethodArg::Auto => {
            return Err(Failure::usage(format!(
                "libvirt offers no bounded snapshot method here: no backup API, and {mirror_unsafe}"
            )))
        }
    };
    let (method, why) = method;
    let create_here = match opts.create_via {
        CreateVia::Local => true,
        CreateVia::Qmp if shallow => {
            return Err(Failure::usage(
                "--shallow through libvirt creates the target here, over the same backing file (as Nova does): use --create-via auto or local",
            ))
        }
        CreateVia::Qmp => false,
        CreateVia::Auto => shallow,
    };
    if create_here && !local {
        return Err(Failure::usage(
            "the target must be created on this host (--shallow or --create-via local), but the libvirt URI is remote",
        ));
    }
    Ok(Plan {
        method,
        shallow,
        create_here,
        why,
    })
}

/// Where the snapshot stands, for the clean-up after a failure.
#[derive(Default)]
struct State {
    /// The target file may exist because we or libvirt created it.
    file_created: bool,
    /// The job livesnap started, not yet seen to end.
    running: Option<Running>,
    /// The copy reached READY (an abort then is QEMU's soft cancel).
    copy_ready: bool,
    notes: Vec<String>,
}

/// How the job ended.
struct Outcome {
    window: (Stamp, Stamp),
    defined_by: &'static str,
    copied: (u64, u64),
}

/// One snapshot through libvirt.
struct Run<'a> {
    lv: Libvirt,
    clock: Clock,
    progress: Progress,
    opts: &'a Options,
    disk: DiskDef,
    /// The domain's disks (target, source) before anything was done.
    disks_before: Vec<(String, Option<String>)>,
    size: u64,
    plan: Plan,
    path: PathBuf,
    st: State,
    /// The last progress seen: (done, total).
    last: (u64, u64),
}

/// Runs `livesnap snapshot --libvirt DOMAIN`.
pub async fn run(
    domain: &str,
    uri: Option<&str>,
    opts: &Options,
    interrupt: Interrupt,
) -> Result<Report> {
    let started = Stamp::now();
    let mut clock = Clock::new(opts.deadline, interrupt);
    let path = new_target_path(&opts.target)?;
    if opts.target_blkdebug.is_some() {
        return Err(Failure::usage("--x-target-blkdebug is for QMP endpoints"));
    }
    let uri = resolve_uri(uri);
    let lv = clock.connect(|t| Libvirt::open(&uri, domain, t)).await?;
    let disks = lv.disks().await?;
    let Some(disk) = xml::find(&disks, &opts.disk).cloned() else {
        let names: Vec<String> = disks
            .iter()
            .map(|d| match &d.source {
                Some(s) => format!("{} ({s})", d.target),
                None => d.target.clone(),
            })
            .collect();
        return Err(Failure::usage(format!(
            "domain {} has no disk {} (disks: {})",
            lv.name,
            opts.disk,
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        )));
    };
    if disk.mirror {
        return Err(Failure::usage(format!(
            "disk {} of domain {} already has a block copy running",
            disk.target, lv.name
        )));
    }
    let size = lv.capacity(&disk.target).await?;
    let domcaps = lv.domain_capabilities().await.ok();
    let plan = decide(&offer(&lv, domcaps.as_deref()), opts, &disk, lv.is_local())?;
    let progress = Progress::new(opts.quiet);
    if opts.shallow && disk.backing.is_none() {
        progress.note(&format!(
            "note: {} has no backing image, so --shallow makes a full copy",
            opts.disk
        ));
    }
    let agent = match &opts.freeze {
        Some(FreezeArg::Endpoint) => Some(Agent::Libvirt(lv.agent())),
        Some(FreezeArg::Qga(_)) => {
            return Err(Failure::usage(
                "with --libvirt, --freeze takes no socket: libvirt owns the guest agent",
            ))
        }
        None => None,
    };
    let mut run = Run {
        disks_before: disks
            .iter()
            .map(|d| (d.target.clone(), d.source.clone()))
            .collect(),
        lv,
        clock,
        progress,
        opts,
        disk,
        size,
        plan,
        path: path.clone(),
        st: State::default(),
        last: (0, 0),
    };
    // Apart from the run: the guest stays frozen while the run waits.
    let mut freezer = Freezer::new(agent, opts.freeze_hold);
    match run.snapshot(&mut freezer).await {
        Ok(mut report) => {
            run.progress.finish();
            report.started = started;
            report.finished = Stamp::now();
            Ok(report)
        }
        Err(f) => {
            run.progress
                .note(&format!("livesnap: {}; cleaning up", f.reason));
            let (left, aborted) = run.cleanup(&mut freezer).await;
            run.progress.finish();
            Err(failure_after_cleanup(
                f,
                aborted,
                &left,
                run.st.file_created,
            ))
        }
    }
}

impl Run<'_> {
    fn target_format(&self) -> &'static str {
        self.opts.format.name()
    }

    async fn snapshot(&mut self, freezer: &mut Freezer) -> Result<Report> {
        self.progress.note(&format!(
            "livesnap: {} of domain {} ({}, {}) -> {} by {}{}, deadline {}",
            self.disk.target,
            self.lv.name,
            self.disk.source.as_deref().unwrap_or("?"),
            bytes(self.size),
            self.path.display(),
            self.plan.method.name(),
            if self.plan.shallow {
                " (top layer only)"
            } else {
                ""
            },
            duration(self.opts.deadline)
        ));
        let created_via = if self.plan.create_here {
            self.create_here().await?;
            "local"
        } else {
            "libvirt"
        };
        let outcome = match self.plan.method {
            Method::Backup => self.backup(freezer).await?,
            Method::Mirror => self.mirror(freezer).await?,
        };
        self.st.running = None;
        let left = self.leftovers().await;
        if !left.is_empty() {
            // The copy is complete; what is wrong is around it.
            self.st.file_created = false;
            return Err(Failure::endpoint(format!(
                "snapshot {} complete but the domain is not as it was: {}",
                self.path.display(),
                left.join(", ")
            )));
        }
        Ok(self.report(outcome, created_via, freezer))
    }

    /// The target over the same backing file, as Nova creates its delta.
    async fn create_here(&mut self) -> Result<()> {
        let backing = match (&self.disk.backing, self.plan.shallow) {
            (Some(b), true) => match &b.format {
                Some(f) => Some((b.source.clone(), f.clone())),
                None => {
                    return Err(Failure::usage(format!(
                        "the format of the backing file {} is unknown (formats are never probed); --shallow needs it",
                        b.source
                    )))
                }
            },
            _ => None,
        };
        self.st.file_created = true;
        target::create_local(&TargetSpec {
            path: self.path.clone(),
            format: self.opts.format,
            size: self.size,
            backing,
            blkdebug: None,
        })
        .await
        .map_err(|f| during(f, "creating the target"))
    }

    /// The next event or a tick, under the deadline and the signal.
    async fn next(&mut self, until: Instant) -> Result<Waited<Received>> {
        let events = &mut self.lv.events;
        self.clock
            .next(until, |left| async move { Ok(events.next(left).await) })
            .await
    }

    fn show(&mut self, done: u64, total: u64, status: &str) {
        self.last = (done, total);
        let mirror = self.plan.method == Method::Mirror;
        self.progress.update(&Sample {
            done,
            total,
            remaining: mirror.then_some(total.saturating_sub(done)),
            mode: mirror.then(|| "write-blocking".to_string()),
            status: status.to_string(),
        });
    }

    /// Push-mode backup: the point in time is the `virDomainBackupBegin` call.
    async fn backup(&mut self, freezer: &mut Freezer) -> Result<Outcome> {
        let disks = self.lv.disks().await?;
        let doc = xml::push_backup(
            &disks,
            &self.disk.target,
            &self.path.to_string_lossy(),
            self.target_format(),
            None,
        );
        freezer.freeze().await?;
        self.progress.start(self.size);
        self.st.file_created = true;
        self.st.running = Some(Running::Backup);
        let t0 = Stamp::now();
        let interrupt = self.clock.interrupt.clone();
        let r = freezer
            .while_frozen(
                &interrupt,
                "virDomainBackupBegin",
                self.lv.backup_begin(doc),
            )
            .await;
        let t1 = Stamp::now();
        freezer.thaw(true).await;
        if let Err(f) = r {
            self.st.running = None;
            return Err(f);
        }
        self.progress
            .note("livesnap: point in time fixed (backup started); copying");
        if let Some(speed) = self.opts.speed {
            let note = limit_backup_speed(&self.lv, &self.disk.target, speed).await;
            self.st.notes.push(note);
        }
        let copied = self
            .wait_backup()
            .await
            .map_err(|f| during(f, "the backup job ran"))?;
        if self.lv.is_local() {
            target::wait_closed(&self.path, CLOSE_WAIT)
                .await
                .map_err(|f| during(f, "waiting for libvirt to close the target"))?;
        }
        Ok(Outcome {
            window: (t0, t1),
            defined_by: "virDomainBackupBegin call to its return",
            copied,
        })
    }

    /// Waits for the backup's `JOB_COMPLETED`; returns (processed, total).
    async fn wait_backup(&mut self) -> Result<(u64, u64)> {
        let r = wait_backup_job(&mut self.lv, &mut self.clock, &mut self.progress).await;
        match &r {
            Ok(copied) => {
                self.st.running = None;
                self.last = *copied;
            }
            // The job is over (failed, gone, or the domain stopped).
            Err(f) if f.kind == crate::error::Kind::Job => self.st.running = None,
            Err(_) => {}
        }
        r
    }

    fn lifecycle(&mut self, event: i32) -> Result<()> {
        let r = stopped(&self.lv.name, event);
        if r.is_err() {
            // Its jobs died with it.
            self.st.running = None;
        }
        r
    }

    /// Block copy to READY, then an asynchronous abort: the point in time
    /// is between the abort and the job's end event.
    async fn mirror(&mut self, freezer: &mut Freezer) -> Result<Outcome> {
        let mut flags = sys::VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
            | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
        if self.plan.shallow {
            flags |= sys::VIR_DOMAIN_BLOCK_COPY_SHALLOW;
        }
        if self.plan.create_here {
            flags |= sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT;
        }
        let dest = xml::copy_destination(&self.path.to_string_lossy(), self.target_format());
        self.progress.start(self.size);
        self.st.file_created = true;
        self.st.running = Some(Running::Copy);
        let disk = self.disk.target.clone();
        if let Err(f) = self
            .lv
            .block_copy(&disk, dest, self.opts.speed.unwrap_or(0), flags)
            .await
        {
            self.st.running = None;
            return Err(f);
        }
        self.wait_copy(Want::Ready)
            .await
            .map_err(|f| during(f, "waiting for the block copy to reach READY"))?;
        self.st.copy_ready = true;
        freezer.freeze().await?;
        let t0 = Stamp::now();
        self.lv.block_job_abort_async(&disk).await?;
        let interrupt = self.clock.interrupt.clone();
        let end = freezer
            .while_frozen(&interrupt, "the abort", self.wait_copy(Want::Ended))
            .await;
        let t1 = Stamp::now();
        freezer.thaw(true).await;
        end.map_err(|f| during(f, "the block copy finished its abort"))?;
        self.st.running = None;
        Ok(Outcome {
            window: (t0, t1),
            defined_by: "virDomainBlockJobAbort (async) sent to the job's end event received",
            copied: self.last,
        })
    }

    /// Follows the copy job on the disk until `want`; any other ending is a failure.
    async fn wait_copy(&mut self, want: Want) -> Result<()> {
        let disk = self.disk.target.clone();
        let mut next_tick = Instant::now() + LINE_INTERVAL;
        let mut vanished: Option<Instant> = None;
        loop {
            match self.next(next_tick).await? {
                Waited::Event(r) => match r.event {
                    DomainEvent::BlockJob {
                        disk: d,
                        kind,
                        status,
                    } if d == disk && kind == sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COPY as i32 => {
                        match (status as u32, want) {
                            (sys::VIR_DOMAIN_BLOCK_JOB_READY, Want::Ready) => return Ok(()),
                            (sys::VIR_DOMAIN_BLOCK_JOB_READY, Want::Ended) => {}
                            (sys::VIR_DOMAIN_BLOCK_JOB_FAILED, _) => {
                                self.st.running = None;
                                return Err(Failure::job(format!(
                                    "the block copy of {disk} failed (libvirt's log of the domain says why)"
                                )));
                            }
                            // After our abort in READY, QEMU's soft cancel ends
                            // the job; libvirt reports it as canceled.
                            (_, Want::Ended) => return Ok(()),
                            (s, Want::Ready) => {
                                self.st.running = None;
                                return Err(Failure::job(format!(
                                    "the block copy of {disk} ended ({}) before READY: ended by another client?",
                                    block_job_status(s as i32)
                                )));
                            }
                        }
                    }
                    DomainEvent::Lifecycle { event, .. } => self.lifecycle(event)?,
                    _ => {}
                },
                Waited::Tick => {
                    next_tick = Instant::now() + LINE_INTERVAL;
                    match self.lv.block_job_info(&disk).await? {
                        Some(j) => {
                            let status = match want {
                                Want::Ready => "running",
                                Want::Ended => "ready",
                            };
                            self.show(j.cur, j.end, status);
                            vanished = None;
                        }
                        None => {
                            let since = *vanished.get_or_insert_with(Instant::now);
                            if since.elapsed() >= EVENT_GRACE {
                                self.st.running = None;
                                return Err(Failure::job(format!(
                                    "the block copy of {disk} went away without an end event"
                                )));
                            }
                        }
                    }
                }
            }
        }
    }

    /// What the snapshot left on the domain: a job, a block job, a disk
    /// that was not there or went.
    async fn leftovers(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        match self.lv.job_stats(false).await {
            Ok(j) if j.kind != sys::VIR_DOMAIN_JOB_NONE as i32 => left.push(format!(
                "a domain job ({})",
                j.operation().unwrap_or("unknown")
            )),
            Ok(_) => {}
            Err(f) => left.push(format!("domain job state unknown ({})", f.reason)),
        }
        match self.lv.block_job_info(&self.disk.target).await {
            Ok(Some(j)) => left.push(format!(
                "a {} block job on {}",
                block_job_kind(j.kind),
                self.disk.target
            )),
            Ok(None) => {}
            Err(f) => left.push(format!("block job state unknown ({})", f.reason)),
        }
        match self.lv.disks().await {
            Ok(now) => {
                let now: Vec<(String, Option<String>)> = now
                    .iter()
                    .map(|d| (d.target.clone(), d.source.clone()))
                    .collect();
                if now != self.disks_before {
                    left.push(format!(
                        "the domain's disks changed: {:?} -> {:?}",
                        self.disks_before, now
                    ));
                }
            }
            Err(f) => left.push(format!("disk list unknown ({})", f.reason)),
        }
        left
    }

    /// After a failure: thaw, abort the job and wait (bounded) for it to
    /// end, remove the target file. Returns what is left and how the job
    /// was stopped.
    async fn cleanup(&mut self, freezer: &mut Freezer) -> (Vec<String>, Option<&'static str>) {
        freezer.thaw(false).await;
        let end = Instant::now() + CLEANUP_BUDGET;
        let mut left = Vec::new();
        let mut aborted = None;
        let mut job_left = false;
        if let Some(job) = self.st.running.take() {
            let what = match job {
                Running::Backup => "backup",
                Running::Copy => "block copy",
            };
            let r = match job {
                Running::Backup => self.lv.abort_job().await.map(|()| None),
                Running::Copy if !self.st.copy_ready => {
                    self.lv.abort_copy_early(&self.disk.target).await.map(Some)
                }
                Running::Copy => self
                    .lv
                    .block_job_abort_async(&self.disk.target)
                    .await
                    .map(|()| None),
            };
            let asked = Instant::now();
            let (r, paused) = match r {
                Ok(p) => (Ok(()), p),
                Err(f) => (Err(f), None),
            };
            let seen = match r {
                Ok(()) => {
                    aborted = Some(match job {
                        Running::Backup => "backup aborted",
                        Running::Copy => "block copy aborted",
                    });
                    self.wait_gone(job, end).await
                }
                // It may have ended by itself meanwhile.
                Err(_) => self.wait_gone(job, asked + Duration::from_secs(1)).await,
            };
            if let Some(p) = paused {
                match self.lv.resume_after(p).await {
                    Some(Ok(d)) => self.progress.note(&format!(
                        "livesnap: the guest was paused for {} around the early abort (QEMU 10.0 can crash when a write-blocking copy is cancelled before READY under guest writes)",
                        duration(d)
                    )),
                    Some(Err(e)) => left.push(format!("the domain paused (resume failed: {e})")),
                    None => {}
                }
            }
            if let Some(seen) = seen {
                job_left = true;
                left.push(format!(
                    "the {what} job (still there {} after its abort: {seen})",
                    duration(asked.elapsed())
                ));
            }
        }
        if Instant::now() < end && !job_left {
            left.extend(self.leftovers().await);
        }
        if self.st.file_created {
            if job_left {
                left.push(format!(
                    "file {} (the job still uses it)",
                    self.path.display()
                ));
            } else if self.lv.is_local() {
                left.extend(remove_target_file(&self.path));
            } else if self.plan.method == Method::Mirror {
                // libvirt deletes the backup targets it created; a copy's stays.
                left.push(format!(
                    "file {} on the libvirt host (remote: not removed)",
                    self.path.display()
                ));
            }
        }
        (left, aborted)
    }

    /// Waits (until `until` at most) for the job to be gone: `None` once it
    /// is, else what the last look at it saw.
    async fn wait_gone(&mut self, job: Running, until: Instant) -> Option<String> {
        job_gone(&mut self.lv, &self.disk.target, job, until).await
    }

    fn report(&mut self, o: Outcome, created_via: &'static str, freezer: &mut Freezer) -> Report {
        let mut notes = std::mem::take(&mut self.st.notes);
        notes.extend(freezer.take_notes());
        let mut guest_effect = match self.plan.method {
            Method::Backup => "copy-before-write (libvirt's push backup): a guest write to a cluster not yet copied waited for that copy; a target failure would have failed that guest write (QEMU's default on-cbw-error=break-guest-write, which libvirt does not change)".to_string(),
            Method::Mirror => "block copy with synchronous writes (QEMU's write-blocking mirror): every guest write also waited for the target while the job ran".to_string(),
        };
        if let Some(q) = freezer.quiesce() {
            guest_effect += &format!(
                "; {} filesystem(s) frozen for {:.1} ms",
                q.filesystems, q.frozen_ms
            );
        }
        Report {
            method: self.plan.method.name(),
            copy_mode: (self.plan.method == Method::Mirror).then(|| "write-blocking".to_string()),
            sync: if self.plan.shallow { "top" } else { "full" },
            disk: self.opts.disk.clone(),
            node: self.disk.target.clone(),
            driver: self.disk.format.clone().unwrap_or_default(),
            file: self.disk.source.clone().unwrap_or_default(),
            device: None,
            size: self.size,
            target: self.path.to_string_lossy().into_owned(),
            format: self.opts.format.name(),
            backing: if self.plan.shallow {
                self.disk.backing.as_ref().map(|b| b.source.clone())
            } else {
                None
            },
            created_via,
            job_id: match self.plan.method {
                Method::Backup => "backup".into(),
                Method::Mirror => format!("copy {}", self.disk.target),
            },
            window: o.window,
            window_defined_by: o.defined_by,
            bytes_copied: o.copied.0,
            bytes_total: o.copied.1,
            started: o.window.0,
            finished: o.window.1,
            quiesce: freezer.quiesce().cloned(),
            guest_effect,
            endpoint: self.lv.endpoint_name(),
            why: self.plan.why.clone(),
            notes,
        }
    }
}

/// Waits (until `until` at most) for the job to be gone: `None` once it
/// is, else what the last look at it saw.
pub(crate) async fn job_gone(
    lv: &mut Libvirt,
    disk: &str,
    job: Running,
    until: Instant,
) -> Option<String> {
    loop {
        let seen = match job {
            Running::Backup => match lv.job_stats(false).await {
                Ok(j) if j.kind == sys::VIR_DOMAIN_JOB_NONE as i32 => return None,
                Ok(j) => {
                    let (done, total) = j.progress();
                    format!("{} job, {}/{}", job_type(j.kind), bytes(done), bytes(total))
                }
                Err(f) => format!("its state unknown: {}", f.reason),
            },
            Running::Copy => match lv.block_job_info(disk).await {
                Ok(None) => return None,
                Ok(Some(j)) => format!(
                    "{} job, {}/{}",
                    block_job_kind(j.kind),
                    bytes(j.cur),
                    bytes(j.end)
                ),
                Err(f) => format!("its state unknown: {}", f.reason),
            },
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Some(seen);
        }
        let _ = lv.events.next(left.min(Duration::from_millis(200))).await;
    }
}

/// Limits the speed of the push backup just started on `disk` (libvirt's
/// backup XML has no bandwidth, so it is set on the running job); returns
/// the note that says how that went.
pub(crate) async fn limit_backup_speed(lv: &Libvirt, disk: &str, speed: u64) -> String {
    match lv.block_job_set_speed(disk, speed).await {
        Ok(()) => format!(
            "--speed {}/s was applied right after the backup started (libvirt's backup has no bandwidth of its own)",
            bytes(speed)
        ),
        Err(f) => format!("--speed not applied: {}", f.reason),
    }
}

/// Waits for the domain's backup job to end (its `JOB_COMPLETED` event,
/// checked against the completed job's statistics), showing its progress;
/// returns (processed, total). The job failing, vanishing without saying
/// how it ended, or the domain stopping is a [`crate::error::Kind::Job`]
/// failure: the job is over then.
pub(crate) async fn wait_backup_job(
    lv: &mut Libvirt,
    clock: &mut Clock,
    progress: &mut Progress,
) -> Result<(u64, u64)> {
    let mut next_tick = Instant::now() + LINE_INTERVAL;
    let mut vanished: Option<Instant> = None;
    let show = |progress: &mut Progress, done: u64, total: u64, status: &str| {
        progress.update(&Sample {
            done,
            total,
            remaining: None,
            mode: None,
            status: status.to_string(),
        })
    };
    loop {
        let events = &mut lv.events;
        let next = clock
            .next(next_tick, |left| async move { Ok(events.next(left).await) })
            .await?;
        match next {
            Waited::Event(r) => match r.event {
                DomainEvent::JobCompleted { stats } => {
                    let stats = JobStats {
                        kind: 0,
                        params: stats,
                    };
                    if stats.operation().is_some_and(|o| o != "backup") {
                        continue;
                    }
                    let (done, total) = backup_ended(&stats)?;
                    show(progress, done, total, "completed");
                    return Ok((done, total));
                }
                DomainEvent::Lifecycle { event, .. } => stopped(&lv.name, event)?,
                _ => {}
            },
            Waited::Tick => {
                next_tick = Instant::now() + LINE_INTERVAL;
                let now = lv.job_stats(false).await?;
                if now.kind != sys::VIR_DOMAIN_JOB_NONE as i32 {
                    let (done, total) = now.progress();
                    show(progress, done, total, "running");
                    continue;
                }
                // No job any more: the event should be on its way; past
                // a grace the completed statistics say how it ended.
                let since = *vanished.get_or_insert_with(Instant::now);
                if since.elapsed() >= EVENT_GRACE {
                    let done = lv.job_stats(true).await?;
                    if done.operation().is_some_and(|o| o == "backup") {
                        return backup_ended(&done);
                    }
                    return Err(Failure::job(
                        "the backup job went away without saying how it ended",
                    ));
                }
            }
        }
    }
}

/// (processed, total) of an ended backup job, or how it failed.
fn backup_ended(stats: &JobStats) -> Result<(u64, u64)> {
    let failed = stats.bool("success") == Some(false)
        || [sys::VIR_DOMAIN_JOB_FAILED, sys::VIR_DOMAIN_JOB_CANCELLED]
            .iter()
            .any(|k| stats.kind == *k as i32);
    if failed {
        let why = stats.str("errmsg").unwrap_or("no reason given");
        return Err(Failure::job(format!("the backup failed: {why}")));
    }
    Ok(stats.progress())
}

/// A failure when lifecycle `event` says the domain stopped (its jobs died with it).
fn stopped(domain: &str, event: i32) -> Result<()> {
    if event == sys::VIR_DOMAIN_EVENT_STOPPED as i32
        || event == sys::VIR_DOMAIN_EVENT_CRASHED as i32
    {
        return Err(Failure::job(format!(
            "domain {domain} {} while the job ran",
            crate::libvirt::lifecycle_event(event)
        )));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Ready,
    Ended,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use crate::libvirt::xml::BackingStore;
    use livesnap_block::ImageFormat;

    fn opts(method: MethodArg, shallow: bool) -> Options {
        Options {
            endpoint: super::super::EndpointArg::Libvirt {
                domain: "vm".into(),
                uri: None,
            },
            disk: "vda".into(),
            target: "t".into(),
            format: ImageFormat::Qcow2,
            shallow,
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

    fn disk(backing: bool) -> DiskDef {
        DiskDef {
            target: "vda".into(),
            kind: "file".into(),
            source: Some("/img/top.qcow2".into()),
            format: Some("qcow2".into()),
            backing: backing.then(|| BackingStore {
                source: "/img/base.raw".into(),
                format: Some("raw".into()),
            }),
            read_only: false,
            mirror: false,
            mirror_ready: false,
        }
    }

    const ALL: Offer = Offer {
        backup: true,
        sync_copy: true,
    };

    #[test]
    fn auto_is_backup_unless_shallow_over_a_backing_file() {
        let p = decide(&ALL, &opts(MethodArg::Auto, false), &disk(true), true).unwrap();
        assert_eq!(
            (p.method, p.shallow, p.create_here),
            (Method::Backup, false, false)
        );
        let p = decide(&ALL, &opts(MethodArg::Auto, true), &disk(true), true).unwrap();
        assert_eq!(
            (p.method, p.shallow, p.create_here),
            (Method::Mirror, true, true)
        );
        // No backing image: --shallow is a full copy, and backup does it.
        let p = decide(&ALL, &opts(MethodArg::Auto, true), &disk(false), true).unwrap();
        assert_eq!((p.method, p.shallow), (Method::Backup, false));
    }

    #[test]
    fn refuses_what_libvirt_cannot_bound() {
        let e = decide(&ALL, &opts(MethodArg::Backup, true), &disk(true), true).unwrap_err();
        assert_eq!(e.kind, Kind::Usage);
        let old = Offer {
            backup: true,
            sync_copy: false,
        };
        let e = decide(&old, &opts(MethodArg::Mirror, false), &disk(false), true).unwrap_err();
        assert!(e.reason.contains("SYNCHRONOUS_WRITES"), "{}", e.reason);
        let none = Offer {
            backup: false,
            sync_copy: false,
        };
        assert!(decide(&none, &opts(MethodArg::Auto, false), &disk(false), true).is_err());
        // A target made here cannot be on a remote host.
        let e = decide(&ALL, &opts(MethodArg::Mirror, true), &disk(true), false).unwrap_err();
        assert!(e.reason.contains("remote"), "{}", e.reason);
        let mut o = opts(MethodArg::Mirror, false);
        o.copy_mode = Some(CopyMode::Auto);
        assert!(decide(&ALL, &o, &disk(false), true).is_err());
    }
}
