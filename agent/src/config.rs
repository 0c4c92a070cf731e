//! The agent's config file (`/etc/turnout/agent.toml`), parsed strictly.
//!
//! Unknown keys are errors, and every problem in the file is reported at
//! once, each with its key path (`service[0].check[1].url`), so an operator
//! fixes a config in one round instead of one error per restart. The file is
//! walked by hand rather than through serde for exactly that reason.
//!
//! ```toml
//! coordinator = "http://10.0.0.5:7400"     # optional: absent means standalone
//! state_dir = "/var/lib/turnout"            # default
//! trust = "/etc/turnout/trust.json"         # default
//! labels = { region = "eu-1", role = "web" }
//! upgrade_deadline = "3m"                   # a new agent not confirmed by then is reverted
//!
//! [[service]]
//! name = "web"
//! supervisor = "systemd"                    # or "exec" with exec = ["bin/web", "--port", "8080"]
//! unit = "web.service"                      # systemd; default NAME.service
//! stop_timeout = "10s"                      # exec: SIGTERM, then SIGKILL after this
//! env = { PORT = "8080" }                   # exec: environment; ${NAME} in exec is expanded
//! environment_file = "/etc/turnout/web.env" # exec: more KEY=VALUE lines, read at each start
//! working_directory = "data"                # exec: relative to the release, or absolute
//! [service.bake]
//! min_healthy = "10s"                       # all checks green this long commits
//! deadline = "60s"                          # not committed by then reverts
//! [[service.check]]
//! kind = "http"                             # http, tcp, exec, systemd, process
//! url = "http://127.0.0.1:8080/healthz"     # http: also status = 200, body_contains = "ok"
//! interval = "1s"                           # every check: interval, timeout,
//! timeout = "1s"                            #   success (consecutive passes to pass, 1)
//! failure = 3                               #   failure (consecutive fails to fail, 3)
//! start_period = "15s"                      #   failures before the first pass, this
//!                                           #   soon after the switch, do not count
//! ```
//!
//! Other checks: `tcp` (`address`), `exec` (`command = [..]`), `systemd` (the
//! service's unit active with no restarts since the switch), `process`
//! (`max_rss = "256MiB"`, `max_cpu = 90.0` percent of one core).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use turnout_proto::ServiceName;
use turnout_proto::manifest::PayloadPath;

/// Where the config is read from unless `--config` or `TURNOUT_AGENT_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/turnout/agent.toml";

/// The agent's whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The coordinator's base URL; `None` runs standalone.
    pub coordinator: Option<String>,
    /// The state directory (journal, slots, cache).
    pub state_dir: PathBuf,
    /// The trust file bundles are verified against.
    pub trust: PathBuf,
    /// Labels for rollout selectors.
    pub labels: BTreeMap<String, String>,
    /// The managed services.
    pub services: Vec<ServiceConfig>,
    /// How long a new agent has, after the switch to it, to confirm itself
    /// before the dead-man switch puts the previous one back.
    pub upgrade_deadline: Duration,
}

/// [`Config::upgrade_deadline`] unless the config says otherwise.
pub const DEFAULT_UPGRADE_DEADLINE: Duration = Duration::from_secs(180);
/// The shortest [`Config::upgrade_deadline`] accepted.
pub const MIN_UPGRADE_DEADLINE: Duration = Duration::from_secs(15);

/// One managed service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Its name (a directory under `state_dir/services/`).
    pub name: ServiceName,
    /// How it is run.
    pub supervisor: SupervisorConfig,
    /// How a new release is judged.
    pub bake: Bake,
    /// Its health checks.
    pub checks: Vec<Check>,
}

/// How a service's process is run.
#[derive(Debug, Clone, PartialEq)]
pub enum SupervisorConfig {
    /// A systemd unit whose `ExecStart` runs `…/current/<entry>`.
    Systemd {
        /// The unit name.
        unit: String,
    },
    /// The agent runs the process itself.
    Exec {
        /// The command, relative to the active slot; empty runs the manifest's entry.
        argv: Vec<String>,
        /// How long a SIGTERM may take before SIGKILL.
        stop_timeout: Duration,
        /// Per-host configuration: what a bundle, the same on every host,
        /// cannot carry.
        host: ExecHost,
    },
}

