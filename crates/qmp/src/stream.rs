//! Incremental JSON message splitter for a QMP byte stream.
//!
//! Bytes arrive in arbitrary pieces: several messages in one read, one
//! message across many reads. [`JsonStream`] lexes byte by byte with the
//! rules of QEMU's `json-lexer.c`/`json-streamer.c` (strings may use single
//! quotes; a message ends when braces and brackets balance; a lexical error
//! drops what was collected and skips to the next structural or control
//! character), so that the error replies and the resynchronisation after bad
//! input are those of qemu-storage-daemon. Completed token lists are then
//! turned into values by the parser in `parse.rs`.
//!
//! Memory is bounded by [`Limits`]: an over-long message is answered with an
//! error and dropped, never buffered without bound.

use serde_json::Value;

use crate::error::QmpError;
use crate::parse::{self, Tok, TokKind};

/// Bounds on one incoming message; the defaults are QEMU's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of token text in one message (and in one token).
    pub max_message_bytes: usize,
    /// Most tokens in one message.
    pub max_tokens: usize,
    /// Deepest nesting of `{` and `[` together.
    pub max_nesting: usize,
}

impl Default for Limits {
    /// QEMU's `MAX_TOKEN_SIZE` (64 MiB), `MAX_TOKEN_COUNT` (2 Mi) and
    /// `MAX_NESTING` (1024).
    fn default() -> Limits {
        Limits {
            max_message_bytes: 64 << 20,
            max_tokens: 2 << 20,
            max_nesting: 1 << 10,
        }
    }
}

/// Buffer capacity kept between messages; bigger buffers are given back.
const RETAINED_BYTES: usize = 64 * 1024;

/// One message out of the stream: a value, or QEMU's error for bad input.
pub type Message = Result<Value, QmpError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    Dq,
    DqEscape,
    Sq,
    SqEscape,
    Zero,
    Digits,
    Sign,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one byte does to the lexer.
enum Step {
    /// Move to a state (the byte is part of the current token).
    Go(State),
    /// The current token is complete.
    Emit(TokKind),
    /// Back to the start state, dropping the current text (whitespace, or
    /// the end of error recovery).
    Restart,
    /// Stay in recovery, dropping the byte.
    Skip,
    /// Lexical error: the token so far plus this byte is "stray".
    Error,
}

/// Incremental splitter of a byte stream into JSON messages.
pub struct JsonStream {
    limits: Limits,
    state: State,
    token: Vec<u8>,
    text: Vec<u8>,
    toks: Vec<(TokKind, usize)>,
    brace: i64,
    bracket: i64,
}

impl Default for JsonStream {
    fn default() -> JsonStream {
        JsonStream::new()
    }
}

impl JsonStream {
    /// A splitter with QEMU's limits.
    pub fn new() -> JsonStream {
        JsonStream::with_limits(Limits::default())
    }

    /// A splitter with the given limits.
    pub fn with_limits(limits: Limits) -> JsonStream {
        JsonStream {
            limits,
            state: State::Start,
            token: Vec::new(),
            text: Vec::new(),
            toks: Vec::new(),
            brace: 0,
            bracket: 0,
        }
    }

    /// True when no partial token or message is buffered.
    pub fn is_idle(&self) -> bool {
        self.state == State::Start && self.token.is_empty() && self.toks.is_empty()
    }

