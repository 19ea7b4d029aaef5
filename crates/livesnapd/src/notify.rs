//! Tells a service manager how start-up and shutdown go: systemd's
//! notification protocol (`Type=notify`), one datagram of `KEY=VALUE` lines
//! to the unix socket named by `NOTIFY_SOCKET`. Written here instead of
//! linking libsystemd: the protocol is one `sendto`, and the daemon stays a
//! single static binary that runs the same with or without systemd.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go; does nothing when not started by a service manager.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier for the socket in `NOTIFY_SOCKET`, or a silent one when it
    /// is unset or unusable (logged: a service manager then waits for READY
    /// in vain, which its start timeout reports).
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os(NOTIFY_SOCKET) else {
            return Notifier { target: None };
        };
        let name = name.to_string_lossy().into_owned();
        match Self::open(&name) {
            Ok(target) => Notifier {
                target: Some(target),
            },
            Err(e) => {
                tracing::warn!("{NOTIFY_SOCKET}={name} is not usable: {e}");
                Notifier { target: None }
            }
        }
    }

    fn open(name: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
        let addr = match name.strip_prefix('@') {
            // Linux's abstract namespace: the name without '@', no file.
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only unix socket paths and abstract names are supported",
                ))
            }
        };
        let sock = UnixDatagram::unbound()?;
        // A full queue at the manager must never stall the daemon.
        sock.set_nonblocking(true)?;
        Ok((sock, addr))
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines, e.g. `READY=1`).
    pub fn notify(&self, state: &str) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
            tracing::warn!("service manager notification {state:?} not sent: {e}");
        }
    }

    /// `READY=1` with a `STATUS=` line saying what serves where.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STOPPING=1`: the graceful shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// A `STATUS=` line alone (e.g. why start-up failed).
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }
}

/// A `STATUS=` value ends at the line's end: anything after a newline would
/// be read as another assignment.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_an_abstract_name_and_to_a_path() {
        let name = format!("livesnapd-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier {
            target: Some(Notifier::open(&format!("@{name}")).unwrap()),
        };
        n.ready("serving\nsecond line");
        assert_eq!(recv(&listener), "READY=1\nSTATUS=serving second line");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Notifier::open(path.to_str().unwrap()).unwrap()),
        };
        n.stopping("bye");
        assert_eq!(recv(&listener), "STOPPING=1\nSTATUS=bye");
    }

    #[test]
    fn refuses_what_is_neither_a_path_nor_abstract() {
        assert!(Notifier::open("vsock:2:1234").is_err());
        assert!(Notifier::open("relative/path").is_err());
    }
}
