//! NBD over TLS: X.509 credentials read from a directory the way QEMU's
//! `tls-creds-x509` object reads them, the server's rustls configuration,
//! and the authorization of a client by its certificate's distinguished name.
//!
//! The files and their names are QEMU's: `ca-cert.pem` (the CAs that sign
//! peers), `server-cert.pem` and `server-key.pem` (this server), and the
//! optional `ca-crl.pem`. With `verify-peer` a client must present a
//! certificate signed by one of the CAs; without it no certificate is asked
//! for, and (as in QEMU) no authorization check runs either.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use livesnap_block::os_error_text;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Which side of a TLS session credentials are for (QEMU's `endpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Credentials a server presents.
    Server,
    /// Credentials a client presents; an NBD server cannot use them.
    Client,
}

/// Why credentials could not be loaded; the texts are QEMU's.
#[derive(Debug)]
pub struct CredsError(String);

impl fmt::Display for CredsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CredsError {}

/// Loaded X.509 credentials (QEMU's `tls-creds-x509` object).
pub struct TlsCreds {
    dir: PathBuf,
    endpoint: Endpoint,
    verify_peer: bool,
    /// Built for server credentials only.
    server: Option<Arc<ServerConfig>>,
}

impl fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCreds")
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

/// QEMU's text for a file that cannot be opened, with the OS error's own words.
fn access_error(path: &Path, e: &io::Error) -> CredsError {
    CredsError(format!(
        "Unable to access credentials {}: {}",
        path.display(),
        os_error_text(e)
    ))
}

/// Reads `dir/name`, which must exist (QEMU checks existence first, then contents).
fn read_required(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), CredsError> {
    let path = dir.join(name);
    std::fs::read(&path)
        .map(|b| (path.clone(), b))
        .map_err(|e| access_error(&path, &e))
}

/// Reads `dir/name` if it is there.
fn read_optional(dir: &Path, name: &str) -> Result<Option<(PathBuf, Vec<u8>)>, CredsError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some((path, b))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(access_error(&path, &e)),
    }
}

/// Every certificate in a PEM file; none is an error.
fn certs(pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .ok()?;
    (!certs.is_empty()).then_some(certs)
}

impl TlsCreds {
    /// Loads the credentials in `dir` for `endpoint`, checking every file as
    /// QEMU does when the object is created (so a bad file fails `object-add`,
    /// not the first client).
    pub fn load(dir: &Path, endpoint: Endpoint, verify_peer: bool) -> Result<TlsCreds, CredsError> {
        let (ca_path, ca_pem) = read_required(dir, "ca-cert.pem")?;
        let server = match endpoint {
            Endpoint::Client => {
                if certs(&ca_pem).is_none() {
                    return Err(CredsError(format!(
                        "Unable to import CA certificate list {}",
                        ca_path.display()
                    )));
                }
                None
            }
            Endpoint::Server => Some(Arc::new(server_config(
                dir,
                &ca_path,
                &ca_pem,
                verify_peer,
            )?)),
        };
        Ok(TlsCreds {
            dir: dir.to_path_buf(),
            endpoint,
            verify_peer,
            server,
        })
    }

    /// The directory the files were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Which side these credentials are for.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Whether clients must present a certificate signed by the CA.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }
}

fn server_config(
    dir: &Path,
    ca_path: &Path,
    ca_pem: &[u8],
    verify_peer: bool,
) -> Result<ServerConfig, CredsError> {
    let ca_error = || {
        CredsError(format!(
            "Unable to import CA certificate list {}",
            ca_path.display()
        ))
    };
    let (cert_path, cert_pem) = read_required(dir, "server-cert.pem")?;
    let (key_path, key_pem) = read_required(dir, "server-key.pem")?;
    let crl = read_optional(dir, "ca-crl.pem")?;

    let mut roots = RootCertStore::empty();
    for ca in certs(ca_pem).ok_or_else(ca_error)? {
        roots.add(ca).map_err(|_| ca_error())?;
    }
    let chain = certs(&cert_pem).ok_or_else(|| {
        CredsError(format!(
            "Unable to import server certificate {}",
            cert_path.display()
        ))
    })?;
    let load_error = |why: &dyn fmt::Display| {
        CredsError(format!(
            "Cannot load certificate '{}' & key '{}': {why}",
            cert_path.display(),
            key_path.display()
        ))
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| load_error(&e))?;

    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| load_error(&e))?;
    let builder = if verify_peer {
        let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        if let Some((crl_path, crl_pem)) = crl {
            let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&crl_pem)
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    CredsError(format!(
                        "Unable to import CA revocation list {}",
                        crl_path.display()
                    ))
                })?;
            verifier = verifier.with_crls(crls);
        }
        let verifier = verifier.build().map_err(|e| {
            CredsError(format!(
                "Unable to import CA certificate list {}: {e}",
                ca_path.display()
            ))
        })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| load_error(&e))
}

/// Decides whether a client, named by its certificate's distinguished name,
/// may go on (QEMU's `tls-authz`). Asked at each connection, so a changed or
/// deleted authorization object counts from the next client on.
pub type Authorizer = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What a TLS server needs: its credentials and, optionally, who may connect.
#[derive(Clone)]
pub struct ServerTls {
    creds: Arc<TlsCreds>,
    acceptor: TlsAcceptor,
    authz: Option<Authorizer>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("creds", &self.creds)
            .field("authz", &self.authz.is_some())
            .finish()
    }
}

