//! The tower `Service` and its response future under tower's contract:
//! readiness before every call (replay included), Pending from the inner
//! future and from the token wait, drops at every stage, the token STALE or
//! EXPIRED at call time combined with a 401, and concurrency on a
//! multi-thread runtime.
//!
//! Exact counts against the in-process mock; time-dependent tests use tokio's
//! paused clock, where `sleep(1 ms)` is an idle barrier (every runnable task
//! runs before the clock moves), never a race.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tower::{BoxError, Layer, Service, ServiceExt};
use volt_auth::mock::{MockService, MockVolt};
use volt_auth::{NoReplay, VoltAuth, VoltAuthLayer};

mod common;

use common::{Body, GUARD, bearer, builder, get, joined, layer, send};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn payment(mock: &MockVolt, body: &'static [u8]) -> Request<Body> {
    Request::post(format!("{}/v2/payments", mock.url()))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body)))
        .expect("request")
}

#[derive(Default)]
struct Counts {
    /// `poll_ready` calls that answered Ready.
    ready: AtomicUsize,
    calls: AtomicUsize,
    unready_calls: AtomicUsize,
    /// Polls of the futures `call` returned.
    future_polls: AtomicUsize,
    /// Polls of a future after it returned Ready.
    polled_after_ready: AtomicUsize,
}

type Hook = Arc<dyn Fn(usize) + Send + Sync>;

/// A strict inner service: a clone starts unready, a call without readiness
/// is counted, and each future answers Pending `pending` times (waking itself)
/// and, when `gate` is set, waits for a permit of it (woken by whoever adds
/// one) before asking the mock. `hook(n)` runs at the n-th call (0-based)
/// before it is forwarded.
struct Probe {
    inner: MockService,
    ready: bool,
    counts: Arc<Counts>,
    pending: usize,
    gate: Option<Arc<Semaphore>>,
    gate_from: usize,
    hook: Option<Hook>,
}

impl Probe {
    fn new(mock: &MockVolt) -> Self {
        Self {
            inner: mock.service(),
            ready: false,
            counts: Arc::default(),
            pending: 0,
            gate: None,
            gate_from: usize::MAX,
            hook: None,
        }
    }
}

impl Clone for Probe {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            ready: false,
            counts: self.counts.clone(),
            pending: self.pending,
            gate: self.gate.clone(),
            gate_from: self.gate_from,
            hook: self.hook.clone(),
        }
    }
}

type BoxFut =
    Pin<Box<dyn Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send>>;

struct ProbeFuture {
    counts: Arc<Counts>,
    pending: usize,
    inner: BoxFut,
    done: bool,
}

impl Future for ProbeFuture {
    type Output = Result<Response<Body>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.counts.future_polls.fetch_add(1, Ordering::SeqCst);
        if this.done {
            this.counts
                .polled_after_ready
                .fetch_add(1, Ordering::SeqCst);
            return Poll::Pending;
        }
        if this.pending > 0 {
            this.pending -= 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let output = std::task::ready!(this.inner.as_mut().poll(cx));
        this.done = true;
        Poll::Ready(output)
    }
}

impl Service<Request<Body>> for Probe {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = ProbeFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.counts.ready.fetch_add(1, Ordering::SeqCst);
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ProbeFuture {
        let n = self.counts.calls.fetch_add(1, Ordering::SeqCst);
        if !std::mem::replace(&mut self.ready, false) {
            self.counts.unready_calls.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(hook) = &self.hook {
            hook(n);
        }
        let mut inner = self.inner.clone();
        let gate = self.gate.clone().filter(|_| n >= self.gate_from);
        let future: BoxFut = Box::pin(async move {
            if let Some(gate) = gate {
                // Each permit lets exactly one call through.
                gate.acquire().await.expect("gate").forget();
            }
            inner.call(request).await
        });
        ProbeFuture {
            counts: self.counts.clone(),
            pending: self.pending,
            inner: future,
            done: false,
        }
    }
}

/// `probe` behind a new layer over `mock`, warmed up with a `GET /banks`
/// answered 200: the layer, the probe's counts and the service.
async fn warmed(mock: &MockVolt, probe: Probe) -> (VoltAuthLayer, Arc<Counts>, VoltAuth<Probe>) {
    let auth = layer(mock);
    let counts = probe.counts.clone();
    let mut api = auth.layer(probe);
    assert_eq!(
        send(&mut api, get(mock, "/banks")).await.status(),
        StatusCode::OK
    );
    (auth, counts, api)
}

/// A later `GET /banks` succeeds with the token of the one refresh (the
/// second issued), and costs no further `/oauth` call.
async fn serves_the_renewed_token<S>(mock: &MockVolt, api: &mut S)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    assert_eq!(
        send(api, get(mock, "/banks")).await.status(),
        StatusCode::OK
    );
    let issued = mock.issued_access_tokens();
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
    assert_eq!(mock.oauth_calls(), 2);
}

