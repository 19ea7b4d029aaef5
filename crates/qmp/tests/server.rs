//! The QMP server end to end, over a real unix socket, with a tiny
//! dispatcher. Expected texts are qsd's (docs/qmp-qsd-transcript.md).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use livesnap_qmp::{ErrorClass, EventBus, Greeting, Limits, QmpClient, QmpServer};
use livesnap_testkit::qmp::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);
const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "livesnap-test"}, "capabilities": ["oob"]}}"#;

async fn negotiated(path: &std::path::Path) -> Raw {
    let mut m = Raw::connect(path).await;
    assert_eq!(m.line(T).await.unwrap(), GREETING);
    m.send("{\"execute\":\"qmp_capabilities\"}\n").await;
    assert_eq!(m.line(T).await.unwrap(), r#"{"return": {}}"#);
    m
}

#[tokio::test]
async fn greeting_and_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, _ev) = start_server(&path, test_greeting()).await;
    let mut m = Raw::connect(&path).await;
    assert_eq!(m.line(T).await.unwrap(), GREETING);
    let expecting = r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#;
    m.send("{\"execute\":\"query-version\"}\n").await;
    assert_eq!(m.line(T).await.unwrap(), expecting);
    m.send("{\"execute\":\"nosuch\"}\n").await;
    assert_eq!(m.line(T).await.unwrap(), expecting);
    m.send("{\"execute\":\"query-version\",\"id\":5}\n").await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"id": 5, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
    );
    // Other errors are not rewritten before negotiation.
    m.send("{\"foo\":1}\n").await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}"#
    );
    m.send("{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"bogus\"]}}\n")
        .await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'bogus'"}}"#
    );
    m.send("{\"execute\":\"qmp_capabilities\"}\n").await;
    assert_eq!(m.line(T).await.unwrap(), r#"{"return": {}}"#);
    m.send("{\"execute\":\"qmp_capabilities\",\"id\":6}\n")
        .await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"id": 6, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
    );
    m.send("{\"execute\":\"query-version\"}\n").await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "livesnap-test"}}"#
    );
    server.close().await;
}

