//! QEMU's iteration orders, reproduced so that output bytes and "which error
//! comes first" match qemu-storage-daemon exactly.
//!
//! QEMU keeps JSON objects in a `QDict` (a 512-bucket hash table, newest
//! entry first within a bucket) and prints and checks members in that
//! order. The QAPI input visitor remembers unvisited members in a GLib
//! `GHashTable` and reports the first one GLib iterates as "unexpected".
//! Both orders were checked against qsd 10.0.2 / GLib 2.74 (see
//! docs/qmp-qsd-transcript.md).

use serde_json::{Map, Value};

const QDICT_BUCKET_MAX: u32 = 512;

/// QEMU's `tdb_hash()` bucket for a `QDict` key.
fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add((b as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKET_MAX
}

/// Indices of `keys` (given in insertion order) in QDict iteration order.
pub(crate) fn qdict_order_of<'a, I>(keys: I) -> Vec<usize>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut v: Vec<(u32, usize)> = keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (qdict_bucket(k), i))
        .collect();
    // Within a bucket QEMU inserts at the head, so later keys come first.
    v.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    v.into_iter().map(|(_, i)| i).collect()
}

/// The members of `map` in the order QEMU would iterate them.
pub(crate) fn qdict_entries(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let entries: Vec<(&String, &Value)> = map.iter().collect();
    qdict_order_of(entries.iter().map(|(k, _)| k.as_str()))
        .into_iter()
        .map(|i| entries[i])
        .collect()
}

/// GLib's `g_str_hash` (djb2 over *signed* chars).
fn g_str_hash(key: &str) -> u32 {
    let mut h: u32 = 5381;
    for &b in key.as_bytes() {
        h = h.wrapping_mul(33).wrapping_add(b as i8 as i32 as u32);
    }
    h
}

const PRIME_MOD: [u32; 32] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
];
const MIN_SHIFT: u32 = 3;
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;

/// A string set laid out exactly like a GLib 2.74 `GHashTable` (open
/// addressing, quadratic probing, in-place resize), so that its first
/// element is the one `g_hash_table_iter_next()` would return.
pub(crate) struct GHashSet {
    size: usize,
    modulo: u32,
    mask: u32,
    nnodes: usize,
    noccupied: usize,
    hashes: Vec<u32>,
    keys: Vec<Option<String>>,
}

impl GHashSet {
    pub(crate) fn new() -> GHashSet {
        let mut s = GHashSet {
            size: 0,
            modulo: 0,
            mask: 0,
            nnodes: 0,
            noccupied: 0,
            hashes: Vec::new(),
            keys: Vec::new(),
        };
        s.set_shift(MIN_SHIFT);
        s.hashes = vec![UNUSED; s.size];
        s.keys = vec![None; s.size];
        s
    }

    fn set_shift(&mut self, shift: u32) {
        self.size = 1 << shift;
        self.modulo = PRIME_MOD[shift as usize];
        self.mask = (self.size - 1) as u32;
    }

    fn hash_to_index(&self, hash: u32) -> u32 {
        hash.wrapping_mul(11) % self.modulo
    }

    /// Slot holding `key`, else the slot an insert would use.
    fn lookup(&self, key: &str) -> (usize, u32) {
        let mut hash = g_str_hash(key);
        if hash < 2 {
            hash = 2;
        }
        let mut idx = self.hash_to_index(hash);
        let mut step = 0u32;
        let mut tombstone = None;
        while self.hashes[idx as usize] != UNUSED {
            let h = self.hashes[idx as usize];
            if h == hash && self.keys[idx as usize].as_deref() == Some(key) {
                return (idx as usize, hash);
            }
            if h == TOMBSTONE && tombstone.is_none() {
                tombstone = Some(idx as usize);
            }
            step += 1;
            idx = (idx + step) & self.mask;
        }
        (tombstone.unwrap_or(idx as usize), hash)
    }

