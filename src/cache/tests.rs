//! The cache against a scripted token source: exact counts of grants, under
//! tokio's paused clock where time matters. Under a paused clock, `sleep`
//! moves the clock (firing every timer due on the way) rather than waiting.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use http::{HeaderValue, StatusCode};
use secrecy::ExposeSecret;
use tokio::time::{sleep, timeout};

use super::*;
use crate::error::ErrorResponse;
use crate::oauth::Fetched;

const HOUR: Duration = Duration::from_secs(3600);

fn settings() -> Settings {
    Settings {
        refresh_ahead: Duration::from_secs(300),
        expiry_margin: Duration::from_secs(30),
        backoff_min: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        stranded_after: Duration::from_secs(11),
    }
}

/// Issues `at-N`/`rt-N` tokens, or the scripted failures first; records which
/// grant and refresh token each call presented. A closed gate holds calls.
struct Script {
    calls: Mutex<Vec<(GrantType, Option<String>)>>,
    failures: Mutex<VecDeque<Error>>,
    /// Every call of this error's grant fails with it (see [`Script::break_grant`]).
    broken: Mutex<Option<Error>>,
    open: watch::Sender<bool>,
    lifetime: Duration,
}

impl Script {
    fn new(lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::new(Vec::new()),
            failures: Mutex::new(VecDeque::new()),
            broken: Mutex::new(None),
            open: watch::Sender::new(true),
            lifetime,
        })
    }

    fn cache(self: &Arc<Self>) -> TokenCache {
        TokenCache::new(self.clone(), settings())
    }

    fn fail_next(&self, error: Error) {
        self.failures.lock().unwrap().push_back(error);
    }

    /// Fails every call of `error`'s grant with it from now on, after the
    /// scripted failures.
    fn break_grant(&self, error: Error) {
        *self.broken.lock().unwrap() = Some(error);
    }

    /// Holds every call from now on until `open`.
    fn close(&self) {
        self.open.send_replace(false);
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    fn calls(&self) -> Vec<(GrantType, Option<String>)> {
        self.calls.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    /// Scripted failures no call has taken yet.
    fn failures_left(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

/// A test source's outcome, without a cause to log.
fn uncaused<'a>(outcome: impl Future<Output = Result<Token, Error>> + Send + 'a) -> Fetched<'a> {
    Box::pin(async move { (outcome.await, None) })
}

impl TokenSource for Arc<Script> {
    fn fetch<'a>(&'a self, grant: &'a Grant) -> Fetched<'a> {
        uncaused(async move {
            let presented = match grant {
                Grant::Password => None,
                Grant::Refresh(token) => Some(token.expose_secret().to_owned()),
            };
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push((grant.kind(), presented));
                calls.len()
            };
            let _ = self.open.subscribe().wait_for(|open| *open).await;
            if let Some(error) = self.failures.lock().unwrap().pop_front() {
                return Err(error);
            }
            if let Some(error) = self.broken.lock().unwrap().clone() {
                if error.grant() == Some(grant.kind()) {
                    return Err(error);
                }
            }
            Ok(Token::for_test(
                &format!("at-{n}"),
                Some(&format!("rt-{n}")),
                self.lifetime,
            ))
        })
    }
}

fn server_error(grant: GrantType) -> Error {
    Error::Failed {
        grant,
        response: ErrorResponse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: None,
            message: None,
            retry_after: None,
        },
    }
}

fn rejected(grant: GrantType, code: &str) -> Error {
    Error::Rejected {
        grant,
        response: ErrorResponse {
            status: StatusCode::BAD_REQUEST,
            code: Some(code.to_owned()),
            message: None,
            retry_after: None,
        },
    }
}

fn secret(lease: &Lease) -> &str {
    lease.token.secret()
}

/// The header a request would carry now, if it need not wait.
fn header(cache: &TokenCache) -> Option<String> {
    let mut headers = http::HeaderMap::new();
    cache.attach(&mut headers)?;
    Some(
        headers[http::header::AUTHORIZATION]
            .to_str()
            .unwrap()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_first_requests_cost_one_password_grant() {
    let script = Script::new(HOUR);
    script.close();
    let cache = script.cache();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.token().await })
        })
        .collect();
    script.open();
    for task in tasks {
        let lease = task.await.unwrap().unwrap();
        assert_eq!(secret(&lease), "at-1");
        assert_eq!(lease.ticket.generation, 1);
    }
    assert_eq!(script.calls(), [(GrantType::Password, None)]);
    assert_eq!(cache.stats().password.succeeded, 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_refreshes_once_in_the_background_without_blocking() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    assert_eq!(header(&cache), None, "no token before the first request");
    cache.token().await.unwrap();
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));

    // Before the refresh-ahead window (300 s + up to 20 % jitter): nothing.
    sleep(HOUR - Duration::from_secs(400)).await;
    for _ in 0..100 {
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    }
    assert_eq!(script.count(), 1);

    // Inside it: one background refresh; while /oauth is held, requests go on
    // with the old token at once.
    sleep(Duration::from_secs(110)).await;
    script.close();
    for _ in 0..100 {
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
        let lease = cache.token().await.unwrap();
        assert_eq!(secret(&lease), "at-1");
    }
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 2, "exactly one background refresh");
    script.open();
    let mut waited = cache.shared.done.subscribe();
    waited.changed().await.unwrap();
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
    assert_eq!(
        script.calls(),
        [
            (GrantType::Password, None),
            (GrantType::RefreshToken, Some("rt-1".into()))
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn past_the_margin_requests_wait_for_the_new_token() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    script.close();
    // Past the refresh-ahead window the background refresh is held; past the
    // margin the token counts as expired.
    sleep(HOUR - Duration::from_secs(20)).await;
    assert_eq!(header(&cache), None);
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.token().await }
    });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    script.open();
    assert_eq!(secret(&waiter.await.unwrap().unwrap()), "at-2");
    assert_eq!(script.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn refreshes_present_the_latest_rotated_refresh_token() {
    let script = Script::new(Duration::from_secs(60));
    let cache = script.cache();
    for expected in 1..=4 {
        let lease = cache.token().await.unwrap();
        assert_eq!(secret(&lease), format!("at-{expected}"));
        // Past the margin (at most 6 s for a 60 s token).
        sleep(Duration::from_secs(55)).await;
    }
    assert_eq!(
        script.calls(),
        [
            (GrantType::Password, None),
            (GrantType::RefreshToken, Some("rt-1".into())),
            (GrantType::RefreshToken, Some("rt-2".into())),
            (GrantType::RefreshToken, Some("rt-3".into())),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_rejected_refresh_token_falls_back_to_one_password_grant() {
    for code in ["invalid_grant", "invalid_request"] {
        let script = Script::new(HOUR);
        let cache = script.cache();
        cache.token().await.unwrap();
        sleep(HOUR).await;
        script.fail_next(rejected(GrantType::RefreshToken, code));
        let lease = cache.token().await.unwrap();
        assert_eq!(secret(&lease), "at-3");
        assert_eq!(
            script.calls(),
            [
                (GrantType::Password, None),
                (GrantType::RefreshToken, Some("rt-1".into())),
                (GrantType::Password, None),
            ]
        );
        let stats = cache.stats();
        assert_eq!((stats.refresh.rejected, stats.password.succeeded), (1, 2));
    }
}

/// A refresh token Volt refused is not presented again when the password
/// grant after it fails: each later attempt is one password grant.
#[tokio::test(start_paused = true)]
async fn a_refused_refresh_token_is_not_presented_again() {
    for failure in [
        rejected(GrantType::Password, "invalid_grant"),
        server_error(GrantType::Password),
    ] {
        let script = Script::new(HOUR);
        let cache = script.cache();
        cache.token().await.unwrap();
        sleep(HOUR).await;
        script.fail_next(rejected(GrantType::RefreshToken, "invalid_grant"));
        script.fail_next(failure.clone());
        script.fail_next(failure.clone());
        for _ in 0..2 {
            assert_eq!(cache.token().await.unwrap_err().kind(), failure.kind());
            sleep(Duration::from_secs(60)).await;
        }
        assert_eq!(secret(&cache.token().await.unwrap()), "at-5");
        assert_eq!(
            script.calls(),
            [
                (GrantType::Password, None),
                (GrantType::RefreshToken, Some("rt-1".into())),
                (GrantType::Password, None),
                (GrantType::Password, None),
                (GrantType::Password, None),
            ]
        );
        // The new token's refresh token is used again.
        sleep(HOUR).await;
        assert_eq!(secret(&cache.token().await.unwrap()), "at-6");
        assert_eq!(
            script.calls()[5],
            (GrantType::RefreshToken, Some("rt-5".into()))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_failure_on_refresh_is_not_a_rejection() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    sleep(HOUR).await;
    script.fail_next(server_error(GrantType::RefreshToken));
    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, Error::Failed { .. }));
    assert_eq!(script.count(), 2, "no password grant after a 503");
}

/// The refresh path broken while the password grant works (a 503 to every
/// refresh, as a server bug on one refresh token or a WAF rule on refresh
/// requests would answer): the attempt after a failed refresh, one backoff
/// later, is the password grant, so the token is replaced before it expires.
/// It is served throughout; the new token's refresh token is presented next.
#[tokio::test(start_paused = true)]
async fn a_failing_refresh_grant_is_followed_by_a_password_grant() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    script.break_grant(server_error(GrantType::RefreshToken));
    for (old, new) in [(1, 3), (3, 5)] {
        let calls = script.count();
        // Stale (300 s before expiry at the latest), not expired: the read
        // starts the refresh in the background, which fails.
        sleep(HOUR - Duration::from_secs(230)).await;
        assert_eq!(header(&cache), Some(format!("Bearer at-{old}")));
        sleep(Duration::from_millis(1)).await;
        assert_eq!(
            script.calls()[calls..],
            [(GrantType::RefreshToken, Some(format!("rt-{old}")))]
        );
        let wait = cache.stats().retry_in.unwrap();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        // During the backoff: the token serves, nothing is sent.
        for _ in 0..100 {
            assert_eq!(header(&cache), Some(format!("Bearer at-{old}")));
            assert_eq!(secret(&cache.token().await.unwrap()), format!("at-{old}"));
        }
        assert_eq!(script.count(), calls + 1);
        // After it: the next stale read starts the password grant.
        sleep(wait + Duration::from_millis(1)).await;
        assert_eq!(header(&cache), Some(format!("Bearer at-{old}")));
        sleep(Duration::from_millis(1)).await;
        assert_eq!(
            script.calls()[calls..],
            [
                (GrantType::RefreshToken, Some(format!("rt-{old}"))),
                (GrantType::Password, None),
            ]
        );
        assert_eq!(header(&cache), Some(format!("Bearer at-{new}")));
    }
    let stats = cache.stats();
    assert_eq!(
        stats.refresh,
        GrantStats {
            succeeded: 0,
            rejected: 0,
            failed: 2
        }
    );
    assert_eq!(
        stats.password,
        GrantStats {
            succeeded: 3,
            rejected: 0,
            failed: 0
        }
    );
    assert_eq!((stats.refreshes, stats.failures), (3, 0));
}

/// The same once the token has expired: a request after one backoff window
/// gets the password grant's token, rather than the refresh grant's error
/// after every window for ever.
#[tokio::test(start_paused = true)]
async fn past_expiry_a_failing_refresh_grant_is_followed_by_a_password_grant() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    script.break_grant(server_error(GrantType::RefreshToken));
    sleep(HOUR).await;
    let error = cache.token().await.unwrap_err();
    assert_eq!(error.grant(), Some(GrantType::RefreshToken));
    let wait = cache.stats().retry_in.unwrap();
    assert!(cache.token().await.is_err());
    assert_eq!(script.count(), 2);
    sleep(wait).await;
    // Requests that wait for the next attempt get its token.
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.token().await })
        })
        .collect();
    for waiter in waiters {
        let lease = waiter.await.unwrap();
        assert_eq!(lease.as_ref().map(secret).ok(), Some("at-3"), "{lease:?}");
    }
    assert_eq!(
        script.calls(),
        [
            (GrantType::Password, None),
            (GrantType::RefreshToken, Some("rt-1".into())),
            (GrantType::Password, None),
        ]
    );
}

