//! Backup and mirror copy the same bytes whichever way a chunk travels: inside
//! the kernel between raw images on plain files (copy offload), or through
//! buffers (a qcow2 target); holes, zero-filled data and a target that held
//! other data before all end byte-identical to the source (`qemu-img
//! compare`), with the page cache and with cache.direct, and across two file
//! systems (where the kernel refuses and buffers copy).

use livesnap_testkit as harness;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::pit::{add_image_node, wait_job_event};
use harness::{run_status, Livesnapd, Qmp};
use serde_json::json;

const MIB: u64 = 1 << 20;
/// Not a multiple of the 1 MiB chunk: the last copy is short.
const DISK: u64 = 24 * MIB + 192 * 1024;
const WAIT: Duration = Duration::from_secs(60);

/// A raw source with data extents, holes, an allocated run of zeroes and
/// data up to its last byte.
fn make_source(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(DISK).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = |len: u64| -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    for (at, len) in [
        (0, 3 * MIB),
        (5 * MIB + 4096, 64 * 1024),
        (9 * MIB, 5 * MIB + 12_288),
        (DISK - 192 * 1024, 192 * 1024),
    ] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&data(len)).unwrap();
    }
    // Allocated, but zeroes.
    f.seek(SeekFrom::Start(16 * MIB)).unwrap();
    f.write_all(&vec![0; 2 * MIB as usize]).unwrap();
    f.sync_all().unwrap();
}

fn add_raw(qmp: &mut Qmp, node: &str, path: &Path, direct: bool) {
    qmp.ok(
        "blockdev-add",
        json!({
            "driver": "raw",
            "node-name": node,
            "cache": {"direct": direct},
            "file": {"driver": "file", "filename": path.to_str().unwrap(),
                     "cache": {"direct": direct}},
        }),
    );
}

fn same(source: &Path, target: &Path, target_format: &str) {
    let (status, out, err) = run_status(
        Command::new("qemu-img")
            .args(["compare", "-U", "-f", "raw", "-F", target_format])
            .arg(source)
            .arg(target),
    );
    assert!(
        status.success(),
        "{} differs from the source: {out}{err}",
        target.display()
    );
}

/// Runs `job` (backup to the end, or mirror to READY and a soft cancel).
fn run_job(qmp: &mut Qmp, job: &str, target: &str) {
    let cmd = if job == "backup" {
        "blockdev-backup"
    } else {
        "blockdev-mirror"
    };
    qmp.ok(
        cmd,
        json!({"job-id": "j", "device": "src", "target": target, "sync": "full"}),
    );
    if job == "mirror" {
        wait_job_event(qmp, "j", "BLOCK_JOB_READY", WAIT);
        qmp.ok("block-job-cancel", json!({"device": "j"}));
    }
    wait_job_event(qmp, "j", "BLOCK_JOB_COMPLETED", WAIT);
}

fn copies_are_identical(direct: bool, source_dir: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let src = source_dir.join("src.raw");
    make_source(&src);
    let d = Livesnapd::bare();
    let mut qmp = d.qmp();
    add_raw(&mut qmp, "src", &src, direct);
    let mut n = 0;
    for job in ["backup", "mirror"] {
        for target_format in ["raw", "qcow2"] {
            n += 1;
            let node = format!("t{n}");
            let path = dir.path().join(format!("{node}.{target_format}"));
            if target_format == "raw" && direct {
                harness::create_image(&path, "raw", DISK);
                add_raw(&mut qmp, &node, &path, true);
            } else {
                add_image_node(&mut qmp, &node, &path, target_format, DISK);
            }
            run_job(&mut qmp, job, &node);
            same(&src, &path, target_format);
        }
        // A raw target that held other data: zero runs of the source must
        // be written, not skipped.
        n += 1;
        let node = format!("t{n}");
        let path = dir.path().join(format!("{node}.raw"));
        std::fs::write(&path, vec![0xa5; DISK as usize]).unwrap();
        add_raw(&mut qmp, &node, &path, direct);
        run_job(&mut qmp, job, &node);
        same(&src, &path, "raw");
    }
}

#[test]
fn backup_and_mirror_copies_are_identical_with_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    copies_are_identical(false, dir.path());
}

#[test]
fn backup_and_mirror_copies_are_identical_with_cache_direct() {
    let dir = tempfile::tempdir().unwrap();
    copies_are_identical(true, dir.path());
}

/// A source on tmpfs and targets on the test directory's file system: the
/// kernel refuses (EXDEV) and every chunk goes through buffers.
#[test]
fn backup_and_mirror_copies_are_identical_across_file_systems() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    copies_are_identical(false, dir.path());
}
