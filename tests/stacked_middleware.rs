//! `VoltAuthLayer` stacked the way production users stack it, under load and
//! under failure: tower's `Buffer` in front of and behind the layer through a
//! storm of 401s, a `Timeout` outside firing while requests wait for a forced
//! refresh or for their replay, a `Retry` outside while `/oauth` fails, an
//! inner service whose readiness fails for the replay, and hyper-util's
//! client losing its connection between the 401 and the replay.
//!
//! Exact counts against the mock Volt server. Time-dependent tests run on
//! tokio's paused clock with the in-process mock; concurrency tests on a
//! multi-thread runtime with hundreds of tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep, sleep, timeout};
use tower::retry::Policy;
use tower::timeout::error::Elapsed;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use volt_auth::VoltAuthLayer;
use volt_auth::mock::{MockService, MockVolt};

mod common;

use common::{Body, GUARD, bearer, builder, get, joined, layer, send};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn numbered_body(i: usize) -> Bytes {
    Bytes::from(format!(r#"{{"amount":{i},"uniqueReference":"order-{i}"}}"#))
}

fn payment(mock: &MockVolt, body: Bytes) -> Request<Body> {
    Request::post(format!("{}/v2/payments", mock.url()))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("request")
}

fn volt_error(error: &BoxError) -> &volt_auth::Error {
    error
        .downcast_ref::<volt_auth::Error>()
        .unwrap_or_else(|| panic!("not a volt_auth::Error: {error:?}"))
}

/// After a revocation, `n` numbered payments were each answered 201: the
/// warm-up and every 401 carried the first token, every successful send the
/// second; each body went out once, or twice when its first send got a 401;
/// one forced refresh for however many 401s.
fn assert_storm_recovered(mock: &MockVolt, replays: u64, n: usize) {
    let rejected = mock.unauthorized();
    assert_eq!(replays as usize, rejected, "one replay per 401");
    assert!(rejected >= 1);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.api_calls(), 1 + n + rejected);
    let issued = mock.issued_access_tokens();
    let authorizations = mock.api_authorizations();
    let with = |token: &str| {
        authorizations
            .iter()
            .filter(|a| **a == bearer(token))
            .count()
    };
    assert_eq!(with(&issued[0]), 1 + rejected);
    assert_eq!(with(&issued[1]), n);
    let bodies = mock.payment_bodies();
    assert_eq!(bodies.len(), n + rejected);
    let mut twice = 0;
    for i in 0..n {
        let sent = bodies.iter().filter(|b| **b == numbered_body(i)).count();
        assert!((1..=2).contains(&sent), "body {i} sent {sent} times");
        twice += usize::from(sent == 2);
    }
    assert_eq!(twice, rejected);
}

/// Readies `api` and calls it with each request in turn, before any answer is
/// awaited (so each carries the token cached at that moment), then spawns the
/// response futures.
async fn call_all<S>(
    api: &mut S,
    requests: impl IntoIterator<Item = Request<Body>>,
) -> Vec<tokio::task::JoinHandle<Result<Response<Body>, BoxError>>>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    let mut tasks = Vec::new();
    for request in requests {
        let future = api.ready().await.expect("ready").call(request);
        tasks.push(tokio::spawn(future));
    }
    tasks
}

/// What a spawned call returned, which must be a timeout, within [`GUARD`].
async fn timed_out(task: tokio::task::JoinHandle<Result<Response<Body>, BoxError>>) {
    let error = timeout(GUARD, task)
        .await
        .expect("within the guard")
        .expect("no panic")
        .expect_err("timed out");
    assert!(error.is::<Elapsed>(), "{error:?}");
}

// ---------------------------------------------------------------------------
// Buffer
// ---------------------------------------------------------------------------

/// One GET through `api` served with the first token, which Volt then
/// revokes: the next requests through `api` meet a 401.
async fn served_then_revoked<S>(api: &S, mock: &MockVolt)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    assert_eq!(
        send(&mut api.clone(), get(mock, "/banks")).await.status(),
        200
    );
    mock.revoke_access_tokens();
}

const STORM: usize = 300;

