//! Issue 4: recovering from a 401 (invalidate exactly the rejected token,
//! refresh once, replay once), bounded `/oauth` calls against a server that
//! rejects every token, replay rules, and the token never leaving its origins.
//!
//! Exact counts against the mock Volt server, over real TCP on 127.0.0.1 or in
//! process. Time-dependent tests use tokio's paused clock with the in-process
//! mock only; `/oauth` is held open with `hold_oauth()` and `wait_for(n)`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use volt_auth::mock::{self, MockFuture, MockService, MockVolt};
use volt_auth::{ConfigError, DefaultReplay, NoReplay, VoltAuth, VoltAuthLayer};

mod common;

use common::{Body, GUARD, Recorder, banks_ok, bearer, builder, get, joined, layer, send};
type HttpClient = Client<HttpConnector, Body>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The mock's answer to a request with a missing, revoked or rejected token.
const UNAUTHORIZED_BODY: &str = r#"{"code":401,"message":"Unauthorized"}"#;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn payment(mock: &MockVolt, body: &[u8]) -> Request<Body> {
    Request::post(format!("{}/v2/payments", mock.url()))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request")
}

async fn body_of<B>(response: Response<B>) -> (StatusCode, http::HeaderMap, Bytes)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, bytes)
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("JSON body")
}

/// Asserts `response` is the mock's 401, as it came.
async fn assert_unchanged_401<B>(response: Response<B>)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (status, headers, body) = body_of(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[WWW_AUTHENTICATE], "Bearer");
    assert_eq!(headers[CONTENT_TYPE], "application/json");
    assert_eq!(body, UNAUTHORIZED_BODY);
}

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http::<Body>()
}

/// A request body that arrives in chunks, of unknown size: it cannot be
/// reproduced, so it is never replayed.
struct Chunks(VecDeque<Bytes>);

impl Chunks {
    fn new(chunks: &[&'static [u8]]) -> Self {
        Self(chunks.iter().map(|c| Bytes::from_static(c)).collect())
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

// ---------------------------------------------------------------------------------------------
// 401 → one refresh → one replay
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn revoked_token_payment_is_replayed_once_with_the_same_bytes_over_tcp() {
    let mock = MockVolt::start().await.expect("mock");
    let client = http_client();
    let auth = builder(&mock).build(client.clone()).expect("layer");
    let mut api = ServiceBuilder::new().layer(auth.clone()).service(client);

    let (status, _, _) = body_of(send(&mut api, get(&mock, "/banks")).await).await;
    assert_eq!(status, StatusCode::OK);
    mock.revoke_access_tokens();

    let body: &[u8] = br#"{"currencyCode":"GBP","amount":12345,"type":"SERVICES","uniqueReference":"order-42","payer":{"reference":"payer-7"}}"#;
    let (status, _, answer) = body_of(send(&mut api, payment(&mock, body)).await).await;
    assert_eq!(status, StatusCode::CREATED);
    let answer = json(&answer);
    assert_eq!(answer["digest"], mock::payment_digest(body));
    assert_eq!(answer["size"], body.len());

    // The server saw the same bytes twice: answered 401, then 201.
    assert_eq!(
        mock.payment_bodies(),
        [Bytes::copy_from_slice(body), Bytes::copy_from_slice(body)]
    );
    assert_eq!(mock.unauthorized(), 1);
    assert_eq!(mock.api_calls(), 3);
    // Exactly one extra /oauth call: the refresh grant.
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(mock.refresh_grants(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );
    let stats = auth.stats();
    assert_eq!(stats.replays, 1);
    assert_eq!(stats.refreshes, 2);
}

#[tokio::test]
async fn revoked_access_and_refresh_tokens_recover_with_one_password_grant() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    banks_ok(&mut api, &mock).await;
    mock.revoke_access_tokens();
    mock.revoke_refresh_tokens();

    let body = br#"{"amount":1}"#;
    let response = send(&mut api, payment(&mock, body)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        mock.payment_bodies(),
        [Bytes::from_static(body), Bytes::from_static(body)]
    );
    // Password, refresh (rejected), password: one renewal, within one flight.
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.password_grants(), 2);
    let stats = auth.stats();
    assert_eq!(stats.refresh.rejected, 1);
    assert_eq!(stats.password.succeeded, 2);
    assert_eq!(stats.replays, 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );
}

#[tokio::test]
async fn string_and_known_empty_bodies_are_replayed() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service_for());
    let body = String::from(r#"{"amount":250,"currencyCode":"EUR"}"#);
    let request = Request::post(format!("{}/v2/payments", mock.url()))
        .header(CONTENT_TYPE, "application/json")
        .body(body.clone())
        .expect("request");
    let response = send(&mut api, request.clone()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    mock.revoke_access_tokens();
    let response = send(&mut api, request).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.payment_bodies(), vec![Bytes::from(body); 3]);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );

    // A boxed body known to be empty.
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service_for());
    let empty_get = || {
        let empty: BoxBody<Bytes, Infallible> = Empty::new().boxed();
        Request::get(format!("{}/banks", mock.url()))
            .body(empty)
            .expect("request")
    };
    assert_eq!(send(&mut api, empty_get()).await.status(), StatusCode::OK);
    mock.revoke_access_tokens();
    assert_eq!(send(&mut api, empty_get()).await.status(), StatusCode::OK);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrent 401s
// ---------------------------------------------------------------------------------------------

