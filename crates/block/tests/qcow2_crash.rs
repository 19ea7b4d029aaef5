//! Crash safety: a child process writes, zeroes, discards and flushes through
//! `Qcow2Driver` (over a raw backing file) and logs what it did; it is killed
//! with SIGKILL at random moments, many times over the same image. After each
//! kill `qemu-img check` must find no corruption (leaks are fine) and QEMU must
//! read back every write that completed before a successful flush or with FUA.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livesnap_block::{create_image, CreateOptions, ImageFormat, IoBuf, WriteFlags, ZeroFlags};
use livesnap_testkit::block::*;

const SIZE: u64 = 16 << 20;
const BASE: u64 = 8 << 20;
const SECTOR: u64 = 512;
const CHILD_ENV: &str = "LIVESNAP_QCOW2_CRASH_CHILD";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Sector {
    Base,
    Zero,
    Data(u64),
    Unknown,
}

fn log_line(log: &Mutex<std::fs::File>, line: String) {
    // One write(2) per line: what the kernel took survives SIGKILL.
    log.lock().unwrap().write_all(line.as_bytes()).unwrap();
}

/// The child: runs until killed. Only acts when started by the parent test.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut it = spec.split(',');
    let img = it.next().unwrap().to_string();
    let log_path = it.next().unwrap().to_string();
    let seed: u64 = it.next().unwrap().parse().unwrap();
    let cluster: u64 = it.next().unwrap().parse().unwrap();
    let l2_cache: u64 = it.next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let log = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .unwrap(),
        ));
        let node = if l2_cache == 0 {
            open_chain(Path::new(&img), false).await
        } else {
            let base = Path::new(&img).with_file_name("base.raw");
            let d = livesnap_block::Qcow2Driver::open_with(
                file_node(Path::new(&img), false),
                Some(raw_node(&base, true)),
                false,
                livesnap_block::Qcow2Options {
                    l2_cache_size: Some(l2_cache),
                },
            )
            .await
            .unwrap();
            livesnap_block::BlockNode::new("crash", Box::new(d), false, false)
        };
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut id = seed << 32;
        loop {
            if rng.below(8) == 0 {
                // A FUA write is durable when it completes.
                id += 1;
                let off = rng.below(SIZE / SECTOR - 200) * SECTOR;
                let len = (rng.below(128) + 1) * SECTOR;
                log_line(&log, format!("W {id} {off} {len}\n"));
                node.write(
                    off,
                    IoBuf::from_slice(&pattern(id, off, len as usize)),
                    WriteFlags { fua: true },
                )
                .await
                .unwrap();
                log_line(&log, "R\n".into());
                continue;
            }
            // A round: batches of concurrent, non-overlapping requests, then a flush.
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let batches = rng.below(3) + 1;
            for _ in 0..batches {
                let mut tasks = Vec::new();
                let want = ranges.len() + 6;
                while ranges.len() < want {
                    let kind = rng.below(20);
                    let (off, len) = if kind < 3 {
                        let c = rng.below(SIZE / cluster - 8);
                        (c * cluster, (rng.below(4) + 1) * cluster)
                    } else {
                        let off = rng.below(SIZE / SECTOR - 300) * SECTOR;
                        (off, (rng.below(256) + 1) * SECTOR)
                    };
                    if ranges.iter().any(|&(o, l)| off < o + l && o < off + len) {
                        continue;
                    }
                    ranges.push((off, len));
                    id += 1;
                    let node = node.clone();
                    let line = match kind {
                        0..=1 => format!("D {off} {len}\n"),
                        2..=4 => format!("Z {off} {len}\n"),
                        _ => format!("W {id} {off} {len}\n"),
                    };
                    log_line(&log, line);
                    let unmap = rng.below(2) == 0;
                    let this = id;
                    tasks.push(tokio::spawn(async move {
                        match kind {
                            0..=1 => node.discard(off, len).await.unwrap(),
                            2..=4 => node
                                .write_zeroes(
                                    off,
                                    len,
                                    ZeroFlags {
                                        may_unmap: unmap,
                                        ..Default::default()
                                    },
                                )
                                .await
                                .unwrap(),
                            _ => node
                                .write(
                                    off,
                                    IoBuf::from_slice(&pattern(this, off, len as usize)),
                                    WriteFlags::default(),
                                )
                                .await
                                .unwrap(),
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            }
            node.flush().await.unwrap();
            log_line(&log, "R\n".into());
        }
    });
}

/// Applies a child's log to the model: completed rounds exactly, the
/// unfinished round as unknown.
fn apply_log(model: &mut [Sector], log: &str) -> usize {
    let mut round: Vec<(char, u64, u64, u64)> = Vec::new();
    let mut rounds = 0;
    for line in log.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "R" => {
                for &(k, id, off, len) in &round {
                    let s = match k {
                        'W' => Sector::Data(id),
                        _ => Sector::Zero,
                    };
                    for i in off / SECTOR..(off + len) / SECTOR {
                        model[i as usize] = s;
                    }
                }
                round.clear();
                rounds += 1;
            }
            "W" => round.push((
                'W',
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )),
            "Z" | "D" => round.push(('Z', 0, f[1].parse().unwrap(), f[2].parse().unwrap())),
            // A line cut short by the kill: its request never started.
            _ => {}
        }
    }
    for &(_, _, off, len) in &round {
        for i in off / SECTOR..(off + len) / SECTOR {
            model[i as usize] = Sector::Unknown;
        }
    }
    rounds
}