/// Spawns `STORM` numbered payments through `api` and expects 201 for each.
async fn storm<S>(mock: &MockVolt, api: S)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..STORM)
        .map(|i| {
            let request = payment(mock, numbered_body(i));
            tokio::spawn(api.clone().oneshot(request))
        })
        .collect();
    for task in tasks {
        assert_eq!(joined(task).await.status(), StatusCode::CREATED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_buffer_in_front_of_auth_rides_a_401_storm_with_one_refresh() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let api = ServiceBuilder::new()
        .buffer(16)
        .layer(auth.clone())
        .service(mock.service());
    served_then_revoked(&api, &mock).await;
    storm(&mock, api).await;
    assert_storm_recovered(&mock, auth.stats().replays, STORM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_buffer_behind_auth_rides_a_401_storm_with_one_refresh() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .buffer(16)
        .service(mock.service());
    served_then_revoked(&api, &mock).await;
    storm(&mock, api).await;
    assert_storm_recovered(&mock, auth.stats().replays, STORM);
}

// ---------------------------------------------------------------------------
// Timeout outside
// ---------------------------------------------------------------------------

/// Forwards to the mock; from its `from`-th call (0-based) on, each call first
/// sleeps `delay`.
#[derive(Clone)]
struct SlowFrom {
    inner: MockService,
    calls: Arc<AtomicUsize>,
    from: usize,
    delay: Duration,
}

impl SlowFrom {
    fn new(mock: &MockVolt, from: usize, delay: Duration) -> Self {
        Self {
            inner: mock.service(),
            calls: Arc::default(),
            from,
            delay,
        }
    }
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Request<Body>> for SlowFrom {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFut<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let delay = (n >= self.from).then_some(self.delay);
        let future = self.inner.call(request);
        Box::pin(async move {
            if let Some(delay) = delay {
                sleep(delay).await;
            }
            Ok(future.await?)
        })
    }
}

/// 200 requests get a 401 and time out waiting for the forced refresh, which
/// is held: the refresh is not cancelled, nobody starts another, and the
/// next requests use its token.
#[tokio::test(start_paused = true)]
async fn requests_timing_out_while_a_forced_refresh_is_held_leave_one_refresh() {
    const N: usize = 200;
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let api = ServiceBuilder::new()
        .timeout(secs(1))
        .layer(auth.clone())
        .service(mock.service());
    served_then_revoked(&api, &mock).await;
    let hold = mock.hold_oauth();

    let started = Instant::now();
    let payments = (0..N).map(|i| payment(&mock, numbered_body(i)));
    for task in call_all(&mut api.clone(), payments).await {
        timed_out(task).await;
    }
    assert!(started.elapsed() < secs(2));
    assert_eq!(hold.waiting(), 1, "the forced refresh is still in flight");
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.unauthorized(), N);
    assert_eq!(mock.api_calls(), 1 + N);

    // A request during the hold waits for the same refresh (and times out).
    let error = api
        .clone()
        .oneshot(get(&mock, "/banks"))
        .await
        .expect_err("timed out");
    assert!(error.is::<Elapsed>(), "{error:?}");
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.api_calls(), 1 + N);

    hold.release();
    for i in 0..N {
        let response = send(&mut api.clone(), payment(&mock, numbered_body(i))).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);
    let issued = mock.issued_access_tokens();
    let authorizations = mock.api_authorizations();
    assert_eq!(authorizations.len(), 1 + 2 * N);
    assert!(
        authorizations[1 + N..]
            .iter()
            .all(|a| *a == bearer(&issued[1]))
    );
    assert_eq!(auth.stats().replays, 0);
}

