//! A QMP server with a toy dispatcher, for trying QMP tools against this
//! crate: `cargo run -p livesnap-qmp --example qmp_demo_server -- /tmp/demo.sock`,
//! then e.g. `qmp-shell /tmp/demo.sock`. Commands: `query-version`,
//! `query-commands`, `x-demo-event` (emits `X_DEMO` with the given `data`).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use livesnap_qmp::{Args, Dispatcher, EventBus, Greeting, QmpError, QmpServer};
use serde_json::{json, Value};

struct Demo {
    greeting: Greeting,
    events: EventBus,
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "x-demo-event",
];

impl Dispatcher for Demo {
    fn call<'a>(
        &'a self,
        command: &'a str,
        mut args: Args,
    ) -> Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send + 'a>> {
        Box::pin(async move {
            match command {
                "query-version" => {
                    args.finish()?;
                    Ok(self.greeting.version_info())
                }
                "query-commands" => {
                    args.finish()?;
                    Ok(COMMANDS.iter().map(|c| json!({ "name": c })).collect())
                }
                "x-demo-event" => {
                    let data = args.take_value("data");
                    args.finish()?;
                    self.events.emit("X_DEMO", data);
                    Ok(Value::Null)
                }
                _ => Err(QmpError::command_not_found(command)),
            }
        })
    }

    fn commands(&self) -> Vec<String> {
        COMMANDS.iter().map(|c| c.to_string()).collect()
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp/livesnap-qmp-demo.sock".into());
    let greeting = Greeting::new((10, 0, 2), "livesnap-qmp demo");
    let events = EventBus::new();
    let demo = Arc::new(Demo {
        greeting: greeting.clone(),
        events: events.clone(),
    });
    let server = QmpServer::bind(&path, greeting, demo, events).await?;
    eprintln!(
        "QMP demo server on {}; Ctrl-C or SIGTERM to stop",
        path.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    server.close().await;
    Ok(())
}
