//! Issue 3: `VoltAuthLayer` against the mock Volt server, with exact counts.
//!
//! Time-dependent tests run on tokio's paused clock with the in-process mock
//! (`MockVolt::builder().in_process()`, whose `service()` is both the `/oauth`
//! transport and the API service): there `sleep` moves the clock, firing every
//! timer due on the way, instead of waiting. Concurrency tests run on a
//! multi-thread runtime, over real TCP on 127.0.0.1 or in process. `/oauth` is
//! held open with `hold_oauth()` and `wait_for(n)`, never by sleeping.

use std::fmt;
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Barrier, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use volt_auth::mock::{self, MockVolt, OAuthHold};
use volt_auth::{Api, ConfigError, GrantType, VoltAuthLayer};

mod common;

use common::{Body, GUARD, Recorder, banks_ok, bearer, builder, get, joined, layer, send};
type HttpClient = Client<HttpConnector, Body>;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http::<Body>()
}

/// The hyper client as an API service, with at most `limit` requests on the
/// wire at once (so a thousand requests do not open a thousand sockets), and
/// the response body read before it is handed back.
#[derive(Clone)]
struct LimitedClient {
    client: HttpClient,
    permits: Arc<Semaphore>,
}

impl LimitedClient {
    fn new(client: HttpClient, limit: usize) -> Self {
        Self {
            client,
            permits: Arc::new(Semaphore::new(limit)),
        }
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Request<Body>> for LimitedClient {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let client = self.client.clone();
        let permits = self.permits.clone();
        Box::pin(async move {
            let _permit = permits.acquire_owned().await?;
            let response = client.request(request).await?;
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok(Response::from_parts(parts, Full::new(bytes)))
        })
    }
}

/// Runs `future`, calling `first` right after its first poll with whether that
/// poll left it pending.
async fn after_first_poll<F: Future>(future: F, first: impl FnOnce(bool)) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut first = Some(first);
    poll_fn(|cx| {
        let poll = future.as_mut().poll(cx);
        if let Some(first) = first.take() {
            first(poll.is_pending());
        }
        poll
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Single flight for the first token
// ---------------------------------------------------------------------------------------------

const THOUSAND: usize = 1000;

/// 1,000 tasks, each with its own clone of `api`, send their first request at
/// once while the one `/oauth` call is held open; then the call is released.
async fn thousand_first_requests<S>(mock: &MockVolt, auth: &VoltAuthLayer, api: S)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let hold = mock.hold_oauth();
    let (polled, mut polled_rx) = watch::channel(0usize);
    let polled = Arc::new(polled);
    let ready_at_once = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THOUSAND));
    let tasks: Vec<JoinHandle<Result<StatusCode, BoxError>>> = (0..THOUSAND)
        .map(|_| {
            let mut api = api.clone();
            let request = get(mock, "/banks");
            let polled = polled.clone();
            let ready_at_once = ready_at_once.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let future = api.ready().await?.call(request);
                let response = after_first_poll(future, |pending| {
                    if !pending {
                        ready_at_once.fetch_add(1, Ordering::SeqCst);
                    }
                    polled.send_modify(|n| *n += 1);
                })
                .await?;
                Ok(response.status())
            })
        })
        .collect();

    // Every request has been polled and is waiting for the token while the
    // single /oauth call is held open.
    timeout(GUARD, polled_rx.wait_for(|n| *n == THOUSAND))
        .await
        .expect("all requests polled")
        .expect("watch");
    timeout(GUARD, hold.wait_for(1)).await.expect("held");
    assert_eq!(ready_at_once.load(Ordering::SeqCst), 0);
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(mock.max_oauth_in_flight(), 1);
    assert_eq!(mock.api_calls(), 0);
    hold.release();

    for task in tasks {
        let status = joined(task).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(mock.refresh_grants(), 0);
    assert_eq!(mock.max_oauth_in_flight(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 1);
    let authorizations = mock.api_authorizations();
    assert_eq!(authorizations.len(), THOUSAND);
    assert!(authorizations.iter().all(|a| *a == bearer(&issued[0])));
    let stats = auth.stats();
    assert_eq!(stats.password.succeeded, 1);
    assert_eq!(stats.password.attempts(), 1);
    assert_eq!(stats.refresh.attempts(), 0);
    assert_eq!(stats.refreshes, 1);
    assert_eq!(stats.replays, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_first_requests_over_tcp_cost_one_password_grant() {
    let mock = MockVolt::start().await.expect("mock");
    let client = http_client();
    let auth = builder(&mock).build(client.clone()).expect("layer");
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .service(LimitedClient::new(client, 64));
    thousand_first_requests(&mock, &auth, api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_first_requests_in_process_cost_one_password_grant() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .service(mock.service());
    thousand_first_requests(&mock, &auth, api).await;
}

// ---------------------------------------------------------------------------------------------
// Refresh-ahead and expiry margin, on the paused clock
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn refresh_ahead_refreshes_once_in_the_background_and_requests_keep_the_old_token() {
    let mock = MockVolt::builder().in_process(); // one-hour tokens
    let auth = layer(&mock); // defaults: refresh-ahead 5 min (+ up to 20 % jitter), margin 30 s
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;
    let first = mock.issued_access_tokens();
    assert_eq!(first.len(), 1);
    assert_eq!(mock.oauth_calls(), 1);

    // The window opens between 3240 s and 3300 s after issue (5 min, moved
    // earlier by up to 20 %, before the 3600 s expiry); until then, no /oauth
    // call however many requests.
    for at in (60..=3180).step_by(60).chain([3239]) {
        sleep_until(t0 + secs(at)).await;
        banks_ok(&mut api, &mock).await;
    }
    assert_eq!(mock.oauth_calls(), 1);

    // Inside the window: the first request starts one background refresh; while
    // its /oauth call is held open, requests complete at once (no time passes)
    // with the old token.
    sleep_until(t0 + secs(3301)).await;
    let hold = mock.hold_oauth();
    let before = mock.api_authorizations().len();
    let now = Instant::now();
    for _ in 0..50 {
        banks_ok(&mut api, &mock).await;
    }
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("refresh held");
    for _ in 0..50 {
        banks_ok(&mut api, &mock).await;
    }
    assert_eq!(Instant::now(), now, "no request waited");
    assert_eq!(hold.waiting(), 1);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(mock.max_oauth_in_flight(), 1);
    let during = &mock.api_authorizations()[before..];
    assert_eq!(during.len(), 100);
    assert!(during.iter().all(|a| *a == bearer(&first[0])));

    hold.release();
    // Idle barrier: on the paused clock every runnable task (the refresh) runs
    // before the clock moves by this millisecond.
    sleep(Duration::from_millis(1)).await;
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
    assert_eq!(mock.oauth_calls(), 2);
    let stats = auth.stats();
    assert_eq!(stats.password.succeeded, 1);
    assert_eq!(stats.refresh.succeeded, 1);
    assert_eq!(stats.refresh.attempts(), 1);
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.replays, 0);
}

#[tokio::test(start_paused = true)]
async fn past_the_margin_requests_wait_for_the_refresh_and_carry_the_new_token() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api.clone(), &mock).await;

    // No request inside the refresh-ahead window; past the 30 s margin (3570 s)
    // but before the server-side expiry (3600 s) the old token still works on
    // the server, yet counts as expired here.
    sleep_until(t0 + secs(3571)).await;
    assert_eq!(mock.oauth_calls(), 1);
    let hold = mock.hold_oauth();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let api = api.clone();
            let request = get(&mock, "/banks");
            tokio::spawn(api.oneshot(request))
        })
        .collect();
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("refresh held");
    // Idle barrier (paused clock): every request has run as far as it can.
    sleep(Duration::from_millis(1)).await;
    assert!(tasks.iter().all(|task| !task.is_finished()));
    assert_eq!(
        mock.api_calls(),
        1,
        "no request went out with the old token"
    );
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);
    hold.release();

    for task in tasks {
        let response = task.await.expect("task").expect("response");
        assert_eq!(response.status(), StatusCode::OK);
    }
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    let authorizations = mock.api_authorizations();
    assert_eq!(authorizations.len(), 21);
    assert_eq!(authorizations[0], bearer(&issued[0]));
    assert!(authorizations[1..].iter().all(|a| *a == bearer(&issued[1])));
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(auth.stats().refresh.succeeded, 1);
}

