//! Rollout specs (DESIGN.md §7): parsed from a TOML file, CLI flags or an API
//! body, validated strictly, with every problem reported at once.
//!
//! ```toml
//! service = "web"
//! release = "web@1.4.2"            # or a bundle sha256
//! selector = "role=web,region=eu-1"
//! waves = ["1", "10%", "50%", "100%"]   # cumulative share of the selected hosts
//! max_parallel = 5                 # hosts switching at once within a wave (default: the whole wave)
//! bake = "30s"                     # coordinator-side extra bake after a host commits
//! healthy_deadline = "2m"          # per host, from dispatch to committed
//! progress_deadline = "10m"        # per wave
//! max_failed = "0"                 # count or percentage of hosts; past it the gate trips
//! on_failure = "rollback"          # or "pause"
//! promote = "auto"                 # or "manual": wait for `turnout rollout promote`
//! offline = "skip"                 # hosts offline at their turn: "skip" or "fail"
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use turnout_proto::{Digest, ServiceName};

/// Which release a rollout moves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseSelector {
    /// `name@version`.
    Named {
        /// The bundle name.
        name: String,
        /// Its version.
        version: semver::Version,
    },
    /// A bundle's sha256.
    Digest(Digest),
}

impl std::fmt::Display for ReleaseSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReleaseSelector::Named { name, version } => write!(f, "{name}@{version}"),
            ReleaseSelector::Digest(digest) => write!(f, "{digest}"),
        }
    }
}

/// A label selector, `key=value` pairs separated by commas (`role=web,region=eu-1`);
/// empty selects every host.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut selector = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                selector.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            _ => {
                return Err(format!(
                    "expected key=value pairs separated by commas, found {part:?}"
                ));
            }
        }
    }
    Ok(selector)
}

/// A count of hosts, or a share of the selected hosts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// So many hosts.
    Count(usize),
    /// This percentage of the selected hosts.
    Percent(f64),
}

impl Amount {
    fn parse(text: &str) -> Option<Amount> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(p) => p
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| (0.0..=100.0).contains(p))
                .map(Amount::Percent),
            None => text.parse().ok().map(Amount::Count),
        }
    }

    /// How many of `total` hosts this is, rounding a share up.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => ((p / 100.0) * total as f64).ceil() as usize,
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What a tripped gate does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Roll every moved host back.
    Rollback,
    /// Stop and wait for an operator.
    Pause,
}

/// Whether waves after the canary start on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Promote {
    /// Each wave starts when the previous one is done.
    Auto,
    /// After the canary, wait for `turnout rollout promote`.
    Manual,
}

/// What happens to a host that is offline at its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Offline {
    /// Skip it (reported), and carry on.
    Skip,
    /// Count it as failed.
    Fail,
}

/// `max_parallel` when none is given: every host of a wave at once.
pub const WHOLE_WAVE: usize = usize::MAX;

/// A validated rollout spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// The service to move.
    pub service: ServiceName,
    /// The release to move it to.
    pub release: ReleaseSelector,
    /// Labels a host must have (all of them); empty selects every host.
    pub selector: BTreeMap<String, String>,
    /// Cumulative wave sizes.
    pub waves: Vec<Amount>,
    /// Hosts switching at once within a wave.
    pub max_parallel: usize,
    /// Extra bake after a host commits, before it counts as done.
    #[serde(with = "millis")]
    pub bake: Duration,
    /// From dispatch to committed, per host.
    #[serde(with = "millis")]
    pub healthy_deadline: Duration,
    /// From a wave's start to its end.
    #[serde(with = "millis")]
    pub progress_deadline: Duration,
    /// Failures allowed before the gate trips.
    pub max_failed: Amount,
    /// What a tripped gate does.
    pub on_failure: OnFailure,
    /// Whether waves after the canary wait for an operator.
    pub promote: Promote,
    /// Offline hosts at their turn.
    pub offline: Offline,
}

