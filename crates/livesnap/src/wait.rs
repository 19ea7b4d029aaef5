//! Waiting on the endpoint's events under the operation's deadline and the
//! operator's interrupt: every wait ends by one of the three.

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::endpoint::Endpoint;
use crate::error::{Failure, Kind, Result};
use crate::signals::Interrupt;

/// Where a verb's events come from; libvirt's are given QMP's shape
/// (`event`, `data`, `timestamp`), so the verbs read both alike.
pub enum Events<'a> {
    /// A QMP endpoint's events.
    Qmp(&'a mut Endpoint),
    /// A libvirt domain's events.
    #[cfg(feature = "libvirt")]
    Libvirt(&'a mut crate::libvirt::Libvirt),
}

/// The bounds of one operation.
pub struct Clock {
    /// When the operation must be over.
    pub deadline: Instant,
    /// The deadline as given, for messages.
    pub limit: Duration,
    /// SIGINT/SIGTERM.
    pub interrupt: Interrupt,
}

/// What a wait ended with.
#[derive(Debug)]
pub enum Waited<E = Value> {
    /// An event arrived.
    Event(E),
    /// The wait's own `until` passed first.
    Tick,
}

impl Clock {
    /// A clock whose deadline is `limit` from now.
    pub fn new(limit: Duration, interrupt: Interrupt) -> Clock {
        Clock {
            deadline: Instant::now() + limit,
            limit,
            interrupt,
        }
    }

    /// The failure for an expired deadline.
    pub fn expired(&self) -> Failure {
        Failure::new(
            Kind::Deadline,
            format!("deadline of {} expired", crate::units::duration(self.limit)),
        )
    }

    /// Time left before the deadline.
    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Fails if the deadline passed or a signal arrived.
    pub fn check(&self) -> Result<()> {
        if let Some(sig) = self.interrupt.fired() {
            return Err(interrupted(sig));
        }
        if Instant::now() >= self.deadline {
            return Err(self.expired());
        }
        Ok(())
    }

    /// Runs a connection attempt bounded by the connect timeout and the
    /// deadline; one cut short by the deadline fails as the deadline (an
    /// operator's bound), not as an unreachable endpoint.
    pub async fn connect<T, F>(&mut self, connect: impl FnOnce(Duration) -> F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        let bound = crate::endpoint::CONNECT_TIMEOUT.min(self.left());
        let r = tokio::select! {
            biased;
            sig = self.interrupt.wait() => return Err(interrupted(sig)),
            r = connect(bound) => r,
        };
        match r {
            Err(f) if Instant::now() >= self.deadline => Err(Failure::new(
                Kind::Deadline,
                format!("{} while connecting ({})", self.expired().reason, f.reason),
            )),
            r => r,
        }
    }

    /// Runs `work` to its end unless the deadline passes or a signal
    /// arrives first (then `work` is dropped and that is the failure).
    pub async fn bound<T>(&mut self, work: impl Future<Output = Result<T>>) -> Result<T> {
        self.check()?;
        let deadline = self.deadline;
        tokio::select! {
            biased;
            sig = self.interrupt.wait() => Err(interrupted(sig)),
            _ = tokio::time::sleep_until(deadline) => Err(self.expired()),
            r = work => r,
        }
    }

    /// The next QMP event, or [`Waited::Tick`] at `until`; the deadline and
    /// a signal end the wait with a failure.
    pub async fn next_event(&mut self, ep: &mut Endpoint, until: Instant) -> Result<Waited> {
        self.next(until, |left| ep.event(left)).await
    }

    /// The next event of a verb's endpoint, in QMP's shape.
    pub async fn next_of(&mut self, events: &mut Events<'_>, until: Instant) -> Result<Waited> {
        match events {
            Events::Qmp(ep) => self.next_event(ep, until).await,
            #[cfg(feature = "libvirt")]
            Events::Libvirt(lv) => {
                let sub = &mut lv.events;
                let r = self
                    .next(until, |left| async move { Ok(sub.next(left).await) })
                    .await?;
                Ok(match r {
                    Waited::Event(ev) => Waited::Event(ev.to_json()),
                    Waited::Tick => Waited::Tick,
                })
            }
        }
    }

    /// The next event of any source: `wait(left)` yields one, or `None`
    /// once `left` has passed; [`Waited::Tick`] at `until`; the deadline and
    /// a signal end the wait with a failure.
    pub async fn next<E, F>(
        &mut self,
        until: Instant,
        wait: impl FnOnce(Duration) -> F,
    ) -> Result<Waited<E>>
    where
        F: Future<Output = Result<Option<E>>>,
    {
        self.check()?;
        let stop = until.min(self.deadline);
        let left = stop.saturating_duration_since(Instant::now());
        let r = tokio::select! {
            biased;
            sig = self.interrupt.wait() => return Err(interrupted(sig)),
            r = wait(left) => r?,
        };
        match r {
            Some(ev) => Ok(Waited::Event(ev)),
            None if Instant::now() >= self.deadline => Err(self.expired()),
            None => Ok(Waited::Tick),
        }
    }
}

/// The failure for a signal.
pub fn interrupted(sig: &str) -> Failure {
    Failure::new(Kind::Interrupted, format!("interrupted by {sig}"))
}
