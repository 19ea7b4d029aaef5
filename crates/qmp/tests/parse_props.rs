//! Property checks of the QMP input path on the stable toolchain, the
//! counterpart of the cargo-fuzz targets `qmp_stream` and `qmp_args` (same
//! harnesses, `livesnap_testkit::fuzz`): arbitrary bytes never panic the
//! splitter, parser or argument decoder, and a stream split anywhere gives
//! the same messages; values written as QEMU writes them read back equal.
//! Seed inputs and kept fuzzer findings are replayed too.

use livesnap_qmp::{to_wire_line, JsonStream};
use livesnap_testkit::fuzz::{committed_inputs, qmp_commands, qmp_stream};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// JSON values without floats (an integral double is written as an integer
/// and reads back as one, as in QEMU); floats have their own property.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Bytes that look like QMP: JSON punctuation, keywords, quotes, escapes,
/// invalid UTF-8 and control characters mixed with arbitrary bytes.
fn qmpish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(b"\"execute\"".to_vec()),
        Just(b"\"arguments\"".to_vec()),
        Just(b"\"id\"".to_vec()),
        Just(b"'sq'".to_vec()),
        Just(b"\"\\u00e9\\ud83d\\ude00\\".to_vec()),
        Just(b"true null false nul".to_vec()),
        Just(b"-0.5e+3 18446744073709551616 01".to_vec()),
        Just(b"\xc0\x80\xff\xfe\xed\xa0\x80".to_vec()),
        Just(b"\n\t\r\x00\x1b".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_bytes_split_anywhere_give_the_same_messages(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        qmp_stream(&input);
    }

    #[test]
    fn qmp_like_bytes_split_anywhere_give_the_same_messages(input in qmpish()) {
        qmp_stream(&input);
        qmp_commands(&input);
    }

    #[test]
    fn values_round_trip_through_the_wire_format(v in value()) {
        let line = to_wire_line(&v);
        let mut out = Vec::new();
        let mut s = JsonStream::new();
        s.feed(line.as_bytes(), &mut out);
        prop_assert_eq!(out.len(), 1, "{}", line);
        prop_assert_eq!(out[0].as_ref().unwrap(), &v);
        prop_assert!(s.is_idle());
    }

    #[test]
    fn doubles_round_trip_through_the_wire_format(f in any::<f64>().prop_filter("finite, not integral", |f| f.is_finite() && f.fract() != 0.0)) {
        let v = Value::from(f);
        let line = to_wire_line(&v);
        let mut out = Vec::new();
        JsonStream::new().feed(line.as_bytes(), &mut out);
        prop_assert_eq!(out[0].as_ref().unwrap().as_f64(), Some(f), "{}", line);
    }

    #[test]
    fn commands_with_arbitrary_arguments_decode_without_panic(args in value()) {
        let cmd = serde_json::json!({"execute": "x", "arguments": args, "id": 1});
        qmp_commands(to_wire_line(&cmd).as_bytes());
    }
}

#[test]
fn seeds_and_fuzzer_findings_replay() {
    let mut n = 0;
    for target in ["qmp_stream", "qmp_args"] {
        for (path, input) in committed_inputs(target) {
            eprintln!("{}", path.display());
            qmp_stream(&input);
            qmp_commands(&input);
            n += 1;
        }
    }
    assert!(n >= 100, "only {n} QMP seed inputs");
}
