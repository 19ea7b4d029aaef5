//! A real libvirtd and transient TCG domains booting the writer guest of
//! [`super::vm`], for the tests of livesnap's libvirt endpoint.
//!
//! The tests start `virtlogd -d` and `libvirtd -d` themselves when no
//! libvirtd answers on `qemu:///system` (CI has no service manager), and
//! stop what they started when the test process exits. Every domain is
//! transient (`virsh create`), named after the test process, and destroyed
//! when its [`Domain`] is dropped. Every `virsh` call is bounded.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::vm::{guest_assets, require, Console, GuestOpts, BOOT_TIMEOUT, CMDLINE};
use super::{run_within, wait_until_or};

/// The URI the tests use.
pub const URI: &str = "qemu:///system";

/// How long one `virsh` call may take (libvirt waits up to 30 s for a
/// domain's job lock itself).
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long libvirtd may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Daemons this process started, stopped at exit.
static STARTED: Mutex<Vec<(&'static str, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn stop_started() {
    let Ok(started) = STARTED.lock() else { return };
    // libvirtd first: it talks to virtlogd.
    for (name, pidfile) in started.iter().rev() {
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: a plain kill(2) of the daemon this process started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            eprintln!("libvirt harness: stopped the {name} it started (pid {pid})");
        }
    }
}

/// `virsh -c URI ARGS` within the bound: (success, stdout, stderr).
pub fn virsh(args: &[&str]) -> (bool, String, String) {
    let (st, out, err) = run_within(
        Command::new("virsh").arg("-c").arg(URI).args(args),
        VIRSH_TIMEOUT,
    );
    (st.success(), out, err)
}

/// `virsh` that must succeed; its stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    let (ok, out, err) = virsh(args);
    assert!(ok, "virsh {args:?} failed: {err}{out}");
    out
}

fn answers() -> bool {
    let (st, _, _) = run_within(
        Command::new("virsh").args(["-c", URI, "uri"]),
        Duration::from_secs(20),
    );
    st.success()
}

fn running(pidfile: &Path) -> bool {
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        // SAFETY: signal 0 only checks that the process exists.
        .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0)
}

fn start_daemon(name: &'static str, pidfile: &str) {
    let (st, out, err) = run_within(Command::new(name).arg("-d"), Duration::from_secs(30));
    assert!(st.success(), "{name} -d failed ({st}): {out}{err}");
    STARTED.lock().unwrap().push((name, PathBuf::from(pidfile)));
}