/// An outage where every grant fails: one attempt per backoff window, as
/// when every attempt was a refresh grant, and the same escalation; the
/// attempts alternate, presenting the refresh token (kept: a failure is no
/// refusal) and then the password, until one succeeds.
#[tokio::test(start_paused = true)]
async fn an_outage_costs_one_attempt_per_backoff_window_alternating_grants() {
    const WINDOWS: u32 = 8;
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    for _ in 0..WINDOWS {
        script.fail_next(server_error(GrantType::RefreshToken));
    }
    sleep(HOUR).await;
    let mut calls = Vec::new();
    for window in 1..=WINDOWS {
        assert!(cache.token().await.is_err());
        calls.push(script.count() - 1);
        let stats = cache.stats();
        assert_eq!(stats.failures, window);
        // The backoff escalates as before: 1 s doubling, jittered to half.
        let full = Duration::from_secs(1 << (window - 1)).min(Duration::from_secs(60));
        let wait = stats.retry_in.unwrap();
        assert!(full / 2 <= wait && wait <= full, "{window}: {wait:?}");
        // Nothing more within the window.
        sleep(wait - Duration::from_millis(1)).await;
        assert!(cache.token().await.is_err());
        sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(calls, (1..=WINDOWS as usize).collect::<Vec<_>>());
    assert_eq!(secret(&cache.token().await.unwrap()), "at-10");
    let presented: Vec<_> = script.calls()[1..]
        .iter()
        .map(|(grant, _)| *grant)
        .collect();
    let alternating: Vec<_> = [GrantType::RefreshToken, GrantType::Password]
        .into_iter()
        .cycle()
        .take(WINDOWS as usize + 1)
        .collect();
    assert_eq!(presented, alternating);
    assert!(
        script.calls()[1..]
            .iter()
            .all(|call| call.1.as_deref().is_none_or(|token| token == "rt-1"))
    );
    let stats = cache.stats();
    assert_eq!(
        stats.refresh,
        GrantStats {
            succeeded: 1,
            rejected: 0,
            failed: 4
        }
    );
    assert_eq!(
        stats.password,
        GrantStats {
            succeeded: 1,
            rejected: 0,
            failed: 4
        }
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_request_that_started_a_refresh_does_not_cancel_it() {
    let script = Script::new(HOUR);
    script.close();
    let cache = script.cache();
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.token().await }
    });
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 1);
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    script.open();
    let lease = cache.token().await.unwrap();
    assert_eq!(secret(&lease), "at-1");
    assert_eq!(script.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_a_token_a_failing_endpoint_costs_one_attempt_per_backoff() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    script.fail_next(server_error(GrantType::Password));
    script.fail_next(server_error(GrantType::Password));
    let waiters: Vec<_> = (0..50)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.token().await })
        })
        .collect();
    for waiter in waiters {
        assert!(matches!(waiter.await.unwrap(), Err(Error::Failed { .. })));
    }
    assert_eq!(script.count(), 1, "one attempt shared by 50 waiters");
    // Within the backoff: the same error at once, no new attempt.
    for _ in 0..20 {
        assert!(cache.token().await.is_err());
    }
    assert_eq!(script.count(), 1);
    // After the first backoff (at most 1 s): one more attempt, failing again.
    sleep(Duration::from_secs(1)).await;
    assert!(cache.token().await.is_err());
    assert!(cache.token().await.is_err());
    assert_eq!(script.count(), 2);
    // After the second (at most 2 s): recovery.
    sleep(Duration::from_secs(2)).await;
    assert_eq!(secret(&cache.token().await.unwrap()), "at-3");
    assert_eq!(script.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_background_refresh_keeps_the_valid_token_in_service() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    sleep(HOUR - Duration::from_secs(250)).await;
    script.fail_next(server_error(GrantType::RefreshToken));
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 2);
    // During the backoff, requests use the token and start nothing.
    for _ in 0..100 {
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
        assert_eq!(secret(&cache.token().await.unwrap()), "at-1");
    }
    assert_eq!(script.count(), 2);
    // After the backoff, the next stale read starts one more refresh. That
    // read does not look at the clock: a timer marks the backoff's end, on
    // the millisecond tick at or after it, which is the 1 s tick itself
    // when the backoff is jittered above 999 ms. One millisecond more: that
    // timer's task has run (paused clock), whatever the jitter.
    sleep(Duration::from_millis(1001)).await;
    script.close();
    let mut done = cache.shared.done.subscribe();
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 3);
    script.open();
    done.changed().await.unwrap();
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-3"));
}

#[tokio::test(start_paused = true)]
async fn a_rejected_password_grant_waits_the_capped_backoff() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    script.fail_next(rejected(GrantType::Password, "invalid_client"));
    let error = cache.token().await.unwrap_err();
    assert!(error.is_rejected());
    // Half the cap is the earliest jittered retry: nothing before it.
    sleep(Duration::from_secs(29)).await;
    assert!(cache.token().await.unwrap_err().is_rejected());
    assert_eq!(script.count(), 1);
    sleep(Duration::from_secs(31)).await;
    assert!(cache.token().await.is_ok());
    assert_eq!(script.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_401s_for_one_token_cost_one_refresh() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    let first = cache.token().await.unwrap();
    let renewals: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.renew(first.ticket.generation).await })
        })
        .collect();
    for renewal in renewals {
        let lease = renewal.await.unwrap().unwrap().unwrap();
        assert_eq!(secret(&lease), "at-2");
    }
    assert_eq!(script.count(), 2);
    // A late 401 for the old token does not wipe the new one.
    let lease = cache.renew(first.ticket.generation).await.unwrap().unwrap();
    assert_eq!((secret(&lease), script.count()), ("at-2", 2));
}