#[tokio::test]
async fn bad_input_gets_qemu_errors_and_the_monitor_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, _ev) = start_server(&path, test_greeting()).await;
    let mut m = negotiated(&path).await;
    let cases: &[(&str, &[&str])] = &[
        (
            "garbage\n",
            &["JSON parse error, invalid keyword 'garbage'"],
        ),
        ("[1]\n", &["QMP input must be a JSON object"]),
        ("\"x\"\n", &["QMP input must be a JSON object"]),
        ("1\n", &["QMP input must be a JSON object"]),
        ("{}\n", &["QMP input lacks member 'execute'"]),
        (
            "{\"execute\":1}\n",
            &["QMP input member 'execute' must be a string"],
        ),
        (
            "{\"execute\":\"add\",\"foo\":1}\n",
            &["QMP input member 'foo' is unexpected"],
        ),
        (
            "{\"execute\":\"add\",\"arguments\":[]}\n",
            &["QMP input member 'arguments' must be an object"],
        ),
        (
            "{\"execute\":\"query-version\",\"arguments\":{},\"zzz\":1,\"aaa\":2}\n",
            &["QMP input member 'aaa' is unexpected"],
        ),
        (
            "{\"execute\":\"nosuch\"}\n",
            &["The command nosuch has not been found"],
        ),
        (
            "{\"execute\":\"add\",\"arguments\":{\"a\":\"1\"}}\n",
            &["Invalid parameter type for 'a', expected: integer"],
        ),
        (
            "{\"execute\":\"add\",\"arguments\":{\"a\":1.5}}\n",
            &["Invalid parameter type for 'a', expected: integer"],
        ),
        (
            "{\"execute\":\"add\",\"arguments\":{}}\n",
            &["Parameter 'a' is missing"],
        ),
        (
            "{\"execute\":\"add\",\"arguments\":{\"a\":1,\"c\":2}}\n",
            &["Parameter 'c' is unexpected"],
        ),
        (
            "{\"execute\":\"emit\",\"arguments\":{\"name\":\"X\",\"count\":4294967296}}\n",
            &["Parameter 'count' expects uint32_t"],
        ),
        (
            "{\"execute\":query-version}\n",
            &[
                "JSON parse error, stray '-v'",
                "JSON parse error, expecting value",
            ],
        ),
        (
            "{\"execute\":\"add\",\"execute\":\"add\"}\n",
            &["JSON parse error, duplicate key"],
        ),
    ];
    for (input, descs) in cases {
        m.send(input).await;
        for want in descs.iter() {
            let v = m.json().await;
            assert_eq!(v["error"]["desc"], *want, "input {input:?}");
            let class = if want.starts_with("The command") {
                "CommandNotFound"
            } else {
                "GenericError"
            };
            assert_eq!(v["error"]["class"], class, "input {input:?}");
        }
    }
    m.send("{\"execute\":\"add\",\"arguments\":{\"a\":40,\"b\":2}}\n")
        .await;
    assert_eq!(m.line(T).await.unwrap(), r#"{"return": 42}"#);
    m.send("{\"execute\":\"nothing\"}\n").await;
    assert_eq!(m.line(T).await.unwrap(), r#"{"return": {}}"#);
    server.close().await;
}

#[tokio::test]
async fn id_is_echoed_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, _ev) = start_server(&path, test_greeting()).await;
    let mut m = negotiated(&path).await;
    m.send("{\"execute\":\"add\",\"arguments\":{\"a\":1},\"id\":{\"a\":[1,2],\"b\":null}}\n")
        .await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"return": 1, "id": {"a": [1, 2], "b": null}}"#
    );
    m.send("{\"id\":\"abc\",\"execute\":\"nosuch\"}\n").await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"id": "abc", "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}"#
    );
    m.send("{\"execute\":\"nothing\",\"id\":null}\n").await;
    assert_eq!(m.line(T).await.unwrap(), r#"{"return": {}, "id": null}"#);
    m.send("{\"execute\":1,\"id\":[7,\"x\"]}\n").await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"id": [7, "x"], "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#
    );
    m.send("{'execute':'nothing','id':0.1}\n").await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"return": {}, "id": 0.10000000000000001}"#
    );
    // Not an object: there is no id to echo.
    m.send("[{\"id\":1}]\n").await;
    assert!(m.json().await.get("id").is_none());
    server.close().await;
}

