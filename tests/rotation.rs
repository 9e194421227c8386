//! Rotating the credentials of a running layer
//! (`VoltAuthLayer::set_credentials`) against the mock Volt server, with exact
//! counts: no request waits, the next grant is a password grant carrying the
//! new credentials, started at once (ending any backoff), and never alongside
//! another `/oauth` call.
//!
//! Tokio's paused clock with the in-process mock; `/oauth` is held open with
//! `hold_oauth()` and `wait_for(n)`, never by sleeping. After a state change,
//! `sleep(1 ms)` is the idle barrier: on the paused clock every runnable task
//! (a background refresh) runs before the clock moves by that millisecond.

use std::time::Duration;

use http::{Request, Response};
use tokio::time::{Instant, sleep, timeout};
use tower::{BoxError, Layer, Service, ServiceExt};
use volt_auth::mock::{self, MockVolt};
use volt_auth::{Credentials, Error, VoltAuthLayer};

mod common;

use common::log::{capture, log_text, scoped};
use common::{Body, GUARD, banks_ok, bearer, get, layer};

const NEW_PASSWORD: &str = "rotated-Pa55/+&=";
const NEW_SECRET: &str = "rotated-client-secret-42";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The mock's credentials with another password.
fn with_password(password: &str) -> Credentials {
    Credentials::new(
        mock::CLIENT_ID,
        mock::CLIENT_SECRET,
        mock::USERNAME,
        password,
    )
}

/// `GET /banks` through `api`: the status, or the `volt_auth::Error`.
async fn banks<S, B>(api: &mut S, mock: &MockVolt) -> Result<u16, Error>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError>,
{
    let auth_error = |err: BoxError| match err.downcast_ref::<Error>() {
        Some(err) => err.clone(),
        None => panic!("not a volt_auth::Error: {err}"),
    };
    let ready = api.ready().await.map_err(auth_error)?;
    let response = ready.call(get(mock, "/banks")).await.map_err(auth_error)?;
    Ok(response.status().as_u16())
}

