//! The peer list (`peers:`): static URLs and every address one DNS name resolves to (a
//! Kubernetes headless Service), this node's own mirror left out, kept fresh.

use crate::config::PeersConfig;
use crate::registry::{Registry, Scheme};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Whether `addr` is this node's own mirror: its port, on an address of this host (one a
/// socket can be bound to).
fn is_self(addr: &SocketAddr, own_port: Option<u16>) -> bool {
    own_port == Some(addr.port())
        && std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), 0)).is_ok()
}

/// The static peers, this node left out (a host name is kept: it cannot be told apart).
pub fn static_peers(cfg: &PeersConfig, own_port: Option<u16>) -> Vec<String> {
    cfg.urls
        .iter()
        .filter(|u| {
            let host = crate::registry::parse_endpoint(u)
                .map(|(_, h)| h)
                .unwrap_or_default();
            !host
                .parse::<SocketAddr>()
                .is_ok_and(|a| is_self(&a, own_port))
        })
        .cloned()
        .collect()
}

/// The static peers and those `dns` resolves to now (a failed lookup gives none of those).
pub async fn current(cfg: &PeersConfig, own_port: Option<u16>) -> Vec<String> {
    let mut out = static_peers(cfg, own_port);
    if cfg.dns.is_empty() {
        return out;
    }
    let scheme = match cfg.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    match tokio::net::lookup_host(&cfg.dns).await {
        Ok(addrs) => {
            let mut found: Vec<SocketAddr> = addrs.filter(|a| !is_self(a, own_port)).collect();
            found.sort();
            found.dedup();
            out.extend(found.into_iter().map(|a| format!("{scheme}://{a}")));
        }
        Err(e) => tracing::warn!(dns = %cfg.dns, error = %e, "peers: lookup failed"),
    }
    out
}

/// Resolve the peers every `refresh` until `stop`, and hand changes to the registry client.
pub async fn keep_fresh(
    registry: Arc<Registry>,
    cfg: PeersConfig,
    own_port: Option<u16>,
    stop: CancellationToken,
) {
    let mut last: Option<Vec<String>> = None;
    loop {
        let now = current(&cfg, own_port).await;
        if last.as_ref() != Some(&now) {
            tracing::info!(peers = ?now, "peers");
            registry.set_peers(&now);
            last = Some(now);
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.refresh) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_node_is_left_out() {
        let cfg = PeersConfig {
            urls: vec![
                "http://127.0.0.1:5000".into(),
                "http://127.0.0.1:5001".into(),
                "http://192.0.2.7:5000".into(),
                "http://peer.example:5000".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            static_peers(&cfg, Some(5000)),
            [
                "http://127.0.0.1:5001",
                "http://192.0.2.7:5000",
                "http://peer.example:5000"
            ]
        );
        assert_eq!(static_peers(&cfg, None).len(), 4);
    }
}
