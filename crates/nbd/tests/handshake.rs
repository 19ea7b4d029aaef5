//! Negotiation: LIST, INFO, GO, EXPORT_NAME, meta contexts, and refusals.

use std::time::Duration;

use livesnap_nbd::client::{Negotiator, RawConn};
use livesnap_nbd::proto::*;
use livesnap_testkit::nbd::*;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn list_info_and_go() {
    let f = Fixture::new(0).await;
    let node = open_node(&sparse_file(f.dir.path().join("a.img"), 4 * MIB), false);
    f.add_node("disk", node, true, Some("the disk"));
    f.add_file_export("other", MIB, false);

    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    assert_eq!(n.server_flags(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let list = n.list().await.unwrap().unwrap();
    assert_eq!(
        list,
        vec![
            ("disk".to_string(), "the disk".to_string()),
            ("other".to_string(), String::new())
        ]
    );

    let info = n
        .info("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.size, 4 * MIB);
    assert_eq!(info.name.as_deref(), Some("disk"));
    assert_eq!(info.description.as_deref(), Some("the disk"));
    assert_eq!(info.block_size, Some((1, 4096, 32 << 20)));
    assert_ne!(info.flags & FLAG_HAS_FLAGS, 0);
    assert_eq!(info.flags & FLAG_READ_ONLY, 0);
    for f in [
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_FAST_ZERO,
        FLAG_SEND_CACHE,
    ] {
        assert_ne!(info.flags & f, 0, "flag {f:#x}");
    }
    // DF only once structured replies are negotiated.
    assert_eq!(info.flags & FLAG_SEND_DF, 0);

    let ro = n.info("other", &[]).await.unwrap().unwrap();
    assert_ne!(ro.flags & FLAG_READ_ONLY, 0);
    // As QEMU: nothing that changes data is offered read-only.
    for f in [FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, FLAG_SEND_FAST_ZERO] {
        assert_eq!(ro.flags & f, 0, "flag {f:#x} on a read-only export");
    }

    let err = n.go("nope", &[]).await.unwrap().unwrap_err();
    assert_eq!(err.reply_type, REP_ERR_UNKNOWN);
    assert!(err.message.contains("nope"), "{}", err.message);

    let r = n.option(99, b"whatever").await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply_type, REP_ERR_UNSUP);
    let r = n.option(OPT_EXTENDED_HEADERS, b"x").await.unwrap();
    assert_eq!(r[0].reply_type, REP_ERR_INVALID);
    let r = n.option(OPT_STARTTLS, &[]).await.unwrap();
    assert_eq!(r[0].reply_type, REP_ERR_POLICY);
    let r = n.option(OPT_LIST, b"x").await.unwrap();
    assert_eq!(r[0].reply_type, REP_ERR_INVALID);
    // GO whose name length overruns the option.
    let r = n.option(OPT_GO, &[0, 0, 1, 0, b'a', 0, 0]).await.unwrap();
    assert_eq!(r[0].reply_type, REP_ERR_INVALID);

    n.structured_reply().await.unwrap().unwrap();
    let again = n.structured_reply().await.unwrap().unwrap_err();
    assert_eq!(again.reply_type, REP_ERR_INVALID);

    // After all those refusals the same connection still gets in.
    let info = n.go("disk", &[]).await.unwrap().unwrap();
    assert_ne!(info.flags & FLAG_SEND_DF, 0);
    let c = n.into_client().unwrap();
    c.write(0, b"hello", false).await.unwrap();
    assert_eq!(c.read(0, 5).await.unwrap(), b"hello");
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn empty_name_is_only_an_export_named_empty() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", MIB, true);
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    let e = n.go("", &[]).await.unwrap().unwrap_err();
    assert_eq!(e.reply_type, REP_ERR_UNKNOWN);

    f.add_file_export("", 2 * MIB, true);
    let info = n.go("", &[]).await.unwrap().unwrap();
    assert_eq!(info.size, 2 * MIB);
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 3 * MIB, true);

    // Default client: fixed newstyle + no zeroes.
    let n = Negotiator::connect(&f.addr).await.unwrap();
    let c = n.export_name("disk").await.unwrap();
    assert_eq!(c.info().size, 3 * MIB);
    assert!(!c.structured());
    c.write(4096, &[9; 512], true).await.unwrap();
    assert_eq!(c.read(4096, 512).await.unwrap(), vec![9; 512]);
    c.disconnect().await.unwrap();

    // Old-style newstyle client: no flags at all; 124 zero bytes follow.
    let n = Negotiator::connect_with_flags(&f.addr, 0).await.unwrap();
    let c = n.export_name("disk").await.unwrap();
    assert_eq!(c.read(4096, 512).await.unwrap(), vec![9; 512]);
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn refusals_that_close_the_connection() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", MIB, true);

    // EXPORT_NAME of an unknown export cannot be answered: the server closes.
    let n = Negotiator::connect(&f.addr).await.unwrap();
    assert!(n.export_name("nope").await.is_err());

    // Unknown client flags.
    let mut raw = Negotiator::connect_with_flags(&f.addr, 0x80)
        .await
        .unwrap()
        .into_raw();
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // A non-fixed-newstyle client may only send EXPORT_NAME.
    let mut n = Negotiator::connect_with_flags(&f.addr, 0).await.unwrap();
    assert!(n.option(OPT_LIST, &[]).await.is_err());

    // Bad option magic.
    let mut raw = Negotiator::connect(&f.addr).await.unwrap().into_raw();
    raw.send(&[0u8; 16]).await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // Huge option: closed without the server trying to read or allocate it.
    let mut raw = Negotiator::connect(&f.addr).await.unwrap().into_raw();
    raw.send(&encode_option_header(OPT_GO, 0xffff_fff0))
        .await
        .unwrap();
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // ABORT is acknowledged, then the server closes.
    let n = Negotiator::connect(&f.addr).await.unwrap();
    let r = n.abort().await.unwrap();
    assert_eq!(r.map(|r| r.reply_type), Some(REP_ACK));

    // Nothing above disturbed the server.
    let c = livesnap_nbd::NbdClient::connect(&f.addr, "disk")
        .await
        .unwrap();
    c.flush().await.unwrap();
}

#[tokio::test]
async fn too_big_option_is_skipped() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", MIB, true);
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    let r = n
        .option(OPT_SET_META_CONTEXT, &vec![0u8; 200_000])
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply_type, REP_ERR_TOO_BIG);
    n.go("disk", &[]).await.unwrap().unwrap();
}

