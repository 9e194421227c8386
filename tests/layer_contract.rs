//! Review of the layer's contract for processes that run for weeks: what a
//! dropped layer leaves behind, and settings the builder accepts.
//!
//! Time runs on tokio's paused clock; nothing sleeps to synchronise. Task
//! counts come from the runtime's own metrics, on a `current_thread` runtime
//! whose only tasks are the ones these tests cause.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::Notify;
use tower::BoxError;
use volt_auth::{Credentials, Error, VoltAuthLayer};

const TOKEN: &[u8] =
    br#"{"access_token":"at-1","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-1"}"#;

fn builder() -> volt_auth::Builder {
    VoltAuthLayer::builder(Credentials::new("id", "secret", "user", "password"))
        .base_url("http://127.0.0.1:9")
}

/// A transport that answers every `/oauth` request with `status` (and a token
/// for 200), counting calls; `alive` is dropped with the transport, that is
/// with the cache that owns it.
fn transport(
    status: StatusCode,
    calls: Arc<AtomicUsize>,
    alive: Arc<()>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |_: Request<Full<Bytes>>| {
        let _alive = alive.clone();
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = if status == StatusCode::OK {
                Bytes::from_static(TOKEN)
            } else {
                Bytes::new()
            };
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        }
    })
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Lets the runtime reap aborted and finished tasks: a bounded number of
/// yields, never a sleep.
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

/// A layer whose `/oauth` keeps failing, dropped: its backoff's rearm task
/// must not sleep on for the rest of the backoff (up to `backoff_max`, which
/// may be a day), and the cache (with its transport) must be gone.
#[tokio::test(start_paused = true)]
async fn a_dropped_layer_after_a_failed_refresh_leaves_no_task_behind() {
    settle().await;
    let baseline = alive_tasks();
    let calls = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(());
    let auth = builder()
        .backoff(
            Duration::from_secs(60 * 60),
            Duration::from_secs(24 * 60 * 60),
        )
        .build(transport(
            StatusCode::SERVICE_UNAVAILABLE,
            calls.clone(),
            alive.clone(),
        ))
        .unwrap();
    let err = auth.access_token().await.unwrap_err();
    assert!(matches!(err, Error::Failed { .. }), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    drop(auth);
    settle().await;
    assert_eq!(Arc::strong_count(&alive), 1, "the cache outlived its layer");
    assert_eq!(
        alive_tasks(),
        baseline,
        "a task outlived the layer it served"
    );
}

/// Layers built, used and dropped a thousand times, half of them failing:
/// no task accumulates.
#[tokio::test(start_paused = true)]
async fn a_thousand_layers_built_and_dropped_leave_no_task_behind() {
    settle().await;
    let baseline = alive_tasks();
    let alive = Arc::new(());
    for i in 0..1000 {
        let status = if i % 2 == 0 {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        };
        let auth = builder()
            .build(transport(status, Arc::default(), alive.clone()))
            .unwrap();
        let _ = auth.access_token().await;
        drop(auth);
    }
    settle().await;
    assert_eq!(Arc::strong_count(&alive), 1);
    assert_eq!(alive_tasks(), baseline);
}

/// The last layer dropped while its refresh is held at `/oauth`: the refresh
/// finishes, and then the cache, its transport and its timers are gone.
#[tokio::test(start_paused = true)]
async fn dropping_the_last_layer_during_a_refresh_leaves_nothing_once_it_ends() {
    settle().await;
    let baseline = alive_tasks();
    let alive = Arc::new(());
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let transport = {
        let (alive, entered, release) = (alive.clone(), entered.clone(), release.clone());
        tower::service_fn(move |_: Request<Full<Bytes>>| {
            let (alive, entered, release) = (alive.clone(), entered.clone(), release.clone());
            async move {
                let _alive = alive;
                entered.notify_one();
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(TOKEN))))
            }
        })
    };
    let auth = builder().build(transport).unwrap();
    let waiter = tokio::spawn({
        let auth = auth.clone();
        async move { auth.access_token().await.map(|_| ()) }
    });
    entered.notified().await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    drop(auth);
    // The refresh runs on and holds the cache until `/oauth` answers.
    assert!(Arc::strong_count(&alive) > 1);
    release.notify_one();
    settle().await;
    assert_eq!(Arc::strong_count(&alive), 1);
    assert_eq!(alive_tasks(), baseline);
}

/// `backoff(min, max)` promises doubling from `min` up to `max`. With a small
/// `min` the doubling stopped after 20 steps (2^20 × min), so `max` was never
/// reached: with 1 µs and 60 s, a failing `/oauth` was retried about once a
/// second for ever instead of once every 30–60 s.
#[tokio::test(start_paused = true)]
async fn a_small_backoff_minimum_still_doubles_up_to_the_maximum() {
    let calls = Arc::new(AtomicUsize::new(0));
    let auth = builder()
        .backoff(Duration::from_micros(1), Duration::from_secs(60))
        .build(transport(
            StatusCode::SERVICE_UNAVAILABLE,
            calls.clone(),
            Arc::default(),
        ))
        .unwrap();
    // 40 failures in a row, each attempt after the previous backoff ended.
    for attempt in 1..=40 {
        assert!(auth.access_token().await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), attempt);
        tokio::time::advance(Duration::from_secs(61)).await;
    }
    assert!(auth.access_token().await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 41);
    // The 41st failure waits at least half the 60 s cap: 29 s later the cache
    // still answers with its error without asking `/oauth`.
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(auth.access_token().await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 41);
}