    /// Feeds bytes, appending every message they complete to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Message>) {
        for &b in input {
            self.feed_byte(b, out);
        }
    }

    fn feed_byte(&mut self, ch: u8, out: &mut Vec<Message>) {
        loop {
            let (step, consumed) = transition(self.state, ch);
            if consumed {
                self.token.push(ch);
            }
            match step {
                Step::Go(s) => self.state = s,
                Step::Emit(kind) => {
                    self.process_token(kind, out);
                    self.clear_token();
                    self.state = State::Start;
                }
                Step::Restart => {
                    self.clear_token();
                    self.state = State::Start;
                }
                Step::Skip => self.clear_token(),
                Step::Error => {
                    let stray = stray_text(&self.token);
                    self.emit_error(format!("JSON parse error, stray '{stray}'"), out);
                    self.clear_token();
                    self.state = State::Recovery;
                }
            }
            if consumed {
                break;
            }
        }
        // A single token may not grow without bound either; QEMU hands the
        // partial token on, where it always fails the size check.
        if self.token.len() > self.limits.max_message_bytes {
            self.emit_error("JSON token size limit exceeded".into(), out);
            self.clear_token();
            self.state = State::Start;
        }
    }

    fn clear_token(&mut self) {
        self.token.clear();
        // A huge string must not keep its memory for the life of the
        // connection (as `reset` does for the message text).
        if self.token.capacity() > RETAINED_BYTES {
            self.token = Vec::new();
        }
    }

    fn process_token(&mut self, kind: TokKind, out: &mut Vec<Message>) {
        match kind {
            TokKind::LCurly => self.brace += 1,
            TokKind::RCurly => self.brace -= 1,
            TokKind::LSquare => self.bracket += 1,
            TokKind::RSquare => self.bracket -= 1,
            _ => {}
        }
        let len = self.token.len();
        if self.text.len() + len + 1 > self.limits.max_message_bytes {
            return self.emit_error("JSON token size limit exceeded".into(), out);
        }
        if self.toks.len() + 1 > self.limits.max_tokens {
            return self.emit_error("JSON token count limit exceeded".into(), out);
        }
        if self.brace + self.bracket > self.limits.max_nesting as i64 {
            return self.emit_error("JSON nesting depth limit exceeded".into(), out);
        }
        self.text.extend_from_slice(&self.token);
        self.toks.push((kind, self.text.len()));
        if (self.brace > 0 || self.bracket > 0) && self.brace >= 0 && self.bracket >= 0 {
            return;
        }
        let mut start = 0;
        let toks: Vec<Tok<'_>> = self
            .toks
            .iter()
            .map(|&(kind, end)| {
                let t = Tok {
                    kind,
                    text: &self.text[start..end],
                };
                start = end;
                t
            })
            .collect();
        let msg = parse::parse(&toks).map_err(QmpError::generic);
        self.reset();
        out.push(msg);
    }

    fn emit_error(&mut self, desc: String, out: &mut Vec<Message>) {
        self.reset();
        out.push(Err(QmpError::generic(desc)));
    }

    fn reset(&mut self) {
        self.brace = 0;
        self.bracket = 0;
        self.toks.clear();
        self.text.clear();
        // Give back the memory of a huge message instead of keeping it
        // for the life of the connection.
        if self.text.capacity() > RETAINED_BYTES || self.toks.capacity() > RETAINED_BYTES / 16 {
            self.text = Vec::new();
            self.toks = Vec::new();
        }
    }
}

/// The text of a stray token as QEMU prints it: up to the first NUL (it is
/// a C string), invalid UTF-8 shown as U+FFFD.
fn stray_text(token: &[u8]) -> String {
    let end = token.iter().position(|&b| b == 0).unwrap_or(token.len());
    parse::mutf8_lossy(&token[..end])
}

