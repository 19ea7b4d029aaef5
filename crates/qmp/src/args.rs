//! Command arguments read the way QEMU's QObject input visitor reads them.
//!
//! A command handler reads its members in the order of the QAPI schema
//! (QEMU reports the first bad member it visits), then calls
//! [`Args::finish`]. Every error text is QEMU's, with the dotted path of a
//! nested member (`file.filename`) or a list element (`enable[0]`) where
//! QEMU shows one, and the bare member name where QEMU does (enum values,
//! integer ranges).
//!
//! QEMU's typing is strict and so is this: `str` takes only strings (not
//! numbers), `bool` only `true`/`false`, `int` only integers that fit int64
//! (not `1.0`), and `null` for an optional member is a type error, not
//! "absent". One quirk is kept on purpose: `uint64`/`size` accepts a
//! negative integer and wraps it (QEMU does, "for backward compatibility"),
//! so handlers must check ranges that matter to them.

use serde_json::{Map, Value};

use crate::error::QmpError;
use crate::order::{qdict_order_of, GHashSet};

/// A reader over the members of one JSON object (the `arguments` of a
/// command, or an object nested in them).
#[derive(Debug)]
pub struct Args {
    map: Map<String, Value>,
    prefix: String,
    keys: Vec<String>,
    consumed: Vec<String>,
}

/// One element of a list member, with its path (`name[i]`) for errors.
#[derive(Debug)]
pub struct Elem {
    value: Value,
    path: String,
}

/// QEMU names list elements `null` in messages that use the bare name.
const LIST_ELEMENT_NAME: &str = "null";

fn invalid_type(path: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{path}', expected: {expected}"
    ))
}

fn conv_str(v: Value, path: &str) -> Result<String, QmpError> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(invalid_type(path, "string")),
    }
}

fn conv_bool(v: Value, path: &str) -> Result<bool, QmpError> {
    v.as_bool().ok_or_else(|| invalid_type(path, "boolean"))
}

fn conv_i64(v: Value, path: &str) -> Result<i64, QmpError> {
    v.as_i64().ok_or_else(|| invalid_type(path, "integer"))
}

fn conv_f64(v: Value, path: &str) -> Result<f64, QmpError> {
    v.as_f64().ok_or_else(|| invalid_type(path, "number"))
}

fn conv_u64(v: Value, path: &str) -> Result<u64, QmpError> {
    if let Some(u) = v.as_u64() {
        return Ok(u);
    }
    // QEMU accepts negative values for uint64 and wraps them.
    if let Some(i) = v.as_i64() {
        return Ok(i as u64);
    }
    Err(QmpError::generic(format!(
        "Parameter '{path}' expects uint64"
    )))
}

fn conv_u32(v: Value, path: &str, bare: &str) -> Result<u32, QmpError> {
    let u = conv_u64(v, path)?;
    u32::try_from(u).map_err(|_| QmpError::generic(format!("Parameter '{bare}' expects uint32_t")))
}

fn conv_enum(v: Value, path: &str, bare: &str, allowed: &[&str]) -> Result<String, QmpError> {
    let s = conv_str(v, path)?;
    if allowed.contains(&s.as_str()) {
        Ok(s)
    } else {
        Err(QmpError::generic(format!(
            "Parameter '{bare}' does not accept value '{s}'"
        )))
    }
}

fn conv_object(v: Value, path: &str) -> Result<Map<String, Value>, QmpError> {
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(invalid_type(path, "object")),
    }
}

impl Args {
    /// A reader over the top-level `arguments` object.
    pub fn new(map: Map<String, Value>) -> Args {
        Args::with_prefix(map, String::new())
    }

    fn with_prefix(map: Map<String, Value>, prefix: String) -> Args {
        let keys = map.keys().cloned().collect();
        Args {
            map,
            prefix,
            keys,
            consumed: Vec::new(),
        }
    }

    /// A reader for an object taken raw from member `key` of this one
    /// (e.g. the object branch of an alternate), with paths `key.member`.
    pub fn nested(&self, key: &str, map: Map<String, Value>) -> Args {
        Args::with_prefix(map, format!("{}.", self.path_of(key)))
    }

