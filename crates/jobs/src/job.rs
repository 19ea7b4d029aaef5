//! QEMU's job model (`job.c`, `blockjob.c`, `qapi/job.json`): states, the
//! transition and verb tables, pausing, cancelling, completion, finalisation,
//! progress and the QMP events every transition emits.
//!
//! A job is a [`JobDriver`] (what the job does: mirror, backup, create) run
//! by a [`Job`] (the state machine around it). Drivers see the job only
//! through [`JobCtx`]: pause points, cancellation, progress, rate limiting
//! and error policies.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::watch;

use livesnap_block::id_wellformed;

use crate::ratelimit::RateLimit;

/// A boxed future returned by job drivers.
pub type JobFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a job's QMP events go: `(event name, data)`.
pub type EventSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// QEMU's `JobStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Not yet created.
    Undefined,
    /// Created, not started.
    Created,
    /// Working.
    Running,
    /// Paused while running.
    Paused,
    /// Ready to be completed.
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for the other jobs of its transaction.
    Waiting,
    /// Done, waiting for `job-finalize`.
    Pending,
    /// Failed or cancelled, being rolled back.
    Aborting,
    /// Finished, waiting for `job-dismiss`.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// Every state, in QEMU's order.
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// QEMU's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// True in READY and STANDBY (QEMU's `job_is_ready`).
    pub fn is_ready(self) -> bool {
        matches!(self, JobStatus::Ready | JobStatus::Standby)
    }

    /// True once the job's work is over (QEMU's `job_is_completed`).
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

/// QEMU's `JobVerb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobVerb {
    /// `job-cancel`, `block-job-cancel`.
    Cancel,
    /// `job-pause`, `block-job-pause`.
    Pause,
    /// `job-resume`, `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`, `block-job-complete`.
    Complete,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
    /// `block-job-change`.
    Change,
}

impl JobVerb {
    /// QEMU's name for the verb.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

// Columns: U, C, R, P, Y, S, W, D, X, E, N (JobStatus order), as in job.c.
const TRANSITIONS: [[u8; 11]; 11] = [
    /* U */ [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    /* C */ [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    /* R */ [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    /* P */ [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    /* Y */ [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    /* S */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    /* W */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
    /* D */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* X */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* E */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    /* N */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
];

fn verb_allowed(verb: JobVerb, s: JobStatus) -> bool {
    const ACTIVE: [u8; 11] = [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    let row: [u8; 11] = match verb {
        JobVerb::Cancel => [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => ACTIVE,
        JobVerb::Complete => [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        JobVerb::Finalize => [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        JobVerb::Dismiss => [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
    };
    row[s.index()] == 1
}

/// QEMU's `JobType` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobType {
    /// `blockdev-mirror`.
    Mirror,
    /// `blockdev-backup`.
    Backup,
    /// `blockdev-create`.
    Create,
}

impl JobType {
    /// QEMU's name for the type.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Create => "create",
        }
    }
}

/// QEMU's `BlockdevOnError`: what a job does when its I/O fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job (default).
    #[default]
    Report,
    /// Go on as if the request had succeeded.
    Ignore,
    /// Stop (pause) on ENOSPC, report anything else.
    Enospc,
    /// Stop (pause) the job; `block-job-resume` retries.
    Stop,
}

impl OnError {
    /// QEMU's enum members, for argument parsing.
    pub const NAMES: &'static [&'static str] = &["report", "ignore", "enospc", "stop", "auto"];

    /// Parses a member of `BlockdevOnError`; a job treats `auto` as
    /// `enospc` (QEMU's `block_job_error_action`).
    pub fn parse(s: &str) -> Option<OnError> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" | "auto" => OnError::Enospc,
            "stop" => OnError::Stop,
            _ => return None,
        })
    }
}

/// What the driver does after [`JobCtx::io_error`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorVerdict {
    /// Give up: the job fails with this message.
    Fail(livesnap_block::Error),
    /// Treat the request as done.
    Ignore,
    /// The job was stopped and resumed: try the request again.
    Retry,
}

/// What a job does: the driver side of QEMU's `JobDriver`/`BlockJobDriver`.
pub trait JobDriver: Send + Sync + 'static {
    /// The job's type.
    fn job_type(&self) -> JobType;

    /// True for block jobs (listed by `query-block-jobs`, `BLOCK_JOB_*` events).
    fn is_block_job(&self) -> bool {
        true
    }

    /// The job's work; `Err` carries the message the job fails with.
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> JobFuture<'a, livesnap_block::Result<()>>;

    /// `job-complete` in READY: ask `run` to finish. Drivers that cannot complete keep the default.
    fn complete(&self, ctx: &JobCtx) -> livesnap_block::Result<()> {
        Err(livesnap_block::Error::invalid(format!(
            "The active block job '{}' cannot be completed",
            ctx.id()
        )))
    }

    /// A cancel request; returns whether it acts as a force cancel (QEMU's
    /// `.cancel`). Mirror turns a soft cancel in READY into a completion
    /// without pivot and returns false.
    fn cancel(&self, ctx: &JobCtx, force: bool) -> bool {
        let _ = (ctx, force);
        true
    }

    /// After a successful run: the last step that may still fail (mirror pivots here).
    fn prepare<'a>(&'a self, ctx: &'a JobCtx) -> JobFuture<'a, livesnap_block::Result<()>> {
        let _ = ctx;
        Box::pin(async { Ok(()) })
    }

    /// The job succeeded.
    fn commit<'a>(&'a self, ctx: &'a JobCtx) -> JobFuture<'a, ()> {
        let _ = ctx;
        Box::pin(async {})
    }

    /// The job failed or was cancelled: undo.
    fn abort<'a>(&'a self, ctx: &'a JobCtx) -> JobFuture<'a, ()> {
        let _ = ctx;
        Box::pin(async {})
    }

    /// Either way: release what the job held (nodes, hooks).
    fn clean<'a>(&'a self, ctx: &'a JobCtx) -> JobFuture<'a, ()> {
        let _ = ctx;
        Box::pin(async {})
    }

    /// `block-job-change`: the type-specific members after `id` and `type`.
    fn change(&self, ctx: &JobCtx, options: &Map<String, Value>) -> livesnap_block::Result<()> {
        let _ = (ctx, options);
        Err(livesnap_block::Error::invalid(
            "Job type does not support change",
        ))
    }

    /// Type-specific members of `query-block-jobs` (mirror: `actively-synced`).
    fn block_job_info(&self) -> Map<String, Value> {
        Map::new()
    }
}

/// Options common to every job (QEMU's `auto-finalize`, `auto-dismiss`, `speed`).
#[derive(Clone, Copy, Debug)]
pub struct JobOptions {
    /// Finalise as soon as the job is done (default true).
    pub auto_finalize: bool,
    /// Dismiss as soon as the job concludes (default true).
    pub auto_dismiss: bool,
    /// Bytes per second, 0 = unlimited.
    pub speed: u64,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
        }
    }
}

