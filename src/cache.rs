//! The token cache: one current token behind an [`ArcSwap`], read lock-free on
//! every request, and one refresh at a time for every caller.
//!
//! A token lives through three phases, flipped by a timer rather than by a
//! clock read per request:
//!
//! - **fresh**: requests use it;
//! - **stale** (inside the refresh-ahead window): requests still use it, and the
//!   first one to notice starts a background refresh;
//! - **expired** (inside the expiry margin, or rejected with a 401): requests
//!   wait for the refresh.
//!
//! Callers that ask the cache rather than read the token on the hot path
//! (`access_token()`, a 401's renewal, a replay about to be sent, a request
//! that found no token) read the clock, and a timer that lags behind it is
//! caught up (see [`caught_up`]).
//!
//! Refreshes are spawned, so a caller that gives up does not cancel the refresh
//! others wait for. A refresh presents the refresh token, and falls back to the
//! password grant when Volt rejects it; a refresh token is not presented again
//! once refused, or answered with a token that arrived expired. After a
//! refresh grant that failed otherwise, the next attempt is the password
//! grant, and the one after that presents the refresh token again. A failed
//! refresh is retried after an exponential, jittered backoff, cut short to end
//! when the current token stops being served, or after the server's
//! `Retry-After` if longer (at most the backoff maximum); until then, requests
//! keep the token while it is valid and otherwise get the refresh's error at
//! once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::error::{Error, GrantType};
use crate::oauth::{Grant, Token, TokenSource};

mod ticket;

pub(crate) use ticket::{AnsweredElsewhere, Redirected, Ticket};

const FRESH: u8 = 0;
const STALE: u8 = 1;
const EXPIRED: u8 = 2;
/// The entry's timer is gone with the runtime it ran on: the clock decides
/// the phase at the next request, which times the entry again.
const UNTIMED: u8 = 3;

/// Why a token that arrived past its expiry margin is refused (see
/// [`Shared::attempt`]).
const EXPIRED_ON_ARRIVAL: &str = "the token expired before its answer arrived";

/// How far the refresh-ahead point is moved earlier at random, as a fraction of
/// the refresh-ahead window, so that processes started together spread out.
const JITTER: f64 = 0.2;

/// When to refresh and how to back off.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) refresh_ahead: Duration,
    pub(crate) expiry_margin: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    /// How long after a refresh started a waiter takes it for stranded on a
    /// runtime nothing drives, and starts another on its own: longer than a
    /// refresh takes on a runtime that runs.
    pub(crate) stranded_after: Duration,
}

/// The token requests use, the phase it is in, and when its phases change.
struct Entry {
    token: Option<Arc<Token>>,
    generation: u64,
    /// The id of the cache it belongs to, for its [`Ticket`]s.
    cache: u64,
    /// The token came from a refresh a 401 forced and no response has
    /// accepted it yet.
    unconfirmed: AtomicBool,
    phase: AtomicU8,
    stale_at: Instant,
    expired_at: Instant,
}

impl Entry {
    /// The phase the clock gives at `now`.
    fn phase_at(&self, now: Instant) -> u8 {
        if now >= self.expired_at {
            EXPIRED
        } else if now >= self.stale_at {
            STALE
        } else {
            FRESH
        }
    }
}

/// A token handed to a caller, with the ticket its response is settled with.
#[derive(Clone, Debug)]
pub(crate) struct Lease {
    pub(crate) token: Arc<Token>,
    pub(crate) ticket: Ticket,
}

/// A service's own handle on the current token (see [`TokenCache::attach_local`]).
#[derive(Clone)]
pub(crate) struct LocalToken(arc_swap::Cache<Arc<ArcSwap<Entry>>, Arc<Entry>>);

/// Shared by every clone of the layer, its services and their futures.
#[derive(Clone)]
pub(crate) struct TokenCache {
    shared: Arc<Shared>,
}

struct Shared {
    /// This cache's key in the registry that [`Ticket`]s look it up in.
    id: u64,
    current: Arc<ArcSwap<Entry>>,
    /// Whether a request that sees a stale token may start a background refresh.
    may_kick: AtomicBool,
    /// The number of the latest [`Rearm`]: one replaced by a later one sets
    /// nothing when its aborted task drops it.
    rearms: AtomicU64,
    /// The latest refresh whose task was dropped with its runtime (see
    /// [`FinishOnDrop`]); if it is the running one, the next caller under the
    /// lock ends it.
    abandoned: AtomicU64,
    flight: Mutex<Flight>,
    /// The number of the latest refresh to end, and its error: a waiter takes
    /// only the outcome of the refresh it waits for (or a later one). Never
    /// goes back to an earlier number (see [`Shared::publish`]).
    done: watch::Sender<(u64, Option<Error>)>,
    source: Box<dyn TokenSource>,
    settings: Settings,
    counters: Counters,
}

