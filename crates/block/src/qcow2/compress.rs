//! Compressed clusters: raw deflate streams (compression type 0, zlib), read
//! only. QEMU accepts a stream when it fills the whole cluster, whether or not
//! the stream's end marker comes before the end of the compressed bytes.

use std::io;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// Inflates `input` into `out`, which must come out completely filled.
pub fn inflate_cluster(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    let mut st = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut st, input, out, 0, flags);
    let ok =
        matches!(status, TINFLStatus::Done | TINFLStatus::HasMoreOutput) && written == out.len();
    if ok {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "qcow2: compressed cluster does not decompress to a full cluster ({status:?}, {written} bytes)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_block_round_trip() {
        // A raw deflate "stored" block: BFINAL=1, BTYPE=00, LEN, NLEN, data.
        let data: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        let mut stream = vec![0x01, 0x00, 0x02, 0xff, 0xfd];
        stream.extend_from_slice(&data);
        let mut out = vec![0u8; 512];
        inflate_cluster(&stream, &mut out).unwrap();
        assert_eq!(out, data);
        let mut big = vec![0u8; 1024];
        assert!(inflate_cluster(&stream, &mut big).is_err());
        assert!(inflate_cluster(&[0xff, 0xff], &mut out).is_err());
    }
}
