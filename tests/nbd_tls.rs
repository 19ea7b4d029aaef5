//! NBD over TLS against the real peers: certificates made by GnuTLS's
//! `certtool`, data read and written by qemu-io and qemu-img, nbdinfo over
//! `nbds://`, and every client that must be refused (plain text, no
//! certificate, a certificate from another CA, the wrong name under
//! `tls-authz`) refused, by livesnapd and by qemu-storage-daemon alike.
//! QMP's `object-add`/`object-del` and `nbd-server-start`'s TLS arguments are
//! checked against qemu-storage-daemon's replies.

use livesnap_testkit as harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::compat::free_port;
use harness::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// The distinguished name of the good client's certificate, as QEMU's
/// `authz-simple` compares it: in the certificate's order, not reversed as
/// `certtool -i` (RFC 4514) shows it.
const CLIENT_DN: &str = "C=GB,ST=London,L=London,O=Test Org,CN=client";

/// How long a single client run may take before the test calls it hung.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

/// A set of certificates made by certtool, in the directory layouts QEMU
/// (`ca-cert.pem`, `server-*.pem` or `client-*.pem`) and libnbd expect.
struct Certs {
    _tmp: tempfile::TempDir,
    /// Server credentials: the CA, the server's certificate and key.
    server: PathBuf,
    /// The good client: the CA, and a certificate named [`CLIENT_DN`].
    client: PathBuf,
    /// Another client signed by the same CA, named `...,CN=other`.
    other: PathBuf,
    /// Only the CA: a client that has no certificate of its own.
    nocert: PathBuf,
    /// A client whose certificate another CA signed.
    rogue: PathBuf,
}

fn certtool(args: &[&str]) {
    run(Command::new("certtool").args(args));
}

fn template<S: AsRef<str>>(dir: &Path, name: &str, lines: &[S]) -> String {
    let p = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{}\n", l.as_ref())).collect();
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// A CA (key and self-signed certificate) in `dir` as `NAME-key.pem`, `NAME-cert.pem`.
fn make_ca(dir: &Path, name: &str) -> (String, String) {
    let key = dir
        .join(format!("{name}-key.pem"))
        .to_str()
        .unwrap()
        .to_string();
    let cert = dir
        .join(format!("{name}-cert.pem"))
        .to_str()
        .unwrap()
        .to_string();
    certtool(&["--generate-privkey", "--no-text", "--outfile", &key]);
    let t = template(
        dir,
        &format!("{name}.info"),
        &[
            &format!("cn = {name}"),
            "ca",
            "cert_signing_key",
            "expiration_days = 30",
        ],
    );
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        &key,
        "--template",
        &t,
        "--no-text",
        "--outfile",
        &cert,
    ]);
    (key, cert)
}

/// A key and certificate signed by `ca`, written to `out/PREFIX-key.pem` and `out/PREFIX-cert.pem`.
fn make_cert<S: AsRef<str>>(ca: &(String, String), out: &Path, prefix: &str, info: &[S]) {
    std::fs::create_dir_all(out).unwrap();
    let key = out
        .join(format!("{prefix}-key.pem"))
        .to_str()
        .unwrap()
        .to_string();
    let cert = out
        .join(format!("{prefix}-cert.pem"))
        .to_str()
        .unwrap()
        .to_string();
    certtool(&["--generate-privkey", "--no-text", "--outfile", &key]);
    let t = template(out, &format!("{prefix}.info"), info);
    certtool(&[
        "--generate-certificate",
        "--load-privkey",
        &key,
        "--load-ca-certificate",
        &ca.1,
        "--load-ca-privkey",
        &ca.0,
        "--template",
        &t,
        "--no-text",
        "--outfile",
        &cert,
    ]);
}

