//! The fault matrix of issue 5: what callers get, and exactly how many `/oauth`
//! calls it costs, when Volt's token endpoint misbehaves.
//!
//! | Fault | What callers see | `/oauth` calls |
//! |---|---|---|
//! | 5xx (or timeout, broken body, refused connection) on the background refresh while the token is valid | nothing: every request succeeds with the current token; the new token is attached once `/oauth` answers again | one attempt per backoff window, none in between, alternating grants: a failed refresh, a failed password grant, a successful refresh |
//! | `/oauth` slower than `token_timeout`, no valid token | `Error::Timeout { grant: Password, timeout }` after the timeout, shared by every waiter; requests within the backoff get it at once; success once `/oauth` answers in time | one per backoff window: 2 timed out + 1 successful |
//! | `/oauth` so slow that its token arrives past the expiry margin (10 s token, 9.5 s answer) | `Error::InvalidResponse { status: 200, reason: "the token expired before its answer arrived" }`, backed off | 1, then success once answers are timely; a refresh token so answered is not presented again: password grants |
//! | Broken body: empty, HTML, truncated JSON, not JSON | `Error::InvalidResponse { status: 200, reason }` (`"the body is empty"` / `"the body is not JSON"`), no panic | one per backoff window: 2 broken + 1 successful |
//! | Oversized body (over 64 KiB) | `Error::InvalidResponse { status: 200, reason: "the body is larger than 64 KiB" }` | one per backoff window: 2 oversized + 1 successful |
//! | Connection refused (server stopped), then restarted | `Error::Transport { grant: Password }` (source: connection refused) until the backoff after the restart ends, then success; while a valid token is cached a stopped server costs no `/oauth` call | 0 reach the server while it is down; exactly 1 password grant after the restart |
//! | `invalid_grant` / `invalid_request` / 401 on the refresh grant (refresh due, expired token, or a 401 replay) | nothing: the request succeeds (a replayed request is answered once, with the new token) | 1 refresh (rejected) + exactly 1 password grant |
//! | A 403 page (not JSON) from a WAF or CDN in front of Volt | as a 5xx: nothing while the token is valid (the refresh token kept; the password grant a window later); without one, `Error::Failed { status: 403 }` | one per backoff window: on the refresh, as a 5xx; on the password grant, the next after the first, uncapped window |
//! | `invalid_client` (or a wrong password) on the password grant | `Error::Rejected { grant: Password, status 401/400 }` (`is_rejected()`), one error shared by every waiter, returned at once within the backoff | 1, then 1 per capped backoff window (`backoff max`, jittered to [max/2, max)), never more |
//! | Recovery after an outage: no valid token, 5 × 503, then healthy | `Error::Failed { status: 503 }` per window (the same error to every caller of a window), then success on the first request after the last backoff | 6 (5 failed + 1 successful) |
//! | 500 concurrent requests, no valid token, `/oauth` failing | the same `Error::Failed` for all 500 | 1 |
//!
//! Every test but the connection-refused one runs on the in-process mock under
//! tokio's paused clock: `sleep` moves the clock (firing every timer due on the
//! way) only once every task is idle, so `settle()` (a 1 ms sleep) lets the
//! background refresh run to completion. The connection-refused test needs
//! real TCP and so real time; it uses a 1–5 ms backoff and counts outcomes.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tower::{BoxError, Layer, Service, ServiceExt};
use volt_auth::mock::{self, Broken, MockService, MockVolt};
use volt_auth::{Builder, Credentials, Error, GrantStats, GrantType, VoltAuth, VoltAuthLayer};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);

type Api = VoltAuth<MockService>;

/// What a WAF or CDN in front of Volt answers a request it blocks, with a 403.
const BLOCKED_PAGE: &str =
    "<html><head><title>403 Forbidden</title></head><body>Request blocked.</body></html>";
type Outcome = Result<StatusCode, Error>;

/// A layer on the in-process mock: `/oauth` goes through `mock.service()`.
fn layer(mock: &MockVolt, configure: impl FnOnce(Builder) -> Builder) -> VoltAuthLayer {
    let builder = VoltAuthLayer::builder(mock.credentials()).base_url(&mock.url());
    configure(builder)
        .build(mock.service())
        .expect("valid configuration")
}

fn layer_with(
    mock: &MockVolt,
    credentials: Credentials,
    backoff: (Duration, Duration),
) -> VoltAuthLayer {
    VoltAuthLayer::builder(credentials)
        .base_url(&mock.url())
        .backoff(backoff.0, backoff.1)
        .build(mock.service())
        .expect("valid configuration")
}

fn banks(mock: &MockVolt) -> Request<Full<Bytes>> {
    Request::get(format!("{}/banks", mock.url()))
        .body(Full::default())
        .unwrap()
}