/// 200 payments get a 401, the token is renewed, and every replay is slower
/// than the caller's deadline: each caller gets `Elapsed`, the replays are
/// dropped before they reach the server, and the renewed token stays in
/// service without another `/oauth` call.
#[tokio::test(start_paused = true)]
async fn requests_timing_out_mid_replay_leave_the_renewed_token_in_service() {
    const N: usize = 200;
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    // Call 0 is the warm-up, 1..=N the payments; the replays are slow.
    let inner = SlowFrom::new(&mock, 1 + N, secs(10));
    let api = ServiceBuilder::new()
        .timeout(secs(5))
        .layer(auth.clone())
        .service(inner.clone());
    served_then_revoked(&api, &mock).await;

    let payments = (0..N).map(|i| payment(&mock, numbered_body(i)));
    for task in call_all(&mut api.clone(), payments).await {
        timed_out(task).await;
    }
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1 + 2 * N);
    assert_eq!(mock.api_calls(), 1 + N, "no replay reached the server");
    assert_eq!(mock.unauthorized(), N);
    assert_eq!(mock.oauth_calls(), 2);

    // The renewed token is in service, and the slow replays are gone.
    let direct = auth.clone();
    let mut api = ServiceBuilder::new().layer(direct).service(mock.service());
    assert_eq!(send(&mut api, get(&mock, "/banks")).await.status(), 200);
    sleep(secs(20)).await;
    assert_eq!(mock.api_calls(), 2 + N);
    assert_eq!(mock.oauth_calls(), 2);
    let issued = mock.issued_access_tokens();
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
}

// ---------------------------------------------------------------------------
// Retry outside while /oauth fails
// ---------------------------------------------------------------------------

/// Retries errors up to `left` times, `delay` apart; clones the request.
#[derive(Clone)]
struct RetryErrors {
    left: usize,
    delay: Duration,
    retries: Arc<AtomicUsize>,
}

impl RetryErrors {
    fn new(left: usize, delay: Duration) -> Self {
        Self {
            left,
            delay,
            retries: Arc::default(),
        }
    }
}

impl<B> Policy<Request<Body>, Response<B>, BoxError> for RetryErrors {
    type Future = Pin<Box<Sleep>>;

    fn retry(
        &mut self,
        _: &mut Request<Body>,
        result: &mut Result<Response<B>, BoxError>,
    ) -> Option<Self::Future> {
        if result.is_ok() || self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.retries.fetch_add(1, Ordering::SeqCst);
        Some(Box::pin(sleep(self.delay)))
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.headers_mut() = request.headers().clone();
        Some(copy)
    }
}

const DOWN: &str = r#"{"code":503,"message":"Service Unavailable"}"#;

/// A task sending one request through the stack.
type Caller = JoinHandle<Result<Response<Body>, BoxError>>;

/// `n` tasks each sending `GET /banks` through `policy`'s retry outside the
/// layer (backoff fixed at 1 s), the mock's `/oauth` failing `fails` times
/// with a 503.
fn retried_callers(
    n: usize,
    fails: usize,
    policy: RetryErrors,
) -> (MockVolt, VoltAuthLayer, RetryErrors, Vec<Caller>) {
    let mock = MockVolt::builder().in_process();
    mock.fail_oauth(fails, StatusCode::SERVICE_UNAVAILABLE, DOWN);
    let auth = builder(&mock)
        .backoff(secs(1), secs(1))
        .build(mock.service())
        .expect("layer");
    let api = ServiceBuilder::new()
        .retry(policy.clone())
        .layer(auth.clone())
        .service(mock.service());
    let tasks = (0..n)
        .map(|_| tokio::spawn(api.clone().oneshot(get(&mock, "/banks"))))
        .collect();
    (mock, auth, policy, tasks)
}