/// What an exec service gets from this host, not from its release.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecHost {
    /// Environment variables, over the agent's own.
    pub env: BTreeMap<String, String>,
    /// A file of `KEY=VALUE` lines (`#` comments, blank lines), read at
    /// each start; `env` wins over it.
    pub environment_file: Option<PathBuf>,
    /// The working directory: relative to the release, or absolute.
    pub working_directory: Option<String>,
}

/// How long a new release must stay healthy, and may take to get there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bake {
    /// All checks passing for this long commits the release.
    pub min_healthy: Duration,
    /// Not committed this long after the switch reverts it.
    pub deadline: Duration,
}

/// One health check with its schedule and thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What is checked.
    pub probe: Probe,
    /// Time between runs.
    pub interval: Duration,
    /// How long one run may take.
    pub timeout: Duration,
    /// Consecutive passes that make the check pass.
    pub success: u32,
    /// Consecutive failures that make the check fail.
    pub failure: u32,
    /// After a switch, failures before the check's first pass do not count
    /// for this long: a service is given time to start listening.
    pub start_period: Duration,
}

/// The default start period of a check.
pub const DEFAULT_START_PERIOD: Duration = Duration::from_secs(15);

/// What a check probes.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// An HTTP GET.
    Http {
        /// `http://host:port/path`.
        url: String,
        /// The expected status; `None` accepts any 2xx.
        status: Option<u16>,
        /// Text the body must contain.
        body_contains: Option<String>,
    },
    /// A TCP connect.
    Tcp {
        /// Where to connect.
        address: SocketAddr,
    },
    /// A command that must exit 0.
    Exec {
        /// Program and arguments.
        command: Vec<String>,
    },
    /// The unit is active and has not restarted since the switch.
    Systemd,
    /// The service's main process stays within bounds.
    Process {
        /// Largest resident set, in bytes.
        max_rss: Option<u64>,
        /// Largest CPU share, in percent of one core.
        max_cpu: Option<f64>,
    },
}

impl Probe {
    /// A short name for messages: `http http://…`, `tcp 127.0.0.1:80`.
    pub fn describe(&self) -> String {
        match self {
            Probe::Http { url, .. } => format!("http {url}"),
            Probe::Tcp { address } => format!("tcp {address}"),
            Probe::Exec { command } => format!("exec {}", command.join(" ")),
            Probe::Systemd => "systemd".into(),
            Probe::Process { .. } => "process".into(),
        }
    }
}

/// One thing wrong in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key path, e.g. `service[0].check[1].url`.
    pub path: String,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error(
        "cannot read the config {path}: {source}; pass --config FILE or set TURNOUT_AGENT_CONFIG"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML.
    #[error("the config {path} is not valid TOML: {detail}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        detail: String,
    },
    /// TOML with problems; all of them.
    #[error("the config {path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|err| match err {
            ParseError::Syntax(detail) => ConfigError::Syntax {
                path: path.to_owned(),
                detail,
            },
            ParseError::Invalid(problems) => ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            },
        })
    }

    /// Parses config text; see the module docs for the schema.
    pub fn parse(text: &str) -> Result<Config, ParseError> {
        let table: toml::Table = text
            .parse()
            .map_err(|err: toml::de::Error| ParseError::Syntax(err.to_string()))?;
        let mut problems = Vec::new();
        let config = read_config(&table, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ParseError::Invalid(problems))
        }
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name.as_str() == name)
    }
}

/// Why config text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not TOML.
    Syntax(String),
    /// Every problem found.
    Invalid(Vec<Problem>),
}

