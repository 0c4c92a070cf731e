//! The link's transport: one pooled HTTP client per link (kept-alive
//! connections for polls, reports and downloads), requests signed with
//! the host's key and a strictly growing timestamp.

use super::*;

pub(super) fn error_message(body: &[u8]) -> String {
    turnout_proto::messages::ErrorBody::message_of(body)
}

/// The coordinator link's HTTP client: a connection pool, so the link's
/// polls, reports and downloads reuse one kept-alive connection.
pub(super) fn client(cas: &[CertificateDer<'_>]) -> ureq::Agent {
    ureq::Agent::config_builder()
        // https: the coordinator's CA (ca.pem) and nothing else.
        .tls_config(turnout_rt::tls::ureq_trusting(cas))
        .http_status_as_error(false)
        // Buffers per pooled connection (ureq's default is 128 KiB each
        // way): desired states and reports are small, and a download
        // streams to disk through whatever size the buffer is.
        .input_buffer_size(32 * 1024)
        .output_buffer_size(16 * 1024)
        .timeout_global(Some(Duration::from_secs(90)))
        // TCP and TLS handshake: a coordinator that accepts and says
        // nothing costs one retry, not the whole 90 s.
        .timeout_connect(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// One HTTP request; returns the status and the body.
pub(super) fn http(
    agent: &ureq::Agent,
    base: &str,
    method: &str,
    path: &str,
    auth: Option<String>,
    body: &[u8],
) -> Result<(u16, Vec<u8>), LinkError> {
    let url = format!("{base}{path}");
    let result = if method == "GET" {
        let mut request = agent.get(&url);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        request.call()
    } else {
        let mut request = agent.post(&url).header("Content-Type", "application/json");
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        request.send(body)
    };
    let mut response = result.map_err(|e| unreachable_or_untrusted(base, &e))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(8 << 20)
        .read_to_vec()
        .map_err(|e| LinkError::Unreachable {
            url: base.to_owned(),
            detail: e.to_string(),
        })?;
    Ok((status, body))
}

/// A failed request: untrusted when TLS refused the coordinator's
/// certificate, unreachable otherwise.
pub(super) fn unreachable_or_untrusted(base: &str, err: &ureq::Error) -> LinkError {
    match turnout_rt::tls::ureq_failure(err) {
        Some(tls) if tls.certificate => LinkError::Untrusted {
            url: base.to_owned(),
            detail: tls.detail,
        },
        Some(tls) => LinkError::Unreachable {
            url: base.to_owned(),
            detail: tls.detail,
        },
        None => LinkError::Unreachable {
            url: base.to_owned(),
            detail: err.to_string(),
        },
    }
}

impl Link {
    /// One signed request to the coordinator, on this link's client.
    pub(super) async fn call(
        &self,
        method: &'static str,
        path: String,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), LinkError> {
        let header = request_auth::sign(
            &self.identity.key,
            &self.identity.host,
            method,
            &path,
            signing_time(),
            &body,
        );
        let (base, client) = (self.identity.coordinator.clone(), self.client());
        tokio::task::spawn_blocking(move || {
            http(&client, &base, method, &path, Some(header), &body)
        })
        .await
        .expect("the request does not panic")
    }
}

/// The timestamp a request is signed with: the clock, but strictly growing
/// within this process, so that two requests made in the same millisecond
/// never carry the same signature (the coordinator would refuse the second
/// as a replay).
pub(super) fn signing_time() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = now_ms();
    let mut last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(
            last,
            next,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        ) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}
