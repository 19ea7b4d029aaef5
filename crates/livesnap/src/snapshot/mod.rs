//! `livesnap snapshot`: one live, point-in-time copy of a running VM's disk,
//! through whichever endpoint owns the disk. The orchestration for each
//! endpoint is its own module ([`qmp`]: livesnapd, qemu-storage-daemon,
//! qemu-system; [`libvirt`]: libvirt-managed domains); what they share
//! lives here and in [`quiesce`]: the options, the target checks, and the
//! rules every endpoint keeps.
//!
//! Every flow ends by its deadline; on a deadline, an error or a signal it
//! stops the job, removes what it created and leaves the source as it was.
//! It never pivots the source onto the copy and never asks for a soft cancel
//! before READY (QEMU treats that as a force cancel: the copy would be
//! abandoned, not finished).

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod qmp;
pub mod quiesce;

use std::path::{Path, PathBuf};
use std::time::Duration;

use livesnap_block::ImageFormat;
use serde_json::Value;

use crate::error::{Failure, Kind, Result};
use crate::report::Report;
use crate::signals::Interrupt;
use crate::target::CreateVia;

/// Which job takes the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// Copy-before-write backup: point in time at the start.
    Backup,
    /// Mirror, then a soft cancel in READY: point in time at the cancel.
    Mirror,
    /// The best the endpoint supports.
    Auto,
}

/// A mirror copy mode the operator may ask for; a plain background mirror
/// is not among them (it may never converge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// QEMU's default: guest writes only mark chunks dirty. livesnap starts
    /// in it only where it can switch to write-blocking at run time.
    Background,
    /// Every guest write also goes to the target, from the start.
    WriteBlocking,
    /// livesnapd's: background, write-blocking once it stops converging.
    Auto,
}

impl CopyMode {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
            CopyMode::Auto => "auto",
        }
    }
}

/// What a copy takes of the disk: QEMU's `MirrorSyncMode` members livesnap uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// The whole disk, backing chain included.
    Full,
    /// The top layer only (over the same backing file).
    Top,
}

impl SyncMode {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
        }
    }
}

/// Where the disk is.
#[derive(Clone, Debug)]
pub enum EndpointArg {
    /// A QMP socket (livesnapd, qemu-storage-daemon, qemu-system-*).
    Qmp(PathBuf),
    /// A libvirt domain.
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    Libvirt {
        /// Name, UUID or id.
        domain: String,
        /// `--connect`, when given.
        uri: Option<String>,
    },
}

/// Which guest agent quiesces the guest (`--freeze`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FreezeArg {
    /// qemu-guest-agent's socket, spoken to directly (QMP endpoints).
    Qga(PathBuf),
    /// The agent the endpoint owns (libvirt's `virDomainFSFreeze`).
    Endpoint,
}

/// Everything `livesnap snapshot` was asked.
#[derive(Clone, Debug)]
pub struct Options {
    /// The endpoint.
    pub endpoint: EndpointArg,
    /// Node name or drive/device id (QMP); target name or source path (libvirt).
    pub disk: String,
    /// Target image path.
    pub target: PathBuf,
    /// Target format.
    pub format: ImageFormat,
    /// Only the top layer, backed by the source's backing file.
    pub shallow: bool,
    /// Method.
    pub method: MethodArg,
    /// The whole operation's bound.
    pub deadline: Duration,
    /// Job speed limit, bytes per second.
    pub speed: Option<u64>,
    /// Freeze the guest's filesystems around the instant, and with what.
    pub freeze: Option<FreezeArg>,
    /// The longest the guest may stay frozen.
    pub freeze_hold: Duration,
    /// Backup `cbw-timeout` in seconds, where the endpoint takes it.
    pub cbw_timeout: u32,
    /// Where the target is created.
    pub create_via: CreateVia,
    /// Mirror copy mode, when not the best the endpoint has.
    pub copy_mode: Option<CopyMode>,
    /// Test hook: `inject-error` rules for a blkdebug node under the target.
    pub target_blkdebug: Option<Value>,
    /// No progress output.
    pub quiet: bool,
}

/// Runs `livesnap snapshot` through the endpoint `opts` names.
pub async fn run(opts: &Options, interrupt: Interrupt) -> Result<Report> {
    if opts.shallow && opts.format == ImageFormat::Raw {
        return Err(Failure::usage(
            "--shallow needs a qcow2 target: a raw image has no backing file",
        ));
    }
    match &opts.endpoint {
        EndpointArg::Qmp(path) => qmp::run(path, opts, interrupt).await,
        #[cfg(feature = "libvirt")]
        EndpointArg::Libvirt { domain, uri } => {
            libvirt::run(domain, uri.as_deref(), opts, interrupt).await
        }
        #[cfg(not(feature = "libvirt"))]
        EndpointArg::Libvirt { .. } => Err(without_libvirt()),
    }
}

/// The failure of `--libvirt` in a build without libvirt.
#[cfg(not(feature = "libvirt"))]
pub fn without_libvirt() -> Failure {
    Failure::usage(
        "this livesnap was built without libvirt: rebuild with `cargo build --release -p livesnap --features libvirt` (needs libvirt-dev)",
    )
}

/// Appends where it happened to a deadline or interrupt reason.
pub fn during(f: Failure, what: &str) -> Failure {
    match f.kind {
        Kind::Deadline | Kind::Interrupted => {
            Failure::new(f.kind, format!("{} while {what}", f.reason))
        }
        _ => f,
    }
}

/// `p` as an absolute path: a relative one is taken from livesnap's
/// current directory (an endpoint has its own).
pub fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()
        .map_err(|e| Failure::usage(format!("current directory: {e}")))?
        .join(p))
}

/// The target as an absolute path in an existing directory, not yet there
/// (livesnap never overwrites a file).
pub fn new_target_path(p: &Path) -> Result<PathBuf> {
    let abs = absolute(p)?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        return Err(Failure::usage(format!(
            "target directory {} does not exist",
            parent.display()
        )));
    }
    if abs.symlink_metadata().is_ok() {
        return Err(Failure::usage(format!(
            "target {} exists; livesnap never overwrites a file",
            abs.display()
        )));
    }
    Ok(abs)
}

/// A failed run's reason after its clean-up: how the job was stopped
/// (`stopped`), then what is as it was (`intact`) if nothing is left, else
/// what is LEFT BEHIND and what becomes of it (`then`).
pub fn after_cleanup(
    f: Failure,
    stopped: Option<&str>,
    left: &[String],
    intact: &str,
    then: &str,
) -> Failure {
    let mut reason = f.reason;
    if let Some(how) = stopped {
        reason += &format!("; {how}");
    }
    if left.is_empty() {
        reason += intact;
    } else {
        reason += &format!("; LEFT BEHIND: {}{then}", left.join(", "));
    }
    Failure::new(f.kind, reason)
}

/// The reason of a failed snapshot after its clean-up: what was undone, or
/// what is left behind.
pub fn failure_after_cleanup(
    f: Failure,
    cancelled: Option<&str>,
    left: &[String],
    file_created: bool,
) -> Failure {
    let intact = if file_created {
        ", target removed, source untouched"
    } else {
        ", source untouched"
    };
    after_cleanup(f, cancelled, left, intact, "")
}

/// Removes the partial target file, if it is there; what is left otherwise.
pub fn remove_target_file(path: &Path) -> Option<String> {
    if path.symlink_metadata().is_err() {
        return None;
    }
    std::fs::remove_file(path)
        .err()
        .map(|e| format!("file {} ({e})", path.display()))
}
