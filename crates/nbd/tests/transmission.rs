//! Requests: data integrity, structured reads with holes, block status,
//! errors, pipelining, and bad input that must end only its own connection.

use std::sync::Arc;
use std::time::Duration;

use livesnap_nbd::client::{Negotiator, RawConn};
use livesnap_nbd::proto::*;
use livesnap_nbd::NbdClient;
use livesnap_testkit::nbd::*;

const MIB: u64 = 1 << 20;

async fn simple_client(addr: &str, export: &str) -> NbdClient {
    let mut n = Negotiator::connect(addr).await.unwrap();
    n.go(export, &[]).await.unwrap().unwrap();
    n.into_client().unwrap()
}

#[tokio::test]
async fn write_read_back_byte_for_byte() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 64 * MIB, true);
    for structured in [true, false] {
        let c = if structured {
            NbdClient::connect(&f.addr, "disk").await.unwrap()
        } else {
            simple_client(&f.addr, "disk").await
        };
        assert_eq!(c.structured(), structured);
        let cases: &[(u64, usize)] = &[
            (0, 4096),
            (4097, 1),
            (12345, 70_001),
            (MIB, MIB as usize),
            (3 * MIB - 7, 32 << 20),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = pattern(i as u64 + if structured { 100 } else { 0 }, len);
            c.write(off, &data, i % 2 == 0).await.unwrap();
            let back = c.read(off, len as u32).await.unwrap();
            assert!(
                back == data,
                "mismatch at {off}+{len} (structured {structured})"
            );
        }
        c.flush().await.unwrap();
        c.cache(0, 4096).await.unwrap();
        c.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn structured_read_uses_holes() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 8 * MIB, true);
    let c = NbdClient::connect(&f.addr, "disk").await.unwrap();
    let data = pattern(7, 64 * 1024);
    c.write(MIB, &data, false).await.unwrap();

    // Big read across hole, data, hole.
    let r = c
        .request(CMD_READ, 0, 0, 4 * MIB as u32, None)
        .await
        .unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(&r.data[MIB as usize..MIB as usize + data.len()], &data[..]);
    assert!(r.data[..MIB as usize].iter().all(|&b| b == 0));
    assert!(r.data[MIB as usize + data.len()..].iter().all(|&b| b == 0));
    let kinds: Vec<u16> = r.chunks.iter().map(|c| c.0).collect();
    assert_eq!(
        kinds,
        vec![
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE
        ]
    );
    assert_eq!(r.chunks[0].2..r.chunks[0].2 + r.chunks[0].3, 0..MIB);
    assert_eq!(r.chunks[1].2, MIB);
    assert_eq!(r.chunks[1].3, data.len() as u64);
    // Only the last chunk is final.
    let done: Vec<bool> = r
        .chunks
        .iter()
        .map(|c| c.1 & REPLY_FLAG_DONE != 0)
        .collect();
    assert_eq!(done, vec![false, false, true]);

    // A small read of a fully zero range is one hole.
    let r = c.request(CMD_READ, 0, 5 * MIB, 4096, None).await.unwrap();
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].0, REPLY_TYPE_OFFSET_HOLE);
    assert_eq!(r.data, vec![0; 4096]);
    // A big read of a fully zero range: holes only.
    let r = c
        .request(CMD_READ, 0, 4 * MIB, 4 * MIB as u32, None)
        .await
        .unwrap();
    assert!(r.chunks.iter().all(|c| c.0 == REPLY_TYPE_OFFSET_HOLE));

    // DF: exactly one data chunk covering everything.
    let r = c
        .request(CMD_READ, CMD_FLAG_DF, MIB - 4096, 65536 + 8192, None)
        .await
        .unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].0, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&r.data[4096..4096 + data.len()], &data[..]);

    // Zero-length read: a lone NONE chunk.
    let r = c.request(CMD_READ, 0, 0, 0, None).await.unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(r.chunks, vec![(REPLY_TYPE_NONE, REPLY_FLAG_DONE, 0, 0)]);
}

