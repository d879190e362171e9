//! `GET /images` (JSON, or `?format=table`): the node's images and the `catalog:` registries'
//! (see [`crate::listing`]).

use super::{Body, full};
use crate::config::Config;
use crate::cri::containerd::Containerd;
use crate::images::Images;
use crate::listing::{self, Source};
use hyper::{Method, Response, StatusCode, header};
use std::sync::Arc;
use std::time::Duration;

pub struct ImagesListing {
    images: Arc<Images>,
    containerd: Option<Arc<Containerd>>,
    sources: Vec<Source>,
    ignore: Vec<String>,
    timeout: Duration,
}

impl ImagesListing {
    pub fn new(images: Arc<Images>, containerd: Option<Arc<Containerd>>, cfg: &Config) -> Self {
        let hosts = cfg.registry_options(None).hosts;
        let sources = cfg
            .catalog
            .iter()
            .map(|c| {
                let host = hosts.iter().find(|h| h.name == c.host());
                Source {
                    name: c.name.clone().unwrap_or_else(|| c.host().to_string()),
                    url: c.url.trim_end_matches('/').to_string(),
                    kind: c.kind,
                    secret: host.and_then(|h| h.auth.clone()),
                    tls: host.map(|h| h.tls.clone()).unwrap_or_default(),
                    page_size: c.page_size,
                }
            })
            .collect();
        ImagesListing {
            images,
            containerd,
            sources,
            ignore: cfg.images_to_ignore.clone(),
            timeout: cfg.catalog_timeout,
        }
    }

    pub fn owns(&self, path: &str) -> bool {
        path == "/images" || path == "/images/"
    }

    pub async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let table = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .any(|(k, v)| k == "format" && v == "table");
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = Response::new(full("GET /images\n"));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            return r;
        }
        let started = std::time::Instant::now();
        let l = listing::list(
            &self.images,
            self.containerd.as_deref(),
            &self.sources,
            &self.ignore,
            self.timeout,
        )
        .await;
        tracing::info!(
            node = l.node_images.len(),
            registries = l.registry_images.len(),
            errors = l.errors.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "GET /images"
        );
        let (body, ct) = if table {
            (listing::table(&l), "text/plain")
        } else {
            (
                serde_json::to_string_pretty(&l).unwrap_or_default(),
                "application/json",
            )
        };
        let mut r = Response::new(if req.method() == Method::HEAD {
            super::empty()
        } else {
            full(body)
        });
        r.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
        r
    }
}
