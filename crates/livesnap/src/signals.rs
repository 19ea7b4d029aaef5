//! SIGINT/SIGTERM as a value the waits select on: the first signal turns a
//! running operation into a bounded clean-up; later ones only say so.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Which signal arrived, if any.
#[derive(Clone)]
pub struct Interrupt {
    rx: watch::Receiver<Option<&'static str>>,
}

impl Interrupt {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> Interrupt {
        let (tx, rx) = watch::channel(None);
        let mut int = signal(SignalKind::interrupt()).ok();
        let mut term = signal(SignalKind::terminate()).ok();
        tokio::spawn(async move {
            let mut seen = 0u32;
            loop {
                let name = tokio::select! {
                    Some(()) = async { int.as_mut()?.recv().await } => "SIGINT",
                    Some(()) = async { term.as_mut()?.recv().await } => "SIGTERM",
                    else => return,
                };
                seen += 1;
                if seen > 1 {
                    eprintln!("livesnap: {name} again: still cleaning up (bounded), please wait");
                }
                let _ = tx.send(Some(name));
            }
        });
        Interrupt { rx }
    }

    /// The signal that arrived, if one did.
    pub fn fired(&self) -> Option<&'static str> {
        *self.rx.borrow()
    }

    /// Resolves once a signal has arrived (at once if one already did).
    pub async fn wait(&mut self) -> &'static str {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or("a signal"),
            Err(_) => std::future::pending().await,
        }
    }
}