impl RolloutSpec {
    /// Every setting that shapes the rollout, defaults included, on one line.
    pub fn settings(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let waves: Vec<String> = self.waves.iter().map(ToString::to_string).collect();
        format!(
            "waves [{}], max_parallel {}, bake {}, healthy_deadline {}, progress_deadline {}, max_failed {}, on_failure {}, promote {}, offline {}",
            waves.join(", "),
            if self.max_parallel == WHOLE_WAVE {
                "the whole wave".to_owned()
            } else {
                self.max_parallel.to_string()
            },
            d(self.bake),
            d(self.healthy_deadline),
            d(self.progress_deadline),
            self.max_failed,
            match self.on_failure {
                OnFailure::Rollback => "rollback",
                OnFailure::Pause => "pause",
            },
            match self.promote {
                Promote::Auto => "auto",
                Promote::Manual => "manual",
            },
            match self.offline {
                Offline::Skip => "skip",
                Offline::Fail => "fail",
            },
        )
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// One problem in a spec: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecProblem {
    /// The key, e.g. `waves[2]`.
    pub key: String,
    /// What was expected and what was found.
    pub message: String,
}

/// A spec with problems; all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the rollout spec has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {}: {}", p.key, p.message)).collect::<Vec<_>>().join("\n"))]
pub struct SpecError {
    /// Every problem found.
    pub problems: Vec<SpecProblem>,
}

/// The keys a spec may have, in the order they are documented.
pub const KEYS: &[&str] = &[
    "service",
    "release",
    "selector",
    "waves",
    "max_parallel",
    "bake",
    "healthy_deadline",
    "progress_deadline",
    "max_failed",
    "on_failure",
    "promote",
    "offline",
];

/// A spec as given: any JSON values, checked by [`RolloutSpec::from_raw`].
pub type RawSpec = serde_json::Map<String, serde_json::Value>;

impl RolloutSpec {
    /// Parses TOML text into a raw spec.
    pub fn raw_from_toml(text: &str) -> Result<RawSpec, SpecError> {
        toml::from_str::<RawSpec>(text).map_err(|err| SpecError {
            problems: vec![SpecProblem {
                key: "(file)".into(),
                message: format!("not valid TOML: {err}"),
            }],
        })
    }

