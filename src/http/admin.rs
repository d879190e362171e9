//! The admin API (`mirror.admin_listen`), for people and scripts: what the store holds, pruning
//! of the mirror's images, and stopping the daemon. Answers are text that `column -t` lines up
//! (already aligned), or JSON with `?format=json`.
//!
//! - `GET /cmd/image/list?pattern=RE[,RE]&digest=SUBSTR&count=N`: images (a tagged or
//!   unreferenced manifest, with what it references), the node's and the mirror's;
//! - `GET /cmd/manifest/list?pattern=RE[,RE]&count=N`: every manifest and index;
//! - `GET /cmd/blob/list?substr=SUBSTR&count=N`: every blob with its reference count;
//! - `DELETE|POST /cmd/prune?type=accessed|created|pattern&dur=30d&expr=RE[,RE]&count=5&dryRun=true`:
//!   remove mirror images (not the node's: CRI and `lazypull prune` remove those);
//! - `POST|GET /cmd/stop`: a graceful stop, as SIGTERM.

use super::{Body, columns, full};
use crate::http::mirror::Mirror;
use crate::images::Images;
use crate::store::inventory::{self, Inventory, PruneBy, PruneReport};
use hyper::{Method, Response, StatusCode, header};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `count` when a prune request gives none (as the seed's API).
const DEFAULT_PRUNE_COUNT: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error(
        "no such command {0:?}: /cmd/image/list, /cmd/manifest/list, /cmd/blob/list, /cmd/prune, /cmd/stop"
    )]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Images(#[from] crate::images::ImagesError),
    #[error("the service is shutting down")]
    ShuttingDown,
}

pub struct Admin {
    store: crate::store::Store,
    images: Arc<Images>,
    mirror: Option<Arc<Mirror>>,
    token: Option<String>,
    stop: CancellationToken,
    /// One prune at a time (a request, the background task).
    pruning: tokio::sync::Mutex<()>,
}

type Query = HashMap<String, String>;

fn param<'a>(q: &'a Query, k: &str) -> Option<&'a str> {
    q.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

fn count(q: &Query, default: Option<usize>) -> Result<Option<usize>, AdminError> {
    match param(q, "count") {
        None => Ok(default),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n < 0 => Ok(None),
            Ok(n) => Ok(Some(n as usize)),
            Err(_) => Err(AdminError::BadRequest(format!(
                "count={v:?}: a number (-1: no limit)"
            ))),
        },
    }
}

/// Comma-separated regular expressions (bounded in size, as regex compiles them).
fn patterns(v: &str) -> Result<Vec<regex::Regex>, AdminError> {
    v.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            regex::RegexBuilder::new(p)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| AdminError::BadRequest(format!("pattern {p:?}: {e}")))
        })
        .collect()
}

/// `30d`, `12h`, `15m` (the seed's units: m is minutes), or anything humantime reads.
pub fn parse_dur(v: &str) -> Result<Duration, AdminError> {
    humantime::parse_duration(v)
        .map_err(|e| AdminError::BadRequest(format!("dur={v:?}: {e} (e.g. 30d, 12h, 15m)")))
}

