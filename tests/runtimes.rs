//! A layer outlives the runtimes it is used on: a runtime that shuts down
//! takes its refresh task and phase timer with it, and the next runtime
//! carries on without a hang and without an expired token.

mod common;

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use tokio::runtime::{Builder, Runtime};
use tokio::time::{Instant, advance, sleep, timeout};
use tower::Layer;
use volt_auth::mock::MockVolt;

use common::{GUARD, banks_ok, bearer};

const HOUR: Duration = Duration::from_secs(3600);
/// Inside the first token's refresh-ahead window (5 minutes, jittered to 6).
const STALE: Duration = Duration::from_secs(3600 - 60);

fn runtime(paused: bool) -> Runtime {
    let mut builder = Builder::new_current_thread();
    builder.enable_all().start_paused(paused);
    builder.build().expect("runtime")
}

/// A cache holding its first token, fetched on a runtime that is then dropped.
fn token_from_a_runtime_now_gone(mock: &MockVolt) -> volt_auth::VoltAuthLayer {
    let auth = common::layer(mock);
    let gone = runtime(false);
    gone.block_on(auth.access_token()).expect("first token");
    drop(gone);
    assert_eq!(mock.oauth_calls(), 1);
    auth
}

/// `auth` hands out a token within the guard.
async fn gets_a_token(auth: &volt_auth::VoltAuthLayer) {
    let token = timeout(GUARD, auth.access_token()).await;
    assert!(matches!(token, Ok(Ok(_))), "{token:?}");
}

/// Runs `rt` until the refresh `auth` starts there is held at /oauth, then
/// releases the hold: the refresh goes on only when `rt` runs again.
fn held_at_oauth(rt: &Runtime, mock: &MockVolt, auth: &volt_auth::VoltAuthLayer) {
    let hold = mock.hold_oauth();
    rt.block_on(async {
        tokio::select! {
            () = hold.wait_for(1) => {}
            token = auth.access_token() => panic!("{token:?}"),
        }
    });
}

