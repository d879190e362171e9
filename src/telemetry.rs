//! Logging: tracing to stderr (text or JSON), optionally also appended to a file.

use crate::config::LogFormat;
use std::io::IsTerminal;
use std::path::Path;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// The logging flags a helper process started by this one should get, so that its lines go
/// where ours go, in the same format (set by [`init`]).
static CHILD_ARGS: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();

pub fn child_args() -> Vec<std::ffi::OsString> {
    CHILD_ARGS.get().cloned().unwrap_or_default()
}

/// Colour codes only for a person at a terminal: not into files, pipes or journald, and not when
/// `NO_COLOR` is set (<https://no-color.org>).
fn colour(stderr_is_terminal: bool) -> bool {
    stderr_is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub fn init(level: &str, format: LogFormat, file: Option<&Path>) -> anyhow::Result<()> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--log-format".into(),
        match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .into(),
    ];
    if let Some(f) = file {
        args.push("--log-file".into());
        args.push(f.into());
    }
    let _ = CHILD_ARGS.set(args);
    let filter = || EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour(std::io::stderr().is_terminal()))
            .with_target(false)
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    let file_layer = match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            let f = std::sync::Arc::new(f);
            Some(match format {
                LogFormat::Text => tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(f)
                    .with_filter(filter())
                    .boxed(),
                LogFormat::Json => tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(f)
                    .with_filter(filter())
                    .boxed(),
            })
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Files, pipes and journald get plain text; a terminal gets colour unless NO_COLOR is set
    /// (the test does not set it, and the environment of `cargo test` has no reason to).
    #[test]
    fn colour_only_on_a_terminal() {
        assert!(!super::colour(false));
        if std::env::var_os("NO_COLOR").is_none() {
            assert!(super::colour(true));
        }
    }
}
