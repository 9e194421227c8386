//! [`VoltAuthLayer`] and its [`Builder`]: configuration in, one shared token
//! cache out.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service};

use crate::cache::{Settings, Stats, Ticket, TokenCache};
use crate::config::{Api, ConfigError, Credentials, Endpoint, Environment, Origin, Spelling};
use crate::error::Error;
use crate::oauth::{self, OAuthClient, Token};
use crate::replay::DefaultReplay;
use crate::service::VoltAuth;

/// The longest backoff [`Builder::backoff`] accepts: waits are added to the
/// clock, which a duration like [`Duration::MAX`] would overflow.
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest wait for one `/oauth` answer: a hung `/oauth` call holds the
/// one refresh, and every caller without a valid token, for no longer.
const MAX_TOKEN_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Attaches a Volt bearer token to every request of the services it wraps.
///
/// Cheap to clone; every clone, every [`VoltAuth`] it makes and every clone of
/// those share one token cache, so a process asks `/oauth` for one token at a
/// time however many services and tasks use it. Configure it with
/// [`VoltAuthLayer::builder`] or [`VoltAuthLayer::from_env`].
///
/// When Volt answers 401 (a token revoked early), the layer refreshes once and
/// replays the request once if it could copy its body (see
/// [`ReplayPolicy`](crate::ReplayPolicy)); the caller sees only the second
/// answer:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// use http_body_util::Full;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use volt_auth::VoltAuthLayer;
/// use volt_auth::mock::MockVolt;
///
/// let volt = MockVolt::builder().in_process(); // a mock of Volt's API, no socket
/// let auth = VoltAuthLayer::builder(volt.credentials())
///     .base_url(&volt.url())
///     .build(volt.service())?; // what /oauth requests travel through
/// let mut api = ServiceBuilder::new().layer(auth.clone()).service(volt.service());
/// let banks = || http::Request::get(format!("{}/banks", volt.url())).body(Full::default());
///
/// let response = api.ready().await?.call(banks()?).await?;
/// assert_eq!(response.status(), 200);
///
/// volt.revoke_access_tokens(); // the next call is answered 401 once
/// let response = api.ready().await?.call(banks()?).await?;
/// assert_eq!(response.status(), 200);
/// assert_eq!(volt.unauthorized(), 1);
/// assert_eq!(auth.stats().replays, 1);
/// # Ok(()) }
/// ```
pub struct VoltAuthLayer<P = DefaultReplay> {
    pub(crate) auth: Arc<Auth>,
    pub(crate) replay: P,
}

/// What every service of one layer shares: the token cache and where the token
/// may go.
pub(crate) struct Auth {
    /// The endpoint's origin, first in `origins`: checked inline, by its
    /// exact spelling, before the full check (see [`Auth::allows`]).
    primary: Spelling,
    pub(crate) cache: TokenCache,
    /// What the cache's `/oauth` client sends (see [`VoltAuthLayer::set_credentials`]).
    credentials: Arc<ArcSwap<Credentials>>,
    origins: Vec<Origin>,
    endpoint: Endpoint,
}

impl Auth {
    /// Whether a request to `uri` gets the token: the configured origins, and
    /// relative URIs (the inner service decides where those go).
    #[inline(always)]
    pub(crate) fn allows(&self, uri: &http::Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return true;
        };
        // The common case, a request spelling the endpoint's origin as it
        // was configured, costs no call; any other goes to the full check.
        self.primary
            .spelled_by(uri.scheme_str(), authority.as_str())
            || self.allows_otherwise(uri)
    }

    /// [`Auth::allows`] for an absolute `uri` that does not spell the
    /// endpoint's origin exactly: every origin, every spelling.
    #[inline(never)]
    fn allows_otherwise(&self, uri: &http::Uri) -> bool {
        self.origins.iter().any(|origin| origin.matches(uri))
    }

    /// Whether a request to `scheme://host[:port]` gets the token (`port` is
    /// `None` for the scheme's default), for clients whose URLs are not
    /// [`http::Uri`]s.
    #[cfg(feature = "reqwest")]
    #[inline]
    pub(crate) fn allows_origin(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        self.origins
            .iter()
            .any(|origin| origin.matches_parts(scheme, host, port))
    }
}

