//! Tokens of one complete message to a JSON value, with the error texts of
//! QEMU's `json-parser.c` ("JSON parse error, expecting value", ...).
//!
//! Strings are QEMU's "modified UTF-8": `\xC0\x80` is U+0000, and
//! surrogates and Unicode noncharacters are rejected, escaped or not.

use serde_json::{Map, Number, Value};

/// Token types the lexer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    Str,
}

/// One token and its text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tok<'a> {
    pub(crate) kind: TokKind,
    pub(crate) text: &'a [u8],
}

/// QEMU formats parse errors into a 1024-byte buffer.
const MESSAGE_MAX: usize = 1023;

fn parse_error(msg: String) -> String {
    let msg = if msg.len() > MESSAGE_MAX {
        mutf8_lossy(&msg.as_bytes()[..MESSAGE_MAX])
    } else {
        msg
    };
    format!("JSON parse error, {msg}")
}

/// Parses one message; the error is the full QMP error description.
///
/// Iterative, with QEMU's grammar and error precedence: a message may nest
/// as deep as the limits allow without deepening the call stack.
pub(crate) fn parse(toks: &[Tok<'_>]) -> Result<Value, String> {
    let eoi = || parse_error("premature EOI".into());
    let mut stack: Vec<Frame> = Vec::new();
    let mut pos = 0;
    loop {
        // Parse the start of a value; containers push a frame.
        let t = *toks.get(pos).ok_or_else(eoi)?;
        pos += 1;
        let mut v = match t.kind {
            TokKind::LCurly | TokKind::LSquare => {
                let close = if t.kind == TokKind::LCurly {
                    TokKind::RCurly
                } else {
                    TokKind::RSquare
                };
                let next = toks.get(pos).ok_or_else(eoi)?;
                if next.kind == close {
                    pos += 1;
                    if close == TokKind::RCurly {
                        Value::Object(Map::new())
                    } else {
                        Value::Array(Vec::new())
                    }
                } else {
                    stack.push(if close == TokKind::RCurly {
                        Frame::Object(Map::new(), None)
                    } else {
                        Frame::Array(Vec::new())
                    });
                    continue;
                }
            }
            TokKind::Integer | TokKind::Float | TokKind::Str => literal(t)?,
            TokKind::Keyword => match t.text {
                b"true" => Value::Bool(true),
                b"false" => Value::Bool(false),
                b"null" => Value::Null,
                kw => {
                    return Err(parse_error(format!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(kw)
                    )))
                }
            },
            _ => return Err(parse_error("expecting value".into())),
        };
        // A value is complete: hand it to the enclosing containers.
        loop {
            let Some(frame) = stack.last_mut() else {
                return Ok(v);
            };
            match frame {
                Frame::Array(list) => {
                    list.push(v);
                    let t = toks.get(pos).ok_or_else(eoi)?;
                    pos += 1;
                    match t.kind {
                        TokKind::RSquare => {
                            v = Value::Array(std::mem::take(list));
                            stack.pop();
                        }
                        TokKind::Comma => break,
                        _ => return Err(parse_error("expected separator in list".into())),
                    }
                }
                Frame::Object(_, key @ None) => {
                    let Value::String(k) = v else {
                        return Err(parse_error("key is not a string in object".into()));
                    };
                    *key = Some(k);
                    let t = toks.get(pos).ok_or_else(eoi)?;
                    pos += 1;
                    if t.kind != TokKind::Colon {
                        return Err(parse_error("missing : in object pair".into()));
                    }
                    break;
                }
                Frame::Object(map, key @ Some(_)) => {
                    let k = key.take().unwrap_or_default();
                    if map.contains_key(&k) {
                        return Err(parse_error("duplicate key".into()));
                    }
                    map.insert(k, v);
                    let t = toks.get(pos).ok_or_else(eoi)?;
                    pos += 1;
                    match t.kind {
                        TokKind::RCurly => {
                            v = Value::Object(std::mem::take(map));
                            stack.pop();
                        }
                        TokKind::Comma => break,
                        _ => return Err(parse_error("expected separator in dict".into())),
                    }
                }
            }
        }
    }
}

/// An open container: a list, or an object with the key whose value is
/// being parsed (`None` while the key itself is being parsed).
enum Frame {
    Array(Vec<Value>),
    Object(Map<String, Value>, Option<String>),
}

fn literal(t: Tok<'_>) -> Result<Value, String> {
    // Token texts are ASCII for numbers (the lexer guarantees it).
    let text = std::str::from_utf8(t.text).unwrap_or("");
    match t.kind {
        TokKind::Str => parse_string(t.text).map(Value::String),
        TokKind::Integer => {
            // QEMU: int64 if it fits, else uint64 (non-negative), else double.
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Value::Number(i.into()));
            }
            if !text.starts_with('-') {
                if let Ok(u) = text.parse::<u64>() {
                    return Ok(Value::Number(u.into()));
                }
            }
            float(text)
        }
        _ => float(text),
    }
}

fn float(text: &str) -> Result<Value, String> {
    let f: f64 = text.parse().unwrap_or(f64::NAN);
    // QEMU would keep inf and then print the invalid JSON `inf`; a JSON
    // value cannot hold it, so such a message is rejected instead.
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| parse_error(format!("number '{text}' is out of range")))
}

