//! The daemon's HTTP side: the pull-through registry (`mirror`), served with hyper.
//! `status.rs` is the one place its errors become HTTP statuses and OCI error JSON.

pub mod health;
pub mod mirror;
pub mod route;
pub mod status;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A response body: whole or streamed.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn stream(
    s: impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> Body {
    use futures_util::StreamExt;
    BodyExt::boxed_unsync(StreamBody::new(s.map(|r| r.map(hyper::body::Frame::data))))
}

/// How long a client may take to send its request head (slow clients hold a connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve `handler` on `listener` (HTTP/1.1, keep-alive) until `stop`.
pub async fn serve<H, F>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    handler: Arc<H>,
    stop: CancellationToken,
) where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = hyper::Response<Body>> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, what, "accept failed");
                    // Out of file descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        // Responses go out as a head and body frames: without TCP_NODELAY, Nagle's algorithm
        // holds the last small segment until the client's delayed ACK (40 ms per request on
        // keep-alive connections).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, what, "TCP_NODELAY");
        }
        let handler = Arc::clone(&handler);
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, std::convert::Infallible>(fut.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, what, "connection ended");
                    }
                    return;
                }
                _ = stop.cancelled() => {}
            }
            // Let a response in progress finish, briefly.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        });
    }
}