/// The keys of one table, with the ones read so far, to report the rest as unknown.
struct Fields<'a> {
    path: String,
    table: &'a toml::Table,
    known: Vec<&'static str>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> Fields<'a> {
    fn new(path: String, table: &'a toml::Table) -> Fields<'a> {
        Fields {
            path,
            table,
            known: Vec::new(),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<(String, &'a toml::Value)> {
        self.known.push(key);
        self.table
            .get(key)
            .map(|value| (join(&self.path, key), value))
    }

    fn finish(self, problems: &mut Vec<Problem>) {
        for key in self.table.keys() {
            if !self.known.contains(&key.as_str()) {
                problems.push(Problem {
                    path: join(&self.path, key),
                    message: format!("unknown key; expected one of: {}", self.known.join(", ")),
                });
            }
        }
    }
}

fn problem(problems: &mut Vec<Problem>, path: &str, message: impl Into<String>) {
    problems.push(Problem {
        path: path.to_owned(),
        message: message.into(),
    });
}

fn type_name(value: &toml::Value) -> &'static str {
    value.type_str()
}

fn string(
    problems: &mut Vec<Problem>,
    field: Option<(String, &toml::Value)>,
) -> Option<(String, String)> {
    let (path, value) = field?;
    match value.as_str() {
        Some(text) => Some((path, text.to_owned())),
        None => {
            problem(
                problems,
                &path,
                format!("expected a string, found {}", type_name(value)),
            );
            None
        }
    }
}

fn strings(
    problems: &mut Vec<Problem>,
    field: Option<(String, &toml::Value)>,
) -> Option<(String, Vec<String>)> {
    let (path, value) = field?;
    let items = value.as_array().and_then(|items| {
        items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
    });
    match items {
        Some(items) if !items.is_empty() => Some((path, items)),
        _ => {
            problem(
                problems,
                &path,
                format!(
                    "expected a non-empty array of strings, found {}",
                    type_name(value)
                ),
            );
            None
        }
    }
}

fn duration(
    problems: &mut Vec<Problem>,
    field: Option<(String, &toml::Value)>,
    default: Duration,
) -> Duration {
    duration_from(problems, field, default, false)
}

/// Like [`duration`], where zero means "none" (a check's start period).
fn duration_or_zero(
    problems: &mut Vec<Problem>,
    field: Option<(String, &toml::Value)>,
    default: Duration,
) -> Duration {
    duration_from(problems, field, default, true)
}

fn duration_from(
    problems: &mut Vec<Problem>,
    field: Option<(String, &toml::Value)>,
    default: Duration,
    zero_allowed: bool,
) -> Duration {
    let Some((path, text)) = string(problems, field) else {
        return default;
    };
    match humantime::parse_duration(&text) {
        Ok(d) if zero_allowed || !d.is_zero() => d,
        Ok(_) => {
            problem(
                problems,
                &path,
                "expected a duration above zero, like \"500ms\" or \"10s\"",
            );
            default
        }
        Err(err) => {
            problem(
                problems,
                &path,
                format!(
                    "expected a duration like \"500ms\", \"10s\" or \"2m\", found {text:?} ({err})"
                ),
            );
            default
        }
    }
}

fn count(problems: &mut Vec<Problem>, field: Option<(String, &toml::Value)>, default: u32) -> u32 {
    let Some((path, value)) = field else {
        return default;
    };
    match value.as_integer() {
        Some(n) if (1..=1000).contains(&n) => n as u32,
        _ => {
            problem(
                problems,
                &path,
                format!("expected a whole number from 1 to 1000, found {value}"),
            );
            default
        }
    }
}

fn table<'a>(
    problems: &mut Vec<Problem>,
    field: Option<(String, &'a toml::Value)>,
) -> Option<(String, &'a toml::Table)> {
    let (path, value) = field?;
    match value.as_table() {
        Some(t) => Some((path, t)),
        None => {
            problem(
                problems,
                &path,
                format!("expected a table, found {}", type_name(value)),
            );
            None
        }
    }
}

fn tables<'a>(
    problems: &mut Vec<Problem>,
    field: Option<(String, &'a toml::Value)>,
) -> Vec<(String, &'a toml::Table)> {
    let Some((path, value)) = field else {
        return Vec::new();
    };
    let Some(items) = value.as_array() else {
        problem(
            problems,
            &path,
            format!(
                "expected an array of tables ([[{path}]]), found {}",
                type_name(value)
            ),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        match item.as_table() {
            Some(t) => out.push((item_path, t)),
            None => problem(
                problems,
                &item_path,
                format!("expected a table, found {}", type_name(item)),
            ),
        }
    }
    out
}

fn read_config(root: &toml::Table, problems: &mut Vec<Problem>) -> Config {
    let mut fields = Fields::new(String::new(), root);
    let coordinator = string(problems, fields.get("coordinator")).and_then(|(path, url)| {
        if url.starts_with("http://") || url.starts_with("https://") {
            Some(url.trim_end_matches('/').to_owned())
        } else {
            problem(
                problems,
                &path,
                format!("expected an http:// or https:// URL, found {url:?}"),
            );
            None
        }
    });
    let state_dir = string(problems, fields.get("state_dir"))
        .map_or_else(|| PathBuf::from("/var/lib/turnout"), |(_, s)| s.into());
    let trust = string(problems, fields.get("trust")).map_or_else(
        || PathBuf::from("/etc/turnout/trust.json"),
        |(_, s)| s.into(),
    );
    let mut labels = BTreeMap::new();
    if let Some((path, t)) = table(problems, fields.get("labels")) {
        for (key, value) in t {
            match value.as_str() {
                Some(v) => {
                    labels.insert(key.clone(), v.to_owned());
                }
                None => problem(
                    problems,
                    &join(&path, key),
                    format!("expected a string label value, found {}", type_name(value)),
                ),
            }
        }
    }
    let deadline_field = fields.get("upgrade_deadline");
    let deadline_path = deadline_field.as_ref().map(|(path, _)| path.clone());
    let upgrade_deadline = duration(problems, deadline_field, DEFAULT_UPGRADE_DEADLINE);
    if upgrade_deadline < MIN_UPGRADE_DEADLINE
        && let Some(path) = deadline_path
    {
        problem(
            problems,
            &path,
            format!(
                "expected at least {}s: a new agent needs two watchdog timeouts up and a hello to the coordinator \
                 before it confirms itself, or every agent upgrade is reverted (default {}s)",
                MIN_UPGRADE_DEADLINE.as_secs(),
                DEFAULT_UPGRADE_DEADLINE.as_secs()
            ),
        );
    }
    let mut services = Vec::new();
    let mut names = BTreeSet::new();
    for (path, t) in tables(problems, fields.get("service")) {
        if let Some(service) = read_service(&path, t, problems) {
            if service.name.as_str() == crate::upgrade::SELF_SERVICE {
                problem(
                    problems,
                    &join(&path, "name"),
                    format!(
                        "{} is the agent itself (its own releases, see docs/operations.md); name the service otherwise",
                        crate::upgrade::SELF_SERVICE
                    ),
                );
            }
            if !names.insert(service.name.clone()) {
                problem(
                    problems,
                    &join(&path, "name"),
                    format!("service {} is configured twice", service.name),
                );
            }
            services.push(service);
        }
    }
    fields.finish(problems);
    Config {
        coordinator,
        state_dir,
        trust,
        labels,
        services,
        upgrade_deadline,
    }
}

fn read_service(path: &str, t: &toml::Table, problems: &mut Vec<Problem>) -> Option<ServiceConfig> {
    let mut fields = Fields::new(path.to_owned(), t);
    let name = match string(problems, fields.get("name")) {
        None => {
            if !t.contains_key("name") {
                problem(
                    problems,
                    &join(path, "name"),
                    "missing; every [[service]] needs a name",
                );
            }
            None
        }
        Some((p, name)) => match name.parse::<ServiceName>() {
            Ok(name) => Some(name),
            Err(err) => {
                problem(problems, &p, err.to_string());
                None
            }
        },
    };
    let kind = string(problems, fields.get("supervisor"));
    let unit = string(problems, fields.get("unit"));
    let exec = strings(problems, fields.get("exec"));
    let stop_timeout = duration(
        problems,
        fields.get("stop_timeout"),
        Duration::from_secs(10),
    );
    let supervisor = match kind.as_ref().map(|(p, k)| (p.as_str(), k.as_str())) {
        None | Some((_, "systemd")) => {
            if let Some((p, _)) = &exec {
                problem(
                    problems,
                    p,
                    "`exec` is for supervisor = \"exec\"; a systemd unit's ExecStart says what runs",
                );
            }
            for key in ["env", "environment_file", "working_directory"] {
                if let Some((p, _)) = fields.get(key) {
                    problem(
                        problems,
                        &p,
                        format!(
                            "`{key}` is for supervisor = \"exec\"; set it in the systemd unit (Environment=, EnvironmentFile=, WorkingDirectory=)"
                        ),
                    );
                }
            }
            let unit = unit
                .map(|(_, u)| u)
                .or_else(|| name.as_ref().map(|n| format!("{n}.service")));
            unit.map(|unit| SupervisorConfig::Systemd { unit })
        }
        Some((_, "exec")) => {
            if let Some((p, _)) = &unit {
                problem(problems, p, "`unit` is for supervisor = \"systemd\"");
            }
            let argv = exec.map(|(_, argv)| argv).unwrap_or_default();
            if let Some(program) = argv.first()
                && let Err(err) = PayloadPath::new(program)
            {
                problem(
                    problems,
                    &join(path, "exec"),
                    format!(
                        "the program must be a path inside the release (like \"bin/web\"): {err}"
                    ),
                );
            }
            let mut env = BTreeMap::new();
            if let Some((path, t)) = table(problems, fields.get("env")) {
                for (key, value) in t {
                    let valid_name = crate::supervisor::is_variable_name(key);
                    match value.as_str() {
                        Some(v) if valid_name && !v.contains('\0') => {
                            env.insert(key.clone(), v.to_owned());
                        }
                        Some(_) => problem(
                            problems,
                            &join(&path, key),
                            "expected a name of letters, digits and '_' not starting with a digit, and a value without NUL",
                        ),
                        None => problem(
                            problems,
                            &join(&path, key),
                            format!("expected a string, found {}", type_name(value)),
                        ),
                    }
                }
            }
            let environment_file =
                string(problems, fields.get("environment_file")).map(|(p, f)| {
                    if !Path::new(&f).is_absolute() {
                        problem(
                            problems,
                            &p,
                            format!("expected an absolute path, found {f:?}"),
                        );
                    }
                    PathBuf::from(f)
                });
            let working_directory =
                string(problems, fields.get("working_directory")).map(|(p, dir)| {
                    if !Path::new(&dir).is_absolute()
                        && let Err(err) = PayloadPath::new(&dir)
                    {
                        problem(
                            problems,
                            &p,
                            format!("expected an absolute path or one inside the release: {err}"),
                        );
                    }
                    dir
                });
            // Without an environment file, every `${NAME}` must be in `env`.
            if environment_file.is_none() {
                for (i, arg) in argv.iter().enumerate() {
                    for name in crate::supervisor::references(arg) {
                        if !env.contains_key(name) {
                            problem(
                                problems,
                                &format!("{}[{i}]", join(path, "exec")),
                                format!(
                                    "${{{name}}} is not set: add {name} to env, or set environment_file"
                                ),
                            );
                        }
                    }
                }
            }
            Some(SupervisorConfig::Exec {
                argv,
                stop_timeout,
                host: ExecHost {
                    env,
                    environment_file,
                    working_directory,
                },
            })
        }
        Some((p, other)) => {
            problem(
                problems,
                p,
                format!("expected \"systemd\" or \"exec\", found {other:?}"),
            );
            None
        }
    };
    let bake = match table(problems, fields.get("bake")) {
        Some((p, bt)) => {
            let mut bf = Fields::new(p, bt);
            let bake = Bake {
                min_healthy: duration(problems, bf.get("min_healthy"), Duration::from_secs(10)),
                deadline: duration(problems, bf.get("deadline"), Duration::from_secs(60)),
            };
            bf.finish(problems);
            bake
        }
        None => Bake {
            min_healthy: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
        },
    };
    if bake.min_healthy >= bake.deadline {
        problem(
            problems,
            &join(path, "bake"),
            format!(
                "min_healthy ({}) must be shorter than deadline ({}), or no release could ever commit",
                humantime::format_duration(bake.min_healthy),
                humantime::format_duration(bake.deadline)
            ),
        );
    }
    let checks = tables(problems, fields.get("check"))
        .into_iter()
        .filter_map(|(p, ct)| read_check(&p, ct, problems))
        .collect();
    fields.finish(problems);
    Some(ServiceConfig {
        name: name?,
        supervisor: supervisor?,
        bake,
        checks,
    })
}

/// The longest a check's probe may wait for an answer.
pub const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(60);

fn read_check(path: &str, t: &toml::Table, problems: &mut Vec<Problem>) -> Option<Check> {
    let mut fields = Fields::new(path.to_owned(), t);
    let interval = duration(problems, fields.get("interval"), Duration::from_secs(1));
    let timeout_field = fields.get("timeout");
    let timeout_path = timeout_field.as_ref().map(|(p, _)| p.clone());
    let timeout = duration(
        problems,
        timeout_field,
        interval.min(Duration::from_secs(5)),
    );
    if let Some(path) = timeout_path.filter(|_| timeout > MAX_CHECK_TIMEOUT) {
        problem(
            problems,
            &path,
            format!(
                "expected at most {}: a probe waited on that long holds every install and revert of the service, found {}",
                humantime::format_duration(MAX_CHECK_TIMEOUT),
                humantime::format_duration(timeout)
            ),
        );
    }
    let success = count(problems, fields.get("success"), 1);
    let failure = count(problems, fields.get("failure"), 3);
    let start_period = duration_or_zero(problems, fields.get("start_period"), DEFAULT_START_PERIOD);
    let kind = string(problems, fields.get("kind"));
    if kind.is_none() && !t.contains_key("kind") {
        problem(
            problems,
            &join(path, "kind"),
            "missing; expected one of http, tcp, exec, systemd, process",
        );
    }
    let probe = match kind.as_ref().map(|(p, k)| (p.as_str(), k.as_str())) {
        None => None,
        Some((_, "http")) => {
            let url = string(problems, fields.get("url"));
            let status = fields
                .get("status")
                .and_then(|(p, v)| match v.as_integer() {
                    Some(n @ 100..=599) => Some(n as u16),
                    _ => {
                        problem(
                            problems,
                            &p,
                            format!("expected an HTTP status from 100 to 599, found {v}"),
                        );
                        None
                    }
                });
            let body_contains = string(problems, fields.get("body_contains")).map(|(_, s)| s);
            match url {
                Some((p, url)) => match health_url(&url) {
                    Err(why) => {
                        problem(problems, &p, why);
                        None
                    }
                    Ok(url) => Some(Probe::Http {
                        url,
                        status,
                        body_contains,
                    }),
                },
                None => {
                    if !t.contains_key("url") {
                        problem(
                            problems,
                            &join(path, "url"),
                            "missing; an http check needs a url",
                        );
                    }
                    None
                }
            }
        }
        Some((_, "tcp")) => match string(problems, fields.get("address")) {
            Some((p, text)) => match text.parse::<SocketAddr>() {
                Ok(address) => Some(Probe::Tcp { address }),
                Err(_) => {
                    problem(
                        problems,
                        &p,
                        format!(
                            "expected an IP address and port like \"127.0.0.1:8080\", found {text:?}"
                        ),
                    );
                    None
                }
            },
            None => {
                problem(
                    problems,
                    &join(path, "address"),
                    "missing; a tcp check needs an address",
                );
                None
            }
        },
        Some((_, "exec")) => match strings(problems, fields.get("command")) {
            Some((_, command)) => Some(Probe::Exec { command }),
            None => {
                if !t.contains_key("command") {
                    problem(
                        problems,
                        &join(path, "command"),
                        "missing; an exec check needs a command",
                    );
                }
                None
            }
        },
        Some((_, "systemd")) => Some(Probe::Systemd),
        Some((_, "process")) => {
            let max_rss = string(problems, fields.get("max_rss")).and_then(|(p, text)| {
                match parse_bytes(&text) {
                    Some(n) => Some(n),
                    None => {
                        problem(
                            problems,
                            &p,
                            format!("expected a size like \"256MiB\" or \"1GiB\", found {text:?}"),
                        );
                        None
                    }
                }
            });
            let max_cpu = fields.get("max_cpu").and_then(|(p, v)| {
                match v.as_float().or(v.as_integer().map(|n| n as f64)) {
                    Some(n) if n > 0.0 => Some(n),
                    _ => {
                        problem(
                            problems,
                            &p,
                            format!("expected a percentage of one core above 0, found {v}"),
                        );
                        None
                    }
                }
            });
            Some(Probe::Process { max_rss, max_cpu })
        }
        Some((p, other)) => {
            problem(
                problems,
                p,
                format!("expected one of http, tcp, exec, systemd, process; found {other:?}"),
            );
            None
        }
    };
    fields.finish(problems);
    Some(Check {
        probe: probe?,
        interval,
        timeout,
        success,
        failure,
        start_period,
    })
}

/// `256MiB`, `1GiB`, `512KiB`, `1000000`.
fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(scale)
}

#[cfg(test)]
mod fuzz {
    //! The config reader against arbitrary and mutated text: it reports
    //! problems, and never panics.

    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../../systemd/agent.toml.example");

    fn cases() -> u32 {
        std::env::var("FUZZ_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_is_reported_not_a_panic(text in "\\PC{0,400}") {
            let _ = super::Config::parse(&text);
        }

        #[test]
        fn mutated_examples_are_reported_not_a_panic(
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), "[\\PC\n]{0,8}", 0usize..16), 1..6),
        ) {
            let mut text = EXAMPLE.to_owned();
            for (at, insert, remove) in edits {
                let mut i = at.index(text.len().max(1)).min(text.len());
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                let mut end = (i + remove).min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.replace_range(i..end, &insert);
            }
            let _ = super::Config::parse(&text);
        }
    }

    #[test]
    fn the_example_is_valid() {
        super::Config::parse(EXAMPLE).unwrap();
    }
}

