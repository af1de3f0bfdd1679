//! `remusctl domain …`: a domain's configuration as it really is (`config`, asked of the
//! running daemon), and writing domain policies from other tools' definitions (`import`).
//!
//! The conversion itself is [`crate::config::libvirt`] (a pure function); this module reads
//! the file, prints the `[[domain]]` block (or writes it to a new file), and prints every
//! refusal and note as `FILE:LINE: …` on stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::{EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE};
use crate::config::libvirt::{self, ImportError, ImportFencing, ImportOptions};
use crate::config::Accel;

/// `remusctl domain` subcommands.
#[derive(Debug, Subcommand)]
pub enum DomainCmd {
    /// Show a domain's configuration as it really is on this node: QEMU's devices (memory,
    /// vCPUs, disks and their media, NICs and their MACs) merged with the stored
    /// configuration, which fills in image, replica and bridge. A device the stored
    /// configuration names but QEMU lacks is not present (dropped from it, with a warning);
    /// one QEMU has but the stored configuration lacks is shown as unrecorded, with a
    /// warning. Without a VM here, the stored configuration alone.
    Config {
        /// The domain.
        domain: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        daemon: super::daemon_cmd::DaemonArgs,
    },
    /// Convert a libvirt domain definition (virsh dumpxml, virt-install --print-xml) into a
    /// [[domain]] policy block.
    ///
    /// Prints the block (or writes it with --output) to be appended to a policy that has
    /// [node], [peer] and [auth] (and [witness] unless --fence-command is given); check the
    /// result with `remusctl config check`. Carried over: memory, vCPUs, machine (pc/q35),
    /// direct kernel boot, raw file disks (id = target dev; replica = IMAGE.replica, or
    /// --replica-dir), bridge NICs (id = net0, net1…; MAC and bridge kept), the UUID and a
    /// localtime clock. Refused, one line each with the reason, exit status 1: host device
    /// pass-through, block/network/shared/read-only disks, formats other than raw, CD-ROMs
    /// with media, macvtap (direct), vhost-user, user, ethernet and libvirt network NICs
    /// (unless --network-bridge maps the network), UEFI firmware, TPM, shared filesystems
    /// and any element this command does not know. Dropped as harmless and listed on
    /// stderr: graphics, video, input, sound, serial/console/channel, controllers, balloon,
    /// RNG, watchdog, panic, empty CD-ROM drives. See docs/configuration.md.
    Import {
        /// The libvirt domain XML file.
        #[arg(long, value_name = "FILE")]
        libvirt_xml: PathBuf,
        /// remus domain name (1..=32 of a-z 0-9 - _); default: the libvirt name lowercased.
        #[arg(long, value_name = "N")]
        name: Option<String>,
        /// Write the block to FILE (which must not exist) instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Put replicas at DIR/<domain>-<disk id>.replica instead of beside each image as
        /// <image>.replica.
        #[arg(long, value_name = "DIR")]
        replica_dir: Option<PathBuf>,
        /// Accept NICs on libvirt network NETWORK as NICs on host bridge BRIDGE (which must
        /// exist on both nodes). Repeatable.
        #[arg(long, value_name = "NETWORK=BRIDGE", value_parser = parse_network_bridge)]
        network_bridge: Vec<(String, String)>,
        /// Fence with this command (program as an absolute path, then its arguments,
        /// separated by spaces) instead of the default, the witness lease.
        #[arg(long, value_name = "COMMAND")]
        fence_command: Option<String>,
        /// Accelerator; default: kvm for domain types kvm and test, tcg for qemu.
        #[arg(long, value_enum)]
        accel: Option<AccelArg>,
    },
}

/// `--accel`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AccelArg {
    /// Hardware virtualisation.
    Kvm,
    /// Emulation.
    Tcg,
}

