//! Image creation (QEMU's `qemu-img create` / `blockdev-create`) for raw and
//! qcow2, used by everything that creates images: block jobs, the CLI and
//! `blockdev-snapshot-sync`.
//!
//! [`create_image`] makes an image file from a path (as `qemu-img create`);
//! `blockdev-create` has [`create_file`] for host files and [`format_qcow2`]
//! for a qcow2 image on an already opened node, with QEMU's checks and texts.
//! Both write qcow2 with one piece of code (`write_qcow2`).
//!
//! A new qcow2 image is laid out as QEMU lays it out: the header (with the
//! backing format and feature name extensions and the backing file name) in
//! cluster 0, then the refcount table, the refcount block(s) and the L1 table
//! (and, preallocated, the L2 tables and the data clusters).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

use crate::buf::IoBuf;
use crate::file::{FileDriver, FileOptions};
use crate::lock::{as_conflict, lock_image, ImagePerms, Locking};
use crate::lock::{PERM_ALL, PERM_RESIZE, PERM_WRITE};
use crate::node::BlockNode;
use crate::qcow2::header::{
    Header, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, MAGIC, MAX_BACKING_NAME,
};
use crate::qcow2::resolve_backing_filename;

/// Image formats [`create_image`] can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain bytes.
    Raw,
    /// qcow2 version 3 (compat 1.1).
    Qcow2,
}

impl ImageFormat {
    /// QEMU's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Path of the new image; an existing file is truncated, as QEMU does.
    pub filename: String,
    /// Format of the new image.
    pub format: ImageFormat,
    /// Virtual size; for qcow2 with a backing file it defaults to the backing image's size.
    pub size: Option<u64>,
    /// qcow2 cluster size (default 64 KiB).
    pub cluster_size: Option<u64>,
    /// Backing file name to write into the header (qcow2 only); relative names
    /// are relative to the new image's directory.
    pub backing_file: Option<String>,
    /// Format of the backing file (required with a backing file: never probed).
    pub backing_format: Option<String>,
}

/// Default qcow2 cluster size.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// Creates an image. Error texts are QEMU's where QEMU has one.
pub async fn create_image(opts: &CreateOptions) -> crate::Result<()> {
    match opts.format {
        ImageFormat::Raw => {
            if opts.backing_file.is_some() {
                return Err(crate::Error::invalid(
                    "Backing file not supported for file format 'raw'",
                ));
            }
            let size = opts
                .size
                .ok_or_else(|| crate::Error::invalid("Image creation needs a size parameter"))?;
            let path = opts.filename.clone();
            blocking(move || {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| crate::Error::io(format!("Could not create '{path}'"), &e))?;
                f.set_len(size)
                    .map_err(|e| crate::Error::io("Could not resize file", &e))
            })
            .await
        }
        ImageFormat::Qcow2 => create_qcow2(opts).await,
    }
}

fn os_text(e: &std::io::Error) -> String {
    let mut s = e.to_string();
    if let Some(i) = s.find(" (os error") {
        s.truncate(i);
    }
    s
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> crate::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::Error::new(crate::ErrorKind::Io, format!("worker failed: {e}")))?
}

