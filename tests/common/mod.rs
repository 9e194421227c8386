//! Helpers shared by the integration tests that drive the layer against the
//! mock server. Each test binary uses some of them.
#![allow(dead_code)]

pub mod log;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::{Instant, timeout};
use tower::{BoxError, Service, ServiceExt};
use volt_auth::mock::{MockFuture, MockService, MockVolt};
use volt_auth::{Builder, VoltAuthLayer};

/// The request body every helper uses.
pub type Body = Full<Bytes>;

/// A guard against hangs: far longer than any test needs, never a synchronisation.
pub const GUARD: Duration = Duration::from_secs(60);

/// A layer builder for the mock's credentials and base URL.
pub fn builder(mock: &MockVolt) -> Builder {
    VoltAuthLayer::builder(mock.credentials()).base_url(&mock.url())
}

/// A layer whose `/oauth` requests go through the in-process mock.
pub fn layer(mock: &MockVolt) -> VoltAuthLayer {
    builder(mock).build(mock.service()).expect("layer")
}

/// Drives `service` ready and sends `request`, expecting a response.
pub async fn send<S, ReqBody, ResBody>(
    service: &mut S,
    request: Request<ReqBody>,
) -> Response<ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>, Error = BoxError>,
{
    service
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("response")
}

/// `GET /banks` through `api`, asserting 200.
pub async fn banks_ok<S, B>(api: &mut S, mock: &MockVolt)
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError>,
{
    let response = send(api, get(mock, "/banks")).await;
    assert_eq!(response.status(), http::StatusCode::OK);
}

/// `GET <mock>{path}` with an empty body.
pub fn get(mock: &MockVolt, path: &str) -> Request<Body> {
    Request::get(format!("{}{path}", mock.url()))
        .body(Body::default())
        .expect("request")
}

/// What a spawned task returned, which must be `Ok`, within [`GUARD`].
pub async fn joined<T, E: std::fmt::Debug>(task: tokio::task::JoinHandle<Result<T, E>>) -> T {
    timeout(GUARD, task)
        .await
        .expect("the task finished within the guard")
        .expect("the task did not panic")
        .expect("the task's result")
}

/// The Authorization value the mock records for `token`.
pub fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

/// The in-process mock, recording the head of every request it receives and
/// when (on tokio's clock, so paused in `start_paused` tests).
#[derive(Clone)]
pub struct Recorder {
    mock: MockService,
    seen: Arc<Mutex<Vec<(Instant, Parts)>>>,
}

impl Recorder {
    pub fn new(mock: &MockVolt) -> Self {
        Self {
            mock: mock.service(),
            seen: Arc::default(),
        }
    }

    pub fn seen(&self) -> Vec<Parts> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, parts)| parts.clone())
            .collect()
    }

    /// When each request arrived, as offsets from `start`.
    pub fn times_since(&self, start: Instant) -> Vec<Duration> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| *at - start)
            .collect()
    }
}

impl Service<Request<Body>> for Recorder {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = MockFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> MockFuture {
        let (parts, body) = request.into_parts();
        self.seen
            .lock()
            .unwrap()
            .push((Instant::now(), parts.clone()));
        self.mock.call(Request::from_parts(parts, body))
    }
}