impl VoltAuthLayer {
    /// Starts configuring a layer for these credentials, against Volt's Gateway
    /// sandbox unless told otherwise.
    pub fn builder(credentials: Credentials) -> Builder {
        Builder {
            credentials,
            api: Api::default(),
            endpoint: Ok(Endpoint::default()),
            origins: Vec::new(),
            settings: Settings {
                refresh_ahead: Duration::from_secs(5 * 60),
                expiry_margin: Duration::from_secs(30),
                backoff_min: Duration::from_secs(1),
                backoff_max: Duration::from_secs(60),
                stranded_after: Duration::ZERO, // set by `build`
            },
            timeout: Duration::from_secs(5),
            replay: DefaultReplay::new(),
        }
    }

    /// A builder configured from the `VOLT_*` environment variables; see
    /// [`Credentials::from_env`] and [`Endpoint::from_env`].
    ///
    /// # Errors
    /// [`ConfigError::MissingVariable`] or [`ConfigError::InvalidVariable`]
    /// naming the variable that is missing or invalid; for a `VOLT_BASE_URL`
    /// that cannot be used, the errors of [`Endpoint::custom`], which name the
    /// URL (redacted) rather than the variable.
    pub fn from_env() -> Result<Builder, ConfigError> {
        Ok(Self::builder(Credentials::from_env()?).endpoint(Endpoint::from_env()?))
    }
}

impl<P> VoltAuthLayer<P> {
    /// A valid access token from the same cache the services use, for calls
    /// made without tower. Waits for the one refresh when there is no valid
    /// token. Awaited at start-up, it checks the credentials before the first
    /// request needs them.
    ///
    /// # Errors
    /// The [`Error`] of the last `/oauth` attempt, when there is no valid token
    /// (during a backoff, at once); [`Error::Interrupted`] when the refresh
    /// panicked (a panicking transport), also for its backoff;
    /// [`Error::NoRuntime`] outside a Tokio runtime, or on one shutting down.
    ///
    /// # Panics
    /// When it must wait for a refresh on a Tokio runtime built without its
    /// timer (`enable_time` or `enable_all`), as Tokio's timers do. The same
    /// holds for requests through the layer's services.
    pub async fn access_token(&self) -> Result<AccessToken, Error> {
        let lease = self.auth.cache.token().await?;
        Ok(AccessToken {
            token: lease.token,
            ticket: lease.ticket,
        })
    }

    /// Reports that Volt answered 401 to a call made with `token` outside the
    /// layer, as the layer does for its own calls: if the cache still holds
    /// `token`, it is dropped and one refresh starts, so that the next
    /// [`access_token`](Self::access_token) waits for a new one. A report of a
    /// token already replaced changes nothing, and refreshes forced this way
    /// are throttled like the layer's own (see the README's *401 recovery*).
    /// A token from another layer's cache is ignored.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower::BoxError> {
    /// use http::header::AUTHORIZATION;
    /// use http_body_util::Full;
    /// use tower::ServiceExt;
    /// use volt_auth::VoltAuthLayer;
    /// use volt_auth::mock::MockVolt;
    ///
    /// let volt = MockVolt::builder().in_process();
    /// let auth = VoltAuthLayer::builder(volt.credentials())
    ///     .base_url(&volt.url())
    ///     .build(volt.service())?;
    /// let client = volt.service(); // any client, not wrapped by the layer
    /// let banks = |token: &volt_auth::AccessToken| {
    ///     http::Request::get(format!("{}/banks", volt.url()))
    ///         .header(AUTHORIZATION, token.header_value())
    ///         .body(Full::default())
    /// };
    ///
    /// let token = auth.access_token().await?;
    /// volt.revoke_access_tokens(); // Volt drops it before its expiry
    /// let response = client.clone().oneshot(banks(&token)?).await?;
    /// assert_eq!(response.status(), 401);
    /// auth.reject(&token);
    ///
    /// let renewed = auth.access_token().await?; // waits for the refresh
    /// assert_ne!(renewed.expose_secret(), token.expose_secret());
    /// assert_eq!(client.oneshot(banks(&renewed)?).await?.status(), 200);
    /// # Ok(()) }
    /// ```
    pub fn reject(&self, token: &AccessToken) {
        self.auth.cache.reject(&token.ticket);
    }

