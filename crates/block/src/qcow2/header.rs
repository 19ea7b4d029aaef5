//! The qcow2 header and its extensions (qemu/qemu `docs/interop/qcow2.rst`,
//! "Header" and "Header extensions"), parsed and checked the way QEMU's
//! `qcow2_do_open` checks them, with QEMU's error texts.

use std::path::Path;

use crate::node::BlockNode;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size QEMU accepts: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU accepts: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's `QCOW_MAX_L1_SIZE` (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE` (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name the format allows.
pub const MAX_BACKING_NAME: usize = 1023;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: the refcounts may be inconsistent (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 63, livesnap's own: every bitmap marked in use was kept as
/// a write-intent log by livesnap since this bit was set, so its bits cover
/// every write even after a crash. Any other writer clears unknown autoclear
/// bits when it opens the image, which withdraws that promise
/// (docs/decisions.md).
pub const AUTOCLEAR_WRITE_INTENT: u64 = 1 << 63;
/// QEMU's `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;

/// Offset of the autoclear features field.
pub const OFF_AUTOCLEAR: u64 = 88;
/// Offset of `refcount_table_offset` (followed by `refcount_table_clusters`).
pub const OFF_REFTABLE: u64 = 48;

/// A backing file named by an image header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingRef {
    /// The file name as written in the header (may be relative to the image's directory).
    pub filename: String,
    /// The format from the backing format header extension, if present.
    pub format: Option<String>,
}

impl BackingRef {
    /// The backing format, or an error when the header has none: formats
    /// are never probed (a guest could write a qcow2 header into a raw
    /// backing file and make the host open any file it names).
    pub fn require_format(&self) -> crate::Result<&str> {
        self.format.as_deref().ok_or_else(|| {
            crate::Error::invalid(format!(
                "Backing file '{}' has no format in the image header and formats are never \
                 probed; set one with 'qemu-img rebase -u -F <format>' or give the backing node \
                 explicitly",
                self.filename
            ))
        })
    }
}

/// The parsed, checked header of a qcow2 image.
#[derive(Clone, Debug)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (4 = 16-bit refcounts).
    pub refcount_order: u32,
    /// Length of the header structure (72 for v2).
    pub header_length: u32,
    /// The backing file named by the header, if any.
    pub backing: Option<BackingRef>,
    /// Where the bitmap directory is, when the image has a consistent one.
    pub bitmaps: Option<BitmapsExt>,
    /// The header's bytes and extensions as read, to write them back with
    /// one extension changed.
    pub layout: Layout,
}

/// The bitmaps header extension (`Qcow2BitmapHeaderExt`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Host offset of the directory.
    pub directory_offset: u64,
}

impl BitmapsExt {
    fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.directory_size.to_be_bytes());
        b.extend_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

/// The parts of the first cluster a header rewrite keeps as they were.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Every extension but the bitmaps one, in file order: (magic, data).
    others: Vec<(u32, Vec<u8>)>,
    /// The backing file name as stored.
    backing_name: Vec<u8>,
    /// A bitmaps extension was there without the autoclear bit that vouches
    /// for it: a rewrite drops it.
    pub stale_bitmaps: bool,
}

