//! What the coordinator keeps to check signed host requests: enrolled
//! hosts' parsed public keys (parsing one decompresses a curve point, too
//! costly on every request) and the signatures already used inside the
//! freshness window, so a replayed request is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use turnout_proto::keys::PublicKey;

/// Host keys and used signatures.
#[derive(Debug, Default)]
pub struct HostAuth {
    keys: Mutex<HashMap<String, PublicKey>>,
    nonces: Mutex<Nonces>,
}

impl HostAuth {
    /// `host`'s key from memory, or from `load` (the store's PEM), remembered.
    pub fn key<E>(
        &self,
        host: &str,
        load: impl FnOnce() -> Result<Option<PublicKey>, E>,
    ) -> Result<Option<PublicKey>, E> {
        if let Some(key) = self.keys.lock().expect("not poisoned").get(host) {
            return Ok(Some(key.clone()));
        }
        let Some(key) = load()? else {
            return Ok(None);
        };
        self.keys
            .lock()
            .expect("not poisoned")
            .insert(host.to_owned(), key.clone());
        Ok(Some(key))
    }

    /// Forgets `host`'s key (it re-enrolled, or was forgotten).
    pub fn forget(&self, host: &str) {
        self.keys.lock().expect("not poisoned").remove(host);
    }

    /// Records `signature`, of a request stamped `ts_ms`, as used; false if
    /// it was used before (a replay). `window_ms` is the freshness window.
    pub fn first_use(&self, signature: &[u8], ts_ms: u64, now: u64, window_ms: u64) -> bool {
        self.nonces
            .lock()
            .expect("not poisoned")
            .first_use(signature, ts_ms, now, window_ms)
    }
}

/// Signatures of requests whose timestamps are still inside the freshness
/// window, so a replay of one is refused. They are kept by their timestamp's
/// minute and a minute is dropped whole once every timestamp in it is too old
/// to be accepted anyway: memory is bounded by the request rate times the
/// window, and no request pays for a scan.
#[derive(Debug, Default)]
struct Nonces {
    minutes: BTreeMap<u64, HashSet<u128>>,
}

impl Nonces {
    const MINUTE: u64 = 60_000;

    /// Records a signature made at `ts_ms`; false if it was seen before.
    fn first_use(&mut self, signature: &[u8], ts_ms: u64, now: u64, window: u64) -> bool {
        let oldest = now.saturating_sub(window) / Self::MINUTE;
        while let Some((&minute, _)) = self.minutes.first_key_value()
            && minute < oldest
        {
            self.minutes.pop_first();
        }
        // 128 bits of an ed25519 signature are as unique as all 512.
        let mut key = [0u8; 16];
        let n = signature.len().min(16);
        key[..n].copy_from_slice(&signature[..n]);
        self.minutes
            .entry(ts_ms / Self::MINUTE)
            .or_default()
            .insert(u128::from_le_bytes(key))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.minutes.values().map(HashSet::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_refused_the_second_time_and_forgotten_once_too_old() {
        let window = 300_000;
        let mut nonces = Nonces::default();
        let now = 10 * 3_600_000;
        let sig = [7u8; 64];
        assert!(nonces.first_use(&sig, now, now, window));
        assert!(!nonces.first_use(&sig, now, now, window), "a replay");
        assert!(nonces.first_use(&[8u8; 64], now - 1000, now, window));
        assert_eq!(nonces.len(), 2);
        // Once its timestamp is out of the window it cannot be accepted
        // anyway (the freshness check refuses it), and it is dropped.
        let later = now + window + Nonces::MINUTE + 1;
        assert!(nonces.first_use(&[9u8; 64], later, later, window));
        assert_eq!(nonces.len(), 1, "only the newest signature is kept");
    }

    #[test]
    fn a_key_is_loaded_once_and_loaded_again_after_being_forgotten() {
        let auth = HostAuth::default();
        let key = turnout_proto::keys::SecretKey::from_seed([1; 32]).public();
        let mut loads = 0;
        for _ in 0..3 {
            let got = auth
                .key::<()>("web-01", || {
                    loads += 1;
                    Ok(Some(key.clone()))
                })
                .unwrap();
            assert_eq!(got.as_ref(), Some(&key));
        }
        assert_eq!(loads, 1, "parsed once, then from memory");
        auth.forget("web-01");
        auth.key::<()>("web-01", || {
            loads += 1;
            Ok(None)
        })
        .unwrap();
        assert_eq!(loads, 2);
    }
}
