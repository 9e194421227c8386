//! An embedded mock of Volt's API, for tests and examples.
//!
//! [`MockVolt`] answers `POST /oauth` (password and refresh_token grants, form or JSON bodies)
//! and the Gateway calls `GET /banks`, `GET /banks/{id}`, `POST /v2/payments`, `GET /payments`,
//! `GET /payments/{id}` and `POST /dropin` (each `401` without a valid token), either over TCP on `127.0.0.1` or in process through
//! [`MockVolt::service`]. It issues random opaque tokens, enforces their expiry on tokio's clock
//! (so in-process use works under `#[tokio::test(start_paused = true)]`), rotates refresh tokens,
//! records what it receives and can be told to fail, break, delay or hold token requests.
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
use std::future::{Future, poll_fn};
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

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
/// and `refresh_token`; [`OAuthRequest::field`] and `fields` hold them as sent.
#[derive(Clone)]
pub struct OAuthRequest {
    /// The `grant_type` field, if present.
    pub grant_type: Option<String>,
    /// The `Content-Type` header, if present.
    pub content_type: Option<String>,
    /// The `Accept` header, if present.
    pub accept: Option<String>,
    /// The body fields in order (form or JSON; non-string JSON values in their JSON text).
    /// Empty when the body could not be parsed.
    pub fields: Vec<(String, String)>,
}

impl fmt::Debug for OAuthRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<(&str, &str)> = self
            .fields
            .iter()
            .map(|(name, value)| match name.as_str() {
                "client_secret" | "password" | "refresh_token" => (name.as_str(), "[redacted]"),
                _ => (name.as_str(), value.as_str()),
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
    /// [`MockVolt::restart`] listens again on another.
    ///
    /// # Errors
    /// The I/O error of binding the port.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub async fn start(self) -> io::Result<MockVolt> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
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
    /// # use volt_auth::mock::MockVolt;
    /// use http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
    ///
    /// let mock = MockVolt::builder().in_process();
    /// let mut headers = HeaderMap::new();
    /// headers.insert(RETRY_AFTER, HeaderValue::from_static("30"));
    /// mock.fail_oauth_with_headers(1, http::StatusCode::TOO_MANY_REQUESTS, headers, "{}");
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
    /// if already listening. A server whose runtime has shut down is not listening.
    ///
    /// # Errors
    /// [`io::ErrorKind::Unsupported`] on an in-process mock, and the I/O error of binding the
    /// port (another process may have taken it).
    pub async fn restart(&self) -> io::Result<()> {
        if self.in_process {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an in-process mock has no listener",
            ));
        }
        if lock(&self.server).as_ref().is_some_and(Server::running) {
            return Ok(());
        }
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, self.port)).await?;
        let server = Server::spawn(listener, Arc::clone(&self.shared));
        let previous = lock(&self.server).replace(server);
        if let Some(previous) = previous {
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

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

enum BodyError {
    TooLarge,
    Failed,
}

async fn collect<B>(body: B) -> Result<Bytes, BodyError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Failed),
    }
}

async fn handle<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path == "/oauth" {
        return oauth(shared, &parts, body).await;
    }
    let Some(route) = Api::route(path) else {
        return not_found();
    };
    let (method, allow) = route.method();
    if parts.method != method {
        return method_not_allowed(allow);
    }
    api(shared, &parts, body, route).await
}

fn not_found() -> Response<Full<Bytes>> {
    json(
        StatusCode::NOT_FOUND,
        r#"{"code":404,"message":"Not Found"}"#,
    )
}

fn header(parts: &Parts, name: http::header::HeaderName) -> Option<String> {
    parts
        .headers
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Parses a form or JSON body; `Err` means `invalid_request`.
fn parse_fields(content_type: Option<&str>, body: &[u8]) -> Result<Vec<(String, String)>, ()> {
    let essence = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase())
        .ok_or(())?;
    if essence == "application/x-www-form-urlencoded" {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).map_err(|_| ())
    } else if essence == "application/json" || essence.ends_with("+json") {
        let map = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
            .map_err(|_| ())?;
        Ok(map
            .into_iter()
            .filter(|(_, value)| !value.is_null())
            .map(|(key, value)| match value {
                serde_json::Value::String(text) => (key, text),
                other => (key, other.to_string()),
            })
            .collect())
    } else {
        Err(())
    }
}