impl Certs {
    fn make() -> Certs {
        require_tool("certtool");
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let ca = make_ca(root, "ca");
        let rogue_ca = make_ca(root, "rogue-ca");
        let server = root.join("server");
        make_cert(
            &ca,
            &server,
            "server",
            &[
                "organization = Test Org",
                "cn = localhost",
                "dns_name = localhost",
                "ip_address = 127.0.0.1",
                "tls_www_server",
                "encryption_key",
                "signing_key",
                "expiration_days = 30",
            ],
        );
        let client_info = |cn: &str| {
            vec![
                "country = GB".to_string(),
                "state = London".into(),
                "locality = London".into(),
                "organization = Test Org".into(),
                format!("cn = {cn}"),
                "tls_www_client".into(),
                "encryption_key".into(),
                "signing_key".into(),
                "expiration_days = 30".into(),
            ]
        };
        let client = root.join("client");
        make_cert(&ca, &client, "client", &(client_info("client")));
        let other = root.join("other");
        make_cert(&ca, &other, "client", &(client_info("other")));
        let rogue = root.join("rogue");
        make_cert(&rogue_ca, &rogue, "client", &(client_info("client")));
        let nocert = root.join("nocert");
        std::fs::create_dir_all(&nocert).unwrap();
        for d in [&server, &client, &other, &rogue, &nocert] {
            std::fs::copy(&ca.1, d.join("ca-cert.pem")).unwrap();
        }
        Certs {
            _tmp: tmp,
            server,
            client,
            other,
            nocert,
            rogue,
        }
    }
}

/// qemu-storage-daemon serving `image` as `disk` over TLS on a free port,
/// once that port accepts connections (its QMP socket comes up first).
fn tls_qsd(certs: &Certs, image: &Path, authz: Option<&str>) -> (Qsd, u16) {
    let port = free_port();
    let mut args = vec![
        "--object".to_string(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server",
            certs.server.display()
        ),
        "--blockdev".into(),
        format!("driver=file,node-name=disk,filename={}", image.display()),
    ];
    let mut server = format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0");
    if let Some(dn) = authz {
        // QEMU's option syntax doubles a comma inside a value.
        args.push("--object".into());
        args.push(format!(
            "authz-simple,id=authz0,identity={}",
            dn.replace(',', ",,")
        ));
        server.push_str(",tls-authz=authz0");
    }
    args.extend([
        "--nbd-server".into(),
        server,
        "--export".into(),
        "type=nbd,id=e0,node-name=disk,name=disk,writable=on".into(),
    ]);
    let qsd = Qsd::start(&args);
    wait_until(START_TIMEOUT, "qemu-storage-daemon's NBD port", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (qsd, port)
}

/// The port of an `nbds://127.0.0.1:PORT/disk` URI.
fn port_of(url: &str) -> u16 {
    let hostport = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    hostport.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// qemu-img/qemu-io arguments for export `disk` on `port`, over TLS with the
/// client credentials in `creds` when given.
fn qemu_target(port: u16, creds: Option<&Path>) -> Vec<String> {
    let mut a = Vec::new();
    let mut opts = format!("driver=nbd,host=127.0.0.1,port={port},export=disk");
    if let Some(dir) = creds {
        a.push("--object".into());
        a.push(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ));
        opts.push_str(",tls-creds=tls0");
    }
    a.push("--image-opts".into());
    a.push(opts);
    a
}

/// `qemu-img info` through TLS: Ok(stdout) or Err(stderr).
fn qemu_img_info(port: u16, creds: Option<&Path>) -> Result<String, String> {
    let (st, out, err) = run_within(
        Command::new("qemu-img")
            .arg("info")
            .args(qemu_target(port, creds)),
        CLIENT_LIMIT,
    );
    if st.success() {
        Ok(out)
    } else {
        Err(err)
    }
}

/// qemu-io `script` through TLS; panics on any failure.
fn qemu_io_tls(port: u16, creds: &Path, script: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(qemu_target(port, Some(creds)));
    for c in script {
        cmd.args(["-c", c]);
    }
    let (st, out, err) = run_within(&mut cmd, CLIENT_LIMIT);
    assert!(
        st.success() && !out.contains("fail") && !out.contains("error"),
        "qemu-io over TLS: {st}\n{out}\n{err}"
    );
    out
}

/// `nbdinfo --size` of `uri`: Ok(size) or Err(stderr).
fn nbdinfo_size(uri: &str) -> Result<u64, String> {
    let (st, out, err) = run_within(Command::new("nbdinfo").args(["--size", uri]), CLIENT_LIMIT);
    if st.success() {
        Ok(out
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("nbdinfo said {out:?}")))
    } else {
        Err(err)
    }
}

