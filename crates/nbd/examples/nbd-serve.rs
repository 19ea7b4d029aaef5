//! Serves one raw image file over NBD, for manual interop and benchmark runs:
//! `nbd-serve FILE (unix:/path | host:port) [EXPORT]` — stops on Ctrl-C.

use std::sync::Arc;

use livesnap_block::{BlockBackend, BlockNode, FileDriver, FileOptions, RawDriver, RawOptions};
use livesnap_nbd::{ExportConfig, ExportTable, ListenAddr, NbdServer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: nbd-serve FILE (unix:/path | host:port) [EXPORT]");
        std::process::exit(2);
    }
    let direct = std::env::var_os("NBD_SERVE_DIRECT").is_some();
    let fd = FileDriver::open(&FileOptions {
        filename: args[1].clone(),
        direct,
        read_only: false,
    })?;
    let file = BlockNode::new("file0", Box::new(fd), false, false);
    let raw = RawDriver::open(file, RawOptions::default())?;
    let node: Arc<BlockNode> = BlockNode::new("disk0", Box::new(raw), false, true);
    let table = ExportTable::new();
    table.add(ExportConfig {
        name: args.get(3).cloned().unwrap_or_default(),
        description: None,
        backend: BlockBackend::new(node),
        writable: true,
        allocation_depth: false,
        bitmaps: Vec::new(),
    })?;
    let addr = match args[2].strip_prefix("unix:") {
        Some(p) => ListenAddr::Unix(p.into()),
        None => {
            let (host, port) = args[2]
                .rsplit_once(':')
                .ok_or("address must be unix:/path or host:port")?;
            ListenAddr::Tcp {
                host: host.into(),
                port: port.into(),
            }
        }
    };
    let server = NbdServer::start(&addr, 0, table).await?;
    eprintln!("serving {} on {}", args[1], server.local_addr());
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
