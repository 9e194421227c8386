//! The figures of the README's Performance section (issue 7), each against a
//! baseline measured in the same run:
//!
//! - `hot_path/*`: one request through `VoltAuth` with a cached token, against
//!   the bare inner service, tower-http's `SetRequestHeader` with a fixed value
//!   (the limit for attaching a header), a hand-written
//!   `Arc<RwLock<Option<(HeaderValue, Instant)>>>` cache, and `StatusAware`:
//!   `SetRequestHeader`'s work plus the least that keeping the token to one
//!   origin and recovering from 401s adds (an origin check, a status check),
//!   and, in the interleaved rounds only, its parts: each check alone, and
//!   neither (only forwarding the response future);
//! - `contention/*`: the first three on one and two threads at once;
//! - `herd/*`: 10,000 tasks asking a cold cache for a token through a `/oauth`
//!   transport that takes 1 ms, against one bare round trip through it (the
//!   number of `/oauth` calls is asserted to be 1 per herd and written to
//!   `<criterion dir>/volt-auth-herd.json`), with the same tasks on a warm
//!   cache for context;
//! - `end_to_end/*`: `GET /banks` over loopback against the mock Volt server
//!   with a hyper-util client, with and without the layer; then the two
//!   interleaved, whose median ratio goes to
//!   `<criterion dir>/volt-auth-end-to-end.json`.
//!
//! ```text
//! cargo bench --bench auth && scripts/bench-table
//! ```

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pin_project_lite::pin_project;
use tokio::runtime::Runtime;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;
use volt_auth::mock::{self, MockVolt};
use volt_auth::{Builder, Credentials, NoReplay, VoltAuthLayer};

/// What the in-process mock reports as its URL; the layer's origin.
const ORIGIN: &str = "http://127.0.0.1:9";
/// The request URI of the hot-path and contention benches: the layer's origin.
const API_URI: &str = "http://127.0.0.1:9/banks";
/// Its authority.
const AUTHORITY: &str = "127.0.0.1:9";
/// Tasks in one herd.
const HERD: usize = 10_000;
/// Interleaved end-to-end rounds, and requests per block in each.
const PAIRED_ROUNDS: usize = 1600;
const PAIRED_BLOCK: u64 = 25;
/// Interleaved hot-path rounds, and requests per block in each.
const HOT_ROUNDS: usize = 200;
const HOT_BLOCK: u64 = 5_000;
/// Interleaved contention rounds, and requests per thread in each block.
const CONTENTION_ROUNDS: usize = 10;
const CONTENTION_BLOCK: u64 = 400_000;
/// What the herd's `/oauth` transport answers, after 1 ms.
const TOKEN_JSON: &[u8] =
    br#"{"access_token":"herd-access-token","token_type":"Bearer","expires_in":3600}"#;

type Body = Empty<Bytes>;

// ---------------------------------------------------------------------------
// The services under test
// ---------------------------------------------------------------------------

/// The inner service: answers 200 at once, so the middleware cost dominates.
#[derive(Clone, Copy, Debug)]
struct Ok200;

impl<B> Service<Request<B>> for Ok200 {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Look at the request, so that attaching the header is not optimised out.
        drop(black_box(request));
        ready(Ok(Response::new(Empty::new())))
    }
}

/// Answers 200 to requests carrying the expected token, for a check before
/// measuring that every variant really attaches it.
#[derive(Clone, Debug)]
struct Expect(HeaderValue);

impl<B> Service<Request<B>> for Expect {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        assert_eq!(request.headers().get(AUTHORIZATION), Some(&self.0));
        ready(Ok(Response::new(Empty::new())))
    }
}

/// The cache people write by hand today: a lock, and a clock read per request.
#[derive(Clone)]
struct RwLockAuth<S> {
    inner: S,
    token: Arc<RwLock<Option<(HeaderValue, Instant)>>>,
}

impl<S> RwLockAuth<S> {
    fn new(inner: S, header: HeaderValue) -> Self {
        let expires_at = Instant::now() + Duration::from_secs(3600);
        Self {
            inner,
            token: Arc::new(RwLock::new(Some((header, expires_at)))),
        }
    }
}