    /// The name QEMU shows for member `key`: `key` at top level,
    /// `outer.key` when nested.
    pub fn path_of(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    /// Whether member `key` is present and not yet read (even if `null`).
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Takes member `key` as raw JSON, for `any` members and alternates.
    pub fn take_value(&mut self, key: &str) -> Option<Value> {
        let v = self.map.remove(key)?;
        self.consumed.push(key.to_string());
        Some(v)
    }

    /// QEMU's error for a missing mandatory member.
    pub fn missing(&self, key: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{}' is missing", self.path_of(key)))
    }

    /// QEMU's error for a member of the wrong JSON type; `expected` is what
    /// QEMU names (`string`, `object`, or a type name like `BlockdevRef`
    /// for alternates).
    pub fn invalid_type(&self, key: &str, expected: &str) -> QmpError {
        invalid_type(&self.path_of(key), expected)
    }

    fn req(&mut self, key: &str) -> Result<Value, QmpError> {
        self.take_value(key).ok_or_else(|| self.missing(key))
    }

    fn opt<T>(
        &mut self,
        key: &str,
        conv: impl FnOnce(Value, &str) -> Result<T, QmpError>,
    ) -> Result<Option<T>, QmpError> {
        match self.take_value(key) {
            None => Ok(None),
            Some(v) => conv(v, &self.path_of(key)).map(Some),
        }
    }

    /// Mandatory `str` member.
    pub fn req_str(&mut self, key: &str) -> Result<String, QmpError> {
        let v = self.req(key)?;
        conv_str(v, &self.path_of(key))
    }

    /// Optional `str` member.
    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        self.opt(key, conv_str)
    }

    /// Mandatory `bool` member.
    pub fn req_bool(&mut self, key: &str) -> Result<bool, QmpError> {
        let v = self.req(key)?;
        conv_bool(v, &self.path_of(key))
    }

    /// Optional `bool` member.
    pub fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        self.opt(key, conv_bool)
    }

    /// Mandatory `int` (int64) member.
    pub fn req_i64(&mut self, key: &str) -> Result<i64, QmpError> {
        let v = self.req(key)?;
        conv_i64(v, &self.path_of(key))
    }

    /// Optional `int` (int64) member.
    pub fn opt_i64(&mut self, key: &str) -> Result<Option<i64>, QmpError> {
        self.opt(key, conv_i64)
    }

    /// Mandatory `uint64` or `size` member (negative integers wrap, as in QEMU).
    pub fn req_u64(&mut self, key: &str) -> Result<u64, QmpError> {
        let v = self.req(key)?;
        conv_u64(v, &self.path_of(key))
    }

    /// Optional `uint64` or `size` member (negative integers wrap, as in QEMU).
    pub fn opt_u64(&mut self, key: &str) -> Result<Option<u64>, QmpError> {
        self.opt(key, conv_u64)
    }

    /// Mandatory `uint32` member, range-checked with QEMU's error.
    pub fn req_u32(&mut self, key: &str) -> Result<u32, QmpError> {
        let v = self.req(key)?;
        conv_u32(v, &self.path_of(key), key)
    }

    /// Optional `uint32` member, range-checked with QEMU's error.
    pub fn opt_u32(&mut self, key: &str) -> Result<Option<u32>, QmpError> {
        self.opt(key, |v, path| conv_u32(v, path, key))
    }

    /// Mandatory `number` (double) member; integers are accepted.
    pub fn req_f64(&mut self, key: &str) -> Result<f64, QmpError> {
        let v = self.req(key)?;
        conv_f64(v, &self.path_of(key))
    }

    /// Optional `number` (double) member; integers are accepted.
    pub fn opt_f64(&mut self, key: &str) -> Result<Option<f64>, QmpError> {
        self.opt(key, conv_f64)
    }

    /// Mandatory enum member; `allowed` lists the QAPI enum's values.
    pub fn req_enum(&mut self, key: &str, allowed: &[&str]) -> Result<String, QmpError> {
        let v = self.req(key)?;
        conv_enum(v, &self.path_of(key), key, allowed)
    }

    /// Optional enum member; `allowed` lists the QAPI enum's values.
    pub fn opt_enum(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>, QmpError> {
        self.opt(key, |v, path| conv_enum(v, path, key, allowed))
    }

    /// Mandatory struct member, as a nested reader (paths `key.member`).
    /// Call [`Args::finish`] on it before reading further members here,
    /// which is when QEMU checks it.
    pub fn req_object(&mut self, key: &str) -> Result<Args, QmpError> {
        let v = self.req(key)?;
        let m = conv_object(v, &self.path_of(key))?;
        Ok(self.nested(key, m))
    }

    /// Optional struct member, as a nested reader (paths `key.member`).
    pub fn opt_object(&mut self, key: &str) -> Result<Option<Args>, QmpError> {
        match self.take_value(key) {
            None => Ok(None),
            Some(v) => {
                let m = conv_object(v, &self.path_of(key))?;
                Ok(Some(self.nested(key, m)))
            }
        }
    }

    /// Mandatory list member; elements carry paths `key[i]`.
    pub fn req_list(&mut self, key: &str) -> Result<Vec<Elem>, QmpError> {
        let v = self.req(key)?;
        self.list_elems(key, v)
    }

    /// Optional list member; elements carry paths `key[i]`.
    pub fn opt_list(&mut self, key: &str) -> Result<Option<Vec<Elem>>, QmpError> {
        match self.take_value(key) {
            None => Ok(None),
            Some(v) => self.list_elems(key, v).map(Some),
        }
    }

    fn list_elems(&self, key: &str, v: Value) -> Result<Vec<Elem>, QmpError> {
        let path = self.path_of(key);
        match v {
            Value::Array(a) => Ok(a
                .into_iter()
                .enumerate()
                .map(|(i, value)| Elem {
                    value,
                    path: format!("{path}[{i}]"),
                })
                .collect()),
            _ => Err(invalid_type(&path, "array")),
        }
    }

    /// Rejects members nobody read: `Parameter 'x' is unexpected`. When
    /// several are left, the one reported is the one QEMU would report.
    pub fn finish(self) -> Result<(), QmpError> {
        if self.map.is_empty() {
            return Ok(());
        }
        // QEMU collects member names in a GHashTable (in QDict order),
        // removes each one as it is visited, and reports the first left.
        let mut set = GHashSet::new();
        for i in qdict_order_of(self.keys.iter().map(String::as_str)) {
            set.insert(&self.keys[i]);
        }
        for k in &self.consumed {
            set.remove(k);
        }
        let key = set
            .first()
            .map(str::to_string)
            .or_else(|| self.map.keys().next().cloned())
            .unwrap_or_default();
        Err(QmpError::generic(format!(
            "Parameter '{}' is unexpected",
            self.path_of(&key)
        )))
    }
}

