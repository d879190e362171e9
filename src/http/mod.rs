//! The daemon's HTTP side: the pull-through registry (`mirror`) and its admin API (`admin`),
//! served with hyper.
//! `status.rs` is the one place its errors become HTTP statuses and OCI error JSON.

pub mod admin;
pub mod health;
pub mod images;
pub mod mirror;
pub mod reg;
pub mod route;
pub mod status;
pub mod tls;

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

/// How long a client may take to complete a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `handler` on `listener` (HTTP/1.1, keep-alive; over TLS with `tls`) until `stop`; a
/// client gets `header_timeout` to send each request head.
pub async fn serve<H, F>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    tls: Option<tokio_rustls::TlsAcceptor>,
    header_timeout: Duration,
    handler: Arc<H>,
    stop: CancellationToken,
) where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = hyper::Response<Body>> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(s) => s,
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
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => connection(stream, what, header_timeout, handler, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => connection(s, what, header_timeout, handler, stop).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, what, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, what, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// One client connection, until it closes or `stop` (then a response in progress may
/// finish, briefly).
async fn connection<IO, H, F>(
    io: IO,
    what: &'static str,
    header_timeout: Duration,
    handler: Arc<H>,
    stop: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let fut = handler(req);
        async move { Ok::<_, std::convert::Infallible>(fut.await) }
    });
    let io = hyper_util::rt::TokioIo::new(io);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
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
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

/// Rows aligned in columns (two spaces apart), header first.
pub fn columns(rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = vec![];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let last = r.len().saturating_sub(1);
        for (i, c) in r.iter().enumerate() {
            out.push_str(c);
            if i < last {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push('\n');
    }
    out
}

/// The answer to `range` (one range, RFC 9110) over a body of `size` bytes: 200 and all of
/// it, or 206 and the range; `None` when it is unsatisfiable (416).
pub fn span(range: Option<&str>, size: u64) -> Option<(hyper::StatusCode, u64, u64)> {
    use mirror::{ByteRange, parse_range};
    match range.and_then(|r| parse_range(r, size)) {
        None => Some((hyper::StatusCode::OK, 0, size)),
        Some(ByteRange::Some(s, e)) => Some((hyper::StatusCode::PARTIAL_CONTENT, s, e.min(size))),
        Some(ByteRange::Unsatisfiable) => None,
    }
}

/// `Content-Length` of the span [start, end), and `Content-Range` when it is a 206.
pub fn span_headers(
    h: &mut hyper::HeaderMap,
    status: hyper::StatusCode,
    start: u64,
    end: u64,
    size: u64,
) {
    use hyper::header;
    h.insert(
        header::CONTENT_LENGTH,
        header::HeaderValue::from(end - start),
    );
    if status == hyper::StatusCode::PARTIAL_CONTENT
        && let Ok(v) = header::HeaderValue::from_str(&format!(
            "bytes {start}-{}/{size}",
            end.max(start + 1) - 1
        ))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
}

/// The mirror's TLS acceptor (`mirror.tls`), shared by its listener and the admin API's.
pub fn mirror_tls(
    cfg: &crate::config::Config,
) -> Result<Option<tokio_rustls::TlsAcceptor>, tls::TlsError> {
    cfg.mirror
        .tls
        .as_ref()
        .map(|t| {
            tls::acceptor(&tls::TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_auth: t.client_auth,
                client_ca: t.client_ca.clone(),
            })
        })
        .transpose()
}