#[tokio::test(start_paused = true)]
async fn a_rotation_with_a_warm_cache_sends_one_password_grant_and_no_request_waits() {
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    banks_ok(&mut api, &mock).await;
    let first = mock.issued_access_tokens();
    assert_eq!(mock.oauth_calls(), 1);

    // Through a clone: it shares the cache. The grant it starts is held at
    // /oauth while requests go on with the current token, at once.
    let hold = mock.hold_oauth();
    let now = Instant::now();
    auth.clone().set_credentials(with_password(NEW_PASSWORD));
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("the rotation's grant held");
    for _ in 0..50 {
        banks_ok(&mut api, &mock).await;
    }
    assert_eq!(Instant::now(), now, "no request waited");
    assert_eq!(mock.oauth_calls(), 2);
    hold.release();
    sleep(ms(1)).await; // idle barrier (paused clock)

    // A password grant with the new password, although a refresh token was
    // at hand. The mock refuses it (Volt has not been told yet): the stats
    // say so at once, and the current token keeps serving.
    let requests = mock.oauth_requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].grant_type.as_deref(), Some("password"));
    assert_eq!(requests[1].field("password"), Some(NEW_PASSWORD));
    assert_eq!(requests[1].field("refresh_token"), None);
    let stats = auth.stats();
    assert_eq!(stats.password.rejected, 1);
    assert_eq!(stats.refresh.attempts(), 0);
    assert!(stats.last_error.is_some_and(|err| err.is_rejected()));
    assert!(stats.retry_in.is_some());
    assert!(stats.remaining.is_some());
    for _ in 0..10 {
        banks_ok(&mut api, &mock).await;
    }
    assert_eq!(mock.oauth_calls(), 2);
    let authorizations = mock.api_authorizations();
    assert_eq!(authorizations.len(), 61);
    assert!(authorizations.iter().all(|a| *a == bearer(&first[0])));

    // Rotated again, to the password Volt accepts: one password grant at
    // once, backoff or not; its token serves the next requests.
    auth.set_credentials(mock.credentials());
    sleep(ms(1)).await; // idle barrier (paused clock)
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!((mock.password_grants(), mock.refresh_grants()), (3, 0));
    assert_eq!(
        mock.oauth_requests()[2].field("password"),
        Some(mock::PASSWORD)
    );
    banks_ok(&mut api, &mock).await;
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    assert_eq!(mock.api_authorizations().last(), Some(&bearer(&issued[1])));
    let stats = auth.stats();
    assert_eq!((stats.failures, stats.refreshes), (0, 2));
    assert_eq!(mock.oauth_calls(), 3);
    assert_eq!(mock.max_oauth_in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_layer_with_a_refused_password_recovers_at_once_with_the_right_one() {
    let mock = MockVolt::builder().in_process();
    let auth = VoltAuthLayer::builder(with_password("wrong-password"))
        .base_url(&mock.url())
        .build(mock.service())
        .expect("layer");
    let mut api = auth.layer(mock.service());
    assert!(banks(&mut api, &mock).await.unwrap_err().is_rejected());
    // In the backoff (30 to 60 s after a refused password): refused at once,
    // without a call.
    sleep(Duration::from_secs(10)).await;
    assert!(banks(&mut api, &mock).await.unwrap_err().is_rejected());
    assert_eq!(mock.oauth_calls(), 1);
    assert!(auth.stats().retry_in.is_some());

    let now = Instant::now();
    auth.set_credentials(mock.credentials());
    assert_eq!(banks(&mut api, &mock).await.ok(), Some(200));
    assert_eq!(Instant::now(), now, "the backoff was not waited out");
    let requests = mock.oauth_requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        [requests[0].field("password"), requests[1].field("password")],
        [Some("wrong-password"), Some(mock::PASSWORD)]
    );
    assert_eq!((mock.password_grants(), mock.refresh_grants()), (2, 0));
    let stats = auth.stats();
    assert_eq!((stats.password.rejected, stats.password.succeeded), (1, 1));
    assert_eq!((stats.failures, stats.retry_in), (0, None));
    assert_eq!(mock.api_calls(), 1, "no request went out without a token");
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&mock.issued_access_tokens()[0])]
    );
}

#[tokio::test(start_paused = true)]
async fn a_rotation_during_a_held_refresh_waits_for_it_then_sends_the_new_password() {
    let mock = MockVolt::builder().in_process();
    let auth = VoltAuthLayer::builder(with_password("old-password"))
        .base_url(&mock.url())
        .build(mock.service())
        .expect("layer");
    let api = auth.layer(mock.service());
    let hold = mock.hold_oauth();
    let waiting = tokio::spawn(api.clone().oneshot(get(&mock, "/banks")));
    timeout(GUARD, hold.wait_for(1))
        .await
        .expect("the first grant held");

    auth.set_credentials(mock.credentials());
    sleep(ms(1)).await; // idle barrier (paused clock)
    assert_eq!(mock.oauth_calls(), 1, "no second /oauth call alongside");
    assert_eq!(hold.waiting(), 1);
    hold.release();

    // The held grant, with the old password, is refused; the password grant
    // that follows at once carries the new one. The request that waited gets
    // the refusal, or the token that followed if it was in by the time the
    // request woke (on this runtime, it is).
    match waiting.await.expect("the task did not panic") {
        Ok(response) => assert_eq!(response.status(), 200),
        Err(err) => assert!(err.downcast_ref::<Error>().is_some_and(Error::is_rejected)),
    }
    sleep(ms(1)).await; // idle barrier (paused clock)
    let requests = mock.oauth_requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        [requests[0].field("password"), requests[1].field("password")],
        [Some("old-password"), Some(mock::PASSWORD)]
    );
    assert_eq!(requests[1].grant_type.as_deref(), Some("password"));
    assert_eq!(mock.max_oauth_in_flight(), 1);
    let mut api = api;
    banks_ok(&mut api, &mock).await;
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 1);
    let authorizations = mock.api_authorizations();
    assert!(!authorizations.is_empty());
    assert!(authorizations.iter().all(|a| *a == bearer(&issued[0])));
    assert_eq!(mock.oauth_calls(), 2);
}

