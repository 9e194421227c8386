//! `VoltAuthLayer` stacked with tower's `TimeoutLayer`, `RetryLayer` and
//! `ConcurrencyLimitLayer` and tower-http's `TraceLayer`, in the orders that
//! matter. The in-process mock server keeps every test deterministic, and lets
//! the timeout tests run on tokio's paused clock; it is reached through
//! [`Probe`], which also pins the request body type to `Full<Bytes>` (the
//! mock's own service accepts any body, too many for type inference).

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower::limit::ConcurrencyLimit;
use tower::retry::Policy;
use tower::timeout::error::Elapsed;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::trace::{DefaultMakeSpan, TraceLayer};
use volt_auth::mock::{self, MockService, MockVolt};
use volt_auth::{Builder, VoltAuthLayer};

mod common;

use common::log::Capture;

type Req = Request<Full<Bytes>>;

fn volt() -> MockVolt {
    MockVolt::builder().in_process()
}

fn builder(volt: &MockVolt) -> Builder {
    VoltAuthLayer::builder(volt.credentials()).base_url(&volt.url())
}

fn auth(volt: &MockVolt) -> VoltAuthLayer {
    builder(volt).build(Probe::new(volt)).unwrap()
}

fn get(volt: &MockVolt) -> Req {
    Request::get(format!("{}/banks", volt.url()))
        .body(Full::default())
        .unwrap()
}

