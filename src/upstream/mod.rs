//! Upstream providers at run time: where to connect, with which credential, and the pooled
//! connector that reaches them.
//!
//! Pingora's `HttpPeer::new("host:port", ..)` resolves DNS blocking on the request path and
//! panics when resolution fails, so peers are built from resolved `SocketAddr`s only. Host names
//! are resolved at start and refreshed by a background service ([`DnsRefresher`]).

use crate::config::{ProviderConfig, ProviderKind};
use crate::providers::ProviderAdapter;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub mod scrub;

/// How long a pooled upstream connection may stay idle before it is closed.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// One configured provider, ready to be connected to.
pub struct Upstream {
    pub config: ProviderConfig,
    /// The `Host` header: the host, with the port when it is not the scheme's default.
    pub host_header: String,
    /// The request header of a chat request, built once: per request it is cloned and given
    /// its length and `accept`.
    pub chat_request: RequestHeader,
    /// This provider's API format: its request targets, credential headers and codecs.
    pub format: Box<dyn ProviderAdapter>,
    peers: ArcSwap<Vec<HttpPeer>>,
    next: AtomicUsize,
}

impl Upstream {
    pub fn new(config: ProviderConfig) -> Result<Upstream, String> {
        let default_port = if config.tls { 443 } else { 80 };
        let host_header = if config.port == default_port {
            bracket_v6(&config.host)
        } else {
            format!("{}:{}", bracket_v6(&config.host), config.port)
        };
        let format = crate::providers::adapter_for(&config);
        let chat_request = chat_request_template(&config, format.as_ref(), &host_header)
            .map_err(|e| format!("provider `{}`: cannot build its request header: {e}", config.name))?;
        let upstream = Upstream {
            chat_request,
            format,
            host_header,
            peers: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            config,
        };
        // Start-up may block; the request path never does. A failure here is retried by the
        // refresher, and requests meanwhile get a 502.
        let addrs = (upstream.config.host.as_str(), upstream.config.port)
            .to_socket_addrs()
            .map(|a| a.collect::<Vec<_>>())
            .unwrap_or_else(|e| {
                tracing::warn!(provider = %upstream.config.name, "cannot resolve {}: {e}", upstream.config.host);
                Vec::new()
            });
        upstream.set_addrs(&addrs);
        Ok(upstream)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn kind(&self) -> ProviderKind {
        self.config.kind
    }

    /// The adapter that translates for this provider, or None when the OpenAI surface splices
    /// (the provider speaks OpenAI's chat completions).
    pub fn translator(&self) -> Option<&dyn ProviderAdapter> {
        (!self.format.speaks_openai_chat()).then_some(self.format.as_ref())
    }

    /// The request header of one chat request: the template, with this request's target when
    /// the format names the model in it, the account's own key when it brought one, its length
    /// and `accept`.
    pub fn request_header(
        &self,
        model: &str,
        stream: bool,
        body_len: usize,
        account_key: Option<&str>,
    ) -> Box<RequestHeader> {
        let mut req = self.chat_request.clone();
        if let Some(key) = account_key {
            for (name, value) in self.format.auth_headers(key) {
                let _ = req.insert_header(name, value);
            }
        }
        if self.format.target_names_model() {
            let target = self.format.chat_target(&self.config.base_path, model, stream);
            match http::Uri::try_from(target) {
                Ok(uri) => req.set_uri(uri),
                Err(e) => tracing::warn!(provider = self.name(), "cannot build the request target: {e}"),
            }
        }
        let accept = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let _ = req.insert_header(http::header::ACCEPT, accept);
        let _ = req.insert_header(http::header::CONTENT_LENGTH, body_len);
        Box::new(req)
    }

    /// True when the configured host is an IP address (nothing to refresh).
    fn is_ip_literal(&self) -> bool {
        self.config.host.parse::<IpAddr>().is_ok()
    }

    fn set_addrs(&self, addrs: &[SocketAddr]) {
        let peers = addrs.iter().map(|a| self.build_peer(*a)).collect();
        self.peers.store(Arc::new(peers));
    }

    fn build_peer(&self, addr: SocketAddr) -> HttpPeer {
        // SNI is always the provider's host name: with rustls an empty SNI turns certificate
        // verification off.
        let mut peer = HttpPeer::new(addr, self.config.tls, self.config.host.clone());
        peer.options.connection_timeout = Some(self.config.connect_timeout);
        peer.options.total_connection_timeout = Some(self.config.connect_timeout);
        peer.options.idle_timeout = Some(POOL_IDLE);
        peer
    }

    /// A peer to send the next request to (round robin over the resolved addresses).
    pub fn peer(&self) -> Option<HttpPeer> {
        let peers = self.peers.load();
        if peers.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % peers.len();
        Some(peers[i].clone())
    }

    /// Resolve the host again (off the request path).
    pub async fn refresh(&self) -> std::io::Result<()> {
        if self.is_ip_literal() {
            return Ok(());
        }
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.config.host.as_str(), self.config.port))
            .await?
            .collect();
        addrs.sort();
        let current: Vec<SocketAddr> = self.peers.load().iter().filter_map(peer_addr).collect();
        if addrs != current && !addrs.is_empty() {
            self.set_addrs(&addrs);
        }
        Ok(())
    }
}

/// The fixed part of a chat request to a provider: its format's target and credential
/// headers. The client's own headers are never copied: its credential must not reach the
/// provider.
fn chat_request_template(
    config: &ProviderConfig,
    format: &dyn ProviderAdapter,
    host_header: &str,
) -> pingora::Result<RequestHeader> {
    // A target that names the model is replaced per request (`Upstream::request_header`).
    let path = format.chat_target(&config.base_path, "", false);
    let mut req = RequestHeader::build_no_case(http::Method::POST, path.as_bytes(), Some(8))?;
    req.insert_header(http::header::HOST, host_header)?;
    for (name, value) in format.auth_headers(&config.api_key) {
        req.insert_header(name, value)?;
    }
    req.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    req.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
    req.insert_header(
        http::header::USER_AGENT,
        concat!("komilion/", env!("CARGO_PKG_VERSION")),
    )?;
    Ok(req)
}

fn peer_addr(peer: &HttpPeer) -> Option<SocketAddr> {
    match &peer._address {
        pingora::protocols::l4::socket::SocketAddr::Inet(a) => Some(*a),
        _ => None,
    }
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// All providers, by name.
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
    ordered: Vec<Arc<Upstream>>,
    /// Masks every provider's key (and anything key-shaped) in what providers send back.
    pub scrubber: Arc<scrub::Scrubber>,
}

impl Upstreams {
    pub fn new(configs: &[ProviderConfig]) -> Result<Upstreams, String> {
        let ordered = configs
            .iter()
            .cloned()
            .map(|c| Upstream::new(c).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let by_name = ordered.iter().map(|u| (u.config.name.clone(), u.clone())).collect();
        let scrubber = Arc::new(scrub::Scrubber::new(configs.iter().map(|c| c.api_key.as_str())));
        Ok(Upstreams {
            by_name,
            ordered,
            scrubber,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.ordered.iter()
    }
}

/// Re-resolves every provider's host name periodically.
pub struct DnsRefresher {
    pub upstreams: Arc<Upstreams>,
    pub every: Duration,
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.every);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    for upstream in self.upstreams.iter() {
                        if let Err(e) = upstream.refresh().await {
                            tracing::warn!(provider = upstream.name(), "DNS refresh failed: {e}");
                        }
                    }
                }
            }
        }
    }
}