fn nbds(port: u16, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        certs.display()
    )
}

/// livesnapd exporting a fresh raw image as `disk` on a free TCP port with TLS.
fn tls_daemon(certs: &Certs, extra: &[&str]) -> (tempfile::TempDir, PathBuf, Livesnapd, u16) {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_file(dir.path().join("served.img"), SIZE);
    let mut args = vec!["--tls-creds", certs.server.to_str().unwrap()];
    args.extend_from_slice(extra);
    let d = Livesnapd::with_image_tcp_args(&image, &args);
    let url = d.url().to_string();
    assert!(
        url.starts_with("nbds://"),
        "banner URI {url} does not say TLS"
    );
    let port = port_of(&url);
    (dir, image, d, port)
}

/// Every kind of client against a server on `port`: which were served.
/// The expectation is the same for livesnapd and qemu-storage-daemon.
fn client_outcomes(port: u16, certs: &Certs) -> Vec<(&'static str, Result<(), String>)> {
    let ok = |r: Result<String, String>| r.map(|_| ());
    vec![
        (
            "qemu-img with a client certificate",
            ok(qemu_img_info(port, Some(&certs.client))),
        ),
        ("qemu-img in plain text", ok(qemu_img_info(port, None))),
        (
            "qemu-img without a client certificate",
            ok(qemu_img_info(port, Some(&certs.nocert))),
        ),
        (
            "qemu-img with another CA's certificate",
            ok(qemu_img_info(port, Some(&certs.rogue))),
        ),
        (
            "nbdinfo nbds:// with a client certificate",
            nbdinfo_size(&nbds(port, &certs.client)).map(|_| ()),
        ),
        (
            "nbdinfo nbd:// in plain text",
            nbdinfo_size(&format!("nbd://127.0.0.1:{port}/disk")).map(|_| ()),
        ),
        (
            "nbdinfo nbds:// without a client certificate",
            nbdinfo_size(&nbds(port, &certs.nocert)).map(|_| ()),
        ),
    ]
}

/// Which of [`client_outcomes`] must be served under `verify-peer`.
const SERVED: [bool; 7] = [true, false, false, false, true, false, false];

fn assert_outcomes(who: &str, got: &[(&str, Result<(), String>)], served: &[bool]) {
    for ((what, r), want) in got.iter().zip(served) {
        assert_eq!(r.is_ok(), *want, "{who}: {what}: {r:?}");
    }
}

#[test]
fn qemu_io_writes_and_reads_over_tls() {
    let certs = Certs::make();
    let (dir, image, d, port) = tls_daemon(&certs, &[]);
    let info = qemu_img_info(port, Some(&certs.client)).unwrap();
    assert!(
        info.contains(&format!("({SIZE} bytes)")),
        "qemu-img info over TLS: {info}"
    );
    let script = [
        "write -P 0x5a 0 1M",
        "aio_write -P 0x6b 3M 512k",
        "aio_write -P 0x7c 4194303 4097",
        "aio_flush",
        "write -z 8M 1M",
        "write -f -P 0x11 15M 64k",
        "flush",
    ];
    qemu_io_tls(port, &certs.client, &script);
    // The same script on a plain file gives the bytes the served image must hold.
    let reference = sparse_file(dir.path().join("reference.img"), SIZE);
    qemu_io(reference.to_str().unwrap(), "raw", &script);
    let (st, out, err) = run_status(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&image)
            .arg(&reference),
    );
    assert!(
        st.success(),
        "served image differs from the reference: {out}{err}"
    );
    // And reads over TLS see them.
    qemu_io_tls(
        port,
        &certs.client,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x6b 3M 512k",
            "read -P 0x7c 4194303 4097",
            "read -P 0 8M 1M",
            "read -P 0x11 15M 64k",
        ],
    );
    assert_eq!(nbdinfo_size(&nbds(port, &certs.client)), Ok(SIZE));
    drop(d);
}