/// The slow-path state, behind a mutex that is never held across an await
/// nor while an event is logged (a subscriber may read the stats, which take
/// it).
#[derive(Default)]
struct Flight {
    running: bool,
    /// The number of the latest refresh started: a refresh given up on
    /// (see [`Settings::stranded_after`]) publishes nothing when it ends.
    flight: u64,
    /// When the latest refresh started: its waiters give it up
    /// [`Settings::stranded_after`] later.
    started_at: Option<Instant>,
    generation: u64,
    failures: u32,
    retry_at: Option<Instant>,
    /// When the `Retry-After` the server asked for with the last failure
    /// ends (capped as in [`Settings::backoff`]): new credentials end the
    /// backoff, but not this.
    asked_until: Option<Instant>,
    /// A password grant with new credentials waits for `asked_until`: the
    /// end of the backoff starts it (see [`Shared::start_deferred`]).
    deferred: bool,
    last_error: Option<Error>,
    forced_at: Option<Instant>,
    forced_streak: u32,
    /// Whether the running refresh was forced by a 401.
    forcing: bool,
    /// The generation whose refresh token Volt refused, or answered with a
    /// token that arrived expired, or a refresh given up or dropped at
    /// /oauth may have presented: later refreshes of that token go straight
    /// to the password grant (0: none).
    refused_refresh: u64,
    /// The generation whose refresh token the last refresh presented and
    /// failed with otherwise than by a refusal (a 5xx, a timeout, an
    /// unreadable answer): the next refresh uses the password grant instead,
    /// in case the refresh path is what is broken, and the one after it
    /// presents that refresh token again (0: none).
    failed_refresh: u64,
    /// The generation whose refresh token the running refresh presents (0:
    /// none, or not yet): if the refresh is given up or dropped with its
    /// runtime, the next one must not present it too, while Volt may be
    /// rotating it.
    presenting: u64,
    /// The credentials were replaced while the running refresh ran, after
    /// it sent them (or a refresh token): when it ends, a password grant
    /// with the new ones starts.
    rotated: bool,
    timer: Option<AbortHandle>,
    /// The task that rearms `may_kick` when the backoff ends; aborted with
    /// the cache, so that it does not sleep on for up to `backoff_max`.
    rearm: Option<AbortHandle>,
}

enum Begin {
    Ready(Lease),
    Keep,
    /// For the refresh of this number, until it is taken for stranded at
    /// this deadline.
    Wait(u64, Instant),
}

impl TokenCache {
    pub(crate) fn new(source: impl TokenSource, settings: Settings) -> Self {
        let (done, _) = watch::channel((0, None));
        let now = Instant::now();
        let id = ticket::next_id();
        let cache = Self {
            shared: Arc::new(Shared {
                id,
                current: Arc::new(ArcSwap::from_pointee(Entry {
                    token: None,
                    generation: 0,
                    cache: id,
                    unconfirmed: AtomicBool::new(false),
                    phase: AtomicU8::new(EXPIRED),
                    stale_at: now,
                    expired_at: now,
                })),
                may_kick: AtomicBool::new(true),
                rearms: AtomicU64::new(0),
                abandoned: AtomicU64::new(0),
                flight: Mutex::new(Flight::default()),
                done,
                source: Box::new(source),
                settings,
                counters: Counters::default(),
            }),
        };
        ticket::register(&cache.shared);
        cache
    }

    /// The hot path: puts the current token in `headers` and returns the
    /// ticket to settle the response with, or `None` when the caller must wait
    /// for [`TokenCache::token`]. One atomic load, no lock, no clock read, no
    /// reference count shared with other threads.
    #[inline]
    #[cfg(any(feature = "reqwest", test))]
    pub(crate) fn attach(&self, headers: &mut HeaderMap) -> Option<Ticket> {
        self.read(&self.shared.current.load(), headers)
    }

    /// [`TokenCache::attach`] through a per-service [`LocalToken`]: while the
    /// token is unchanged, one relaxed load of the shared pointer.
    #[inline]
    pub(crate) fn attach_local(
        &self,
        local: &mut LocalToken,
        headers: &mut HeaderMap,
    ) -> Option<Ticket> {
        self.read(local.0.load(), headers)
    }

    /// [`TokenCache::attach`] for a caller off the hot path, by the clock as
    /// [`TokenCache::token`] decides: a token whose timer lags or went with
    /// its runtime is not taken for expired (nor for valid) on its timer's
    /// word, so a caller that then asked [`TokenCache::token`] would not be
    /// handed the same token it refused.
    #[cold]
    pub(crate) fn attach_by_clock(&self, headers: &mut HeaderMap) -> Option<Ticket> {
        let entry = self.shared.current.load();
        let token = entry.token.as_ref()?;
        let now = Instant::now();
        match caught_up(&entry, now) {
            EXPIRED => return None,
            UNTIMED if entry.phase_at(now) == EXPIRED => return None,
            STALE => self.shared.kick(entry.generation),
            _ => {}
        }
        headers.insert(AUTHORIZATION, token.header().clone());
        Some(entry.ticket())
    }

    /// A per-service view of the current token.
    pub(crate) fn local(&self) -> LocalToken {
        LocalToken(arc_swap::Cache::new(self.shared.current.clone()))
    }

    #[inline(always)]
    fn read(&self, entry: &Entry, headers: &mut HeaderMap) -> Option<Ticket> {
        match entry.phase.load(Ordering::Acquire) {
            FRESH => {}
            STALE => self.shared.kick(entry.generation),
            _ => return None,
        }
        let token = entry.token.as_ref()?;
        headers.insert(AUTHORIZATION, token.header().clone());
        Some(entry.ticket())
    }

    /// A valid token, waiting for the one refresh if there is none.
    pub(crate) async fn token(&self) -> Result<Lease, Error> {
        match self.acquire(None).await? {
            Some(lease) => Ok(lease),
            // Only a rejected generation can be kept; there is none here.
            None => Err(Error::Interrupted),
        }
    }

    /// After a 401 to the token of `rejected`, for the request's replay: a
    /// newer token (waiting for the one refresh if needed), or `None` when no
    /// newer token may be had yet: 401-driven refreshes are throttled, and no
    /// refresh is under way.
    /// The replay is counted by [`TokenCache::replayed`] when it is sent.
    pub(crate) async fn renew(&self, rejected: u64) -> Result<Option<Lease>, Error> {
        self.acquire(Some(rejected)).await
    }

    /// A request renewed after a 401 is being sent again, with the token of
    /// `generation`. Counted here rather than at the renewal: a caller that
    /// gives up, or a service that fails to get ready, replays nothing.
    pub(crate) fn replayed(&self, generation: u64) {
        self.shared.counters.replays.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(generation, "replaying a request after a 401");
    }

