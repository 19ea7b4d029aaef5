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
//! Each side records a transcript: for every command its reply kind, error
//! class and text; the events that followed it (names, job status values,
//! the identifying members and the key set of `BLOCK_JOB_*` data); and for
//! `query-jobs`/`query-block-jobs` the shape (`shape_diff`) and the values
//! that do not depend on timing. The transcripts must be equal.
//!
//! Not compared, because they depend on timing or on QEMU internals:
//! `busy`; `len`/`offset` values (only that READY comes with `offset ==
//! len`); `paused` outside RUNNING/PAUSED/READY/STANDBY (a QEMU mirror in
//! PENDING still holds the drained section of its completion, so qsd says
//! `paused: true`); and a PAUSED/RUNNING (or STANDBY/READY) pair of status
//! changes inside one step, which is a drained section in QEMU (qsd emits
//! one while a backup job starts), not a pause anybody asked for.
//!
//! `JOB_STATES_DUMP=1` prints both transcripts.

use livesnap_testkit as harness;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::{shape_diff, sparse_file, Livesnapd, Qmp, Qsd};
use serde_json::{json, Value};

/// Disk size of every scenario: small, so a mirror is READY at once.
const DISK: u64 = 4 << 20;
/// Longest wait for an expected event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long "nothing more happens" is waited for after each command.
const QUIET: Duration = Duration::from_millis(120);

/// One line of a transcript.
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    /// A command and how it ended: `ok` or `Class: text`.
    Reply(String, String),
    /// Events that came after the previous entry, normalised.
    Events(Vec<String>),
    /// A query's normalised result.
    Query(String, Value),
}

/// One daemon under test, with its images and transcript.
struct Side {
    name: &'static str,
    /// The daemon, kept for as long as the side lives (dropping it stops it).
    _daemon: Box<dyn std::any::Any>,
    dir: PathBuf,
    qmp: Qmp,
    log: Vec<Entry>,
    /// Raw query results, for the shape comparison.
    raw: Vec<(String, Value)>,
}

impl Side {
    fn livesnapd() -> Side {
        let d = Livesnapd::bare();
        let dir = d.dir.path().to_path_buf();
        let qmp = d.qmp();
        Side::new("livesnapd", Box::new(d), dir, qmp)
    }

    fn qsd() -> Side {
        let d = Qsd::bare();
        let dir = d.dir.path().to_path_buf();
        let qmp = d.qmp();
        Side::new("qsd", Box::new(d), dir, qmp)
    }

