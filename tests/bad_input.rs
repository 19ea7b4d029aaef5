//! Bad input against a running livesnapd process. The NBD crate unit-tests
//! its parser in-process; here the point is that the whole daemon survives
//! and nothing is lost.
//!
//! Every test starts a daemon on a sparse image and a well-behaved NBD client
//! (the "good client") that writes known data and keeps its connection open.
//! Each bad input then comes on its own connection. After each one the daemon
//! must still run and the good client must still write and read back exactly
//! its data; at the end the daemon is stopped with SIGTERM (exit 0) and the
//! image file must hold exactly the good client's writes.

use livesnap_testkit as harness;

use std::future::Future;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use livesnap_nbd::proto::*;
use livesnap_nbd::{ClientError, NbdClient, Negotiator, RawConn};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Size of every test image.
const SIZE: u64 = 64 * MIB;
/// Bound on every single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

// ---- fixture ------------------------------------------------------------------

/// A daemon, the good client, and what the image must hold.
struct Fixture {
    rt: tokio::runtime::Runtime,
    d: Livesnapd,
    img_dir: tempfile::TempDir,
    image: PathBuf,
    /// NBD address of the daemon for `livesnap_nbd` ("unix:/path").
    addr: String,
    good: NbdClient,
    /// The image as the good client wrote it.
    model: Vec<u8>,
    /// (offset, length) of everything the good client wrote.
    regions: Vec<(u64, usize)>,
    checks: u64,
}

impl Fixture {
    /// Starts livesnapd on a fresh image; the good client writes data at the
    /// start, unaligned in the middle, and up to the very last byte.
    fn new() -> Fixture {
        let img_dir = tempfile::tempdir().unwrap();
        let image = img_dir.path().join("disk.img");
        sparse_file(&image, SIZE);
        let d = Livesnapd::with_image(&image, &[]);
        let addr = format!("unix:{}", d.dir.path().join("nbd.sock").display());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let good = bounded(
            &rt,
            "good client connect",
            NbdClient::connect(&addr, "disk"),
        )
        .unwrap_or_else(|e| panic!("good client cannot connect: {e}"));
        let mut f = Fixture {
            rt,
            d,
            img_dir,
            image,
            addr,
            good,
            model: vec![0; SIZE as usize],
            regions: Vec::new(),
            checks: 0,
        };
        f.good_write(0, &pattern(1, MIB as usize), false);
        f.good_write(5 * MIB + 123, &pattern(2, 4097), true);
        f.good_write(SIZE - 64 * 1024, &pattern(3, 64 * 1024), false);
        f.good_write(8 * MIB, &pattern(4, 64 * 1024), false);
        f.check("the initial writes");
        f
    }

    /// Runs `fut` on the fixture's runtime, bounded by WAIT.
    fn block<F: Future>(&self, what: &str, fut: F) -> F::Output {
        bounded(&self.rt, what, fut)
    }

    fn good_write(&mut self, offset: u64, data: &[u8], fua: bool) {
        let r = self.block("good write", self.good.write(offset, data, fua));
        r.unwrap_or_else(|e| panic!("good write at {offset}: {e}"));
        self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.regions.push((offset, data.len()));
    }

    /// After a bad input: the daemon runs, and the good connection still
    /// writes and reads back exactly what it wrote.
    fn check(&mut self, case: &str) {
        assert!(self.d.is_running(), "livesnapd exited after: {case}");
        self.checks += 1;
        let off = 32 * MIB + self.checks * 8192 + 7;
        let data = pattern(1000 + self.checks, 5000);
        let r = self.block(case, self.good.write(off, &data, false));
        r.unwrap_or_else(|e| panic!("after {case}: good client cannot write: {e}"));
        self.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        self.regions.push((off, data.len()));
        for &(off, len) in &self.regions {
            let got = self
                .block(case, self.good.read(off, len as u32))
                .unwrap_or_else(|e| panic!("after {case}: good client cannot read: {e}"));
            let want = &self.model[off as usize..off as usize + len];
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                panic!(
                    "after {case}: good client reads {} at byte {} instead of {}",
                    got[i],
                    off + i as u64,
                    want[i]
                );
            }
        }
    }

    /// Stops the daemon with SIGTERM and compares the image file with what
    /// the good client wrote.
    fn finish(self) {
        let Fixture {
            rt,
            d,
            img_dir,
            image,
            good,
            model,
            ..
        } = self;
        drop(good);
        let status = d.stop_with(libc::SIGTERM);
        assert!(status.success(), "SIGTERM must exit 0, got {status}");
        drop(rt);
        image_equals(&image, &model);
        drop(img_dir);
    }

    fn qmp(&self) -> RawQmp {
        let mut m = RawQmp::connect(&self.d.qmp_path);
        m.negotiate();
        m
    }
}

/// Runs a future to completion on `rt`, failing the test after WAIT.
fn bounded<F: Future>(rt: &tokio::runtime::Runtime, what: &str, fut: F) -> F::Output {
    rt.block_on(async {
        tokio::time::timeout(WAIT, fut)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
    })
}

fn image_equals(image: &Path, model: &[u8]) {
    let file = std::fs::read(image).unwrap();
    assert_eq!(file.len(), model.len(), "image size changed");
    if let Some(i) = file.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "image byte {i} is {:#x}, but the good client left {:#x} there",
            file[i], model[i]
        );
    }
}

// ---- NBD helpers ---------------------------------------------------------------

/// A connection that negotiated (optionally structured replies and
/// base:allocation) and entered transmission on export "disk".
async fn attached(addr: &str, structured: bool) -> Negotiator {
    let mut n = Negotiator::connect(addr).await.unwrap();
    if structured {
        n.structured_reply().await.unwrap().unwrap();
        n.set_meta_context("disk", &[META_BASE_ALLOCATION])
            .await
            .unwrap()
            .unwrap();
    }
    n.go("disk", &[]).await.unwrap().unwrap();
    n
}