async fn oauth<B>(shared: &Shared, parts: &Parts, body: B) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _in_flight = InFlight::enter(shared);
    let body = collect(body).await;
    if let Err(BodyError::Failed) = body {
        // The client went away mid-body: nothing was received, so nothing is counted,
        // recorded or taken from the fail/break budgets.
        return unreadable_body();
    }
    let content_type = header(parts, CONTENT_TYPE);
    let parsed = match &body {
        Ok(bytes) => parse_fields(content_type.as_deref(), bytes),
        Err(_) => Err(()),
    };
    let fields = parsed.clone().unwrap_or_default();
    let grant_type = field(&fields, "grant_type").map(str::to_owned);
    let record = OAuthRequest {
        grant_type: grant_type.clone(),
        content_type,
        accept: header(parts, ACCEPT),
        fields,
    };

    let holds = {
        let mut state = shared.state();
        state.oauth_requests.push(record);
        state.holds.clone()
    };
    shared.oauth_calls.fetch_add(1, Ordering::SeqCst);
    match grant_type.as_deref() {
        Some("password") => shared.password_grants.fetch_add(1, Ordering::SeqCst),
        Some("refresh_token") => shared.refresh_grants.fetch_add(1, Ordering::SeqCst),
        _ => 0,
    };

    // Hold: count ourselves as waiting on every active hold, then wait for each release.
    let held: Vec<HeldGuard> = holds.into_iter().map(HeldGuard::new).collect();
    for guard in &held {
        guard.released().await;
    }
    drop(held);

    let delay = shared.state().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    if let Some(response) = scripted(shared) {
        return response;
    }

    if parts.method != Method::POST {
        return method_not_allowed("POST");
    }
    let fields = match (body, parsed) {
        (Err(BodyError::TooLarge), _) => return payload_too_large(),
        (Ok(_), Ok(fields)) => fields,
        _ => return unreadable_body(),
    };
    match grant_type.as_deref() {
        Some("password") => password_grant(shared, &fields),
        Some("refresh_token") => refresh_grant(shared, &fields),
        _ => json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unsupported_grant_type","error_description":"The authorization grant type is not supported by the authorization server."}"#,
        ),
    }
}

fn unreadable_body() -> Response<Full<Bytes>> {
    json(
        StatusCode::BAD_REQUEST,
        r#"{"error":"invalid_request","error_description":"The request body could not be parsed."}"#,
    )
}

/// Consumes one unit of the `fail_oauth` or `break_oauth` budget, if any.
fn scripted(shared: &Shared) -> Option<Response<Full<Bytes>>> {
    let mut state = shared.state();
    if let Some(failure) = state.failure.as_mut() {
        let mut response = json(failure.status, failure.body.clone());
        // Replaces the defaults' values of the names it has (`Content-Type`).
        response.headers_mut().extend(failure.headers.clone());
        failure.remaining -= 1;
        if failure.remaining == 0 {
            state.failure = None;
        }
        return Some(response);
    }
    if let Some((remaining, broken)) = state.broken.as_mut() {
        let response = broken_response(*broken);
        *remaining -= 1;
        if *remaining == 0 {
            state.broken = None;
        }
        return Some(response);
    }
    None
}

fn broken_response(broken: Broken) -> Response<Full<Bytes>> {
    match broken {
        Broken::Empty => json(StatusCode::OK, Bytes::new()),
        Broken::Html => with_content_type(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\
             <body><h1>502 Bad Gateway</h1></body></html>\n",
        ),
        Broken::TruncatedJson => json(
            StatusCode::OK,
            r#"{"token_type":"Bearer","expires_in":3600,"access_token":"eyJ0eXAiOiJKV1Qi"#,
        ),
        Broken::Oversized => {
            let head = r#"{"token_type":"Bearer","expires_in":3600,"access_token":"oversized","refresh_token":"oversized","padding":""#;
            let tail = "\"}";
            let padding = BODY_LIMIT + 1 - head.len() - tail.len() + 1024;
            let mut body = String::with_capacity(head.len() + padding + tail.len());
            body.push_str(head);
            body.extend(std::iter::repeat_n('a', padding));
            body.push_str(tail);
            json(StatusCode::OK, body)
        }
        Broken::NotJson => with_content_type(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "access_token=not-json&token_type=bearer&expires_in=3600",
        ),
    }
}

fn client_ok(shared: &Shared, fields: &[(String, String)]) -> bool {
    field(fields, "client_id") == Some(shared.config.client_id.as_str())
        && field(fields, "client_secret") == Some(shared.config.client_secret.as_str())
}

fn invalid_client() -> Response<Full<Bytes>> {
    json(
        StatusCode::UNAUTHORIZED,
        r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
    )
}

