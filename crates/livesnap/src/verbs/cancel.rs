//! `livesnap cancel JOB [--force]`. A soft cancel is refused here unless
//! the job is READY: before READY QEMU turns it into a force cancel, so the
//! copy would be abandoned while the operator believed it would finish.

use crate::endpoint::{str_of, Endpoint};
use crate::error::{Failure, Kind, Result};
use crate::verbs::jobs;
use crate::wait::{Clock, Events, Waited};
use serde_json::{json, Value};

/// Runs `livesnap cancel`; waits at most `clock`'s deadline for the job's end event.
pub async fn run(ep: &mut Endpoint, clock: &mut Clock, job: &str, force: bool) -> Result<()> {
    let all = jobs::list(ep).await?;
    let j = find(&all, job, "the endpoint")?;
    let status = str_of(j, "status").to_string();
    let is_block_job = !j["speed"].is_null();
    if !force && status != "ready" {
        return Err(Failure::usage(format!(
            "job '{job}' is {status}, not ready: a soft cancel before READY is a force cancel in QEMU (the copy is abandoned, not finished); use --force to abandon it"
        )));
    }
    if !force && !is_block_job {
        return Err(Failure::usage(format!(
            "job '{job}' is not a block job; job-cancel is always forceful: use --force"
        )));
    }
    // A mirror cancelled before READY: with the VM paused (see `pause_vm`).
    let early = str_of(j, "type") == "mirror" && status != "ready";
    let paused = early && crate::snapshot::qmp::pause_vm(ep).await;
    let r = if is_block_job {
        ep.call("block-job-cancel", json!({"device": job, "force": force}))
            .await
    } else {
        ep.call("job-cancel", json!({"id": job})).await
    };
    let ended = match r {
        Ok(r) => match r.map_err(|e| Failure::endpoint(format!("cancel {job}: {}", e.desc))) {
            // A block job's end event carries its outcome; other jobs only change status.
            Ok(_) => {
                wait_end(&mut Events::Qmp(ep), clock, job, |name, d| {
                    let about = str_of(d, "device") == job || str_of(d, "id") == job;
                    about
                        && if is_block_job {
                            name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED"
                        } else {
                            name == "JOB_STATUS_CHANGE"
                                && matches!(str_of(d, "status"), "concluded" | "null")
                        }
                })
                .await
            }
            Err(f) => Err(f),
        },
        Err(f) => Err(f),
    };
    if paused {
        match ep.call("cont", json!({})).await {
            Ok(Ok(_)) => eprintln!("livesnap: the VM was paused around the early cancel"),
            Ok(Err(e)) => {
                return Err(Failure::endpoint(format!(
                    "the VM stays paused: cont failed: {}",
                    e.desc
                )))
            }
            Err(f) => return Err(f),
        }
    }
    let ev = ended?;
    let d = &ev["data"];
    match str_of(&ev, "event") {
        "BLOCK_JOB_COMPLETED" if d.get("error").is_some() => Err(Failure::job(format!(
            "job '{job}' ended with an error: {}",
            str_of(d, "error")
        ))),
        "BLOCK_JOB_COMPLETED" => {
            println!(
                "job '{job}' completed (soft cancel in READY: the target is a point-in-time copy)"
            );
            Ok(())
        }
        "BLOCK_JOB_CANCELLED" => {
            println!("job '{job}' cancelled");
            Ok(())
        }
        _ => {
            println!("job '{job}' ended");
            Ok(())
        }
    }
}

/// `job` among `all`, or the usage failure that lists what there is on `whose`.
fn find<'a>(all: &'a [Value], job: &str, whose: &str) -> Result<&'a Value> {
    all.iter().find(|j| str_of(j, "id") == job).ok_or_else(|| {
        let ids: Vec<&str> = all.iter().map(|j| str_of(j, "id")).collect();
        Failure::usage(format!(
            "{whose} has no job '{job}' (jobs: {})",
            if ids.is_empty() {
                "none".into()
            } else {
                ids.join(", ")
            }
        ))
    })
}

/// The first event for which `ends(name, data)` holds, within the clock.
async fn wait_end(
    events: &mut Events<'_>,
    clock: &mut Clock,
    job: &str,
    ends: impl Fn(&str, &Value) -> bool,
) -> Result<Value> {
    loop {
        let ev = match clock.next_of(events, clock.deadline).await {
            Ok(Waited::Event(ev)) => ev,
            Ok(Waited::Tick) => continue,
            Err(f) if f.kind == Kind::Deadline => {
                return Err(Failure::new(
                    Kind::Deadline,
                    format!(
                        "job '{job}' did not end within {}",
                        crate::units::duration(clock.limit)
                    ),
                ))
            }
            Err(f) => return Err(f),
        };
        if ends(str_of(&ev, "event"), &ev["data"]) {
            return Ok(ev);
        }
    }
}

/// Runs `livesnap cancel --libvirt DOMAIN JOB`: JOB is a disk with a block
/// job (`vda`), aborted asynchronously (a soft cancel, so refused before
/// READY without `--force`), or the domain job by its operation (`backup`),
/// aborted with `virDomainAbortJob` (always forceful: `--force` needed).
#[cfg(feature = "libvirt")]
pub async fn run_libvirt(
    lv: &mut crate::libvirt::Libvirt,
    clock: &mut Clock,
    job: &str,
    force: bool,
) -> Result<()> {
    let all = jobs::list_libvirt(lv).await?;
    let j = find(&all, job, &format!("domain {}", lv.name))?;
    let block = str_of(j, "type") != "domain job";
    let state = str_of(j, "status").to_string();
    if block && !force && state != "ready" {
        return Err(Failure::usage(format!(
            "job '{job}' is {state}, not ready: aborting it before READY abandons the copy; use --force to abandon it"
        )));
    }
    if !block && !force {
        return Err(Failure::usage(format!(
            "job '{job}' is the domain's {job} job; aborting it abandons it: use --force"
        )));
    }
    // A copy aborted before READY: with the guest paused (see
    // `Libvirt::abort_copy_early`), resumed once the job has ended.
    let early = block && str_of(j, "type") == "copy" && state != "ready";
    let paused = if early {
        Some(lv.abort_copy_early(job).await?)
    } else {
        if block {
            lv.block_job_abort_async(job).await?;
        } else {
            lv.abort_job().await?;
        }
        None
    };
    let ev = wait_end(&mut Events::Libvirt(lv), clock, job, |name, d| {
        if block {
            name == "BLOCK_JOB" && str_of(d, "disk") == job && str_of(d, "status") != "ready"
        } else {
            name == "JOB_COMPLETED"
        }
    })
    .await;
    if let Some(p) = paused {
        match lv.resume_after(p).await {
            Some(Ok(d)) => eprintln!(
                "livesnap: the guest was paused for {} around the early abort",
                crate::units::duration(d)
            ),
            Some(Err(e)) => {
                return Err(Failure::endpoint(format!(
                    "job '{job}' aborted, but the domain stays paused: resume failed: {e}"
                )))
            }
            None => {}
        }
    }
    let ev = ev?;
    match str_of(&ev["data"], "status") {
        "failed" => Err(Failure::job(format!("job '{job}' failed"))),
        _ if !block => {
            println!("job '{job}' aborted");
            Ok(())
        }
        _ if state == "ready" => {
            println!("job '{job}' ended (aborted in READY: the target is a point-in-time copy)");
            Ok(())
        }
        _ => {
            println!("job '{job}' cancelled");
            Ok(())
        }
    }
}
