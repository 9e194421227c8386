//! tower-http's `FollowRedirect` stacked outside `VoltAuthLayer`, as the
//! README advises, against the in-process mock: an API path of Volt's origin
//! that redirects to another origin, which answers 401 to a request that
//! never carried the token.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{AUTHORIZATION, LOCATION};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_http::follow_redirect::FollowRedirectLayer;
use volt_auth::VoltAuthLayer;
use volt_auth::mock::{MockService, MockVolt};

type Req = Request<Full<Bytes>>;

const ELSEWHERE: &str = "elsewhere.example";

/// Volt's origin (the mock) with one extra path, `/moved`, answered 307 to
/// another origin; that origin answers 401 to everything and records the
/// `Authorization` it was sent.
#[derive(Clone)]
struct Router {
    volt: MockService,
    elsewhere: Arc<Mutex<Vec<Option<String>>>>,
}

impl Router {
    fn new(volt: &MockVolt) -> Self {
        Self {
            volt: volt.service(),
            elsewhere: Arc::default(),
        }
    }

    fn elsewhere(&self) -> Vec<Option<String>> {
        self.elsewhere.lock().unwrap().clone()
    }
}

impl Service<Req> for Router {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if request.uri().host() == Some(ELSEWHERE) {
            let seen = request
                .headers()
                .get(AUTHORIZATION)
                .map(|value| value.to_str().unwrap().to_owned());
            self.elsewhere.lock().unwrap().push(seen);
            let mut response = Response::new(Full::default());
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            return Box::pin(async move { Ok(response) });
        }
        if request.uri().path() == "/moved" {
            let mut response = Response::new(Full::default());
            *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            response.headers_mut().insert(
                LOCATION,
                format!("https://{ELSEWHERE}/login").parse().unwrap(),
            );
            return Box::pin(async move { Ok(response) });
        }
        Box::pin(self.volt.call(request))
    }
}

fn get(volt: &MockVolt, path: &str) -> Req {
    Request::get(format!("{}{path}", volt.url()))
        .body(Full::default())
        .unwrap()
}

async fn status<S>(api: &mut S, request: Req) -> StatusCode
where
    S: Service<Req, Response = Response<Full<Bytes>>, Error = BoxError>,
{
    api.ready()
        .await
        .unwrap()
        .call(request)
        .await
        .unwrap()
        .status()
}

/// `FollowRedirect` outside the auth layer (the README's order): each hop
/// goes through the layer, the other origin gets no token, and its 401 goes
/// back without a refresh or a replay.
#[tokio::test(start_paused = true)]
async fn a_redirect_layer_outside_checks_every_hop() {
    let volt = MockVolt::builder().in_process();
    let router = Router::new(&volt);
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(volt.service())
        .unwrap();
    let mut api = FollowRedirectLayer::new().layer(auth.layer(router.clone()));

    assert_eq!(status(&mut api, get(&volt, "/banks")).await, StatusCode::OK);
    assert_eq!(
        status(&mut api, get(&volt, "/moved")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(router.elsewhere(), [None]);
    assert_eq!(auth.stats().replays, 0);
    assert_eq!(volt.oauth_calls(), 1);
}
