//! SIGHUP: read the config file again and apply what is safe to change under
//! load (the log filter, the request rate limits); every other change is
//! reported as needing a restart (a log line, `switchboard_config_restart_pending`)
//! and left alone. A file that does not parse or validate changes nothing.

use crate::config::{Cli, Config};
use crate::node::Shared;

/// Settings a SIGHUP applies to the running process (dotted paths in the file).
pub const RELOADABLE: &[&str] = &[
    "log",
    "limits.send_per_sec",
    "limits.send_burst",
    "limits.typing_per_sec",
    "limits.typing_burst",
    "limits.receipts_per_sec",
    "limits.receipts_burst",
    "limits.edits_per_sec",
    "limits.edits_burst",
    "limits.groups_per_sec",
    "limits.groups_burst",
    "limits.settings_per_sec",
    "limits.settings_burst",
    "limits.reads_per_sec",
    "limits.reads_burst",
    "limits.pings_per_sec",
    "limits.pings_burst",
    "limits.abuse_budget",
];

/// The settings (dotted paths) whose values differ between `a` and `b`.
pub fn changed(a: &Config, b: &Config) -> Vec<String> {
    let (a, b) = (toml::Value::try_from(a), toml::Value::try_from(b));
    let (Ok(a), Ok(b)) = (a, b) else { return vec!["(the whole config)".into()] };
    let mut out = Vec::new();
    diff("", Some(&a), Some(&b), &mut out);
    out
}

fn diff(path: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
    match (a, b) {
        (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                diff(&p, a.get(k), b.get(k), out);
            }
        }
        (a, b) if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

/// Sets the process's log filter.
pub type SetLog = Box<dyn Fn(&str) -> anyhow::Result<()> + Send>;

/// What main keeps for reloads: the settings in force.
pub struct Reloader {
    pub cli: Cli,
    /// The config in force: the start's, with every reload's applied settings.
    pub current: Config,
    pub set_log: SetLog,
}

/// What one reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub applied: Vec<String>,
    pub need_restart: Vec<String>,
}

impl Reloader {
    /// Runs on: main, on SIGHUP.
    pub fn reload(&mut self, shared: &Shared) -> anyhow::Result<Outcome> {
        let new = self.cli.load()?;
        let mut out = Outcome::default();
        for path in changed(&self.current, &new) {
            if RELOADABLE.contains(&path.as_str()) {
                out.applied.push(path);
            } else {
                out.need_restart.push(path);
            }
        }
        if out.applied.iter().any(|p| p == "log") {
            if std::env::var_os(crate::LOG_ENV).is_some() {
                tracing::warn!("log: {} is set and wins over the file; unchanged", crate::LOG_ENV);
            } else {
                (self.set_log)(&new.log)?;
                self.current.log = new.log.clone();
            }
        }
        if out.applied.iter().any(|p| p.starts_with("limits.")) {
            shared.rates.set(&new.limits);
            let l = &mut self.current.limits;
            let n = &new.limits;
            (l.send_per_sec, l.send_burst) = (n.send_per_sec, n.send_burst);
            (l.typing_per_sec, l.typing_burst) = (n.typing_per_sec, n.typing_burst);
            (l.receipts_per_sec, l.receipts_burst) = (n.receipts_per_sec, n.receipts_burst);
            (l.edits_per_sec, l.edits_burst) = (n.edits_per_sec, n.edits_burst);
            (l.groups_per_sec, l.groups_burst) = (n.groups_per_sec, n.groups_burst);
            (l.settings_per_sec, l.settings_burst) = (n.settings_per_sec, n.settings_burst);
            (l.reads_per_sec, l.reads_burst) = (n.reads_per_sec, n.reads_burst);
            (l.pings_per_sec, l.pings_burst) = (n.pings_per_sec, n.pings_burst);
            l.abuse_budget = n.abuse_budget;
        }
        debug_assert!(
            changed(&self.current, &new).iter().all(|p| !RELOADABLE.contains(&p.as_str()) || p == "log"),
            "every reloadable setting is copied into `current`"
        );
        Ok(out)
    }

    /// Reloads and reports it: log lines and metrics.
    ///
    /// Runs on: main, on SIGHUP.
    pub fn reload_and_report(&mut self, shared: &Shared) {
        let m = &shared.metrics;
        match self.reload(shared) {
            // The metrics after the log lines: once a reload shows in `/metrics`, its lines are written.
            Ok(o) => {
                tracing::info!(applied = ?o.applied, "config reloaded (SIGHUP)");
                if !o.need_restart.is_empty() {
                    tracing::warn!(settings = ?o.need_restart, "these changed settings take effect only on a restart");
                }
                m.config_restart_pending.set(o.need_restart.len() as i64);
                m.config_reloads.with_label_values(&["applied"]).inc();
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "config reload (SIGHUP) failed; nothing changed");
                m.config_reloads.with_label_values(&["failed"]).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_names_each_differing_leaf() {
        let a = Config::default();
        let mut b = a.clone();
        b.limits.send_burst = std::num::NonZeroU32::new(7).unwrap();
        b.node_id = 3;
        b.metrics_listen = Some("127.0.0.1:9".parse().unwrap());
        assert_eq!(changed(&a, &b), ["limits.send_burst", "metrics_listen", "node_id"]);
        assert!(changed(&a, &a.clone()).is_empty());
    }

    #[test]
    fn every_reloadable_setting_exists() {
        let v = toml::Value::try_from(Config::default()).unwrap();
        for path in RELOADABLE {
            let mut at = &v;
            for k in path.split('.') {
                at = at.get(k).unwrap_or_else(|| panic!("{path} is not a setting"));
            }
        }
    }
}
