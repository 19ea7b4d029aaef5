//! A real VM for the end-to-end tests: qemu-system-x86_64 under TCG booting a
//! Debian cloud kernel with a busybox initramfs whose init writes
//! self-describing records to its disk (`tests/vm/init.sh`).
//!
//! The guest is built by the test itself from Debian packages, cached under
//! `<target dir>/vm-guest/`: the kernel package that `linux-image-cloud-amd64`
//! depends on is fetched with `apt-get download` and unpacked with
//! `dpkg-deb -x`; the initramfs (a newc cpio written here) holds the static
//! busybox of busybox-static, the virtio modules the disk needs and the init
//! script.
//!
//! The writer's requests are strictly sequential and each names itself, so the
//! disk after request N is known exactly ([`GuestOpts::find_request`]), and
//! its progress lines on the serial port bound N from both sides
//! ([`Vm::last_written`]).
//!
//! Every wait is bounded and a [`Vm`] kills its QEMU when dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{monotonic_ns, run_within, Qmp};

/// Bytes per guest request, and per record block on the disk.
pub const BLOCK: usize = 4096;
/// One line of a record; a block repeats it `BLOCK / LINE` times.
const LINE: usize = 64;
const MAGIC: &[u8] = b"LSNPVM01 ";

/// Under a loaded 2-core machine a TCG boot that takes 2-3 s alone has been
/// seen to take 10 s; past this something is broken, not slow.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `apt-get update` / `apt-get download` may take.
const APT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long QEMU may take to open its QMP socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest's init script.
pub const INIT_SH: &str = include_str!("../vm/init.sh");

/// The metapackage whose dependency is the kernel the guest boots: Debian's
/// smallest kernel flavour, with virtio as modules.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// Kernel modules the disk needs, each loaded after what it depends on. The
/// two `_dev` helpers exist only in newer kernels; a module the kernel has
/// built in is skipped.
const MODULES: &[(&str, bool)] = &[
    ("virtio_ring", true),
    ("virtio", true),
    ("virtio_pci_modern_dev", false),
    ("virtio_pci_legacy_dev", false),
    ("virtio_pci", true),
    ("virtio_blk", true),
];

/// Kernel command line before the writer's own arguments. Besides the
/// console set-up, the options skip work that costs seconds under TCG
/// (speculation mitigations, TSC refinement, crypto self-tests, probing
/// of three UARTs that do not exist); `printk.devkmsg=on` lifts the rate limit
/// on the guest's progress lines.
pub const CMDLINE: &str = "console=ttyS0 quiet panic=-1 rdinit=/init printk.devkmsg=on \
                       mitigations=off tsc=reliable no_timer_check lpj=5000000 \
                       8250.nr_uarts=1 cryptomgr.notests";

/// Fails the test unless `tool` is on PATH, naming the package to install.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{tool}`: apt-get install -y {package} (.ci/run installs it)"
    );
}

/// Fails the test unless qemu-system-x86_64 is there.
pub fn require_qemu_system() {
    require(
        "qemu-system-x86_64",
        "qemu-system-x86 (on Debian 12: -t bookworm-backports, for QEMU 10)",
    );
}

// ---------------------------------------------------------------------------
// Guest assets.

/// The kernel and initramfs of the writer guest.
#[derive(Debug)]
pub struct GuestAssets {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The newc initramfs.
    pub initrd: PathBuf,
    /// The Debian package the kernel came from, as `name=version`.
    pub package: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
}

/// Builds the guest once per test process; the kernel is cached across runs.
pub fn guest_assets() -> &'static GuestAssets {
    static ASSETS: OnceLock<GuestAssets> = OnceLock::new();
    ASSETS.get_or_init(build_guest)
}

/// `<target dir>/vm-guest`, which follows CARGO_TARGET_DIR.
fn cache_root() -> PathBuf {
    crate::profile_dir()
        .parent()
        .expect("target directory")
        .join("vm-guest")
}

fn build_guest() -> GuestAssets {
    require("apt-get", "apt");
    require("apt-cache", "apt");
    require("dpkg-deb", "dpkg");
    let busybox = static_busybox();
    let root = cache_root();
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
    let (package, kdir) = cached_kernel(&root);
    let order = std::fs::read_to_string(kdir.join("modules.order-load")).unwrap();
    let modules: Vec<String> = order.lines().map(str::to_string).collect();

    let initrd = kdir.join("initrd.cpio");
    let image = initramfs(&busybox, &kdir, &modules);
    // Test binaries build the guest concurrently: the content is the same for
    // all, and a rename never shows a half-written file.
    if std::fs::read(&initrd).ok().as_deref() != Some(&image[..]) {
        let tmp = tempfile::NamedTempFile::new_in(&kdir).unwrap();
        std::fs::write(tmp.path(), &image).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        tmp.persist(&initrd)
            .unwrap_or_else(|e| panic!("write {}: {e}", initrd.display()));
    }
    GuestAssets {
        kernel: kdir.join("vmlinuz"),
        initrd,
        package,
        modules,
    }
}