fn payment(mock: &MockVolt, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("{}/v2/payments", mock.url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// The `volt_auth::Error` inside a service error; any other error fails the test.
fn auth_error(err: BoxError) -> Error {
    match err.downcast_ref::<Error>() {
        Some(err) => err.clone(),
        None => panic!("not a volt_auth::Error: {err}"),
    }
}

/// Sends `request` through a clone of `service`: the status, or the auth error.
async fn send<S, B>(service: &S, request: Request<Full<Bytes>>) -> Result<StatusCode, Error>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError> + Clone,
{
    let mut service = service.clone();
    let ready = service.ready().await.map_err(auth_error)?;
    ready
        .call(request)
        .await
        .map(|response| response.status())
        .map_err(auth_error)
}

async fn get(api: &Api, mock: &MockVolt) -> Outcome {
    send(api, banks(mock)).await
}

/// `n` requests at once, each on its own task.
async fn burst(api: &Api, mock: &MockVolt, n: usize) -> Vec<Outcome> {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let api = api.clone();
        let request = banks(mock);
        tasks.spawn(async move { send(&api, request).await });
    }
    tasks.join_all().await
}

/// Lets every runnable task (the background refresh) run to completion. Under
/// the paused clock the sleep only ends once all tasks are idle.
async fn settle() {
    sleep(MS).await;
}

fn counts(stats: GrantStats) -> (u64, u64, u64) {
    (stats.succeeded, stats.rejected, stats.failed)
}

fn assert_all_ok(outcomes: &[Outcome], context: &str) {
    for outcome in outcomes {
        match outcome {
            Ok(status) => assert_eq!(*status, StatusCode::OK, "{context}"),
            Err(err) => panic!("{context}: a caller saw {err:?}"),
        }
    }
}

/// Every outcome is the same error; returns it.
fn one_shared_error(outcomes: &[Outcome]) -> Error {
    let first = match &outcomes[0] {
        Err(err) => err.clone(),
        Ok(status) => panic!("expected an error, got {status}"),
    };
    let shown = format!("{first:?}");
    for outcome in outcomes {
        match outcome {
            Err(err) => assert_eq!(format!("{err:?}"), shown),
            Ok(status) => panic!("expected {shown}, got {status}"),
        }
    }
    first
}

fn assert_failed(err: &Error, grant: GrantType, status: u16) {
    match err {
        Error::Failed {
            grant: g, response, ..
        } => {
            assert_eq!(*g, grant, "{err:?}");
            assert_eq!(response.status.as_u16(), status, "{err:?}");
        }
        other => panic!("expected Error::Failed({status}), got {other:?}"),
    }
    assert!(!err.is_rejected());
    assert_eq!(err.status().map(|s| s.as_u16()), Some(status));
}

fn assert_timeout(err: &Error, timeout: Duration) {
    match err {
        Error::Timeout {
            grant, timeout: t, ..
        } => {
            assert_eq!(*grant, GrantType::Password);
            assert_eq!(*t, timeout);
        }
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
    assert_eq!(err.status(), None);
}

fn assert_invalid(err: &Error, reason: &str) {
    match err {
        Error::InvalidResponse {
            grant,
            status,
            reason: r,
            ..
        } => {
            assert_eq!(*grant, GrantType::Password, "{err:?}");
            assert_eq!(*status, StatusCode::OK, "{err:?}");
            assert_eq!(*r, reason);
        }
        other => panic!("expected Error::InvalidResponse({reason}), got {other:?}"),
    }
}

fn assert_rejected(err: &Error, status: u16, code: &str) {
    match err {
        Error::Rejected {
            grant, response, ..
        } => {
            assert_eq!(*grant, GrantType::Password, "{err:?}");
            assert_eq!(response.status.as_u16(), status, "{err:?}");
            assert_eq!(response.code.as_deref(), Some(code), "{err:?}");
        }
        other => panic!("expected Error::Rejected({code}), got {other:?}"),
    }
    assert!(err.is_rejected());
}

/// The bearer value the mock saw on the last API request.
fn last_authorization(mock: &MockVolt) -> String {
    mock.api_authorizations()
        .last()
        .cloned()
        .flatten()
        .expect("an API request with an Authorization header")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// 1. A failing background refresh while the token is valid
// ---------------------------------------------------------------------------------------------

/// A faults-injecting `/oauth` transport around the mock: counts every call and
/// refuses the connection for the next `refuse` calls (the mock never sees
/// those).
#[derive(Clone)]
struct Flaky {
    mock: MockService,
    calls: Arc<AtomicUsize>,
    refuse: Arc<AtomicUsize>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Request<Full<Bytes>>> for Flaky {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let refused = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            let err = io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
            return Box::pin(async move { Err(err.into()) });
        }
        let future = self.mock.call(request);
        Box::pin(async move {
            let response: Result<_, Infallible> = future.await;
            Ok(response.unwrap_or_else(|never| match never {}))
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    ServerError,
    /// A WAF's or CDN's 403 page, from in front of Volt.
    Blocked,
    Timeout,
    Broken(Broken),
    Refused,
}

/// The token is valid (inside the refresh-ahead window) and the background
/// refresh fails twice with `fault`, first presenting the refresh token, then
/// with the password grant: no caller sees an error; no `/oauth` call within
/// a backoff window, exactly one after each; the third attempt (the refresh
/// token, kept after failures) succeeds and its token is used.
async fn background_refresh_fault(fault: Fault) {
    let timeout = 5 * SEC;
    let mock = MockVolt::builder().in_process();
    let flaky = Flaky {
        mock: mock.service(),
        calls: Arc::default(),
        refuse: Arc::default(),
    };
    let auth = VoltAuthLayer::builder(mock.credentials())
        .base_url(&mock.url())
        .token_timeout(timeout)
        .backoff(SEC, 60 * SEC)
        .build(flaky.clone())
        .unwrap();
    let api = auth.layer(mock.service());
    let calls = || flaky.calls.load(Ordering::SeqCst);

    assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK);
    assert_eq!(
        (calls(), mock.oauth_calls(), mock.password_grants()),
        (1, 1, 1)
    );
    let first = auth.access_token().await.unwrap();
    assert_eq!(first.expires_at(), Instant::now() + HOUR);

    // Into the refresh-ahead window (5 min, jittered up to 20 % earlier),
    // well before the 30 s expiry margin.
    sleep_until(first.expires_at() - Duration::from_secs(299)).await;
    let attempt = match fault {
        Fault::ServerError => {
            mock.fail_oauth(
                2,
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"code":503,"message":"Service Unavailable"}"#,
            );
            Duration::ZERO
        }
        Fault::Blocked => {
            mock.fail_oauth(2, StatusCode::FORBIDDEN, BLOCKED_PAGE);
            Duration::ZERO
        }
        Fault::Timeout => {
            mock.set_oauth_delay(timeout + SEC);
            timeout
        }
        Fault::Broken(broken) => {
            mock.break_oauth(2, broken);
            Duration::ZERO
        }
        Fault::Refused => {
            flaky.refuse.store(2, Ordering::SeqCst);
            Duration::ZERO
        }
    };

    // Two failed attempts, each followed by a backoff window without calls.
    for (failure, window, failed) in [(1u64, SEC, (1, 0)), (2, 2 * SEC, (1, 1))] {
        let before = calls();
        let kicked = Instant::now();
        // The first request to see the stale token starts the refresh in the
        // background and is served at once with the current token.
        assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK, "{fault:?}");
        assert_eq!(Instant::now(), kicked, "{fault:?}: the request waited");
        assert_eq!(last_authorization(&mock), bearer(first.expose_secret()));
        // While it runs (a timeout takes `timeout`), requests keep being served.
        let mut outcomes = Vec::new();
        while Instant::now() + 100 * MS < kicked + attempt {
            outcomes.extend(burst(&api, &mock, 5).await);
            sleep(100 * MS).await;
        }
        sleep_until(kicked + attempt).await;
        settle().await;
        assert_eq!(calls(), before + 1, "{fault:?}: failure {failure}");
        let stats = auth.stats();
        let grants = (stats.refresh.failed, stats.password.failed);
        assert_eq!(grants, failed, "{fault:?}: failure {failure}");
        let failed_at = kicked + attempt;
        // The backoff is `window` jittered down to half: no call before half.
        let quiet_until = failed_at + window / 2 - MS;
        loop {
            outcomes.extend(burst(&api, &mock, 10).await);
            if Instant::now() >= quiet_until {
                break;
            }
            sleep_until(quiet_until.min(Instant::now() + 50 * MS)).await;
        }
        assert_eq!(Instant::now(), quiet_until);
        assert_all_ok(&outcomes, &format!("{fault:?} during backoff {failure}"));
        assert_eq!(
            calls(),
            before + 1,
            "{fault:?}: a call within backoff {failure}"
        );
        assert_eq!(last_authorization(&mock), bearer(first.expose_secret()));
        // The window is over (the timer that re-arms the background refresh
        // fired at the latest on the tick at `failed_at + window`): the next
        // request starts exactly one attempt.
        sleep_until(failed_at + window + MS).await;
    }
    if let Fault::Timeout = fault {
        mock.set_oauth_delay(Duration::ZERO);
    }
    let before = calls();
    assert_all_ok(
        &burst(&api, &mock, 20).await,
        &format!("{fault:?} on recovery"),
    );
    settle().await;
    assert_eq!(calls(), before + 1, "{fault:?}: recovery");
    let refreshed_at = Instant::now() - MS;
    assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2, "{fault:?}");
    assert_eq!(last_authorization(&mock), bearer(&issued[1]));

    // Exact /oauth cost: 2 password grants (the second failed), 2 refresh
    // grants (the first failed).
    let refused = usize::from(matches!(fault, Fault::Refused));
    assert_eq!(calls(), 4, "{fault:?}");
    assert_eq!(mock.oauth_calls(), 4 - 2 * refused, "{fault:?}");
    assert_eq!(mock.password_grants(), 2 - refused, "{fault:?}");
    assert_eq!(mock.refresh_grants(), 2 - refused, "{fault:?}");
    let stats = auth.stats();
    assert_eq!(counts(stats.password), (1, 0, 1), "{fault:?}");
    assert_eq!(counts(stats.refresh), (1, 0, 1), "{fault:?}");
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.replays, 0);
    assert_eq!(
        stats.remaining,
        Some(refreshed_at + HOUR - Instant::now()),
        "{fault:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn server_error_on_background_refresh_is_invisible_while_the_token_is_valid() {
    background_refresh_fault(Fault::ServerError).await;
}

/// Not Volt refusing the refresh token: it is kept (presented again after the
/// password grant fails too), and the password grant comes a backoff window
/// later rather than in the same flight.
#[tokio::test(start_paused = true)]
async fn a_403_page_on_background_refresh_is_invisible_while_the_token_is_valid() {
    background_refresh_fault(Fault::Blocked).await;
}

#[tokio::test(start_paused = true)]
async fn timeout_on_background_refresh_is_invisible_while_the_token_is_valid() {
    background_refresh_fault(Fault::Timeout).await;
}

#[tokio::test(start_paused = true)]
async fn broken_body_on_background_refresh_is_invisible_while_the_token_is_valid() {
    background_refresh_fault(Fault::Broken(Broken::Html)).await;
    background_refresh_fault(Fault::Broken(Broken::Oversized)).await;
}

#[tokio::test(start_paused = true)]
async fn refused_connection_on_background_refresh_is_invisible_while_the_token_is_valid() {
    background_refresh_fault(Fault::Refused).await;
}

// ---------------------------------------------------------------------------------------------
// 2. /oauth slower than the timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn slow_oauth_times_out_once_per_backoff_window() {
    let timeout = 5 * SEC;
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock, |b| b.token_timeout(timeout).backoff(SEC, 60 * SEC));
    let api = auth.layer(mock.service());
    mock.set_oauth_delay(timeout + SEC);

    // 20 callers wait for the one attempt, which times out after `timeout`.
    let started = Instant::now();
    let outcomes = burst(&api, &mock, 20).await;
    let failed_at = Instant::now();
    assert_timeout(&one_shared_error(&outcomes), timeout);
    assert!(failed_at - started >= timeout && failed_at - started < timeout + 10 * MS);
    assert_eq!(mock.oauth_calls(), 1);
    // Within the backoff, requests get the error at once, without a call.
    assert_timeout(&get(&api, &mock).await.unwrap_err(), timeout);
    assert_timeout(&auth.access_token().await.unwrap_err(), timeout);
    assert_eq!(
        Instant::now(),
        failed_at,
        "the error was not returned at once"
    );
    sleep_until(failed_at + SEC / 2 - MS).await;
    assert_timeout(&one_shared_error(&burst(&api, &mock, 10).await), timeout);
    assert_eq!(mock.oauth_calls(), 1);

    // After the first window, exactly one more attempt, which times out too.
    sleep_until(failed_at + SEC).await;
    let retried = Instant::now();
    assert_timeout(&one_shared_error(&burst(&api, &mock, 10).await), timeout);
    assert_eq!(Instant::now() - retried, timeout);
    assert_eq!(mock.oauth_calls(), 2);
    let failed_at = Instant::now();
    sleep_until(failed_at + SEC - MS).await; // the second window is 1..2 s
    assert_timeout(&get(&api, &mock).await.unwrap_err(), timeout);
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(counts(auth.stats().password), (0, 0, 2));
    assert_eq!(auth.stats().remaining, None);

    // /oauth answers in time again (slow, but under the timeout): success.
    mock.set_oauth_delay(timeout - SEC);
    sleep_until(failed_at + 2 * SEC).await;
    let retried = Instant::now();
    assert_all_ok(&burst(&api, &mock, 10).await, "after the outage");
    assert_eq!(Instant::now() - retried, timeout - SEC);
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.password_grants(), 3);
    let stats = auth.stats();
    assert_eq!(counts(stats.password), (1, 0, 2));
    assert_eq!(counts(stats.refresh), (0, 0, 0));
    assert_eq!(stats.refreshes, 1);
    // The hour counts from when the grant was sent, `timeout - SEC` ago.
    assert_eq!(stats.remaining, Some(HOUR - (timeout - SEC)));
}