fn time(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

fn kind(node: bool) -> String {
    if node { "node" } else { "mirror" }.to_string()
}

fn names(n: &[String]) -> String {
    if n.is_empty() {
        "<none>".into()
    } else {
        n.join(",")
    }
}

impl Admin {
    pub fn new(
        store: crate::store::Store,
        images: Arc<Images>,
        mirror: Option<Arc<Mirror>>,
        token: Option<String>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Admin {
            store,
            images,
            mirror,
            token,
            stop,
            pruning: tokio::sync::Mutex::new(()),
        })
    }

    pub async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query: Query = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
        let json = param(&query, "format") == Some("json");
        let authorized = match &self.token {
            None => true,
            Some(t) => req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|got| constant_time_eq(got.trim().as_bytes(), t.as_bytes())),
        };
        let result = if authorized {
            self.answer(&method, &path, &query, json).await
        } else {
            Err(AdminError::Unauthorized)
        };
        let (status, body, content_type) = match result {
            Ok((body, ct)) => (StatusCode::OK, body, ct),
            Err(e) => {
                let status = super::status::admin(&e);
                if status.is_server_error() {
                    tracing::warn!(%method, %path, error = %e, "admin request failed");
                }
                let body = if json {
                    serde_json::json!({ "error": e.to_string() }).to_string()
                } else {
                    format!("{e}\n")
                };
                (
                    status,
                    body,
                    if json {
                        "application/json"
                    } else {
                        "text/plain"
                    },
                )
            }
        };
        tracing::info!(%method, %path, status = status.as_u16(), "admin request");
        let mut r = Response::new(full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        r
    }

    async fn answer(
        &self,
        method: &Method,
        path: &str,
        q: &Query,
        json: bool,
    ) -> Result<(String, &'static str), AdminError> {
        let read_only = |m: &Method| {
            if m == Method::GET || m == Method::HEAD {
                Ok(())
            } else {
                Err(AdminError::MethodNotAllowed(format!("{m} {path}: use GET")))
            }
        };
        let out = match path.trim_end_matches('/') {
            "/cmd/image/list" => {
                read_only(method)?;
                self.image_list(q, json).await?
            }
            "/cmd/manifest/list" => {
                read_only(method)?;
                self.manifest_list(q, json).await?
            }
            "/cmd/blob/list" => {
                read_only(method)?;
                self.blob_list(q, json).await?
            }
            "/cmd/prune" => {
                if *method != Method::DELETE && *method != Method::POST {
                    return Err(AdminError::MethodNotAllowed(format!(
                        "{method} {path}: use DELETE or POST (dryRun=true to see what would go)"
                    )));
                }
                let by = match param(q, "type") {
                    Some("accessed") => {
                        PruneBy::Accessed(parse_dur(param(q, "dur").ok_or_else(|| {
                            AdminError::BadRequest("type=accessed needs dur (e.g. 30d)".into())
                        })?)?)
                    }
                    Some("created") => {
                        PruneBy::Created(parse_dur(param(q, "dur").ok_or_else(|| {
                            AdminError::BadRequest("type=created needs dur (e.g. 30d)".into())
                        })?)?)
                    }
                    Some("pattern") => {
                        PruneBy::Pattern(patterns(param(q, "expr").ok_or_else(|| {
                            AdminError::BadRequest("type=pattern needs expr".into())
                        })?)?)
                    }
                    other => {
                        return Err(AdminError::BadRequest(format!(
                            "type={other:?}: accessed, created or pattern"
                        )));
                    }
                };
                let dry_run = match param(q, "dryRun") {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(v) => {
                        return Err(AdminError::BadRequest(format!(
                            "dryRun={v:?}: true or false"
                        )));
                    }
                };
                let report = self
                    .prune(by, count(q, Some(DEFAULT_PRUNE_COUNT))?, dry_run)
                    .await?;
                if json {
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                } else {
                    prune_text(&report)
                }
            }
            "/cmd/stop" => {
                if *method == Method::HEAD {
                    return Err(AdminError::MethodNotAllowed(format!("{method} {path}")));
                }
                tracing::info!("stop requested through the admin API");
                self.stop.cancel();
                if json {
                    r#"{"stopping": true}"#.to_string()
                } else {
                    "stopping\n".to_string()
                }
            }
            other => return Err(AdminError::NotFound(other.to_string())),
        };
        Ok((
            out,
            if json {
                "application/json"
            } else {
                "text/plain"
            },
        ))
    }

    async fn inventory(&self) -> Result<Inventory, AdminError> {
        if let Some(m) = &self.mirror {
            m.flush_access();
        }
        let (db, layout) = (Arc::clone(&self.store.db), self.store.layout.clone());
        tokio::task::spawn_blocking(move || Inventory::load(&db, &layout))
            .await
            .map_err(|_| AdminError::ShuttingDown)?
            .map_err(AdminError::from)
    }

    async fn image_list(&self, q: &Query, json: bool) -> Result<String, AdminError> {
        let res = param(q, "pattern").map(patterns).transpose()?;
        let digest = param(q, "digest");
        let mut images: Vec<_> = self
            .inventory()
            .await?
            .images()
            .into_iter()
            .filter(|i| {
                res.as_ref().is_none_or(|res| {
                    i.names
                        .iter()
                        .chain([&i.digest])
                        .any(|n| res.iter().any(|r| r.is_match(n)))
                })
            })
            .filter(|i| digest.is_none_or(|d| i.blobs.iter().any(|b| b.contains(d))))
            .collect();
        if let Some(n) = count(q, None)? {
            images.truncate(n);
        }
        if json {
            return Ok(serde_json::to_string_pretty(&images).unwrap_or_default());
        }
        let mut rows = vec![
            [
                "NAME", "DIGEST", "KIND", "SIZE", "CREATED", "ACCESSED", "BLOBS",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for i in images {
            rows.push(vec![
                names(&i.names),
                i.digest,
                kind(i.node),
                i.size.to_string(),
                time(i.created),
                time(i.accessed),
                i.blobs.len().to_string(),
            ]);
        }
        Ok(columns(rows))
    }

    async fn manifest_list(&self, q: &Query, json: bool) -> Result<String, AdminError> {
        let res = param(q, "pattern").map(patterns).transpose()?;
        let mut manifests: Vec<_> = self
            .inventory()
            .await?
            .manifests
            .into_values()
            .filter(|m| {
                res.as_ref().is_none_or(|res| {
                    m.names
                        .iter()
                        .chain([&m.digest])
                        .any(|n| res.iter().any(|r| r.is_match(n)))
                })
            })
            .collect();
        if let Some(n) = count(q, None)? {
            manifests.truncate(n);
        }
        if json {
            return Ok(serde_json::to_string_pretty(&manifests).unwrap_or_default());
        }
        let mut rows = vec![
            [
                "DIGEST",
                "NAMES",
                "MEDIA_TYPE",
                "SIZE",
                "KIND",
                "CREATED",
                "ACCESSED",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for m in manifests {
            rows.push(vec![
                m.digest,
                names(&m.names),
                m.media_type,
                m.size.to_string(),
                kind(m.node),
                time(m.created),
                time(m.accessed),
            ]);
        }
        Ok(columns(rows))
    }

    async fn blob_list(&self, q: &Query, json: bool) -> Result<String, AdminError> {
        let substr = param(q, "substr");
        let mut blobs: Vec<_> = self
            .inventory()
            .await?
            .blobs()
            .into_iter()
            .filter(|b| substr.is_none_or(|s| b.digest.contains(s)))
            .collect();
        if let Some(n) = count(q, None)? {
            blobs.truncate(n);
        }
        if json {
            return Ok(serde_json::to_string_pretty(&blobs).unwrap_or_default());
        }
        let mut rows = vec![
            ["DIGEST", "SIZE", "REFS", "MIRROR"]
                .map(String::from)
                .to_vec(),
        ];
        for b in blobs {
            rows.push(vec![
                b.digest,
                b.size.to_string(),
                b.refs.to_string(),
                b.mirror.to_string(),
            ]);
        }
        Ok(columns(rows))
    }

    /// Remove the mirror images `by` selects (at most `count`), then collect the garbage: a
    /// blob's file goes only when no image, snapshot or running fill uses it.
    pub async fn prune(
        &self,
        by: PruneBy,
        count: Option<usize>,
        dry_run: bool,
    ) -> Result<PruneReport, AdminError> {
        let _one = self.pruning.lock().await;
        let inv = self.inventory().await?;
        let now = crate::store::now();
        let chosen = inventory::select(&inv, &by, count, now);
        let report = {
            let mut db = crate::store::locked(&self.store.db);
            inventory::forget(&mut db, &inv, chosen, &by, now, dry_run)?
        };
        let (files, bytes) = if dry_run {
            (0, 0)
        } else {
            let gc = self.images.gc().await?;
            (gc.files_removed, gc.bytes_freed)
        };
        tracing::info!(dry_run, by = ?by, images = report.images.len(), rows = report.blobs,
            orphans = report.orphans, files_removed = files, bytes_freed = bytes, "mirror prune");
        for i in &report.images {
            tracing::info!(dry_run, image = %i.digest, names = ?i.names, "mirror prune: image");
        }
        Ok(report)
    }
}

fn prune_text(r: &PruneReport) -> String {
    let mut rows = vec![
        ["NAME", "DIGEST", "SIZE", "CREATED", "ACCESSED"]
            .map(String::from)
            .to_vec(),
    ];
    for i in &r.images {
        rows.push(vec![
            names(&i.names),
            i.digest.clone(),
            i.size.to_string(),
            time(i.created),
            time(i.accessed),
        ]);
    }
    let mut out = columns(rows);
    out.push_str(&format!(
        "{} {} image(s), {} blob(s) ({} unreferenced)\n",
        if r.dry_run { "would prune" } else { "pruned" },
        r.images.len(),
        r.blobs,
        r.orphans
    ));
    out
}

/// Token comparison in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The background prune (`mirror.prune`): every `frequency`, until `stop`.
pub async fn prune_periodically(
    admin: Arc<Admin>,
    cfg: crate::config::MirrorPrune,
    stop: CancellationToken,
) {
    let by = match cfg.kind {
        crate::config::PruneKind::Accessed => PruneBy::Accessed(cfg.duration),
        crate::config::PruneKind::Created => PruneBy::Created(cfg.duration),
    };
    let count = usize::try_from(cfg.count).ok();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.frequency) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = admin.prune(by.clone(), count, cfg.dry_run).await {
            tracing::warn!(error = %e, "background mirror prune failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_params_parse() {
        let t = columns(vec![
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["long".into(), "x".into(), "y".into()],
        ]);
        assert_eq!(t, "A     BB  C\nlong  x   y\n");
        assert_eq!(parse_dur("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_dur("15m").unwrap(), Duration::from_secs(900));
        assert!(parse_dur("soon").is_err());
        let q: Query = [("count".to_string(), "-1".to_string())].into();
        assert_eq!(count(&q, Some(5)).unwrap(), None);
        assert_eq!(count(&Query::new(), Some(5)).unwrap(), Some(5));
        assert!(patterns("calico,(").is_err());
        assert_eq!(patterns("calico,cilium").unwrap().len(), 2);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