impl<S, B> Service<Request<B>> for RwLockAuth<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RwLockFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let header = match &*self.token.read().unwrap_or_else(|e| e.into_inner()) {
            Some((header, expires_at)) if Instant::now() < *expires_at => header.clone(),
            // The slow path (fetch a token, write it) is never taken here.
            _ => {
                return RwLockFuture::Failed {
                    error: Some("the token expired".into()),
                };
            }
        };
        request.headers_mut().insert(AUTHORIZATION, header);
        RwLockFuture::Sent {
            future: self.inner.call(request),
        }
    }
}

pin_project! {
    #[project = RwLockProj]
    enum RwLockFuture<F> {
        Sent { #[pin] future: F },
        Failed { error: Option<BoxError> },
    }
}

impl<F, T, E> Future for RwLockFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RwLockProj::Sent { future } => future.poll(cx).map_err(Into::into),
            RwLockProj::Failed { error } => {
                Poll::Ready(Err(error.take().unwrap_or_else(|| "polled again".into())))
            }
        }
    }
}

/// The least a layer that keeps its token to one origin and recovers from
/// 401s adds to `SetRequestHeader`: an origin check before attaching the
/// header, and a look at each response's status, which hands a 401 to code
/// out of line.
///
/// With `ORIGIN` or `STATUS` false, it leaves that check out (the header is
/// then attached to every request, or no status is looked at), to tell what
/// each part costs: with both false it only forwards the response future.
#[derive(Clone)]
struct StatusAware<S, const ORIGIN: bool, const STATUS: bool> {
    inner: S,
    origin: Arc<str>,
    header: HeaderValue,
}

impl<S, B, const ORIGIN: bool, const STATUS: bool> Service<Request<B>>
    for StatusAware<S, ORIGIN, STATUS>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Unpin,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = StatusAwareFuture<S::Future, STATUS>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let uri = request.uri();
        if !ORIGIN
            || uri.scheme_str() == Some("http")
                && uri.authority().map(|authority| authority.as_str()) == Some(&*self.origin)
        {
            request
                .headers_mut()
                .insert(AUTHORIZATION, self.header.clone());
        }
        StatusAwareFuture {
            future: self.inner.call(request),
        }
    }
}

fn status_aware<S, const ORIGIN: bool, const STATUS: bool>(
    inner: S,
    header: HeaderValue,
) -> StatusAware<S, ORIGIN, STATUS> {
    StatusAware {
        inner,
        origin: Arc::from(AUTHORITY),
        header,
    }
}

/// `pin_project_lite` takes no const generics; the inner futures here are
/// `Unpin`.
struct StatusAwareFuture<F, const STATUS: bool> {
    future: F,
}

impl<F, E, const STATUS: bool> Future for StatusAwareFuture<F, STATUS>
where
    F: Future<Output = Result<Response<Body>, E>> + Unpin,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response =
            std::task::ready!(Pin::new(&mut self.future).poll(cx)).map_err(Into::into)?;
        if STATUS && response.status() == StatusCode::UNAUTHORIZED {
            return on_unauthorized(response);
        }
        Poll::Ready(Ok(response))
    }
}

/// Where a layer would start its recovery; never reached here.
#[cold]
#[inline(never)]
fn on_unauthorized(response: Response<Body>) -> Poll<Result<Response<Body>, BoxError>> {
    Poll::Ready(Ok(black_box(response)))
}

/// One request, built the same way for every variant: drive the service
/// ready, call it, poll the (immediately ready) response future once.
#[inline]
fn send<S>(service: &mut S, uri: &Uri) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        other => panic!("the service is not ready: {other:?}"),
    }
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = uri.clone();
    let mut future = pin!(service.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        Poll::Ready(Err(error)) => panic!("the request failed: {error:?}"),
        Poll::Pending => panic!("the hot path must not wait"),
    }
}

/// The time to [`send`] `HOT_BLOCK` requests one after another.
fn send_block<S>(service: &mut S, uri: &Uri) -> Duration
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for _ in 0..HOT_BLOCK {
        black_box(send(service, uri));
    }
    start.elapsed()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A layer against the in-process mock, with a token in its cache; and that
