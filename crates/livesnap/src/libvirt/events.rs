//! libvirt's domain events as a stream: the default event loop runs on a
//! thread of its own (libvirt needs one for events and keep-alives), and the
//! callbacks registered for one domain send what they see into a channel
//! that async code reads with a timeout.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::domain::Domain;
use virt_sys as sys;

use super::sys::{typed_params, Param};

/// What happened to the domain.
#[derive(Clone, Debug)]
pub enum DomainEvent {
    /// `VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2`: a block job on disk `disk` (its
    /// target name) changed state.
    BlockJob {
        /// The disk's target name (`vda`).
        disk: String,
        /// `virDomainBlockJobType`.
        kind: i32,
        /// `virConnectDomainEventBlockJobStatus`.
        status: i32,
    },
    /// `VIR_DOMAIN_EVENT_ID_JOB_COMPLETED`: a domain job (backup) ended,
    /// with its final statistics (`success`, `errmsg`, `disk_processed`...).
    JobCompleted {
        /// The statistics.
        stats: Vec<(String, Param)>,
    },
    /// `VIR_DOMAIN_EVENT_ID_LIFECYCLE`.
    Lifecycle {
        /// `virDomainEventType`.
        event: i32,
        /// Its detail.
        detail: i32,
    },
}

/// An event and when it was received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The event.
    pub event: DomainEvent,
    /// Wall-clock time it reached the callback.
    pub at: SystemTime,
}

impl Received {
    /// The event in QMP's shape (`event`, `data`, `timestamp`), so the
    /// verbs print libvirt's events as they print QMP's.
    pub fn to_json(&self) -> Value {
        let t = self.at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (name, data) = match &self.event {
            DomainEvent::BlockJob { disk, kind, status } => (
                "BLOCK_JOB",
                json!({"disk": disk, "type": super::block_job_kind(*kind),
                       "status": super::block_job_status(*status)}),
            ),
            DomainEvent::JobCompleted { stats } => {
                let mut m = Map::new();
                for (k, v) in stats {
                    let v = match v {
                        Param::Int(i) if k == "operation" => json!(super::job_operation(*i)),
                        Param::Int(i) => json!(i64::try_from(*i).unwrap_or(i64::MAX)),
                        Param::Double(d) => json!(d),
                        Param::Bool(b) => json!(b),
                        Param::Str(s) => json!(s),
                    };
                    m.insert(k.clone(), v);
                }
                ("JOB_COMPLETED", Value::Object(m))
            }
            DomainEvent::Lifecycle { event, detail } => (
                "LIFECYCLE",
                json!({"event": super::lifecycle_event(*event), "detail": detail}),
            ),
        };
        json!({
            "timestamp": {"seconds": t.as_secs(), "microseconds": t.subsec_micros()},
            "event": name,
            "data": data,
        })
    }
}

/// Starts libvirt's default event loop on its own thread, once per
/// process; it must run before the first connection is opened.
pub fn start_loop() -> Result<(), String> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        // libvirt's default error handler prints every error on stderr; the
        // errors reach the operator through our own messages instead.
        virt::error::clear_error_callback();
        // SAFETY: called once, before any connection exists.
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            return Err(format!(
                "cannot start libvirt's event loop: {}",
                virt::error::Error::last_error().message()
            ));
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                // SAFETY: the default implementation was registered above.
                if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .map_err(|e| format!("cannot start libvirt's event thread: {e}"))?;
        Ok(())
    })
    .clone()
}

type Tx = mpsc::UnboundedSender<Received>;

fn send(opaque: *mut c_void, event: DomainEvent) {
    // SAFETY: `opaque` is the `Box<Tx>` registered with the callback, freed
    // only by `free_tx` after the callback is deregistered.
    let tx = unsafe { &*(opaque as *const Tx) };
    let _ = tx.send(Received {
        event,
        at: SystemTime::now(),
    });
}

unsafe extern "C" fn block_job_cb(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    disk: *const c_char,
    kind: c_int,
    status: c_int,
    opaque: *mut c_void,
) {
    let disk = if disk.is_null() {
        String::new()
    } else {
        // SAFETY: libvirt passes a NUL-terminated disk name valid for the call.
        unsafe { CStr::from_ptr(disk) }
            .to_string_lossy()
            .into_owned()
    };
    send(opaque, DomainEvent::BlockJob { disk, kind, status });
}

unsafe extern "C" fn job_completed_cb(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    params: sys::virTypedParameterPtr,
    nparams: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: libvirt passes `nparams` parameters valid for the call.
    let stats = unsafe { typed_params(params, nparams) };
    send(opaque, DomainEvent::JobCompleted { stats });
}

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    send(opaque, DomainEvent::Lifecycle { event, detail });
    0
}

unsafe extern "C" fn free_tx(opaque: *mut c_void) {
    // SAFETY: `opaque` is the Box<Tx> leaked at registration; libvirt
    // frees it once, after the last callback.
    drop(unsafe { Box::from_raw(opaque as *mut Tx) });
}

/// The domain's events for as long as this lives.
pub struct Subscription {
    conn: Connect,
    ids: Vec<c_int>,
    rx: mpsc::UnboundedReceiver<Received>,
}

// SAFETY: the callback ids are plain integers and the connection is
// thread-safe (libvirt's connections may be used from any thread).
unsafe impl Send for Subscription {}

impl Subscription {
    /// Registers for the block-job, job-completed and lifecycle events of `dom`.
    pub fn new(conn: &Connect, dom: &Domain) -> Result<Subscription, virt::error::Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sub = Subscription {
            conn: conn.clone(),
            ids: Vec::new(),
            rx,
        };
        // SAFETY: each callback is cast to the generic type as libvirt's
        // VIR_DOMAIN_EVENT_CALLBACK macro does; libvirt calls it with the
        // signature of its event id. The boxed sender lives until libvirt
        // calls `free_tx` after deregistration.
        unsafe {
            let callbacks: [(u32, sys::virConnectDomainEventGenericCallback); 3] = [
                (
                    sys::VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                    Some(std::mem::transmute::<
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virDomainPtr,
                            *const c_char,
                            c_int,
                            c_int,
                            *mut c_void,
                        ),
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(block_job_cb)),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                    Some(std::mem::transmute::<
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virDomainPtr,
                            sys::virTypedParameterPtr,
                            c_int,
                            *mut c_void,
                        ),
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(job_completed_cb)),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    Some(std::mem::transmute::<
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virDomainPtr,
                            c_int,
                            c_int,
                            *mut c_void,
                        ) -> c_int,
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(lifecycle_cb)),
                ),
            ];
            for (id, cb) in callbacks {
                let opaque = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
                let r = sys::virConnectDomainEventRegisterAny(
                    conn.as_ptr(),
                    dom.as_ptr(),
                    id as c_int,
                    cb,
                    opaque,
                    Some(free_tx),
                );
                if r < 0 {
                    drop(Box::from_raw(opaque as *mut Tx));
                    return Err(virt::error::Error::last_error());
                }
                sub.ids.push(r);
            }
        }
        Ok(sub)
    }

    /// The next event, `None` once `timeout` passed.
    pub async fn next(&mut self, timeout: std::time::Duration) -> Option<Received> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            // SAFETY: an id this subscription registered on this connection.
            unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id) };
        }
    }
}
