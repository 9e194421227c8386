//! An embedded mock of Volt's API, for tests and examples.
//!
//! [`MockVolt`] answers `POST /oauth` (password and refresh_token grants, form or JSON bodies)
//! and the Gateway calls `GET /banks`, `GET /banks/{id}`, `POST /v2/payments`, `GET /payments`,
//! `GET /payments/{id}` and `POST /dropin` (each `401` without a valid token), either over TCP on `127.0.0.1` or in process through
//! [`MockVolt::service`]. It issues random opaque tokens, enforces their expiry on tokio's clock
//! (so in-process use works under `#[tokio::test(start_paused = true)]`), rotates refresh tokens,
//! records what it receives and can be told to fail, break, delay or hold token requests.
//!
//! It is a test tool: it keeps, for as long as it lives, every token it issued (expired or
//! consumed ones too) and everything it records (each `/oauth` request's fields, each API
//! request's `Authorization` header, each payment), so its memory grows with every call,
//! by several hundred bytes per `/oauth` call and about a hundred per API call. For a
//! long or high-rate run (a soak or load test), start a fresh mock per run.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use volt_auth::mock::MockVolt;
//!
//! let mock = MockVolt::start().await?;
//! let base = mock.url(); // "http://127.0.0.1:PORT", no trailing slash
//! assert!(base.starts_with("http://127.0.0.1:"));
//! assert_eq!(mock.oauth_calls(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! In process, the mock is both the layer's `/oauth` transport and the API it wraps:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! use tower::{Layer, ServiceExt};
//! use volt_auth::VoltAuthLayer;
//! use volt_auth::mock::MockVolt;
//!
//! let mock = MockVolt::builder().in_process();
//! let auth = VoltAuthLayer::builder(mock.credentials())
//!     .base_url(&mock.url())
//!     .build(mock.service())?;
//! let request = http::Request::get(format!("{}/banks", mock.url())).body(Default::default())?;
//! let response = auth.layer(mock.service()).oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(mock.password_grants(), 1);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::time::Instant;

mod answer;
mod server;

use answer::{field, handle};
use server::Server;

/// The client id the mock accepts by default.
pub const CLIENT_ID: &str = "mock-client-id";
/// The client secret the mock accepts by default.
pub const CLIENT_SECRET: &str = "mock-client-secret";
/// The API username the mock accepts by default.
pub const USERNAME: &str = "mock-user";
/// The API password the mock accepts by default.
pub const PASSWORD: &str = "mock-password";

/// Largest request body the mock reads; bigger bodies are answered `413`.
const BODY_LIMIT: usize = 1024 * 1024;
/// Base URL reported by in-process mocks (port 9, "discard": nothing listens there).
const IN_PROCESS_PORT: u16 = 9;
const TOKEN_LEN: usize = 40;
/// The longest token lifetime the mock issues, so that expiry instants cannot overflow.
const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// A body returned with status `200` by [`MockVolt::break_oauth`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Broken {
    /// An empty body (`Content-Type: application/json`).
    Empty,
    /// An HTML page, as a proxy would send (`Content-Type: text/html`).
    Html,
    /// A token response cut off in the middle (`Content-Type: application/json`).
    TruncatedJson,
    /// A valid JSON token response padded to just over 1 MiB.
    Oversized,
    /// A form-encoded body instead of JSON (`Content-Type: text/plain`).
    NotJson,
}

/// A scripted `/oauth` failure: how many calls are left to answer, and the answer.
struct Failure {
    remaining: usize,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// What one `/oauth` request carried, as recorded by [`MockVolt::oauth_requests`].
///
/// `Debug` shows `[redacted]` for the values of `client_secret`, `password`
/// and `refresh_token`, and for the names and values of fields other than
/// these and `grant_type`, `client_id` and `username` (a malformed body's names
/// may hold secrets); [`OAuthRequest::field`] and `fields` hold them as sent.
#[derive(Clone)]
#[non_exhaustive]
pub struct OAuthRequest {
    /// The `grant_type` field, if present.
    pub grant_type: Option<String>,
    /// The `Content-Type` header, if present.
    pub content_type: Option<String>,
    /// The `Accept` header, if present.
    pub accept: Option<String>,
    /// The body fields in order (form or JSON; non-string JSON values in their JSON text,
    /// a name repeated in JSON once, with its last value).
    /// Empty when the body could not be parsed.
    pub fields: Vec<(String, String)>,
}

impl fmt::Debug for OAuthRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<(&str, &str)> = self
            .fields
            .iter()
            .map(|(name, value)| match name.as_str() {
                "grant_type" | "client_id" | "username" => (name.as_str(), value.as_str()),
                "client_secret" | "password" | "refresh_token" => (name.as_str(), "[redacted]"),
                // A malformed body's names may hold secrets: JSON sent as a form, say.
                _ => ("[redacted]", "[redacted]"),
            })
            .collect();
        f.debug_struct("OAuthRequest")
            .field("grant_type", &self.grant_type)
            .field("content_type", &self.content_type)
            .field("accept", &self.accept)
            .field("fields", &fields)
            .finish()
    }
}