/// A response future polled again after it completed: `Error::Interrupted`,
/// at once.
fn assert_interrupted<T: std::fmt::Debug>(again: Poll<Result<T, BoxError>>) {
    let Poll::Ready(Err(error)) = again else {
        panic!("expected Error::Interrupted, got {again:?}");
    };
    assert!(
        matches!(
            error.downcast_ref::<volt_auth::Error>(),
            Some(volt_auth::Error::Interrupted)
        ),
        "{error:?}"
    );
}

fn snapshot(counts: &Counts) -> (usize, usize, usize) {
    (
        counts.ready.load(Ordering::SeqCst),
        counts.calls.load(Ordering::SeqCst),
        counts.unready_calls.load(Ordering::SeqCst),
    )
}

/// The inner future answers Pending several times (waking itself) before the
/// 401 and before the replay's answer: one replay, each future polled exactly
/// once per Pending plus once for its answer (no busy loop, no lost wake-up).
#[tokio::test]
async fn an_inner_future_pending_several_times_before_a_401_is_replayed_once() {
    let mock = MockVolt::builder().in_process();
    let mut probe = Probe::new(&mock);
    probe.pending = 5;
    let (auth, counts, mut api) = warmed(&mock, probe).await;
    assert_eq!(counts.future_polls.load(Ordering::SeqCst), 6);
    mock.revoke_access_tokens();

    let response = send(&mut api, payment(&mock, b"{\"amount\":1}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    // 401 call and replay: 6 polls each.
    assert_eq!(counts.future_polls.load(Ordering::SeqCst), 18);
    assert_eq!(counts.polled_after_ready.load(Ordering::SeqCst), 0);
    // Warm-up (1), the caller's readiness (1), the replay's clone (1).
    assert_eq!(snapshot(&counts), (3, 3, 0));
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.api_calls(), 3);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );
    assert_eq!(auth.stats().replays, 1);
}

/// The inner future is Pending until something else wakes it (a semaphore
/// permit added by the test): the response future completes once woken, and
/// is not polled in between.
#[tokio::test(start_paused = true)]
async fn an_inner_future_woken_from_outside_is_not_lost_or_spun() {
    let mock = MockVolt::builder().in_process();
    let mut probe = Probe::new(&mock);
    let gate = Arc::new(Semaphore::new(0));
    probe.gate = Some(gate.clone());
    probe.gate_from = 1; // the warm-up goes through
    let (_, counts, api) = warmed(&mock, probe).await;
    mock.revoke_access_tokens();

    let task = tokio::spawn(api.clone().oneshot(payment(&mock, b"{}")));
    sleep(ms(1)).await; // idle barrier
    let polls = counts.future_polls.load(Ordering::SeqCst);
    sleep(ms(1)).await;
    assert_eq!(
        counts.future_polls.load(Ordering::SeqCst),
        polls,
        "no spinning"
    );
    assert!(!task.is_finished());
    gate.add_permits(1); // the first send answers 401
    sleep(ms(1)).await;
    assert!(!task.is_finished(), "the replay waits at the gate");
    assert_eq!(mock.api_calls(), 2);
    assert_eq!(mock.oauth_calls(), 2);
    gate.add_permits(1);
    let response = joined(task).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.api_calls(), 3);
    assert_eq!(snapshot(&counts), (3, 3, 0));
}