/// Yields until `done()`, within the guard; `what` names what was awaited.
async fn until(done: impl Fn() -> bool, what: &str) {
    timeout(GUARD, async {
        while !done() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect(what);
}

/// A cache whose first token is stale on `home`, a paused runtime: fetched,
/// then the clock moved into the refresh-ahead window, where its timer marks
/// it stale.
fn stale_on(home: &Runtime, mock: &MockVolt) -> volt_auth::VoltAuthLayer {
    let auth = common::layer(mock);
    home.block_on(async {
        auth.access_token().await.expect("first token");
        advance(STALE).await;
        sleep(Duration::from_millis(1)).await; // the timer runs
    });
    auth
}

#[test]
fn a_refresh_dropped_before_it_ran_does_not_hold_up_later_callers() {
    let mock = MockVolt::builder().in_process();
    let auth = common::layer(&mock);
    let gone = runtime(false);
    gone.block_on(async {
        // Polled once: the refresh is spawned, and never runs.
        let mut first = std::pin::pin!(auth.access_token());
        std::future::poll_fn(|cx| {
            assert!(first.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
    });
    drop(gone);
    assert_eq!(mock.oauth_calls(), 0);

    let token = runtime(false).block_on(async { timeout(GUARD, auth.access_token()).await });
    assert!(matches!(token, Ok(Ok(_))), "{token:?}");
    assert_eq!((mock.oauth_calls(), mock.password_grants()), (1, 1));
}

#[test]
fn a_token_whose_timer_is_gone_expires_by_the_clock() {
    let mock = MockVolt::builder().in_process();
    let auth = token_from_a_runtime_now_gone(&mock);
    runtime(true).block_on(async {
        assert!(auth.stats().remaining.is_some());
        advance(2 * HOUR).await;
        assert_eq!(auth.stats().remaining, None);
        let token = auth.access_token().await.expect("a new token");
        assert!(token.expires_at() > Instant::now());
        assert_eq!((mock.oauth_calls(), mock.refresh_grants()), (2, 1));
    });
}

#[test]
fn a_request_after_its_tokens_timer_is_gone_carries_a_valid_token() {
    let mock = MockVolt::builder().in_process();
    let auth = token_from_a_runtime_now_gone(&mock);
    let issued = mock.issued_access_tokens();
    runtime(true).block_on(async {
        let mut api = auth.layer(mock.service());
        advance(2 * HOUR).await;
        banks_ok(&mut api, &mock).await;
        // Refreshed before sending: Volt never saw the expired token.
        assert_eq!((mock.oauth_calls(), mock.unauthorized()), (2, 0));
        let latest = mock.issued_access_tokens().pop().expect("a second token");
        assert_ne!(Some(&latest), issued.last());
        assert_eq!(mock.api_authorizations(), [bearer(&latest)]);
    });
}

#[test]
fn a_fresh_token_whose_timer_is_gone_is_timed_again_on_the_next_runtime() {
    let mock = MockVolt::builder().in_process();
    let auth = token_from_a_runtime_now_gone(&mock);
    runtime(true).block_on(async {
        let mut api = auth.layer(mock.service());
        // Still fresh: used as it is, and timed again on this runtime.
        banks_ok(&mut api, &mock).await;
        assert_eq!(mock.oauth_calls(), 1);
        // Past the refresh-ahead point (at most 6 minutes before expiry),
        // the new timer marks it stale and the next request refreshes it in
        // the background.
        advance(STALE).await;
        sleep(Duration::from_millis(1)).await; // the timer runs
        assert_eq!(mock.oauth_calls(), 1);
        banks_ok(&mut api, &mock).await;
        sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
        assert_eq!((mock.oauth_calls(), mock.refresh_grants()), (2, 1));
        assert_eq!(mock.unauthorized(), 0);
    });
}

#[test]
fn a_background_refresh_dropped_with_its_runtime_is_started_again() {
    let mock = MockVolt::builder().in_process();
    let home = runtime(true);
    let auth = stale_on(&home, &mock);
    // Another runtime starts the background refresh and is dropped before
    // running it: the stale token is still handed out there.
    let gone = runtime(false);
    gone.block_on(auth.access_token()).expect("the stale token");
    drop(gone);
    assert_eq!(mock.oauth_calls(), 1);

    home.block_on(async {
        let mut api = auth.layer(mock.service());
        banks_ok(&mut api, &mock).await;
        sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
        assert_eq!((mock.oauth_calls(), mock.refresh_grants()), (2, 1));
        let token = auth.access_token().await.expect("the new token");
        assert!(token.expires_at() > Instant::now() + HOUR - Duration::from_secs(1));
    });
}

fn multi_thread() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls `future` once on this thread, outside any runtime.
fn poll_once<F: Future>(future: F) -> Poll<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    future.as_mut().poll(&mut cx)
}

#[test]
fn a_runtime_dropped_while_its_thread_unwinds_from_an_unrelated_panic_costs_no_backoff() {
    let mock = MockVolt::builder().in_process();
    let auth = common::layer(&mock);
    let hold = mock.hold_oauth();
    let (started, refresh_at_oauth) = std::sync::mpsc::channel();
    let (go, panic_now) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn({
        let auth = auth.clone();
        let hold = mock.hold_oauth();
        move || {
            let rt = runtime(false);
            rt.block_on(async {
                tokio::spawn(async move { auth.access_token().await });
                hold.wait_for(1).await; // this runtime's refresh is at /oauth
                drop(hold);
                started.send(()).expect("send");
                panic_now.recv().expect("recv");
                panic!("an unrelated bug in the worker's own code");
            })
        }
    });
    refresh_at_oauth
        .recv()
        .expect("the worker's refresh started");
    // A server runtime waits for the refresh the worker's runtime runs.
    let server = multi_thread();
    let waiter = server.spawn({
        let auth = auth.clone();
        async move { timeout(GUARD, auth.access_token()).await }
    });
    go.send(()).expect("send");
    assert!(worker.join().is_err(), "the worker panicked");
    drop(hold);

    // Nothing failed: the refresh was dropped with its runtime, and the next
    // one starts at once, without a backoff.
    let token = server.block_on(waiter).expect("the waiter did not panic");
    assert!(matches!(token, Ok(Ok(_))), "{token:?}");
    let again = runtime(false).block_on(async { timeout(GUARD, auth.access_token()).await });
    assert!(matches!(again, Ok(Ok(_))), "{again:?}");
    assert_eq!((mock.oauth_calls(), mock.password_grants()), (2, 2));
    let stats = auth.stats();
    assert_eq!((stats.failures, stats.refreshes), (0, 1));
    assert!(stats.last_error.is_none(), "{:?}", stats.last_error);
}

#[test]
fn access_token_on_a_plain_thread_reports_no_runtime() {
    let mock = MockVolt::builder().in_process();
    let auth = common::layer(&mock);
    let outcome = std::thread::spawn(move || poll_once(auth.access_token()))
        .join()
        .expect("no panic");
    assert!(
        matches!(outcome, Poll::Ready(Err(volt_auth::Error::NoRuntime))),
        "{outcome:?}"
    );
    assert_eq!(mock.oauth_calls(), 0);
}

#[test]
fn a_stale_token_read_on_a_plain_thread_leaves_the_background_refresh_to_the_next_request() {
    let mock = MockVolt::builder().in_process();
    let home = runtime(true);
    let auth = stale_on(&home, &mock);
    // Sync code without a runtime reads the stale token: it cannot start
    // the refresh.
    let outcome = std::thread::spawn({
        let auth = auth.clone();
        move || poll_once(auth.access_token())
    })
    .join()
    .expect("no panic");
    assert!(matches!(outcome, Poll::Ready(Ok(_))), "{outcome:?}");
    assert_eq!(mock.oauth_calls(), 1);

    home.block_on(async {
        let mut api = auth.layer(mock.service());
        banks_ok(&mut api, &mock).await;
        sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
        assert_eq!((mock.oauth_calls(), mock.refresh_grants()), (2, 1));
        assert_eq!(auth.stats().refreshes, 2);
    });
}

#[test]
fn a_backoff_whose_runtime_is_gone_still_ends_in_a_background_refresh() {
    let mock = MockVolt::builder().in_process();
    let home = runtime(true);
    let auth = stale_on(&home, &mock);
    // Another paused runtime, at the same time, starts the background
    // refresh; it fails and backs off, and that runtime is dropped.
    mock.fail_oauth(1, http::StatusCode::SERVICE_UNAVAILABLE, "down");
    let gone = runtime(true);
    gone.block_on(async {
        advance(STALE + Duration::from_millis(1)).await;
        auth.access_token().await.expect("the stale token");
        until(|| auth.stats().failures > 0, "the refresh failed").await;
    });
    drop(gone);
    assert_eq!(mock.oauth_calls(), 2);

    home.block_on(async {
        let mut api = auth.layer(mock.service());
        // During the backoff: the stale token, and no /oauth call.
        banks_ok(&mut api, &mock).await;
        sleep(Duration::from_millis(1)).await;
        assert_eq!(mock.oauth_calls(), 2);
        // After it, the next request starts the background refresh. Each
        // paused clock starts at the real instant its runtime was built, so
        // the backoff `gone` timed ends on this clock after whatever real time
        // passed between the two: what is left of it is the cache's to say.
        let left = auth.stats().retry_in.expect("still in the backoff");
        advance(left).await;
        sleep(Duration::from_millis(1)).await; // the backoff's end is marked
        banks_ok(&mut api, &mock).await;
        sleep(Duration::from_millis(1)).await; // idle barrier (paused clock)
        // The refresh grant failed: this one is the password grant.
        assert_eq!((mock.oauth_calls(), mock.refresh_grants()), (3, 1));
        let stats = auth.stats();
        assert_eq!((stats.refreshes, stats.failures), (2, 0));
        assert_eq!(mock.unauthorized(), 0);
    });
}

#[test]
fn a_refresh_stranded_on_a_runtime_nothing_drives_does_not_hold_up_other_runtimes() {
    let mock = MockVolt::builder().in_process();
    let auth = common::layer(&mock);
    // A sync worker's runtime starts the refresh and gives up on it at
    // /oauth; the runtime is kept, but nothing drives it until its next job.
    let idle = runtime(false);
    held_at_oauth(&idle, &mock, &auth);
    assert_eq!(mock.oauth_calls(), 1);

    // A server runtime's callers wait for it no longer than two token
    // timeouts and a second, then start their own.
    let server = runtime(true);
    let token = server.block_on(async {
        let started = Instant::now();
        let token = timeout(GUARD, auth.access_token()).await;
        assert_eq!(started.elapsed(), Duration::from_secs(11));
        token
    });
    let token = token.expect("no hang").expect("a token");
    assert_eq!((mock.oauth_calls(), mock.password_grants()), (2, 2));

    // The stranded refresh ends when its runtime runs again: its token is
    // not published over the one in use.
    idle.block_on(async {
        until(
            || mock.issued_access_tokens().len() >= 2,
            "the stranded refresh ended",
        )
        .await;
    });
    drop(idle);
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    server.block_on(async {
        let again = auth.access_token().await.expect("the token in use");
        assert_eq!(again.expose_secret(), token.expose_secret());
    });
    assert_eq!(auth.stats().refreshes, 1);
    assert_eq!(mock.oauth_calls(), 2);
}

#[test]
fn a_refresh_given_up_before_it_ran_sends_nothing_when_its_runtime_runs_again() {
    let mock = MockVolt::builder().in_process();
    let auth = common::layer(&mock);
    // Spawned on a runtime that nothing drives, never polled.
    let idle = runtime(false);
    idle.block_on(async { assert!(poll_once(auth.access_token()).is_pending()) });
    let server = runtime(true);
    server.block_on(async {
        gets_a_token(&auth).await;
    });
    assert_eq!((mock.oauth_calls(), mock.password_grants()), (1, 1));

    // Run at last, the given-up refresh sends nothing: in particular not the
    // refresh token of the token in use, which would rotate it away.
    idle.block_on(async {
        // Its tasks run while this yields: the given-up refresh ends at its
        // first poll.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    });
    drop(idle);
    assert_eq!(mock.oauth_calls(), 1);
    server.block_on(async {
        advance(2 * HOUR).await;
        sleep(Duration::from_millis(1)).await; // the timer runs
        gets_a_token(&auth).await;
    });
    assert_eq!(grants(&mock), (2, 1, 1));
    assert_eq!(auth.stats().refresh.rejected, 0);
}

/// A runtime of its own whose refresh of `auth`'s token (2 hours on) is at
/// /oauth presenting the refresh token when it is left undriven.
fn presenting_the_refresh_token(mock: &MockVolt, auth: &volt_auth::VoltAuthLayer) -> Runtime {
    let rt = runtime(true);
    rt.block_on(advance(2 * HOUR));
    held_at_oauth(&rt, mock, auth);
    assert_eq!((mock.oauth_calls(), mock.refresh_grants()), (2, 1));
    rt
}

/// `/oauth` calls: all, refresh grants, password grants.
fn grants(mock: &MockVolt) -> (usize, usize, usize) {
    (
        mock.oauth_calls(),
        mock.refresh_grants(),
        mock.password_grants(),
    )
}

/// On `server`, the refresh after one that may have presented the refresh
/// token cannot know whether Volt rotated it: it authenticates with the
/// password instead, at once and without a backoff.
fn replaced_with_the_password(server: &Runtime, mock: &MockVolt, auth: &volt_auth::VoltAuthLayer) {
    server.block_on(async {
        advance(2 * HOUR).await;
        gets_a_token(auth).await;
    });
    assert_eq!(grants(mock), (3, 1, 2));
}

/// The token the password grant gave refreshes with its own refresh token.
fn refreshes_with_its_own_refresh_token(
    server: &Runtime,
    mock: &MockVolt,
    auth: &volt_auth::VoltAuthLayer,
) {
    server.block_on(async {
        advance(2 * HOUR).await;
        sleep(Duration::from_millis(1)).await; // the timer runs
        gets_a_token(auth).await;
    });
    assert_eq!(grants(mock), (4, 2, 2));
    assert_eq!(auth.stats().refresh.rejected, 0);
}

#[test]
fn the_refresh_after_a_stranded_one_does_not_present_the_refresh_token_it_holds() {
    let mock = MockVolt::builder().in_process();
    let auth = token_from_a_runtime_now_gone(&mock);
    // A sync worker's runtime presents the refresh token at /oauth, and is
    // then left undriven.
    let idle = presenting_the_refresh_token(&mock, &auth);
    let server = runtime(true);
    replaced_with_the_password(&server, &mock, &auth);

    // The stranded refresh ends when its runtime runs again, and sends nothing more.
    idle.block_on(async {
        until(
            || mock.issued_access_tokens().len() >= 3,
            "the stranded refresh ended",
        )
        .await;
        sleep(Duration::from_millis(1)).await;
    });
    drop(idle);
    assert_eq!(mock.oauth_calls(), 3);
    refreshes_with_its_own_refresh_token(&server, &mock, &auth);
}

#[test]
fn the_refresh_after_one_dropped_at_oauth_with_its_runtime_does_not_present_its_refresh_token() {
    let mock = MockVolt::builder().in_process();
    let auth = token_from_a_runtime_now_gone(&mock);
    // A job's runtime presents the refresh token at /oauth and is dropped
    // before the answer: Volt may have rotated that refresh token already.
    drop(presenting_the_refresh_token(&mock, &auth));
    let server = runtime(true);
    replaced_with_the_password(&server, &mock, &auth);
    assert_eq!(auth.stats().failures, 0);
    refreshes_with_its_own_refresh_token(&server, &mock, &auth);
}

/// A 401 answered to a request polled on a plain thread (sync code driving
/// the future by hand), after the token it carried was replaced on a runtime
/// since dropped: the new token's timer went with that runtime, and no
/// runtime is at hand to time it again, yet the clock says it is valid. The
/// replay goes with it. It used to be taken for a token whose successor was
/// on its way: the replay waited for a token, was handed that one, refused it
/// again, and spun in one poll forever.
#[test]
fn a_replay_on_a_plain_thread_goes_with_a_token_whose_timer_is_gone() {
    let mock = MockVolt::builder().in_process();
    let auth = common::layer(&mock);
    let gone = runtime(false);
    let first = gone.block_on(auth.access_token()).expect("first token");
    let mut api = auth.layer(mock.service());
    gone.block_on(tower::ServiceExt::ready(&mut api))
        .expect("ready");
    let sent = tower::Service::call(&mut api, common::get(&mock, "/banks"));
    // Before it is answered, its token is revoked and replaced.
    mock.revoke_access_tokens();
    gone.block_on(async {
        auth.reject(&first);
        auth.access_token().await.expect("second token");
    });
    drop(gone);
    let (done, answered) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let status = poll_once(sent).map(|response| response.map(|r| r.status()));
        let _ = done.send(status.map(|status| status.map_err(|e| e.to_string())));
    });
    let status = answered.recv_timeout(GUARD).expect("the replay ended");
    assert_eq!(status, Poll::Ready(Ok(http::StatusCode::OK)));
    let issued = mock.issued_access_tokens();
    assert_eq!(issued.len(), 2);
    assert_eq!(
        mock.api_authorizations(),
        [bearer(&issued[0]), bearer(&issued[1])]
    );
    assert_eq!((mock.oauth_calls(), auth.stats().replays), (2, 1));
}
