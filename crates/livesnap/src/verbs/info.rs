//! `livesnap info`: what the endpoint is and supports, as `snapshot`
//! detects it.

use serde_json::{json, Map, Value};

use crate::endpoint::Endpoint;
use crate::error::Result;
use crate::verbs::table;

/// Runs `livesnap info`.
pub async fn run(ep: &mut Endpoint, json_out: bool) -> Result<()> {
    let caps = ep.caps.describe();
    if json_out {
        let m: Map<String, Value> = caps.into_iter().map(|(k, v)| (k, json!(v))).collect();
        println!("{}", Value::Object(m));
        return Ok(());
    }
    let rows = caps.into_iter().map(|(k, v)| vec![k, v]).collect();
    print!("{}", table(&["CAPABILITY", "VALUE"], rows));
    Ok(())
}