    /// After a 401 that will not be replayed: invalidates the token of
    /// `rejected` (unless throttled) and starts the refresh without waiting
    /// (during a backoff, the first request that waits for a token after it
    /// starts the refresh).
    pub(crate) fn invalidate(&self, rejected: u64) {
        // Errors reach the next request that waits; nothing waits here.
        let _ = Shared::begin(&self.shared, Some(rejected));
    }

    /// A 401 to a call made outside the layer with the token of `ticket`:
    /// [`TokenCache::invalidate`], if the token came from this cache.
    pub(crate) fn reject(&self, ticket: &Ticket) {
        if ticket.cache == self.shared.id {
            self.invalidate(ticket.generation);
        }
    }

    /// The credentials were replaced: the token held keeps serving, its
    /// refresh token (of the old credentials' session) is not presented, and
    /// one password grant with the new credentials starts in the background,
    /// whatever backoff the old ones earned, once a `Retry-After` the server
    /// asked for is over. If a refresh is running, it starts when that one
    /// ends instead (never two at once), unless that one's password grant
    /// sends the new credentials.
    pub(crate) fn credentials_replaced(&self) {
        let shared = &self.shared;
        let mut flight = shared.lock();
        shared.reclaim(&mut flight);
        if flight.running {
            // Refused now, so that the running refresh, or the next one if
            // it is given up, does not present it either.
            flight.refused_refresh = shared.current.load().generation;
            flight.rotated = true;
            return;
        }
        shared.start_with_new_credentials(&mut flight);
    }