fn password_grant(shared: &Shared, fields: &[(String, String)]) -> Response<Full<Bytes>> {
    if !client_ok(shared, fields) {
        return invalid_client();
    }
    if field(fields, "username") != Some(shared.config.username.as_str())
        || field(fields, "password") != Some(shared.config.password.as_str())
    {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_grant","error_description":"Invalid username and password combination"}"#,
        );
    }
    issue_tokens(shared, &mut shared.state())
}

fn refresh_grant(shared: &Shared, fields: &[(String, String)]) -> Response<Full<Bytes>> {
    if !client_ok(shared, fields) {
        return invalid_client();
    }
    let Some(token) = field(fields, "refresh_token") else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_request","error_description":"The request is missing the refresh_token parameter."}"#,
        );
    };
    let mut state = shared.state();
    // Using a refresh token consumes it, whether or not it is still valid.
    match state.refresh_tokens.remove(token) {
        Some(expires) if Instant::now() < expires => issue_tokens(shared, &mut state),
        _ => json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_grant","error_description":"The refresh token is invalid."}"#,
        ),
    }
}

fn random_token(prefix: &str) -> String {
    let mut token = String::with_capacity(prefix.len() + TOKEN_LEN);
    token.push_str(prefix);
    token.extend(std::iter::repeat_with(fastrand::alphanumeric).take(TOKEN_LEN));
    token
}

#[derive(Serialize)]
struct TokenResponse<'a> {
    token_type: &'a str,
    expires_in: u64,
    access_token: &'a str,
    refresh_token: &'a str,
}

