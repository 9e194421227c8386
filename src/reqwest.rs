//! reqwest support: [`VoltAuthMiddleware`] for
//! [`reqwest_middleware`] clients, and [`ReqwestTransport`], which carries the
//! `/oauth` requests over the same `reqwest::Client`, so a reqwest user needs
//! no second HTTP stack.
//!
//! The middleware shares the layer's token cache: a process that uses both a
//! tower stack and a reqwest client from one [`VoltAuthLayer`] asks `/oauth`
//! for one token at a time. It attaches the token only to the layer's origins,
//! and after a 401 it renews the token once and replays the request once when
//! the layer's [`ReplayPolicy`] copies its body (by default, bodies made from
//! bytes or strings, up to 1 MiB). A streaming body is sent once; its 401 goes
//! back to the caller, and the next request carries the new token.
//!
//! Errors from the token cache arrive as
//! [`reqwest_middleware::Error::Middleware`], wrapping a
//! [`volt_auth::Error`](crate::Error).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use volt_auth::VoltAuthLayer;
//! use volt_auth::mock::MockVolt;
//! use volt_auth::reqwest::ReqwestTransport;
//!
//! let volt = MockVolt::start().await?;
//! let client = reqwest::Client::new();
//! let auth = VoltAuthLayer::builder(volt.credentials())
//!     .base_url(&volt.url())
//!     .build(ReqwestTransport::new(client.clone()))?; // /oauth through reqwest too
//! let api = reqwest_middleware::ClientBuilder::new(client)
//!     .with(auth.middleware())
//!     .build();
//!
//! let response = api.get(format!("{}/banks", volt.url())).send().await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(volt.password_grants(), 1);
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::reqwest::StatusCode;
use ::reqwest::header::AUTHORIZATION;
use ::reqwest::{Body, Client, Request, Response, Url};
use bytes::Bytes;
use http::Extensions;
use http_body_util::Full;
use pin_project_lite::pin_project;
use reqwest_middleware::{Middleware, Next};
use tower::Service;

use crate::cache::{AnsweredElsewhere, Redirected};
use crate::future::unrenewed;
use crate::layer::{Auth, VoltAuthLayer};
use crate::replay::{DefaultReplay, ReplayPolicy};

/// A [`reqwest_middleware::Middleware`] that attaches the Volt bearer token
/// and recovers from a 401, backed by the token cache of the
/// [`VoltAuthLayer`] it was made from.
///
/// Made with [`VoltAuthLayer::middleware`] or `From<VoltAuthLayer>`, for a
/// layer whose [`ReplayPolicy`] takes [`reqwest::Body`] ([`DefaultReplay`],
/// [`NoReplay`](crate::NoReplay), or a closure). A request is replayed after a
/// 401 when that policy copies its body, as [`VoltAuth`](crate::VoltAuth)
/// replays: `DefaultReplay` copies bodies made from bytes or strings up to its
/// size limit, and a request without a body is asked about as an empty one
/// (so `NoReplay` replays nothing). The replay carries the policy's copy, and
/// the method, URL, headers, version, timeout and extensions as
/// [`reqwest::Request::try_clone`] copies them. A request that is not
/// idempotent is not replayed when the 401 came after a redirect reqwest
/// followed (the server may have acted on it);
/// [`VoltAuthMiddleware::replay`] turns replays off.
///
/// # Panics
/// A request that waits for a token, on a Tokio runtime built without its
/// timer (`enable_time` or `enable_all`), panics as Tokio's timers do (see
/// [`VoltAuthLayer::access_token`]).
#[derive(Clone)]
pub struct VoltAuthMiddleware {
    auth: Arc<Auth>,
    replay: bool,
    policy: Arc<CloneBody>,
}

/// The layer's [`ReplayPolicy::clone_body`], with the policy's type erased.
type CloneBody = dyn Fn(&Body) -> Option<Body> + Send + Sync;