/// `expires_in` counts from when the grant was sent: a token whose answer
/// took nearly all of its lifetime (here 9.5 s of 10, with a margin of 1 s)
/// arrives expired. Taken, it served no request, and each waiter started the
/// next grant at once, with no backoff (the grant succeeded), for ever.
#[tokio::test(start_paused = true)]
async fn a_token_expired_on_arrival_is_an_invalid_response_with_a_backoff() {
    let mock = MockVolt::builder()
        .access_token_lifetime(10 * SEC)
        .in_process();
    let auth = layer(&mock, |b| b.token_timeout(30 * SEC).backoff(SEC, 60 * SEC));
    mock.set_oauth_delay(9 * SEC + SEC / 2);
    let outcome = tokio::time::timeout(HOUR, auth.access_token())
        .await
        .expect("an outcome within an hour, not one grant after another");
    let error = outcome.expect_err("a token expired on arrival");
    assert!(
        matches!(
            &error,
            Error::InvalidResponse { grant: GrantType::Password, status, reason, .. }
                if *status == StatusCode::OK && *reason == "the token expired before its answer arrived"
        ),
        "{error:?}"
    );
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(counts(auth.stats().password), (0, 0, 1));
    assert!(auth.stats().retry_in.is_some(), "a backoff");
    // A timely answer is taken.
    mock.set_oauth_delay(SEC);
    sleep(SEC).await;
    assert!(auth.access_token().await.is_ok());
    assert_eq!(mock.oauth_calls(), 2);
}