/// An API service that holds every answer until `first_round` answers have
/// arrived, so that a burst of requests all reach the server (with the token
/// they were given) before the layer sees any 401; later answers pass at once.
/// Counts the 401s it sees.
#[derive(Clone)]
struct Rendezvous<S> {
    inner: S,
    arrived: Arc<watch::Sender<usize>>,
    first_round: usize,
    unauthorized: Arc<AtomicUsize>,
}

impl<S> Rendezvous<S> {
    fn new(inner: S, first_round: usize) -> Self {
        Self {
            inner,
            arrived: Arc::new(watch::channel(0).0),
            first_round,
            unauthorized: Arc::default(),
        }
    }

    fn unauthorized(&self) -> usize {
        self.unauthorized.load(Ordering::SeqCst)
    }
}

impl<S, B> Service<Request<Body>> for Rendezvous<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<B>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let future = self.inner.call(request);
        let arrived = self.arrived.clone();
        let first_round = self.first_round;
        let unauthorized = self.unauthorized.clone();
        Box::pin(async move {
            let response = future.await.map_err(Into::into)?;
            if response.status() == StatusCode::UNAUTHORIZED {
                unauthorized.fetch_add(1, Ordering::SeqCst);
            }
            arrived.send_modify(|n| *n += 1);
            let mut all = arrived.subscribe();
            let _ = all.wait_for(|n| *n >= first_round).await;
            Ok(response)
        })
    }
}

const HUNDRED: usize = 100;

fn numbered_body(i: usize) -> Vec<u8> {
    format!(r#"{{"amount":{i},"uniqueReference":"order-{i}"}}"#).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_requests_after_a_revocation_cost_one_oauth_call_over_tcp() {
    let mock = MockVolt::start().await.expect("mock");
    let client = http_client();
    let auth = builder(&mock).build(client.clone()).expect("layer");
    let warm_up = send(&mut auth.layer(client.clone()), get(&mock, "/banks")).await;
    assert_eq!(body_of(warm_up).await.0, StatusCode::OK);
    mock.revoke_access_tokens();

    // All 100 requests reach the server with the revoked token before the layer
    // sees any of their 401s; the one renewal is held open until all of them
    // wait for it.
    let rendezvous = Rendezvous::new(client, HUNDRED);
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .service(rendezvous.clone());
    let hold = mock.hold_oauth();
    let tasks: Vec<_> = (0..HUNDRED)
        .map(|i| {
            let api = api.clone();
            let request = payment(&mock, &numbered_body(i));
            tokio::spawn(async move {
                let response = api.oneshot(request).await?;
                let (status, _, body) = body_of(response).await;
                Ok::<_, BoxError>((status, body))
            })
        })
        .collect();
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("renewal held");
    assert_eq!(mock.unauthorized(), HUNDRED);
    assert_eq!(mock.oauth_calls(), 2);
    hold.release();

    for (i, task) in tasks.into_iter().enumerate() {
        let (status, body) = joined(task).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(
            json(&body)["digest"],
            mock::payment_digest(&numbered_body(i))
        );
    }
    assert_eq!(mock.oauth_calls(), 2, "one /oauth call for 100 401s");
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.max_oauth_in_flight(), 1);
    assert_eq!(mock.api_calls(), 1 + 2 * HUNDRED);
    assert_eq!(mock.unauthorized(), HUNDRED);
    assert_eq!(rendezvous.unauthorized(), HUNDRED);
    let stats = auth.stats();
    assert_eq!(stats.replays, HUNDRED as u64);
    assert_eq!(stats.refreshes, 2);

    assert_eq!(mock.issued_access_tokens().len(), 2);
    assert_eq!(mock.api_authorizations().len(), 1 + 2 * HUNDRED);
    assert_eq!(mock.payment_bodies().len(), 2 * HUNDRED);
    assert_hundred_replayed_with_the_second_token(&mock);
}

/// The first call and the hundred payments carried the first token, their
/// replays the second; every payment body went out twice, byte for byte.
fn assert_hundred_replayed_with_the_second_token(mock: &MockVolt) {
    let issued = mock.issued_access_tokens();
    let authorizations = mock.api_authorizations();
    assert!(
        authorizations[..=HUNDRED]
            .iter()
            .all(|a| *a == bearer(&issued[0]))
    );
    assert!(
        authorizations[HUNDRED + 1..]
            .iter()
            .all(|a| *a == bearer(&issued[1]))
    );
    let bodies = mock.payment_bodies();
    for i in 0..HUNDRED {
        let expected = numbered_body(i);
        assert_eq!(bodies.iter().filter(|b| **b == expected).count(), 2);
    }
}

/// Holds the response to requests carrying `x-gate` until the gate opens, and
/// reports when it holds one.
#[derive(Clone)]
struct Gated {
    mock: MockService,
    arrived: Arc<watch::Sender<usize>>,
    open: watch::Receiver<bool>,
}

impl Service<Request<Body>> for Gated {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let gated = request.headers().contains_key("x-gate");
        let future = self.mock.call(request);
        let arrived = self.arrived.clone();
        let mut open = self.open.clone();
        Box::pin(async move {
            let response = future.await?;
            if gated {
                arrived.send_modify(|n| *n += 1);
                let _ = open.wait_for(|open| *open).await;
            }
            Ok(response)
        })
    }
}