#[tokio::test]
async fn meta_contexts() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", MIB, true);
    let mut n = Negotiator::connect(&f.addr).await.unwrap();

    // Not before structured replies.
    let e = n.list_meta_context("disk", &[]).await.unwrap().unwrap_err();
    assert_eq!(e.reply_type, REP_ERR_INVALID);
    n.structured_reply().await.unwrap().unwrap();

    let all = n.list_meta_context("disk", &[]).await.unwrap().unwrap();
    assert_eq!(all, vec![(0, "base:allocation".to_string())]);
    let base = n
        .list_meta_context("disk", &["base:"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(base, vec![(0, "base:allocation".to_string())]);
    let none = n
        .list_meta_context("disk", &["qemu:dirty-bitmap:b0", "base:nothing"])
        .await
        .unwrap()
        .unwrap();
    assert!(none.is_empty());
    let e = n.list_meta_context("nope", &[]).await.unwrap().unwrap_err();
    assert_eq!(e.reply_type, REP_ERR_UNKNOWN);

    // SET ignores the wildcard form.
    let none = n
        .set_meta_context("disk", &["base:"])
        .await
        .unwrap()
        .unwrap();
    assert!(none.is_empty());
    let set = n
        .set_meta_context("disk", &["base:allocation"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set[0].1, "base:allocation");

    // Malformed: query count larger than the data.
    let r = n
        .option(
            OPT_SET_META_CONTEXT,
            &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0, 0, 9],
        )
        .await
        .unwrap();
    assert_eq!(r[0].reply_type, REP_ERR_INVALID);
    // ...and that failed SET cleared the selection (spec), so select again.
    n.set_meta_context("disk", &["base:allocation"])
        .await
        .unwrap()
        .unwrap();
    n.go("disk", &[]).await.unwrap().unwrap();
    let c = n.into_client().unwrap();
    let ext = c.block_status(0, MIB as u32, false).await.unwrap();
    assert_eq!(ext, vec![(MIB as u32, STATE_HOLE | STATE_ZERO)]);
}

#[tokio::test]
async fn meta_context_for_another_export_does_not_count() {
    let f = Fixture::new(0).await;
    f.add_file_export("a", MIB, true);
    f.add_file_export("b", MIB, true);
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    n.structured_reply().await.unwrap().unwrap();
    n.set_meta_context("a", &["base:allocation"])
        .await
        .unwrap()
        .unwrap();
    n.go("b", &[]).await.unwrap().unwrap();
    let c = n.into_client().unwrap();
    let e = c.block_status(0, 4096, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));
}