/// A refresh grant whose token arrives expired was answered: Volt issued a
/// token for the refresh token presented, rotating it, so it is not
/// presented again, as after a refusal; the attempts after it are password
/// grants, not the alternation that follows a failed refresh grant (whose
/// third attempt presented it again: `invalid_grant`, and a password grant in
/// the same flight).
#[tokio::test(start_paused = true)]
async fn a_refresh_token_answered_with_a_token_expired_on_arrival_is_not_presented_again() {
    let mock = MockVolt::builder()
        .access_token_lifetime(10 * SEC)
        .in_process();
    let auth = layer(&mock, |b| b.token_timeout(30 * SEC).backoff(SEC, 60 * SEC));
    auth.access_token().await.unwrap();
    // Served until 9 s (a margin of 1 s), then the refresh grant: answered
    // 9.5 s after it was sent, its token arrives expired.
    mock.set_oauth_delay(9 * SEC + SEC / 2);
    sleep(9 * SEC).await;
    let error = auth.access_token().await.unwrap_err();
    assert_eq!(error.grant(), Some(GrantType::RefreshToken), "{error:?}");
    assert_eq!(mock.issued_refresh_tokens().len(), 2, "the token rotated");
    // After the first window (1 s at most), the password grant: expired too.
    sleep(SEC).await;
    let error = auth.access_token().await.unwrap_err();
    assert_eq!(error.grant(), Some(GrantType::Password), "{error:?}");
    // After the second (2 s at most), timely answers: one password grant.
    mock.set_oauth_delay(Duration::ZERO);
    sleep(2 * SEC).await;
    auth.access_token().await.unwrap();
    let grants: Vec<_> = mock
        .oauth_requests()
        .iter()
        .map(|request| request.grant_type.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        grants,
        ["password", "refresh_token", "password", "password"]
    );
    let stats = auth.stats();
    assert_eq!(counts(stats.password), (2, 0, 1));
    assert_eq!(counts(stats.refresh), (0, 0, 1));
}