/// token's header, for the baselines.
fn warm_layer(rt: &Runtime, mock: &MockVolt) -> (VoltAuthLayer, HeaderValue) {
    warm(rt, VoltAuthLayer::builder(mock.credentials()), mock)
}

/// The same with `.replay(NoReplay)`.
fn warm_no_replay(rt: &Runtime, mock: &MockVolt) -> (VoltAuthLayer<NoReplay>, HeaderValue) {
    warm(
        rt,
        VoltAuthLayer::builder(mock.credentials()).replay(NoReplay),
        mock,
    )
}

fn warm<P>(rt: &Runtime, builder: Builder<P>, mock: &MockVolt) -> (VoltAuthLayer<P>, HeaderValue) {
    let layer = builder
        .base_url(&mock.url())
        .build(mock.service())
        .expect("layer");
    let token = rt.block_on(layer.access_token()).expect("a token");
    (layer, token.header_value().clone())
}

// ---------------------------------------------------------------------------
// 1. Hot path
// ---------------------------------------------------------------------------

fn hot_path(c: &mut Criterion) {
    let rt = runtime();
    // A stale token starts its background refresh through tokio.
    let _guard = rt.enter();
    let mock = MockVolt::builder().in_process();
    assert_eq!(mock.url(), ORIGIN);
    let (layer, header) = warm_layer(&rt, &mock);
    let (no_replay, no_replay_header) = warm_no_replay(&rt, &mock);

    // Every variant attaches the same token, without waiting.
    let expect = Expect(header.clone());
    let uri = Uri::from_static(API_URI);
    send(
        &mut SetRequestHeaderLayer::overriding(AUTHORIZATION, header.clone()).layer(expect.clone()),
        &uri,
    );
    send(&mut RwLockAuth::new(expect.clone(), header.clone()), &uri);
    send(
        &mut status_aware::<_, true, true>(expect.clone(), header.clone()),
        &uri,
    );
    send(&mut layer.layer(expect.clone()), &uri);
    send(&mut no_replay.layer(Expect(no_replay_header)), &uri);

    let mut group = c.benchmark_group("hot_path");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .throughput(Throughput::Elements(1));

    let mut bare = Ok200;
    group.bench_function("bare", |b| b.iter(|| send(&mut bare, &uri)));

    let mut set_header =
        SetRequestHeaderLayer::overriding(AUTHORIZATION, header.clone()).layer(Ok200);
    group.bench_function("set_header", |b| b.iter(|| send(&mut set_header, &uri)));

    let mut rwlock = RwLockAuth::new(Ok200, header.clone());
    group.bench_function("rwlock_cache", |b| b.iter(|| send(&mut rwlock, &uri)));

    // Its parts, timed only in the interleaved rounds below.
    let mut forward_only = status_aware::<_, false, false>(Ok200, header.clone());
    let mut status_only = status_aware::<_, false, true>(Ok200, header.clone());
    let mut origin_only = status_aware::<_, true, false>(Ok200, header.clone());
    let mut status_aware = status_aware::<_, true, true>(Ok200, header.clone());
    group.bench_function("status_aware", |b| b.iter(|| send(&mut status_aware, &uri)));

    let mut volt = layer.layer(Ok200);
    let mut measured = false;
    group.bench_function("volt_auth", |b| {
        measured = true;
        b.iter(|| send(&mut volt, &uri))
    });

    let mut volt_no_replay = no_replay.layer(Ok200);
    group.bench_function("volt_auth_no_replay", |b| {
        b.iter(|| send(&mut volt_no_replay, &uri))
    });
    group.finish();

    if measured {
        // The same six and `StatusAware`'s parts, interleaved: each round
        // times a block of each, so that all see the same load; the ratios to
        // `SetRequestHeader` are taken within each round.
        let rounds = interleaved(
            HOT_ROUNDS,
            &mut [
                &mut || send_block(&mut set_header, &uri),
                &mut || send_block(&mut bare, &uri),
                &mut || send_block(&mut rwlock, &uri),
                &mut || send_block(&mut volt, &uri),
                &mut || send_block(&mut volt_no_replay, &uri),
                &mut || send_block(&mut status_aware, &uri),
                &mut || send_block(&mut forward_only, &uri),
                &mut || send_block(&mut status_only, &uri),
                &mut || send_block(&mut origin_only, &uri),
            ],
        );
        // Variant `i`'s time over variant `base`'s, round by round.
        let over = |i: usize, base: usize| Quartiles::of(rounds.iter().map(|r| r[i] / r[base]));
        let over_set_header = |i: usize| over(i, 0);
        write_record(
            "volt-auth-hot-path.json",
            &serde_json::json!({
                "rounds": HOT_ROUNDS,
                "requests_per_block": HOT_BLOCK,
                "over_set_header": {
                    "bare": over_set_header(1).json(),
                    "rwlock_cache": over_set_header(2).json(),
                    "volt_auth": over_set_header(3).json(),
                    "volt_auth_no_replay": over_set_header(4).json(),
                    "status_aware": over_set_header(5).json(),
                    "forward_only": over_set_header(6).json(),
                    "status_only": over_set_header(7).json(),
                    "origin_only": over_set_header(8).json(),
                },
                "over_status_aware": {
                    "volt_auth": over(3, 5).json(),
                    "volt_auth_no_replay": over(4, 5).json(),
                },
            }),
        );
    }

    // Every request above was served from the one cached token.
    assert_eq!(mock.oauth_calls(), 2);
}