#[tokio::test]
async fn a_late_401_for_an_old_token_invalidates_nothing() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let (arrived, mut arrived_rx) = watch::channel(0usize);
    let (open, open_rx) = watch::channel(false);
    let gated = Gated {
        mock: mock.service(),
        arrived: Arc::new(arrived),
        open: open_rx,
    };
    let mut api = auth.layer(gated);
    banks_ok(&mut api, &mock).await;
    mock.revoke_access_tokens();

    // B is rejected with the old token, but its 401 is held back.
    let mut late = payment(&mock, b"late");
    late.headers_mut()
        .insert("x-gate", HeaderValue::from_static("1"));
    let b = tokio::spawn(api.clone().oneshot(late));
    timeout(GUARD, arrived_rx.wait_for(|n| *n == 1))
        .await
        .expect("B rejected")
        .expect("watch");

    // A is rejected with the old token too, renews it and is replayed.
    let response = send(&mut api, payment(&mock, b"early")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.oauth_calls(), 2);

    // B's 401 arrives now, for a token the cache no longer holds: B is replayed
    // with the newer token at once, and nothing is invalidated.
    open.send_replace(true);
    let response = b.await.expect("task").expect("response");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 2);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    assert_eq!(
        mock.api_authorizations(),
        [
            bearer(&issued[0]), // warm-up
            bearer(&issued[0]), // B, 401 held back
            bearer(&issued[0]), // A, 401
            bearer(&issued[1]), // A, replayed
            bearer(&issued[1]), // B, replayed
        ]
    );
    // The newer token is still in use.
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// A server that rejects every token
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_server_rejecting_every_token_costs_one_forced_refresh_per_backoff_period() {
    let mock = MockVolt::builder().in_process();
    mock.reject_all_tokens(true);
    let auth = builder(&mock)
        .backoff(Duration::from_secs(1), Duration::from_secs(60))
        .build(mock.service())
        .expect("layer");
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();

    // The first request: a password grant, the 401, one forced refresh, one
    // replay, and the second 401 goes back to the caller.
    assert_unchanged_401(send(&mut api, payment(&mock, b"first")).await).await;
    assert_eq!(mock.api_calls(), 2);
    assert_eq!(mock.payment_bodies(), [&b"first"[..], &b"first"[..]]);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(auth.stats().replays, 1);

    // 25 more in the same instant: no newer token may be had (the forced
    // refresh is throttled), so each is sent once and its 401 returned.
    for _ in 0..25 {
        assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
    }
    assert_eq!(mock.api_calls(), 27);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 1);

    // Until the 1 s period is over, still nothing.
    sleep_until(t0 + ms(999)).await;
    assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
    assert_eq!(mock.api_calls(), 28);
    assert_eq!(mock.oauth_calls(), 2);

    // Once it is: exactly one more forced refresh, and that request is replayed.
    sleep_until(t0 + ms(1000)).await;
    assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
    assert_eq!(mock.api_calls(), 30);
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 2);
    assert_eq!(auth.stats().replays, 2);
    for _ in 0..25 {
        assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
    }
    assert_eq!(mock.api_calls(), 55);
    assert_eq!(mock.oauth_calls(), 3);

    // The period doubles while the server keeps rejecting: 2 s.
    sleep_until(t0 + ms(2999)).await;
    assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
    assert_eq!(mock.oauth_calls(), 3);
    sleep_until(t0 + ms(3000)).await;
    assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
    assert_eq!(mock.oauth_calls(), 4);
    assert_eq!(mock.api_calls(), 58);
    assert_eq!(auth.stats().replays, 3);

    // Every request carried the newest token the layer had.
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 4);
    let authorizations = mock.api_authorizations();
    assert_eq!(authorizations[0], bearer(&issued[0]));
    assert!(
        authorizations[1..29]
            .iter()
            .all(|a| *a == bearer(&issued[1]))
    );
    assert!(
        authorizations[29..56]
            .iter()
            .all(|a| *a == bearer(&issued[2]))
    );
    assert_eq!(authorizations[56], bearer(&issued[2]));
    assert_eq!(authorizations[57], bearer(&issued[3]));

    // Once the server accepts tokens again, requests succeed with the last one.
    mock.reject_all_tokens(false);
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 4);
}

/// An answer no token check stands behind: a 5xx from a gateway, a 429 or a
/// 408 from the edge, a 407 from a proxy. `/busy` gets the first, without
/// reaching the mock; everything else goes to the mock.
fn with_edge_answers(
    mock: &MockVolt,
    status: StatusCode,
) -> impl Service<Request<Body>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone + use<>
{
    let inner = mock.service();
    tower::service_fn(move |request: Request<Body>| {
        let mut inner = inner.clone();
        Box::pin(async move {
            if request.uri().path() == "/busy" {
                let mut answer = Response::new(Full::default());
                *answer.status_mut() = status;
                return Ok(answer);
            }
            inner.call(request).await
        }) as BoxFuture<_>
    })
}

/// While Volt rejects every new token, a gateway's 503 (or an edge's 429,
/// 408, a proxy's 407) to a request carrying a forced token says nothing
/// about the token: it must not end the throttle's escalation, or forced
/// refreshes fall back to one per backoff minimum for as long as the
/// rejections last.
#[tokio::test(start_paused = true)]
async fn an_answer_no_token_check_stands_behind_does_not_end_the_throttles_escalation() {
    for status in [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::BAD_GATEWAY,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::REQUEST_TIMEOUT,
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
    ] {
        let mock = MockVolt::builder().in_process();
        mock.reject_all_tokens(true);
        let auth = builder(&mock)
            .backoff(Duration::from_secs(1), Duration::from_secs(60))
            .build(mock.service())
            .expect("layer");
        let mut api = auth.layer(with_edge_answers(&mock, status));
        let t0 = Instant::now();

        assert_unchanged_401(send(&mut api, payment(&mock, b"first")).await).await;
        assert_eq!(mock.oauth_calls(), 2, "{status}");
        sleep_until(t0 + ms(1000)).await;
        assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
        assert_eq!(mock.oauth_calls(), 3, "{status}");

        // The forced token meets the gateway, not Volt's token check.
        let busy = send(&mut api, get(&mock, "/busy")).await;
        assert_eq!(busy.status(), status);

        // The period doubled to 2 s, and stays doubled.
        sleep_until(t0 + ms(2999)).await;
        assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
        assert_eq!(mock.oauth_calls(), 3, "{status}: the escalation was ended");
        sleep_until(t0 + ms(3000)).await;
        assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
        assert_eq!(mock.oauth_calls(), 4, "{status}");
        assert_eq!(auth.stats().replays, 3, "{status}");

        // A 200 to a forced token still ends it: the next 401 waits the
        // minimum again.
        mock.reject_all_tokens(false);
        banks_ok(&mut api, &mock).await;
        mock.reject_all_tokens(true);
        sleep_until(t0 + ms(4000)).await;
        assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
        assert_eq!(mock.oauth_calls(), 5, "{status}");
    }
}