// ---------------------------------------------------------------------------------------------
// 3. Broken and oversized bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn broken_and_oversized_bodies_are_typed_errors_with_bounded_attempts() {
    let cases = [
        (Broken::Empty, "the body is empty"),
        (Broken::Html, "the body is not JSON"),
        (Broken::TruncatedJson, "the body is not JSON"),
        (Broken::NotJson, "the body is not JSON"),
        (Broken::Oversized, "the body is larger than 64 KiB"),
    ];
    for (broken, reason) in cases {
        let mock = MockVolt::builder().in_process();
        let auth = layer(&mock, |b| b.backoff(SEC, 60 * SEC));
        let api = auth.layer(mock.service());
        mock.break_oauth(2, broken);

        let failed_at = Instant::now();
        let err = one_shared_error(&burst(&api, &mock, 10).await);
        assert_invalid(&err, reason);
        assert_eq!(err.status(), Some(StatusCode::OK));
        assert_eq!(mock.oauth_calls(), 1, "{broken:?}");
        assert_invalid(&auth.access_token().await.unwrap_err(), reason);
        sleep_until(failed_at + SEC / 2 - MS).await;
        assert_invalid(&get(&api, &mock).await.unwrap_err(), reason);
        assert_eq!(mock.oauth_calls(), 1, "{broken:?}");

        sleep_until(failed_at + SEC).await;
        let failed_at = Instant::now();
        assert_invalid(&one_shared_error(&burst(&api, &mock, 10).await), reason);
        assert_eq!(mock.oauth_calls(), 2, "{broken:?}");
        sleep_until(failed_at + SEC - MS).await;
        assert_invalid(&get(&api, &mock).await.unwrap_err(), reason);
        assert_eq!(mock.oauth_calls(), 2, "{broken:?}");

        sleep_until(failed_at + 2 * SEC).await;
        assert_all_ok(&burst(&api, &mock, 10).await, &format!("{broken:?}"));
        assert_eq!(mock.oauth_calls(), 3, "{broken:?}");
        assert_eq!(
            last_authorization(&mock),
            bearer(&mock.issued_access_tokens()[0])
        );
        let stats = auth.stats();
        assert_eq!(counts(stats.password), (1, 0, 2), "{broken:?}");
        assert_eq!(stats.refreshes, 1);
        assert_eq!(stats.remaining, Some(HOUR));
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Connection refused, then recovery (real TCP, real time)
// ---------------------------------------------------------------------------------------------

fn is_connection_refused(err: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = err.source();
    }
    false
}