/// 100 callers behind a retry outside the layer, `/oauth` failing: retries
/// spaced wider than the cache's backoff cost one `/oauth` call per round
/// for all callers together; retries inside the backoff cost none.
#[tokio::test(start_paused = true)]
async fn a_retry_outside_auth_costs_one_oauth_call_per_backoff_window() {
    const N: usize = 100;
    // Backoff 1 s, jittered to [0.5 s, 1 s): retries 2 s apart always find it over.
    let (mock, auth, policy, tasks) = retried_callers(N, 3, RetryErrors::new(5, secs(2)));
    for task in tasks {
        assert_eq!(joined(task).await.status(), StatusCode::OK);
    }
    assert_eq!(mock.oauth_calls(), 4, "3 failed rounds, then 1 success");
    assert_eq!(policy.retries.load(Ordering::SeqCst), 3 * N);
    assert_eq!(mock.api_calls(), N);
    assert_eq!(auth.stats().password.failed, 3);
    assert_eq!(auth.stats().password.succeeded, 1);

    // Retries 100 ms apart, four of them: all inside the first backoff.
    let (mock, _, policy, tasks) = retried_callers(N, 1, RetryErrors::new(4, ms(100)));
    for task in tasks {
        let error = timeout(GUARD, task)
            .await
            .expect("within the guard")
            .expect("no panic")
            .expect_err("the token error");
        assert_eq!(
            volt_error(&error).status(),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
    }
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(policy.retries.load(Ordering::SeqCst), 4 * N);
    assert_eq!(mock.api_calls(), 0);
}

// ---------------------------------------------------------------------------
// Readiness of the replay's service
// ---------------------------------------------------------------------------

/// Forwards to the mock; once it has answered a 401, `poll_ready` fails.
#[derive(Clone)]
struct BreaksAfter401 {
    inner: MockService,
    broken: Arc<AtomicBool>,
}

impl Service<Request<Body>> for BreaksAfter401 {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFut<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err("the inner service broke".into()));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let future = self.inner.call(request);
        let broken = self.broken.clone();
        Box::pin(async move {
            let response = future.await?;
            if response.status() == StatusCode::UNAUTHORIZED {
                broken.store(true, Ordering::SeqCst);
            }
            Ok(response)
        })
    }
}

/// The replay's service fails to get ready: its error goes to the caller,
/// nothing is sent again, and the renewed token is in service.
#[tokio::test]
async fn a_replay_whose_service_fails_readiness_returns_that_error_and_sends_nothing() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let broken = Arc::new(AtomicBool::new(false));
    let mut api = ServiceBuilder::new()
        .layer(auth.clone())
        .service(BreaksAfter401 {
            inner: mock.service(),
            broken: broken.clone(),
        });
    assert_eq!(send(&mut api, get(&mock, "/banks")).await.status(), 200);
    mock.revoke_access_tokens();
    api.ready().await.expect("ready");
    let error = api
        .call(payment(&mock, numbered_body(1)))
        .await
        .expect_err("the replay's readiness failed");
    assert_eq!(error.to_string(), "the inner service broke");
    assert_eq!(mock.payment_bodies(), [numbered_body(1)]);
    assert_eq!(mock.api_calls(), 2);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 0, "nothing was replayed");

    broken.store(false, Ordering::SeqCst);
    assert_eq!(send(&mut api, get(&mock, "/banks")).await.status(), 200);
    let issued = mock.issued_access_tokens();
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
    assert_eq!(mock.oauth_calls(), 2);
}

/// A timeout outside fires while the replay queues for the only permit of a
/// limit inside: the caller gets `Elapsed`, the replay is never sent, and the
/// stats count no replay.
#[tokio::test(start_paused = true)]
async fn a_replay_that_times_out_waiting_for_a_permit_is_not_counted() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let limited = ServiceBuilder::new()
        .layer(auth.clone())
        .concurrency_limit(1)
        .service(mock.service());
    let api = ServiceBuilder::new()
        .timeout(secs(5))
        .service(limited.clone());
    served_then_revoked(&api, &mock).await;

    let hold = mock.hold_oauth();
    let task = tokio::spawn(api.clone().oneshot(payment(&mock, numbered_body(1))));
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("renewal held");
    // Another handle takes the only permit while the renewal is held.
    let mut other = limited.clone();
    std::future::poll_fn(|cx| other.poll_ready(cx))
        .await
        .expect("ready");
    hold.release();
    timed_out(task).await;
    assert_eq!(auth.stats().refreshes, 2);
    assert_eq!(mock.api_calls(), 2);
    assert_eq!(mock.payment_bodies(), [numbered_body(1)]);
    assert_eq!(auth.stats().replays, 0, "nothing was replayed");
    drop(other);
}

// ---------------------------------------------------------------------------
// hyper-util's client losing the server between the 401 and the replay
// ---------------------------------------------------------------------------

type HttpClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// Forwards to hyper-util's client; stops the mock's listener (refusing
/// connections and closing open ones) once a 401 comes back.
#[derive(Clone)]
struct StopsOn401 {
    client: HttpClient,
    mock: Arc<MockVolt>,
}

impl Service<Request<Body>> for StopsOn401 {
    type Response = Response<hyper::body::Incoming>;
    type Error = BoxError;
    type Future = BoxFut<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let future = self.client.call(request);
        let mock = self.mock.clone();
        Box::pin(async move {
            let response = future.await?;
            if response.status() == StatusCode::UNAUTHORIZED {
                mock.stop();
            }
            Ok(response)
        })
    }
}

/// The server goes away between the 401 and the replay: the caller gets the
/// client's connection error (not a token error, not the 401), the token
/// renewed meanwhile (through another transport) stays in service, and once
/// the server is back the next request uses it without another `/oauth`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_on_the_replay_is_the_clients_error() {
    let mock = Arc::new(MockVolt::start().await.expect("mock"));
    let auth = builder(&mock).build(mock.service()).expect("layer");
    // No pool: the replay opens a connection of its own. (A pooled one, the
    // 401's, may be closed by the server after the replay was written on it:
    // then the client reports an incomplete message instead.)
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
    let mut api = ServiceBuilder::new()
        .layer(auth.clone())
        .service(StopsOn401 {
            client,
            mock: mock.clone(),
        });
    assert_eq!(send(&mut api, get(&mock, "/banks")).await.status(), 200);
    mock.revoke_access_tokens();

    api.ready().await.expect("ready");
    let error = api
        .call(payment(&mock, numbered_body(1)))
        .await
        .expect_err("the replay cannot connect");
    assert!(
        error.downcast_ref::<volt_auth::Error>().is_none(),
        "{error:?}"
    );
    let error = error
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .unwrap_or_else(|| panic!("not the client's error: {error:?}"));
    assert!(error.is_connect(), "{error:?}");
    assert_eq!(mock.payment_bodies(), [numbered_body(1)]);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.unauthorized(), 1);

    mock.restart().await.expect("restart");
    let response = send(&mut api, payment(&mock, numbered_body(2))).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.oauth_calls(), 2);
    let issued = mock.issued_access_tokens();
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
    assert_eq!(mock.payment_bodies(), [numbered_body(1), numbered_body(2)]);
}

// ---------------------------------------------------------------------------
// Dropping the response future wherever it waits
// ---------------------------------------------------------------------------

