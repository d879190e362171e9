//! `GET /images`: one answer with the images on this node (lazypull's store, and containerd's
//! CRI images when `--containerd-address` is set) and in each registry of the `catalog:` list
//! (docker distribution: `_catalog` + `tags/list` + manifests; Harbor: its v2.0 API), every
//! source fetched concurrently within its timeout and paginated to the end. A source that fails
//! becomes an entry in `errors` beside the others' results.

use crate::cri::containerd::Containerd;
use crate::images::Images;
use crate::registry::auth::Secret;
use futures_util::StreamExt;
use serde::Serialize;
use std::time::Duration;

/// Repositories, tags or artifacts one source may list, at most.
const MAX_ITEMS: usize = 100_000;
/// A JSON page of a registry's API, at most.
const MAX_PAGE: usize = 16 << 20;
/// Requests in flight to one source.
const PARALLEL: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Distribution,
    Harbor,
}

/// One registry to list (`catalog:` entry, with its `registries:` credentials and TLS).
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub url: String,
    pub kind: Kind,
    pub secret: Option<Secret>,
    pub tls: crate::registry::tls::ClientTls,
    pub page_size: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NodeImage {
    pub image_id: String,
    pub repository: String,
    pub tag: String,
    pub size: String,
    /// `lazypull` (its store) or `containerd` (its CRI images).
    pub source: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RegistryImage {
    pub registry: String,
    /// Harbor's project; None for a distribution registry.
    pub project: Option<String>,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    /// None for a multi-platform index.
    pub size: Option<String>,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct Listing {
    pub node_images: Vec<NodeImage>,
    /// The containerd entries of `node_images` (the name seed 002's clients read).
    pub containerd_images: Vec<NodeImage>,
    pub registry_images: Vec<RegistryImage>,
    /// The Harbor entries of `registry_images` (the name seed 002's clients read).
    pub harbor_images: Vec<RegistryImage>,
    pub errors: Vec<String>,
}

/// Sizes as crictl prints them: decimal units, three significant digits.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    let s = if i == 0 || v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[i])
}

/// The 12 hex digits crictl shows of an image id.
pub fn short_id(id: &str) -> String {
    id.strip_prefix("sha256:")
        .unwrap_or(id)
        .chars()
        .take(12)
        .collect()
}

/// Whether `id` is one of `ignore` (short or full ids, with or without `sha256:`).
pub fn ignored(id: &str, ignore: &[String]) -> bool {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    ignore.iter().any(|i| {
        let i = i.trim().strip_prefix("sha256:").unwrap_or(i.trim());
        !i.is_empty() && (i == id || (i.len() >= 12 && id.starts_with(i)))
    })
}

/// `repo:tag` split at the tag's colon (not a registry port's).
fn split_tag(name: &str) -> (String, String) {
    match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo.to_string(), tag.to_string()),
        _ => (name.to_string(), "<none>".to_string()),
    }
}

/// The URL of the next page from a `Link: <…>; rel="next"` header, resolved against `base`.
pub fn next_link(link: Option<&str>, base: &str) -> Option<String> {
    let link = link?;
    for part in link.split(',') {
        let (target, params) = part.split_once(';')?;
        if params.contains("rel=\"next\"") || params.contains("rel=next") {
            let t = target.trim().trim_start_matches('<').trim_end_matches('>');
            return Some(if t.starts_with("http://") || t.starts_with("https://") {
                t.to_string()
            } else {
                format!("{}{}", base.trim_end_matches('/'), t)
            });
        }
    }
    None
}

