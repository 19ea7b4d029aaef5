//! qcow2: header, extensions, L1/L2, refcount table, bitmap directory and tables.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livesnap_testkit::fuzz::qcow2_image(data);
});