fn hex4(s: &[u8], at: usize) -> Option<u32> {
    let digits = s.get(at..at + 4)?;
    let mut cp = 0u32;
    for &d in digits {
        cp = (cp << 4) | (d as char).to_digit(16)?;
    }
    Some(cp)
}

/// What `mod_utf8_encode()` accepts.
fn valid_codepoint(cp: u32) -> bool {
    cp <= 0x10ffff
        && !(0xd800..=0xdfff).contains(&cp)
        && !(0xfdd0..=0xfdef).contains(&cp)
        && (cp & 0xfffe) != 0xfffe
}

fn parse_string(t: &[u8]) -> Result<String, String> {
    let quote = t[0];
    let mut out = String::new();
    let mut i = 1;
    while i < t.len() && t[i] != quote {
        if t[i] != b'\\' {
            let (cp, n) = mod_utf8_codepoint(&t[i..]);
            let c = cp
                .and_then(char::from_u32)
                .ok_or_else(|| parse_error("invalid UTF-8 sequence in string".into()))?;
            out.push(c);
            i += n;
            continue;
        }
        let beg = i;
        let esc = t.get(i + 1).copied().unwrap_or(0);
        i += 2;
        match esc {
            b'"' => out.push('"'),
            b'\'' => out.push('\''),
            b'\\' => out.push('\\'),
            b'/' => out.push('/'),
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let mut cp = hex4(t, i);
                i += 4;
                if let Some(lead @ 0xd800..=0xdbff) = cp {
                    if t.get(i) == Some(&b'\\') && t.get(i + 1) == Some(&b'u') {
                        cp = match hex4(t, i + 2) {
                            Some(trail @ 0xdc00..=0xdfff) => {
                                i += 6;
                                Some(0x10000 + ((lead & 0x3ff) << 10) + (trail & 0x3ff))
                            }
                            _ => None,
                        };
                    }
                }
                match cp.filter(|&c| valid_codepoint(c)).and_then(char::from_u32) {
                    Some(c) => out.push(c),
                    None => {
                        // QEMU prints the escape as far as it read it, which
                        // can run into the closing quote.
                        let shown = mutf8_lossy(&t[beg..i.min(t.len())]);
                        return Err(parse_error(format!(
                            "{shown} is not a valid Unicode character"
                        )));
                    }
                }
            }
            _ => return Err(parse_error("invalid escape sequence in string".into())),
        }
    }
    Ok(out)
}

/// QEMU's `mod_utf8_codepoint()`: the code point at the start of `s` (None
/// if invalid) and how many bytes it spans.
pub(crate) fn mod_utf8_codepoint(s: &[u8]) -> (Option<u32>, usize) {
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let byte = s[0];
    if byte < 0x80 {
        return (Some(byte as u32), 1);
    }
    if byte >= 0xfe || byte & 0x40 == 0 {
        return (None, 1);
    }
    let len = byte.leading_ones() as usize;
    let mut cp = (byte as u32) & ((0x80u32 >> len) - 1);
    for i in 1..len {
        let b = s.get(i).copied().unwrap_or(0);
        if b & 0xc0 != 0x80 {
            return (None, i);
        }
        cp = (cp << 6) | (b as u32 & 0x3f);
    }
    let overlong = cp < MIN_CP[len - 2] && !(cp == 0 && len == 2);
    let ok = cp <= 0x10ffff
        && !(0xfdd0..=0xfdef).contains(&cp)
        && (cp & 0xfffe) != 0xfffe
        && !(0xd800..=0xdfff).contains(&cp)
        && !overlong;
    (ok.then_some(cp), len)
}

/// Bytes to text the way QEMU's JSON writer shows them: each invalid
/// sequence becomes one U+FFFD.
pub(crate) fn mutf8_lossy(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let (cp, n) = mod_utf8_codepoint(&s[i..]);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{fffd}'));
        i += n.max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mod_utf8() {
        assert_eq!(mod_utf8_codepoint(b"\xc0\x80"), (Some(0), 2));
        assert_eq!(mod_utf8_codepoint(b"\xc0\x81"), (None, 2));
        assert_eq!(mod_utf8_codepoint(b"\xc3\xa9"), (Some(0xe9), 2));
        assert_eq!(mod_utf8_codepoint(b"\xed\xa0\x80"), (None, 3));
        assert_eq!(mod_utf8_codepoint(b"\xef\xbf\xbf"), (None, 3));
        assert_eq!(mod_utf8_codepoint(b"\xf0\x9f\x98\x80"), (Some(0x1f600), 4));
        assert_eq!(mod_utf8_codepoint(b"\xe9x"), (None, 1));
        assert_eq!(mod_utf8_codepoint(b"\xff"), (None, 1));
        assert_eq!(mutf8_lossy(b"a\xffb\xe9"), "a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn long_messages_are_cut_like_vsnprintf() {
        let e = parse_error("x".repeat(5000));
        assert_eq!(e.len(), "JSON parse error, ".len() + 1023);
    }
}