fn issue_tokens(shared: &Shared, state: &mut State) -> Response<Full<Bytes>> {
    let now = Instant::now();
    let access = random_token("mock_at_");
    let refresh = random_token("mock_rt_");
    state
        .access_tokens
        .insert(access.clone(), now + shared.config.access_lifetime);
    state
        .refresh_tokens
        .insert(refresh.clone(), now + shared.config.refresh_lifetime);
    state.issued_access.push(access.clone());
    state.issued_refresh.push(refresh.clone());
    let body = TokenResponse {
        token_type: "Bearer",
        expires_in: shared.config.access_lifetime.as_secs().max(1),
        access_token: &access,
        refresh_token: &refresh,
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => json(StatusCode::OK, bytes),
        Err(_) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"code":500,"message":"Internal Server Error"}"#,
        ),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api<'a> {
    Banks,
    Bank(&'a str),
    Payments,
    PaymentList,
    Payment(&'a str),
    Dropin,
}

impl<'a> Api<'a> {
    fn route(path: &'a str) -> Option<Self> {
        let item = |rest: &'a str| (!rest.is_empty() && !rest.contains('/')).then_some(rest);
        match path {
            "/banks" => Some(Api::Banks),
            "/v2/payments" => Some(Api::Payments),
            "/payments" => Some(Api::PaymentList),
            "/dropin" => Some(Api::Dropin),
            _ => {
                if let Some(id) = path.strip_prefix("/banks/") {
                    item(id).map(Api::Bank)
                } else {
                    path.strip_prefix("/payments/")
                        .and_then(item)
                        .map(Api::Payment)
                }
            }
        }
    }

    fn method(self) -> (Method, &'static str) {
        match self {
            Api::Payments | Api::Dropin => (Method::POST, "POST"),
            _ => (Method::GET, "GET"),
        }
    }
}

const BANKS: &str = r#"[{"id":"mock-bank-barclays","name":"Mock Barclays","country":"GB"},{"id":"mock-bank-hsbc","name":"Mock HSBC","country":"GB"},{"id":"mock-bank-monzo","name":"Mock Monzo","country":"GB"}]"#;

async fn api<B>(shared: &Shared, parts: &Parts, body: B, route: Api<'_>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = match route {
        Api::Payments | Api::Dropin => Some(collect(body).await),
        _ => None,
    };
    if let Some(Err(BodyError::Failed)) = body {
        // The client went away mid-body: nothing was received, nothing is counted.
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"code":400,"message":"Bad Request"}"#,
        );
    }
    let authorization = header(parts, AUTHORIZATION);
    let authorized = {
        let mut state = shared.state();
        state.api_authorizations.push(authorization.clone());
        if let (Api::Payments, Some(Ok(bytes))) = (route, &body) {
            state.payment_bodies.push(bytes.clone());
        }
        !shared.reject_all_tokens.load(Ordering::SeqCst)
            && bearer(authorization.as_deref())
                .and_then(|token| state.access_tokens.get(token))
                .is_some_and(|expires| Instant::now() < *expires)
    };
    shared.api_calls.fetch_add(1, Ordering::SeqCst);

    if !authorized {
        shared.unauthorized.fetch_add(1, Ordering::SeqCst);
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            r#"{"code":401,"message":"Unauthorized"}"#,
        );
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let bytes = match body {
        Some(Err(_)) => return payload_too_large(),
        Some(Ok(bytes)) => bytes,
        None => Bytes::new(),
    };
    match route {
        Api::Banks => json(StatusCode::OK, BANKS),
        Api::Bank(id) => {
            let banks: serde_json::Value = serde_json::from_str(BANKS).unwrap_or_default();
            let bank = banks
                .as_array()
                .and_then(|banks| banks.iter().find(|bank| bank["id"] == id));
            match bank {
                Some(bank) => json(StatusCode::OK, bank.to_string()),
                None => not_found(),
            }
        }
        Api::Payments => {
            let id = uuid_like();
            let created = serde_json::json!({
                "id": id,
                "checkoutUrl": format!("https://checkout.sandbox.volt.io/{id}"),
                "digest": payment_digest(&bytes),
                "size": bytes.len(),
            });
            shared.state().payments.push(created.clone());
            json(StatusCode::CREATED, created.to_string())
        }
        Api::PaymentList => {
            let list = serde_json::Value::Array(shared.state().payments.clone());
            json(StatusCode::OK, list.to_string())
        }
        Api::Payment(id) => {
            let payment = shared
                .state()
                .payments
                .iter()
                .find(|payment| payment["id"] == id)
                .cloned();
            match payment {
                Some(payment) => json(StatusCode::OK, payment.to_string()),
                None => not_found(),
            }
        }
        Api::Dropin => {
            let created = serde_json::json!({ "id": uuid_like() });
            json(StatusCode::CREATED, created.to_string())
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
fn bearer(value: Option<&str>) -> Option<&str> {
    let (scheme, token) = value?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn uuid_like() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        fastrand::u8(8..12),
        fastrand::u16(..0x1000),
        fastrand::u64(..1 << 48),
    )
}

fn with_content_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    with_content_type(status, "application/json", body)
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        r#"{"code":405,"message":"Method Not Allowed"}"#,
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn payload_too_large() -> Response<Full<Bytes>> {
    json(
        StatusCode::PAYLOAD_TOO_LARGE,
        r#"{"code":413,"message":"Payload Too Large"}"#,
    )
}

// ---------------------------------------------------------------------------------------------
// TCP server
// ---------------------------------------------------------------------------------------------

type SharedListener = Arc<Mutex<Option<TcpListener>>>;
type SharedStream = Arc<Mutex<Option<TcpStream>>>;

/// Open connections, so that `stop` can close their sockets synchronously.
#[derive(Default)]
struct Connections {
    closed: bool,
    next_id: u64,
    open: HashMap<u64, SharedStream>,
}

struct Server {
    listener: SharedListener,
    connections: Arc<Mutex<Connections>>,
    task: JoinHandle<()>,
}

impl Server {
    fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Server {
        let listener = Arc::new(Mutex::new(Some(listener)));
        let connections = Arc::new(Mutex::new(Connections::default()));
        let task = tokio::spawn(accept_loop(
            Arc::clone(&listener),
            Arc::clone(&connections),
            shared,
        ));
        Server {
            listener,
            connections,
            task,
        }
    }

    /// Closes the listening socket and every connection's socket now, then ends the tasks.
    fn shutdown(self) {
        close(&self.listener, &self.connections);
        self.task.abort();
    }

    /// Whether the server still runs: its task ends with the runtime it was
    /// spawned on.
    fn running(&self) -> bool {
        !self.task.is_finished()
    }
}

/// Closes the listening socket and every connection's socket.
fn close(listener: &SharedListener, connections: &Mutex<Connections>) {
    drop(lock(listener).take());
    let open = {
        let mut connections = lock(connections);
        connections.closed = true;
        std::mem::take(&mut connections.open)
    };
    for stream in open.into_values() {
        drop(lock(&stream).take());
    }
}

/// Closes the server's sockets when its accept task ends however it ends:
/// also when the runtime it runs on shuts down, which drops the task without
/// running it again. Else the port would stay open, and connections would
/// be accepted by the system and never answered.
struct CloseOnDrop {
    listener: SharedListener,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        close(&self.listener, &self.connections);
    }
}

