//! `remus-witness`: the lease arbiter for remus-agent pairs, run on a third host.
//!
//! It grants each domain's lease to one node at a time and persists every grant before
//! answering; see `remus_ha::witness` for the protocol and the safety argument.

use anyhow::Context;
use clap::Parser;
use remus_ha::witness::{WitnessArgs as Args, WitnessKeys, WitnessServer, WitnessServerConfig};
use remus_ha::HaKey;
use remus_keys::{NodeKey, PublicKey};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let keys = witness_keys(&args)?;
    let config = WitnessServerConfig::with_keys(args.listen, keys, args.state_file.clone());
    let server = WitnessServer::bind(config)
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

/// The keys of the command line: the shared key file, and each pinned node's key derived
/// from the witness's private key and the node's public key.
fn witness_keys(args: &Args) -> anyhow::Result<WitnessKeys> {
    let mut keys = WitnessKeys {
        shared: args.key_file.as_deref().map(HaKey::from_file).transpose()?,
        ..WitnessKeys::default()
    };
    let Some(path) = &args.private_key_file else {
        return Ok(keys);
    };
    let raw = remus_ha::auth::read_key_file(path)?;
    let own = NodeKey::from_text(&String::from_utf8_lossy(&raw), &path.display().to_string())?;
    for pin in &args.node {
        let (name, public) = pin
            .split_once('=')
            .with_context(|| format!("--node {pin:?}: expected NAME=PUBLIC_KEY"))?;
        if name.is_empty() {
            anyhow::bail!("--node {pin:?}: the node name is empty");
        }
        let public: PublicKey = public.parse().with_context(|| format!("--node {name}"))?;
        let secret = own
            .shared_secret(&public)
            .with_context(|| format!("--node {name}"))?;
        keys.nodes
            .entry(name.to_owned())
            .or_default()
            .push(HaKey::for_witness(&secret, name));
    }
    if let Some((name, pins)) = keys.nodes.iter().find(|(_, pins)| pins.len() > 2) {
        anyhow::bail!(
            "--node {name}: {} keys pinned; at most two (the old and the new during a rotation)",
            pins.len()
        );
    }
    eprintln!("witness public key {}", own.public());
    Ok(keys)
}
