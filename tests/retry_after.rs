//! `Retry-After` on a 429 or 503 from `/oauth`: the next attempt of the
//! refresh starts no earlier than the server asked (delta-seconds, or an
//! HTTP-date counted from the answer's `Date`), capped at the backoff maximum;
//! a malformed or past value, or one on another status, is ignored and the
//! ordinary backoff applies, as it does when it is the longer wait.
//!
//! Every test runs on the in-process mock under tokio's paused clock: `sleep`
//! moves the clock only once every task is idle, so a background refresh runs
//! to completion at the instant it started. `/oauth` calls are timed by the
//! recording transport and given as offsets from the first failure.

mod common;

use std::time::Duration;

use http::StatusCode;
use http::header::{DATE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tokio::time::{Instant, sleep_until};
use tower::Layer;
use volt_auth::mock::MockVolt;
use volt_auth::{Error, VoltAuthLayer};

use common::{Recorder, banks_ok, bearer, builder};

const SECOND: Duration = Duration::from_secs(1);
const MILLI: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);
/// The answer's `Date` in the HTTP-date tests (RFC 9110's example).
const SERVER_DATE: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

/// The next `n` `/oauth` calls answer `status` with these headers.
fn throttle(mock: &MockVolt, n: usize, status: StatusCode, headers: &[(HeaderName, &'static str)]) {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(name.clone(), HeaderValue::from_static(value));
    }
    let body = format!(
        r#"{{"code":{},"message":"Try again later"}}"#,
        status.as_u16()
    );
    mock.fail_oauth_with_headers(n, status, map, body);
}

/// A layer on `mock` (default backoff: 1 s doubling to 60 s) whose `/oauth`
/// calls are recorded with their instants.
fn recorded(mock: &MockVolt) -> (VoltAuthLayer, Recorder) {
    let oauth = Recorder::new(mock);
    let auth = builder(mock).build(oauth.clone()).expect("layer");
    (auth, oauth)
}

/// The `grant_type` of every `/oauth` call the mock received.
fn grants(mock: &MockVolt) -> Vec<String> {
    mock.oauth_requests()
        .into_iter()
        .map(|request| request.grant_type.unwrap_or_default())
        .collect()
}

/// At each offset from `start`, `access_token()` fails at once with `status`.
async fn fails_at(auth: &VoltAuthLayer, start: Instant, offsets: &[Duration], status: StatusCode) {
    for offset in offsets {
        sleep_until(start + *offset).await;
        match auth.access_token().await {
            Err(error) => assert_eq!(error.status(), Some(status), "at {offset:?}: {error}"),
            Ok(_) => panic!("a token at {offset:?}"),
        }
    }
}

/// The `Failed` error's server hint.
fn hint(error: &Error) -> Option<Duration> {
    match error {
        Error::Failed { response, .. } => response.retry_after(),
        other => panic!("expected Error::Failed, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_token_a_429_retry_after_holds_the_next_attempt_until_then() {
    let mock = MockVolt::builder().in_process();
    throttle(
        &mock,
        1,
        StatusCode::TOO_MANY_REQUESTS,
        &[(RETRY_AFTER, "30")],
    );
    let (auth, oauth) = recorded(&mock);
    let start = Instant::now();
    let error = auth.access_token().await.unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(hint(&error), Some(30 * SECOND));
    // Until then every caller gets that error at once, and none reaches /oauth.
    let before: Vec<Duration> = [1, 2, 4, 8, 16, 29]
        .iter()
        .map(|secs| *secs * SECOND)
        .chain([30 * SECOND - MILLI])
        .collect();
    fails_at(&auth, start, &before, StatusCode::TOO_MANY_REQUESTS).await;
    sleep_until(start + 30 * SECOND).await;
    auth.access_token()
        .await
        .expect("a token once the wait is over");
    assert_eq!(oauth.times_since(start), [Duration::ZERO, 30 * SECOND]);
    assert_eq!(grants(&mock), ["password", "password"]);
}

#[tokio::test(start_paused = true)]
async fn a_503_retry_after_on_the_background_refresh_keeps_the_token_and_waits() {
    let (log, _guard) = common::log::scoped();
    let mock = MockVolt::builder().in_process();
    let (auth, oauth) = recorded(&mock);
    let mut api = auth.layer(mock.service());
    let start = Instant::now();
    banks_ok(&mut api, &mock).await;
    // Inside the refresh-ahead window (300 s + up to 60 s of jitter before
    // expiry), well before the expiry margin (30 s).
    let failed_at = start + HOUR - 250 * SECOND;
    sleep_until(failed_at).await;
    throttle(
        &mock,
        1,
        StatusCode::SERVICE_UNAVAILABLE,
        &[(RETRY_AFTER, "45")],
    );
    banks_ok(&mut api, &mock).await; // starts the background refresh, which fails
    // Requests go on with the token and start no /oauth call until then.
    for offset in [1, 2, 4, 8, 16, 32, 44]
        .iter()
        .map(|secs| *secs * SECOND)
        .chain([45 * SECOND - MILLI])
    {
        // Every task is idle by then: what the last request started is done.
        sleep_until(failed_at + offset).await;
        assert_eq!(mock.oauth_calls(), 2, "at {offset:?}");
        banks_ok(&mut api, &mock).await;
    }
    // The wait ends at 45 s (a timer that fires then lets requests start a
    // refresh again); the first request after it starts one, which succeeds.
    sleep_until(failed_at + 45 * SECOND + MILLI).await;
    assert_eq!(mock.oauth_calls(), 2);
    banks_ok(&mut api, &mock).await;
    sleep_until(failed_at + 46 * SECOND).await;
    assert_eq!(mock.oauth_calls(), 3);
    banks_ok(&mut api, &mock).await;
    let failure = HOUR - 250 * SECOND;
    assert_eq!(
        oauth.times_since(start),
        [Duration::ZERO, failure, failure + 45 * SECOND + MILLI]
    );
    // The refresh grant failed: the next attempt is the password grant.
    assert_eq!(grants(&mock), ["password", "refresh_token", "password"]);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    let sent = mock.api_authorizations();
    assert_eq!(sent.last().cloned().flatten(), bearer(&issued[1]));
    assert_eq!(mock.unauthorized(), 0);
    // The failure is logged once, the server's wait with it; the 17 requests
    // that went on with the token logged nothing.
    let warnings: Vec<String> = common::log::events(&log)
        .into_iter()
        .filter(|event| event.level == tracing::Level::WARN)
        .map(|event| event.text)
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("token endpoint attempt failed grant=refresh_token"));
    assert!(warnings[0].contains("HTTP 503"), "{warnings:?}");
    assert!(
        warnings[1].ends_with("failures=1 retry_in_ms=45000 retry_after_s=45"),
        "{warnings:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_http_date_counts_from_the_answers_date() {
    let mock = MockVolt::builder().in_process();
    // 45 s after SERVER_DATE, in each of the three formats RFC 9110 accepts.
    for retry_after in [
        "Sun, 06 Nov 1994 08:50:22 GMT",
        "Sunday, 06-Nov-94 08:50:22 GMT",
        "Sun Nov  6 08:50:22 1994",
    ] {
        let mock_calls = mock.oauth_calls();
        throttle(
            &mock,
            1,
            StatusCode::SERVICE_UNAVAILABLE,
            &[(RETRY_AFTER, retry_after), (DATE, SERVER_DATE)],
        );
        let (auth, oauth) = recorded(&mock);
        let start = Instant::now();
        let error = auth.access_token().await.unwrap_err();
        assert_eq!(hint(&error), Some(45 * SECOND), "{retry_after}");
        let before = [SECOND, 44 * SECOND, 45 * SECOND - MILLI];
        fails_at(&auth, start, &before, StatusCode::SERVICE_UNAVAILABLE).await;
        sleep_until(start + 45 * SECOND).await;
        auth.access_token()
            .await
            .expect("a token once the wait is over");
        assert_eq!(oauth.times_since(start), [Duration::ZERO, 45 * SECOND]);
        assert_eq!(mock.oauth_calls(), mock_calls + 2);
    }
    assert_eq!(grants(&mock), ["password"; 6]);
}

#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_waits_only_the_backoff_maximum() {
    // Delta-seconds beyond any sane wait (and beyond u64), and a date in the
    // year 9999 with no Date to count from (so from this machine's clock).
    for headers in [
        &[(RETRY_AFTER, "999999999")][..],
        &[(RETRY_AFTER, "99999999999999999999999999")][..],
        &[(RETRY_AFTER, "Fri, 31 Dec 9999 23:59:59 GMT")][..],
    ] {
        let mock = MockVolt::builder().in_process();
        throttle(&mock, 1, StatusCode::TOO_MANY_REQUESTS, headers);
        let oauth = Recorder::new(&mock);
        let auth = builder(&mock)
            .backoff(SECOND, 60 * SECOND)
            .build(oauth.clone())
            .expect("layer");
        let start = Instant::now();
        let error = auth.access_token().await.unwrap_err();
        let hinted = hint(&error).expect("a hint");
        assert!(hinted > 60 * SECOND, "{headers:?}: {hinted:?}");
        let before = [SECOND, 59 * SECOND, 60 * SECOND - MILLI];
        fails_at(&auth, start, &before, StatusCode::TOO_MANY_REQUESTS).await;
        sleep_until(start + 60 * SECOND).await;
        auth.access_token()
            .await
            .expect("a token at the backoff maximum");
        assert_eq!(oauth.times_since(start), [Duration::ZERO, 60 * SECOND]);
        assert_eq!(grants(&mock), ["password", "password"]);
    }
}

/// The first failure's ordinary backoff is at most 1 s (1 s jittered down to
/// half): an ignored hint retries by then.
async fn ignored(status: StatusCode, headers: &[(HeaderName, &'static str)]) {
    let mock = MockVolt::builder().in_process();
    throttle(&mock, 1, status, headers);
    let (auth, oauth) = recorded(&mock);
    let start = Instant::now();
    let error = auth.access_token().await.unwrap_err();
    assert_eq!(error.status(), Some(status));
    assert_eq!(hint(&error), None, "{headers:?}");
    sleep_until(start + SECOND).await;
    auth.access_token()
        .await
        .expect("a token after the ordinary backoff");
    assert_eq!(
        oauth.times_since(start),
        [Duration::ZERO, SECOND],
        "{headers:?}"
    );
    assert_eq!(grants(&mock), ["password", "password"]);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_or_past_retry_after_is_ignored() {
    for value in ["soon", "-5", "+5", "1.5", "30s", "3 0", "", "0x10"] {
        ignored(StatusCode::TOO_MANY_REQUESTS, &[(RETRY_AFTER, value)]).await;
    }
    // A date not after the answer's Date, or an invalid date.
    for value in [
        "Sun, 06 Nov 1994 08:49:36 GMT",
        SERVER_DATE,
        "Sun, 06 Nov 1994 25:00:00 GMT",
    ] {
        ignored(
            StatusCode::SERVICE_UNAVAILABLE,
            &[(RETRY_AFTER, value), (DATE, SERVER_DATE)],
        )
        .await;
    }
    // A date long past by this machine's clock, with no Date to count from.
    ignored(
        StatusCode::SERVICE_UNAVAILABLE,
        &[(RETRY_AFTER, "Sun, 06 Nov 1994 08:49:37 GMT")],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_a_status_other_than_429_or_503_is_ignored() {
    for status in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::BAD_GATEWAY,
        StatusCode::GATEWAY_TIMEOUT,
    ] {
        ignored(status, &[(RETRY_AFTER, "30")]).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_ordinary_backoff_applies_when_it_is_longer() {
    let mock = MockVolt::builder().in_process();
    throttle(
        &mock,
        1,
        StatusCode::TOO_MANY_REQUESTS,
        &[(RETRY_AFTER, "2")],
    );
    let oauth = Recorder::new(&mock);
    // The first backoff is 10 s jittered down to no less than 5 s.
    let auth = builder(&mock)
        .backoff(10 * SECOND, 60 * SECOND)
        .build(oauth.clone())
        .expect("layer");
    let start = Instant::now();
    let error = auth.access_token().await.unwrap_err();
    assert_eq!(hint(&error), Some(2 * SECOND));
    let before = [2 * SECOND, 3 * SECOND, 5 * SECOND - MILLI];
    fails_at(&auth, start, &before, StatusCode::TOO_MANY_REQUESTS).await;
    sleep_until(start + 10 * SECOND).await;
    auth.access_token()
        .await
        .expect("a token after the backoff");
    assert_eq!(oauth.times_since(start), [Duration::ZERO, 10 * SECOND]);
    assert_eq!(grants(&mock), ["password", "password"]);
}
