//! The operator CLI's HTTP client for the coordinator's API (blocking: a CLI
//! makes one request at a time).

use std::io::Read;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use turnout_proto::messages::ErrorBody;

/// Why a call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator could not be reached.
    #[error(
        "cannot reach the coordinator at {url}: {detail}; is `turnout serve` running there? (--coordinator / TURNOUT_COORDINATOR)"
    )]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// The coordinator answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The coordinator's message.
        message: String,
    },
    /// The operator token cannot be sent as it is.
    #[error(
        "the operator token holds a space or control character (a line break pasted with it?); expected \
         the tnt_… token alone, as `turnout serve --init` or `turnout token create` printed it"
    )]
    BadToken,
    /// The coordinator's certificate could not be trusted.
    #[error("the coordinator at {url} could not be verified: {detail}")]
    Untrusted {
        /// The URL.
        url: String,
        /// Why, and what to do.
        detail: String,
    },
    /// An https:// coordinator, and no CA to check it against.
    #[error(
        "{url} is https, and this command has no CA to check the coordinator against: pass --ca FILE \
         (the coordinator's STATE_DIR/tls/ca.pem) or --ca-pin sha256:…, or use the operator profile that \
         `turnout serve --init` writes"
    )]
    NoCa {
        /// The URL.
        url: String,
    },
    /// A CA file and CA pins were both given: which one decides is not clear.
    #[error(
        "both a CA file ({ca}, from --ca or TURNOUT_CA) and CA pins (--ca-pin or TURNOUT_CA_PIN) were given: \
         give one of them (unset the variable you did not mean)"
    )]
    CaAndPins {
        /// The CA file.
        ca: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the coordinator: {0}")]
    Decode(String),
}

/// A client for one coordinator, with an optional operator token.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    has_ca: bool,
}

impl Client {
    /// A client for a plain-HTTP coordinator at `base` (e.g.
    /// `http://127.0.0.1:7400`); an https URL needs [`Client::with_ca`].
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client::with_ca(base, token, &[])
    }

    /// A client for the coordinator at `base` that trusts the CA
    /// certificates `cas` (and nothing else) for https.
    pub fn with_ca(base: &str, token: Option<String>, cas: &[CertificateDer<'_>]) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            // TCP and TLS handshake: an address that accepts and says
            // nothing is reported in 10 s, not after the whole 120 s.
            .timeout_connect(Some(Duration::from_secs(10)))
            .tls_config(turnout_rt::tls::ureq_trusting(cas))
            .build();
        Client {
            agent: config.into(),
            base: base.trim_end_matches('/').to_owned(),
            token,
            has_ca: !cas.is_empty(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Refuses before any connection when TLS could not be checked.
    fn ready(&self) -> Result<(), ClientError> {
        if self
            .token
            .as_ref()
            .is_some_and(|t| t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ClientError::BadToken);
        }
        if self.base.starts_with("https://") && !self.has_ca {
            return Err(ClientError::NoCa {
                url: self.base.clone(),
            });
        }
        Ok(())
    }

    fn finish_raw(
        &self,
        url: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut response = result.map_err(|e| match turnout_rt::tls::ureq_failure(&e) {
            Some(tls) if tls.certificate => ClientError::Untrusted {
                url: self.base.clone(),
                detail: tls.detail,
            },
            Some(tls) => ClientError::Connect {
                url: url.to_owned(),
                detail: tls.detail,
            },
            None => ClientError::Connect {
                url: url.to_owned(),
                detail: match e {
                    ureq::Error::Timeout(ureq::Timeout::Connect) => {
                        "no connection and TLS handshake \
                        within 10 s: is this the coordinator's address and port, and is it running?"
                            .to_owned()
                    }
                    e => e.to_string(),
                },
            },
        })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        if status >= 400 {
            let message = ErrorBody::message_of(&body);
            return Err(ClientError::Api { status, message });
        }
        Ok(body)
    }

    fn finish<T: DeserializeOwned>(
        &self,
        url: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let body = self.finish_raw(url, result)?;
        let body = if body.is_empty() {
            b"null".to_vec()
        } else {
            body
        };
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Refuses before any connection what cannot be sent.
    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// GET `path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.ready()?;
        let url = self.url(path);
        let mut request = self.agent.get(&url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish(&url, request.call())
    }

    /// GET `path` as text (`/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        self.ready()?;
        let url = self.url(path);
        let mut request = self.agent.get(&url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        let bytes = self.finish_raw(&url, request.call())?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// POST `body` as JSON to `path`.
    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        self.ready()?;
        let url = self.url(path);
        let mut request = self.agent.post(&url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish(&url, request.send_json(body))
    }

    /// POST the bytes of `reader` to `path`.
    pub fn post_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        reader: &mut dyn Read,
    ) -> Result<T, ClientError> {
        self.ready()?;
        let url = self.url(path);
        let mut request = self
            .agent
            .post(&url)
            .header("Content-Type", "application/octet-stream");
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish(&url, request.send(ureq::SendBody::from_reader(reader)))
    }

    /// DELETE `path`.
    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.ready()?;
        let url = self.url(path);
        let mut request = self.agent.delete(&url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish::<serde_json::Value>(&url, request.call())
            .map(drop)
    }
}
