//! The health port (`health.listen`, `--health-listen`): plain HTTP for Kubernetes probes and
//! load balancers, apart from the registry and metrics ports so that probes need no
//! credentials and keep working when those are busy.
//!
//! - `GET /healthz` (liveness): 200 while the daemon's runtime answers at all.
//! - `GET /readyz` (readiness): 200 once every server of the daemon is listening and the
//!   catalogue answers a query; 503 with the reason while starting, after a stop signal, or
//!   when the catalogue fails. A node agent that is not ready should get no new pods; a
//!   registry replica that is not ready should get no pulls.

use super::{Body, full};
use crate::store::{Catalogue, locked as lock};
use hyper::{Method, Response, StatusCode, header};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Where the daemon is in its life, as readiness reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Serving = 1,
    Stopping = 2,
}

/// What the health port reads.
pub struct Health {
    phase: AtomicU8,
    db: Arc<Mutex<Catalogue>>,
}

impl Health {
    pub fn new(db: Arc<Mutex<Catalogue>>) -> Arc<Self> {
        Arc::new(Health {
            phase: AtomicU8::new(Phase::Starting as u8),
            db,
        })
    }

    pub fn set(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::SeqCst);
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Stopping,
        }
    }

    /// Why the daemon is not ready, if it is not.
    fn not_ready(&self) -> Option<String> {
        match self.phase() {
            Phase::Starting => return Some("starting".into()),
            Phase::Stopping => return Some("stopping".into()),
            Phase::Serving => {}
        }
        // The catalogue is the one thing every request needs.
        match lock(&self.db).integrity_probe() {
            Ok(()) => None,
            Err(e) => Some(format!("catalogue: {e}")),
        }
    }

    /// Answer one request.
    pub async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let (code, text) = match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n".to_string()),
            (&Method::GET | &Method::HEAD, "/readyz") => {
                let this = Arc::clone(&self);
                // The catalogue lock may be held by a slow writer: not on the runtime.
                match tokio::task::spawn_blocking(move || this.not_ready()).await {
                    Ok(None) => (StatusCode::OK, "ready\n".to_string()),
                    Ok(Some(why)) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
                }
            }
            _ => (
                StatusCode::NOT_FOUND,
                "the health port answers GET /healthz and GET /readyz\n".to_string(),
            ),
        };
        let head = req.method() == Method::HEAD;
        let len = text.len();
        let mut r = Response::new(if head { super::empty() } else { full(text) });
        *r.status_mut() = code;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_serving_with_a_readable_catalogue() {
        let dir = tempfile::tempdir().unwrap();
        let db = Catalogue::open(&dir.path().join("catalogue.db")).unwrap();
        let h = Health::new(Arc::new(Mutex::new(db)));
        assert_eq!(h.not_ready().as_deref(), Some("starting"));
        h.set(Phase::Serving);
        assert_eq!(h.not_ready(), None);
        h.set(Phase::Stopping);
        assert_eq!(h.not_ready().as_deref(), Some("stopping"));
    }
}
