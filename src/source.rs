//! Where a model comes from: `builtin:NAME`, a local folder, or a Hugging
//! Face hub repo `hf://owner/name[@revision]`. Hub sources are fetched into
//! the standard hub cache first ([`crate::hub`]); after that every source is
//! a [`LocalModel`] and loads the same way.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use lineside_inference::ModelFiles;
use lineside_inference::anomaly::PatchCore;

use crate::builtin;
use crate::hub::{Hub, Want};

/// Prefix of hub sources: `hf://owner/name@revision`.
pub const HUB_SCHEME: &str = "hf://";

/// A parsed model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A model compiled into the binary.
    Builtin(String),
    /// A timm hub-format folder or a lineside model folder.
    Folder(PathBuf),
    /// A repo on the Hugging Face hub (or a server speaking its protocol).
    Hub(HubRef),
}

/// `owner/name` on the hub, at a branch, tag or commit (default `main`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubRef {
    /// The revision asked for, `main` when none was.
    pub fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl fmt::Display for HubRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{HUB_SCHEME}{}", self.repo)?;
        match &self.revision {
            Some(rev) => write!(f, "@{rev}"),
            None => Ok(()),
        }
    }
}

impl ModelSource {
    /// Parses a source as written in config, the CLI or `PUT /v1/models/{name}`.
    pub fn parse(source: &str) -> anyhow::Result<Self> {
        if let Some(name) = source.strip_prefix(builtin::SCHEME) {
            return Ok(Self::Builtin(name.to_string()));
        }
        if let Some(rest) = source.strip_prefix(HUB_SCHEME) {
            let (repo, revision) = match rest.split_once('@') {
                Some((repo, rev)) => (repo, Some(rev)),
                None => (rest, None),
            };
            anyhow::ensure!(
                valid_repo_id(repo),
                "`{source}`: a hub source is hf://owner/name[@revision] (letters, digits, `-`, `_`, `.`)"
            );
            if let Some(rev) = revision {
                anyhow::ensure!(
                    valid_revision(rev),
                    "`{source}`: revision `{rev}` is not a valid branch, tag or commit"
                );
            }
            return Ok(Self::Hub(HubRef { repo: repo.to_string(), revision: revision.map(str::to_string) }));
        }
        anyhow::ensure!(!source.is_empty(), "empty model source");
        Ok(Self::Folder(PathBuf::from(source)))
    }

    /// The same source at `revision`; only hub sources have revisions.
    pub fn at_revision(self, revision: &str) -> anyhow::Result<Self> {
        match self {
            Self::Hub(HubRef { revision: Some(r), .. }) if r != revision => {
                anyhow::bail!("the source names revision `{r}` and `revision` says `{revision}`: give one")
            }
            Self::Hub(h) => {
                anyhow::ensure!(valid_revision(revision), "revision `{revision}` is not a valid branch, tag or commit");
                Ok(Self::Hub(HubRef { revision: Some(revision.to_string()), ..h }))
            }
            _ => anyhow::bail!("`revision` needs a hub source (hf://owner/name)"),
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Builtin(name) => write!(f, "{}{name}", builtin::SCHEME),
            Self::Folder(dir) => write!(f, "{}", dir.display()),
            Self::Hub(h) => h.fmt(f),
        }
    }
}

fn valid_repo_id(repo: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(repo.split_once('/'), Some((owner, name)) if part(owner) && part(name))
}

/// Branch and tag names may hold `/`, but never `..` or anything that would
/// change the URL's meaning.
fn valid_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev.len() <= 200
        && !rev.contains("..")
        && !rev.starts_with('/')
        && rev.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// A model source with its files on this machine.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// The source as asked for (`hf://acme/defects@v2`).
    pub source: ModelSource,
    pub location: Location,
    /// The hub commit the files came from, for hub sources.
    pub commit: Option<String>,
}

