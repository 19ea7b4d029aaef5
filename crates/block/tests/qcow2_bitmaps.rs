//! Persistent bitmaps in qcow2 against QEMU's own tools: what livesnap
//! stores QEMU reads (qemu-img info, qemu-nbd -B), what QEMU stores
//! livesnap reads, `qemu-img check` stays clean, and a bitmap survives a
//! crash of the process that had the image open.
//!
//! A crash is taken as a copy of the image file while the node is open:
//! what a killed process leaves is what it had written to the file.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use livesnap_block::{BlockNode, IoBuf, WriteFlags};
use livesnap_testkit::block::*;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn image(dir: &Path, name: &str, size: u64, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[p.to_str().unwrap(), &size]);
    tool_ok("qemu-img", &args);
    p
}

async fn write(node: &BlockNode, offset: u64, len: u64) {
    node.write(
        offset,
        IoBuf::from_slice(&pattern(7, offset, len as usize)),
        WriteFlags::default(),
    )
    .await
    .unwrap();
}

/// The image's autoclear feature bits (header offset 88).
fn autoclear(img: &Path) -> u64 {
    let b = std::fs::read(img).unwrap();
    u64::from_be_bytes(b[88..96].try_into().unwrap())
}

/// Dirty extents of the node's bitmap `name`, merged, as (offset, len).
fn extents(node: &BlockNode, name: &str) -> Vec<(u64, u64)> {
    let bits = node.bitmaps().get(name).expect("bitmap").content();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some((off, len)) = bits.next_dirty_run(from, u64::MAX) {
        out.push((off, len));
        from = off + len;
    }
    out
}