    /// Replaces the credentials (a rotated password or client secret) of
    /// this layer and of every clone, service and middleware sharing its
    /// token cache, without rebuilding the stack.
    ///
    /// - The token held keeps being attached: no request waits.
    /// - The next grant of any kind sends the new credentials, and the next
    ///   refresh is a password grant, never the refresh token held (it
    ///   belongs to the session of the old credentials).
    /// - That refresh starts now, in the background (on the current Tokio
    ///   runtime; outside one, at the next request that needs a token), and
    ///   a backoff earned by failures of the old credentials is ended, so
    ///   that wrong new credentials show in [`stats`](Self::stats) and the
    ///   log at once, while the token held serves on. A wait the server
    ///   asked for (a `Retry-After` on a 429 or 503 from `/oauth`) is not
    ///   ended: the refresh starts, by itself, when it is over.
    /// - If a refresh is already running (with the old credentials), no
    ///   second one starts alongside: its token, if it brings one, is used,
    ///   and as it ends the password grant with the new credentials starts
    ///   (requests waiting for it get its outcome, or that grant's if it is in
    ///   by the time they wake), unless that refresh sent a password grant
    ///   of its own after the replacement, which carried them.
    ///
    /// The old credentials are dropped, their secret and password wiped,
    /// once no `/oauth` call in flight still uses them. Each call costs at
    /// most one `/oauth` refresh of its own. Credentials equal to those in
    /// use change nothing: no grant, no log, and a backoff holds on, so a
    /// secret store polled every few seconds (or a file watcher that fires
    /// more than once per change) costs no `/oauth` call until its value
    /// changes. Credentials with an empty part (a file read while it was
    /// being rewritten), which [`Builder::build`] refuses, are ignored with a
    /// warning: those in use stay.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower::BoxError> {
    /// use volt_auth::mock::{self, MockVolt};
    /// use volt_auth::{Credentials, VoltAuthLayer};
    ///
    /// let volt = MockVolt::builder().in_process();
    /// let old = Credentials::new(mock::CLIENT_ID, mock::CLIENT_SECRET, mock::USERNAME, "old");
    /// let auth = VoltAuthLayer::builder(old)
    ///     .base_url(&volt.url())
    ///     .build(volt.service())?;
    /// let refused = auth.access_token().await.unwrap_err();
    /// assert!(refused.is_rejected()); // and backing off
    ///
    /// auth.set_credentials(volt.credentials()); // the password Volt accepts now
    /// auth.access_token().await?; // at once, without waiting out the backoff
    /// let sent = volt.oauth_requests();
    /// assert_eq!(sent[1].field("password"), Some(mock::PASSWORD));
    /// # Ok(()) }
    /// ```
    pub fn set_credentials(&self, credentials: Credentials) {
        if self.auth.credentials.load().same_as(&credentials) {
            // Polled from a secret store, or a file watcher firing twice:
            // nothing changed, so no grant (and no backoff ended).
            return;
        }
        if let Some(problem) = credentials.empty_part() {
            tracing::warn!(problem, "new credentials ignored; those in use stay");
            return;
        }
        // Compared and replaced in one step: of two callers handing over the
        // same new credentials at once, one replaces them and starts the
        // grant, the other finds them in use.
        let new = Arc::new(credentials);
        let previous = self.auth.credentials.rcu(|current| {
            if current.same_as(&new) {
                current.clone()
            } else {
                new.clone()
            }
        });
        if previous.same_as(&new) {
            return;
        }
        tracing::info!("credentials replaced; the next grant authenticates with them");
        self.auth.cache.credentials_replaced();
    }

    /// Counters: `/oauth` attempts by grant and outcome, refreshes, 401
    /// replays, and the current token's remaining lifetime.
    pub fn stats(&self) -> Stats {
        self.auth.cache.stats()
    }

    /// The endpoint this layer authenticates against.
    pub fn endpoint(&self) -> &Endpoint {
        &self.auth.endpoint
    }
}

impl<P: Clone> Clone for VoltAuthLayer<P> {
    fn clone(&self) -> Self {
        Self {
            auth: self.auth.clone(),
            replay: self.replay.clone(),
        }
    }
}

