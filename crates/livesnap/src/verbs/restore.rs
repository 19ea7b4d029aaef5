//! `livesnap restore DIR [--at N] IMAGE`: the disk as of backup N (default
//! the last), written to a new image. The chain is read by the engine
//! (`livesnap_block`), the backup's qcow2 opened with its backing chain as
//! QEMU would, after each file of that chain was checked against the
//! manifest's checksum: a corrupted backup is refused, never restored.

use std::path::Path;
use std::time::{Duration, Instant};

use livesnap_block::ImageFormat;
use serde_json::{json, Value};

use crate::chain::image;
use crate::chain::manifest::Manifest;
use crate::error::{Failure, Kind, Result};
use crate::progress::{Progress, Sample, LINE_INTERVAL};
use crate::signals::Interrupt;
use crate::snapshot::{new_target_path, remove_target_file};
use crate::units::{bytes, duration};
use crate::wait::Clock;

/// Runs `livesnap restore`; returns the report (JSON).
pub async fn run(
    dir: &Path,
    at: Option<u64>,
    target: &Path,
    format: ImageFormat,
    deadline: Duration,
    quiet: bool,
    interrupt: Interrupt,
) -> Result<Value> {
    let mut clock = Clock::new(deadline, interrupt);
    let m = Manifest::load(dir)?.ok_or_else(|| {
        Failure::usage(format!(
            "{} holds no backup chain (no manifest)",
            dir.display()
        ))
    })?;
    let index = match at {
        Some(n) => n,
        None => {
            m.last()
                .ok_or_else(|| Failure::usage("the chain has no backup"))?
                .index
        }
    };
    let chain = m.chain_to(index)?;
    let path = new_target_path(target)?;
    let mut progress = Progress::new(quiet);
    for b in &chain {
        let file = dir.join(&b.file);
        progress.note(&format!(
            "livesnap: checking {} against its checksum",
            file.display()
        ));
        let sum = clock
            .bound(image::sha256(&file))
            .await
            .map_err(|f| match f.kind {
                Kind::Usage => Failure::new(Kind::Invalid, f.reason),
                _ => f,
            })?;
        if sum != b.sha256 {
            return Err(Failure::new(
                Kind::Invalid,
                format!(
                    "backup {} ({}) does not match its checksum (sha256 {sum}, the manifest says {}): not restored; `livesnap verify {}` says more",
                    b.index,
                    file.display(),
                    b.sha256,
                    dir.display()
                ),
            ));
        }
    }
    let top = chain.last().expect("a chain has its backup");
    let src = image::open(&dir.join(&top.file), ImageFormat::Qcow2, true)
        .await
        .map_err(|f| Failure::new(Kind::Invalid, f.reason))?;
    let size = src.size();
    progress.note(&format!(
        "livesnap: restoring backup {} ({} over {} backup(s)) -> {} ({})",
        index,
        bytes(size),
        chain.len(),
        path.display(),
        format.name()
    ));
    progress.start(size);
    let started = Instant::now();
    let mut last_line = Instant::now();
    let copied = clock
        .bound(image::copy_into(&src, &path, format, |done, total| {
            if last_line.elapsed() >= LINE_INTERVAL || done == total {
                last_line = Instant::now();
                progress.update(&Sample {
                    done,
                    total,
                    ..Sample::default()
                });
            }
        }))
        .await;
    src.close().await;
    progress.finish();
    let written = match copied {
        Ok(w) => w,
        Err(f) => {
            let left = remove_target_file(&path);
            let tail = match left {
                Some(l) => format!("; LEFT BEHIND: {l}"),
                None => format!(", {} removed", path.display()),
            };
            return Err(Failure::new(f.kind, format!("{}{tail}", f.reason)));
        }
    };
    Ok(json!({
        "result": "ok",
        "index": index,
        "chain": chain.iter().map(|b| b.file.clone()).collect::<Vec<_>>(),
        "image": path,
        "format": format.name(),
        "size": size,
        "bytes_written": written,
        "point_in_time": top.point_in_time,
        "duration_ms": started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// The report's lines for a person.
pub fn human(r: &Value) -> String {
    format!(
        "restored backup {} ({}) to {} ({}, {} of data)\n  point in time  {} .. {}\n  took           {}\n",
        r["index"],
        r["chain"].as_array().map(|c| c.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" <- ")).unwrap_or_default(),
        r["image"].as_str().unwrap_or(""),
        r["format"].as_str().unwrap_or(""),
        bytes(r["bytes_written"].as_u64().unwrap_or(0)),
        r["point_in_time"]["start"].as_str().unwrap_or(""),
        r["point_in_time"]["end"].as_str().unwrap_or(""),
        duration(Duration::from_secs_f64(r["duration_ms"].as_f64().unwrap_or(0.0) / 1e3)),
    )
}
