//! JSON output exactly as QEMU's `json-writer.c` prints it.
//!
//! Clients only need valid JSON, but byte-identical output lets scripts,
//! logs and tests compare livesnapd with qemu-storage-daemon directly:
//! `", "` and `": "` separators, members in QDict order, doubles as
//! `%.17g`, every character outside printable ASCII as `\uXXXX` (upper-case
//! hex, surrogate pairs above the BMP), and messages ended by CRLF.

use serde_json::Value;

use crate::order::qdict_entries;

/// One QMP message as QEMU writes it, including the trailing `"\r\n"`.
pub fn to_wire_line(v: &Value) -> String {
    let mut s = to_wire(v);
    s.push_str("\r\n");
    s
}

/// A JSON value as QEMU would print it (no line ending).
pub fn to_wire(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

/// Pieces still to be written, last first; iterative so that deep nesting
/// cannot overflow the stack.
enum Piece<'a> {
    Value(&'a Value),
    Key(&'a str),
    Text(&'static str),
}

fn write_value(out: &mut String, v: &Value) {
    let mut todo = vec![Piece::Value(v)];
    while let Some(p) = todo.pop() {
        let v = match p {
            Piece::Text(t) => {
                out.push_str(t);
                continue;
            }
            Piece::Key(k) => {
                write_str(out, k);
                out.push_str(": ");
                continue;
            }
            Piece::Value(v) => v,
        };
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    out.push_str(&i.to_string());
                } else if let Some(u) = n.as_u64() {
                    out.push_str(&u.to_string());
                } else {
                    out.push_str(&format_g17(n.as_f64().unwrap_or(f64::NAN)));
                }
            }
            Value::String(s) => write_str(out, s),
            Value::Array(a) => {
                out.push('[');
                todo.push(Piece::Text("]"));
                for (i, e) in a.iter().enumerate().rev() {
                    todo.push(Piece::Value(e));
                    if i > 0 {
                        todo.push(Piece::Text(", "));
                    }
                }
            }
            Value::Object(m) => {
                out.push('{');
                todo.push(Piece::Text("}"));
                for (i, (k, e)) in qdict_entries(m).into_iter().enumerate().rev() {
                    todo.push(Piece::Value(e));
                    todo.push(Piece::Key(k));
                    if i > 0 {
                        todo.push(Piece::Text(", "));
                    }
                }
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut cp = c as u32;
                // QEMU's decoder rejects noncharacters, and the writer
                // prints what it cannot decode as U+FFFD.
                if (0xfdd0..=0xfdef).contains(&cp) || cp & 0xfffe == 0xfffe {
                    cp = 0xfffd;
                }
                if cp > 0xffff {
                    let v = cp - 0x10000;
                    out.push_str(&format!(
                        "\\u{:04X}\\u{:04X}",
                        0xd800 + (v >> 10),
                        0xdc00 + (v & 0x3ff)
                    ));
                } else {
                    out.push_str(&format!("\\u{cp:04X}"));
                }
            }
        }
    }
    out.push('"');
}

/// C's `printf("%.17g", x)`.
pub(crate) fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    const P: i32 = 17;
    let sci = format!("{:.*e}", (P - 1) as usize, x);
    let (mantissa, exp) = sci.split_once('e').expect("exponent in {:e} output");
    let exp: i32 = exp.parse().expect("numeric exponent");
    // C's rule: exponent style unless -4 <= X < P.
    if !(-4..P).contains(&exp) {
        let m = strip_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    } else {
        strip_zeros(&format!("{:.*}", (P - 1 - exp) as usize, x)).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn doubles_like_qsd() {
        // Pairs of (value, qsd's echo) from the transcript.
        let cases = [
            (1.5, "1.5"),
            (1e3, "1000"),
            (100.0, "100"),
            (0.1, "0.10000000000000001"),
            (1e-7, "9.9999999999999995e-08"),
            (123456789.125, "123456789.125"),
            (1e300, "1.0000000000000001e+300"),
            (-0.0, "-0"),
            (-12345678901234567890.0, "-1.2345678901234567e+19"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
        ];
        for (x, want) in cases {
            assert_eq!(format_g17(x), want, "{x}");
        }
        assert_eq!(format_g17(1e16), "10000000000000000");
        assert_eq!(format_g17(1e17), "1e+17");
        assert_eq!(format_g17(0.0001), "0.0001");
        assert_eq!(format_g17(0.00001), "1.0000000000000001e-05");
    }

    #[test]
    fn strings_like_qsd() {
        assert_eq!(to_wire(&json!("x\u{e9}\n")), r#""x\u00E9\n""#);
        assert_eq!(to_wire(&json!("\u{0}")), r#""\u0000""#);
        assert_eq!(to_wire(&json!("\u{1f600}")), r#""\uD83D\uDE00""#);
        assert_eq!(
            to_wire(&json!("/\u{8}\u{c}\r\t'\u{7f}")),
            r#""/\b\f\r\t'\u007F""#
        );
        assert_eq!(to_wire(&json!("it's \"sq\"")), r#""it's \"sq\"""#);
        assert_eq!(to_wire(&json!("\u{fdd0}")), r#""\uFFFD""#);
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        let mut v = json!(1);
        for _ in 0..100_000 {
            v = Value::Array(vec![v]);
        }
        let s = to_wire(&v);
        assert_eq!(s.len(), 200_001);
        // serde_json drops recursively; unwind by hand.
        while let Value::Array(mut a) = v {
            v = a.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn objects_in_qdict_order() {
        let greeting = json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
            "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}});
        assert_eq!(
            to_wire_line(&greeting),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
             \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
        assert_eq!(
            to_wire(&json!({"error": {"class": "CommandNotFound", "desc": "x"}, "id": "abc"})),
            r#"{"id": "abc", "error": {"class": "CommandNotFound", "desc": "x"}}"#
        );
        assert_eq!(
            to_wire(&json!({"id": [1, {"k": "v"}], "e": {}, "l": []})),
            r#"{"e": {}, "l": [], "id": [1, {"k": "v"}]}"#
        );
    }
}
