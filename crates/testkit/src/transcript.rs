//! Transcripts of QMP sessions, compared between livesnapd and
//! qemu-storage-daemon: the same sequence of commands on both daemons, each
//! recorded as its reply kind, error class and text, the events that
//! followed it (names, job status values, the identifying members and the
//! key set of `BLOCK_JOB_*` data) and, for `query-jobs`/`query-block-jobs`,
//! the shape and the values that do not depend on timing.
//!
//! Not compared, because they depend on timing or on QEMU internals:
//! `busy`; `len`/`offset` values (only that READY comes with `offset ==
//! len`); `paused` outside RUNNING/PAUSED/READY/STANDBY (a QEMU mirror in
//! PENDING still holds the drained section of its completion, so qsd says
//! `paused: true`); and a job's PAUSED/RUNNING (or STANDBY/READY) pair of
//! status changes inside one step, which is a drained section in QEMU (qsd
//! emits one while a backup job starts, several jobs' pairs interleave in a
//! `transaction`), not a pause anybody asked for.
//!
//! `JOB_STATES_DUMP=1` prints both transcripts.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{shape_diff, sparse_file, Livesnapd, Qmp, Qsd};

/// Disk size of every scenario: small, so a mirror is READY at once.
pub const DISK: u64 = 4 << 20;
/// Longest wait for an expected event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long "nothing more happens" is waited for after each command.
const QUIET: Duration = Duration::from_millis(120);

/// One line of a transcript.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A command and how it ended: `ok` or `Class: text`.
    Reply(String, String),
    /// Events that came after the previous entry, normalised.
    Events(Vec<String>),
    /// A query's normalised result.
    Query(String, Value),
}

/// One daemon under test, with its images and transcript.
pub struct Side {
    /// Which daemon.
    pub name: &'static str,
    /// The daemon, kept for as long as the side lives (dropping it stops it).
    _daemon: Box<dyn std::any::Any>,
    dir: PathBuf,
    /// The test's QMP session.
    pub qmp: Qmp,
    /// What happened so far.
    pub log: Vec<Entry>,
    /// Raw query results, for the shape comparison.
    raw: Vec<(String, Value)>,
    /// Puts events of one step into an order that does not depend on
    /// timing, where a scenario has such events (two jobs finishing).
    pub canon: Option<fn(Vec<String>) -> Vec<String>>,
}

impl Side {
    /// A bare livesnapd with raw nodes `src` and `tgt`.
    pub fn livesnapd() -> Side {
        let d = Livesnapd::bare();
        let dir = d.dir.path().to_path_buf();
        let qmp = d.qmp();
        Side::new("livesnapd", Box::new(d), dir, qmp)
    }