fn pay(volt: &MockVolt, body: &'static str) -> Req {
    Request::post(format!("{}/v2/payments", volt.url()))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send<S, B>(service: &mut S, request: Req) -> Result<StatusCode, BoxError>
where
    S: Service<Req, Response = Response<B>, Error = BoxError>,
{
    Ok(service.ready().await?.call(request).await?.status())
}

fn volt_error(error: &BoxError) -> &volt_auth::Error {
    error
        .downcast_ref::<volt_auth::Error>()
        .unwrap_or_else(|| panic!("not a volt_auth::Error: {error:?}"))
}

// ---------------------------------------------------------------------------
// Test helpers: a retry policy that clones requests, and a probe service.
// ---------------------------------------------------------------------------

/// Retries once on an error or a 5xx; clones `Request<Full<Bytes>>` before
/// the first send, as tower's `retry` asks. 401s are left to `VoltAuth`.
#[derive(Clone)]
struct RetryOnce {
    left: usize,
    retries: Arc<AtomicUsize>,
}

impl RetryOnce {
    fn new() -> Self {
        Self {
            left: 1,
            retries: Arc::default(),
        }
    }

    fn retries(&self) -> usize {
        self.retries.load(Ordering::SeqCst)
    }
}

impl<B, E> Policy<Req, Response<B>, E> for RetryOnce {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Req, result: &mut Result<Response<B>, E>) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        if !failed || self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.retries.fetch_add(1, Ordering::SeqCst);
        Some(ready(()))
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

/// Wraps the mock's service: counts calls and the most in flight at once, and
/// can answer the next calls with 503 without passing them on.
#[derive(Clone)]
struct Probe {
    inner: MockService,
    state: Arc<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    fail_next: AtomicUsize,
}

impl Probe {
    fn new(volt: &MockVolt) -> Self {
        Self {
            inner: volt.service(),
            state: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    fn fail_next(&self, n: usize) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }
}

struct InFlight(Arc<ProbeState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<Req> for Probe {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Req>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let state = self.state.clone();
        state.calls.fetch_add(1, Ordering::SeqCst);
        let failing = state
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            let mut response = Response::new(Full::default());
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            return Box::pin(ready(Ok(response)));
        }
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let future = self.inner.call(request);
        Box::pin(async move {
            let _in_flight = InFlight(state);
            future.await
        })
    }
}

// ---------------------------------------------------------------------------
// RetryLayer
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retry_outside_or_inside_auth_recovers_a_503_with_one_token() {
    // Outside: each attempt passes through VoltAuth, which attaches the
    // current token again.
    let volt = volt();
    let probe = Probe::new(&volt);
    let policy = RetryOnce::new();
    let mut api = ServiceBuilder::new()
        .retry(policy.clone())
        .layer(auth(&volt))
        .service(probe.clone());
    probe.fail_next(1);
    assert_eq!(send(&mut api, get(&volt)).await.unwrap(), StatusCode::OK);
    assert_eq!(policy.retries(), 1);
    assert_eq!(probe.calls(), 2);
    assert_eq!(volt.api_calls(), 1);
    assert_eq!(volt.oauth_calls(), 1);

    // Inside: the retry resends the request VoltAuth already authorised.
    let volt = self::volt();
    let probe = Probe::new(&volt);
    let policy = RetryOnce::new();
    let mut api = ServiceBuilder::new()
        .layer(auth(&volt))
        .retry(policy.clone())
        .service(probe.clone());
    probe.fail_next(1);
    assert_eq!(send(&mut api, get(&volt)).await.unwrap(), StatusCode::OK);
    assert_eq!(policy.retries(), 1);
    assert_eq!(probe.calls(), 2);
    assert_eq!(volt.api_calls(), 1);
    assert_eq!(volt.oauth_calls(), 1);
    let token = &volt.issued_access_tokens()[0];
    assert_eq!(
        volt.api_authorizations(),
        vec![Some(format!("Bearer {token}"))]
    );
}

#[tokio::test]
async fn token_failures_reach_the_retry_policy_only_when_it_is_outside() {
    const DOWN: &str = r#"{"code":503,"message":"Service Unavailable"}"#;

    // Outside: the policy sees the token error and retries; the retry gets
    // the same error from the cache's backoff, without a second /oauth call.
    let volt = volt();
    volt.fail_oauth(1, StatusCode::SERVICE_UNAVAILABLE, DOWN);
    let probe = Probe::new(&volt);
    let policy = RetryOnce::new();
    let mut api = ServiceBuilder::new()
        .retry(policy.clone())
        .layer(auth(&volt))
        .service(probe.clone());
    let error = send(&mut api, get(&volt)).await.unwrap_err();
    let error = volt_error(&error);
    assert!(
        matches!(error, volt_auth::Error::Failed { .. }),
        "{error:?}"
    );
    assert_eq!(error.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(policy.retries(), 1);
    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(probe.calls(), 0);

    // Inside: the token error happens before the retry layer is reached.
    let volt = self::volt();
    volt.fail_oauth(1, StatusCode::SERVICE_UNAVAILABLE, DOWN);
    let probe = Probe::new(&volt);
    let policy = RetryOnce::new();
    let mut api = ServiceBuilder::new()
        .layer(auth(&volt))
        .retry(policy.clone())
        .service(probe.clone());
    let error = send(&mut api, get(&volt)).await.unwrap_err();
    assert!(matches!(
        volt_error(&error),
        volt_auth::Error::Failed { .. }
    ));
    assert_eq!(policy.retries(), 0);
    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(probe.calls(), 0);
}

#[tokio::test]
async fn a_401_is_replayed_by_auth_once_not_also_by_retry() {
    const BODY: &str = r#"{"amount":1}"#;
    let volt = volt();
    let auth = auth(&volt);
    let probe = Probe::new(&volt);
    let policy = RetryOnce::new();
    let mut api = ServiceBuilder::new()
        .retry(policy.clone())
        .layer(auth.clone())
        .service(probe.clone());
    assert_eq!(send(&mut api, get(&volt)).await.unwrap(), StatusCode::OK);
    volt.revoke_access_tokens();

    assert_eq!(
        send(&mut api, pay(&volt, BODY)).await.unwrap(),
        StatusCode::CREATED
    );
    assert_eq!(policy.retries(), 0);
    assert_eq!(auth.stats().replays, 1);
    assert_eq!(
        volt.payment_bodies(),
        vec![Bytes::from(BODY), Bytes::from(BODY)]
    );
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(probe.calls(), 3);
}

// ---------------------------------------------------------------------------
// TimeoutLayer
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_auth_covers_the_token_wait_and_the_refresh_survives_it() {
    let volt = volt();
    let mut api = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .layer(auth(&volt))
        .service(Probe::new(&volt));
    let hold = volt.hold_oauth();

    let started = Instant::now();
    let error = send(&mut api, get(&volt)).await.unwrap_err();
    assert!(error.is::<Elapsed>(), "{error:?}");
    assert!(error.downcast_ref::<volt_auth::Error>().is_none());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1) && waited < Duration::from_secs(2));
    assert_eq!(hold.waiting(), 1);
    assert_eq!(volt.api_calls(), 0);

    // The refresh was not the caller's: it goes on, and the next request
    // uses its token without another /oauth call.
    hold.release();
    assert_eq!(send(&mut api, get(&volt)).await.unwrap(), StatusCode::OK);
    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(volt.api_calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_inside_auth_does_not_cover_the_token_wait() {
    let volt = volt();
    let auth = builder(&volt)
        .token_timeout(Duration::from_secs(3))
        .build(Probe::new(&volt))
        .unwrap();
    let mut api = ServiceBuilder::new()
        .layer(auth)
        .timeout(Duration::from_secs(1))
        .service(Probe::new(&volt));
    let hold = volt.hold_oauth();

    // The inner timeout only starts once the token is there; the token wait
    // is bounded by the layer's own token timeout.
    let started = Instant::now();
    let error = send(&mut api, get(&volt)).await.unwrap_err();
    assert!(!error.is::<Elapsed>());
    let error = volt_error(&error);
    assert!(
        matches!(error, volt_auth::Error::Timeout { .. }),
        "{error:?}"
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(4));
    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(volt.api_calls(), 0);
    drop(hold);
}

// ---------------------------------------------------------------------------
// ConcurrencyLimitLayer
// ---------------------------------------------------------------------------

/// Two payments, `a` then `b`, race a revoked token through a limit of one.
async fn race_two_payments<S>(volt: &MockVolt, api: S)
where
    S: Service<Req, Response = Response<Full<Bytes>>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let mut warm = api.clone();
    assert_eq!(send(&mut warm, get(volt)).await.unwrap(), StatusCode::OK);
    volt.revoke_access_tokens();
    let a = tokio::spawn(api.clone().oneshot(pay(volt, "a")));
    let b = tokio::spawn(api.oneshot(pay(volt, "b")));
    assert_eq!(a.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_limit_inside_auth_bounds_each_send_and_a_replay_queues_again() {
    let volt = volt();
    let auth = auth(&volt);
    let probe = Probe::new(&volt);
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .concurrency_limit(1)
        .service(probe.clone());
    race_two_payments(&volt, api).await;

    // `a` got the 401 and released its permit; `b`, queued for it, went
    // first with the new token, then `a` was replayed.
    assert_eq!(
        volt.payment_bodies(),
        vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("a")]
    );
    assert_eq!(probe.max_in_flight(), 1);
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 1);
}

#[tokio::test]
async fn a_limit_outside_auth_bounds_whole_calls_with_their_replay() {
    let volt = volt();
    let auth = auth(&volt);
    let probe = Probe::new(&volt);
    let api = ServiceBuilder::new()
        .concurrency_limit(1)
        .layer(auth.clone())
        .service(probe.clone());
    race_two_payments(&volt, api).await;

    // `a` kept its permit through the 401, the refresh and the replay.
    assert_eq!(
        volt.payment_bodies(),
        vec![Bytes::from("a"), Bytes::from("a"), Bytes::from("b")]
    );
    assert_eq!(probe.max_in_flight(), 1);
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 1);
}

