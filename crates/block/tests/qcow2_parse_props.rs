//! Property checks of the qcow2 metadata parsers on the stable toolchain,
//! the counterpart of the cargo-fuzz target `qcow2_image` (same harness,
//! `livesnap_testkit::fuzz::qcow2_image`): real images made by qemu-img
//! (the committed seed corpus), with arbitrary bytes overwritten in the
//! header, the extensions and the tables, open or fail with an error, and
//! a walk through what opened never panics. Kept fuzzer findings replay.

use livesnap_testkit::fuzz::{committed_inputs, qcow2_image};
use proptest::prelude::*;

fn seeds() -> Vec<Vec<u8>> {
    let s: Vec<Vec<u8>> = committed_inputs("qcow2_image")
        .into_iter()
        .filter(|(p, _)| p.components().any(|c| c.as_os_str() == "seeds"))
        .map(|(_, b)| b)
        .collect();
    assert!(s.len() >= 8, "qcow2 seed corpus missing");
    s
}

#[test]
fn seed_images_open_and_findings_replay() {
    let (mut opened, mut written) = (0, 0);
    for (path, image) in committed_inputs("qcow2_image") {
        let (ok, wrote) = qcow2_image(&image);
        eprintln!("{}: opened {ok}, written {wrote}", path.display());
        opened += ok as usize;
        written += wrote as usize;
    }
    // Every seed but the extended-L2 one (refused, as documented) opens and
    // takes writes.
    let want = seeds().len() - 1;
    assert!(
        opened >= want && written >= want,
        "opened {opened}, written {written} of {want}"
    );
}

/// Overwrites: (where, value), where mostly in the first 1 KiB (header,
/// extensions, often the first tables) and otherwise anywhere.
fn edits() -> impl Strategy<Value = Vec<(bool, u32, u8)>> {
    proptest::collection::vec(
        (proptest::bool::weighted(0.7), any::<u32>(), any::<u8>()),
        1..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn damaged_real_images_fail_cleanly(seed in any::<prop::sample::Index>(), edits in edits()) {
        let seeds = seeds();
        let mut image = seeds[seed.index(seeds.len())].clone();
        for (head, at, value) in edits {
            let span = if head { image.len().min(1024) } else { image.len() };
            let at = at as usize % span;
            image[at] = value;
        }
        qcow2_image(&image);
    }

    #[test]
    fn truncated_real_images_fail_cleanly(seed in any::<prop::sample::Index>(), keep in any::<prop::sample::Index>()) {
        let seeds = seeds();
        let image = &seeds[seed.index(seeds.len())];
        qcow2_image(&image[..keep.index(image.len() + 1)]);
    }
}
