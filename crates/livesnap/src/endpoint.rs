//! The QMP endpoint (livesnapd, qemu-storage-daemon or qemu-system-*):
//! connecting, bounded commands and events, and what it supports.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use livesnap_qmp::{QmpClient, QmpError};
use serde_json::{json, Value};

use crate::error::{Failure, Result};
use crate::schema::Schema;

/// How long connecting and negotiating may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long any one command may take before the endpoint counts as hung.
/// livesnapd drains guest I/O for up to 30 s in some commands.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(35);

/// What the endpoint supports, from `query-version`, `query-commands` and,
/// where present, `query-qmp-schema`.
#[derive(Debug, Default)]
pub struct Caps {
    /// QEMU version (livesnapd reports the QEMU release whose schema it follows).
    pub version: (u64, u64, u64),
    /// The `package` string.
    pub package: String,
    /// The endpoint is livesnapd (package starts with "livesnap").
    pub livesnap: bool,
    /// Command names.
    pub commands: HashSet<String>,
    /// The introspected schema (QEMU; livesnapd has none).
    pub schema: Option<Schema>,
}

impl Caps {
    /// Builds the capabilities from the three queries' results.
    pub fn from_replies(version: &Value, commands: &Value, schema: Option<&Value>) -> Caps {
        let q = &version["qemu"];
        let n = |k: &str| q[k].as_u64().unwrap_or(0);
        let package = version["package"].as_str().unwrap_or("").trim().to_string();
        Caps {
            version: (n("major"), n("minor"), n("micro")),
            livesnap: package.starts_with("livesnap"),
            package,
            commands: commands
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| Some(c.get("name")?.as_str()?.to_string()))
                .collect(),
            schema: schema.map(Schema::new),
        }
    }

    /// The endpoint as reports name it: its version and package.
    pub fn endpoint_name(&self) -> String {
        let (major, minor, micro) = self.version;
        format!("{major}.{minor}.{micro} {}", self.package)
    }

    /// The endpoint has `command`.
    pub fn has(&self, command: &str) -> bool {
        self.commands.contains(command)
    }

    /// `blockdev-backup` takes `on-cbw-error` and `cbw-timeout` (a livesnapd
    /// extension; QEMU has them only on the `copy-before-write` driver,
    /// which a push backup job creates internally without them).
    pub fn backup_cbw_args(&self) -> bool {
        if !self.has("blockdev-backup") {
            return false;
        }
        match &self.schema {
            Some(s) => {
                s.command_has_arg("blockdev-backup", "on-cbw-error")
                    && s.command_has_arg("blockdev-backup", "cbw-timeout")
            }
            None => self.livesnap,
        }
    }

    /// The `copy-before-write` driver has `on-cbw-error`/`cbw-timeout` (QEMU ≥ 7.1).
    pub fn cbw_driver_opts(&self) -> bool {
        self.schema
            .as_ref()
            .is_some_and(|s| s.variant_has_arg("blockdev-add", "copy-before-write", "cbw-timeout"))
    }

    /// `blockdev-mirror`'s `copy-mode` values.
    pub fn mirror_copy_modes(&self) -> Vec<String> {
        if !self.has("blockdev-mirror") {
            return Vec::new();
        }
        if self.livesnap {
            return ["background", "write-blocking", "auto"]
                .map(String::from)
                .to_vec();
        }
        match &self.schema {
            Some(s) => s.arg_enum_values("blockdev-mirror", "copy-mode"),
            // copy-mode came with QEMU 3.0, the schema with 2.5.
            None if self.version >= (3, 0, 0) => {
                ["background", "write-blocking"].map(String::from).to_vec()
            }
            None => Vec::new(),
        }
    }

    /// `blockdev-mirror` has `copy-mode` value `mode`.
    pub fn mirror_mode(&self, mode: &str) -> bool {
        self.mirror_copy_modes().iter().any(|m| m == mode)
    }

    /// One line per capability, for `livesnap info` and `--verbose`.
    pub fn describe(&self) -> Vec<(String, String)> {
        let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
        let (a, b, c) = self.version;
        vec![
            ("version".into(), format!("{a}.{b}.{c}")),
            ("package".into(), self.package.clone()),
            ("livesnapd".into(), yes(self.livesnap)),
            ("commands".into(), self.commands.len().to_string()),
            ("schema".into(), yes(self.schema.is_some())),
            ("blockdev-backup".into(), yes(self.has("blockdev-backup"))),
            ("backup cbw options".into(), yes(self.backup_cbw_args())),
            (
                "copy-before-write driver options".into(),
                yes(self.cbw_driver_opts()),
            ),
            ("blockdev-mirror".into(), yes(self.has("blockdev-mirror"))),
            (
                "mirror copy modes".into(),
                self.mirror_copy_modes().join(", "),
            ),
            ("block-job-change".into(), yes(self.has("block-job-change"))),
            ("blockdev-create".into(), yes(self.has("blockdev-create"))),
            ("--method auto picks".into(), self.auto_method().into()),
        ]
    }

    /// What `--method auto` runs here (see `snapshot::decide`).
    pub fn auto_method(&self) -> &'static str {
        if self.has("blockdev-backup") {
            "backup"
        } else if self.mirror_mode("auto") || self.mirror_mode("write-blocking") {
            "mirror"
        } else {
            "none (no bounded method)"
        }
    }
}

/// A connected, negotiated endpoint.
pub struct Endpoint {
    client: Option<QmpClient>,
    path: PathBuf,
    /// What it supports.
    pub caps: Caps,
}

