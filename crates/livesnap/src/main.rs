//! `livesnap`: takes a live snapshot of a running VM's disk through any
//! endpoint people run — a QMP socket (livesnapd, qemu-storage-daemon,
//! qemu-system-*) or libvirt's API for libvirt-managed domains — keeps
//! incremental backup chains (backup, restore, verify), and the verbs an
//! operator needs around it (jobs, cancel, watch, nodes, create, info).
//!
//! This crate owns the orchestration only: it speaks QMP, libvirt's API and
//! the guest agent's protocol, and never touches a running disk's data
//! itself (restore and verify read backup images through the engine). It must end by
//! its deadline, never leave a node, job or partial file behind on failure,
//! never pivot the source onto the copy (`job-complete`), and never send a
//! soft cancel before READY.

mod backup;
mod chain;
mod demo;
mod disk;
mod endpoint;
mod error;
#[cfg(feature = "libvirt")]
mod libvirt;
mod progress;
mod qga;
mod report;
mod schema;
mod signals;
mod snapshot;
mod target;
mod units;
mod verbs;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use livesnap_block::ImageFormat;

use crate::endpoint::{Endpoint, CONNECT_TIMEOUT};
use crate::error::{Failure, EXIT_CODES_HELP};
use crate::signals::Interrupt;
use crate::snapshot::{CopyMode, EndpointArg, FreezeArg, MethodArg};
use crate::target::CreateVia;
use crate::wait::{Clock, Events};

const EXAMPLES: &str = "\
Examples:
  # snapshot node 'disk' of a livesnapd or qemu-storage-daemon to a qcow2 file
  livesnap snapshot --qmp /run/livesnapd.sock disk /backup/vm1.qcow2

  # a qemu-system VM started with -drive id=drive0: only its top layer, at most 5 minutes
  livesnap snapshot --qmp /run/vm1.qmp drive0 /backup/vm1-delta.qcow2 --shallow --deadline 5m

  # mirror method, 100 MiB/s, guest filesystems frozen around the instant, JSON report
  livesnap snapshot --qmp /run/vm1.qmp drive0 /backup/vm1.raw --format raw \\
      --method mirror --speed 100M --freeze /run/vm1-qga.sock --json

  # see the problem livesnap solves, and the fix, in about 30 seconds
  livesnap demo

  # a backup chain in /backup/vm1: the first run is full, later ones incremental
  livesnap backup --qmp /run/vm1.qmp drive0 /backup/vm1
  livesnap verify /backup/vm1
  livesnap restore /backup/vm1 --at 2 /images/vm1-as-of-backup-2.raw

  livesnap jobs --qmp /run/vm1.qmp
  livesnap watch --qmp /run/vm1.qmp
  livesnap create /images/new.qcow2 --format qcow2 --size 20G

  # a libvirt-managed VM (OpenStack, virt-manager...): disk vda, top layer only
  livesnap snapshot --libvirt instance-0000002a vda /backup/delta.qcow2 --shallow \\
      --method mirror --deadline 5m --json
  livesnap jobs --libvirt instance-0000002a";

#[derive(Parser)]
#[command(
    name = "livesnap",
    version,
    about = "Live disk snapshots of running VMs through QMP or libvirt, bounded by a deadline",
    after_help = format!("{EXAMPLES}\n\n{EXIT_CODES_HELP}"),
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Qcow2,
    Raw,
}

