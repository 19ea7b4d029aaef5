//! Export registry and server life cycle: attach counts, removal, hard close,
//! connection limits, stop and graceful shutdown.

use std::time::Duration;

use livesnap_nbd::client::{Negotiator, RawConn};
use livesnap_nbd::proto::*;
use livesnap_nbd::{ExportConfig, ExportTable, ListenAddr, NbdClient, NbdServer};
use livesnap_testkit::nbd::*;

const MIB: u64 = 1 << 20;

async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn table_add_remove_list() {
    let dir = tempfile::tempdir().unwrap();
    let t = ExportTable::new();
    let node = open_node(&sparse_file(dir.path().join("a"), MIB), false);
    let cfg = |name: &str| ExportConfig {
        name: name.into(),
        description: None,
        backend: livesnap_block::BlockBackend::new(node.clone()),
        writable: true,
        allocation_depth: false,
        bitmaps: Vec::new(),
    };
    t.add(cfg("b")).unwrap();
    t.add(cfg("a")).unwrap();
    t.add(cfg("")).unwrap();
    let err = t.add(cfg("a")).err().unwrap();
    assert!(
        err.contains("'a'") && err.contains("already exists"),
        "{err}"
    );
    let names: Vec<String> = t.list().iter().map(|e| e.config().name.clone()).collect();
    assert_eq!(names, vec!["b", "a", ""]);
    assert!(t.get("").is_some());
    assert!(t.get("c").is_none());
    assert_eq!(
        t.remove("a").map(|e| e.config().name.clone()).as_deref(),
        Some("a")
    );
    assert!(t.remove("a").is_none());
    assert!(t.get("a").is_none());
    t.add(cfg("a")).unwrap();
}

#[tokio::test]
async fn connections_remove_and_close() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 4 * MIB, true);
    let export = f.table.get("disk").unwrap();
    assert_eq!(export.connections(), 0);
    // wait_closed resolves at once when nobody is attached.
    tokio::time::timeout(Duration::from_secs(1), export.wait_closed())
        .await
        .unwrap();

    let c1 = NbdClient::connect(&f.addr, "disk").await.unwrap();
    let c2 = NbdClient::connect(&f.addr, "disk").await.unwrap();
    // A client still negotiating does not count.
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    n.list().await.unwrap().unwrap();
    assert_eq!(export.connections(), 2);

    // Removal: new clients no longer find it, attached ones continue.
    let removed = f.table.remove("disk").unwrap();
    let e = n.go("disk", &[]).await.unwrap().unwrap_err();
    assert_eq!(e.reply_type, REP_ERR_UNKNOWN);
    c1.write(0, b"still here", false).await.unwrap();
    assert_eq!(c2.read(0, 10).await.unwrap(), b"still here");
    assert_eq!(removed.connections(), 2);

    // c2 leaves by itself; the count follows.
    c2.disconnect().await.unwrap();
    assert!(eventually(|| removed.connections() == 1).await);

    // Hard close drops the rest, and wait_closed returns.
    let waiter = {
        let removed = removed.clone();
        tokio::spawn(async move { removed.wait_closed().await })
    };
    removed.close_connections();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(removed.connections(), 0);
    assert!(c1.flush().await.is_err());
}

#[tokio::test]
async fn max_connections_refuses_extra_clients() {
    let f = Fixture::new(2).await;
    f.add_file_export("disk", MIB, true);
    let c1 = NbdClient::connect(&f.addr, "disk").await.unwrap();
    let mut n2 = Negotiator::connect(&f.addr).await.unwrap();
    // A third is told why it cannot have a connection, then closed.
    let mut n3 = Negotiator::connect(&f.addr).await.unwrap();
    let err = n3.go("disk", &[]).await.unwrap().unwrap_err();
    assert_eq!(err.reply_type, REP_ERR_POLICY);
    assert!(
        err.message
            .contains("limit of 2 connections (max-connections)"),
        "{}",
        err.message
    );
    let mut raw = n3.into_raw();
    assert!(raw.closed_within(Duration::from_secs(5)).await);
    n2.go("disk", &[]).await.unwrap().unwrap();
    let c2 = n2.into_client().unwrap();
    c2.disconnect().await.unwrap();
    // A slot is free again.
    assert!(
        eventually(|| f.server.as_ref().unwrap().connections() == 1).await,
        "connection count should drop after DISC"
    );
    let c3 = NbdClient::connect(&f.addr, "disk").await.unwrap();
    c3.flush().await.unwrap();
    c1.flush().await.unwrap();
}