// ---------------------------------------------------------------------------
// 2. Contention
// ---------------------------------------------------------------------------

/// `threads` threads each send `iters` requests through a clone of `service`,
/// started together; the wall time from the first start to the last finish.
fn on_threads<S>(rt: &Runtime, service: &S, threads: usize, iters: u64) -> Duration
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send,
    S::Error: std::fmt::Debug,
{
    let barrier = Barrier::new(threads);
    let uri = Uri::from_static(API_URI);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let mut service = service.clone();
                let (barrier, uri, handle) = (&barrier, &uri, rt.handle());
                scope.spawn(move || {
                    let _guard = handle.enter();
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(send(&mut service, uri));
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        let spans: Vec<_> = workers
            .into_iter()
            .map(|worker| worker.join().expect("bench thread"))
            .collect();
        let start = spans.iter().map(|span| span.0).min().expect("a thread");
        let end = spans.iter().map(|span| span.1).max().expect("a thread");
        end - start
    })
}

fn contention(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mock = MockVolt::builder().in_process();
    let (layer, header) = warm_layer(&rt, &mock);
    let (no_replay, _) = warm_no_replay(&rt, &mock);

    let mut group = c.benchmark_group("contention");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);

    let set_header = SetRequestHeaderLayer::overriding(AUTHORIZATION, header.clone()).layer(Ok200);
    let rwlock = RwLockAuth::new(Ok200, header);
    let volt = layer.layer(Ok200);
    let volt_no_replay = no_replay.layer(Ok200);
    let mut measured = false;
    for threads in [1, 2] {
        // One iteration is one request on every thread.
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_with_input(
            BenchmarkId::new("set_header", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| on_threads(&rt, &set_header, n, iters)),
        );
        group.bench_with_input(
            BenchmarkId::new("rwlock_cache", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| on_threads(&rt, &rwlock, n, iters)),
        );
        group.bench_with_input(BenchmarkId::new("volt_auth", threads), &threads, |b, &n| {
            measured = true;
            b.iter_custom(|iters| on_threads(&rt, &volt, n, iters))
        });
        group.bench_with_input(
            BenchmarkId::new("volt_auth_no_replay", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| on_threads(&rt, &volt_no_replay, n, iters)),
        );
    }
    group.finish();

    if measured {
        // Interleaved: each round runs every service on one thread and on
        // two, so that each scaling figure compares blocks under one load.
        let set_header = |n| on_threads(&rt, &set_header, n, CONTENTION_BLOCK);
        let rwlock = |n| on_threads(&rt, &rwlock, n, CONTENTION_BLOCK);
        let volt = |n| on_threads(&rt, &volt, n, CONTENTION_BLOCK);
        let volt_no_replay = |n| on_threads(&rt, &volt_no_replay, n, CONTENTION_BLOCK);
        // The inner service alone: how far this machine scales at all.
        let bare = |n| on_threads(&rt, &Ok200, n, CONTENTION_BLOCK);
        let rounds = interleaved(
            CONTENTION_ROUNDS,
            &mut [
                &mut || set_header(1),
                &mut || set_header(2),
                &mut || rwlock(1),
                &mut || rwlock(2),
                &mut || volt(1),
                &mut || volt(2),
                &mut || volt_no_replay(1),
                &mut || volt_no_replay(2),
                &mut || bare(1),
                &mut || bare(2),
            ],
        );
        // Two threads send twice the requests: throughput on two over one.
        let scaling = |i: usize| Quartiles::of(rounds.iter().map(|r| 2.0 * r[i] / r[i + 1]));
        // The same over the bare inner service's scaling in the same round:
        // how much of what this VM gives a second thread at that moment.
        let of_bare =
            |i: usize| Quartiles::of(rounds.iter().map(|r| (r[i] / r[i + 1]) / (r[8] / r[9])));
        // Throughput of VoltAuth (`volt`: its one-thread block) over the
        // baseline's (`base`), on one thread and on two.
        let versus = |volt: usize, base: usize| {
            let on = |t: usize| Quartiles::of(rounds.iter().map(|r| r[base + t] / r[volt + t]));
            serde_json::json!({ "one_thread": on(0).json(), "two_threads": on(1).json() })
        };
        write_record(
            "volt-auth-contention.json",
            &serde_json::json!({
                "rounds": CONTENTION_ROUNDS,
                "requests_per_thread": CONTENTION_BLOCK,
                "scaling": {
                    "set_header": scaling(0).json(),
                    "rwlock_cache": scaling(2).json(),
                    "volt_auth": scaling(4).json(),
                    "volt_auth_no_replay": scaling(6).json(),
                    "bare": scaling(8).json(),
                },
                "scaling_over_bare": {
                    "set_header": of_bare(0).json(),
                    "rwlock_cache": of_bare(2).json(),
                    "volt_auth": of_bare(4).json(),
                    "volt_auth_no_replay": of_bare(6).json(),
                },
                "over_set_header": {
                    "volt_auth": versus(4, 0),
                    "volt_auth_no_replay": versus(6, 0),
                },
                "over_rwlock_cache": {
                    "volt_auth": versus(4, 2),
                    "volt_auth_no_replay": versus(6, 2),
                },
            }),
        );
    }
    assert_eq!(mock.oauth_calls(), 2);
}

