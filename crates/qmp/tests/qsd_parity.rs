//! Byte-for-byte comparison with a live qemu-storage-daemon: the same input
//! goes to qsd and to our server (with a dispatcher that only knows
//! `query-version`, like qsd answers it), and every byte of output must
//! match. Also checks [`QmpClient`] against qsd. Skipped when qsd is not
//! installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use livesnap_qmp::{ErrorClass, Greeting, QmpClient};
use livesnap_testkit::qmp::*;
use serde_json::{json, Value};

const QSD: &str = "/usr/bin/qemu-storage-daemon";

/// A qsd process, killed when dropped.
struct Qsd {
    child: Child,
    sock: PathBuf,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_qsd(dir: &Path) -> Qsd {
    assert!(
        Path::new(QSD).exists(),
        "{QSD} is needed: apt-get install -y qemu-utils (.ci/run installs it)"
    );
    let sock = dir.join("qsd.sock");
    let child = Command::new(QSD)
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=m",
            sock.display()
        ))
        .arg("--monitor")
        .arg("chardev=m")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let qsd = Qsd { child, sock };
    for _ in 0..100 {
        if tokio::net::UnixStream::connect(&qsd.sock).await.is_ok() {
            return qsd;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("qemu-storage-daemon did not come up");
}

/// Our greeting, copied from qsd's so that version output can match.
async fn greeting_like(qsd: &Qsd) -> Greeting {
    let lines = exchange_to_eof(&qsd.sock, b"").await;
    let g: Value = serde_json::from_str(&lines[0]).unwrap();
    let v = &g["QMP"]["version"];
    let q = &v["qemu"];
    let greeting = Greeting::new(
        (
            q["major"].as_u64().unwrap(),
            q["minor"].as_u64().unwrap(),
            q["micro"].as_u64().unwrap(),
        ),
        v["package"].as_str().unwrap(),
    );
    assert_eq!(g["QMP"]["capabilities"], json!(["oob"]));
    greeting
}

const CAPS: &str = "{\"execute\":\"qmp_capabilities\"}\n";

fn cases() -> Vec<Vec<u8>> {
    let mut c: Vec<Vec<u8>> = Vec::new();
    let mut add = |negotiate: bool, lines: &[&[u8]]| {
        let mut v = Vec::new();
        if negotiate {
            v.extend_from_slice(CAPS.as_bytes());
        }
        for l in lines {
            v.extend_from_slice(l);
        }
        c.push(v);
    };
    // Negotiation.
    add(
        false,
        &[
            b"{\"execute\":\"query-version\"}\n",
            b"{\"execute\":\"nosuch\"}\n",
            b"{\"execute\":\"query-version\",\"id\":5}\n",
            b"{\"foo\":1}\n",
            b"garbage\n",
            b"{\"exec-oob\":\"qmp_capabilities\",\"id\":1}\n",
            b"{\"execute\":\"qmp_capabilities\",\"arguments\":[]}\n",
            b"{\"execute\":\"qmp_capabilities\"}\n",
            b"{\"execute\":\"qmp_capabilities\"}\n",
            b"{\"execute\":\"query-version\"}\n",
        ],
    );
    add(false, &[
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"bogus\"]}}\n",
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[1]}}\n",
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":\"oob\"}}\n",
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":null}}\n",
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\",\"bogus\"]}}\n",
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"x\":1}}\n",
        // With OOB on, exec-oob is answered as soon as it is read, ahead of
        // in-band requests still queued (qsd too, when they are slow), so
        // in-band requests (with `execute`, even
        // beside `exec-oob`) come after the exec-oob ones here.
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\",\"oob\"]},\"id\":\"c\"}\n",
        b"{\"exec-oob\":\"query-version\",\"id\":1}\n",
        b"{\"exec-oob\":\"nosuch\",\"id\":2}\n",
        b"{\"exec-oob\":\"qmp_capabilities\"}\n",
        b"{\"exec-oob\":5}\n",
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"bogus\"]}}\n",
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[]}}\n",
        b"{\"exec-oob\":\"query-version\",\"execute\":\"query-version\",\"id\":3}\n",
        b"{\"execute\":\"query-version\",\"exec-oob\":\"query-version\",\"id\":4}\n",
        b"{\"execute\":\"query-version\",\"id\":6}\n",
    ]);
    // Request shape and id echo.
    add(
        true,
        &[
            b"{\"execute\":\"nosuch\"}\n",
            b"garbage\n",
            b"[1]\n",
            b"\"x\"\n",
            b"1\n",
            b"null\n",
            b"{}\n",
            b"{\"execute\":1}\n",
            b"{\"execute\":\"query-version\",\"foo\":1}\n",
            b"{\"execute\":\"query-version\",\"arguments\":[]}\n",
            b"{\"execute\":\"query-version\",\"arguments\":null}\n",
            b"{\"arguments\":{}}\n",
            b"{\"execute\":\"nosuch\",\"arguments\":1}\n",
            b"{\"foo\":1,\"execute\":5}\n",
            b"{\"arguments\":1,\"foo\":2}\n",
            b"{\"execute\":\"query-version\",\"arguments\":{},\"zzz\":1,\"aaa\":2}\n",
            b"{\"execute\":\"query-version\",\"exec-oob\":\"query-version\"}\n",
            b"{\"exec-oob\":\"query-version\"}\n",
            b"{\"execute\":\"query-version\",\"arguments\":{\"x\":1}}\n",
        ],
    );
    add(true, &[
        b"{\"execute\":\"query-version\",\"id\":1}\n", b"{\"id\":\"abc\",\"execute\":\"nosuch\"}\n",
        b"{\"execute\":\"query-version\",\"id\":{\"a\":[1,2],\"b\":null}}\n",
        b"{\"execute\":\"query-version\",\"id\":null}\n", b"{\"execute\":\"query-version\",\"id\":[1,\"x\"]}\n",
        b"{\"execute\":\"query-version\",\"id\":true}\n", b"{\"execute\":\"query-version\",\"id\":[]}\n",
        b"{\"execute\":\"query-version\",\"id\":{}}\n", b"{\"execute\":\"query-version\",\"id\":\"\"}\n",
        b"{\"execute\":\"query-version\",\"id\":{\"x\":\"y\",\"a\":1,\"zz\":{\"q\":[{\"r\":1,\"s\":2}]}}}\n",
        b"{\"execute\":1,\"id\":7}\n", b"{\"id\":8}\n", b"{\"execute\":\"query-version\",\"foo\":1,\"id\":9}\n",
        b"{ \"execute\" : \"query-version\" , \"id\" : [ 1 , { \"k\" : \"v\" } ] }\r\n",
    ]);
    // Number and string formatting.
    add(
        true,
        &[
            b"{\"execute\":\"query-version\",\"id\":1.5}\n",
            b"{\"execute\":\"query-version\",\"id\":1e3}\n",
            b"{\"execute\":\"query-version\",\"id\":1E+2}\n",
            b"{\"execute\":\"query-version\",\"id\":0.1}\n",
            b"{\"execute\":\"query-version\",\"id\":1e-7}\n",
            b"{\"execute\":\"query-version\",\"id\":123456789.125}\n",
            b"{\"execute\":\"query-version\",\"id\":1e300}\n",
            b"{\"execute\":\"query-version\",\"id\":-0.0}\n",
            b"{\"execute\":\"query-version\",\"id\":-0}\n",
            b"{\"execute\":\"query-version\",\"id\":2.5e-300}\n",
            b"{\"execute\":\"query-version\",\"id\":-12345678901234567890}\n",
            b"{\"execute\":\"query-version\",\"id\":18446744073709551615}\n",
            b"{\"execute\":\"query-version\",\"id\":18446744073709551616}\n",
            b"{\"execute\":\"query-version\",\"id\":-9223372036854775808}\n",
            b"{\"execute\":\"query-version\",\"id\":\"x\\u00e9\\n\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\u0000\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\ud83d\\ude00\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\/\\b\\f\\r\\t\\'\x7f\"}\n",
            "{\"execute\":\"query-version\",\"id\":\"\u{e9}\u{1F600}\u{7ff}\u{800}\u{fffd}\"}\n"
                .as_bytes(),
            b"{\"execute\":\"query-version\",\"id\":\"\xc0\x80\"}\n",
            b"{'execute':'query-version','id':'sq'}\n",
            b"{'execute':'query-version','id':'it\\'s \"sq\"'}\n",
            b"{\"execute\":\"query-version\",\"id\":\"a'b\"}\n",
        ],
    );
    // JSON errors and recovery.
    add(
        true,
        &[
            b"}\n",
            b"]\n",
            b"{\"execute\" \"query-version\"}\n",
            b"{\"execute\":\"query-version\",}\n",
            b"{\"execute\":\"query-version\" \"id\":1}\n",
            b"{\"execute\":query-version}\n",
            b"{\"execute\":\"query-version\",\"id\":1.}\n",
            b"{\"execute\":\"query-version\",\"id\":01}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\x\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\ud800\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\ud800\\u0041\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\uffff\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\ufdd0\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\u12\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\\uZZZZ\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"tab\there\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\xff\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\xc0\x81\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\xed\xa0\x80\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\xe9\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"\xf8\x88\x80\x80\x80\"}\n",
            b"{\"execute\":\"query-version\",\"execute\":\"query-version\"}\n",
            b"{\"execute\":\"query-version\",\"id\":1,\"id\":2}\n",
            b"{\"execute\":\"query-version\",\"id\":1}}\n",
            b"{]\n",
            b"[}]\n",
            b"1 2 3\n",
            b"nul\n",
            b"@\n",
            b"{1:2}\n",
            b"{\"a\" 1}\n",
            b"[1 2]\n",
            b"{\"execute\":\"query-version\",\"id\":[1,}\n",
            b"{\"execute\":\"query-version\",\"id\":\"swallowed\"}\n",
            b"]\n",
            b"-\n",
            b"-x\n",
            b"1e\n",
            b"1e+\n",
            b"0x10\n",
            b"tru\n",
            b"TRUE\n",
            b"\x00\n",
            b"\x04{\"execute\":\"query-version\",\"id\":\"after-ctl\"}\n",
            b"{\"execute\":\"query-version\",\"id\":\"recovered\"}\n",
        ],
    );
    // Framing.
    add(true, &[b"{\"execute\":\"query-version\",\"id\":1}{\"execute\":\"nosuch\",\"id\":2}\n{\"execute\":\"query-version\",\"id\":3}"]);
    add(true, &[b"{\"execute\":\"query-version\""]);
    let mut deep = vec![b'['; 1025];
    deep.extend_from_slice(b"\n]]]\n{\"execute\":\"query-version\",\"id\":\"after-nesting\"}\n");
    let mut ok_deep = vec![b'['; 1024];
    ok_deep.extend(vec![b']'; 1024]);
    ok_deep.push(b'\n');
    let mut deep_id = b"{\"execute\":\"query-version\",\"id\":".to_vec();
    deep_id.extend(vec![b'['; 1023]);
    deep_id.extend(vec![b']'; 1023]);
    deep_id.extend_from_slice(b"}\n");
    add(true, &[&deep, &ok_deep, &deep_id]);
    let mut long = b"{\"execute\":\"query-version\",\"id\":\"".to_vec();
    long.extend(vec![b'a'; 100_000]);
    long.extend_from_slice(b"\"}\n");
    let long_kw = "z".repeat(3000);
    add(true, &[&long, long_kw.as_bytes(), b"\n"]);
    // Which unexpected member is reported, for many member sets
    // (exercises the GLib table emulation, including resizes).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"abcdefghijklmnopqrstuvwxyz-_0123456789";
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for _ in 0..150 {
        let n = 1 + rnd() % 40;
        let mut obj = serde_json::Map::new();
        for _ in 0..n {
            let len = 1 + rnd() % 12;
            let k: String = (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize] as char)
                .collect();
            obj.insert(k, json!(1));
        }
        let req = json!({"execute": "query-version", "arguments": obj});
        lines.push(format!("{req}\n").into_bytes());
    }
    let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
    add(true, &refs);
    c
}