#[tokio::test]
async fn stop_closes_everything_and_removes_socket() {
    let mut f = Fixture::new(0).await;
    f.add_file_export("disk", MIB, true);
    let c = NbdClient::connect(&f.addr, "disk").await.unwrap();
    let export = f.table.get("disk").unwrap();
    assert_eq!(export.connections(), 1);
    let server = f.server.take().unwrap();
    assert!(f.sock.exists());
    server.stop().await;
    assert!(!f.sock.exists(), "socket file should be removed on stop");
    assert_eq!(export.connections(), 0);
    assert!(c.flush().await.is_err());
    assert!(RawConn::connect(&f.addr).await.is_err());

    // A stale socket file is replaced by the next start.
    let stale = std::os::unix::net::UnixListener::bind(&f.sock).unwrap();
    drop(stale);
    assert!(f.sock.exists());
    let s = NbdServer::start(&ListenAddr::Unix(f.sock.clone()), 0, f.table.clone())
        .await
        .unwrap();
    let c = NbdClient::connect(&f.addr, "disk").await.unwrap();
    c.flush().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn refuses_to_replace_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("not-a-socket");
    std::fs::write(&p, b"data").unwrap();
    let r = NbdServer::start(&ListenAddr::Unix(p.clone()), 0, ExportTable::new()).await;
    assert!(r.is_err());
    assert_eq!(std::fs::read(&p).unwrap(), b"data");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let mut f = Fixture::new(0).await;
    let node = test_node(f.dir.path(), "slow.img", 4 * MIB, |child| TestDriver {
        child,
        slow_read: Duration::from_millis(500),
        fail_from: u64::MAX,
        fail_errno: 0,
        fast_zero_errno: None,
    });
    f.add_node("slow", node, true, None);
    let c = NbdClient::connect(&f.addr, "slow").await.unwrap();
    c.write(0, &pattern(5, 4096), false).await.unwrap();
    let slow = c.submit(CMD_READ, 0, 0, 4096, None).await.unwrap();
    // A client still negotiating is simply dropped.
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    n.list().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let server = f.server.take().unwrap();
    let t0 = std::time::Instant::now();
    server.shutdown().await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    let r = slow.wait().await.unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(r.data, pattern(5, 4096));
    assert!(
        c.flush().await.is_err(),
        "connection should be closed after shutdown"
    );
    assert!(n.list().await.is_err());
    assert!(!f.sock.exists());
}

#[tokio::test]
async fn stop_abandons_in_flight_requests() {
    let mut f = Fixture::new(0).await;
    let node = test_node(f.dir.path(), "slow.img", 4 * MIB, |child| TestDriver {
        child,
        // Far longer than any stop: a stop that waited would show.
        slow_read: Duration::from_secs(60),
        fail_from: u64::MAX,
        fail_errno: 0,
        fast_zero_errno: None,
    });
    f.add_node("slow", node, true, None);
    let c = NbdClient::connect(&f.addr, "slow").await.unwrap();
    let slow = c.submit(CMD_READ, 0, 0, 4096, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), f.server.take().unwrap().stop())
        .await
        .expect("stop waited for the 60 s read");
    eprintln!("stop with a read in flight took {:?}", t0.elapsed());
    assert!(slow.wait().await.is_err());
}
