//! [`VoltAuth`]: the service that attaches the token and recovers from a 401.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{BoxError, Service};

use crate::cache::LocalToken;
use crate::future::{Replay, ResponseFuture};
use crate::layer::Auth;
use crate::replay::{DefaultReplay, ReplayPolicy};

/// Attaches `Authorization: Bearer <token>` to requests for Volt's origin and
/// recovers from a 401 by refreshing once and replaying once.
///
/// Made by [`VoltAuthLayer`](crate::VoltAuthLayer). For each request:
///
/// - to another origin than the endpoint's and those added with
///   [`Builder::allow_origin`](crate::Builder::allow_origin): sent untouched,
///   without the token (relative URIs do get it);
/// - otherwise, with the cached token; when there is no valid one, the request
///   waits for the one refresh (or gets its error at once during a backoff);
/// - after a 401: if the body could be copied before sending (see
///   [`ReplayPolicy`]), one refresh and one replay, and a
///   second 401 goes back to the caller. Without a copy, when that refresh
///   fails (its error goes to the requests that then wait for a token), or
///   while refreshes forced by 401s are throttled (within the backoff minimum
///   of the last one, longer while Volt keeps rejecting new tokens) and none
///   is under way, the 401 goes back as it came.
///
/// Errors are `BoxError`s: the inner service's own, or a
/// [`volt_auth::Error`](crate::Error) when no token could be had.
///
/// The inner service must be `Clone`: a request that waits for its token
/// takes the instance polled ready along, and the copy kept for a replay
/// takes an unused clone, driven ready before the replay is sent. tower's
/// `RateLimit` is not `Clone`; put it outside the layer, or behind a `Buffer`.
///
/// # Panics
/// A request that waits for a token, on a Tokio runtime built without its
/// timer (`enable_time` or `enable_all`), panics as Tokio's timers do (see
/// [`VoltAuthLayer::access_token`](crate::VoltAuthLayer::access_token)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// use http_body_util::Full;
/// use tower::{Layer, Service, ServiceExt};
/// use volt_auth::VoltAuthLayer;
/// use volt_auth::mock::MockVolt;
///
/// let volt = MockVolt::builder().in_process();
/// let auth = VoltAuthLayer::builder(volt.credentials())
///     .base_url(&volt.url())
///     .build(volt.service())?;
/// let mut api = auth.layer(volt.service()); // a VoltAuth
///
/// let to_volt = http::Request::get(format!("{}/banks", volt.url())).body(Full::default())?;
/// assert_eq!(api.ready().await?.call(to_volt).await?.status(), 200);
///
/// // Another origin never sees the token (the mock answers 401 without one).
/// let elsewhere = http::Request::get("https://elsewhere.example/banks").body(Full::default())?;
/// assert_eq!(api.ready().await?.call(elsewhere).await?.status(), 401);
/// assert_eq!(volt.api_authorizations()[1], None);
/// # Ok(()) }
/// ```
pub struct VoltAuth<S, P = DefaultReplay> {
    inner: S,
    auth: Arc<Auth>,
    token: LocalToken,
    replay: P,
}

impl<S, P> VoltAuth<S, P> {
    pub(crate) fn from_parts(inner: S, auth: Arc<Auth>, replay: P) -> Self {
        Self {
            inner,
            token: auth.cache.local(),
            auth,
            replay,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, taken out of the layer.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, ReqBody, ResBody> Service<Request<ReqBody>> for VoltAuth<S, P>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    P: ReplayPolicy<ReqBody>,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if !self.auth.allows(request.uri()) {
            return self.pass(request);
        }
        // The copy to replay after a 401 is taken before sending, with an
        // unused clone of the service to send it with.
        let replay = self
            .replay
            .clone_body(request.body())
            .map(|body| Replay::of(&request, body, self.inner.clone()));
        match self
            .auth
            .cache
            .attach_local(&mut self.token, request.headers_mut())
        {
            Some(ticket) => ResponseFuture::sent(self.inner.call(request), ticket, replay),
            None => self.authorize(request, replay),
        }
    }
}

impl<S, P> VoltAuth<S, P> {
    /// Sends a request to another origin untouched (out of line: the hot path
    /// is the origin's).
    #[inline(never)]
    fn pass<B>(&mut self, request: Request<B>) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        ResponseFuture::passthrough(self.inner.call(request))
    }

    /// A request that must wait for a token.
    #[cold]
    #[inline(never)]
    fn authorize<B>(
        &mut self,
        request: Request<B>,
        replay: Option<Box<Replay<S, B>>>,
    ) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>> + Clone,
    {
        // The instance that was polled ready waits for the token in the
        // future; a clone takes its place (tower's advice for services that
        // are moved out of `call`).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::authorize(self.auth.cache.clone(), ready, request, replay)
    }
}

impl<S: Clone, P: Clone> Clone for VoltAuth<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            auth: self.auth.clone(),
            token: self.token.clone(),
            replay: self.replay.clone(),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for VoltAuth<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VoltAuth")
            .field("inner", &self.inner)
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}
