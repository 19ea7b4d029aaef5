//! The job state machine of livesnapd against qemu-storage-daemon: the same
//! QMP sequences on both, every verb in every state a job can be brought to
//! from QMP.
//!
//! States are reached with `blockdev-backup` `sync: "none"` (RUNNING until
//! cancelled, never READY; PAUSED), `blockdev-mirror` `sync: "full"` of a
//! small raw disk (READY at once; STANDBY; completion), `auto-finalize:
//! false` (PENDING) and `auto-dismiss: false` (CONCLUDED); a
//! `blockdev-create` job stands for jobs that are not block jobs.
//!
//! Each side records a transcript (`livesnap_testkit::transcript`): for
//! every command its reply kind, error class and text, the events that
//! followed it, and the job queries; the transcripts must be equal.

use livesnap_testkit as harness;

use harness::transcript::{compare, DISK};
use serde_json::{json, Value};

fn backup(id: &str, extra: Value) -> Value {
    let mut args = json!({"job-id": id, "device": "src", "target": "tgt", "sync": "none"});
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    args
}

fn mirror(id: &str, extra: Value) -> Value {
    let mut args = json!({"job-id": id, "device": "src", "target": "tgt", "sync": "full"});
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    args
}

#[test]
fn lookups_and_arguments() {
    compare(|s| {
        s.queries();
        s.all_verbs("nope", &[]);
        for (name, args) in [
            ("job-pause", json!({})),
            ("job-pause", json!({"id": 1})),
            ("job-cancel", json!({"id": "x", "force": true})),
            ("query-jobs", json!({"x": 1})),
            ("query-block-jobs", json!({"x": 1})),
            ("block-job-cancel", json!({"device": "x", "force": "yes"})),
            ("block-job-cancel", json!({"force": true})),
            ("block-job-complete", json!({"id": "x"})),
            ("block-job-set-speed", json!({"device": "x"})),
            ("block-job-set-speed", json!({"device": "x", "speed": "1"})),
            ("block-job-set-speed", json!({"speed": 1})),
            ("block-job-set-speed", json!({"device": "x", "speed": 1.5})),
            ("block-job-change", json!({})),
            ("block-job-change", json!({"type": "mirror"})),
            ("block-job-change", json!({"id": "x"})),
            ("block-job-change", json!({"id": "x", "type": "bogus"})),
            ("block-job-change", json!({"id": "x", "type": "mirror"})),
            (
                "block-job-change",
                json!({"id": "x", "type": "mirror", "copy-mode": "bogus"}),
            ),
            (
                "block-job-change",
                json!({"id": "x", "type": "mirror", "copy-mode": 1}),
            ),
            (
                "block-job-change",
                json!({"id": "x", "type": "backup", "copy-mode": "background"}),
            ),
            (
                "block-job-change",
                json!({"id": "x", "type": "mirror", "copy-mode": "background", "zz": 1}),
            ),
            ("block-job-finalize", json!({"device": "x"})),
            ("block-job-dismiss", json!({})),
            ("job-dismiss", json!({"id": "x", "y": 2})),
        ] {
            s.cmd(name, args);
        }
    });
}

#[test]
fn backup_running_and_paused() {
    compare(|s| {
        s.cmd_until("blockdev-backup", backup("j", json!({})), &["j running"]);
        s.queries();
        // RUNNING: everything but pause and cancel.
        s.all_verbs(
            "j",
            &[
                "job-pause",
                "block-job-pause",
                "block-job-cancel",
                "job-cancel",
            ],
        );
        s.queries();
        s.cmd_until("job-pause", json!({"id": "j"}), &["j paused"]);
        s.queries();
        // PAUSED: pausing again, a soft cancel of a paused job, the rest.
        s.all_verbs("j", &["job-resume", "block-job-resume", "job-cancel"]);
        s.cmd_until("job-resume", json!({"id": "j"}), &["j running"]);
        s.cmd_until("block-job-pause", json!({"device": "j"}), &["j paused"]);
        s.cmd_until("block-job-resume", json!({"device": "j"}), &["j running"]);
        s.queries();
        // A soft cancel before READY is a force cancel.
        s.cmd_until("block-job-cancel", json!({"device": "j"}), &["j null"]);
        s.queries();
        s.all_verbs("j", &[]);
    });
}

#[test]
fn backup_cancelled_while_paused_then_concluded() {
    compare(|s| {
        s.cmd_until(
            "blockdev-backup",
            backup("j", json!({"auto-dismiss": false, "speed": 4096})),
            &["j running"],
        );
        s.cmd_until("block-job-pause", json!({"device": "j"}), &["j paused"]);
        s.cmd_until("job-cancel", json!({"id": "j"}), &["j concluded"]);
        // CONCLUDED, with the cancel as its error.
        s.queries();
        s.all_verbs("j", &["job-dismiss", "block-job-dismiss"]);
        s.cmd_until("block-job-dismiss", json!({"id": "j"}), &["j null"]);
        s.queries();
    });
}