#[tokio::test(start_paused = true)]
async fn builder_windows_are_honoured() {
    let mock = MockVolt::builder().in_process();
    let auth = builder(&mock)
        .refresh_ahead(secs(100))
        .expiry_margin(secs(10))
        .build(mock.service())
        .expect("layer");
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;

    // Refresh-ahead opens between 3480 s and 3500 s: the default windows would
    // have refreshed long before.
    sleep_until(t0 + secs(3479)).await;
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 1);

    // Past the 10 s margin (3590 s), with no request inside the window: the
    // request waits for the refresh and carries the new token.
    sleep_until(t0 + secs(3591)).await;
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0]), bearer(&issued[1])]
    );

    // The next token: its window opens between 3591 + 3480 s and 3591 + 3500 s.
    sleep_until(t0 + secs(3591 + 3479)).await;
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 2);
    sleep_until(t0 + secs(3591 + 3501)).await;
    banks_ok(&mut api, &mock).await;
    // Idle barrier (paused clock): the background refresh completes.
    sleep(Duration::from_millis(1)).await;
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 2);
    assert_eq!(
        mock.api_authorizations().last(),
        Some(&bearer(&issued[1])),
        "the request inside the window did not wait"
    );
}

#[tokio::test(start_paused = true)]
async fn short_lifetimes_scale_the_windows_down() {
    // 60 s tokens, default windows (5 min, 30 s): scaled to a third of the
    // lifetime (20 s, + up to 20 % jitter) and a tenth (6 s).
    let mock = MockVolt::builder()
        .access_token_lifetime(secs(60))
        .in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    for at in 0..=35 {
        sleep_until(t0 + secs(at)).await;
        for _ in 0..10 {
            banks_ok(&mut api, &mock).await;
        }
    }
    assert_eq!(mock.oauth_calls(), 1, "no refresh per request");

    // 41 s: inside the window (it opens between 36 s and 40 s), before the
    // margin (54 s): one background refresh.
    sleep_until(t0 + secs(41)).await;
    for _ in 0..10 {
        banks_ok(&mut api, &mock).await;
    }
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);

    // The new token (issued at 41 s) is left alone until its own window (77 s).
    for at in 42..=76 {
        sleep_until(t0 + secs(at)).await;
        banks_ok(&mut api, &mock).await;
    }
    assert_eq!(mock.oauth_calls(), 2);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
}