    /// Validates a raw spec; defaults fill absent optional keys.
    pub fn from_raw(raw: &RawSpec) -> Result<RolloutSpec, SpecError> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(SpecProblem {
                key: key.into(),
                message,
            });
        };
        for key in raw.keys() {
            if !KEYS.contains(&key.as_str()) {
                problem(
                    key,
                    format!("unknown key; expected one of: {}", KEYS.join(", ")),
                );
            }
        }
        let text = |key: &str, problem: &mut dyn FnMut(&str, String)| -> Option<String> {
            match raw.get(key) {
                None => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                Some(other) => {
                    problem(key, format!("expected a string, found {other}"));
                    None
                }
            }
        };
        let service = match text("service", &mut problem) {
            None => {
                problem(
                    "service",
                    "missing; name the service to move, e.g. service = \"web\"".into(),
                );
                None
            }
            Some(s) => s
                .parse::<ServiceName>()
                .map_err(|e| problem("service", e.to_string()))
                .ok(),
        };
        let release = match text("release", &mut problem) {
            None => {
                problem(
                    "release",
                    "missing; expected NAME@VERSION (e.g. web@1.4.2) or a bundle sha256".into(),
                );
                None
            }
            Some(r) => match r.split_once('@') {
                Some((name, version)) => match version.parse() {
                    Ok(version) => Some(ReleaseSelector::Named {
                        name: name.to_owned(),
                        version,
                    }),
                    Err(e) => {
                        problem("release", format!("invalid version {version:?}: {e}"));
                        None
                    }
                },
                None => match r.parse::<Digest>() {
                    Ok(d) => Some(ReleaseSelector::Digest(d)),
                    Err(_) => {
                        problem(
                            "release",
                            format!(
                                "expected NAME@VERSION (e.g. web@1.4.2) or a bundle sha256, found {r:?}"
                            ),
                        );
                        None
                    }
                },
            },
        };
        let selector = text("selector", &mut problem)
            .map(|text| {
                parse_selector(&text).unwrap_or_else(|why| {
                    problem("selector", why);
                    BTreeMap::new()
                })
            })
            .unwrap_or_default();
        let waves = match raw.get("waves") {
            None => vec![Amount::Count(1), Amount::Percent(100.0)],
            Some(serde_json::Value::Array(items)) if !items.is_empty() => {
                let mut waves = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let parsed = match item {
                        serde_json::Value::String(s) => Amount::parse(s),
                        serde_json::Value::Number(n) => {
                            n.as_u64().map(|n| Amount::Count(n as usize))
                        }
                        _ => None,
                    };
                    // Waves are cumulative: each takes the fleet further.
                    let last_same_kind = waves.iter().rev().find(|w: &&Amount| {
                        matches!(
                            (w, &parsed),
                            (Amount::Count(_), Some(Amount::Count(_)))
                                | (Amount::Percent(_), Some(Amount::Percent(_)))
                        )
                    });
                    match parsed {
                        Some(Amount::Count(0)) | None => problem(
                            &format!("waves[{i}]"),
                            format!(
                                "expected a host count above 0 or a percentage like \"10%\", found {item}"
                            ),
                        ),
                        Some(Amount::Percent(p)) if !(p > 0.0 && p <= 100.0) => problem(
                            &format!("waves[{i}]"),
                            format!(
                                "expected a percentage above 0% and at most 100%, found {item}"
                            ),
                        ),
                        Some(Amount::Count(_))
                            if waves.iter().any(|w| matches!(w, Amount::Percent(_))) =>
                        {
                            problem(
                                &format!("waves[{i}]"),
                                format!(
                                    "a host count after a percentage may make the waves shrink; found {item} after a percentage: use percentages from there on"
                                ),
                            );
                        }
                        Some(amount)
                            if last_same_kind.is_some_and(|before| match (before, &amount) {
                                (Amount::Count(a), Amount::Count(b)) => b <= a,
                                (Amount::Percent(a), Amount::Percent(b)) => b <= a,
                                _ => false,
                            }) =>
                        {
                            problem(
                                &format!("waves[{i}]"),
                                format!(
                                    "waves are cumulative shares of the selected hosts, so each must be larger than the one before; found {item} after {}",
                                    last_same_kind.map(ToString::to_string).unwrap_or_default()
                                ),
                            );
                        }
                        Some(amount) => waves.push(amount),
                    }
                }
                waves
            }
            Some(other) => {
                problem(
                    "waves",
                    format!(
                        "expected a non-empty array like [\"1\", \"10%\", \"100%\"], found {other}"
                    ),
                );
                vec![]
            }
        };
        let count = |key: &str, default: usize, problem: &mut dyn FnMut(&str, String)| -> usize {
            match raw.get(key) {
                None => default,
                Some(v) => match v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                {
                    Some(n) if n >= 1 => n as usize,
                    _ => {
                        problem(
                            key,
                            format!("expected a whole number of at least 1, found {v}"),
                        );
                        default
                    }
                },
            }
        };
        // By default a wave moves as a wave: its size is the blast radius.
        let max_parallel = count("max_parallel", WHOLE_WAVE, &mut problem);
        let duration = |key: &str,
                        default: u64,
                        problem: &mut dyn FnMut(&str, String)|
         -> Duration {
            match text(key, problem) {
                None => Duration::from_secs(default),
                Some(t) => humantime::parse_duration(&t).unwrap_or_else(|e| {
                    problem(
                        key,
                        format!("expected a duration like \"30s\" or \"10m\", found {t:?} ({e})"),
                    );
                    Duration::from_secs(default)
                }),
            }
        };
        let bake = duration("bake", 0, &mut problem);
        let healthy_deadline = duration("healthy_deadline", 120, &mut problem);
        let progress_deadline = duration("progress_deadline", 600, &mut problem);
        let max_failed = match text("max_failed", &mut problem) {
            None => Amount::Count(0),
            Some(t) => Amount::parse(&t).unwrap_or_else(|| {
                problem(
                    "max_failed",
                    format!("expected a count like \"0\" or a percentage like \"5%\", found {t:?}"),
                );
                Amount::Count(0)
            }),
        };
        fn choice<T: Copy>(
            key: &str,
            value: Option<String>,
            options: &[(&str, T)],
            default: T,
            problem: &mut dyn FnMut(&str, String),
        ) -> T {
            match value {
                None => default,
                Some(v) => options
                    .iter()
                    .find(|(name, _)| *name == v)
                    .map(|(_, t)| *t)
                    .unwrap_or_else(|| {
                        let names: Vec<_> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
                        problem(key, format!("expected {}, found {v:?}", names.join(" or ")));
                        default
                    }),
            }
        }
        let on_failure = choice(
            "on_failure",
            text("on_failure", &mut problem),
            &[
                ("rollback", OnFailure::Rollback),
                ("pause", OnFailure::Pause),
            ],
            OnFailure::Rollback,
            &mut problem,
        );
        let promote = choice(
            "promote",
            text("promote", &mut problem),
            &[("auto", Promote::Auto), ("manual", Promote::Manual)],
            Promote::Auto,
            &mut problem,
        );
        let offline = choice(
            "offline",
            text("offline", &mut problem),
            &[("skip", Offline::Skip), ("fail", Offline::Fail)],
            Offline::Skip,
            &mut problem,
        );
        if healthy_deadline.is_zero() {
            problem("healthy_deadline", "must be above zero".into());
        }
        if progress_deadline.is_zero() {
            problem("progress_deadline", "must be above zero".into());
        }
        match (service, release, problems.is_empty()) {
            (Some(service), Some(release), true) => Ok(RolloutSpec {
                service,
                release,
                selector,
                waves,
                max_parallel,
                bake,
                healthy_deadline,
                progress_deadline,
                max_failed,
                on_failure,
                promote,
                offline,
            }),
            _ => Err(SpecError { problems }),
        }
    }

    /// Whether a host with `labels` is selected.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod fuzz {
    //! The spec readers (TOML, flags, API bodies) and the selector parser
    //! against arbitrary input: every problem reported, never a panic.

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn arbitrary_toml_is_reported_not_a_panic(text in "\\PC{0,300}") {
            if let Ok(raw) = RolloutSpec::raw_from_toml(&text) {
                let _ = RolloutSpec::from_raw(&raw);
            }
            let _ = parse_selector(&text);
        }

        #[test]
        fn arbitrary_values_for_every_key_are_reported_not_a_panic(
            values in proptest::collection::vec(
                prop_oneof![
                    "\\PC{0,20}".prop_map(serde_json::Value::from),
                    any::<i64>().prop_map(serde_json::Value::from),
                    any::<f64>().prop_map(serde_json::Value::from),
                    any::<bool>().prop_map(serde_json::Value::from),
                    proptest::collection::vec("[0-9%]{0,6}", 0..5).prop_map(serde_json::Value::from),
                ],
                13,
            ),
        ) {
            let keys = ["service", "release", "selector", "waves", "max_parallel", "bake", "healthy_deadline",
                "progress_deadline", "max_failed", "on_failure", "promote", "offline", "unknown"];
            let raw: RawSpec = keys.iter().map(|k| (*k).to_owned()).zip(values).collect();
            let _ = RolloutSpec::from_raw(&raw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `max_parallel` defaulting to 1, a three-wave rollout of 20 hosts
    /// moved one host at a time and lost to an Ansible play.
    #[test]
    fn defaults_move_a_wave_as_a_wave_and_are_all_shown() {
        let raw = RolloutSpec::raw_from_toml("service = \"web\"\nrelease = \"web@1.0.0\"").unwrap();
        let spec = RolloutSpec::from_raw(&raw).unwrap();
        assert_eq!(spec.max_parallel, WHOLE_WAVE);
        assert_eq!(
            spec.settings(),
            "waves [1, 100%], max_parallel the whole wave, bake 0s, healthy_deadline 2m, progress_deadline 10m, max_failed 0, on_failure rollback, promote auto, offline skip"
        );
    }

    #[test]
    fn waves_must_grow() {
        for (waves, found) in [
            (r#"["50%", "10%"]"#, "found \"10%\" after 50%"),
            (r#"["3", "1"]"#, "found \"1\" after 3"),
            (r#"["50%", "1"]"#, "found \"1\" after a percentage"),
            (r#"["1", "150%"]"#, "found \"150%\""),
        ] {
            let raw = RolloutSpec::raw_from_toml(&format!(
                "service = \"web\"\nrelease = \"web@1.0.0\"\nwaves = {waves}"
            ))
            .unwrap();
            let err = RolloutSpec::from_raw(&raw).unwrap_err().to_string();
            assert!(err.contains(found), "{waves}: {err}");
        }
    }

    #[test]
    fn the_design_example_parses() {
        let raw = RolloutSpec::raw_from_toml(
            r#"
            service = "web"
            release = "web@1.4.2"
            selector = "role=web,region=eu-1"
            waves = ["1", "10%", "50%", "100%"]
            max_parallel = 5
            bake = "30s"
            healthy_deadline = "2m"
            progress_deadline = "10m"
            max_failed = "0"
            on_failure = "rollback"
            promote = "auto"
            offline = "skip"
            "#,
        )
        .unwrap();
        let spec = RolloutSpec::from_raw(&raw).unwrap();
        assert_eq!(
            spec.waves,
            vec![
                Amount::Count(1),
                Amount::Percent(10.0),
                Amount::Percent(50.0),
                Amount::Percent(100.0)
            ]
        );
        assert_eq!(spec.selector["region"], "eu-1");
        assert_eq!(spec.max_parallel, 5);
        assert_eq!(spec.release.to_string(), "web@1.4.2");
    }

    #[test]
    fn every_mistake_is_reported_at_once_with_its_key() {
        let raw = RolloutSpec::raw_from_toml(
            r#"
            release = "web-1.4.2"
            waves = ["1", "ten percent", "0"]
            max_parallel = 0
            bake = "soon"
            on_failure = "panic"
            colour = "blue"
            "#,
        )
        .unwrap();
        let err = RolloutSpec::from_raw(&raw).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "colour",
            "service",
            "release",
            "waves[1]",
            "waves[2]",
            "max_parallel",
            "bake",
            "on_failure",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert!(
            err.to_string()
                .starts_with("the rollout spec has 8 problem(s)"),
            "{err}"
        );
    }

    #[test]
    fn amounts_round_shares_up() {
        assert_eq!(Amount::Percent(10.0).of(15), 2);
        assert_eq!(Amount::Count(3).of(100), 3);
        assert_eq!(Amount::Percent(100.0).of(7), 7);
    }
}
