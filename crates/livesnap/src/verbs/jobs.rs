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
    if json_out {
        println!("{}", Value::Array(jobs));
        return Ok(());
    }
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(());
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
    Ok(())
}