#[test]
fn backup_force_cancel_while_paused() {
    compare(|s| {
        s.cmd_until("blockdev-backup", backup("j", json!({})), &["j running"]);
        s.cmd_until("job-pause", json!({"id": "j"}), &["j paused"]);
        s.cmd_until(
            "block-job-cancel",
            json!({"device": "j", "force": true}),
            &["j null"],
        );
        s.queries();
    });
}

#[test]
fn mirror_ready_standby_pending_concluded() {
    compare(|s| {
        s.cmd_until(
            "blockdev-mirror",
            mirror("m", json!({"auto-finalize": false, "auto-dismiss": false})),
            &["m ready"],
        );
        s.queries();
        // READY: everything but pause, complete and cancel.
        s.all_verbs(
            "m",
            &[
                "job-pause",
                "block-job-pause",
                "job-complete",
                "block-job-complete",
                "block-job-cancel",
                "job-cancel",
            ],
        );
        s.queries();
        s.cmd_until("job-pause", json!({"id": "m"}), &["m standby"]);
        s.queries();
        // STANDBY: everything but resume, complete and cancel.
        s.all_verbs(
            "m",
            &[
                "job-resume",
                "block-job-resume",
                "job-complete",
                "block-job-complete",
                "job-cancel",
            ],
        );
        s.cmd_until("block-job-resume", json!({"device": "m"}), &["m ready"]);
        s.cmd_until("block-job-complete", json!({"device": "m"}), &["m pending"]);
        s.queries();
        // PENDING: everything but finalize and cancel.
        s.all_verbs(
            "m",
            &[
                "job-finalize",
                "block-job-finalize",
                "block-job-cancel",
                "job-cancel",
            ],
        );
        s.cmd_until("block-job-finalize", json!({"id": "m"}), &["m concluded"]);
        s.queries();
        // CONCLUDED: everything but dismiss.
        s.all_verbs("m", &["job-dismiss", "block-job-dismiss"]);
        s.cmd_until("job-dismiss", json!({"id": "m"}), &["m null"]);
        s.queries();
    });
}

#[test]
fn mirror_complete_in_standby() {
    compare(|s| {
        s.cmd_until("blockdev-mirror", mirror("m", json!({})), &["m ready"]);
        s.cmd_until("block-job-pause", json!({"device": "m"}), &["m standby"]);
        // Accepted while paused; the job completes once resumed.
        s.cmd("job-complete", json!({"id": "m"}));
        s.queries();
        s.cmd_until("job-resume", json!({"id": "m"}), &["m null"]);
        s.queries();
    });
}

#[test]
fn mirror_soft_cancel_in_ready_completes() {
    compare(|s| {
        s.cmd_until("blockdev-mirror", mirror("m", json!({})), &["m ready"]);
        s.cmd_until("block-job-cancel", json!({"device": "m"}), &["m null"]);
        s.queries();
    });
}

#[test]
fn mirror_force_cancels() {
    compare(|s| {
        s.cmd_until("blockdev-mirror", mirror("m", json!({})), &["m ready"]);
        s.cmd_until(
            "block-job-cancel",
            json!({"device": "m", "force": true}),
            &["m null"],
        );
        s.cmd_until("blockdev-mirror", mirror("m", json!({})), &["m ready"]);
        s.cmd_until("job-cancel", json!({"id": "m"}), &["m null"]);
        s.cmd_until("blockdev-mirror", mirror("m", json!({})), &["m ready"]);
        s.cmd_until("job-pause", json!({"id": "m"}), &["m standby"]);
        s.cmd_until("job-cancel", json!({"id": "m"}), &["m null"]);
        s.queries();
    });
}

#[test]
fn mirror_cancel_in_pending() {
    compare(|s| {
        // A soft cancel in READY leads to PENDING like a completion...
        s.cmd_until(
            "blockdev-mirror",
            mirror("m", json!({"auto-finalize": false, "auto-dismiss": false})),
            &["m ready"],
        );
        s.cmd_until("block-job-cancel", json!({"device": "m"}), &["m pending"]);
        s.queries();
        // ...where a cancel (soft ones too: the job is no longer READY) aborts it.
        s.cmd_until("block-job-cancel", json!({"device": "m"}), &["m concluded"]);
        s.queries();
        s.cmd_until("job-dismiss", json!({"id": "m"}), &["m null"]);
        s.cmd_until(
            "blockdev-mirror",
            mirror("m", json!({"auto-finalize": false})),
            &["m ready"],
        );
        s.cmd_until("job-complete", json!({"id": "m"}), &["m pending"]);
        s.cmd_until("job-cancel", json!({"id": "m"}), &["m null"]);
        s.queries();
    });
}

#[test]
fn create_job_is_not_a_block_job() {
    compare(|s| {
        let path = s.path("new.img");
        s.cmd_until(
            "blockdev-create",
            json!({
                "job-id": "c",
                "options": {"driver": "file", "filename": path.to_str().unwrap(), "size": DISK},
            }),
            &["c concluded"],
        );
        // blockdev-create jobs are dismissed by hand; block-job-* do not see them.
        s.queries();
        s.all_verbs("c", &["job-dismiss"]);
        s.cmd_until("job-dismiss", json!({"id": "c"}), &["c null"]);
        s.queries();
    });
}