#[tokio::test]
async fn framing_several_per_write_split_and_eof() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, _ev) = start_server(&path, test_greeting()).await;
    let mut m = negotiated(&path).await;
    m.send("{\"execute\":\"add\",\"arguments\":{\"a\":1},\"id\":1}{\"execute\":\"nosuch\",\"id\":2}\n{\"execute\":\"add\",\"arguments\":{\"a\":3},\"id\":3}").await;
    assert_eq!(m.json().await["id"], 1);
    assert_eq!(m.json().await["id"], 2);
    assert_eq!(m.json().await["id"], 3);
    let req = "{\"execute\":\"add\",\"arguments\":{\"a\":\"}{][\\\"\"},\"id\":\"split\"}";
    for b in req.as_bytes() {
        m.send(std::str::from_utf8(std::slice::from_ref(b)).unwrap())
            .await;
    }
    let v = m.json().await;
    assert_eq!(v["id"], "split");
    assert_eq!(
        v["error"]["desc"],
        "Invalid parameter type for 'a', expected: integer"
    );

    // Commands followed by end of input are all answered, then the server
    // closes (like `printf ... | socat`).
    let lines = exchange_to_eof(
        &path,
        b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"slow\",\"arguments\":{\"ms\":100}}\n{\"execute\":\"add\",\"arguments\":{\"a\":2}}\n",
    )
    .await;
    assert_eq!(
        lines,
        [
            GREETING,
            r#"{"return": {}}"#,
            r#"{"return": {"slept": 100}}"#,
            r#"{"return": 2}"#
        ]
    );
    // An unterminated object before EOF: nothing, then close.
    let lines = exchange_to_eof(
        &path,
        b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"add\"",
    )
    .await;
    assert_eq!(lines, [GREETING, r#"{"return": {}}"#]);
    server.close().await;
}

#[tokio::test]
async fn long_input_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let events = EventBus::new();
    let d = Arc::new(TestDispatcher {
        greeting: test_greeting(),
        events: events.clone(),
    });
    let limits = Limits {
        max_message_bytes: 1 << 20,
        ..Limits::default()
    };
    let server = QmpServer::bind_with_limits(&path, test_greeting(), d, events, limits)
        .await
        .unwrap();
    let mut m = negotiated(&path).await;
    // 3 MiB of a string never ends a message: answered with QEMU's errors
    // after 1 MiB, and the stream resynchronises.
    let mut big = String::from("{\"execute\":\"add\",\"id\":\"");
    big.push_str(&"a".repeat(3 << 20));
    big.push_str("\"}\n{\"execute\":\"add\",\"arguments\":{\"a\":7}}\n");
    m.send(&big).await;
    let v = m.json().await;
    assert_eq!(v["error"]["desc"], "JSON token size limit exceeded");
    let mut saw_ok = false;
    for _ in 0..10 {
        let v = m.json().await;
        if v.get("return") == Some(&json!(7)) {
            saw_ok = true;
            break;
        }
        assert!(v["error"]["desc"].as_str().unwrap().starts_with("JSON"));
    }
    assert!(saw_ok, "the monitor did not recover");
    server.close().await;
}

