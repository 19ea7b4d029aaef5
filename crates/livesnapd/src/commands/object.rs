//! `object-add` and `object-del` (QEMU's `qom/object_interfaces.c`) for the
//! user-creatable objects an NBD server uses: `tls-creds-x509` and
//! `authz-simple`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use livesnap_nbd::{Authorizer, Endpoint, ServerTls, TlsCreds};
use livesnap_qmp::{Args, QmpError};
use serde_json::Value;

use super::{empty, id_wellformed};
use crate::daemon::Daemon;

/// QEMU's user-creatable object types (`ObjectType` in qapi/qom.json) that
/// livesnapd does not create: named so that they get a clear refusal instead
/// of the text for a type that does not exist.
const QEMU_ONLY_TYPES: &[&str] = &[
    "authz-list",
    "authz-listfile",
    "authz-pam",
    "can-bus",
    "can-host-socketcan",
    "colo-compare",
    "cryptodev-backend",
    "cryptodev-backend-builtin",
    "cryptodev-backend-lkcf",
    "cryptodev-vhost-user",
    "dbus-vmstate",
    "filter-buffer",
    "filter-dump",
    "filter-mirror",
    "filter-redirector",
    "filter-replay",
    "filter-rewriter",
    "input-barrier",
    "input-linux",
    "iommufd",
    "iothread",
    "main-loop",
    "memory-backend-epc",
    "memory-backend-file",
    "memory-backend-memfd",
    "memory-backend-ram",
    "memory-backend-shm",
    "pef-guest",
    "pr-manager-helper",
    "qtest",
    "rng-builtin",
    "rng-egd",
    "rng-random",
    "secret",
    "secret_keyring",
    "sev-guest",
    "sev-snp-guest",
    "thread-context",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-cipher-suites",
    "x-remote-object",
    "x-vfio-user-server",
];

/// One user-created object.
#[derive(Clone, Debug)]
pub enum UserObject {
    /// `tls-creds-x509`.
    TlsCreds(Arc<TlsCreds>),
    /// `authz-simple`: the one distinguished name it allows.
    AuthzSimple {
        /// The client certificate's distinguished name that is allowed.
        identity: String,
    },
}

/// The daemon's user-created objects by id (QEMU's `/objects` container).
#[derive(Default)]
pub struct Objects(Mutex<HashMap<String, UserObject>>);

impl Objects {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, UserObject>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The object with this id.
    pub fn get(&self, id: &str) -> Option<UserObject> {
        self.lock().get(id).cloned()
    }

    /// True when an object has this id.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Adds an object; QEMU's text when the id is taken.
    pub fn insert(&self, id: &str, obj: UserObject) -> Result<(), QmpError> {
        let mut map = self.lock();
        if map.contains_key(id) {
            return Err(duplicate(id));
        }
        map.insert(id.to_string(), obj);
        Ok(())
    }
}

fn duplicate(id: &str) -> QmpError {
    QmpError::generic(format!(
        "attempt to add duplicate property '{id}' to object (type 'container')"
    ))
}

pub(super) fn object_add(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let qom_type = args.req_str("qom-type")?;
    let id = args.req_str("id")?;
    if !id_wellformed(&id) {
        return Err(QmpError::generic("Parameter 'id' expects an identifier"));
    }
    let obj = match qom_type.as_str() {
        "tls-creds-x509" => {
            let dir = args.opt_str("dir")?;
            let endpoint = args
                .opt_enum("endpoint", &["client", "server"])?
                .unwrap_or_else(|| "client".into());
            let verify_peer = args.opt_bool("verify-peer")?.unwrap_or(true);
            // Accepted as QEMU does; the TLS library's own checks and
            // defaults stand in for them (docs/qmp.md).
            args.opt_bool("sanity-check")?;
            args.opt_str("priority")?;
            if args.has("passwordid") {
                let pw = args.opt_str("passwordid")?.unwrap_or_default();
                return Err(QmpError::generic(format!("No secret with id '{pw}'")));
            }
            args.finish()?;
            // The id is claimed before the files are read, as QEMU does.
            if d.objects.contains(&id) {
                return Err(duplicate(&id));
            }
            let dir = dir.ok_or_else(|| QmpError::generic("Missing 'dir' property value"))?;
            let endpoint = if endpoint == "server" {
                Endpoint::Server
            } else {
                Endpoint::Client
            };
            let creds = TlsCreds::load(Path::new(&dir), endpoint, verify_peer)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            UserObject::TlsCreds(Arc::new(creds))
        }
        "authz-simple" => {
            let identity = args.req_str("identity")?;
            args.finish()?;
            UserObject::AuthzSimple { identity }
        }
        t if QEMU_ONLY_TYPES.contains(&t) => {
            return Err(QmpError::generic(format!(
                "Object type '{t}' is not supported by livesnapd"
            )))
        }
        t => {
            return Err(QmpError::generic(format!(
                "Parameter 'qom-type' does not accept value '{t}'"
            )))
        }
    };
    d.objects.insert(&id, obj)?;
    Ok(empty())
}

pub(super) fn object_del(d: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    let id = args.req_str("id")?;
    args.finish()?;
    // As QEMU: a running NBD server keeps the credentials it was started
    // with (it holds its own reference), and looks its authorization object
    // up by id at each connection, so deleting it refuses new clients.
    match d.objects.lock().remove(&id) {
        Some(_) => Ok(empty()),
        None => Err(QmpError::generic(format!("object '{id}' not found"))),
    }
}

/// The TLS set-up of an NBD server from the ids given to `nbd-server-start`
/// (QEMU's `nbd_get_tls_creds` and the `tls-authz` lookup), with QEMU's texts.
pub fn server_tls(
    d: &Arc<Daemon>,
    creds_id: &str,
    authz_id: Option<&str>,
) -> Result<ServerTls, QmpError> {
    let creds = match d.objects.get(creds_id) {
        Some(UserObject::TlsCreds(c)) => c,
        Some(_) => {
            return Err(QmpError::generic(format!(
                "Object with id '{creds_id}' is not TLS credentials"
            )))
        }
        None => {
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{creds_id}'"
            )))
        }
    };
    let authz = authz_id.map(|id| {
        let daemon = Arc::downgrade(d);
        let id = id.to_string();
        // Looked up at each connection, as QEMU does: a missing or
        // non-authz object denies the client.
        Arc::new(move |dn: &str| {
            daemon.upgrade().is_some_and(|d| {
                matches!(d.objects.get(&id), Some(UserObject::AuthzSimple { identity }) if identity == dn)
            })
        }) as Authorizer
    });
    ServerTls::new(creds, authz).map_err(|e| QmpError::generic(e.to_string()))
}
