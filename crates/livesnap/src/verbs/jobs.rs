//! `livesnap jobs`: the endpoint's jobs as a table (or JSON).

use serde_json::{json, Value};

use crate::endpoint::{array, str_of, Endpoint};
use crate::error::Result;
use crate::units::bytes;
use crate::verbs::table;

/// One job, merged from `query-jobs` and `query-block-jobs`.
pub fn merge(jobs: &[Value], block_jobs: &[Value]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for j in jobs {
        let id = str_of(j, "id");
        let b = block_jobs.iter().find(|b| str_of(b, "device") == id);
        out.push(json!({
            "id": id,
            "type": str_of(j, "type"),
            "status": str_of(j, "status"),
            "offset": b.map_or(&j["current-progress"], |b| &b["offset"]),
            "len": b.map_or(&j["total-progress"], |b| &b["len"]),
            "speed": b.map(|b| b["speed"].clone()),
            "ready": b.map(|b| b["ready"].clone()),
            "actively-synced": b.and_then(|b| b.get("actively-synced").cloned()),
            "error": j.get("error").cloned(),
        }));
    }
    // Endpoints without query-jobs (QEMU < 3.0): block jobs only.
    for b in block_jobs {
        let id = str_of(b, "device");
        if out.iter().any(|o| str_of(o, "id") == id) {
            continue;
        }
        out.push(json!({
            "id": id, "type": str_of(b, "type"),
            "status": b.get("status").and_then(Value::as_str).unwrap_or(if b["ready"] == json!(true) {"ready"} else {"running"}),
            "offset": b["offset"], "len": b["len"], "speed": b["speed"], "ready": b["ready"],
            "actively-synced": b.get("actively-synced").cloned(), "error": b.get("error").cloned(),
        }));
    }
    out
}

/// Both job lists of the endpoint, merged.
pub async fn list(ep: &mut Endpoint) -> Result<Vec<Value>> {
    let jobs = if ep.caps.has("query-jobs") {
        array(ep.must("query-jobs", Value::Null).await?)
    } else {
        Vec::new()
    };
    let block = ep.block_jobs().await?;
    Ok(merge(&jobs, &block))
}

/// Runs `livesnap jobs`.
pub async fn run(ep: &mut Endpoint, json_out: bool) -> Result<()> {
    let jobs = list(ep).await?;
    print_jobs(&jobs, json_out);
    Ok(())
}

/// A libvirt domain's jobs in the same shape: its domain job (a backup) by
/// operation name, and each disk's block job by the disk's target name.
#[cfg(feature = "libvirt")]
pub async fn list_libvirt(lv: &crate::libvirt::Libvirt) -> Result<Vec<Value>> {
    use crate::libvirt::{block_job_kind, job_type};
    let mut out = Vec::new();
    let j = lv.job_stats(false).await?;
    if j.kind != virt_sys::VIR_DOMAIN_JOB_NONE as i32 {
        let (done, total) = j.progress();
        out.push(json!({
            "id": j.operation().unwrap_or("job"), "type": "domain job",
            "status": job_type(j.kind), "offset": done, "len": total,
            "speed": null, "ready": null, "actively-synced": null, "error": null,
        }));
    }
    for d in lv.disks().await? {
        if let Some(b) = lv.block_job_info(&d.target).await? {
            let ready = d.mirror_ready;
            out.push(json!({
                "id": d.target, "type": block_job_kind(b.kind),
                "status": if ready { "ready" } else { "running" },
                "offset": b.cur, "len": b.end, "speed": b.bandwidth, "ready": ready,
                "actively-synced": null, "error": null,
            }));
        }
    }
    Ok(out)
}

/// Runs `livesnap jobs --libvirt`.
#[cfg(feature = "libvirt")]
pub async fn run_libvirt(lv: &crate::libvirt::Libvirt, json_out: bool) -> Result<()> {
    print_jobs(&list_libvirt(lv).await?, json_out);
    Ok(())
}

fn print_jobs(jobs: &[Value], json_out: bool) {
    if json_out {
        println!("{}", Value::Array(jobs.to_vec()));
        return;
    }
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    let rows = jobs
        .iter()
        .map(|j| {
            let off = j["offset"].as_u64().unwrap_or(0);
            let len = j["len"].as_u64().unwrap_or(0);
            let pct = if len > 0 {
                format!("{:.0}%", 100.0 * off.min(len) as f64 / len as f64)
            } else {
                "-".into()
            };
            let speed = match j["speed"].as_u64() {
                Some(0) => "unlimited".into(),
                Some(s) => format!("{}/s", bytes(s)),
                None => "-".into(),
            };
            let mut status = str_of(j, "status").to_string();
            if j["actively-synced"] == json!(true) {
                status += " (actively synced)";
            }
            if let Some(e) = j["error"].as_str() {
                status += &format!(" error: {e}");
            }
            vec![
                str_of(j, "id").to_string(),
                str_of(j, "type").to_string(),
                status,
                format!("{} / {} ({pct})", bytes(off), bytes(len)),
                speed,
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["ID", "TYPE", "STATUS", "PROGRESS", "SPEED"], rows)
    );
}