#[tokio::test]
async fn events_reach_negotiated_monitors_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, events) = start_server(&path, test_greeting()).await;
    let mut a = negotiated(&path).await;
    let mut b = negotiated(&path).await;
    let mut c = Raw::connect(&path).await;
    assert_eq!(c.line(T).await.unwrap(), GREETING);

    a.send("{\"execute\":\"emit\",\"arguments\":{\"name\":\"TEST_EVENT\",\"count\":3},\"id\":1}\n")
        .await;
    // Events emitted by the command come before its reply.
    for n in 0..3 {
        let v = a.json().await;
        assert_eq!(v["event"], "TEST_EVENT");
        assert_eq!(v["data"], json!({ "n": n }));
        let ts = &v["timestamp"];
        assert!(ts["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(ts["microseconds"].as_u64().unwrap() < 1_000_000);
        assert_eq!(ts.as_object().unwrap().len(), 2);
    }
    assert_eq!(a.line(T).await.unwrap(), r#"{"return": {}, "id": 1}"#);
    for n in 0..3 {
        let l = b.line(T).await.unwrap();
        assert!(l.starts_with("{\"timestamp\": {\"seconds\": "), "{l}");
        assert!(
            l.ends_with(&format!(
                "\"event\": \"TEST_EVENT\", \"data\": {{\"n\": {n}}}}}"
            )),
            "{l}"
        );
    }
    // Emitted from outside any command, without data.
    events.emit("STOP", None);
    for m in [&mut a, &mut b] {
        let v = m.json().await;
        assert_eq!(v["event"], "STOP");
        assert!(v.get("data").is_none());
    }
    // The unnegotiated monitor got nothing; after negotiating it gets new ones.
    assert_eq!(c.line(Duration::from_millis(200)).await, None);
    c.send("{\"execute\":\"qmp_capabilities\"}\n").await;
    assert_eq!(c.line(T).await.unwrap(), r#"{"return": {}}"#);
    events.emit("RESUME", None);
    assert_eq!(c.json().await["event"], "RESUME");
    assert_eq!(a.json().await["event"], "RESUME");
    server.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn negotiation_reply_comes_before_any_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, events) = start_server(&path, test_greeting()).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (events, stop) = (events.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                events.emit("TICK", None);
                tokio::task::yield_now().await;
            }
        })
    };
    for _ in 0..50 {
        let mut m = Raw::connect(&path).await;
        assert_eq!(m.line(T).await.unwrap(), GREETING);
        m.send("{\"execute\":\"qmp_capabilities\"}\n").await;
        assert_eq!(m.line(T).await.unwrap(), r#"{"return": {}}"#);
        assert!(m.line(T).await.unwrap().contains("\"TICK\""));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.await.unwrap();
    server.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_monitor_that_stops_reading_is_dropped_not_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let events = EventBus::with_backlog(16);
    let d = Arc::new(TestDispatcher {
        greeting: test_greeting(),
        events: events.clone(),
    });
    let server = QmpServer::bind(&path, test_greeting(), d, events.clone())
        .await
        .unwrap();
    let mut idle = negotiated(&path).await;
    let mut live = negotiated(&path).await;
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let l = live.line(T).await.expect("live monitor lost");
            if l.contains("\"FLOOD_END\"") {
                return (live, n);
            }
            n += 1;
            count_tx.send_replace(n);
        }
    });
    const TOTAL: u64 = 5000;
    let payload = json!({ "pad": "x".repeat(1000) });
    let mut sent = 0;
    while sent < TOTAL {
        // Batches smaller than the backlog, paced by the live reader, so
        // only the monitor that does not read falls behind.
        for _ in 0..8 {
            events.emit("FLOOD", Some(payload.clone()));
        }
        sent += 8;
        tokio::time::timeout(T, count_rx.wait_for(|&n| n >= sent))
            .await
            .expect("live monitor stalled")
            .unwrap();
    }
    events.emit("FLOOD_END", None);
    let (mut live, n) = reader.await.unwrap();
    assert_eq!(n, sent);
    // The idle monitor is disconnected once it lags; reading now drains
    // what the socket buffered and then hits EOF.
    let mut got = 0;
    while idle.line(Duration::from_secs(10)).await.is_some() {
        got += 1;
    }
    assert!(got < sent, "idle monitor received everything ({got})");
    live.send("{\"execute\":\"add\",\"arguments\":{\"a\":5}}\n")
        .await;
    assert_eq!(live.line(T).await.unwrap(), r#"{"return": 5}"#);
    server.close().await;
}

#[tokio::test]
async fn socket_file_mode_stale_and_live() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let (server, _ev) = start_server(&path, test_greeting()).await;
    let md = std::fs::symlink_metadata(&path).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    // A live socket is not stolen.
    let err = QmpServer::bind(
        &path,
        test_greeting(),
        Arc::new(TestDispatcher {
            greeting: test_greeting(),
            events: EventBus::new(),
        }),
        EventBus::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    // A monitor is disconnected by close(), and the file is removed.
    let mut m = negotiated(&path).await;
    server.close().await;
    assert!(!path.exists());
    assert_eq!(m.line(T).await, None);
    assert!(tokio::net::UnixStream::connect(&path).await.is_err());
    // A regular file is not removed.
    std::fs::write(&path, b"data").unwrap();
    let err = QmpServer::bind(
        &path,
        test_greeting(),
        Arc::new(TestDispatcher {
            greeting: test_greeting(),
            events: EventBus::new(),
        }),
        EventBus::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[tokio::test]
async fn oob_requests_overtake_a_running_command() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, _ev) = start_server(&path, test_greeting()).await;
    // With OOB enabled the exec-oob answer comes while `slow` runs.
    let mut m = Raw::connect(&path).await;
    m.line(T).await.unwrap();
    m.send("{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\n")
        .await;
    assert_eq!(m.line(T).await.unwrap(), r#"{"return": {}}"#);
    m.send("{\"execute\":\"slow\",\"arguments\":{\"ms\":500},\"id\":\"slow\"}\n{\"exec-oob\":\"query-version\",\"id\":1}\n{\"exec-oob\":\"nosuch\",\"id\":2}\n").await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"id": 1, "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}"#
    );
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"id": 2, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}"#
    );
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"return": {"slept": 500}, "id": "slow"}"#
    );
    m.send("{\"exec-oob\":\"query-version\",\"execute\":\"query-version\",\"id\":3}\n")
        .await;
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#
    );

    // Without OOB, requests are handled strictly in order.
    let mut m = negotiated(&path).await;
    m.send("{\"execute\":\"slow\",\"arguments\":{\"ms\":200},\"id\":\"slow\"}\n{\"exec-oob\":\"query-version\",\"id\":1}\n").await;
    assert_eq!(m.json().await["id"], "slow");
    assert_eq!(
        m.line(T).await.unwrap(),
        r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#
    );
    server.close().await;
}