#[tokio::test]
async fn connection_refused_then_recovery_after_restart() {
    const MAX_ROUNDS: usize = 1_000_000;
    let mock = MockVolt::start().await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let auth = VoltAuthLayer::builder(mock.credentials())
        .base_url(&mock.url())
        .backoff(MS, 5 * MS)
        .build(client.clone())
        .unwrap();
    let api = auth.layer(client);
    let get = || send(&api, banks(&mock));

    mock.stop();
    let err = get().await.unwrap_err();
    match &err {
        Error::Transport { grant, .. } => assert_eq!(*grant, GrantType::Password),
        other => panic!("expected Error::Transport, got {other:?}"),
    }
    assert!(is_connection_refused(&err), "{err:?}");
    assert_eq!(err.status(), None);
    assert_eq!(mock.oauth_calls(), 0);
    assert_eq!(counts(auth.stats().password), (0, 0, 1));
    assert_eq!(auth.stats().remaining, None);

    // Back up: requests get the transport error until the (≤ 5 ms) backoff is
    // over, then the first attempt authenticates.
    mock.restart().await.unwrap();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "no recovery after {rounds} requests");
        match get().await {
            Ok(status) => {
                assert_eq!(status, StatusCode::OK);
                break;
            }
            Err(err) => assert!(is_connection_refused(&err), "{err:?}"),
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(mock.password_grants(), 1);
    let stats = auth.stats();
    assert_eq!(counts(stats.password), (1, 0, 1));
    assert_eq!(counts(stats.refresh), (0, 0, 0));
    assert_eq!(stats.refreshes, 1);
    assert!(
        stats
            .remaining
            .is_some_and(|left| left <= HOUR && left > HOUR - 60 * SEC)
    );
    let token = auth.access_token().await.unwrap();
    assert_eq!(token.expose_secret(), mock.issued_access_tokens()[0]);

    // With a valid token, a stopped server costs no /oauth call: API calls
    // fail with the client's own error, not a volt_auth::Error.
    mock.stop();
    let mut api_clone = api.clone();
    let err = api_clone
        .ready()
        .await
        .unwrap()
        .call(banks(&mock))
        .await
        .unwrap_err();
    assert!(err.downcast_ref::<Error>().is_none(), "{err:?}");
    assert_eq!(
        auth.access_token().await.unwrap().expose_secret(),
        token.expose_secret()
    );
    mock.restart().await.unwrap();
    assert_eq!(get().await.unwrap(), StatusCode::OK);
    assert_eq!(last_authorization(&mock), bearer(token.expose_secret()));
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(counts(auth.stats().password), (1, 0, 1));
}

// ---------------------------------------------------------------------------------------------
// 5. invalid_grant on the refresh grant
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn rejected_refresh_token_falls_back_to_exactly_one_password_grant() {
    let rejections = [
        (
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_grant","error_description":"The refresh token is invalid."}"#,
        ),
        (
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_request","error_description":"The refresh token has expired."}"#,
        ),
        (
            StatusCode::UNAUTHORIZED,
            r#"{"code":401,"message":"Unauthorized"}"#,
        ),
    ];
    for (status, body) in rejections {
        let mock = MockVolt::builder().in_process();
        let auth = layer(&mock, |b| b);
        let api = auth.layer(mock.service());
        assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK);
        let first = auth.access_token().await.unwrap();

        // The refresh is due; Volt rejects the refresh token.
        sleep_until(first.expires_at() - Duration::from_secs(299)).await;
        mock.fail_oauth(1, status, body);
        assert_all_ok(&burst(&api, &mock, 10).await, body);
        settle().await;
        let grants: Vec<_> = mock
            .oauth_requests()
            .iter()
            .map(|r| r.grant_type.clone().unwrap_or_default())
            .collect();
        assert_eq!(grants, ["password", "refresh_token", "password"], "{body}");
        assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK);
        assert_eq!(
            last_authorization(&mock),
            bearer(&mock.issued_access_tokens()[1])
        );
        let stats = auth.stats();
        assert_eq!(counts(stats.password), (2, 0, 0), "{body}");
        assert_eq!(counts(stats.refresh), (0, 1, 0), "{body}");
        assert_eq!(stats.refreshes, 2);
        assert_eq!(stats.remaining, Some(HOUR - MS));
        // The next refresh uses the new refresh token, and succeeds.
        let second = auth.access_token().await.unwrap();
        sleep_until(second.expires_at() - Duration::from_secs(299)).await;
        assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK);
        settle().await;
        assert_eq!(mock.oauth_calls(), 4);
        let last = mock.oauth_requests().pop().unwrap();
        assert_eq!(
            last.field("refresh_token"),
            Some(mock.issued_refresh_tokens()[1].as_str())
        );
        assert_eq!(counts(auth.stats().refresh), (1, 1, 0));
    }
}

#[tokio::test(start_paused = true)]
async fn revoked_refresh_token_with_an_expired_token_costs_one_password_grant() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock, |b| b);
    let api = auth.layer(mock.service());
    assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK);
    let first = auth.access_token().await.unwrap();

    // Nobody called during the refresh-ahead window; now the token is inside
    // the expiry margin, and the refresh token has been revoked.
    mock.revoke_refresh_tokens();
    sleep_until(first.expires_at() - Duration::from_secs(10)).await;
    assert_eq!(auth.stats().remaining, None);
    let outcomes = burst(&api, &mock, 50).await;
    assert_all_ok(&outcomes, "expired token, revoked refresh token");
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!((mock.password_grants(), mock.refresh_grants()), (2, 1));
    assert_eq!(
        last_authorization(&mock),
        bearer(&mock.issued_access_tokens()[1])
    );
    let stats = auth.stats();
    assert_eq!(counts(stats.password), (2, 0, 0));
    assert_eq!(counts(stats.refresh), (0, 1, 0));
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.remaining, Some(HOUR));
}

