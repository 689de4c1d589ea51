//! The model catalog: what each model costs and can do.
//!
//! Shipped as `conf/catalog.yaml` (embedded in the binary as the default) and refreshed from
//! LiteLLM's public price table with `komilion catalog import-litellm FILE`. Prices are decimal
//! USD strings per million tokens, parsed exactly into nano-USD.

use crate::money::{parse_scaled, parse_usd, NanoUsd, Usd};
use komilion_sdk::ConfigIssue;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The catalog shipped with the binary.
pub const EMBEDDED_CATALOG: &str = include_str!("../conf/catalog.yaml");

/// The file format.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    /// Where the prices come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub models: Vec<CatalogEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// The model id the provider's API uses.
    pub id: String,
    /// The provider family (`openai`, `anthropic`, `gemini`, ...).
    pub provider: String,
    /// USD per million input tokens, as a decimal string.
    pub input_per_mtok: String,
    /// USD per million output tokens.
    pub output_per_mtok: String,
    /// USD per million cached input tokens; the input price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<String>,
    /// USD per million input tokens written to the provider's prompt cache (five-minute
    /// lifetime); the input price when absent (providers that bill no writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_input_per_mtok: Option<String>,
    /// The same for a one-hour lifetime; the five-minute write price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h_input_per_mtok: Option<String>,
    pub context_window: u64,
    pub max_output_tokens: u64,
    /// `tools`, `vision`, `json_mode`, `reasoning`.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The key of this model in LiteLLM's table, when it is not `id` or `provider/id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub litellm_key: Option<String>,
}

/// Prices in nano-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelPrice {
    pub input: NanoUsd,
    pub output: NanoUsd,
    pub cached_input: NanoUsd,
    /// Input written to the provider's prompt cache, five-minute lifetime.
    pub cache_write_input: NanoUsd,
    /// Input written to the provider's prompt cache, one-hour lifetime.
    pub cache_write_1h_input: NanoUsd,
}

/// A price as the catalog and the config write it: decimal USD per million tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct PriceText<'a> {
    pub input: &'a str,
    pub output: &'a str,
    pub cached_input: Option<&'a str>,
    pub cache_write_input: Option<&'a str>,
    pub cache_write_1h_input: Option<&'a str>,
}

impl ModelPrice {
    /// A price that bills every input token alike (no cache discount or surcharge).
    pub fn flat(input: NanoUsd, output: NanoUsd) -> ModelPrice {
        ModelPrice {
            input,
            output,
            cached_input: input,
            cache_write_input: input,
            cache_write_1h_input: input,
        }
    }

    /// Prices from decimal USD-per-million-token strings; the cached input and cache write
    /// prices default to the input price, the one-hour write price to the five-minute one.
    /// Every bad field is reported.
    pub fn parse(text: PriceText<'_>) -> Result<ModelPrice, Vec<ConfigIssue>> {
        let PriceText {
            input,
            output,
            cached_input,
            cache_write_input,
            cache_write_1h_input,
        } = text;
        let mut issues = Vec::new();
        let mut price = |field: &str, text: &str| {
            parse_usd_per_mtok(text).unwrap_or_else(|err| {
                issues.push(ConfigIssue::new(field, err));
                0
            })
        };
        let input = price("input_per_mtok", input);
        let output = price("output_per_mtok", output);
        let cached_input = cached_input.map_or(input, |t| price("cached_input_per_mtok", t));
        let cache_write_input = cache_write_input.map_or(input, |t| price("cache_write_input_per_mtok", t));
        let cache_write_1h_input =
            cache_write_1h_input.map_or(cache_write_input, |t| price("cache_write_1h_input_per_mtok", t));
        if issues.is_empty() {
            Ok(ModelPrice {
                input,
                output,
                cached_input,
                cache_write_input,
                cache_write_1h_input,
            })
        } else {
            Err(issues)
        }
    }
}