#[tokio::test(start_paused = true)]
async fn forced_refreshes_are_throttled() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    let mut generation = cache.token().await.unwrap().ticket.generation;
    generation = renewed(&cache, generation).await;
    assert_eq!(script.count(), 2);
    // A server that rejects every token: no newer token within the backoff.
    for _ in 0..50 {
        assert!(cache.renew(generation).await.unwrap().is_none());
        cache.invalidate(generation);
    }
    assert_eq!(script.count(), 2);
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
    sleep(Duration::from_secs(1)).await;
    generation = renewed(&cache, generation).await;
    assert_eq!(script.count(), 3);
    // The next one waits twice as long.
    sleep(Duration::from_secs(1)).await;
    assert!(cache.renew(generation).await.unwrap().is_none());
    sleep(Duration::from_secs(1)).await;
    assert!(cache.renew(generation).await.unwrap().is_some());
    assert_eq!(script.count(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_401_waits_for_the_refresh_already_under_way() {
    // Tokens of 1 s: stale from at most 0.67 s, within the 1 s throttle.
    let script = Script::new(Duration::from_secs(1));
    let cache = script.cache();
    let first = cache.token().await.unwrap().ticket.generation;
    let forced = renewed(&cache, first).await;
    script.close();
    sleep(Duration::from_millis(700)).await;
    // A stale read starts the refresh-ahead, held at /oauth.
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
    let (renewal, ()) = tokio::join!(cache.renew(forced), async {
        sleep(Duration::from_millis(1)).await;
        assert_eq!(script.count(), 3);
        script.open();
    });
    // The throttled 401 started nothing, and got the running refresh's token.
    let lease = renewal.unwrap().expect("the refresh-ahead's token");
    assert_eq!(secret(&lease), "at-3");
    assert_eq!(script.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_takes_only_the_outcome_of_the_refresh_it_waits_for() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    script.close();
    let (token, ()) = tokio::join!(cache.token(), async {
        // The waiter waits for refresh 1, held at /oauth, when an earlier
        // refresh's failure is published late (its `finish` released the
        // lock, and this waiter began, before it woke anyone).
        sleep(Duration::from_millis(1)).await;
        let late = server_error(GrantType::Password);
        cache.shared.done.send_replace((0, Some(late)));
        sleep(Duration::from_millis(1)).await;
        script.open();
    });
    assert_eq!(secret(&token.expect("refresh 1's token")), "at-1");
    assert_eq!(script.count(), 1);
}

/// A refresh given up on (stranded) whose task is dropped with its runtime
/// after the next refresh has ended must not hide that refresh's outcome from
/// its waiters: the watch never goes back to an earlier refresh's number.
#[test]
fn a_given_up_refresh_dropped_late_does_not_hold_up_the_next_ones_waiters() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    // Refresh 1 is spawned on a runtime that is not driven again.
    let gone = paused_runtime();
    gone.block_on(async {
        let mut first = std::pin::pin!(cache.token());
        std::future::poll_fn(|cx| {
            assert!(first.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
    });
    let home = paused_runtime();
    script.close();
    let mut waiter = Box::pin(cache.token());
    home.block_on(async {
        // The waiter gives refresh 1 up after 11 s, and waits for refresh 2,
        // held at /oauth.
        tokio::select! {
            token = &mut waiter => panic!("{token:?}"),
            () = sleep(Duration::from_secs(12)) => {}
        }
        assert_eq!(script.count(), 1);
        // Refresh 2 ends, and publishes, before the waiter is polled again.
        script.open();
        while cache.shared.done.borrow().0 != 2 {
            tokio::task::yield_now().await;
        }
    });
    // Refresh 1's task goes with its runtime, after refresh 2 ended.
    drop(gone);
    home.block_on(async {
        let token = timeout(Duration::from_secs(1), waiter).await;
        let token = token.expect("refresh 2's waiter woken");
        assert_eq!(secret(&token.unwrap()), "at-1");
    });
    assert_eq!(script.count(), 1);
}

/// `finish` publishes after releasing the lock (and logging a failure), so a
/// refresh's outcome may come after the next refresh's: it is dropped rather
/// than hide the later one from that refresh's waiters.
#[tokio::test]
async fn outcomes_published_out_of_order_keep_the_latest() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.shared.publish(2, None);
    cache
        .shared
        .publish(1, Some(server_error(GrantType::Password)));
    let published = cache.shared.done.borrow().clone();
    assert!(matches!(published, (2, None)), "{published:?}");
}

#[tokio::test(start_paused = true)]
async fn short_lifetimes_do_not_refresh_per_request() {
    let script = Script::new(Duration::from_secs(2));
    let cache = script.cache();
    cache.token().await.unwrap();
    for _ in 0..10 {
        for _ in 0..100 {
            assert!(header(&cache).is_some());
        }
        sleep(Duration::from_millis(100)).await;
    }
    // One second in: still the first token, no refresh.
    assert_eq!(script.count(), 1);
}

#[tokio::test]
async fn a_panicking_or_dropped_refresh_releases_its_waiters() {
    struct Never;
    impl TokenSource for Never {
        fn fetch<'a>(&'a self, _: &'a Grant) -> Fetched<'a> {
            uncaused(async { panic!("the source failed") })
        }
    }
    let cache = TokenCache::new(Never, settings());
    assert!(matches!(cache.token().await, Err(Error::Interrupted)));
    // The refresh's own panic is a failure: backed off like any other.
    let stats = cache.stats();
    assert_eq!(stats.failures, 1);
    assert!(stats.retry_in.is_some());
    assert!(matches!(stats.last_error, Some(Error::Interrupted)));
}

#[test]
fn without_a_runtime_the_cache_reports_it() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    assert!(matches!(
        Shared::begin(&cache.shared, None),
        Err(Error::NoRuntime)
    ));
}

/// A caller outside any Tokio runtime (sync code driving `access_token()`
/// with another executor's `block_on`) while a refresh started elsewhere is
/// under way: waiting for it takes a Tokio timer, so the caller gets
/// `Error::NoRuntime`, as the docs say, instead of Tokio's "no reactor
/// running" panic; and so does a 401's renewal.
#[test]
fn outside_a_runtime_a_refresh_under_way_is_no_runtime_not_a_panic() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    let runtime = paused_runtime();
    let first = runtime.block_on(cache.token()).unwrap().ticket.generation;
    // A 401 forces a refresh, held at /oauth; the runtime is not driven.
    script.close();
    runtime
        .block_on(async { timeout(Duration::from_secs(1), cache.renew(first)).await })
        .unwrap_err();
    assert_eq!(script.count(), 2);
    let mut context = Context::from_waker(std::task::Waker::noop());
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let token = std::pin::pin!(cache.token());
        let renewal = std::pin::pin!(cache.renew(first));
        (token.poll(&mut context), renewal.poll(&mut context))
    }));
    let Ok((token, renewal)) = polled else {
        panic!("polled outside a runtime, waiting for the refresh panicked");
    };
    assert!(
        matches!(token, Poll::Ready(Err(Error::NoRuntime))),
        "{token:?}"
    );
    assert!(
        matches!(renewal, Poll::Ready(Err(Error::NoRuntime))),
        "{renewal:?}"
    );
    // The refresh went on, and its waiters on its runtime get its token.
    script.open();
    let renewed = runtime.block_on(cache.token()).unwrap();
    assert_eq!(secret(&renewed), "at-2");
    assert_eq!(script.count(), 2);
}

/// A `current_thread` runtime with a paused clock, for tests that run the
/// cache on several runtimes, or leave one undriven.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// The generation of the token renewed after a 401 to `rejected`'s.
async fn renewed(cache: &TokenCache, rejected: u64) -> u64 {
    let lease = cache.renew(rejected).await.unwrap();
    lease.expect("a renewed token").ticket.generation
}

/// A cache holding its first token (`at-1`), and that token's ticket.
async fn warm() -> (Arc<Script>, TokenCache, Ticket) {
    let script = Script::new(HOUR);
    let cache = script.cache();
    let ticket = cache.token().await.unwrap().ticket;
    (script, cache, ticket)
}