#[tokio::test(start_paused = true)]
async fn windows_are_capped_by_the_lifetime_of_an_hour_long_token_too() {
    // Volt's one-hour token, windows set beyond a third and a tenth of it:
    // they are cut to 20 minutes (+ up to 20 % jitter) and 6 minutes.
    let windows = |mock: &MockVolt| {
        builder(mock)
            .refresh_ahead(secs(30 * 60))
            .expiry_margin(secs(10 * 60))
            .build(mock.service())
            .expect("layer")
    };

    // Refresh-ahead: 35 minutes in is inside a 30-minute window, but not
    // inside the capped one (it opens between 36 and 40 minutes).
    let mock = MockVolt::builder().in_process();
    let mut api = windows(&mock).layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;
    sleep_until(t0 + secs(35 * 60)).await;
    banks_ok(&mut api, &mock).await;
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(mock.oauth_calls(), 1);
    sleep_until(t0 + secs(40 * 60 + 1)).await;
    banks_ok(&mut api, &mock).await;
    sleep(Duration::from_millis(1)).await;
    assert_eq!(mock.oauth_calls(), 2);

    // Expiry margin: 51 minutes in is inside a 10-minute margin, but not
    // inside the capped one (54 minutes): the request goes out with the
    // first token and starts a background refresh.
    let mock = MockVolt::builder().in_process();
    let mut api = windows(&mock).layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;
    sleep_until(t0 + secs(51 * 60)).await;
    banks_ok(&mut api, &mock).await;
    sleep(Duration::from_millis(1)).await;
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0])]
    );
}

