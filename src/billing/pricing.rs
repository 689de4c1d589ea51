//! What a model costs on a provider. A price comes from the provider entry's own `prices:`, else
//! from the catalog (by the model id, or its last `/` segment for `vendor/model` names), else
//! nowhere: such a model is *unpriced*. Unpriced models are never held and charged at $0 by
//! accident: wallet-billed keys are refused them (`400 model_not_priced`) unless the provider
//! entry says `unpriced: free`, and `komilion check` warns about them.

use crate::catalog::{Catalog, CatalogModel, ModelPrice};
use crate::config::{ProviderConfig, UnpricedPolicy};
use std::collections::HashMap;

/// Prices by provider and model.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    catalog: Catalog,
    providers: HashMap<String, ProviderPrices>,
}

#[derive(Debug, Clone, Default)]
struct ProviderPrices {
    own: HashMap<String, ModelPrice>,
    unpriced: UnpricedPolicy,
}

impl Pricing {
    pub fn new(catalog: Catalog, providers: &[ProviderConfig]) -> Pricing {
        let providers = providers
            .iter()
            .map(|p| {
                let prices = ProviderPrices {
                    own: p.prices.clone(),
                    unpriced: p.unpriced,
                };
                (p.name.clone(), prices)
            })
            .collect();
        Pricing { catalog, providers }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The catalog's entry for a model: by its id, or by its last `/` segment.
    pub fn model(&self, model: &str) -> Option<&CatalogModel> {
        let id = model.rsplit('/').next().unwrap_or(model);
        self.catalog.get(model).or_else(|| self.catalog.get(id))
    }

    /// What `model` costs on `provider`; `None` when it has no price and the provider did not
    /// choose to serve unpriced models free.
    pub fn price(&self, provider: &str, model: &str) -> Option<ModelPrice> {
        let own = self.providers.get(provider);
        if let Some(price) = own.and_then(|p| p.own.get(model)) {
            return Some(*price);
        }
        if let Some(entry) = self.model(model) {
            return Some(entry.price);
        }
        match own.map(|p| p.unpriced) {
            Some(UnpricedPolicy::Free) => Some(ModelPrice::default()),
            _ => None,
        }
    }

    /// Warnings for `komilion check`: configured models without a price, and providers that pass
    /// any model through (no `models:` list) without saying what unpriced ones cost.
    pub fn warnings(&self, providers: &[ProviderConfig]) -> Vec<String> {
        let mut out = Vec::new();
        for (i, p) in providers.iter().enumerate() {
            if p.unpriced == UnpricedPolicy::Free {
                continue;
            }
            for model in p.models.iter().filter(|m| self.price(&p.name, m).is_none()) {
                out.push(format!(
                    "providers[{i}]: model `{model}` has no price (not in the catalog, no `prices.{model}`); \
                     wallet-billed keys will be refused it with model_not_priced. Add a price, or \
                     `unpriced: free` to serve it at $0."
                ));
            }
            if p.models.is_empty() {
                out.push(format!(
                    "providers[{i}]: `{}` passes any model through (no `models:` list); those without a \
                     price are refused to wallet-billed keys. Add `prices:`, or `unpriced: free`.",
                    p.name
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pricing(yaml: &str) -> (Pricing, Vec<ProviderConfig>) {
        let config = Config::from_yaml(yaml, &|_| None).unwrap();
        (
            Pricing::new(config.catalog.clone(), &config.providers),
            config.providers,
        )
    }

    #[test]
    fn own_prices_then_the_catalog_then_the_policy() {
        let (p, providers) = pricing(
            r#"
providers:
  - name: openai
    kind: openai
    base_url: http://127.0.0.1:1/v1
    api_key: k
    models: [gpt-4o-mini, my-finetune]
    prices:
      gpt-4o-mini: {input_per_mtok: "1", output_per_mtok: "2"}
  - name: local
    kind: openai
    base_url: http://127.0.0.1:2/v1
    api_key: k
    unpriced: free
"#,
        );
        assert_eq!(
            p.price("openai", "gpt-4o-mini"),
            Some(ModelPrice::flat(1_000_000_000, 2_000_000_000))
        );
        let catalog_price = p.catalog().get("gpt-4o-mini").unwrap().price;
        assert_eq!(p.price("other", "gpt-4o-mini"), Some(catalog_price));
        assert_eq!(
            p.price("openai", "openai/gpt-4o-mini"),
            Some(catalog_price),
            "by its last segment"
        );
        assert_eq!(p.price("openai", "my-finetune"), None);
        assert_eq!(p.price("local", "llama-3-8b"), Some(ModelPrice::default()));
        let warnings = p.warnings(&providers);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("my-finetune"));
    }
}
