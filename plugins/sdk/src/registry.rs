//! Building plugins from the config: an explicit registry `name → constructor`.

use crate::plugin::Plugin;
use crate::services::{AccountLookup, KeyLookup};
use serde::de::DeserializeOwned;
use std::fmt;
use std::sync::Arc;

/// A plugin's `settings:` block from the config, as JSON.
pub type PluginSettings = serde_json::Value;

/// One problem in the config, with where it is (`plugins[1].settings.keys[0].key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub path: String,
    pub message: String,
}

impl ConfigIssue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigIssue {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The same issue, seen from an enclosing path.
    pub fn under(mut self, prefix: &str) -> Self {
        self.path = match (prefix.is_empty(), self.path.is_empty()) {
            (true, _) => self.path,
            (false, true) => prefix.to_owned(),
            (false, false) if self.path.starts_with('[') => format!("{prefix}{}", self.path),
            (false, false) => format!("{prefix}.{}", self.path),
        };
        self
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// What the engine lends to plugins: handles to its services. Plugins never reach into the
/// engine otherwise. A handle is `None` when the gateway runs without a store.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct PluginServices {
    pub keys: Option<Arc<dyn KeyLookup>>,
    pub accounts: Option<Arc<dyn AccountLookup>>,
}

impl PluginServices {
    pub fn new(keys: Option<Arc<dyn KeyLookup>>, accounts: Option<Arc<dyn AccountLookup>>) -> Self {
        PluginServices { keys, accounts }
    }
}

/// Builds a plugin from its settings, or lists everything wrong with them.
pub type PluginConstructor = fn(&PluginSettings, &PluginServices) -> Result<Arc<dyn Plugin>, Vec<ConfigIssue>>;

/// The plugins the engine knows, by the name the config uses.
#[derive(Default, Clone)]
pub struct PluginRegistry {
    entries: Vec<(&'static str, PluginConstructor)>,
}

impl PluginRegistry {
    pub fn new() -> Self {
        PluginRegistry::default()
    }

    /// Add a plugin kind. A later registration of the same name replaces the earlier one.
    pub fn register(&mut self, name: &'static str, constructor: PluginConstructor) -> &mut Self {
        self.entries.retain(|(n, _)| *n != name);
        self.entries.push((name, constructor));
        self
    }

    pub fn get(&self, name: &str) -> Option<PluginConstructor> {
        self.entries.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.entries.iter().map(|(n, _)| *n)
    }
}

/// Deserialize a plugin's settings into its config struct, reporting every unknown key and the
/// first type error, each with its path. Config structs should not use
/// `deny_unknown_fields`: unknown keys are collected here so that all of them are reported.
pub fn settings_from<T: DeserializeOwned>(settings: &PluginSettings) -> Result<T, Vec<ConfigIssue>> {
    let null = serde_json::Value::Object(Default::default());
    let settings = if settings.is_null() { &null } else { settings };
    let mut issues = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| {
        let mut out = String::new();
        write_path(&path, &mut out);
        issues.push(ConfigIssue::new(out, "unknown key"));
    };
    let result = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(settings, &mut on_unknown));
    match result {
        Ok(value) if issues.is_empty() => Ok(value),
        Ok(_) => Err(issues),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            issues.push(ConfigIssue::new(path, e.into_inner().to_string()));
            Err(issues)
        }
    }
}

/// `keys[0].name`, the notation `serde_path_to_error` uses, for a `serde_ignored` path.
fn write_path(path: &serde_ignored::Path<'_>, out: &mut String) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            write_path(parent, out);
            out.push_str(&format!("[{index}]"));
        }
        Path::Map { parent, key } => {
            write_path(parent, out);
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            write_path(parent, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Settings {
        keys: Vec<Key>,
    }
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Key {
        name: String,
    }

    #[test]
    fn reports_every_unknown_key_with_its_path() {
        let v = serde_json::json!({"keys": [{"name": "a", "nmae": 1}, {"name": "b", "x": 2}], "y": 3});
        let issues = settings_from::<Settings>(&v).unwrap_err();
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["keys[0].nmae", "keys[1].x", "y"]);
    }

    #[test]
    fn reports_type_errors_with_their_path() {
        let v = serde_json::json!({"keys": [{"name": 5}]});
        let issues = settings_from::<Settings>(&v).unwrap_err();
        assert_eq!(issues[0].path, "keys[0].name");
        assert!(issues[0].message.contains("invalid type"), "{}", issues[0].message);
    }

    #[test]
    fn issue_paths_nest() {
        let i = ConfigIssue::new("keys[0].name", "x").under("plugins[2].settings");
        assert_eq!(i.path, "plugins[2].settings.keys[0].name");
        assert_eq!(ConfigIssue::new("[1]", "x").under("providers").path, "providers[1]");
    }
}
