//! The plugin SDK of Komilion.
//!
//! Every policy step of the gateway (auth, rate limits, task classification, cache, budget,
//! routing, metering, usage log) is a [`Plugin`]. The engine drives Pingora's phases and calls
//! the plugins' hooks in the order the config lists them. Plugins never see Pingora's `Session`:
//! they get owned views ([`RequestView`], [`ChatRequest`]) and the per-request [`Exchange`] they
//! may annotate, so each one is unit-testable without sockets.
//!
//! This crate depends on neither the engine nor Pingora.

mod api_error;
mod chat;
mod exchange;
mod plugin;
mod registry;
mod request;
mod services;

pub use api_error::{ApiError, ErrorKind};
pub use chat::{ChatMessage, ChatRequest, RequestParseError};
pub use exchange::{Candidate, Exchange, Principal, ResponseHead, RoutePlan, Timing, Usage};
pub use plugin::{AttemptDecision, Flow, Hooks, LocalResponse, Plugin, StreamEvent};
pub use registry::{settings_from, ConfigIssue, PluginConstructor, PluginRegistry, PluginServices, PluginSettings};
pub use request::{RequestView, Surface};
pub use services::{AccountLookup, KeyGrant, KeyLookup, StoreUnavailable};