/// A replay that queues for a permit goes with the token the cache holds
/// once it has one, not with the one its renewal gave it: that token may have
/// been rejected (and replaced) meanwhile, and the replay is the only one.
#[tokio::test(start_paused = true)]
async fn a_replay_queued_for_a_permit_goes_with_the_newest_token() {
    let volt = volt();
    let auth = auth(&volt);
    let (a, holder) = queued_replay(&volt, &auth).await;

    // Past the throttle, Volt rejects the second token too; a request
    // without the limit renews it (the third token) and succeeds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    volt.revoke_access_tokens();
    let mut unlimited = tower::Layer::layer(&auth, Probe::new(&volt));
    assert_eq!(
        send(&mut unlimited, get(&volt)).await.unwrap(),
        StatusCode::OK
    );
    let issued = volt.issued_access_tokens();
    assert_eq!(issued.len(), 3);

    // The permit comes: `a` is replayed with the third token.
    drop(holder);
    let response = a.await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        volt.api_authorizations().last(),
        Some(&Some(format!("Bearer {}", issued[2])))
    );
    assert_eq!(
        volt.payment_bodies(),
        vec![Bytes::from("a"), Bytes::from("a")]
    );
    assert_eq!(auth.stats().replays, 2);
    assert_eq!(volt.oauth_calls(), 3);
}

