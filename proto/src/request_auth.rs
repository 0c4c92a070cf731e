//! Host request signatures (DESIGN.md §8): how an agent proves who it is on
//! every request, with the ed25519 key it enrolled.
//!
//! The header is `Authorization: Turnout-Host host=ID, ts=UNIX_MS, sig=BASE64`,
//! where the signature covers exactly these lines:
//!
//! ```text
//! turnout-host-v1
//! METHOD
//! PATH?QUERY
//! UNIX_MS
//! SHA256_HEX_OF_BODY
//! ```
//!
//! The coordinator refuses unknown hosts, bad signatures, timestamps outside
//! its freshness window, and a signature it has already seen (a replay).

use sha2::{Digest as _, Sha256};

use crate::ids::HostId;
use crate::keys::{PublicKey, RawSignature, SecretKey};

/// The authorization scheme's name.
pub const SCHEME: &str = "Turnout-Host";

/// A header that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed {SCHEME} authorization: {0}; expected `{SCHEME} host=ID, ts=UNIX_MS, sig=BASE64`"
)]
pub struct MalformedAuth(pub String);

/// A parsed authorization header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAuth {
    /// Who claims to send it.
    pub host: HostId,
    /// When, ms since the epoch, by the host's clock.
    pub ts_ms: u64,
    /// The signature.
    pub sig: RawSignature,
}

/// The exact bytes a request signature covers.
pub fn payload(method: &str, path_and_query: &str, ts_ms: u64, body: &[u8]) -> Vec<u8> {
    let digest = Sha256::digest(body);
    let hex = hex::encode(digest);
    format!("turnout-host-v1\n{method}\n{path_and_query}\n{ts_ms}\n{hex}").into_bytes()
}

/// The header value for a request signed by `key` as `host`.
pub fn sign(
    key: &SecretKey,
    host: &HostId,
    method: &str,
    path_and_query: &str,
    ts_ms: u64,
    body: &[u8],
) -> String {
    let sig = key.sign(&payload(method, path_and_query, ts_ms, body));
    format!(
        "{SCHEME} host={host}, ts={ts_ms}, sig={}",
        String::from(sig)
    )
}

impl HostAuth {
    /// Parses a header value.
    pub fn parse(value: &str) -> Result<HostAuth, MalformedAuth> {
        let rest = value
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| MalformedAuth(format!("it does not start with {SCHEME:?}")))?;
        let (mut host, mut ts, mut sig) = (None, None, None);
        for part in rest.split(',').map(str::trim) {
            match part.split_once('=') {
                Some(("host", v)) => {
                    host = Some(
                        v.parse::<HostId>()
                            .map_err(|e| MalformedAuth(e.to_string()))?,
                    );
                }
                Some(("ts", v)) => {
                    ts = Some(
                        v.parse::<u64>()
                            .map_err(|_| MalformedAuth(format!("ts {v:?} is not a number")))?,
                    );
                }
                Some(("sig", v)) => {
                    sig = Some(RawSignature::try_from(v.to_owned()).map_err(MalformedAuth)?);
                }
                _ => return Err(MalformedAuth(format!("unexpected part {part:?}"))),
            }
        }
        Ok(HostAuth {
            host: host.ok_or_else(|| MalformedAuth("no host".into()))?,
            ts_ms: ts.ok_or_else(|| MalformedAuth("no ts".into()))?,
            sig: sig.ok_or_else(|| MalformedAuth("no sig".into()))?,
        })
    }

    /// Whether the signature is `key`'s over this request.
    pub fn verifies(
        &self,
        key: &PublicKey,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> bool {
        key.verifies(
            &payload(method, path_and_query, self.ts_ms, body),
            &self.sig,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_request_verifies_and_any_change_breaks_it() {
        let key = SecretKey::from_seed([5; 32]);
        let host: HostId = "web-01".parse().unwrap();
        let header = sign(&key, &host, "POST", "/v1/agent/report", 1000, b"{}");
        let auth = HostAuth::parse(&header).unwrap();
        assert_eq!((auth.host.as_str(), auth.ts_ms), ("web-01", 1000));
        assert!(auth.verifies(&key.public(), "POST", "/v1/agent/report", b"{}"));
        assert!(!auth.verifies(&key.public(), "POST", "/v1/agent/report", b"{ }"));
        assert!(!auth.verifies(&key.public(), "GET", "/v1/agent/report", b"{}"));
        assert!(!auth.verifies(&key.public(), "POST", "/v1/agent/hello", b"{}"));
        assert!(!auth.verifies(
            &SecretKey::from_seed([6; 32]).public(),
            "POST",
            "/v1/agent/report",
            b"{}"
        ));
    }

    #[test]
    fn malformed_headers_say_what_is_expected() {
        for bad in [
            "Bearer x",
            "Turnout-Host host=web",
            "Turnout-Host host=a, ts=x, sig=AA==",
        ] {
            let err = HostAuth::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains("expected `Turnout-Host host=ID"),
                "{err}"
            );
        }
    }
}