impl Elem {
    /// The element's path as QEMU shows it, e.g. `enable[0]`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw element.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The raw element, for alternates and `any`.
    pub fn into_value(self) -> Value {
        self.value
    }

    /// QEMU's wrong-type error for this element.
    pub fn invalid_type(&self, expected: &str) -> QmpError {
        invalid_type(&self.path, expected)
    }

    /// QEMU's error for an element that is none of the types of the
    /// alternate `alternate`: there QEMU names the element `null`, not by
    /// its path.
    pub fn invalid_alternate(&self, alternate: &str) -> QmpError {
        invalid_type(LIST_ELEMENT_NAME, alternate)
    }

    /// The element as `str`.
    pub fn into_str(self) -> Result<String, QmpError> {
        conv_str(self.value, &self.path)
    }

    /// The element as `bool`.
    pub fn into_bool(self) -> Result<bool, QmpError> {
        conv_bool(self.value, &self.path)
    }

    /// The element as `int`.
    pub fn into_i64(self) -> Result<i64, QmpError> {
        conv_i64(self.value, &self.path)
    }

    /// The element as `uint64`/`size`.
    pub fn into_u64(self) -> Result<u64, QmpError> {
        conv_u64(self.value, &self.path)
    }

    /// The element as `uint32`.
    pub fn into_u32(self) -> Result<u32, QmpError> {
        conv_u32(self.value, &self.path, LIST_ELEMENT_NAME)
    }

    /// The element as a value of an enum.
    pub fn into_enum(self, allowed: &[&str]) -> Result<String, QmpError> {
        conv_enum(self.value, &self.path, LIST_ELEMENT_NAME, allowed)
    }

