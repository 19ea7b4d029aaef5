//! The `create` job (QEMU's `block/create.c`): `blockdev-create` runs image
//! creation as a job. It is not a block job: no `BLOCK_JOB_*` events, not in
//! `query-block-jobs`, only `JOB_STATUS_CHANGE` and `query-jobs`. Progress
//! is 0 of 1 while it runs and 1 of 1 once done, failed or not, as in QEMU.

use std::sync::{Arc, Mutex};

use livesnap_block::create::{create_file, format_qcow2, FileCreateOptions, Qcow2CreateOptions};
use livesnap_block::BlockNode;

use crate::job::{JobCtx, JobDriver, JobFuture, JobOptions, JobType};

/// The node a create job formats, and what to do once the job is done with it.
pub struct OpenedNode {
    /// The protocol node the image is written to.
    pub node: Arc<BlockNode>,
    /// Run when the job is done with the node: drops a node opened just for the job.
    pub release: Option<Box<dyn FnOnce() + Send>>,
}

/// Opens the node a format is written to. QEMU opens `file` only when the
/// job runs (`bdrv_co_open_blockdev_ref`), so a bad reference fails the job,
/// not the command.
pub type OpenNode =
    Box<dyn FnOnce() -> JobFuture<'static, livesnap_block::Result<OpenedNode>> + Send>;

/// What a create job makes (the branches of QEMU's `BlockdevCreateOptions`
/// that livesnap implements).
pub enum CreateWork {
    /// A host file (`file` driver).
    File(FileCreateOptions),
    /// A qcow2 image written to an opened node.
    Qcow2 {
        /// Opens the node (`file` member).
        file: OpenNode,
        /// The other members.
        opts: Qcow2CreateOptions,
    },
}

/// The job options QEMU gives create jobs (`JOB_DEFAULT | JOB_MANUAL_DISMISS`):
/// finalised on their own, dismissed by `job-dismiss`.
pub const CREATE_JOB_OPTIONS: JobOptions = JobOptions {
    auto_finalize: true,
    auto_dismiss: false,
    speed: 0,
};

/// A `blockdev-create` job.
pub struct CreateJob {
    work: Mutex<Option<CreateWork>>,
}

impl CreateJob {
    /// A job that will do `work` once started.
    pub fn new(work: CreateWork) -> Arc<CreateJob> {
        Arc::new(CreateJob {
            work: Mutex::new(Some(work)),
        })
    }
}

async fn create(work: CreateWork) -> livesnap_block::Result<()> {
    match work {
        CreateWork::File(opts) => create_file(&opts).await,
        CreateWork::Qcow2 { file, opts } => {
            let opened = file().await?;
            let result = format_qcow2(&opened.node, &opts).await;
            if let Some(release) = opened.release {
                release();
            }
            result
        }
    }
}

impl JobDriver for CreateJob {
    fn job_type(&self) -> JobType {
        JobType::Create
    }

    fn is_block_job(&self) -> bool {
        false
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> JobFuture<'a, livesnap_block::Result<()>> {
        Box::pin(async move {
            ctx.progress_set_remaining(1);
            let work = self.work.lock().unwrap().take();
            let result = match work {
                Some(work) => create(work).await,
                None => Err(livesnap_block::Error::invalid("create job ran twice")),
            };
            ctx.progress_update(1);
            result
        })
    }
}