impl VoltAuthMiddleware {
    /// Whether to replay a request once after a 401 (on by default). Off, a
    /// 401 goes back to the caller and the next request carries a new token.
    #[must_use]
    pub fn replay(mut self, enabled: bool) -> Self {
        self.replay = enabled;
        self
    }

    /// Sends `request` with the current token, waiting for the one refresh
    /// when there is no valid token.
    async fn send(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !allows(&self.auth, request.url()) {
            return next.run(request, extensions).await;
        }
        // Copied before sending, as tower's retry does.
        let copy = self.copy(&mut request);
        let ticket = match self.auth.cache.attach(request.headers_mut()) {
            Some(ticket) => ticket,
            None => {
                let lease = self
                    .auth
                    .cache
                    .token()
                    .await
                    .map_err(reqwest_middleware::Error::middleware)?;
                request
                    .headers_mut()
                    .insert(AUTHORIZATION, lease.token.header().clone());
                lease.ticket
            }
        };
        // Where the token went, to tell its answer from a redirect target's:
        // the copy's URL when there is a copy, else a clone.
        let sent_to = copy.is_none().then(|| request.url().clone());
        let response = next.clone().run(request, extensions).await?;
        let sent_to = copy.as_ref().map(Request::url).or(sent_to.as_ref());
        if sent_to.is_some_and(|url| !same_origin(url, response.url())) {
            // reqwest followed a redirect to another origin and removed the
            // token on the way: the answer says nothing about the token.
            return Ok(response);
        }
        let replayable = copy.as_ref().is_some_and(|copy| {
            !acted_on(
                copy.method().is_idempotent(),
                response.status(),
                copy.url(),
                response.url(),
            )
        });
        let Some(cache) = ticket.settle(response.status(), replayable) else {
            return Ok(response);
        };
        let Some(mut copy) = copy else {
            return Ok(response);
        };
        // No newer token may be had yet, or none at all: the 401 goes back
        // as it came, with the events `VoltAuth` logs.
        let lease = match cache.renew(ticket.generation).await {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                unrenewed(None);
                return Ok(response);
            }
            Err(error) => {
                unrenewed(Some(&error));
                return Ok(response);
            }
        };
        drop(response);
        copy.headers_mut()
            .insert(AUTHORIZATION, lease.token.header().clone());
        let replayed_to = copy.url().clone();
        cache.replayed(lease.ticket.generation);
        let response = next.run(copy, extensions).await?;
        // At most one replay: a second 401 goes back, and the next request
        // gets a new token.
        if same_origin(&replayed_to, response.url()) {
            lease.ticket.settle(response.status(), false);
        }
        Ok(response)
    }

    /// A copy of `request` to replay after a 401, if replays are on and the
    /// policy copies its body (a request without one is asked about as an
    /// empty body, as `VoltAuth` asks about a GET's): the policy's copy of the
    /// body, the rest as [`Request::try_clone`] copies it.
    fn copy(&self, request: &mut Request) -> Option<Request> {
        if !self.replay {
            return None;
        }
        let body = match request.body() {
            Some(body) => Some((self.policy)(body)?),
            // Nothing to copy, but the policy may refuse all the same.
            None => {
                (self.policy)(&Body::default())?;
                None
            }
        };
        // Without its body, a request always clones.
        let taken = request.body_mut().take();
        let copy = request.try_clone();
        *request.body_mut() = taken;
        let mut copy = copy?;
        *copy.body_mut() = body;
        Some(copy)
    }
}

/// Whether reqwest kept `Authorization` on the way from `sent` to `answered`:
/// its redirect policy removes it when the scheme, host or port changes.
fn same_origin(sent: &Url, answered: &Url) -> bool {
    sent.scheme() == answered.scheme()
        && sent.host_str() == answered.host_str()
        && sent.port_or_known_default() == answered.port_or_known_default()
}