/// QEMU's bitmap info list from `qemu-img info` (name, granularity, flags).
fn qemu_bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info = qemu_img_info(img);
    let list = &info["format-specific"]["data"]["bitmaps"];
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap().to_string(),
                        b["granularity"].as_u64().unwrap(),
                        b["flags"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|f| f.as_str().unwrap().to_string())
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_made_bitmap_is_kept_and_extended() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.qcow2", 16 * M, &[]);
    tool_ok(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            "65536",
            img.to_str().unwrap(),
            "b1",
        ],
    );
    let imgs = img.to_str().unwrap();
    tool_ok("qemu-io", &["-c", "write 0 64k", "-c", "write 1M 4k", imgs]);
    // A disabled copy, made by qemu-img's merge (what backup tools do).
    tool_ok("qemu-img", &["bitmap", "--add", "--disable", imgs, "copy"]);
    tool_ok("qemu-img", &["bitmap", "--merge", "b1", imgs, "copy"]);

    let node = qcow2_node(&img, None, false).await;
    assert_eq!(extents(&node, "copy"), vec![(0, 64 * K), (M, 64 * K)]);
    assert!(!node.bitmaps().get("copy").unwrap().enabled());
    node.remove_bitmap("copy").await.unwrap();
    let info = node.bitmaps().infos();
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(info[0].persistent && info[0].recording && !info[0].inconsistent);
    assert_eq!(extents(&node, "b1"), vec![(0, 64 * K), (M, 64 * K)]);
    // Open for writing, the bitmap is in use, as QEMU marks its own.
    assert_eq!(
        qemu_bitmaps(&img),
        vec![("b1".into(), 65536, vec!["in-use".into(), "auto".into()])]
    );
    write(&node, 5 * M + 100, 10).await;
    node.store_bitmaps(true).await.unwrap();
    drop(node);

    assert_eq!(
        qemu_bitmaps(&img),
        vec![("b1".into(), 65536, vec!["auto".into()])]
    );
    assert_eq!(
        qemu_dirty_extents(&img, "b1").unwrap(),
        vec![(0, 64 * K), (M, 64 * K), (5 * M, 64 * K)]
    );
    assert_eq!(
        autoclear(&img),
        1,
        "only the bitmaps bit after a clean close"
    );
    check_clean(&img, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmaps_made_here_are_read_by_qemu_and_removed_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.qcow2", 64 * M, &["-o", "cluster_size=4096"]);
    let node = qcow2_node(&img, None, false).await;
    node.add_bitmap("rec", Some(8192), true, false)
        .await
        .unwrap();
    node.add_bitmap("off", None, true, true).await.unwrap();
    node.add_bitmap("mem", None, false, false).await.unwrap();
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("off".into(), 4096, vec!["in-use".into()]),
            ("rec".into(), 8192, vec!["in-use".into(), "auto".into()]),
        ],
        "persistent bitmaps are in the image as soon as they exist, newest first as QEMU \
         writes its directory; granularity defaults to the cluster size"
    );
    assert_ne!(
        autoclear(&img) & (1 << 63),
        0,
        "write-intent bit while open"
    );
    write(&node, 0, 1).await;
    write(&node, 40 * M - 1, 2).await;
    write(&node, 63 * M, M).await;
    node.store_bitmaps(true).await.unwrap();
    drop(node);
    check_clean(&img, false);
    assert_eq!(
        qemu_dirty_extents(&img, "rec").unwrap(),
        vec![(0, 8192), (40 * M - 8192, 16384), (63 * M, M)]
    );
    assert_eq!(qemu_dirty_extents(&img, "off").unwrap(), vec![]);
    assert!(qemu_dirty_extents(&img, "mem").is_err(), "not persistent");

    let node = qcow2_node(&img, None, false).await;
    assert_eq!(
        extents(&node, "rec"),
        vec![(0, 8192), (40 * M - 8192, 16384), (63 * M, M)]
    );
    assert!(!node.bitmaps().get("off").unwrap().enabled());
    node.remove_bitmap("rec").await.unwrap();
    node.remove_bitmap("off").await.unwrap();
    node.store_bitmaps(true).await.unwrap();
    drop(node);
    assert_eq!(qemu_bitmaps(&img), vec![]);
    assert_eq!(autoclear(&img), 0);
    check_clean(&img, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_survives_a_crash_and_qemu_sees_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.qcow2", 256 * M, &[]);
    let node = qcow2_node(&img, None, false).await;
    node.add_bitmap("b", None, true, false).await.unwrap();
    node.store_bitmaps(true).await.unwrap();
    drop(node);

    let node = qcow2_node(&img, None, false).await;
    let writes = [(3 * M + 5, 100), (100 * M, 64 * K), (255 * M, M)];
    for (off, len) in writes {
        write(&node, off, len).await;
    }
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&img, &crashed).unwrap();
    let exact = extents(&node, "b");
    drop(node);

    // QEMU: in use, so inconsistent, its safe fallback.
    let err = qemu_dirty_extents(&crashed, "b").unwrap_err();
    assert!(err.contains("inconsistent"), "{err}");
    check_clean(&crashed, true);

    // livesnap: consistent, covering every write, over by at most the
    // write-intent regions (1 MiB here) around them.
    let copy = dir.path().join("again.qcow2");
    std::fs::copy(&crashed, &copy).unwrap();
    let node = qcow2_node(&copy, None, false).await;
    let info = node.bitmaps().infos();
    assert!(!info[0].inconsistent && info[0].recording, "{info:?}");
    let bits = node.bitmaps().get("b").unwrap().content();
    for (off, len) in exact {
        assert!(
            bits.all(off, len),
            "write at {off}+{len} lost after the crash"
        );
    }
    assert!(
        bits.dirty_bytes() <= 3 * M,
        "{} dirty bytes",
        bits.dirty_bytes()
    );
    node.store_bitmaps(true).await.unwrap();
    drop(node);
    check_clean(&copy, true);

    // Once QEMU wrote to the image, in-use bitmaps are not ours to trust.
    tool_ok("qemu-io", &["-c", "write 0 4k", crashed.to_str().unwrap()]);
    assert_eq!(
        autoclear(&crashed) & (1 << 63),
        0,
        "QEMU clears unknown autoclear bits"
    );
    let node = qcow2_node(&crashed, None, false).await;
    let info = node.bitmaps().infos();
    assert!(info[0].inconsistent && !info[0].recording, "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleared_bits_reach_the_disk_at_flush() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.qcow2", 64 * M, &[]);
    let node = qcow2_node(&img, None, false).await;
    node.add_bitmap("b", None, true, false).await.unwrap();
    write(&node, 0, 64 * M).await;
    node.bitmaps().clear("b").unwrap();
    node.flush().await.unwrap();
    write(&node, 10 * M, 4 * K).await;
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&img, &crashed).unwrap();
    drop(node);
    let node = qcow2_node(&crashed, None, false).await;
    let bits = node.bitmaps().get("b").unwrap().content();
    assert!(bits.all(10 * M, 4 * K));
    assert_eq!(
        bits.dirty_bytes(),
        M,
        "only the region of the write after the flush"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_crash_leaves_an_inconsistent_bitmap_here() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.qcow2", 16 * M, &[]);
    let imgs = img.to_str().unwrap();
    tool_ok("qemu-img", &["bitmap", "--add", imgs, "q"]);
    // qemu-io marks the bitmap in use at open, writes, says so, then
    // sleeps until it is killed: a QEMU crash after a completed write.
    // (stdbuf: qemu-io's stdout is a pipe, which libc would buffer.)
    let mut qemu = Command::new("stdbuf")
        .args([
            "-oL",
            "qemu-io",
            "-c",
            "write 0 4k",
            "-c",
            "sleep 60000",
            imgs,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(qemu.stdout.take().unwrap());
    let mut line = String::new();
    let read = std::thread::spawn(move || {
        while out.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("wrote") {}
        line
    });
    livesnap_testkit::wait_until(Duration::from_secs(60), "qemu-io to write", || {
        read.is_finished()
    });
    let said = read.join().unwrap();
    assert!(said.contains("wrote"), "qemu-io said {said:?}");
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    assert!(qemu_bitmaps(&img)[0].2.contains(&"in-use".to_string()));
    check_clean(&img, false);

    let node = qcow2_node(&img, None, false).await;
    let info = node.bitmaps().infos();
    assert!(info[0].inconsistent && !info[0].recording, "{info:?}");
    assert_eq!(
        node.bitmaps().clear("q").unwrap_err().to_string(),
        "Bitmap 'q' is inconsistent and cannot be used"
    );
    node.add_bitmap("ours", None, true, false).await.unwrap();
    assert_eq!(
        autoclear(&img) & (1 << 63),
        0,
        "no write-intent promise while a bitmap of unknown content is in use"
    );
    write(&node, 0, 4 * K).await;
    node.store_bitmaps(true).await.unwrap();
    drop(node);
    check_clean(&img, false);
    assert!(qemu_dirty_extents(&img, "q")
        .unwrap_err()
        .contains("inconsistent"));
    assert_eq!(qemu_dirty_extents(&img, "ours").unwrap(), vec![(0, 64 * K)]);

    let node = qcow2_node(&img, None, false).await;
    node.remove_bitmap("q").await.unwrap();
    assert_ne!(
        autoclear(&img) & (1 << 63),
        0,
        "promise back once it is gone"
    );
    node.store_bitmaps(true).await.unwrap();
    drop(node);
    check_clean(&img, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_checks_and_texts() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = image(dir.path(), "v2.qcow2", 16 * M, &["-o", "compat=0.10"]);
    let node = qcow2_node(&v2, None, false).await;
    let err = node.add_bitmap("b", None, true, false).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Can't make bitmap 'b' persistent in '{}': Cannot store dirty bitmaps in qcow2 v2 files",
            node.name()
        )
    );
    let img = image(dir.path(), "a.qcow2", 16 * M, &[]);
    let node = qcow2_node(&img, None, false).await;
    let long = "x".repeat(1024);
    let err = node.add_bitmap(&long, None, true, false).await.unwrap_err();
    assert!(
        err.to_string()
            .ends_with("Name length exceeds maximum (1023 characters)"),
        "{err}"
    );
    // In memory too, as qsd 10.0.2 answers for a raw node.
    assert_eq!(
        node.add_bitmap(&long, None, false, false)
            .await
            .unwrap_err()
            .to_string(),
        format!("Bitmap name too long: {long}")
    );
}

/// Opening images whose bitmap directory breaks a rule fails with QEMU's
/// own words (as qemu-io prints them for the same image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_directories_fail_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path(), "base.qcow2", 16 * M, &[]);
    tool_ok(
        "qemu-img",
        &["bitmap", "--add", base.to_str().unwrap(), "b1"],
    );
    let bytes = std::fs::read(&base).unwrap();
    // The bitmaps extension and the directory it points at.
    let hl = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let mut at = hl;
    let dir_off = loop {
        let magic = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(magic, 0, "no bitmaps extension");
        if magic == 0x2385_2875 {
            break u64::from_be_bytes(bytes[at + 24..at + 32].try_into().unwrap()) as usize;
        }
        at += 8 + len.div_ceil(8) * 8;
    };
    // (what, byte to change, its new value, QEMU's text)
    let cases = [
        ("extra", dir_off + 23, 8, "Broken bitmap directory"),
        (
            "type",
            dir_off + 16,
            2,
            "Bitmap 'b1' doesn't satisfy the constraints",
        ),
        (
            "flags",
            dir_off + 12,
            0x80,
            "Bitmap 'b1' doesn't satisfy the constraints",
        ),
        (
            "count",
            at + 11,
            2,
            "Less bitmaps found than specified in header extension",
        ),
    ];
    for (name, at, value, text) in cases {
        let mut b = bytes.clone();
        b[at] = value;
        let p = dir.path().join(format!("{name}.qcow2"));
        std::fs::write(&p, &b).unwrap();
        let qemu = tool("qemu-io", &["-r", "-c", "read 0 512", p.to_str().unwrap()]);
        let qemu_err = String::from_utf8_lossy(&qemu.stderr).into_owned();
        assert!(qemu_err.contains(text), "{name}: QEMU said {qemu_err}");
        let file = file_node(&p, true);
        let err = livesnap_block::Qcow2Driver::open(file, None, true)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: opened"));
        assert_eq!(err.to_string(), text, "{name}");
    }
}