/// EXPIRED at call time (the `authorize` path), then a 401 to the token that
/// wait produced: one more (forced) refresh, one replay with the third token.
#[tokio::test(start_paused = true)]
async fn expired_at_call_time_then_a_401_refreshes_once_more_and_replays_once() {
    let mock = Arc::new(MockVolt::builder().in_process());
    let mut probe = Probe::new(&mock);
    let revoke = mock.clone();
    // The second call (the first after the expiry-driven refresh) finds its
    // brand-new token revoked.
    probe.hook = Some(Arc::new(move |n| {
        if n == 1 {
            revoke.revoke_access_tokens();
        }
    }));
    let t0 = Instant::now();
    let (auth, counts, mut api) = warmed(&mock, probe).await;

    sleep_until(t0 + secs(3571)).await; // past the 30 s margin
    let response = send(&mut api, payment(&mock, b"{\"amount\":7}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 3);
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[1]), bearer(&issued[2])]
    );
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 2);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(snapshot(&counts), (3, 3, 0));
    assert_eq!(auth.stats().replays, 1);

    // The third token is in service: no more /oauth calls.
    assert_eq!(
        send(&mut api, get(&mock, "/banks")).await.status(),
        StatusCode::OK
    );
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[2])));
}

/// EXPIRED at call time, and every token is rejected: the expiry-driven
/// refresh, one forced refresh, one replay, then the 401 goes back.
#[tokio::test(start_paused = true)]
async fn expired_at_call_time_with_every_token_rejected_costs_two_oauth_calls_and_one_replay() {
    let mock = MockVolt::builder().in_process();
    let probe = Probe::new(&mock);
    let t0 = Instant::now();
    let (auth, counts, mut api) = warmed(&mock, probe).await;
    sleep_until(t0 + secs(3571)).await;
    mock.reject_all_tokens(true);
    let response = send(&mut api, payment(&mock, b"{}")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.api_calls(), 3);
    assert_eq!(snapshot(&counts), (3, 3, 0));
    assert_eq!(auth.stats().replays, 1);
    // Throttled: the next 401 within the backoff costs no /oauth call and no replay.
    let response = send(&mut api, get(&mock, "/banks")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.api_calls(), 4);
    assert_eq!(auth.stats().replays, 1);
}

/// STALE at call time: the request starts the background refresh and goes out
/// with the old token, which was revoked. Its 401 waits for that refresh
/// (no second /oauth call) and replays with its token.
#[tokio::test(start_paused = true)]
async fn stale_at_call_time_then_a_401_waits_for_the_background_refresh() {
    let mock = MockVolt::builder().in_process();
    let probe = Probe::new(&mock);
    let t0 = Instant::now();
    let (auth, counts, api) = warmed(&mock, probe).await;

    sleep_until(t0 + secs(3301)).await; // inside the refresh-ahead window
    mock.revoke_access_tokens();
    let hold = mock.hold_oauth();
    let task = tokio::spawn(api.clone().oneshot(payment(&mock, b"{}")));
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("refresh held");
    sleep(ms(1)).await; // idle barrier: the 401 came back and waits
    assert_eq!(mock.api_calls(), 2);
    assert_eq!(mock.unauthorized(), 1);
    assert!(!task.is_finished());
    assert_eq!(mock.oauth_calls(), 2);
    hold.release();
    let response = joined(task).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );
    assert_eq!(snapshot(&counts), (3, 3, 0));
    assert_eq!(auth.stats().replays, 1);
}

/// Dropped while renewing after a 401: the refresh goes on, requests that
/// came after the 401 (and wait for that refresh) are not hung, and later
/// requests use the new token.
#[tokio::test(start_paused = true)]
async fn dropping_the_future_while_it_renews_after_a_401_hangs_nobody() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let api = auth.layer(mock.service());
    assert_eq!(
        send(&mut api.clone(), get(&mock, "/banks")).await.status(),
        StatusCode::OK
    );
    mock.revoke_access_tokens();
    let hold = mock.hold_oauth();
    let dropped = tokio::spawn(api.clone().oneshot(payment(&mock, b"{}")));
    let others: Vec<_> = (0..10)
        .map(|_| tokio::spawn(api.clone().oneshot(get(&mock, "/banks"))))
        .collect();
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("refresh held");
    sleep(ms(1)).await;
    // The 401 invalidated the token: the others wait instead of sending it.
    assert_eq!(mock.api_calls(), 2);
    assert!(others.iter().all(|task| !task.is_finished()));
    dropped.abort();
    assert!(dropped.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(hold.waiting(), 1, "the refresh was not cancelled");
    hold.release();
    for task in others {
        let response = joined(task).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.api_calls(), 12);
    assert_eq!(auth.stats().replays, 0);
    serves_the_renewed_token(&mock, &mut api.clone()).await;
}