impl OAuthRequest {
    /// The first value of field `name`, if present.
    pub fn field(&self, name: &str) -> Option<&str> {
        field(&self.fields, name)
    }
}

/// The digest `POST /v2/payments` answers for `body`: a 64-bit FNV-1a hash as 16 lowercase hex digits.
pub fn payment_digest(body: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

// ---------------------------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------------------------

/// Configures a [`MockVolt`]; obtained from [`MockVolt::builder`].
#[derive(Clone)]
#[must_use]
pub struct MockBuilder {
    config: Config,
}

#[derive(Clone)]
struct Config {
    client_id: String,
    client_secret: String,
    username: String,
    password: String,
    access_lifetime: Duration,
    refresh_lifetime: Duration,
}

impl Default for MockBuilder {
    fn default() -> Self {
        MockBuilder {
            config: Config {
                client_id: CLIENT_ID.to_owned(),
                client_secret: CLIENT_SECRET.to_owned(),
                username: USERNAME.to_owned(),
                password: PASSWORD.to_owned(),
                access_lifetime: Duration::from_secs(3600),
                refresh_lifetime: Duration::from_secs(24 * 3600),
            },
        }
    }
}

impl fmt::Debug for MockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockBuilder")
            .field("client_id", &self.config.client_id)
            .field("username", &self.config.username)
            .field("access_token_lifetime", &self.config.access_lifetime)
            .field("refresh_token_lifetime", &self.config.refresh_lifetime)
            .finish_non_exhaustive()
    }
}

impl MockBuilder {
    /// The credentials the mock accepts (default: [`CLIENT_ID`], [`CLIENT_SECRET`], [`USERNAME`], [`PASSWORD`]).
    pub fn credentials(
        mut self,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.config.client_id = client_id.into();
        self.config.client_secret = client_secret.into();
        self.config.username = username.into();
        self.config.password = password.into();
        self
    }

