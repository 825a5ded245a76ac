//! Who is calling, and what they may do.
//!
//! A request carries at most one credential, as `Authorization: Bearer <key>`
//! or `X-Api-Key: <key>`. The config holds only SHA-256 digests of keys:
//! keys are 256-bit random strings (`lineside keys new`), so a plain digest
//! cannot be reversed and no slow password hash is needed. A key belongs to
//! one factory; the admin token may do everything.
//!
//! The rules, applied by each handler through [`Principal`]:
//! - a factory key may inspect through its own factory, or `/v1/inspect` with
//!   its factory's model, and its records carry its factory;
//! - it sees only its factory's models, factory, records and statistics
//!   (another factory's record answers 404, as if it did not exist);
//! - model swaps, rollbacks, fits, plugin reloads and (with `auth.required`)
//!   metrics need the admin token;
//! - with `auth.required = false` (the default) a call without a credential
//!   is served as before, but a credential that is sent must be valid.
//!
//! Every denial is logged at `warn` on target `lineside::access` with who,
//! what and why.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::ApiError;

/// The `[auth]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Refuse every API call without a valid key or admin token (401).
    pub required: bool,
    /// SHA-256 (hex) of the admin token: the hashed alternative to `server.admin_token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_sha256: Option<String>,
    /// Per-factory API keys, by digest.
    pub keys: Vec<KeyConfig>,
}

/// One API key: `[[auth.keys]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A label for logs (`line-3`, `mes-gateway`); never the key itself.
    pub name: String,
    /// The factory this key acts for.
    pub factory: String,
    /// SHA-256 (hex) of the key.
    pub sha256: String,
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credential (only possible with `auth.required = false`).
    Anonymous,
    /// The admin token.
    Admin,
    /// A factory's API key.
    Factory { factory: String, key: String, models: Arc<BTreeSet<String>> },
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("anonymous"),
            Principal::Admin => f.write_str("admin"),
            Principal::Factory { factory, key, .. } => write!(f, "key `{key}` of factory `{factory}`"),
        }
    }
}

/// A denial: logged with its reason, then answered.
fn denied(who: &Principal, resource: &str, reason: &str, err: ApiError) -> ApiError {
    tracing::warn!(target: "lineside::access", who = %who, resource, reason, status = err.status().as_u16(), "access denied");
    metrics::counter!("lineside_access_denied_total", "status" => err.status().as_str().to_string()).increment(1);
    err
}

