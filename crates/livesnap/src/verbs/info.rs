//! `livesnap info`: what the endpoint is and supports, as `snapshot`
//! detects it.

use serde_json::{json, Map, Value};

use crate::endpoint::Endpoint;
use crate::error::Result;
use crate::verbs::table;

/// Runs `livesnap info`.
pub async fn run(ep: &mut Endpoint, json_out: bool) -> Result<()> {
    print_caps(ep.caps.describe(), json_out);
    Ok(())
}

/// Runs `livesnap info --libvirt`.
#[cfg(feature = "libvirt")]
pub async fn run_libvirt(lv: &crate::libvirt::Libvirt, json_out: bool) -> Result<()> {
    let domcaps = lv.domain_capabilities().await.ok();
    let mut rows = crate::snapshot::libvirt::describe(lv, domcaps.as_deref());
    for d in lv.disks().await? {
        rows.push((
            format!("disk {}", d.target),
            format!(
                "{} ({}{})",
                d.source.as_deref().unwrap_or("-"),
                d.format.as_deref().unwrap_or("?"),
                d.backing
                    .as_ref()
                    .map(|b| format!(", backing {}", b.source))
                    .unwrap_or_default()
            ),
        ));
    }
    print_caps(rows, json_out);
    Ok(())
}

fn print_caps(caps: Vec<(String, String)>, json_out: bool) {
    if json_out {
        let m: Map<String, Value> = caps.into_iter().map(|(k, v)| (k, json!(v))).collect();
        println!("{}", Value::Object(m));
        return;
    }
    let rows = caps.into_iter().map(|(k, v)| vec![k, v]).collect();
    print!("{}", table(&["CAPABILITY", "VALUE"], rows));
}
