//! The mirror job in-process: file nodes, a job manager, guest writes
//! straight to the source node.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use livesnap_block::{BlockBackend, BlockNode, FileDriver, FileOptions, IoBuf, WriteFlags};
use livesnap_jobs::exports::Exports;
use livesnap_jobs::mirror::{CopyMode, Mirror, MirrorOptions, MirrorSync, MirrorTuning};
use livesnap_jobs::{JobManager, JobOptions, JobStatus, OnError};
use serde_json::Value;

struct TestExports(Vec<Arc<BlockBackend>>);

impl Exports for TestExports {
    fn backends(&self) -> Vec<Arc<BlockBackend>> {
        self.0.clone()
    }
    fn pivoted(&self, _old: &Arc<BlockNode>, _new: &Arc<BlockNode>) {}
}

fn file_node(dir: &std::path::Path, name: &str, size: u64, fill: u8) -> Arc<BlockNode> {
    let path = dir.join(name);
    std::fs::write(&path, vec![fill; size as usize]).unwrap();
    let drv = FileDriver::open(&FileOptions {
        filename: path.to_str().unwrap().into(),
        direct: false,
        read_only: false,
    })
    .unwrap();
    BlockNode::new(name, Box::new(drv), false, true)
}

type Events = Arc<Mutex<Vec<(String, Value)>>>;

fn manager() -> (Arc<JobManager>, Events) {
    let events: Events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let m = JobManager::new(Arc::new(move |n: &str, d: Value| {
        sink.lock().unwrap().push((n.to_string(), d))
    }));
    (m, events)
}

fn mirror(
    src: &Arc<BlockNode>,
    tgt: &Arc<BlockNode>,
    mode: CopyMode,
    exports: Vec<Arc<BlockBackend>>,
) -> Arc<Mirror> {
    Mirror::new(MirrorOptions {
        source: src.clone(),
        target: tgt.clone(),
        replaces: src.clone(),
        sync: MirrorSync::Full,
        granularity: 64 << 10,
        buf_size: 16 << 20,
        copy_mode: mode,
        on_source_error: OnError::Report,
        on_target_error: OnError::Report,
        tuning: MirrorTuning::default(),
        exports: Arc::new(TestExports(exports)),
        users: Vec::new(),
    })
}

async fn read_all(n: &BlockNode) -> Vec<u8> {
    n.read(0, n.size() as usize).await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mirror_reaches_ready_and_pivots() {
    let dir = tempfile::tempdir().unwrap();
    let src = file_node(dir.path(), "src", 8 << 20, 0x5a);
    let tgt = file_node(dir.path(), "tgt", 8 << 20, 0);
    let backend = BlockBackend::new(src.clone());
    let (m, events) = manager();
    let job = m
        .spawn(
            "j",
            mirror(&src, &tgt, CopyMode::Background, vec![backend.clone()]),
            JobOptions::default(),
        )
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        job.wait_status(|s| s == JobStatus::Ready),
    )
    .await
    .expect("READY");
    assert_eq!(read_all(&tgt).await, read_all(&src).await);
    job.complete().unwrap();
    tokio::time::timeout(Duration::from_secs(5), job.wait_completed())
        .await
        .expect("completes");
    assert!(
        Arc::ptr_eq(&backend.root(), &tgt),
        "the export follows the target"
    );
    let names: Vec<String> = events.lock().unwrap().iter().map(|e| e.0.clone()).collect();
    assert!(names.contains(&"BLOCK_JOB_READY".to_string()), "{names:?}");
    assert!(
        names.contains(&"BLOCK_JOB_COMPLETED".to_string()),
        "{names:?}"
    );
    // Writes after the pivot land on the target.
    backend
        .write(0, IoBuf::from_slice(&[7u8; 4096]), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(&read_all(&tgt).await[..4096], &[7u8; 4096][..]);
}