/// The server must close the connection without sending anything more.
async fn expect_closed(raw: &mut RawConn, case: &str) {
    match tokio::time::timeout(WAIT, raw.recv_exact(1)).await {
        Err(_) => panic!("{case}: the server kept the connection open"),
        Ok(Ok(b)) => panic!("{case}: the server sent {b:?} instead of closing"),
        Ok(Err(e)) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ),
            "{case}: {e}"
        ),
    }
}

fn request(typ: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    Request {
        flags,
        typ,
        cookie,
        offset,
        len: len.into(),
    }
    .encode()
}

/// The NBD error of a request that must fail.
fn nbd_error<T: std::fmt::Debug>(r: Result<T, ClientError>, case: &str) -> u32 {
    match r {
        Err(ClientError::Nbd { code, .. }) => code,
        other => panic!("{case}: expected an NBD error reply, got {other:?}"),
    }
}

/// The request that makes qemu-storage-daemon 10.0.2 abort on an assertion
/// (docs/reliability.md): with extended headers and no metadata context,
/// BLOCK_STATUS with `NBD_CMD_FLAG_PAYLOAD_LEN`. livesnapd consumes the
/// payload, fails the request with EINVAL and keeps the connection.
#[test]
fn extended_block_status_payload_without_context_fails_cleanly() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let case = "extended BLOCK_STATUS with a payload and no context";
    f.block(case, async {
        let mut n = Negotiator::connect(&addr).await.unwrap();
        let r = n.option(OPT_EXTENDED_HEADERS, &[]).await.unwrap();
        assert_eq!(r[0].reply_type, REP_ACK, "{case}: extended headers refused");
        n.go("disk", &[]).await.unwrap().unwrap();
        let mut raw = n.into_raw();
        let ext = |typ, flags, cookie, len| {
            Request {
                flags,
                typ,
                cookie,
                offset: 0,
                len,
            }
            .encode_extended()
            .to_vec()
        };
        let mut req = ext(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 1, 12);
        req.extend_from_slice(&4096u64.to_be_bytes());
        req.extend_from_slice(&1u32.to_be_bytes());
        req.extend_from_slice(&ext(CMD_READ, 0, 2, 4096));
        raw.send(&req).await.unwrap();
        // NBD lets a server answer in any order: the cookies tell which is which.
        let mut seen = Vec::new();
        for _ in 0..2 {
            let h = raw.recv_exact(EXTENDED_REPLY_LEN).await.unwrap();
            let p = raw.recv_exact(be64(&h, 24) as usize).await.unwrap();
            assert_eq!(be32(&h, 0), EXTENDED_REPLY_MAGIC, "{case}");
            let cookie = be64(&h, 8);
            seen.push(cookie);
            if cookie == 1 {
                assert_eq!(be16(&h, 6), REPLY_TYPE_ERROR, "{case}");
                assert_eq!(be32(&p, 0), NBD_EINVAL, "{case}");
            } else {
                // The read after it is answered: the connection is in step.
                assert_eq!(be16(&h, 6), REPLY_TYPE_OFFSET_DATA, "{case}");
                assert_eq!(be16(&h, 4), REPLY_FLAG_DONE, "{case}");
                assert_eq!(p.len(), 8 + 4096, "{case}");
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, [1, 2], "{case}: one reply to each request");
    });
    f.check(case);
    f.finish();
}

// ---- NBD: memory bounds ---------------------------------------------------------

/// Clients that pipeline 32 MiB reads and never read a reply.
const SLOW_CLIENTS: usize = 6;
/// Reads each of them queues.
const SLOW_READS: u64 = 200;
/// What the daemon may grow to with them connected (docs/decisions.md:
/// 160 MiB of shared budget, the small lanes, and the daemon itself).
const RSS_BOUND_KIB: u64 = 256 << 10;