/// The 401 throttle is for a server that rejects every token. A token the
/// server accepted and later revoked is renewed and the request replayed, however
/// many such revocations came before (here one every 10 s).
#[tokio::test(start_paused = true)]
async fn every_revocation_of_an_accepted_token_is_recovered() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock); // backoff 1 s .. 60 s
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;
    for n in 0..8u64 {
        sleep_until(t0 + Duration::from_secs(10 * n)).await;
        mock.revoke_access_tokens();
        let body = format!(r#"{{"revocation":{n}}}"#);
        let response = send(&mut api, payment(&mock, body.as_bytes())).await;
        assert_eq!(
            response.status(),
            StatusCode::CREATED,
            "revocation {n}, {} s after the first",
            10 * n
        );
        // The renewed token is accepted by the server.
        banks_ok(&mut api, &mock).await;
        assert_eq!(mock.oauth_calls() as u64, 2 + n);
        assert_eq!(auth.stats().replays, n + 1);
    }
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(mock.refresh_grants(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_to_a_server_rejecting_every_token_get_one_replay_each() {
    let mock = MockVolt::builder().in_process();
    // A long throttle period, so that wall-clock time cannot open a second one.
    let auth = builder(&mock)
        .backoff(Duration::from_secs(30), Duration::from_secs(60))
        .build(mock.service())
        .expect("layer");
    let warm_up = send(&mut auth.layer(mock.service()), get(&mock, "/banks")).await;
    assert_eq!(warm_up.status(), StatusCode::OK);
    mock.reject_all_tokens(true);

    let rendezvous = Rendezvous::new(mock.service(), HUNDRED);
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .service(rendezvous.clone());
    let hold = mock.hold_oauth();
    let tasks: Vec<_> = (0..HUNDRED)
        .map(|i| {
            let api = api.clone();
            let request = payment(&mock, &numbered_body(i));
            tokio::spawn(api.oneshot(request))
        })
        .collect();
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("renewal held");
    assert_eq!(mock.unauthorized(), HUNDRED);
    hold.release();
    for task in tasks {
        let response = joined(task).await;
        assert_unchanged_401(response).await;
    }
    // One forced refresh; each request replayed once with its result.
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.api_calls(), 1 + 2 * HUNDRED);
    assert_eq!(rendezvous.unauthorized(), 2 * HUNDRED);
    assert_eq!(auth.stats().replays, HUNDRED as u64);
    assert_hundred_replayed_with_the_second_token(&mock);

    // Right after, still inside the throttle period: each request is sent once
    // and its 401 returned, with no /oauth call.
    let tasks: Vec<_> = (0..HUNDRED)
        .map(|_| tokio::spawn(api.clone().oneshot(get(&mock, "/banks"))))
        .collect();
    for task in tasks {
        assert_unchanged_401(task.await.expect("task").expect("response")).await;
    }
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.api_calls(), 1 + 3 * HUNDRED);
    assert_eq!(auth.stats().replays, HUNDRED as u64);
}

/// One request through `api` with the first token; then Volt revokes it, and
/// the next `/oauth` call fails with a 503.
async fn revoked_with_a_failing_refresh(mock: &MockVolt, api: &mut VoltAuth<MockService>) {
    banks_ok(api, mock).await;
    mock.revoke_access_tokens();
    mock.fail_oauth(
        1,
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"code":503,"message":"Service Unavailable"}"#,
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_returns_the_401_unchanged() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock); // backoff 1 s .. 60 s
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    revoked_with_a_failing_refresh(&mock, &mut api).await;

    // The renewal fails: the 401 goes back as it came, not replayed.
    assert_unchanged_401(send(&mut api, payment(&mock, b"once")).await).await;
    assert_eq!(mock.payment_bodies(), [&b"once"[..]]);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().refresh.failed, 1);
    assert_eq!(auth.stats().replays, 0);

    // During the backoff the rejected token is not used again: the caller gets
    // the refresh's error, without another /oauth call.
    let error = api
        .ready()
        .await
        .expect("ready")
        .call(get(&mock, "/banks"))
        .await
        .expect_err("no valid token");
    let error = error
        .downcast_ref::<volt_auth::Error>()
        .expect("a volt_auth::Error");
    assert_eq!(error.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!error.is_rejected());
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.api_calls(), 2);

    // After the first backoff (at most 1 s): renewed with the password grant
    // (the refresh grant failed last), and the request succeeds.
    sleep_until(t0 + ms(1001)).await;
    assert_eq!(
        send(&mut api, payment(&mock, b"again")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.password_grants(), 2);
    let issued = mock.issued_access_tokens();
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
}