impl Principal {
    /// Model swaps, rollbacks, fits and plugin reloads.
    pub fn require_admin(&self, access: &Access, resource: &str) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            _ if !access.admin_enabled() => Err(denied(
                self,
                resource,
                "no admin token is configured",
                ApiError::Forbidden(
                    "the admin API is disabled: set server.admin_token or auth.admin_token_sha256".into(),
                ),
            )),
            Principal::Anonymous => Err(denied(
                self,
                resource,
                "admin route without a credential",
                ApiError::Unauthorized("send `Authorization: Bearer <admin token>`".into()),
            )),
            Principal::Factory { .. } => Err(denied(
                self,
                resource,
                "admin route with a factory key",
                ApiError::Denied(
                    "this needs the admin token; a factory key cannot change models, plugins or config".into(),
                ),
            )),
        }
    }

    /// Inspecting through, or reading the settings of, factory `name`.
    pub fn may_use_factory(&self, name: &str) -> Result<(), ApiError> {
        match self {
            Principal::Factory { factory, .. } if factory != name => Err(denied(
                self,
                &format!("factory {name}"),
                "another factory's pipeline",
                ApiError::Denied(format!("this key belongs to factory `{factory}`, not `{name}`")),
            )),
            _ => Ok(()),
        }
    }

    /// Running or reading model `name`.
    pub fn may_use_model(&self, name: &str) -> Result<(), ApiError> {
        if self.sees_model(name) {
            return Ok(());
        }
        let Principal::Factory { factory, .. } = self else { unreachable!("only factory keys are limited") };
        Err(denied(
            self,
            &format!("model {name}"),
            "a model the key's factory does not use",
            ApiError::Denied(format!("factory `{factory}` does not use model `{name}`")),
        ))
    }

    /// Whether model `name` is listed for this caller.
    pub fn sees_model(&self, name: &str) -> bool {
        match self {
            Principal::Factory { models, .. } => models.contains(name),
            _ => true,
        }
    }

    /// Whether factory `name` is listed for this caller.
    pub fn sees_factory(&self, name: &str) -> bool {
        self.factory().is_none_or(|f| f == name)
    }

    /// The factory a key acts for; `None` for the admin and anonymous callers.
    pub fn factory(&self) -> Option<&str> {
        match self {
            Principal::Factory { factory, .. } => Some(factory),
            _ => None,
        }
    }

    /// The factory filter a records query runs under: a key's own factory,
    /// whatever it asked for; asking for another factory is denied.
    pub fn records_scope(&self, asked: Option<String>) -> Result<Option<String>, ApiError> {
        match (self.factory(), asked) {
            (None, asked) => Ok(asked),
            (Some(own), Some(asked)) if asked != own => Err(denied(
                self,
                &format!("records of factory {asked}"),
                "another factory's records",
                ApiError::Denied(format!("this key reads the records of factory `{own}` only")),
            )),
            (Some(own), _) => Ok(Some(own.to_string())),
        }
    }

    /// Reading or reviewing one record of `record_factory`: another factory's
    /// record is answered as not found, so ids cannot be probed.
    pub fn may_read_record(&self, id: &str, record_factory: Option<&str>) -> Result<(), ApiError> {
        match self.factory() {
            Some(own) if record_factory != Some(own) => Err(denied(
                self,
                &format!("inspection {id}"),
                "a record of another factory (answered as not found)",
                ApiError::InspectionNotFound(id.to_string()),
            )),
            _ => Ok(()),
        }
    }

    /// The metrics page: the admin's when keys are required.
    pub fn may_read_metrics(&self, access: &Access) -> Result<(), ApiError> {
        match self {
            Principal::Factory { .. } if access.required => Err(denied(
                self,
                "metrics",
                "metrics with a factory key",
                ApiError::Denied("metrics need the admin token".into()),
            )),
            _ => Ok(()),
        }
    }
}

/// The configured credentials.
pub struct Access {
    required: bool,
    admin: Option<[u8; 32]>,
    keys: HashMap<[u8; 32], Principal>,
}

impl Access {
    /// Reads `[auth]` and `server.admin_token`; every key must name a configured factory.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let auth = &cfg.auth;
        let admin = match (&cfg.server.admin_token, &auth.admin_token_sha256) {
            (Some(_), Some(_)) => anyhow::bail!("set server.admin_token or auth.admin_token_sha256, not both"),
            (Some(t), None) => Some(digest(t)),
            (None, Some(h)) => Some(parse_digest(h).map_err(|e| anyhow::anyhow!("auth.admin_token_sha256: {e}"))?),
            (None, None) => None,
        };
        let mut keys = HashMap::new();
        for k in &auth.keys {
            let f = cfg.factories.iter().find(|f| f.name == k.factory);
            let f =
                f.ok_or_else(|| anyhow::anyhow!("auth key `{}`: factory `{}` is not configured", k.name, k.factory))?;
            let h = parse_digest(&k.sha256).map_err(|e| anyhow::anyhow!("auth key `{}`: {e}", k.name))?;
            anyhow::ensure!(Some(h) != admin, "auth key `{}` is the admin token", k.name);
            let model = f.model.clone().unwrap_or_else(|| cfg.server.default_model.clone());
            let principal = Principal::Factory {
                factory: k.factory.clone(),
                key: k.name.clone(),
                models: Arc::new([model].into()),
            };
            anyhow::ensure!(keys.insert(h, principal).is_none(), "auth key `{}` is configured twice", k.name);
        }
        if auth.required && admin.is_none() && keys.is_empty() {
            anyhow::bail!("auth.required is set but no key or admin token is configured: nothing could be called");
        }
        Ok(Self { required: auth.required, admin, keys })
    }

    /// Whether an admin token is configured.
    pub fn admin_enabled(&self) -> bool {
        self.admin.is_some()
    }

    /// Whether every API call needs a credential.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The caller named by the request's credential.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let Some(sent) = credential(headers)? else {
            return match self.required {
                true => Err(ApiError::Unauthorized(
                    "an API key is required: send `Authorization: Bearer <key>` or `X-Api-Key: <key>`".into(),
                )),
                false => Ok(Principal::Anonymous),
            };
        };
        let h = digest(sent);
        if self.admin.is_some_and(|a| constant_time_eq(&a, &h)) {
            return Ok(Principal::Admin);
        }
        self.keys.get(&h).cloned().ok_or_else(|| ApiError::Unauthorized("the API key is not valid".into()))
    }
}