#[tokio::test]
async fn block_status_reports_allocation() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 8 * MIB, true);
    let c = NbdClient::connect(&f.addr, "disk").await.unwrap();
    c.write(2 * MIB, &pattern(3, MIB as usize), false)
        .await
        .unwrap();

    let ext = c.block_status(0, 8 * MIB as u32, false).await.unwrap();
    assert_eq!(
        ext,
        vec![
            (2 * MIB as u32, STATE_HOLE | STATE_ZERO),
            (MIB as u32, 0),
            (5 * MIB as u32, STATE_HOLE | STATE_ZERO)
        ]
    );
    let one = c.block_status(0, 8 * MIB as u32, true).await.unwrap();
    assert_eq!(one, vec![(2 * MIB as u32, STATE_HOLE | STATE_ZERO)]);
    // Length is never exceeded.
    let short = c.block_status(2 * MIB, 4096, false).await.unwrap();
    assert_eq!(short, vec![(4096, 0)]);

    // Trim and write-zeroes make holes again; NO_HOLE keeps allocation.
    c.trim(2 * MIB, MIB as u32).await.unwrap();
    assert_eq!(c.read(2 * MIB, 4096).await.unwrap(), vec![0; 4096]);
    c.write(2 * MIB, &pattern(4, MIB as usize), false)
        .await
        .unwrap();
    c.write_zeroes(2 * MIB, MIB as u32, CMD_FLAG_NO_HOLE)
        .await
        .unwrap();
    assert_eq!(
        c.read(2 * MIB, MIB as u32).await.unwrap(),
        vec![0; MIB as usize]
    );
    let ext = c.block_status(2 * MIB, MIB as u32, false).await.unwrap();
    assert_eq!(ext.iter().map(|e| e.0).sum::<u32>(), MIB as u32);
    c.write_zeroes(2 * MIB, MIB as u32, CMD_FLAG_FUA)
        .await
        .unwrap();
    let ext = c.block_status(2 * MIB, MIB as u32, false).await.unwrap();
    assert_eq!(ext, vec![(MIB as u32, STATE_HOLE | STATE_ZERO)]);

    let e = c.block_status(8 * MIB, 1, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));
    let e = c.block_status(0, 0, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));
}

const KIB: u64 = 1024;
const HZ: u32 = STATE_HOLE | STATE_ZERO;

/// A 4 MiB chain's map: data in layers 1 and 2, a zero cluster in layer 2
/// (allocated there, reads as zero), unallocated everywhere, then layer 3.
fn chain_map() -> Vec<DepthExtent> {
    let e = |end: u64, data: bool, zero: bool, depth: u32| DepthExtent {
        end,
        data,
        zero,
        depth,
    };
    vec![
        e(MIB, true, false, 1),
        e(3 * MIB / 2, true, false, 2),
        e(2 * MIB, false, true, 2),
        e(3 * MIB, false, true, 0),
        e(4 * MIB, true, false, 3),
    ]
}

/// Connects selecting `queries`, for an export called `name`.
async fn meta_client(f: &Fixture, name: &str, queries: &[&str]) -> NbdClient {
    NbdClient::connect_with_contexts(&f.addr, name, queries)
        .await
        .unwrap()
}