// ---------------------------------------------------------------------------
// 3. Herd
// ---------------------------------------------------------------------------

/// A `/oauth` transport that takes 1 ms to answer a valid token, and counts
/// its calls.
#[derive(Clone)]
struct SlowOAuth {
    calls: Arc<AtomicUsize>,
}

impl Service<Request<Full<Bytes>>> for SlowOAuth {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let mut response = Response::new(Full::new(Bytes::from_static(TOKEN_JSON)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(response)
        })
    }
}

fn herd_layer(transport: SlowOAuth) -> VoltAuthLayer {
    let credentials = Credentials::new(
        mock::CLIENT_ID,
        mock::CLIENT_SECRET,
        mock::USERNAME,
        mock::PASSWORD,
    );
    VoltAuthLayer::builder(credentials)
        .base_url(ORIGIN)
        .build(transport)
        .expect("layer")
}

/// The herds run, and their `/oauth` calls, for the table.
#[derive(Default)]
struct HerdRecord {
    herds: AtomicUsize,
    oauth_calls: AtomicUsize,
    max_per_herd: AtomicUsize,
}

fn herd(c: &mut Criterion) {
    let rt = runtime();
    let record = HerdRecord::default();

    let mut group = c.benchmark_group("herd");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10);

    let transport = SlowOAuth {
        calls: Arc::default(),
    };
    group.bench_function("oauth_round_trip", |b| {
        b.to_async(&rt).iter(|| {
            let transport = transport.clone();
            async move {
                let request = Request::post(format!("{ORIGIN}/oauth"))
                    .body(Full::new(Bytes::from_static(b"grant_type=password")))
                    .expect("request");
                let response = transport.oneshot(request).await.expect("infallible");
                let body = response.into_body().collect().await.expect("body");
                black_box(body.to_bytes())
            }
        })
    });

    group.bench_function(BenchmarkId::new("tasks", HERD), |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let record = &record;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let calls = Arc::new(AtomicUsize::new(0));
                    let layer = herd_layer(SlowOAuth {
                        calls: calls.clone(),
                    });
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..HERD)
                        .map(|_| {
                            let layer = layer.clone();
                            tokio::spawn(async move { layer.access_token().await })
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("task").expect("a token");
                    }
                    total += start.elapsed();
                    let calls = calls.load(Ordering::SeqCst);
                    assert_eq!(calls, 1, "one /oauth call per herd");
                    record.herds.fetch_add(1, Ordering::Relaxed);
                    record.oauth_calls.fetch_add(calls, Ordering::Relaxed);
                    record.max_per_herd.fetch_max(calls, Ordering::Relaxed);
                }
                total
            }
        })
    });
    // Context: the same 10,000 tasks on a warm cache, i.e. what spawning and
    // joining them costs without any waiting for `/oauth`.
    let calls = Arc::new(AtomicUsize::new(0));
    let warm = herd_layer(SlowOAuth {
        calls: calls.clone(),
    });
    rt.block_on(warm.access_token()).expect("a token");
    group.bench_function(BenchmarkId::new("tasks_warm", HERD), |b| {
        b.to_async(&rt).iter(|| {
            let warm = warm.clone();
            async move {
                let tasks: Vec<_> = (0..HERD)
                    .map(|_| {
                        let layer = warm.clone();
                        tokio::spawn(async move { layer.access_token().await })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("task").expect("a token");
                }
            }
        })
    });
    group.finish();
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    if record.herds.load(Ordering::Relaxed) == 0 {
        return; // filtered out
    }
    write_record(
        "volt-auth-herd.json",
        &serde_json::json!({
            "tasks": HERD,
            "herds": record.herds.load(Ordering::Relaxed),
            "oauth_calls": record.oauth_calls.load(Ordering::Relaxed),
            "max_oauth_calls_per_herd": record.max_per_herd.load(Ordering::Relaxed),
        }),
    );
}

