//! `remus-witness`: the lease arbiter for remus-agent pairs, run on a third host.
//!
//! It grants each domain's lease to one node at a time and persists every grant before
//! answering; see `remus_ha::witness` for the protocol and the safety argument.

use anyhow::Context;
use clap::Parser;
use remus_ha::witness::{WitnessArgs as Args, WitnessServer, WitnessServerConfig};
use remus_ha::HaKey;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let key = HaKey::from_file(&args.key_file)?;
    let server = WitnessServer::bind(WitnessServerConfig::new(args.listen, key, args.state_file))
        .await
        .context("starting the witness")?;
    // Print the bound address (tests and scripts may pass port 0).
    println!("listening {}", server.local_addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    server.run(shutdown).await.context("serving")?;
    Ok(())
}