/// QEMU's lexer table, as code. `consumed == false` means the byte is looked
/// at again from the next state (lookahead).
fn transition(state: State, ch: u8) -> (Step, bool) {
    use State::*;
    let go = |s| (Step::Go(s), true);
    let emit_la = |k| (Step::Emit(k), false);
    let error = (Step::Error, true);
    match state {
        Start => match ch {
            b'"' => go(Dq),
            b'\'' => go(Sq),
            b'0' => go(Zero),
            b'1'..=b'9' => go(Digits),
            b'-' => go(Sign),
            b'{' => (Step::Emit(TokKind::LCurly), true),
            b'}' => (Step::Emit(TokKind::RCurly), true),
            b'[' => (Step::Emit(TokKind::LSquare), true),
            b']' => (Step::Emit(TokKind::RSquare), true),
            b',' => (Step::Emit(TokKind::Comma), true),
            b':' => (Step::Emit(TokKind::Colon), true),
            b'a'..=b'z' => go(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => (Step::Restart, true),
            _ => error,
        },
        // Skip to a structural character, a control character other than
        // tab, or 0xFE/0xFF: places where a new message plausibly starts.
        Recovery => match ch {
            b'\t' => (Step::Skip, true),
            0x00..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => {
                (Step::Restart, false)
            }
            _ => (Step::Skip, true),
        },
        Dq => match ch {
            b'\\' => go(DqEscape),
            b'"' => (Step::Emit(TokKind::Str), true),
            0x20..=0xfd => go(Dq),
            _ => error,
        },
        Sq => match ch {
            b'\\' => go(SqEscape),
            b'\'' => (Step::Emit(TokKind::Str), true),
            0x20..=0xfd => go(Sq),
            _ => error,
        },
        // Escapes are validated by the parser; the lexer only skips one byte.
        DqEscape => match ch {
            0x20..=0xfd => go(Dq),
            _ => error,
        },
        SqEscape => match ch {
            0x20..=0xfd => go(Sq),
            _ => error,
        },
        Zero => match ch {
            b'0'..=b'9' => error,
            b'.' => go(Mantissa),
            _ => emit_la(TokKind::Integer),
        },
        Digits => match ch {
            b'0'..=b'9' => go(Digits),
            b'e' | b'E' => go(ExpE),
            b'.' => go(Mantissa),
            _ => emit_la(TokKind::Integer),
        },
        Sign => match ch {
            b'0' => go(Zero),
            b'1'..=b'9' => go(Digits),
            _ => error,
        },
        Mantissa => match ch {
            b'0'..=b'9' => go(MantissaDigits),
            _ => error,
        },
        MantissaDigits => match ch {
            b'0'..=b'9' => go(MantissaDigits),
            b'e' | b'E' => go(ExpE),
            _ => emit_la(TokKind::Float),
        },
        ExpE => match ch {
            b'-' | b'+' => go(ExpSign),
            b'0'..=b'9' => go(ExpDigits),
            _ => error,
        },
        ExpSign => match ch {
            b'0'..=b'9' => go(ExpDigits),
            _ => error,
        },
        ExpDigits => match ch {
            b'0'..=b'9' => go(ExpDigits),
            _ => emit_la(TokKind::Float),
        },
        Keyword => match ch {
            b'a'..=b'z' => go(Keyword),
            _ => emit_la(TokKind::Keyword),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed_all(s: &mut JsonStream, input: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn descs(msgs: &[Message]) -> Vec<String> {
        msgs.iter()
            .map(|m| match m {
                Ok(v) => format!("ok {v}"),
                Err(e) => e.desc.clone(),
            })
            .collect()
    }

    #[test]
    fn several_objects_in_one_read() {
        let mut s = JsonStream::new();
        let out = feed_all(
            &mut s,
            br#"{"execute":"a","id":1}{"execute":"b"}
{"execute":"c"}"#,
        );
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap(), &json!({"execute":"a","id":1}));
        assert_eq!(out[1].as_ref().unwrap(), &json!({"execute":"b"}));
        assert_eq!(out[2].as_ref().unwrap(), &json!({"execute":"c"}));
        assert!(s.is_idle());
    }

    #[test]
    fn one_object_split_at_every_byte() {
        let input = br#"{"execute": "x", "arguments": {"s": "a{b}[c]\"d\\", "n": [1, -2.5e3, true, null]}}"#;
        let expected =
            json!({"execute":"x","arguments":{"s":"a{b}[c]\"d\\","n":[1,-2.5e3,true,null]}});
        for split in 1..input.len() {
            let mut s = JsonStream::new();
            let mut out = feed_all(&mut s, &input[..split]);
            assert!(out.is_empty(), "split {split}: early message {out:?}");
            out = feed_all(&mut s, &input[split..]);
            assert_eq!(out.len(), 1, "split {split}");
            assert_eq!(out[0].as_ref().unwrap(), &expected, "split {split}");
        }
        // And one byte at a time.
        let mut s = JsonStream::new();
        let mut all = Vec::new();
        for b in input.iter() {
            s.feed(std::slice::from_ref(b), &mut all);
        }
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].as_ref().unwrap(), &expected);
    }

    #[test]
    fn braces_and_quotes_inside_strings() {
        let mut s = JsonStream::new();
        let out = feed_all(&mut s, br#"{"a":"}}}]]]","b":'"{["',"c":"\u007b\"}"}"#);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].as_ref().unwrap(),
            &json!({"a":"}}}]]]","b":"\"{[\"","c":"{\"}"})
        );
    }

    #[test]
    fn scalars_are_messages_of_their_own() {
        let mut s = JsonStream::new();
        let out = feed_all(&mut s, b"1 2 \"x\" [1] null\n");
        assert_eq!(
            descs(&out),
            ["ok 1", "ok 2", "ok \"x\"", "ok [1]", "ok null"]
        );
    }

    #[test]
    fn errors_and_recovery_match_qsd() {
        // Each line and its replies are from docs/qmp-qsd-transcript.md.
        let cases: &[(&[u8], &[&str])] = &[
            (
                b"garbage\n",
                &["JSON parse error, invalid keyword 'garbage'"],
            ),
            (b"}\n", &["JSON parse error, expecting value"]),
            (
                b"{\"execute\" \"query-version\"}\n",
                &["JSON parse error, missing : in object pair"],
            ),
            (
                b"{\"execute\":\"query-version\",}\n",
                &["JSON parse error, expecting value"],
            ),
            (
                b"{\"execute\":\"query-version\" \"id\":1}\n",
                &["JSON parse error, expected separator in dict"],
            ),
            (
                b"{\"execute\":query-version}\n",
                &[
                    "JSON parse error, stray '-v'",
                    "JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"execute\":\"q\",\"id\":1.}\n",
                &["JSON parse error, stray '1.}'"],
            ),
            (
                b"{\"execute\":\"q\",\"id\":01}\n",
                &[
                    "JSON parse error, stray '01'",
                    "JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"id\":\"\\x\"}\n",
                &["JSON parse error, invalid escape sequence in string"],
            ),
            (
                b"{\"id\":\"\\ud800\"}\n",
                &["JSON parse error, \\ud800 is not a valid Unicode character"],
            ),
            (
                b"{\"id\":\"\\uffff\"}\n",
                &["JSON parse error, \\uffff is not a valid Unicode character"],
            ),
            (
                b"{\"id\":\"\\u12\"}\n",
                &["JSON parse error, \\u12\" is not a valid Unicode character"],
            ),
            (
                b"{\"id\":\"tab\there\"}\n",
                &[
                    "JSON parse error, stray '\"tab\t'",
                    "JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"id\":\"\xff\"}\n",
                &[
                    "JSON parse error, stray '\"\u{fffd}'",
                    "JSON parse error, expecting value",
                ],
            ),
            (
                b"{\"id\":\"\xc0\x81\"}\n",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"{\"id\":\"\xed\xa0\x80\"}\n",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"{\"execute\":\"a\",\"execute\":\"a\"}\n",
                &["JSON parse error, duplicate key"],
            ),
            (b"{]\n", &["JSON parse error, expecting value"]),
            (
                b"[}]\n",
                &[
                    "JSON parse error, expecting value",
                    "JSON parse error, expecting value",
                ],
            ),
            (b"nul\n", &["JSON parse error, invalid keyword 'nul'"]),
            (b"@\n", &["JSON parse error, stray '@'"]),
        ];
        for (input, want) in cases {
            let mut s = JsonStream::new();
            let got = descs(&feed_all(&mut s, input));
            assert_eq!(&got, want, "input {:?}", String::from_utf8_lossy(input));
            // The stream is usable afterwards.
            let next = feed_all(&mut s, b"{\"execute\":\"x\"}\n");
            assert_eq!(descs(&next), ["ok {\"execute\":\"x\"}"]);
        }
    }

    #[test]
    fn open_bracket_swallows_following_lines() {
        let mut s = JsonStream::new();
        let mut out = feed_all(&mut s, b"{\"id\":[1,}\n");
        out.extend(feed_all(&mut s, b"{\"execute\":\"next\"}\n"));
        assert!(out.is_empty());
        out = feed_all(&mut s, b"]\n");
        assert_eq!(descs(&out), ["JSON parse error, expecting value"]);
    }

    #[test]
    fn trailing_close_brace() {
        let mut s = JsonStream::new();
        let out = feed_all(&mut s, b"{\"id\":1}}\n");
        assert_eq!(
            descs(&out),
            ["ok {\"id\":1}", "JSON parse error, expecting value"]
        );
    }

    #[test]
    fn nesting_limit() {
        let mut s = JsonStream::new();
        let mut input = vec![b'['; 1025];
        input.push(b'\n');
        let out = feed_all(&mut s, &input);
        assert_eq!(descs(&out), ["JSON nesting depth limit exceeded"]);
        let out = feed_all(&mut s, b"]]]\n");
        assert_eq!(out.len(), 3);
        // 1024 levels are fine.
        let mut s = JsonStream::new();
        let mut input = vec![b'['; 1024];
        input.extend(vec![b']'; 1024]);
        let out = feed_all(&mut s, &input);
        assert_eq!(out.len(), 1);
        assert!(out[0].is_ok());
    }

    #[test]
    fn size_limit_drops_message_and_resynchronises() {
        let limits = Limits {
            max_message_bytes: 1024,
            ..Limits::default()
        };
        // A long string inside an object: like qsd with 64 MiB (transcript).
        let mut s = JsonStream::with_limits(limits);
        let mut input = b"{\"execute\":\"query-version\",\"id\":\"".to_vec();
        input.extend(vec![b'a'; 1100]);
        input.extend(b"\"}\n{\"execute\":\"ok-after\"}\n");
        let out = feed_all(&mut s, &input);
        let d = descs(&out);
        assert_eq!(d[0], "JSON token size limit exceeded");
        assert!(d[1].starts_with("JSON parse error, invalid keyword 'aaa"));
        assert_eq!(d[2], "JSON parse error, stray '\"}\n'");
        assert_eq!(d[3], "ok {\"execute\":\"ok-after\"}");
        assert_eq!(d.len(), 4);
        // Many small tokens add up too.
        let mut s = JsonStream::with_limits(limits);
        let mut input = b"[".to_vec();
        for _ in 0..600 {
            input.extend(b"1,");
        }
        input.extend(b"1]\n{\"execute\":\"x\"}");
        let d = descs(&feed_all(&mut s, &input));
        assert_eq!(d[0], "JSON token size limit exceeded");
        assert_eq!(d.last().unwrap(), "ok {\"execute\":\"x\"}");
        // Memory given back.
        assert!(s.text.capacity() <= 64 * 1024);
    }

    #[test]
    fn token_count_limit() {
        let limits = Limits {
            max_tokens: 10,
            ..Limits::default()
        };
        let mut s = JsonStream::with_limits(limits);
        let d = descs(&feed_all(&mut s, b"[1,2,3,4,5,6]\n"));
        assert_eq!(d[0], "JSON token count limit exceeded");
    }

    #[test]
    fn single_quotes_and_escapes() {
        let mut s = JsonStream::new();
        let out = feed_all(
            &mut s,
            br#"{'execute':'query-version','id':'it\'s "sq"','u':"\u00e9\ud83d\ude00\/\b\f\n\r\t\u0000"}"#,
        );
        assert_eq!(
            out[0].as_ref().unwrap(),
            &json!({"execute":"query-version","id":"it's \"sq\"","u":"\u{e9}\u{1f600}/\u{8}\u{c}\n\r\t\u{0}"})
        );
        // Modified UTF-8 NUL.
        let out = feed_all(&mut s, b"{\"id\":\"\xc0\x80\"}");
        assert_eq!(out[0].as_ref().unwrap(), &json!({"id":"\u{0}"}));
    }

    #[test]
    fn numbers_keep_qemu_types() {
        let mut s = JsonStream::new();
        let out = feed_all(
            &mut s,
            b"[0, -0, 1.5, 1e3, 18446744073709551615, 18446744073709551616, -9223372036854775808, -9223372036854775809]",
        );
        let v = out[0].as_ref().unwrap().as_array().unwrap().clone();
        assert!(v[0].is_i64() && v[1].as_i64() == Some(0));
        assert!(v[2].is_f64() && v[3].is_f64());
        assert_eq!(v[4].as_u64(), Some(u64::MAX));
        assert!(v[5].is_f64());
        assert_eq!(v[6].as_i64(), Some(i64::MIN));
        assert!(v[7].is_f64());
    }
}