    pub(crate) fn insert(&mut self, key: &str) {
        let (i, hash) = self.lookup(key);
        let old = self.hashes[i];
        if old >= 2 {
            return;
        }
        self.hashes[i] = hash;
        self.keys[i] = Some(key.to_string());
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    pub(crate) fn remove(&mut self, key: &str) {
        let (i, _) = self.lookup(key);
        if self.hashes[i] < 2 {
            return;
        }
        self.hashes[i] = TOMBSTONE;
        self.keys[i] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    /// The element GLib's iterator yields first.
    pub(crate) fn first(&self) -> Option<&str> {
        (0..self.size)
            .find(|&i| self.hashes[i] >= 2)
            .and_then(|i| self.keys[i].as_deref())
    }

    fn maybe_resize(&mut self) {
        let size = self.size;
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT)
            || size <= self.noccupied + self.noccupied / 16
        {
            self.resize();
        }
    }

    fn resize(&mut self) {
        let old_size = self.size;
        // GLib computes `nnodes * 1.333` in floating point and truncates.
        let mut n = (self.nnodes as f64 * 1.333) as u64;
        let mut shift = 0;
        while n != 0 {
            n >>= 1;
            shift += 1;
        }
        self.set_shift(shift.max(MIN_SHIFT));
        if self.size > old_size {
            self.hashes.resize(self.size, UNUSED);
            self.keys.resize(self.size, None);
        }
        let mut placed = vec![false; self.size.max(old_size)];
        for i in 0..old_size {
            let node_hash = self.hashes[i];
            if node_hash < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if placed[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut key = self.keys[i].take();
            let mut hash = node_hash;
            loop {
                let mut idx = self.hash_to_index(hash);
                let mut step = 0u32;
                while placed[idx as usize] {
                    step += 1;
                    idx = (idx + step) & self.mask;
                }
                let idx = idx as usize;
                placed[idx] = true;
                let replaced = self.hashes[idx];
                self.hashes[idx] = hash;
                if replaced < 2 {
                    self.keys[idx] = key;
                    break;
                }
                hash = replaced;
                key = std::mem::replace(&mut self.keys[idx], key);
            }
        }
        if self.size < old_size {
            self.hashes.truncate(self.size);
            self.keys.truncate(self.size);
        }
        self.noccupied = self.nnodes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qorder(keys: &[&str]) -> Vec<String> {
        qdict_order_of(keys.iter().copied())
            .into_iter()
            .map(|i| keys[i].to_string())
            .collect()
    }

    #[test]
    fn qdict_order_matches_qsd_replies() {
        // Key orders seen in qsd's output (transcript).
        assert_eq!(qorder(&["return", "id"]), ["return", "id"]);
        assert_eq!(qorder(&["error", "id"]), ["id", "error"]);
        assert_eq!(qorder(&["class", "desc"]), ["class", "desc"]);
        assert_eq!(
            qorder(&["major", "minor", "micro"]),
            ["micro", "minor", "major"]
        );
        assert_eq!(qorder(&["qemu", "package"]), ["qemu", "package"]);
        assert_eq!(
            qorder(&["version", "capabilities"]),
            ["version", "capabilities"]
        );
        assert_eq!(
            qorder(&["event", "data", "timestamp"]),
            ["timestamp", "event", "data"]
        );
        assert_eq!(
            qorder(&["seconds", "microseconds"]),
            ["seconds", "microseconds"]
        );
        assert_eq!(
            qorder(&["id", "type", "status", "current-progress", "total-progress"]),
            ["current-progress", "status", "total-progress", "type", "id"]
        );
    }

    fn first_unexpected(keys: &[&str], consumed: &[&str]) -> Option<String> {
        let mut h = GHashSet::new();
        for i in qdict_order_of(keys.iter().copied()) {
            h.insert(keys[i]);
        }
        for k in consumed {
            h.remove(k);
        }
        h.first().map(str::to_string)
    }

    #[test]
    fn glib_order_matches_qsd() {
        // "Parameter 'X' is unexpected" as reported by qsd.
        assert_eq!(first_unexpected(&["zz", "aa"], &[]).unwrap(), "aa");
        assert_eq!(first_unexpected(&["aa", "zz"], &[]).unwrap(), "aa");
        assert_eq!(first_unexpected(&["b", "a", "c"], &[]).unwrap(), "b");
        assert_eq!(
            first_unexpected(&["foo", "bar", "baz", "qux"], &[]).unwrap(),
            "baz"
        );
        assert_eq!(
            first_unexpected(
                &["driver", "node-name", "zz", "aa"],
                &["driver", "node-name"]
            )
            .unwrap(),
            "aa"
        );
        assert_eq!(first_unexpected(&["a"], &["a"]), None);
    }

    #[test]
    fn glib_order_survives_resizes() {
        // 8 keys trigger a grow; cross-checked against libglib 2.74 via ctypes.
        let keys = [
            "qdl",
            "4",
            "m42p0g_36",
            "04lrw",
            "a",
            "4tnovmi",
            "q",
            "tt5n",
        ];
        assert_eq!(first_unexpected(&keys, &[]).unwrap(), "4tnovmi");
        let many: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        // Expected values from real GLib (grows to 128 slots, then shrinks
        // as members are consumed).
        assert_eq!(first_unexpected(&refs, &[]).unwrap(), "k86");
        assert_eq!(first_unexpected(&refs, &refs[..50]).unwrap(), "k86");
        assert_eq!(first_unexpected(&refs, &refs[..97]).unwrap(), "k97");
    }
}