/// Dropped while the replay is in flight: the new token stays in service and
/// a later 401 (after the backoff) is recovered from again.
#[tokio::test(start_paused = true)]
async fn dropping_the_future_during_the_replay_leaves_the_cache_usable() {
    let mock = MockVolt::builder().in_process();
    let mut probe = Probe::new(&mock);
    let gate = Arc::new(Semaphore::new(0));
    probe.gate = Some(gate.clone());
    probe.gate_from = 2; // warm-up and the 401 go through; the replay waits
    let (auth, counts, api) = warmed(&mock, probe).await;
    mock.revoke_access_tokens();
    let task = tokio::spawn(api.clone().oneshot(payment(&mock, b"{}")));
    sleep(ms(1)).await;
    assert_eq!(snapshot(&counts), (3, 3, 0));
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.api_calls(), 2);
    task.abort();
    assert!(task.await.is_err_and(|e| e.is_cancelled()));
    gate.add_permits(100);

    serves_the_renewed_token(&mock, &mut api.clone()).await;

    sleep(secs(2)).await;
    mock.revoke_access_tokens();
    assert_eq!(
        send(&mut api.clone(), payment(&mock, b"{}")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(auth.stats().replays, 2);
}

/// Dropped while waiting for the first token: the refresh goes on and the
/// ready service it held is released.
#[tokio::test(start_paused = true)]
async fn dropping_the_future_while_it_waits_for_a_token_releases_the_ready_service() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let api = tower::ServiceBuilder::new()
        .layer(auth.clone())
        .concurrency_limit(1)
        .service(mock.service());
    let hold = mock.hold_oauth();
    let task = tokio::spawn(api.clone().oneshot(get(&mock, "/banks")));
    timeout(GUARD, hold.wait_for(1)).await.expect("held");
    task.abort();
    assert!(task.await.is_err_and(|e| e.is_cancelled()));
    hold.release();
    // The permit the dropped future held is free again.
    let mut api = api.clone();
    assert_eq!(
        send(&mut api, get(&mock, "/banks")).await.status(),
        StatusCode::OK
    );
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(mock.api_calls(), 1);
}

/// Polled again after a replayed success: the inner future is not asked
/// again, and nothing is sent again.
#[tokio::test]
async fn polling_again_after_a_replayed_success_sends_nothing() {
    let mock = MockVolt::builder().in_process();
    let probe = Probe::new(&mock);
    let (_, counts, mut api) = warmed(&mock, probe).await;
    mock.revoke_access_tokens();
    api.ready().await.expect("ready");
    let mut future = Box::pin(api.call(payment(&mock, b"{}")));
    let response = future.as_mut().await.expect("response");
    assert_eq!(response.status(), StatusCode::CREATED);
    let again = poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
    assert_interrupted(again);
    assert_eq!(snapshot(&counts), (3, 3, 0));
    assert_eq!(mock.api_calls(), 3);
    assert_eq!(
        counts.polled_after_ready.load(Ordering::SeqCst),
        0,
        "the finished inner future was polled again"
    );
}