#[tokio::test]
async fn block_status_allocation_depth() {
    let f = Fixture::new(0).await;
    // Lookups answer at most 256 KiB, so extents are merged across lookups.
    f.add_depth_node("chain", depth_node(chain_map(), 256 * KIB, u64::MAX));
    let m = |n: u64| (n * MIB / 2) as u32;

    // qemu:allocation-depth alone: one chunk, its id, depths as flags.
    let c = meta_client(&f, "chain", &[META_ALLOCATION_DEPTH]).await;
    assert_eq!(c.base_allocation(), None);
    let depth_id = c.allocation_depth().unwrap();
    let all = c.block_status_all(0, m(8), false).await.unwrap();
    assert_eq!(
        all,
        vec![(depth_id, vec![(m(2), 1), (m(2), 2), (m(2), 0), (m(2), 3)])]
    );
    let r = c.request(CMD_BLOCK_STATUS, 0, 0, m(8), None).await.unwrap();
    assert_eq!(
        r.chunks,
        vec![(REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, 0, 0)]
    );
    assert_eq!(r.context_id, Some(depth_id));
    c.disconnect().await.unwrap();

    // Both: one chunk per context, base:allocation first, DONE on the last.
    let c = meta_client(&f, "chain", &[META_ALLOCATION_DEPTH, META_BASE_ALLOCATION]).await;
    let (base_id, depth_id) = (c.base_allocation().unwrap(), c.allocation_depth().unwrap());
    let r = c.request(CMD_BLOCK_STATUS, 0, 0, m(8), None).await.unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(
        r.chunks,
        vec![
            (REPLY_TYPE_BLOCK_STATUS, 0, 0, 0),
            (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, 0, 0)
        ]
    );
    assert_eq!(
        r.statuses,
        vec![
            (base_id, vec![(m(3), 0), (m(3), HZ), (m(2), 0)]),
            (depth_id, vec![(m(2), 1), (m(2), 2), (m(2), 0), (m(2), 3)]),
        ]
    );
    // The usual helpers pick their context.
    assert_eq!(
        c.block_status(0, m(8), false).await.unwrap(),
        vec![(m(3), 0), (m(3), HZ), (m(2), 0)]
    );
    assert_eq!(
        c.block_status_of(META_ALLOCATION_DEPTH, 0, m(8), false)
            .await
            .unwrap(),
        vec![(m(2), 1), (m(2), 2), (m(2), 0), (m(2), 3)]
    );

    // An unaligned range inside the map, ending before the export does.
    let all = c
        .block_status_all(MIB + 1000, MIB as u32, false)
        .await
        .unwrap();
    let rest = (MIB / 2 - 1000) as u32;
    assert_eq!(
        all,
        vec![
            (base_id, vec![(rest, 0), (MIB as u32 - rest, HZ)]),
            (
                depth_id,
                vec![(MIB as u32 / 2 + rest, 2), (MIB as u32 / 2 - rest, 0)]
            ),
        ]
    );

    // REQ_ONE: exactly one extent per context, never past the request.
    let all = c.block_status_all(MIB, m(4), true).await.unwrap();
    assert_eq!(
        all,
        vec![
            (base_id, vec![(m(1) / 2, 0)]),
            (depth_id, vec![(m(1) / 2, 2)])
        ]
    );
    let all = c.block_status_all(3 * MIB, 4096, true).await.unwrap();
    assert_eq!(
        all,
        vec![(base_id, vec![(4096, 0)]), (depth_id, vec![(4096, 3)])]
    );

    // Out of range and zero length are refused as before.
    let e = c.block_status_all(4 * MIB, 1, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));
    let e = c.block_status_all(0, 0, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn block_status_lookup_failures_with_two_contexts() {
    let f = Fixture::new(0).await;
    f.add_depth_node("chain", depth_node(chain_map(), 256 * KIB, 3 * MIB));
    let c = meta_client(&f, "chain", &[META_BASE_ALLOCATION, META_ALLOCATION_DEPTH]).await;
    let (base_id, depth_id) = (c.base_allocation().unwrap(), c.allocation_depth().unwrap());

    // A failure on the first lookup is the request's error: no status chunk at all.
    let r = c
        .request(CMD_BLOCK_STATUS, 0, 3 * MIB, 4096, None)
        .await
        .unwrap();
    assert_eq!(r.error, NBD_EIO);
    assert!(r.statuses.is_empty(), "{:?}", r.statuses);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].0, REPLY_TYPE_ERROR);
    assert_eq!(r.chunks[0].1, REPLY_FLAG_DONE);

    // A later failure shortens the answer, equally for both contexts.
    let all = c
        .block_status_all(2 * MIB, 2 * MIB as u32, false)
        .await
        .unwrap();
    assert_eq!(
        all,
        vec![
            (base_id, vec![(MIB as u32, HZ)]),
            (depth_id, vec![(MIB as u32, 0)])
        ]
    );
    // The connection is still fine.
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn block_status_depth_needs_structured_and_negotiation() {
    let f = Fixture::new(0).await;
    f.add_depth_node("chain", depth_node(chain_map(), 256 * KIB, u64::MAX));
    // Without structured replies no context can be selected: EINVAL.
    let c = simple_client(&f.addr, "chain").await;
    let e = c.block_status(0, 4096, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));
    // Structured, but SET selected nothing: EINVAL.
    let c = meta_client(&f, "chain", &["qemu:"]).await;
    assert!(c.meta_contexts().is_empty());
    let e = c.block_status(0, 4096, false).await.unwrap_err();
    assert_eq!(e.code(), Some(NBD_EINVAL));
}

#[tokio::test]
async fn pipelined_requests_complete_out_of_order() {
    let f = Fixture::new(0).await;
    let node = test_node(f.dir.path(), "slow.img", 4 * MIB, |child| TestDriver {
        child,
        slow_read: Duration::from_millis(300),
        fail_from: u64::MAX,
        fail_errno: 0,
        fast_zero_errno: None,
    });
    f.add_node("slow", node, true, None);
    let c = NbdClient::connect(&f.addr, "slow").await.unwrap();
    c.write(MIB, &pattern(9, 4096), false).await.unwrap();
    c.write(0, &pattern(8, 4096), false).await.unwrap();

    let slow = c.submit(CMD_READ, 0, 0, 4096, None).await.unwrap();
    let mut fast = Vec::new();
    for i in 0..20u64 {
        let data = pattern(100 + i, 4096);
        fast.push(
            c.submit(CMD_WRITE, 0, 2 * MIB + i * 4096, 4096, Some(&data))
                .await
                .unwrap(),
        );
        fast.push(c.submit(CMD_READ, 0, MIB, 4096, None).await.unwrap());
    }
    let slow_cookie = slow.cookie();
    for p in fast {
        let r = p.wait().await.unwrap();
        assert_eq!(r.error, 0);
        if !r.data.is_empty() {
            assert_eq!(r.data, pattern(9, 4096));
        }
    }
    let r = slow.wait().await.unwrap();
    assert_eq!(r.data, pattern(8, 4096));
    let order = c.reply_order();
    assert_eq!(
        order.last(),
        Some(&slow_cookie),
        "slow read should finish last: {order:?}"
    );
    for i in 0..20u64 {
        assert_eq!(
            c.read(2 * MIB + i * 4096, 4096).await.unwrap(),
            pattern(100 + i, 4096)
        );
    }
}