#[tokio::test(start_paused = true)]
async fn revoked_tokens_on_a_401_replay_cost_one_refresh_and_one_password_grant() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock, |b| b);
    let api = auth.layer(mock.service());
    assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK);

    mock.revoke_access_tokens();
    mock.revoke_refresh_tokens();
    let body = r#"{"amount":1000,"currencyCode":"GBP"}"#;
    assert_eq!(
        send(&api, payment(&mock, body)).await.unwrap(),
        StatusCode::CREATED
    );
    assert_eq!(
        mock.payment_bodies(),
        [Bytes::from(body), Bytes::from(body)]
    );
    assert_eq!(mock.unauthorized(), 1);
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!((mock.password_grants(), mock.refresh_grants()), (2, 1));
    assert_eq!(
        last_authorization(&mock),
        bearer(&mock.issued_access_tokens()[1])
    );
    let stats = auth.stats();
    assert_eq!(counts(stats.password), (2, 0, 0));
    assert_eq!(counts(stats.refresh), (0, 1, 0));
    assert_eq!(stats.refreshes, 2);
    assert_eq!(stats.replays, 1);
}

// ---------------------------------------------------------------------------------------------
// 6. invalid_client on the password grant
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn rejected_password_grant_is_permanent_shared_and_retried_only_at_the_capped_backoff() {
    let max = 60 * SEC;
    let cases = [
        // Wrong client secret: 401 invalid_client.
        (
            Credentials::new(
                mock::CLIENT_ID,
                "not-the-secret",
                mock::USERNAME,
                mock::PASSWORD,
            ),
            401,
            "invalid_client",
        ),
        // Wrong password: 400 invalid_grant.
        (
            Credentials::new(
                mock::CLIENT_ID,
                mock::CLIENT_SECRET,
                mock::USERNAME,
                "not-the-password",
            ),
            400,
            "invalid_grant",
        ),
    ];
    for (credentials, status, code) in cases {
        let mock = MockVolt::builder().in_process();
        let auth = layer_with(&mock, credentials, (SEC, max));
        let api = auth.layer(mock.service());

        // 300 requests wait for the one password grant, held at the server
        // until all of them are waiting.
        let hold = mock.hold_oauth();
        let mut tasks = JoinSet::new();
        for _ in 0..300 {
            let api = api.clone();
            let request = banks(&mock);
            tasks.spawn(async move { send(&api, request).await });
        }
        hold.wait_for(1).await;
        settle().await;
        assert_eq!(hold.waiting(), 1);
        assert_eq!(mock.oauth_calls(), 1);
        hold.release();
        let err = one_shared_error(&tasks.join_all().await);
        assert_rejected(&err, status, code);
        let shown = err.to_string();
        assert!(shown.contains("rejected the password grant"), "{shown}");
        assert!(shown.contains(code), "{shown}");
        assert!(!shown.contains("not-the-"), "{shown}");
        assert_eq!(mock.oauth_calls(), 1);

        // Permanent: within the capped backoff (`max` jittered down to half),
        // every request gets it at once, without any /oauth call.
        let mut failed_at = Instant::now();
        for round in 1..=3u64 {
            assert_rejected(&get(&api, &mock).await.unwrap_err(), status, code);
            assert_rejected(&auth.access_token().await.unwrap_err(), status, code);
            assert_eq!(Instant::now(), failed_at, "not at once");
            for step in 1..=29 {
                sleep_until(failed_at + step * SEC).await;
                assert_rejected(&get(&api, &mock).await.unwrap_err(), status, code);
            }
            sleep_until(failed_at + max / 2 - MS).await;
            assert_rejected(
                &one_shared_error(&burst(&api, &mock, 20).await),
                status,
                code,
            );
            assert_eq!(
                mock.oauth_calls() as u64,
                round,
                "a call within the capped backoff"
            );
            // After the cap: exactly one more attempt, rejected again.
            sleep_until(failed_at + max).await;
            failed_at = Instant::now();
            assert_rejected(
                &one_shared_error(&burst(&api, &mock, 20).await),
                status,
                code,
            );
            assert_eq!(mock.oauth_calls() as u64, round + 1);
        }
        assert_eq!(mock.password_grants(), 4);
        assert_eq!(mock.refresh_grants(), 0);
        let stats = auth.stats();
        assert_eq!(counts(stats.password), (0, 4, 0));
        assert_eq!(counts(stats.refresh), (0, 0, 0));
        assert_eq!(stats.refreshes, 0);
        assert_eq!(stats.remaining, None);
    }
}

/// A WAF's or CDN's 403 page on the password grant is no refusal of the
/// credentials: `Error::Failed`, retried after the ordinary backoff rather
/// than the capped one.
#[tokio::test(start_paused = true)]
async fn a_403_page_on_the_password_grant_fails_with_the_ordinary_backoff() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock, |b| b.backoff(SEC, 60 * SEC));
    let api = auth.layer(mock.service());
    mock.fail_oauth(1, StatusCode::FORBIDDEN, BLOCKED_PAGE);
    let started = Instant::now();
    let err = one_shared_error(&burst(&api, &mock, 20).await);
    assert_failed(&err, GrantType::Password, 403);
    assert_eq!(counts(auth.stats().password), (0, 0, 1));
    // The first window: 1 s, jittered to [0.5 s, 1 s).
    sleep_until(started + SEC).await;
    assert_all_ok(&burst(&api, &mock, 20).await, "after the first window");
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(counts(auth.stats().password), (1, 0, 1));
}

