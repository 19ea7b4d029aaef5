//! The block layer's fixtures: real QEMU tools on images (required, never
//! skipped) and opening nodes and chains.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use livesnap_block::{
    BackingOption, BlockGraph, BlockNode, BlockdevOptions, BlockdevRef, DriverOptions, Drivers,
    FileDriver, FileOptions, Locking, Qcow2Cache, Qcow2Driver, RawDriver, RawOptions,
};

/// Runs a QEMU tool from /usr/bin; panics (fails the test) when it is missing.
pub fn tool(name: &str, args: &[&str]) -> Output {
    let path = format!("/usr/bin/{name}");
    assert!(
        Path::new(&path).exists(),
        "{path} is required (Debian package qemu-utils)"
    );
    Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Runs a tool and asserts it succeeded.
pub fn tool_ok(name: &str, args: &[&str]) -> String {
    let out = tool(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check`: exit 0 (clean) or 3 (leaks only) passes.
pub fn check_clean(img: &Path, allow_leaks: bool) {
    let out = tool("qemu-img", &["check", "-f", "qcow2", img.to_str().unwrap()]);
    let code = out.status.code();
    let ok = code == Some(0) || (allow_leaks && code == Some(3));
    assert!(
        ok,
        "qemu-img check {} exit {code:?}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs qemu-io commands on an image (opened with its backing chain),
/// discarding with unmap.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    crate::qemu_io_opts(img.to_str().unwrap(), fmt, &["-d", "unmap"], &cmds);
}

/// A `file` node.
pub fn file_node(path: &Path, read_only: bool) -> Arc<BlockNode> {
    let d = FileDriver::open(&FileOptions {
        filename: path.to_str().unwrap().into(),
        direct: false,
        read_only,
    })
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    BlockNode::new(
        format!("file-{}", path.display()),
        Box::new(d),
        read_only,
        false,
    )
}

/// A `raw` node over a file.
pub fn raw_node(path: &Path, read_only: bool) -> Arc<BlockNode> {
    let f = file_node(path, read_only);
    let d = RawDriver::open(f, RawOptions::default()).unwrap();
    BlockNode::new(
        format!("raw-{}", path.display()),
        Box::new(d),
        read_only,
        false,
    )
}

/// A `qcow2` node with the given backing node.
pub async fn qcow2_node(
    path: &Path,
    backing: Option<Arc<BlockNode>>,
    read_only: bool,
) -> Arc<BlockNode> {
    let f = file_node(path, read_only);
    let d = Qcow2Driver::open(f, backing, read_only)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    BlockNode::new(
        format!("qcow2-{}", path.display()),
        Box::new(d),
        read_only,
        false,
    )
}

/// Opens a qcow2 image and its whole chain from the headers (formats from
/// the headers, never probed); backing images read-only.
pub async fn open_chain(path: &Path, read_only: bool) -> Arc<BlockNode> {
    let file = BlockdevRef::Inline(Box::new(BlockdevOptions::of(DriverOptions::File {
        filename: path.to_str().unwrap().to_string(),
        aio: None,
        locking: Locking::Auto,
    })));
    let mut opts = BlockdevOptions::of(DriverOptions::Qcow2 {
        file,
        backing: BackingOption::FromHeader,
        cache: Qcow2Cache::default(),
    });
    opts.read_only = Some(read_only);
    livesnap_block::open(&BlockGraph::new(), &Drivers::new(), &opts, false)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Position-dependent bytes: the block tests check sub-ranges on their own.
pub use crate::pattern_at as pattern;

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// QEMU's view of persistent bitmap `name` in a qcow2 image: its dirty
/// extents `(offset, len)` as `qemu-nbd -B` exports them, read with
/// `nbdinfo --map`; `Err` with qemu-nbd's words when QEMU refuses the bitmap
/// (missing, inconsistent). The image is opened read-only.
pub fn qemu_dirty_extents(img: &Path, name: &str) -> Result<Vec<(u64, u64)>, String> {
    let (status, out, err) = crate::run_within(
        Command::new("nbdinfo")
            .arg(format!("--map=qemu:dirty-bitmap:{name}"))
            .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name])
            .arg(img)
            .arg("]"),
        std::time::Duration::from_secs(60),
    );
    if !status.success() {
        return Err(err);
    }
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect())
}

/// `qemu-img info`'s JSON of an image, opened read-only with sharing.
pub fn qemu_img_info(img: &Path) -> serde_json::Value {
    let out = tool_ok(
        "qemu-img",
        &["info", "-U", "--output=json", img.to_str().unwrap()],
    );
    serde_json::from_str(&out).expect("qemu-img info JSON")
}