impl<P> fmt::Debug for VoltAuthLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VoltAuthLayer")
            .field("endpoint", &self.auth.endpoint.base_uri())
            .finish_non_exhaustive()
    }
}

impl<S, P: Clone> Layer<S> for VoltAuthLayer<P> {
    type Service = VoltAuth<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        VoltAuth::from_parts(inner, self.auth.clone(), self.replay.clone())
    }
}

/// Configures a [`VoltAuthLayer`]; from [`VoltAuthLayer::builder`] or
/// [`VoltAuthLayer::from_env`]. Each layer built, from the builder or a clone
/// of it, has a token cache of its own; clone the layer to share one.
///
/// | setting | default | method |
/// |---|---|---|
/// | endpoint | Gateway API, sandbox | [`environment`](Self::environment), [`api`](Self::api), [`base_url`](Self::base_url), [`endpoint`](Self::endpoint) |
/// | origins that get the token | the endpoint's, and relative URIs | [`allow_origin`](Self::allow_origin) |
/// | background refresh | 5 minutes before expiry, up to 20 % earlier at random; at most a third of the token's lifetime before that jitter | [`refresh_ahead`](Self::refresh_ahead) |
/// | token counts as expired | 30 seconds before expiry; at most a tenth of the token's lifetime | [`expiry_margin`](Self::expiry_margin) |
/// | `/oauth` timeout | 5 seconds per attempt | [`token_timeout`](Self::token_timeout) |
/// | backoff after a failure | 1 second doubling to 1 minute, jittered down to half | [`backoff`](Self::backoff) |
/// | replay after a 401 | [`DefaultReplay`]: `Full`, `Empty`, `String` (and the bodies it lists) up to 1 MiB | [`replay`](Self::replay) |
///
/// Settings are checked, and nothing is sent, when the layer is built:
///
/// ```
/// use std::time::Duration;
///
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use volt_auth::{Api, ConfigError, Credentials, Environment, VoltAuthLayer};
///
/// let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// let credentials = Credentials::new("client-id", "client-secret", "api-user", "password");
///
/// let auth = VoltAuthLayer::builder(credentials.clone())
///     .environment(Environment::Production)
///     .api(Api::Global)
///     .token_timeout(Duration::from_secs(3))
///     .build(client.clone())?;
/// assert_eq!(auth.endpoint().token_uri(), "https://gateway.volt.io/oauth");
///
/// let err = VoltAuthLayer::builder(credentials)
///     .backoff(Duration::ZERO, Duration::from_secs(60))
///     .build(client)
///     .unwrap_err();
/// assert!(matches!(err, ConfigError::InvalidSetting(_)));
/// # Ok::<(), ConfigError>(())
/// ```
#[must_use]
#[derive(Clone)]
pub struct Builder<P = DefaultReplay> {
    credentials: Credentials,
    /// The API chosen, kept apart from the endpoint so that an invalid base
    /// URL, which `environment` may replace, does not lose it.
    api: Api,
    endpoint: Result<Endpoint, ConfigError>,
    origins: Vec<Result<Origin, ConfigError>>,
    settings: Settings,
    timeout: Duration,
    replay: P,
}