/// After a revocation, a payment's response future is polled `k` times (the
/// refresh task running in between) and dropped, for every `k` until it
/// completes by itself: wherever it was dropped, the cache ends with one
/// renewal, and the next request carries the renewed token.
#[tokio::test(start_paused = true)]
async fn dropping_the_response_future_at_any_point_leaves_one_renewal() {
    let mut completed_at = None;
    for k in 0..32 {
        let mock = MockVolt::builder().in_process();
        let auth = layer(&mock);
        let mut api = ServiceBuilder::new()
            .layer(auth.clone())
            .concurrency_limit(1)
            .service(mock.service());
        assert_eq!(send(&mut api, get(&mock, "/banks")).await.status(), 200);
        mock.revoke_access_tokens();

        api.ready().await.expect("ready");
        let mut future = Box::pin(api.call(payment(&mock, numbered_body(k))));
        let mut done = false;
        for _ in 0..k {
            let polled = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
            if let Poll::Ready(result) = polled {
                assert_eq!(result.expect("response").status(), StatusCode::CREATED);
                done = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(future);
        sleep(ms(1)).await; // idle barrier: a refresh started goes on to its end

        let response = timeout(GUARD, send(&mut api, get(&mock, "/banks")))
            .await
            .expect("not hung");
        assert_eq!(response.status(), StatusCode::OK, "dropped after {k} polls");
        let issued = mock.issued_access_tokens();
        assert_eq!(mock.oauth_calls(), 2, "dropped after {k} polls");
        assert_eq!(issued.len(), 2);
        assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
        let payments = mock.payment_bodies().len();
        assert!(payments <= 2, "dropped after {k} polls: {payments} sends");
        // A replay is counted once it is handed to the inner service, whose
        // (lazy) future may be dropped before the server sees it.
        let replays = auth.stats().replays as usize;
        assert!(
            (payments.saturating_sub(1)..=1).contains(&replays),
            "dropped after {k} polls: {payments} sends, {replays} replays"
        );
        if done {
            completed_at = Some(k);
            break;
        }
    }
    assert!(
        completed_at.is_some(),
        "the future completed within 32 polls"
    );
}

// ---------------------------------------------------------------------------
// Request bodies of every kind
// ---------------------------------------------------------------------------

/// Sends a payment with `body` through a layer with the default policy, after
/// a revocation: the bodies the server received, and the replays counted.
async fn payment_after_revocation<B>(body: impl Fn() -> B) -> (StatusCode, Vec<Bytes>, u64)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    volt_auth::DefaultReplay: volt_auth::ReplayPolicy<B>,
{
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service_for::<B>());
    let request = |body: B| {
        Request::post(format!("{}/v2/payments", mock.url()))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .expect("request")
    };
    // A first payment warms the cache (and is not counted below).
    assert_eq!(send(&mut api, request(body())).await.status(), 201);
    mock.revoke_access_tokens();
    let status = send(&mut api, request(body())).await.status();
    let bodies = mock.payment_bodies()[1..].to_vec();
    let replays = auth.stats().replays;
    let unauthorized = mock.unauthorized();
    // Replayed or not, the next request carries the renewed token.
    assert_eq!(send(&mut api, request(body())).await.status(), 201);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.unauthorized(), unauthorized);
    let issued = mock.issued_access_tokens();
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
    (status, bodies, replays)
}

/// A body of unknown size, in two chunks.
struct Stream([&'static [u8]; 2], usize);

impl http_body::Body for Stream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let chunk = this
            .0
            .get(this.1)
            .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c))));
        this.1 += 1;
        Poll::Ready(chunk)
    }
}

#[tokio::test]
async fn each_kind_of_body_is_replayed_byte_for_byte_or_sent_once() {
    use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
    use http_body_util::{BodyExt, Empty};
    type Infallible = std::convert::Infallible;
    const JSON: &[u8] = br#"{"amount":42}"#;
    let json = Bytes::from_static(JSON);
    let twice = |b: &Bytes| vec![b.clone(), b.clone()];

    let full = payment_after_revocation(|| Full::new(json.clone())).await;
    assert_eq!(full, (StatusCode::CREATED, twice(&json), 1));
    let string =
        payment_after_revocation(|| String::from_utf8(JSON.to_vec()).expect("utf-8")).await;
    assert_eq!(string, (StatusCode::CREATED, twice(&json), 1));
    let empty = payment_after_revocation(Empty::<Bytes>::new).await;
    assert_eq!(empty.1, twice(&Bytes::new()));
    assert_eq!(empty.2, 1);
    let boxed_empty =
        payment_after_revocation(|| -> BoxBody<Bytes, Infallible> { Empty::new().boxed() }).await;
    assert_eq!(boxed_empty.1, twice(&Bytes::new()));
    assert_eq!(boxed_empty.2, 1);
    let unsync_empty = payment_after_revocation(|| -> UnsyncBoxBody<Bytes, Infallible> {
        Empty::new().boxed_unsync()
    })
    .await;
    assert_eq!(unsync_empty.1, twice(&Bytes::new()));
    assert_eq!(unsync_empty.2, 1);

    // Not reproducible by the default policy: sent once, the 401 returned.
    let sent_once = (StatusCode::UNAUTHORIZED, vec![json.clone()], 0);
    let boxed_full = payment_after_revocation(|| -> BoxBody<Bytes, Infallible> {
        Full::new(json.clone()).boxed()
    })
    .await;
    assert_eq!(boxed_full, sent_once);
    let unsync_stream = payment_after_revocation(|| -> UnsyncBoxBody<Bytes, Infallible> {
        Stream([&JSON[..5], &JSON[5..]], 0).boxed_unsync()
    })
    .await;
    assert_eq!(unsync_stream, sent_once);
}