#[tokio::test]
async fn a_ticket_finds_its_cache_until_the_cache_is_dropped() {
    let (script, cache, ticket) = warm().await;
    let found = ticket.settle(StatusCode::UNAUTHORIZED, true);
    assert!(found.is_some_and(|found| Arc::ptr_eq(&found.shared, &cache.shared)));
    drop(cache);
    // Nothing left to find, and nothing to invalidate.
    assert!(ticket.settle(StatusCode::UNAUTHORIZED, true).is_none());
    assert!(ticket.settle(StatusCode::UNAUTHORIZED, false).is_none());
    assert_eq!(script.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn settling_a_401_invalidates_the_token_unless_it_is_replayed() {
    let (script, cache, ticket) = warm().await;
    assert!(ticket.settle(StatusCode::OK, false).is_none());
    assert!(ticket.settle(StatusCode::UNAUTHORIZED, true).is_some());
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    assert!(ticket.settle(StatusCode::UNAUTHORIZED, false).is_none());
    assert_eq!(header(&cache), None);
    assert_eq!(secret(&cache.token().await.unwrap()), "at-2");
    assert_eq!(script.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_accepted_forced_token_ends_the_throttles_escalation() {
    let (_script, cache, first) = warm().await;
    assert!(!first.unconfirmed());
    // Two forced refreshes in a row: the next may come only after 2 s.
    let forced = cache.renew(first.generation).await.unwrap().unwrap().ticket;
    sleep(Duration::from_secs(1)).await;
    let forced = cache
        .renew(forced.generation)
        .await
        .unwrap()
        .unwrap()
        .ticket;
    assert!(forced.unconfirmed());
    let seen = cache.attach(&mut http::HeaderMap::new()).unwrap();
    assert_eq!(seen, forced, "requests carry the unconfirmed mark");
    sleep(Duration::from_secs(1)).await;
    assert!(cache.renew(forced.generation).await.unwrap().is_none());
    // A 200 to the forced token: the next 401 waits the minimum again.
    assert!(forced.settle(StatusCode::OK, false).is_none());
    let next = cache.attach(&mut http::HeaderMap::new()).unwrap();
    assert!(!next.unconfirmed());
    let renewed = cache.renew(forced.generation).await.unwrap().unwrap();
    assert_eq!(secret(&renewed), "at-4");
    // A renewal alone replays nothing: the replay is counted when it is sent.
    assert_eq!(cache.stats().replays, 0);
    let mut ticket = renewed.ticket;
    assert!(ticket.replaying(&mut http::HeaderMap::new()).is_ok());
    assert_eq!(ticket, renewed.ticket, "the renewed token is the newest");
    assert_eq!(cache.stats().replays, 1);
}

/// A late answer to a forced token that a newer one has replaced: the
/// unconfirmed mark and the escalation are the newer token's, whether a 401
/// forced it (it stays unconfirmed) or not (there is nothing to confirm).
#[tokio::test(start_paused = true)]
async fn a_late_answer_to_a_replaced_forced_token_confirms_nothing() {
    let (_script, cache, first) = warm().await;
    // Forced at 0 s and 1 s: the next forced refresh may come at 3 s.
    let forced = cache.renew(first.generation).await.unwrap().unwrap().ticket;
    sleep(Duration::from_secs(1)).await;
    let newer = cache.renew(forced.generation).await.unwrap().unwrap();
    let newer = newer.ticket;
    assert!(forced.unconfirmed() && newer.unconfirmed());
    assert!(forced.settle(StatusCode::OK, false).is_none());
    let seen = cache.attach(&mut http::HeaderMap::new()).unwrap();
    assert_eq!(seen, newer, "the newer forced token was confirmed");
    // A refresh no 401 forced replaces the newer forced token.
    cache.credentials_replaced();
    sleep(Duration::from_millis(1)).await;
    let fresh = cache.attach(&mut http::HeaderMap::new()).unwrap();
    assert_eq!(fresh.generation, newer.generation + 1);
    assert!(!fresh.unconfirmed());
    assert!(newer.settle(StatusCode::OK, false).is_none());
    // The escalation stands: a 401 at 2 s is throttled, one at 3 s is not.
    sleep(Duration::from_millis(999)).await;
    let throttled = cache.renew(fresh.generation).await.unwrap();
    assert!(throttled.is_none(), "the escalation was ended");
    sleep(Duration::from_secs(1)).await;
    assert!(cache.renew(fresh.generation).await.unwrap().is_some());
}

/// The header a request would carry now, as sent.
fn attached(cache: &TokenCache) -> HeaderValue {
    let mut headers = http::HeaderMap::new();
    cache.attach(&mut headers).expect("a token");
    headers
        .remove(http::header::AUTHORIZATION)
        .expect("a header")
}

fn address(header: &HeaderValue) -> usize {
    header.as_bytes().as_ptr() as usize
}

#[tokio::test]
async fn requests_clone_their_threads_copy_of_the_current_header() {
    let (_script, cache, ticket) = warm().await;
    let token = cache.shared.current.load().token.clone().unwrap();
    let first = attached(&cache);
    assert_eq!(first, "Bearer at-1");
    assert!(first.is_sensitive());
    assert_eq!(address(&first), address(token.header()));
    assert_eq!(address(&attached(&cache)), address(&first));

    cache.renew(ticket.generation).await.unwrap().unwrap();
    assert_eq!(attached(&cache), "Bearer at-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_always_send_the_header_of_their_tickets_token() {
    const READERS: usize = 200;
    let script = Script::new(HOUR);
    // No throttle: every renewal below forces a refresh.
    let unthrottled = Settings {
        backoff_min: Duration::ZERO,
        ..settings()
    };
    let cache = TokenCache::new(script.clone(), unthrottled);
    cache.token().await.unwrap();
    let started = Arc::new(tokio::sync::Barrier::new(READERS + 1));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (cache, started) = (cache.clone(), started.clone());
            tokio::spawn(async move {
                let mut attached = 0;
                for i in 0..100 {
                    let mut headers = http::HeaderMap::new();
                    if let Some(ticket) = cache.attach(&mut headers) {
                        // `at-N` is the N-th token, and the N-th generation.
                        let expected = format!("Bearer at-{}", ticket.generation);
                        assert_eq!(headers[http::header::AUTHORIZATION], expected.as_str());
                        attached += 1;
                    }
                    if i == 0 {
                        started.wait().await;
                    }
                    tokio::task::yield_now().await;
                }
                attached
            })
        })
        .collect();
    started.wait().await;
    let mut generation = 1;
    for _ in 0..20 {
        generation = renewed(&cache, generation).await;
    }
    let mut attached = 0;
    for reader in readers {
        attached += reader.await.unwrap();
    }
    // Each reader attached at least its first header, before any renewal.
    assert!(attached >= READERS, "{attached}");
    assert_eq!((generation, script.count()), (21, 21));
}

// ---------------------------------------------------------------------------------------------
// Hostile /oauth answers and long uptimes
// ---------------------------------------------------------------------------------------------

/// Answers every grant with a fixed raw body (parsed as the client would),
/// counting calls by grant.
struct Raw {
    password: Mutex<usize>,
    refresh: Mutex<usize>,
    password_body: &'static str,
    refresh_body: &'static str,
    refresh_status: StatusCode,
}

impl TokenSource for Arc<Raw> {
    fn fetch<'a>(&'a self, grant: &'a Grant) -> Fetched<'a> {
        uncaused(async move {
            let (status, body) = match grant {
                Grant::Password => {
                    *self.password.lock().unwrap() += 1;
                    (StatusCode::OK, self.password_body)
                }
                Grant::Refresh(_) => {
                    *self.refresh.lock().unwrap() += 1;
                    (self.refresh_status, self.refresh_body)
                }
            };
            crate::oauth::parse(grant.kind(), status, body.as_bytes(), &[])
        })
    }
}

fn raw(
    password_body: &'static str,
    refresh_status: StatusCode,
    refresh_body: &'static str,
) -> Arc<Raw> {
    Arc::new(Raw {
        password: Mutex::new(0),
        refresh: Mutex::new(0),
        password_body,
        refresh_body,
        refresh_status,
    })
}

impl Raw {
    fn calls(&self) -> usize {
        *self.password.lock().unwrap() + *self.refresh.lock().unwrap()
    }
}

/// A positive `expires_in` below a second (1e-300 parses to a zero
/// lifetime) must not put the cache into a loop: before the fix, the token
/// was expired on arrival, the waiter woke, saw it expired and started the
/// next refresh, forever: `token()` never returned and /oauth was called in a
/// tight loop. Now such an answer is an `InvalidResponse` and backs off.
#[tokio::test(start_paused = true)]
async fn a_zero_lifetime_does_not_loop_on_oauth() {
    let body =
        r#"{"access_token":"a","token_type":"Bearer","expires_in":1e-300,"refresh_token":"r"}"#;
    let source = raw(body, StatusCode::OK, body);
    let cache = TokenCache::new(source.clone(), settings());
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.token().await }
    });
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(source.calls(), 1, "/oauth calls while one caller waits");
    let result = tokio::time::timeout(Duration::from_secs(1), waiter).await;
    match result {
        Ok(Ok(Err(Error::InvalidResponse { reason, .. }))) => {
            assert_eq!(reason, "expires_in is less than a second")
        }
        other => panic!("{other:?}"),
    }
    // Within the backoff: no further call.
    assert!(cache.token().await.is_err());
    assert_eq!(source.calls(), 1);
}