/// What a cancel leaves to do once the state is updated.
enum Finish {
    /// Never started: conclude now.
    Completed,
    /// Waiting for the transaction or for finalisation: abort it now.
    Abort,
    /// Running: wake it so it sees the cancel.
    Kick,
    /// Nothing (a soft cancel after the work was done).
    Nothing,
}

/// QEMU's `BlockDeviceIoStatus` of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoStatus {
    Ok,
    Failed,
    Nospace,
}

struct State {
    status: JobStatus,
    pause_count: u32,
    user_paused: bool,
    paused: bool,
    busy: bool,
    started: bool,
    /// `run` returned; the job waits for finalisation.
    deferred: bool,
    // prepare/commit/abort have begun: QEMU runs them in one go under the
    // job lock, here they await, so a second finalize or a late cancel must
    // not start them again.
    finalizing: bool,
    cancelled: bool,
    force_cancel: bool,
    complete_requested: bool,
    ret: Option<livesnap_block::Error>,
    progress_current: u64,
    progress_total: u64,
    rate: RateLimit,
    io_status: IoStatus,
    auto_finalize: bool,
    auto_dismiss: bool,
}

/// Jobs that end together (QEMU's `JobTxn`, a `transaction` with
/// `completion-mode: grouped`): if one fails or is cancelled, every other
/// is cancelled; none is finalised before all are done, and then all are,
/// each committing or all aborting. A job started on its own is the only
/// job of its own transaction.
pub struct JobTxn {
    state: Mutex<TxnState>,
}

struct TxnState {
    /// Newest first, as QEMU lists them: the order of finalisation.
    jobs: Vec<Arc<Job>>,
    /// Someone decided how the transaction ends (abort, or finalisation of
    /// all after success): nobody else may.
    decided: bool,
}

impl JobTxn {
    /// An empty transaction; jobs join it when created with [`JobManager::create_in`].
    pub fn new() -> Arc<JobTxn> {
        Arc::new(JobTxn {
            state: Mutex::new(TxnState {
                jobs: Vec::new(),
                decided: false,
            }),
        })
    }

    fn remove(&self, job: &Job) {
        self.state
            .lock()
            .unwrap()
            .jobs
            .retain(|j| !std::ptr::eq(Arc::as_ptr(j), job));
    }

    /// Takes the decision to abort, once; gives every job.
    fn decide_abort(&self) -> Option<Vec<Arc<Job>>> {
        let mut t = self.state.lock().unwrap();
        if t.decided {
            return None;
        }
        t.decided = true;
        Some(t.jobs.clone())
    }
}