#[tokio::test(start_paused = true)]
async fn a_future_polled_again_after_returning_a_401_sends_nothing() {
    let mock = MockVolt::builder().in_process();
    let mut api = layer(&mock).layer(mock.service());
    revoked_with_a_failing_refresh(&mock, &mut api).await;
    api.ready().await.expect("ready");
    let mut future = Box::pin(api.call(payment(&mock, b"once")));
    assert_unchanged_401(future.as_mut().await.expect("the 401")).await;

    // Polling past completion breaks the future's contract, but must not send
    // the kept copy (without a token) a second time.
    let again = poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
    assert!(matches!(again, Poll::Ready(Err(_))));
    assert_eq!(mock.api_calls(), 2);
    assert_eq!(mock.payment_bodies(), [&b"once"[..]]);
}

#[tokio::test]
async fn a_401_after_every_layer_and_service_is_dropped_goes_back_unchanged() {
    let mock = MockVolt::builder().in_process();
    let mut api = layer(&mock).layer(mock.service());
    banks_ok(&mut api, &mock).await;
    mock.revoke_access_tokens();
    // `oneshot` drops the service, the last owner of the token cache, as soon
    // as the request is sent: no cache is left to renew the token with.
    let response = api.oneshot(payment(&mock, b"once")).await.expect("the 401");
    assert_unchanged_401(response).await;
    assert_eq!(mock.payment_bodies(), [&b"once"[..]]);
    assert_eq!(mock.oauth_calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// Bodies that are not replayed
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_streaming_body_is_sent_once_and_the_next_request_gets_the_new_token() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock); // DefaultReplay
    let mut api = auth.layer(mock.service_for());
    let boxed = |body: Chunks| -> BoxBody<Bytes, Infallible> { body.boxed() };
    let post = |body: BoxBody<Bytes, Infallible>| {
        Request::post(format!("{}/v2/payments", mock.url()))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .expect("request")
    };
    let warm_up = Request::get(format!("{}/banks", mock.url()))
        .body(boxed(Chunks::new(&[])))
        .expect("request");
    assert_eq!(send(&mut api, warm_up).await.status(), StatusCode::OK);
    mock.revoke_access_tokens();

    let chunks: &[&'static [u8]] = &[b"{\"amount\":", b"100,", b"\"currencyCode\":\"GBP\"}"];
    let whole = Bytes::from_static(b"{\"amount\":100,\"currencyCode\":\"GBP\"}");
    let response = send(&mut api, post(boxed(Chunks::new(chunks)))).await;
    assert_unchanged_401(response).await;
    assert_eq!(
        mock.payment_bodies(),
        std::slice::from_ref(&whole),
        "sent once"
    );
    assert_eq!(mock.api_calls(), 2);
    assert_eq!(auth.stats().replays, 0);

    let response = send(&mut api, post(boxed(Chunks::new(chunks)))).await;
    let (status, _, answer) = body_of(response).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(json(&answer)["digest"], mock::payment_digest(&whole));
    assert_eq!(mock.payment_bodies(), [whole.clone(), whole]);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );
    assert_eq!(auth.stats().replays, 0);
}

#[tokio::test]
async fn no_replay_returns_the_401_and_the_next_request_succeeds() {
    // NoReplay works with any body type, here a plain Full body…
    let mock = MockVolt::builder().in_process();
    let auth = builder(&mock)
        .replay(NoReplay)
        .build(mock.service())
        .expect("layer");
    let mut api = auth.layer(mock.service());
    banks_ok(&mut api, &mock).await;
    mock.revoke_access_tokens();
    assert_unchanged_401(send(&mut api, payment(&mock, b"{\"a\":1}")).await).await;
    assert_eq!(mock.payment_bodies(), [&b"{\"a\":1}"[..]]);
    let response = send(&mut api, payment(&mock, b"{\"a\":2}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 0);
    assert_eq!(
        mock.payment_bodies(),
        [&b"{\"a\":1}"[..], &b"{\"a\":2}"[..]]
    );
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );

    // …and a streaming one.
    let mock = MockVolt::builder().in_process();
    let auth = builder(&mock)
        .replay(NoReplay)
        .build(mock.service())
        .expect("layer");
    let mut api = auth.layer(mock.service_for());
    let post = |chunks: &[&'static [u8]]| {
        Request::post(format!("{}/v2/payments", mock.url()))
            .body(Chunks::new(chunks))
            .expect("request")
    };
    assert_eq!(
        send(&mut api, post(&[b"{\"a\":", b"3}"])).await.status(),
        StatusCode::CREATED
    );
    mock.revoke_access_tokens();
    assert_unchanged_401(send(&mut api, post(&[b"{\"a\":", b"4}"])).await).await;
    let response = send(&mut api, post(&[b"{\"a\":", b"5}"])).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 0);
    assert_eq!(
        mock.payment_bodies(),
        [&b"{\"a\":3}"[..], &b"{\"a\":4}"[..], &b"{\"a\":5}"[..]]
    );
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );
}