/// A refresh grant answered `200` with an OAuth2 error body (some gateways
/// do) must not be retried forever with the same dead refresh token: it is a
/// rejection, and the same flight falls back to one password grant.
#[tokio::test(start_paused = true)]
async fn a_200_with_an_error_body_on_refresh_falls_back_to_password() {
    let source = raw(
        r#"{"access_token":"a","token_type":"Bearer","expires_in":3600,"refresh_token":"r"}"#,
        StatusCode::OK,
        r#"{"error":"invalid_grant","error_description":"Refresh token is expired"}"#,
    );
    let cache = TokenCache::new(source.clone(), settings());
    cache.token().await.unwrap();
    // Past the expiry margin: the caller waits for the refresh.
    sleep(HOUR - Duration::from_secs(10)).await;
    let lease = cache.token().await;
    assert!(lease.is_ok(), "{lease:?}");
    assert_eq!(*source.refresh.lock().unwrap(), 1);
    assert_eq!(*source.password.lock().unwrap(), 2);
}

/// The same in Volt's numeric error shapes: a refused refresh token answered
/// `200` with `{"code":401,…}` is not presented again after every backoff.
#[tokio::test(start_paused = true)]
async fn a_200_with_a_numeric_error_body_on_refresh_falls_back_to_password() {
    for refresh_body in [
        r#"{"code":401,"message":"Invalid refresh token"}"#,
        r#"{"exception":{"code":400,"message":"Validation exception","errorList":[]}}"#,
    ] {
        let source = raw(
            r#"{"access_token":"a","token_type":"Bearer","expires_in":3600,"refresh_token":"r"}"#,
            StatusCode::OK,
            refresh_body,
        );
        let cache = TokenCache::new(source.clone(), settings());
        cache.token().await.unwrap();
        sleep(HOUR - Duration::from_secs(10)).await;
        let lease = cache.token().await;
        assert!(lease.is_ok(), "{refresh_body}: {lease:?}");
        assert_eq!(*source.refresh.lock().unwrap(), 1, "{refresh_body}");
        assert_eq!(*source.password.lock().unwrap(), 2, "{refresh_body}");
    }
}

/// A week of a failing endpoint with no token, then recovery: no overflow in
/// the backoff, attempts spaced by the capped backoff, and after a success
/// the backoff starts again from the minimum.
#[tokio::test(start_paused = true)]
async fn a_week_of_failures_then_recovery_resets_the_backoff() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    let minutes = 7 * 24 * 60;
    for _ in 0..minutes + 10 {
        script.fail_next(server_error(GrantType::Password));
    }
    for _ in 0..minutes {
        assert!(matches!(cache.token().await, Err(Error::Failed { .. })));
        sleep(Duration::from_secs(60)).await;
    }
    // Each minute at most one attempt (the cap is 60 s), at least one per 2 min... after warmup.
    let attempts = script.count();
    assert!(attempts <= minutes + 10, "{attempts}");
    assert!(attempts >= minutes - 10, "{attempts}");
    script.failures.lock().unwrap().clear();
    sleep(Duration::from_secs(60)).await;
    cache.token().await.unwrap();
    let flight = cache.shared.lock();
    assert_eq!(flight.failures, 0);
    assert_eq!(flight.retry_at, None);
}

/// A 429 or 503 whose server asked to wait `retry_after`.
fn throttled(retry_after: Duration) -> Error {
    Error::Failed {
        grant: GrantType::RefreshToken,
        response: ErrorResponse {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: None,
            message: None,
            retry_after: Some(retry_after),
        },
    }
}

/// The wait after a failure is the longer of the jittered backoff (no later
/// than the token's expiry while it serves) and the server's `Retry-After`,
/// which is capped at the backoff maximum.
#[test]
fn the_backoff_waits_for_retry_after_up_to_its_maximum() {
    let settings = settings(); // 1 s doubling to 60 s
    let secs = Duration::from_secs;
    for _ in 0..100 {
        // Longer than the first backoff (at most 1 s): the server's wait.
        assert_eq!(settings.backoff(1, &throttled(secs(30)), None), secs(30));
        assert_eq!(settings.backoff(1, &throttled(secs(60)), None), secs(60));
        // Longer than the maximum: the maximum.
        assert_eq!(settings.backoff(1, &throttled(secs(61)), None), secs(60));
        assert_eq!(
            settings.backoff(1, &throttled(Duration::MAX), None),
            secs(60)
        );
        // Shorter than the backoff (the 7th: 60 s, jittered to 30–60 s): the backoff.
        let backoff = settings.backoff(7, &throttled(secs(2)), None);
        assert!((secs(30)..=secs(60)).contains(&backoff), "{backoff:?}");
        // No hint: the backoff alone.
        let backoff = settings.backoff(1, &server_error(GrantType::Password), None);
        assert!((Duration::from_millis(500)..=secs(1)).contains(&backoff));
        // A token served for 10 s more: no later than its expiry, unless the
        // server asked for longer.
        let serving = Some(secs(10));
        let down = server_error(GrantType::Password);
        assert_eq!(settings.backoff(7, &down, serving), secs(10));
        assert_eq!(settings.backoff(7, &throttled(secs(2)), serving), secs(10));
        assert_eq!(settings.backoff(7, &throttled(secs(30)), serving), secs(30));
        let backoff = settings.backoff(1, &down, serving);
        assert!((Duration::from_millis(500)..=secs(1)).contains(&backoff));
    }
}

/// Any positive minimum doubles up to any maximum (the doubling used to stop
/// after 20 steps), and a zero minimum cannot spin.
#[test]
fn backoff_doubling_reaches_the_cap_from_any_minimum() {
    let day = Duration::from_secs(24 * 60 * 60);
    assert_eq!(doubled(Duration::from_nanos(1), u32::MAX, day), day);
    assert_eq!(
        doubled(Duration::from_micros(1), 40, Duration::from_secs(60)),
        Duration::from_secs(60)
    );
    assert_eq!(
        doubled(Duration::from_secs(1), 0, day),
        Duration::from_secs(1)
    );
    assert_eq!(
        doubled(Duration::from_secs(1), 3, day),
        Duration::from_secs(8)
    );
    assert_eq!(doubled(Duration::ZERO, u32::MAX, day), Duration::ZERO);
}

/// Caches made, used and dropped by many tasks on many threads while tickets
/// of caches being dropped settle 401s: no deadlock under the registry lock,
/// and every dropped cache leaves the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn the_registry_shrinks_as_caches_come_and_go_under_concurrency() {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        tasks.spawn(async {
            let mut ids = Vec::new();
            for _ in 0..50 {
                let script = Script::new(HOUR);
                let cache = script.cache();
                let id = cache.shared.id;
                let ticket = cache.token().await.unwrap().ticket;
                assert!(ticket::registered(id));
                // A replayable 401 hands the cache back; dropping that handle
                // after the cache itself makes it the last reference.
                let found = ticket.settle(StatusCode::UNAUTHORIZED, true).unwrap();
                drop(cache);
                tokio::task::yield_now().await;
                drop(found);
                assert!(!ticket::registered(id));
                assert!(ticket.settle(StatusCode::UNAUTHORIZED, false).is_none());
                ids.push(id);
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = tasks.join_next().await {
        ids.extend(done.unwrap());
    }
    assert_eq!(ids.len(), 64 * 50);
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 64 * 50, "ids are never reused");
    assert!(ids.iter().all(|&id| !ticket::registered(id)));
}