    /// How long issued access tokens work (default one hour, at most a year). `expires_in`
    /// answers it in whole seconds (at least 1); the token itself expires after exactly this
    /// duration.
    pub fn access_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.config.access_lifetime = lifetime.min(MAX_LIFETIME);
        self
    }

    /// How long issued refresh tokens work (default 24 hours, at most a year).
    pub fn refresh_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.config.refresh_lifetime = lifetime.min(MAX_LIFETIME);
        self
    }

    /// Starts the mock on a free port of `127.0.0.1`. The server runs on the current Tokio
    /// runtime: when that runtime shuts down, its port closes (connections are refused) until
    /// [`MockVolt::restart`] listens on it again, on the runtime that calls it.
    ///
    /// # Errors
    /// The I/O error of binding the port.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub async fn start(self) -> io::Result<MockVolt> {
        let listener = listen(0)?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::new(self.config));
        let server = Server::spawn(listener, Arc::clone(&shared));
        Ok(MockVolt {
            shared,
            port,
            in_process: false,
            server: Mutex::new(Some(server)),
        })
    }

    /// Builds a mock without any socket: only [`MockVolt::service`] reaches it. [`MockVolt::url`]
    /// still returns `http://127.0.0.1:9` so clients can build absolute URIs. Works under tokio's
    /// paused clock.
    pub fn in_process(self) -> MockVolt {
        MockVolt {
            shared: Arc::new(Shared::new(self.config)),
            port: IN_PROCESS_PORT,
            in_process: true,
            server: Mutex::new(None),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

struct Shared {
    config: Config,
    state: Mutex<State>,
    oauth_calls: AtomicUsize,
    password_grants: AtomicUsize,
    refresh_grants: AtomicUsize,
    api_calls: AtomicUsize,
    unauthorized: AtomicUsize,
    oauth_in_flight: AtomicUsize,
    max_oauth_in_flight: AtomicUsize,
    reject_all_tokens: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Valid access tokens and when they expire.
    access_tokens: HashMap<String, Instant>,
    /// Unused, unrevoked refresh tokens and when they expire.
    refresh_tokens: HashMap<String, Instant>,
    issued_access: Vec<String>,
    issued_refresh: Vec<String>,
    oauth_requests: Vec<OAuthRequest>,
    payment_bodies: Vec<Bytes>,
    /// Payments created by `POST /v2/payments`, as `GET /payments/{id}` answers them.
    payments: Vec<serde_json::Value>,
    api_authorizations: Vec<Option<String>>,
    failure: Option<Failure>,
    broken: Option<(usize, Broken)>,
    delay: Duration,
    holds: Vec<Arc<HoldInner>>,
}

impl Shared {
    fn new(config: Config) -> Self {
        Shared {
            config,
            state: Mutex::default(),
            oauth_calls: AtomicUsize::new(0),
            password_grants: AtomicUsize::new(0),
            refresh_grants: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            unauthorized: AtomicUsize::new(0),
            oauth_in_flight: AtomicUsize::new(0),
            max_oauth_in_flight: AtomicUsize::new(0),
            reject_all_tokens: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// MockVolt
// ---------------------------------------------------------------------------------------------

/// A running mock Volt server. Dropping it closes the listener and every connection.
///
/// Its memory grows with every call: see the [module docs](crate::mock).
pub struct MockVolt {
    shared: Arc<Shared>,
    port: u16,
    in_process: bool,
    server: Mutex<Option<Server>>,
}

impl fmt::Debug for MockVolt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockVolt")
            .field("url", &self.url())
            .field("in_process", &self.in_process)
            .field(
                "listening",
                &lock(&self.server).as_ref().is_some_and(Server::running),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for MockVolt {
    fn drop(&mut self) {
        self.stop();
    }
}

impl MockVolt {
    /// A builder to configure credentials and token lifetimes.
    pub fn builder() -> MockBuilder {
        MockBuilder::default()
    }

    /// Starts a mock with the default configuration on a free port of `127.0.0.1`, served on
    /// the current Tokio runtime (see [`MockBuilder::start`]).
    ///
    /// # Errors
    /// The I/O error of binding the port.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub async fn start() -> io::Result<MockVolt> {
        Self::builder().start().await
    }

    /// The base URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The credentials this mock accepts, ready for [`VoltAuthLayer::builder`](crate::VoltAuthLayer::builder).
    pub fn credentials(&self) -> crate::Credentials {
        let config = &self.shared.config;
        crate::Credentials::new(
            config.client_id.clone(),
            config.client_secret.clone(),
            config.username.clone(),
            config.password.clone(),
        )
    }

    /// An in-process tower service answering exactly like the TCP server, on the same state,
    /// for `Full<Bytes>` request bodies: it can be the layer's `/oauth` transport
    /// (`builder.build(mock.service())`) and the service the layer wraps.
    pub fn service(&self) -> MockService {
        self.service_for()
    }

    /// [`MockVolt::service`] for requests with another body type.
    pub fn service_for<B>(&self) -> MockService<B> {
        MockService {
            shared: Arc::clone(&self.shared),
            body: PhantomData,
        }
    }

    /// Every access token issued so far stops working.
    pub fn revoke_access_tokens(&self) {
        self.shared.state().access_tokens.clear();
    }

    /// Every refresh token issued so far stops working.
    pub fn revoke_refresh_tokens(&self) {
        self.shared.state().refresh_tokens.clear();
    }

    /// The next `n` `/oauth` calls answer `status` with `body` (`Content-Type: application/json`).
    /// Replaces any earlier `fail_oauth` budget; checked before [`break_oauth`](Self::break_oauth).
    pub fn fail_oauth(&self, n: usize, status: StatusCode, body: impl Into<Bytes>) {
        self.fail_oauth_with_headers(n, status, HeaderMap::new(), body);
    }

    /// [`fail_oauth`](Self::fail_oauth), with `headers` added to each answer (replacing
    /// any of the same name, `Content-Type` included): say, a `429` or `503` with
    /// `Retry-After` (and a `Date` to make an HTTP-date exact).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), tower::BoxError> {
    /// use std::time::Duration;
    ///
    /// use http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
    /// use volt_auth::mock::MockVolt;
    /// use volt_auth::{Error, VoltAuthLayer};
    ///
    /// let mock = MockVolt::builder().in_process();
    /// let mut headers = HeaderMap::new();
    /// headers.insert(RETRY_AFTER, HeaderValue::from_static("30"));
    /// mock.fail_oauth_with_headers(1, http::StatusCode::TOO_MANY_REQUESTS, headers, "{}");
    ///
    /// let auth = VoltAuthLayer::builder(mock.credentials())
    ///     .base_url(&mock.url())
    ///     .build(mock.service())?;
    /// let Error::Failed { response, .. } = auth.access_token().await.unwrap_err() else {
    ///     panic!("a 429 is a failure, not a rejection");
    /// };
    /// assert_eq!(response.status, 429);
    /// assert_eq!(response.retry_after(), Some(Duration::from_secs(30)));
    /// assert_eq!(auth.stats().retry_in, Some(Duration::from_secs(30))); // on a paused clock
    /// # Ok(()) }
    /// ```
    pub fn fail_oauth_with_headers(
        &self,
        n: usize,
        status: StatusCode,
        headers: HeaderMap,
        body: impl Into<Bytes>,
    ) {
        self.shared.state().failure = (n > 0).then(|| Failure {
            remaining: n,
            status,
            headers,
            body: body.into(),
        });
    }

    /// The next `n` `/oauth` calls answer `200` with a broken body. Replaces any earlier budget.
    pub fn break_oauth(&self, n: usize, broken: Broken) {
        self.shared.state().broken = (n > 0).then_some((n, broken));
    }

    /// Each `/oauth` call waits this long (`tokio::time::sleep`) before answering. Zero disables.
    pub fn set_oauth_delay(&self, delay: Duration) {
        self.shared.state().delay = delay;
    }

    /// `/oauth` requests arriving from now on wait until the returned hold is released or dropped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower::BoxError> {
    /// use volt_auth::VoltAuthLayer;
    /// use volt_auth::mock::MockVolt;
    ///
    /// let volt = MockVolt::builder().in_process();
    /// let auth = VoltAuthLayer::builder(volt.credentials())
    ///     .base_url(&volt.url())
    ///     .build(volt.service())?;
    /// let hold = volt.hold_oauth();
    /// let first = tokio::spawn({
    ///     let auth = auth.clone();
    ///     async move { auth.access_token().await }
    /// });
    /// hold.wait_for(1).await; // the password grant is at /oauth
    /// assert_eq!(auth.stats().password.attempts(), 0); // and not answered
    ///
    /// hold.release();
    /// first.await??;
    /// assert_eq!(auth.stats().password.succeeded, 1);
    /// # Ok(()) }
    /// ```
    pub fn hold_oauth(&self) -> OAuthHold {
        let (released, _) = watch::channel(false);
        let (waiting, _) = watch::channel(0);
        let inner = Arc::new(HoldInner { released, waiting });
        self.shared.state().holds.push(Arc::clone(&inner));
        OAuthHold {
            inner,
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// While `on`, API endpoints answer `401` to every token.
    pub fn reject_all_tokens(&self, on: bool) {
        self.shared.reject_all_tokens.store(on, Ordering::SeqCst);
    }

    /// Closes the listener and every open connection: connections are refused from now on.
    /// State is kept. Does nothing on an in-process mock or one already stopped.
    pub fn stop(&self) {
        let server = lock(&self.server).take();
        if let Some(server) = server {
            server.shutdown();
        }
    }

    /// Listens again on the same port, with the same state, on the current runtime. Does nothing
    /// if already listening, so that of simultaneous calls one listens and the others return
    /// `Ok` at once. A server whose runtime has shut down is not listening.
    ///
    /// # Errors
    /// [`io::ErrorKind::Unsupported`] on an in-process mock, and the I/O error of binding the
    /// port (another process may have taken it).
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub async fn restart(&self) -> io::Result<()> {
        if self.in_process {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an in-process mock has no listener",
            ));
        }
        // Checked, bound and stored under one lock (binding does not wait),
        // so that of simultaneous calls one listens and the others find it
        // listening, rather than failing to bind the port it took.
        let mut server = lock(&self.server);
        if server.as_ref().is_some_and(Server::running) {
            return Ok(());
        }
        let listener = listen(self.port)?;
        if let Some(previous) = server.replace(Server::spawn(listener, Arc::clone(&self.shared))) {
            previous.shutdown();
        }
        Ok(())
    }

    /// All `/oauth` requests received, including failed and broken ones. A request whose body
    /// fails to arrive (the client went away) is not counted, recorded or scripted.
    pub fn oauth_calls(&self) -> usize {
        self.shared.oauth_calls.load(Ordering::SeqCst)
    }

    /// `/oauth` requests received with `grant_type=password`.
    pub fn password_grants(&self) -> usize {
        self.shared.password_grants.load(Ordering::SeqCst)
    }

    /// `/oauth` requests received with `grant_type=refresh_token`.
    pub fn refresh_grants(&self) -> usize {
        self.shared.refresh_grants.load(Ordering::SeqCst)
    }

    /// Requests to API endpoints (`GET /banks`, `GET /banks/{id}`, `POST /v2/payments`,
    /// `GET /payments`, `GET /payments/{id}`, `POST /dropin`), authorised or not. A request
    /// whose body fails to arrive (the client went away) is not counted.
    pub fn api_calls(&self) -> usize {
        self.shared.api_calls.load(Ordering::SeqCst)
    }

    /// `401` answers given by API endpoints.
    pub fn unauthorized(&self) -> usize {
        self.shared.unauthorized.load(Ordering::SeqCst)
    }

    /// The most `/oauth` requests handled at the same time so far.
    pub fn max_oauth_in_flight(&self) -> usize {
        self.shared.max_oauth_in_flight.load(Ordering::SeqCst)
    }

    /// What each `/oauth` call carried, in arrival order.
    pub fn oauth_requests(&self) -> Vec<OAuthRequest> {
        self.shared.state().oauth_requests.clone()
    }

    /// Bodies received by `POST /v2/payments`, in order, including those answered `401`.
    pub fn payment_bodies(&self) -> Vec<Bytes> {
        self.shared.state().payment_bodies.clone()
    }

    /// The `Authorization` header of every API request, in order.
    pub fn api_authorizations(&self) -> Vec<Option<String>> {
        self.shared.state().api_authorizations.clone()
    }

    /// Every access token issued, in order.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.shared.state().issued_access.clone()
    }

    /// Every refresh token issued, in order.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.shared.state().issued_refresh.clone()
    }
}

/// A listener on `127.0.0.1:port` (0: a free one), bound at once: with
/// `SO_REUSEADDR`, as [`TcpListener::bind`] does, so that the connections of a
/// stopped server still closing do not keep the port for a restart.
fn listen(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind((std::net::Ipv4Addr::LOCALHOST, port).into())?;
    socket.listen(1024)
}

// ---------------------------------------------------------------------------------------------
// Holds
// ---------------------------------------------------------------------------------------------

struct HoldInner {
    released: watch::Sender<bool>,
    waiting: watch::Sender<usize>,
}

/// Holds `/oauth` requests until released or dropped; see [`MockVolt::hold_oauth`].
pub struct OAuthHold {
    inner: Arc<HoldInner>,
    shared: Weak<Shared>,
}

impl fmt::Debug for OAuthHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthHold")
            .field("waiting", &self.waiting())
            .finish()
    }
}

impl OAuthHold {
    /// Lets every held request (and later ones) proceed.
    pub fn release(self) {
        drop(self);
    }

    /// How many requests this hold is holding right now.
    pub fn waiting(&self) -> usize {
        *self.inner.waiting.borrow()
    }

    /// Resolves once at least `n` requests are held at the same time.
    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.inner.waiting.subscribe();
        // The sender lives in `self.inner`, so this only returns once the condition holds.
        let _reached = rx.wait_for(|waiting| *waiting >= n).await.is_ok();
    }
}

