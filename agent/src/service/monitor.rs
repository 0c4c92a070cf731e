//! Health at rest: each service's checks probed on their intervals while
//! it is idle with a committed release, judged with their thresholds, for
//! `status` and reports.

use super::*;

impl Agent {
    /// Watches the health of service `name` while it is at rest, with the
    /// checks' intervals and thresholds, for `status` and reports. Runs until
    /// the task is dropped; probes pause while an operation runs (the bake
    /// watches health then).
    pub async fn monitor(&self, name: &str) {
        let Ok(service) = self.service(name) else {
            return;
        };
        let checks = &service.config.checks;
        if checks.is_empty() {
            return;
        }
        let rest = crate::config::Bake {
            min_healthy: std::time::Duration::ZERO,
            deadline: std::time::Duration::MAX,
        };
        let mut judge = health::Judge::new(checks, rest);
        let mut since = tokio::time::Instant::now();
        let mut cpu: Vec<health::CpuSample> = vec![None; checks.len()];
        let mut due = vec![tokio::time::Instant::now(); checks.len()];
        loop {
            let now = tokio::time::Instant::now();
            if service.at_rest.load(Ordering::SeqCst) {
                let restarts = service.supervisor.restarts().await;
                for (i, check) in checks.iter().enumerate() {
                    if due[i] <= now {
                        let result = health::probe(
                            check,
                            &*service.supervisor,
                            &service.http,
                            restarts,
                            &mut cpu[i],
                        )
                        .await;
                        judge.observe(i, result, now - since);
                        due[i] = now + check.interval;
                    }
                }
                let judged = match judge.verdict(std::time::Duration::ZERO) {
                    health::Verdict::Healthy(_) => (Health::Healthy, None),
                    health::Verdict::Unhealthy(why) => (Health::Unhealthy, Some(why)),
                    health::Verdict::Pending => {
                        (Health::Pending, Some("checks have not settled yet".into()))
                    }
                };
                let before = self
                    .monitored
                    .lock()
                    .expect("not poisoned")
                    .insert(name.to_owned(), judged.clone());
                if before.map(|(health, _)| health) != Some(judged.0) {
                    self.changed();
                }
            } else {
                self.monitored.lock().expect("not poisoned").remove(name);
                judge = health::Judge::new(checks, rest);
                since = now;
                due.iter_mut().for_each(|d| *d = now);
            }
            let wake = due
                .iter()
                .copied()
                .min()
                .unwrap_or(now)
                .max(now + std::time::Duration::from_millis(50));
            tokio::time::sleep_until(wake).await;
        }
    }
}