/// Checked and correct: invalid backoffs, a zero timeout and a margin wider
/// than the refresh-ahead window are refused; edge values that keep the cache
/// sane are accepted.
#[test]
fn builder_settings_are_validated() -> Result<(), BoxError> {
    let build = |b: volt_auth::Builder| {
        b.build(transport(StatusCode::OK, Arc::default(), Arc::default()))
            .err()
            .map(|e| e.to_string())
    };
    let s = Duration::from_secs;
    assert_eq!(
        build(builder().token_timeout(Duration::ZERO)).as_deref(),
        Some("invalid setting: the token timeout must be positive")
    );
    assert_eq!(
        build(builder().backoff(s(2), s(1))).as_deref(),
        Some("invalid setting: the backoff needs 0 < min <= max")
    );
    assert_eq!(
        build(builder().refresh_ahead(s(10)).expiry_margin(s(11))).as_deref(),
        Some("invalid setting: the expiry margin must not exceed the refresh-ahead window")
    );
    assert_eq!(build(builder().refresh_ahead(Duration::MAX)), None);
    assert_eq!(
        build(
            builder()
                .refresh_ahead(Duration::ZERO)
                .expiry_margin(Duration::ZERO)
        ),
        None
    );
    Ok(())
}

/// `allow_origin` took a port that is not a number (or out of range) for the
/// scheme's default port, a password's prefix for the host, and an empty
/// host: the token then went to an origin the caller never named. They are
/// refused as `Endpoint::custom` refuses them.
#[test]
fn allow_origin_refuses_what_endpoint_custom_refuses() {
    let build = |url: &str| {
        builder()
            .allow_origin(url)
            .build(transport(StatusCode::OK, Arc::default(), Arc::default()))
    };
    for url in [
        "https://x.example:abc",
        "https://x.example:99999",
        "https://alice:pa/55@proxy.example",
        "http://alice:pa/55@proxy.example",
        "https://alice:pa55@proxy.example",
        "https://:443",
    ] {
        let err = build(url).err();
        assert!(
            matches!(err, Some(volt_auth::ConfigError::InvalidUrl { .. })),
            "{url}: {err:?}"
        );
        let shown = format!("{err:?}");
        assert!(
            !shown.contains("pa55") && !shown.contains("alice"),
            "{shown}"
        );
    }
    for url in [
        "https://x.example:8443",
        "https://x.example/some/path",
        "http://[::1]:8080",
        "http://localhost",
    ] {
        assert!(build(url).is_ok(), "{url}");
    }
}

/// Checked and correct: `access_token()` and the services share one single
/// flight. 500 tasks ask `access_token()` and 500 send through the layer,
/// on 8 threads, while the one `/oauth` call is held; all get that token.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn access_token_and_services_share_one_flight_under_a_herd() {
    use tower::{Layer, ServiceExt};
    let calls = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let transport = {
        let (calls, release) = (calls.clone(), release.clone());
        tower::service_fn(move |_: Request<Full<Bytes>>| {
            let (calls, release) = (calls.clone(), release.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _permit = release.acquire().await.unwrap();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(TOKEN))))
            }
        })
    };
    let auth = builder().build(transport).unwrap();
    let inner = tower::service_fn(|request: Request<Full<Bytes>>| async move {
        let header = request.headers()[http::header::AUTHORIZATION].clone();
        Ok::<_, Infallible>(Response::new(header))
    });
    let api = auth.layer(inner);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (auth, api) = (auth.clone(), api.clone());
        tasks.spawn(async move {
            if i % 2 == 0 {
                let token = auth.access_token().await.unwrap();
                token.header_value().clone()
            } else {
                let request = Request::get("http://127.0.0.1:9/banks")
                    .body(Full::default())
                    .unwrap();
                api.oneshot(request).await.unwrap().into_body()
            }
        });
    }
    // The one call is held until some task has started it; tasks that start
    // later either wait for it too or find its token.
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    release.add_permits(1);
    while let Some(header) = tasks.join_next().await {
        assert_eq!(header.unwrap(), "Bearer at-1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let stats = auth.stats();
    assert_eq!(stats.password.succeeded, 1);
    assert_eq!(stats.refreshes, 1);
    let remaining = stats.remaining.expect("a live token");
    assert!(remaining <= Duration::from_secs(3600), "{remaining:?}");
    assert!(remaining > Duration::from_secs(3500), "{remaining:?}");
}