/// Criterion's output directory, found as criterion finds it.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    let metadata = std::env::var_os("CARGO").and_then(|cargo| {
        std::process::Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .ok()
    });
    metadata
        .and_then(|output| serde_json::from_slice::<serde_json::Value>(&output.stdout).ok())
        .and_then(|value| value["target_directory"].as_str().map(PathBuf::from))
        .map_or_else(
            || PathBuf::from("target/criterion"),
            |target| target.join("criterion"),
        )
}

/// Writes `value` as `<criterion dir>/<name>`, for `scripts/bench-table`, and
/// prints it.
fn write_record(name: &str, value: &serde_json::Value) {
    println!("{name}: {value}");
    let dir = criterion_dir();
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(name), value.to_string()));
    if let Err(error) = written {
        eprintln!("could not write {name} in {}: {error}", dir.display());
    }
}

/// Runs every block once per round, `rounds` times, each round starting one
/// block further on; returns each round's times in seconds, in `blocks` order.
/// Ratios taken within a round compare blocks that ran under the same load.
fn interleaved(rounds: usize, blocks: &mut [&mut dyn FnMut() -> Duration]) -> Vec<Vec<f64>> {
    let n = blocks.len();
    (0..rounds)
        .map(|round| {
            let mut times = vec![0.0; n];
            for k in 0..n {
                let i = (round + k) % n;
                times[i] = blocks[i]().as_secs_f64();
            }
            times
        })
        .collect()
}

/// The median and quartiles of some ratios.
struct Quartiles {
    p25: f64,
    median: f64,
    p75: f64,
}