/// busybox-static's binary; the dynamic one of package busybox has the same
/// path but cannot run in an initramfs without a libc.
fn static_busybox() -> Vec<u8> {
    let path = Path::new("/bin/busybox");
    let hint = "the guest needs a static /bin/busybox: apt-get install -y busybox-static (.ci/run installs it)";
    let bin = std::fs::read(path).unwrap_or_else(|e| panic!("{hint} ({e})"));
    assert!(!elf_has_interp(&bin), "{hint} (/bin/busybox is dynamic)");
    bin
}

/// True if an ELF64 file names a program interpreter (is dynamically linked).
fn elf_has_interp(b: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return true;
    }
    let phoff = u64le(b, 0x20) as usize;
    let phentsize = u16le(b, 0x36) as usize;
    let phnum = u16le(b, 0x38) as usize;
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        at + 4 <= b.len() && u32le(b, at) == PT_INTERP
    })
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The cached kernel directory for the current candidate of the kernel
/// package (vmlinuz, the modules, their load order), fetching it if needed.
/// Returns (`name=version`, directory).
fn cached_kernel(root: &Path) -> (String, PathBuf) {
    // Package lists can be missing or older than the mirror (which keeps only
    // the newest kernel of a release): one `apt-get update` and a retry.
    let mut updated = false;
    loop {
        let (name, version) = match resolve_kernel() {
            Ok(p) => p,
            Err(e) if !updated => {
                eprintln!("vm: {e}; running apt-get update");
                apt_update();
                updated = true;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let package = format!("{name}={version}");
        let dir = root.join(format!("{name}_{version}"));
        if dir.join("modules.order-load").is_file() {
            return (package, dir);
        }
        match fetch_kernel(root, &name, &version, &dir) {
            Ok(()) => return (package, dir),
            Err(e) if !updated => {
                eprintln!("vm: {e}; running apt-get update");
                apt_update();
                updated = true;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The versioned kernel package that the metapackage's candidate depends on.
fn resolve_kernel() -> Result<(String, String), String> {
    let (st, out, err) = run_within(
        Command::new("apt-cache").args(["show", "--no-all-versions", KERNEL_META]),
        Duration::from_secs(60),
    );
    if !st.success() {
        return Err(format!("apt-cache show {KERNEL_META} failed: {err}"));
    }
    let depends = out
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .ok_or_else(|| format!("{KERNEL_META} has no Depends: {out}"))?;
    // "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
    for dep in depends.split([',', '|']) {
        let dep = dep.trim();
        let name = dep.split_whitespace().next().unwrap_or_default();
        if !name.starts_with("linux-image-") {
            continue;
        }
        let version = dep
            .split_once("(=")
            .and_then(|(_, v)| v.trim().strip_suffix(')'))
            .map(|v| v.trim().to_string());
        return match version {
            Some(v) => Ok((name.to_string(), v)),
            None => Err(format!("{KERNEL_META}: no exact version in {dep:?}")),
        };
    }
    Err(format!(
        "{KERNEL_META} depends on no linux-image-*: {depends}"
    ))
}

fn apt_update() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "the guest kernel comes from `apt-get download {KERNEL_META}`, which needs fresh package lists: run apt-get update"
    );
    let (st, out, err) = run_within(Command::new("apt-get").arg("update"), APT_TIMEOUT);
    assert!(st.success(), "apt-get update failed:\n{out}\n{err}");
}

/// Downloads and unpacks `name=version`, keeps what the guest needs in `dest`.
fn fetch_kernel(root: &Path, name: &str, version: &str, dest: &Path) -> Result<(), String> {
    let work = tempfile::tempdir_in(root).map_err(|e| format!("tempdir: {e}"))?;
    let (st, out, err) = run_within(
        Command::new("apt-get")
            .arg("download")
            .arg(format!("{name}={version}"))
            .current_dir(work.path()),
        APT_TIMEOUT,
    );
    if !st.success() {
        return Err(format!(
            "apt-get download {name}={version} failed:\n{out}\n{err}"
        ));
    }
    let deb = std::fs::read_dir(work.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {name} left no .deb: {out}"))?;
    let unpacked = work.path().join("root");
    let (st, _, err) = run_within(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        Duration::from_secs(300),
    );
    if !st.success() {
        return Err(format!("dpkg-deb -x {}: {err}", deb.display()));
    }

    let stage = work.path().join("out");
    std::fs::create_dir(&stage).unwrap();
    let vmlinuz = find_files(&unpacked.join("boot"), &|n| n.starts_with("vmlinuz-"))
        .into_iter()
        .next()
        .ok_or_else(|| format!("{name} has no /boot/vmlinuz-*"))?;
    std::fs::copy(&vmlinuz, stage.join("vmlinuz")).unwrap();

    let moddir = std::fs::read_dir(unpacked.join("lib/modules"))
        .map_err(|e| format!("{name} has no /lib/modules: {e}"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .ok_or_else(|| format!("{name}: empty /lib/modules"))?;
    let order = module_closure(&moddir, &stage)?;
    std::fs::write(stage.join("modules.order-load"), order.join("\n") + "\n").unwrap();

    match std::fs::rename(&stage, dest) {
        Ok(()) => Ok(()),
        // Another test binary got there first with the same content.
        Err(_) if dest.join("modules.order-load").is_file() => Ok(()),
        Err(e) => Err(format!("rename to {}: {e}", dest.display())),
    }
}

/// Every file under `dir` whose name passes `want`.
fn find_files(dir: &Path, want: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return found;
    };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            found.extend(find_files(&p, want));
        } else if p.file_name().and_then(|n| n.to_str()).is_some_and(want) {
            found.push(p);
        }
    }
    found
}

/// Module name as the kernel spells it (file names may use `-`).
fn module_name(file: &str) -> Option<String> {
    let base = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(base.replace('-', "_"))
}

/// Copies [`MODULES`] and everything they depend on (from each module's
/// modinfo `depends=`: the package ships no modules.dep, depmod makes it on
/// install) into `stage/modules/NAME.ko`, uncompressed, since busybox insmod
/// hands the file to init_module as it is. Returns the load order.
fn module_closure(moddir: &Path, stage: &Path) -> Result<Vec<String>, String> {
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    for p in find_files(&moddir.join("kernel"), &|n| module_name(n).is_some()) {
        let name = module_name(p.file_name().unwrap().to_str().unwrap()).unwrap();
        files.insert(name, p);
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(l.rsplit('/').next()?))
        .collect();

    let mut bodies: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut order = Vec::new();
    let mut visiting = BTreeSet::new();
    for &(name, required) in MODULES {
        if builtin.contains(name) || (!required && !files.contains_key(name)) {
            continue;
        }
        visit(
            name,
            &files,
            &builtin,
            &mut bodies,
            &mut visiting,
            &mut order,
        )?;
    }
    std::fs::create_dir(stage.join("modules")).unwrap();
    for name in &order {
        std::fs::write(stage.join(format!("modules/{name}.ko")), &bodies[name]).unwrap();
    }
    Ok(order)
}

fn visit(
    name: &str,
    files: &HashMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    bodies: &mut BTreeMap<String, Vec<u8>>,
    visiting: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<(), String> {
    if bodies.contains_key(name) || builtin.contains(name) {
        return Ok(());
    }
    if !visiting.insert(name.to_string()) {
        return Err(format!("module dependency cycle through {name}"));
    }
    let path = files
        .get(name)
        .ok_or_else(|| format!("kernel module {name} is neither in the package nor built in"))?;
    let body = read_module(path)?;
    let deps = modinfo(&body, "depends")
        .ok_or_else(|| format!("{}: no modinfo depends=", path.display()))?;
    for dep in deps.split(',').filter(|d| !d.is_empty()) {
        visit(dep, files, builtin, bodies, visiting, order)?;
    }
    bodies.insert(name.to_string(), body);
    order.push(name.to_string());
    Ok(())
}

fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_str().unwrap();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).map_err(|e| format!("read {name}: {e}")),
        Some((tool, package)) => {
            require(tool, package);
            let out = Command::new(tool)
                .args(["-dc", name])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("{tool} -dc {name}: {e}"))?;
            if !out.status.success() {
                return Err(format!("{tool} -dc {name} failed"));
            }
            Ok(out.stdout)
        }
    }
}

/// The value of `key` in the `.modinfo` section of an ELF64 module.
fn modinfo(elf: &[u8], key: &str) -> Option<String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return None;
    }
    let shoff = u64le(elf, 0x28) as usize;
    let shentsize = u16le(elf, 0x3a) as usize;
    let shnum = u16le(elf, 0x3c) as usize;
    let shstrndx = u16le(elf, 0x3e) as usize;
    let section = |i: usize| -> Option<(u32, &[u8])> {
        let h = elf.get(shoff + i * shentsize..shoff + (i + 1) * shentsize)?;
        let off = u64le(h, 0x18) as usize;
        let size = u64le(h, 0x20) as usize;
        Some((u32le(h, 0), elf.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx)?;
    let prefix = format!("{key}=");
    (0..shnum).find_map(|i| {
        let (name_at, data) = section(i)?;
        let name = names.get(name_at as usize..)?;
        let name = &name[..name.iter().position(|&c| c == 0)?];
        if name != b".modinfo" {
            return None;
        }
        data.split(|&c| c == 0)
            .find_map(|s| s.strip_prefix(prefix.as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// The initramfs: busybox with links for the applets init uses, the modules
/// and their order, the init script, and /dev/console (the kernel opens it
/// for init before anything can mount devtmpfs).
fn initramfs(busybox: &[u8], kdir: &Path, modules: &[String]) -> Vec<u8> {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        c.entry(d, 0o040755, &[], (0, 0));
    }
    c.entry("dev/console", 0o020600, &[], (5, 1));
    c.entry("bin/busybox", 0o100755, busybox, (0, 0));
    for applet in [
        "sh", "mount", "insmod", "sleep", "dd", "cat", "poweroff", "printf", "echo", "[", "test",
    ] {
        c.entry(&format!("bin/{applet}"), 0o120777, b"busybox", (0, 0));
    }
    for m in modules {
        let body = std::fs::read(kdir.join(format!("modules/{m}.ko"))).unwrap();
        c.entry(&format!("lib/modules/{m}.ko"), 0o100644, &body, (0, 0));
    }
    let order: String = modules.iter().map(|m| format!("{m}\n")).collect();
    c.entry("lib/modules/order", 0o100644, order.as_bytes(), (0, 0));
    c.entry("init", 0o100755, INIT_SH.as_bytes(), (0, 0));
    c.finish()
}

/// A newc ("070701") cpio archive, the format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so the archive is reproducible
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

// ---------------------------------------------------------------------------
// The writer's records.

/// A run tag of its own for each guest, so no record of another run passes.
pub fn run_tag() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.subsec_nanos() ^ std::process::id().rotate_left(16)) | 1
}

/// What the guest writes, passed on its kernel command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestOpts {
    /// Run tag in every record, so content of another run is never taken for ours.
    pub tag: u32,
    /// Number of record blocks; request n goes to block `n % blocks`.
    pub blocks: u32,
    /// Where the records start, in 4 KiB units: what lies before is not
    /// the guest's (a test may put data there) and is not checked.
    pub base: u32,
    /// Distance between record blocks, in 4 KiB units: block b is at byte
    /// `(base + b * stride) * 4096`. Spreading them puts each in its own job cluster,
    /// so a background copy reaches some only after the guest rewrote them.
    pub stride: u32,
    /// Requests before the guest powers off; 0 for until it is killed.
    pub max: u64,
}

impl GuestOpts {
    /// The writer's kernel arguments (init.sh reads them).
    pub fn kernel_args(&self) -> String {
        format!(
            "lstag={} lsblocks={} lsbase={} lsstride={} lsmax={}",
            self.tag, self.blocks, self.base, self.stride, self.max
        )
    }

    /// The disk size the records reach (the disk may be larger; the rest stays zero).
    pub fn disk_bytes(&self) -> u64 {
        (u64::from(self.base) + u64::from(self.blocks) * u64::from(self.stride)) * BLOCK as u64
    }

    /// Byte offset of record block `b`.
    pub fn offset(&self, b: u32) -> u64 {
        (u64::from(self.base) + u64::from(b) * u64::from(self.stride)) * BLOCK as u64
    }

    /// The request whose record block `b` holds after request `n`: the last
    /// `m <= n` with `m % blocks == b`, `None` before its first write.
    pub fn held_after(&self, b: u32, n: u64) -> Option<u64> {
        let (b, blocks) = (u64::from(b), u64::from(self.blocks));
        (n >= b).then(|| b + (n - b) / blocks * blocks)
    }

    /// The 4 KiB the guest writes for request `n` (to block `n % blocks`),
    /// byte for byte what init.sh's printf produces.
    pub fn record(&self, n: u64) -> Vec<u8> {
        let b = n % u64::from(self.blocks);
        let p =
            ((n.wrapping_mul(2_654_435_761)) ^ (b * 40_503) ^ u64::from(self.tag)) & 0xffff_ffff;
        let line = format!(
            "LSNPVM01 {:08x} n={n:010} b={b:06} p={p:08x} ............\n",
            self.tag
        );
        assert_eq!(line.len(), LINE);
        line.as_bytes().repeat(BLOCK / LINE)
    }

    /// Which request record block `b` holds: `Ok(None)` for zeros (never
    /// written), an error for anything that is not exactly one of our records
    /// for that block (torn, foreign, or from another run).
    pub fn decode_block(&self, b: u32, data: &[u8]) -> Result<Option<u64>, String> {
        assert_eq!(data.len(), BLOCK);
        if data.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let head = String::from_utf8_lossy(&data[..LINE.min(data.len())]).into_owned();
        let n = (|| {
            if !data.starts_with(MAGIC) {
                return None;
            }
            let n: u64 = std::str::from_utf8(&data[20..30]).ok()?.parse().ok()?;
            (n % u64::from(self.blocks) == u64::from(b)).then_some(n)
        })()
        .ok_or_else(|| format!("block {b} holds no record of this run for it: {head:?}"))?;
        if data != self.record(n) {
            return Err(format!(
                "block {b} starts as request {n} but is not that record whole: {head:?}"
            ));
        }
        Ok(Some(n))
    }

    /// The image exactly as the disk is after request N: zeros but for the
    /// record blocks, each holding [`Self::held_after`]. `None`: nothing written.
    pub fn image_after(&self, n: Option<u64>, size: u64) -> Vec<u8> {
        let mut img = vec![0u8; size as usize];
        if let Some(n) = n {
            for b in 0..self.blocks {
                if let Some(m) = self.held_after(b, n) {
                    let at = self.offset(b) as usize;
                    img[at..at + BLOCK].copy_from_slice(&self.record(m));
                }
            }
        }
        img
    }

    /// The N such that `image` is exactly the disk after request N (`None`
    /// if it is the disk before any request), or why there is none. Exact
    /// because requests are sequential: the newest record on the image fixes
    /// N, and every other block must hold the last request to it up to N.
    pub fn find_request(&self, image: &[u8]) -> Result<Option<u64>, String> {
        assert!(
            image.len() as u64 >= self.disk_bytes(),
            "image of {} bytes is smaller than the {} the records span",
            image.len(),
            self.disk_bytes()
        );
        let mut held = Vec::with_capacity(self.blocks as usize);
        for b in 0..self.blocks {
            let at = self.offset(b) as usize;
            held.push(self.decode_block(b, &image[at..at + BLOCK])?);
        }
        // One request at a time: request numbers are the guest's instants.
        let mut instants = livesnap_pit::Instants::new();
        for (b, h) in held.iter().enumerate() {
            let next = h.map_or(b as u64, |n| n + u64::from(self.blocks));
            instants.add(b as u64, *h, Some(next));
        }
        let n = instants.latest().map(|l| l.at);
        if let (Some(n), false) = (n, instants.meet()) {
            let wrong: Vec<String> = (0..self.blocks)
                .filter(|&b| held[b as usize] != self.held_after(b, n))
                .take(8)
                .map(|b| {
                    format!(
                        "block {b} holds {:?}, after {n} it must hold {:?}",
                        held[b as usize],
                        self.held_after(b, n)
                    )
                })
                .collect();
            return Err(format!(
                "the newest record is request {n}, but the image is not the disk after it: {}",
                wrong.join("; ")
            ));
        }
        // Outside the record blocks (past `base`) the guest never writes.
        let mut at = self.offset(0) as usize;
        for b in 0..=self.blocks {
            let end = if b == self.blocks {
                image.len()
            } else {
                self.offset(b) as usize
            };
            if let Some(i) = image[at..end].iter().position(|&x| x != 0) {
                return Err(format!(
                    "byte {} outside the record blocks is {:#04x}, not 0",
                    at + i,
                    image[at + i]
                ));
            }
            at = end + BLOCK;
        }
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// The VM.

/// Where the VM's disk comes from.
#[derive(Clone, Copy, Debug)]
pub enum VmDisk<'a> {
    /// An NBD export on a unix socket (livesnapd's or qemu-storage-daemon's):
    /// `-blockdev driver=nbd,...,node-name=disk0`.
    Nbd {
        /// The server's socket.
        socket: &'a Path,
        /// The export name.
        export: &'a str,
    },
    /// A local image the VM opens itself through legacy
    /// `-drive file=PATH,if=virtio,format=FORMAT,id=drive0`: QMP names it by
    /// the drive id `drive0` (its nodes get automatic `#blockN` names).
    Drive {
        /// The image file.
        path: &'a Path,
        /// Its format: raw or qcow2.
        format: &'a str,
    },
    /// A local image the VM opens itself through `-blockdev`: protocol node
    /// `disk0-file` under format node `disk0`, device `vd0`.
    Blockdev {
        /// The image file.
        path: &'a Path,
        /// Its format: raw or qcow2.
        format: &'a str,
    },
}

/// What runs in the VM.
#[derive(Clone, Copy, Debug)]
pub enum Boot {
    /// The writer guest.
    Writer(GuestOpts),
    /// No guest: QEMU starts with its CPU stopped (`-S`), so the disk is
    /// attached and the monitor answers, with no guest I/O and no boot cost.
    Paused,
}

/// A running qemu-system-x86_64, killed when dropped.
pub struct Vm {
    child: Child,
    /// Temporary directory holding its sockets and logs.
    pub dir: tempfile::TempDir,
    /// The QMP socket.
    pub qmp_path: PathBuf,
    /// The serial console, written by QEMU as the guest prints.
    pub serial_path: PathBuf,
    /// QEMU's own stdout and stderr.
    pub log_path: PathBuf,
    /// What block commands take as `device` for the disk: the node `disk0`,
    /// or the drive id `drive0` for [`VmDisk::Drive`].
    pub device: String,
    /// The qdev id of the virtio-blk device (`vd0`; the drive id for `-drive`).
    pub qdev: String,
    /// When QEMU was spawned.
    pub started: Instant,
    /// The guest's options, for a writer VM.
    pub guest: Option<GuestOpts>,
}

impl Vm {
    /// Starts qemu-system-x86_64 (TCG, q35, 256 MiB, no display, no reboot)
    /// with `disk` as its virtio disk and a QMP socket; returns once the
    /// socket accepts connections (the guest boots on; see [`Vm::wait_ready`]).
    pub fn start(disk: VmDisk<'_>, boot: Boot) -> Vm {
        require_qemu_system();
        let dir = tempfile::tempdir().unwrap();
        let qmp_path = dir.path().join("qmp.sock");
        let serial_path = dir.path().join("serial.log");
        let log_path = dir.path().join("qemu.log");
        let opt_path = |p: &Path| {
            let s = p.to_str().expect("UTF-8 path").to_string();
            assert!(!s.contains(','), "QEMU option paths cannot hold ',': {s}");
            s
        };

        let mut cmd = Command::new("qemu-system-x86_64");
        // KVM here is a nested variant stock kernels cannot run on.
        cmd.args(["-accel", "tcg", "-M", "q35", "-m", "256", "-smp", "1"])
            // No default NIC (its option ROM), VGA or monitor: less to boot.
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", opt_path(&serial_path)))
            .arg("-chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                opt_path(&qmp_path)
            ))
            .args(["-mon", "chardev=qmp,mode=control"]);

        let (device, qdev) = match disk {
            VmDisk::Nbd { socket, export } => {
                cmd.arg("-blockdev").arg(format!(
                    "driver=nbd,server.type=unix,server.path={},export={export},node-name=disk0",
                    opt_path(socket)
                ));
                cmd.args(["-device", "virtio-blk-pci,drive=disk0,id=vd0"]);
                ("disk0", "vd0")
            }
            VmDisk::Drive { path, format } => {
                cmd.arg("-drive").arg(format!(
                    "file={},if=virtio,format={format},id=drive0",
                    opt_path(path)
                ));
                ("drive0", "drive0")
            }
            VmDisk::Blockdev { path, format } => {
                cmd.arg("-blockdev").arg(format!(
                    "driver=file,filename={},node-name=disk0-file",
                    opt_path(path)
                ));
                cmd.arg("-blockdev")
                    .arg(format!("driver={format},file=disk0-file,node-name=disk0"));
                // share-rw: a test may write through QEMU's own NBD export of
                // the node while the device is attached.
                cmd.args(["-device", "virtio-blk-pci,drive=disk0,id=vd0,share-rw=on"]);
                ("disk0", "vd0")
            }
        };

        let guest = match boot {
            Boot::Writer(g) => {
                assert!(g.blocks > 0 && g.stride > 0, "bad guest options {g:?}");
                let a = guest_assets();
                cmd.arg("-kernel").arg(&a.kernel);
                cmd.arg("-initrd").arg(&a.initrd);
                cmd.arg("-append")
                    .arg(format!("{CMDLINE} {}", g.kernel_args()));
                Some(g)
            }
            Boot::Paused => {
                cmd.arg("-S");
                None
            }
        };

        let log = std::fs::File::create(&log_path).unwrap();
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let mut vm = Vm {
            child,
            dir,
            qmp_path,
            serial_path,
            log_path,
            device: device.to_string(),
            qdev: qdev.to_string(),
            started,
            guest,
        };
        let deadline = Instant::now() + QMP_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&vm.qmp_path).is_err() {
            vm.assert_running("opening its QMP socket");
            assert!(
                Instant::now() < deadline,
                "qemu-system-x86_64 opened no QMP socket within {QMP_TIMEOUT:?}\n{}",
                vm.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    /// A new QMP session (QEMU takes one at a time on this socket).
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path)
    }

    /// The serial console.
    pub fn console(&self) -> Console {
        Console {
            path: self.serial_path.clone(),
        }
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        self.console().text()
    }

    /// The guest's own complete lines (see [`Console::guest_lines`]).
    pub fn guest_lines(&self) -> Vec<String> {
        self.console().guest_lines()
    }

    /// The newest request the guest reported written (see
    /// [`Console::last_written`]). Panics if the guest reported a failure.
    pub fn last_written(&self) -> Option<u64> {
        self.console()
            .last_written()
            .unwrap_or_else(|f| panic!("the guest failed: {f}\n{}", self.diagnostics()))
    }

    /// Waits until the guest is about to write (its modules loaded and
    /// /dev/vda there); returns the time since QEMU was spawned.
    pub fn wait_ready(&mut self, timeout: Duration) -> Duration {
        self.wait_for("the guest to boot", timeout, |vm| {
            vm.guest_lines().iter().any(|l| l.starts_with("ready"))
        });
        self.started.elapsed()
    }

    /// Waits until the guest reports request `n` written; returns the newest it reported.
    pub fn wait_written(&mut self, n: u64, timeout: Duration) -> u64 {
        self.wait_for(&format!("the guest to write request {n}"), timeout, |vm| {
            vm.last_written().is_some_and(|w| w >= n)
        });
        self.last_written().unwrap()
    }

    /// Waits for `what` with a bounded timeout, failing early when QEMU exits.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, mut done: impl FnMut(&Vm) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return;
            }
            self.assert_running(what);
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `timeout` for QEMU to exit by itself (after `lsmax`
    /// requests the guest powers off), killing it past that.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "qemu-system-x86_64 did not exit within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills QEMU at once (the guest's in-flight request may or may not land).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn assert_running(&mut self, what: &str) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "qemu-system-x86_64 exited ({st}) while waiting for {what}\n{}",
                self.diagnostics()
            );
        }
    }

    /// QEMU's output and the end of the serial console, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- qemu output ---\n{}\n--- serial console (last 30 lines) ---\n{}",
            std::fs::read_to_string(&self.log_path).unwrap_or_default(),
            self.console().tail(30)
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One look at the guest's progress: the serial file was read between
/// `before` and `after` (CLOCK_MONOTONIC ns) and its newest "wrote" was `written`.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Just before the read.
    pub before: u64,
    /// Just after the read.
    pub after: u64,
    /// The newest request reported written.
    pub written: u64,
}

