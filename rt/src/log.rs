//! Logging for both daemons, on `tracing`: events with levels and fields
//! (`service`, `release`, `rollout`, `host`) inside spans (one per install,
//! rollback and rollout step), written to stderr, which journald keeps.
//!
//! Two forms (`--log-format`):
//! - `text` (the default): one line per event, `LEVEL message key=value…`
//!   with the spans' fields, no colours and no timestamp (journald stamps
//!   each line). Under systemd (`$JOURNAL_STREAM` set) each line starts
//!   with its syslog priority, `<3>` to `<7>`, so `journalctl -p warning`
//!   filters by level.
//! - `json`: one object per line: `timestamp` (RFC 3339, UTC), `level`,
//!   `message`, the event's fields, `target` (the module), and `spans`
//!   (outermost first, each with its name and fields).
//!
//! Which events are written is set by `TURNOUT_LOG` (or `RUST_LOG`) in the
//! `RUST_LOG` form without regular expressions: `info` (the default),
//! `debug`, `warn,turnout_agent=debug`, `ureq=debug`. Records of crates
//! that use the `log` facade (ureq) are written the same way.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The form log lines take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `INFO message key=value`, journald-friendly.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message, fields, spans.
    Json,
}

/// The filter when neither `TURNOUT_LOG` nor `RUST_LOG` is set: this
/// project at `info`, the HTTP client's chatter only from `warn`.
pub const DEFAULT_FILTER: &str = "info,ureq=warn,ureq_proto=warn,rustls=warn";

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "{variable}={value:?} is not a log filter ({reason}); expected e.g. `info`, `debug` or `warn,turnout_agent=debug`"
)]
pub struct BadFilter {
    /// The variable it came from.
    pub variable: &'static str,
    /// What it held.
    pub value: String,
    /// What the parser said.
    pub reason: String,
}

/// The filter from the environment: `TURNOUT_LOG`, else `RUST_LOG`, else
/// [`DEFAULT_FILTER`].
pub fn filter_from_env() -> Result<Targets, BadFilter> {
    for variable in ["TURNOUT_LOG", "RUST_LOG"] {
        if let Ok(value) = std::env::var(variable)
            && !value.trim().is_empty()
        {
            return value
                .parse()
                .map_err(|err: tracing_subscriber::filter::ParseError| BadFilter {
                    variable,
                    value,
                    reason: err.to_string(),
                });
        }
    }
    Ok(DEFAULT_FILTER.parse().expect("the default filter parses"))
}

/// Sets up logging for the rest of the process. A second call does
/// nothing (tests call it once per process). A bad filter is reported as
/// a warning in the chosen format (a JSON line in JSON, with its priority
/// under journald) and the default is used: a typo must not silence a daemon.
pub fn init(format: LogFormat) {
    let (filter, bad) = match filter_from_env() {
        Ok(filter) => (filter, None),
        Err(err) => (
            DEFAULT_FILTER.parse().expect("the default filter parses"),
            Some(err),
        ),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .event_format(Text {
                        priorities: std::env::var_os("JOURNAL_STREAM").is_some(),
                    }),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true)
                    .with_timer(tracing_subscriber::fmt::time::SystemTime),
            )
            .try_init(),
    };
    if let Some(err) = bad {
        tracing::warn!("{err}; using {DEFAULT_FILTER:?}");
    }
}

/// The text form: `[<N>]LEVEL message fields (span fields)`.
struct Text {
    /// Whether to start each line with its syslog priority, for journald.
    priorities: bool,
}

/// The syslog priority journald files a level under.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = event.metadata().level();
        if self.priorities {
            write!(writer, "<{}>", priority(level))?;
        }
        write!(writer, "{level:>5} ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, " {fields}")?;
                }
            }
        }
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, for reading what was logged.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(priorities: bool, filter: &str, log: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(filter.parse::<Targets>().unwrap())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .with_ansi(false)
                    .event_format(Text { priorities }),
            );
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn text_lines_carry_level_message_fields_and_the_spans_fields() {
        let text = logged(false, "info", || {
            let span = tracing::info_span!("install", service = "web");
            let _in = span.enter();
            tracing::warn!(release = "web@2.0.0", "check 1 started failing");
            tracing::debug!("filtered out at info");
        });
        assert_eq!(
            text,
            " WARN check 1 started failing release=\"web@2.0.0\" service=\"web\"\n"
        );
    }

    #[test]
    fn under_journald_each_line_starts_with_its_priority() {
        let text = logged(true, "debug", || {
            tracing::error!("e");
            tracing::info!("i");
            tracing::debug!("d");
        });
        assert_eq!(text, "<3>ERROR e\n<6> INFO i\n<7>DEBUG d\n");
    }

    #[test]
    fn a_bad_filter_names_the_variable_and_what_is_expected() {
        let value = "info,turnout_agent=loud";
        let err = value.parse::<Targets>().map(drop).unwrap_err();
        let text = BadFilter {
            variable: "TURNOUT_LOG",
            value: value.into(),
            reason: err.to_string(),
        }
        .to_string();
        assert!(
            text.starts_with("TURNOUT_LOG=\"info,turnout_agent=loud\" is not a log filter"),
            "{text}"
        );
        assert!(text.contains("expected e.g. `info`"), "{text}");
    }

    #[test]
    fn the_default_filter_parses_and_levels_map_to_syslog_priorities() {
        let _: Targets = DEFAULT_FILTER.parse().unwrap();
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }
}