    /// The element as a struct, read with paths `key[i].member`.
    pub fn into_object(self) -> Result<Args, QmpError> {
        let m = conv_object(self.value, &self.path)?;
        Ok(Args::with_prefix(m, format!("{}.", self.path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Args::new(m),
            _ => panic!("not an object"),
        }
    }

    fn err<T: std::fmt::Debug>(r: Result<T, QmpError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.class, crate::ErrorClass::GenericError);
        e.desc
    }

    // Every expected text below is qsd's reply in docs/qmp-qsd-transcript.md.

    #[test]
    fn missing_and_wrong_types() {
        let mut a = args(json!({"node-name": "n0"}));
        assert_eq!(err(a.req_str("driver")), "Parameter 'driver' is missing");
        let mut a = args(json!({"driver": 1}));
        assert_eq!(
            err(a.req_str("driver")),
            "Invalid parameter type for 'driver', expected: string"
        );
        let mut a = args(json!({"node-name": null}));
        assert_eq!(
            err(a.opt_str("node-name")),
            "Invalid parameter type for 'node-name', expected: string"
        );
        for bad in [json!("yes"), json!(1)] {
            let mut a = args(json!({ "read-only": bad }));
            assert_eq!(
                err(a.opt_bool("read-only")),
                "Invalid parameter type for 'read-only', expected: boolean"
            );
        }
        for bad in [
            json!("1"),
            json!(1.5),
            json!(1.0),
            json!(18446744073709551615u64),
        ] {
            let mut a = args(json!({ "size": bad }));
            assert_eq!(
                err(a.opt_i64("size")),
                "Invalid parameter type for 'size', expected: integer"
            );
        }
        let mut a = args(json!({"cache": 5}));
        assert_eq!(
            err(a.opt_object("cache")),
            "Invalid parameter type for 'cache', expected: object"
        );
        let mut a = args(json!({"enable": "oob"}));
        assert_eq!(
            err(a.opt_list("enable")),
            "Invalid parameter type for 'enable', expected: array"
        );
        let mut a = args(json!({}));
        assert_eq!(a.opt_str("x").unwrap(), None);
        assert!(a.finish().is_ok());
    }

    #[test]
    fn unsigned_integers() {
        let mut a = args(json!({"granularity": 4294967296u64}));
        assert_eq!(
            err(a.opt_u32("granularity")),
            "Parameter 'granularity' expects uint32_t"
        );
        let mut a = args(json!({"granularity": -1}));
        assert_eq!(
            err(a.opt_u32("granularity")),
            "Parameter 'granularity' expects uint32_t"
        );
        for bad in [json!("1"), json!(1.0)] {
            let mut a = args(json!({ "granularity": bad }));
            assert_eq!(
                err(a.req_u32("granularity")),
                "Parameter 'granularity' expects uint64"
            );
        }
        let mut a = args(json!({"granularity": 65536}));
        assert_eq!(a.req_u32("granularity").unwrap(), 65536);
        // uint64 wraps negatives like QEMU; out of range is an error.
        let mut a = args(json!({"write-threshold": -1}));
        assert_eq!(a.req_u64("write-threshold").unwrap(), u64::MAX);
        for bad in [json!(18446744073709551616.0), json!("5"), json!(1e2)] {
            let mut a = args(json!({ "write-threshold": bad }));
            assert_eq!(
                err(a.req_u64("write-threshold")),
                "Parameter 'write-threshold' expects uint64"
            );
        }
        let mut a = args(json!({"write-threshold": 18446744073709551615u64}));
        assert_eq!(a.req_u64("write-threshold").unwrap(), u64::MAX);
    }

    #[test]
    fn enums_use_the_bare_name() {
        let mut a = args(json!({"driver": "nosuch"}));
        assert_eq!(
            err(a.req_enum("driver", &["file", "qcow2"])),
            "Parameter 'driver' does not accept value 'nosuch'"
        );
        let mut a = args(json!({"discard": 5}));
        assert_eq!(
            err(a.opt_enum("discard", &["ignore", "unmap"])),
            "Invalid parameter type for 'discard', expected: string"
        );
        // Nested: the path is dotted for type errors, bare for the value.
        let mut a = args(json!({"file": {"driver": "file", "filename": "/x", "aio": "bogus"}}));
        let mut f = a.req_object("file").unwrap();
        assert_eq!(f.req_enum("driver", &["file"]).unwrap(), "file");
        assert_eq!(f.req_str("filename").unwrap(), "/x");
        assert_eq!(
            err(f.opt_enum("aio", &["threads", "native"])),
            "Parameter 'aio' does not accept value 'bogus'"
        );
    }

    #[test]
    fn nested_paths() {
        let mut a = args(json!({"driver": "qcow2", "file": {"driver": "file"}}));
        a.req_str("driver").unwrap();
        let mut f = a.req_object("file").unwrap();
        f.req_str("driver").unwrap();
        assert_eq!(
            err(f.req_str("filename")),
            "Parameter 'file.filename' is missing"
        );

        let mut a =
            args(json!({"file": {"driver": "file", "filename": "/x", "cache": {"direct": 1}}}));
        let mut f = a.req_object("file").unwrap();
        f.req_str("driver").unwrap();
        f.req_str("filename").unwrap();
        let mut c = f.opt_object("cache").unwrap().unwrap();
        assert_eq!(
            err(c.opt_bool("direct")),
            "Invalid parameter type for 'file.cache.direct', expected: boolean"
        );

        // Alternate taken raw, then read as an object.
        let mut a = args(
            json!({"file": {"driver": "qcow2", "file": {"driver": "file", "filename": "/x", "bogus": 2}}}),
        );
        let m = match a.take_value("file") {
            Some(Value::Object(m)) => m,
            _ => unreachable!(),
        };
        let mut f = a.nested("file", m);
        f.req_str("driver").unwrap();
        let inner = match f.take_value("file") {
            Some(Value::Object(m)) => m,
            _ => unreachable!(),
        };
        let mut g = f.nested("file", inner);
        g.req_str("driver").unwrap();
        g.req_str("filename").unwrap();
        assert_eq!(err(g.finish()), "Parameter 'file.file.bogus' is unexpected");
        assert_eq!(
            f.invalid_type("file", "BlockdevRef").desc,
            "Invalid parameter type for 'file.file', expected: BlockdevRef"
        );
        assert_eq!(
            a.invalid_type("file", "BlockdevRef").desc,
            "Invalid parameter type for 'file', expected: BlockdevRef"
        );

        let mut a = args(json!({"addr": {"type": "unix", "data": {"path": 5}}}));
        let mut addr = a.req_object("addr").unwrap();
        addr.req_enum("type", &["unix", "inet"]).unwrap();
        let mut data = addr.req_object("data").unwrap();
        assert_eq!(
            err(data.req_str("path")),
            "Invalid parameter type for 'addr.data.path', expected: string"
        );
    }

    #[test]
    fn list_elements() {
        let mut a = args(json!({"enable": [1]}));
        let e = a.opt_list("enable").unwrap().unwrap();
        let e0 = e.into_iter().next().unwrap();
        assert_eq!(e0.path(), "enable[0]");
        assert_eq!(
            err(e0.into_enum(&["oob"])),
            "Invalid parameter type for 'enable[0]', expected: string"
        );
        let mut a = args(json!({"enable": ["oob", "bogus"]}));
        let r: Result<Vec<String>, QmpError> = a
            .req_list("enable")
            .unwrap()
            .into_iter()
            .map(|e| e.into_enum(&["oob"]))
            .collect();
        assert_eq!(err(r), "Parameter 'null' does not accept value 'bogus'");
        let mut a = args(json!({"children": [{"x": 1}]}));
        let c = a.req_list("children").unwrap().into_iter().next().unwrap();
        let c = c.into_object().unwrap();
        assert_eq!(err(c.finish()), "Parameter 'children[0].x' is unexpected");
    }

    #[test]
    fn unexpected_members_in_qemu_order() {
        let mut a = args(json!({"driver": "null-co", "node-name": "n0", "x": 1}));
        a.req_str("driver").unwrap();
        a.opt_str("node-name").unwrap();
        assert_eq!(err(a.finish()), "Parameter 'x' is unexpected");
        assert_eq!(
            err(args(json!({"zz": 1, "aa": 2})).finish()),
            "Parameter 'aa' is unexpected"
        );
        assert_eq!(
            err(args(json!({"b": 1, "a": 2, "c": 3})).finish()),
            "Parameter 'b' is unexpected"
        );
        assert_eq!(
            err(args(json!({"foo": 1, "bar": 2, "baz": 3, "qux": 4})).finish()),
            "Parameter 'baz' is unexpected"
        );
        let mut a = args(json!({"driver": "null-co", "node-name": "n0", "zz": 1, "aa": 2}));
        a.req_str("driver").unwrap();
        a.req_str("node-name").unwrap();
        assert_eq!(err(a.finish()), "Parameter 'aa' is unexpected");
        let mut c = args(json!({"cache": {"bogus": 1}}))
            .req_object("cache")
            .unwrap();
        c.opt_bool("direct").unwrap();
        assert_eq!(err(c.finish()), "Parameter 'cache.bogus' is unexpected");
    }

    #[test]
    fn has_does_not_consume() {
        let a = args(json!({"x": null}));
        assert!(a.has("x"));
        assert!(a.finish().is_err());
        let mut a = args(json!({"x": null}));
        assert_eq!(a.take_value("x"), Some(Value::Null));
        assert!(!a.has("x"));
        assert!(a.finish().is_ok());
    }
}
