//! A backup chain in a directory: a full backup, then incrementals each
//! backed by the one before (`backup`), the manifest that lists them
//! ([`manifest`]), the record of a run in progress that lets the next run
//! undo what a killed one left ([`run`]), and reading the images through the
//! engine ([`image`]) for `restore` and `verify`.
//!
//! Names: backup N is `NNNN-full.qcow2` or `NNNN-incremental.qcow2`; the
//! dirty bitmap a chain keeps on a QMP endpoint is
//! `livesnap-chain-ID-fullN` (ID the chain's, N the full backup its
//! tracking began with), the copy of its bits a run keeps until its backup
//! is committed `livesnap-chain-ID-undoM`, and the libvirt checkpoint of
//! backup M `livesnap-chain-ID-M` (libvirt names its bitmap after it).

pub mod image;
pub mod manifest;
pub mod run;

use std::io::Read;
use std::path::Path;

use crate::chain::manifest::BackupKind;
use crate::error::{Failure, Result};

/// The image file of backup `index`.
pub fn file_name(index: u64, kind: BackupKind) -> String {
    format!("{index:04}-{}.qcow2", kind.name())
}

/// The dirty bitmap tracking changes for chain `chain` since its full
/// backup `full` (QMP endpoints).
pub fn bitmap_name(chain: &str, full: u64) -> String {
    format!("livesnap-chain-{chain}-full{full}")
}

/// The copy of the chain bitmap's bits that the run taking backup `index`
/// keeps until its backup is committed: merged back if it is not.
pub fn undo_bitmap_name(chain: &str, index: u64) -> String {
    format!("livesnap-chain-{chain}-undo{index}")
}

/// A new chain id: 16 hex digits from the kernel's random source.
pub fn new_chain_id() -> String {
    let mut b = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if random.is_err() {
        // No /dev/urandom: the time and pid are unique enough on one host.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(40)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The text of `path`, a file of DIR; `None` when it is not there.
fn read_if_there(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::usage(format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(file_name(0, BackupKind::Full), "0000-full.qcow2");
        assert_eq!(
            file_name(12, BackupKind::Incremental),
            "0012-incremental.qcow2"
        );
        assert_eq!(bitmap_name("ab", 3), "livesnap-chain-ab-full3");
        let id = new_chain_id();
        assert_eq!(id.len(), 16);
        assert_ne!(id, new_chain_id());
    }
}