#[tokio::test(start_paused = true)]
async fn stats_tell_a_failing_endpoint_while_the_token_still_serves() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    let healthy = cache.stats();
    assert_eq!((healthy.failures, healthy.retry_in), (0, None));
    assert!(healthy.last_error.is_none());

    // Stale (the refresh-ahead window is at most 6 minutes), not expired: the
    // background refresh fails and the token keeps serving.
    sleep(HOUR - Duration::from_secs(200)).await;
    script.fail_next(server_error(GrantType::RefreshToken));
    assert_eq!(secret(&cache.token().await.unwrap()), "at-1");
    sleep(Duration::from_millis(1)).await; // the background refresh runs and fails
    assert_eq!(script.count(), 2);
    let degraded = cache.stats();
    assert_eq!(degraded.failures, 1);
    assert!(
        degraded
            .remaining
            .is_some_and(|left| left > Duration::from_secs(190))
    );
    // The first backoff: 1 s, jittered down to half at most.
    let wait = degraded.retry_in.unwrap();
    assert!(
        wait >= Duration::from_millis(499) && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    assert!(matches!(
        degraded.last_error,
        Some(Error::Failed {
            grant: GrantType::RefreshToken,
            ..
        })
    ));

    // Once the backoff is over, nothing holds off the next attempt; the
    // failure stays on record until a refresh succeeds.
    sleep(Duration::from_secs(1)).await;
    let waiting = cache.stats();
    assert_eq!((waiting.failures, waiting.retry_in), (1, None));
    assert!(waiting.last_error.is_some());

    // A second failure in a row doubles the backoff.
    script.fail_next(server_error(GrantType::RefreshToken));
    cache.token().await.unwrap();
    sleep(Duration::from_millis(1)).await;
    assert_eq!(script.count(), 3);
    let twice = cache.stats();
    assert_eq!(twice.failures, 2);
    let wait = twice.retry_in.unwrap();
    assert!(
        wait >= Duration::from_millis(999) && wait <= Duration::from_secs(2),
        "{wait:?}"
    );

    // A refresh that succeeds clears it all.
    sleep(Duration::from_secs(2)).await;
    cache.token().await.unwrap();
    sleep(Duration::from_millis(1)).await;
    assert_eq!(script.count(), 4);
    let recovered = cache.stats();
    assert_eq!((recovered.failures, recovered.retry_in), (0, None));
    assert!(recovered.last_error.is_none());
    assert!(
        recovered
            .remaining
            .is_some_and(|left| left > HOUR - Duration::from_secs(31))
    );
}

/// A refresh that fails while the token still serves is retried no later than
/// the token's expiry: when `/oauth` is back by then, no request fails; when it
/// is not, that one attempt fails and the backoff goes on as before.
#[tokio::test(start_paused = true)]
async fn the_backoff_ends_by_the_expiry_of_the_token_it_keeps() {
    let secs = Duration::from_secs;
    for back_by_expiry in [true, false] {
        let script = Script::new(HOUR);
        // 100 s, jittered to 50–100 s: always past the expiry below.
        let cache = TokenCache::new(
            script.clone(),
            Settings {
                backoff_min: secs(100),
                backoff_max: secs(100),
                ..settings()
            },
        );
        cache.token().await.unwrap();
        // Stale, 30 s before the token stops being served (expiry minus the
        // 30 s margin, at 3570 s): the background refresh fails.
        sleep(secs(3540)).await;
        script.fail_next(server_error(GrantType::RefreshToken));
        if !back_by_expiry {
            script.fail_next(server_error(GrantType::RefreshToken));
        }
        assert_eq!(secret(&cache.token().await.unwrap()), "at-1");
        sleep(Duration::from_millis(1)).await;
        assert_eq!(script.count(), 2);
        assert_eq!(
            cache.stats().retry_in,
            Some(secs(30) - Duration::from_millis(1))
        );

        // Just past the expiry, the next caller starts the next attempt.
        sleep(secs(30)).await;
        let outcome = cache.token().await;
        assert_eq!(script.count(), 3);
        if back_by_expiry {
            assert_eq!(secret(&outcome.unwrap()), "at-3");
        } else {
            assert!(matches!(outcome, Err(Error::Failed { .. })));
            // The token has expired: the ordinary backoff, 50–100 s.
            let wait = cache.stats().retry_in.unwrap();
            assert!((secs(50)..=secs(100)).contains(&wait), "{wait:?}");
            assert!(cache.token().await.is_err());
            assert_eq!(script.count(), 3);
        }
    }
}

/// Reports, for every `volt_auth` event, whether the token cache's lock was
/// held when it was emitted, and reads the stats there as a health-check layer
/// would (when reading them cannot deadlock).
struct LockProbe {
    cache: TokenCache,
    seen: Arc<Mutex<Vec<(String, bool)>>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LockProbe {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if !event.metadata().target().starts_with("volt_auth") {
            return;
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let free = self.cache.shared.flight.try_lock().is_ok();
        if free {
            let _ = self.cache.stats();
        }
        self.seen.lock().unwrap().push((message.0, free));
    }
}

/// No event is logged while the cache's lock is held: a subscriber that reads
/// `stats()` (which takes that lock) when it sees a failed refresh, a 401
/// or a token timed again would otherwise deadlock every request.
#[test]
fn no_event_is_logged_under_the_caches_lock() {
    use tracing_subscriber::layer::SubscriberExt;
    let script = Script::new(HOUR);
    let cache = script.cache();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let probe = LockProbe {
        cache: cache.clone(),
        seen: seen.clone(),
    };
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(probe));
    // Tests on other threads, without a subscriber, may have cached the
    // callsites' interest as "never" while this one was being set.
    let interest = tracing::callsite::rebuild_interest_cache;

    paused_runtime().block_on(async {
        let first = cache.token().await.unwrap().ticket.generation;
        // A background refresh that fails: its backoff is logged.
        sleep(HOUR - Duration::from_secs(200)).await;
        script.fail_next(server_error(GrantType::RefreshToken));
        interest();
        cache.token().await.unwrap();
        sleep(Duration::from_millis(1)).await;
        // Past the backoff, a 401 invalidates the token.
        sleep(Duration::from_secs(2)).await;
        interest();
        cache.invalidate(first);
        cache.token().await.unwrap();
    });
    // On another runtime, the token (its timer gone) is timed again.
    interest();
    paused_runtime().block_on(async { cache.token().await.unwrap() });

    let seen = seen.lock().unwrap().clone();
    for expected in [
        "token refresh failed; backing off",
        "a 401 invalidated the token",
        "timing the token again",
    ] {
        assert!(
            seen.iter().any(|(message, _)| message == expected),
            "{expected:?} not logged: {seen:?}"
        );
    }
    let locked: Vec<_> = seen.iter().filter(|(_, free)| !free).collect();
    assert!(locked.is_empty(), "logged under the lock: {locked:?}");
}

/// A token whose phase timer lags behind the clock (a paused clock just
/// advanced, before the timer's task ran) is neither handed out past its
/// expiry margin nor left without its refresh-ahead by a caller that asks the
/// cache, which reads the clock anyway.
#[tokio::test(start_paused = true)]
async fn a_caller_that_asks_the_cache_does_not_trust_a_lagging_timer() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    // `advance` yields once, and this task runs again before the timer's.
    tokio::time::advance(HOUR - Duration::from_secs(200)).await;
    let stale = cache.token().await.unwrap();
    assert_eq!(
        secret(&stale),
        "at-1",
        "still served, inside the refresh-ahead window"
    );
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 2, "the refresh-ahead started");
    sleep(Duration::from_millis(1)).await;
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));

    // Past the new token's margin, before its timer runs: never handed out.
    tokio::time::advance(HOUR - Duration::from_secs(10)).await;
    let lease = cache.token().await.unwrap();
    assert_eq!(secret(&lease), "at-3");
    assert!(lease.token.expires_at() > Instant::now() + Duration::from_secs(30));
    assert_eq!(script.count(), 3);
}

/// The token's timer runs on the runtime that fetched it: a sync worker's
/// `current_thread` runtime, say, that nothing drives between jobs. A caller
/// on another runtime that asks the cache past the token's expiry margin
/// gets a new token, not the one whose timer has not run.
#[test]
fn a_token_timed_on_an_idle_runtime_is_not_handed_out_past_its_margin() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    let worker = paused_runtime();
    worker.block_on(async { cache.token().await.unwrap() });
    let server = paused_runtime();
    server.block_on(async {
        tokio::time::advance(2 * HOUR).await;
        sleep(Duration::from_millis(1)).await; // this runtime's timers run
        let lease = cache.token().await.unwrap();
        assert_eq!(secret(&lease), "at-2");
        assert!(lease.token.expires_at() > Instant::now() + Duration::from_secs(30));
    });
    assert_eq!(script.count(), 2);
    drop(worker);
}

