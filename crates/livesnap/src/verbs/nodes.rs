//! `livesnap nodes`: the block graph (node, driver, file, size, backing,
//! read-only), which devices sit on which node (`query-block`, for
//! qemu-system) and which exports serve which node.

use serde_json::{json, Value};

use crate::endpoint::{array, str_of, Endpoint};
use crate::error::Result;
use crate::units::bytes;
use crate::verbs::table;

/// Runs `livesnap nodes`.
pub async fn run(ep: &mut Endpoint, json_out: bool) -> Result<()> {
    let nodes = ep.named_nodes().await?;
    let exports = if ep.caps.has("query-block-exports") {
        array(ep.must("query-block-exports", Value::Null).await?)
    } else {
        Vec::new()
    };
    let devices = if ep.caps.has("query-block") {
        array(ep.must("query-block", Value::Null).await?)
    } else {
        Vec::new()
    };
    let used_by = |node: &str| -> Vec<String> {
        let mut u: Vec<String> = exports
            .iter()
            .filter(|e| str_of(e, "node-name") == node)
            .map(|e| format!("export {}", str_of(e, "id")))
            .collect();
        u.extend(
            devices
                .iter()
                .filter(|d| str_of(&d["inserted"], "node-name") == node)
                .map(|d| {
                    let name = match str_of(d, "device") {
                        "" => str_of(d, "qdev"),
                        n => n,
                    };
                    format!("device {name}")
                }),
        );
        u
    };
    if json_out {
        let out: Vec<Value> = nodes
            .iter()
            .map(|n| {
                json!({
                    "node-name": str_of(n, "node-name"),
                    "driver": str_of(n, "drv"),
                    "file": str_of(n, "file"),
                    "virtual-size": n["image"]["virtual-size"],
                    "backing": n.get("backing_file"),
                    "read-only": n["ro"],
                    "used-by": used_by(str_of(n, "node-name")),
                })
            })
            .collect();
        println!(
            "{}",
            json!({"nodes": out, "exports": exports, "devices": devices})
        );
        return Ok(());
    }
    if nodes.is_empty() {
        println!("no nodes");
        return Ok(());
    }
    let rows = nodes
        .iter()
        .map(|n| {
            let size = n["image"]["virtual-size"]
                .as_u64()
                .map(bytes)
                .unwrap_or_else(|| "-".into());
            let backing = match str_of(n, "backing_file") {
                "" => "-".to_string(),
                b => b.to_string(),
            };
            let used = used_by(str_of(n, "node-name"));
            vec![
                str_of(n, "node-name").to_string(),
                str_of(n, "drv").to_string(),
                str_of(n, "file").to_string(),
                size,
                backing,
                if n["ro"] == json!(true) { "ro" } else { "rw" }.to_string(),
                if used.is_empty() {
                    "-".into()
                } else {
                    used.join(", ")
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["NODE", "DRIVER", "FILE", "SIZE", "BACKING", "MODE", "USED BY"],
            rows
        )
    );
    Ok(())
}
