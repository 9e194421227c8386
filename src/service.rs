//! [`VoltAuth`]: the service that attaches the token and recovers from a 401.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{BoxError, Service};

use crate::cache::LocalToken;
use crate::future::ResponseFuture;
use crate::layer::Auth;
use crate::replay::{DefaultReplay, ReplayPolicy};

/// Attaches `Authorization: Bearer <token>` to requests for Volt's origin and
/// recovers from a 401 by refreshing once and replaying once.
///
/// Made by [`VoltAuthLayer`](crate::VoltAuthLayer). Errors are `BoxError`s: the
/// inner service's own, or a [`volt_auth::Error`](crate::Error) when no token
/// could be had.
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

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if !self.auth.allows(request.uri()) {
            return ResponseFuture::passthrough(self.inner.call(request));
        }
        // The copy to replay after a 401 is taken before sending, with an
        // unused clone of the service to send it with.
        let replay = self.replay.clone_body(request.body()).map(|body| {
            // Built in place: a request is a few hundred bytes to move.
            let mut replay = Box::new((Request::new(body), self.inner.clone()));
            copy_parts(&request, &mut replay.0);
            replay
        });
        match (self.auth.cache).attach_local(&mut self.token, request.headers_mut()) {
            Some(ticket) => ResponseFuture::sent(self.inner.call(request), ticket, replay),
            None => {
                // The instance that was polled ready waits for the token in
                // the future; a clone takes its place (tower's advice for
                // services that are moved out of `call`).
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::authorize(self.auth.cache.clone(), ready, request, replay)
            }
        }
    }
}

/// Gives `copy` the method, URI, version, headers and extensions of `request`.
fn copy_parts<B>(request: &Request<B>, copy: &mut Request<B>) {
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
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