impl Layout {
    /// The first cluster's header area: `fixed` (the header structure as it
    /// is now on disk, `header_length` bytes) with `autoclear`, the
    /// extensions with, when given, a bitmaps one (after the feature table,
    /// where QEMU puts it), then the backing file name; `None` when it would
    /// not fit in `cluster_size`.
    pub fn render(
        &self,
        fixed: &[u8],
        autoclear: u64,
        bitmaps: Option<BitmapsExt>,
        cluster_size: u64,
    ) -> Option<Vec<u8>> {
        let mut b = fixed.to_vec();
        if b.len() >= 96 {
            b[88..96].copy_from_slice(&autoclear.to_be_bytes());
        }
        let mut exts: Vec<(u32, Vec<u8>)> = self.others.clone();
        if let Some(ext) = bitmaps {
            let at = exts
                .iter()
                .position(|(m, _)| *m == EXT_FEATURE_TABLE)
                .map_or(exts.len(), |i| i + 1);
            exts.insert(at, (EXT_BITMAPS, ext.to_bytes()));
        }
        for (magic, data) in &exts {
            b.extend_from_slice(&magic.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend_from_slice(&[0; 8]);
        let backing_offset = if self.backing_name.is_empty() {
            0
        } else {
            b.len() as u64
        };
        b.extend_from_slice(&self.backing_name);
        if b.len() as u64 > cluster_size {
            return None;
        }
        b[8..16].copy_from_slice(&backing_offset.to_be_bytes());
        Some(b)
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Names of the incompatible feature bits, for "Unsupported qcow2 feature(s)".
fn feature_name(table: &[(u8, u8, String)], bit: u8) -> Option<String> {
    table
        .iter()
        .find(|(t, b, _)| *t == 0 && *b == bit)
        .map(|(_, _, n)| n.clone())
}

/// QEMU's `report_unsupported_feature`.
fn unsupported_features(table: &[(u8, u8, String)], mut mask: u64) -> crate::Error {
    let mut names = Vec::new();
    for bit in 0..64u8 {
        if mask & (1 << bit) != 0 {
            if let Some(n) = feature_name(table, bit) {
                names.push(n);
                mask &= !(1 << bit);
            }
        }
    }
    if mask != 0 {
        names.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    crate::Error::unsupported(format!(
        "Unsupported qcow2 feature(s): {}",
        names.join(", ")
    ))
}

/// Checks a table position as QEMU's `qcow2_validate_table` does.
fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
    name: &str,
) -> crate::Result<()> {
    if entries > max_bytes / entry_len {
        return Err(crate::Error::invalid(format!("{name} too large")));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || !offset.is_multiple_of(cluster_size) {
        return Err(crate::Error::invalid(format!("{name} offset invalid")));
    }
    Ok(())
}

/// Reads `len` bytes at `offset` of `file`; bytes past its end read as zeroes
/// (as QEMU's protocol layer does).
pub(crate) async fn read_padded(
    file: &BlockNode,
    offset: u64,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let size = file.size();
    if offset < size {
        let n = (size - offset).min(len as u64) as usize;
        let buf = file.read(offset, n).await?;
        out[..n].copy_from_slice(&buf);
    }
    Ok(out)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Reads and checks the header of the image in `file`. `writable` adds the
    /// checks QEMU makes only for read-write opens.
    pub async fn read(file: &BlockNode, writable: bool) -> crate::Result<Header> {
        // The header and its extensions live in the first cluster; read the
        // fixed part first, then the rest of the first cluster once its size is known.
        let fixed = read_padded(file, 0, 112)
            .await
            .map_err(|e| crate::Error::from(e).context("Could not read qcow2 header"))?;
        if be32(&fixed, 0) != MAGIC {
            return Err(crate::Error::invalid("Image is not in qcow2 format"));
        }
        let version = be32(&fixed, 4);
        if !(2..=3).contains(&version) {
            return Err(crate::Error::invalid(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(crate::Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let first = read_padded(file, 0, cluster_size as usize)
            .await
            .map_err(|e| crate::Error::from(e).context("Could not read qcow2 header"))?;
        let b = &first[..];

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 0, 4, 72)
        } else {
            let hl = be32(b, 100);
            if hl < 104 {
                return Err(crate::Error::invalid("qcow2 header too short"));
            }
            (be64(b, 72), be64(b, 80), be64(b, 88), be32(b, 96), hl)
        };
        if header_length as u64 > cluster_size {
            return Err(crate::Error::invalid("qcow2 header exceeds cluster size"));
        }
        let backing_offset = be64(b, 8);
        let backing_size = be32(b, 16);
        if backing_offset > cluster_size {
            return Err(crate::Error::invalid("Invalid backing file offset"));
        }
        let ext_end = if backing_offset != 0 {
            backing_offset
        } else {
            cluster_size
        };

        let compression_type = if header_length > 104 { b[104] } else { 0 };
        match compression_type {
            0 => {
                if incompatible & INCOMPAT_COMPRESSION != 0 {
                    return Err(crate::Error::invalid(
                        "qcow2: Compression type incompatible feature bit must not be set",
                    ));
                }
            }
            // zstd (1) is valid in QEMU builds with zstd; this reader only has zlib.
            t => {
                return Err(crate::Error::invalid(format!(
                    "qcow2: unknown compression type: {t}"
                )))
            }
        }

        let exts = read_extensions(
            b,
            header_length as u64,
            ext_end,
            autoclear & AUTOCLEAR_BITMAPS != 0,
        )?;
        if exts
            .bitmaps
            .is_some_and(|e| !e.directory_offset.is_multiple_of(cluster_size))
        {
            return Err(crate::Error::invalid(
                "bitmaps_ext: invalid bitmap directory offset",
            ));
        }

        // Bits this implementation knows; external data files and extended
        // L2 entries are valid qcow2 but not implemented here.
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if incompatible & !known != 0 {
            return Err(unsupported_features(
                &exts.feature_table,
                incompatible & !known,
            ));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 && writable {
            return Err(crate::Error::corrupt(
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        if incompatible & INCOMPAT_DIRTY != 0 && writable {
            return Err(crate::Error::invalid(
                "Could not repair dirty image: the image has lazy refcounts that were \
                        not written back; repair it with 'qemu-img check -r all'",
            ));
        }
        if refcount_order > 6 {
            return Err(crate::Error::invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        let crypt = be32(b, 32);
        if crypt != 0 {
            return Err(crate::Error::invalid(format!(
                "Unsupported encryption method {crypt}"
            )));
        }

        let size = be64(b, 24);
        let l1_size = be32(b, 36);
        let l1_table_offset = be64(b, 40);
        let refcount_table_offset = be64(b, 48);
        let refcount_table_clusters = be32(b, 56);
        let nb_snapshots = be32(b, 60);
        let snapshots_offset = be64(b, 64);

        if refcount_table_clusters == 0 {
            return Err(crate::Error::invalid(
                "Image does not contain a reference count table",
            ));
        }
        validate_table(
            refcount_table_offset,
            refcount_table_clusters as u64,
            cluster_size,
            MAX_REFTABLE_BYTES,
            cluster_size,
            "Reference count table",
        )?;
        validate_table(
            snapshots_offset,
            nb_snapshots as u64,
            40,
            40 * 65536,
            cluster_size,
            "Snapshot table",
        )?;
        validate_table(
            l1_table_offset,
            l1_size as u64,
            8,
            MAX_L1_BYTES,
            cluster_size,
            "Active L1 table",
        )?;
        let l2_covers = cluster_size * (cluster_size / 8);
        let needed_l1 = size.div_ceil(l2_covers);
        if needed_l1 > i32::MAX as u64 {
            return Err(crate::Error::invalid("Image is too big"));
        }
        if (l1_size as u64) < needed_l1 {
            return Err(crate::Error::invalid("L1 table is too small"));
        }
        if nb_snapshots != 0 && writable {
            return Err(crate::Error::invalid(
                "qcow2 images with internal snapshots can only be opened read-only here",
            ));
        }

        let backing = if backing_offset != 0 {
            let len = backing_size as usize;
            if len > MAX_BACKING_NAME.min((cluster_size - backing_offset) as usize) {
                return Err(crate::Error::invalid("Backing file name too long"));
            }
            let name = &b[backing_offset as usize..backing_offset as usize + len];
            Some(BackingRef {
                filename: String::from_utf8_lossy(name).into_owned(),
                format: exts.backing_format.clone(),
            })
        } else {
            None
        };
        let layout = Layout {
            stale_bitmaps: exts.stale_bitmaps,
            others: exts.others,
            backing_name: match backing_offset {
                0 => Vec::new(),
                o => b[o as usize..o as usize + backing_size as usize].to_vec(),
            },
        };

        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            backing,
            bitmaps: exts.bitmaps,
            layout,
        })
    }
}

struct Extensions {
    backing_format: Option<String>,
    feature_table: Vec<(u8, u8, String)>,
    /// The bitmaps extension, checked, whatever the autoclear bit says.
    bitmaps: Option<BitmapsExt>,
    /// Every other extension, raw.
    others: Vec<(u32, Vec<u8>)>,
    /// A bitmaps extension was skipped for want of its autoclear bit.
    stale_bitmaps: bool,
}

/// Walks the header extensions as QEMU's `qcow2_read_extensions`.
/// `bitmaps_valid` is the autoclear bit that vouches for the bitmaps
/// extension: without it the extension is stale and skipped unread.
fn read_extensions(
    b: &[u8],
    start: u64,
    end: u64,
    bitmaps_valid: bool,
) -> crate::Result<Extensions> {
    let mut out = Extensions {
        backing_format: None,
        feature_table: Vec::new(),
        bitmaps: None,
        others: Vec::new(),
        stale_bitmaps: false,
    };
    let mut off = start;
    while off < end {
        if off + 8 > b.len() as u64 {
            return Err(crate::Error::invalid("Header extension too large"));
        }
        let magic = be32(b, off as usize);
        let len = be32(b, off as usize + 4) as u64;
        off += 8;
        if off > end || len > end - off {
            return Err(crate::Error::invalid("Header extension too large"));
        }
        let data = &b[off as usize..(off + len) as usize];
        if magic != 0 && magic != EXT_BITMAPS {
            out.others.push((magic, data.to_vec()));
        }
        match magic {
            0 => return Ok(out),
            EXT_BITMAPS if bitmaps_valid => out.bitmaps = Some(bitmaps_ext(data)?),
            EXT_BITMAPS => out.stale_bitmaps = true,
            EXT_BACKING_FORMAT => {
                if len >= 16 {
                    return Err(crate::Error::invalid(format!(
                        "ERROR: ext_backing_format: len={len} too large (>=16)"
                    )));
                }
                out.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    let name_end = e[2..].iter().position(|&c| c == 0).unwrap_or(46);
                    let name = String::from_utf8_lossy(&e[2..2 + name_end]).into_owned();
                    out.feature_table.push((e[0], e[1], name));
                }
            }
            _ => {}
        }
        off += len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Checks the bitmaps extension as QEMU's `qcow2_read_extensions` does.
fn bitmaps_ext(data: &[u8]) -> crate::Result<BitmapsExt> {
    if data.len() != 24 {
        return Err(crate::Error::invalid(
            "bitmaps_ext: Invalid extension length",
        ));
    }
    if be32(data, 4) != 0 {
        return Err(crate::Error::invalid(
            "bitmaps_ext: Reserved field is not zero",
        ));
    }
    let ext = BitmapsExt {
        nb_bitmaps: be32(data, 0),
        directory_size: be64(data, 8),
        directory_offset: be64(data, 16),
    };
    if ext.nb_bitmaps > MAX_BITMAPS {
        return Err(crate::Error::invalid(format!(
            "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
            ext.nb_bitmaps
        )));
    }
    if ext.nb_bitmaps == 0 {
        return Err(crate::Error::invalid(
            "found bitmaps extension with zero bitmaps",
        ));
    }
    if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(crate::Error::invalid(format!(
            "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})",
            ext.directory_size
        )));
    }
    Ok(ext)
}

/// Reads the backing file reference from the header of the qcow2 image in
/// `file`, without opening anything else. `Ok(None)` for an image without one.
///
/// The daemon opens the chain from this before opening the image itself; it
/// must refuse a backing file without a format (probing formats is a known
/// security hole: a guest could write a qcow2 header into a raw image).
pub async fn read_header_backing(file: &BlockNode) -> crate::Result<Option<BackingRef>> {
    Ok(Header::read(file, false).await?.backing)
}

/// Resolves a backing file name from an image header against the directory of
/// the image that names it, as QEMU's `bdrv_get_full_backing_filename` does:
/// absolute names stay as they are, relative ones are relative to the image.
pub fn resolve_backing_filename(image_filename: &str, backing: &str) -> String {
    if backing.starts_with('/') || backing.contains("://") {
        return backing.to_string();
    }
    match Path::new(image_filename).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            dir.join(backing).to_string_lossy().into_owned()
        }
        _ => backing.to_string(),
    }
}

/// Longest backing chain a daemon should build (a guard against loops and
/// absurd chains; QEMU has no fixed limit but every layer costs a node).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Refuses a chain deeper than [`MAX_CHAIN_DEPTH`]; `depth` counts the image itself as 1.
pub fn check_chain_depth(depth: usize) -> crate::Result<()> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(crate::Error::invalid(format!(
            "Backing chain is too deep (more than {MAX_CHAIN_DEPTH} images); is there a loop?"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names() {
        assert_eq!(
            resolve_backing_filename("/a/b/top.qcow2", "base.raw"),
            "/a/b/base.raw"
        );
        assert_eq!(resolve_backing_filename("/a/top", "/x/base"), "/x/base");
        assert_eq!(resolve_backing_filename("top", "base"), "base");
        assert_eq!(resolve_backing_filename("d/top", "../base"), "d/../base");
        assert!(check_chain_depth(64).is_ok());
        let b = BackingRef {
            filename: "b.img".into(),
            format: None,
        };
        assert!(b.require_format().unwrap_err().text().contains("'b.img'"));
        assert!(check_chain_depth(65).is_err());
    }

    #[test]
    fn unsupported_feature_text() {
        let t = vec![(0u8, 2u8, "external data file".to_string())];
        assert_eq!(
            unsupported_features(&t, (1 << 2) | (1 << 9)),
            "Unsupported qcow2 feature(s): external data file, Unknown incompatible feature: 200"
        );
    }
}