#[test]
fn refused_clients_match_qemu_storage_daemon() {
    let certs = Certs::make();
    let (_dir, image, d, port) = tls_daemon(&certs, &[]);
    let ours = client_outcomes(port, &certs);
    assert_outcomes("livesnapd", &ours, &SERVED);
    // The refusals say why on the client's side.
    let plain = ours[1].1.as_ref().unwrap_err();
    assert!(
        plain.contains("TLS negotiation required"),
        "qemu-img in plain text: {plain}"
    );
    // The daemon still serves after all of them.
    qemu_io_tls(
        port,
        &certs.client,
        &["write -P 0x42 0 64k", "read -P 0x42 0 64k"],
    );
    drop(d);

    let (_qsd, qport) = tls_qsd(&certs, &image, None);
    let theirs = client_outcomes(qport, &certs);
    assert_outcomes("qemu-storage-daemon", &theirs, &SERVED);
}

#[test]
fn tls_authz_admits_only_the_named_client_as_qemu_does() {
    let certs = Certs::make();
    let (_dir, image, d, port) = tls_daemon(&certs, &["--tls-authz", CLIENT_DN]);
    assert!(
        qemu_img_info(port, Some(&certs.client)).is_ok(),
        "{CLIENT_DN} refused"
    );
    let other = qemu_img_info(port, Some(&certs.other));
    assert!(
        other.is_err(),
        "CN=other admitted under tls-authz {CLIENT_DN}: {other:?}"
    );
    assert!(
        nbdinfo_size(&nbds(port, &certs.other)).is_err(),
        "nbdinfo as CN=other admitted"
    );
    assert_eq!(nbdinfo_size(&nbds(port, &certs.client)), Ok(SIZE));

    // As QEMU, the authorization object is looked up at each connection:
    // once deleted, nobody gets in; a new one with the other name lets that one in.
    let mut q = d.qmp();
    q.ok("object-del", json!({"id": "authz0"}));
    assert!(
        qemu_img_info(port, Some(&certs.client)).is_err(),
        "admitted with its authz object deleted"
    );
    q.ok("object-add", json!({"qom-type": "authz-simple", "id": "authz0", "identity": "C=GB,ST=London,L=London,O=Test Org,CN=other"}));
    assert!(
        qemu_img_info(port, Some(&certs.other)).is_ok(),
        "CN=other refused by its own authz"
    );
    assert!(
        qemu_img_info(port, Some(&certs.client)).is_err(),
        "CN=client admitted by CN=other's authz"
    );
    drop(d);

    // qemu-storage-daemon with the same identity admits and refuses the same
    // clients, which shows the name is written as QEMU writes it.
    let (_qsd, qport) = tls_qsd(&certs, &image, Some(CLIENT_DN));
    assert!(
        qemu_img_info(qport, Some(&certs.client)).is_ok(),
        "qsd refused {CLIENT_DN}"
    );
    assert!(
        qemu_img_info(qport, Some(&certs.other)).is_err(),
        "qsd admitted CN=other"
    );
}

/// A raw NBD client on TCP that stops wherever the test wants.
struct RawClient(TcpStream);