#[tokio::test]
async fn many_in_flight_requests_on_one_connection() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 64 * MIB, true);
    let c = Arc::new(NbdClient::connect(&f.addr, "disk").await.unwrap());
    // More than the server's in-flight limit, to exercise back-pressure.
    let mut pend = Vec::new();
    for i in 0..300u64 {
        let data = pattern(i, 65536);
        pend.push(
            c.submit(CMD_WRITE, 0, i * 65536, 65536, Some(&data))
                .await
                .unwrap(),
        );
    }
    for p in pend {
        assert_eq!(p.wait().await.unwrap().error, 0);
    }
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            assert_eq!(
                c.read(i * 65536, 65536).await.unwrap(),
                pattern(i, 65536),
                "block {i}"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let f = Fixture::new(0).await;
    let node = f.add_file_export("rw", 4 * MIB, true);
    f.add_node("ro", node, false, None);
    let rw = NbdClient::connect(&f.addr, "rw").await.unwrap();
    rw.write(0, &[5; 4096], false).await.unwrap();

    let c = NbdClient::connect(&f.addr, "ro").await.unwrap();
    assert_ne!(c.info().flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        c.write(0, &[1; 4096], false).await.unwrap_err().code(),
        Some(NBD_EPERM)
    );
    assert_eq!(c.trim(0, 4096).await.unwrap_err().code(), Some(NBD_EPERM));
    assert_eq!(
        c.write_zeroes(0, 4096, 0).await.unwrap_err().code(),
        Some(NBD_EPERM)
    );
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![5; 4096]);
    c.flush().await.unwrap();

    // Same over simple replies.
    let s = simple_client(&f.addr, "ro").await;
    assert_eq!(
        s.write(0, &[1; 10], false).await.unwrap_err().code(),
        Some(NBD_EPERM)
    );
    assert_eq!(s.read(0, 10).await.unwrap(), vec![5; 10]);
}

#[tokio::test]
async fn invalid_requests_get_errors() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 4 * MIB, true);
    for structured in [true, false] {
        let c = if structured {
            NbdClient::connect(&f.addr, "disk").await.unwrap()
        } else {
            simple_client(&f.addr, "disk").await
        };
        let end = 4 * MIB;
        assert_eq!(
            c.read(end - 10, 11).await.unwrap_err().code(),
            Some(NBD_EINVAL)
        );
        assert_eq!(
            c.read(u64::MAX - 1, 4).await.unwrap_err().code(),
            Some(NBD_EINVAL)
        );
        assert_eq!(c.trim(end, 1).await.unwrap_err().code(), Some(NBD_EINVAL));
        assert_eq!(c.cache(end, 1).await.unwrap_err().code(), Some(NBD_EINVAL));
        // Writes past the end are ENOSPC per the spec (as QEMU answers).
        assert_eq!(
            c.write(end - 1, &[1, 2], false).await.unwrap_err().code(),
            Some(NBD_ENOSPC)
        );
        assert_eq!(
            c.write_zeroes(end, 512, 0).await.unwrap_err().code(),
            Some(NBD_ENOSPC)
        );
        // Oversized read.
        let r = c
            .request(CMD_READ, 0, 0, (32 << 20) + 1, None)
            .await
            .unwrap();
        assert_eq!(r.error, NBD_EINVAL);
        assert!(r.data.iter().all(|&b| b == 0));
        // Unknown command, unknown flag, flag not valid for the command.
        assert_eq!(
            c.request(42, 0, 0, 0, None).await.unwrap().error,
            NBD_EINVAL
        );
        assert_eq!(
            c.request(CMD_FLUSH, 1 << 9, 0, 0, None)
                .await
                .unwrap()
                .error,
            NBD_EINVAL
        );
        assert_eq!(
            c.request(CMD_WRITE_ZEROES, CMD_FLAG_REQ_ONE, 0, 512, None)
                .await
                .unwrap()
                .error,
            NBD_EINVAL
        );
        let bs = c.request(CMD_BLOCK_STATUS, 0, 0, 512, None).await.unwrap();
        if !structured {
            // No meta context: EINVAL.
            assert_eq!(bs.error, NBD_EINVAL);
        }
        // Structured error replies carry a message.
        if structured {
            let r = c.request(CMD_READ, 0, end, 1, None).await.unwrap();
            assert!(r.message.as_deref().is_some_and(|m| !m.is_empty()));
            assert_eq!(r.chunks.len(), 1);
            assert_eq!(r.chunks[0].0, REPLY_TYPE_ERROR);
        }
        // Still usable afterwards.
        c.write(0, b"ok", false).await.unwrap();
        assert_eq!(c.read(0, 2).await.unwrap(), b"ok");
    }
}

