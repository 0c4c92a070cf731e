//! The desired-state broker: each host's desired state as last read or
//! changed (never older than the store's), the long polls waiting for it to
//! change, and what each host agreed to in its hello (protocol version,
//! long polls).
//!
//! The store is the truth; this is what lets ten thousand parked polls be
//! answered without reading it. A state is put here only under the store's
//! lock (see [`Coordinator::desired`](crate::coordinator::Coordinator::desired)),
//! so a read can never put back a state older than a change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use turnout_proto::ProtoVersion;
use turnout_proto::messages::{DesiredService, DesiredState};

/// What a host agreed to in its last hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The protocol version both sides write.
    pub version: ProtoVersion,
    /// Whether it long-polls.
    pub long_poll: bool,
}

/// Desired states, their watchers, and hello agreements.
#[derive(Debug, Default)]
pub struct Broker {
    states: Mutex<HashMap<String, Arc<DesiredState>>>,
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    agreed: Mutex<HashMap<String, Agreed>>,
}

impl Broker {
    /// `host`'s desired state, when it is known in memory.
    pub fn cached(&self, host: &str) -> Option<Arc<DesiredState>> {
        self.states.lock().expect("not poisoned").get(host).cloned()
    }

    /// Remembers `state`, read from the store, unless a newer one is known;
    /// returns the one now known.
    pub fn remember(&self, host: &str, state: DesiredState) -> Arc<DesiredState> {
        let mut states = self.states.lock().expect("not poisoned");
        let entry = states
            .entry(host.to_owned())
            .or_insert_with(|| Arc::new(state.clone()));
        if entry.index < state.index {
            *entry = Arc::new(state);
        }
        entry.clone()
    }

    /// Records that `host`'s desired state for `service.service` is now
    /// `service`, at `index` (a rollout step changed it).
    pub fn set(&self, host: &str, index: u64, service: &DesiredService) {
        if let Some(state) = self.states.lock().expect("not poisoned").get_mut(host) {
            let state = Arc::make_mut(state);
            state.index = index;
            state.services.retain(|s| s.service != service.service);
            state.services.push(service.clone());
            state.services.sort_by(|a, b| a.service.cmp(&b.service));
        }
    }

    /// Records that `host` no longer has a desired release of `service`.
    pub fn clear(&self, host: &str, index: u64, service: &str) {
        if let Some(state) = self.states.lock().expect("not poisoned").get_mut(host) {
            let state = Arc::make_mut(state);
            state.index = index;
            state.services.retain(|s| s.service.as_str() != service);
        }
    }

    /// A receiver that changes when `host`'s desired-state index does.
    pub fn watch(&self, host: &str, current: u64) -> watch::Receiver<u64> {
        self.watchers
            .lock()
            .expect("not poisoned")
            .entry(host.to_owned())
            .or_insert_with(|| watch::channel(current).0)
            .subscribe()
    }

    /// How many long polls are waiting on `host`'s desired state right now.
    pub fn waiting(&self, host: &str) -> usize {
        self.watchers
            .lock()
            .expect("not poisoned")
            .get(host)
            .map_or(0, watch::Sender::receiver_count)
    }

    /// Wakes the long polls waiting on `host`: its index is now `index`.
    pub fn notify(&self, host: &str, index: u64) {
        if let Some(sender) = self.watchers.lock().expect("not poisoned").get(host) {
            sender.send_replace(index);
        }
    }

    /// What `host` agreed to in its last hello, if known.
    pub fn agreement(&self, host: &str) -> Option<Agreed> {
        self.agreed.lock().expect("not poisoned").get(host).copied()
    }

    /// Remembers what `host` agreed to.
    pub fn agreed(&self, host: &str, agreed: Agreed) {
        self.agreed
            .lock()
            .expect("not poisoned")
            .insert(host.to_owned(), agreed);
    }

    /// Forgets `host`'s desired state in memory: the next read takes the store's.
    pub fn forget_state(&self, host: &str) {
        self.states.lock().expect("not poisoned").remove(host);
    }

    /// Forgets what is known of `host` (it re-enrolled, or was forgotten).
    pub fn forget(&self, host: &str) {
        self.agreed.lock().expect("not poisoned").remove(host);
        self.states.lock().expect("not poisoned").remove(host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(index: u64) -> DesiredState {
        DesiredState {
            host: "h".parse().unwrap(),
            index,
            services: Vec::new(),
            issued_at_ms: None,
            expires_ms: None,
            policy_version: None,
        }
    }

    #[test]
    fn an_older_read_never_replaces_a_newer_state() {
        let broker = Broker::default();
        assert_eq!(broker.remember("h", state(5)).index, 5);
        assert_eq!(broker.remember("h", state(3)).index, 5, "older: kept 5");
        assert_eq!(broker.remember("h", state(7)).index, 7);
        broker.forget("h");
        assert!(broker.cached("h").is_none());
    }

    #[tokio::test]
    async fn a_waiting_poll_is_woken_with_the_new_index() {
        let broker = Broker::default();
        let mut rx = broker.watch("h", 1);
        assert_eq!(broker.waiting("h"), 1);
        broker.notify("h", 2);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 2);
        drop(rx);
        assert_eq!(broker.waiting("h"), 0);
    }
}