impl RawClient {
    /// Connects and does the greeting with fixed newstyle and no zeroes.
    fn connect(port: u16) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(CLIENT_LIMIT)).unwrap();
        let mut c = RawClient(s);
        let mut greeting = [0u8; 18];
        c.0.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        c.0.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut m = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// Reads one option reply: (option, reply type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        let mut data = vec![0u8; be(&h[16..20]) as usize];
        self.0.read_exact(&mut data).unwrap();
        (be(&h[8..12]), be(&h[12..16]), data)
    }

    /// Waits (bounded by the read timeout) for the server to close; returns
    /// what it saw: Ok(()) on EOF or reset, Err(description) otherwise.
    fn closed(&mut self) -> Result<(), String> {
        let mut b = [0u8; 64];
        match self.0.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!("{n} more bytes: {:02x?}", &b[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!("still open after {CLIENT_LIMIT:?}: {e}")),
        }
    }
}

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const REP_ERR_INVALID: u32 = 0x8000_0003;

#[test]
fn options_before_tls_are_refused_per_the_spec() {
    let certs = Certs::make();
    let (_dir, _image, d, port) = tls_daemon(&certs, &[]);
    let mut c = RawClient::connect(port);
    let go = {
        let mut g = 4u32.to_be_bytes().to_vec();
        g.extend_from_slice(b"disk");
        g.extend_from_slice(&0u16.to_be_bytes());
        g
    };
    for (opt, data) in [
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_GO, go),
    ] {
        c.send_option(opt, &data);
        let (o, typ, _) = c.reply();
        assert_eq!((o, typ), (opt, REP_ERR_TLS_REQD), "option {opt} before TLS");
    }
    // STARTTLS with data is invalid and leaves TLS still to be started.
    c.send_option(OPT_STARTTLS, b"x");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    assert_eq!(c.closed(), Ok(()));

    // EXPORT_NAME has no error reply: the connection is closed, no export data sent.
    let mut c = RawClient::connect(port);
    c.send_option(OPT_EXPORT_NAME, b"disk");
    assert_eq!(c.closed(), Ok(()), "EXPORT_NAME before TLS");
    drop(d);
}

/// Clients that stall after STARTTLS all at once in
/// [`stalled_tls_handshakes_are_cut_and_hold_nobody`].
const STALLED_CROWD: usize = 40;

#[test]
fn stalled_tls_handshakes_are_cut_and_hold_nobody() {
    let certs = Certs::make();
    let (_dir, image, d, port) = tls_daemon(&certs, &[]);
    stalled_handshakes("livesnapd", port, &certs);
    let mut q = d.qmp();
    q.ok("query-block-exports", json!({}));
    drop(d);
    // qemu-storage-daemon, same limit (10 s), same clients.
    let (_qsd, qport) = tls_qsd(&certs, &image, None);
    stalled_handshakes("qemu-storage-daemon", qport, &certs);
}

/// Stalls TLS handshakes on the server at `port` in three ways while good
/// clients are served; each stalled one must be closed (bounded by the
/// socket's read timeout, several times the handshake limit).
fn stalled_handshakes(who: &str, port: u16, certs: &Certs) {
    // One client stops right after STARTTLS's ACK, another in the middle of
    // its TLS hello (a record header promising bytes that never come).
    let mut after_ack = RawClient::connect(port);
    after_ack.send_option(OPT_STARTTLS, &[]);
    assert_eq!(after_ack.reply(), (OPT_STARTTLS, REP_ACK, vec![]), "{who}");
    let mut mid_hello = RawClient::connect(port);
    mid_hello.send_option(OPT_STARTTLS, &[]);
    assert_eq!(mid_hello.reply().1, REP_ACK, "{who}");
    mid_hello
        .0
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    // And a crowd of them (below the default limit of 100 connections).
    let crowd: Vec<RawClient> = (0..STALLED_CROWD)
        .map(|_| {
            let mut c = RawClient::connect(port);
            c.send_option(OPT_STARTTLS, &[]);
            assert_eq!(c.reply().1, REP_ACK, "{who}");
            c
        })
        .collect();
    let start = Instant::now();

    // Meanwhile other clients are served in full.
    qemu_io_tls(
        port,
        &certs.client,
        &["write -P 0x33 1M 256k", "read -P 0x33 1M 256k"],
    );
    assert_eq!(nbdinfo_size(&nbds(port, &certs.client)), Ok(SIZE), "{who}");

    assert_eq!(
        after_ack.closed(),
        Ok(()),
        "{who}: client stalled after STARTTLS"
    );
    assert_eq!(
        mid_hello.closed(),
        Ok(()),
        "{who}: client stalled mid TLS hello"
    );
    for (i, mut c) in crowd.into_iter().enumerate() {
        assert_eq!(c.closed(), Ok(()), "{who}: stalled client {i} of the crowd");
    }
    eprintln!(
        "{who}: stalled TLS clients closed {:?} after they stalled",
        start.elapsed()
    );
}

