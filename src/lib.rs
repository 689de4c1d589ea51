//! Komilion, an LLM gateway on Pingora.
//!
//! Modules follow the request flow (DESIGN.md §1): [`config`] is read at start; [`proxy`]
//! drives each request through the [`chain`] of plugins, the [`router`] and the [`upstream`]
//! providers, parsing streams with [`sse`]; [`metrics`] records it all. [`mock_provider`] is
//! the simulated LLM provider used by tests, benches and [`demo`].

pub mod admin;
pub mod billing;
pub mod catalog;
pub mod chain;
pub mod config;
pub mod demo;
pub mod edge;
pub mod formats;
pub mod metering;
pub mod metrics;
pub mod mock_provider;
pub mod money;
pub mod providers;
pub mod proxy;
pub mod router;
pub mod secrets;
pub mod server;
pub mod sse;
pub mod store;
pub mod upstream;
pub mod usage;