/// The key in `Authorization: Bearer` or `X-Api-Key`, if either is sent.
fn credential(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let bad = || ApiError::Unauthorized("the Authorization header must be `Bearer <key>`".into());
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| bad())?;
        return v.strip_prefix("Bearer ").map(|k| Some(k.trim())).ok_or_else(bad);
    }
    match headers.get("x-api-key") {
        Some(v) => Ok(Some(v.to_str().map_err(|_| bad())?.trim())),
        None => Ok(None),
    }
}

/// Identifies the caller and hands it to the handler as an extension;
/// refuses a missing (when required) or unknown credential with 401.
pub async fn authenticate(State(access): State<Arc<Access>>, mut req: Request, next: Next) -> Response {
    match access.identify(req.headers()) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            tracing::warn!(target: "lineside::access", who = "unidentified", resource = %format!("{method} {path}"), reason = %e, status = 401, "access denied");
            metrics::counter!("lineside_access_denied_total", "status" => "401").increment(1);
            // Read a body the client is still sending, so it sees the 401 rather than a reset.
            if req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                <= Some(1 << 20)
            {
                crate::server::drain(req.into_body()).await;
            }
            let mut resp = e.into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

/// SHA-256 of a key, as stored in the config.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Hex form of a digest.
pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_digest(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
    if s.len() != 64 || !s.is_ascii() {
        return Err("give the SHA-256 as 64 hex digits".into());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| "not a hex digit".to_string())?;
    }
    Ok(out)
}

/// A new random key: `lsk_` and 43 characters of base64url (256 bits).
pub fn new_key() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("lsk_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Compares without an early exit, so response times do not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml).unwrap()
    }

    #[test]
    fn keys_identify_their_factory_and_unknown_keys_are_refused() {
        let (a, b) = (new_key(), new_key());
        let cfg = config(&format!(
            "[server]\nadmin_token = \"root\"\n[auth]\nrequired = true\n[[auth.keys]]\nname = \"l1\"\nfactory = \"a\"\nsha256 = \"{}\"\n\
             [[auth.keys]]\nname = \"l2\"\nfactory = \"b\"\nsha256 = \"sha256:{}\"\n[[factories]]\nname = \"a\"\n[[factories]]\nname = \"b\"\n",
            hex(&digest(&a)),
            hex(&digest(&b)),
        ));
        let access = Access::from_config(&cfg).unwrap();
        let headers = |k: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, format!("Bearer {k}").parse().unwrap());
            h
        };
        assert_eq!(access.identify(&headers(&a)).unwrap().factory(), Some("a"));
        assert_eq!(access.identify(&headers(&b)).unwrap().factory(), Some("b"));
        assert_eq!(access.identify(&headers("root")).unwrap(), Principal::Admin);
        assert!(matches!(access.identify(&headers("nope")), Err(ApiError::Unauthorized(_))));
        assert!(matches!(access.identify(&HeaderMap::new()), Err(ApiError::Unauthorized(_))));
        let pa = access.identify(&headers(&a)).unwrap();
        assert!(pa.may_use_factory("a").is_ok() && pa.may_use_factory("b").is_err());
        assert_eq!(pa.records_scope(None).unwrap().as_deref(), Some("a"));
        assert!(pa.records_scope(Some("b".into())).is_err());
        assert!(pa.may_read_record("x", Some("b")).is_err() && pa.may_read_record("x", None).is_err());
        assert!(pa.may_use_model("steel-surface").is_ok() && pa.may_use_model("other").is_err());
    }

    #[test]
    fn bad_key_config_is_refused() {
        let bad_factory = "[[auth.keys]]\nname = \"k\"\nfactory = \"nope\"\nsha256 = \"00\"\n";
        assert!(Access::from_config(&config(bad_factory)).is_err());
        let short = "[[factories]]\nname = \"a\"\n[[auth.keys]]\nname = \"k\"\nfactory = \"a\"\nsha256 = \"abc\"\n";
        assert!(Access::from_config(&config(short)).is_err());
        assert!(Access::from_config(&config("[auth]\nrequired = true\n")).is_err());
    }
}
