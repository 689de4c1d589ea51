//! Assembling the Pingora server from a validated [`Config`]: the gateway listener, the
//! metrics listener and the background services.

use crate::chain::PluginChain;
use crate::config::Config;
use crate::metrics::MetricsApp;
use crate::proxy::Gateway;
use crate::router::ModelTable;
use crate::upstream::{DnsRefresher, Upstreams};
use komilion_sdk::{ConfigIssue, PluginRegistry, PluginServices};
use pingora::apps::http_app::HttpServer;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;

/// How often provider host names are resolved again.
const DNS_REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{}", crate::config::ConfigErrors(.0.clone()))]
    Config(Vec<ConfigIssue>),
    #[error("{0}")]
    Upstream(String),
}

/// Pingora's process settings from ours.
pub fn server_conf(config: &Config) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: s.threads,
        work_stealing: s.work_stealing,
        grace_period_seconds: Some(s.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
        daemon: s.daemon,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        error_log: s.error_log.clone(),
        user: s.user.clone(),
        group: s.group.clone(),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        ..ServerConf::default()
    }
}

/// Build the plugin chain of a config (also what `komilion check` runs).
pub fn build_chain(
    config: &Config,
    registry: &PluginRegistry,
    services: &PluginServices,
) -> Result<PluginChain, BuildError> {
    PluginChain::build(&config.plugins, registry, services).map_err(BuildError::Config)
}

/// Build the gateway service of a config.
pub fn build_gateway(
    config: &Config,
    conf: &ServerConf,
) -> Result<(Gateway, Arc<Upstreams>), BuildError> {
    let chain = build_chain(
        config,
        &komilion_plugins::builtin_registry(),
        &PluginServices::default(),
    )?;
    let upstreams = Arc::new(Upstreams::new(&config.providers).map_err(BuildError::Upstream)?);
    let gateway = Gateway {
        chain,
        upstreams: upstreams.clone(),
        models: ModelTable::new(&config.providers),
        connector: Connector::new(Some(ConnectorOptions::from_server_conf(conf))),
        max_body_bytes: config.max_body_bytes,
    };
    Ok((gateway, upstreams))
}

/// The whole server, ready for `run_forever()`.
pub fn build_server(config: &Config, mut opt: Opt) -> Result<Server, BuildError> {
    // Our config file is not Pingora's: hand Pingora its settings directly.
    opt.conf = None;
    let conf = server_conf(config);
    let (gateway, upstreams) = build_gateway(config, &conf)?;
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        gateway,
        "komilion gateway",
    );
    for addr in &config.listen.gateway {
        proxy.add_tcp(addr);
    }
    server.add_service(proxy);

    if let Some(addr) = &config.listen.metrics {
        let mut metrics = Service::new(
            "komilion metrics".to_owned(),
            HttpServer::new_app(MetricsApp),
        );
        metrics.add_tcp(addr);
        server.add_service(metrics);
    }
    server.add_service(background_service(
        "dns refresh",
        DnsRefresher {
            upstreams,
            every: DNS_REFRESH,
        },
    ));
    Ok(server)
}
