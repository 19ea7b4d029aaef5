//! `livesnap verify DIR`: checks every backup of the chain in DIR against
//! its manifest — the file is there with its size and checksum, its header
//! links it to the backup before it (as a qcow2) or to nothing, the engine
//! opens it with its whole chain at the disk's size, and `qemu-img check`
//! finds it clean where qemu-img is installed (the report says when it is
//! not). One line per check that failed; exit code 7 on any.

use std::path::Path;
use std::time::Duration;

use livesnap_block::ImageFormat;
use serde_json::{json, Value};

use crate::chain::image;
use crate::chain::manifest::{Backup, BackupKind, Manifest, MANIFEST};
use crate::chain::run::RUN_RECORD;
use crate::error::{Failure, Kind, Result};

/// How long one `qemu-img check` may take.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(300);

/// What was found about one backup.
struct Finding {
    index: u64,
    file: String,
    checked: Vec<&'static str>,
    problems: Vec<String>,
}

/// Runs `livesnap verify`: prints the result (a line per backup and per
/// problem, or JSON) and fails with [`Kind::Invalid`] on any problem.
pub async fn run(dir: &Path, json: bool) -> Result<()> {
    let m = Manifest::load(dir)?.ok_or_else(|| {
        Failure::usage(format!(
            "{} holds no backup chain (no {MANIFEST})",
            dir.display()
        ))
    })?;
    let qemu_img = on_path("qemu-img");
    let mut findings = Vec::new();
    for (i, b) in m.backups.iter().enumerate() {
        findings.push(check(dir, &m, i, b, qemu_img).await);
    }
    let mut notes = Vec::new();
    if !qemu_img {
        notes.push(
            "qemu-img is not installed: the images were checked by livesnap's engine only"
                .to_string(),
        );
    }
    if dir.join(RUN_RECORD).exists() {
        notes.push(format!(
            "{RUN_RECORD}: a backup run is in progress or was killed; the next backup run undoes what a killed one left"
        ));
    }
    let listed: Vec<&str> = m.backups.iter().map(|b| b.file.as_str()).collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".qcow2") && !listed.contains(&n.as_str()) {
                notes.push(format!(
                    "{n} is not in the manifest (not part of the chain)"
                ));
            }
        }
    }
    let problems: usize = findings.iter().map(|f| f.problems.len()).sum();
    if json {
        let v = json!({
            "result": if problems == 0 { "ok" } else { "failed" },
            "dir": dir,
            "chain": m.chain,
            "backups": findings.iter().map(|f| json!({
                "index": f.index, "file": f.file, "checked": f.checked, "problems": f.problems,
            })).collect::<Vec<Value>>(),
            "problems": problems,
            "notes": notes,
        });
        println!("{v}");
    } else {
        for f in &findings {
            if f.problems.is_empty() {
                println!(
                    "backup {} {}: ok ({})",
                    f.index,
                    f.file,
                    f.checked.join(", ")
                );
            }
            for p in &f.problems {
                println!("backup {} {}: PROBLEM: {p}", f.index, f.file);
            }
        }
        for n in &notes {
            println!("note: {n}");
        }
    }
    if problems > 0 {
        return Err(Failure::new(
            Kind::Invalid,
            format!(
                "the chain in {} failed verification: {problems} problem(s)",
                dir.display()
            ),
        ));
    }
    if !json {
        println!(
            "chain {} in {}: {} backup(s) verified",
            m.chain,
            dir.display(),
            m.backups.len()
        );
    }
    Ok(())
}