// ---------------------------------------------------------------------------------------------
// Grants: rotation and password fallback
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn refreshes_present_the_latest_rotated_refresh_token() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;
    // Three refreshes, each past the margin of the token before.
    for n in 1..=3u64 {
        sleep_until(t0 + secs(3571 * n)).await;
        banks_ok(&mut api, &mock).await;
    }
    assert_eq!(mock.oauth_calls(), 4);
    assert_eq!(mock.password_grants(), 1);
    assert_eq!(mock.refresh_grants(), 3);
    let requests = mock.oauth_requests();
    let refresh_tokens = mock.issued_refresh_tokens();
    assert_eq!(refresh_tokens.len(), 4);
    assert_eq!(requests[0].grant_type.as_deref(), Some("password"));
    assert_eq!(requests[0].field("refresh_token"), None);
    for n in 1..=3 {
        let request = &requests[n];
        assert_eq!(request.grant_type.as_deref(), Some("refresh_token"));
        assert_eq!(
            request.field("refresh_token"),
            Some(refresh_tokens[n - 1].as_str())
        );
        assert_eq!(request.field("client_id"), Some(mock::CLIENT_ID));
        assert_eq!(request.field("client_secret"), Some(mock::CLIENT_SECRET));
        assert_eq!(request.field("password"), None);
    }
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        issued.iter().map(|t| bearer(t)).collect::<Vec<_>>()
    );
    let stats = auth.stats();
    assert_eq!(stats.refresh.succeeded, 3);
    assert_eq!(stats.refresh.rejected, 0);
    assert_eq!(stats.refreshes, 4);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_answer_without_a_refresh_token_keeps_the_one_presented() {
    // A token endpoint that rotates nothing: only the password grant's answer
    // carries a refresh token. Records the refresh token each grant presents.
    let presented = Arc::new(std::sync::Mutex::new(Vec::new()));
    let transport = {
        let presented = presented.clone();
        tower::service_fn(move |request: Request<Body>| {
            let presented = presented.clone();
            async move {
                let body = request.into_body().collect().await?.to_bytes();
                let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)?;
                let field = |name: &str| {
                    form.iter()
                        .find(|(key, _)| key == name)
                        .map(|(_, value)| value.clone())
                };
                let mut presented = presented.lock().unwrap();
                presented.push(field("refresh_token"));
                let n = presented.len();
                let answer = match field("grant_type").as_deref() {
                    Some("password") => format!(
                        r#"{{"access_token":"at-{n}","expires_in":60,"refresh_token":"rt-{n}"}}"#
                    ),
                    _ => format!(r#"{{"access_token":"at-{n}","expires_in":60}}"#),
                };
                Ok::<_, BoxError>(Response::new(Body::from(answer)))
            }
        })
    };
    let auth = VoltAuthLayer::builder(MockVolt::builder().in_process().credentials())
        .base_url("http://127.0.0.1:9")
        .build(transport)
        .expect("layer");
    for n in 1..=4 {
        let token = auth.access_token().await.expect("token");
        assert_eq!(token.expose_secret(), format!("at-{n}"));
        // Past the margin (6 s of a 60 s token).
        sleep(secs(55)).await;
    }
    let rt1 = Some("rt-1".to_owned());
    assert_eq!(
        *presented.lock().unwrap(),
        [None, rt1.clone(), rt1.clone(), rt1]
    );
    let stats = auth.stats();
    assert_eq!((stats.password.succeeded, stats.refresh.succeeded), (1, 3));
}