#[tokio::test]
async fn oversized_write_gets_einval_then_close() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 4 * MIB, true);
    let c = NbdClient::connect(&f.addr, "disk").await.unwrap();
    // Header only: the server must not wait for (or allocate) 64 MiB of payload.
    let p = c.submit(CMD_WRITE, 0, 0, 64 << 20, None).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), p.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.error, NBD_EINVAL);
    let again = c.request(CMD_FLUSH, 0, 0, 0, None).await;
    assert!(
        again.is_err(),
        "connection should be closed after an oversized write"
    );
}

#[tokio::test]
async fn backend_errors_are_passed_through() {
    let f = Fixture::new(0).await;
    for (name, errno, expect) in [
        ("nospc", libc::ENOSPC, NBD_ENOSPC),
        ("eio", libc::EIO, NBD_EIO),
        ("eperm", libc::EPERM, NBD_EPERM),
        ("edquot", libc::EDQUOT, NBD_ENOSPC),
        ("enoent", libc::ENOENT, NBD_EIO),
        ("eoverflow", libc::EOVERFLOW, NBD_EOVERFLOW),
    ] {
        let node = test_node(f.dir.path(), name, 4 * MIB, |child| TestDriver {
            child,
            slow_read: Duration::ZERO,
            fail_from: 2 * MIB,
            fail_errno: errno,
            fast_zero_errno: Some(libc::EOPNOTSUPP),
        });
        f.add_node(name, node, true, None);
        for structured in [true, false] {
            let c = if structured {
                NbdClient::connect(&f.addr, name).await.unwrap()
            } else {
                simple_client(&f.addr, name).await
            };
            c.write(0, &[1; 4096], false).await.unwrap();
            let e = c.write(2 * MIB, &[1; 4096], false).await.unwrap_err();
            assert_eq!(e.code(), Some(expect), "{name}");
            let e = c.write_zeroes(3 * MIB, 4096, 0).await.unwrap_err();
            assert_eq!(e.code(), Some(expect), "{name}");
            let e = c
                .write_zeroes(0, 4096, CMD_FLAG_FAST_ZERO)
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(NBD_ENOTSUP), "{name} fast zero");
            c.write_zeroes(0, 4096, 0).await.unwrap();
        }
    }
}

async fn assert_other_client_works(addr: &str) {
    let c = NbdClient::connect(addr, "disk").await.unwrap();
    c.write(MIB, &pattern(77, 8192), false).await.unwrap();
    assert_eq!(c.read(MIB, 8192).await.unwrap(), pattern(77, 8192));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 4 * MIB, true);
    let bystander = NbdClient::connect(&f.addr, "disk").await.unwrap();
    bystander.write(0, &pattern(1, 4096), false).await.unwrap();

    let attach = |addr: String| async move {
        let mut n = Negotiator::connect(&addr).await.unwrap();
        n.structured_reply().await.unwrap().unwrap();
        n.go("disk", &[]).await.unwrap().unwrap();
        n.into_raw()
    };

    // Bad request magic.
    let mut raw: RawConn = attach(f.addr.clone()).await;
    let mut req = Request {
        flags: 0,
        typ: CMD_READ,
        cookie: 1,
        offset: 0,
        len: 512,
    }
    .encode();
    req[0] = 0xde;
    raw.send(&req).await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // Extended-header magic is not negotiated: also a bad magic.
    let mut raw = attach(f.addr.clone()).await;
    let mut req = [0u8; 32];
    req[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    raw.send(&req).await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // Truncated header, then EOF.
    let mut raw = attach(f.addr.clone()).await;
    let req = Request {
        flags: 0,
        typ: CMD_READ,
        cookie: 1,
        offset: 0,
        len: 512,
    }
    .encode();
    raw.send(&req[..13]).await.unwrap();
    raw.shutdown_write().await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // Truncated write payload, then EOF.
    let mut raw = attach(f.addr.clone()).await;
    let req = Request {
        flags: 0,
        typ: CMD_WRITE,
        cookie: 1,
        offset: 0,
        len: 4096,
    }
    .encode();
    raw.send(&req).await.unwrap();
    raw.send(&[0xee; 100]).await.unwrap();
    raw.shutdown_write().await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // Garbage right after the greeting.
    let mut raw = RawConn::connect(&f.addr).await.unwrap();
    raw.send(&[0xff; 64]).await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // The truncated write must not have reached the disk, and others carry on.
    assert_eq!(bystander.read(0, 4096).await.unwrap(), pattern(1, 4096));
    assert_other_client_works(&f.addr).await;
    bystander.disconnect().await.unwrap();
}