impl<P> Builder<P> {
    /// One of Volt's documented environments, keeping the chosen [`Api`]. It
    /// replaces any base URL or endpoint set before.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.endpoint = Ok(Endpoint::new(self.api, environment));
        self
    }

    /// Which Volt API to speak (Gateway by default): the `/oauth` body format
    /// (form or JSON) and, for Volt's own environments, the host. Before or
    /// after [`environment`](Self::environment), the result is the same; a
    /// custom [`base_url`](Self::base_url) is kept.
    ///
    /// ```
    /// # use volt_auth::{Api, Credentials, Environment, VoltAuthLayer};
    /// # let transport = volt_auth::mock::MockVolt::builder().in_process().service();
    /// # let credentials = Credentials::new("id", "secret", "user", "password");
    /// let auth = VoltAuthLayer::builder(credentials)
    ///     .environment(Environment::Production)
    ///     .api(Api::Global)
    ///     .build(transport)?;
    /// assert_eq!(auth.endpoint().token_uri(), "https://gateway.volt.io/oauth");
    /// # Ok::<(), volt_auth::ConfigError>(())
    /// ```
    pub fn api(mut self, api: Api) -> Self {
        self.api = api;
        self.endpoint = self.endpoint.map(|endpoint| endpoint.with_api(api));
        self
    }

    /// A custom base URL (the mock server, a proxy), keeping the chosen
    /// [`Api`]; checked as [`Endpoint::custom`] does when the layer is built.
    pub fn base_url(mut self, url: &str) -> Self {
        self.endpoint = Endpoint::custom(url).map(|endpoint| endpoint.with_api(self.api));
        self
    }

    /// The endpoint, for example one made with [`Endpoint::custom_insecure`],
    /// with the [`Api`] it speaks: it replaces one chosen with
    /// [`api`](Self::api) before (call `api` after it, or
    /// [`Endpoint::with_api`], to speak another).
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.api = endpoint.api();
        self.endpoint = Ok(endpoint);
        self
    }

    /// Another origin (scheme, host, port of `url`) that may receive the
    /// token, besides the endpoint's own. Requests to any other origin pass
    /// through untouched. [`build`](Builder::build) refuses the URLs that
    /// [`Endpoint::custom`] refuses (but for a path ending in `/oauth`: only
    /// the origin is taken), with the same errors: among them a plain
    /// `http` origin that is not loopback, so that the token never travels in
    /// clear text.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower::BoxError> {
    /// use http_body_util::Full;
    /// use tower::{Layer, Service, ServiceExt};
    /// use volt_auth::mock::MockVolt;
    /// use volt_auth::{ConfigError, VoltAuthLayer};
    ///
    /// let volt = MockVolt::builder().in_process(); // answers whatever the host
    /// let auth = VoltAuthLayer::builder(volt.credentials())
    ///     .base_url(&volt.url())
    ///     .allow_origin("https://volt-proxy.example")
    ///     .build(volt.service())?;
    /// let mut api = auth.layer(volt.service());
    /// let banks = |origin| http::Request::get(format!("{origin}/banks")).body(Full::default());
    ///
    /// let proxied = api.ready().await?.call(banks("https://volt-proxy.example")?).await?;
    /// assert_eq!(proxied.status(), 200);
    /// let elsewhere = api.ready().await?.call(banks("https://volt-proxy.example:8443")?).await?;
    /// assert_eq!(elsewhere.status(), 401); // another port, another origin: no token
    ///
    /// let refused = VoltAuthLayer::builder(volt.credentials())
    ///     .allow_origin("http://volt-proxy.example")
    ///     .build(volt.service())
    ///     .unwrap_err();
    /// assert_eq!(refused, ConfigError::InsecureUrl("volt-proxy.example".into()));
    /// # Ok(()) }
    /// ```
    pub fn allow_origin(mut self, url: &str) -> Self {
        self.origins.push(Origin::allowed(url));
        self
    }

    /// How long before expiry a request starts a background refresh while the
    /// token is still used (default 5 minutes, moved earlier by up to 20 % at
    /// random). Whatever the lifetime, the window is at most a third of it
    /// before that jitter (20 to 24 minutes of Volt's one-hour token), so that
    /// a short-lived token is not refreshed per request. It must be at least the
    /// [`expiry_margin`](Self::expiry_margin) (30 seconds unless set):
    /// [`build`](Self::build) refuses a shorter one.
    pub fn refresh_ahead(mut self, window: Duration) -> Self {
        self.settings.refresh_ahead = window;
        self
    }

    /// How long before expiry a token counts as expired, so that clock skew
    /// and slow requests never present an expired token (default 30 seconds).
    /// Whatever the lifetime, the margin is at most a tenth of it (6 minutes
    /// of Volt's one-hour token).
    pub fn expiry_margin(mut self, margin: Duration) -> Self {
        self.settings.expiry_margin = margin;
        self
    }

    /// How long one `/oauth` grant may take, its request sent again once if
    /// it went unanswered included (default 5 seconds; checked when the layer
    /// is built: positive and at most 5 minutes, so that a hung token endpoint
    /// holds the one refresh for no longer than that). Keep it well under
    /// [`refresh_ahead`](Self::refresh_ahead) minus the
    /// [`expiry_margin`](Self::expiry_margin) for a hung background refresh
    /// to be given up on and retried while the token is still served.
    pub fn token_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The backoff after a failed `/oauth` attempt: doubling from `min` up to
    /// `max`, jittered down to half (defaults 1 second and 1 minute). A
    /// rejected password grant waits `max` (jittered the same way). A 429 or
    /// 503 with `Retry-After` waits at least as long as the server asked
    /// ([`ErrorResponse::retry_after`](crate::ErrorResponse::retry_after)),
    /// but never more than `max`. Checked
    /// when the layer is built: `min` must be positive and at most `max`, and
    /// `max` at most a day.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.settings.backoff_min = min;
        self.settings.backoff_max = max;
        self
    }

    /// Which request bodies are replayed after a 401: [`DefaultReplay`] by
    /// default, [`NoReplay`](crate::NoReplay) to turn replays off, or any
    /// [`ReplayPolicy`](crate::ReplayPolicy).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower::BoxError> {
    /// use http_body_util::Full;
    /// use tower::{Layer, Service, ServiceExt};
    /// use volt_auth::mock::MockVolt;
    /// use volt_auth::{NoReplay, VoltAuthLayer};
    ///
    /// let volt = MockVolt::builder().in_process();
    /// let auth = VoltAuthLayer::builder(volt.credentials())
    ///     .base_url(&volt.url())
    ///     .replay(NoReplay)
    ///     .build(volt.service())?;
    /// let mut api = auth.layer(volt.service());
    /// let banks = || http::Request::get(format!("{}/banks", volt.url())).body(Full::default());
    /// assert_eq!(api.ready().await?.call(banks()?).await?.status(), 200);
    ///
    /// volt.revoke_access_tokens();
    /// // The 401 comes back to the caller; the next request has a new token.
    /// assert_eq!(api.ready().await?.call(banks()?).await?.status(), 401);
    /// assert_eq!(api.ready().await?.call(banks()?).await?.status(), 200);
    /// assert_eq!(auth.stats().replays, 0);
    /// # Ok(()) }
    /// ```
    pub fn replay<Q>(self, policy: Q) -> Builder<Q> {
        Builder {
            credentials: self.credentials,
            api: self.api,
            endpoint: self.endpoint,
            origins: self.origins,
            settings: self.settings,
            timeout: self.timeout,
            replay: policy,
        }
    }

    /// Builds the layer. `/oauth` requests travel through `transport`, any
    /// tower HTTP service (typically the same client the API calls use) whose
    /// request body can be made from [`Bytes`].
    ///
    /// # Errors
    /// A [`ConfigError`] for an invalid base URL or origin, an empty
    /// credential, or settings out of range (a zero token timeout or one over
    /// 5 minutes, a zero backoff, a backoff minimum over its maximum, a backoff
    /// maximum over a day, a margin larger than the refresh-ahead window).
    pub fn build<T, ReqBody, ResBody>(self, transport: T) -> Result<VoltAuthLayer<P>, ConfigError>
    where
        T: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
        T::Future: Send + 'static,
        T::Error: Into<BoxError>,
        ReqBody: From<Bytes> + 'static,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Into<BoxError>,
    {
        let endpoint = self.endpoint?;
        if let Some(problem) = self.credentials.empty_part() {
            return Err(ConfigError::InvalidSetting(problem));
        }
        let mut settings = self.settings;
        if self.timeout.is_zero() {
            return Err(ConfigError::InvalidSetting(
                "the token timeout must be positive",
            ));
        }
        if self.timeout > MAX_TOKEN_TIMEOUT {
            return Err(ConfigError::InvalidSetting(
                "the token timeout must be at most 5 minutes",
            ));
        }
        if settings.backoff_min.is_zero() || settings.backoff_min > settings.backoff_max {
            return Err(ConfigError::InvalidSetting(
                "the backoff needs 0 < min <= max",
            ));
        }
        if settings.backoff_max > MAX_BACKOFF {
            return Err(ConfigError::InvalidSetting(
                "the backoff maximum must be at most a day",
            ));
        }
        if settings.expiry_margin > settings.refresh_ahead {
            return Err(ConfigError::InvalidSetting(
                "the expiry margin must not exceed the refresh-ahead window",
            ));
        }
        // A refresh takes at most two `/oauth` calls (a refused refresh
        // token, then the password grant).
        settings.stranded_after = self.timeout * 2 + Duration::from_secs(1);
        let mut origins = endpoint.origin().into_iter().collect::<Vec<_>>();
        for origin in self.origins {
            origins.push(origin?);
        }
        let client = OAuthClient::new(
            oauth::transport(transport),
            endpoint.token_uri(),
            endpoint.api(),
            self.credentials,
            self.timeout,
        );
        Ok(VoltAuthLayer {
            auth: Arc::new(Auth {
                primary: origins
                    .first()
                    .map(|origin| origin.spelling().clone())
                    .unwrap_or_default(),
                credentials: client.credentials(),
                cache: TokenCache::new(client, settings),
                origins,
                endpoint,
            }),
            replay: self.replay,
        })
    }
}