/// A health check's URL, checked and written out in full: `http://` only
/// (health endpoints are local), a host, the port (80 when not given) and
/// a path (`/` when not given). A URL that could never be probed is
/// refused here, with why, instead of failing every probe after a switch.
pub fn health_url(url: &str) -> Result<String, String> {
    let expected = "expected http://HOST[:PORT]/PATH (health checks are local; no https)";
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|err| format!("{expected}, found {url:?} ({err})"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{expected}, found {url:?}"));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{expected}, found {url:?} (no host)"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "{expected}, found {url:?} (credentials in a health URL are not supported)"
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("{expected}, found {url:?} (no host)"));
    }
    let raw = url["http://".len()..]
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    let port = match raw.rsplit_once(':').filter(|(_, p)| !p.contains(']')) {
        None => 80,
        Some((_, "")) => return Err(format!("{expected}, found {url:?} (an empty port)")),
        Some((_, text)) => match text.parse::<u16>() {
            Ok(0) => return Err(format!("{expected}, found {url:?} (port 0)")),
            Ok(port) => port,
            Err(_) => {
                return Err(format!(
                    "{expected}, found {url:?} (the port is not a number from 1 to 65535)"
                ));
            }
        },
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok(format!("http://{}:{port}{path}", authority.host()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_deadline_that_would_revert_every_agent_and_the_agents_own_name_are_refused() {
        let err =
            Config::parse("upgrade_deadline = \"4s\"\n[[service]]\nname = \"turnout-agent\"\n")
                .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!("{err:?}")
        };
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|p| p.starts_with("upgrade_deadline") && p.contains("expected at least 15s")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|p| p.starts_with("service[0].name")
                && p.contains("turnout-agent is the agent itself")),
            "{text:?}"
        );
        let config = Config::parse("upgrade_deadline = \"5m\"\n").unwrap();
        assert_eq!(config.upgrade_deadline, Duration::from_secs(300));
        assert_eq!(
            Config::parse("").unwrap().upgrade_deadline,
            DEFAULT_UPGRADE_DEADLINE
        );
    }

    #[test]
    fn the_design_example_parses() {
        let config = Config::parse(
            r#"
            coordinator = "http://10.0.0.5:7400"
            state_dir = "/var/lib/turnout"
            trust = "/etc/turnout/trust.json"
            labels = { region = "eu-1", role = "web" }

            [[service]]
            name = "web"
            supervisor = "systemd"
            unit = "web.service"
            [service.bake]
            min_healthy = "10s"
            deadline = "60s"
            [[service.check]]
            kind = "http"
            url = "http://127.0.0.1:8080/healthz"
            interval = "1s"
            "#,
        )
        .unwrap();
        assert_eq!(config.labels["role"], "web");
        let web = config.service("web").unwrap();
        assert_eq!(
            web.supervisor,
            SupervisorConfig::Systemd {
                unit: "web.service".into()
            }
        );
        assert_eq!(web.checks[0].failure, 3);
        assert_eq!(web.bake.deadline, Duration::from_secs(60));
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key_path() {
        let err = Config::parse(
            r#"
            coordinatr = "http://x"
            [[service]]
            name = "../web"
            supervisor = "docker"
            [service.bake]
            min_healthy = "ten seconds"
            [[service.check]]
            kind = "http"
            url = "https://example.com/"
            [[service.check]]
            kind = "tcp"
            address = "localhost"
            failure = 0
            [[service.check]]
            interval = "1s"
            "#,
        )
        .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!("{err:?}")
        };
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "coordinatr",
            "service[0].name",
            "service[0].supervisor",
            "service[0].bake.min_healthy",
            "service[0].check[0].url",
            "service[0].check[1].address",
            "service[0].check[1].failure",
            "service[0].check[2].kind",
        ] {
            assert!(paths.contains(&expected), "{expected} not in {paths:?}");
        }
        let unknown = problems.iter().find(|p| p.path == "coordinatr").unwrap();
        assert!(
            unknown
                .message
                .contains("unknown key; expected one of: coordinator"),
            "{}",
            unknown.message
        );
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let err = Config::parse("[[service]\nname = 1").unwrap_err();
        let ParseError::Syntax(detail) = err else {
            panic!()
        };
        assert!(detail.contains("line 1"), "{detail}");
    }

    #[test]
    fn exec_supervisor_and_checks() {
        let config = Config::parse(
            r#"
            [[service]]
            name = "api"
            supervisor = "exec"
            exec = ["bin/api", "--port", "9000"]
            [[service.check]]
            kind = "process"
            max_rss = "64MiB"
            max_cpu = 50
            "#,
        )
        .unwrap();
        let api = &config.services[0];
        assert!(
            matches!(&api.supervisor, SupervisorConfig::Exec { argv, .. } if argv[0] == "bin/api")
        );
        assert_eq!(
            api.checks[0].probe,
            Probe::Process {
                max_rss: Some(64 << 20),
                max_cpu: Some(50.0)
            }
        );
    }

    /// Found by attacking: agent.md says `start_period = "0s"` counts every
    /// failure from the first probe, and the config refused it.
    #[test]
    fn a_start_period_of_zero_is_allowed_and_the_default_is_documented() {
        let config = Config::parse(
            r#"
            [[service]]
            name = "api"
            [[service.check]]
            kind = "tcp"
            address = "127.0.0.1:9000"
            start_period = "0s"
            [[service.check]]
            kind = "tcp"
            address = "127.0.0.1:9001"
            "#,
        )
        .unwrap();
        let checks = &config.services[0].checks;
        assert_eq!(checks[0].start_period, Duration::ZERO);
        assert_eq!(checks[1].start_period, DEFAULT_START_PERIOD);
    }

    #[test]
    fn a_check_timeout_over_a_minute_is_refused_by_its_key() {
        for timeout in ["61s", "18446744073709551615s"] {
            let err = Config::parse(&format!(
                "[[service]]\nname = \"w\"\n[[service.check]]\nkind = \"tcp\"\naddress = \"127.0.0.1:1\"\ntimeout = \"{timeout}\"\n"
            ))
            .unwrap_err();
            let ParseError::Invalid(problems) = err else {
                panic!("{timeout}")
            };
            let problem = problems
                .iter()
                .find(|p| p.path == "service[0].check[0].timeout")
                .unwrap_or_else(|| panic!("{timeout}: {problems:?}"));
            assert!(
                problem.message.contains("expected at most 1m"),
                "{problem:?}"
            );
        }
        Config::parse("[[service]]\nname = \"w\"\n[[service.check]]\nkind = \"tcp\"\naddress = \"127.0.0.1:1\"\ntimeout = \"60s\"\n")
            .unwrap();
    }

    #[test]
    fn a_bake_that_can_never_commit_is_refused() {
        let err = Config::parse(
            "[[service]]\nname = \"w\"\n[service.bake]\nmin_healthy = \"2m\"\ndeadline = \"1m\"\n",
        )
        .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!()
        };
        assert!(
            problems[0]
                .message
                .contains("must be shorter than deadline"),
            "{problems:?}"
        );
    }

    #[test]
    fn health_urls_get_their_default_port_and_path_or_a_reason() {
        assert_eq!(
            health_url("http://127.0.0.1/healthz").unwrap(),
            "http://127.0.0.1:80/healthz"
        );
        assert_eq!(
            health_url("http://localhost").unwrap(),
            "http://localhost:80/"
        );
        assert_eq!(
            health_url("http://127.0.0.1:8080/h?full=1").unwrap(),
            "http://127.0.0.1:8080/h?full=1"
        );
        assert_eq!(health_url("http://[::1]:81/").unwrap(), "http://[::1]:81/");
        for (bad, says) in [
            ("https://127.0.0.1/healthz", "no https"),
            ("127.0.0.1:8080/healthz", "found"),
            ("http:///healthz", "found"),
            ("http://127.0.0.1:0/", "port 0"),
            ("http://127.0.0.1:/", "empty port"),
            ("http://u:p@127.0.0.1/", "credentials"),
            ("http://127.0.0.1:99999/", "found"),
        ] {
            let err = health_url(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
            assert!(
                err.contains("expected http://HOST[:PORT]/PATH"),
                "{bad}: {err}"
            );
        }
    }
}
