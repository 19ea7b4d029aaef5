//! Asynchronous QMP events: `{"timestamp": {...}, "event": NAME, "data": {...}}`.
//!
//! The daemon emits into an [`EventBus`]; every monitor that completed
//! capabilities negotiation gets each event, in emission order, interleaved
//! with its replies. In-process code can [`EventBus::subscribe`] as well.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::wire::to_wire_line;

/// Default number of events a slow listener may fall behind by.
pub const DEFAULT_EVENT_BACKLOG: usize = 4096;

/// One emitted event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event name, e.g. `JOB_STATUS_CHANGE`.
    pub name: String,
    /// The `data` member; `None` for events without data (no member then).
    pub data: Option<Value>,
    /// Wall-clock seconds since the Unix epoch at emission.
    pub seconds: u64,
    /// Microseconds within that second.
    pub microseconds: u32,
    seq: u64,
    line: String,
}

impl Event {
    /// The event as QMP sends it.
    pub fn to_json(&self) -> Value {
        let mut ts = Map::new();
        ts.insert("seconds".into(), self.seconds.into());
        ts.insert("microseconds".into(), self.microseconds.into());
        let mut m = Map::new();
        m.insert("timestamp".into(), Value::Object(ts));
        m.insert("event".into(), Value::String(self.name.clone()));
        if let Some(d) = &self.data {
            m.insert("data".into(), d.clone());
        }
        Value::Object(m)
    }

    /// The wire text, CRLF included, shared by all monitors.
    pub(crate) fn line(&self) -> &str {
        &self.line
    }

    /// Position in the bus's emission order.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }
}

struct Inner {
    tx: broadcast::Sender<Arc<Event>>,
    // Held while numbering and sending, so broadcast order == number order.
    emit_lock: Mutex<()>,
    emitted: AtomicU64,
}

/// Fan-out of events to monitors and in-process listeners; cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl Default for EventBus {
    fn default() -> EventBus {
        EventBus::new()
    }
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("emitted", &self.emitted())
            .finish()
    }
}

impl EventBus {
    /// A bus where a listener may lag [`DEFAULT_EVENT_BACKLOG`] events.
    pub fn new() -> EventBus {
        EventBus::with_backlog(DEFAULT_EVENT_BACKLOG)
    }

    /// A bus where a listener may lag `backlog` events. A monitor that
    /// falls further behind (its client stopped reading) is disconnected
    /// rather than silently missing events.
    pub fn with_backlog(backlog: usize) -> EventBus {
        let (tx, _) = broadcast::channel(backlog.max(1));
        EventBus {
            inner: Arc::new(Inner {
                tx,
                emit_lock: Mutex::new(()),
                emitted: AtomicU64::new(0),
            }),
        }
    }

    /// Stamps the event with the current time and sends it to every
    /// negotiated monitor and subscriber.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let guard = self
            .inner
            .emit_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let seq = self.inner.emitted.load(Ordering::Relaxed);
        let mut ev = Event {
            name: name.to_string(),
            data,
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
            seq,
            line: String::new(),
        };
        ev.line = to_wire_line(&ev.to_json());
        tracing::debug!(event = name, "QMP event");
        // No receivers is fine: nobody is listening yet.
        let _ = self.inner.tx.send(Arc::new(ev));
        self.inner.emitted.store(seq + 1, Ordering::Release);
        drop(guard);
    }

    /// A receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.tx.subscribe()
    }

    /// How many events were emitted so far; events numbered below this are
    /// already in every receiver.
    pub(crate) fn emitted(&self) -> u64 {
        self.inner.emitted.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shape_and_order() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        bus.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({"status": "created", "id": "j1"})),
        );
        bus.emit("STOP", None);
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        assert_eq!(a.seq() + 1, b.seq());
        assert_eq!(bus.emitted(), 2);
        let v = a.to_json();
        assert_eq!(v["event"], "JOB_STATUS_CHANGE");
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        assert!(a.line().starts_with("{\"timestamp\": {\"seconds\": "));
        assert!(a
            .line()
            .ends_with("\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"created\", \"id\": \"j1\"}}\r\n"));
        assert!(b.to_json().get("data").is_none());
        assert!(b.line().ends_with("\"event\": \"STOP\"}\r\n"));
    }
}