/// A replay that queues for a permit while its renewed token is rejected by
/// another request (past the throttle), and the next one is still on its
/// way, waits for that one, keeping its permit: it is not sent with a token
/// the cache already knows is refused, to come back a second 401.
#[tokio::test(start_paused = true)]
async fn a_replay_queued_while_its_renewed_token_is_rejected_waits_for_the_next() {
    let (volt, auth, a, other) = replay_queued_while_its_renewed_token_is_rejected(None).await;
    assert_eq!(a.unwrap().status(), StatusCode::CREATED);
    assert_eq!(other.status(), StatusCode::OK);
    let issued = volt.issued_access_tokens();
    assert_eq!(issued.len(), 3);
    assert_eq!(
        volt.payment_bodies(),
        vec![Bytes::from("a"), Bytes::from("a")]
    );
    // The warm-up, `a`, `other` (each with the token it found), then both
    // replays with the third token, in either order.
    assert_eq!(
        volt.api_authorizations(),
        vec![
            common::bearer(&issued[0]),
            common::bearer(&issued[0]),
            common::bearer(&issued[1]),
            common::bearer(&issued[2]),
            common::bearer(&issued[2]),
        ]
    );
    // `a`'s replay and `other`'s, each counted once.
    assert_eq!(auth.stats().replays, 2);
    assert_eq!(volt.oauth_calls(), 3);
}

/// The same, when the refresh the replay waits for fails: the replay is not
/// sent, and its caller gets the refresh's error (the 401 it was recovering
/// from was let go when its renewal came, see
/// [`a_replay_over_one_connection_does_not_wait_for_the_401_it_holds`]).
#[tokio::test(start_paused = true)]
async fn a_replay_queued_while_its_renewed_token_is_rejected_fails_if_no_next_comes() {
    let (volt, auth, a, other) =
        replay_queued_while_its_renewed_token_is_rejected(Some(StatusCode::SERVICE_UNAVAILABLE))
            .await;
    let error = a.unwrap_err();
    assert!(
        matches!(
            volt_error(&error),
            volt_auth::Error::Failed { response, .. }
                if response.status == StatusCode::SERVICE_UNAVAILABLE
        ),
        "{error:?}"
    );
    assert_eq!(other.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(volt.payment_bodies(), vec![Bytes::from("a")]);
    let issued = volt.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    assert_eq!(
        volt.api_authorizations(),
        vec![
            common::bearer(&issued[0]),
            common::bearer(&issued[0]),
            common::bearer(&issued[1])
        ]
    );
    assert_eq!(auth.stats().replays, 0);
    assert_eq!(volt.oauth_calls(), 3);
}

type Answer = Result<Response<Full<Bytes>>, BoxError>;

/// `a` (a payment through a concurrency limit of 1) is answered 401 and renews
/// the token (the second one), while another caller holds the only permit:
/// returns `a`, its replay queued for the permit, and the holder.
async fn queued_replay(
    volt: &MockVolt,
    auth: &VoltAuthLayer,
) -> (
    Pin<Box<dyn Future<Output = Answer> + Send>>,
    impl Service<Req> + use<>,
) {
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .concurrency_limit(1)
        .service(Probe::new(volt));
    let mut warm = api.clone();
    assert_eq!(send(&mut warm, get(volt)).await.unwrap(), StatusCode::OK);
    volt.revoke_access_tokens();

    let mut a = api.clone();
    a.ready().await.unwrap();
    let mut a = Box::pin(a.call(pay(volt, "a")));
    let poll = std::future::poll_fn(|cx| Poll::Ready(a.as_mut().poll(cx))).await;
    assert!(poll.is_pending());
    let mut holder = api.clone();
    holder.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let poll = std::future::poll_fn(|cx| Poll::Ready(a.as_mut().poll(cx))).await;
    assert!(poll.is_pending(), "the replay waits for the permit");
    assert_eq!(volt.issued_access_tokens().len(), 2);
    (a, holder)
}

/// [`queued_replay`]; then, past the throttle, `other` (a GET without the
/// limit) is answered 401 to the renewed token and forces the next refresh,
/// held at `/oauth` (and answered `failure`, if any) until `a` is shown to
/// wait for it once the permit comes. Returns both answers.
async fn replay_queued_while_its_renewed_token_is_rejected(
    failure: Option<StatusCode>,
) -> (MockVolt, VoltAuthLayer, Answer, Response<Full<Bytes>>) {
    let volt = volt();
    let auth = auth(&volt);
    let (mut a, holder) = queued_replay(&volt, &auth).await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    volt.revoke_access_tokens();
    let hold = volt.hold_oauth();
    let other = tokio::spawn(tower::Layer::layer(&auth, Probe::new(&volt)).oneshot(get(&volt)));
    hold.wait_for(1).await;
    if let Some(status) = failure {
        volt.fail_oauth(1, status, "{}");
    }

    // The permit comes while the next token is on its way: `a` waits for
    // it (a second of the paused clock passes, well within the token
    // timeout) rather than going with the rejected one.
    drop(holder);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), a.as_mut())
            .await
            .is_err(),
        "the replay waits for the next token"
    );
    assert_eq!(volt.payment_bodies(), vec![Bytes::from("a")]);
    hold.release();
    let a = a.await;
    let other = other.await.unwrap().unwrap();
    (volt, auth, a, other)
}