/// Whether an answer of `status` is a 401 that a request which is not
/// `idempotent`, sent to `sent`, got after reqwest followed a redirect within
/// the origin (keeping the token) to `answered`: the 401 is the token's, but
/// the server may have acted on the request (a payment answered 303, say), so
/// it is not sent again.
#[inline]
fn acted_on(idempotent: bool, status: StatusCode, sent: &Url, answered: &Url) -> bool {
    status == StatusCode::UNAUTHORIZED && !idempotent && redirected(sent, answered)
}

/// Whether reqwest followed a redirect from `sent` to `answered`: the answer
/// is not the one to the request sent. `sent` is compared as reqwest reports
/// it when it follows none, through the `http::Uri` it sent (without the
/// fragment); that allocates, so only a 401 is checked (or, by
/// [`ReqwestTransport`], a changed URL).
#[cold]
fn redirected(sent: &Url, answered: &Url) -> bool {
    let unredirected = sent
        .as_str()
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| Url::parse(&uri.to_string()).ok());
    unredirected.as_ref() != Some(answered)
}

/// Whether a request to `url` gets the token: the layer's origins only.
#[inline]
fn allows(auth: &Auth, url: &Url) -> bool {
    url.host_str()
        .is_some_and(|host| auth.allows_origin(url.scheme(), host, url.port()))
}

impl Middleware for VoltAuthMiddleware {
    // `#[async_trait]`'s expansion of `async fn handle(&self, req: Request,
    // extensions: &mut Extensions, next: Next<'_>) -> Result<Response>`,
    // written out so the crate needs no proc-macro for one method.
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        request: Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> Pin<Box<dyn Future<Output = reqwest_middleware::Result<Response>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.send(request, extensions, next))
    }
}

impl fmt::Debug for VoltAuthMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VoltAuthMiddleware")
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

impl<P: ReplayPolicy<Body> + Send + Sync + 'static> VoltAuthLayer<P> {
    /// A [`reqwest_middleware::Middleware`] sharing this layer's token cache,
    /// origins and [`ReplayPolicy`].
    pub fn middleware(&self) -> VoltAuthMiddleware {
        let policy = self.replay.clone();
        VoltAuthMiddleware {
            auth: self.auth.clone(),
            replay: true,
            policy: Arc::new(move |body| policy.clone_body(body)),
        }
    }
}

impl<P: ReplayPolicy<Body> + Send + Sync + 'static> From<VoltAuthLayer<P>> for VoltAuthMiddleware {
    fn from(layer: VoltAuthLayer<P>) -> Self {
        layer.middleware()
    }
}

/// A tower service over a [`reqwest::Client`], so that `/oauth` requests (or
/// any `http` request) can travel through reqwest:
/// `VoltAuthLayer::builder(..).build(ReqwestTransport::new(client))`.
///
/// Converts `http::Request<reqwest::Body>` to [`reqwest::Request`] and the
/// answer back to `http::Response<reqwest::Body>`; a request whose URI reqwest
/// cannot take (a relative URI) fails with reqwest's builder error.
///
/// A request body is sent once: whatever the client's redirect policy, a 307
/// or 308 answer comes back as it is instead of being followed with the same
/// body, so the `/oauth` form (client secret, password) never goes where a
/// redirect points. An empty body is left clonable, so that reqwest sends a
/// request without one again when an HTTP/2 server refused it unprocessed.
/// An answer that comes from another origin after a redirect the client
/// followed (which removed the token on the way) is marked so that
/// [`VoltAuth`](crate::VoltAuth) does not take its 401 for the token's, nor
/// the layer a token from it for Volt's
/// ([`Error::InvalidResponse`](crate::Error::InvalidResponse)); a 401 after a
/// redirect within the origin is the token's, but a request that is not
/// idempotent is not replayed, and no answer after one (a 301, 302 or 303
/// followed with a GET) is taken for the token endpoint's answer to a grant
/// (`Error::InvalidResponse` too).
#[derive(Clone, Debug, Default)]
pub struct ReqwestTransport {
    client: Client,
}

