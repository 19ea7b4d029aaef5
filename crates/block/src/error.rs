//! The one error type of the block layer and the jobs built on it: a kind a
//! caller can act on, the errno when the system gave one, and QEMU's exact
//! text for the same case (what QMP shows).

use std::fmt;
use std::io;

/// What went wrong, as far as a caller decides on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad argument or option, refused before anything changed.
    InvalidArgument,
    /// A node, job or file that is not there.
    NotFound,
    /// In use: a node with users, a job in a state that refuses the verb.
    Busy,
    /// Something this implementation does not do.
    Unsupported,
    /// An image whose metadata is not valid.
    Corrupt,
    /// An I/O error (the errno says which).
    Io,
    /// No space left (ENOSPC, EDQUOT): QEMU's `enospc` error policy.
    NoSpace,
    /// Cancelled before it could finish.
    Cancelled,
}

/// An error with its kind, its errno and QEMU's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    errno: Option<i32>,
    text: String,
}

/// Results of the block layer and the jobs.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind` with QEMU's `text`.
    pub fn new(kind: ErrorKind, text: impl Into<String>) -> Error {
        Error {
            kind,
            errno: None,
            text: text.into(),
        }
    }

    /// A bad argument.
    pub fn invalid(text: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, text)
    }

    /// Something missing.
    pub fn not_found(text: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, text)
    }

    /// Something in use.
    pub fn busy(text: impl Into<String>) -> Error {
        Error::new(ErrorKind::Busy, text)
    }

    /// Something not implemented.
    pub fn unsupported(text: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unsupported, text)
    }

    /// An invalid image.
    pub fn corrupt(text: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corrupt, text)
    }

    /// A cancelled operation ("Operation canceled", QEMU's ECANCELED text).
    pub fn cancelled() -> Error {
        Error {
            kind: ErrorKind::Cancelled,
            errno: Some(libc::ECANCELED),
            text: "Operation canceled".into(),
        }
    }

    /// An OS error, its text prefixed with `context` ("Could not open 'x'")
    /// as QEMU prints it: "context: strerror".
    pub fn io(context: impl fmt::Display, e: &io::Error) -> Error {
        let mut err = Error::from(e);
        err.text = format!("{context}: {}", err.text);
        err
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno, when the system gave one.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }

    /// QEMU's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The same error with `context: ` before its text.
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.text = format!("{context}: {}", self.text);
        self
    }

    /// An `io::Error` carrying this error's errno (EIO without one) and text,
    /// for paths that speak `io::Result`.
    pub fn to_io(&self) -> io::Error {
        match self.errno {
            Some(n) => io::Error::from_raw_os_error(n),
            None => io::Error::other(self.text.clone()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Error {}

/// An error equals a string with its text: what QMP shows is what tests check.
impl PartialEq<&str> for Error {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

/// QMP shows the text: where a layer speaks only text, the error becomes it.
impl From<Error> for String {
    fn from(e: Error) -> String {
        e.text
    }
}

impl From<&io::Error> for Error {
    fn from(e: &io::Error) -> Error {
        let errno = e.raw_os_error();
        let kind = match errno {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EINVAL) => ErrorKind::InvalidArgument,
            Some(libc::ENOTSUP) => ErrorKind::Unsupported,
            Some(libc::ECANCELED) => ErrorKind::Cancelled,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            errno,
            text: crate::os_error_text(e),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::from(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_errno_and_qemu_text() {
        let e = Error::io(
            "Could not open 'x'",
            &io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert_eq!(e.text(), "Could not open 'x': No such file or directory");
        let e = Error::from(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.to_io().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(Error::invalid("bad").to_string(), "bad");
    }
}
