//! `lazypull pull IMAGE [--full]`: CRI PullImage through the daemon's socket.

use crate::cli::PullArgs;
use crate::config::Config;
use crate::cri::PULL_MODE_ANNOTATION;
use crate::registry::auth::Secret;
use crate::rpc::cri::{self, image_service_client::ImageServiceClient};
use anyhow::Context;
use std::collections::HashMap;
use std::time::Instant;

pub async fn run(cfg: &Config, args: &PullArgs) -> anyhow::Result<()> {
    let channel = crate::rpc::connect_unix(&cfg.cri.socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the daemon at {} (is `lazypull serve` running? --socket?)",
                cfg.cri.socket.display()
            )
        })?;
    let mut client = ImageServiceClient::new(channel);
    let auth = match &args.creds {
        Some(c) => match Secret::from_creds(c).context("--creds")? {
            Secret::Basic { username, password } => Some(cri::AuthConfig {
                username,
                password,
                ..Default::default()
            }),
            Secret::Bearer { token } => Some(cri::AuthConfig {
                registry_token: token,
                ..Default::default()
            }),
        },
        None => None,
    };
    let mut annotations = HashMap::new();
    if args.full {
        annotations.insert(PULL_MODE_ANNOTATION.to_string(), "full".to_string());
    }
    let started = Instant::now();
    let resp = client
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: args.image.clone(),
                annotations,
                ..Default::default()
            }),
            auth,
            sandbox_config: None,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?;
    println!("{}", resp.into_inner().image_ref);
    eprintln!(
        "pulled {} in {:.1?}{}",
        args.image,
        started.elapsed(),
        if args.full {
            ""
        } else {
            " (layers fill in the background)"
        }
    );
    Ok(())
}