#[tokio::test]
async fn replay_size_limit_and_custom_policies() {
    let limited = |mock: &MockVolt| {
        builder(mock)
            .replay(DefaultReplay::new().max_size(8))
            .build(mock.service())
            .expect("layer")
    };
    // Over the limit (12 bytes): sent once, the 401 returned.
    let mock = MockVolt::builder().in_process();
    let auth = limited(&mock);
    let mut api = auth.layer(mock.service());
    banks_ok(&mut api, &mock).await;
    mock.revoke_access_tokens();
    assert_unchanged_401(send(&mut api, payment(&mock, b"{\"amount\":9}")).await).await;
    assert_eq!(mock.payment_bodies(), [&b"{\"amount\":9}"[..]]);
    assert_eq!(auth.stats().replays, 0);

    // Within it (7 bytes): replayed.
    let mock = MockVolt::builder().in_process();
    let auth = limited(&mock);
    let mut api = auth.layer(mock.service());
    banks_ok(&mut api, &mock).await;
    mock.revoke_access_tokens();
    let response = send(&mut api, payment(&mock, b"{\"a\":9}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        mock.payment_bodies(),
        [&b"{\"a\":9}"[..], &b"{\"a\":9}"[..]]
    );
    assert_eq!(auth.stats().replays, 1);
    assert_eq!(mock.oauth_calls(), 2);

    // A closure policy, without a size limit.
    let mock = MockVolt::builder().in_process();
    let auth = builder(&mock)
        .replay(|body: &Body| Some(body.clone()))
        .build(mock.service())
        .expect("layer");
    let mut api = auth.layer(mock.service());
    banks_ok(&mut api, &mock).await;
    mock.revoke_access_tokens();
    let big = vec![b'7'; 4096];
    let response = send(&mut api, payment(&mock, &big)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.payment_bodies(), vec![Bytes::from(big); 2]);
    assert_eq!(auth.stats().replays, 1);
    assert_eq!(mock.oauth_calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// What a replay keeps, and when it is sent
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct TraceId(u64);

#[tokio::test]
async fn a_replay_keeps_method_uri_version_headers_and_extensions() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let recorder = Recorder::new(&mock);
    let mut api = auth.layer(recorder.clone());
    let warm_up = get(&mock, "/banks");
    assert_eq!(send(&mut api, warm_up).await.status(), StatusCode::OK);
    mock.revoke_access_tokens();

    let body: &[u8] = br#"{"amount":4200,"currencyCode":"EUR"}"#;
    let uri = format!("{}/v2/payments?reference=abc&x=1", mock.url());
    let request = Request::builder()
        .method(Method::POST)
        .uri(&uri)
        .version(Version::HTTP_10)
        .header(CONTENT_TYPE, "application/json")
        .header("idempotency-key", "5f0c3e1a-idem")
        .header("x-custom", "kept")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .extension(TraceId(42))
        .body(Full::new(Bytes::from_static(body)))
        .expect("request");
    let (status, _, answer) = body_of(send(&mut api, request).await).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(json(&answer)["digest"], mock::payment_digest(body));

    let seen = recorder.seen();
    assert_eq!(seen.len(), 3);
    let (first, replay) = (&seen[1], &seen[2]);
    let issued = mock.issued_access_tokens();
    for (parts, token) in [(first, &issued[0]), (replay, &issued[1])] {
        assert_eq!(parts.method, Method::POST);
        assert_eq!(parts.uri.to_string(), uri);
        assert_eq!(parts.version, Version::HTTP_10);
        assert_eq!(parts.headers["x-custom"], "kept");
        assert_eq!(parts.headers["idempotency-key"], "5f0c3e1a-idem");
        let multi: Vec<_> = parts.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        assert_eq!(parts.extensions.get::<TraceId>(), Some(&TraceId(42)));
        let authorization: Vec<_> = parts.headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(authorization.len(), 1);
        assert_eq!(authorization[0], &format!("Bearer {token}"));
        assert!(authorization[0].is_sensitive());
    }
    let without_token = |parts: &Parts| {
        let mut headers = parts.headers.clone();
        headers.remove(AUTHORIZATION);
        headers
    };
    assert_eq!(without_token(first), without_token(replay));
    assert_eq!(
        mock.payment_bodies(),
        [Bytes::from_static(body), Bytes::from_static(body)]
    );
    assert_eq!(auth.stats().replays, 1);
}

/// A service that must be polled ready before each call: a clone starts
/// unready, as tower's contract allows. Counts polls, calls and calls made
/// without readiness.
struct Strict {
    inner: MockService,
    ready: bool,
    counts: Arc<StrictCounts>,
}

#[derive(Default)]
struct StrictCounts {
    polls: AtomicUsize,
    calls: AtomicUsize,
    unready_calls: AtomicUsize,
}

impl Clone for Strict {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            ready: false,
            counts: self.counts.clone(),
        }
    }
}

