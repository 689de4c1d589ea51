//! Komilion's built-in plugins, one file each. Each has its own settings struct, validated
//! when the chain is built, and is registered by name in [`builtin_registry`].

pub mod jwt_auth;
pub mod key_auth;
pub mod rate_limit;
pub mod request_id;
pub mod static_key_auth;

use komilion_sdk::{ConfigIssue, PluginRegistry, PluginSettings};

/// The registry of every built-in plugin, by the name the config's `plugins:` list uses.
pub fn builtin_registry() -> PluginRegistry {
    let mut registry = PluginRegistry::new();
    registry
        .register(request_id::NAME, request_id::RequestIdHeaders::build)
        .register(static_key_auth::NAME, static_key_auth::StaticKeyAuth::build)
        .register(key_auth::NAME, key_auth::KeyAuth::build)
        .register(jwt_auth::NAME, jwt_auth::JwtAuth::build)
        .register(rate_limit::NAME, rate_limit::RateLimit::build);
    registry
}

/// What `komilion check` warns about in a built-in plugin's settings: choices that work but are
/// likely not what the operator wants. Paths are relative to the plugin's `settings`.
pub fn settings_warnings(name: &str, settings: &PluginSettings) -> Vec<ConfigIssue> {
    match name {
        jwt_auth::NAME => jwt_auth::warnings(settings),
        _ => Vec::new(),
    }
}
