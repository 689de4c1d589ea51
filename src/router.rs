//! From the model a client names to the ordered upstream candidates that can serve it.
//!
//! A model listed by several providers is tried on each in config order, so the later ones are
//! fallbacks. `provider/model` pins one provider. Routing policies (`auto`, ...) refine the
//! plan in plugins' `on_route`.

use crate::config::ProviderConfig;
use komilion_sdk::{ApiError, Candidate, Principal, RoutePlan};
use std::collections::HashMap;

/// The models the gateway serves.
#[derive(Debug, Default)]
pub struct ModelTable {
    /// Model id → providers serving it, in config order.
    models: HashMap<String, Vec<String>>,
    /// Model ids in first-seen order, for listing.
    order: Vec<String>,
    /// Provider name → whether it lists its models (if not, `provider/anything` is allowed).
    providers: HashMap<String, bool>,
}

impl ModelTable {
    pub fn new(providers: &[ProviderConfig]) -> ModelTable {
        let mut table = ModelTable::default();
        for p in providers {
            table.providers.insert(p.name.clone(), !p.models.is_empty());
            for m in &p.models {
                let serving = table.models.entry(m.clone()).or_default();
                if serving.is_empty() {
                    table.order.push(m.clone());
                }
                if !serving.contains(&p.name) {
                    serving.push(p.name.clone());
                }
            }
        }
        table
    }

    /// Model ids the caller may use, in config order, each with its first provider.
    pub fn list<'a>(&'a self, principal: Option<&'a Principal>) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.order
            .iter()
            .filter(move |m| principal.is_none_or(|p| p.may_use(m)))
            .filter_map(|m| Some((m.as_str(), self.models.get(m)?.first()?.as_str())))
    }

    /// The default plan for a requested model.
    pub fn plan(&self, requested: &str, principal: Option<&Principal>) -> Result<RoutePlan, ApiError> {
        let allowed = |m: &str| principal.is_none_or(|p| p.may_use(m) || p.may_use(requested));
        if let Some(providers) = self.models.get(requested) {
            if !allowed(requested) {
                return Err(ApiError::model_not_found(requested));
            }
            let candidates = providers
                .iter()
                .map(|p| Candidate {
                    provider: p.clone(),
                    model: requested.to_owned(),
                })
                .collect();
            return Ok(RoutePlan { candidates });
        }
        if let Some((provider, model)) = requested.split_once('/') {
            if let Some(&lists_models) = self.providers.get(provider) {
                let listed = self
                    .models
                    .get(model)
                    .is_some_and(|ps| ps.iter().any(|p| p == provider));
                if (listed || !lists_models) && !model.is_empty() && allowed(model) {
                    return Ok(RoutePlan {
                        candidates: vec![Candidate {
                            provider: provider.to_owned(),
                            model: model.to_owned(),
                        }],
                    });
                }
            }
        }
        Err(ApiError::model_not_found(requested))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table() -> ModelTable {
        let yaml = r#"
providers:
  - {name: a, kind: openai, base_url: "http://127.0.0.1:1/v1", api_key: k, models: [m1, m2]}
  - {name: b, kind: openai, base_url: "http://127.0.0.1:2/v1", api_key: k, models: [m1]}
  - {name: open, kind: openai, base_url: "http://127.0.0.1:3/v1", api_key: k}
"#;
        ModelTable::new(&Config::from_yaml(yaml, &|_| None).unwrap().providers)
    }

    fn providers(plan: &RoutePlan) -> Vec<(&str, &str)> {
        plan.candidates
            .iter()
            .map(|c| (c.provider.as_str(), c.model.as_str()))
            .collect()
    }

    #[test]
    fn shared_models_fall_back_in_config_order() {
        assert_eq!(
            providers(&table().plan("m1", None).unwrap()),
            [("a", "m1"), ("b", "m1")]
        );
        assert_eq!(providers(&table().plan("b/m1", None).unwrap()), [("b", "m1")]);
        assert_eq!(
            providers(&table().plan("open/anything", None).unwrap()),
            [("open", "anything")]
        );
    }

    #[test]
    fn unknown_and_forbidden_models_are_404() {
        let t = table();
        assert_eq!(t.plan("nope", None).unwrap_err().status(), 404);
        assert_eq!(t.plan("b/m2", None).unwrap_err().status(), 404, "b does not list m2");
        let p = Principal {
            allowed_models: vec!["m2".into()],
            ..Default::default()
        };
        assert_eq!(t.plan("m1", Some(&p)).unwrap_err().status(), 404);
        assert!(t.plan("m2", Some(&p)).is_ok());
        let listed: Vec<_> = t.list(Some(&p)).map(|(m, _)| m).collect();
        assert_eq!(listed, ["m2"]);
    }
}
