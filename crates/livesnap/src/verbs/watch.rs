//! `livesnap watch`: the endpoint's events, one per line, as a person reads
//! them or as the raw JSON the endpoint sent.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::endpoint::str_of;
use crate::error::{Kind, Result};
use crate::wait::{Clock, Events, Waited};

/// One event as a line: `HH:MM:SS.mmm EVENT key=value ...` (QEMU's timestamp).
pub fn human(ev: &Value) -> String {
    let ts = &ev["timestamp"];
    let t = match (ts["seconds"].as_u64(), ts["microseconds"].as_u64()) {
        (Some(s), Some(us)) => UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(us),
        _ => SystemTime::now(),
    };
    let mut line = format!("{} {}", crate::units::clock(t), str_of(ev, "event"));
    if let Some(d) = ev["data"].as_object() {
        for (k, v) in d {
            match v {
                Value::String(s) => line += &format!(" {k}={s}"),
                v => line += &format!(" {k}={v}"),
            }
        }
    }
    line
}

/// Runs `livesnap watch` until `count` events were shown, the clock's
/// deadline (`--for`), a signal, or the endpoint closes.
pub async fn run(
    mut events: Events<'_>,
    clock: &mut Clock,
    json_out: bool,
    count: Option<u64>,
) -> Result<()> {
    let mut shown = 0u64;
    let mut out = std::io::stdout();
    eprintln!("livesnap: watching events (Ctrl-C to stop)");
    loop {
        if count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        let ev = match clock.next_of(&mut events, clock.deadline).await {
            Ok(Waited::Event(ev)) => ev,
            Ok(Waited::Tick) => continue,
            // --for elapsed or ^C: the normal ways to stop watching.
            Err(f) if matches!(f.kind, Kind::Deadline | Kind::Interrupted) => return Ok(()),
            Err(f) => return Err(f),
        };
        let line = if json_out { ev.to_string() } else { human(&ev) };
        // A closed pipe (watch | head) ends the watch quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        shown += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn human_lines() {
        let ev = json!({"timestamp": {"seconds": 1714564800, "microseconds": 5000},
            "event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j1"}});
        assert_eq!(
            human(&ev),
            "12:00:00.005 JOB_STATUS_CHANGE status=running id=j1"
        );
    }
}
