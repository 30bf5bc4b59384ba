//! The embedded engine's flags, shared by the commands that run a
//! long-lived instance: `--set NAME=VALUE` (PostgreSQL settings, as
//! `postgres -c NAME=VALUE` gives them to a server) and
//! `--maintenance-interval` (autovacuum's and the checkpointer's jobs,
//! which the engine cannot do itself: see [`pglite_cache::maintenance`]).

use std::time::Duration;

use pglite_cache::maintenance::Maintenance;
use pglite_cache::{Instance, InstanceOptions};

/// Engine settings flags, shared by the commands that run a long-lived instance.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// A PostgreSQL setting for the embedded engine, applied at its start
    /// like `postgres -c` (repeatable), e.g. `--set shared_buffers=256MB`.
    /// The environment variable holds one (values may contain commas).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_setting, env = "PGLITE_CACHE_SET")]
    settings: Vec<(String, String)>,
    /// Seconds between checks for tables to VACUUM and ANALYZE, with
    /// autovacuum's default thresholds, and for a CHECKPOINT (the engine
    /// has no autovacuum or checkpointer of its own); 0 turns it off.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, env = "PGLITE_CACHE_MAINTENANCE_INTERVAL")]
    maintenance_interval: u64,
}

impl EngineArgs {
    /// `options` with `defaults` (the command's own) and then the flags
    /// applied: a flag overrides a default of the same name.
    pub fn apply(&self, defaults: &[(&str, &str)], mut options: InstanceOptions) -> InstanceOptions {
        for (name, value) in defaults {
            options = options.setting(*name, *value);
        }
        for (name, value) in &self.settings {
            options = options.setting(name, value);
        }
        options
    }

    /// Starts the instance's maintenance, unless turned off; it stops when
    /// the returned value is dropped.
    pub fn maintain(&self, instance: &Instance) -> Option<Maintenance> {
        (self.maintenance_interval > 0)
            .then(|| Maintenance::start(instance.clone(), Duration::from_secs(self.maintenance_interval)))
    }
}

/// `NAME=VALUE`, with a name as PostgreSQL spells settings (letters,
/// digits, `_`, and `.` for an extension's).
fn parse_setting(arg: &str) -> Result<(String, String), String> {
    let (name, value) = arg.split_once('=').ok_or_else(|| format!("expected NAME=VALUE, got {arg:?}"))?;
    let name = name.trim();
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    if name.is_empty() || !name.chars().all(valid) {
        return Err(format!("{name:?} is not a setting name (letters, digits, _ and .)"));
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::parse_setting;

    #[test]
    fn settings_parse_like_postgres_dash_c() {
        assert_eq!(parse_setting("shared_buffers=256MB"), Ok(("shared_buffers".into(), "256MB".into())));
        assert_eq!(parse_setting("Work_Mem = 8MB"), Ok(("work_mem".into(), "8MB".into())));
        assert_eq!(parse_setting("search_path=a,b"), Ok(("search_path".into(), "a,b".into())));
        assert_eq!(parse_setting("app.flag=x=y"), Ok(("app.flag".into(), "x=y".into())));
        assert!(parse_setting("shared_buffers").unwrap_err().contains("NAME=VALUE"));
        assert!(parse_setting("=1").is_err());
        assert!(parse_setting("bad name=1").is_err());
    }
}