impl<P> fmt::Debug for Builder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("credentials", &self.credentials)
            .field("endpoint", &self.endpoint)
            .field("settings", &self.settings)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A valid access token, for calls made without tower.
///
/// `Debug` is redacted; the token itself is only reachable through
/// [`AccessToken::expose_secret`] and the sensitive
/// [`AccessToken::header_value`].
#[derive(Clone)]
pub struct AccessToken {
    token: Arc<Token>,
    /// Which cache and which of its tokens this is, for
    /// [`VoltAuthLayer::reject`].
    ticket: Ticket,
}

impl AccessToken {
    /// The raw access token. Keep it out of logs.
    pub fn expose_secret(&self) -> &str {
        self.token.secret()
    }

    /// `Bearer <token>`, marked sensitive.
    pub fn header_value(&self) -> &HeaderValue {
        self.token.header()
    }

    /// When Volt said the token expires (on tokio's clock): `expires_in`
    /// after the grant was sent.
    pub fn expires_at(&self) -> Instant {
        self.token.expires_at()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"[redacted]")
            .field("expires_at", &self.expires_at())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::Full;

    use super::*;

    fn builder() -> Builder {
        VoltAuthLayer::builder(Credentials::new("id", "secret", "user", "password"))
    }

    fn build(builder: Builder) -> Result<VoltAuthLayer, ConfigError> {
        builder.build(tower::service_fn(|_: Request<Bytes>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }))
    }

    #[test]
    fn the_backoff_maximum_is_at_most_a_day() {
        const DAY: Duration = Duration::from_secs(24 * 60 * 60);
        let too_long = ConfigError::InvalidSetting("the backoff maximum must be at most a day");
        let second = Duration::from_secs(1);
        for max in [Duration::MAX, 2 * DAY, DAY + Duration::from_nanos(1)] {
            let built = build(builder().backoff(second, max));
            assert_eq!(built.err(), Some(too_long.clone()), "{max:?}");
        }
        assert_eq!(build(builder().backoff(DAY, 2 * DAY)).err(), Some(too_long));
        assert!(build(builder().backoff(second, DAY)).is_ok());
        assert!(build(builder().backoff(DAY, DAY)).is_ok());
        // The other backoff checks still come first.
        assert_eq!(
            build(builder().backoff(Duration::ZERO, Duration::MAX)).err(),
            Some(ConfigError::InvalidSetting(
                "the backoff needs 0 < min <= max"
            ))
        );
    }

    #[test]
    fn an_empty_credential_is_refused_by_name() {
        let parts = ["id", "secret", "user", "password"];
        let problems = [
            "the client id is empty",
            "the client secret is empty",
            "the username is empty",
            "the password is empty",
        ];
        for (empty, problem) in problems.into_iter().enumerate() {
            let mut given = parts;
            given[empty] = "";
            let credentials = Credentials::new(given[0], given[1], given[2], given[3]);
            let built = build(VoltAuthLayer::builder(credentials));
            assert_eq!(built.err(), Some(ConfigError::InvalidSetting(problem)));
        }
        // Blank is not empty: a password of spaces is Volt's to judge.
        let spaces = Credentials::new("id", "secret", "user", "   ");
        assert!(build(VoltAuthLayer::builder(spaces)).is_ok());
    }

    #[test]
    fn the_token_timeout_is_at_most_five_minutes() {
        let too_long = ConfigError::InvalidSetting("the token timeout must be at most 5 minutes");
        let five_minutes = Duration::from_secs(5 * 60);
        for timeout in [Duration::MAX, five_minutes + Duration::from_nanos(1)] {
            let built = build(builder().token_timeout(timeout));
            assert_eq!(built.err(), Some(too_long.clone()), "{timeout:?}");
        }
        assert!(build(builder().token_timeout(five_minutes)).is_ok());
        assert!(build(builder().token_timeout(Duration::from_nanos(1))).is_ok());
    }

    #[test]
    fn the_api_and_environment_combine_in_either_order() {
        let endpoint = |b: Builder| build(b).map(|layer| layer.endpoint().token_uri().to_string());
        for environment in [Environment::Sandbox, Environment::Production] {
            let expected = Endpoint::new(Api::Global, environment)
                .token_uri()
                .to_string();
            let before = builder().api(Api::Global).environment(environment);
            let after = builder().environment(environment).api(Api::Global);
            assert_eq!(endpoint(before), Ok(expected.clone()));
            assert_eq!(endpoint(after), Ok(expected));
        }
        // The default is the Gateway sandbox; `api` alone moves to Global's.
        assert_eq!(
            endpoint(builder().api(Api::Global)),
            Ok("https://gateway.sandbox.volt.io/oauth".to_owned())
        );
        // A custom base URL stays, whatever the order.
        for b in [
            builder().base_url("https://proxy.example").api(Api::Global),
            builder().api(Api::Global).base_url("https://proxy.example"),
        ] {
            let layer = build(b).unwrap();
            assert_eq!(layer.endpoint().token_uri(), "https://proxy.example/oauth");
            assert_eq!(layer.endpoint().api(), Api::Global);
        }
        // An invalid base URL that `environment` then replaces does not take
        // the chosen API with it.
        let expected = Endpoint::new(Api::Global, Environment::Production)
            .token_uri()
            .to_string();
        for b in [
            builder().base_url("not a url").api(Api::Global),
            builder().api(Api::Global).base_url("not a url"),
        ] {
            let replaced = b.environment(Environment::Production);
            assert_eq!(endpoint(replaced), Ok(expected.clone()));
        }
    }

    #[test]
    fn an_endpoint_brings_its_api() {
        let custom = || Endpoint::custom_insecure("http://proxy.internal").unwrap();
        let api = |b: Builder| build(b).unwrap().endpoint().api();
        // `custom_insecure` speaks the Gateway API: an earlier `api` is replaced.
        assert_eq!(
            api(builder().api(Api::Global).endpoint(custom())),
            Api::Gateway
        );
        assert_eq!(
            api(builder().endpoint(custom()).api(Api::Global)),
            Api::Global
        );
        let global = custom().with_api(Api::Global);
        assert_eq!(api(builder().endpoint(global)), Api::Global);
        // The endpoint's API is kept by a later `environment`.
        let preset = Endpoint::new(Api::Global, Environment::Sandbox);
        let moved = builder()
            .endpoint(preset)
            .environment(Environment::Production);
        let layer = build(moved).unwrap();
        assert_eq!(
            layer.endpoint().token_uri(),
            "https://gateway.volt.io/oauth"
        );
    }

    #[test]
    fn url_errors_from_the_builder_are_redacted() {
        let err = build(builder().allow_origin("ftp://alice:pa55@files.example/?token=abc123"))
            .err()
            .map(|err| format!("{err} {err:?}"))
            .unwrap_or_default();
        assert!(err.contains("files.example"), "{err}");
        for secret in ["alice", "pa55", "token", "abc123"] {
            assert!(!err.contains(secret), "{err}");
        }
        let builder = builder().base_url("https://alice:pa55@proxy.example/?token=abc123");
        let debug = format!("{builder:?}");
        assert!(debug.contains("proxy.example"), "{debug}");
        for secret in ["alice", "pa55", "token", "abc123"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        let err = build(builder).err().map(|err| err.to_string());
        assert!(err.is_some_and(|err| !err.contains("pa55")));
    }
}