/// Virtual size of the backing image, opened read-only with the given format.
async fn backing_size(path: &str, format: &str) -> crate::Result<u64> {
    // Like qemu-img create, a peek that shares the image with its users.
    let file = FileDriver::open_locked(
        &FileOptions {
            filename: path.to_string(),
            direct: false,
            read_only: true,
        },
        Locking::Auto,
        true,
    )
    .map_err(|e| crate::Error::io(format!("Could not open '{path}'"), &e))?;
    let node = BlockNode::new("#create-backing", Box::new(file), true, false);
    match format {
        "raw" => Ok(node.size()),
        "qcow2" => Ok(Header::read(&node, false)
            .await
            .map_err(|e| e.context(format!("Could not open '{path}'")))?
            .size),
        other => Err(crate::Error::invalid(format!("Unknown driver '{other}'"))),
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// QEMU's feature name table entries: (type, bit, name).
const FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

async fn create_qcow2(opts: &CreateOptions) -> crate::Result<()> {
    let cs = opts.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    check_cluster_size(cs)?;
    if opts.backing_file.is_some() && opts.backing_format.is_none() {
        return Err(crate::Error::invalid(
            "Backing file specified without backing format",
        ));
    }
    if opts.backing_file.is_none() && opts.backing_format.is_some() {
        return Err(crate::Error::invalid(
            "Backing format cannot be used without backing file",
        ));
    }
    let size = match (opts.size, &opts.backing_file) {
        (Some(s), _) => s,
        (None, Some(b)) => {
            let path = resolve_backing_filename(&opts.filename, b);
            backing_size(&path, opts.backing_format.as_deref().unwrap_or("raw")).await?
        }
        (None, None) => {
            return Err(crate::Error::invalid(
                "Image creation needs a size parameter",
            ))
        }
    };
    if size % 512 != 0 {
        return Err(crate::Error::invalid(
            "Image size must be a multiple of 512 bytes",
        ));
    }
    if let Some(f) = &opts.backing_format {
        if f.len() >= 16 {
            return Err(crate::Error::invalid(format!("Unknown driver '{f}'")));
        }
    }
    let spec = Qcow2Spec {
        size,
        cluster_size: cs,
        version: 3,
        refcount_order: 4,
        lazy_refcounts: false,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        preallocation: Prealloc::Off,
    };
    let layout = Layout::new(&spec).ok_or_else(|| crate::Error::invalid("Image is too big"))?;
    // Like qemu-img here: the feature table only when it fits.
    let header = header_cluster(&spec, &layout, false).map_err(|e| match e {
        HeaderError::NameTooLong | HeaderError::NoSpace => {
            crate::Error::invalid("Backing file name too long")
        }
    })?;

    let path = opts.filename.clone();
    let file = blocking(move || {
        // Emptied only once its locks are taken: an image another process
        // uses is refused, not destroyed (QEMU's file creation does the same).
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map(drop)
            .map_err(|e| crate::Error::io(format!("Could not create '{path}'"), &e))?;
        let file = FileDriver::open(&FileOptions {
            filename: path.clone(),
            direct: false,
            read_only: false,
        })
        .map_err(|e| match as_conflict(&e) {
            Some(c) => crate::Error::invalid(c.0.clone()),
            None => crate::Error::io(format!("Could not create '{path}'"), &e),
        })?;
        file.set_len(0)
            .map_err(|e| crate::Error::io(format!("Could not create '{path}'"), &e))?;
        Ok(file)
    })
    .await?;
    let node = BlockNode::new("#create", Box::new(file), false, false);
    write_qcow2(&node, &layout, &spec, header)
        .await
        .map_err(|(_, e)| crate::Error::io("Could not write qcow2 header", &e))?;
    // Checked by the same code that opens images.
    Header::read(&node, true).await.map(|_| ())
}

fn check_cluster_size(cs: u64) -> crate::Result<()> {
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(crate::Error::invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    Ok(())
}

/// QEMU's `PreallocMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prealloc {
    /// Nothing allocated up front.
    #[default]
    Off,
    /// qcow2: every L2 table and data cluster mapped; the file is extended sparsely.
    Metadata,
    /// As `metadata`, and the data is allocated with fallocate.
    Falloc,
    /// As `metadata`, and the data is written with zeroes.
    Full,
}

impl Prealloc {
    /// QEMU's names, in schema order.
    pub const NAMES: &'static [&'static str] = &["off", "metadata", "falloc", "full"];

    /// Parses one of [`Prealloc::NAMES`].
    pub fn parse(s: &str) -> Option<Prealloc> {
        Some(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return None,
        })
    }

    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        Prealloc::NAMES[self as usize]
    }
}