    fn new(name: &'static str, daemon: Box<dyn std::any::Any>, dir: PathBuf, qmp: Qmp) -> Side {
        let mut s = Side {
            name,
            _daemon: daemon,
            dir,
            qmp,
            log: Vec::new(),
            raw: Vec::new(),
        };
        for node in ["src", "tgt"] {
            let path = s.dir.join(format!("{node}.img"));
            sparse_file(&path, DISK);
            s.qmp.ok(
                "blockdev-add",
                json!({
                    "driver": "raw",
                    "node-name": node,
                    "file": {"driver": "file", "filename": path.to_str().unwrap()},
                }),
            );
        }
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs a command, records its outcome and the events up to a quiet pause.
    fn cmd(&mut self, name: &str, args: Value) {
        self.cmd_until(name, args, &[]);
    }

    /// Runs a command, records its outcome, then waits until every event in
    /// `until` (normalised form, in any order) has arrived and things are
    /// quiet again, and records the events.
    fn cmd_until(&mut self, name: &str, args: Value, until: &[&str]) {
        let r = self.qmp.execute(name, args.clone());
        let outcome = match &r {
            Ok(_) => "ok".to_string(),
            Err((class, desc)) => format!("{class}: {desc}"),
        };
        // Paths differ between the two sides' directories.
        let shown = args.to_string().replace(self.dir.to_str().unwrap(), "$DIR");
        self.log
            .push(Entry::Reply(format!("{name} {shown}"), outcome));
        self.settle(until);
    }

    fn settle(&mut self, until: &[&str]) {
        let mut events = Vec::new();
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let mut missing: Vec<&str> = until.to_vec();
        loop {
            let wait = if missing.is_empty() {
                QUIET
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match self.qmp.event(wait) {
                Some(e) => {
                    let n = normalise_event(&e);
                    missing.retain(|m| *m != n);
                    events.push(n);
                }
                None if missing.is_empty() => break,
                None => panic!(
                    "{}: no {missing:?} within {EVENT_TIMEOUT:?}; events so far {events:?}; transcript {:#?}",
                    self.name, self.log
                ),
            }
        }
        self.log.push(Entry::Events(drop_drain_pairs(events)));
    }

    /// Records `query-jobs` and `query-block-jobs`.
    fn queries(&mut self) {
        for q in ["query-jobs", "query-block-jobs"] {
            let v = self.qmp.ok(q, Value::Null);
            self.log
                .push(Entry::Query(q.to_string(), normalise_query(&v)));
            self.raw.push((q.to_string(), v));
        }
    }

    /// Every verb on job `id` (the block-job-* ones by `device` or `id`);
    /// used where each is expected to be refused or harmless.
    fn all_verbs(&mut self, id: &str, skip: &[&str]) {
        let verbs: Vec<(&str, Value)> = vec![
            ("job-pause", json!({"id": id})),
            ("block-job-pause", json!({"device": id})),
            ("job-resume", json!({"id": id})),
            ("block-job-resume", json!({"device": id})),
            ("job-complete", json!({"id": id})),
            ("block-job-complete", json!({"device": id})),
            ("job-finalize", json!({"id": id})),
            ("block-job-finalize", json!({"id": id})),
            ("job-dismiss", json!({"id": id})),
            ("block-job-dismiss", json!({"id": id})),
            ("block-job-set-speed", json!({"device": id, "speed": -1})),
            ("block-job-set-speed", json!({"device": id, "speed": 65536})),
            ("block-job-change", json!({"id": id, "type": "backup"})),
            (
                "block-job-change",
                json!({"id": id, "type": "mirror", "copy-mode": "background"}),
            ),
            ("block-job-cancel", json!({"device": id})),
            ("job-cancel", json!({"id": id})),
        ];
        for (name, args) in verbs {
            if !skip.contains(&name) {
                self.cmd(name, args);
            }
        }
    }
}

/// A short, comparable form of an event.
fn normalise_event(e: &Value) -> String {
    let name = e["event"].as_str().unwrap_or("?");
    let d = &e["data"];
    let s = |k: &str| d[k].as_str().unwrap_or("-").to_string();
    let mut keys: Vec<&str> = d
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort();
    let keys = keys.join(",");
    match name {
        "JOB_STATUS_CHANGE" => format!("{} {}", s("id"), s("status")),
        "BLOCK_JOB_READY" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
            let mut out = format!(
                "{name} {} {} speed={} [{keys}]",
                s("type"),
                s("device"),
                d["speed"]
            );
            if name == "BLOCK_JOB_READY" {
                out += &format!(" at-end={}", d["offset"] == d["len"]);
            }
            if let Some(err) = d.get("error") {
                out += &format!(" error={err}");
            }
            out
        }
        "BLOCK_JOB_PENDING" => format!("{name} {} {} [{keys}]", s("type"), s("id")),
        "BLOCK_JOB_ERROR" => format!(
            "{name} {} {} {} [{keys}]",
            s("device"),
            s("operation"),
            s("action")
        ),
        _ => format!("{name} [{keys}]"),
    }
}

/// Drops status changes that undo each other within one step (a drained
/// section in QEMU): `X paused, X running` and `X standby, X ready`.
fn drop_drain_pairs(events: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        if let Some(prev) = out.last() {
            let pair = |a: &str, b: &str| {
                prev.strip_suffix(a)
                    .zip(e.strip_suffix(b))
                    .is_some_and(|(x, y)| x == y && x.ends_with(' '))
            };
            if pair("paused", "running") || pair("standby", "ready") {
                out.pop();
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// The members of query results that must agree in value.
fn normalise_query(v: &Value) -> Value {
    let jobs = v.as_array().cloned().unwrap_or_default();
    Value::Array(
        jobs.into_iter()
            .map(|j| {
                let mut m = serde_json::Map::new();
                let status = j["status"].as_str().unwrap_or("").to_string();
                let active = matches!(status.as_str(), "running" | "paused" | "ready" | "standby");
                for (k, val) in j.as_object().unwrap() {
                    let keep = match k.as_str() {
                        "busy" | "len" | "offset" | "current-progress" | "total-progress"
                        | "actively-synced" => false,
                        "paused" => active,
                        _ => true,
                    };
                    if keep {
                        m.insert(k.clone(), val.clone());
                    }
                }
                Value::Object(m)
            })
            .collect(),
    )
}

/// Runs `scenario` on qsd and on livesnapd and compares the transcripts.
fn compare(scenario: impl Fn(&mut Side)) {
    let mut q = Side::qsd();
    scenario(&mut q);
    let mut l = Side::livesnapd();
    scenario(&mut l);
    if std::env::var_os("JOB_STATES_DUMP").is_some() {
        eprintln!("qsd {:#?}\nlivesnapd {:#?}", q.log, l.log);
    }
    for (i, (a, b)) in l.log.iter().zip(&q.log).enumerate() {
        if a != b {
            let from = i.saturating_sub(4);
            panic!(
                "transcripts differ at entry {i}:\n  livesnapd: {a:?}\n  qsd:       {b:?}\n\
                 context (qsd) {:#?}\ncontext (livesnapd) {:#?}",
                &q.log[from..=i],
                &l.log[from..=i]
            );
        }
    }
    assert_eq!(
        l.log.len(),
        q.log.len(),
        "transcripts differ in length:\nlivesnapd {:#?}\nqsd {:#?}",
        l.log,
        q.log
    );
    for ((name, a), (_, b)) in l.raw.iter().zip(&q.raw) {
        if let Some(d) = shape_diff(a, b, name) {
            panic!("{d}\nlivesnapd: {a}\nqsd: {b}");
        }
    }
}

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
