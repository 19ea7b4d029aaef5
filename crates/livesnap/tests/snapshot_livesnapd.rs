//! `livesnap snapshot` against livesnapd: point-in-time under concurrent writers for backup and mirror,
//! raw and qcow2 targets, `--shallow`; and the failures that must leave
//! nothing behind (deadline, SIGINT, a failing target).

mod common;

use common::scenarios::*;
use common::{Daemon, Kind};

const MIB: u64 = 1 << 20;

#[test]
fn backup_raw_target_is_point_in_time() {
    let d = Daemon::raw(Kind::Livesnapd, 32 * MIB);
    let r = pit_snapshot(&d, "backup", "raw", 32 * MIB, &["--speed", "24M"]);
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
    let d = Daemon::raw(Kind::Livesnapd, 32 * MIB);
    let r = pit_snapshot(
        &d,
        "backup",
        "qcow2",
        32 * MIB,
        &["--speed", "24M", "--create-via", "local"],
    );
    assert_eq!(r["target"]["created_via"], "local", "{r}");
}

#[test]
fn mirror_qcow2_target_is_point_in_time() {
    // A speed limit below the writers' rate: livesnapd's copy-mode auto
    // switches to write-blocking by itself (or, should it not within 5 s,
    // livesnap does with block-job-change).
    let d = Daemon::raw(Kind::Livesnapd, 32 * MIB);
    let r = pit_snapshot(&d, "mirror", "qcow2", 32 * MIB, &["--speed", "16M"]);
    assert!(r["copy_mode"].as_str().unwrap().starts_with("auto"), "{r}");
}

#[test]
fn mirror_raw_target_is_point_in_time() {
    let d = Daemon::raw(Kind::Livesnapd, 32 * MIB);
    pit_snapshot(&d, "mirror", "raw", 32 * MIB, &[]);
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
    let d = Daemon::raw(Kind::Livesnapd, 64 * MIB);
    deadline_expires(&d, "backup");
    deadline_expires(&d, "mirror");
}

#[test]
fn sigint_leaves_nothing_behind() {
    let d = Daemon::raw(Kind::Livesnapd, 64 * MIB);
    sigint(&d, "backup");
    sigint(&d, "mirror");
}

#[test]
fn failing_target_leaves_nothing_behind() {
    // Guest writes go on and none fails: the backup runs with
    // on-cbw-error=break-snapshot, the mirror reports target errors on the job.
    let d = Daemon::raw(Kind::Livesnapd, 16 * MIB);
    failing_target(&d, "backup", true);
    failing_target(&d, "mirror", true);
}

#[test]
fn shallow_mirror_write_blocking_from_the_start() {
    shallow(
        Kind::Livesnapd,
        "mirror",
        &["--copy-mode", "write-blocking"],
    );
}