impl ReqwestTransport {
    /// Sends requests through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The wrapped client.
    pub fn get_ref(&self) -> &Client {
        &self.client
    }

    /// The wrapped client, taken out.
    pub fn into_inner(self) -> Client {
        self.client
    }
}

impl From<Client> for ReqwestTransport {
    fn from(client: Client) -> Self {
        Self::new(client)
    }
}

impl Service<http::Request<Body>> for ReqwestTransport {
    type Response = http::Response<Body>;
    type Error = ::reqwest::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request>::poll_ready(&mut self.client, cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let state = match Request::try_from(request.map(sent_once)) {
            Ok(request) => State::Sending {
                sent_to: request.url().clone(),
                idempotent: request.method().is_idempotent(),
                future: self.client.call(request),
            },
            Err(error) => State::Failed { error: Some(error) },
        };
        ResponseFuture { state }
    }
}

/// `body` as one reqwest cannot clone, and so cannot send again to the target
/// of a redirect. An empty body is left as it is: there is nothing to send
/// twice (redirects repeat empty bodies whatever their type), and reqwest
/// sends a request it can clone again when an HTTP/2 server refused it
/// unprocessed, as it does through [`VoltAuthMiddleware`].
fn sent_once(body: Body) -> Body {
    match body.as_bytes() {
        Some(bytes) if !bytes.is_empty() => Body::wrap(Full::new(Bytes::copy_from_slice(bytes))),
        _ => body,
    }
}

type Pending = <Client as Service<Request>>::Future;

