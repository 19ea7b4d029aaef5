//! Property checks of the NBD parsers on the stable toolchain, the
//! counterpart of the cargo-fuzz targets `nbd_options` and `nbd_requests`
//! (same harnesses, `livesnap_testkit::fuzz`): headers round-trip through
//! their encoders, and a server connection fed arbitrary bytes (raw, or
//! well-formed headers with arbitrary fields after a real handshake) ends
//! without a panic. Seed inputs and kept fuzzer findings are replayed too.

use livesnap_nbd::proto::*;
use livesnap_testkit::fuzz::{committed_inputs, nbd_handshake, nbd_requests, nbd_session};
use proptest::prelude::*;

/// Cases per property: enough to cover the field space, small enough that
/// the suite stays fast on a loaded machine.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn request_header_round_trips(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request { flags, typ, cookie, offset, len: len.into() };
        prop_assert_eq!(Request::decode(&r.encode()), Some(r));
    }

    #[test]
    fn extended_request_header_round_trips(flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) {
        let r = Request { flags, typ, cookie, offset, len };
        prop_assert_eq!(Request::decode_extended(&r.encode_extended()), Some(r));
    }

    #[test]
    fn extended_request_header_decode_never_panics(b in proptest::array::uniform32(any::<u8>())) {
        let magic_ok = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == EXTENDED_REQUEST_MAGIC;
        match Request::decode_extended(&b) {
            Some(r) => prop_assert_eq!(r.encode_extended(), b),
            None => prop_assert!(!magic_ok),
        }
    }

    #[test]
    fn request_header_decode_never_panics(b in proptest::array::uniform28(any::<u8>())) {
        let magic_ok = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == REQUEST_MAGIC;
        match Request::decode(&b) {
            Some(r) => prop_assert_eq!(r.encode(), b),
            None => prop_assert!(!magic_ok),
        }
    }

    #[test]
    fn chunk_header_round_trips(flags: u16, typ: u16, cookie: u64, len: u32) {
        let h = decode_chunk_header(&encode_chunk_header(flags, typ, cookie, len));
        prop_assert_eq!(h, Some(ChunkHeader { flags, typ, cookie, len }));
    }

    #[test]
    fn option_headers_round_trip(option: u32, typ: u32, data in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(
            decode_option_header(&encode_option_header(option, data.len() as u32)),
            Some((option, data.len() as u32))
        );
        let mut out = Vec::new();
        push_option_reply(&mut out, option, typ, &data);
        let h = decode_option_reply_header(out[..OPTION_REPLY_HEADER_LEN].try_into().unwrap()).unwrap();
        prop_assert_eq!((h.option, h.reply_type, h.len as usize), (option, typ, data.len()));
        prop_assert_eq!(&out[OPTION_REPLY_HEADER_LEN..], &data[..]);
    }
}

/// One option with an arbitrary code and body, or raw bytes.
fn option() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0u32..16, proptest::collection::vec(any::<u8>(), 0..48)).prop_map(|(opt, body)| {
            let mut b = encode_option_header(opt, body.len() as u32).to_vec();
            b.extend_from_slice(&body);
            b
        }),
        proptest::collection::vec(any::<u8>(), 0..32),
    ]
}

/// One request header with fields near the interesting values, and maybe a payload.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let offset = prop_oneof![0u64..(1 << 21), any::<u64>()];
    let len = prop_oneof![0u32..(1 << 17), any::<u32>()];
    (
        any::<u16>(),
        0u16..12,
        any::<u64>(),
        offset,
        len,
        0usize..600,
    )
        .prop_map(|(flags, typ, cookie, offset, len, payload)| {
            let mut b = Request {
                flags,
                typ,
                cookie,
                offset,
                len: len.into(),
            }
            .encode()
            .to_vec();
            b.resize(b.len() + payload, 0xa5);
            b
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_client_bytes_end_the_connection_cleanly(
        flags in 0u32..4,
        options in proptest::collection::vec(option(), 0..6),
    ) {
        let mut input = flags.to_be_bytes().to_vec();
        for o in options {
            input.extend(o);
        }
        nbd_session(&input);
    }

    #[test]
    fn arbitrary_requests_after_a_real_handshake(reqs in proptest::collection::vec(request(), 1..8)) {
        let out = nbd_requests(&reqs.concat());
        // The handshake itself succeeded: the server got to transmission.
        prop_assert!(out.len() > nbd_handshake().len());
    }

    #[test]
    fn raw_bytes_after_a_real_handshake(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        nbd_requests(&raw);
    }
}

#[test]
fn seeds_and_fuzzer_findings_replay() {
    let opts = committed_inputs("nbd_options");
    let reqs = committed_inputs("nbd_requests");
    assert!(opts.len() >= 4 && reqs.len() >= 2, "seed corpora missing");
    for (path, input) in &opts {
        eprintln!("{}", path.display());
        nbd_session(input);
    }
    for (path, input) in &reqs {
        eprintln!("{}", path.display());
        nbd_requests(input);
    }
}
