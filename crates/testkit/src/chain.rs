//! `livesnap backup|restore|verify` for the tests: running the verbs, a
//! backup directory's state before and after a failed run, the bitmaps on a
//! node, and the clusters an incremental image holds itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::{livesnap, Out};
use crate::pit::read_image;
use crate::{run, Qmp};

/// Bound of one backup, restore or verify in the tests.
pub const LIMIT: Duration = Duration::from_secs(180);

/// `livesnap backup --qmp SOCK DISK DIR EXTRA --json --quiet`; must succeed;
/// the report.
pub fn backup(sock: &Path, disk: &str, dir: &Path, extra: &[&str]) -> Value {
    let out = backup_out(sock, disk, dir, extra).expect(0);
    let r = out.json();
    assert_eq!(r["result"], "ok", "{r}");
    eprintln!(
        "chain: backup {} ({}) {} bytes copied, file {} bytes, window {} ms",
        r["index"], r["kind"], r["bytes_copied"], r["size"], r["point_in_time"]["width_ms"]
    );
    r
}

/// `livesnap backup` as [`backup`], whatever its outcome.
pub fn backup_out(sock: &Path, disk: &str, dir: &Path, extra: &[&str]) -> Out {
    let mut a = vec![
        "backup",
        "--qmp",
        sock.to_str().unwrap(),
        disk,
        dir.to_str().unwrap(),
        "--json",
        "--quiet",
    ];
    a.extend_from_slice(extra);
    livesnap(&a, LIMIT)
}

/// `livesnap restore DIR --at N OUT` (raw); must succeed; the image's bytes.
pub fn restore(dir: &Path, at: u64, out: &Path) -> Vec<u8> {
    let n = at.to_string();
    let r = livesnap(
        &[
            "restore",
            dir.to_str().unwrap(),
            out.to_str().unwrap(),
            "--at",
            &n,
            "--json",
            "--quiet",
        ],
        LIMIT,
    )
    .expect(0)
    .json();
    assert_eq!(r["index"], at, "{r}");
    let image = read_image(out, "raw");
    std::fs::remove_file(out).unwrap();
    image
}

/// `livesnap verify DIR --json`.
pub fn verify(dir: &Path) -> Out {
    livesnap(&["verify", dir.to_str().unwrap(), "--json"], LIMIT)
}

/// What a directory holds: every file's name and bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct DirState(BTreeMap<String, Vec<u8>>);

/// Reads every file of `dir`.
pub fn dir_state(dir: &Path) -> DirState {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        m.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path()).unwrap(),
        );
    }
    DirState(m)
}

impl DirState {
    /// The file names.
    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The `dirty-bitmaps` of `node`, by name.
pub fn bitmaps(qmp: &mut Qmp, node: &str) -> BTreeMap<String, Value> {
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .map(|b| (b["name"].as_str().unwrap().to_string(), b))
        .collect()
}

/// Panics unless `node` has exactly the bitmap `name`, recording and consistent.
pub fn assert_only_tracking(qmp: &mut Qmp, node: &str, name: &str) {
    let b = bitmaps(qmp, node);
    assert_eq!(
        b.keys().collect::<Vec<_>>(),
        [name],
        "the node's bitmaps: {b:?}"
    );
    let t = &b[name];
    assert!(
        t["recording"] == true && t.get("inconsistent").is_none_or(|i| i == false),
        "{t}"
    );
}

/// The byte ranges `(start, length)` whose data the image `path` holds
/// itself (not through its backing file), per `qemu-img map`.
pub fn own_data(path: &Path) -> Vec<(u64, u64)> {
    let map: Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["map", "-U", "--output=json"])
        .arg(path)))
    .unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// The file of backup `report` (its report's `path`).
pub fn path_of(report: &Value) -> PathBuf {
    PathBuf::from(report["path"].as_str().unwrap())
}
