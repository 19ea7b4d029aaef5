//! Quick interop checks against real NBD clients (libnbd's nbdinfo, QEMU's
//! qemu-io and qemu-img). A missing tool fails the test (CI installs
//! them); the full interop suite lives in the workspace `tests/`.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

fn require(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs `{tool}` (qemu-utils / libnbd-bin); .ci/run installs it"
    );
}

/// Runs a command off the runtime threads (the server runs on them) and returns (ok, stdout+stderr).
async fn run(cmd: &str, args: Vec<String>) -> (bool, String) {
    let cmd = cmd.to_string();
    tokio::task::spawn_blocking(move || {
        let o = Command::new(&cmd).args(&args).output().unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    })
    .await
    .unwrap()
}

fn uri(f: &Fixture, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", f.sock.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_info_and_map() {
    require("nbdinfo");
    let f = Fixture::new(0).await;
    let node = open_node(&sparse_file(f.dir.path(), "a.img", 8 * MIB), false);
    f.add_node("disk", node, true, Some("a test disk"));
    f.add_file_export("second", MIB, false);
    let c = livesnap_nbd::NbdClient::connect(&f.addr, "disk")
        .await
        .unwrap();
    c.write(2 * MIB, &pattern(1, MIB as usize), false)
        .await
        .unwrap();
    c.disconnect().await.unwrap();

    let (ok, out) = run("nbdinfo", vec!["--list".into(), uri(&f, "")]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("export=\"disk\"") || out.contains("disk"),
        "{out}"
    );
    assert!(out.contains("a test disk"), "{out}");
    assert!(out.contains("second"), "{out}");

    let (ok, out) = run("nbdinfo", vec![uri(&f, "disk")]).await;
    assert!(ok, "{out}");
    assert!(out.contains("export-size: 8388608"), "{out}");
    assert!(
        out.contains("can_flush: true") || out.contains("can_flush"),
        "{out}"
    );
    assert!(out.contains("block_size_preferred: 4096"), "{out}");

    let (ok, out) = run("nbdinfo", vec!["--map".into(), uri(&f, "disk")]).await;
    assert!(ok, "{out}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // offset length type description
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(&lines[0][..3], &["0", "2097152", "3"], "{out}");
    assert_eq!(&lines[1][..3], &["2097152", "1048576", "0"], "{out}");
    assert_eq!(&lines[2][..3], &["3145728", "5242880", "3"], "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_reads_writes_and_zeroes() {
    require("qemu-io");
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 16 * MIB, true);
    let node = f.table.get("disk").unwrap().config().backend.root();
    f.add_node("ro", node, false, None);

    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), uri(&f, "disk")];
    for c in [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0xcd 1M 1M",
        "aio_write -P 0x11 4M 4k",
        "aio_write -P 0x22 5M 4k",
        "aio_flush",
        "read -P 0x11 4M 4k",
        "read -P 0x22 5M 4k",
        "write -z 1M 512k",
        "read -P 0 1M 512k",
        "read -P 0xcd 1536k 512k",
        "write -z -u 8M 1M",
        "read -P 0 8M 1M",
        "discard 0 4k",
        "write -P 0x5a 12345 1000",
        "read -P 0x5a 12345 1000",
        "flush",
        "write -f -P 0x66 10M 64k",
        "read -P 0x66 10M 64k",
    ] {
        args.push("-c".into());
        args.push(c.into());
    }
    let (ok, out) = run("qemu-io", args).await;
    assert!(ok, "{out}");
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");

    // Read-only export: reads work, writes are refused.
    let ro = vec![
        "-r".into(),
        "-f".into(),
        "raw".into(),
        uri(&f, "ro"),
        "-c".into(),
        "read -P 0xcd 1536k 512k".into(),
    ];
    let (ok, out) = run("qemu-io", ro).await;
    assert!(ok && !out.contains("failed"), "{out}");

    require("qemu-img");
    let (ok, out) = run(
        "qemu-img",
        vec![
            "map".into(),
            "--output=json".into(),
            "-f".into(),
            "raw".into(),
            uri(&f, "disk"),
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("\"data\": true") && out.contains("\"data\": false"),
        "{out}"
    );
}