impl From<FormatArg> for ImageFormat {
    fn from(f: FormatArg) -> ImageFormat {
        match f {
            FormatArg::Qcow2 => ImageFormat::Qcow2,
            FormatArg::Raw => ImageFormat::Raw,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodChoice {
    /// copy-before-write backup: point in time at the start, work bounded by the disk size
    Backup,
    /// mirror to READY, then a soft cancel: point in time at the cancel
    Mirror,
    /// the best the endpoint supports (backup where it exists)
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
enum CopyModeChoice {
    /// every guest write also goes to the target, from the start
    WriteBlocking,
    /// livesnapd only: background, write-blocking once it stops converging
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
enum CreateChoice {
    /// blockdev-create where the endpoint has it, else locally
    Auto,
    /// always blockdev-create (the endpoint creates the file)
    Qmp,
    /// always here, with livesnap's own image writer
    Local,
}

impl From<CreateChoice> for CreateVia {
    fn from(c: CreateChoice) -> CreateVia {
        match c {
            CreateChoice::Auto => CreateVia::Auto,
            CreateChoice::Qmp => CreateVia::Qmp,
            CreateChoice::Local => CreateVia::Local,
        }
    }
}

/// How a verb that runs a job is bounded and reports.
#[derive(clap::Args, Clone, Copy)]
struct JobOpts {
    /// The whole operation must end by then (e.g. 30s, 10m, 1h)
    #[arg(long, value_parser = duration_arg, default_value = "10m")]
    deadline: Duration,
    /// Job speed limit in bytes per second (e.g. 100M)
    #[arg(long, value_parser = size_arg)]
    speed: Option<u64>,
    /// Print the final report as one JSON object
    #[arg(long)]
    json: bool,
    /// No progress output
    #[arg(long, short)]
    quiet: bool,
}

/// Where the disk is: a QMP socket, or a libvirt domain.
#[derive(clap::Args, Clone)]
struct EndpointOpts {
    /// QMP socket of the endpoint (livesnapd, qemu-storage-daemon, qemu-system-*)
    #[arg(
        long,
        value_name = "SOCKET",
        conflicts_with = "libvirt",
        required_unless_present = "libvirt"
    )]
    qmp: Option<PathBuf>,
    /// A libvirt-managed domain (name, UUID or id), through libvirt's API
    #[arg(long, value_name = "DOMAIN")]
    libvirt: Option<String>,
    /// libvirt URI [default: $LIBVIRT_DEFAULT_URI, else qemu:///system]
    #[arg(long, value_name = "URI", requires = "libvirt")]
    connect: Option<String>,
}

impl EndpointOpts {
    fn endpoint(&self) -> EndpointArg {
        match (&self.qmp, &self.libvirt) {
            (Some(q), _) => EndpointArg::Qmp(q.clone()),
            (None, Some(d)) => EndpointArg::Libvirt {
                domain: d.clone(),
                uri: self.connect.clone(),
            },
            // clap requires one of the two.
            (None, None) => EndpointArg::Qmp(PathBuf::new()),
        }
    }
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    units::parse_duration(s)
}

fn size_arg(s: &str) -> Result<u64, String> {
    units::parse_size(s)
}

#[derive(Subcommand)]
enum Cmd {
    /// Take a live snapshot of DISK into the new image TARGET
    #[command(after_help = format!("\
The point in time: backup = the disk as it was when the job started (between
the command and its reply); mirror = the disk when the soft cancel took effect
(between the cancel and BLOCK_JOB_COMPLETED). Progress goes to stderr (a bar on
a terminal, a line per second otherwise); the report goes to stdout. On the
deadline, an error or SIGINT/SIGTERM the job is force-cancelled, the target's
nodes and file are removed and the source is left as it was; the clean-up
itself is bounded (about 20 s).

{EXIT_CODES_HELP}"))]
    Snapshot {
        #[command(flatten)]
        at: EndpointOpts,
        /// The disk: a node name or a drive/device id (--qmp); a target name
        /// (vda) or source path (--libvirt)
        disk: String,
        /// The new image (must not exist)
        target: PathBuf,
        /// Target image format
        #[arg(long, value_enum, default_value = "qcow2")]
        format: FormatArg,
        /// Copy only the top layer; the target's backing file is the source's
        #[arg(long)]
        shallow: bool,
        /// Which job takes the snapshot
        #[arg(long, value_enum, default_value = "backup")]
        method: MethodChoice,
        #[command(flatten)]
        job: JobOpts,
        /// Freeze the guest's filesystems around the instant: with --qmp through
        /// qemu-guest-agent's socket QGA_SOCKET; with --libvirt through libvirt's
        /// agent (no value: write --freeze after TARGET or before another option)
        #[arg(long, value_name = "QGA_SOCKET", num_args = 0..=1)]
        freeze: Option<Option<PathBuf>>,
        /// The longest the guest may stay frozen; it is thawed then whatever happens
        #[arg(long, value_parser = duration_arg, default_value = "10s")]
        freeze_hold: Duration,
        /// Backup: a copy-before-write slower than this many seconds breaks the
        /// snapshot instead of stalling the guest (where the endpoint supports it)
        #[arg(long, default_value_t = 30)]
        cbw_timeout: u32,
        /// Mirror copy mode (default: the best the endpoint has: livesnapd's
        /// auto, else background switched to write-blocking, else write-blocking)
        #[arg(long, value_enum)]
        copy_mode: Option<CopyModeChoice>,
        /// Where the target image is created
        #[arg(long, value_enum, default_value = "auto")]
        create_via: CreateChoice,
        /// Test hook: JSON list of blkdebug inject-error rules under the target
        #[arg(long, hide = true)]
        x_target_blkdebug: Option<String>,
    },
    /// Add a backup of DISK to the chain in DIR: full into an empty DIR,
    /// else incremental (only what changed since the last backup)
    #[command(after_help = format!("\
The first backup into an empty DIR is full and starts the disk's change
tracking (a dirty bitmap, or a libvirt checkpoint) at the backup's instant;
each later one is a qcow2 holding only what changed since the previous
backup, backed by it (relative names: DIR can move). DIR/manifest.json lists
every backup (point in time, size, bytes copied, sha256). A failed or
interrupted run leaves DIR and the change tracking as they were. If the
change tracking was lost (the VM restarted without it, a crash), the backup
fails and says so: --full then starts a new full backup in the chain.

{EXIT_CODES_HELP}"))]
    Backup {
        #[command(flatten)]
        at: EndpointOpts,
        /// The disk: a node name or a drive/device id (--qmp); a target name
        /// (vda) or source path (--libvirt)
        disk: String,
        /// The chain's directory (created if missing)
        dir: PathBuf,
        /// A new full backup, even where an incremental one is possible
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        job: JobOpts,
        /// Where the backup image is created (QMP endpoints)
        #[arg(long, value_enum, default_value = "auto")]
        create_via: CreateChoice,
    },
    /// Write the disk as of backup N of the chain in DIR to a new IMAGE
    Restore {
        /// The chain's directory
        dir: PathBuf,
        /// The new image (must not exist)
        image: PathBuf,
        /// Which backup (default: the last)
        #[arg(long, value_name = "N")]
        at: Option<u64>,
        /// The image's format
        #[arg(long, value_enum, default_value = "raw")]
        format: FormatArg,
        /// The whole restore must end by then
        #[arg(long, value_parser = duration_arg, default_value = "1h")]
        deadline: Duration,
        /// Print the report as one JSON object
        #[arg(long)]
        json: bool,
        /// No progress output
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check every backup of the chain in DIR: files, sizes, checksums,
    /// backing links, each image's consistency (exit code 7 on any problem)
    Verify {
        /// The chain's directory
        dir: PathBuf,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// List the endpoint's jobs
    Jobs {
        #[command(flatten)]
        at: EndpointOpts,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job (a soft cancel only in READY; --force abandons it)
    Cancel {
        #[command(flatten)]
        at: EndpointOpts,
        /// Job id (--libvirt: the disk of a block job, e.g. vda, or `backup`
        /// for the domain's backup job)
        job: String,
        /// Abandon the job now, whatever its state
        #[arg(long)]
        force: bool,
        /// How long to wait for the job's end event
        #[arg(long, value_parser = duration_arg, default_value = "30s")]
        wait: Duration,
    },
    /// Stream the endpoint's events until interrupted
    Watch {
        #[command(flatten)]
        at: EndpointOpts,
        /// Print each event as the endpoint's JSON
        #[arg(long)]
        json: bool,
        /// Stop after this many events
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long
        #[arg(long = "for", value_parser = duration_arg)]
        for_: Option<Duration>,
    },
    /// Show the block graph: nodes, devices and exports
    Nodes {
        /// QMP socket of the endpoint
        #[arg(long)]
        qmp: PathBuf,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Create a local raw or qcow2 image
    Create {
        /// The new image
        path: PathBuf,
        /// Image format
        #[arg(long, value_enum)]
        format: FormatArg,
        /// Virtual size (e.g. 20G); with --backing, default the backing file's
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        /// Backing file (qcow2 only)
        #[arg(long, requires = "backing_format")]
        backing: Option<String>,
        /// Format of the backing file (formats are never probed)
        #[arg(long, requires = "backing")]
        backing_format: Option<String>,
        /// qcow2 cluster size (default 64K)
        #[arg(long, value_parser = size_arg)]
        cluster_size: Option<u64>,
    },
    /// The seed problem and its fix: an embedded livesnapd, a busy guest,
    /// Nova's algorithm (which does not finish), then a verified live snapshot
    Demo {
        /// Size of the demo disk
        #[arg(long, value_parser = size_arg, default_value = "64M")]
        size: u64,
        /// Copy speed for both Nova's mirror and the snapshot
        #[arg(long, value_parser = size_arg, default_value = "16M")]
        speed: u64,
        /// How long Nova's algorithm is given
        #[arg(long, value_parser = duration_arg, default_value = "10s")]
        nova_deadline: Duration,
        /// Keep the demo's files in this directory (default: a temporary one, removed)
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Show what the endpoint is and which snapshot methods it supports
    Info {
        #[command(flatten)]
        at: EndpointOpts,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

async fn connect(qmp: &std::path::Path) -> Result<Endpoint, Failure> {
    Endpoint::connect(qmp, CONNECT_TIMEOUT).await
}

/// A verb's endpoint, connected.
enum Conn {
    Qmp(Box<Endpoint>),
    #[cfg(feature = "libvirt")]
    Libvirt(libvirt::Libvirt),
}

async fn open(at: &EndpointOpts) -> Result<Conn, Failure> {
    match at.endpoint() {
        EndpointArg::Qmp(q) => Ok(Conn::Qmp(Box::new(connect(&q).await?))),
        #[cfg(feature = "libvirt")]
        EndpointArg::Libvirt { domain, uri } => {
            let uri = libvirt::resolve_uri(uri.as_deref());
            Ok(Conn::Libvirt(
                libvirt::Libvirt::open(&uri, &domain, CONNECT_TIMEOUT).await?,
            ))
        }
        #[cfg(not(feature = "libvirt"))]
        EndpointArg::Libvirt { .. } => Err(snapshot::without_libvirt()),
    }
}

/// `--freeze [QGA_SOCKET]` for the endpoint: a socket with --qmp, none with --libvirt.
fn freeze_arg(f: Option<Option<PathBuf>>, libvirt: bool) -> Result<Option<FreezeArg>, Failure> {
    match f {
        None => Ok(None),
        Some(Some(p)) if libvirt => Err(Failure::usage(format!(
            "with --libvirt, --freeze takes no QGA_SOCKET (libvirt owns the guest agent), but `{}` was read as one: write --freeze after TARGET",
            p.display()
        ))),
        Some(Some(p)) => Ok(Some(FreezeArg::Qga(p))),
        Some(None) if libvirt => Ok(Some(FreezeArg::Endpoint)),
        Some(None) => Err(Failure::usage(
            "--freeze needs the guest agent's socket with --qmp: --freeze QGA_SOCKET",
        )),
    }
}

/// Prints a finished verb's report on stdout: one JSON object with
/// --json, else lines for a person unless --quiet.
fn print_report<J: std::fmt::Display>(
    json: bool,
    quiet: bool,
    as_json: impl FnOnce() -> J,
    human: impl FnOnce() -> String,
) {
    if json {
        println!("{}", as_json());
    } else if !quiet {
        print!("{}", human());
    }
}

async fn run(cmd: Cmd) -> Result<(), (Failure, bool)> {
    match cmd {
        Cmd::Snapshot {
            at,
            disk,
            target,
            format,
            shallow,
            method,
            job,
            freeze,
            freeze_hold,
            cbw_timeout,
            copy_mode,
            create_via,
            x_target_blkdebug,
        } => {
            let json = job.json;
            let blkdebug = match x_target_blkdebug {
                Some(s) => Some(
                    serde_json::from_str(&s)
                        .map_err(|e| (Failure::usage(format!("--x-target-blkdebug: {e}")), json))?,
                ),
                None => None,
            };
            let freeze = freeze_arg(freeze, at.libvirt.is_some()).map_err(|f| (f, json))?;
            let opts = snapshot::Options {
                endpoint: at.endpoint(),
                disk,
                target,
                format: format.into(),
                shallow,
                method: match method {
                    MethodChoice::Backup => MethodArg::Backup,
                    MethodChoice::Mirror => MethodArg::Mirror,
                    MethodChoice::Auto => MethodArg::Auto,
                },
                deadline: job.deadline,
                speed: job.speed,
                freeze,
                freeze_hold,
                cbw_timeout,
                copy_mode: copy_mode.map(|m| match m {
                    CopyModeChoice::WriteBlocking => CopyMode::WriteBlocking,
                    CopyModeChoice::Auto => CopyMode::Auto,
                }),
                create_via: create_via.into(),
                target_blkdebug: blkdebug,
                quiet: job.quiet,
            };
            let r = snapshot::run(&opts, Interrupt::install())
                .await
                .map_err(|f| (f, json))?;
            print_report(json, job.quiet, || r.to_json(), || r.human());
            Ok(())
        }
        Cmd::Backup {
            at,
            disk,
            dir,
            full,
            job,
            create_via,
        } => {
            let opts = backup::Options {
                endpoint: at.endpoint(),
                disk,
                dir,
                full,
                deadline: job.deadline,
                speed: job.speed,
                create_via: create_via.into(),
                quiet: job.quiet,
            };
            let r = backup::run(&opts, Interrupt::install())
                .await
                .map_err(|f| (f, job.json))?;
            print_report(job.json, job.quiet, || r.to_json(), || r.human());
            Ok(())
        }
        Cmd::Restore {
            dir,
            image,
            at,
            format,
            deadline,
            json,
            quiet,
        } => {
            let r = verbs::restore::run(
                &dir,
                at,
                &image,
                format.into(),
                deadline,
                quiet,
                Interrupt::install(),
            )
            .await
            .map_err(|f| (f, json))?;
            print_report(json, quiet, || &r, || verbs::restore::human(&r));
            Ok(())
        }
        Cmd::Verify { dir, json } => verbs::verify::run(&dir, json).await.map_err(|f| {
            // With --json the findings are the report already.
            let printed = f.kind == error::Kind::Invalid;
            (f, json && !printed)
        }),
        Cmd::Jobs { at, json } => {
            let r = match open(&at).await {
                Ok(Conn::Qmp(mut ep)) => verbs::jobs::run(&mut ep, json).await,
                #[cfg(feature = "libvirt")]
                Ok(Conn::Libvirt(lv)) => verbs::jobs::run_libvirt(&lv, json).await,
                Err(f) => Err(f),
            };
            r.map_err(|f| (f, json))
        }
        Cmd::Cancel {
            at,
            job,
            force,
            wait,
        } => {
            let mut clock = Clock::new(wait, Interrupt::install());
            let r = match open(&at).await {
                Ok(Conn::Qmp(mut ep)) => verbs::cancel::run(&mut ep, &mut clock, &job, force).await,
                #[cfg(feature = "libvirt")]
                Ok(Conn::Libvirt(mut lv)) => {
                    verbs::cancel::run_libvirt(&mut lv, &mut clock, &job, force).await
                }
                Err(f) => Err(f),
            };
            r.map_err(|f| (f, false))
        }
        Cmd::Watch {
            at,
            json,
            count,
            for_,
        } => {
            // Without --for, only a signal, --count or the endpoint ends it.
            let limit = for_.unwrap_or(Duration::from_secs(100 * 365 * 86400));
            let mut clock = Clock::new(limit, Interrupt::install());
            let r = match open(&at).await {
                Ok(Conn::Qmp(mut ep)) => {
                    verbs::watch::run(Events::Qmp(&mut ep), &mut clock, json, count).await
                }
                #[cfg(feature = "libvirt")]
                Ok(Conn::Libvirt(mut lv)) => {
                    verbs::watch::run(Events::Libvirt(&mut lv), &mut clock, json, count).await
                }
                Err(f) => Err(f),
            };
            r.map_err(|f| (f, false))
        }
        Cmd::Nodes { qmp, json } => {
            let mut ep = connect(&qmp).await.map_err(|f| (f, json))?;
            verbs::nodes::run(&mut ep, json)
                .await
                .map_err(|f| (f, json))
        }
        Cmd::Create {
            path,
            format,
            size,
            backing,
            backing_format,
            cluster_size,
        } => verbs::create::run(
            &path,
            format.into(),
            size,
            backing.zip(backing_format),
            cluster_size,
        )
        .await
        .map_err(|f| (f, false)),
        Cmd::Demo {
            size,
            speed,
            nova_deadline,
            dir,
        } => demo::run(&demo::DemoOptions {
            size,
            speed,
            nova_deadline,
            dir,
        })
        .await
        .map_err(|f| (f, false)),
        Cmd::Info { at, json } => {
            let r = match open(&at).await {
                Ok(Conn::Qmp(mut ep)) => verbs::info::run(&mut ep, json).await,
                #[cfg(feature = "libvirt")]
                Ok(Conn::Libvirt(lv)) => verbs::info::run_libvirt(&lv, json).await,
                Err(f) => Err(f),
            };
            r.map_err(|f| (f, json))
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not failures; usage errors are code 1.
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Several threads: `livesnap demo` runs a whole daemon in this process.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("livesnap: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((f, json)) => {
            if json {
                println!("{}", report::failure_json(&f));
            }
            eprintln!("livesnap: {}", f.reason);
            ExitCode::from(f.kind.code())
        }
    }
}
