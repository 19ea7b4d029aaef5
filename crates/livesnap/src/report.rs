//! The final report of a snapshot: human-readable lines, or one JSON object
//! (`--json`), and the JSON form of a failure.

use serde_json::{json, Value};

use crate::error::Failure;
use crate::units::{bytes, duration, rfc3339, Stamp};

/// A completed snapshot.
#[derive(Debug)]
pub struct Report {
    /// `backup` or `mirror`.
    pub method: &'static str,
    /// Mirror: the copy mode(s) used.
    pub copy_mode: Option<String>,
    /// `full` or `top`.
    pub sync: &'static str,
    /// The disk as named on the command line.
    pub disk: String,
    /// The node the job ran on.
    pub node: String,
    /// Its driver.
    pub driver: String,
    /// Its image file.
    pub file: String,
    /// The device it was found under (`query-block`), if not a node name.
    pub device: Option<String>,
    /// Its virtual size.
    pub size: u64,
    /// Target image path.
    pub target: String,
    /// Target format.
    pub format: &'static str,
    /// Backing file written into the target (`--shallow`).
    pub backing: Option<String>,
    /// How the target was created.
    pub created_via: &'static str,
    /// The job's id.
    pub job_id: String,
    /// The instant's window: the snapshot equals the disk at one instant in it.
    pub window: (Stamp, Stamp),
    /// What delimits the window.
    pub window_defined_by: &'static str,
    /// `offset` at the end of the job.
    pub bytes_copied: u64,
    /// `len` at the end of the job.
    pub bytes_total: u64,
    /// Command start and end.
    pub started: Stamp,
    /// When the report was made.
    pub finished: Stamp,
    /// Guest filesystems frozen: (count, how long), when `--freeze` was used.
    pub quiesce: Option<Quiesce>,
    /// What the guest saw, as far as known.
    pub guest_effect: String,
    /// Endpoint version and package.
    pub endpoint: String,
    /// Why `auto` picked the method.
    pub why: String,
    /// Things the operator should know (e.g. a thaw that came early).
    pub notes: Vec<String>,
}

/// How the guest was quiesced.
#[derive(Clone, Debug)]
pub struct Quiesce {
    /// Filesystems the agent froze.
    pub filesystems: u64,
    /// From the freeze's reply to the thaw's reply.
    pub frozen_ms: f64,
    /// The freeze lasted until the point in time was fixed.
    pub covered_point_in_time: bool,
}

pub(crate) fn ms(a: &Stamp, b: &Stamp) -> f64 {
    micro_round(b.instant.saturating_duration_since(a.instant).as_secs_f64() * 1e3)
}

/// Milliseconds to a whole microsecond, so JSON shows `2.645`, not `2.6447279999999997`.
fn micro_round(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

impl Report {
    /// The `--json` object.
    pub fn to_json(&self) -> Value {
        let (w0, w1) = &self.window;
        json!({
            "result": "ok",
            "method": self.method,
            "copy_mode": self.copy_mode,
            "sync": self.sync,
            "disk": {
                "name": self.disk, "node": self.node, "device": self.device,
                "driver": self.driver, "file": self.file, "size": self.size,
            },
            "target": {
                "path": self.target, "format": self.format,
                "backing": self.backing, "created_via": self.created_via,
            },
            "job_id": self.job_id,
            "point_in_time": {
                "start": rfc3339(w0.wall),
                "end": rfc3339(w1.wall),
                "start_monotonic_ns": w0.mono_ns,
                "end_monotonic_ns": w1.mono_ns,
                "width_ms": ms(w0, w1),
                "defined_by": self.window_defined_by,
            },
            "bytes_copied": self.bytes_copied,
            "bytes_total": self.bytes_total,
            "started": rfc3339(self.started.wall),
            "finished": rfc3339(self.finished.wall),
            "duration_ms": ms(&self.started, &self.finished),
            "quiesce": self.quiesce.as_ref().map(|q| json!({
                "filesystems": q.filesystems,
                "frozen_ms": micro_round(q.frozen_ms),
                "covered_point_in_time": q.covered_point_in_time,
            })),
            "guest_effect": self.guest_effect,
            "endpoint": self.endpoint,
            "method_reason": self.why,
            "notes": self.notes,
        })
    }

    /// Lines for a person.
    pub fn human(&self) -> String {
        let (w0, w1) = &self.window;
        let took = self
            .finished
            .instant
            .saturating_duration_since(self.started.instant);
        let rate = self.bytes_copied as f64 / took.as_secs_f64().max(1e-3);
        let mut s = format!(
            "snapshot of '{}' (node {}, {}) complete: {} ({}, {})\n",
            self.disk,
            self.node,
            bytes(self.size),
            self.target,
            self.format,
            match &self.backing {
                Some(b) => format!("top layer only, backing {b}"),
                None => "full copy".into(),
            }
        );
        let mode = self
            .copy_mode
            .as_ref()
            .map(|m| format!(", copy mode {m}"))
            .unwrap_or_default();
        s += &format!(
            "  method         {} (sync={}{mode}); {}\n",
            self.method, self.sync, self.why
        );
        s += &format!(
            "  point in time  {} .. {} ({:.3} ms, {})\n",
            rfc3339(w0.wall),
            rfc3339(w1.wall),
            ms(w0, w1),
            self.window_defined_by
        );
        // A mirror's `len` grows with every re-dirtied chunk: only a
        // backup's is the work the disk's size bounds.
        let of = if self.method == "backup" {
            format!(" of {}", bytes(self.bytes_total))
        } else {
            format!(" (the disk is {})", bytes(self.size))
        };
        s += &format!(
            "  copied         {}{of} in {} ({}/s), job {}\n",
            bytes(self.bytes_copied),
            duration(took),
            bytes(rate as u64),
            self.job_id
        );
        if let Some(q) = &self.quiesce {
            s += &format!(
                "  quiesce        {} filesystem(s) frozen for {:.1} ms{}\n",
                q.filesystems,
                q.frozen_ms,
                if q.covered_point_in_time {
                    ""
                } else {
                    " (thawed before the point in time was fixed)"
                }
            );
        }
        s += &format!("  guest          {}\n", self.guest_effect);
        for n in &self.notes {
            s += &format!("  note           {n}\n");
        }
        s
    }
}

/// The `--json` object of a failure.
pub fn failure_json(f: &Failure) -> Value {
    json!({
        "result": "failed",
        "error": f.kind.name(),
        "exit_code": f.kind.code(),
        "reason": f.reason,
    })
}
