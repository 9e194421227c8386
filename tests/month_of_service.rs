//! Thirty days of service under tokio's paused clock: one layer, built once,
//! with the settings users run (refresh 5 min ahead with up to 1 min of
//! jitter, 30 s expiry margin, 5 s token timeout, backoff 1 s doubling to
//! 1 min), in front of three in-process mock Volts behind one transport,
//! [`Volt`]: one issuing 1-hour tokens, one 24-hour tokens, one with the API
//! user's password changed.
//!
//! Traffic: one `GET /banks` every 15 s, every second while `/oauth` is
//! failing (callers retrying), and a burst of 16 concurrent requests every
//! hour at HH:30:07.5.
//!
//! | day | event |
//! |---|---|
//! | 0 | first request: the password grant; 1-hour tokens (refresh tokens live 24 h) |
//! | 2 | `/oauth` answers 503 for 17 min ending 3 min before the token expires: invisible |
//! | 4 | `/oauth` refuses connections for 35 min across the token's expiry |
//! | 6 | `/oauth` hangs (past the timeout) for 40 min across the token's expiry |
//! | 9–10 | no traffic from day 9 18:00 to day 10 20:00: the refresh token has expired, so `invalid_grant` and the password grant in the same flight |
//! | 12 | every access token revoked: one 401, one refresh, one replay |
//! | 15 | at 12:00 Volt starts issuing 24-hour tokens (another mock): the old refresh token is refused there, so the password grant |
//! | 17 | `/oauth` refuses connections for 4 h while the token is fresh: no `/oauth` call |
//! | 19 | `/oauth` refuses connections for 58 min ending 2 min before expiry: invisible |
//! | 22 | `/oauth` answers 503 for 3.5 h across expiry; the refresh token expires with the access token, so `invalid_grant` and the password grant after it |
//! | 24 | the API user's password is changed at Volt for 2 h around the token's expiry: one refused refresh token, then one refused password grant per capped backoff window; requests fail with that rejection once the token expired |
//! | 25 | every access token revoked: one 401, one refresh, one replay |
//! | 27 | access and refresh tokens revoked: one 401, a refused refresh, the password grant, one replay |
//! | 28 | `/oauth` hangs for 1 h 57 min ending 3 min before expiry: invisible |
//!
//! Checked on every request: it succeeds (200) unless the cached token was
//! inside its expiry margin and no new token came, in which case it fails with
//! the outage's typed error, shared by all failing requests of that outage;
//! every API request carries the newest token Volt issued. Checked on every
//! `/oauth` attempt: the first after a token comes when that token turns stale
//! (refresh-ahead, jitter and traffic cadence allowed for) unless a 401 or an
//! idle gap moved it; after the k-th failure in a row the next comes no sooner
//! than half of min(2^(k-1) s, 60 s) after it and no later than that plus a
//! request interval; a refused refresh token is followed at once by the
//! password grant and never presented again; a refresh grant that failed
//! otherwise is followed, after the backoff, by the password grant. Checked at every midnight: the day's `/oauth` attempts by
//! grant and outcome, 401s, replays and failed requests; `Stats` against the
//! transport's and the mocks' counts; one live tokio task (the token's phase
//! timer) or none after an idle gap expired the token; the log so far, by
//! level, against the `/oauth` attempts (events come per attempt, never per
//! request).
//!
//! Then, at 1,000 requests a minute, the log per minute by level: an hour of
//! `/oauth` outage across expiry, an hour of 401s (with `/oauth` failing for
//! its second half), a password Volt refuses, a minute-long token, and a
//! secret-store poller handing the layer its credentials every 10 s.
//!
//! Not covered here: rotating the password in the layer on day 24 (it only
//! changes at Volt and back; `set_credentials` is tested in
//! `tests/rotation.rs` and by the poller below); the process-wide ticket
//! registry (only unit tests can see it; one cache registers one entry).

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tower::{BoxError, Layer, Service, ServiceExt};
use tracing::Level;
use volt_auth::mock::{self, MockVolt};
use volt_auth::{Error, GrantType, VoltAuth, VoltAuthLayer};

use common::Body;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

// The layer's defaults, which this test does not change.
const AHEAD: Duration = Duration::from_secs(300);
const JITTER: Duration = Duration::from_secs(60);
const MARGIN: Duration = Duration::from_secs(30);
const TOKEN_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Request intervals: normal, and while `/oauth` fails.
const QUIET: Duration = Duration::from_secs(15);
const BUSY: Duration = SEC;
const BURST: usize = 16;
/// Where in each hour the burst comes: off both request grids.
const BURST_AT: Duration = Duration::from_millis(30 * 60_000 + 7_500);

const HOURLY: usize = 0;
const DAILY: usize = 1;
/// Volt after someone changed the API user's password there.
const ROTATED: usize = 2;

// ---------------------------------------------------------------------------------------------
// Volt: the /oauth transport and the API service, over three mocks
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Issued(Duration),
    Rejected,
    Failed,
    /// In flight, or dropped by the layer's timeout.
    Pending,
}

#[derive(Clone, Debug)]
struct Attempt {
    at: Instant,
    grant: GrantType,
    outcome: Outcome,
    refused: bool,
}

impl Attempt {
    /// The outcome once the attempt is over; a pending one timed out.
    fn settled(&self) -> Outcome {
        match self.outcome {
            Outcome::Pending => Outcome::Failed,
            outcome => outcome,
        }
    }

    /// When it failed, if it did.
    fn failed_at(&self) -> Instant {
        match self.outcome {
            Outcome::Pending => self.at + TOKEN_TIMEOUT,
            _ => self.at,
        }
    }
}

/// The newest access token Volt issued.
#[derive(Clone, Debug)]
struct Current {
    secret: String,
    expires_at: Instant,
}

#[derive(Default)]
struct Ledger {
    /// Which mock answers `/oauth`.
    issuer: usize,
    refusing: bool,
    /// Which mock issued each access token.
    owner: HashMap<String, usize>,
    current: Option<Current>,
    attempts: Vec<Attempt>,
    api_calls: u64,
    unauthorized: Vec<Instant>,
    /// API requests that did not carry the newest token.
    not_current: u64,
    /// Refresh tokens Volt refused, and how often one was presented again.
    refused_refresh: HashSet<String>,
    presented_again: u64,
}

/// What Volt is for the layer: `/oauth` goes to the issuing mock (or is
/// refused), an API request to the mock that issued its token. Records every
/// `/oauth` attempt and checks every API request's token.
#[derive(Clone)]
struct Volt(Arc<Inner>);

struct Inner {
    mocks: [MockVolt; 3],
    ledger: Mutex<Ledger>,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

impl Volt {
    fn new() -> Self {
        let hourly = MockVolt::builder()
            .access_token_lifetime(HOUR)
            .refresh_token_lifetime(DAY)
            .in_process();
        let daily = MockVolt::builder()
            .access_token_lifetime(DAY)
            .refresh_token_lifetime(DAY)
            .in_process();
        let rotated = MockVolt::builder()
            .credentials(
                mock::CLIENT_ID,
                mock::CLIENT_SECRET,
                mock::USERNAME,
                "a-new-password",
            )
            .in_process();
        Self(Arc::new(Inner {
            mocks: [hourly, daily, rotated],
            ledger: Mutex::default(),
        }))
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.0.ledger.lock().unwrap()
    }

    fn mocks(&self) -> &[MockVolt; 3] {
        &self.0.mocks
    }

    fn issuer(&self) -> &MockVolt {
        &self.0.mocks[self.ledger().issuer]
    }

