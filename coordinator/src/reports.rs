//! The report queue: agents' reports and last-seen times, kept in memory
//! by the hot request paths and written by the rollout loop in one
//! transaction per round (stepping a rollout writes them first).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;

use turnout_proto::messages::Report;

/// What is waiting to be written.
#[derive(Debug, Default)]
pub struct Queued {
    /// The newest report of each host, and when it arrived.
    pub reports: HashMap<String, (Report, u64)>,
    /// When each host was last seen, and the highest desired-state index
    /// it said it had acted on (its long poll's `index`).
    pub seen: HashMap<String, (u64, u64)>,
}

impl Queued {
    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.reports.is_empty() && self.seen.is_empty()
    }
}

/// Reports and last-seen times not yet written.
#[derive(Debug, Default)]
pub struct ReportQueue {
    queued: Mutex<Queued>,
}

impl ReportQueue {
    /// Queues `report`, received at `now`; false when a newer one from the
    /// same host is queued already (reports may arrive out of order) and
    /// this one was dropped.
    pub fn report(&self, report: Report, now: u64) -> bool {
        let mut queued = self.queued.lock().expect("not poisoned");
        match queued.reports.entry(report.host.to_string()) {
            Entry::Occupied(mut slot) => {
                if slot.get().0.seq < report.seq {
                    slot.insert((report, now));
                    true
                } else {
                    false
                }
            }
            Entry::Vacant(slot) => {
                slot.insert((report, now));
                true
            }
        }
    }

    /// Queues "seen at `now`, done with desired states up to `acked`".
    pub fn seen(&self, host: &str, now: u64, acked: u64) {
        let mut queued = self.queued.lock().expect("not poisoned");
        let entry = queued.seen.entry(host.to_owned()).or_insert((now, acked));
        *entry = (now.max(entry.0), acked.max(entry.1));
    }

    /// Everything queued, leaving the queue empty.
    pub fn take(&self) -> Queued {
        std::mem::take(&mut *self.queued.lock().expect("not poisoned"))
    }
}