    /// A response other than 401 to a request that carried `generation`, one
    /// a token check stands behind (not a gateway's 5xx, say): a token from a
    /// forced refresh that the server accepts ends the throttle's escalation.
    pub(crate) fn accepted(&self, generation: u64) {
        let shared = &self.shared;
        if generation == 0 {
            return;
        }
        // Under the lock that refreshes publish under: a newer forced token
        // keeps its own mark and its own streak.
        let mut flight = shared.lock();
        let entry = shared.current.load();
        if entry.generation == generation && entry.unconfirmed.load(Ordering::Relaxed) {
            entry.unconfirmed.store(false, Ordering::Relaxed);
            flight.forced_streak = 0;
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let counters = &self.shared.counters;
        let entry = self.shared.current.load();
        let now = Instant::now();
        let live = match entry.phase.load(Ordering::Acquire) {
            EXPIRED => false,
            UNTIMED => entry.phase_at(now) != EXPIRED,
            _ => true,
        };
        let remaining = match &entry.token {
            Some(token) if live => Some(token.expires_at().saturating_duration_since(now)),
            _ => None,
        };
        let flight = self.shared.lock();
        Stats {
            password: counters.grant(GrantType::Password),
            refresh: counters.grant(GrantType::RefreshToken),
            refreshes: counters.refreshes.load(Ordering::Relaxed),
            replays: counters.replays.load(Ordering::Relaxed),
            remaining,
            failures: flight.failures,
            retry_in: flight
                .retry_at
                .map(|at| at.saturating_duration_since(now))
                .filter(|wait| !wait.is_zero()),
            last_error: flight.last_error.clone(),
        }
    }

    async fn acquire(&self, rejected: Option<u64>) -> Result<Option<Lease>, Error> {
        loop {
            let mut done = self.shared.done.subscribe();
            let (flight, deadline) = match Shared::begin(&self.shared, rejected)? {
                Begin::Ready(lease) => return Ok(Some(lease)),
                Begin::Keep => return Ok(None),
                Begin::Wait(flight, deadline) => (flight, deadline),
            };
            // Waiting takes Tokio's timer: outside a runtime (another
            // executor's `block_on`) the wait would panic.
            Handle::try_current().map_err(|_| Error::NoRuntime)?;
            // A refresh spawned on a runtime that nothing drives (a sync
            // worker's `current_thread` runtime between `block_on` calls)
            // would hold up every waiter on other runtimes. Counted from the
            // refresh's start, not the waiter's: a refresh-ahead stranded
            // minutes ago holds up no request at the token's expiry.
            match timeout_at(deadline, done.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Interrupted),
                Err(_) => {
                    self.shared.strand(flight);
                    continue;
                }
            }
            // An earlier refresh's outcome, published late: not this one's.
            let (number, error) = done.borrow_and_update().clone();
            if number < flight {
                continue;
            }
            if let Some(error) = error {
                return Err(error);
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Flight> {
        self.flight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a background refresh for the stale token of `generation`, once.
    fn kick(self: &Arc<Self>, generation: u64) {
        if self.may_kick.load(Ordering::Relaxed) && self.may_kick.swap(false, Ordering::AcqRel) {
            let mut flight = self.lock();
            let entry = self.current.load();
            if entry.generation == generation && entry.phase.load(Ordering::Acquire) == STALE {
                self.start_if_due(&mut flight, Instant::now());
            } else {
                // A refresh finished since the token was read: the flag
                // belongs to the new token.
                self.may_kick.store(true, Ordering::Release);
            }
        }
    }

    /// Starts a background refresh unless one runs or a backoff is not over.
    /// Whoever clears `may_kick` calls this; it is set again when a token
    /// arrives, a backoff ends, or a refresh is given up (stranded, or
    /// dropped with its runtime).
    fn start_if_due(self: &Arc<Self>, flight: &mut Flight, now: Instant) {
        self.reclaim(flight);
        if flight.running {
            // Its end sets the flag again.
            return;
        }
        match flight.retry_at {
            // The flag was set before the backoff ended: the task that was
            // to set it at the end went with its runtime. Set it again from
            // this one.
            Some(at) if now < at => self.rearm(flight, at),
            // Without a runtime there is no background refresh; the request
            // that later waits for the token reports the error, and the next
            // stale read tries again.
            _ => {
                if self.start(flight).is_err() {
                    self.may_kick.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Lets a stale token's readers start a refresh again at `at`, the end
    /// of a backoff (or as soon as this runtime shuts down), replacing the
    /// task that was to do it; at `at`, starts the grant with new
    /// credentials the backoff deferred, if any. Outside a runtime, at once:
    /// the next stale read tries again.
    fn rearm(self: &Arc<Self>, flight: &mut Flight, at: Instant) {
        // Before the abort: the task replaced must not set the flag as it is
        // dropped, which would let the next stale read in to replace this one.
        let number = self.rearms.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(previous) = flight.rearm.take() {
            previous.abort();
        }
        let Ok(handle) = Handle::try_current() else {
            self.may_kick.store(true, Ordering::Release);
            return;
        };
        let rearm = Rearm {
            shared: Arc::downgrade(self),
            number,
        };
        let task = handle.spawn(async move {
            sleep_until(at).await;
            if let Some(shared) = rearm.shared.upgrade() {
                shared.start_deferred(rearm.number);
            }
            drop(rearm);
        });
        flight.rearm = Some(task.abort_handle());
    }

    /// After the credentials were replaced, with no refresh running: the
    /// token held is refused its refresh token (of the old credentials'
    /// session), and a password grant with the new credentials starts. The
    /// backoff the old ones earned ends for it, but for a `Retry-After` the
    /// server asked for: then it starts when that ends. The backoff's
    /// escalation stays, so that ordinary failures after it keep backing off
    /// as long as before.
    fn start_with_new_credentials(self: &Arc<Self>, flight: &mut Flight) {
        flight.refused_refresh = self.current.load().generation;
        match flight.asked_until.filter(|&until| Instant::now() < until) {
            Some(until) => {
                flight.retry_at = Some(until);
                flight.deferred = true;
                self.rearm(flight, until);
            }
            None => {
                flight.retry_at = None;
                // Outside a runtime, the next request that needs a token
                // starts it.
                let _ = self.start(flight);
            }
        }
    }

    /// At the end of the backoff of the [`Rearm`] numbered `number`: starts
    /// the grant with new credentials it held back, unless a later backoff
    /// took its place (whose end starts it) or a refresh has started since:
    /// as a stale read would, with the backoff over.
    fn start_deferred(self: &Arc<Self>, number: u64) {
        let mut flight = self.lock();
        if flight.deferred && self.rearms.load(Ordering::Acquire) == number {
            self.start_if_due(&mut flight, Instant::now());
        }
    }

    /// Decides, under the lock, whether a caller has a token, must wait for a
    /// refresh (starting it if none runs), or gets the last error; a 401 the
    /// throttle holds back waits for a refresh already running, or keeps the
    /// token when none runs. What it did is logged once the lock is released.
    fn begin(self: &Arc<Self>, rejected: Option<u64>) -> Result<Begin, Error> {
        let mut notes = Notes::default();
        let begun = self.begin_locked(rejected, &mut notes);
        notes.log();
        begun
    }

    fn begin_locked(
        self: &Arc<Self>,
        rejected: Option<u64>,
        notes: &mut Notes,
    ) -> Result<Begin, Error> {
        let now = Instant::now();
        let mut flight = self.lock();
        self.reclaim(&mut flight);
        let entry = self.current.load();
        if let Some(token) = &entry.token {
            let mut phase = caught_up(&entry, now);
            if phase == UNTIMED {
                phase = retime(&mut flight, &entry, now);
                notes.retimed = Some((entry.generation, phase));
            }
            if rejected == Some(entry.generation) {
                if phase != EXPIRED {
                    if !flight.may_force(now, &self.settings) {
                        // Throttled: this 401 starts nothing, but a refresh
                        // already running brings a newer token at no cost.
                        if flight.running {
                            return Ok(self.wait(&flight, now));
                        }
                        return Ok(Begin::Keep);
                    }
                    entry.phase.store(EXPIRED, Ordering::Release);
                    flight.forcing = true;
                    notes.invalidated = Some(entry.generation);
                }
            } else if phase != EXPIRED {
                if phase == STALE && self.may_kick.swap(false, Ordering::AcqRel) {
                    self.start_if_due(&mut flight, now);
                }
                return Ok(Begin::Ready(Lease {
                    token: token.clone(),
                    ticket: entry.ticket(),
                }));
            }
        }
        if flight.running {
            return Ok(self.wait(&flight, now));
        }
        if let (Some(retry_at), Some(error)) = (flight.retry_at, &flight.last_error) {
            if now < retry_at {
                return Err(error.clone());
            }
        }
        self.start(&mut flight)?;
        Ok(self.wait(&flight, now))
    }

    /// Waiting for the running refresh, until `stranded_after` after it
    /// started (after `now` if it is not known when).
    fn wait(&self, flight: &Flight, now: Instant) -> Begin {
        let started = flight.started_at.unwrap_or(now);
        Begin::Wait(flight.flight, started + self.settings.stranded_after)
    }

    /// Ends the running refresh if its task was dropped with its runtime.
    fn reclaim(&self, flight: &mut Flight) {
        if flight.running && self.abandoned.load(Ordering::Acquire) == flight.flight {
            flight.give_up();
            flight.forcing = false;
        }
    }

    fn start(self: &Arc<Self>, flight: &mut Flight) -> Result<(), Error> {
        let handle = Handle::try_current().map_err(|_| Error::NoRuntime)?;
        flight.running = true;
        // Any refresh now is the password grant a rotation deferred (the
        // token held is refused its refresh token): none need follow.
        flight.deferred = false;
        flight.flight += 1;
        flight.started_at = Some(Instant::now());
        flight.presenting = 0;
        // Made before spawning: a task dropped before its first poll (its
        // runtime shut down) still ends the refresh.
        handle.spawn(RefreshTask {
            refresh: Box::pin(self.clone().refresh(flight.flight)),
            guard: FinishOnDrop {
                shared: Some(self.clone()),
                flight: flight.flight,
                polling: false,
            },
        });
        self.reclaim(flight);
        if !flight.running {
            // Dropped at once: this runtime is shutting down.
            return Err(Error::NoRuntime);
        }
        Ok(())
    }

    /// One refresh, numbered `number`: the refresh grant when there is a
    /// refresh token, the password grant when there is none, Volt rejects
    /// it, or the last refresh presented it and failed. A refresh given up
    /// on sends nothing more (its answer would be discarded).
    async fn refresh(self: Arc<Self>, number: u64) -> Result<Token, Error> {
        let (previous, refresh_token) = {
            let mut flight = self.lock();
            if !flight.is_running(number) {
                return Err(Error::Interrupted);
            }
            let previous = self.current.load_full();
            // Taken whichever grant goes: attempts alternate while both fail.
            let failed = std::mem::take(&mut flight.failed_refresh) == previous.generation;
            let refresh_token = previous
                .token
                .as_ref()
                .filter(|_| !failed && previous.generation != flight.refused_refresh)
                .and_then(|t| t.refresh_token().cloned());
            if refresh_token.is_some() {
                flight.presenting = previous.generation;
            } else {
                // The password grant below reads the credentials replaced
                // so far: none need follow it for them.
                flight.rotated = false;
            }
            (previous, refresh_token)
        };
        match refresh_token {
            Some(refresh_token) => {
                match self.attempt(Grant::Refresh(refresh_token.clone())).await {
                    Ok(mut token) => {
                        token.inherit_refresh_token(Some(&refresh_token));
                        Ok(token)
                    }
                    Err(error) if error.is_rejected() => {
                        {
                            let mut flight = self.lock();
                            // Given up on, it changes nothing: giving it up
                            // refused this refresh token already, and a
                            // later refusal (a newer token's, or replaced
                            // credentials') must not be undone.
                            if !flight.is_running(number) {
                                return Err(error);
                            }
                            // Not presented again should the password grant fail.
                            flight.refused_refresh = previous.generation;
                            flight.presenting = 0;
                            // As above: it sends the credentials replaced so far.
                            flight.rotated = false;
                        }
                        tracing::info!("the refresh token was rejected; authenticating again");
                        self.attempt(Grant::Password).await
                    }
                    Err(error) => {
                        let mut flight = self.lock();
                        if flight.is_running(number) {
                            if matches!(
                                error,
                                Error::InvalidResponse {
                                    reason: EXPIRED_ON_ARRIVAL,
                                    ..
                                }
                            ) {
                                // Answered with a token: Volt rotated this
                                // refresh token, so it is not presented again.
                                flight.refused_refresh = previous.generation;
                            } else {
                                flight.failed_refresh = previous.generation;
                            }
                        }
                        Err(error)
                    }
                }
            }
            None => self.attempt(Grant::Password).await,
        }
    }

    async fn attempt(&self, grant: Grant) -> Result<Token, Error> {
        let started = Instant::now();
        let (result, causes) = self.source.fetch(&grant).await;
        // `expires_in` counts from when the grant was sent: a token whose
        // answer took about that long would be expired on arrival, serve
        // nothing, and start the next grant at once, with no backoff.
        let result = result.and_then(|token| {
            if self.settings.expired_at(&token) <= Instant::now() {
                return Err(Error::InvalidResponse {
                    grant: grant.kind(),
                    status: http::StatusCode::OK,
                    reason: EXPIRED_ON_ARRIVAL,
                });
            }
            Ok(token)
        });
        let elapsed_ms = started.elapsed().as_millis() as u64;
        self.counters.record(grant.kind(), &result);
        match &result {
            Ok(token) => tracing::debug!(
                grant = %grant.kind(),
                elapsed_ms,
                expires_in_s = token.lifetime().as_secs(),
                "token endpoint issued a token"
            ),
            // `cause` is left out when there is none.
            Err(error) => tracing::warn!(
                grant = %grant.kind(),
                elapsed_ms,
                outcome = error.kind(),
                %error,
                cause = causes.as_deref(),
                "token endpoint attempt failed"
            ),
        }
        result
    }

    /// Gives up on the refresh numbered `number` if it is still running, so
    /// that the next caller starts another.
    fn strand(&self, number: u64) {
        let mut flight = self.lock();
        if !flight.is_running(number) {
            return;
        }
        flight.give_up();
        // Its end sets nothing now: a stale token's readers may start the
        // next refresh, as after a refresh dropped with its runtime.
        self.may_kick.store(true, Ordering::Release);
        drop(flight);
        tracing::warn!(
            "the token refresh has not ended on its runtime (is it driven?); starting another"
        );
    }

    /// Publishes the outcome of the refresh numbered `number`, then wakes
    /// every waiter; nothing if that refresh was given up on.
    fn finish(self: &Arc<Self>, number: u64, result: Result<Token, Error>) {
        let now = Instant::now();
        let (outcome, backoff) = {
            let mut flight = self.lock();
            if !flight.is_running(number) {
                return;
            }
            flight.running = false;
            let ended = match result {
                Ok(token) => {
                    flight.failures = 0;
                    flight.retry_at = None;
                    flight.asked_until = None;
                    flight.last_error = None;
                    flight.generation += 1;
                    let (stale_at, expired_at) = self.settings.phases(&token);
                    let entry = Arc::new(Entry {
                        token: Some(Arc::new(token)),
                        generation: flight.generation,
                        cache: self.id,
                        // A request carrying a forced token sees that it is
                        // unconfirmed.
                        unconfirmed: AtomicBool::new(std::mem::take(&mut flight.forcing)),
                        phase: AtomicU8::new(FRESH),
                        stale_at,
                        expired_at,
                    });
                    self.current.store(entry.clone());
                    time(&mut flight, &entry);
                    self.may_kick.store(true, Ordering::Release);
                    self.counters.refreshes.fetch_add(1, Ordering::Relaxed);
                    (None, None)
                }
                Err(error) => {
                    flight.failures = flight.failures.saturating_add(1);
                    // While the current token serves, the next attempt comes
                    // no later than its expiry, so that an outage that ends
                    // just before costs no failed request.
                    let entry = self.current.load();
                    let serving = entry
                        .token
                        .as_ref()
                        .filter(|_| entry.phase.load(Ordering::Acquire) != EXPIRED)
                        .and_then(|_| entry.expired_at.checked_duration_since(now))
                        .filter(|left| !left.is_zero());
                    let delay = self.settings.backoff(flight.failures, &error, serving);
                    flight.retry_at = Some(now + delay);
                    flight.asked_until = self.settings.asked(&error).map(|wait| now + wait);
                    flight.last_error = Some(error.clone());
                    // Let a stale token's readers start the next attempt once
                    // the backoff is over (or at once if the runtime goes).
                    self.rearm(&mut flight, now + delay);
                    (Some(error), Some((flight.failures, delay)))
                }
            };
            if std::mem::take(&mut flight.rotated) {
                // This refresh may have used the replaced credentials.
                self.start_with_new_credentials(&mut flight);
            }
            ended
        };
        // Logged without the lock: a subscriber may read the stats.
        if let (Some(error), Some((failures, delay))) = (&outcome, backoff) {
            tracing::warn!(
                failures,
                retry_in_ms = delay.as_millis() as u64,
                retry_after_s = error.retry_after().map(|wait| wait.as_secs()),
                "token refresh failed; backing off"
            );
        }
        self.publish(number, outcome);
    }

    /// Wakes the waiters of the refresh numbered `number` (and of earlier
    /// ones) with its outcome, unless a later refresh has published already:
    /// outcomes are published after the lock is released, or by a refresh
    /// given up on whose task goes with its runtime later, so they may come
    /// out of order. Going back to an earlier number would hide the later
    /// outcome from a waiter not yet woken, which would then wait until it
    /// took its refresh for stranded.
    fn publish(&self, number: u64, outcome: Option<Error>) {
        self.done.send_if_modified(|published| {
            if number <= published.0 {
                return false;
            }
            *published = (number, outcome);
            true
        });
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        ticket::unregister(self.id);
        // The phase timer and the backoff's rearm task hold only weak
        // references; stop them sleeping.
        let mut flight = self.lock();
        for task in [flight.timer.take(), flight.rearm.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// A refresh spawned with the guard that ends it however its task ends.
struct RefreshTask {
    refresh: Pin<Box<dyn Future<Output = Result<Token, Error>> + Send>>,
    guard: FinishOnDrop,
}

impl Future for RefreshTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let task = &mut *self;
        // Still set if the refresh panics: the task is then dropped while
        // this poll unwinds.
        task.guard.polling = true;
        let polled = task.refresh.as_mut().poll(cx);
        task.guard.polling = false;
        let result = ready!(polled);
        task.guard.finish(result);
        Poll::Ready(())
    }
}

/// Ends a refresh that panicked or was dropped (runtime shut down), so that
/// no waiter hangs and a later caller can start the next refresh.
struct FinishOnDrop {
    shared: Option<Arc<Shared>>,
    /// The refresh's number.
    flight: u64,
    /// The refresh is being polled: dropped now, it panicked.
    polling: bool,
}

impl FinishOnDrop {
    fn finish(&mut self, result: Result<Token, Error>) {
        if let Some(shared) = self.shared.take() {
            shared.finish(self.flight, result);
        }
    }
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        if self.polling {
            // The refresh panicked: a failure like any other, backed off.
            shared.finish(self.flight, Err(Error::Interrupted));
        } else {
            // Dropped with its runtime, perhaps inside `start` (under the
            // lock), perhaps while this thread unwinds from a panic that is
            // not the refresh's: nothing failed, so no backoff. Waiters wake
            // and the first to take the lock starts the next refresh; a
            // stale token's readers may start it too.
            shared.abandoned.fetch_max(self.flight, Ordering::AcqRel);
            shared.may_kick.store(true, Ordering::Release);
            shared.publish(self.flight, None);
        }
    }
}

/// Lets a stale token's readers start a refresh again when dropped: at the
/// end of a backoff, or when the runtime timing the backoff shuts down; not
/// when a later one replaced it.
struct Rearm {
    shared: Weak<Shared>,
    number: u64,
}

impl Drop for Rearm {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            if shared.rearms.load(Ordering::Acquire) == self.number {
                shared.may_kick.store(true, Ordering::Release);
            }
        }
    }
}

/// Times `entry` on this runtime, replacing the timer of the entry before;
/// without a runtime the entry stays untimed, and each request asks the clock.
fn time(flight: &mut Flight, entry: &Arc<Entry>) {
    if let Some(timer) = flight.timer.take() {
        timer.abort();
    }
    flight.timer = spawn_phase_timer(entry);
    if flight.timer.is_none() {
        entry.phase.store(UNTIMED, Ordering::Release);
    }
}

/// The phase of a timed entry, or the clock's at `now` if the timer lags
/// behind it (its runtime idle, or a paused clock just advanced): the entry
/// takes it on, as the timer would. A caller that asks the cache reads the
/// clock anyway, so it never gets a token past its margin, nor one whose
/// refresh-ahead is due without starting it.
fn caught_up(entry: &Entry, now: Instant) -> u8 {
    let due = entry.phase_at(now);
    // UNTIMED and EXPIRED are above any phase the clock gives: kept.
    match entry
        .phase
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |phase| {
            (phase < due).then_some(due)
        }) {
        Ok(_) => due,
        Err(phase) => phase,
    }
}

/// The phase of an untimed entry, from the clock; the entry is timed again on
/// this runtime.
fn retime(flight: &mut Flight, entry: &Arc<Entry>, now: Instant) -> u8 {
    let phase = entry.phase_at(now);
    entry.phase.store(phase, Ordering::Release);
    if phase != EXPIRED {
        time(flight, entry);
    }
    phase
}

/// What [`Shared::begin`] did under the lock, logged once it is released: no
/// event is emitted under the lock, so that a subscriber may read
/// [`TokenCache::stats`] (which takes it).
#[derive(Default)]
struct Notes {
    /// An untimed token's generation and the phase the clock gave it.
    retimed: Option<(u64, u8)>,
    /// The generation a 401 invalidated.
    invalidated: Option<u64>,
}

impl Notes {
    fn log(self) {
        if let Some((generation, phase)) = self.retimed {
            tracing::debug!(generation, phase, "timing the token again");
        }
        if let Some(generation) = self.invalidated {
            tracing::debug!(generation, "a 401 invalidated the token");
        }
    }
}

/// Marks its entry untimed if dropped before the entry expires: the timer's
/// runtime shut down (or a newer token replaced the entry).
struct Timing(Weak<Entry>);

impl Drop for Timing {
    fn drop(&mut self) {
        if let Some(entry) = self.0.upgrade() {
            let _ = entry
                .phase
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |phase| {
                    matches!(phase, FRESH | STALE).then_some(UNTIMED)
                });
        }
    }
}

/// Flips `entry` to stale, then to expired, when the clock says so.
fn spawn_phase_timer(entry: &Arc<Entry>) -> Option<AbortHandle> {
    let handle = Handle::try_current().ok()?;
    let (stale_at, expired_at) = (entry.stale_at, entry.expired_at);
    let timing = Timing(Arc::downgrade(entry));
    let task = handle.spawn(async move {
        sleep_until(stale_at).await;
        let Some(live) = timing.0.upgrade() else {
            return;
        };
        let _ = live
            .phase
            .compare_exchange(FRESH, STALE, Ordering::AcqRel, Ordering::Acquire);
        drop(live);
        sleep_until(expired_at).await;
        if let Some(live) = timing.0.upgrade() {
            live.phase.store(EXPIRED, Ordering::Release);
        }
    });
    Some(task.abort_handle())
}

impl Settings {
    /// When a token turns stale and when it counts as expired. Both windows
    /// are capped for every lifetime (the margin at a tenth, refresh-ahead at
    /// a third before its jitter), so a short-lived token is never refreshed
    /// per request.
    fn phases(&self, token: &Token) -> (Instant, Instant) {
        let lifetime = token.lifetime();
        let margin = self.margin(lifetime);
        let ahead = self.refresh_ahead.min(lifetime / 3).max(margin);
        let jitter = ahead.mul_f64(JITTER * fastrand::f64());
        let expires_at = token.expires_at();
        (expires_at - ahead - jitter, expires_at - margin)
    }

    /// When `token` stops being served: the second of [`Settings::phases`].
    fn expired_at(&self, token: &Token) -> Instant {
        token.expires_at() - self.margin(token.lifetime())
    }

    /// How long before its expiry a token of `lifetime` stops being served.
    fn margin(&self, lifetime: Duration) -> Duration {
        self.expiry_margin.min(lifetime / 10)
    }

    /// How long to wait after the `failures`-th failure in a row: exponential
    /// from `backoff_min`, capped at `backoff_max`, with jitter down to half.
    /// A rejected password grant waits the cap: only new credentials would help.
    /// No later than `serving` (how long the current token is still served),
    /// if given. No less than the server's `Retry-After`, itself capped at
    /// `backoff_max` so that a hostile value cannot stall refreshes.
    fn backoff(&self, failures: u32, error: &Error, serving: Option<Duration>) -> Duration {
        let asked = self.asked(error).unwrap_or_default();
        let ordinary = self.jittered_backoff(failures, error);
        serving
            .map_or(ordinary, |left| ordinary.min(left))
            .max(asked)
    }

    /// The server's `Retry-After` on `error`, capped at `backoff_max`.
    fn asked(&self, error: &Error) -> Option<Duration> {
        error.retry_after().map(|wait| wait.min(self.backoff_max))
    }

    fn jittered_backoff(&self, failures: u32, error: &Error) -> Duration {
        let exponential = if error.is_rejected() && error.grant() == Some(GrantType::Password) {
            self.backoff_max
        } else {
            doubled(
                self.backoff_min,
                failures.saturating_sub(1),
                self.backoff_max,
            )
        };
        exponential.mul_f64(0.5 + 0.5 * fastrand::f64())
    }
}

/// `min` doubled `doublings` times, capped at `max`. Doubling stops at the
/// cap (at most 64 steps from a nanosecond), so any positive `min` reaches
/// any `max`.
fn doubled(min: Duration, doublings: u32, max: Duration) -> Duration {
    let mut delay = min;
    for _ in 0..doublings {
        if delay >= max || delay.is_zero() {
            break;
        }
        delay = delay.saturating_mul(2);
    }
    delay.min(max)
}

impl Flight {
    /// Whether the refresh numbered `number` is the one callers wait for.
    fn is_running(&self, number: u64) -> bool {
        self.running && self.flight == number
    }

    /// Ends the running refresh without its outcome (stranded, or dropped
    /// with its runtime). It may be at /oauth with the refresh token it
    /// presents, which Volt may rotate (and revoke the family of, should it
    /// see the token twice): later refreshes of that token use the password.
    fn give_up(&mut self) {
        self.running = false;
        // The next refresh, whoever starts it, uses the new credentials.
        self.rotated = false;
        if self.presenting != 0 {
            self.refused_refresh = self.presenting;
        }
    }

    /// Whether a 401 may force a refresh now. Forced refreshes whose tokens
    /// the server keeps rejecting are throttled like failures, so a server
    /// that rejects every token costs one `/oauth` call per backoff period,
    /// not one per request; once a forced token is accepted, the next 401
    /// only waits `backoff_min` after the last forced refresh.
    fn may_force(&mut self, now: Instant, settings: &Settings) -> bool {
        if let Some(at) = self.forced_at {
            let since = now.saturating_duration_since(at);
            if since > settings.backoff_max.saturating_mul(2) {
                self.forced_streak = 0;
            } else {
                let wait = doubled(
                    settings.backoff_min,
                    self.forced_streak.saturating_sub(1),
                    settings.backoff_max,
                );
                if since < wait {
                    return false;
                }
            }
        }
        self.forced_at = Some(now);
        self.forced_streak = self.forced_streak.saturating_add(1);
        true
    }
}

/// What the cache has done so far, and how it stands, from
/// [`VoltAuthLayer::stats`](crate::VoltAuthLayer::stats).
///
/// For a health check: `remaining` says whether requests get a token now;
/// `failures` and `last_error` say that `/oauth` is failing while the current
/// token still serves, before it runs out.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tower::BoxError> {
/// use std::time::Duration;
///
/// use volt_auth::VoltAuthLayer;
/// use volt_auth::mock::MockVolt;
///
/// let volt = MockVolt::builder().in_process();
/// let auth = VoltAuthLayer::builder(volt.credentials())
///     .base_url(&volt.url())
///     .build(volt.service())?;
/// auth.access_token().await?;
/// let stats = auth.stats();
/// assert_eq!(stats.remaining, Some(Duration::from_secs(3600))); // on a paused clock
/// assert_eq!((stats.password.succeeded, stats.failures), (1, 0));
///
/// volt.fail_oauth(1, http::StatusCode::SERVICE_UNAVAILABLE, "{}");
/// tokio::time::sleep(Duration::from_secs(56 * 60)).await; // into the refresh-ahead window
/// auth.access_token().await?; // served, while it starts a refresh that fails
/// # // The background refresh ends (in process, without waiting for time).
/// # while auth.stats().failures == 0 { tokio::task::yield_now().await }
/// let stats = auth.stats();
/// assert_eq!((stats.refresh.failed, stats.failures), (1, 1)); // unhealthy, not down
/// assert!(stats.remaining.is_some() && stats.retry_in.is_some());
/// let status = stats.last_error.and_then(|error| error.status());
/// assert_eq!(status, Some(http::StatusCode::SERVICE_UNAVAILABLE));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Password grants sent to `/oauth`, by outcome.
    pub password: GrantStats,
    /// Refresh-token grants sent to `/oauth`, by outcome.
    pub refresh: GrantStats,
    /// Tokens put in service (the first included). A token that arrives
    /// after its refresh was given up on (stranded on a runtime nothing
    /// drove) is discarded: it counts among the grants' `succeeded`, not here.
    pub refreshes: u64,
    /// Requests replayed after a 401.
    pub replays: u64,
    /// How long the current token remains valid, if there is one.
    pub remaining: Option<Duration>,
    /// Refreshes that failed in a row since the last token was obtained (0
    /// once one succeeds). A refresh whose refresh token is rejected and whose
    /// password grant then fails counts once.
    pub failures: u32,
    /// After a failed refresh: how long the backoff still holds off the next
    /// `/oauth` attempt.
    pub retry_in: Option<Duration>,
    /// Why the last refresh failed, until one succeeds.
    pub last_error: Option<Error>,
}

/// `/oauth` attempts of one grant, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GrantStats {
    /// Answered with a token.
    pub succeeded: u64,
    /// Refused by Volt (an [`Error::Rejected`]).
    pub rejected: u64,
    /// Failed otherwise: 5xx, timeout, transport error, unreadable answer, a
    /// token that arrived expired.
    pub failed: u64,
}

impl GrantStats {
    /// All attempts.
    pub fn attempts(&self) -> u64 {
        self.succeeded + self.rejected + self.failed
    }
}

#[derive(Default)]
struct Counters {
    /// Per grant (password, refresh): succeeded, rejected, failed.
    grants: [[AtomicU64; 3]; 2],
    refreshes: AtomicU64,
    replays: AtomicU64,
}

impl Counters {
    fn slot(grant: GrantType) -> usize {
        match grant {
            GrantType::Password => 0,
            GrantType::RefreshToken => 1,
        }
    }

    fn record(&self, grant: GrantType, result: &Result<Token, Error>) {
        let outcome = match result {
            Ok(_) => 0,
            Err(error) if error.is_rejected() => 1,
            Err(_) => 2,
        };
        self.grants[Self::slot(grant)][outcome].fetch_add(1, Ordering::Relaxed);
    }

    fn grant(&self, grant: GrantType) -> GrantStats {
        let [succeeded, rejected, failed] = &self.grants[Self::slot(grant)];
        GrantStats {
            succeeded: succeeded.load(Ordering::Relaxed),
            rejected: rejected.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests;