fn verify(img: &Path, model: &[Sector], dir: &Path) {
    let raw = dir.join("view.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&raw).unwrap();
    for (i, s) in model.iter().enumerate() {
        let off = i as u64 * SECTOR;
        let want = match *s {
            Sector::Unknown => continue,
            Sector::Base if off < BASE => vec![0x77; SECTOR as usize],
            Sector::Base | Sector::Zero => vec![0; SECTOR as usize],
            Sector::Data(id) => pattern(id, off, SECTOR as usize),
        };
        assert!(
            got[off as usize..(off + SECTOR) as usize] == want[..],
            "sector {i} (offset {off:#x}) should hold {s:?}"
        );
    }
}

async fn kill9(cluster: u64, l2_cache: u64) {
    let iterations: u64 = std::env::var("LIVESNAP_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.raw");
    let img = tmp.path().join("img.qcow2");
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", base.to_str().unwrap(), "8M"],
    );
    qemu_io(&base, "raw", &["write -P 0x77 0 8M".into()]);
    create_image(&CreateOptions {
        filename: img.to_str().unwrap().into(),
        format: ImageFormat::Qcow2,
        size: Some(SIZE),
        cluster_size: Some(cluster),
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
    })
    .await
    .unwrap();

    let mut model = vec![Sector::Base; (SIZE / SECTOR) as usize];
    let mut rng = Rng(0x5eed);
    let mut total_rounds = 0;
    for it in 0..iterations {
        let log = tmp.path().join(format!("log-{it}"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(
                CHILD_ENV,
                format!(
                    "{},{},{},{cluster},{l2_cache}",
                    img.display(),
                    log.display(),
                    it + 1
                ),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60 + rng.below(500))).await;
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("child exited early ({st}): {err}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let text = std::fs::read_to_string(&log).unwrap_or_default();
        total_rounds += apply_log(&mut model, &text);
        check_clean(&img, true);
        verify(&img, &model, tmp.path());
    }
    assert!(
        total_rounds >= iterations as usize,
        "the child hardly ran: {total_rounds} rounds in {iterations} runs"
    );
    eprintln!(
        "{cluster}-byte clusters: {iterations} kills, {total_rounds} flushed rounds verified"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_image_consistent_4k_clusters() {
    kill9(4096, 0).await;
}

/// 512-byte clusters: new L2 tables, refcount blocks and refcount tables all
/// the time, so the kill often lands in the middle of metadata allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_image_consistent_512_clusters() {
    kill9(512, 0).await;
}

/// A tiny L2 cache: dirty tables are evicted (written) between flushes all
/// the time, so kills land between refcount and L2 writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_image_consistent_evicting_l2_cache() {
    kill9(4096, 3 * 4096).await;
}