async fn check(dir: &Path, m: &Manifest, i: usize, b: &Backup, qemu_img: bool) -> Finding {
    let mut f = Finding {
        index: b.index,
        file: b.file.clone(),
        checked: Vec::new(),
        problems: Vec::new(),
    };
    let path = dir.join(&b.file);
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) => {
            f.problems.push(format!("the file is missing ({e})"));
            return f;
        }
    };
    if meta.len() == b.size {
        f.checked.push("size");
    } else {
        f.problems.push(format!(
            "the file is {} bytes, the manifest says {}",
            meta.len(),
            b.size
        ));
    }
    match image::sha256(&path).await {
        Ok(s) if s == b.sha256 => f.checked.push("checksum"),
        Ok(s) => f.problems.push(format!(
            "checksum mismatch: sha256 {s}, the manifest says {}",
            b.sha256
        )),
        Err(e) => f.problems.push(format!("cannot read it: {}", e.reason)),
    }
    // The link the manifest expects: the backup listed before, for an incremental.
    let expected = match b.kind {
        BackupKind::Full => None,
        BackupKind::Incremental => Some(i.checked_sub(1).map(|p| m.backups[p].file.clone())),
    };
    match (&expected, &b.backing) {
        (Some(Some(prev)), Some(named)) if prev != named => f.problems.push(format!(
            "the manifest names {named} as its backing file, but the backup before it is {prev}"
        )),
        (Some(None), _) => f
            .problems
            .push("an incremental backup with no backup before it".into()),
        (Some(_), None) => f
            .problems
            .push("an incremental backup without a backing file in the manifest".into()),
        _ => {}
    }
    match image::header_backing(&path).await {
        Ok(h) => match (&b.backing, h) {
            (None, None) => f.checked.push("no backing file"),
            (Some(want), Some(got))
                if &got.filename == want && got.format.as_deref() == Some("qcow2") =>
            {
                f.checked.push("backing link")
            }
            (want, got) => f.problems.push(format!(
                "broken backing link: the header names {}, expected {}",
                got.map(|g| format!(
                    "{} ({})",
                    g.filename,
                    g.format.unwrap_or_else(|| "no format".into())
                ))
                .unwrap_or_else(|| "no backing file".into()),
                want.as_ref()
                    .map(|w| format!("{w} (qcow2)"))
                    .unwrap_or_else(|| "no backing file".into())
            )),
        },
        Err(e) => f
            .problems
            .push(format!("not a readable qcow2 image: {}", e.reason)),
    }
    match image::open(&path, ImageFormat::Qcow2, true).await {
        Ok(node) => {
            let size = node.size();
            node.close().await;
            if size == m.disk.size {
                f.checked.push("opens with its chain");
            } else {
                f.problems.push(format!(
                    "its virtual size is {size}, the disk's is {}",
                    m.disk.size
                ));
            }
        }
        Err(e) => f.problems.push(format!(
            "the engine cannot open it with its chain: {}",
            e.reason
        )),
    }
    if qemu_img {
        match qemu_img_check(&path).await {
            Ok(()) => f.checked.push("qemu-img check"),
            Err(p) => f.problems.push(p),
        }
    }
    f
}

/// `qemu-img check` of one image: clean, or what it found.
async fn qemu_img_check(path: &Path) -> std::result::Result<(), String> {
    let out = tokio::time::timeout(
        QEMU_IMG_TIMEOUT,
        tokio::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2", "--output=json"])
            .arg(path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        format!(
            "qemu-img check did not finish within {} s",
            QEMU_IMG_TIMEOUT.as_secs()
        )
    })?
    .map_err(|e| format!("cannot run qemu-img check: {e}"))?;
    // 0: clean; 3: leaked clusters only (wasted space, no damage).
    match out.status.code() {
        Some(0) | Some(3) => Ok(()),
        _ => {
            let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let what = if report.is_object() {
                format!(
                    "{} corruption(s), {} check error(s)",
                    report["corruptions"].as_u64().unwrap_or(0),
                    report["check-errors"].as_u64().unwrap_or(0)
                )
            } else {
                String::from_utf8_lossy(&out.stderr).trim().to_string()
            };
            Err(format!("qemu-img check ({}): {what}", out.status))
        }
    }
}

/// `name` is an executable on PATH.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}