impl Quartiles {
    fn of(ratios: impl IntoIterator<Item = f64>) -> Self {
        let mut ratios: Vec<f64> = ratios.into_iter().collect();
        ratios.sort_by(f64::total_cmp);
        let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
        Self {
            p25: at(0.25),
            median: at(0.5),
            p75: at(0.75),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "median": self.median, "p25": self.p25, "p75": self.p75 })
    }
}

// ---------------------------------------------------------------------------
// 4. End to end
// ---------------------------------------------------------------------------

/// Sends `iters` `GET /banks` one after another through `service`, each with
/// `header` if given, reading every body.
async fn get_banks<S>(mut service: S, uri: Uri, header: Option<HeaderValue>, iters: u64) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<hyper::body::Incoming>>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for _ in 0..iters {
        let mut request = Request::new(Full::default());
        *request.uri_mut() = uri.clone();
        if let Some(header) = &header {
            request.headers_mut().insert(AUTHORIZATION, header.clone());
        }
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("GET /banks");
        assert_eq!(response.status(), StatusCode::OK);
        black_box(response.into_body().collect().await.expect("body"));
    }
    start.elapsed()
}

fn end_to_end(c: &mut Criterion) {
    // Client, server and the loop on one thread: no cross-thread wake-ups, whose
    // cost on a loaded machine swamps everything else.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mock = rt.block_on(MockVolt::start()).expect("mock server");
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let layer = VoltAuthLayer::builder(mock.credentials())
        .base_url(&mock.url())
        .build(client.clone())
        .expect("layer");
    let header = rt
        .block_on(layer.access_token())
        .expect("a token")
        .header_value()
        .clone();
    let api = layer.layer(client.clone());
    let uri: Uri = format!("{}/banks", mock.url()).parse().expect("uri");

    let mut group = c.benchmark_group("end_to_end");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(30)
        .throughput(Throughput::Elements(1));
    group.bench_function("without_layer", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            get_banks(client.clone(), uri.clone(), Some(header.clone()), iters)
        })
    });
    let mut measured = false;
    group.bench_function("with_layer", |b| {
        measured = true;
        b.to_async(&rt)
            .iter_custom(|iters| get_banks(api.clone(), uri.clone(), None, iters))
    });
    group.finish();

    if measured {
        paired_end_to_end(&rt, &client, &api, &uri, &header);
    }
    assert_eq!(mock.oauth_calls(), 1, "the layer reused its token");
    assert_eq!(mock.unauthorized(), 0);
}

/// The end-to-end comparison interleaved: blocks of requests without and with
/// the layer, alternately, so that both see the same load on a shared machine.
/// The median of the rounds' ratios is the robust figure for the table.
fn paired_end_to_end<S>(
    rt: &Runtime,
    client: &Client<HttpConnector, Full<Bytes>>,
    api: &S,
    uri: &Uri,
    header: &HeaderValue,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<hyper::body::Incoming>> + Clone,
    S::Error: std::fmt::Debug,
{
    let rounds = interleaved(
        PAIRED_ROUNDS,
        &mut [
            &mut || {
                rt.block_on(get_banks(
                    client.clone(),
                    uri.clone(),
                    Some(header.clone()),
                    PAIRED_BLOCK,
                ))
            },
            &mut || rt.block_on(get_banks(api.clone(), uri.clone(), None, PAIRED_BLOCK)),
        ],
    );
    // Requests per second with the layer, over without.
    let ratio = Quartiles::of(rounds.iter().map(|r| r[0] / r[1]));
    write_record(
        "volt-auth-end-to-end.json",
        &serde_json::json!({
            "rounds": PAIRED_ROUNDS,
            "requests_per_block": PAIRED_BLOCK,
            "ratio_median": ratio.median,
            "ratio_p25": ratio.p25,
            "ratio_p75": ratio.p75,
        }),
    );
}

criterion_group! {
    name = benches;
    // No plots: rendering them takes longer than measuring on a small machine,
    // and the table needs only the estimates.
    config = Criterion::default()
        .without_plots()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .noise_threshold(0.05);
    targets = hot_path, contention, herd, end_to_end
}
criterion_main!(benches);