fn ctx(list: &[(u32, &str)]) -> Vec<(u32, String)> {
    list.iter().map(|(id, n)| (*id, n.to_string())).collect()
}

#[tokio::test]
async fn allocation_depth_context_only_where_enabled() {
    let f = Fixture::new(0).await;
    let depth = open_node(&sparse_file(f.dir.path().join("d.img"), MIB), true);
    f.add_depth_node("depth", depth);
    f.add_file_export("plain", MIB, false);
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    n.structured_reply().await.unwrap().unwrap();

    // LIST: every context with no query, namespace wildcards, full names;
    // ids are the reserved 0; always base:allocation first, as QEMU.
    let both = ctx(&[(0, META_BASE_ALLOCATION), (0, META_ALLOCATION_DEPTH)]);
    let depth_only = ctx(&[(0, META_ALLOCATION_DEPTH)]);
    for (queries, want) in [
        (&[][..], both.clone()),
        (&["qemu:"][..], depth_only.clone()),
        (&["qemu:allocation-depth"][..], depth_only.clone()),
        (&["qemu:", "base:"][..], both.clone()),
        (
            &["qemu:allocation-depth", "base:allocation"][..],
            both.clone(),
        ),
        (&["qemu:dirty-bitmap:", "qemu:allocation"][..], vec![]),
        (
            &["qemu:allocation-depth:x", "QEMU:allocation-depth"][..],
            vec![],
        ),
    ] {
        let got = n
            .list_meta_context("depth", queries)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, want, "LIST depth {queries:?}");
    }
    // An export without allocation-depth lists only base:allocation.
    for (queries, want) in [
        (&[][..], ctx(&[(0, META_BASE_ALLOCATION)])),
        (&["qemu:"][..], vec![]),
        (&["qemu:allocation-depth"][..], vec![]),
    ] {
        let got = n
            .list_meta_context("plain", queries)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, want, "LIST plain {queries:?}");
    }

    // SET: full names only; each context has its own id.
    let none = n
        .set_meta_context("depth", &["qemu:", "base:"])
        .await
        .unwrap()
        .unwrap();
    assert!(none.is_empty());
    let none = n
        .set_meta_context("plain", &["qemu:allocation-depth"])
        .await
        .unwrap()
        .unwrap();
    assert!(none.is_empty());
    let only = n
        .set_meta_context("depth", &["qemu:allocation-depth"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(only, ctx(&[(2, META_ALLOCATION_DEPTH)]));
    let set = n
        .set_meta_context(
            "depth",
            &["qemu:allocation-depth", "base:allocation", "qemu:"],
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        set,
        ctx(&[(1, META_BASE_ALLOCATION), (2, META_ALLOCATION_DEPTH)])
    );
    let (base_id, depth_id) = (set[0].0, set[1].0);
    assert_ne!(base_id, depth_id);
    n.go("depth", &[]).await.unwrap().unwrap();
    let c = n.into_client().unwrap();
    assert_eq!(c.base_allocation(), Some(base_id));
    assert_eq!(c.allocation_depth(), Some(depth_id));
    // A raw file node is its own whole chain: every byte at depth 1.
    let all = c.block_status_all(0, MIB as u32, false).await.unwrap();
    assert_eq!(
        all,
        vec![
            (base_id, vec![(MIB as u32, STATE_HOLE | STATE_ZERO)]),
            (depth_id, vec![(MIB as u32, 1)]),
        ]
    );
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn allocation_depth_needs_the_final_export() {
    let f = Fixture::new(0).await;
    let node = open_node(&sparse_file(f.dir.path().join("d.img"), MIB), true);
    f.add_depth_node("depth", node.clone());
    f.add_file_export("plain", MIB, false);

    // Negotiated for another export: no context counts.
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    n.structured_reply().await.unwrap().unwrap();
    n.set_meta_context("depth", &[META_ALLOCATION_DEPTH])
        .await
        .unwrap()
        .unwrap();
    n.go("plain", &[]).await.unwrap().unwrap();
    let c = n.into_client().unwrap();
    let e = c.block_status(0, 4096, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));

    // The export was replaced by one of the same name between SET and GO:
    // the selection belonged to the old export and does not count either.
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    n.structured_reply().await.unwrap().unwrap();
    n.set_meta_context("depth", &[META_ALLOCATION_DEPTH])
        .await
        .unwrap()
        .unwrap();
    f.table.remove("depth").unwrap();
    f.add_node("depth", node, false, None);
    n.go("depth", &[]).await.unwrap().unwrap();
    let c = n.into_client().unwrap();
    let e = c.block_status(0, 4096, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));
}

