//! Failures and the exit codes they map to (documented in `--help` and the README).

use std::fmt;

/// Why a command failed; each kind is one exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 1: bad arguments, or a request the endpoint's state rules out before
    /// anything was changed (unknown disk, existing target, soft cancel
    /// before READY).
    Usage,
    /// 2: the endpoint could not be reached, refused a command, or stopped
    /// answering.
    Endpoint,
    /// 3: the job failed or ended other than as asked (error event, target
    /// failure, cancelled by someone else).
    Job,
    /// 4: the deadline expired.
    Deadline,
    /// 5: interrupted by SIGINT or SIGTERM.
    Interrupted,
    /// 6: the guest agent failed to freeze the guest's filesystems.
    GuestAgent,
    /// 7: a backup chain failed verification (a checksum, a file, a
    /// backing link, an image's consistency).
    Invalid,
}

impl Kind {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Kind::Usage => 1,
            Kind::Endpoint => 2,
            Kind::Job => 3,
            Kind::Deadline => 4,
            Kind::Interrupted => 5,
            Kind::GuestAgent => 6,
            Kind::Invalid => 7,
        }
    }

    /// A short name, used in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Usage => "usage",
            Kind::Endpoint => "endpoint",
            Kind::Job => "job",
            Kind::Deadline => "deadline",
            Kind::Interrupted => "interrupted",
            Kind::GuestAgent => "guest-agent",
            Kind::Invalid => "invalid",
        }
    }
}

/// A failure: its kind and a one-line reason.
#[derive(Clone, Debug)]
pub struct Failure {
    /// What kind of failure, hence the exit code.
    pub kind: Kind,
    /// One line, for the operator.
    pub reason: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: Kind, reason: impl Into<String>) -> Failure {
        Failure {
            kind,
            reason: reason.into(),
        }
    }

    /// Exit code 1.
    pub fn usage(reason: impl Into<String>) -> Failure {
        Failure::new(Kind::Usage, reason)
    }

    /// Exit code 2.
    pub fn endpoint(reason: impl Into<String>) -> Failure {
        Failure::new(Kind::Endpoint, reason)
    }

    /// Exit code 3.
    pub fn job(reason: impl Into<String>) -> Failure {
        Failure::new(Kind::Job, reason)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Failure>;

/// The exit-code table for `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  usage: bad arguments, unknown disk or job, target file exists, soft cancel before READY
  2  endpoint: cannot connect, a QMP command failed, the endpoint stopped answering
  3  job failed: error event, failing target, job cancelled or ended by someone else
  4  deadline expired (the job was force-cancelled and everything removed)
  5  interrupted by SIGINT/SIGTERM (the job was force-cancelled and everything removed)
  6  guest agent: freezing the guest's filesystems failed (--freeze)
  7  backup chain invalid: verify or restore found a bad checksum, a missing file or a broken link";
