//! NBD transmission: request headers and payloads after a valid handshake.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livesnap_testkit::fuzz::nbd_requests(data);
});
