//! `livesnap snapshot` against qemu-storage-daemon 10.0, the reference
//! endpoint: point-in-time under concurrent writers for backup and mirror,
//! raw and qcow2 targets, `--shallow`; and the failures that must leave
//! nothing behind (deadline, SIGINT, a failing target).

use livesnap_testkit::cli::Kind;
use livesnap_testkit::scenarios::*;

#[test]
fn backup_raw_target_is_point_in_time() {
    let r = pit_snapshot(Kind::Qsd, "backup", "raw", &["--speed", "24M"]);
    assert_eq!(r["target"]["created_via"], "blockdev-create", "{r}");
}

#[test]
fn backup_qcow2_target_created_locally_is_point_in_time() {
    let r = pit_snapshot(
        Kind::Qsd,
        "backup",
        "qcow2",
        &["--speed", "24M", "--create-via", "local"],
    );
    assert_eq!(r["target"]["created_via"], "local", "{r}");
}

#[test]
fn mirror_qcow2_target_is_point_in_time() {
    // A speed limit below the writers' rate: a background mirror would not
    // converge; livesnap switches it to write-blocking (block-job-change).
    let r = pit_snapshot(Kind::Qsd, "mirror", "qcow2", &["--speed", "16M"]);
    assert!(
        r["copy_mode"].as_str().unwrap().contains("write-blocking"),
        "{r}"
    );
}

#[test]
fn mirror_raw_target_is_point_in_time() {
    pit_snapshot(Kind::Qsd, "mirror", "raw", &[]);
}

#[test]
fn shallow_backup_copies_only_the_top_layer() {
    shallow(Kind::Qsd, "backup", &[]);
}

#[test]
fn shallow_mirror_copies_only_the_top_layer() {
    shallow(Kind::Qsd, "mirror", &[]);
}

#[test]
fn deadline_leaves_nothing_behind() {
    deadline_expires(Kind::Qsd);
}

#[test]
fn sigint_leaves_nothing_behind() {
    sigint(Kind::Qsd);
}

#[test]
fn failing_target_leaves_nothing_behind() {
    // No writers: QEMU's backup fails the guest's write when the target
    // fails (break-guest-write), which is not what this test is about.
    failing_target(Kind::Qsd, false);
}
