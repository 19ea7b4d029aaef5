//! L1/L2 table entries and the geometry derived from the header
//! (`docs/interop/qcow2.rst`, "Cluster mapping").

use super::header::Header;

/// Bit 63 of L1/L2 entries: the refcount of the cluster is exactly 1.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries: the cluster reads as zeroes (v3).
pub const ZERO: u64 = 1;
/// Bits 9-55: host offset of a standard cluster or an L2 table.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What one L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated here: the backing file's data (or zeroes without one).
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster kept for later writes.
    Zero {
        /// Host offset of the kept allocation, if any.
        host: Option<u64>,
    },
    /// Plain data at `host`; `copied` when it may be written in place.
    Data {
        /// Host offset.
        host: u64,
        /// Refcount is 1: writes may go in place.
        copied: bool,
    },
    /// Deflate-compressed data: `len` bytes at `host`.
    Compressed {
        /// Host byte offset of the compressed stream.
        host: u64,
        /// Bytes to read.
        len: u64,
    },
}

/// Sizes and shifts of one image.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// log2 of the number of entries in an L2 table.
    pub l2_bits: u32,
    /// log2 of the number of refcounts in a refblock.
    pub rb_bits: u32,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Virtual size.
    pub size: u64,
    /// Image format version.
    pub version: u32,
    csize_shift: u32,
    csize_mask: u64,
}

impl Geometry {
    /// Geometry of the image with header `h`.
    pub fn new(h: &Header) -> Geometry {
        let cb = h.cluster_bits;
        Geometry {
            cluster_bits: cb,
            cluster_size: 1 << cb,
            l2_bits: cb - 3,
            rb_bits: cb + 3 - h.refcount_order,
            refcount_order: h.refcount_order,
            size: h.size,
            version: h.version,
            csize_shift: 62 - (cb - 8),
            csize_mask: (1 << (cb - 8)) - 1,
        }
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        1 << (self.l2_bits + self.cluster_bits)
    }

    /// Index into the L1 table for guest offset `off`.
    pub fn l1_index(&self, off: u64) -> usize {
        (off >> (self.l2_bits + self.cluster_bits)) as usize
    }

    /// Index into its L2 table for guest offset `off`.
    pub fn l2_index(&self, off: u64) -> usize {
        ((off >> self.cluster_bits) & (self.l2_entries() - 1)) as usize
    }

    /// `off` rounded down to its cluster.
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size - 1)
    }

    /// Offset of `off` inside its cluster.
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size - 1)
    }

    /// Whether `off` is cluster aligned.
    pub fn aligned(&self, off: u64) -> bool {
        self.in_cluster(off) == 0
    }

    /// Refcounts in one refblock.
    pub fn rb_entries(&self) -> u64 {
        1 << self.rb_bits
    }

    /// Decodes an L2 entry.
    pub fn decode(&self, e: u64) -> Cluster {
        if e & COMPRESSED != 0 {
            let host = e & ((1 << self.csize_shift) - 1);
            let sectors = ((e >> self.csize_shift) & self.csize_mask) + 1;
            let len = sectors * 512 - (host & 511);
            return Cluster::Compressed { host, len };
        }
        let host = e & OFFSET_MASK;
        if e & ZERO != 0 && self.version >= 3 {
            return Cluster::Zero {
                host: (host != 0).then_some(host),
            };
        }
        if host == 0 {
            return Cluster::Unallocated;
        }
        Cluster::Data {
            host,
            copied: e & COPIED != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cb: u32) -> Geometry {
        Geometry::new(&Header {
            version: 3,
            cluster_bits: cb,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            bitmaps: None,
            layout: Default::default(),
            header_length: 112,
            backing: None,
        })
    }

    #[test]
    fn decode_entries() {
        let g = geo(16);
        assert_eq!(g.decode(0), Cluster::Unallocated);
        assert_eq!(g.decode(1), Cluster::Zero { host: None });
        assert_eq!(
            g.decode(COPIED | 0x50000),
            Cluster::Data {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            g.decode(COPIED | 0x50000 | 1),
            Cluster::Zero {
                host: Some(0x50000)
            }
        );
        // Compressed: 64 KiB clusters put the sector count at bits 54-61.
        let e = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            g.decode(e),
            Cluster::Compressed {
                host: 0x12345,
                len: 4 * 512 - 0x145
            }
        );
        assert_eq!(g.l2_span(), 512 << 20);
        assert_eq!(g.rb_entries(), 32768);
    }
}