/// A refresh-ahead given up as stranded (on a runtime nothing drives) by a
/// throttled 401's renewal that then keeps the token: the stale token's
/// readers start the next refresh-ahead, as after one dropped with its
/// runtime, rather than none until the token expires.
#[tokio::test(start_paused = true)]
async fn a_stranded_refresh_ahead_given_up_by_a_throttled_401_is_started_again() {
    let secs = Duration::from_secs;
    // Tokens of 60 s: stale from 36–40 s, expired from 54 s. One forced
    // refresh throttles the next for 60 s.
    let script = Script::new(secs(60));
    let cache = TokenCache::new(
        script.clone(),
        Settings {
            backoff_min: secs(60),
            backoff_max: secs(60),
            ..settings()
        },
    );
    let first = cache.token().await.unwrap().ticket.generation;
    let forced = renewed(&cache, first).await;
    assert_eq!(script.count(), 2);

    // Stale: a read starts the refresh-ahead, which hangs at /oauth.
    sleep(secs(41)).await;
    script.close();
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 3);
    // A throttled 401 waits for it, gives it up after 11 s, and keeps the
    // token (still served until 54 s).
    let waited = Instant::now();
    assert!(cache.renew(forced).await.unwrap().is_none());
    assert_eq!(waited.elapsed(), secs(11));

    // The next stale read starts another refresh-ahead.
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 4, "a refresh-ahead after the stranded one");
    script.open();
    sleep(Duration::from_millis(1)).await;
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-4"));
}

// Replaced credentials (`VoltAuthLayer::set_credentials`).

#[tokio::test(start_paused = true)]
async fn replaced_credentials_start_one_password_grant_while_the_token_serves() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    script.close();
    cache.credentials_replaced();
    // Held at /oauth: requests go on with the current token, at once.
    let now = Instant::now();
    for _ in 0..100 {
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
        assert_eq!(secret(&cache.token().await.unwrap()), "at-1");
    }
    assert_eq!(Instant::now(), now, "nothing waited");
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 2, "exactly one refresh");
    script.open();
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
    // A password grant, although rt-1 was at hand; then refreshes as usual.
    assert_eq!(
        script.calls(),
        [(GrantType::Password, None), (GrantType::Password, None)]
    );
    sleep(HOUR - Duration::from_secs(250)).await;
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
    sleep(Duration::from_millis(1)).await;
    assert_eq!(
        script.calls()[2..],
        [(GrantType::RefreshToken, Some("rt-2".into()))]
    );
    assert_eq!(script.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn replaced_credentials_end_the_backoff_the_old_ones_earned() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    script.fail_next(rejected(GrantType::Password, "invalid_grant"));
    assert!(cache.token().await.unwrap_err().is_rejected());
    assert!(cache.stats().retry_in.is_some());
    // During the backoff: the error at once, no call.
    assert!(cache.token().await.unwrap_err().is_rejected());
    assert_eq!(script.count(), 1);

    let now = Instant::now();
    cache.credentials_replaced();
    assert_eq!(secret(&cache.token().await.unwrap()), "at-2");
    assert_eq!(Instant::now(), now, "the backoff was not waited out");
    let stats = cache.stats();
    assert_eq!((stats.failures, stats.retry_in), (0, None));
    assert!(stats.last_error.is_none());
    assert_eq!(
        script.calls(),
        [(GrantType::Password, None), (GrantType::Password, None)]
    );
    // Each replacement costs one refresh at most: with new credentials
    // refused too, the backoff holds again.
    script.fail_next(rejected(GrantType::Password, "invalid_grant"));
    cache.credentials_replaced();
    sleep(Duration::from_millis(1)).await;
    assert_eq!(script.count(), 3);
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
    for _ in 0..10 {
        assert_eq!(secret(&cache.token().await.unwrap()), "at-2");
    }
    assert_eq!(script.count(), 3);
    assert!(cache.stats().retry_in.is_some());
}

/// A cache whose token is in its refresh-ahead window, and that refresh's
/// grant (the second call) held at /oauth, the script closed.
async fn held_refresh_ahead() -> (Arc<Script>, TokenCache) {
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    sleep(HOUR - Duration::from_secs(250)).await;
    script.close();
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 2);
    (script, cache)
}

#[tokio::test(start_paused = true)]
async fn replaced_credentials_during_a_refresh_wait_for_it_then_start_one() {
    let (script, cache) = held_refresh_ahead().await;
    cache.credentials_replaced();
    cache.credentials_replaced();
    sleep(Duration::from_millis(1)).await;
    assert_eq!(script.count(), 2, "never two refreshes at once");
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    script.open();
    sleep(Duration::from_millis(1)).await;
    // The running refresh's token is used; one password grant follows,
    // although rt-2 is at hand, and nothing more.
    assert_eq!(
        script.calls(),
        [
            (GrantType::Password, None),
            (GrantType::RefreshToken, Some("rt-1".into())),
            (GrantType::Password, None),
        ]
    );
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-3"));
    sleep(Duration::from_secs(60)).await;
    assert_eq!(script.count(), 3);
}

/// Credentials replaced while a refresh runs that has not sent its password
/// grant yet (its refresh token is then refused, or it has not started):
/// that grant reads the new credentials, so none follows it.
#[tokio::test(start_paused = true)]
async fn replaced_credentials_cost_no_grant_after_one_that_sent_them() {
    let ms = Duration::from_millis;
    let password = (GrantType::Password, None);
    // The refresh-ahead's refresh grant, held at /oauth, is refused.
    let (script, cache) = held_refresh_ahead().await;
    cache.credentials_replaced();
    script.fail_next(rejected(GrantType::RefreshToken, "invalid_grant"));
    script.open();
    sleep(ms(1)).await; // idle barrier (paused clock)
    let refresh = (GrantType::RefreshToken, Some("rt-1".into()));
    assert_eq!(
        script.calls(),
        [password.clone(), refresh, password.clone()]
    );
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-3"));
    // A refresh forced by a 401, replaced before it ran.
    let script = Script::new(HOUR);
    let cache = script.cache();
    let first = cache.token().await.unwrap().ticket.generation;
    cache.invalidate(first);
    cache.credentials_replaced();
    sleep(ms(1)).await;
    assert_eq!(script.calls(), [password.clone(), password.clone()]);
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-2"));
}