#[derive(Debug, Clone)]
pub struct CatalogModel {
    pub id: String,
    pub provider: String,
    pub price: ModelPrice,
    pub context_window: u64,
    pub max_output_tokens: u64,
    pub capabilities: Vec<String>,
}

impl CatalogModel {
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

const CAPABILITIES: [&str; 4] = ["tools", "vision", "json_mode", "reasoning"];

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: Vec<CatalogModel>,
    index: HashMap<String, usize>,
}

impl Catalog {
    /// The catalog embedded in the binary. It is checked by a unit test, so it always loads.
    pub fn embedded() -> Catalog {
        Catalog::from_yaml(EMBEDDED_CATALOG).unwrap_or_default()
    }

    pub fn from_yaml(text: &str) -> Result<Catalog, Vec<ConfigIssue>> {
        let file: CatalogFile =
            serde_yaml::from_str(text).map_err(|e| vec![ConfigIssue::new("", format!("invalid catalog: {e}"))])?;
        Catalog::from_file(file)
    }

    pub fn from_file(file: CatalogFile) -> Result<Catalog, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        let mut catalog = Catalog::default();
        for (i, e) in file.models.into_iter().enumerate() {
            let at = format!("models[{i}]");
            let price = ModelPrice::parse(PriceText {
                input: &e.input_per_mtok,
                output: &e.output_per_mtok,
                cached_input: e.cached_input_per_mtok.as_deref(),
                cache_write_input: e.cache_write_input_per_mtok.as_deref(),
                cache_write_1h_input: e.cache_write_1h_input_per_mtok.as_deref(),
            })
            .unwrap_or_else(|found| {
                issues.extend(found.into_iter().map(|i| i.under(&at)));
                ModelPrice::default()
            });
            for (j, c) in e.capabilities.iter().enumerate() {
                if !CAPABILITIES.contains(&c.as_str()) {
                    issues.push(ConfigIssue::new(
                        format!("{at}.capabilities[{j}]"),
                        format!("unknown capability `{c}`"),
                    ));
                }
            }
            if catalog.index.contains_key(&e.id) {
                issues.push(ConfigIssue::new(
                    format!("{at}.id"),
                    format!("duplicate model `{}`", e.id),
                ));
                continue;
            }
            catalog.index.insert(e.id.clone(), catalog.models.len());
            catalog.models.push(CatalogModel {
                id: e.id,
                provider: e.provider,
                price,
                context_window: e.context_window,
                max_output_tokens: e.max_output_tokens,
                capabilities: e.capabilities,
            });
        }
        if issues.is_empty() {
            Ok(catalog)
        } else {
            Err(issues)
        }
    }

    pub fn get(&self, id: &str) -> Option<&CatalogModel> {
        self.index.get(id).map(|&i| &self.models[i])
    }

    pub fn models(&self) -> &[CatalogModel] {
        &self.models
    }
}

/// `"0.15"` USD per million tokens → nano-USD per million tokens.
fn parse_usd_per_mtok(text: &str) -> Result<NanoUsd, String> {
    parse_usd(text).map_err(|e| e.to_string())
}