// ---------------------------------------------------------------------------------------------
// 7. Recovery after an outage
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn recovery_after_an_outage_counts_one_attempt_per_backoff_window() {
    const FAILURES: u32 = 5;
    let (min, max) = (SEC, 8 * SEC);
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock, |b| b.backoff(min, max));
    let api = auth.layer(mock.service());
    mock.fail_oauth(
        FAILURES as usize,
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"code":503,"message":"down for maintenance"}"#,
    );

    for failure in 1..=FAILURES {
        let started = Instant::now();
        let err = one_shared_error(&burst(&api, &mock, 20).await);
        assert_failed(&err, GrantType::Password, 503);
        assert_eq!(Instant::now(), started);
        assert_eq!(mock.oauth_calls(), failure as usize);
        // Doubling from `min`, capped at `max` (1, 2, 4, 8, 8 s), jittered to
        // [window/2, window).
        let window = (min * 2u32.pow(failure - 1)).min(max);
        sleep_until(started + window / 2 - MS).await;
        assert_failed(
            &get(&api, &mock).await.unwrap_err(),
            GrantType::Password,
            503,
        );
        assert_failed(
            &auth.access_token().await.unwrap_err(),
            GrantType::Password,
            503,
        );
        assert_eq!(
            mock.oauth_calls(),
            failure as usize,
            "a call within window {failure}"
        );
        assert_eq!(counts(auth.stats().password), (0, 0, failure as u64));
        sleep_until(started + window).await;
    }
    // /oauth is healthy again: the next request after the backoff authenticates.
    assert_all_ok(&burst(&api, &mock, 20).await, "after the outage");
    assert_eq!(mock.oauth_calls(), FAILURES as usize + 1);
    assert_eq!(mock.password_grants(), FAILURES as usize + 1);
    let stats = auth.stats();
    assert_eq!(counts(stats.password), (1, 0, FAILURES as u64));
    assert_eq!(counts(stats.refresh), (0, 0, 0));
    assert_eq!(stats.refreshes, 1);
    assert_eq!(stats.remaining, Some(HOUR));

    // The failure streak is over: a later failure starts again from `min`.
    let token = auth.access_token().await.unwrap();
    mock.revoke_access_tokens();
    mock.revoke_refresh_tokens();
    mock.fail_oauth(1, StatusCode::BAD_GATEWAY, "<html>Bad gateway</html>");
    sleep(10 * SEC).await;
    let started = Instant::now();
    // The 401 forces a refresh (refresh grant: 502), the 401 goes back.
    let status = get(&api, &mock).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(mock.oauth_calls(), FAILURES as usize + 2);
    assert_eq!(counts(auth.stats().refresh), (0, 0, 1));
    sleep_until(started + min).await;
    assert_eq!(get(&api, &mock).await.unwrap(), StatusCode::OK);
    assert_ne!(last_authorization(&mock), bearer(token.expose_secret()));
    // The refresh grant failed last: the password grant, alone.
    assert_eq!(mock.oauth_calls(), FAILURES as usize + 3);
    let stats = auth.stats();
    assert_eq!(counts(stats.password), (2, 0, FAILURES as u64));
    assert_eq!(counts(stats.refresh), (0, 0, 1));
}

// ---------------------------------------------------------------------------------------------
// 8. A storm of requests with no token and a failing /oauth
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn hundreds_of_concurrent_requests_share_one_failed_attempt() {
    const CALLERS: usize = 500;
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock, |b| b.backoff(SEC, 60 * SEC));
    let api = auth.layer(mock.service());
    mock.fail_oauth(
        1,
        StatusCode::INTERNAL_SERVER_ERROR,
        r#"{"error":"server_error"}"#,
    );

    let hold = mock.hold_oauth();
    let mut tasks = JoinSet::new();
    for i in 0..CALLERS {
        let api = api.clone();
        let auth = auth.clone();
        let request = banks(&mock);
        tasks.spawn(async move {
            if i % 5 == 0 {
                auth.access_token().await.map(|_| StatusCode::OK)
            } else {
                send(&api, request).await
            }
        });
    }
    hold.wait_for(1).await;
    settle().await;
    assert_eq!(hold.waiting(), 1);
    hold.release();
    let outcomes = tasks.join_all().await;
    assert_eq!(outcomes.len(), CALLERS);
    let err = one_shared_error(&outcomes);
    assert_failed(&err, GrantType::Password, 500);
    match &err {
        Error::Failed { response, .. } => {
            assert_eq!(response.code.as_deref(), Some("server_error"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mock.oauth_calls(), 1);
    assert_eq!(mock.max_oauth_in_flight(), 1);
    assert_eq!(counts(auth.stats().password), (0, 0, 1));

    // And again without a hold: a burst that arrives during the backoff costs
    // nothing; the next one after it costs exactly one (successful) attempt.
    assert_failed(
        &one_shared_error(&burst(&api, &mock, CALLERS).await),
        GrantType::Password,
        500,
    );
    assert_eq!(mock.oauth_calls(), 1);
    sleep(SEC).await;
    assert_all_ok(&burst(&api, &mock, CALLERS).await, "after the backoff");
    assert_eq!(mock.oauth_calls(), 2);
    assert_eq!(counts(auth.stats().password), (1, 0, 1));
}