/// Replacing the credentials ends the backoff for the one password grant it
/// starts, not the escalation ordinary failures earned: during an outage
/// (503s), the failures after it keep backing off as long as before, so that
/// a rotation costs one `/oauth` call, not a new climb from `backoff_min`.
#[tokio::test(start_paused = true)]
async fn replaced_credentials_during_an_outage_cost_one_call() {
    let secs = Duration::from_secs;
    let script = Script::new(HOUR);
    let cache = script.cache();
    for _ in 0..100 {
        script.fail_next(server_error(GrantType::Password));
    }
    // Seven failures in a row: the backoff is at its cap (30 to 60 s).
    for n in 1..=7 {
        assert!(cache.token().await.is_err());
        assert_eq!(script.count(), n);
        if n < 7 {
            sleep(secs(61)).await;
        }
    }
    cache.credentials_replaced();
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(script.count(), 8, "the password grant, at once");
    // It fails too: still the capped backoff, not one from 1 s.
    for _ in 0..290 {
        assert!(cache.token().await.is_err());
        sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(script.count(), 8, "no call within 29 s of the last failure");
    assert_eq!(cache.stats().failures, 8);
}

/// New credentials end the backoff the old ones earned, but not a
/// `Retry-After` the server asked for on `/oauth` (a 429 or 503): their
/// password grant starts when it ends, by itself, the token held serving
/// meanwhile; whether the credentials were replaced during that backoff or
/// while the refresh that was throttled ran.
#[tokio::test(start_paused = true)]
async fn replaced_credentials_wait_out_the_servers_retry_after() {
    let secs = Duration::from_secs;
    let ms = Duration::from_millis;
    for during_the_refresh in [false, true] {
        let script = Script::new(HOUR);
        let cache = script.cache();
        cache.token().await.unwrap();
        // Stale: the refresh-ahead is answered 429, Retry-After 30 s.
        sleep(HOUR - secs(250)).await;
        script.fail_next(throttled(secs(30)));
        if during_the_refresh {
            script.close();
        }
        let throttled_at = Instant::now();
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
        tokio::task::yield_now().await;
        assert_eq!(script.count(), 2);
        if during_the_refresh {
            cache.credentials_replaced();
            script.open();
        }
        sleep(ms(1)).await; // idle barrier (paused clock)
        if !during_the_refresh {
            cache.credentials_replaced();
            sleep(ms(1)).await;
        }
        let what = format!("replaced during the refresh: {during_the_refresh}");
        assert_eq!(script.count(), 2, "a call within the Retry-After; {what}");
        let left = cache.stats().retry_in;
        assert_eq!(
            left,
            Some(throttled_at + secs(30) - Instant::now()),
            "{what}"
        );
        sleep_until(throttled_at + secs(30) - ms(1)).await;
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"), "{what}");
        assert!(cache.token().await.is_ok(), "{what}");
        assert_eq!(script.count(), 2, "{what}");
        // Its end starts the password grant, without a request.
        sleep(ms(2)).await;
        assert_eq!(script.count(), 3, "{what}");
        assert_eq!(script.calls()[2], (GrantType::Password, None), "{what}");
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-3"), "{what}");
        sleep(HOUR / 2).await;
        assert_eq!(script.count(), 3, "{what}");
    }
}

/// The refresh running when the credentials were replaced fails with a long
/// backoff, and the password grant that follows it is given up (stranded).
/// The old credentials' backoff must not hold back the next grant with the
/// new ones: as when no refresh ran, the next caller starts it at once.
#[tokio::test(start_paused = true)]
async fn replaced_credentials_during_a_refresh_end_the_old_backoff_too() {
    /// Calls made; the first is held until the gate opens, then refused.
    struct Hang(Mutex<usize>, watch::Sender<bool>);
    impl TokenSource for Arc<Hang> {
        fn fetch<'a>(&'a self, _: &'a Grant) -> Fetched<'a> {
            uncaused(async move {
                let n = {
                    let mut calls = self.0.lock().unwrap();
                    *calls += 1;
                    *calls
                };
                if n == 1 {
                    let _ = self.1.subscribe().wait_for(|open| *open).await;
                    return Err(rejected(GrantType::Password, "invalid_grant"));
                }
                std::future::pending().await
            })
        }
    }
    let source = Arc::new(Hang(Mutex::new(0), watch::Sender::new(false)));
    let calls = || *source.0.lock().unwrap();
    let cache = TokenCache::new(source.clone(), settings());
    // Refresh 1 is at /oauth when the credentials are replaced.
    let mut first = Box::pin(cache.token());
    std::future::poll_fn(|cx| {
        assert!(first.as_mut().poll(cx).is_pending());
        Poll::Ready(())
    })
    .await;
    tokio::task::yield_now().await;
    assert_eq!(calls(), 1);
    cache.credentials_replaced();
    source.1.send_replace(true);
    // It is refused (a backoff of 30 to 60 s); the password grant follows at
    // once.
    assert!(first.await.is_err());
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(calls(), 2);
    assert_eq!(cache.stats().retry_in, None, "no backoff holds it back");
    // It hangs: a waiter gives it up after 11 s and starts the next one.
    let waited = timeout(Duration::from_secs(12), cache.token()).await;
    assert!(waited.is_err(), "waiting for the next grant: {waited:?}");
    assert_eq!(calls(), 3);
}

/// A refresh given up on (stranded on a runtime nothing drives) whose refresh
/// grant is refused when its runtime runs again must not undo a later
/// refusal: here the credentials were replaced meanwhile (the token in use
/// belongs to the old credentials' session) and the password grant that
/// followed failed. The next refresh must still be a password grant, never
/// the refresh token of the old session.
#[test]
fn a_stranded_refresh_refused_late_does_not_undo_a_newer_refusal() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    // A sync worker's runtime: the first token, then a 401 forces a
    // refresh there that presents rt-1 and is held at /oauth; the runtime
    // is then left undriven.
    let idle = paused_runtime();
    idle.block_on(async {
        assert_eq!(secret(&cache.token().await.unwrap()), "at-1");
        script.close();
        cache.invalidate(1);
        for _ in 0..1000 {
            if script.count() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
    });
    assert_eq!(
        script.calls()[1],
        (GrantType::RefreshToken, Some("rt-1".into()))
    );

    // The server runtime gives it up after 11 s and authenticates again.
    let server = paused_runtime();
    script.open();
    server.block_on(async {
        assert_eq!(secret(&cache.token().await.unwrap()), "at-3");
    });
    assert_eq!(script.calls()[2], (GrantType::Password, None));

    // The credentials are replaced; the password grant with the new ones
    // fails (an outage), so the token at hand (of the old session) serves on.
    script.fail_next(server_error(GrantType::Password));
    server.block_on(async {
        cache.credentials_replaced();
        sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    });
    assert_eq!(script.calls()[3], (GrantType::Password, None));

    // The worker's runtime runs again: the stranded refresh is refused.
    script.fail_next(rejected(GrantType::RefreshToken, "invalid_grant"));
    idle.block_on(async {
        for _ in 0..1000 {
            if script.failures_left() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    });
    assert_eq!(
        script.failures_left(),
        0,
        "the stranded refresh is answered"
    );
    assert_eq!(script.count(), 4, "the stranded refresh sends nothing more");

    // The next refresh (the refresh-ahead of at-3) authenticates with the
    // new credentials, not with rt-3 of the old session.
    server.block_on(async {
        sleep(HOUR - Duration::from_secs(250)).await;
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-3"));
        sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    });
    assert_eq!(script.count(), 5);
    assert_eq!(script.calls()[4], (GrantType::Password, None));
}

/// A backoff's rearm task replaced while it still sleeps (the credentials
/// were replaced during a backoff, and the new ones' grant failed too) must
/// not let stale reads in: its drop used to set `may_kick`, so every stale
/// read until the new backoff ended took the lock and spawned a rearm task
/// whose predecessor's drop let the next read in again.
#[tokio::test(start_paused = true)]
async fn a_replaced_backoff_keeps_stale_reads_on_the_hot_path() {
    let secs = Duration::from_secs;
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    // Stale: the refresh-ahead's refresh token and password are refused (a
    // backoff of 30 to 60 s).
    sleep(HOUR - secs(250)).await;
    script.fail_next(rejected(GrantType::RefreshToken, "invalid_grant"));
    script.fail_next(rejected(GrantType::Password, "invalid_grant"));
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(script.count(), 3);
    // New credentials: their grant, at once, is throttled for 30 s.
    script.fail_next(throttled(secs(30)));
    cache.credentials_replaced();
    sleep(Duration::from_millis(1)).await;
    assert_eq!(script.count(), 4);
    for _ in 0..100 {
        assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
        sleep(Duration::from_millis(10)).await;
        assert!(
            !cache.shared.may_kick.load(Ordering::Acquire),
            "a stale read during the backoff may start the slow path"
        );
    }
    assert_eq!(script.count(), 4);
    // The backoff's end lets the next stale read start one refresh.
    sleep(secs(30)).await;
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    sleep(Duration::from_millis(1)).await;
    assert_eq!(script.count(), 5);
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-5"));
}

/// A token whose timer went with its runtime is served by the clock: a
/// replay (`Ticket::replaying`) outside any runtime, where the token cannot
/// be timed again, goes with it, as `token()` hands it out there. It used to
/// be refused as if its successor were on its way; a response future polled
/// on a plain thread then waited for `token()`, was handed the same token,
/// asked again, and spun in one poll forever.
#[test]
fn a_replay_goes_with_a_valid_token_whose_timer_is_gone() {
    let script = Script::new(HOUR);
    let cache = script.cache();
    let gone = paused_runtime();
    let ticket = gone.block_on(async { cache.token().await.unwrap().ticket });
    drop(gone);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let Poll::Ready(Ok(lease)) = std::pin::pin!(cache.token()).poll(&mut cx) else {
        panic!("the token, by the clock");
    };
    assert_eq!(secret(&lease), "at-1");
    let mut replay = ticket;
    let mut headers = http::HeaderMap::new();
    assert!(replay.replaying(&mut headers).is_ok(), "refused");
    assert_eq!(headers[http::header::AUTHORIZATION], "Bearer at-1");
    assert_eq!(replay, lease.ticket);
    assert_eq!((cache.stats().replays, script.count()), (1, 1));
}

/// A refresh that has not ended `stranded_after` after it started is taken
/// for stranded as soon as a caller waits for it, not `stranded_after` after
/// that caller began to wait: a refresh-ahead spawned on a runtime nothing
/// drives (a sync worker's, between `block_on` calls) minutes before the
/// token expired held up every request at the expiry for `stranded_after`.
#[tokio::test(start_paused = true)]
async fn a_refresh_stranded_long_ago_holds_up_no_waiter() {
    let secs = Duration::from_secs;
    let script = Script::new(HOUR);
    let cache = script.cache();
    cache.token().await.unwrap();
    // Stale: a read starts the refresh-ahead, which never ends (its
    // runtime is not driven again).
    sleep(HOUR - secs(250)).await;
    script.close();
    assert_eq!(header(&cache).as_deref(), Some("Bearer at-1"));
    tokio::task::yield_now().await;
    assert_eq!(script.count(), 2);
    // Past the margin, minutes after the refresh-ahead started: the first
    // request to wait takes it for stranded at once and starts another.
    sleep(secs(230)).await;
    assert_eq!(header(&cache), None);
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.token().await.map(|lease| secret(&lease).to_owned()) }
    });
    sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
    assert_eq!(
        script.count(),
        3,
        "the waiter started another refresh at once"
    );
    script.open();
    assert_eq!(waiter.await.unwrap().unwrap(), "at-3");
    assert_eq!(script.count(), 3);
}
