//! Artifact integrity: models and plugins pinned by SHA-256 in the config,
//! and optionally signed with Ed25519 by a key the config trusts.
//!
//! A plugin's digest is the SHA-256 of its `.wasm` file (what `sha256sum`
//! prints). A model's digest covers every file lineside reads from its
//! folder — `config.json` (labels, preprocessing), `model.safetensors` and,
//! for PatchCore, `patchcore.json` and `memory_bank.safetensors` — as the
//! SHA-256 of the lines `NAME SHA256HEX\n`, sorted by name: relabelling a
//! class is as much a change as new weights. `lineside models digest` prints
//! it.
//!
//! A signature is an Ed25519 signature over the digest's 64 hex characters,
//! base64 in a file beside the artifact: `plugin.wasm.sig`, or
//! `lineside.sig` in a model folder (hub repos carry it like any other file).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of a model folder's signature file.
pub const MODEL_SIGNATURE: &str = "lineside.sig";

/// Files of a model folder that its digest covers, when present.
const MODEL_FILES: &[&str] = &["config.json", "model.safetensors", "patchcore.json", "memory_bank.safetensors"];

/// The `[integrity]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegrityConfig {
    /// Ed25519 public keys (base64 of the 32 bytes) whose signatures are trusted.
    pub trusted_keys: Vec<String>,
    /// Refuse any model folder or plugin without a valid signature from a trusted key.
    pub require_signatures: bool,
}

/// Why an artifact is refused.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error("{what}: SHA-256 is {actual}, but the config pins {pinned}")]
    Mismatch { what: String, pinned: String, actual: String },
    #[error("{what}: no signature ({path}) and integrity.require_signatures is set")]
    Unsigned { what: String, path: String },
    #[error("{what}: the signature in {path} is not valid for this content by any trusted key")]
    BadSignature { what: String, path: String },
    #[error("{what}: {message}")]
    Unreadable { what: String, message: String },
}

/// Checks artifacts against pins and trusted keys.
#[derive(Debug, Clone, Default)]
pub struct Integrity {
    keys: Vec<VerifyingKey>,
    require_signatures: bool,
}

impl Integrity {
    /// Parses the trusted keys.
    pub fn from_config(cfg: &IntegrityConfig) -> anyhow::Result<Self> {
        let keys = cfg
            .trusted_keys
            .iter()
            .map(|k| public_key(k).map_err(|e| anyhow::anyhow!("integrity.trusted_keys `{k}`: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            !cfg.require_signatures || !keys.is_empty(),
            "integrity.require_signatures is set but integrity.trusted_keys is empty"
        );
        Ok(Self { keys, require_signatures: cfg.require_signatures })
    }

    /// Whether any signature would be looked at (trusted keys, or signatures required).
    pub fn checks_signatures(&self) -> bool {
        self.require_signatures || !self.keys.is_empty()
    }

    /// Checks `digest` (hex) of `what` against its pin and, where keys are
    /// configured, the signature in `sig_path`.
    pub fn check(&self, what: &str, digest: &str, pinned: Option<&str>, sig_path: &Path) -> Result<(), IntegrityError> {
        if let Some(pin) = pinned {
            let pin = pin.trim().trim_start_matches("sha256:").to_ascii_lowercase();
            if pin != digest {
                return Err(IntegrityError::Mismatch { what: what.into(), pinned: pin, actual: digest.into() });
            }
        }
        let path = sig_path.display().to_string();
        let text = match std::fs::read_to_string(sig_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match self.require_signatures {
                    true => Err(IntegrityError::Unsigned { what: what.into(), path }),
                    false => Ok(()),
                };
            }
            Err(e) => return Err(IntegrityError::Unreadable { what: what.into(), message: format!("{path}: {e}") }),
        };
        if self.keys.is_empty() {
            // Signatures are only checked against keys the operator trusts.
            return Ok(());
        }
        let sig = BASE64
            .decode(text.trim())
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok())
            .ok_or_else(|| IntegrityError::BadSignature { what: what.into(), path: path.clone() })?;
        match self.keys.iter().any(|k| k.verify(digest.as_bytes(), &sig).is_ok()) {
            true => Ok(()),
            false => Err(IntegrityError::BadSignature { what: what.into(), path }),
        }
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A model folder's digest (see the module docs).
pub fn model_digest(dir: &Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    for name in MODEL_FILES {
        match std::fs::read(dir.join(name)) {
            Ok(bytes) => files.push((*name, bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(files_digest(files.iter().map(|(n, b)| (*n, b.as_slice()))))
}

/// The digest of named files: SHA-256 of `NAME SHA256HEX\n` lines sorted by name.
pub fn files_digest<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut lines: Vec<String> = files.into_iter().map(|(n, b)| format!("{n} {}\n", sha256_hex(b))).collect();
    lines.sort();
    sha256_hex(lines.concat().as_bytes())
}

/// Where a plugin's signature lives.
pub fn plugin_signature_path(wasm: &Path) -> PathBuf {
    let mut s = wasm.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

fn public_key(b64: &str) -> Result<VerifyingKey, String> {
    let bytes = BASE64.decode(b64.trim()).map_err(|e| e.to_string())?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| "an Ed25519 public key is 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())
}

/// A new signing key: (private key, public key), both base64.
pub fn generate_key() -> (String, String) {
    let mut seed = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut seed);
    let key = SigningKey::from_bytes(&seed);
    (BASE64.encode(key.to_bytes()), BASE64.encode(key.verifying_key().to_bytes()))
}

/// Signs `digest` with a base64 private key; the signature, base64.
pub fn sign(private_b64: &str, digest: &str) -> anyhow::Result<String> {
    let bytes = BASE64.decode(private_b64.trim())?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| anyhow::anyhow!("an Ed25519 private key is 32 bytes"))?;
    Ok(BASE64.encode(SigningKey::from_bytes(&seed).sign(digest.as_bytes()).to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_and_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("p.wasm");
        std::fs::write(&wasm, b"component").unwrap();
        let digest = sha256_hex(b"component");
        let (private, public) = generate_key();
        let (_, stranger) = generate_key();
        let sig = plugin_signature_path(&wasm);
        let open = Integrity::default();
        assert!(open.check("p", &digest, Some(&digest), &sig).is_ok());
        assert!(matches!(open.check("p", &digest, Some(&"0".repeat(64)), &sig), Err(IntegrityError::Mismatch { .. })));

        let strict = IntegrityConfig { trusted_keys: vec![public.clone()], require_signatures: true };
        let strict = Integrity::from_config(&strict).unwrap();
        assert!(matches!(strict.check("p", &digest, None, &sig), Err(IntegrityError::Unsigned { .. })));
        std::fs::write(&sig, sign(&private, &digest).unwrap()).unwrap();
        assert!(strict.check("p", &digest, None, &sig).is_ok());
        let other = sha256_hex(b"tampered");
        assert!(matches!(strict.check("p", &other, None, &sig), Err(IntegrityError::BadSignature { .. })));
        let wrong_key =
            Integrity::from_config(&IntegrityConfig { trusted_keys: vec![stranger], require_signatures: true });
        assert!(wrong_key.unwrap().check("p", &digest, None, &sig).is_err());
    }

    #[test]
    fn a_model_digest_covers_its_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), br#"{"label_names":["good","scratch"]}"#).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"weights").unwrap();
        let before = model_digest(dir.path()).unwrap();
        std::fs::write(dir.path().join("config.json"), br#"{"label_names":["scratch","good"]}"#).unwrap();
        assert_ne!(before, model_digest(dir.path()).unwrap(), "relabelling changes the digest");
    }
}