impl ServerTls {
    /// TLS with `creds`, which must be server credentials (QEMU's text otherwise).
    pub fn new(creds: Arc<TlsCreds>, authz: Option<Authorizer>) -> Result<ServerTls, CredsError> {
        let config = match (&creds.server, creds.endpoint) {
            (Some(c), Endpoint::Server) => c.clone(),
            _ => {
                return Err(CredsError(
                    "Expected TLS credentials for a server endpoint".into(),
                ))
            }
        };
        Ok(ServerTls {
            creds,
            acceptor: TlsAcceptor::from(config),
            authz,
        })
    }

    /// Runs the TLS handshake on `stream` and the authorization check.
    /// The caller bounds the time it may take.
    pub(crate) async fn accept<S>(&self, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = self.acceptor.accept(stream).await?;
        if let (true, Some(allowed)) = (self.creds.verify_peer, &self.authz) {
            // With verify-peer, rustls has already refused a client without a
            // valid certificate; the first one is the client's own.
            let dn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| distinguished_name(c.as_ref()));
            match dn {
                Some(dn) if allowed(&dn) => {}
                Some(dn) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("TLS x509 authz check for {dn} is denied"),
                    ))
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "TLS x509 authz check: no client certificate name",
                    ))
                }
            }
        }
        Ok(tls)
    }
}

/// One DER element: its tag and contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The subject of an X.509 certificate in DER, written as QEMU compares it
/// with `identity`: GnuTLS's `gnutls_x509_crt_get_dn` form, which keeps the
/// certificate's order (unlike RFC 4514, which reverses it), with `,` between
/// RDNs, `+` inside one, short names for the usual attributes and RFC 4514's
/// escaping; e.g. `C=GB,O=Example,CN=client` (qemu-storage-daemon 10.0.2
/// names the same certificate so in its denial message).
pub fn distinguished_name(cert: &[u8]) -> Option<String> {
    let (SEQUENCE, cert, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] version, when present.
    if rest.first() == Some(&0xa0) {
        rest = der(rest)?.2;
    }
    // serial, signature algorithm, issuer, validity: then the subject.
    for _ in 0..4 {
        rest = der(rest)?.2;
    }
    let (SEQUENCE, mut name, _) = der(rest)? else {
        return None;
    };
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (SET, mut set, next) = der(name)? else {
            return None;
        };
        name = next;
        let mut atvs = Vec::new();
        while !set.is_empty() {
            let (SEQUENCE, atv, next) = der(set)? else {
                return None;
            };
            set = next;
            let (OID, oid, value) = der(atv)? else {
                return None;
            };
            let (vtag, vbytes, _) = der(value)?;
            atvs.push(attribute(oid, vtag, vbytes, value));
        }
        rdns.push(atvs.join("+"));
    }
    Some(rdns.join(","))
}

/// `TYPE=value` for one attribute, as RFC 4514 asks.
fn attribute(oid: &[u8], tag: u8, value: &[u8], encoded: &[u8]) -> String {
    let name = match oid {
        [0x55, 0x04, 0x03] => "CN".to_string(),
        [0x55, 0x04, 0x06] => "C".to_string(),
        [0x55, 0x04, 0x07] => "L".to_string(),
        [0x55, 0x04, 0x08] => "ST".to_string(),
        [0x55, 0x04, 0x09] => "STREET".to_string(),
        [0x55, 0x04, 0x0a] => "O".to_string(),
        [0x55, 0x04, 0x0b] => "OU".to_string(),
        [0x55, 0x04, 0x05] => "serialNumber".to_string(),
        [0x55, 0x04, 0x0c] => "title".to_string(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".to_string(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".to_string(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "EMAIL".to_string(),
        _ => dotted(oid),
    };
    let text = match tag {
        // UTF8String, PrintableString, IA5String, NumericString, VisibleString
        0x0c | 0x13 | 0x16 | 0x12 | 0x1a => std::str::from_utf8(value).ok().map(str::to_string),
        // TeletexString: taken as Latin-1.
        0x14 => Some(value.iter().map(|&b| b as char).collect()),
        // BMPString: UCS-2, big-endian.
        0x1e if value.len().is_multiple_of(2) => String::from_utf16(
            &value
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
        )
        .ok(),
        _ => None,
    };
    match text {
        Some(t) => format!("{name}={}", escape(&t)),
        // Anything else is written as the hex of its DER encoding (RFC 4514 2.4).
        None => {
            let whole = &encoded[..encoded.len() - der(encoded).map_or(0, |d| d.2.len())];
            let hex: String = whole.iter().map(|b| format!("{b:02x}")).collect();
            format!("{name}=#{hex}")
        }
    }
}

fn dotted(oid: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut acc: u64 = 0;
    for &b in oid {
        acc = (acc << 7) | (b & 0x7f) as u64;
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (acc / 40).min(2);
                parts.push(first);
                parts.push(acc - first * 40);
            } else {
                parts.push(acc);
            }
            acc = 0;
        }
    }
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// RFC 4514's escaping of an attribute value.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_rfc4514() {
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape(" #x "), "\\ #x\\ ");
        assert_eq!(escape("#x"), "\\#x");
    }

    #[test]
    fn dotted_oid() {
        assert_eq!(
            dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            "1.2.840.113549"
        );
        assert_eq!(dotted(&[0x55, 0x04, 0x2a]), "2.5.4.42");
    }

    #[test]
    fn malformed_certificates_have_no_name() {
        assert_eq!(distinguished_name(&[]), None);
        assert_eq!(
            distinguished_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(distinguished_name(&[0x30, 0x02, 0x30, 0x00]), None);
    }
}