#[tokio::test(start_paused = true)]
async fn the_limited_service_must_not_be_the_oauth_transport() {
    // VoltAuth reserves the inner service (and its permit) before it waits
    // for a token; if /oauth needs a permit of the same limit, it never gets
    // one and the token request times out.
    let volt = volt();
    let limited = ConcurrencyLimit::new(Probe::new(&volt), 1);
    let auth = builder(&volt)
        .token_timeout(Duration::from_secs(3))
        .build(limited.clone())
        .unwrap();
    let mut api = ServiceBuilder::new().layer(auth).service(limited);
    let error = send(&mut api, get(&volt)).await.unwrap_err();
    assert!(matches!(
        volt_error(&error),
        volt_auth::Error::Timeout { .. }
    ));
    assert_eq!(volt.oauth_calls(), 0);
    assert_eq!(volt.api_calls(), 0);

    // The unlimited client as the transport: fine.
    let volt = self::volt();
    let auth = builder(&volt).build(Probe::new(&volt)).unwrap();
    let mut api = ServiceBuilder::new()
        .layer(auth)
        .service(ConcurrencyLimit::new(Probe::new(&volt), 1));
    assert_eq!(send(&mut api, get(&volt)).await.unwrap(), StatusCode::OK);
    assert_eq!(volt.oauth_calls(), 1);
}

// ---------------------------------------------------------------------------
// TraceLayer
// ---------------------------------------------------------------------------