/// Runs `cmds` on a QMP monitor and returns each reply as (class, desc) or "ok".
fn replies(q: &mut Qmp, cmds: &[(&str, Value)]) -> Vec<String> {
    cmds.iter()
        .map(|(c, a)| match q.execute(c, a.clone()) {
            Ok(_) => "ok".to_string(),
            Err((class, desc)) => format!("{class}: {desc}"),
        })
        .collect()
}

#[test]
fn object_add_and_del_match_qemu_storage_daemon() {
    let certs = Certs::make();
    let bad = tempfile::tempdir().unwrap();
    let bad_ca = bad.path().join("bad-ca");
    std::fs::create_dir_all(&bad_ca).unwrap();
    std::fs::write(bad_ca.join("ca-cert.pem"), "garbage\n").unwrap();
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(certs.server.join(f), bad_ca.join(f)).unwrap();
    }
    let s = certs.server.to_str().unwrap();
    let x509 = |id: &str, dir: &str, extra: Value| {
        let mut a =
            json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir, "endpoint": "server"});
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ("object-add", a)
    };
    let start = |extra: Value| {
        let mut a = json!({"addr": {"type": "unix", "data": {"path": "SOCK"}}});
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ("nbd-server-start", a)
    };
    let cmds = |sock: &str| -> Vec<(&str, Value)> {
        let mut v = vec![
            ("object-add", json!({"qom-type": "nope", "id": "x"})),
            ("object-add", json!({"id": "x"})),
            ("object-add", json!({"qom-type": "tls-creds-x509"})),
            x509("1bad", s, json!({})),
            (
                "object-add",
                json!({"qom-type": "tls-creds-x509", "id": "t0", "endpoint": "server"}),
            ),
            x509("t0", "/nonexistent", json!({})),
            x509("t0", certs.nocert.to_str().unwrap(), json!({})),
            x509("t0", certs.client.to_str().unwrap(), json!({})),
            x509("t0", bad_ca.to_str().unwrap(), json!({})),
            x509("t0", s, json!({"endpoint": "bogus"})),
            x509("t0", s, json!({"verify-peer": "yes"})),
            x509("t0", s, json!({"bogus": 1})),
            x509(
                "t0",
                s,
                json!({"verify-peer": true, "sanity-check": true, "priority": "NORMAL"}),
            ),
            x509("t0", s, json!({})),
            (
                "object-add",
                json!({"qom-type": "tls-creds-x509", "id": "tc", "dir": certs.client.to_str().unwrap(), "endpoint": "client"}),
            ),
            (
                "object-add",
                json!({"qom-type": "authz-simple", "id": "a0"}),
            ),
            (
                "object-add",
                json!({"qom-type": "authz-simple", "id": "a0", "identity": CLIENT_DN}),
            ),
            (
                "object-add",
                json!({"qom-type": "authz-simple", "id": "t0", "identity": "x"}),
            ),
            start(json!({"tls-creds": "nope"})),
            start(json!({"tls-creds": "a0"})),
            start(json!({"tls-creds": "tc"})),
            start(json!({"tls-creds": "t0", "tls-authz": "a0"})),
            // QEMU lets both go while the server runs: it keeps its credentials.
            ("object-del", json!({"id": "t0"})),
            ("object-del", json!({"id": "a0"})),
            ("object-del", json!({"id": "t0"})),
            ("object-del", json!({})),
            ("nbd-server-stop", json!({})),
        ];
        for (c, a) in v.iter_mut() {
            if *c == "nbd-server-start" {
                a["addr"]["data"]["path"] = json!(sock);
            }
        }
        v
    };
    let d = Livesnapd::bare();
    let ours = replies(
        &mut d.qmp(),
        &cmds(d.dir.path().join("nbd.sock").to_str().unwrap()),
    );
    let qsd = Qsd::bare();
    let theirs = replies(
        &mut qsd.qmp(),
        &cmds(qsd.dir.path().join("nbd.sock").to_str().unwrap()),
    );
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "command {i}: {:?}", cmds("SOCK")[i]);
    }
    assert_eq!(ours.len(), theirs.len());

    // The one deliberate difference: QEMU starts a plain-text server when
    // given tls-authz without tls-creds; livesnapd refuses (docs/qmp.md).
    let mut q = d.qmp();
    q.ok(
        "object-add",
        json!({"qom-type": "authz-simple", "id": "a1", "identity": CLIENT_DN}),
    );
    let sock = d.dir.path().join("nbd.sock");
    let r = q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}, "tls-authz": "a1"}),
    );
    assert_eq!(
        r,
        Err((
            "GenericError".into(),
            "'tls-authz' requires 'tls-creds'".into()
        ))
    );
}