/// One job: the state machine around a [`JobDriver`].
pub struct Job {
    id: String,
    driver: Arc<dyn JobDriver>,
    txn: Arc<JobTxn>,
    state: Mutex<State>,
    // Bumped on every pause, resume, cancel, complete or speed change: wakes
    // a job waiting at a pause point or in a rate-limit sleep.
    kick: watch::Sender<u64>,
    // Bumped on every status change, for waiters outside the job.
    changed: watch::Sender<u64>,
    events: EventSink,
    manager: Weak<JobManager>,
    started_at: OnceLock<Instant>,
}

/// A job's progress at one moment, for a metrics endpoint.
#[derive(Clone, Copy, Debug)]
pub struct JobProgress {
    /// The state.
    pub status: JobStatus,
    /// Bytes done (`offset` of `query-block-jobs`).
    pub offset: u64,
    /// Bytes to do in all (`len`).
    pub len: u64,
    /// Speed limit in bytes per second, 0 for none (`speed`).
    pub speed: u64,
    /// Time since the job started; zero before it did.
    pub running_for: Duration,
}

/// The handle a driver uses to talk to its job.
#[derive(Clone)]
pub struct JobCtx {
    job: Arc<Job>,
}

/// Every job of one daemon, newest first (QEMU's `jobs` list).
pub struct JobManager {
    jobs: Mutex<Vec<Arc<Job>>>,
    events: EventSink,
}

impl JobManager {
    /// A manager that sends job events to `events`.
    pub fn new(events: EventSink) -> Arc<JobManager> {
        Arc::new(JobManager {
            jobs: Mutex::new(Vec::new()),
            events,
        })
    }

    /// Checks that `id` can name a new job (QEMU's `job_create` checks).
    pub fn check_id(&self, id: &str) -> livesnap_block::Result<()> {
        if !id_wellformed(id) {
            return Err(livesnap_block::Error::invalid(format!(
                "Invalid job ID '{id}'"
            )));
        }
        if self.get(id).is_some() {
            return Err(livesnap_block::Error::invalid(format!(
                "Job ID '{id}' already in use"
            )));
        }
        Ok(())
    }

    /// Creates job `id` (state CREATED) without starting it.
    pub fn create(
        self: &Arc<Self>,
        id: &str,
        driver: Arc<dyn JobDriver>,
        opts: JobOptions,
    ) -> livesnap_block::Result<Arc<Job>> {
        self.create_in(id, driver, opts, None)
    }