async fn accept_loop(
    listener: SharedListener,
    connections: Arc<Mutex<Connections>>,
    shared: Arc<Shared>,
) {
    // Declared first, so dropped last: after the connection tasks.
    let _close = CloseOnDrop {
        listener: Arc::clone(&listener),
        connections: Arc::clone(&connections),
    };
    let mut tasks = JoinSet::new();
    loop {
        let accept = poll_fn(|cx| match lock(&listener).as_ref() {
            Some(listener) => listener.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        });
        let accepted = tokio::select! {
            accepted = accept => accepted,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => {
                if let Some((id, stream)) = register(&connections, stream) {
                    tasks.spawn(serve_connection(
                        id,
                        stream,
                        peer,
                        Arc::clone(&connections),
                        Arc::clone(&shared),
                    ));
                }
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "mock Volt server: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn register(connections: &Mutex<Connections>, stream: TcpStream) -> Option<(u64, SharedStream)> {
    let _ = stream.set_nodelay(true);
    let mut connections = lock(connections);
    if connections.closed {
        return None;
    }
    let id = connections.next_id;
    connections.next_id += 1;
    let stream = Arc::new(Mutex::new(Some(stream)));
    connections.open.insert(id, Arc::clone(&stream));
    Some((id, stream))
}

/// Removes a connection from the registry when its task ends.
struct Deregister {
    id: u64,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        lock(&self.connections).open.remove(&self.id);
    }
}

async fn serve_connection(
    id: u64,
    stream: SharedStream,
    peer: SocketAddr,
    connections: Arc<Mutex<Connections>>,
    shared: Arc<Shared>,
) {
    let _deregister = Deregister { id, connections };
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    let io = TokioIo::new(ClosableStream(stream));
    if let Err(err) = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %err, %peer, "mock Volt server: connection ended with an error");
    }
}

/// A TCP stream whose socket `stop` can close from outside the connection task.
struct ClosableStream(SharedStream);

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "mock Volt server stopped")
}