/// Two threads that hand the layer the same new credentials at the same
/// moment (two watchers of one secret file, say) replace them once, and cost
/// one password grant: each call used to find the old credentials in use
/// before either stored the new ones, and both replaced them (two
/// "credentials replaced" events; a second grant had the first one read them
/// before the second call's turn). Many rounds, each released at once to
/// threads spinning on a flag; between rounds the runtime, blocked until
/// both calls return, runs the grants (paused clock).
#[tokio::test(start_paused = true)]
async fn the_same_credentials_set_by_two_threads_at_once_cost_one_grant() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    const THREADS: usize = 2;
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    auth.access_token().await.expect("the first token");
    let runtime = tokio::runtime::Handle::current();
    // The calls' events, from their threads.
    let (log, _guard) = scoped();
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let replacements = || log.text().matches("credentials replaced").count();
    for round in 0..200 {
        let before = mock.password_grants();
        let replaced = replacements();
        let password = format!("rotated-{round}");
        let (ready, go) = (AtomicUsize::new(0), AtomicBool::new(false));
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    let _runtime = runtime.enter();
                    let credentials = with_password(&password);
                    ready.fetch_add(1, SeqCst);
                    while !go.load(SeqCst) {
                        std::hint::spin_loop();
                    }
                    tracing::dispatcher::with_default(&dispatch, || {
                        auth.set_credentials(credentials);
                    });
                });
            }
            while ready.load(SeqCst) < THREADS {
                std::hint::spin_loop();
            }
            go.store(true, SeqCst);
        });
        sleep(ms(1)).await; // idle barrier (paused clock)
        let grants = mock.password_grants() - before;
        assert_eq!(grants, 1, "round {round}: grants for one change");
        assert_eq!(replacements() - replaced, 1, "round {round}: replacements");
    }
    assert_eq!(mock.max_oauth_in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn after_a_rotation_neither_debug_nor_the_log_shows_a_secret() {
    capture();
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    let mut api = auth.layer(mock.service());
    banks_ok(&mut api, &mock).await;
    auth.set_credentials(Credentials::new(
        mock::CLIENT_ID,
        NEW_SECRET,
        mock::USERNAME,
        NEW_PASSWORD,
    ));
    sleep(ms(1)).await; // idle barrier (paused clock)
    assert_eq!(
        mock.oauth_requests()[1].field("client_secret"),
        Some(NEW_SECRET)
    );
    let shown = format!("{auth:?} {auth:#?} {api:?} {:?}", auth.stats());
    let log = log_text();
    assert!(log.contains("credentials replaced"), "{log}");
    for secret in [
        mock::CLIENT_SECRET,
        mock::PASSWORD,
        NEW_SECRET,
        NEW_PASSWORD,
    ] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

/// Credentials with an empty part (a secret file read while it is being
/// rewritten), which `Builder::build` refuses, are ignored with a warning:
/// no grant, and the next grant still sends those in use.
#[tokio::test(start_paused = true)]
async fn credentials_with_an_empty_part_are_ignored_with_a_warning() {
    capture();
    let mock = MockVolt::builder().in_process();
    let auth = layer(&mock);
    auth.access_token().await.unwrap();
    auth.set_credentials(with_password(""));
    sleep(ms(1)).await;
    assert_eq!(mock.oauth_calls(), 1);
    let log = log_text();
    assert!(
        log.contains(
            "new credentials ignored; those in use stay problem=\"the password is empty\""
        ),
        "{log}"
    );
    // The next grant, with the credentials in use.
    mock.revoke_refresh_tokens();
    sleep(Duration::from_secs(3600)).await;
    auth.access_token().await.unwrap();
    let sent = mock.oauth_requests();
    assert_eq!(sent.len(), 3, "a refused refresh, then the password grant");
    assert_eq!(sent[2].field("password"), Some(mock::PASSWORD));
}
