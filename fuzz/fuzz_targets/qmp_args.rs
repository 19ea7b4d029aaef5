//! QMP argument decoder on every object the stream yields.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livesnap_testkit::fuzz::qmp_commands(data);
});
