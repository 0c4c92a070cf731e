//! The operator profile: where the coordinator is, the CA to check it
//! against and an operator token, in one TOML file (mode 0600) that
//! `turnout serve --init` writes, so the first command after it needs no
//! flags. Read from `--profile`/`TURNOUT_PROFILE`, else
//! `$XDG_CONFIG_HOME/turnout/profile.toml` (`~/.config/turnout/profile.toml`).
//!
//! ```toml
//! coordinator = "https://10.0.0.5:7400"
//! token = "tnt_…"
//! ca = """
//! -----BEGIN CERTIFICATE-----
//! …
//! -----END CERTIFICATE-----
//! """
//! # or, instead of ca: ca_pins = ["sha256:…"]
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::InputError;

/// An operator profile.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The coordinator's URL.
    pub coordinator: String,
    /// An operator token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The CA certificates (PEM) the coordinator's certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Pins of the coordinator's CA, when `ca` is not given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_pins: Vec<String>,
}

/// The standard place of the profile, if a home or config directory is known.
pub fn default_path() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })?;
    Some(config.join("turnout").join("profile.toml"))
}

impl Profile {
    /// Reads the profile at `path` (given: it must exist) or at the
    /// standard place (if there is one there).
    pub fn load(path: Option<&Path>) -> Result<Option<Profile>, InputError> {
        let (path, required) = match path {
            Some(path) => (path.to_owned(), true),
            None => match default_path() {
                Some(path) => (path, false),
                None => return Ok(None),
            },
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if !required && err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(source) => {
                return Err(InputError::Invalid {
                    path,
                    detail: format!("cannot read the operator profile: {source}"),
                });
            }
        };
        let text = String::from_utf8(bytes).map_err(|_| InputError::Invalid {
            path: path.clone(),
            detail: "expected a TOML operator profile, found bytes that are not UTF-8".into(),
        })?;
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| InputError::Invalid {
                path,
                detail: format!(
                    "expected an operator profile (coordinator, token, ca or ca_pins): {}",
                    e.message()
                ),
            })
    }

    /// Writes the profile to `path` (or the standard place), mode 0600,
    /// never over an existing one; returns where.
    pub fn write_new(&self, path: Option<&Path>) -> anyhow::Result<PathBuf> {
        let path = match path {
            Some(path) => path.to_owned(),
            None => default_path().ok_or_else(|| {
                anyhow::anyhow!("neither XDG_CONFIG_HOME nor HOME is set; pass --profile")
            })?,
        };
        if path.exists() {
            anyhow::bail!(
                "{} exists already and is kept; the new token was printed above",
                path.display()
            );
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = toml::to_string_pretty(self)?;
        crate::files::write_atomic(&path, text.as_bytes(), 0o600, true)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p/profile.toml");
        let profile = Profile {
            coordinator: "https://127.0.0.1:7400".into(),
            token: Some("tnt_x".into()),
            ca: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
            ca_pins: Vec::new(),
        };
        assert_eq!(profile.write_new(Some(&path)).unwrap(), path);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Profile::load(Some(&path)).unwrap(), Some(profile.clone()));
        let err = profile.write_new(Some(&path)).unwrap_err();
        assert!(err.to_string().contains("exists already"), "{err}");
    }

    #[test]
    fn a_named_profile_must_exist_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = Profile::load(Some(&missing)).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the operator profile"),
            "{err}"
        );
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "coordinator = 5\n").unwrap();
        let err = Profile::load(Some(&bad)).unwrap_err();
        assert!(
            err.to_string().contains("expected an operator profile"),
            "{err}"
        );
    }
}