#[test]
fn qmp_configured_server_without_verify_peer_still_requires_tls() {
    let certs = Certs::make();
    let d = Livesnapd::bare();
    let image = sparse_file(d.dir.path().join("disk.img"), SIZE);
    let mut q = d.qmp();
    q.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": certs.server,
               "endpoint": "server", "verify-peer": false}),
    );
    let port = free_port();
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}},
               "tls-creds": "tls0"}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "disk",
               "file": {"driver": "file", "filename": image}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk", "writable": true}),
    );
    // Without verify-peer a client needs no certificate, but still TLS.
    assert_eq!(nbdinfo_size(&nbds(port, &certs.nocert)), Ok(SIZE));
    qemu_io_tls(
        port,
        &certs.nocert,
        &["write -P 0x77 0 64k", "read -P 0x77 0 64k"],
    );
    let plain = qemu_img_info(port, None);
    assert!(plain.is_err(), "plain-text client served: {plain:?}");
    // The credentials object can go while the server runs (as in QEMU):
    // the server keeps what it loaded.
    q.ok("object-del", json!({"id": "tls0"}));
    assert_eq!(nbdinfo_size(&nbds(port, &certs.client)), Ok(SIZE));
    q.ok("nbd-server-stop", json!({}));
}

/// Bytes a hostile client sends after STARTTLS's ACK instead of a TLS hello.
fn hostile_tls_input(i: u64) -> Vec<u8> {
    let junk = pattern(i, 1 + (i as usize * 37) % 600);
    match i % 5 {
        // Plain junk.
        0 => junk,
        // A handshake record header with a random length and junk after it.
        1 => {
            let mut v = vec![0x16, 0x03, 0x01];
            v.extend_from_slice(&((i as u16).wrapping_mul(911)).to_be_bytes());
            v.extend_from_slice(&junk);
            v
        }
        // A fatal alert.
        2 => vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
        // An application-data record before any handshake.
        3 => {
            let mut v = vec![0x17, 0x03, 0x03, 0x00, junk.len().min(255) as u8];
            v.extend_from_slice(&junk[..junk.len().min(255)]);
            v
        }
        // A second NBD option instead of TLS.
        _ => {
            let mut v = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
            v.extend_from_slice(&OPT_GO.to_be_bytes());
            v.extend_from_slice(&0u32.to_be_bytes());
            v
        }
    }
}

