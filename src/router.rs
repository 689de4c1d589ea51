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
    /// When this table was built (Unix seconds): `/v1/models` says it as each model's
    /// `created`, a real time where SDKs parse one, as no provider config says more.
    pub created: i64,
}

impl ModelTable {
    pub fn new(providers: &[ProviderConfig]) -> ModelTable {
        let mut table = ModelTable {
            created: chrono::Utc::now().timestamp(),
            ..ModelTable::default()
        };
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
    /// The model as a metric label: a model of the config or the catalog names itself; any
    /// other (a pass-through name a client chose) is `other`, so clients cannot grow the
    /// metric's series without bound.
    pub fn metric_label<'a>(&self, model: &'a str, pricing: &crate::billing::pricing::Pricing) -> &'a str {
        if model.is_empty() || self.models.contains_key(model) || pricing.model(model).is_some() {
            model
        } else {
            "other"
        }
    }

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

    #[test]
    fn a_pass_through_model_is_never_its_own_metric_label() {
        let yaml = r#"
providers:
  - {name: a, kind: openai, base_url: "http://127.0.0.1:1/v1", api_key: k, models: [house-model]}
  - {name: open, kind: openai, base_url: "http://127.0.0.1:3/v1", api_key: k}
"#;
        let config = Config::from_yaml(yaml, &|_| None).unwrap();
        let table = ModelTable::new(&config.providers);
        let pricing = crate::billing::pricing::Pricing::new(config.catalog.clone(), &config.providers);
        assert_eq!(table.metric_label("house-model", &pricing), "house-model");
        assert_eq!(
            table.metric_label("gpt-4o-mini", &pricing),
            "gpt-4o-mini",
            "a catalog model"
        );
        for chosen in ["anything-1", "anything-2\u{0}"] {
            assert!(table.plan(&format!("open/{chosen}"), None).is_ok());
            assert_eq!(table.metric_label(chosen, &pricing), "other");
        }
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
