//! The plugin chain: the plugins of the config, in order, and the calls of each hook.
//!
//! For each hook the chain keeps the indices of the plugins that declared it, so a hook nobody
//! uses costs one empty loop.

use crate::config::PluginSection;
use komilion_sdk::{
    ApiError, AttemptDecision, Candidate, ChatRequest, ConfigIssue, Exchange, Flow, Hooks, LocalResponse, Plugin,
    PluginRegistry, PluginServices, RequestView, ResponseHead, RoutePlan, StreamEvent,
};
use std::sync::Arc;

/// A plugin answered the request itself.
#[derive(Debug)]
pub struct Stop {
    pub plugin: &'static str,
    pub response: LocalResponse,
}

#[derive(Default)]
pub struct PluginChain {
    plugins: Vec<Arc<dyn Plugin>>,
    on_headers: Vec<usize>,
    on_body: Vec<usize>,
    on_route: Vec<usize>,
    on_attempt: Vec<usize>,
    on_upstream_status: Vec<usize>,
    on_upstream_failure: Vec<usize>,
    on_response: Vec<usize>,
    on_event: Vec<usize>,
    on_complete: Vec<usize>,
    /// Some plugin authenticates: requests without a principal after `on_headers` are refused.
    requires_principal: bool,
}

impl PluginChain {
    /// Build every plugin of the config, collecting all their config issues.
    pub fn build(
        sections: &[PluginSection],
        registry: &PluginRegistry,
        services: &PluginServices,
    ) -> Result<PluginChain, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        let mut plugins = Vec::with_capacity(sections.len());
        for (i, section) in sections.iter().enumerate() {
            let at = format!("plugins[{i}]");
            let Some(constructor) = registry.get(&section.name) else {
                let known: Vec<_> = registry.names().collect();
                issues.push(ConfigIssue::new(
                    format!("{at}.name"),
                    format!("unknown plugin `{}` (known: {})", section.name, known.join(", ")),
                ));
                continue;
            };
            match constructor(&section.settings, services) {
                Ok(plugin) => plugins.push(plugin),
                Err(found) => issues.extend(found.into_iter().map(|issue| issue.under(&format!("{at}.settings")))),
            }
        }
        if issues.is_empty() {
            Ok(PluginChain::new(plugins))
        } else {
            Err(issues)
        }
    }

    pub fn new(plugins: Vec<Arc<dyn Plugin>>) -> PluginChain {
        let with = |hook: Hooks| -> Vec<usize> {
            plugins
                .iter()
                .enumerate()
                .filter(|(_, p)| p.hooks().contains(hook))
                .map(|(i, _)| i)
                .collect()
        };
        PluginChain {
            on_headers: with(Hooks::ON_HEADERS),
            on_body: with(Hooks::ON_BODY),
            on_route: with(Hooks::ON_ROUTE),
            on_attempt: with(Hooks::ON_ATTEMPT),
            on_upstream_status: with(Hooks::ON_UPSTREAM_STATUS),
            on_upstream_failure: with(Hooks::ON_UPSTREAM_FAILURE),
            on_response: with(Hooks::ON_RESPONSE),
            on_event: with(Hooks::ON_EVENT),
            on_complete: with(Hooks::ON_COMPLETE),
            requires_principal: plugins.iter().any(|p| p.authenticates()),
            plugins,
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.plugins.iter().map(|p| p.name())
    }

    fn stop(&self, i: usize, flow: Flow) -> Result<(), Stop> {
        match flow {
            Flow::Continue => Ok(()),
            Flow::Respond(response) => Err(Stop {
                plugin: self.plugins[i].name(),
                response,
            }),
        }
    }

    pub async fn on_headers(&self, req: &RequestView, ex: &mut Exchange) -> Result<(), Stop> {
        for &i in &self.on_headers {
            self.stop(i, self.plugins[i].on_headers(req, ex).await)?;
        }
        if self.requires_principal && ex.principal.is_none() {
            let error = if req.credential().is_some() {
                ApiError::invalid_api_key()
            } else {
                ApiError::missing_api_key()
            };
            return Err(Stop {
                plugin: "auth",
                response: LocalResponse::Error(error),
            });
        }
        Ok(())
    }

    pub async fn on_body(&self, req: &RequestView, chat: &mut ChatRequest, ex: &mut Exchange) -> Result<(), Stop> {
        for &i in &self.on_body {
            self.stop(i, self.plugins[i].on_body(req, chat, ex).await)?;
        }
        Ok(())
    }

    pub async fn on_route(&self, chat: &ChatRequest, plan: &mut RoutePlan, ex: &mut Exchange) -> Result<(), Stop> {
        for &i in &self.on_route {
            self.stop(i, self.plugins[i].on_route(chat, plan, ex).await)?;
        }
        Ok(())
    }

    pub async fn on_attempt(&self, candidate: &Candidate, ex: &mut Exchange) -> AttemptDecision {
        for &i in &self.on_attempt {
            if self.plugins[i].on_attempt(candidate, ex).await == AttemptDecision::Skip {
                return AttemptDecision::Skip;
            }
        }
        AttemptDecision::Proceed
    }

    pub fn on_upstream_status(&self, candidate: &Candidate, status: u16, ex: &mut Exchange) {
        for &i in &self.on_upstream_status {
            self.plugins[i].on_upstream_status(candidate, status, ex);
        }
    }

    pub fn on_upstream_failure(&self, candidate: &Candidate, kind: &'static str, ex: &mut Exchange) {
        for &i in &self.on_upstream_failure {
            self.plugins[i].on_upstream_failure(candidate, kind, ex);
        }
    }

    pub fn on_response(&self, head: &mut ResponseHead, ex: &Exchange) {
        for &i in &self.on_response {
            self.plugins[i].on_response(head, ex);
        }
    }

    pub fn wants_events(&self) -> bool {
        !self.on_event.is_empty()
    }

    pub fn on_event(&self, event: &StreamEvent<'_>, ex: &mut Exchange) {
        for &i in &self.on_event {
            self.plugins[i].on_event(event, ex);
        }
    }

    pub async fn on_complete(&self, ex: &Exchange, status: u16) {
        for &i in &self.on_complete {
            self.plugins[i].on_complete(ex, status).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use komilion_sdk::Surface;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// Counts its calls; refuses with 429 when told to.
    struct Probe {
        calls: AtomicUsize,
        refuse: bool,
    }

    #[async_trait::async_trait]
    impl Plugin for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn hooks(&self) -> Hooks {
            Hooks::ON_HEADERS
        }
        async fn on_headers(&self, _: &RequestView, _: &mut Exchange) -> Flow {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.refuse {
                Flow::error(ApiError::new(komilion_sdk::ErrorKind::RateLimited, "slow down"))
            } else {
                Flow::Continue
            }
        }
    }

    #[tokio::test]
    async fn a_refusal_stops_the_chain() {
        let first = Arc::new(Probe {
            calls: AtomicUsize::new(0),
            refuse: true,
        });
        let second = Arc::new(Probe {
            calls: AtomicUsize::new(0),
            refuse: false,
        });
        let chain = PluginChain::new(vec![first.clone(), second.clone()]);
        let req = RequestView::new(http::Method::GET, "/", http::HeaderMap::new());
        let mut ex = Exchange::new("r".into(), Surface::OpenAi, Instant::now());
        let stop = chain.on_headers(&req, &mut ex).await.unwrap_err();
        assert_eq!(stop.plugin, "probe");
        assert_eq!(
            (
                first.calls.load(Ordering::Relaxed),
                second.calls.load(Ordering::Relaxed)
            ),
            (1, 0)
        );
    }

    #[test]
    fn unknown_plugins_and_bad_settings_are_all_reported() {
        let sections = vec![
            PluginSection {
                name: "nope".into(),
                settings: serde_json::Value::Null,
            },
            PluginSection {
                name: "request_id".into(),
                settings: serde_json::json!({"bogus": 1}),
            },
        ];
        let issues = PluginChain::build(&sections, &komilion_plugins::builtin_registry(), &Default::default())
            .err()
            .unwrap();
        assert_eq!(issues[0].path, "plugins[0].name");
        assert_eq!(issues[1].path, "plugins[1].settings.bogus");
    }
}