/// Runs [`SESSIONS`] hostile sessions against the TLS server on `port`,
/// with a good client checking the data in between: every hostile session
/// must be closed (after at most one TLS alert), the good client never fails.
fn hostile_sessions(who: &str, port: u16, certs: &Certs) {
    qemu_io_tls(port, &certs.client, &["write -P 0x5c 0 1M"]);
    for i in 0..SESSIONS {
        let mut c = RawClient::connect(port);
        c.send_option(OPT_STARTTLS, &[]);
        assert_eq!(c.reply().1, REP_ACK, "{who}: session {i}");
        // The server may close while we write: only its closing counts.
        let _ = c.0.write_all(&hostile_tls_input(i));
        // Ending its side makes an incomplete record an error now rather
        // than at the handshake limit (that case has its own test).
        let _ = c.0.shutdown(std::net::Shutdown::Write);
        if let Err(e) = c.closed() {
            // A TLS alert is the server's answer to some inputs; then it closes.
            assert!(e.contains("more bytes: [15"), "{who}: session {i}: {e}");
            assert_eq!(c.closed(), Ok(()), "{who}: session {i} after the alert");
        }
        if i % 100 == 99 {
            qemu_io_tls(port, &certs.client, &["read -P 0x5c 0 1M"]);
        }
    }
    assert_eq!(nbdinfo_size(&nbds(port, &certs.client)), Ok(SIZE), "{who}");
}

/// Hostile sessions per server in [`hostile_tls_sessions_end_only_themselves`].
const SESSIONS: u64 = 300;

#[test]
fn hostile_tls_sessions_end_only_themselves() {
    let certs = Certs::make();
    let (_dir, image, d, port) = tls_daemon(&certs, &[]);
    hostile_sessions("livesnapd", port, &certs);
    drop(d);
    // The same sessions against qemu-storage-daemon, for the record.
    let (_qsd, qport) = tls_qsd(&certs, &image, None);
    hostile_sessions("qemu-storage-daemon", qport, &certs);
}

/// A TLS client in Python's `ssl` that reads slowly: STARTTLS, GO, then
/// pipelined reads of the whole export it only starts reading after a
/// pause, in small pieces; checks every byte is `0x5a`.
const SLOW_TLS_READER: &str = r#"
import socket, ssl, struct, sys, time
port, creds, size, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
def rx(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("server closed after %d of %d bytes" % (len(b), n))
        b += c
    return b
rx(18)
s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 5, 0))
rx(20)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(creds + "/ca-cert.pem")
ctx.load_cert_chain(creds + "/client-cert.pem", creds + "/client-key.pem")
s = ctx.wrap_socket(s, server_hostname="localhost")
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 10) + struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
while True:
    _, _, typ, ln = struct.unpack(">QIII", rx(20))
    rx(ln)
    if typ == 1:
        break
    if typ & 0x80000000:
        raise SystemExit("GO refused: %x" % typ)
for i in range(count):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, size))
time.sleep(1)
for i in range(count):
    magic, err, handle = struct.unpack(">IIQ", rx(16))
    assert (magic, err, handle) == (0x67446698, 0, i), (magic, err, handle)
    got = 0
    while got < size:
        c = rx(min(64 << 10, size - got))
        assert c == b"\x5a" * len(c), "wrong byte in reply %d near %d" % (i, got)
        got += len(c)
        time.sleep(0.001)
print("ok")
"#;

#[test]
fn slow_tls_reader_gets_every_byte() {
    let certs = Certs::make();
    let (_dir, _image, d, port) = tls_daemon(&certs, &[]);
    qemu_io_tls(port, &certs.client, &[&format!("write -P 0x5a 0 {SIZE}")]);
    for round in 0..3 {
        let (st, out, err) = run_within(
            Command::new("python3").args([
                "-c",
                SLOW_TLS_READER,
                &port.to_string(),
                certs.client.to_str().unwrap(),
                &SIZE.to_string(),
                "2",
            ]),
            CLIENT_LIMIT,
        );
        assert!(
            st.success() && out.trim() == "ok",
            "round {round}: {st}\n{out}\n{err}"
        );
    }
    drop(d);
}