/// Follows the guest's progress lines in the background, every couple of
/// milliseconds, so an instant known only afterwards (such as the window a
/// `livesnap` report gives) can be bracketed by what the guest had written.
pub struct ProgressWatch {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Vm {
    /// Starts following the serial console (see [`ProgressWatch`]).
    pub fn watch_progress(&self) -> ProgressWatch {
        self.console().watch()
    }
}

/// The writer guest's serial console, as a file QEMU writes (qemu-system's
/// `-serial file:`, libvirt's `<serial type='file'>`).
#[derive(Clone, Debug)]
pub struct Console {
    /// The file.
    pub path: PathBuf,
}

impl Console {
    /// Everything so far.
    pub fn text(&self) -> String {
        std::fs::read(&self.path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().rev().take(n).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The guest's own complete lines ("livesnap-guest: " stripped), oldest
    /// first. QEMU writes the console a byte at a time, and a line cut short
    /// ("wrote 1" of "wrote 12") would understate the guest's progress.
    pub fn guest_lines(&self) -> Vec<String> {
        let serial = self.text();
        let end = serial.rfind('\n').map_or(0, |i| i + 1);
        serial[..end]
            .lines()
            .filter_map(|l| {
                l.split_once("livesnap-guest: ")
                    .map(|(_, m)| m.trim().to_string())
            })
            .collect()
    }

    /// The newest request the guest reported written. Reading it at instant
    /// t bounds the disk's state at t: request `k` is on the disk (its write
    /// returned before the line was printed) and no request past `k + 1` has
    /// been sent (the guest prints "wrote k+1" before sending k+2). The
    /// guest's own failure line, if it reported one, is the error.
    pub fn last_written(&self) -> Result<Option<u64>, String> {
        let lines = self.guest_lines();
        if let Some(f) = lines.iter().find(|l| l.starts_with("FAILED")) {
            return Err(f.clone());
        }
        Ok(lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("wrote ")?.parse().ok()))
    }

    /// Starts following the console (see [`ProgressWatch`]).
    pub fn watch(&self) -> ProgressWatch {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut file = std::fs::File::open(&self.path).unwrap();
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut buf, mut last) = (Vec::new(), None);
            while !st.load(Ordering::Relaxed) {
                let before = monotonic_ns();
                let _ = file.read_to_end(&mut buf);
                let after = monotonic_ns();
                // Only complete lines: a line is printed whole before the
                // guest goes on, but QEMU writes it a byte at a time.
                let end = buf.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
                let text = String::from_utf8_lossy(&buf[..end]);
                if let Some(w) = text.lines().rev().find_map(parse_written) {
                    last = Some(w);
                }
                buf.drain(..end);
                if let Some(written) = last {
                    s.lock().unwrap().push(Sample {
                        before,
                        after,
                        written,
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        ProgressWatch {
            samples,
            stop,
            thread: Some(thread),
        }
    }
}

fn parse_written(line: &str) -> Option<u64> {
    let (_, msg) = line.split_once("livesnap-guest: ")?;
    msg.trim().strip_prefix("wrote ")?.parse().ok()
}

impl ProgressWatch {
    /// A request surely on the disk at instant `t`: the newest seen by a
    /// read that ended by `t`.
    pub fn done_by(&self, t: u64) -> Option<u64> {
        let s = self.samples.lock().unwrap();
        s.iter().rev().find(|x| x.after <= t).map(|x| x.written)
    }

    /// A bound on the requests sent by instant `t`: none past `k + 1`, where
    /// `k` was seen by the first read that started at or after `t`.
    pub fn sent_by(&self, t: u64) -> Option<u64> {
        let s = self.samples.lock().unwrap();
        s.iter().find(|x| x.before >= t).map(|x| x.written + 1)
    }

    /// Waits (bounded) until a read has started at or after `t`.
    pub fn wait_past(&self, t: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.sent_by(t).is_none() {
            assert!(
                Instant::now() < deadline,
                "no progress line read within {timeout:?} after the instant"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ProgressWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Checking snapshots of the writer's disk.

/// What a snapshot taken under the running guest showed.
#[derive(Debug)]
pub struct Taken {
    /// What took it.
    pub how: &'static str,
    /// Newest request the guest had reported when the snapshot was started.
    pub r_start: u64,
    /// Newest request the guest had reported before the snapshot's window.
    pub r0: u64,
    /// Newest reported right after the command's reply.
    pub r1: u64,
    /// Newest reported when the copy was complete.
    pub r_done: u64,
    /// When the command was sent, relative to the guest's start.
    pub at: Duration,
    /// Command to completion.
    pub took: Duration,
}

/// Requests the guest wrote while the job copied: a backup copies after its
/// instant, a mirror before it; either way the guest must have written then
/// for a snapshot check to tell a point-in-time copy from one that followed it.
pub fn raced(t: &Taken) -> u64 {
    (t.r_done - t.r1).max(t.r0 - t.r_start)
}

/// Whether the guest wrote enough during the job for [`check_snapshot`] to mean something.
pub fn raced_enough(g: &GuestOpts, t: &Taken) -> bool {
    raced(t) >= u64::from(g.blocks / 4)
}

/// The snapshot is exactly the disk after request N with r0 <= N <= r1 + 1,
/// and the guest wrote during the copy (or the check would not tell a
/// point-in-time copy from one that followed the guest). Returns N.
pub fn check_snapshot(g: &GuestOpts, image: &[u8], t: &Taken) -> u64 {
    let n = check_point_in_time(g, image, t);
    let raced = raced(t);
    assert!(
        raced_enough(g, t),
        "the guest wrote only {raced} requests while the job copied ({} blocks): too few to \
         tell a point-in-time copy from one that followed the guest",
        g.blocks
    );
    n
}

/// The snapshot is exactly the disk after request N with r0 <= N <= r1 + 1
/// (without [`check_snapshot`]'s demand that the guest raced the job). Returns N.
pub fn check_point_in_time(g: &GuestOpts, image: &[u8], t: &Taken) -> u64 {
    let n = g
        .find_request(image)
        .unwrap_or_else(|e| panic!("the snapshot is not the disk after any one request: {e}"))
        .expect("the snapshot holds the guest's writes");
    eprintln!(
        "vm: {} snapshot is the disk after request {n}; guest had written {} before, \
         {} at the end of the window, {} at completion; started {:.1} s after qemu, took {:.2} s",
        t.how,
        t.r0,
        t.r1,
        t.r_done,
        t.at.as_secs_f64(),
        t.took.as_secs_f64()
    );
    assert!(
        t.r0 <= n && n <= t.r1 + 1,
        "the {} snapshot is the disk after request {n}, but the guest had written {} before \
         its window and sent at most {} by its end",
        t.how,
        t.r0,
        t.r1 + 1
    );
    n
}

/// The disk as the guest left it when killed holds every request it
/// reported: it is the disk after its last report, or after the one request
/// in flight at the kill.
pub fn check_final(g: &GuestOpts, image: &[u8], last: u64) {
    let n = g
        .find_request(image)
        .unwrap_or_else(|e| panic!("the disk after the VM was killed: {e}"))
        .expect("the disk holds the guest's writes");
    assert!(
        n == last || n == last + 1,
        "the disk is at request {n} after the VM was killed, but the guest had reported {last}"
    );
}

impl ProgressWatch {
    /// The requests a `livesnap --json` report's point-in-time window
    /// allows: (surely on the disk when it opened, at most sent when it
    /// closed), as this watch saw the guest's progress around it.
    pub fn bracket(&self, report: &serde_json::Value, timeout: Duration) -> (u64, u64) {
        let pit = &report["point_in_time"];
        let (w0, w1) = (
            pit["start_monotonic_ns"].as_u64().expect("window start"),
            pit["end_monotonic_ns"].as_u64().expect("window end"),
        );
        assert!(w0 <= w1, "{report}");
        self.wait_past(w1, timeout);
        let r0 = self
            .done_by(w0)
            .expect("the guest had written before the window");
        (r0, self.sent_by(w1).unwrap() - 1)
    }
}