pin_project! {
    /// The response future of [`ReqwestTransport`].
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] future: Pending, sent_to: Url, idempotent: bool },
        Failed { error: Option<::reqwest::Error> },
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<Body>, ::reqwest::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending {
                future,
                sent_to,
                idempotent,
            } => future.poll(cx).map_ok(|response| {
                // reqwest followed a redirect to another origin and removed
                // the token on the way, or, for a request that is not
                // idempotent, one within the origin: a 401 is the token's but
                // not replayed (see `VoltAuthMiddleware`), and no answer is
                // the token endpoint's to a grant. (The URL compared first,
                // so that only a changed one costs `redirected`'s parse.)
                let elsewhere = !same_origin(sent_to, response.url());
                let redirected = !*idempotent
                    && sent_to != response.url()
                    && redirected(sent_to, response.url());
                let mut response = http::Response::from(response);
                if elsewhere {
                    response.extensions_mut().insert(AnsweredElsewhere);
                } else if redirected {
                    response.extensions_mut().insert(Redirected);
                }
                response
            }),
            StateProj::Failed { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                // Polled again after it completed: it never completes again.
                None => Poll::Pending,
            },
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Bodies made from bytes or strings (whose [`Body::as_bytes`] is known) up to
/// the size limit are copied; streams are not. For [`VoltAuthMiddleware`], and
/// `VoltAuth` services over [`ReqwestTransport`].
impl ReplayPolicy<Body> for DefaultReplay {
    fn clone_body(&self, body: &Body) -> Option<Body> {
        let bytes = body.as_bytes()?;
        self.fits(body)
            .then(|| Body::from(Bytes::copy_from_slice(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::Full;

    use super::*;
    use crate::Credentials;

    fn layer() -> VoltAuthLayer {
        let transport = tower::service_fn(|_: http::Request<Bytes>| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
        });
        VoltAuthLayer::builder(Credentials::new("id", "secret", "user", "password"))
            .base_url("https://api.volt.io")
            .allow_origin("http://[::1]:8080")
            .build(transport)
            .unwrap()
    }

    #[test]
    fn urls_get_the_token_only_on_the_configured_origins() {
        let layer = layer();
        let allows = |url: &str| allows(&layer.auth, &Url::parse(url).unwrap());
        assert!(allows("https://api.volt.io/banks"));
        assert!(allows("https://API.Volt.io:443/banks?page=2"));
        assert!(allows("http://[::1]:8080/banks"));
        assert!(!allows("http://api.volt.io/banks"));
        assert!(!allows("https://api.volt.io:8443/banks"));
        assert!(!allows("https://api.volt.io.evil.example/banks"));
        assert!(!allows("https://evil.example/api.volt.io"));
        assert!(!allows("http://[::1]/banks"));
        assert!(!allows("ws://api.volt.io/banks"));
        assert!(!allows("data:text/plain,api.volt.io"));
    }

    #[test]
    fn an_ipv6_base_url_not_written_as_reqwest_writes_it_still_gets_the_token() {
        // reqwest's `Url` rewrites an IPv6 literal in its canonical form
        // (`[::ffff:127.0.0.1]` as `[::ffff:7f00:1]`, `[fd00:0:0:0::10]` as
        // `[fd00::10]`); requests to the base URL, spelled exactly as it was
        // configured, must still get the token, as through `VoltAuth`.
        for base in [
            "http://[::ffff:127.0.0.1]:8080",
            "https://[fd00:0:0:0::10]:8443",
            "https://[FD00::0010]",
        ] {
            let transport = tower::service_fn(|_: http::Request<Bytes>| async {
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
            });
            let layer =
                VoltAuthLayer::builder(Credentials::new("id", "secret", "user", "password"))
                    .base_url(base)
                    .build(transport)
                    .unwrap();
            let banks = format!("{base}/banks");
            assert!(layer.auth.allows(&banks.parse().unwrap()), "tower: {base}");
            assert!(
                allows(&layer.auth, &Url::parse(&banks).unwrap()),
                "reqwest: {base}"
            );
            // Another address is still another origin.
            let other = Url::parse("https://[fd00::11]:8443/banks").unwrap();
            assert!(!allows(&layer.auth, &other), "{base}");
        }
    }

    #[test]
    fn default_replay_copies_reqwest_bodies_known_to_be_bytes() {
        let policy = DefaultReplay::new().max_size(4);
        let copy = policy.clone_body(&Body::from("four")).unwrap();
        assert_eq!(copy.as_bytes(), Some(&b"four"[..]));
        assert!(policy.clone_body(&Body::from("fives")).is_none());
        let stream = Body::wrap(Full::new(Bytes::from_static(b"x")));
        assert!(policy.clone_body(&stream).is_none());
    }

    #[test]
    fn the_copy_carries_the_policy_s_body_and_the_rest_as_try_clone_copies_it() {
        let mut request = Request::new(
            http::Method::PUT,
            Url::parse("https://api.volt.io/v2/payments/1").unwrap(),
        );
        request
            .headers_mut()
            .insert("idempotency-key", "k1".parse().unwrap());
        *request.version_mut() = http::Version::HTTP_2;
        *request.timeout_mut() = Some(std::time::Duration::from_secs(7));
        *request.body_mut() = Some(Body::from("four"));
        let copy = layer().middleware().copy(&mut request).unwrap();
        assert_eq!(copy.method(), http::Method::PUT);
        assert_eq!(copy.url(), request.url());
        assert_eq!(copy.headers(), request.headers());
        assert_eq!(copy.version(), http::Version::HTTP_2);
        assert_eq!(copy.timeout(), request.timeout());
        assert_eq!(copy.body().and_then(Body::as_bytes), Some(&b"four"[..]));
        // The request keeps its own body.
        assert_eq!(request.body().and_then(Body::as_bytes), Some(&b"four"[..]));
    }

    #[test]
    fn debug_shows_no_token() {
        let middleware = layer().middleware().replay(false);
        assert_eq!(
            format!("{middleware:?}"),
            "VoltAuthMiddleware { replay: false, .. }"
        );
    }
}