/// The parameters of a `WWW-Authenticate: Bearer k="v",…` challenge (a hand-written parser:
/// quoted values without escapes, as registries send them).
fn parse_challenge(h: &str) -> std::collections::HashMap<String, String> {
    let rest = h.split_once(' ').map(|(_, r)| r).unwrap_or("");
    let mut out = std::collections::HashMap::new();
    let mut s = rest;
    while let Some((k, v)) = s.split_once('=') {
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, tail) = if let Some(q) = v.strip_prefix('"') {
            match q.split_once('"') {
                Some((val, tail)) => (val, tail),
                None => (q, ""),
            }
        } else {
            match v.split_once(',') {
                Some((val, tail)) => (val, tail),
                None => (v, ""),
            }
        };
        out.insert(k, val.to_string());
        s = tail.trim_start_matches(',');
    }
    out
}

#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url}: more than {MAX_ITEMS} items")]
    TooMany { url: String },
}

fn http_err(url: &str, reason: impl ToString) -> SourceError {
    SourceError::Http {
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

/// An HTTP client for one source, and its authentication (basic, a static token, or the
/// distribution token flow on a Bearer challenge).
struct Client {
    http: reqwest::Client,
    src: Source,
    token: tokio::sync::Mutex<Option<String>>,
}

impl Client {
    fn new(src: &Source, timeout: Duration) -> Result<Client, SourceError> {
        let b = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("lazypull/", env!("CARGO_PKG_VERSION")));
        let b = src.tls.apply(b).map_err(|e| http_err(&src.url, e))?;
        Ok(Client {
            http: b.build().map_err(|e| http_err(&src.url, e))?,
            src: src.clone(),
            token: tokio::sync::Mutex::new(None),
        })
    }

    fn authed(&self, rb: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
        match (token, &self.src.secret) {
            (Some(t), _) => rb.bearer_auth(t),
            (None, Some(Secret::Basic { username, password })) => {
                rb.basic_auth(username, Some(password))
            }
            (None, Some(Secret::Bearer { token })) => rb.bearer_auth(token),
            (None, None) => rb,
        }
    }

    /// GET `url` (JSON, bounded): the body and the `Link` and `X-Total-Count` headers.
    async fn get(
        &self,
        url: &str,
        accept: &str,
    ) -> Result<(Vec<u8>, reqwest::header::HeaderMap), SourceError> {
        let token = self.token.lock().await.clone();
        let mut resp = self
            .authed(
                self.http.get(url).header("Accept", accept),
                token.as_deref(),
            )
            .send()
            .await
            .map_err(|e| http_err(url, crate::registry::error_chain(&e)))?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED
            && let Some(challenge) = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
            && challenge.to_ascii_lowercase().starts_with("bearer ")
        {
            let t = self.fetch_token(url, &challenge).await?;
            *self.token.lock().await = Some(t.clone());
            resp = self
                .authed(self.http.get(url).header("Accept", accept), Some(&t))
                .send()
                .await
                .map_err(|e| http_err(url, crate::registry::error_chain(&e)))?;
        }
        let status = resp.status();
        if !status.is_success() {
            return Err(http_err(url, status));
        }
        if resp.content_length().is_some_and(|n| n > MAX_PAGE as u64) {
            return Err(http_err(url, "answer too large"));
        }
        let headers = resp.headers().clone();
        let mut body = vec![];
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| http_err(url, e))?;
            if body.len() + chunk.len() > MAX_PAGE {
                return Err(http_err(url, "answer too large"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, headers))
    }

    /// The distribution token flow: ask the challenge's realm (with the basic credentials).
    async fn fetch_token(&self, url: &str, challenge: &str) -> Result<String, SourceError> {
        let params = parse_challenge(challenge);
        let realm = params
            .get("realm")
            .ok_or_else(|| http_err(url, "a Bearer challenge without a realm"))?;
        let mut q: Vec<(&str, &str)> = vec![];
        if let Some(s) = params.get("service") {
            q.push(("service", s));
        }
        if let Some(s) = params.get("scope") {
            q.push(("scope", s));
        }
        let resp = self
            .authed(self.http.get(realm.as_str()).query(&q), None)
            .send()
            .await
            .map_err(|e| http_err(realm, e))?;
        if !resp.status().is_success() {
            return Err(http_err(realm, resp.status()));
        }
        let v: serde_json::Value = resp.json().await.map_err(|e| http_err(realm, e))?;
        v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(str::to_string)
            .ok_or_else(|| http_err(realm, "no token in the answer"))
    }

    async fn json(
        &self,
        url: &str,
    ) -> Result<(serde_json::Value, reqwest::header::HeaderMap), SourceError> {
        let (body, h) = self.get(url, "application/json").await?;
        let v =
            serde_json::from_slice(&body).map_err(|e| http_err(url, format!("not JSON: {e}")))?;
        Ok((v, h))
    }
}

/// Every page of a distribution list (`_catalog` or `tags/list`): the strings under `key`.
async fn distribution_pages(
    c: &Client,
    first: String,
    key: &str,
) -> Result<Vec<String>, SourceError> {
    let mut out = vec![];
    let mut next = Some(first);
    while let Some(url) = next {
        let (v, h) = c.json(&url).await?;
        for s in v[key].as_array().into_iter().flatten() {
            if let Some(s) = s.as_str() {
                out.push(s.to_string());
            }
        }
        if out.len() > MAX_ITEMS {
            return Err(SourceError::TooMany { url });
        }
        next = next_link(h.get("link").and_then(|v| v.to_str().ok()), &c.src.url);
    }
    Ok(out)
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

async fn distribution(c: &Client) -> Result<Vec<RegistryImage>, SourceError> {
    let base = c.src.url.trim_end_matches('/');
    let n = c.src.page_size;
    let repos = distribution_pages(c, format!("{base}/v2/_catalog?n={n}"), "repositories").await?;
    let tags: Vec<(String, String)> = futures_util::stream::iter(repos)
        .map(|repo| async move {
            let tags =
                distribution_pages(c, format!("{base}/v2/{repo}/tags/list?n={n}"), "tags").await?;
            Ok::<_, SourceError>(
                tags.into_iter()
                    .map(|t| (repo.clone(), t))
                    .collect::<Vec<_>>(),
            )
        })
        .buffered(PARALLEL)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    if tags.len() > MAX_ITEMS {
        return Err(SourceError::TooMany {
            url: base.to_string(),
        });
    }
    futures_util::stream::iter(tags)
        .map(|(repo, tag)| async move {
            let url = format!("{base}/v2/{repo}/manifests/{tag}");
            let (body, h) = c.get(&url, MANIFEST_ACCEPT).await?;
            let digest = h
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| crate::oci::Digest::of(&body).to_string());
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let size = v["layers"].as_array().map(|ls| {
                let layers: u64 = ls.iter().filter_map(|l| l["size"].as_u64()).sum();
                human_size(layers + v["config"]["size"].as_u64().unwrap_or(0))
            });
            Ok(RegistryImage {
                registry: c.src.name.clone(),
                project: None,
                repository: repo,
                tag,
                digest,
                size,
            })
        })
        .buffered(PARALLEL)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Every page of a Harbor list (`page`, `page_size`; the last page is short, or the count
/// reaches `X-Total-Count`).
async fn harbor_pages(c: &Client, url: &str) -> Result<Vec<serde_json::Value>, SourceError> {
    let mut out = vec![];
    let size = c.src.page_size;
    for page in 1.. {
        let sep = if url.contains('?') { '&' } else { '?' };
        let (v, h) = c
            .json(&format!("{url}{sep}page={page}&page_size={size}"))
            .await?;
        let items = v.as_array().cloned().unwrap_or_default();
        let got = items.len();
        out.extend(items);
        let total = h
            .get("x-total-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if out.len() > MAX_ITEMS {
            return Err(SourceError::TooMany {
                url: url.to_string(),
            });
        }
        if got < size || got == 0 || total.is_some_and(|t| out.len() >= t) {
            break;
        }
    }
    Ok(out)
}

/// A Harbor path parameter: a repository name with a slash is encoded twice (Harbor's API).
fn harbor_param(s: &str) -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    let once = utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
    utf8_percent_encode(&once, NON_ALPHANUMERIC).to_string()
}

async fn harbor(c: &Client) -> Result<Vec<RegistryImage>, SourceError> {
    let api = format!("{}/api/v2.0", c.src.url.trim_end_matches('/'));
    let projects = harbor_pages(c, &format!("{api}/projects")).await?;
    let mut repos = vec![];
    for p in projects {
        let Some(project) = p["name"].as_str() else {
            continue;
        };
        let rs = harbor_pages(
            c,
            &format!("{api}/projects/{}/repositories", harbor_param(project)),
        )
        .await?;
        for r in rs {
            // Harbor names a repository with its project: `project/repo`.
            if let Some(full) = r["name"].as_str() {
                let rel = full
                    .strip_prefix(&format!("{project}/"))
                    .unwrap_or(full)
                    .to_string();
                repos.push((project.to_string(), rel));
            }
        }
    }
    let api = &api;
    let lists = futures_util::stream::iter(repos)
        .map(|(project, repo)| async move {
            let url = format!(
                "{api}/projects/{}/repositories/{}/artifacts?with_tag=true",
                harbor_param(&project),
                harbor_param(&repo)
            );
            let arts = harbor_pages(c, &url).await?;
            let mut out = vec![];
            for a in arts {
                let digest = a["digest"].as_str().unwrap_or_default().to_string();
                let size = a["size"].as_u64().map(human_size);
                let tags: Vec<String> = a["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["name"].as_str().map(str::to_string))
                    .collect();
                let tags = if tags.is_empty() {
                    vec!["<none>".to_string()]
                } else {
                    tags
                };
                for tag in tags {
                    out.push(RegistryImage {
                        registry: c.src.name.clone(),
                        project: Some(project.clone()),
                        repository: repo.clone(),
                        tag,
                        digest: digest.clone(),
                        size: size.clone(),
                    });
                }
            }
            Ok::<_, SourceError>(out)
        })
        .buffered(PARALLEL)
        .collect::<Vec<_>>()
        .await;
    Ok(lists
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect())
}

async fn registry_source(src: &Source, timeout: Duration) -> Result<Vec<RegistryImage>, String> {
    let c = Client::new(src, timeout).map_err(|e| e.to_string())?;
    let work = async {
        match src.kind {
            Kind::Distribution => distribution(&c).await,
            Kind::Harbor => harbor(&c).await,
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no complete answer within {timeout:?}")),
    }
}

/// The whole listing.
pub async fn list(
    images: &Images,
    containerd: Option<&Containerd>,
    sources: &[Source],
    ignore: &[String],
    timeout: Duration,
) -> Listing {
    let mut out = Listing::default();
    match images.list() {
        Ok(all) => {
            for img in all.iter().filter(|i| !ignored(&i.id, ignore)) {
                let names: Vec<&String> = if img.tags.is_empty() {
                    img.digests.iter().take(1).collect()
                } else {
                    img.tags.iter().collect()
                };
                for n in names {
                    let (repository, tag) = if n.contains('@') {
                        (
                            n.split('@').next().unwrap_or(n).to_string(),
                            "<none>".into(),
                        )
                    } else {
                        split_tag(n)
                    };
                    out.node_images.push(NodeImage {
                        image_id: short_id(&img.id),
                        repository,
                        tag,
                        size: human_size(img.size),
                        source: "lazypull".into(),
                    });
                }
            }
        }
        Err(e) => out.errors.push(format!("lazypull store: {e}")),
    }
    let registries =
        futures_util::future::join_all(sources.iter().map(|s| registry_source(s, timeout)));
    let ctd = async {
        match containerd {
            Some(c) => Some(tokio::time::timeout(timeout, c.cri_images()).await),
            None => None,
        }
    };
    let (registries, ctd) = tokio::join!(registries, ctd);
    match ctd {
        None => {}
        Some(Ok(Ok(list))) => {
            for img in list.iter().filter(|i| !ignored(&i.id, ignore)) {
                let mut names: Vec<(String, String)> =
                    img.repo_tags.iter().map(|t| split_tag(t)).collect();
                if names.is_empty() {
                    names = img
                        .repo_digests
                        .iter()
                        .take(1)
                        .map(|d| {
                            (
                                d.split('@').next().unwrap_or(d).to_string(),
                                "<none>".into(),
                            )
                        })
                        .collect();
                }
                for (repository, tag) in names {
                    let e = NodeImage {
                        image_id: short_id(&img.id),
                        repository,
                        tag,
                        size: human_size(img.size),
                        source: "containerd".into(),
                    };
                    out.containerd_images.push(e.clone());
                    out.node_images.push(e);
                }
            }
        }
        Some(Ok(Err(e))) => out.errors.push(format!("containerd: {e}")),
        Some(Err(_)) => out
            .errors
            .push(format!("containerd: no answer within {timeout:?}")),
    }
    for (src, r) in sources.iter().zip(registries) {
        match r {
            Ok(list) => {
                if src.kind == Kind::Harbor {
                    out.harbor_images.extend(list.iter().cloned());
                }
                out.registry_images.extend(list);
            }
            Err(e) => out.errors.push(format!("registry {}: {e}", src.name)),
        }
    }
    out
}

/// The listing as aligned text, for people (`?format=table`).
pub fn table(l: &Listing) -> String {
    let mut rows: Vec<Vec<String>> = vec![
        ["SOURCE", "REPOSITORY", "TAG", "IMAGE ID / DIGEST", "SIZE"]
            .map(String::from)
            .to_vec(),
    ];
    for i in &l.node_images {
        rows.push(vec![
            format!("node ({})", i.source),
            i.repository.clone(),
            i.tag.clone(),
            i.image_id.clone(),
            i.size.clone(),
        ]);
    }
    for i in &l.registry_images {
        let repo = match &i.project {
            Some(p) => format!("{p}/{}", i.repository),
            None => i.repository.clone(),
        };
        rows.push(vec![
            i.registry.clone(),
            repo,
            i.tag.clone(),
            i.digest.clone(),
            i.size.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = crate::http::columns(rows);
    for e in &l.errors {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_ids_and_links() {
        assert_eq!(human_size(117_000_000), "117MB");
        assert_eq!(human_size(2_210_000_000), "2.21GB");
        assert_eq!(human_size(5_600), "5.6kB");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(10_000), "10kB");
        assert_eq!(
            short_id("sha256:a24bb4013296f61e89ba57005a7b3e52274d8edd3ae2077d04395f806b63d83e"),
            "a24bb4013296"
        );
        let ignore = vec!["a24bb4013296".to_string(), "sha256:ffff".to_string()];
        assert!(ignored("sha256:a24bb4013296f61e", &ignore));
        assert!(
            !ignored("sha256:ffff0000", &ignore),
            "a prefix shorter than 12 must be whole"
        );
        assert_eq!(
            next_link(
                Some(r#"</v2/_catalog?last=b&n=2>; rel="next""#),
                "http://r:5000/"
            ),
            Some("http://r:5000/v2/_catalog?last=b&n=2".into())
        );
        assert_eq!(
            next_link(Some(r#"<http://x/y>; rel="prev""#), "http://r"),
            None
        );
        assert_eq!(
            split_tag("reg:5000/a/b:v1"),
            ("reg:5000/a/b".into(), "v1".into())
        );
        assert_eq!(
            split_tag("reg:5000/a/b"),
            ("reg:5000/a/b".into(), "<none>".into())
        );
        assert_eq!(harbor_param("a/b"), "a%252Fb");
        let c = parse_challenge(
            r#"Bearer realm="https://auth/token",service="reg",scope="registry:catalog:*""#,
        );
        assert_eq!(c["realm"], "https://auth/token");
        assert_eq!(c["scope"], "registry:catalog:*");
    }
}
