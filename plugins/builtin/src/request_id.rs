//! `request_id`: tells the client which request this was, what was decided for it and what the
//! gateway cost it.
//!
//! Adds to every response `x-komilion-request-id` (the id of the usage record, for support
//! tickets), `x-komilion-overhead-us` (time spent in the gateway itself, excluding the upstream
//! and the client's upload, up to the moment the response header was written) and, once they
//! are known, the routing decision: `x-komilion-task`, `x-komilion-model`, `x-komilion-provider`.

use komilion_sdk::{settings_from, ConfigIssue, Exchange, Hooks, Plugin, PluginServices, PluginSettings, ResponseHead};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Instant;

pub const NAME: &str = "request_id";

pub const REQUEST_ID_HEADER: http::HeaderName = http::HeaderName::from_static("x-komilion-request-id");
pub const OVERHEAD_HEADER: http::HeaderName = http::HeaderName::from_static("x-komilion-overhead-us");
pub const TASK_HEADER: http::HeaderName = http::HeaderName::from_static("x-komilion-task");
pub const MODEL_HEADER: http::HeaderName = http::HeaderName::from_static("x-komilion-model");
pub const PROVIDER_HEADER: http::HeaderName = http::HeaderName::from_static("x-komilion-provider");

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RequestIdSettings {
    /// Send `x-komilion-overhead-us`.
    pub overhead: bool,
}

impl Default for RequestIdSettings {
    fn default() -> Self {
        RequestIdSettings { overhead: true }
    }
}

pub struct RequestIdHeaders {
    settings: RequestIdSettings,
}

impl RequestIdHeaders {
    pub fn new(settings: RequestIdSettings) -> Self {
        RequestIdHeaders { settings }
    }

    pub fn build(settings: &PluginSettings, _: &PluginServices) -> Result<Arc<dyn Plugin>, Vec<ConfigIssue>> {
        Ok(Arc::new(RequestIdHeaders::new(settings_from(settings)?)))
    }
}

#[async_trait::async_trait]
impl Plugin for RequestIdHeaders {
    fn name(&self) -> &'static str {
        NAME
    }

    fn hooks(&self) -> Hooks {
        Hooks::ON_RESPONSE
    }

    fn on_response(&self, head: &mut ResponseHead, ex: &Exchange) {
        head.insert(REQUEST_ID_HEADER, &ex.request_id);
        for (name, value) in [
            (TASK_HEADER, &ex.task),
            (MODEL_HEADER, &ex.routed_model),
            (PROVIDER_HEADER, &ex.provider),
        ] {
            if let Some(value) = value {
                head.insert(name, value);
            }
        }
        if self.settings.overhead {
            let us = ex.timing.overhead(Instant::now()).as_micros();
            head.insert(OVERHEAD_HEADER, &us.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use komilion_sdk::Surface;
    use std::time::Duration;

    #[test]
    fn adds_both_headers() {
        let start = Instant::now() - Duration::from_millis(5);
        let mut ex = Exchange::new("req-1".into(), Surface::OpenAi, start);
        ex.timing.upstream_wait = Duration::from_millis(4);
        ex.provider = Some("openai".into());
        ex.routed_model = Some("gpt-4o-mini".into());
        let plugin = RequestIdHeaders::new(RequestIdSettings::default());
        let mut head = ResponseHead::new(200);
        plugin.on_response(&mut head, &ex);
        assert_eq!(head.headers[REQUEST_ID_HEADER], "req-1");
        assert_eq!(head.headers[PROVIDER_HEADER], "openai");
        assert_eq!(head.headers[MODEL_HEADER], "gpt-4o-mini");
        assert!(
            head.headers.get(TASK_HEADER).is_none(),
            "no task header before a classifier ran"
        );
        let us: u64 = head.headers[OVERHEAD_HEADER].to_str().unwrap().parse().unwrap();
        assert!(
            (1000..5000).contains(&us),
            "overhead {us}µs excludes the 4 ms upstream wait"
        );
    }

    #[test]
    fn overhead_header_can_be_turned_off() {
        let plugin = RequestIdHeaders::build(&serde_json::json!({"overhead": false}), &Default::default()).unwrap();
        let ex = Exchange::new("r".into(), Surface::OpenAi, Instant::now());
        let mut head = ResponseHead::new(200);
        plugin.on_response(&mut head, &ex);
        assert!(head.headers.get(OVERHEAD_HEADER).is_none());
        assert!(head.headers.get(REQUEST_ID_HEADER).is_some());
    }

    #[test]
    fn rejects_unknown_settings() {
        let err = RequestIdHeaders::build(&serde_json::json!({"overhed": false}), &Default::default())
            .err()
            .unwrap();
        assert_eq!(err[0].path, "overhed");
    }
}