#[tokio::test]
async fn disc_finishes_in_flight_requests() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 16 * MIB, true);
    let c = NbdClient::connect(&f.addr, "disk").await.unwrap();
    let mut pend = Vec::new();
    for i in 0..16u64 {
        let data = pattern(200 + i, MIB as usize);
        pend.push(
            c.submit(CMD_WRITE, 0, i * MIB, MIB as u32, Some(&data))
                .await
                .unwrap(),
        );
    }
    // DISC right behind the writes: every write still gets its reply.
    let waiter = tokio::spawn(async move {
        let mut errs = Vec::new();
        for p in pend {
            errs.push(p.wait().await.map(|r| r.error));
        }
        errs
    });
    c.disconnect().await.unwrap();
    for r in waiter.await.unwrap() {
        assert_eq!(r.unwrap(), 0);
    }
    let c = NbdClient::connect(&f.addr, "disk").await.unwrap();
    for i in 0..16u64 {
        assert!(c.read(i * MIB, MIB as u32).await.unwrap() == pattern(200 + i, MIB as usize));
    }
}

#[tokio::test]
async fn random_requests_never_hurt_the_server() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 4 * MIB, true);
    let c = NbdClient::connect(&f.addr, "disk").await.unwrap();
    let r = pattern(4242, 8 * 1000);
    let word = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
    let types = [
        CMD_READ,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_CACHE,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
        CMD_RESIZE,
        9,
        0x7fff,
        0xffff,
    ];
    for i in 0..1000 {
        let w = word(i);
        let typ = types[(w % types.len() as u64) as usize];
        let flags = (w >> 8) as u16;
        let offset = match (w >> 24) % 4 {
            0 => 0,
            1 => (w >> 32) % (4 * MIB),
            2 => 4 * MIB - (w >> 40) % 8192,
            _ => w,
        };
        let mut len = (w >> 28) as u32;
        if typ == CMD_READ {
            len %= 40 << 20;
        }
        let reply = c.request(typ, flags, offset, len, None).await.unwrap();
        if typ > CMD_BLOCK_STATUS {
            assert_eq!(reply.error, NBD_EINVAL);
        }
    }
    c.write(0, b"alive", false).await.unwrap();
    assert_eq!(c.read(0, 5).await.unwrap(), b"alive");
}

#[tokio::test]
async fn block_status_dirty_bitmaps() {
    const K64: u32 = 64 * 1024;
    let f = Fixture::new(0).await;
    let node = open_node(&sparse_file(f.dir.path().join("b.img"), 8 * MIB), false);
    let (a, b) = (
        TestBitmap::new(8 * MIB, 65536),
        TestBitmap::new(4 * MIB, 4096),
    );
    a.set(70000, 100);
    a.set(MIB, 3 * 65536);
    b.set(0, 1);
    f.add_bitmap_node("bm", node, true, &[("a", a.clone()), ("b", b)]);
    let (ca, cb) = ("qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b");
    let c = meta_client(&f, "bm", &[cb, META_BASE_ALLOCATION, ca]).await;
    let (base, ida, idb) = (
        c.base_allocation().unwrap(),
        c.context_id(ca).unwrap(),
        c.context_id(cb).unwrap(),
    );
    let m = |n: u64| (n * MIB) as u32;
    // One chunk per context: base:allocation, then the bitmaps in the
    // export's order; NBD_STATE_DIRTY on dirty extents only.
    let r = c.request(CMD_BLOCK_STATUS, 0, 0, m(8), None).await.unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(
        r.statuses,
        vec![
            (base, vec![(m(8), HZ)]),
            (
                ida,
                vec![
                    (K64, 0),
                    (K64, STATE_DIRTY),
                    (m(1) - 2 * K64, 0),
                    (3 * K64, STATE_DIRTY),
                    (m(7) - 3 * K64, 0),
                ]
            ),
            // Past the end of a smaller bitmap: clean.
            (idb, vec![(4096, STATE_DIRTY), (m(8) - 4096, 0)]),
        ]
    );
    assert_eq!(r.chunks.last().unwrap().1, REPLY_FLAG_DONE);
    // REQ_ONE: one extent per context; a request inside a chunk stays inside.
    let one = c.block_status_of(ca, 70000, m(1), true).await.unwrap();
    assert_eq!(one, vec![(2 * K64 - 70000, STATE_DIRTY)]);
    let inside = c.block_status_of(ca, MIB + 10, 100, false).await.unwrap();
    assert_eq!(inside, vec![(100, STATE_DIRTY)]);
    // The bitmap is read at each request: what is set now shows now.
    a.set(7 * MIB, 1);
    let tail = c.block_status_of(ca, 7 * MIB, m(1), false).await.unwrap();
    assert_eq!(tail, vec![(K64, STATE_DIRTY), (m(1) - K64, 0)]);
    c.disconnect().await.unwrap();

    // Only a bitmap negotiated: one chunk, the bitmap's.
    let c = meta_client(&f, "bm", &[cb]).await;
    let all = c.block_status_all(0, 8192, false).await.unwrap();
    assert_eq!(all, vec![(idb, vec![(4096, STATE_DIRTY), (4096, 0)])]);
    c.disconnect().await.unwrap();
}