/// Refresh a catalog's prices and limits from LiteLLM's `model_prices_and_context_window.json`.
/// Models missing from the table keep their entry and are reported.
pub fn import_litellm(catalog: &mut CatalogFile, litellm_json: &str) -> Result<Vec<String>, String> {
    let table: HashMap<String, HashMap<String, Box<serde_json::value::RawValue>>> =
        serde_json::from_str(litellm_json).map_err(|e| format!("not LiteLLM's price table: {e}"))?;
    let mut missing = Vec::new();
    for entry in &mut catalog.models {
        let keys = [
            entry.litellm_key.clone().unwrap_or_default(),
            entry.id.clone(),
            format!("{}/{}", entry.provider, entry.id),
        ];
        let Some(row) = keys.iter().find_map(|k| table.get(k)) else {
            missing.push(entry.id.clone());
            continue;
        };
        // LiteLLM gives USD per token as number literals; read the literal text, never an f64.
        let per_mtok = |field: &str| -> Result<Option<String>, String> {
            row.get(field)
                .map(|raw| {
                    parse_scaled(raw.get().trim_matches('"'), 15)
                        .map(|nano_per_mtok| Usd(nano_per_mtok).to_string())
                        .map_err(|e| format!("{}: {field}: {e}", entry.id))
                })
                .transpose()
        };
        let int = |field: &str| row.get(field).and_then(|raw| raw.get().parse::<u64>().ok());
        if let Some(v) = per_mtok("input_cost_per_token")? {
            entry.input_per_mtok = v;
        }
        if let Some(v) = per_mtok("output_cost_per_token")? {
            entry.output_per_mtok = v;
        }
        if let Some(v) = per_mtok("cache_read_input_token_cost")? {
            entry.cached_input_per_mtok = Some(v);
        }
        if let Some(v) = per_mtok("cache_creation_input_token_cost")? {
            entry.cache_write_input_per_mtok = Some(v);
        }
        if let Some(v) = per_mtok("cache_creation_input_token_cost_above_1hr")? {
            entry.cache_write_1h_input_per_mtok = Some(v);
        }
        if let Some(v) = int("max_input_tokens") {
            entry.context_window = v;
        }
        if let Some(v) = int("max_output_tokens") {
            entry.max_output_tokens = v;
        }
        let flag = |field: &str| row.get(field).is_some_and(|raw| raw.get() == "true");
        let mut caps = Vec::new();
        for (field, cap) in [
            ("supports_function_calling", "tools"),
            ("supports_vision", "vision"),
            ("supports_response_schema", "json_mode"),
            ("supports_reasoning", "reasoning"),
        ] {
            if flag(field) {
                caps.push(cap.to_owned());
            }
        }
        entry.capabilities = caps;
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_catalog_loads() {
        let c = Catalog::from_yaml(EMBEDDED_CATALOG).unwrap();
        let mini = c.get("gpt-4o-mini").unwrap();
        assert_eq!(
            mini.price,
            ModelPrice {
                cached_input: 75_000_000,
                ..ModelPrice::flat(150_000_000, 600_000_000)
            }
        );
        assert!(mini.context_window >= 128_000);
    }

    #[test]
    fn import_reads_literals_exactly() {
        let mut file = CatalogFile {
            source: None,
            models: vec![CatalogEntry {
                id: "m".into(),
                provider: "openai".into(),
                input_per_mtok: "0".into(),
                output_per_mtok: "0".into(),
                cached_input_per_mtok: None,
                cache_write_input_per_mtok: None,
                cache_write_1h_input_per_mtok: None,
                context_window: 0,
                max_output_tokens: 0,
                capabilities: vec![],
                litellm_key: None,
            }],
        };
        let json = r#"{"openai/m": {"input_cost_per_token": 1.1e-06, "output_cost_per_token": 4.4e-06,
            "cache_read_input_token_cost": 2.75e-07, "cache_creation_input_token_cost": 1.375e-06, "max_input_tokens": 200000, "max_output_tokens": 100000,
            "supports_function_calling": true, "supports_vision": false}, "other": {}}"#;
        let missing = import_litellm(&mut file, json).unwrap();
        assert!(missing.is_empty());
        let e = &file.models[0];
        assert_eq!((e.input_per_mtok.as_str(), e.output_per_mtok.as_str()), ("1.1", "4.4"));
        assert_eq!(e.cached_input_per_mtok.as_deref(), Some("0.275"));
        assert_eq!(e.cache_write_input_per_mtok.as_deref(), Some("1.375"));
        assert_eq!(e.cache_write_1h_input_per_mtok, None);
        assert_eq!((e.context_window, e.max_output_tokens), (200_000, 100_000));
        assert_eq!(e.capabilities, ["tools"]);
    }
}