#[tokio::test]
async fn a_panicking_command_is_an_error_reply() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, _ev) = start_server(&path, test_greeting()).await;
    let mut c = QmpClient::connect(&path).await.unwrap();
    let e = c.execute("panic", None).await.unwrap().unwrap_err();
    assert_eq!(e.class, ErrorClass::GenericError);
    assert_eq!(
        c.execute("add", Some(json!({"a": 1})))
            .await
            .unwrap()
            .unwrap(),
        json!(1)
    );
    server.close().await;
}

#[tokio::test]
async fn client_against_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, events) = start_server(&path, Greeting::new((1, 2, 3), "pkg")).await;
    let mut c = QmpClient::connect(&path).await.unwrap();
    assert_eq!(c.greeting()["QMP"]["version"]["qemu"]["minor"], 2);
    let v = c.execute("query-version", None).await.unwrap().unwrap();
    assert_eq!(
        v,
        json!({"qemu": {"major": 1, "minor": 2, "micro": 3}, "package": "pkg"})
    );
    let e = c.execute("nosuch", None).await.unwrap().unwrap_err();
    assert_eq!(e.class, ErrorClass::CommandNotFound);
    assert_eq!(e.desc, "The command nosuch has not been found");
    // Events that arrive while waiting for a reply are queued.
    let r = c
        .execute("emit", Some(json!({"name": "E", "count": 2})))
        .await
        .unwrap();
    assert_eq!(r.unwrap(), json!({}));
    assert_eq!(c.next_event(T).await.unwrap()["data"]["n"], 0);
    assert_eq!(c.next_event(T).await.unwrap()["data"]["n"], 1);
    assert!(c.next_event(Duration::from_millis(100)).await.is_none());
    events.emit("LATER", Some(json!({"x": 1})));
    assert_eq!(c.next_event(T).await.unwrap()["event"], "LATER");
    // A reply that arrives after its caller gave up is not mistaken for
    // the next one.
    let slow = c.execute("slow", Some(json!({"ms": 300})));
    assert!(tokio::time::timeout(Duration::from_millis(50), slow)
        .await
        .is_err());
    let r = c.execute("add", Some(json!({"a": 9}))).await.unwrap();
    assert_eq!(r.unwrap(), json!(9));
    // Raw text for tests.
    let v = c.execute_raw("garbage\n").await.unwrap();
    assert_eq!(
        v["error"]["desc"],
        "JSON parse error, invalid keyword 'garbage'"
    );
    server.close().await;
    assert!(c.execute("add", Some(json!({"a": 1}))).await.is_err());
}

#[tokio::test]
async fn unnegotiated_client_sees_the_negotiation_rule() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir, "qmp.sock");
    let (server, _ev) = start_server(&path, test_greeting()).await;
    let mut c = QmpClient::connect_unnegotiated(&path).await.unwrap();
    let e = c.execute("query-version", None).await.unwrap().unwrap_err();
    assert_eq!(e.class, ErrorClass::CommandNotFound);
    assert_eq!(
        e.desc,
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    let v: Value = c.execute("qmp_capabilities", None).await.unwrap().unwrap();
    assert_eq!(v, json!({}));
    server.close().await;
}
