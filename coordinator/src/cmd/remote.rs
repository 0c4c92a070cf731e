//! What every command that talks to a coordinator shares: where it is, the
//! operator token, and JSON output.

use std::time::{Duration, UNIX_EPOCH};

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use rustls::pki_types::CertificateDer;
use turnout_rt::tls::Pin;

use crate::client::Client;
use crate::files::{self, InputError};
use crate::profile::Profile;

/// Options of the commands that call the coordinator's API. Each falls
/// back to the operator profile (`--profile`, or the one `turnout serve
/// --init` wrote), then to `https://127.0.0.1:7400`.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The coordinator's URL [default: the profile's, else https://127.0.0.1:7400].
    #[arg(long, env = "TURNOUT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// An operator token (`turnout serve --init` prints the first).
    #[arg(long, env = "TURNOUT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The CA certificates (PEM) the coordinator's certificate must chain
    /// to: the coordinator's STATE_DIR/tls/ca.pem, or your own CA's.
    #[arg(long, env = "TURNOUT_CA")]
    pub ca: Option<PathBuf>,
    /// Trust the coordinator whose chain has a CA with this public-key pin
    /// (sha256:…, printed by `turnout serve` and on join lines); repeatable.
    #[arg(long = "ca-pin", env = "TURNOUT_CA_PIN", value_delimiter = ',')]
    pub ca_pins: Vec<String>,
    /// The operator profile to read [default: $XDG_CONFIG_HOME/turnout/profile.toml].
    #[arg(long, env = "TURNOUT_PROFILE")]
    pub profile: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Remote {
    /// The coordinator's URL (from the flags, the profile or the default)
    /// and the profile, if there is one.
    fn resolve(&self) -> anyhow::Result<(String, Option<Profile>)> {
        let profile = Profile::load(self.profile.as_deref())?;
        let url = match (&self.coordinator, &profile) {
            (Some(url), _) => url.clone(),
            (None, Some(profile)) => profile.coordinator.clone(),
            (None, None) => "https://127.0.0.1:7400".to_owned(),
        };
        Ok((url, profile))
    }

    /// The coordinator's URL, from the flags, the profile or the default.
    pub fn url(&self) -> anyhow::Result<String> {
        Ok(self.resolve()?.0)
    }

    /// A client for the coordinator, checking it against the CA from the
    /// flags or the profile (or the CA a pin finds).
    pub fn client(&self) -> anyhow::Result<Client> {
        let (url, profile) = self.resolve()?;
        if let Some(ca) = &self.ca
            && !self.ca_pins.is_empty()
        {
            return Err(crate::client::ClientError::CaAndPins {
                ca: ca.display().to_string(),
            }
            .into());
        }
        // The profile's CA and token go with the profile's coordinator only.
        let (profile, other) = match profile {
            Some(p) if p.coordinator.trim_end_matches('/') == url.trim_end_matches('/') => {
                (Some(p), None)
            }
            other => (None, other),
        };
        let token = self
            .token
            .clone()
            .or_else(|| profile.as_ref().and_then(|p| p.token.clone()));
        if !url.starts_with("https://") {
            return Ok(Client::new(&url, token));
        }
        let cas = if let Some(path) = &self.ca {
            read_cas(path, &files::read(path)?)?
        } else if !self.ca_pins.is_empty() {
            discover(&url, &self.ca_pins)?
        } else if let Some(pem) = profile.as_ref().and_then(|p| p.ca.clone()) {
            let path = self
                .profile
                .clone()
                .or_else(crate::profile::default_path)
                .unwrap_or_default();
            read_cas(&path, pem.as_bytes())?
        } else if let Some(pins) = profile
            .as_ref()
            .map(|p| p.ca_pins.clone())
            .filter(|p| !p.is_empty())
        {
            discover(&url, &pins)?
        } else if let Some(other) = other {
            return Err(anyhow::Error::new(crate::client::ClientError::NoCa { url: url.clone() })
                .context(format!(
                    "the operator profile is for {}, not {url}: its CA and token are used only with its own \
                     coordinator",
                    other.coordinator
                )));
        } else {
            Vec::new()
        };
        Ok(Client::with_ca(&url, token, &cas))
    }
    /// Prints `value` as JSON when --json was given; returns whether it did.
    pub fn print_json(&self, value: &impl serde::Serialize) -> anyhow::Result<bool> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        }
        Ok(self.json)
    }
}

fn read_cas(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, InputError> {
    turnout_rt::tls::certificates_from_pem(pem).map_err(|e| InputError::Invalid {
        path: path.to_owned(),
        detail: format!("expected the coordinator's CA certificates (PEM): {e}"),
    })
}

/// First contact by pin: the CA of the server at `url` whose chain matches.
fn discover(url: &str, pins: &[String]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pins = pins
        .iter()
        .map(|p| Pin::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let ca = turnout_rt::tls::discover(url, &pins, Duration::from_secs(20))
        .with_context(|| format!("the coordinator at {url} could not be verified"))?;
    Ok(vec![ca])
}

/// `2026-11-22 03:18:38` for a time in ms since the epoch.
pub fn when(ms: u64) -> String {
    let text =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
    text.trim_end_matches('Z').replace('T', " ")
}

pub use turnout_proto::text::{clean, clean_lines};