impl Drop for OAuthHold {
    fn drop(&mut self) {
        self.inner.released.send_replace(true);
        if let Some(shared) = self.shared.upgrade() {
            shared
                .state()
                .holds
                .retain(|hold| !Arc::ptr_eq(hold, &self.inner));
        }
    }
}

/// Counts a request as held by one hold for as long as it lives.
struct HeldGuard(Arc<HoldInner>);

impl HeldGuard {
    fn new(hold: Arc<HoldInner>) -> Self {
        hold.waiting.send_modify(|waiting| *waiting += 1);
        HeldGuard(hold)
    }

    async fn released(&self) {
        let mut rx = self.0.released.subscribe();
        let _released = rx.wait_for(|released| *released).await.is_ok();
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0
            .waiting
            .send_modify(|waiting| *waiting = waiting.saturating_sub(1));
    }
}

/// Tracks one `/oauth` request being handled.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.oauth_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_oauth_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.oauth_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// In-process service
// ---------------------------------------------------------------------------------------------

/// The future returned by [`MockService`].
pub type MockFuture =
    Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static>>;

/// An in-process tower service sharing a [`MockVolt`]'s state, for requests with bodies of type
/// `B`; see [`MockVolt::service`].
///
/// Request URIs may be absolute (`http://127.0.0.1:9/banks`) or relative (`/banks`): only the
/// path is routed on.
pub struct MockService<B = Full<Bytes>> {
    shared: Arc<Shared>,
    body: PhantomData<fn(B)>,
}

