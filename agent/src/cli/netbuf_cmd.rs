//! `remusctl netbuf …`: inspect and drive a device's egress buffer by hand (plug backend).
//!
//! The logic is `sch_plug::ctl`; this module parses arguments and prints results. The relay
//! backend lives inside remusd, so it is refused here with an explanation.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use sch_plug::ctl::{self, CtlTarget};
use sch_plug::{Backend, Netns};

use super::{EXIT_OK, EXIT_PROBLEMS};

/// What every `netbuf` command acts on.
#[derive(Debug, Args)]
pub struct Target {
    /// The guest's interface (a tap).
    #[arg(long)]
    dev: String,
    /// plug, relay or auto.
    #[arg(long, default_value = "plug", value_parser = ["plug", "relay", "auto"])]
    backend: String,
    /// Network namespace of the device (a name under /run/netns).
    #[arg(long)]
    netns: Option<String>,
}

/// `remusctl netbuf` subcommands.
#[derive(Debug, Subcommand)]
pub enum NetbufCmd {
    /// Install (or adopt) the buffer on a device: IFB, ingress redirect, plug qdisc.
    Setup {
        #[command(flatten)]
        target: Target,
        /// Most bytes held before packets are dropped.
        #[arg(long, default_value_t = 16 << 20)]
        limit: u64,
    },
    /// Close the current epoch: hold what arrives from now on.
    Buffer {
        #[command(flatten)]
        target: Target,
    },
    /// Release the packets held before the last buffer mark.
    Release {
        #[command(flatten)]
        target: Target,
    },
    /// Stop holding: everything passes.
    ReleaseAll {
        #[command(flatten)]
        target: Target,
    },
    /// Show the device's buffer state.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Remove the buffer and restore the device.
    Teardown {
        #[command(flatten)]
        target: Target,
    },
}

impl NetbufCmd {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("remusctl netbuf: cannot start the async runtime: {e}");
                return ExitCode::from(EXIT_PROBLEMS);
            }
        };
        let result: Result<String, ctl::CtlError> = rt.block_on(async {
            match self {
                NetbufCmd::Setup { target, limit } => ctl::setup(&to_target(&target), limit)
                    .await
                    .map(|s| s.to_string()),
                NetbufCmd::Buffer { target } => ctl::buffer(&to_target(&target))
                    .await
                    .map(|s| s.to_string()),
                NetbufCmd::Release { target } => ctl::release(&to_target(&target))
                    .await
                    .map(|s| s.to_string()),
                NetbufCmd::ReleaseAll { target } => ctl::release_all(&to_target(&target))
                    .await
                    .map(|s| s.to_string()),
                NetbufCmd::Status { target } => ctl::status(&to_target(&target))
                    .await
                    .map(|s| s.to_string()),
                NetbufCmd::Teardown { target } => ctl::teardown(&to_target(&target))
                    .await
                    .map(|r| format!("{r:?}")),
            }
        });
        match result {
            Ok(text) => {
                println!("{text}");
                ExitCode::from(EXIT_OK)
            }
            Err(e) => {
                eprintln!("remusctl: {e}");
                ExitCode::from(EXIT_PROBLEMS)
            }
        }
    }
}

fn to_target(t: &Target) -> CtlTarget {
    let backend = match t.backend.as_str() {
        "relay" => Backend::Relay,
        "auto" => Backend::Auto,
        _ => Backend::Plug,
    };
    let mut c = CtlTarget::new(&t.dev, backend);
    if let Some(ns) = &t.netns {
        c.netns = Netns::named(ns);
    }
    c
}