impl Service<Request<Body>> for Strict {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = MockFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.counts.polls.fetch_add(1, Ordering::SeqCst);
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> MockFuture {
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        if !std::mem::replace(&mut self.ready, false) {
            self.counts.unready_calls.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.call(request)
    }
}

#[tokio::test]
async fn every_call_including_replays_is_made_on_a_service_polled_ready() {
    let mock = MockVolt::builder().in_process();
    let counts = Arc::new(StrictCounts::default());
    let strict = Strict {
        inner: mock.service(),
        ready: false,
        counts: counts.clone(),
    };
    let calls = |counts: &StrictCounts| {
        (
            counts.polls.load(Ordering::SeqCst),
            counts.calls.load(Ordering::SeqCst),
            counts.unready_calls.load(Ordering::SeqCst),
        )
    };

    let auth = layer(&mock);
    let mut api = auth.layer(strict.clone());
    // Waiting for the first token, then the call.
    banks_ok(&mut api, &mock).await;
    assert_eq!(calls(&counts), (1, 1, 0));
    // Hot path, 401, replay on a fresh clone polled ready.
    mock.revoke_access_tokens();
    assert_eq!(
        send(&mut api, payment(&mock, b"{}")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(calls(&counts), (3, 3, 0));
    // Another origin: passed through.
    let other = Request::get("http://127.0.0.2:9/banks")
        .body(Body::default())
        .expect("request");
    assert_eq!(
        send(&mut api, other).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(calls(&counts), (4, 4, 0));

    // Waiting for the first token, then a 401, and a replay.
    let auth = layer(&mock);
    let mut api = auth.layer(strict);
    mock.reject_all_tokens(true);
    assert_unchanged_401(send(&mut api, get(&mock, "/banks")).await).await;
    assert_eq!(calls(&counts), (6, 6, 0));
    assert_eq!(auth.stats().replays, 1);
}

#[tokio::test(start_paused = true)]
async fn the_replay_waits_for_the_inner_service_to_be_ready() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    // One request at a time: `call` without a permit from `poll_ready` panics.
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .concurrency_limit(1)
        .service(mock.service());
    assert_eq!(
        send(&mut api.clone(), get(&mock, "/banks")).await.status(),
        StatusCode::OK
    );
    mock.revoke_access_tokens();

    let hold = mock.hold_oauth();
    let body = b"{\"amount\":5}";
    let task = tokio::spawn(api.clone().oneshot(payment(&mock, body)));
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("renewal held");
    assert_eq!(mock.api_calls(), 2);

    // Another handle takes the only permit while the renewal is held.
    let mut other = api.clone();
    poll_fn(|cx| other.poll_ready(cx)).await.expect("ready");
    hold.release();
    // Idle barrier (paused clock): the renewal completes; the replay cannot
    // get the permit, so it is not sent.
    sleep(ms(1)).await;
    assert_eq!(auth.stats().refreshes, 2);
    assert!(!task.is_finished());
    assert_eq!(mock.api_calls(), 2);

    // The permit comes free: the replay goes out.
    drop(other);
    let response = task.await.expect("task").expect("response");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.api_calls(), 3);
    assert_eq!(
        mock.payment_bodies(),
        [Bytes::from_static(body), Bytes::from_static(body)]
    );
    assert_eq!(auth.stats().replays, 1);
}

// ---------------------------------------------------------------------------------------------
// The token stays with its origins
// ---------------------------------------------------------------------------------------------

fn to(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::default()).expect("request")
}

#[tokio::test]
async fn requests_to_other_origins_carry_no_authorization() {
    let mock = MockVolt::builder().in_process(); // http://127.0.0.1:9
    let auth = layer(&mock);
    let recorder = Recorder::new(&mock);
    let mut api = auth.layer(recorder.clone());
    let others = [
        "http://127.0.0.2:9/banks",
        "http://127.0.0.1:10/banks",
        "https://127.0.0.1:9/banks",
        "http://127.0.0.1/banks",
        "http://localhost:9/banks",
        "http://attacker.example/banks",
    ];
    for uri in others {
        // The mock answers any host; it answers 401 to a request without a token.
        assert_unchanged_401(send(&mut api, to(uri)).await).await;
    }
    assert_eq!(mock.api_authorizations(), vec![None; others.len()]);
    assert!(
        recorder
            .seen()
            .iter()
            .all(|parts| !parts.headers.contains_key(AUTHORIZATION))
    );
    // No token was even fetched, and their 401s triggered nothing.
    assert_eq!(mock.oauth_calls(), 0);

    // The configured origin gets the token.
    assert_eq!(
        send(&mut api, to("http://127.0.0.1:9/banks"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(mock.oauth_calls(), 1);
    let issued = mock.issued_access_tokens();

    // Other origins still get nothing, and a caller's own header passes untouched.
    let mut request = to("http://127.0.0.2:9/banks");
    request.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::from_static("Basic Y2FsbGVyOnB3"),
    );
    assert_unchanged_401(send(&mut api, request).await).await;
    assert_unchanged_401(send(&mut api, to("http://127.0.0.2:9/banks")).await).await;
    let mut expected = vec![None; others.len()];
    expected.extend([
        bearer(&issued[0]),
        Some("Basic Y2FsbGVyOnB3".to_owned()),
        None,
    ]);
    assert_eq!(mock.api_authorizations(), expected);
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(auth.stats().replays, 0);
    // The token was not invalidated by another origin's 401.
    assert_eq!(
        send(&mut api, to("http://127.0.0.1:9/banks"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[0])));
    assert_eq!(mock.oauth_calls(), 1);
}

#[tokio::test]
async fn a_third_party_server_over_tcp_never_sees_the_token() {
    let volt = MockVolt::start().await.expect("volt");
    let third = MockVolt::start().await.expect("third party"); // another port
    let client = http_client();
    let auth = builder(&volt).build(client.clone()).expect("layer");
    let mut api = ServiceBuilder::new().layer(auth.clone()).service(client);

    let third_banks = format!("{}/banks", third.url());
    let (status, _, _) = body_of(send(&mut api, to(&third_banks)).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let volt_banks = format!("{}/banks", volt.url());
    let (status, _, _) = body_of(send(&mut api, to(&volt_banks)).await).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = body_of(send(&mut api, to(&third_banks)).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    assert_eq!(third.api_authorizations(), [None, None]);
    assert_eq!(third.oauth_calls(), 0);
    let issued = volt.issued_access_tokens();
    assert_eq!(volt.api_authorizations(), [bearer(&issued[0])]);
    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(auth.stats().replays, 0);
}

/// An IPv6 origin is one address, however it is written: a client that
/// parses URLs (the `url` crate, reqwest's `Url`) writes it in its canonical
/// form whatever the configuration said. Anything else about the authority
/// still has to match as before.
#[tokio::test]
async fn an_ipv6_origin_gets_the_token_however_its_address_is_spelled() {
    let mock = MockVolt::builder().in_process();
    let auth = builder(&mock)
        .allow_origin("http://[0:0:0:0:0:0:0:1]:9")
        .allow_origin("https://[::1:2]")
        .build(mock.service())
        .expect("layer");
    let cases = [
        ("http://[::1]:9/banks", true),
        ("http://[0::1]:9/banks", true),
        ("http://[0:0:0:0:0:0:0:1]:9/banks", true),
        ("http://[::0:1]:9/banks", true),
        ("https://[0:0::1:2]/banks", true),
        ("https://[0:0::1:2]:/banks", true),
        ("https://[0:0::1:2]:443/banks", true),
        ("http://[::1]/banks", false),
        ("http://[::1]:/banks", false),
        ("http://[::1]:10/banks", false),
        ("http://[::1]:09/banks", false),
        ("https://[::1]:9/banks", false),
        ("http://[::2]:9/banks", false),
        ("http://user@[::1]:9/banks", false),
        ("https://[0:0::1:2]:8443/banks", false),
        ("https://[0:0::1:2]:0443/banks", false),
        ("http://[0:0::1:2]/banks", false),
    ];
    token_goes_to(&mock, &auth, &cases).await;
}

/// Sends a request to each URI through `auth`'s layer over the mock, and
/// checks that exactly those marked `true` carried the one token issued.
async fn token_goes_to(mock: &MockVolt, auth: &VoltAuthLayer, cases: &[(&str, bool)]) {
    let mut api = auth.layer(Recorder::new(mock));
    for (uri, _) in cases {
        send(&mut api, to(uri)).await;
    }
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 1);
    let sent = mock.api_authorizations();
    assert_eq!(sent.len(), cases.len());
    for ((uri, allowed), sent) in cases.iter().zip(&sent) {
        let expected = allowed.then(|| format!("Bearer {}", issued[0]));
        assert_eq!(sent, &expected, "{uri}");
    }
    assert_eq!(mock.oauth_calls(), 1);
}

#[tokio::test]
async fn allowed_origins_get_the_token_and_no_others() {
    let mock = MockVolt::builder().in_process();
    let auth = builder(&mock)
        .allow_origin("http://127.0.0.2:9")
        .allow_origin("https://api.example.com/some/path")
        .build(mock.service())
        .expect("layer");
    let cases = [
        ("http://127.0.0.2:9/banks", true),
        ("https://api.example.com/banks", true),
        ("https://API.example.com:443/banks", true),
        ("http://127.0.0.1:9/banks", true),
        ("https://api.example.com:8443/banks", false),
        ("http://api.example.com/banks", false),
        ("http://127.0.0.3:9/banks", false),
        ("http://127.0.0.2:10/banks", false),
    ];
    token_goes_to(&mock, &auth, &cases).await;

    let refused = builder(&mock)
        .allow_origin("not a url")
        .build(mock.service());
    assert!(matches!(refused, Err(ConfigError::InvalidUrl { .. })));
    let refused = builder(&mock)
        .allow_origin("ftp://files.example.com")
        .build(mock.service());
    assert!(matches!(refused, Err(ConfigError::InvalidUrl { .. })));
    // The token never goes out in clear text: plain http only to loopback.
    let refused = builder(&mock)
        .allow_origin("http://api.example.com")
        .build(mock.service());
    assert!(matches!(refused, Err(ConfigError::InsecureUrl(host)) if host == "api.example.com"));
    for loopback in [
        "http://localhost:8080",
        "http://[::1]:8080",
        "http://127.0.0.5",
    ] {
        let allowed = builder(&mock).allow_origin(loopback).build(mock.service());
        assert!(allowed.is_ok(), "{loopback}");
    }
}

/// Calls made without the layer report their 401s with `reject`: 200 tasks on
/// four threads report the revoked token at once, and it costs one refresh;
/// every task then gets the new token, and a late report of the old one
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_drops_a_token_rejected_outside_the_layer_once() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let first = auth.access_token().await.expect("a token");
    mock.revoke_access_tokens();

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (auth, first) = (auth.clone(), first.clone());
            tokio::spawn(async move {
                auth.reject(&first);
                auth.access_token().await
            })
        })
        .collect();
    for task in tasks {
        let token = joined(task).await;
        assert_eq!(token.expose_secret(), mock.issued_access_tokens()[1]);
    }
    assert_eq!((mock.password_grants(), mock.refresh_grants()), (1, 1));

    auth.reject(&first);
    let again = auth.access_token().await.expect("a token");
    assert_eq!(again.expose_secret(), mock.issued_access_tokens()[1]);
    assert_eq!(mock.oauth_calls(), 2);
}

/// `reject` on one layer with a token of another changes neither cache.
#[tokio::test]
async fn reject_ignores_a_token_from_another_layer() {
    let (one, other) = (
        MockVolt::builder().in_process(),
        MockVolt::builder().in_process(),
    );
    let (auth, elsewhere) = (layer(&one), layer(&other));
    let theirs = elsewhere.access_token().await.expect("a token");
    let mine = auth.access_token().await.expect("a token");
    auth.reject(&theirs);
    let again = auth.access_token().await.expect("a token");
    assert_eq!(again.expose_secret(), mine.expose_secret());
    let theirs_again = elsewhere.access_token().await.expect("a token");
    assert_eq!(theirs_again.expose_secret(), theirs.expose_secret());
    assert_eq!((one.oauth_calls(), other.oauth_calls()), (1, 1));
}
