//! `remus-dist`: writes what the Debian package ships beside the binaries and cannot be
//! written by hand without drifting from the code: a man page per program (and per
//! `remusctl` subcommand) and `remusctl`'s shell completions, all generated from the same
//! clap definitions the programs parse their arguments with. Used by `scripts/build-deb.sh`;
//! packaging tooling, not part of the product.
//!
//! ```text
//! remus-dist man DIR           DIR/man1/remusctl*.1, DIR/man8/remusd.8, DIR/man8/remus-witness.8
//! remus-dist completions DIR   DIR/bash/remusctl, DIR/zsh/_remusctl, DIR/fish/remusctl.fish
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

#[derive(Debug, Parser)]
#[command(
    name = "remus-dist",
    about = "Generate man pages and shell completions"
)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Man pages, under DIR/man1 and DIR/man8.
    Man { dir: PathBuf },
    /// remusctl's completions for bash, zsh and fish, under DIR/{bash,zsh,fish}.
    Completions { dir: PathBuf },
}

/// Writes the man page of `cmd` (section `section`) and, recursively, one per visible
/// subcommand, named like git's (`remusctl-config-check.1`).
fn man_pages(cmd: &clap::Command, section: &str, dir: &Path, prefix: &str) -> Result<usize> {
    let name = if prefix.is_empty() {
        cmd.get_name().to_string()
    } else {
        format!("{prefix}-{}", cmd.get_name())
    };
    let page = cmd
        .clone()
        .display_name(name.clone())
        .bin_name(name.replace("-", " "));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .section(section)
        .render(&mut out)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.{section}"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    let mut n = 1;
    // Clap's generated `help` subcommands get no page of their own.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        n += man_pages(sub, section, dir, &name)?;
    }
    Ok(n)
}

fn main() -> Result<()> {
    match Args::parse().what {
        What::Man { dir } => {
            let mut n = 0;
            for (cmd, section) in [
                (remus_agent::cli::Cli::command(), "1"),
                (remus_agent::cli::RemusdArgs::command(), "8"),
                (remus_ha::witness::WitnessArgs::command(), "8"),
            ] {
                let d = dir.join(format!("man{section}"));
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                let mut cmd = cmd;
                cmd.build();
                n += man_pages(&cmd, section, &d, "")?;
            }
            println!("{n} man pages in {}", dir.display());
        }
        What::Completions { dir } => {
            for (shell, sub) in [
                (Shell::Bash, "bash"),
                (Shell::Zsh, "zsh"),
                (Shell::Fish, "fish"),
            ] {
                let d = dir.join(sub);
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                let mut cmd = remus_agent::cli::Cli::command();
                let path = clap_complete::generate_to(shell, &mut cmd, "remusctl", &d)
                    .with_context(|| format!("writing {sub} completions to {}", d.display()))?;
                println!("{}", path.display());
            }
        }
    }
    Ok(())
}