/// Makes sure a libvirtd answers on [`URI`], starting virtlogd and libvirtd
/// when none does (once per process).
pub fn require_libvirtd() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        require("virsh", "libvirt-clients");
        require("libvirtd", "libvirt-daemon-system");
        require("virtlogd", "libvirt-daemon-system");
        kvm_hint();
        if answers() {
            return;
        }
        // SAFETY: registers a plain function to run at process exit.
        unsafe { libc::atexit(stop_started) };
        if !running(Path::new("/run/virtlogd.pid")) {
            start_daemon("virtlogd", "/run/virtlogd.pid");
        }
        if !running(Path::new("/run/libvirtd.pid")) {
            start_daemon("libvirtd", "/run/libvirtd.pid");
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while !answers() {
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer on {URI} within {START_TIMEOUT:?} of its start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

/// libvirt probes QEMU with KVM when /dev/kvm exists, then finds it
/// unusable for its QEMU user and probes again on every lookup, which makes
/// each domain start take about a minute. Debian's udev rule gives /dev/kvm
/// to group kvm; without udev it stays root's alone.
fn kvm_hint() {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::metadata("/dev/kvm") {
        if m.mode() & 0o060 != 0o060 || m.gid() == 0 {
            eprintln!(
                "libvirt harness: /dev/kvm is not read-write for group kvm, so libvirt re-probes QEMU \
                 at every domain start (about a minute each): chgrp kvm /dev/kvm; chmod 0660 /dev/kvm \
                 (.ci/run does it, as Debian's udev rule would)"
            );
        }
    }
}

/// A disk of a test domain.
#[derive(Clone, Debug)]
pub struct DomainDisk {
    /// Its image.
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

/// A transient libvirt domain running the writer guest on one virtio disk
/// (`vda`), destroyed when dropped.
pub struct Domain {
    /// Its name.
    pub name: String,
    /// The guest's serial console (a file libvirt hands QEMU).
    pub console: Console,
    /// The disk.
    pub disk: DomainDisk,
    /// What the guest writes.
    pub guest: GuestOpts,
    /// When it was created.
    pub started: Instant,
    destroyed: bool,
    /// Held while the domain lives (see [`Domain::start`]).
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// A directory QEMU (running as libvirt's QEMU user) can reach.
pub fn shared_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn xml_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('<', "&lt;")
}

impl Domain {
    /// Creates and starts a transient domain on `disk`, its console in
    /// `dir`; returns once libvirt has started it (the guest boots on).
    ///
    /// One domain at a time: libvirt's QEMU driver handles every domain's
    /// events on one worker, and TCG guests on a two-core runner starve
    /// each other, so tests side by side measured each other's load (an
    /// abort's end event seen >10 s late), not livesnap.
    pub fn start(dir: &Path, disk: DomainDisk, guest: GuestOpts) -> Domain {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        require_libvirtd();
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "livesnap-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let a = guest_assets();
        let serial = dir.join(format!("{name}.serial"));
        // <acpi/>: without it libvirt 9.0 passes -no-acpi, which QEMU 10 refuses.
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{CMDLINE} {args}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{format}' cache='none'/>
      <source file='{path}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
",
            kernel = xml_attr(&a.kernel.to_string_lossy()),
            initrd = xml_attr(&a.initrd.to_string_lossy()),
            args = guest.kernel_args(),
            format = disk.format,
            path = xml_attr(&disk.path.to_string_lossy()),
            serial = xml_attr(&serial.to_string_lossy()),
        );
        let xml_path = dir.join(format!("{name}.xml"));
        std::fs::write(&xml_path, xml).unwrap();
        let started = Instant::now();
        virsh_ok(&["create", xml_path.to_str().unwrap()]);
        let took = started.elapsed();
        if took > Duration::from_secs(20) {
            eprintln!("libvirt harness: virsh create took {took:?} (see the /dev/kvm note above)");
        }
        Domain {
            name,
            console: Console { path: serial },
            disk,
            guest,
            started,
            destroyed: false,
            _turn: turn,
        }
    }

    /// `virsh ARGS DOMAIN-NAME REST`: the domain's name goes after `args`.
    pub fn virsh(&self, args: &[&str], rest: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.push(&self.name);
        all.extend_from_slice(rest);
        virsh_ok(&all)
    }

    /// The newest request the guest reported (panics if it reported a failure).
    pub fn last_written(&self) -> Option<u64> {
        self.console
            .last_written()
            .unwrap_or_else(|f| panic!("the guest failed: {f}\n{}", self.diagnostics()))
    }

    /// Waits until the guest reports request `n`; returns the newest it reported.
    pub fn wait_written(&self, n: u64, timeout: Duration) -> u64 {
        wait_until_or(
            timeout,
            &format!("the guest to write request {n}"),
            || self.last_written().is_some_and(|w| w >= n),
            || self.diagnostics(),
        );
        self.last_written().unwrap()
    }

    /// Waits for the guest to boot and to write each of its blocks once.
    pub fn boot(&self) -> Duration {
        let n = u64::from(self.guest.blocks) + 8;
        self.wait_written(n, BOOT_TIMEOUT);
        let t = self.started.elapsed();
        eprintln!(
            "libvirt: domain {} wrote request {n} {:.1} s after virsh create",
            self.name,
            t.as_secs_f64()
        );
        t
    }

    /// `virsh domblklist` (the disks and their sources).
    pub fn disks(&self) -> String {
        self.virsh(&["domblklist"], &[])
    }

    /// Panics unless the domain is as a finished snapshot must leave it: no
    /// domain job, no block job on vda, the disk list `disks_before`, the
    /// guest still running and writing.
    pub fn assert_as_it_was(&self, disks_before: &str) {
        let job = self.virsh(&["domjobinfo"], &[]);
        assert!(
            job.lines()
                .any(|l| l.starts_with("Job type:") && l.contains("None")),
            "a domain job is left on {}:\n{job}",
            self.name
        );
        let block = self.virsh(&["blockjob"], &["vda", "--info"]);
        assert!(
            block.trim().is_empty() || block.contains("No current block job"),
            "a block job is left on vda:\n{block}"
        );
        let xml = self.virsh(&["dumpxml"], &[]);
        assert!(!xml.contains("<mirror"), "a copy is still attached:\n{xml}");
        assert_eq!(self.disks(), disks_before, "the domain's disks changed");
        let now = self.last_written().unwrap_or(0);
        self.wait_written(now + 20, Duration::from_secs(60));
    }

    /// libvirt's log of the domain and the console's end, for failures.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- /var/log/libvirt/qemu/{name}.log (end) ---\n{}\n--- serial console (last 30 lines) ---\n{}",
            std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", self.name))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n"),
            self.console.tail(30),
            name = self.name,
        )
    }

    /// Destroys the domain (the guest's in-flight request may or may not land).
    pub fn destroy(&mut self) {
        if !self.destroyed {
            let (ok, _, _) = virsh(&["destroy", &self.name]);
            if !ok {
                // libvirtd may be gone (another test process that started it
                // exited first): its QEMU would run on with nobody to stop it.
                let pidfile = format!("/run/libvirt/qemu/{}.pid", self.name);
                if let Some(pid) = std::fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                {
                    // SAFETY: a plain kill(2) of this domain's QEMU, by the
                    // pid libvirt recorded for it.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    eprintln!(
                        "libvirt harness: virsh destroy {} failed; killed its QEMU (pid {pid})",
                        self.name
                    );
                }
            }
            self.destroyed = true;
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.destroy();
    }
}