    fn current(&self) -> Option<Current> {
        self.ledger().current.clone()
    }

    fn current_secret(&self) -> Option<String> {
        self.ledger().current.as_ref().map(|c| c.secret.clone())
    }

    async fn oauth(self, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await?.to_bytes();
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)?;
        let refresh_token = fields
            .iter()
            .find(|(name, _)| name == "refresh_token")
            .map(|(_, token)| token.clone());
        let grant = match fields.iter().find(|(name, _)| name == "grant_type") {
            Some((_, kind)) if kind == "password" => GrantType::Password,
            Some((_, kind)) if kind == "refresh_token" => GrantType::RefreshToken,
            other => panic!("unexpected grant {other:?}"),
        };
        let (issuer, refused, index) = {
            let mut ledger = self.ledger();
            let refused = ledger.refusing;
            if refresh_token
                .as_ref()
                .is_some_and(|token| ledger.refused_refresh.contains(token))
            {
                ledger.presented_again += 1;
            }
            ledger.attempts.push(Attempt {
                at: Instant::now(),
                grant,
                outcome: if refused {
                    Outcome::Failed
                } else {
                    Outcome::Pending
                },
                refused,
            });
            (ledger.issuer, refused, ledger.attempts.len() - 1)
        };
        if refused {
            let error = io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
            return Err(error.into());
        }
        let request = Request::from_parts(parts, Full::new(bytes));
        let Ok(response) = self.0.mocks[issuer].service().oneshot(request).await;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await?.to_bytes();
        let mut ledger = self.ledger();
        let outcome = if parts.status == StatusCode::OK {
            let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
            let secret = answer["access_token"].as_str().expect("a token").to_owned();
            let lifetime = Duration::from_secs(answer["expires_in"].as_u64().expect("a lifetime"));
            ledger.owner.insert(secret.clone(), issuer);
            ledger.current = Some(Current {
                secret,
                expires_at: Instant::now() + lifetime,
            });
            Outcome::Issued(lifetime)
        } else if parts.status.is_client_error() {
            ledger.refused_refresh.extend(refresh_token);
            Outcome::Rejected
        } else {
            Outcome::Failed
        };
        ledger.attempts[index].outcome = outcome;
        drop(ledger);
        Ok(Response::from_parts(parts, Full::new(bytes)))
    }

    fn api(&self, request: Request<Body>) -> BoxFuture {
        let token = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let mock = {
            let mut ledger = self.ledger();
            ledger.api_calls += 1;
            if token != ledger.current.as_ref().map(|c| c.secret.as_str()) {
                ledger.not_current += 1;
            }
            token
                .and_then(|token| ledger.owner.get(token).copied())
                .unwrap_or(ledger.issuer)
        };
        let call = self.0.mocks[mock].service().oneshot(request);
        let volt = self.clone();
        Box::pin(async move {
            let Ok(response) = call.await;
            if response.status() == StatusCode::UNAUTHORIZED {
                volt.ledger().unauthorized.push(Instant::now());
            }
            Ok(response)
        })
    }
}

impl Service<Request<Body>> for Volt {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> BoxFuture {
        if request.uri().path() == "/oauth" {
            Box::pin(self.clone().oauth(request))
        } else {
            self.api(request)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `/oauth` answers 503.
    Unavailable,
    /// Connections to `/oauth` are refused.
    Refused,
    /// `/oauth` answers after a day: every attempt times out.
    Hanging,
    /// Someone changed the API user's password at Volt (and the refresh
    /// tokens went with it), then changed it back.
    PasswordChanged,
}

impl Fault {
    fn start(self, volt: &Volt) {
        match self {
            Fault::Unavailable => volt.issuer().fail_oauth(
                usize::MAX,
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"code":503,"message":"Service Unavailable"}"#,
            ),
            Fault::Refused => volt.ledger().refusing = true,
            Fault::Hanging => volt.issuer().set_oauth_delay(DAY),
            Fault::PasswordChanged => volt.ledger().issuer = ROTATED,
        }
    }

    fn end(self, volt: &Volt) {
        match self {
            Fault::Unavailable => volt.issuer().fail_oauth(0, StatusCode::OK, ""),
            Fault::Refused => volt.ledger().refusing = false,
            Fault::Hanging => volt.issuer().set_oauth_delay(Duration::ZERO),
            Fault::PasswordChanged => volt.ledger().issuer = DAILY,
        }
    }