impl<B> Clone for MockService<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            body: PhantomData,
        }
    }
}

impl<B> fmt::Debug for MockService<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockService").finish_non_exhaustive()
    }
}

impl<B> tower::Service<Request<B>> for MockService<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = MockFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { Ok(handle(&shared, req).await) })
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::{AUTHORIZATION, CONTENT_TYPE};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    pub(super) const FORM: &str = "application/x-www-form-urlencoded;charset=UTF-8";

    pub(super) struct Answer {
        pub(super) status: StatusCode,
        pub(super) headers: HeaderMap,
        pub(super) body: Bytes,
    }

    impl Answer {
        pub(super) fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("JSON body")
        }

        pub(super) fn text(&self) -> &str {
            std::str::from_utf8(&self.body).expect("UTF-8 body")
        }
    }

    pub(super) async fn send(mock: &MockVolt, req: Request<Full<Bytes>>) -> Answer {
        let Ok(response) = mock.service().oneshot(req).await;
        let (parts, body) = response.into_parts();
        let Ok(collected) = body.collect().await;
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
        }
    }

    pub(super) fn form(fields: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let body = serde_urlencoded::to_string(fields).expect("form encoding");
        Request::post("/oauth")
            .header(CONTENT_TYPE, FORM)
            .body(Full::new(Bytes::from(body)))
            .expect("request")
    }

    pub(super) fn password_request() -> Request<Full<Bytes>> {
        form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("username", USERNAME),
            ("password", PASSWORD),
            ("grant_type", "password"),
        ])
    }

    pub(super) fn refresh_request(refresh_token: &str) -> Request<Full<Bytes>> {
        form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
    }

    pub(super) fn banks(token: Option<&str>) -> Request<Full<Bytes>> {
        let mut builder = Request::get("/banks");
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        builder.body(Full::default()).expect("request")
    }

    pub(super) fn payment(token: Option<&str>, body: &'static [u8]) -> Request<Full<Bytes>> {
        let mut builder = Request::post("http://127.0.0.1:9/v2/payments")
            .header(CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        builder
            .body(Full::new(Bytes::from_static(body)))
            .expect("request")
    }

    /// Runs a password grant and returns (access_token, refresh_token).
    pub(super) async fn login(mock: &MockVolt) -> (String, String) {
        let answer = send(mock, password_request()).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let body = answer.json();
        let access = body["access_token"].as_str().expect("access_token");
        let refresh = body["refresh_token"].as_str().expect("refresh_token");
        (access.to_owned(), refresh.to_owned())
    }

    pub(super) fn assert_error(answer: &Answer, status: StatusCode, error: &str) {
        assert_eq!(answer.status, status, "{}", answer.text());
        assert_eq!(answer.json()["error"], error, "{}", answer.text());
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn custom_credentials_and_lifetime() {
        let mock = MockVolt::builder()
            .credentials("id", "secret", "user", "pass")
            .access_token_lifetime(Duration::from_millis(1500))
            .in_process();
        let request = form(&[
            ("client_id", "id"),
            ("client_secret", "secret"),
            ("username", "user"),
            ("password", "pass"),
            ("grant_type", "password"),
        ]);
        let answer = send(&mock, request).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["expires_in"], 1);
        assert_error(
            &send(&mock, password_request()).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );
    }

    #[tokio::test]
    async fn revoking_refresh_tokens() {
        let mock = MockVolt::builder().in_process();
        let (access, refresh) = login(&mock).await;
        mock.revoke_refresh_tokens();
        assert_error(
            &send(&mock, refresh_request(&refresh)).await,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
        );
        // Access tokens are unaffected, and new logins get working refresh tokens.
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);
        let (_, refresh) = login(&mock).await;
        assert_eq!(send(&mock, refresh_request(&refresh)).await.status, 200);
    }

    #[tokio::test]
    async fn revoked_and_rejected_access_tokens() {
        let mock = MockVolt::builder().in_process();
        let (access, _) = login(&mock).await;
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);

        mock.reject_all_tokens(true);
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 401);
        mock.reject_all_tokens(false);
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);

        mock.revoke_access_tokens();
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 401);
        let (fresh, _) = login(&mock).await;
        assert_eq!(send(&mock, banks(Some(&fresh))).await.status, 200);
        assert_eq!(mock.api_calls(), 5);
        assert_eq!(mock.unauthorized(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn oauth_delay_uses_tokio_time() {
        let mock = MockVolt::builder().in_process();
        mock.set_oauth_delay(Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(send(&mock, password_request()).await.status, 200);
        assert!(start.elapsed() >= Duration::from_secs(5));

        mock.set_oauth_delay(Duration::ZERO);
        let start = Instant::now();
        assert_eq!(send(&mock, password_request()).await.status, 200);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn fail_oauth_budget_is_consumed_exactly() {
        let mock = MockVolt::builder().in_process();
        let body = r#"{"code":"UNAUTHORISED","message":"Unauthorised."}"#;
        mock.fail_oauth(2, StatusCode::SERVICE_UNAVAILABLE, body);
        for _ in 0..2 {
            let answer = send(&mock, password_request()).await;
            assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
            assert_eq!(answer.text(), body);
        }
        assert_eq!(send(&mock, password_request()).await.status, 200);
        assert_eq!(mock.oauth_calls(), 3);
        assert_eq!(mock.password_grants(), 3);
        assert_eq!(mock.issued_access_tokens().len(), 1);

        // fail_oauth wins over break_oauth; both budgets are then used up in order.
        mock.break_oauth(1, Broken::Empty);
        mock.fail_oauth(1, StatusCode::UNAUTHORIZED, "{}");
        assert_eq!(send(&mock, password_request()).await.status, 401);
        let answer = send(&mock, password_request()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.body.is_empty());
        assert_eq!(send(&mock, password_request()).await.status, 200);

        // A zero budget clears.
        mock.fail_oauth(5, StatusCode::BAD_GATEWAY, "");
        mock.fail_oauth(0, StatusCode::BAD_GATEWAY, "");
        assert_eq!(send(&mock, password_request()).await.status, 200);
    }

    #[tokio::test]
    async fn fail_oauth_with_headers_adds_them_to_each_scripted_answer() {
        use http::header::{DATE, RETRY_AFTER};
        let mock = MockVolt::builder().in_process();
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("30"));
        headers.insert(
            DATE,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
        mock.fail_oauth_with_headers(2, StatusCode::TOO_MANY_REQUESTS, headers, "<html>");
        for _ in 0..2 {
            let answer = send(&mock, password_request()).await;
            assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(answer.headers[RETRY_AFTER], "30");
            assert_eq!(answer.headers[DATE], "Sun, 06 Nov 1994 08:49:37 GMT");
            assert_eq!(answer.headers.get_all(CONTENT_TYPE).iter().count(), 1);
            assert_eq!(answer.headers[CONTENT_TYPE], "text/html");
            assert_eq!(answer.text(), "<html>");
        }
        let answer = send(&mock, password_request()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.headers.get(RETRY_AFTER).is_none());
        assert_eq!(mock.oauth_calls(), 3);
        // Plain fail_oauth adds none.
        mock.fail_oauth(1, StatusCode::SERVICE_UNAVAILABLE, "");
        let answer = send(&mock, password_request()).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(answer.headers.get(RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn break_oauth_answers_broken_bodies() {
        let mock = MockVolt::builder().in_process();
        for broken in [
            Broken::Empty,
            Broken::Html,
            Broken::TruncatedJson,
            Broken::Oversized,
            Broken::NotJson,
        ] {
            mock.break_oauth(1, broken);
            let answer = send(&mock, password_request()).await;
            assert_eq!(answer.status, StatusCode::OK);
            let parsed = serde_json::from_slice::<serde_json::Value>(&answer.body);
            match broken {
                Broken::Empty => assert!(answer.body.is_empty()),
                Broken::Html => {
                    assert!(answer.text().starts_with("<!DOCTYPE html>"));
                    assert!(
                        answer.headers[CONTENT_TYPE]
                            .to_str()
                            .is_ok_and(|ct| ct.starts_with("text/html"))
                    );
                }
                Broken::TruncatedJson => assert!(parsed.is_err_and(|err| err.is_eof())),
                Broken::Oversized => {
                    assert!(answer.body.len() > BODY_LIMIT);
                    assert!(answer.body.len() < BODY_LIMIT + 4096);
                    assert!(parsed.is_ok_and(|value| value["token_type"] == "Bearer"));
                }
                Broken::NotJson => assert!(parsed.is_err()),
            }
            // The budget was one call.
            assert_eq!(send(&mock, password_request()).await.status, 200);
        }
        assert_eq!(mock.oauth_calls(), 10);
        assert_eq!(mock.issued_access_tokens().len(), 5);
    }

    #[tokio::test]
    async fn hold_oauth_holds_until_released() {
        let mock = MockVolt::builder().in_process();
        let hold = mock.hold_oauth();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let service = mock.service();
                tokio::spawn(async move {
                    let Ok(response) = service.oneshot(password_request()).await;
                    response.status()
                })
            })
            .collect();
        hold.wait_for(3).await;
        assert_eq!(hold.waiting(), 3);
        assert_eq!(mock.oauth_calls(), 3);
        assert_eq!(mock.max_oauth_in_flight(), 3);
        assert!(mock.issued_access_tokens().is_empty());
        assert!(tasks.iter().all(|task| !task.is_finished()));

        hold.release();
        for task in tasks {
            assert_eq!(task.await.expect("task"), StatusCode::OK);
        }
        assert_eq!(mock.issued_access_tokens().len(), 3);
        // Later requests are not held.
        assert_eq!(send(&mock, password_request()).await.status, 200);
        assert_eq!(mock.max_oauth_in_flight(), 3);
    }

    #[tokio::test]
    async fn held_requests_that_are_dropped_are_no_longer_counted() {
        let mock = MockVolt::builder().in_process();
        let hold = mock.hold_oauth();
        let service = mock.service();
        let task = tokio::spawn(async move { service.oneshot(password_request()).await });
        hold.wait_for(1).await;
        task.abort();
        assert!(task.await.is_err_and(|err| err.is_cancelled()));
        assert_eq!(hold.waiting(), 0);

        // The in-flight count went back down: one more concurrent request makes 1, not 2.
        let service = mock.service();
        let task = tokio::spawn(async move { service.oneshot(password_request()).await });
        hold.wait_for(1).await;
        assert_eq!(mock.max_oauth_in_flight(), 1);
        drop(hold);
        let Ok(response) = task.await.expect("task");
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn hold_applies_only_to_later_requests_and_before_failures() {
        let mock = MockVolt::builder().in_process();
        mock.fail_oauth(1, StatusCode::INTERNAL_SERVER_ERROR, "{}");
        let hold = mock.hold_oauth();
        let service = mock.service();
        let held = tokio::spawn(async move { service.oneshot(password_request()).await });
        hold.wait_for(1).await;
        // The failure budget is only consumed once the held request proceeds.
        hold.release();
        let Ok(response) = held.await.expect("task");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(send(&mock, password_request()).await.status, 200);
    }

    #[test]
    fn public_types_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<MockVolt>();
        send_sync::<MockService>();
        send_sync::<OAuthHold>();
        send_sync::<MockBuilder>();
        let mock = MockVolt::builder().in_process();
        let hold = mock.hold_oauth();
        send(&hold.wait_for(0));
        send(&mock.restart());
    }

    #[tokio::test]
    async fn in_process_mock_has_a_fixed_url_and_no_listener() {
        let mock = MockVolt::builder().in_process();
        assert_eq!(mock.url(), "http://127.0.0.1:9");
        mock.stop();
        let err = mock.restart().await.expect_err("no listener");
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert_eq!(send(&mock, password_request()).await.status, 200);
    }
}
