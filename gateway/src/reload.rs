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

/// What main keeps for reloads.
pub struct Reloader {
    pub cli: Cli,
    /// The config the process started with: what restart-only settings are compared with.
    pub started: Config,
    /// The last config loaded (at start or by a reload): what "applied" is reported against.
    pub last: Config,
    pub set_log: SetLog,
}

/// What one reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub applied: Vec<String>,
    pub need_restart: Vec<String>,
}

impl Reloader {
    pub fn new(cli: Cli, cfg: &Config, set_log: SetLog) -> Reloader {
        Reloader { cli, started: cfg.clone(), last: cfg.clone(), set_log }
    }

    /// Runs on: main, on SIGHUP.
    pub fn reload(&mut self, shared: &Shared) -> anyhow::Result<Outcome> {
        let new = self.cli.load()?;
        let reloadable = |p: &String| RELOADABLE.contains(&p.as_str());
        let out = Outcome {
            applied: changed(&self.last, &new).into_iter().filter(reloadable).collect(),
            need_restart: changed(&self.started, &new).into_iter().filter(|p| !reloadable(p)).collect(),
        };
        // Every reloadable setting is taken from the new file, changed or not.
        if std::env::var_os(crate::LOG_ENV).is_none() {
            (self.set_log)(&new.log)?;
        } else if out.applied.iter().any(|p| p == "log") {
            tracing::warn!("log: {} is set and wins over the file; unchanged", crate::LOG_ENV);
        }
        shared.rates.set(&new.limits);
        self.last = new;
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