    /// The typed error the refresh fails with (of either grant: after a
    /// failed refresh grant, the next attempt is the password grant).
    fn matches(self, error: &Error) -> bool {
        match (self, error) {
            (Fault::Unavailable, Error::Failed { response, .. }) => {
                response.status == StatusCode::SERVICE_UNAVAILABLE
            }
            (Fault::Refused, Error::Transport { .. }) => true,
            (Fault::Hanging, Error::Timeout { timeout, .. }) => *timeout == TOKEN_TIMEOUT,
            (
                Fault::PasswordChanged,
                Error::Rejected {
                    grant, response, ..
                },
            ) => {
                *grant == GrantType::Password
                    && response.status == StatusCode::BAD_REQUEST
                    && response.code.as_deref() == Some("invalid_grant")
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The month
// ---------------------------------------------------------------------------------------------

/// One day's `/oauth` attempts by grant and outcome (`[issued, rejected,
/// failed]`), and what callers saw.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    password: [u64; 3],
    refresh: [u64; 3],
    refused: u64,
    unauthorized: u64,
    failed_requests: u64,
}

/// What a day must show: the password grants (never refused, never failing),
/// refused refresh grants, 401s (each replayed once) exactly; tokens from the
/// refresh grant and failed refresh grants within what the jitter allows.
struct Expect {
    /// Password grants that issued a token: after an outage, the attempt
    /// that succeeds may be the password grant (see `check_attempts`).
    password: RangeInclusive<u64>,
    password_rejected: RangeInclusive<u64>,
    rejected: RangeInclusive<u64>,
    refreshed: RangeInclusive<u64>,
    /// Failed attempts, of either grant.
    failed: RangeInclusive<u64>,
    refused: RangeInclusive<u64>,
    unauthorized: u64,
    failed_requests: RangeInclusive<u64>,
}

/// A quiet day of 1-hour tokens: a refresh every 3240–3315 s makes 26 or 27.
const HOURLY_DAY: Expect = Expect {
    password: 0..=0,
    password_rejected: 0..=0,
    rejected: 0..=0,
    refreshed: 26..=27,
    failed: 0..=0,
    refused: 0..=0,
    unauthorized: 0,
    failed_requests: 0..=0,
};

/// A quiet day of 24-hour tokens: one refresh, none near midnight.
const DAILY_DAY: Expect = Expect {
    refreshed: 1..=1,
    ..HOURLY_DAY
};

struct Month {
    volt: Volt,
    auth: VoltAuthLayer,
    api: VoltAuth<Volt>,
    start: Instant,
    /// Requests every second rather than every 15 s.
    busy: bool,
    next_tick: Instant,
    next_burst: Instant,
    /// The outage across expiry in progress, whose error failed requests get.
    outage: Option<Fault>,
    /// Failed requests: when, and the error's grant and text.
    failures: Vec<(Instant, Option<GrantType>, String)>,
    requests: u64,
    /// `/oauth` attempts not started by refresh-ahead nor by a backoff's end.
    unscheduled: Vec<Instant>,
    /// Every event the layer logged (this thread's, the refresh tasks' included).
    log: common::log::Capture,
    _log: tracing::subscriber::DefaultGuard,
}

impl Month {
    fn new() -> Self {
        let (log, guard) = common::log::scoped();
        let volt = Volt::new();
        let auth = common::builder(&volt.mocks()[HOURLY])
            .build(volt.clone())
            .expect("layer");
        let api = auth.layer(volt.clone());
        let start = Instant::now();
        Self {
            volt,
            auth,
            api,
            start,
            busy: false,
            next_tick: start,
            next_burst: start + BURST_AT,
            outage: None,
            failures: Vec::new(),
            requests: 0,
            unscheduled: Vec::new(),
            log,
            _log: guard,
        }
    }

    fn at(&self, day: u32, hours: u32, minutes: u32) -> Instant {
        self.start + DAY * day + HOUR * hours + MIN * minutes
    }

    /// "day D HH:MM:SS.mmm", for messages.
    fn clock(&self, at: Instant) -> String {
        let ms = (at - self.start).as_millis();
        let (day, ms) = (ms / 86_400_000, ms % 86_400_000);
        let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms % 60_000);
        format!("day {day} {h:02}:{m:02}:{:02}.{:03}", s / 1000, s % 1000)
    }

    fn cadence(&self) -> Duration {
        if self.busy { BUSY } else { QUIET }
    }

    /// The first point of the request grid after now.
    fn schedule_tick(&mut self) {
        let step = self.cadence().as_millis();
        let elapsed = (Instant::now() - self.start).as_millis();
        let next = (elapsed / step + 1) * step;
        self.next_tick = self.start + Duration::from_millis(next as u64);
    }

    /// Serves the traffic until `end` (requests due at `end` come after it).
    async fn run_until(&mut self, end: Instant) {
        loop {
            let at = self.next_tick.min(self.next_burst);
            if at >= end {
                break;
            }
            sleep_until(at).await;
            if at == self.next_burst {
                self.burst().await;
                self.next_burst += HOUR;
            } else {
                self.single().await;
                self.schedule_tick();
            }
        }
        sleep_until(end).await;
    }

    /// No traffic until `end`.
    async fn idle_until(&mut self, end: Instant) {
        sleep_until(end).await;
        self.next_tick = end;
        while self.next_burst < end {
            self.next_burst += HOUR;
        }
    }

    /// Serves the traffic until Volt issues a new token; returns it.
    async fn next_token(&mut self) -> Current {
        let before = self.volt.current_secret();
        while self.volt.current_secret() == before {
            let at = self.next_tick.min(self.next_burst);
            self.run_until(at + MS).await;
        }
        self.volt.current().expect("a token")
    }

    async fn single(&mut self) {
        let before = self.volt.current();
        let started = Instant::now();
        let outcome = call(&self.api).await;
        let renewed = self.volt.current_secret() != before.as_ref().map(|c| c.secret.clone());
        self.judge(started, before.as_ref(), renewed, outcome);
    }

    async fn burst(&mut self) {
        let before = self.volt.current();
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..BURST {
            let api = self.api.clone();
            tasks.spawn(async move { call(&api).await });
        }
        let outcomes = tasks.join_all().await;
        let renewed = self.volt.current_secret() != before.as_ref().map(|c| c.secret.clone());
        let errors: Vec<String> = outcomes
            .iter()
            .filter_map(|outcome| outcome.as_ref().err().map(ToString::to_string))
            .collect();
        assert!(
            errors.windows(2).all(|pair| pair[0] == pair[1]),
            "{}: a burst saw different errors: {errors:?}",
            self.clock(started)
        );
        for outcome in outcomes {
            self.judge(started, before.as_ref(), renewed, outcome);
        }
    }

    /// A request that started at `started`, when `before` was the newest
    /// token, succeeds unless that token was inside its expiry margin and none
    /// came since; then it fails with the outage's error.
    fn judge(
        &mut self,
        started: Instant,
        before: Option<&Current>,
        renewed: bool,
        outcome: Result<StatusCode, Error>,
    ) {
        self.requests += 1;
        let expired_at = before.map(|c| c.expires_at - MARGIN);
        let valid = expired_at.is_some_and(|at| started < at);
        let expired = expired_at.is_none_or(|at| started > at);
        match outcome {
            Ok(status) => {
                assert_eq!(status, StatusCode::OK, "{}", self.clock(started));
                assert!(
                    !expired || renewed,
                    "{}: a request succeeded without a valid token",
                    self.clock(started)
                );
            }
            Err(error) => {
                let at = self.clock(started);
                assert!(
                    !valid,
                    "{at}: a request failed while a valid token was cached: {error:?}"
                );
                let fault = self.outage.unwrap_or_else(|| {
                    panic!("{at}: a request failed outside an outage: {error:?}")
                });
                assert!(fault.matches(&error), "{at}: {fault:?} but {error:?}");
                self.failures
                    .push((started, error.grant(), error.to_string()));
            }
        }
    }

    /// `/oauth` fails with `fault` from `from` to `until`; then two minutes
    /// for the next attempt to succeed. Returns the failed requests.
    async fn outage(&mut self, fault: Fault, from: Instant, until: Instant) -> usize {
        let expires_at = self.volt.current().expect("a token").expires_at;
        let across = until > expires_at - MARGIN;
        self.run_until(from).await;
        let before = self.volt.current_secret();
        let failed_before = self.failures.len();
        // While refresh-ahead is due, callers are counted every second.
        self.busy = until > expires_at - AHEAD - JITTER;
        fault.start(&self.volt);
        if across {
            self.outage = Some(fault);
        }
        self.run_until(until).await;

        // What a health check sees at the end of the outage.
        let stats = self.auth.stats();
        if self.busy {
            assert!(stats.failures > 0, "{fault:?}: {stats:?}");
            let last = stats.last_error.as_ref().expect("the last error");
            assert!(fault.matches(last), "{fault:?}: {last:?}");
            assert!(stats.retry_in.is_none_or(|wait| wait <= BACKOFF_MAX));
            assert_eq!(stats.remaining.is_some(), !across, "{stats:?}");
            assert_eq!(
                self.volt.current_secret(),
                before,
                "a token during {fault:?}"
            );
        } else {
            assert_eq!(stats.failures, 0, "{fault:?}: {stats:?}");
        }

        fault.end(&self.volt);
        self.run_until(until + 2 * MIN).await;
        let stats = self.auth.stats();
        assert_eq!(stats.failures, 0, "{fault:?}: not recovered: {stats:?}");
        self.outage = None;
        self.busy = false;
        self.schedule_tick();

        let failed = &self.failures[failed_before..];
        assert_eq!(!failed.is_empty(), across, "{fault:?}: {failed:?}");
        // One error per grant: the attempts alternate between the two.
        let mut errors = HashMap::new();
        for (_, grant, error) in failed {
            let first = errors.entry(*grant).or_insert(error);
            assert_eq!(*first, error, "{fault:?}: more than one error");
        }
        failed.len()
    }

    /// Every access token (and with `refresh`, every refresh token) Volt
    /// issued stops working; the next request, due now, meets the 401.
    fn revoke(&mut self, refresh: bool) {
        assert_eq!(self.next_tick, Instant::now(), "a request is due");
        let issuer = self.volt.issuer();
        issuer.revoke_access_tokens();
        if refresh {
            issuer.revoke_refresh_tokens();
        }
        self.unscheduled.push(Instant::now());
    }

    /// The day's counts, after the checks that hold at every midnight.
    fn end_of_day(&mut self, day: u32, alive: usize) -> Tally {
        let now = Instant::now();
        assert_eq!(now, self.at(day + 1, 0, 0));
        let clock = self.clock(now);
        self.check_attempts();

        let ledger = self.volt.ledger();
        assert_eq!(
            ledger.not_current, 0,
            "{clock}: a request without the newest token"
        );
        assert_eq!(
            ledger.presented_again, 0,
            "{clock}: a refresh token Volt refused was presented again"
        );
        let total = tally(ledger.attempts.iter());
        let mut today = tally(ledger.attempts.iter().filter(|a| a.at >= now - DAY));
        let unauthorized = ledger.unauthorized.len() as u64;
        today.unauthorized = ledger
            .unauthorized
            .iter()
            .filter(|at| **at >= now - DAY)
            .count() as u64;
        today.failed_requests = self
            .failures
            .iter()
            .filter(|(at, _, _)| *at >= now - DAY)
            .count() as u64;

        // Stats agree with the transport's counts, the mocks' with both.
        let stats = self.auth.stats();
        let grants = |g: volt_auth::GrantStats| [g.succeeded, g.rejected, g.failed];
        assert_eq!(grants(stats.password), total.password, "{clock}");
        assert_eq!(grants(stats.refresh), total.refresh, "{clock}");
        let issued = total.password[0] + total.refresh[0];
        assert_eq!(stats.refreshes, issued, "{clock}");
        assert_eq!(stats.replays, unauthorized, "{clock}: one replay per 401");
        assert_eq!((stats.failures, stats.retry_in), (0, None), "{clock}");
        assert!(stats.last_error.is_none(), "{clock}");
        let current = ledger.current.as_ref().expect("a token");
        let left = current.expires_at.saturating_duration_since(now);
        assert_eq!(stats.remaining, (left > MARGIN).then_some(left), "{clock}");

        // The log so far: per /oauth attempt, never per request. A warning
        // per attempt that got no token, and one per refresh that failed
        // (a refused refresh token and the password grant after it are one
        // refresh); the refused refresh token itself is news (info); a debug
        // event per token, per 401 and per replay.
        let events = common::log::events(&self.log);
        let count = |level| events.iter().filter(|e| e.level == level).count() as u64;
        let unsuccessful = total.password[1..]
            .iter()
            .chain(&total.refresh[1..])
            .sum::<u64>();
        let refused_refresh = total.refresh[1];
        assert_eq!(
            [
                Level::ERROR,
                Level::WARN,
                Level::INFO,
                Level::DEBUG,
                Level::TRACE
            ]
            .map(count),
            [
                0,
                2 * unsuccessful - refused_refresh,
                refused_refresh,
                issued + 2 * unauthorized,
                0
            ],
            "{clock}: events by level"
        );

        let mocks = self.volt.mocks();
        let sum = |count: fn(&MockVolt) -> usize| mocks.iter().map(count).sum::<usize>() as u64;
        let attempts = ledger.attempts.len() as u64;
        let password = total.password.iter().sum::<u64>();
        let refused_password = ledger
            .attempts
            .iter()
            .filter(|a| a.refused && a.grant == GrantType::Password)
            .count() as u64;
        assert_eq!(
            sum(MockVolt::oauth_calls),
            attempts - total.refused,
            "{clock}"
        );
        assert_eq!(
            sum(MockVolt::password_grants),
            password - refused_password,
            "{clock}"
        );
        assert_eq!(sum(|m| m.issued_access_tokens().len()), issued, "{clock}");
        assert_eq!(sum(MockVolt::api_calls), ledger.api_calls, "{clock}");
        assert_eq!(sum(MockVolt::unauthorized), unauthorized, "{clock}");
        // Each request that got a token made one API call, plus its replay.
        let failed = self.failures.len() as u64;
        assert_eq!(
            ledger.api_calls,
            self.requests - failed + unauthorized,
            "{clock}"
        );
        drop(ledger);

        assert_eq!(
            Handle::current().metrics().num_alive_tasks(),
            alive,
            "{clock}: live tasks"
        );
        today
    }

    /// Every `/oauth` attempt so far came when it should have.
    fn check_attempts(&self) {
        let attempts = self.volt.ledger().attempts.clone();
        let mut issued: Option<(Instant, Duration)> = None;
        let mut streak = 0u32;
        let mut window = Duration::ZERO;
        let mut failed_at = self.start;
        let mut previous: Option<&Attempt> = None;
        let mut earlier: Option<&Attempt> = None;
        for attempt in &attempts {
            let at = attempt.at;
            let clock = self.clock(at);
            let fallback = previous.is_some_and(|p| {
                p.settled() == Outcome::Rejected && p.grant == GrantType::RefreshToken
            });
            if fallback {
                // A refused refresh token: the password grant in the same flight.
                assert_eq!(attempt.grant, GrantType::Password, "{clock}");
                assert_eq!(
                    Some(at),
                    previous.map(|p| p.at),
                    "{clock}: the fallback waited"
                );
            } else if streak > 0 {
                // A failed refresh grant: the password grant next, in case
                // the refresh path is what is broken; if that fails too, the
                // refresh token (kept) again.
                let failed = |a: Option<&Attempt>, grant| {
                    a.is_some_and(|a| a.settled() == Outcome::Failed && a.grant == grant)
                };
                if failed(previous, GrantType::RefreshToken) {
                    assert_eq!(attempt.grant, GrantType::Password, "{clock}");
                } else if failed(earlier, GrantType::RefreshToken)
                    && failed(previous, GrantType::Password)
                {
                    assert_eq!(attempt.grant, GrantType::RefreshToken, "{clock}");
                }
                // No later than the token, if still served, stops being served.
                let served = issued
                    .map(|(issued_at, lifetime)| issued_at + lifetime - MARGIN)
                    .filter(|&end| end > failed_at)
                    .map_or(window, |end| window.min(end - failed_at));
                let gap = at - failed_at;
                assert!(
                    gap >= (window / 2).min(served) && gap <= served + BUSY + MS,
                    "{clock}: {gap:?} after failure {streak} (backoff {window:?}, served {served:?})"
                );
            } else if let Some((issued_at, lifetime)) = issued {
                if !self.unscheduled.contains(&at) {
                    let since = at - issued_at;
                    let due = lifetime - AHEAD;
                    assert!(
                        since >= due - JITTER && since <= due + QUIET,
                        "{clock}: {since:?} after a token of {lifetime:?}"
                    );
                }
            } else {
                assert_eq!((at, attempt.grant), (self.start, GrantType::Password));
            }
            match (attempt.settled(), attempt.grant) {
                (Outcome::Issued(lifetime), _) => {
                    issued = Some((at, lifetime));
                    streak = 0;
                }
                (Outcome::Failed, _) => {
                    streak += 1;
                    window = (SEC * 2u32.pow((streak - 1).min(6))).min(BACKOFF_MAX);
                    failed_at = attempt.failed_at();
                }
                // Only new credentials would help: the longest backoff.
                (Outcome::Rejected, GrantType::Password) => {
                    streak += 1;
                    window = BACKOFF_MAX;
                    failed_at = at;
                }
                // The password grant follows.
                (Outcome::Rejected, _) => {}
                (Outcome::Pending, _) => unreachable!(),
            }
            earlier = previous;
            previous = Some(attempt);
        }
    }
}

/// `/oauth` attempts by grant and outcome.
fn tally<'a>(attempts: impl Iterator<Item = &'a Attempt>) -> Tally {
    let mut tally = Tally::default();
    for attempt in attempts {
        let slot = match attempt.settled() {
            Outcome::Issued(_) => 0,
            Outcome::Rejected => 1,
            _ => 2,
        };
        match attempt.grant {
            GrantType::Password => tally.password[slot] += 1,
            _ => tally.refresh[slot] += 1,
        }
        tally.refused += u64::from(attempt.refused);
    }
    tally
}

fn assert_day(day: u32, tally: &Tally, expect: &Expect) {
    let in_range = |value: u64, range: &RangeInclusive<u64>| range.contains(&value);
    assert!(
        in_range(tally.password[0], &expect.password),
        "day {day}: {tally:?}"
    );
    let rejected = tally.password[1];
    assert!(
        in_range(rejected, &expect.password_rejected),
        "day {day}: {tally:?}"
    );
    assert!(
        in_range(tally.refresh[1], &expect.rejected),
        "day {day}: {tally:?}"
    );
    assert!(
        in_range(tally.refresh[0], &expect.refreshed),
        "day {day}: {tally:?}"
    );
    assert!(
        in_range(tally.refresh[2] + tally.password[2], &expect.failed),
        "day {day}: {tally:?}"
    );
    assert!(
        in_range(tally.refused, &expect.refused),
        "day {day}: {tally:?}"
    );
    assert_eq!(
        tally.unauthorized, expect.unauthorized,
        "day {day}: {tally:?}"
    );
    assert!(
        in_range(tally.failed_requests, &expect.failed_requests),
        "day {day}: {tally:?}"
    );
}

/// The checks of a midnight with the token's timer running, and the day's counts.
fn day(month: &mut Month, d: u32, expect: Expect) {
    let tally = month.end_of_day(d, 1);
    assert_day(d, &tally, &expect);
}

/// `GET /banks` through a clone of `api`: the status, or the auth error.
async fn call(api: &VoltAuth<Volt>) -> Result<StatusCode, Error> {
    let request = Request::get("http://127.0.0.1:9/banks")
        .body(Body::default())
        .expect("request");
    let auth_error = |error: BoxError| match error.downcast::<Error>() {
        Ok(error) => *error,
        Err(other) => panic!("not a volt_auth::Error: {other}"),
    };
    let mut api = api.clone();
    let ready = api.ready().await.map_err(auth_error)?;
    let response = ready.call(request).await.map_err(auth_error)?;
    Ok(response.status())
}

#[tokio::test(start_paused = true)]
async fn a_month_of_service() {
    let mut month = Month::new();

    // Days 0-1: 1-hour tokens, from the first request's password grant.
    month.run_until(month.at(1, 0, 0)).await;
    day(
        &mut month,
        0,
        Expect {
            password: 1..=1,
            refreshed: 26..=26,
            ..HOURLY_DAY
        },
    );
    month.run_until(month.at(2, 0, 0)).await;
    day(&mut month, 1, HOURLY_DAY);

    // Day 2: 503 for 17 minutes, ending 3 minutes before expiry.
    month.run_until(month.at(2, 6, 0)).await;
    let exp = month.next_token().await.expires_at;
    let failed = month
        .outage(Fault::Unavailable, exp - 20 * MIN, exp - 3 * MIN)
        .await;
    assert_eq!(failed, 0);
    month.run_until(month.at(3, 0, 0)).await;
    day(
        &mut month,
        2,
        Expect {
            password: 0..=1,
            refreshed: 25..=27,
            failed: 3..=15,
            ..HOURLY_DAY
        },
    );
    month.run_until(month.at(4, 0, 0)).await;
    day(&mut month, 3, HOURLY_DAY);

    // Day 4: connections refused for 35 minutes across expiry. Refresh
    // tokens rotate hourly, so the refresh grant works again after it.
    month.run_until(month.at(4, 6, 0)).await;
    let exp = month.next_token().await.expires_at;
    let failed = month
        .outage(Fault::Refused, exp - 10 * MIN, exp + 25 * MIN)
        .await;
    // Every request after the margin (the one due exactly then may still get
    // the token) up to the first attempt after the outage (at the outage's
    // end at the earliest, a minute and a second later at the latest),
    // bursts included.
    assert!((1529..=1591 + BURST).contains(&failed), "{failed}");
    month.run_until(month.at(5, 0, 0)).await;
    let expect = Expect {
        password: 0..=1,
        refreshed: 24..=27,
        failed: 30..=80,
        refused: 30..=80,
        failed_requests: 1529..=1591 + BURST as u64,
        ..HOURLY_DAY
    };
    day(&mut month, 4, expect);
    month.run_until(month.at(6, 0, 0)).await;
    day(&mut month, 5, HOURLY_DAY);

    // Day 6: /oauth hangs for 40 minutes across expiry: every attempt times
    // out after 5 s, and requests that wait for it get the timeout.
    month.run_until(month.at(6, 6, 0)).await;
    let exp = month.next_token().await.expires_at;
    let failed = month
        .outage(Fault::Hanging, exp - 10 * MIN, exp + 30 * MIN)
        .await;
    // Fewer than for refusals: a request that meets an attempt waits 5 s
    // for its timeout, and the five due meanwhile are not sent.
    assert!((1500..=1800).contains(&failed), "{failed}");
    month.run_until(month.at(7, 0, 0)).await;
    let expect = Expect {
        password: 0..=1,
        refreshed: 24..=27,
        failed: 30..=90,
        failed_requests: 1500..=1800,
        ..HOURLY_DAY
    };
    day(&mut month, 6, expect);
    for d in 7..9 {
        month.run_until(month.at(d + 1, 0, 0)).await;
        day(&mut month, d, HOURLY_DAY);
    }

    // Days 9-10: no traffic from 18:00 to 20:00 the next day. The token
    // expires and its timer ends: no task is left. The first request finds the
    // refresh token expired too: invalid_grant, then the password grant.
    month.run_until(month.at(9, 18, 0)).await;
    month.idle_until(month.at(10, 0, 0)).await;
    let tally = month.end_of_day(9, 0);
    assert_day(
        9,
        &tally,
        &Expect {
            refreshed: 19..=20,
            ..HOURLY_DAY
        },
    );
    month.idle_until(month.at(10, 20, 0)).await;
    month.unscheduled.push(Instant::now());
    month.run_until(month.at(11, 0, 0)).await;
    let expect = Expect {
        password: 1..=1,
        rejected: 1..=1,
        refreshed: 4..=4,
        ..HOURLY_DAY
    };
    day(&mut month, 10, expect);
    month.run_until(month.at(12, 0, 0)).await;
    day(&mut month, 11, HOURLY_DAY);

    // Day 12: Volt revokes every access token: the next request's 401 costs
    // one refresh grant and one replay.
    month.run_until(month.at(12, 14, 20)).await;
    month.revoke(false);
    month.run_until(month.at(12, 14, 21)).await;
    assert_eq!(month.auth.stats().replays, 1);
    month.run_until(month.at(13, 0, 0)).await;
    let expect = Expect {
        refreshed: 26..=28,
        unauthorized: 1,
        ..HOURLY_DAY
    };
    day(&mut month, 12, expect);
    for d in 13..15 {
        month.run_until(month.at(d + 1, 0, 0)).await;
        day(&mut month, d, HOURLY_DAY);
    }

    // Day 15: from 12:00 Volt issues 24-hour tokens (the other mock), which
    // refuses the last 1-hour refresh token: the password grant, at once.
    month.run_until(month.at(15, 12, 0)).await;
    month.volt.ledger().issuer = DAILY;
    let token = month.next_token().await;
    // Issued when the request due then was served, a millisecond ago.
    assert_eq!(token.expires_at, Instant::now() - MS + DAY);
    month.run_until(month.at(16, 0, 0)).await;
    let expect = Expect {
        password: 1..=1,
        rejected: 1..=1,
        refreshed: 12..=14,
        ..HOURLY_DAY
    };
    day(&mut month, 15, expect);
    month.run_until(month.at(17, 0, 0)).await;
    day(&mut month, 16, DAILY_DAY);

    // Day 17: connections refused for 4 hours while the token is fresh.
    let exp = month.volt.current().expect("a token").expires_at;
    let failed = month
        .outage(Fault::Refused, exp - 8 * HOUR, exp - 4 * HOUR)
        .await;
    assert_eq!(failed, 0);
    month.run_until(month.at(18, 0, 0)).await;
    day(&mut month, 17, DAILY_DAY);
    month.run_until(month.at(19, 0, 0)).await;
    day(&mut month, 18, DAILY_DAY);

    // Day 19: connections refused for 58 minutes, ending 2 minutes before
    // expiry.
    let exp = month.volt.current().expect("a token").expires_at;
    let failed = month
        .outage(Fault::Refused, exp - HOUR, exp - 2 * MIN)
        .await;
    assert_eq!(failed, 0);
    month.run_until(month.at(20, 0, 0)).await;
    let expect = Expect {
        password: 0..=1,
        refreshed: 0..=1,
        failed: 3..=15,
        refused: 3..=15,
        ..DAILY_DAY
    };
    day(&mut month, 19, expect);
    for d in 20..22 {
        month.run_until(month.at(d + 1, 0, 0)).await;
        day(&mut month, d, DAILY_DAY);
    }

    // Day 22: 503 for 3.5 hours across expiry. The refresh token expired
    // with the access token: the password grant, after invalid_grant if the
    // attempt after the outage presents the refresh token.
    let exp = month.volt.current().expect("a token").expires_at;
    let failed = month
        .outage(Fault::Unavailable, exp - 30 * MIN, exp + 3 * HOUR)
        .await;
    assert!((10829..=10891 + 4 * BURST).contains(&failed), "{failed}");
    month.run_until(month.at(23, 0, 0)).await;
    let expect = Expect {
        password: 1..=1,
        rejected: 0..=1,
        refreshed: 0..=0,
        failed: 180..=390,
        failed_requests: 10829..=10891 + 4 * BURST as u64,
        ..DAILY_DAY
    };
    day(&mut month, 22, expect);
    month.run_until(month.at(24, 0, 0)).await;
    day(&mut month, 23, DAILY_DAY);

    // Day 24: someone changes the API user's password at Volt an hour before
    // the token expires, which also ends its refresh tokens, and changes it
    // back an hour after, without telling the layer. The refresh token is refused once; from then on each
    // capped backoff window costs one password grant, refused, and requests
    // fail with that rejection once the token has expired.
    let exp = month.volt.current().expect("a token").expires_at;
    let failed = month
        .outage(Fault::PasswordChanged, exp - HOUR, exp + HOUR)
        .await;
    assert!((3629..=3691 + 2 * BURST).contains(&failed), "{failed}");
    month.run_until(month.at(25, 0, 0)).await;
    let expect = Expect {
        password: 1..=1,
        password_rejected: 60..=140,
        rejected: 1..=1,
        refreshed: 0..=0,
        failed_requests: 3629..=3691 + 2 * BURST as u64,
        ..DAILY_DAY
    };
    day(&mut month, 24, expect);

    // Day 25: every access token revoked: one refresh, one replay; the
    // day's scheduled refresh is no longer due.
    month.run_until(month.at(25, 9, 0)).await;
    month.revoke(false);
    month.run_until(month.at(26, 0, 0)).await;
    assert_eq!(month.auth.stats().replays, 2);
    day(
        &mut month,
        25,
        Expect {
            unauthorized: 1,
            ..DAILY_DAY
        },
    );
    month.run_until(month.at(27, 0, 0)).await;
    day(&mut month, 26, DAILY_DAY);

    // Day 27: access and refresh tokens revoked: the refresh grant is
    // refused, the password grant follows in the same flight, one replay.
    month.run_until(month.at(27, 20, 0)).await;
    month.revoke(true);
    month.run_until(month.at(28, 0, 0)).await;
    let expect = Expect {
        password: 1..=1,
        rejected: 1..=1,
        unauthorized: 1,
        ..DAILY_DAY
    };
    day(&mut month, 27, expect);

    // Day 28: /oauth hangs for 1 h 57 min, ending 3 minutes before expiry.
    let exp = month.volt.current().expect("a token").expires_at;
    let failed = month
        .outage(Fault::Hanging, exp - 2 * HOUR, exp - 3 * MIN)
        .await;
    assert_eq!(failed, 0);
    month.run_until(month.at(29, 0, 0)).await;
    day(
        &mut month,
        28,
        Expect {
            password: 0..=1,
            refreshed: 0..=1,
            failed: 2..=12,
            ..DAILY_DAY
        },
    );
    month.run_until(month.at(30, 0, 0)).await;
    day(&mut month, 29, DAILY_DAY);

    // The month in total: password grants on days 0, 10, 15, 22, 24 and 27,
    // each but the first (and perhaps the one of day 22) after a refused
    // refresh token, which was never presented again, and perhaps one after
    // each of the outages of days 2, 4, 6, 19 and 28; three 401s, each
    // replayed once.
    let stats = month.auth.stats();
    assert!((6..=11).contains(&stats.password.succeeded), "{stats:?}");
    assert!((4..=5).contains(&stats.refresh.rejected), "{stats:?}");
    assert_eq!(stats.replays, 3);
    assert_eq!(month.volt.ledger().unauthorized.len(), 3);
    assert_eq!(month.volt.ledger().presented_again, 0);

    // The busiest minutes of the log, by level: bounded by the backoff.
    let mut minutes: HashMap<u64, [u64; 3]> = HashMap::new();
    for event in common::log::events(&month.log) {
        let slot = match event.level {
            Level::WARN => 0,
            Level::INFO => 1,
            _ => 2,
        };
        minutes.entry(event.at.as_secs() / 60).or_default()[slot] += 1;
    }
    let busiest = |slot: usize| minutes.values().map(|m| m[slot]).max().unwrap_or(0);
    println!(
        "month: busiest minute: {} warn, {} info, {} debug; {} minutes with a warning",
        busiest(0),
        busiest(1),
        busiest(2),
        minutes.values().filter(|m| m[0] > 0).count()
    );
    assert!(busiest(0) <= 16 && busiest(1) <= 1, "{minutes:?}");

    // Dropping the layer stops its timer: nothing is left running.
    drop(month);
    tokio::task::yield_now().await;
    assert_eq!(Handle::current().metrics().num_alive_tasks(), 0);
}

// ---------------------------------------------------------------------------------------------
// Log volume at 1,000 requests a minute
// ---------------------------------------------------------------------------------------------

/// One minute of a log-volume run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Minute {
    /// `/oauth` calls.
    oauth: usize,
    /// Requests answered 200, answered 401, failed with an auth error.
    ok: usize,
    unauthorized: usize,
    errors: usize,
    /// Events by level.
    error: usize,
    warn: usize,
    info: usize,
    debug: usize,
    trace: usize,
}

/// 1,000 `GET /banks` a minute, one at a time, through a layer over the
/// in-process `mock` whose `/oauth` calls `script` may break at the start of
/// any minute, for `minutes` minutes: what each minute saw.
async fn log_volume(
    mock: &MockVolt,
    minutes: u32,
    mut script: impl FnMut(u32, &VoltAuthLayer),
) -> (Vec<Minute>, VoltAuthLayer) {
    const EVERY: Duration = Duration::from_millis(60);
    let (capture, _guard) = common::log::scoped();
    let start = Instant::now();
    let oauth = common::Recorder::new(mock);
    let auth = common::builder(mock).build(oauth.clone()).expect("layer");
    let mut api = auth.layer(mock.service());
    let mut seen = vec![Minute::default(); minutes as usize];
    let mut next = start;
    for minute in 0..minutes {
        sleep_until(start + MIN * minute).await;
        script(minute, &auth);
        let end = start + MIN * (minute + 1);
        while next < end {
            sleep_until(next).await;
            next += EVERY;
            let request = common::get(mock, "/banks");
            let tally = &mut seen[minute as usize];
            match api.ready().await.expect("ready").call(request).await {
                Ok(response) if response.status() == StatusCode::OK => tally.ok += 1,
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED => {
                    tally.unauthorized += 1;
                }
                Ok(response) => panic!("{}", response.status()),
                Err(error) => {
                    assert!(error.is::<Error>(), "{error}");
                    tally.errors += 1;
                }
            }
        }
    }
    sleep_until(start + MIN * minutes).await;
    // Each /oauth call, by when the mock answered it (at once: in process,
    // without a delay).
    for at in oauth.times_since(start) {
        seen[(at.as_secs() / 60) as usize].oauth += 1;
    }
    for event in common::log::events(&capture) {
        let tally = &mut seen[(event.at.as_secs() / 60) as usize];
        match event.level {
            Level::ERROR => tally.error += 1,
            Level::WARN => tally.warn += 1,
            Level::INFO => tally.info += 1,
            Level::DEBUG => tally.debug += 1,
            _ => tally.trace += 1,
        }
    }
    (seen, auth)
}

/// Prints a run's minutes, for the record (`--nocapture`).
fn print_minutes(name: &str, minutes: &[Minute]) {
    for (minute, seen) in minutes.iter().enumerate() {
        println!("{name} minute {minute}: {seen:?}");
    }
}

const UNAVAILABLE: &str = r#"{"code":503,"message":"Service Unavailable"}"#;

#[tokio::test(start_paused = true)]
async fn an_hour_of_oauth_outage_logs_per_attempt_not_per_request() {
    // /oauth answers 503 from minute 20 to minute 80; the hour-long token
    // issued at minute 0 turns stale at 54-55 and stops being served at
    // 59:30.
    let mock = MockVolt::builder().in_process();
    let (minutes, auth) = log_volume(&mock, 100, |minute, auth| match minute {
        20 => mock.fail_oauth(usize::MAX, StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE),
        70 => {
            // Ten minutes after expiry: a health check's view.
            let stats = auth.stats();
            assert!(stats.failures >= 10, "{stats:?}");
            let failed = stats.refresh.failed + stats.password.failed;
            assert_eq!(stats.failures as u64, failed, "{stats:?}");
            assert_eq!(stats.remaining, None, "{stats:?}");
            assert!(
                stats.retry_in.is_some_and(|wait| wait <= BACKOFF_MAX),
                "{stats:?}"
            );
            let error = stats.last_error.expect("the last error");
            assert!(
                matches!(&error, Error::Failed { response, .. }
                    if response.status == StatusCode::SERVICE_UNAVAILABLE),
                "{error:?}"
            );
        }
        80 => mock.fail_oauth(0, StatusCode::OK, ""),
        _ => {}
    })
    .await;
    print_minutes("outage", &minutes);
    let broken = |minute: usize| (20..80).contains(&minute);
    for (minute, seen) in minutes.iter().enumerate() {
        // Two warnings per failed attempt (the attempt, the backoff), one
        // debug event per token: nothing per request, at any level.
        let failed = if broken(minute) { seen.oauth } else { 0 };
        let issued = seen.oauth - failed;
        assert_eq!(
            (seen.error, seen.warn, seen.info, seen.debug, seen.trace),
            (0, 2 * failed, 0, issued, 0),
            "minute {minute}: {seen:?}"
        );
        // The backoff: 1 s doubling, jittered down to half, so at most eight
        // attempts in a minute.
        assert!(seen.oauth <= 8, "minute {minute}: {seen:?}");
        assert_eq!(seen.ok + seen.errors, 1000, "minute {minute}: {seen:?}");
        assert_eq!(seen.unauthorized, 0);
    }
    // No /oauth call while the token was fresh, none failed request while it
    // was served; every request between 59:30 and the first attempt after
    // minute 80 failed.
    assert_eq!(minutes[..54].iter().map(|m| m.oauth).sum::<usize>(), 1);
    assert_eq!(minutes[..59].iter().map(|m| m.errors).sum::<usize>(), 0);
    assert_eq!(minutes[60..80].iter().map(|m| m.ok).sum::<usize>(), 0);
    assert!(minutes[81..].iter().all(|m| m.errors == 0));

    let stats = auth.stats();
    let failed: usize = minutes[20..80].iter().map(|m| m.oauth).sum();
    let (refresh, password) = alternated(failed as u64);
    assert_eq!(stats.password, grants(1 + password.0, 0, password.1));
    assert_eq!(stats.refresh, grants(refresh.0, 0, refresh.1));
    assert_eq!((stats.refreshes, stats.replays), (2, 0));
    assert_eq!((stats.failures, stats.retry_in), (0, None));
    assert!(stats.last_error.is_none(), "{stats:?}");
    // The hour-long token issued in minute 80.
    let remaining = stats.remaining.expect("a token");
    assert!(
        remaining >= 40 * MIN && remaining < 41 * MIN,
        "{remaining:?}"
    );
}

/// After `failed` attempts in a row, the first presenting the refresh
/// token, then one that succeeds: each grant's (succeeded, failed) attempts,
/// refresh then password, as the alternating grants make them.
fn alternated(failed: u64) -> ((u64, u64), (u64, u64)) {
    let password_last = failed % 2 == 1;
    (
        (u64::from(!password_last), failed.div_ceil(2)),
        (u64::from(password_last), failed / 2),
    )
}

/// `GrantStats` with these counts.
fn grants(succeeded: u64, rejected: u64, failed: u64) -> volt_auth::GrantStats {
    let mut stats = volt_auth::GrantStats::default();
    stats.succeeded = succeeded;
    stats.rejected = rejected;
    stats.failed = failed;
    stats
}

#[tokio::test(start_paused = true)]
async fn a_storm_of_401s_logs_per_forced_refresh_not_per_request() {
    // Volt rejects every token from minute 10 to minute 70; /oauth answers
    // 503 from minute 40 to minute 70 too.
    let mock = MockVolt::builder().in_process();
    let (minutes, auth) = log_volume(&mock, 90, |minute, _| match minute {
        10 => mock.reject_all_tokens(true),
        40 => mock.fail_oauth(usize::MAX, StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE),
        70 => {
            mock.reject_all_tokens(false);
            mock.fail_oauth(0, StatusCode::OK, "");
        }
        _ => {}
    })
    .await;
    print_minutes("storm", &minutes);
    for (minute, seen) in minutes.iter().enumerate() {
        let (levels, what) = (
            (seen.error, seen.warn, seen.info),
            format!("minute {minute}: {seen:?}"),
        );
        match minute {
            // Every request's 401 goes back to it (debug): a forced refresh
            // and a replay per throttle period (1 s doubling to 1 min),
            // logged at debug.
            11..40 => {
                assert_eq!(levels, (0, 0, 0), "{what}");
                assert_eq!((seen.oauth, seen.unauthorized), (1, 1000), "{what}");
            }
            // The first forced refresh that fails returns its 401 (at
            // debug: every request in flight with the token does); from
            // then on requests get the refresh's error at once, and each
            // attempt, one per backoff, warns twice.
            40 => assert_eq!(levels, (0, 2 * seen.oauth, 0), "{what}"),
            41..70 => {
                assert_eq!(levels, (0, 2 * seen.oauth, 0), "{what}");
                assert!((1..=2).contains(&seen.oauth), "{what}");
                assert_eq!(seen.errors, 1000, "{what}");
            }
            _ => {
                assert_eq!(levels, (0, 0, 0), "{what}");
                assert!(seen.oauth <= 6, "{what}");
            }
        }
    }
    let stats = auth.stats();
    let forced: usize = minutes[10..40].iter().map(|m| m.oauth).sum();
    let failed: usize = minutes[40..70].iter().map(|m| m.oauth).sum();
    let (refresh, password) = alternated(failed as u64);
    assert_eq!(stats.password, grants(1 + password.0, 0, password.1));
    assert_eq!(
        stats.refresh,
        grants(forced as u64 + refresh.0, 0, refresh.1)
    );
    assert_eq!(stats.refreshes, forced as u64 + 2);
    assert_eq!(stats.replays, forced as u64);
    assert_eq!((stats.failures, stats.retry_in), (0, None));
    assert!(stats.last_error.is_none(), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn a_minute_long_token_is_refreshed_once_a_third_of_its_life_before_expiry() {
    // Shorter than refresh-ahead (5 min) and twice the margin (30 s): both
    // windows shrink to the lifetime's, refresh-ahead to 20 s (up to 24 s
    // with its jitter), the margin to 6 s.
    let mock = MockVolt::builder().access_token_lifetime(MIN).in_process();
    let (minutes, auth) = log_volume(&mock, 30, |_, _| {}).await;
    print_minutes("short", &minutes);
    for (minute, seen) in minutes.iter().enumerate() {
        // A refresh every 36-40 s; no token used past its expiry (the mock
        // would have answered 401).
        let what = format!("minute {minute}: {seen:?}");
        assert!((1..=2).contains(&seen.oauth), "{what}");
        assert_eq!(
            (seen.ok, seen.unauthorized, seen.errors),
            (1000, 0, 0),
            "{what}"
        );
        assert_eq!(
            (seen.error, seen.warn, seen.info, seen.debug),
            (0, 0, 0, seen.oauth),
            "{what}"
        );
    }
    let calls: usize = minutes.iter().map(|m| m.oauth).sum();
    // 30 minutes at one every 36-40 s after the first.
    assert!((46..=51).contains(&calls), "{calls}");
    let stats = auth.stats();
    assert_eq!(stats.password, grants(1, 0, 0));
    assert_eq!(stats.refresh, grants(calls as u64 - 1, 0, 0));
    assert_eq!((stats.refreshes, stats.replays), (calls as u64, 0));
    assert!(
        stats
            .remaining
            .is_some_and(|left| left > 20 * SEC && left <= MIN),
        "{stats:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_password_logs_per_capped_backoff_not_per_request() {
    // From minute 0 the layer holds a password Volt refuses; at minute 30
    // it is given the right one.
    let mock = MockVolt::builder().in_process();
    let wrong =
        || volt_auth::Credentials::new(mock::CLIENT_ID, mock::CLIENT_SECRET, mock::USERNAME, "old");
    let (minutes, auth) = log_volume(&mock, 40, |minute, auth| match minute {
        0 => auth.set_credentials(wrong()),
        20 => {
            let stats = auth.stats();
            assert_eq!(stats.failures as u64, stats.password.rejected, "{stats:?}");
            assert!(
                stats.retry_in.is_some_and(|wait| wait <= BACKOFF_MAX),
                "{stats:?}"
            );
            assert_eq!(stats.remaining, None, "{stats:?}");
            let error = stats.last_error.expect("the last error");
            assert!(
                error.is_rejected() && error.grant() == Some(GrantType::Password),
                "{error:?}"
            );
        }
        30 => auth.set_credentials(mock.credentials()),
        _ => {}
    })
    .await;
    print_minutes("refused", &minutes);
    for (minute, seen) in minutes.iter().enumerate() {
        let what = format!("minute {minute}: {seen:?}");
        let levels = (seen.error, seen.warn, seen.info, seen.debug, seen.trace);
        match minute {
            // Each refused password grant: two warnings; the next after
            // 30-60 s; requests in between get the rejection at once.
            0..30 => {
                let replaced = usize::from(minute == 0);
                assert_eq!(levels, (0, 2 * seen.oauth, replaced, 0, 0), "{what}");
                assert!((1..=2).contains(&seen.oauth), "{what}");
                assert_eq!(seen.errors, 1000, "{what}");
            }
            // The new credentials: one password grant, at once.
            30 => {
                assert_eq!(levels, (0, 0, 1, 1, 0), "{what}");
                assert_eq!((seen.oauth, seen.ok), (1, 1000), "{what}");
            }
            _ => assert_eq!(
                (levels, seen.oauth, seen.ok),
                ((0, 0, 0, 0, 0), 0, 1000),
                "{what}"
            ),
        }
    }
    let refused: usize = minutes[..30].iter().map(|m| m.oauth).sum();
    let stats = auth.stats();
    assert_eq!(stats.password, grants(1, refused as u64, 0));
    assert_eq!(stats.refresh, grants(0, 0, 0));
    assert_eq!(
        (stats.failures, stats.retry_in, stats.refreshes),
        (0, None, 1)
    );
    assert!(stats.last_error.is_none(), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn credentials_set_again_unchanged_by_a_poller_cost_nothing() {
    // A secret-store poller (or a file watcher, which fires more than once
    // per change) hands the layer the credentials every 10 s. Until minute
    // 10 they are the ones in use; from minute 10, a new password Volt does
    // not know yet; from minute 20, the right one again.
    let mock = MockVolt::builder().in_process();
    let wrong =
        || volt_auth::Credentials::new(mock::CLIENT_ID, mock::CLIENT_SECRET, mock::USERNAME, "new");
    let (minutes, auth) = log_volume(&mock, 30, |minute, auth| {
        let credentials = || {
            if (10..20).contains(&minute) {
                wrong()
            } else {
                mock.credentials()
            }
        };
        if minute == 0 {
            // Before the first request: the layer's own credentials.
            auth.set_credentials(credentials());
            return;
        }
        // Six times a minute, from within the minute's traffic: the
        // script is called at its start, so spawn the rest.
        auth.set_credentials(credentials());
        let (auth, credentials) = (auth.clone(), credentials());
        tokio::spawn(async move {
            for _ in 1..6 {
                tokio::time::sleep(10 * SEC).await;
                auth.set_credentials(credentials.clone());
            }
        });
    })
    .await;
    print_minutes("poller", &minutes);
    let oauth: Vec<usize> = minutes.iter().map(|m| m.oauth).collect();
    let info: Vec<usize> = minutes.iter().map(|m| m.info).collect();
    // One password grant, logged once, per change of credentials: the
    // first request's, the new password's (refused; the token held is fresh,
    // so nothing more is tried), the right one's.
    let once = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(oauth, [once, once, once].concat(), "{oauth:?}");
    assert_eq!(info.iter().sum::<usize>(), 2, "{info:?}");
    assert_eq!((minutes[10].warn, minutes[10].info), (2, 1));
    assert!(
        minutes.iter().all(|m| m.errors == 0),
        "the token held kept serving"
    );
    let stats = auth.stats();
    assert_eq!(stats.password, grants(2, 1, 0), "{stats:?}");
    assert_eq!(stats.refresh.attempts(), 0, "{stats:?}");
}