#[tokio::test(start_paused = true)]
async fn revoked_refresh_token_falls_back_to_exactly_one_password_grant() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;
    mock.revoke_refresh_tokens();

    // Past the margin: the waiting request gets its token from the fallback.
    sleep_until(t0 + secs(3571)).await;
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.password_grants(), 2);
    let grants: Vec<_> = mock
        .oauth_requests()
        .into_iter()
        .map(|r| r.grant_type)
        .collect();
    assert_eq!(
        grants,
        [
            Some("password".to_owned()),
            Some("refresh_token".to_owned()),
            Some("password".to_owned())
        ]
    );
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
    let stats = auth.stats();
    assert_eq!(stats.refresh.rejected, 1);
    assert_eq!(stats.refresh.attempts(), 1);
    assert_eq!(stats.password.succeeded, 2);
    assert_eq!(stats.password.attempts(), 2);
    assert_eq!(stats.refreshes, 2);

    // The fallback's refresh token is used for the next refresh.
    sleep_until(t0 + secs(2 * 3571)).await;
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 4);
    assert_eq!(mock.password_grants(), 2);
    let requests = mock.oauth_requests();
    assert_eq!(
        requests[3].field("refresh_token"),
        Some(mock.issued_refresh_tokens()[1].as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn expired_refresh_token_falls_back_to_one_password_grant_in_the_background() {
    // Refresh tokens that die before the access token's refresh-ahead window.
    let mock = MockVolt::builder()
        .refresh_token_lifetime(secs(1800))
        .in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;

    sleep_until(t0 + secs(3301)).await;
    let now = Instant::now();
    for _ in 0..10 {
        banks_ok(&mut api, &mock).await;
    }
    assert_eq!(Instant::now(), now, "no request waited");
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.password_grants(), 2);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    let authorizations = mock.api_authorizations();
    assert!(
        authorizations[..11]
            .iter()
            .all(|a| *a == bearer(&issued[0]))
    );
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
    assert_eq!(auth.stats().refresh.rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_answered_401_falls_back_to_the_password_grant() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;
    // Volt's auth-error shape, status 401, for the refresh grant only.
    mock.fail_oauth(
        1,
        StatusCode::UNAUTHORIZED,
        r#"{"code":401,"message":"Unauthorized"}"#,
    );
    sleep_until(t0 + secs(3571)).await;
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.password_grants(), 2);
    assert_eq!(auth.stats().refresh.rejected, 1);
    assert_eq!(auth.stats().password.succeeded, 2);
}

#[tokio::test(start_paused = true)]
async fn server_failure_on_refresh_is_not_a_rejection() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock); // backoff 1 s .. 60 s
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;

    mock.fail_oauth(
        1,
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"code":503,"message":"Service Unavailable"}"#,
    );
    sleep_until(t0 + secs(3301)).await;
    for _ in 0..10 {
        banks_ok(&mut api, &mock).await;
    }
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    for _ in 0..10 {
        banks_ok(&mut api, &mock).await;
    }
    // One failed refresh, no password grant; the valid token stays in use.
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.password_grants(), 1);
    let stats = auth.stats();
    assert_eq!(stats.refresh.failed, 1);
    assert_eq!(stats.refresh.rejected, 0);
    assert_eq!(stats.password.attempts(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 1);
    assert!(
        mock.api_authorizations()
            .iter()
            .all(|a| *a == bearer(&issued[0]))
    );

    // The first backoff is at most 1 s: after it, one more attempt, the
    // password grant (in case the refresh grant is what fails).
    sleep_until(t0 + secs(3303)).await;
    banks_ok(&mut api, &mock).await;
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.refresh_grants(), 1);
    assert_eq!(mock.password_grants(), 2);
    assert_eq!(auth.stats().password.succeeded, 2);
}

// ---------------------------------------------------------------------------------------------
// A refresh outlives the request that started it
// ---------------------------------------------------------------------------------------------