/// `blockdev-create` options of the `file` driver (QEMU's `BlockdevCreateOptionsFile`).
#[derive(Clone, Debug, Default)]
pub struct FileCreateOptions {
    /// Host path; created if missing, emptied if present.
    pub filename: String,
    /// Size in bytes (QAPI `size`: a negative number arrives wrapped).
    pub size: u64,
    /// `off`, `falloc` or `full`; `metadata` is refused, as QEMU does for files.
    pub preallocation: Prealloc,
    /// Ask the filesystem not to copy on write (btrfs); failures are ignored.
    pub nocow: bool,
    /// Extent size hint for filesystems that have one (XFS); default 1 MiB.
    pub extent_size_hint: Option<u64>,
}

/// QEMU's `allocate_first_block`: the first block is written so that later
/// alignment probes of the file find data (it also makes a tiny file 512 bytes).
fn allocate_first_block(f: &File, size: u64) {
    let n = if size < 4096 { 512 } else { 4096 };
    let _ = f.write_all_at(&vec![0u8; n], 0);
}

/// `ftruncate` with QEMU's signed length (a wrapped size fails with EINVAL).
fn ftruncate(f: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: ftruncate on a descriptor we own.
    if unsafe { libc::ftruncate(f.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Best effort, as in QEMU: NOCOW and the extent size hint are optimisations.
fn set_file_hints(f: &File, nocow: bool, hint: u64, hint_given: bool) {
    const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
    const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
    const FS_NOCOW_FL: libc::c_long = 0x0080_0000;
    const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
    const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
    const FS_XFLAG_EXTSIZE: u32 = 0x800;
    let fd = f.as_raw_fd();
    if nocow {
        let mut attr: libc::c_long = 0;
        // SAFETY: the ioctls read and write one long through a valid pointer.
        unsafe {
            if libc::ioctl(fd, FS_IOC_GETFLAGS as _, &mut attr) == 0 {
                attr |= FS_NOCOW_FL;
                libc::ioctl(fd, FS_IOC_SETFLAGS as _, &attr);
            }
        }
    }
    // struct fsxattr: xflags, extsize, nextents, projid, cowextsize, 8 pad bytes.
    let mut x = [0u32; 7];
    // SAFETY: the buffer is the size of struct fsxattr (28 bytes).
    let r = unsafe {
        let mut r = libc::ioctl(fd, FS_IOC_FSGETXATTR as _, x.as_mut_ptr());
        if r == 0 {
            x[0] |= FS_XFLAG_EXTSIZE;
            x[1] = hint as u32;
            r = libc::ioctl(fd, FS_IOC_FSSETXATTR as _, x.as_ptr());
        }
        r
    };
    if r != 0 && hint_given && hint != 0 {
        tracing::warn!(
            "Failed to set extent size hint: {}",
            os_text(&std::io::Error::last_os_error())
        );
    }
}

/// Creates a host file as QEMU's `blockdev-create` does for the `file`
/// driver (`raw_co_create` in `block/file-posix.c`), with QEMU's texts.
pub async fn create_file(opts: &FileCreateOptions) -> crate::Result<()> {
    let hint = opts.extent_size_hint.unwrap_or(1 << 20);
    if hint > u32::MAX as u64 {
        return Err(crate::Error::invalid("Extent size hint is too large"));
    }
    let opts = opts.clone();
    blocking(move || {
        let path = &opts.filename;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            // Emptied below with QEMU's own error text.
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|e| crate::Error::io(format!("Could not create '{path}'"), &e))?;
        // QEMU's file creation claims write and resize and refuses to share
        // resize, so an image in use elsewhere is refused, not emptied.
        let perms = ImagePerms {
            perm: PERM_WRITE | PERM_RESIZE,
            shared: PERM_ALL & !PERM_RESIZE,
        };
        lock_image(&f, perms, Locking::Auto).map_err(|e| match as_conflict(&e) {
            Some(c) => crate::Error::invalid(c.0.clone()),
            None => crate::Error::io(format!("Could not create '{path}'"), &e),
        })?;
        let resize_err = |e: std::io::Error| crate::Error::io("Could not resize file", &e);
        ftruncate(&f, 0).map_err(resize_err)?;
        set_file_hints(&f, opts.nocow, hint, opts.extent_size_hint.is_some());
        let size = opts.size;
        match opts.preallocation {
            Prealloc::Off => {
                ftruncate(&f, size).map_err(resize_err)?;
                if size > 0 {
                    allocate_first_block(&f, size);
                }
            }
            Prealloc::Falloc => {
                if size > 0 {
                    // SAFETY: posix_fallocate on a descriptor we own.
                    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
                    if r != 0 {
                        let e = std::io::Error::from_raw_os_error(r);
                        return Err(crate::Error::io("Could not preallocate new data", &e));
                    }
                    allocate_first_block(&f, size);
                }
            }
            Prealloc::Full => {
                ftruncate(&f, size).map_err(resize_err)?;
                let zeroes = vec![0u8; 64 << 10];
                let mut at = 0;
                while at < size {
                    let n = (size - at).min(zeroes.len() as u64) as usize;
                    f.write_all_at(&zeroes[..n], at).map_err(|e| {
                        crate::Error::io("Could not write zeros for preallocation", &e)
                    })?;
                    at += n as u64;
                }
                f.sync_all()
                    .map_err(|e| crate::Error::io("Could not flush file to disk", &e))?;
            }
            Prealloc::Metadata => {
                return Err(crate::Error::invalid(
                    "Unsupported preallocation mode: metadata",
                ));
            }
        }
        Ok(())
    })
    .await
}

/// `blockdev-create` options of `qcow2` that livesnap implements (QEMU's
/// `BlockdevCreateOptionsQcow2` without `file`, which is the node given apart,
/// and without encryption, external data files, extended L2 and zstd).
#[derive(Clone, Debug, Default)]
pub struct Qcow2CreateOptions {
    /// Virtual size (QAPI `size`).
    pub size: u64,
    /// 2 or 3; default 3.
    pub version: Option<u32>,
    /// Backing file name written as given (not opened, not checked).
    pub backing_file: Option<String>,
    /// Backing format (a `BlockdevDriver` name).
    pub backing_fmt: Option<String>,
    /// Cluster size, default 64 KiB (QAPI `size`).
    pub cluster_size: Option<u64>,
    /// Preallocation mode.
    pub preallocation: Prealloc,
    /// Set the lazy-refcounts compatible feature bit (v3 only).
    pub lazy_refcounts: bool,
    /// Refcount width in bits, default 16 (QAPI `int`).
    pub refcount_bits: Option<i64>,
    /// `data-file-raw`; without an external data file (never, here) it is an error.
    pub data_file_raw: bool,
}

/// QEMU's `BDRV_MAX_LENGTH`: the largest size the block layer accepts.
const BDRV_MAX_LENGTH: u64 = 9_223_372_035_781_033_984;

/// Formats the opened node `node` as a qcow2 image, as QEMU's
/// `qcow2_co_create` does for `blockdev-create`: its checks in its order,
/// its texts. The node is grown if needed, never shrunk.
pub async fn format_qcow2(node: &BlockNode, opts: &Qcow2CreateOptions) -> crate::Result<()> {
    if !opts.size.is_multiple_of(512) {
        return Err(crate::Error::invalid(
            "Image size must be a multiple of 512 bytes",
        ));
    }
    let version = opts.version.unwrap_or(3);
    let cs = opts.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    check_cluster_size(cs)?;
    if opts.backing_file.is_some() && opts.preallocation != Prealloc::Off {
        return Err(crate::Error::invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if opts.backing_fmt.is_some() && opts.backing_file.is_none() {
        return Err(crate::Error::invalid(
            "Backing format cannot be used without backing file",
        ));
    }
    if version < 3 && opts.lazy_refcounts {
        return Err(crate::Error::invalid("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
    }
    let bits = opts.refcount_bits.unwrap_or(16);
    if !(1..=64).contains(&bits) || !(bits as u64).is_power_of_two() {
        return Err(crate::Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && bits != 16 {
        return Err(crate::Error::invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"));
    }
    if opts.data_file_raw {
        return Err(crate::Error::invalid("data-file-raw requires data-file"));
    }
    if node.read_only() {
        return Err(crate::Error::invalid("Block node is read-only"));
    }
    if opts.size > BDRV_MAX_LENGTH {
        return Err(crate::Error::invalid(format!(
            "Could not resize image: offset({}) exceeds maximum({BDRV_MAX_LENGTH})",
            opts.size
        )));
    }
    let spec = Qcow2Spec {
        size: opts.size,
        cluster_size: cs,
        version,
        refcount_order: (bits as u64).trailing_zeros(),
        lazy_refcounts: opts.lazy_refcounts,
        // QEMU writes an empty name as no backing file at all.
        backing_file: opts.backing_file.clone().filter(|b| !b.is_empty()),
        // QEMU keeps the format in a 16-byte buffer: longer names are cut.
        backing_format: opts
            .backing_fmt
            .as_ref()
            .map(|f| f.chars().take(15).collect()),
        preallocation: opts.preallocation,
    };
    let layout = Layout::new(&spec).ok_or_else(|| {
        crate::Error::io(
            "Could not resize image: Failed to grow the L1 table",
            &std::io::Error::from_raw_os_error(libc::EFBIG),
        )
    })?;
    let header = header_cluster(&spec, &layout, true).map_err(|e| {
        let errno = match e {
            HeaderError::NameTooLong => libc::EINVAL,
            HeaderError::NoSpace => libc::ENOSPC,
        };
        crate::Error::io(
            format!(
                "Could not assign backing file '{}' with format '{}'",
                opts.backing_file.as_deref().unwrap_or_default(),
                opts.backing_fmt.as_deref().unwrap_or("(null)"),
            ),
            &std::io::Error::from_raw_os_error(errno),
        )
    })?;
    write_qcow2(node, &layout, &spec, header)
        .await
        .map_err(|(stage, e)| crate::Error::io(stage.text(), &e))
}

/// A qcow2 image to write, its options checked.
struct Qcow2Spec {
    size: u64,
    cluster_size: u64,
    version: u32,
    refcount_order: u32,
    lazy_refcounts: bool,
    backing_file: Option<String>,
    backing_format: Option<String>,
    preallocation: Prealloc,
}

/// Where a new image's clusters go: header | refcount table | refcount
/// blocks | L1 table | L2 tables | data. Only preallocated images have L2
/// tables and data clusters.
#[derive(Debug)]
struct Layout {
    cs: u64,
    l1_entries: u64,
    l1_clusters: u64,
    rt_clusters: u64,
    refblocks: u64,
    l2_tables: u64,
    data_clusters: u64,
}

impl Layout {
    /// `None` when the L1 table would be larger than QEMU allows.
    fn new(spec: &Qcow2Spec) -> Option<Layout> {
        let cs = spec.cluster_size;
        let l2_span = cs * (cs / 8);
        let l1_entries = spec.size.div_ceil(l2_span);
        if l1_entries * 8 > crate::qcow2::header::MAX_L1_BYTES {
            return None;
        }
        // An empty image has no L1 table at all (offset 0), as QEMU makes it.
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let (l2_tables, data_clusters) = if spec.preallocation == Prealloc::Off {
            (0, 0)
        } else {
            (l1_entries, spec.size.div_ceil(cs))
        };
        let rb_entries = (cs * 8) >> spec.refcount_order;
        let mut rt_clusters = 1u64;
        loop {
            let fixed = 1 + rt_clusters + l1_clusters + l2_tables + data_clusters;
            let mut refblocks = fixed.div_ceil(rb_entries);
            while (fixed + refblocks).div_ceil(rb_entries) > refblocks {
                refblocks += 1;
            }
            if (refblocks * 8).div_ceil(cs) <= rt_clusters {
                return Some(Layout {
                    cs,
                    l1_entries,
                    l1_clusters,
                    rt_clusters,
                    refblocks,
                    l2_tables,
                    data_clusters,
                });
            }
            rt_clusters += 1;
        }
    }

    fn total_clusters(&self) -> u64 {
        1 + self.rt_clusters
            + self.refblocks
            + self.l1_clusters
            + self.l2_tables
            + self.data_clusters
    }

    fn rt_off(&self) -> u64 {
        self.cs
    }

    fn rb_off(&self) -> u64 {
        self.rt_off() + self.rt_clusters * self.cs
    }

    fn l1_off(&self) -> u64 {
        self.rb_off() + self.refblocks * self.cs
    }

    fn l2_off(&self) -> u64 {
        self.l1_off() + self.l1_clusters * self.cs
    }

    fn data_off(&self) -> u64 {
        self.l2_off() + self.l2_tables * self.cs
    }
}

enum HeaderError {
    /// Longer than the 1023 bytes qcow2 allows.
    NameTooLong,
    /// Extensions and name do not fit in the header cluster.
    NoSpace,
}

/// The header cluster: fixed part, extensions, backing file name.
/// `qemu_table_rule`: the feature table as `blockdev-create` in QEMU 10
/// writes it (only with clusters above 4 KiB); otherwise whenever it fits.
fn header_cluster(
    spec: &Qcow2Spec,
    l: &Layout,
    qemu_table_rule: bool,
) -> Result<Vec<u8>, HeaderError> {
    let cs = l.cs as usize;
    if spec
        .backing_file
        .as_ref()
        .is_some_and(|b| b.len() > MAX_BACKING_NAME)
    {
        return Err(HeaderError::NameTooLong);
    }
    let mut hdr = vec![0u8; cs];
    put32(&mut hdr, 0, MAGIC);
    put32(&mut hdr, 4, spec.version);
    put32(&mut hdr, 20, l.cs.trailing_zeros());
    put64(&mut hdr, 24, spec.size);
    put32(&mut hdr, 36, l.l1_entries as u32);
    put64(&mut hdr, 40, if l.l1_entries > 0 { l.l1_off() } else { 0 });
    put64(&mut hdr, 48, l.rt_off());
    put32(&mut hdr, 56, l.rt_clusters as u32);
    let mut at = if spec.version >= 3 {
        if spec.lazy_refcounts {
            put64(&mut hdr, 80, crate::qcow2::header::COMPAT_LAZY_REFCOUNTS);
        }
        put32(&mut hdr, 96, spec.refcount_order);
        put32(&mut hdr, 100, 112);
        112usize
    } else {
        72
    };
    let ext =
        |hdr: &mut Vec<u8>, at: &mut usize, magic: u32, data: &[u8]| -> Result<(), HeaderError> {
            let end = *at + 8 + data.len().div_ceil(8) * 8;
            if end > cs {
                return Err(HeaderError::NoSpace);
            }
            put32(hdr, *at, magic);
            put32(hdr, *at + 4, data.len() as u32);
            hdr[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
            *at = end;
            Ok(())
        };
    if let Some(f) = &spec.backing_format {
        ext(&mut hdr, &mut at, EXT_BACKING_FORMAT, f.as_bytes())?;
    }
    if spec.version >= 3 {
        let mut table = Vec::new();
        for &(t, bit, name) in FEATURES {
            let mut e = [0u8; 48];
            e[0] = t;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            table.extend_from_slice(&e);
        }
        let name_len = spec.backing_file.as_ref().map_or(0, |b| b.len());
        let wanted = if qemu_table_rule {
            cs > 4096
        } else {
            at + 8 + table.len() + 8 + name_len <= cs
        };
        if wanted {
            ext(&mut hdr, &mut at, EXT_FEATURE_TABLE, &table)?;
        }
    }
    ext(&mut hdr, &mut at, 0, &[])?;
    if let Some(b) = &spec.backing_file {
        if at + b.len() > cs {
            return Err(HeaderError::NoSpace);
        }
        put64(&mut hdr, 8, at as u64);
        put32(&mut hdr, 16, b.len() as u32);
        hdr[at..at + b.len()].copy_from_slice(b.as_bytes());
    }
    Ok(hdr)
}

/// The step of [`write_qcow2`] that failed, named as QEMU names it.
#[derive(Clone, Copy, Debug)]
enum Stage {
    Resize,
    Refcounts,
    Header,
}

impl Stage {
    fn text(self) -> &'static str {
        match self {
            Stage::Resize => "Could not resize image",
            Stage::Refcounts => "Could not write refcount table",
            Stage::Header => "Could not write qcow2 header",
        }
    }
}

/// Writes contiguous bytes to a node in large pieces.
struct Stream<'a> {
    node: &'a BlockNode,
    at: u64,
    buf: Vec<u8>,
}

impl Stream<'_> {
    const CHUNK: usize = 1 << 20;

    async fn push(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let n = self.buf.len() as u64;
        self.node
            .write(self.at, IoBuf::from_slice(&self.buf), Default::default())
            .await?;
        self.at += n;
        self.buf.clear();
        Ok(())
    }
}

/// Writes a new image into `node` in QEMU's order (header, refcounts, then
/// the tables a resize adds), so a failing write is reported at the step
/// QEMU would report it; then flushes.
async fn write_qcow2(
    node: &BlockNode,
    l: &Layout,
    spec: &Qcow2Spec,
    header: Vec<u8>,
) -> Result<(), (Stage, std::io::Error)> {
    let cs = l.cs;
    let len = l.total_clusters() * cs;
    if node.size() < len {
        node.truncate(len).await.map_err(|e| (Stage::Resize, e))?;
    }
    node.write(0, IoBuf::from_slice(&header), Default::default())
        .await
        .map_err(|e| (Stage::Header, e))?;
    let mut out = Stream {
        node,
        at: l.rt_off(),
        buf: Vec::new(),
    };
    let mut cluster = vec![0u8; cs as usize];
    let refcounts = async {
        for i in 0..l.rt_clusters * cs / 8 {
            let e = if i < l.refblocks {
                l.rb_off() + i * cs
            } else {
                0
            };
            out.push(&e.to_be_bytes()).await?;
        }
        let per_block = (cs * 8) >> spec.refcount_order;
        let total = l.total_clusters();
        for b in 0..l.refblocks {
            cluster.fill(0);
            let first = b * per_block;
            for j in 0..per_block.min(total.saturating_sub(first)) {
                crate::qcow2::meta::rc_set(spec.refcount_order, &mut cluster, j as usize, 1);
            }
            out.push(&cluster).await?;
        }
        out.flush().await
    };
    refcounts.await.map_err(|e| (Stage::Refcounts, e))?;
    let tables = async {
        let copied = crate::qcow2::entry::COPIED;
        for i in 0..l.l1_clusters * cs / 8 {
            let e = if i < l.l2_tables {
                (l.l2_off() + i * cs) | copied
            } else {
                0
            };
            out.push(&e.to_be_bytes()).await?;
        }
        let per_table = cs / 8;
        for t in 0..l.l2_tables {
            for k in 0..per_table {
                let d = t * per_table + k;
                let e = if d < l.data_clusters {
                    (l.data_off() + d * cs) | copied
                } else {
                    0
                };
                out.push(&e.to_be_bytes()).await?;
            }
        }
        out.flush().await?;
        let data_len = l.data_clusters * cs;
        match spec.preallocation {
            Prealloc::Off | Prealloc::Metadata => {}
            Prealloc::Falloc => {
                node.write_zeroes(l.data_off(), data_len, Default::default())
                    .await?
            }
            Prealloc::Full => {
                let mut at = 0;
                while at < data_len {
                    let n = (data_len - at).min(Stream::CHUNK as u64);
                    let zeroes = IoBuf::zeroed(n as usize);
                    node.write(l.data_off() + at, zeroes, Default::default())
                        .await?;
                    at += n;
                }
            }
        }
        Ok(())
    };
    tables
        .await
        .map_err(|e: std::io::Error| (Stage::Resize, e))?;
    node.flush().await.map_err(|e| (Stage::Resize, e))
}