    /// A bare qemu-storage-daemon with raw nodes `src` and `tgt`.
    pub fn qsd() -> Side {
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
            canon: None,
        };
        for node in ["src", "tgt"] {
            s.add_raw(node);
        }
        s
    }

    /// Adds raw node `node` over a new sparse file of [`DISK`] bytes
    /// (setup, not part of the transcript).
    pub fn add_raw(&mut self, node: &str) {
        let path = self.dir.join(format!("{node}.img"));
        sparse_file(&path, DISK);
        self.qmp.ok(
            "blockdev-add",
            json!({
                "driver": "raw",
                "node-name": node,
                "file": {"driver": "file", "filename": path.to_str().unwrap()},
            }),
        );
    }

    /// Adds raw node `bad` over blkdebug over a new sparse file, whose
    /// writes at 1 MiB (`[1 MiB, 1 MiB + 64 KiB)` of a backup's copies)
    /// fail with EIO (setup, not part of the transcript).
    pub fn add_failing_target(&mut self) {
        let path = self.dir.join("bad.img");
        sparse_file(&path, DISK);
        self.qmp.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "bad",
                   "file": {"driver": "blkdebug",
                            "inject-error": [{"event": "none", "iotype": "write",
                                              "sector": 2048, "errno": 5}],
                            "image": {"driver": "file", "filename": path.to_str().unwrap()}}}),
        );
    }

    /// Exports `node` writable over NBD as export `node` (setup, not part of
    /// the transcript); returns its NBD URL.
    pub fn export(&mut self, node: &str) -> String {
        let sock = self.dir.join("nbd.sock");
        if !sock.exists() {
            self.qmp.ok(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
            );
        }
        self.qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": node, "node-name": node, "writable": true}),
        );
        format!("nbd+unix:///{node}?socket={}", sock.display())
    }

    /// The `dirty-bitmaps` of `node` in `query-named-block-nodes`.
    pub fn dirty_bitmaps(&mut self, node: &str) -> Value {
        let nodes = self
            .qmp
            .ok("query-named-block-nodes", json!({"flat": true}));
        nodes
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["node-name"] == node))
            .unwrap_or_else(|| panic!("{}: no node {node}", self.name))
            .get("dirty-bitmaps")
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Records the `dirty-bitmaps` of `node`.
    pub fn bitmaps(&mut self, node: &str) {
        let v = self.dirty_bitmaps(node);
        self.record(&format!("dirty-bitmaps of {node}"), v);
    }

    /// Records `value` under `label` (a query the scenario normalised itself).
    pub fn record(&mut self, label: &str, value: Value) {
        self.log.push(Entry::Query(label.to_string(), value));
    }

    /// A file in the side's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs a command, records its outcome and the events up to a quiet pause.
    pub fn cmd(&mut self, name: &str, args: Value) {
        self.cmd_until(name, args, &[]);
    }

    /// Runs a command, records its outcome, then waits until every event in
    /// `until` (normalised form, in any order) has arrived and things are
    /// quiet again, and records the events.
    pub fn cmd_until(&mut self, name: &str, args: Value, until: &[&str]) {
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

    /// Waits for `until` (as [`Side::cmd_until`]) and a quiet pause, and
    /// records the events.
    pub fn settle(&mut self, until: &[&str]) {
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
        let mut events = drop_drain_pairs(events);
        if let Some(canon) = self.canon {
            events = canon(events);
        }
        self.log.push(Entry::Events(events));
    }

    /// Records `query-jobs` and `query-block-jobs`.
    pub fn queries(&mut self) {
        for q in ["query-jobs", "query-block-jobs"] {
            let v = self.qmp.ok(q, Value::Null);
            self.log
                .push(Entry::Query(q.to_string(), normalise_query(&v)));
            self.raw.push((q.to_string(), v));
        }
    }

    /// Every verb on job `id` (the block-job-* ones by `device` or `id`);
    /// used where each is expected to be refused or harmless.
    pub fn all_verbs(&mut self, id: &str, skip: &[&str]) {
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
pub fn normalise_event(e: &Value) -> String {
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
/// section in QEMU): a job's `paused` whose next event about that job is
/// its `running`, and `standby` followed by `ready` the same way; other
/// jobs' events may come between (a `transaction` drains several).
pub fn drop_drain_pairs(events: Vec<String>) -> Vec<String> {
    let job_of = |e: &str| e.rsplit_once(' ').map(|(j, _)| j.to_string());
    let mut drop = vec![false; events.len()];
    for (i, e) in events.iter().enumerate() {
        let back = if e.ends_with(" paused") {
            " running"
        } else if e.ends_with(" standby") {
            " ready"
        } else {
            continue;
        };
        let Some(job) = job_of(e) else { continue };
        let next = (i + 1..events.len())
            .find(|&k| !drop[k] && job_of(&events[k]).as_deref() == Some(job.as_str()));
        if let Some(k) = next.filter(|&k| events[k] == format!("{job}{back}")) {
            drop[i] = true;
            drop[k] = true;
        }
    }
    events
        .into_iter()
        .zip(drop)
        .filter_map(|(e, d)| (!d).then_some(e))
        .collect()
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
pub fn compare(scenario: impl Fn(&mut Side)) {
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