/// Sends `GET /banks` through a clone of `api` in a task, waits until its
/// refresh is held at `/oauth`, then aborts the task.
async fn abort_once_oauth_is_held<S>(api: &S, mock: &MockVolt, hold: &OAuthHold)
where
    S: Service<Request<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
{
    let task = tokio::spawn(api.clone().oneshot(get(mock, "/banks")));
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("refresh held");
    task.abort();
    assert!(task.await.is_err_and(|err| err.is_cancelled()));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_request_that_started_a_refresh_does_not_cancel_it() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let api = auth.layer(mock.service());
    let hold = mock.hold_oauth();
    abort_once_oauth_is_held(&api, &mock, &hold).await;
    // The /oauth call is still in flight: nothing dropped it.
    assert_eq!(hold.waiting(), 1);
    hold.release();
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(auth.stats().refreshes, 1);

    let mut later = api.clone();
    banks_ok(&mut later, &mock).await;
    banks_ok(&mut later, &mock).await;
    assert_eq!(mock.oauth_calls(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0])]
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_a_request_waiting_past_the_margin_does_not_cancel_the_refresh() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    let t0 = Instant::now();
    banks_ok(&mut api, &mock).await;
    sleep_until(t0 + secs(3571)).await;

    let hold = mock.hold_oauth();
    abort_once_oauth_is_held(&api, &mock, &hold).await;
    assert_eq!(hold.waiting(), 1);
    hold.release();

    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.refresh_grants(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[1])]
    );
}

// ---------------------------------------------------------------------------------------------
// Sharing, headers, flavours
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn access_token_shares_the_cache_with_the_services() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let token = auth.access_token().await.expect("token");
    assert_eq!(mock.oauth_calls(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(token.expose_secret(), issued[0]);
    assert_eq!(
        token.header_value(),
        &HeaderValue::from_str(&format!("Bearer {}", issued[0])).unwrap()
    );
    assert!(token.header_value().is_sensitive());
    assert!(!format!("{token:?}").contains(&issued[0]));

    let mut api = ServiceBuilder::new()
        .layer(auth.clone())
        .service(Recorder::new(&mock));
    banks_ok(&mut api, &mock).await;
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(mock.api_authorizations(), [bearer(&issued[0])]);

    // And the other way round: a token obtained by a service is the one
    // `access_token` hands out, from any clone of the layer.
    mock.revoke_access_tokens();
    banks_ok(&mut api, &mock).await; // 401, renewal, replay
    assert_eq!(mock.oauth_calls(), 2);
    let issued = mock.issued_access_tokens();
    let token = auth.clone().access_token().await.expect("token");
    assert_eq!(token.expose_secret(), issued[1]);
    assert_eq!(mock.oauth_calls(), 2);
}

#[tokio::test]
async fn callers_authorization_is_replaced_and_marked_sensitive() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let recorder = Recorder::new(&mock);
    let mut api = auth.layer(recorder.clone());

    // First request: the token is waited for. Second: the hot path.
    for _ in 0..2 {
        let mut request = get(&mock, "/banks");
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer callers"));
        headers.append(
            AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwdw=="),
        );
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        let response = send(&mut api, request).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 1);
    let seen = recorder.seen();
    assert_eq!(seen.len(), 2);
    for parts in &seen {
        let values: Vec<_> = parts.headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(values.len(), 1, "every earlier value is replaced");
        assert_eq!(values[0], &format!("Bearer {}", issued[0]));
        assert!(values[0].is_sensitive());
        assert_eq!(parts.headers["x-kept"], "yes");
    }
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[0])]
    );
}

