//! `lineside sign`: Ed25519 keys and signatures for models and plugins.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use lineside::integrity::{MODEL_SIGNATURE, generate_key, model_digest, plugin_signature_path, sha256_hex, sign};

/// Sign models and plugins so servers with `integrity.trusted_keys` accept them.
///
/// The signature is over the artifact's digest (docs/security.md) and is
/// written beside it: `lineside.sig` in a model folder, `FILE.wasm.sig` for a plugin.
#[derive(Args)]
pub struct SignArgs {
    #[command(subcommand)]
    command: SignCommand,
}

#[derive(Subcommand)]
enum SignCommand {
    /// Make a signing key: the private key goes to --out (mode 0600), the public key to stdout.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a model folder (writes DIR/lineside.sig).
    Model {
        dir: PathBuf,
        /// The private key file from `lineside sign keygen`.
        #[arg(long)]
        key: PathBuf,
    },
    /// Sign a plugin component (writes FILE.sig).
    Plugin {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

pub fn run(a: SignArgs) -> anyhow::Result<()> {
    match a.command {
        SignCommand::Keygen { out } => {
            anyhow::ensure!(!out.exists(), "{} exists; not overwriting a key", out.display());
            let (private, public) = generate_key();
            write_private(&out, &private)?;
            eprintln!("private key written to {} (keep it off the servers)", out.display());
            println!("[integrity]\ntrusted_keys = [\"{public}\"]");
        }
        SignCommand::Model { dir, key } => {
            let digest = model_digest(&dir).with_context(|| format!("reading {}", dir.display()))?;
            let sig = sign(&read_key(&key)?, &digest)?;
            std::fs::write(dir.join(MODEL_SIGNATURE), format!("{sig}\n"))?;
            println!("{digest}  {}", dir.join(MODEL_SIGNATURE).display());
        }
        SignCommand::Plugin { file, key } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let digest = sha256_hex(&bytes);
            let sig_path = plugin_signature_path(&file);
            std::fs::write(&sig_path, format!("{}\n", sign(&read_key(&key)?, &digest)?))?;
            println!("{digest}  {}", sig_path.display());
        }
    }
    Ok(())
}

fn read_key(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading the key {}", path.display()))
}

fn write_private(path: &PathBuf, key: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{key}")?;
    Ok(())
}