#[tokio::test]
async fn output_matches_qsd_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = start_qsd(dir.path()).await;
    let ours_path = dir.path().join("ours.sock");
    let (server, _ev) = start_server(&ours_path, greeting_like(&qsd).await).await;
    let mut compared = 0;
    for (i, input) in cases().iter().enumerate() {
        // Case 1 enables OOB and then queues in-band requests: wait for the
        // last reply before EOF, which would drop what is still queued.
        let marker = (i == 1).then_some("\"id\": 6}");
        let theirs = exchange_until_then_eof(&qsd.sock, input, marker).await;
        let ours = exchange_until_then_eof(&ours_path, input, marker).await;
        for (j, (t, o)) in theirs.iter().zip(&ours).enumerate() {
            assert_eq!(
                o,
                t,
                "case {i}, message {j}; input {:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(ours.len(), theirs.len(), "case {i}: message count");
        compared += ours.len();
    }
    assert!(compared > 300, "only {compared} messages compared");
    server.close().await;
}

#[tokio::test]
async fn client_works_against_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = start_qsd(dir.path()).await;
    let mut c = QmpClient::connect(&qsd.sock).await.unwrap();
    assert_eq!(c.greeting()["QMP"]["capabilities"], json!(["oob"]));
    let v = c.execute("query-version", None).await.unwrap().unwrap();
    assert!(v["qemu"]["major"].as_u64().unwrap() >= 10);
    let e = c.execute("nosuch", None).await.unwrap().unwrap_err();
    assert_eq!(e.class, ErrorClass::CommandNotFound);
    let e = c
        .execute("blockdev-add", Some(json!({"driver": "file"})))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.desc, "Parameter 'filename' is missing");
    // A job produces events, some of them while the command runs.
    let img = dir.path().join("x.img");
    let r = c
        .execute(
            "blockdev-create",
            Some(json!({"job-id": "j1", "options": {"driver": "file",
                "filename": img.to_str().unwrap(), "size": 1048576}})),
        )
        .await
        .unwrap();
    assert_eq!(r.unwrap(), json!({}));
    let mut statuses = Vec::new();
    while let Some(ev) = c.next_event(Duration::from_secs(5)).await {
        assert_eq!(ev["event"], "JOB_STATUS_CHANGE");
        assert!(ev["timestamp"]["seconds"].is_u64());
        let s = ev["data"]["status"].as_str().unwrap().to_string();
        let done = s == "concluded";
        statuses.push(s);
        if done {
            break;
        }
    }
    assert_eq!(statuses.first().map(String::as_str), Some("created"));
    assert_eq!(statuses.last().map(String::as_str), Some("concluded"));
    let r = c
        .execute("job-dismiss", Some(json!({"id": "j1"})))
        .await
        .unwrap();
    assert_eq!(r.unwrap(), json!({}));
    assert_eq!(
        c.next_event(Duration::from_secs(5)).await.unwrap()["data"]["status"],
        "null"
    );
}