#[tokio::test]
async fn layer_clones_and_their_services_share_one_cache() {
    fn clone_of<T: Clone>(value: &T) -> T {
        value.clone()
    }
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let other = clone_of(&auth);
    let mut one = auth.layer(mock.service());
    let mut two = other.layer(Recorder::new(&mock));
    let mut three = one.clone();
    banks_ok(&mut one, &mock).await;
    banks_ok(&mut two, &mock).await;
    banks_ok(&mut three, &mock).await;
    assert_eq!(
        other.access_token().await.expect("token").expose_secret(),
        mock.issued_access_tokens()[0]
    );
    assert_eq!(mock.oauth_calls(), 1);
    let (stats, other_stats) = (auth.stats(), other.stats());
    assert_eq!(stats.password, other_stats.password);
    assert_eq!(stats.refreshes, 1);
    assert_eq!(other_stats.refreshes, 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 1);
    assert_eq!(mock.api_authorizations(), vec![bearer(&issued[0]); 3]);

    // A separately built layer has a cache of its own.
    let separate = layer(&mock);
    let mut four = separate.layer(mock.service());
    banks_ok(&mut four, &mock).await;
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(mock.password_grants(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn layer_clones_share_one_cache_under_concurrency() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let hold = mock.hold_oauth();
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let layer = auth.clone();
            let mock_service = mock.service();
            let request = get(&mock, "/banks");
            tokio::spawn(async move {
                if i % 3 == 0 {
                    layer.access_token().await?;
                    return Ok::<_, BoxError>(StatusCode::OK);
                }
                let mut api = layer.layer(mock_service);
                Ok(api.ready().await?.call(request).await?.status())
            })
        })
        .collect();
    timeout(GUARD, hold.wait_for(1)).await.expect("held");
    hold.release();
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("ok"), StatusCode::OK);
    }
    assert_eq!(mock.oauth_calls(), 1);
    let issued = mock.issued_access_tokens();
    assert_eq!(mock.api_authorizations(), vec![bearer(&issued[0]); 200]);
}

#[tokio::test]
async fn global_api_sends_json_grants_over_tcp_and_works() {
    let mock = MockVolt::start().await.expect("mock");
    let client = http_client();
    // Both orders of `.api` and `.base_url` keep the Global flavour.
    let layers = [
        builder(&mock)
            .api(Api::Global)
            .build(client.clone())
            .expect("layer"),
        VoltAuthLayer::builder(mock.credentials())
            .api(Api::Global)
            .base_url(&mock.url())
            .build(client.clone())
            .expect("layer"),
    ];
    for (n, auth) in layers.iter().enumerate() {
        assert_eq!(auth.endpoint().api(), Api::Global);
        let mut api = ServiceBuilder::new()
            .layer(auth.clone())
            .service(LimitedClient::new(client.clone(), 8));
        banks_ok(&mut api, &mock).await;
        // A 401 forces a refresh grant, also as JSON.
        mock.revoke_access_tokens();
        banks_ok(&mut api, &mock).await;
        let requests = mock.oauth_requests();
        assert_eq!(requests.len(), 2 * (n + 1));
        let issued_refresh = mock.issued_refresh_tokens();
        let (password, refresh) = (&requests[2 * n], &requests[2 * n + 1]);
        for request in [password, refresh] {
            assert_eq!(request.content_type.as_deref(), Some("application/json"));
            assert_eq!(request.accept.as_deref(), Some("application/json"));
            assert_eq!(request.field("client_id"), Some(mock::CLIENT_ID));
            assert_eq!(request.field("client_secret"), Some(mock::CLIENT_SECRET));
        }
        assert_eq!(password.grant_type.as_deref(), Some("password"));
        assert_eq!(password.field("username"), Some(mock::USERNAME));
        assert_eq!(password.field("password"), Some(mock::PASSWORD));
        assert_eq!(refresh.grant_type.as_deref(), Some("refresh_token"));
        assert_eq!(
            refresh.field("refresh_token"),
            Some(issued_refresh[2 * n].as_str())
        );
        let issued = mock.issued_access_tokens();
        let authorizations = mock.api_authorizations();
        assert_eq!(
            authorizations[3 * n..],
            [
                bearer(&issued[2 * n]),
                bearer(&issued[2 * n]),
                bearer(&issued[2 * n + 1])
            ]
        );
        assert_eq!(auth.stats().replays, 1);
    }
    assert_eq!(mock.password_grants(), 2);
    assert_eq!(mock.refresh_grants(), 2);
}

