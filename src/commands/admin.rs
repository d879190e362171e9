//! `lazypull admin images|manifests|blobs|prune|stop`: a client of the daemon's admin API;
//! `lazypull images`: a client of its `GET /images`.

use crate::cli::{AdminArgs, AdminPruneType, AdminVerb, ImagesArgs};
use crate::config::Config;
use anyhow::Context;

pub async fn run(cfg: &Config, args: &AdminArgs) -> anyhow::Result<()> {
    let base = daemon_url(
        cfg,
        args.server.as_deref(),
        &cfg.mirror.admin_listen,
        "mirror.admin_listen",
    )?;
    let mut query: Vec<(&str, String)> = vec![];
    let mut put = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            query.push((k, v));
        }
    };
    let (method, path) = match &args.verb {
        AdminVerb::Images {
            pattern,
            digest,
            count,
        } => {
            put("pattern", pattern.clone());
            put("digest", digest.clone());
            put("count", count.map(|c| c.to_string()));
            (reqwest::Method::GET, "image/list")
        }
        AdminVerb::Manifests { pattern, count } => {
            put("pattern", pattern.clone());
            put("count", count.map(|c| c.to_string()));
            (reqwest::Method::GET, "manifest/list")
        }
        AdminVerb::Blobs { substr, count } => {
            put("substr", substr.clone());
            put("count", count.map(|c| c.to_string()));
            (reqwest::Method::GET, "blob/list")
        }
        AdminVerb::Prune {
            kind,
            dur,
            expr,
            count,
            dry_run,
        } => {
            let t = match kind {
                AdminPruneType::Accessed => "accessed",
                AdminPruneType::Created => "created",
                AdminPruneType::Pattern => "pattern",
            };
            put("type", Some(t.to_string()));
            put("dur", dur.clone());
            put("expr", expr.clone());
            put("count", Some(count.to_string()));
            put("dryRun", Some(dry_run.to_string()));
            (reqwest::Method::DELETE, "prune")
        }
        AdminVerb::Stop => (reqwest::Method::POST, "stop"),
    };
    if args.json {
        query.push(("format", "json".into()));
    }
    let mut client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(600));
    if let Some(ca) = &args.cacert {
        let pem = std::fs::read(ca).with_context(|| format!("--cacert {}", ca.display()))?;
        client = client.add_root_certificate(
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("--cacert {}", ca.display()))?,
        );
    }
    let client = client.build().context("HTTP client")?;
    let mut req = client
        .request(method, format!("{base}/cmd/{path}"))
        .query(&query);
    if let Some(f) = args
        .token_file
        .as_ref()
        .or(cfg.mirror.admin_token_file.as_ref())
    {
        let token = std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?;
        req = req.bearer_auth(token.trim());
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("asking the admin API at {base}"))?;
    print_answer(resp, "the admin API").await
}

/// Print a successful answer's body (ending with a newline), or fail with it.
async fn print_answer(resp: reqwest::Response, who: &str) -> anyhow::Result<()> {
    let status = resp.status();
    let body = resp.text().await.context("reading the answer")?;
    if !status.is_success() {
        anyhow::bail!("{who} answered {status}: {}", body.trim());
    }
    print!("{body}");
    if !body.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// `lazypull images`: the daemon's `GET /images`, as a table or JSON.
pub async fn images(cfg: &Config, args: &ImagesArgs) -> anyhow::Result<()> {
    let base = daemon_url(
        cfg,
        args.server.as_deref(),
        &cfg.mirror.listen,
        "mirror.listen",
    )?;
    let url = format!(
        "{base}/images{}",
        if args.json { "" } else { "?format=table" }
    );
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(cfg.catalog_timeout * 3)
        .send()
        .await
        .with_context(|| format!("asking {url}"))?;
    print_answer(resp, &url).await
}

/// `--server URL`, else the daemon's `listen` address (`key` in the config; a wildcard address
/// is asked on loopback), over HTTPS when the mirror has TLS.
fn daemon_url(
    cfg: &Config,
    server: Option<&str>,
    listen: &str,
    key: &str,
) -> anyhow::Result<String> {
    match server {
        Some(s) => Ok(s.trim_end_matches('/').to_string()),
        None if listen.is_empty() => anyhow::bail!(
            "no daemon listener to ask: give --server URL, or set {key} in the config"
        ),
        None => Ok(format!(
            "{}://{}",
            if cfg.mirror.tls.is_some() {
                "https"
            } else {
                "http"
            },
            listen.replace("0.0.0.0", "127.0.0.1")
        )),
    }
}