#[test]
fn clients_that_never_read_replies_cannot_grow_the_daemon_without_bound() {
    let mut f = Fixture::new();
    let pid = f.d.pid();
    let base = rss_kib(pid);
    let addr = f.addr.clone();
    let slow: Vec<RawConn> = f.block("slow clients", async {
        let mut v = Vec::new();
        for i in 0..SLOW_CLIENTS {
            let mut raw = attached(&addr, false).await.into_raw();
            let mut burst = Vec::new();
            for n in 0..SLOW_READS {
                let off = (n % 2) * 32 * MIB;
                burst.extend_from_slice(&request(CMD_READ, 0, n, off, 32 << 20));
            }
            raw.send(&burst)
                .await
                .unwrap_or_else(|e| panic!("slow client {i}: {e}"));
            v.push(raw);
        }
        v
    });
    // The daemon takes their requests and pins read buffers for them; wait
    // until at least four buffers' worth is held, so the bound is tested
    // with the pressure on.
    let loaded = base + 4 * 32 * 1024;
    let t0 = Instant::now();
    while rss_kib(pid) < loaded {
        assert!(
            t0.elapsed() < WAIT,
            "the slow clients never made the daemon hold their reads: \
             VmRSS {} KiB, expected at least {loaded} KiB",
            rss_kib(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A normal client keeps reading and writing its own data meanwhile.
    for i in 0..20 {
        f.check(&format!("round {i} beside {SLOW_CLIENTS} slow readers"));
    }
    let hwm = hwm_kib(pid);
    assert!(
        hwm < RSS_BOUND_KIB,
        "{SLOW_CLIENTS} clients queuing {SLOW_READS} reads of 32 MiB grew the daemon \
         to {hwm} KiB (VmHWM), over the bound of {RSS_BOUND_KIB} KiB (started at {base} KiB)"
    );
    drop(slow);
    // Their buffers go back to the kernel once they are gone.
    let back = base + 32 * 1024;
    let t0 = Instant::now();
    loop {
        f.check("after the slow clients left");
        let rss = rss_kib(pid);
        if rss < back {
            eprintln!("daemon VmRSS: {base} KiB before, peak {hwm} KiB, {rss} KiB after");
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "after the slow clients left the daemon still holds {rss} KiB \
             (VmRSS; {base} KiB before they came, peak {hwm} KiB)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    f.finish();
}

// ---- NBD: handshake --------------------------------------------------------------

#[test]
fn malformed_handshakes_end_only_their_own_connection() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();

    let case = "unknown client flags";
    f.block(case, async {
        let n = Negotiator::connect_with_flags(&addr, FLAG_C_FIXED_NEWSTYLE | 1 << 7)
            .await
            .unwrap();
        expect_closed(&mut n.into_raw(), case).await;
    });
    f.check(case);

    let case = "garbage instead of the option magic";
    f.block(case, async {
        let mut raw = Negotiator::connect(&addr).await.unwrap().into_raw();
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "option length of 4 GiB";
    f.block(case, async {
        let mut raw = Negotiator::connect(&addr).await.unwrap().into_raw();
        raw.send(&encode_option_header(OPT_GO, u32::MAX))
            .await
            .unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "EXPORT_NAME longer than any export name";
    f.block(case, async {
        let mut raw = Negotiator::connect(&addr).await.unwrap().into_raw();
        raw.send(&encode_option_header(OPT_EXPORT_NAME, 1 << 20))
            .await
            .unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "100 KiB option (skipped with ERR_TOO_BIG, then GO works)";
    f.block(case, async {
        let mut n = Negotiator::connect(&addr).await.unwrap();
        let r = n.option(OPT_GO, &vec![0xa5; 100 * 1024]).await.unwrap();
        assert_eq!(r.len(), 1, "{case}: {r:?}");
        assert_eq!(r[0].reply_type, REP_ERR_TOO_BIG, "{case}");
        n.go("disk", &[]).await.unwrap().unwrap();
        let c = n.into_client().unwrap();
        assert_eq!(
            c.read(0, 4096).await.unwrap(),
            pattern(1, MIB as usize)[..4096]
        );
    });
    f.check(case);

    let case = "option truncated by EOF";
    f.block(case, async {
        let mut raw = Negotiator::connect(&addr).await.unwrap().into_raw();
        raw.send(&encode_option_header(OPT_GO, 100)).await.unwrap();
        raw.send(&[0, 0, 0, 4, b'd', b'i']).await.unwrap();
        raw.shutdown_write().await.unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "EOF in the middle of the client flags";
    f.block(case, async {
        let mut raw = RawConn::connect(&addr).await.unwrap();
        raw.recv_exact(18).await.unwrap();
        raw.send(&[0, 0]).await.unwrap();
        raw.shutdown_write().await.unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "EOF in the middle of an option header";
    f.block(case, async {
        let mut raw = Negotiator::connect(&addr).await.unwrap().into_raw();
        raw.send(&IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
        raw.shutdown_write().await.unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "connect and hang up before the greeting is read";
    f.block(case, async {
        drop(RawConn::connect(&addr).await.unwrap());
    });
    f.check(case);

    let case = "option from a client without fixed newstyle";
    f.block(case, async {
        let mut raw = Negotiator::connect_with_flags(&addr, 0)
            .await
            .unwrap()
            .into_raw();
        raw.send(&encode_option_header(OPT_LIST, 0)).await.unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "unknown option, STARTTLS, malformed GO, then ABORT";
    f.block(case, async {
        let mut n = Negotiator::connect(&addr).await.unwrap();
        let r = n.option(0x4242, b"junk").await.unwrap();
        assert_eq!(r.last().unwrap().reply_type, REP_ERR_UNSUP, "{case}");
        let r = n.option(OPT_STARTTLS, &[]).await.unwrap();
        assert_eq!(r.last().unwrap().reply_type, REP_ERR_POLICY, "{case}");
        // Name length 1000 with 4 bytes of name.
        let r = n.option(OPT_GO, b"\0\0\x03\xe8disk").await.unwrap();
        assert_eq!(r.last().unwrap().reply_type, REP_ERR_INVALID, "{case}");
        let r = n.option(OPT_SET_META_CONTEXT, b"\0").await.unwrap();
        assert_eq!(r.last().unwrap().reply_type, REP_ERR_INVALID, "{case}");
        let ack = n.abort().await.unwrap();
        assert_eq!(ack.map(|r| r.reply_type), Some(REP_ACK), "{case}");
    });
    f.check(case);

    let case = "unknown export name";
    f.block(case, async {
        let mut n = Negotiator::connect(&addr).await.unwrap();
        let e = n.go("nope", &[]).await.unwrap().unwrap_err();
        assert_eq!(e.reply_type, REP_ERR_UNKNOWN, "{case}: {e:?}");
        assert!(e.message.contains("nope"), "{case}: {e:?}");
        let e = n.info("nope", &[]).await.unwrap().unwrap_err();
        assert_eq!(e.reply_type, REP_ERR_UNKNOWN, "{case}: {e:?}");
        // The connection goes on: the right name still works.
        n.go("disk", &[]).await.unwrap().unwrap();
        // EXPORT_NAME cannot fail politely: the server closes.
        let n = Negotiator::connect(&addr).await.unwrap();
        assert!(n.export_name("nope").await.is_err(), "{case}");
    });
    f.check(case);

    let case = "unknown export name, from nbdinfo and qemu-img";
    let url = format!(
        "nbd+unix:///nope?socket={}",
        f.d.dir.path().join("nbd.sock").display()
    );
    let (st, out, err) = run_within(Command::new("nbdinfo").arg(&url), WAIT);
    assert!(
        !st.success(),
        "nbdinfo on a missing export succeeded: {out}"
    );
    assert!(
        err.contains("server replied with error to opt_go request") && err.contains("export: nope"),
        "nbdinfo's message: {err}"
    );
    let (st, _, err) = run_within(Command::new("qemu-img").args(["info", &url]), WAIT);
    assert!(!st.success(), "qemu-img info on a missing export succeeded");
    assert!(
        err.contains("Requested export not available") && err.contains("export 'nope' not present"),
        "qemu-img's message: {err}"
    );
    f.check(case);

    f.finish();
}

// ---- NBD: transmission ---------------------------------------------------------------

#[test]
fn malformed_requests_end_or_fail_only_their_own_connection() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();

    for magic in [
        0u32,
        0xdead_beef,
        EXTENDED_REQUEST_MAGIC,
        SIMPLE_REPLY_MAGIC,
    ] {
        let case = format!("request magic {magic:#x}");
        f.block(&case, async {
            let mut raw = attached(&addr, true).await.into_raw();
            let mut req = request(CMD_READ, 0, 1, 0, 512);
            req[..4].copy_from_slice(&magic.to_be_bytes());
            raw.send(&req).await.unwrap();
            expect_closed(&mut raw, &case).await;
        });
        f.check(&case);
    }

    let case = "request header truncated by EOF";
    f.block(case, async {
        let mut raw = attached(&addr, true).await.into_raw();
        raw.send(&request(CMD_WRITE, 0, 1, 0, 512)[..11])
            .await
            .unwrap();
        raw.shutdown_write().await.unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "write payload truncated by EOF (over the good client's data)";
    f.block(case, async {
        let mut raw = attached(&addr, false).await.into_raw();
        raw.send(&request(CMD_WRITE, CMD_FLAG_FUA, 1, 8 * MIB, 64 * 1024))
            .await
            .unwrap();
        raw.send(&[0xee; 40_000]).await.unwrap();
        raw.shutdown_write().await.unwrap();
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "write larger than 32 MiB, simple replies";
    f.block(case, async {
        let mut raw = attached(&addr, false).await.into_raw();
        raw.send(&request(CMD_WRITE, 0, 77, 0, MAX_PAYLOAD + 1))
            .await
            .unwrap();
        let r = raw.recv_exact(SIMPLE_REPLY_LEN).await.unwrap();
        assert_eq!(be32(&r, 0), SIMPLE_REPLY_MAGIC, "{case}");
        assert_eq!(be32(&r, 4), NBD_EINVAL, "{case}");
        assert_eq!(be64(&r, 8), 77, "{case}");
        // Its payload cannot be skipped safely: the server stops reading.
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "write of 4 GiB - 1, structured replies";
    f.block(case, async {
        let mut raw = attached(&addr, true).await.into_raw();
        raw.send(&request(CMD_WRITE, 0, 78, 0, u32::MAX))
            .await
            .unwrap();
        let h = raw.recv_exact(CHUNK_HEADER_LEN).await.unwrap();
        let h = decode_chunk_header(h.as_slice().try_into().unwrap()).expect("chunk magic");
        assert_eq!(
            (h.typ, h.flags, h.cookie),
            (REPLY_TYPE_ERROR, REPLY_FLAG_DONE, 78),
            "{case}"
        );
        let p = raw.recv_exact(h.len as usize).await.unwrap();
        assert_eq!(be32(&p, 0), NBD_EINVAL, "{case}");
        expect_closed(&mut raw, case).await;
    });
    f.check(case);

    let case = "unknown command types and flags";
    let model = f.model.clone();
    f.block(case, async {
        let c = attached(&addr, true).await.into_client().unwrap();
        for typ in [CMD_RESIZE, 9, 0x42, 0xffff] {
            let r = c.request(typ, 0, 0, 4096, None).await.unwrap();
            assert_eq!(r.error, NBD_EINVAL, "{case}: command {typ}");
        }
        let r = c.request(CMD_READ, 0x8000, 0, 512, None).await.unwrap();
        assert_eq!(r.error, NBD_EINVAL, "{case}: read with flag 0x8000");
        // A write with a bad flag is refused after its payload was read, and
        // nothing of it lands.
        let junk = vec![0x5a; 4096];
        let r = c
            .request(CMD_WRITE, CMD_FLAG_REQ_ONE, 8 * MIB, 4096, Some(&junk))
            .await
            .unwrap();
        assert_eq!(r.error, NBD_EINVAL, "{case}: write with REQ_ONE");
        let r = c
            .request(CMD_WRITE_ZEROES, CMD_FLAG_DF, 0, 4096, None)
            .await
            .unwrap();
        assert_eq!(r.error, NBD_EINVAL, "{case}: write zeroes with DF");
        // The same connection still works, and replies stayed in frame.
        assert_eq!(
            c.read(8 * MIB, 4096).await.unwrap(),
            model[8 << 20..][..4096]
        );
    });
    f.check(case);

    let case = "block status without a negotiated context; DF without structured replies";
    f.block(case, async {
        let mut n = Negotiator::connect(&addr).await.unwrap();
        n.structured_reply().await.unwrap().unwrap();
        n.go("disk", &[]).await.unwrap().unwrap();
        let c = n.into_client().unwrap();
        let e = nbd_error(c.block_status(0, 4096, false).await, case);
        assert_eq!(e, NBD_EINVAL, "{case}");
        let c = attached(&addr, false).await.into_client().unwrap();
        let r = c
            .request(CMD_READ, CMD_FLAG_DF, 0, 512, None)
            .await
            .unwrap();
        assert_eq!(r.error, NBD_EINVAL, "{case}");
        assert_eq!(c.read(0, 512).await.unwrap(), pattern(1, 512));
    });
    f.check(case);

    f.finish();
}

#[test]
fn out_of_range_and_oversized_requests_fail_without_touching_data() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let tail = f.model[(SIZE - 64 * 1024) as usize..].to_vec();

    for structured in [true, false] {
        let case = format!("out-of-range requests (structured replies: {structured})");
        f.block(&case, async {
            let c = attached(&addr, structured).await.into_client().unwrap();
            let case = case.as_str();
            let einval = [
                ("read at the end", nbd_error(c.read(SIZE, 512).await, case)),
                (
                    "read across the end",
                    nbd_error(c.read(SIZE - 512, 1024).await, case),
                ),
                (
                    "read at offset 2^64 - 100",
                    nbd_error(c.read(u64::MAX - 100, 512).await, case),
                ),
                (
                    "trim across the end",
                    nbd_error(c.trim(SIZE - 4096, 8192).await, case),
                ),
                (
                    "trim at offset 2^64 - 1",
                    nbd_error(c.trim(u64::MAX, 1).await, case),
                ),
                (
                    "cache past the end",
                    nbd_error(c.cache(SIZE, 4096).await, case),
                ),
                (
                    "read of 32 MiB + 1",
                    nbd_error(c.read(0, MAX_PAYLOAD + 1).await, case),
                ),
            ];
            for (what, e) in einval {
                assert_eq!(e, NBD_EINVAL, "{case}: {what}");
            }
            let enospc = [
                (
                    "write across the end",
                    nbd_error(c.write(SIZE - 512, &[0x11; 1024], false).await, case),
                ),
                (
                    "write at the end",
                    nbd_error(c.write(SIZE, &[0x11; 1], true).await, case),
                ),
                (
                    "write at offset 2^64 - 1",
                    nbd_error(c.write(u64::MAX, &[0x11; 512], false).await, case),
                ),
                (
                    "write zeroes across the end",
                    nbd_error(c.write_zeroes(SIZE - 4096, 8192, 0).await, case),
                ),
                (
                    "write zeroes at offset 2^64 - 4096",
                    nbd_error(c.write_zeroes(u64::MAX - 4095, 4096, 0).await, case),
                ),
            ];
            for (what, e) in enospc {
                assert_eq!(e, NBD_ENOSPC, "{case}: {what}");
            }
            if structured {
                let e = nbd_error(c.block_status(SIZE, 512, false).await, case);
                assert_eq!(e, NBD_EINVAL, "{case}: block status past the end");
                let e = nbd_error(c.block_status(SIZE - 512, 1024, true).await, case);
                assert_eq!(e, NBD_EINVAL, "{case}: block status across the end");
            }
            // The limits themselves are fine, and nothing above touched the tail.
            assert_eq!(c.read(0, MAX_PAYLOAD).await.unwrap().len(), 32 << 20);
            assert_eq!(c.read(SIZE - 64 * 1024, 64 * 1024).await.unwrap(), tail);
            c.flush().await.unwrap();
        });
        f.check(&case);
    }

    let case = "read of 4 GiB - 1 (raw request, simple replies)";
    f.block(case, async {
        let mut raw = attached(&addr, false).await.into_raw();
        raw.send(&request(CMD_READ, 0, 9, 0, u32::MAX))
            .await
            .unwrap();
        let r = raw.recv_exact(SIMPLE_REPLY_LEN).await.unwrap();
        assert_eq!(
            (be32(&r, 0), be32(&r, 4), be64(&r, 8)),
            (SIMPLE_REPLY_MAGIC, NBD_EINVAL, 9),
            "{case}"
        );
        // No data follows an error: the next reply is right behind it.
        raw.send(&request(CMD_FLUSH, 0, 10, 0, 0)).await.unwrap();
        let r = raw.recv_exact(SIMPLE_REPLY_LEN).await.unwrap();
        assert_eq!(
            (be32(&r, 0), be32(&r, 4), be64(&r, 8)),
            (SIMPLE_REPLY_MAGIC, 0, 10),
            "{case}"
        );
    });
    f.check(case);

    let case = "a 32 MiB write is the largest accepted";
    let big = pattern(5, MAX_PAYLOAD as usize);
    f.good_write(16 * MIB, &big, false);
    f.check(case);

    f.finish();
}

#[test]
fn read_only_export_refuses_every_write_with_eperm() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let mut m = f.qmp();
    m.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "ro", "node-name": "disk", "name": "ro", "writable": false}),
    );

    let case = "writes to a read-only export";
    let model = f.model.clone();
    f.block(case, async {
        let c = NbdClient::connect(&addr, "ro").await.unwrap();
        assert_ne!(c.info().flags & FLAG_READ_ONLY, 0, "{case}: flags");
        let eperm = [
            (
                "write",
                nbd_error(c.write(0, &[0x77; 4096], false).await, case),
            ),
            (
                "write with FUA",
                nbd_error(c.write(8 * MIB, &[0x77; 512], true).await, case),
            ),
            ("trim", nbd_error(c.trim(0, 1 << 20).await, case)),
            (
                "write zeroes",
                nbd_error(c.write_zeroes(0, 1 << 20, CMD_FLAG_NO_HOLE).await, case),
            ),
            (
                "fast write zeroes",
                nbd_error(c.write_zeroes(0, 4096, CMD_FLAG_FAST_ZERO).await, case),
            ),
        ];
        for (what, e) in eperm {
            assert_eq!(e, NBD_EPERM, "{case}: {what}");
        }
        // Reads, flush and block status work, and see the good client's data.
        assert_eq!(c.read(0, 1 << 20).await.unwrap(), model[..1 << 20]);
        c.flush().await.unwrap();
        assert!(!c.block_status(0, 4096, false).await.unwrap().is_empty());
    });
    f.check(case);

    let case = "writes to a read-only export with simple replies, via EXPORT_NAME";
    f.block(case, async {
        let c = Negotiator::connect(&addr)
            .await
            .unwrap()
            .export_name("ro")
            .await
            .unwrap();
        let e = nbd_error(c.write(0, &[0x78; 4096], false).await, case);
        assert_eq!(e, NBD_EPERM, "{case}");
        assert_eq!(c.read(0, 4096).await.unwrap(), pattern(1, 4096));
    });
    f.check(case);

    let case = "qemu-io writing to the read-only export";
    let url = format!(
        "nbd+unix:///ro?socket={}",
        f.d.dir.path().join("nbd.sock").display()
    );
    let (st, out, err) = run_within(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x99 0 64k", &url]),
        WAIT,
    );
    // qemu-io sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(
        !st.success() && err.contains("Could not open image: Permission denied"),
        "qemu-io must refuse to write: {out}{err}"
    );
    f.check(case);

    drop(m);
    f.finish();
}

#[test]
fn nbdsh_out_of_range_requests_with_strict_mode_off() {
    let mut f = Fixture::new();
    let url = format!(
        "nbd+unix:///disk?socket={}",
        f.d.dir.path().join("nbd.sock").display()
    );
    // libnbd checks requests itself; with strict mode off it sends them as
    // given and reports the server's error.
    let script = r#"
h.set_strict_mode(0)
h.connect_uri(URL)
size = h.get_size()
def t(name, f):
    try:
        f()
        print(name, "ok")
    except nbd.Error as e:
        print(name, e.errno)
t("pread-past-end", lambda: h.pread(512, size))
t("pread-across-end", lambda: h.pread(1024, size - 512))
t("pread-33MiB", lambda: h.pread(33 << 20, 0))
t("pread-bad-flag", lambda: h.pread(512, 0, flags=1 << 12))
t("pwrite-across-end", lambda: h.pwrite(b"x" * 1024, size - 512))
t("trim-past-end", lambda: h.trim(4096, size))
t("zero-across-end", lambda: h.zero(8192, size - 4096))
t("cache-past-end", lambda: h.cache(4096, size))
t("block-status-past-end", lambda: h.block_status(512, size, lambda *a: 0))
t("pread-ok", lambda: h.pread(512, 0))
t("pwrite-40MiB", lambda: h.pwrite(b"y" * (40 << 20), 0))
"#;
    let script = script.replace("URL", &format!("{url:?}"));
    let (st, out, err) = run_within(nbdsh().args(["-c", &script]), WAIT);
    assert!(st.success(), "nbdsh failed: {out}\n{err}");
    let got: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    let want = [
        ("pread-past-end", "EINVAL"),
        ("pread-across-end", "EINVAL"),
        ("pread-33MiB", "EINVAL"),
        ("pread-bad-flag", "EINVAL"),
        ("pwrite-across-end", "ENOSPC"),
        ("trim-past-end", "EINVAL"),
        ("zero-across-end", "ENOSPC"),
        ("cache-past-end", "EINVAL"),
        ("block-status-past-end", "EINVAL"),
        ("pread-ok", "ok"),
    ];
    assert_eq!(&got[..want.len()], &want, "nbdsh output:\n{out}\n{err}");
    // The oversized write's payload is never read: the server answers EINVAL
    // and closes, so libnbd sees an error one way or another.
    assert_eq!(got.len(), want.len() + 1, "nbdsh output:\n{out}\n{err}");
    assert_eq!(got[want.len()].0, "pwrite-40MiB");
    assert_ne!(got[want.len()].1, "ok", "a 40 MiB write was accepted");
    f.check("nbdsh");
    f.finish();
}

// ---- QMP --------------------------------------------------------------------------

const NOT_OBJECT: (&str, &str) = ("GenericError", "QMP input must be a JSON object");
const EXPECTING_VALUE: (&str, &str) = ("GenericError", "JSON parse error, expecting value");

/// Bytes sent to a monitor and the (class, desc) of each reply QEMU gives.
type QmpCase = (&'static [u8], &'static [(&'static str, &'static str)]);

const fn g(desc: &'static str) -> (&'static str, &'static str) {
    ("GenericError", desc)
}

/// Bad input and QEMU's answers to it (from docs/qmp-qsd-transcript.md and
/// qemu-storage-daemon 10.0), after capabilities negotiation.
const QMP_CASES: &[QmpCase] = &[
        (
            b"garbage\n",
            &[g("JSON parse error, invalid keyword 'garbage'")],
        ),
        (b"@\n", &[g("JSON parse error, stray '@'")]),
        (b"}\n", &[EXPECTING_VALUE]),
        (
            b"{\"execute\" \"query-version\"}\n",
            &[g("JSON parse error, missing : in object pair")],
        ),
        (b"{\"execute\":\"query-version\",}\n", &[EXPECTING_VALUE]),
        (
            b"{\"execute\":\"query-version\",\"id\":\"\xff\"}\n",
            &[g("JSON parse error, stray '\"\u{fffd}'"), EXPECTING_VALUE],
        ),
        (
            b"{\"execute\":\"query-version\",\"execute\":\"query-version\"}\n",
            &[g("JSON parse error, duplicate key")],
        ),
        (
        b"\0\x01\x02\x7f\n",
        &[
            g("JSON parse error, stray ''"),
            g("JSON parse error, stray '\u{1}'"),
            g("JSON parse error, stray '\u{2}'"),
        ],
    ),
    (b"\t \r\n", &[]),
        (b"[1]\n", &[NOT_OBJECT]),
        (b"\"x\"\n", &[NOT_OBJECT]),
        (b"null\n", &[NOT_OBJECT]),
        (b"1 2 3\n", &[NOT_OBJECT, NOT_OBJECT, NOT_OBJECT]),
        (b"{}\n", &[g("QMP input lacks member 'execute'")]),
        (
            b"{\"execute\":1}\n",
            &[g("QMP input member 'execute' must be a string")],
        ),
        (
            b"{\"execute\":\"query-version\",\"foo\":1}\n",
            &[g("QMP input member 'foo' is unexpected")],
        ),
        (
            b"{\"execute\":\"query-version\",\"arguments\":[]}\n",
            &[g("QMP input member 'arguments' must be an object")],
        ),
        (
            b"{\"execute\":\"nosuch\"}\n",
            &[("CommandNotFound", "The command nosuch has not been found")],
        ),
        (
            b"{\"execute\":\"qmp_capabilities\"}\n",
            &[(
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored",
            )],
        ),
        (
            b"{\"execute\":\"query-version\",\"arguments\":{\"x\":1}}\n",
            &[g("Parameter 'x' is unexpected")],
        ),
        (
            b"{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":1,\"node-name\":\"n0\"}}\n",
            &[g("Invalid parameter type for 'driver', expected: string")],
        ),
        (
            b"{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"raw\",\"node-name\":5}}\n",
            &[g("Invalid parameter type for 'node-name', expected: string")],
        ),
        (
            b"{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":5}}}}\n",
            &[g("Invalid parameter type for 'addr.data.path', expected: string")],
        ),
        (
            b"{\"execute\":\"query-named-block-nodes\",\"arguments\":{\"flat\":1}}\n",
            &[g("Invalid parameter type for 'flat', expected: boolean")],
        ),
        (
            b"{\"execute\":\"block-export-del\",\"arguments\":{\"id\":1}}\n",
            &[g("Invalid parameter type for 'id', expected: string")],
        ),
        // Well-formed, but aimed at what the NBD client is using.
        (
            b"{\"execute\":\"blockdev-del\",\"arguments\":{\"node-name\":\"disk\"}}\n",
            &[g("Node disk is in use")],
        ),
        (
            b"{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"/nonexistent/x\"}}}}\n",
            &[g("NBD server already running")],
        ),
        (
            b"{\"execute\":\"block-export-add\",\"arguments\":{\"type\":\"nbd\",\"id\":\"export0\",\"node-name\":\"disk\"}}\n",
            &[g("Block export id 'export0' is already in use")],
        ),
        (
            b"{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"raw\",\"node-name\":\"d2\",\"file\":{\"driver\":\"file\",\"filename\":\"/nonexistent\"}}}\n",
            &[g("Could not open '/nonexistent': No such file or directory")],
        ),
        (
            b"{\"execute\":\"block-export-del\",\"arguments\":{\"id\":\"nosuch\"}}\n",
            &[g("Export 'nosuch' is not found")],
        ),
    ];

/// After bad input on one monitor: it and another monitor answer, and the
/// NBD client is unaffected.
fn qmp_check(f: &mut Fixture, bad: &mut RawQmp, other: &mut RawQmp, case: &str) {
    bad.alive(case);
    other.alive(case);
    let exports = other.ok("query-block-exports", Value::Null);
    assert_eq!(
        exports.as_array().map(Vec::len),
        Some(1),
        "{case}: {exports}"
    );
    f.check(case);
}

#[test]
fn qmp_bad_input_gets_qemus_errors_and_everything_keeps_working() {
    let mut f = Fixture::new();
    let mut other = f.qmp();
    let mut bad = RawQmp::connect(&f.d.qmp_path);

    // Before negotiation.
    bad.send(b"{\"execute\":\"query-version\",\"id\":{\"a\":[1]}}\n");
    let r = bad.recv();
    assert_eq!(r["id"], json!({"a": [1]}), "{r}");
    assert_eq!(
        class_desc(&r),
        (
            "CommandNotFound".into(),
            "Expecting capabilities negotiation with 'qmp_capabilities'".into()
        )
    );
    bad.send(b"garbage\n");
    assert_eq!(
        class_desc(&bad.recv()).1,
        "JSON parse error, invalid keyword 'garbage'"
    );
    bad.negotiate();
    qmp_check(&mut f, &mut bad, &mut other, "bad input before negotiation");

    for (input, want) in QMP_CASES {
        let case = format!("QMP input {:?}", String::from_utf8_lossy(input));
        bad.send(input);
        let got: Vec<(String, String)> = want.iter().map(|_| class_desc(&bad.recv())).collect();
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(c, d)| (c.to_string(), d.to_string()))
            .collect();
        assert_eq!(got, want, "{case}");
        qmp_check(&mut f, &mut bad, &mut other, &case);
    }

    let case = "an error echoes the request's id";
    bad.send(b"{\"execute\":\"nosuch\",\"id\":[\"x\",2]}\n");
    let r = bad.recv();
    assert_eq!(r["id"], json!(["x", 2]), "{case}: {r}");
    qmp_check(&mut f, &mut bad, &mut other, case);

    let case = "nesting deeper than 1024";
    bad.send(&[b'['; 1025]);
    assert_eq!(
        class_desc(&bad.recv()),
        (
            "GenericError".into(),
            "JSON nesting depth limit exceeded".into()
        ),
        "{case}"
    );
    bad.send(b"]]]\n");
    for _ in 0..3 {
        assert_eq!(class_desc(&bad.recv()).1, EXPECTING_VALUE.1, "{case}");
    }
    qmp_check(&mut f, &mut bad, &mut other, case);

    let case = "10000 nested objects";
    // Each 1024 levels give an error; what follows the last one stays open
    // (and swallows later input, as in QEMU) until the braces balance.
    let mut deep = b"{\"a\":".repeat(10_000);
    deep.push(b'\n');
    deep.extend_from_slice(&b"}".repeat(10_000));
    deep.push(b'\n');
    let errors = errors_until_alive(&mut bad, deep, case);
    assert_eq!(errors[0].1, "JSON nesting depth limit exceeded", "{case}");
    qmp_check(&mut f, &mut bad, &mut other, case);

    let case = "more than 2^21 tokens";
    // Token 2^21 + 1 is the last "1": the message is dropped there, and the
    // two "]" left over are errors of their own (as in qemu-storage-daemon).
    let mut many = b"[[".to_vec();
    many.extend_from_slice(&b"1,".repeat((1 << 20) - 1));
    many.extend_from_slice(b"1]]\n");
    let errors = errors_until_alive(&mut bad, many, case);
    let want = [
        "JSON token count limit exceeded",
        EXPECTING_VALUE.1,
        EXPECTING_VALUE.1,
    ];
    let got: Vec<&str> = errors.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(got, want, "{case}");
    qmp_check(&mut f, &mut bad, &mut other, case);

    let case = "a 1 MiB request";
    let long_id = "a".repeat(1 << 20);
    bad.send(format!("{{\"execute\":\"query-version\",\"id\":\"{long_id}\"}}\n").as_bytes());
    let r = bad.recv();
    assert_eq!(r["id"].as_str().map(str::len), Some(1 << 20), "{case}");
    assert!(r.get("return").is_some(), "{case}");
    qmp_check(&mut f, &mut bad, &mut other, case);

    let case = "a 65 MiB string (over QEMU's 64 MiB message limit)";
    let mut huge = b"{\"execute\":\"query-version\",\"id\":\"".to_vec();
    huge.resize(huge.len() + (65 << 20), b'a');
    huge.extend_from_slice(b"\"}\n");
    let errors = errors_until_alive(&mut bad, huge, case);
    // As qemu-storage-daemon: the lexer restarts inside the string, so the
    // rest of the a's are an invalid keyword (cut to 1023 bytes) and the
    // closing quote starts a stray.
    assert_eq!(errors.len(), 3, "{case}: {errors:?}");
    assert_eq!(errors[0].1, "JSON token size limit exceeded", "{case}");
    assert_eq!(
        errors[1].1,
        format!(
            "JSON parse error, invalid keyword '{}",
            "a".repeat(1023 - "invalid keyword '".len())
        ),
        "{case}"
    );
    assert_eq!(errors[2].1, "JSON parse error, stray '\"}\n'", "{case}");
    qmp_check(&mut f, &mut bad, &mut other, case);

    drop((bad, other));
    f.finish();
}

/// Sends `input` and then a request, reading replies meanwhile (the daemon
/// stops reading while its replies are not read); returns the error replies
/// before the request's (at least one; how many depends on how the stream
/// resynchronises).
fn errors_until_alive(m: &mut RawQmp, input: Vec<u8>, case: &str) -> Vec<(String, String)> {
    let mut w = m.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&input)?;
        w.write_all(b"{\"execute\":\"query-version\",\"id\":\"resync\"}\n")
    });
    let mut errors = Vec::new();
    loop {
        let r = m.recv();
        if r["id"] == json!("resync") {
            assert!(r.get("return").is_some(), "{case}: {r}");
            break;
        }
        let (class, desc) = class_desc(&r);
        assert_eq!(class, "GenericError", "{case}: {r}");
        errors.push((class, desc));
        assert!(errors.len() < 10_000, "{case}: endless errors");
    }
    writer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{case}: sending failed: {e}"));
    assert!(!errors.is_empty(), "{case}: no error reply");
    errors
}

#[test]
fn qmp_monitors_that_hang_up_or_stop_reading_do_not_disturb_the_daemon() {
    let mut f = Fixture::new();
    let mut other = f.qmp();
    let second = f.img_dir.path().join("second.img");
    sparse_file(&second, MIB);

    let case = "a monitor that hangs up right after sending a command";
    {
        let mut m = RawQmp::connect(&f.d.qmp_path);
        m.negotiate();
        let req = json!({"execute": "blockdev-add", "arguments": {
            "driver": "raw", "node-name": "orphan",
            "file": {"driver": "file", "filename": second.to_str().unwrap()}}});
        m.send(format!("{req}\n").as_bytes());
        m.w.shutdown(std::net::Shutdown::Both).unwrap();
    }
    // QEMU completes a command whose monitor left; so must livesnapd.
    let start = Instant::now();
    loop {
        let nodes = other.ok("query-named-block-nodes", json!({"flat": true}));
        let names: Vec<&str> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .collect();
        if names.contains(&"orphan") {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "{case}: node never appeared: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    other.ok("blockdev-del", json!({"node-name": "orphan"}));
    f.check(case);

    let case = "monitors that hang up mid-message, before the greeting, or after garbage";
    for bytes in [
        &b"{\"execute\":\"query-ver"[..],
        &b""[..],
        &b"\xff\xfe garbage {{{{ [[[["[..],
        &b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"quit\""[..],
    ] {
        let mut s = UnixStream::connect(&f.d.qmp_path).unwrap();
        s.write_all(bytes).unwrap();
        drop(s);
    }
    other.alive(case);
    f.check(case);

    let case = "a monitor that floods requests and never reads a reply";
    let rss_before = rss_kib(f.d.pid());
    let mut flood = RawQmp::connect(&f.d.qmp_path);
    flood.negotiate();
    flood.w.set_nonblocking(true).unwrap();
    // A big reply per request: the daemon owes its bound of reply bytes
    // (8 MiB) after a few thousand requests, so the flood costs little CPU
    // beside the other tests.
    let req = b"{\"execute\":\"query-commands\"}\n".repeat(1000);
    let mut sent = 0usize;
    let start = Instant::now();
    // Until the daemon stops reading (its reply queue is full and the
    // socket buffers too), or 256 MiB: replies are not queued without bound.
    let stalled = loop {
        match flood.w.write(&req) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() > Duration::from_millis(500) {
                    break true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{case}: {e}"),
        }
        if sent > 256 << 20 || start.elapsed() > WAIT {
            break false;
        }
    };
    assert!(
        stalled,
        "{case}: the daemon took {sent} bytes of requests without their replies being read"
    );
    let t = Instant::now();
    other.alive(case);
    // The stalled client never reads: a monitor it blocked would not answer.
    eprintln!("{case}: the other monitor answered in {:?}", t.elapsed());
    f.check(case);
    let rss_after = rss_kib(f.d.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "{case}: daemon RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    drop(flood);
    let mut fresh = f.qmp();
    fresh.alive("after the flooding monitor left");
    other.alive("after the flooding monitor left");
    f.check("after the flooding monitor left");

    drop((other, fresh));
    f.finish();
}

#[test]
fn read_only_daemon_leaves_the_image_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.img");
    let data = pattern(9, (4 * MIB) as usize);
    std::fs::write(&image, &data).unwrap();
    let d = Livesnapd::with_image(&image, &["--read-only"]);
    let addr = format!("unix:{}", d.dir.path().join("nbd.sock").display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    bounded(&rt, "read-only daemon", async {
        let c = NbdClient::connect(&addr, "disk").await.unwrap();
        assert_ne!(c.info().flags & FLAG_READ_ONLY, 0);
        let e = nbd_error(c.write(0, &[1; 4096], true).await, "write");
        assert_eq!(e, NBD_EPERM);
        let e = nbd_error(c.trim(0, 4096).await, "trim");
        assert_eq!(e, NBD_EPERM);
        let e = nbd_error(c.write_zeroes(0, 4096, 0).await, "write zeroes");
        assert_eq!(e, NBD_EPERM);
        assert_eq!(c.read(0, 4096).await.unwrap(), data[..4096]);
    });
    let (st, out, err) = run_within(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -z 0 1M", d.url()]),
        WAIT,
    );
    assert!(
        !st.success() && err.contains("Permission denied"),
        "qemu-io must not write to a read-only export: {out}{err}"
    );
    assert!(d.stop_with(libc::SIGTERM).success());
    image_equals(&image, &data);
}
