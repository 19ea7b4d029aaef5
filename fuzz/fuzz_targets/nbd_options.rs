//! NBD handshake: client flags and options, then whatever follows.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livesnap_testkit::fuzz::nbd_session(data);
});