/// `remusctl domain config`.
fn show_config(domain: String, json: bool, daemon: &super::daemon_cmd::DaemonArgs) -> ExitCode {
    use crate::api::{Request, Response};
    let socket = match daemon.socket_path() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("remusctl domain config: {e}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let answer = super::daemon_cmd::block_on("domain config", async {
        let mut c = crate::control::ControlClient::connect(&socket).await?;
        c.request(Request::DomainConfig { domain }).await
    });
    let view = match answer {
        Err(code) => return code,
        Ok(Response::DomainConfig(v)) => v,
        Ok(Response::Error { message }) => {
            eprintln!("remusctl domain config: {message}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
        Ok(other) => {
            eprintln!(
                "remusctl domain config: remusd on {} answered something else: {other:?}",
                socket.display()
            );
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let text = if json {
        match serde_json::to_string_pretty(&view) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("remusctl domain config: {e}");
                return ExitCode::from(EXIT_PROBLEMS);
            }
        }
    } else {
        render_config(&view)
    };
    // A closed stdout ends the process quietly (remusctl restores SIGPIPE's default).
    println!("{}", text.trim_end());
    ExitCode::from(EXIT_OK)
}

/// The human form of a [`crate::api::DomainConfigView`].
fn render_config(v: &crate::api::DomainConfigView) -> String {
    use std::fmt::Write as _;
    let step = |s: crate::api::DeviceStep| match s {
        crate::api::DeviceStep::Present => "present",
        crate::api::DeviceStep::Adding => "adding",
        crate::api::DeviceStep::Removing => "removing",
        crate::api::DeviceStep::Unrecorded => "UNRECORDED",
    };
    let or_dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "domain {} on {} ({}; stored: {})",
        v.domain,
        v.node,
        if v.live {
            "live from QEMU"
        } else {
            "no VM here: the stored configuration"
        },
        v.stored
    );
    let _ = writeln!(s, "  memory {} MiB, {} vCPU(s)", v.memory_mib, v.vcpus);
    for d in &v.disks {
        let _ = writeln!(
            s,
            "  disk {:<8} {:<10} data in {}; image {}, replica {}, medium {}",
            d.id,
            step(d.step),
            or_dash(&d.backing),
            or_dash(&d.image),
            or_dash(&d.replica),
            or_dash(&d.medium)
        );
    }
    for n in &v.nics {
        let _ = writeln!(
            s,
            "  nic  {:<8} {:<10} mac {}, bridge {}",
            n.id,
            step(n.step),
            or_dash(&n.mac),
            or_dash(&n.bridge)
        );
    }
    for w in &v.warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    s
}

/// A `--network-bridge` value that is not `NETWORK=BRIDGE`.
#[derive(Debug, thiserror::Error)]
#[error("`{0}`: expected NETWORK=BRIDGE, e.g. default=br0")]
struct BadNetworkBridge(String);

fn parse_network_bridge(s: &str) -> Result<(String, String), BadNetworkBridge> {
    match s.split_once('=') {
        Some((n, b)) if !n.is_empty() && !b.is_empty() => Ok((n.to_owned(), b.to_owned())),
        _ => Err(BadNetworkBridge(s.to_string())),
    }
}

impl DomainCmd {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            DomainCmd::Config {
                domain,
                json,
                daemon,
            } => show_config(domain, json, &daemon),
            DomainCmd::Import {
                libvirt_xml,
                name,
                output,
                replica_dir,
                network_bridge,
                fence_command,
                accel,
            } => {
                let opts = ImportOptions {
                    name,
                    replica_dir,
                    network_bridges: network_bridge.into_iter().collect(),
                    fencing: match fence_command {
                        Some(c) => {
                            ImportFencing::Command(c.split_whitespace().map(String::from).collect())
                        }
                        None => ImportFencing::Witness,
                    },
                    accel: accel.map(|a| match a {
                        AccelArg::Kvm => Accel::Kvm,
                        AccelArg::Tcg => Accel::Tcg,
                    }),
                };
                import(&libvirt_xml, output.as_deref(), &opts)
            }
        }
    }
}

fn import(xml_path: &Path, output: Option<&Path>, opts: &ImportOptions) -> ExitCode {
    let origin = xml_path.display();
    let xml = match std::fs::read_to_string(xml_path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{origin}: cannot read the libvirt domain definition: {e}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let draft = match libvirt::convert(&xml, opts) {
        Ok(d) => d,
        Err(ImportError::Problems { domain, problems }) => {
            for p in &problems {
                eprintln!("{origin}:{}: {}", p.line, p.message());
            }
            eprintln!(
                "{origin}: libvirt domain `{domain}` not imported: {} problem(s)",
                problems.len()
            );
            return ExitCode::from(EXIT_PROBLEMS);
        }
        Err(e @ ImportError::Option { .. }) => {
            eprintln!("{origin}: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("{origin}: {e}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    for n in &draft.notes {
        eprintln!("{origin}:{}: note: {}", n.line, n.text);
    }
    match write_block(&draft, output) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!("{origin}: {e:#}");
            ExitCode::from(EXIT_PROBLEMS)
        }
    }
}

/// Prints the block, or writes it to `output`, which must not exist: `--output
/// /etc/remus/remus.toml` must not replace a whole policy with one domain.
fn write_block(draft: &libvirt::DomainDraft, output: Option<&Path>) -> Result<()> {
    let text = draft
        .to_toml()
        .with_context(|| format!("writing domain `{}` as TOML", draft.name))?;
    match output {
        None => {
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .context("writing the [[domain]] block to stdout")?;
        }
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| {
                    format!(
                        "creating {} (an existing file is never replaced; append with >> instead)",
                        path.display()
                    )
                })?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