/// Where a local model's files are.
#[derive(Debug, Clone)]
pub enum Location {
    Builtin(String),
    Folder(PathBuf),
}

impl LocalModel {
    /// Makes `source`'s files local: fetches hub sources (or finds them in the
    /// cache), checks that the others exist.
    pub async fn resolve(source: ModelSource, hub: &Hub, want: Want) -> anyhow::Result<Self> {
        let (location, commit) = match &source {
            ModelSource::Builtin(name) => {
                anyhow::ensure!(
                    builtin::get(name).is_some(),
                    "no built-in model `{name}` (built-in: {})",
                    builtin::NAMES.join(", ")
                );
                (Location::Builtin(name.clone()), None)
            }
            ModelSource::Folder(dir) => {
                anyhow::ensure!(dir.is_dir(), "model folder {} does not exist", dir.display());
                (Location::Folder(dir.clone()), None)
            }
            ModelSource::Hub(h) => {
                let snap = hub.fetch(h, want).await?;
                (Location::Folder(snap.dir), Some(snap.commit))
            }
        };
        Ok(Self { source, location, commit })
    }

    /// [`Self::resolve`] for a source string, from synchronous code (the CLI).
    pub fn resolve_blocking(source: &str, hub: &Hub, want: Want) -> anyhow::Result<Self> {
        let source = ModelSource::parse(source)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(Self::resolve(source, hub, want))
    }

    /// Reads `source`'s model files from synchronous code, with a hub client
    /// configured by the environment (the CLI's `--model`/`--backbone`).
    pub fn read_files(source: &str) -> anyhow::Result<ModelFiles> {
        Self::resolve_blocking(source, &Hub::from_env()?, Want::Serve)?.files()
    }

    /// The folder holding the files, unless the model is built in.
    pub fn dir(&self) -> Option<&Path> {
        match &self.location {
            Location::Folder(dir) => Some(dir),
            Location::Builtin(_) => None,
        }
    }

    /// The folder of a PatchCore model, if this is one.
    pub fn anomaly_dir(&self) -> Option<&Path> {
        self.dir().filter(|d| PatchCore::is_model_dir(d))
    }

    /// Reads `config.json` and `model.safetensors`.
    pub fn files(&self) -> anyhow::Result<ModelFiles> {
        match &self.location {
            Location::Builtin(name) => builtin::get(name).with_context(|| format!("no built-in model `{name}`")),
            Location::Folder(dir) => {
                let mut files = ModelFiles::from_dir(dir).with_context(|| format!("reading model {}", self.source))?;
                files.origin = self.source.to_string();
                Ok(files)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_source() {
        assert_eq!(ModelSource::parse("builtin:steel-surface").unwrap(), ModelSource::Builtin("steel-surface".into()));
        assert_eq!(ModelSource::parse("models/x").unwrap(), ModelSource::Folder("models/x".into()));
        assert_eq!(
            ModelSource::parse("hf://acme/defects@v2").unwrap(),
            ModelSource::Hub(HubRef { repo: "acme/defects".into(), revision: Some("v2".into()) })
        );
        let h = ModelSource::parse("hf://timm/resnet18.a1_in1k").unwrap();
        assert_eq!(h.to_string(), "hf://timm/resnet18.a1_in1k");
        for bad in ["hf://", "hf://acme", "hf://acme/", "hf://a/b/c", "hf://../x", "hf://a/b@", "hf://a/b@../main", ""]
        {
            assert!(ModelSource::parse(bad).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn revision_is_given_once() {
        let h = ModelSource::parse("hf://acme/defects").unwrap();
        assert_eq!(h.clone().at_revision("v3").unwrap().to_string(), "hf://acme/defects@v3");
        let pinned = h.at_revision("v3").unwrap();
        assert!(pinned.clone().at_revision("v3").is_ok());
        assert!(pinned.at_revision("v4").is_err());
        assert!(ModelSource::parse("models/x").unwrap().at_revision("v1").is_err());
    }
}