/// Polled again after it ended otherwise than with a success: a failed wait
/// for the token, a 401 without a copy to replay, an inner error. Each time
/// `Error::Interrupted`, and nothing is sent or polled again.
#[tokio::test]
async fn polling_again_after_an_error_or_an_unreplayed_401_sends_nothing() {
    let mock = MockVolt::builder().in_process();
    mock.fail_oauth(1, StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#);
    let probe = Probe::new(&mock);
    let counts = probe.counts.clone();
    let mut api = layer(&mock).layer(probe);
    api.ready().await.expect("ready");
    let mut future = Box::pin(api.call(get(&mock, "/banks")));
    future.as_mut().await.expect_err("no token");
    assert_interrupted(poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await);
    assert_eq!(snapshot(&counts), (1, 0, 0));
    assert_eq!((mock.oauth_calls(), mock.api_calls()), (1, 0));

    let mock = MockVolt::builder().in_process();
    let probe = Probe::new(&mock);
    let counts = probe.counts.clone();
    let auth = builder(&mock)
        .replay(NoReplay)
        .build(mock.service())
        .expect("layer");
    let mut api = auth.layer(probe);
    assert_eq!(
        send(&mut api, get(&mock, "/banks")).await.status(),
        StatusCode::OK
    );
    mock.revoke_access_tokens();
    api.ready().await.expect("ready");
    let mut future = Box::pin(api.call(payment(&mock, b"{}")));
    let response = future.as_mut().await.expect("the 401");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_interrupted(poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await);
    assert_eq!(snapshot(&counts), (2, 2, 0));
    assert_eq!(counts.polled_after_ready.load(Ordering::SeqCst), 0);
    assert_eq!(mock.api_calls(), 2);

    // On the hot path (a token at hand): the inner future, an `async` block,
    // panics if polled past its completion.
    auth.access_token().await.expect("a token");
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = {
        let calls = calls.clone();
        tower::service_fn(move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<Response<Body>, _>(std::io::Error::other("inner")) }
        })
    };
    let mut api = auth.layer(failing);
    api.ready().await.expect("ready");
    let mut future = Box::pin(api.call(get(&mock, "/banks")));
    let error = future.as_mut().await.expect_err("the inner error");
    assert!(error.is::<std::io::Error>(), "{error:?}");
    assert_interrupted(poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Aborts `task`; its future has been dropped when this returns.
async fn aborted<T>(task: tokio::task::JoinHandle<T>) {
    task.abort();
    assert!(task.await.is_err_and(|e| e.is_cancelled()));
}

/// Dropped in each state it can be in: waiting for a token, mid-call,
/// answered (its copy to replay unused), waiting for the renewal after a 401
/// (the 401 held), mid-replay. Each time, what it held goes with it: no clone
/// of the service (in the copy to replay, the wait or the inner future) is
/// left.
#[tokio::test(start_paused = true)]
async fn a_future_dropped_in_any_state_leaves_nothing_behind() {
    let mock = MockVolt::builder().in_process();
    let mut probe = Probe::new(&mock);
    let gate = Arc::new(Semaphore::new(0));
    probe.gate = Some(gate.clone());
    probe.gate_from = 0;
    let counts = probe.counts.clone();
    let auth = layer(&mock);
    let mut api = auth.layer(probe);
    // Besides the test's `counts` and `api`'s probe.
    let left = || Arc::strong_count(&counts) - 2;

    let hold = mock.hold_oauth();
    let task = tokio::spawn(api.clone().oneshot(payment(&mock, b"{}")));
    timeout(GUARD, hold.wait_for(1)).await.expect("held");
    aborted(task).await;
    assert_eq!(left(), 0, "waiting for a token");
    hold.release();

    let task = tokio::spawn(api.clone().oneshot(payment(&mock, b"{}")));
    sleep(ms(1)).await; // the call waits at the gate
    assert_eq!(counts.calls.load(Ordering::SeqCst), 1);
    aborted(task).await;
    assert_eq!(left(), 0, "mid-call");

    gate.add_permits(1);
    let response = send(&mut api, payment(&mock, b"{}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(left(), 0, "answered");

    mock.revoke_access_tokens();
    let hold = mock.hold_oauth();
    gate.add_permits(1);
    let task = tokio::spawn(api.clone().oneshot(payment(&mock, b"{}")));
    timeout(GUARD, hold.wait_for(1)).await.expect("held");
    assert_eq!(mock.unauthorized(), 1);
    aborted(task).await;
    assert_eq!(left(), 0, "waiting for the renewal");
    hold.release();

    sleep(secs(2)).await; // past the throttle of forced refreshes
    mock.revoke_access_tokens();
    gate.add_permits(1); // the 401 goes through, the replay waits
    let task = tokio::spawn(api.clone().oneshot(payment(&mock, b"{}")));
    sleep(ms(1)).await;
    assert_eq!(
        (counts.calls.load(Ordering::SeqCst), auth.stats().replays),
        (5, 1)
    );
    aborted(task).await;
    assert_eq!(left(), 0, "mid-replay");
    assert_eq!(mock.oauth_calls(), 3);
}

/// Many tasks on a multi-thread runtime, cold cache (`authorize` path), the
/// first token revoked as soon as the API sees it: one password grant, one
/// forced refresh, every request answered 200 with at most one replay each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_waiting_for_a_token_that_is_then_revoked_cost_two_oauth_calls() {
    const N: usize = 300;
    let mock = Arc::new(MockVolt::builder().in_process());
    let auth = layer(&mock);
    let mut probe = Probe::new(&mock);
    probe.pending = 2;
    let revoked = Arc::new(AtomicBool::new(false));
    let (revoke, flag) = (mock.clone(), revoked.clone());
    probe.hook = Some(Arc::new(move |_| {
        if !flag.swap(true, Ordering::SeqCst) {
            revoke.revoke_access_tokens();
        }
    }));
    let counts = probe.counts.clone();
    let api = auth.layer(probe);
    let tasks: Vec<_> = (0..N)
        .map(|_| tokio::spawn(api.clone().oneshot(get(&mock, "/banks"))))
        .collect();
    for task in tasks {
        let response = joined(task).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(mock.refresh_grants(), 1);
    let replays = auth.stats().replays as usize;
    assert!((1..=N).contains(&replays));
    assert_eq!(mock.api_calls(), N + replays);
    assert_eq!(mock.unauthorized(), replays);
    let (ready, calls, unready) = snapshot(&counts);
    assert_eq!((ready, calls, unready), (N + replays, N + replays, 0));
    let issued = mock.issued_access_tokens();
    let last: Vec<_> = mock.api_authorizations();
    assert_eq!(last.iter().filter(|a| **a == bearer(&issued[1])).count(), N);
}

/// Polled again after a success on the hot path, with the mock's own
/// (unfused) future as the inner one.
#[tokio::test]
async fn polling_again_after_a_success_does_not_panic() {
    let mock = MockVolt::builder().in_process();
    let mut api = layer(&mock).layer(mock.service());
    assert_eq!(
        send(&mut api, get(&mock, "/banks")).await.status(),
        StatusCode::OK
    );
    api.ready().await.expect("ready");
    let mut future = Box::pin(api.call(get(&mock, "/banks")));
    let response: Result<Response<Body>, BoxError> = future.as_mut().await;
    assert_eq!(response.expect("response").status(), StatusCode::OK);
    let again = poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
    assert_interrupted(again);
    assert_eq!(mock.api_calls(), 2);
}

/// Every replay's inner future panics, on a multi-thread runtime: each task
/// ends in that panic, the one forced refresh is not repeated, each replay
/// is counted once, and the cache serves the renewed token to the next
/// requests (no lock left poisoned or held, no `/oauth` call more).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_whose_inner_future_panics_leave_the_cache_usable() {
    const N: usize = 200;
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let armed = Arc::new(AtomicBool::new(false));
    let inner = {
        let armed = armed.clone();
        mock.service().map_future(move |future| {
            let panics = armed.load(Ordering::SeqCst);
            async move {
                assert!(!panics, "the inner future panicked");
                future.await
            }
        })
    };
    let mut api = auth.layer(inner);
    assert_eq!(
        send(&mut api, get(&mock, "/banks")).await.status(),
        StatusCode::OK
    );
    mock.revoke_access_tokens();
    // Every first send is made (with the revoked token) before any answer;
    // only the calls made after that, the replays, get a panicking future.
    let mut futures = Vec::new();
    for _ in 0..N {
        futures.push(api.ready().await.expect("ready").call(get(&mock, "/banks")));
    }
    armed.store(true, Ordering::SeqCst);
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    for task in tasks {
        let error = timeout(GUARD, task)
            .await
            .expect("within the guard")
            .expect_err("the replay panicked");
        assert!(error.is_panic(), "{error:?}");
    }
    assert_eq!(mock.unauthorized(), N);
    assert_eq!(mock.api_calls(), 1 + N, "no replay reached the server");
    assert_eq!(auth.stats().replays, N as u64);
    assert_eq!(mock.oauth_calls(), 2);

    armed.store(false, Ordering::SeqCst);
    let tasks: Vec<_> = (0..N)
        .map(|_| tokio::spawn(api.clone().oneshot(get(&mock, "/banks"))))
        .collect();
    for task in tasks {
        assert_eq!(joined(task).await.status(), StatusCode::OK);
    }
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    let authorizations = mock.api_authorizations();
    assert!(
        authorizations[1 + N..]
            .iter()
            .all(|a| *a == bearer(&issued[1]))
    );
    assert_eq!(mock.api_calls(), 1 + 2 * N);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, N as u64);
}
