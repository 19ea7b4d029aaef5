//! Reading `query-qmp-schema` (QEMU's `qapi/introspect.json`): type names
//! are meaningless numbers there, so every question starts from a command
//! name and follows `arg-type` references.

use std::collections::HashMap;

use serde_json::Value;

/// The introspected schema, by entity name.
#[derive(Debug, Default)]
pub struct Schema {
    by_name: HashMap<String, Value>,
}

impl Schema {
    /// Indexes the return value of `query-qmp-schema`.
    pub fn new(entities: &Value) -> Schema {
        let by_name = entities
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| Some((e.get("name")?.as_str()?.to_string(), e.clone())))
                    .collect()
            })
            .unwrap_or_default();
        Schema { by_name }
    }

    fn entity(&self, name: &str) -> Option<&Value> {
        self.by_name.get(name)
    }

    /// The argument object type of `command`.
    fn arg_type(&self, command: &str) -> Option<&Value> {
        let c = self.entity(command)?;
        if c.get("meta-type")?.as_str()? != "command" {
            return None;
        }
        self.entity(c.get("arg-type")?.as_str()?)
    }

    /// True when `command` takes an argument named `member` (base members
    /// are flattened into `members` by introspection).
    pub fn command_has_arg(&self, command: &str, member: &str) -> bool {
        self.arg_type(command)
            .is_some_and(|t| has_member(t, member))
    }

    /// True when the union argument of `command` (e.g. `blockdev-add`), in
    /// its branch `case` (e.g. `copy-before-write`), has `member`.
    pub fn variant_has_arg(&self, command: &str, case: &str, member: &str) -> bool {
        let Some(t) = self.arg_type(command) else {
            return false;
        };
        let Some(variants) = t.get("variants").and_then(Value::as_array) else {
            return false;
        };
        variants
            .iter()
            .filter(|v| v.get("case").and_then(Value::as_str) == Some(case))
            .filter_map(|v| self.entity(v.get("type")?.as_str()?))
            .any(|vt| has_member(vt, member))
    }

    /// The values of the enum type of `member` in `command`'s arguments.
    pub fn arg_enum_values(&self, command: &str, member: &str) -> Vec<String> {
        let Some(t) = self.arg_type(command) else {
            return Vec::new();
        };
        let ty = members(t)
            .find(|m| m.get("name").and_then(Value::as_str) == Some(member))
            .and_then(|m| m.get("type")?.as_str());
        let Some(e) = ty.and_then(|n| self.entity(n)) else {
            return Vec::new();
        };
        // QEMU ≥ 6.0 lists `members` with names; older ones `values`.
        if let Some(ms) = e.get("members").and_then(Value::as_array) {
            return ms
                .iter()
                .filter_map(|m| Some(m.get("name")?.as_str()?.to_string()))
                .collect();
        }
        e.get("values")
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(|x| Some(x.as_str()?.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn members(t: &Value) -> impl Iterator<Item = &Value> {
    t.get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn has_member(t: &Value, member: &str) -> bool {
    members(t).any(|m| m.get("name").and_then(Value::as_str) == Some(member))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A cut of qemu-storage-daemon 10.0.2's schema.
    fn qsd() -> Schema {
        Schema::new(&json!([
            {"name": "blockdev-backup", "ret-type": "2", "meta-type": "command", "arg-type": "19"},
            {"name": "19", "meta-type": "object", "members": [
                {"name": "job-id", "default": null, "type": "str"},
                {"name": "device", "type": "str"},
                {"name": "target", "type": "str"}]},
            {"name": "blockdev-mirror", "meta-type": "command", "arg-type": "28", "ret-type": "2"},
            {"name": "28", "meta-type": "object", "members": [
                {"name": "copy-mode", "default": null, "type": "108"}]},
            {"name": "108", "meta-type": "enum", "values": ["background", "write-blocking"],
             "members": [{"name": "background"}, {"name": "write-blocking"}]},
            {"name": "blockdev-add", "meta-type": "command", "arg-type": "50", "ret-type": "2"},
            {"name": "50", "meta-type": "object", "tag": "driver",
             "members": [{"name": "driver", "type": "51"}],
             "variants": [{"case": "copy-before-write", "type": "119"}, {"case": "raw", "type": "120"}]},
            {"name": "119", "meta-type": "object", "members": [
                {"name": "file", "type": "228"},
                {"name": "on-cbw-error", "default": null, "type": "231"},
                {"name": "cbw-timeout", "default": null, "type": "int"}]},
            {"name": "120", "meta-type": "object", "members": [{"name": "file", "type": "228"}]}
        ]))
    }

    #[test]
    fn follows_arg_types() {
        let s = qsd();
        assert!(s.command_has_arg("blockdev-backup", "target"));
        assert!(!s.command_has_arg("blockdev-backup", "on-cbw-error"));
        assert!(s.variant_has_arg("blockdev-add", "copy-before-write", "cbw-timeout"));
        assert!(!s.variant_has_arg("blockdev-add", "raw", "cbw-timeout"));
        assert!(!s.command_has_arg("no-such-command", "x"));
        assert_eq!(
            s.arg_enum_values("blockdev-mirror", "copy-mode"),
            ["background", "write-blocking"]
        );
        assert!(s.arg_enum_values("blockdev-mirror", "sync").is_empty());
    }
}