/// This thread's tracing output at DEBUG, while the guard lives.
fn capture() -> (Capture, tracing::subscriber::DefaultGuard) {
    let logs = Capture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

fn secrets(volt: &MockVolt) -> Vec<String> {
    let mut secrets = volt.issued_access_tokens();
    secrets.extend(volt.issued_refresh_tokens());
    secrets.extend([mock::CLIENT_SECRET.to_owned(), mock::PASSWORD.to_owned()]);
    secrets
}

#[tokio::test]
async fn trace_outside_auth_sees_one_call_and_no_token() {
    let (logs, _guard) = capture();
    let volt = volt();
    let mut api = ServiceBuilder::new()
        .layer(
            TraceLayer::new_for_http().make_span_with(DefaultMakeSpan::new().include_headers(true)),
        )
        .layer(auth(&volt))
        .service(Probe::new(&volt));
    assert_eq!(send(&mut api, get(&volt)).await.unwrap(), StatusCode::OK);
    volt.revoke_access_tokens();
    assert_eq!(
        send(&mut api, pay(&volt, "{}")).await.unwrap(),
        StatusCode::CREATED
    );

    let text = logs.text();
    // One span per call, the 401 and its replay inside it.
    assert_eq!(text.matches("started processing request").count(), 2);
    assert_eq!(text.matches("finished processing request").count(), 2);
    assert!(text.contains("status=201"));
    assert!(!text.contains("status=401"));
    assert!(!text.contains("authorization"));
    assert!(text.contains("replaying a request after a 401"));
    for secret in secrets(&volt) {
        assert!(!text.contains(&secret));
    }
}

#[tokio::test]
async fn trace_inside_auth_sees_each_send_with_the_token_redacted() {
    let (logs, _guard) = capture();
    let volt = volt();
    let mut api = ServiceBuilder::new()
        .layer(auth(&volt))
        .layer(
            TraceLayer::new_for_http().make_span_with(DefaultMakeSpan::new().include_headers(true)),
        )
        .service(Probe::new(&volt));
    assert_eq!(send(&mut api, get(&volt)).await.unwrap(), StatusCode::OK);
    volt.revoke_access_tokens();
    assert_eq!(
        send(&mut api, pay(&volt, "{}")).await.unwrap(),
        StatusCode::CREATED
    );

    let text = logs.text();
    // Each send is traced: GET, POST (401), POST (replay).
    assert_eq!(text.matches("started processing request").count(), 3);
    assert_eq!(text.matches("finished processing request").count(), 3);
    assert_eq!(text.matches("status=401").count(), 1);
    // The header is there, marked sensitive: its value is never printed.
    assert_eq!(text.matches("\"authorization\": Sensitive").count(), 6);
    for secret in secrets(&volt) {
        assert!(!text.contains(&secret));
    }
}

/// One connection in front of [`Probe`], as an HTTP/1 connection is (hyper's
/// `SendRequest` behind a full `Buffer`, a pool of one connection): a clone
/// is ready once the connection is free, and it is free again only when the
/// last answer's body is dropped (read to its end, the same).
struct OneConnection {
    probe: Probe,
    connection: Arc<std::sync::Mutex<Connection>>,
    reserved: bool,
}

#[derive(Default)]
struct Connection {
    busy: bool,
    waiting: Vec<std::task::Waker>,
}

/// Frees the connection when dropped.
struct Free(Arc<std::sync::Mutex<Connection>>);

impl Drop for Free {
    fn drop(&mut self) {
        let mut connection = self.0.lock().unwrap();
        connection.busy = false;
        connection
            .waiting
            .drain(..)
            .for_each(std::task::Waker::wake);
    }
}

/// An answer's body, holding the connection until dropped.
struct OnConnection {
    body: Full<Bytes>,
    _free: Free,
}

impl http_body::Body for OnConnection {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
}

impl OneConnection {
    fn new(volt: &MockVolt) -> Self {
        Self {
            probe: Probe::new(volt),
            connection: Arc::default(),
            reserved: false,
        }
    }
}

impl Clone for OneConnection {
    fn clone(&self) -> Self {
        Self {
            probe: self.probe.clone(),
            connection: self.connection.clone(),
            reserved: false,
        }
    }
}

impl Drop for OneConnection {
    fn drop(&mut self) {
        if self.reserved {
            drop(Free(self.connection.clone()));
        }
    }
}

impl Service<Req> for OneConnection {
    type Response = Response<OnConnection>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if !self.reserved {
            let mut connection = self.connection.lock().unwrap();
            if connection.busy {
                connection.waiting.push(cx.waker().clone());
                return Poll::Pending;
            }
            connection.busy = true;
            self.reserved = true;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        assert!(std::mem::take(&mut self.reserved), "called before ready");
        let free = Free(self.connection.clone());
        let answer = self.probe.call(request);
        Box::pin(async move {
            let answer = answer.await?;
            Ok(answer.map(|body| OnConnection { body, _free: free }))
        })
    }
}

/// A 401 holds its connection until its body is dropped: the replay, which
/// needs that connection, must not keep the 401 while it waits for it, or
/// it waits for itself for ever.
#[tokio::test(start_paused = true)]
async fn a_replay_over_one_connection_does_not_wait_for_the_401_it_holds() {
    let volt = volt();
    let auth = auth(&volt);
    let connection = OneConnection::new(&volt);
    let mut api = tower::Layer::layer(&auth, connection.clone());
    assert_eq!(send(&mut api, get(&volt)).await.unwrap(), StatusCode::OK);
    volt.revoke_access_tokens();

    let answer = tokio::time::timeout(Duration::from_secs(60), send(&mut api, pay(&volt, "a")))
        .await
        .expect("the replay waited for the connection its own 401 held");
    assert_eq!(answer.unwrap(), StatusCode::CREATED);
    assert_eq!(
        volt.payment_bodies(),
        vec![Bytes::from("a"), Bytes::from("a")]
    );
    assert_eq!(auth.stats().replays, 1);
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(connection.probe.calls(), 3);
}