/// One extended reply chunk: (flags, type, cookie, offset, payload).
async fn ext_chunk(raw: &mut RawConn) -> (u16, u16, u64, u64, Vec<u8>) {
    let h = tokio::time::timeout(Duration::from_secs(10), raw.recv_exact(EXTENDED_REPLY_LEN))
        .await
        .expect("no extended reply within 10 s")
        .unwrap();
    assert_eq!(be32(&h, 0), EXTENDED_REPLY_MAGIC, "reply header {h:?}");
    let len = be64(&h, 24) as usize;
    let payload = raw.recv_exact(len).await.unwrap();
    (be16(&h, 4), be16(&h, 6), be64(&h, 8), be64(&h, 16), payload)
}

fn ext_request(typ: u16, flags: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    Request {
        flags,
        typ,
        cookie,
        offset,
        len,
    }
    .encode_extended()
    .to_vec()
}

#[tokio::test]
async fn extended_headers_exchange() {
    let f = Fixture::new(0).await;
    f.add_file_export("disk", 8 * MIB, true);
    for with_meta in [true, false] {
        let mut n = Negotiator::connect(&f.addr).await.unwrap();
        let r = n.option(OPT_EXTENDED_HEADERS, &[]).await.unwrap();
        assert_eq!(r[0].reply_type, REP_ACK);
        // Extended headers take precedence over structured replies.
        let r = n.option(OPT_STRUCTURED_REPLY, &[]).await.unwrap();
        assert_eq!(r[0].reply_type, REP_ERR_EXT_HEADER_REQD);
        if with_meta {
            n.set_meta_context("disk", &[META_BASE_ALLOCATION])
                .await
                .unwrap()
                .unwrap();
        }
        let info = n.go("disk", &[]).await.unwrap().unwrap();
        assert_ne!(info.flags & FLAG_SEND_DF, 0);
        // The payload form of BLOCK_STATUS is offered only with a context.
        assert_eq!(info.flags & FLAG_BLOCK_STATUS_PAYLOAD != 0, with_meta);
        let mut raw = n.into_raw();

        // A write carries its payload with the flag; its reply is a chunk, never simple.
        let data = pattern(7, 8192);
        let mut req = ext_request(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 1, MIB + 512, 8192);
        req.extend_from_slice(&data);
        raw.send(&req).await.unwrap();
        let (flags, typ, cookie, offset, p) = ext_chunk(&mut raw).await;
        assert_eq!(
            (flags, typ, cookie, offset),
            (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, MIB + 512)
        );
        assert!(p.is_empty());

        // Read it back: data chunks echo the request's offset in the header.
        raw.send(&ext_request(CMD_READ, 0, 2, MIB, 16384))
            .await
            .unwrap();
        let mut got = vec![0u8; 16384];
        loop {
            let (flags, typ, cookie, offset, p) = ext_chunk(&mut raw).await;
            assert_eq!((cookie, offset), (2, MIB));
            match typ {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = (be64(&p, 0) - MIB) as usize;
                    got[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {}
                t => panic!("unexpected chunk type {t}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert_eq!(&got[512..512 + 8192], &data[..]);
        assert!(got[..512].iter().chain(&got[512 + 8192..]).all(|&b| b == 0));

        // Block status over the whole export, in 64-bit descriptors.
        raw.send(&ext_request(CMD_BLOCK_STATUS, 0, 3, 0, 8 * MIB))
            .await
            .unwrap();
        let (flags, typ, cookie, _, p) = ext_chunk(&mut raw).await;
        assert_eq!(cookie, 3);
        assert_ne!(flags & REPLY_FLAG_DONE, 0);
        if with_meta {
            assert_eq!(typ, REPLY_TYPE_BLOCK_STATUS_EXT);
            let count = be32(&p, 4) as usize;
            assert_eq!(p.len(), 8 + 16 * count);
            let total: u64 = (0..count).map(|i| be64(&p, 8 + 16 * i)).sum();
            assert_eq!(total, 8 * MIB);
            assert_eq!(be32(&p, 8 + 8), 0, "status high bits must be zero");
        } else {
            assert_eq!(typ, REPLY_TYPE_ERROR);
            assert_eq!(be32(&p, 0), NBD_EINVAL);
        }

        // BLOCK_STATUS with a payload naming context 1 and an effect length.
        // Without a context this is what makes qemu-storage-daemon 10.0.2
        // abort; here the payload is consumed, the request fails with
        // EINVAL, and the connection goes on.
        let mut req = ext_request(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 4, 0, 12);
        req.extend_from_slice(&(4096u64).to_be_bytes());
        req.extend_from_slice(&1u32.to_be_bytes());
        raw.send(&req).await.unwrap();
        let (flags, typ, cookie, _, p) = ext_chunk(&mut raw).await;
        assert_eq!((flags, cookie), (REPLY_FLAG_DONE, 4));
        if with_meta {
            assert_eq!(typ, REPLY_TYPE_BLOCK_STATUS_EXT);
            assert_eq!((be32(&p, 0), be32(&p, 4)), (1, 1));
            assert_eq!(be64(&p, 8), 4096, "the payload's effect length");
            // Contexts that were not negotiated, or named twice, are EINVAL.
            for ids in [&[9u32][..], &[1, 1], &[]] {
                let mut req = ext_request(
                    CMD_BLOCK_STATUS,
                    CMD_FLAG_PAYLOAD_LEN,
                    8,
                    0,
                    8 + 4 * ids.len() as u64,
                );
                req.extend_from_slice(&(4096u64).to_be_bytes());
                for id in ids {
                    req.extend_from_slice(&id.to_be_bytes());
                }
                raw.send(&req).await.unwrap();
                let (_, typ, cookie, _, p) = ext_chunk(&mut raw).await;
                assert_eq!(
                    (typ, cookie, be32(&p, 0)),
                    (REPLY_TYPE_ERROR, 8, NBD_EINVAL),
                    "{ids:?}"
                );
            }
        } else {
            assert_eq!(typ, REPLY_TYPE_ERROR);
            assert_eq!(be32(&p, 0), NBD_EINVAL);
        }
        // The same flag on a read: its payload is skipped too.
        let mut req = ext_request(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 5, 0, 100);
        req.extend_from_slice(&[0xab; 100]);
        raw.send(&req).await.unwrap();
        let (_, typ, cookie, _, p) = ext_chunk(&mut raw).await;
        assert_eq!(
            (typ, cookie, be32(&p, 0)),
            (REPLY_TYPE_ERROR, 5, NBD_EINVAL)
        );
        raw.send(&ext_request(CMD_FLUSH, 0, 6, 0, 0)).await.unwrap();
        let (flags, typ, cookie, _, _) = ext_chunk(&mut raw).await;
        assert_eq!((flags, typ, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 6));

        // A payload beyond the maximum cannot be skipped: an error, then close.
        let req = ext_request(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 7, 0, 1 << 40);
        raw.send(&req).await.unwrap();
        let (_, typ, cookie, _, p) = ext_chunk(&mut raw).await;
        assert_eq!(
            (typ, cookie, be32(&p, 0)),
            (REPLY_TYPE_ERROR, 7, NBD_EINVAL)
        );
        assert!(raw.closed_within(Duration::from_secs(5)).await);
    }

    // A compact header on an extended connection is a bad magic.
    let mut n = Negotiator::connect(&f.addr).await.unwrap();
    let r = n.option(OPT_EXTENDED_HEADERS, &[]).await.unwrap();
    assert_eq!(r[0].reply_type, REP_ACK);
    n.go("disk", &[]).await.unwrap().unwrap();
    let mut raw = n.into_raw();
    let compact = Request {
        flags: 0,
        typ: CMD_FLUSH,
        cookie: 1,
        offset: 0,
        len: 0,
    }
    .encode();
    raw.send(&compact).await.unwrap();
    raw.send(&[0u8; 4]).await.unwrap();
    assert!(raw.closed_within(Duration::from_secs(5)).await);
    assert_other_client_works(&f.addr).await;
}