    /// Creates job `id` (state CREATED) in transaction `txn` (grouped
    /// completion), or on its own, without starting it.
    pub fn create_in(
        self: &Arc<Self>,
        id: &str,
        driver: Arc<dyn JobDriver>,
        opts: JobOptions,
        txn: Option<&Arc<JobTxn>>,
    ) -> livesnap_block::Result<Arc<Job>> {
        self.check_id(id)?;
        let txn = txn.cloned().unwrap_or_else(JobTxn::new);
        let job = Arc::new(Job {
            id: id.to_string(),
            driver,
            txn: txn.clone(),
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                pause_count: 1,
                user_paused: false,
                paused: true,
                busy: false,
                started: false,
                deferred: false,
                finalizing: false,
                cancelled: false,
                force_cancel: false,
                complete_requested: false,
                ret: None,
                progress_current: 0,
                progress_total: 0,
                rate: RateLimit::new(opts.speed),
                io_status: IoStatus::Ok,
                auto_finalize: opts.auto_finalize,
                auto_dismiss: opts.auto_dismiss,
            }),
            kick: watch::channel(0).0,
            changed: watch::channel(0).0,
            events: self.events.clone(),
            manager: Arc::downgrade(self),
            started_at: OnceLock::new(),
        });
        self.jobs.lock().unwrap().insert(0, job.clone());
        txn.state.lock().unwrap().jobs.insert(0, job.clone());
        job.transition(&mut job.state.lock().unwrap(), JobStatus::Created);
        Ok(job)
    }

    /// Creates and starts job `id`.
    pub fn spawn(
        self: &Arc<Self>,
        id: &str,
        driver: Arc<dyn JobDriver>,
        opts: JobOptions,
    ) -> livesnap_block::Result<Arc<Job>> {
        let job = self.create(id, driver, opts)?;
        job.start();
        Ok(job)
    }

    /// The job called `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap()
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().unwrap().clone()
    }

    fn forget(&self, job: &Job) {
        self.jobs
            .lock()
            .unwrap()
            .retain(|j| !std::ptr::eq(Arc::as_ptr(j), job));
    }

    /// Force-cancels every job and waits (bounded) until each has ended:
    /// what the daemon does before it exits.
    pub async fn cancel_all(&self, limit: Duration) {
        let jobs = self.jobs();
        for job in &jobs {
            job.cancel_locked_path(true).await;
        }
        let all = async {
            for job in &jobs {
                job.wait_completed().await;
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
    }
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job's type.
    pub fn job_type(&self) -> JobType {
        self.driver.job_type()
    }

    /// True for block jobs.
    pub fn is_block_job(&self) -> bool {
        self.driver.is_block_job()
    }

    /// The current state.
    pub fn status(&self) -> JobStatus {
        self.state.lock().unwrap().status
    }

    /// The driver's handle on this job; creators use it between
    /// [`JobManager::create`] and [`Job::start`] (a backup sets its progress
    /// so that `query-block-jobs` never shows `len` 0 of a job just started).
    pub fn ctx(self: &Arc<Self>) -> JobCtx {
        JobCtx { job: self.clone() }
    }

    fn kick(&self) {
        self.kick.send_modify(|k| *k = k.wrapping_add(1));
    }

    fn transition(&self, st: &mut State, to: JobStatus) {
        let from = st.status;
        assert!(
            TRANSITIONS[from.index()][to.index()] == 1,
            "job {}: illegal transition {} -> {}",
            self.id,
            from.as_str(),
            to.as_str()
        );
        st.status = to;
        if from != to {
            (self.events)(
                "JOB_STATUS_CHANGE",
                json!({"id": self.id, "status": to.as_str()}),
            );
            self.changed.send_modify(|k| *k = k.wrapping_add(1));
        }
    }

    fn apply_verb(&self, st: &State, verb: JobVerb) -> livesnap_block::Result<()> {
        if verb_allowed(verb, st.status) {
            return Ok(());
        }
        Err(livesnap_block::Error::invalid(format!(
            "Job '{}' in state '{}' cannot accept command verb '{}'",
            self.id,
            st.status.as_str(),
            verb.as_str()
        )))
    }

    /// The members every `BLOCK_JOB_*` event of this job carries.
    fn block_event_data(&self, st: &State) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("type".into(), json!(self.job_type().as_str()));
        m.insert("device".into(), json!(self.id));
        m.insert("len".into(), json!(st.progress_total));
        m.insert("offset".into(), json!(st.progress_current));
        m.insert("speed".into(), json!(st.rate.speed()));
        m
    }

    fn block_event(&self, name: &str, data: Map<String, Value>) {
        if self.is_block_job() {
            (self.events)(name, Value::Object(data));
        }
    }

    /// Starts the job's work on the runtime (QEMU's `job_start`).
    pub fn start(self: &Arc<Self>) {
        {
            let mut st = self.state.lock().unwrap();
            assert!(!st.started);
            let _ = self.started_at.set(Instant::now());
            st.started = true;
            st.pause_count -= 1;
            st.busy = true;
            st.paused = false;
            self.transition(&mut st, JobStatus::Running);
        }
        let job = self.clone();
        tokio::spawn(async move {
            // The driver runs in a task of its own so that a bug that panics
            // in it fails the job (and its clean-up runs) instead of leaving
            // it RUNNING for ever.
            let worker = job.clone();
            let ret = tokio::spawn(async move {
                let ctx = worker.ctx();
                ctx.pause_point().await;
                worker.driver.run(&ctx).await
            })
            .await
            .unwrap_or_else(|e| {
                tracing::error!("job {}: the job's task failed: {e}", job.id);
                Err(livesnap_block::Error::new(
                    livesnap_block::ErrorKind::Io,
                    format!("internal error: {e}"),
                ))
            });
            {
                let mut st = job.state.lock().unwrap();
                st.ret = ret.err();
                st.deferred = true;
                st.busy = false;
            }
            job.completed().await;
        });
    }

    /// QEMU's `job_update_rc`: a force-cancelled job fails with ECANCELED.
    fn update_rc(&self, st: &mut State) -> bool {
        if st.ret.is_none() && st.force_cancel {
            st.ret = Some(livesnap_block::Error::cancelled());
        }
        if st.ret.is_some() {
            if st.status != JobStatus::Aborting {
                self.transition(st, JobStatus::Aborting);
            }
            return true;
        }
        false
    }

    /// The work is over (QEMU's `job_completed`): a failure aborts the
    /// whole transaction, a success waits for the other jobs of it.
    async fn completed(self: &Arc<Self>) {
        let failed = {
            let mut st = self.state.lock().unwrap();
            self.update_rc(&mut st)
        };
        if failed {
            self.txn_abort().await;
        } else {
            self.txn_success().await;
        }
    }

    /// QEMU's `job_completed_txn_success`: WAITING until every job of the
    /// transaction is done; then all go to PENDING (newest first) and,
    /// unless one of them waits for `job-finalize`, are finalised.
    async fn txn_success(self: &Arc<Self>) {
        let jobs = {
            let mut t = self.txn.state.lock().unwrap();
            {
                let mut st = self.state.lock().unwrap();
                self.transition(&mut st, JobStatus::Waiting);
            }
            // A job still running, or one that failed (its abort is on its way).
            let unfinished = t.jobs.iter().any(|j| {
                let s = j.status();
                !s.is_completed() || s == JobStatus::Aborting
            });
            if t.decided || unfinished {
                return;
            }
            let mut auto = true;
            for j in &t.jobs {
                let mut st = j.state.lock().unwrap();
                j.transition(&mut st, JobStatus::Pending);
                if !st.auto_finalize {
                    auto = false;
                    let mut m = Map::new();
                    m.insert("type".into(), json!(j.job_type().as_str()));
                    m.insert("id".into(), json!(j.id));
                    j.block_event("BLOCK_JOB_PENDING", m);
                }
            }
            if !auto {
                return;
            }
            t.decided = true;
            for j in &t.jobs {
                j.state.lock().unwrap().finalizing = true;
            }
            t.jobs.clone()
        };
        Job::finalize_txn(jobs).await;
    }

    /// QEMU's `job_completed_txn_abort`: every other job of the transaction
    /// is force-cancelled; once all have stopped, all are finalised (they
    /// abort), newest first. Whoever comes second does nothing: the first
    /// one finalises it too.
    async fn txn_abort(self: &Arc<Self>) {
        let Some(jobs) = self.txn.decide_abort() else {
            return;
        };
        for j in jobs.iter().filter(|j| !Arc::ptr_eq(j, self)) {
            j.cancel_async(true);
        }
        // All stop before any is finalised: a backup's clean-up in QEMU
        // polls long enough for the cancelled jobs to reach ABORTING first.
        for j in &jobs {
            j.wait_stopped().await;
        }
        for j in &jobs {
            j.state.lock().unwrap().finalizing = true;
            j.finalize_single().await;
        }
    }

    /// Resolves once the job's work is over, or at once if it never started.
    async fn wait_stopped(&self) {
        if !self.state.lock().unwrap().started {
            return;
        }
        self.wait_status(JobStatus::is_completed).await;
    }

    /// QEMU's `job_do_finalize` over a transaction whose end was decided
    /// (every job PENDING): `prepare` each, newest first; if one fails the
    /// others are cancelled and all abort, otherwise all commit.
    async fn finalize_txn(jobs: Vec<Arc<Job>>) {
        let mut failed = false;
        for j in &jobs {
            if !j.prepare_step().await {
                failed = true;
                break;
            }
        }
        if failed {
            for j in &jobs {
                j.cancel_async(true);
            }
        }
        for j in &jobs {
            j.finalize_single().await;
        }
    }

    /// The driver's `prepare` of a job that has not failed; false if it
    /// failed (now or before).
    async fn prepare_step(self: &Arc<Self>) -> bool {
        let ctx = self.ctx();
        let prepare = self.state.lock().unwrap().ret.is_none();
        if prepare {
            let ret = self.driver.prepare(&ctx).await;
            let mut st = self.state.lock().unwrap();
            if let Err(e) = ret {
                st.ret.get_or_insert(e);
            }
        }
        let mut st = self.state.lock().unwrap();
        !self.update_rc(&mut st)
    }

    /// Commit or abort, clean, emit the final event, conclude.
    async fn finalize_single(self: &Arc<Self>) {
        let ctx = self.ctx();
        let failed = {
            let mut st = self.state.lock().unwrap();
            self.update_rc(&mut st)
        };
        if failed {
            self.driver.abort(&ctx).await;
        } else {
            self.driver.commit(&ctx).await;
        }
        self.driver.clean(&ctx).await;
        let mut st = self.state.lock().unwrap();
        if st.started {
            let mut m = self.block_event_data(&st);
            if st.force_cancel {
                self.block_event("BLOCK_JOB_CANCELLED", m);
            } else {
                if let Some(e) = &st.ret {
                    m.insert("error".into(), json!(e.text()));
                }
                self.block_event("BLOCK_JOB_COMPLETED", m);
            }
        }
        self.transition(&mut st, JobStatus::Concluded);
        if st.auto_dismiss || !st.started {
            self.dismiss_locked(&mut st);
        }
        drop(st);
        self.txn.remove(self);
    }

    fn dismiss_locked(&self, st: &mut State) {
        st.busy = false;
        st.paused = false;
        st.deferred = true;
        self.transition(st, JobStatus::Null);
        if let Some(m) = self.manager.upgrade() {
            m.forget(self);
        }
    }

    /// `job-pause` / `block-job-pause`.
    pub fn pause(&self) -> livesnap_block::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.apply_verb(&st, JobVerb::Pause)?;
        if st.user_paused {
            return Err(livesnap_block::Error::invalid("Job is already paused"));
        }
        st.user_paused = true;
        st.pause_count += 1;
        drop(st);
        self.kick();
        Ok(())
    }

    /// `job-resume` / `block-job-resume`.
    pub fn resume(&self) -> livesnap_block::Result<()> {
        let mut st = self.state.lock().unwrap();
        if !st.user_paused || st.pause_count == 0 {
            return Err(livesnap_block::Error::invalid(
                "Can't resume a job that was not paused",
            ));
        }
        self.apply_verb(&st, JobVerb::Resume)?;
        st.io_status = IoStatus::Ok;
        st.user_paused = false;
        st.pause_count -= 1;
        drop(st);
        self.kick();
        Ok(())
    }

    /// `job-cancel` (always forceful) / `block-job-cancel` (`force` as given).
    pub async fn cancel(self: &Arc<Self>, force: bool) -> livesnap_block::Result<()> {
        {
            let st = self.state.lock().unwrap();
            self.apply_verb(&st, JobVerb::Cancel)?;
        }
        self.cancel_locked_path(force).await;
        Ok(())
    }

    /// True while the job is paused by `job-pause` or by a `stop` error policy.
    pub fn user_paused(&self) -> bool {
        self.state.lock().unwrap().user_paused
    }

    /// QEMU's `job_cancel_locked`: no verb check, and a CONCLUDED job is
    /// dismissed (what shutdown wants).
    async fn cancel_locked_path(self: &Arc<Self>, force: bool) {
        {
            let mut st = self.state.lock().unwrap();
            match st.status {
                JobStatus::Concluded => {
                    self.dismiss_locked(&mut st);
                    return;
                }
                JobStatus::Null => return,
                _ => {}
            }
            // Finalisation already under way: QEMU would have run it to the
            // end before looking at this cancel, so it no longer matters.
            if st.finalizing {
                return;
            }
        }
        if !self.cancel_async(force) {
            return;
        }
        let finish = {
            let mut st = self.state.lock().unwrap();
            if !st.started {
                st.finalizing = st.force_cancel;
                Finish::Completed
            } else if st.deferred {
                // Done already: only a force cancel of a job waiting (for
                // the others of its transaction, or for finalisation) has
                // anything left to abort. A job still on its way there sees
                // the cancel in `completed`.
                if st.force_cancel && matches!(st.status, JobStatus::Waiting | JobStatus::Pending) {
                    Finish::Abort
                } else {
                    Finish::Nothing
                }
            } else {
                Finish::Kick
            }
        };
        match finish {
            Finish::Completed => self.completed().await,
            Finish::Abort => self.txn_abort().await,
            Finish::Kick => self.kick(),
            Finish::Nothing => {}
        }
    }

    /// QEMU's `job_cancel_async`: the driver hears of the cancel (and may
    /// turn it into a soft one), and the job is marked cancelled; a soft
    /// cancel of a job whose work is done is ignored. False when the job's
    /// end is already decided, so the cancel no longer matters.
    fn cancel_async(self: &Arc<Self>, force: bool) -> bool {
        let force = self.driver.cancel(&self.ctx(), force);
        {
            let mut st = self.state.lock().unwrap();
            if st.user_paused {
                st.user_paused = false;
                st.pause_count -= 1;
                st.io_status = IoStatus::Ok;
            }
            if st.finalizing {
                return false;
            }
            if force || !st.deferred {
                st.cancelled = true;
                st.force_cancel |= force;
            }
        }
        self.kick();
        true
    }

    /// `job-complete` / `block-job-complete`.
    pub fn complete(self: &Arc<Self>) -> livesnap_block::Result<()> {
        {
            let st = self.state.lock().unwrap();
            self.apply_verb(&st, JobVerb::Complete)?;
            if st.cancelled {
                return Err(livesnap_block::Error::invalid(format!(
                    "The active block job '{}' cannot be completed",
                    self.id
                )));
            }
        }
        self.driver.complete(&self.ctx())?;
        self.state.lock().unwrap().complete_requested = true;
        self.kick();
        Ok(())
    }

    /// `job-finalize` / `block-job-finalize`.
    /// Finalises every job of the job's transaction (all are PENDING).
    pub async fn finalize(self: &Arc<Self>) -> livesnap_block::Result<()> {
        {
            let st = self.state.lock().unwrap();
            self.apply_verb(&st, JobVerb::Finalize)?;
        }
        let jobs = {
            let mut t = self.txn.state.lock().unwrap();
            if t.decided {
                None
            } else {
                t.decided = true;
                for j in &t.jobs {
                    j.state.lock().unwrap().finalizing = true;
                }
                Some(t.jobs.clone())
            }
        };
        match jobs {
            Some(jobs) => Job::finalize_txn(jobs).await,
            // Another finalize (or a cancel) is doing it: in QEMU the job
            // would be past PENDING by now, so answer once it is.
            None => {
                self.wait_status(|s| !matches!(s, JobStatus::Pending | JobStatus::Aborting))
                    .await
            }
        }
        Ok(())
    }

    /// `job-dismiss` / `block-job-dismiss`.
    pub fn dismiss(&self) -> livesnap_block::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.apply_verb(&st, JobVerb::Dismiss)?;
        self.dismiss_locked(&mut st);
        Ok(())
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, speed: i64) -> livesnap_block::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.apply_verb(&st, JobVerb::SetSpeed)?;
        if speed < 0 {
            return Err(livesnap_block::Error::invalid(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        st.rate.set_speed(speed as u64);
        drop(st);
        self.kick();
        Ok(())
    }

    /// `block-job-change` with the members after `id` and `type`.
    pub fn change(self: &Arc<Self>, options: &Map<String, Value>) -> livesnap_block::Result<()> {
        {
            let st = self.state.lock().unwrap();
            self.apply_verb(&st, JobVerb::Change)?;
        }
        self.driver.change(&self.ctx(), options)?;
        self.kick();
        Ok(())
    }

    /// Resolves once the job has concluded (or is gone).
    pub async fn wait_completed(&self) {
        let mut rx = self.changed.subscribe();
        loop {
            if matches!(self.status(), JobStatus::Concluded | JobStatus::Null) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves once the job's status satisfies `pred`.
    pub async fn wait_status(&self, pred: impl Fn(JobStatus) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if pred(self.status()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// A member of `query-jobs` (QEMU's `JobInfo`).
    pub fn info(&self) -> Value {
        let st = self.state.lock().unwrap();
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("type".into(), json!(self.job_type().as_str()));
        m.insert("status".into(), json!(st.status.as_str()));
        m.insert("current-progress".into(), json!(st.progress_current));
        m.insert("total-progress".into(), json!(st.progress_total));
        if let Some(e) = &st.ret {
            m.insert("error".into(), json!(e.text()));
        }
        Value::Object(m)
    }

    /// Progress, speed limit and state, read under one lock, so they agree.
    pub fn progress(&self) -> JobProgress {
        let st = self.state.lock().unwrap();
        JobProgress {
            status: st.status,
            offset: st.progress_current,
            len: st.progress_total,
            speed: st.rate.speed(),
            running_for: self
                .started_at
                .get()
                .map_or(Duration::ZERO, Instant::elapsed),
        }
    }

    /// A member of `query-block-jobs` (QEMU's `BlockJobInfo`).
    pub fn block_info(&self) -> Value {
        let extra = self.driver.block_job_info();
        let st = self.state.lock().unwrap();
        let mut m = Map::new();
        m.insert("type".into(), json!(self.job_type().as_str()));
        m.insert("device".into(), json!(self.id));
        m.insert("len".into(), json!(st.progress_total));
        m.insert("offset".into(), json!(st.progress_current));
        m.insert("busy".into(), json!(st.busy));
        m.insert("paused".into(), json!(st.pause_count > 0));
        m.insert("speed".into(), json!(st.rate.speed()));
        let io = match st.io_status {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        };
        m.insert("io-status".into(), json!(io));
        m.insert("ready".into(), json!(st.status.is_ready()));
        m.insert("status".into(), json!(st.status.as_str()));
        m.insert("auto-finalize".into(), json!(st.auto_finalize));
        m.insert("auto-dismiss".into(), json!(st.auto_dismiss));
        if let Some(e) = &st.ret {
            m.insert("error".into(), json!(e.text()));
        }
        m.extend(extra);
        Value::Object(m)
    }
}

impl JobCtx {
    /// The job's id (the `device` of its block-job events).
    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// The job this context drives.
    pub fn job(&self) -> &Arc<Job> {
        &self.job
    }

    /// True once the job was force-cancelled (QEMU's `job_is_cancelled`):
    /// the driver must stop as soon as it can.
    pub fn is_cancelled(&self) -> bool {
        self.job.state.lock().unwrap().force_cancel
    }

    /// True once any cancel was requested, soft ones included.
    pub fn cancel_requested(&self) -> bool {
        self.job.state.lock().unwrap().cancelled
    }

    /// True once `job-complete` was accepted.
    pub fn complete_requested(&self) -> bool {
        self.job.state.lock().unwrap().complete_requested
    }

    /// True in READY or STANDBY.
    pub fn is_ready(&self) -> bool {
        self.job.status().is_ready()
    }

    /// Enters READY and emits `BLOCK_JOB_READY` (QEMU's `job_transition_to_ready`).
    pub fn set_ready(&self) {
        let mut st = self.job.state.lock().unwrap();
        if st.status != JobStatus::Running {
            return;
        }
        self.job.transition(&mut st, JobStatus::Ready);
        let m = self.job.block_event_data(&st);
        self.job.block_event("BLOCK_JOB_READY", m);
    }

    /// Adds `done` bytes to the progress (`offset` only grows).
    pub fn progress_update(&self, done: u64) {
        let mut st = self.job.state.lock().unwrap();
        st.progress_current += done;
        if st.progress_current > st.progress_total {
            st.progress_total = st.progress_current;
        }
    }

    /// Sets the work still to do; `len` becomes `offset + remaining`.
    pub fn progress_set_remaining(&self, remaining: u64) {
        let mut st = self.job.state.lock().unwrap();
        st.progress_total = st.progress_current + remaining;
    }

    /// Adds `delta` bytes of work (a guest write dirtied more).
    pub fn progress_increase_remaining(&self, delta: u64) {
        let mut st = self.job.state.lock().unwrap();
        st.progress_total += delta;
    }

    /// `(offset, len)` of the progress.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.job.state.lock().unwrap();
        (st.progress_current, st.progress_total)
    }

    /// The current speed limit in bytes per second (0 = none).
    pub fn speed(&self) -> u64 {
        self.job.state.lock().unwrap().rate.speed()
    }

    /// A receiver that changes whenever the job is kicked (pause, resume,
    /// cancel, complete, speed change); drivers `select!` on it.
    pub fn kicks(&self) -> watch::Receiver<u64> {
        self.job.kick.subscribe()
    }

    /// Wakes the job's own waits (drivers call it when their state changes).
    pub fn kick(&self) {
        self.job.kick();
    }

    /// Parks here while the job is paused (QEMU's `job_pause_point`).
    pub async fn pause_point(&self) {
        let mut rx = self.job.kick.subscribe();
        let resume_to = {
            let mut st = self.job.state.lock().unwrap();
            if st.pause_count == 0 || st.force_cancel {
                return;
            }
            let status = st.status;
            let paused = if status == JobStatus::Ready {
                JobStatus::Standby
            } else {
                JobStatus::Paused
            };
            self.job.transition(&mut st, paused);
            st.paused = true;
            st.busy = false;
            status
        };
        loop {
            {
                let st = self.job.state.lock().unwrap();
                if st.pause_count == 0 || st.force_cancel {
                    break;
                }
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        let mut st = self.job.state.lock().unwrap();
        st.paused = false;
        st.busy = true;
        self.job.transition(&mut st, resume_to);
    }

    /// Sleeps for `d`, waking early on a kick; then a pause point (QEMU's `job_sleep_ns`).
    pub async fn sleep(&self, d: Duration) {
        let mut rx = self.job.kick.subscribe();
        let pause_now = {
            let mut st = self.job.state.lock().unwrap();
            if st.force_cancel {
                return;
            }
            if st.pause_count == 0 {
                st.busy = false;
            }
            st.pause_count > 0
        };
        if pause_now {
            self.pause_point().await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = rx.changed() => {}
        }
        self.job.state.lock().unwrap().busy = true;
        self.pause_point().await;
    }

    /// Counts `bytes` against the speed limit.
    pub fn ratelimit_account(&self, bytes: u64) {
        self.job.state.lock().unwrap().rate.account(bytes);
    }

    /// How long the speed limit wants the job to wait now.
    pub fn ratelimit_delay(&self) -> Duration {
        self.job.state.lock().unwrap().rate.delay()
    }

    /// Waits as long as the speed limit requires (re-evaluated when the speed changes).
    pub async fn ratelimit_sleep(&self) {
        loop {
            let d = self.ratelimit_delay();
            if d.is_zero() || self.is_cancelled() {
                self.pause_point().await;
                return;
            }
            self.sleep(d).await;
        }
    }

    /// Applies an error policy to a failed request (QEMU's
    /// `block_job_error_action`): emits `BLOCK_JOB_ERROR`, and for `stop`
    /// pauses the job until it is resumed (then the driver retries).
    pub async fn io_error(&self, policy: OnError, is_read: bool, err: &io::Error) -> ErrorVerdict {
        let enospc = err.raw_os_error() == Some(libc::ENOSPC);
        let action = match policy {
            OnError::Enospc if enospc => "stop",
            OnError::Enospc | OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Stop => "stop",
        };
        if self.job.is_block_job() {
            (self.job.events)(
                "BLOCK_JOB_ERROR",
                json!({
                    "device": self.job.id,
                    "operation": if is_read { "read" } else { "write" },
                    "action": action,
                }),
            );
        }
        match action {
            "ignore" => ErrorVerdict::Ignore,
            "report" => ErrorVerdict::Fail(err.into()),
            _ => {
                {
                    let mut st = self.job.state.lock().unwrap();
                    if st.io_status == IoStatus::Ok {
                        st.io_status = if enospc {
                            IoStatus::Nospace
                        } else {
                            IoStatus::Failed
                        };
                    }
                    if !st.user_paused {
                        st.user_paused = true;
                        st.pause_count += 1;
                    }
                }
                self.pause_point().await;
                if self.is_cancelled() {
                    ErrorVerdict::Fail(err.into())
                } else {
                    ErrorVerdict::Retry
                }
            }
        }
    }
}
