//! `livesnap snapshot` against livesnapd: point-in-time under concurrent writers for backup and mirror,
//! raw and qcow2 targets, `--shallow`; and the failures that must leave
//! nothing behind (deadline, SIGINT, a failing target).

use livesnap_testkit::cli::Kind;
use livesnap_testkit::scenarios::*;

#[test]
fn backup_raw_target_is_point_in_time() {
    let r = pit_snapshot(Kind::Livesnapd, "backup", "raw", &["--speed", "24M"]);
    assert_eq!(r["target"]["created_via"], "blockdev-create", "{r}");
    assert!(
        r["guest_effect"]
            .as_str()
            .unwrap()
            .contains("break-snapshot"),
        "{r}"
    );
}

#[test]
fn backup_qcow2_target_created_locally_is_point_in_time() {
    let r = pit_snapshot(
        Kind::Livesnapd,
        "backup",
        "qcow2",
        &["--speed", "24M", "--create-via", "local"],
    );
    assert_eq!(r["target"]["created_via"], "local", "{r}");
}

#[test]
fn mirror_qcow2_target_is_point_in_time() {
    // A speed limit below the writers' rate: livesnapd's copy-mode auto
    // switches to write-blocking by itself (or, should it not within 5 s,
    // livesnap does with block-job-change).
    let r = pit_snapshot(Kind::Livesnapd, "mirror", "qcow2", &["--speed", "16M"]);
    assert!(r["copy_mode"].as_str().unwrap().starts_with("auto"), "{r}");
}

#[test]
fn mirror_raw_target_is_point_in_time() {
    pit_snapshot(Kind::Livesnapd, "mirror", "raw", &[]);
}

#[test]
fn shallow_backup_copies_only_the_top_layer() {
    shallow(Kind::Livesnapd, "backup", &[]);
}

#[test]
fn shallow_mirror_copies_only_the_top_layer() {
    shallow(Kind::Livesnapd, "mirror", &[]);
}

#[test]
fn deadline_leaves_nothing_behind() {
    deadline_expires(Kind::Livesnapd);
}

#[test]
fn sigint_leaves_nothing_behind() {
    sigint(Kind::Livesnapd);
}

#[test]
fn failing_target_leaves_nothing_behind() {
    // Guest writes go on and none fails: the backup runs with
    // on-cbw-error=break-snapshot, the mirror reports target errors on the job.
    failing_target(Kind::Livesnapd, true);
}

#[test]
fn shallow_mirror_write_blocking_from_the_start() {
    shallow(
        Kind::Livesnapd,
        "mirror",
        &["--copy-mode", "write-blocking"],
    );
}
