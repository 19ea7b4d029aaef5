//! `--freeze`: the guest's filesystems frozen only around the instant that
//! fixes the point in time, through qemu-guest-agent directly (QMP
//! endpoints) or through the endpoint's own agent (libvirt). The hold is
//! bounded: past it the guest is thawed whatever is still running, and the
//! thaw is sent on every path, even behind a freeze that has not answered,
//! so a freeze that completes late is still undone.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Failure, Kind, Result};
#[cfg(feature = "libvirt")]
use crate::libvirt::LibvirtAgent;
use crate::qga::Qga;
use crate::report::Quiesce;
use crate::signals::Interrupt;
use crate::units::{duration, Stamp};

/// How long a thaw may take to answer.
const THAW_TIMEOUT: Duration = Duration::from_secs(5);

/// A guest agent.
pub enum Agent {
    /// qemu-guest-agent over its socket.
    Qga(Box<Qga>),
    /// The agent libvirt owns.
    #[cfg(feature = "libvirt")]
    Libvirt(LibvirtAgent),
}

impl Agent {
    async fn freeze(&mut self, timeout: Duration) -> std::result::Result<u64, String> {
        match self {
            Agent::Qga(q) => q.freeze(timeout).await,
            #[cfg(feature = "libvirt")]
            Agent::Libvirt(a) => a.freeze(timeout).await,
        }
    }

    async fn thaw(&mut self, timeout: Duration) -> std::result::Result<u64, String> {
        match self {
            Agent::Qga(q) => q.thaw(timeout).await,
            #[cfg(feature = "libvirt")]
            Agent::Libvirt(a) => a.thaw(timeout).await,
        }
    }
}

/// The freeze of one snapshot: whether the guest is frozen, and what to
/// report about it.
pub struct Freezer {
    agent: Option<Agent>,
    hold: Duration,
    /// When the guest was frozen, and how many filesystems.
    frozen: Option<(Stamp, u64)>,
    /// Set once the guest was thawed.
    quiesce: Option<Quiesce>,
    notes: Vec<String>,
}

impl Freezer {
    /// A freezer with `agent` (none: `--freeze` not given), holding the
    /// guest frozen at most `hold`.
    pub fn new(agent: Option<Agent>, hold: Duration) -> Freezer {
        Freezer {
            agent,
            hold,
            frozen: None,
            quiesce: None,
            notes: Vec::new(),
        }
    }

    /// True while the guest is frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// How the guest was quiesced, once thawed.
    pub fn quiesce(&self) -> Option<&Quiesce> {
        self.quiesce.as_ref()
    }

    /// What the report should say about the freeze.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// Freezes the guest (when asked), the freeze itself bounded by the hold.
    pub async fn freeze(&mut self) -> Result<()> {
        let Some(agent) = self.agent.as_mut() else {
            return Ok(());
        };
        match agent.freeze(self.hold).await {
            Ok(n) => {
                self.frozen = Some((Stamp::now(), n));
                Ok(())
            }
            Err(e) => {
                // A freeze that timed out may still happen: the thaw follows it.
                self.frozen = Some((Stamp::now(), 0));
                self.thaw(false).await;
                self.quiesce = None;
                Err(Failure::new(
                    Kind::GuestAgent,
                    format!("freezing the guest failed: {e}"),
                ))
            }
        }
    }

    /// Thaws the guest if it is frozen; `in_time`: the point in time was
    /// fixed while it was. A failed thaw is noted, not fatal.
    pub async fn thaw(&mut self, in_time: bool) {
        let (Some(agent), Some((since, n))) = (self.agent.as_mut(), self.frozen.take()) else {
            return;
        };
        let r = agent.thaw(THAW_TIMEOUT).await;
        let frozen_ms = since.instant.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = r {
            self.notes
                .push(format!("thaw failed, the guest may still be frozen: {e}"));
            eprintln!("livesnap: WARNING: thaw failed, the guest may still be frozen: {e}");
        }
        self.quiesce = Some(Quiesce {
            filesystems: n,
            frozen_ms,
            covered_point_in_time: in_time,
        });
    }

    /// Runs `work` (what fixes the point in time) while the guest is
    /// frozen: past the hold the guest is thawed early (`work` still goes
    /// on; the snapshot is then not quiesced), and a signal thaws at once.
    pub async fn while_frozen<F: Future>(
        &mut self,
        interrupt: &Interrupt,
        what: &str,
        work: F,
    ) -> F::Output {
        if !self.is_frozen() {
            return work.await;
        }
        let hold_end = Instant::now() + self.hold;
        let mut interrupt = interrupt.clone();
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tokio::time::sleep_until(hold_end), if self.is_frozen() => {
                    self.thaw(false).await;
                    self.notes.push(format!(
                        "{what} took longer than --freeze-hold {}: the guest was thawed before the point in time was fixed",
                        duration(self.hold)
                    ));
                }
                _ = interrupt.wait(), if self.is_frozen() => {
                    self.thaw(false).await;
                }
            }
        }
    }
}