#[tokio::test]
async fn gateway_api_sends_form_grants() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    assert_eq!(auth.endpoint().api(), Api::Gateway);
    auth.access_token().await.expect("token");
    let requests = mock.oauth_requests();
    assert_eq!(requests.len(), 1);
    let content_type = requests[0].content_type.as_deref().unwrap_or_default();
    assert!(
        content_type.starts_with("application/x-www-form-urlencoded"),
        "{content_type}"
    );
    assert_eq!(requests[0].grant_type.as_deref(), Some("password"));
    assert_eq!(requests[0].field("username"), Some(mock::USERNAME));
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct InnerFailure;

impl fmt::Display for InnerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the inner service failed")
    }
}

impl std::error::Error for InnerFailure {}

#[tokio::test]
async fn auth_errors_and_inner_errors_reach_the_caller_and_can_be_told_apart() {
    let mock = MockVolt::builder().in_process();
    mock.fail_oauth(
        1,
        StatusCode::UNAUTHORIZED,
        r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
    );
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    let error = api
        .ready()
        .await
        .expect("ready")
        .call(get(&mock, "/banks"))
        .await
        .expect_err("no token");
    let auth_error = error
        .downcast_ref::<volt_auth::Error>()
        .expect("a volt_auth::Error");
    assert!(auth_error.is_rejected());
    assert_eq!(auth_error.grant(), Some(GrantType::Password));
    assert_eq!(auth_error.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(mock.api_calls(), 0);
    // A rejected password grant backs off: the next caller gets the same error
    // without another /oauth call.
    let again = api
        .ready()
        .await
        .expect("ready")
        .call(get(&mock, "/banks"))
        .await
        .expect_err("still no token");
    assert!(
        again
            .downcast_ref::<volt_auth::Error>()
            .is_some_and(volt_auth::Error::is_rejected)
    );
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(auth.stats().password.rejected, 1);

    // An inner error comes back as itself.
    let working = MockVolt::builder().in_process();
    let auth = layer(&working);
    let failing =
        tower::service_fn(|_: Request<Body>| async { Err::<Response<Body>, _>(InnerFailure) });
    let mut api = auth.layer(failing);
    let error = api
        .ready()
        .await
        .expect("ready")
        .call(get(&working, "/banks"))
        .await
        .expect_err("inner failure");
    assert!(error.downcast_ref::<InnerFailure>().is_some());
    assert!(error.downcast_ref::<volt_auth::Error>().is_none());
    assert_eq!(working.oauth_calls(), 1);
}

#[tokio::test]
async fn a_margin_larger_than_the_refresh_ahead_window_is_refused() {
    let mock = MockVolt::builder().in_process();
    let refused = builder(&mock)
        .refresh_ahead(secs(10))
        .expiry_margin(secs(20))
        .build(mock.service());
    assert!(matches!(refused, Err(ConfigError::InvalidSetting(_))));
    assert!(
        builder(&mock)
            .refresh_ahead(secs(20))
            .expiry_margin(secs(20))
            .build(mock.service())
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn layers_built_from_clones_of_a_builder_keep_caches_of_their_own() {
    let mock = MockVolt::builder().in_process();
    let config = builder(&mock).token_timeout(secs(3));
    let first = config.clone().build(mock.service()).expect("layer");
    let second = config.build(mock.service()).expect("layer");
    let shared = first.clone();

    let a = first.access_token().await.expect("a token");
    let b = shared.access_token().await.expect("a token");
    assert_eq!(
        mock.oauth_calls(),
        1,
        "a clone of the layer shares its cache"
    );
    assert_eq!(a.header_value(), b.header_value());

    let c = second.access_token().await.expect("a token");
    assert_eq!(
        mock.oauth_calls(),
        2,
        "a layer from the builder's clone does not"
    );
    assert_ne!(a.header_value(), c.header_value());
    let grants: Vec<_> = mock
        .oauth_requests()
        .into_iter()
        .map(|request| request.grant_type)
        .collect();
    assert_eq!(
        grants,
        [Some("password".to_owned()), Some("password".to_owned())]
    );
}
