//! Helpers shared by the integration tests that drive the layer against the
//! mock server. Each test binary uses some of them.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tower::ServiceExt;
use tower::util::MapRequest;
use volt_auth::mock::{MockService, MockVolt};
use volt_auth::{Builder, VoltAuthLayer};

/// The request body every helper uses.
pub type Body = Full<Bytes>;

/// A guard against hangs: far longer than any test needs, never a synchronisation.
pub const GUARD: Duration = Duration::from_secs(60);

/// A layer builder for the mock's credentials and base URL.
pub fn builder(mock: &MockVolt) -> Builder {
    VoltAuthLayer::builder(mock.credentials()).base_url(&mock.url())
}

/// The in-process mock service taking `Full<Bytes>` request bodies only.
pub type Pinned = MapRequest<MockService, fn(Request<Body>) -> Request<Body>>;

/// The in-process mock service, its request body type pinned to `Full<Bytes>`
/// (the mock accepts any body): the `/oauth` transport and the API service.
pub fn pinned(mock: &MockVolt) -> Pinned {
    mock.service().map_request(std::convert::identity)
}

/// A layer whose `/oauth` requests go through the in-process mock.
pub fn layer(mock: &MockVolt) -> VoltAuthLayer {
    builder(mock).build(pinned(mock)).expect("layer")
}

/// `GET <mock>{path}` with an empty body.
pub fn get(mock: &MockVolt, path: &str) -> Request<Body> {
    Request::get(format!("{}{path}", mock.url()))
        .body(Body::default())
        .expect("request")
}

/// The Authorization value the mock records for `token`.
pub fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}