fn io_failure(path: &Path, what: &str, e: std::io::Error) -> Failure {
    Failure::endpoint(format!("{} ({}): {e}", what, path.display()))
}

impl Endpoint {
    /// Connects to the QMP socket at `path`, negotiates and detects the
    /// capabilities, all within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Endpoint> {
        let mut ep = Endpoint {
            client: None,
            path: path.to_path_buf(),
            caps: Caps::default(),
        };
        let work = async {
            ep.open().await?;
            let version = ep.must("query-version", Value::Null).await?;
            let commands = ep.must("query-commands", Value::Null).await?;
            let caps = Caps::from_replies(&version, &commands, None);
            let schema = if caps.has("query-qmp-schema") {
                ep.call("query-qmp-schema", Value::Null).await?.ok()
            } else {
                None
            };
            ep.caps = Caps::from_replies(&version, &commands, schema.as_ref());
            Ok(())
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r.map(|()| ep),
            Err(_) => Err(Failure::endpoint(format!(
                "no answer from the QMP endpoint {} within {}",
                path.display(),
                crate::units::duration(timeout)
            ))),
        }
    }

    async fn open(&mut self) -> Result<()> {
        self.client = None;
        let c = QmpClient::connect(&self.path)
            .await
            .map_err(|e| io_failure(&self.path, "cannot connect to the QMP endpoint", e))?;
        self.client = Some(c);
        Ok(())
    }

    /// Drops the connection and connects again (within `timeout`), e.g. when
    /// a timed-out command left the stream unusable; events of the old
    /// connection are lost.
    pub async fn reconnect(&mut self, timeout: Duration) -> Result<()> {
        self.client = None;
        match tokio::time::timeout(timeout, self.open()).await {
            Ok(r) => r,
            Err(_) => Err(Failure::endpoint(format!(
                "could not reconnect to {} within {}",
                self.path.display(),
                crate::units::duration(timeout)
            ))),
        }
    }

    fn client(&mut self) -> Result<&mut QmpClient> {
        self.client
            .as_mut()
            .ok_or_else(|| Failure::endpoint("not connected to the QMP endpoint"))
    }

    /// Runs `command` (`args` `Null` for none), bounded by [`COMMAND_TIMEOUT`]:
    /// the QMP error is returned as a value; connection trouble is a failure.
    pub async fn call(
        &mut self,
        command: &str,
        args: Value,
    ) -> Result<std::result::Result<Value, QmpError>> {
        self.call_within(command, args, COMMAND_TIMEOUT).await
    }

    /// [`Endpoint::call`] with its own bound.
    pub async fn call_within(
        &mut self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<std::result::Result<Value, QmpError>> {
        let path = self.path.clone();
        let args = if args.is_null() { None } else { Some(args) };
        let client = self.client()?;
        match tokio::time::timeout(timeout, client.execute(command, args)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.client = None;
                Err(io_failure(&path, &format!("QMP {command} failed"), e))
            }
            Err(_) => Err(Failure::endpoint(format!(
                "QMP {command}: no reply within {}",
                crate::units::duration(timeout)
            ))),
        }
    }

    /// Runs `command`; a QMP error is an endpoint failure "command: desc".
    pub async fn must(&mut self, command: &str, args: Value) -> Result<Value> {
        match self.call(command, args).await? {
            Ok(v) => Ok(v),
            Err(e) => Err(Failure::endpoint(format!("{command}: {}", e.desc))),
        }
    }

    /// The next event, `None` after `timeout`; a lost connection is a failure.
    pub async fn event(&mut self, timeout: Duration) -> Result<Option<Value>> {
        let path = self.path.clone();
        let client = self.client()?;
        match client.wait_event(timeout).await {
            Ok(e) => Ok(e),
            Err(e) => {
                self.client = None;
                Err(io_failure(&path, "lost the QMP endpoint", e))
            }
        }
    }

    /// `query-block-jobs` (empty where the endpoint has none).
    pub async fn block_jobs(&mut self) -> Result<Vec<Value>> {
        if !self.caps.has("query-block-jobs") {
            return Ok(Vec::new());
        }
        Ok(array(self.must("query-block-jobs", Value::Null).await?))
    }

    /// `query-named-block-nodes` with `flat` where the endpoint takes it
    /// (QEMU ≥ 5.0: no nested backing images).
    pub async fn named_nodes(&mut self) -> Result<Vec<Value>> {
        if let Ok(v) = self
            .call("query-named-block-nodes", json!({"flat": true}))
            .await?
        {
            return Ok(array(v));
        }
        Ok(array(
            self.must("query-named-block-nodes", Value::Null).await?,
        ))
    }
}

/// The elements of a JSON array (nothing for anything else).
pub fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        _ => Vec::new(),
    }
}

/// The string member `key` of `v`, or "".
pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn livesnapd_without_schema() {
        let c = Caps::from_replies(
            &json!({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "livesnap 0.1.0"}),
            &json!([{"name": "blockdev-backup"}, {"name": "blockdev-mirror"}]),
            None,
        );
        assert!(c.livesnap && c.backup_cbw_args() && c.mirror_mode("auto"));
        assert!(!c.cbw_driver_opts() && !c.has("block-job-change"));
    }

    #[test]
    fn old_qemu_without_schema() {
        let c = Caps::from_replies(
            &json!({"qemu": {"major": 2, "minor": 12, "micro": 0}, "package": ""}),
            &json!([{"name": "blockdev-mirror"}]),
            None,
        );
        assert!(!c.livesnap && c.mirror_copy_modes().is_empty() && !c.backup_cbw_args());
    }
}