#[tokio::test]
async fn tcp_listener_reports_real_port() {
    let dir = tempfile::tempdir().unwrap();
    let table = livesnap_nbd::ExportTable::new();
    let server = livesnap_nbd::NbdServer::start(
        &livesnap_nbd::ListenAddr::Tcp {
            host: "127.0.0.1".into(),
            port: "0".into(),
        },
        0,
        table.clone(),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(!addr.ends_with(":0"), "{addr}");
    let node = open_node(&sparse_file(dir.path().join("t.img"), MIB), false);
    table
        .add(livesnap_nbd::ExportConfig {
            name: "t".into(),
            description: None,
            backend: livesnap_block::BlockBackend::new(node),
            writable: true,
            allocation_depth: false,
            bitmaps: Vec::new(),
        })
        .unwrap();
    let c = livesnap_nbd::NbdClient::connect(&addr, "t").await.unwrap();
    c.write(0, &pattern(1, 8192), false).await.unwrap();
    assert_eq!(c.read(0, 8192).await.unwrap(), pattern(1, 8192));
    c.disconnect().await.unwrap();
    server.stop().await;
    assert!(RawConn::connect(&addr).await.is_err());
}

#[tokio::test]
async fn dirty_bitmap_contexts_as_qemu_lists_and_selects_them() {
    let f = Fixture::new(0).await;
    let node = open_node(&sparse_file(f.dir.path().join("d.img"), MIB), true);
    let (a, b) = (TestBitmap::new(MIB, 65536), TestBitmap::new(MIB, 65536));
    // A name may be offered twice (qsd accepts `bitmaps: ["d", "d"]`).
    f.add_bitmap_node("bm", node, false, &[("a", a), ("b", b.clone()), ("b", b)]);
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    n.structured_reply().await.unwrap().unwrap();

    let (ca, cb) = ("qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b");
    let bitmaps = ctx(&[(0, ca), (0, cb), (0, cb)]);
    let mut everything = ctx(&[(0, META_BASE_ALLOCATION)]);
    everything.extend(bitmaps.clone());
    for (queries, want) in [
        (&[][..], everything.clone()),
        (&["qemu:"][..], bitmaps.clone()),
        (&["qemu:dirty-bitmap:"][..], bitmaps.clone()),
        (
            &["qemu:dirty-bitmap:b", "base:"][..],
            ctx(&[(0, META_BASE_ALLOCATION), (0, cb)]),
        ),
        (&["qemu:dirty-bitmap:a"][..], ctx(&[(0, ca)])),
        // No depth on this export; names match exactly.
        (
            &[
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:A",
                "qemu:dirty-bitmap:a:",
            ][..],
            vec![],
        ),
        (&["qemu:dirty-bitmap"][..], vec![]),
    ] {
        let got = n.list_meta_context("bm", queries).await.unwrap().unwrap();
        assert_eq!(got, want, "LIST {queries:?}");
    }

    // SET: full names only; each bitmap its own id, in the export's order
    // whatever the order of the queries; a repeated name selects the first.
    for wild in ["qemu:", "qemu:dirty-bitmap:"] {
        let none = n.set_meta_context("bm", &[wild]).await.unwrap().unwrap();
        assert!(none.is_empty(), "SET {wild}");
    }
    let set = n
        .set_meta_context("bm", &[cb, META_BASE_ALLOCATION, ca, cb])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(set, ctx(&[(1, META_BASE_ALLOCATION), (3, ca), (4, cb)]));
    n.go("bm", &[]).await.unwrap().unwrap();
    let c = n.into_client().unwrap();
    assert_eq!(c.context_id(cb), Some(4));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn extended_headers_option_rules() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", MIB, true);
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    let r = n.option(OPT_EXTENDED_HEADERS, &[]).await.unwrap();
    assert_eq!(r[0].reply_type, REP_ACK);
    let r = n.option(OPT_EXTENDED_HEADERS, &[]).await.unwrap();
    assert_eq!(r[0].reply_type, REP_ERR_INVALID, "negotiated twice");
    // INFO still answers, with DF offered (extended headers imply chunked reads).
    let info = n.info("disk", &[]).await.unwrap().unwrap();
    assert_ne!(info.flags & FLAG_SEND_DF, 0);
    // EXPORT_NAME cannot tell the client its headers are extended: closed.
    assert!(n.export_name("disk").await.is_err());
    // The server is unaffected.
    livesnap_nbd::NbdClient::connect(&f.addr, "disk")
        .await
        .unwrap()
        .flush()
        .await
        .unwrap();
}
