//! `lineside keys`: make API keys and the digests the config stores.

use std::io::BufRead;

use clap::{Args, Subcommand};
use lineside::auth::{digest, hex, new_key};

/// Make API keys for `[[auth.keys]]` and digests of tokens.
///
/// The server stores only SHA-256 digests of keys. Give the key to the
/// factory's line clients (`Authorization: Bearer <key>` or `X-Api-Key`) and
/// put the printed table into the config.
#[derive(Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// A new random key for a factory, and its `[[auth.keys]]` table.
    New {
        /// The factory the key acts for.
        #[arg(long)]
        factory: String,
        /// A label for logs, such as the line or client (default: the factory and a number).
        #[arg(long)]
        name: Option<String>,
    },
    /// The digest of a key or admin token read from standard input (one per line).
    Hash,
}

pub fn run(a: KeysArgs) -> anyhow::Result<()> {
    match a.command {
        KeysCommand::New { factory, name } => {
            let key = new_key();
            let name = name.unwrap_or_else(|| format!("{factory}-{}", &hex(&digest(&key))[..6]));
            eprintln!("key (shown once; give it to the client): {key}");
            println!("[[auth.keys]]\nname = \"{name}\"\nfactory = \"{factory}\"\nsha256 = \"{}\"", hex(&digest(&key)));
        }
        KeysCommand::Hash => {
            for line in std::io::stdin().lock().lines() {
                let line = line?;
                let key = line.trim();
                if !key.is_empty() {
                    println!("{}", hex(&digest(key)));
                }
            }
        }
    }
    Ok(())
}