impl AsyncRead for ClosableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for ClosableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_write(cx, buf),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    const FORM: &str = "application/x-www-form-urlencoded;charset=UTF-8";

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("JSON body")
        }

        fn text(&self) -> &str {
            std::str::from_utf8(&self.body).expect("UTF-8 body")
        }
    }

    async fn send(mock: &MockVolt, req: Request<Full<Bytes>>) -> Answer {
        let Ok(response) = mock.service().oneshot(req).await;
        let (parts, body) = response.into_parts();
        let Ok(collected) = body.collect().await;
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
        }
    }

    fn form(fields: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let body = serde_urlencoded::to_string(fields).expect("form encoding");
        Request::post("/oauth")
            .header(CONTENT_TYPE, FORM)
            .body(Full::new(Bytes::from(body)))
            .expect("request")
    }

    fn password_request() -> Request<Full<Bytes>> {
        form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("username", USERNAME),
            ("password", PASSWORD),
            ("grant_type", "password"),
        ])
    }

    fn refresh_request(refresh_token: &str) -> Request<Full<Bytes>> {
        form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
    }

    fn banks(token: Option<&str>) -> Request<Full<Bytes>> {
        let mut builder = Request::get("/banks");
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        builder.body(Full::default()).expect("request")
    }

    fn payment(token: Option<&str>, body: &'static [u8]) -> Request<Full<Bytes>> {
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
    async fn login(mock: &MockVolt) -> (String, String) {
        let answer = send(mock, password_request()).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let body = answer.json();
        let access = body["access_token"].as_str().expect("access_token");
        let refresh = body["refresh_token"].as_str().expect("refresh_token");
        (access.to_owned(), refresh.to_owned())
    }

    fn assert_error(answer: &Answer, status: StatusCode, error: &str) {
        assert_eq!(answer.status, status, "{}", answer.text());
        assert_eq!(answer.json()["error"], error, "{}", answer.text());
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn password_grant_issues_bearer_tokens() {
        let mock = MockVolt::builder().in_process();
        let answer = send(&mock, password_request()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
        let body = answer.json();
        let object = body.as_object().expect("object");
        assert_eq!(object.len(), 4);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        let access = body["access_token"].as_str().expect("access_token");
        let refresh = body["refresh_token"].as_str().expect("refresh_token");
        assert!(access.starts_with("mock_at_") && access.len() == 8 + TOKEN_LEN);
        assert!(refresh.starts_with("mock_rt_") && refresh.len() == 8 + TOKEN_LEN);
        assert!(access[8..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(mock.issued_access_tokens(), vec![access.to_owned()]);
        assert_eq!(mock.issued_refresh_tokens(), vec![refresh.to_owned()]);
        assert_eq!(mock.oauth_calls(), 1);
        assert_eq!(mock.password_grants(), 1);
        assert_eq!(mock.refresh_grants(), 0);
        assert_eq!(mock.max_oauth_in_flight(), 1);

        let requests = mock.oauth_requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].grant_type.as_deref(), Some("password"));
        assert_eq!(requests[0].content_type.as_deref(), Some(FORM));
        assert_eq!(requests[0].accept, None);
        assert_eq!(requests[0].field("username"), Some(USERNAME));
        assert_eq!(requests[0].fields.len(), 5);

        // Each grant issues fresh tokens.
        let (second, _) = login(&mock).await;
        assert_ne!(second, access);
    }

    #[tokio::test]
    async fn bad_credentials_are_rejected() {
        let mock = MockVolt::builder().in_process();
        let wrong_secret = form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", "nope"),
            ("username", USERNAME),
            ("password", PASSWORD),
            ("grant_type", "password"),
        ]);
        let answer = send(&mock, wrong_secret).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
        assert_eq!(
            answer.text(),
            r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#
        );

        let wrong_password = form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("username", USERNAME),
            ("password", "nope"),
            ("grant_type", "password"),
        ]);
        let answer = send(&mock, wrong_password).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_grant");
        assert_eq!(
            answer.json()["error_description"],
            "Invalid username and password combination"
        );

        // Wrong client and wrong password: the client is checked first.
        let both = form(&[
            ("client_id", "other"),
            ("client_secret", CLIENT_SECRET),
            ("username", USERNAME),
            ("password", "nope"),
            ("grant_type", "password"),
        ]);
        assert_error(
            &send(&mock, both).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );
        assert!(mock.issued_access_tokens().is_empty());
        assert_eq!(mock.password_grants(), 3);
        assert_eq!(mock.oauth_calls(), 3);
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
    async fn refresh_tokens_rotate() {
        let mock = MockVolt::builder().in_process();
        let (access, refresh) = login(&mock).await;

        let answer = send(&mock, refresh_request(&refresh)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let body = answer.json();
        assert_eq!(body["token_type"], "Bearer");
        let new_access = body["access_token"].as_str().expect("access_token");
        let new_refresh = body["refresh_token"].as_str().expect("refresh_token");
        assert_ne!(new_access, access);
        assert_ne!(new_refresh, refresh);
        assert_eq!(mock.issued_refresh_tokens().len(), 2);

        // Reusing the consumed refresh token fails.
        let answer = send(&mock, refresh_request(&refresh)).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_grant");
        assert_eq!(
            answer.text(),
            r#"{"error":"invalid_grant","error_description":"The refresh token is invalid."}"#
        );

        // Both access tokens still work; the new refresh token works once.
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);
        assert_eq!(send(&mock, banks(Some(new_access))).await.status, 200);
        assert_eq!(send(&mock, refresh_request(new_refresh)).await.status, 200);
        assert_eq!(mock.refresh_grants(), 3);
        assert_eq!(mock.password_grants(), 1);
    }

    #[tokio::test]
    async fn refresh_requires_client_credentials_and_a_known_token() {
        let mock = MockVolt::builder().in_process();
        let (_, refresh) = login(&mock).await;

        let without_client = form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)]);
        assert_error(
            &send(&mock, without_client).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );
        // A rejected client does not consume the refresh token.
        let unknown = refresh_request("mock_rt_unknown");
        assert_error(
            &send(&mock, unknown).await,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
        );
        let missing = form(&[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ]);
        assert_error(
            &send(&mock, missing).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
        assert_eq!(send(&mock, refresh_request(&refresh)).await.status, 200);
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
    async fn json_bodies_are_accepted() {
        let mock = MockVolt::builder().in_process();
        let body = serde_json::json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "username": USERNAME,
            "password": PASSWORD,
            "grant_type": "password",
        });
        let request = Request::post("http://127.0.0.1:9/oauth")
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let answer = send(&mock, request).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let refresh = answer.json()["refresh_token"]
            .as_str()
            .expect("refresh_token")
            .to_owned();

        let request = Request::post("/oauth")
            .header(CONTENT_TYPE, "application/json; charset=utf-8")
            .body(Full::new(Bytes::from(
                serde_json::json!({
                    "grant_type": "refresh_token",
                    "refresh_token": refresh,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                })
                .to_string(),
            )))
            .expect("request");
        assert_eq!(send(&mock, request).await.status, StatusCode::OK);

        let requests = mock.oauth_requests();
        assert_eq!(
            requests[0].content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(requests[0].accept.as_deref(), Some("application/json"));
        assert_eq!(requests[0].field("password"), Some(PASSWORD));
        assert_eq!(requests[1].grant_type.as_deref(), Some("refresh_token"));
        assert_eq!(mock.password_grants(), 1);
        assert_eq!(mock.refresh_grants(), 1);

        // Non-string JSON values are recorded as JSON text (and do not match).
        let request = Request::post("/oauth")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"grant_type":"password","client_id":5,"client_secret":null}"#,
            )))
            .expect("request");
        assert_error(
            &send(&mock, request).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );
        let last = mock.oauth_requests().pop().expect("recorded");
        assert_eq!(last.field("client_id"), Some("5"));
        assert_eq!(last.field("client_secret"), None);
    }

    #[tokio::test]
    async fn malformed_oauth_requests() {
        let mock = MockVolt::builder().in_process();
        let cases: Vec<(Request<Full<Bytes>>, StatusCode, &str)> = vec![
            (
                form(&[("grant_type", "client_credentials")]),
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
            ),
            (
                form(&[("client_id", CLIENT_ID)]),
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
            ),
            (
                Request::post("/oauth")
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from_static(b"{\"grant_type\":")))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                Request::post("/oauth")
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from_static(b"[1,2]")))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                Request::post("/oauth")
                    .header(CONTENT_TYPE, "text/plain")
                    .body(Full::new(Bytes::from_static(b"grant_type=password")))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                Request::post("/oauth")
                    .body(Full::new(Bytes::from_static(b"grant_type=password")))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
        ];
        let count = cases.len();
        for (request, status, error) in cases {
            assert_error(&send(&mock, request).await, status, error);
        }

        let get = Request::get("/oauth")
            .body(Full::default())
            .expect("request");
        let answer = send(&mock, get).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer.headers[ALLOW], "POST");

        let huge = Request::post("/oauth")
            .header(CONTENT_TYPE, FORM)
            .body(Full::new(Bytes::from(vec![b'a'; BODY_LIMIT + 1])))
            .expect("request");
        assert_eq!(
            send(&mock, huge).await.status,
            StatusCode::PAYLOAD_TOO_LARGE
        );

        assert_eq!(mock.oauth_calls(), count + 2);
        assert_eq!(mock.oauth_requests().len(), count + 2);
        assert!(mock.issued_access_tokens().is_empty());
    }

    #[tokio::test]
    async fn banks_require_a_valid_token() {
        let mock = MockVolt::builder().in_process();
        let answer = send(&mock, banks(None)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.headers[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(answer.text(), r#"{"code":401,"message":"Unauthorized"}"#);
        assert_eq!(send(&mock, banks(Some("made-up"))).await.status, 401);

        let (access, _) = login(&mock).await;
        let answer = send(&mock, banks(Some(&access))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
        let list = answer.json();
        let list = list.as_array().expect("array");
        assert_eq!(list.len(), 3);
        assert!(
            list.iter()
                .all(|bank| bank["id"].is_string() && bank["name"].is_string())
        );
        assert_eq!(list[0]["country"], "GB");

        // Absolute URI and lower-case scheme work too.
        let request = Request::get("http://127.0.0.1:9/banks")
            .header(AUTHORIZATION, format!("bearer {access}"))
            .body(Full::default())
            .expect("request");
        assert_eq!(send(&mock, request).await.status, StatusCode::OK);

        assert_eq!(mock.api_calls(), 4);
        assert_eq!(mock.unauthorized(), 2);
        assert_eq!(
            mock.api_authorizations(),
            vec![
                None,
                Some("Bearer made-up".to_owned()),
                Some(format!("Bearer {access}")),
                Some(format!("bearer {access}")),
            ]
        );

        // Routing: wrong method and unknown path.
        let post = Request::post("/banks")
            .body(Full::default())
            .expect("request");
        assert_eq!(send(&mock, post).await.status, 405);
        let other = Request::get("/refunds")
            .body(Full::default())
            .expect("request");
        assert_eq!(send(&mock, other).await.status, 404);
        assert_eq!(mock.api_calls(), 4);
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
    async fn tokens_expire_on_tokio_clock() {
        let mock = MockVolt::builder()
            .access_token_lifetime(Duration::from_secs(60))
            .refresh_token_lifetime(Duration::from_secs(120))
            .in_process();
        let answer = send(&mock, password_request()).await;
        assert_eq!(answer.json()["expires_in"], 60);
        let access = answer.json()["access_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let refresh = answer.json()["refresh_token"]
            .as_str()
            .expect("token")
            .to_owned();

        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 401);

        // t = 60: the refresh token (valid until 120) still works.
        let answer = send(&mock, refresh_request(&refresh)).await;
        assert_eq!(answer.status, StatusCode::OK);
        let access = answer.json()["access_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let refresh = answer.json()["refresh_token"]
            .as_str()
            .expect("token")
            .to_owned();
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);

        // t = 180: the new refresh token (issued at 60) has expired.
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_error(
            &send(&mock, refresh_request(&refresh)).await,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
        );
        assert_eq!(mock.unauthorized(), 1);
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

    #[tokio::test]
    async fn payments_answer_digest_and_record_bodies() {
        assert_eq!(payment_digest(b""), "cbf29ce484222325");
        assert_eq!(payment_digest(b"a"), "af63dc4c8601ec8c");
        assert_eq!(payment_digest(b"foobar"), "85944171f73967e8");

        let mock = MockVolt::builder().in_process();
        let first: &'static [u8] = br#"{"amount":100,"currencyCode":"GBP"}"#;
        let answer = send(&mock, payment(None, first)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);

        let (access, _) = login(&mock).await;
        let second: &'static [u8] = br#"{"amount":250,"currencyCode":"EUR"}"#;
        let answer = send(&mock, payment(Some(&access), second)).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        let body = answer.json();
        let id = body["id"].as_str().expect("id");
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_eq!(
            body["checkoutUrl"],
            format!("https://checkout.sandbox.volt.io/{id}")
        );
        assert_eq!(body["digest"], payment_digest(second));
        assert_eq!(body["size"], second.len());

        assert_eq!(
            mock.payment_bodies(),
            vec![Bytes::from_static(first), Bytes::from_static(second)]
        );
        assert_eq!(mock.api_calls(), 2);
        assert_eq!(mock.unauthorized(), 1);

        let get = Request::get("/v2/payments")
            .body(Full::default())
            .expect("request");
        assert_eq!(send(&mock, get).await.status, 405);
        let huge = Request::post("/v2/payments")
            .header(AUTHORIZATION, format!("Bearer {access}"))
            .body(Full::new(Bytes::from(vec![b'x'; BODY_LIMIT + 1])))
            .expect("request");
        assert_eq!(
            send(&mock, huge).await.status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(mock.payment_bodies().len(), 2);
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

    #[tokio::test]
    async fn tcp_server_stop_and_restart() {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;

        let mock = MockVolt::start().await.expect("start");
        let url = mock.url();
        assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with('/'));
        let addr: SocketAddr = url["http://".len()..].parse().expect("address");

        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http::<Full<Bytes>>();
        let call = |req: Request<Full<Bytes>>| {
            let client = client.clone();
            async move {
                let response = client.request(req).await?;
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|collected| collected.to_bytes())
                    .unwrap_or_default();
                Ok::<_, hyper_util::client::legacy::Error>((status, body))
            }
        };
        let with_base = |req: Request<Full<Bytes>>| {
            let (mut parts, body) = req.into_parts();
            parts.uri = format!("{url}{}", parts.uri.path()).parse().expect("uri");
            Request::from_parts(parts, body)
        };

        let (status, body) = call(with_base(password_request())).await.expect("oauth");
        assert_eq!(status, StatusCode::OK);
        let tokens: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let access = tokens["access_token"].as_str().expect("token").to_owned();
        let (status, _) = call(with_base(banks(Some(&access)))).await.expect("banks");
        assert_eq!(status, StatusCode::OK);

        // A kept-alive connection, to check that stop() closes it.
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake");
        let connection = tokio::spawn(connection);
        let response = sender.send_request(banks(None)).await.expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let _ = response.into_body().collect().await.expect("body");

        mock.stop();
        let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
        assert!(closed.is_ok(), "stop() must close open connections");
        let refused = TcpStream::connect(addr).await.expect_err("stopped");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        let err = call(with_base(banks(Some(&access))))
            .await
            .expect_err("stopped");
        assert!(err.is_connect(), "{err:?}");

        mock.restart().await.expect("restart");
        mock.restart()
            .await
            .expect("restart while running is a no-op");
        assert_eq!(mock.url(), url);
        // Same state: the token issued before the restart still works.
        let (status, _) = call(with_base(banks(Some(&access)))).await.expect("banks");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(mock.api_calls(), 3);
        assert_eq!(mock.oauth_calls(), 1);

        // The in-process service shares the state.
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);
        assert_eq!(mock.api_calls(), 4);

        drop(mock);
        let refused = TcpStream::connect(addr).await.expect_err("dropped");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }
}
