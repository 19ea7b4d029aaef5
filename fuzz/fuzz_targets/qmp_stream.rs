//! QMP lexer, stream splitter and JSON parser: any bytes, split anywhere.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livesnap_testkit::fuzz::qmp_stream(data);
});
