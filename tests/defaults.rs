//! The defaults the docs give (`Builder`'s table, the README), on a layer
//! built with nothing but credentials and a base URL. Under tokio's paused
//! clock: `stats().retry_in` read at the instant of a failure is the backoff
//! itself.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::{Instant, sleep};
use tower::{Layer, ServiceExt};
use volt_auth::mock::{self, MockVolt};
use volt_auth::{Credentials, DefaultReplay, Error, GrantType, ReplayPolicy, VoltAuthLayer};

const SEC: Duration = Duration::from_secs(1);
const MIB: usize = 1024 * 1024;

/// The backoff the cache holds now, which the docs put in `[base / 2, base)`.
fn assert_backoff(auth: &VoltAuthLayer, base: Duration, what: &str) -> Duration {
    let wait = auth.stats().retry_in.expect("backing off");
    assert!(
        wait >= base / 2 && wait < base,
        "{what}: a backoff of {wait:?}, not in [{:?}, {base:?})",
        base / 2
    );
    wait
}

#[tokio::test(start_paused = true)]
async fn the_default_token_timeout_is_five_seconds() {
    let mock = MockVolt::builder().in_process();
    mock.set_oauth_delay(Duration::from_secs(3600));
    let auth = common::layer(&mock);

    let started = Instant::now();
    let err = auth.access_token().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout { grant: GrantType::Password, timeout, .. } if timeout == 5 * SEC
        ),
        "{err:?}"
    );
    assert_eq!(started.elapsed(), 5 * SEC);
    assert_eq!(mock.oauth_calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_default_backoff_doubles_from_one_second_to_one_minute() {
    let mock = MockVolt::builder().in_process();
    mock.fail_oauth(
        100,
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"code":503,"message":"Service Unavailable"}"#,
    );
    let auth = common::layer(&mock);

    // 1, 2, 4, 8, 16, 32 s, then capped at 60 s; each jittered down to half.
    let bases = [1, 2, 4, 8, 16, 32, 60, 60, 60].map(|secs| secs * SEC);
    for (failed, base) in bases.into_iter().enumerate() {
        let err = auth.access_token().await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(mock.oauth_calls(), failed + 1);
        let wait = assert_backoff(&auth, base, &format!("failure {}", failed + 1));
        // Until the backoff ends, the error comes at once, without a call.
        sleep(wait - Duration::from_millis(1)).await;
        let at = Instant::now();
        assert!(auth.access_token().await.is_err());
        assert_eq!(Instant::now(), at);
        assert_eq!(mock.oauth_calls(), failed + 1);
        sleep(Duration::from_millis(1)).await;
    }
    let stats = auth.stats();
    assert_eq!(stats.failures, 9);
    assert_eq!(stats.password.failed, 9);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_password_grant_waits_30_to_60_seconds_by_default() {
    let mock = MockVolt::builder().in_process();
    let wrong = Credentials::new(
        mock::CLIENT_ID,
        mock::CLIENT_SECRET,
        mock::USERNAME,
        "wrong",
    );
    let auth = VoltAuthLayer::builder(wrong)
        .base_url(&mock.url())
        .build(mock.service())
        .expect("layer");

    for attempt in 1..=3 {
        let err = auth.access_token().await.unwrap_err();
        assert!(err.is_rejected(), "{err:?}");
        assert_eq!(mock.oauth_calls(), attempt);
        let wait = assert_backoff(&auth, 60 * SEC, &format!("rejection {attempt}"));
        sleep(wait).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_default_replay_policy_copies_bodies_of_up_to_one_mebibyte() {
    for policy in [DefaultReplay::new(), DefaultReplay::default()] {
        let full = |len: usize| Full::new(Bytes::from(vec![b'x'; len]));
        assert!(policy.clone_body(&full(MIB)).is_some());
        assert!(policy.clone_body(&full(MIB + 1)).is_none());
        assert!(policy.clone_body(&"x".repeat(MIB)).is_some());
        assert!(policy.clone_body(&"x".repeat(MIB + 1)).is_none());
    }

    // Through a layer built without `.replay(..)`: a 1 MiB body is replayed
    // once after its 401; one byte more is sent once.
    for (len, sends, replays) in [(MIB, 2, 1), (MIB + 1, 1, 0)] {
        let mock = MockVolt::builder().in_process();
        let auth = common::layer(&mock);
        // An inner service that answers every request 401, counting them.
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let api = auth.layer(tower::service_fn(move |_: Request<Full<Bytes>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut response = Response::new(Full::<Bytes>::default());
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            async move { Ok::<_, Infallible>(response) }
        }));
        let request = Request::post(format!("{}/v2/payments", mock.url()))
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .expect("request");
        let response = api.oneshot(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(calls.load(Ordering::SeqCst), sends, "{len} bytes");
        assert_eq!(auth.stats().replays, replays, "{len} bytes");
    }
}
