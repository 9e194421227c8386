//! [`ResponseFuture`]: wait for a token if needed, call, and after a 401 renew
//! the token and replay once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use crate::cache::Lease;
use crate::error::Error;
use crate::layer::Auth;

type TokenFuture = Pin<Box<dyn Future<Output = Result<Option<Lease>, Error>> + Send>>;

pin_project! {
    /// The response future of [`VoltAuth`](crate::VoltAuth).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, S::Response>,
        // Token handling; `None` for requests to other origins.
        auth: Option<Arc<Auth>>,
        // The service for the next call: polled ready first unless `ready`.
        service: Option<S>,
        ready: bool,
        // The request for the next call.
        request: Option<Request<B>>,
        // A copy to replay after a 401, and an unused service to send it with.
        replay: Option<(Request<B>, S)>,
        // The token generation the last call carried.
        generation: u64,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        // Waiting for a token; `held` is the 401 being recovered from, if any.
        Token { token: TokenFuture, held: Option<R> },
        // Driving the service to ready, then calling it.
        Ready,
        Call { #[pin] future: F },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn passthrough(future: S::Future) -> Self {
        Self::new(State::Call { future }, None, None, None, None, 0)
    }

    pub(crate) fn sent(
        future: S::Future,
        auth: Arc<Auth>,
        generation: u64,
        replay: Option<(Request<B>, S)>,
    ) -> Self {
        Self::new(
            State::Call { future },
            Some(auth),
            None,
            None,
            replay,
            generation,
        )
    }

    pub(crate) fn authorize(
        auth: Arc<Auth>,
        ready_service: S,
        request: Request<B>,
        replay: Option<(Request<B>, S)>,
    ) -> Self {
        let cache = auth.cache.clone();
        let token: TokenFuture = Box::pin(async move { cache.token().await.map(Some) });
        let mut future = Self::new(
            State::Token { token, held: None },
            Some(auth),
            Some(ready_service),
            Some(request),
            replay,
            0,
        );
        future.ready = true;
        future
    }

    fn new(
        state: State<S::Future, S::Response>,
        auth: Option<Arc<Auth>>,
        service: Option<S>,
        request: Option<Request<B>>,
        replay: Option<(Request<B>, S)>,
        generation: u64,
    ) -> Self {
        Self {
            state,
            auth,
            service,
            ready: false,
            request,
            replay,
            generation,
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Token { token, held } => {
                    let lease = match ready!(token.as_mut().poll(cx)) {
                        Ok(Some(lease)) => lease,
                        // No newer token may be had yet, or none at all:
                        // the 401 goes back as it came.
                        Ok(None) if held.is_some() => {
                            tracing::debug!(
                                "a 401 came too soon after the last forced refresh; returning it"
                            );
                            return Poll::Ready(held.take().ok_or_else(interrupted));
                        }
                        Err(error) if held.is_some() => {
                            tracing::warn!(%error, "no new token after a 401; returning the 401");
                            return Poll::Ready(held.take().ok_or_else(interrupted));
                        }
                        Ok(None) => return Poll::Ready(Err(interrupted())),
                        Err(error) => return Poll::Ready(Err(error.into())),
                    };
                    if held.take().is_some() {
                        if let Some(auth) = this.auth.as_ref() {
                            auth.cache.record_replay();
                        }
                        tracing::debug!(
                            generation = lease.generation,
                            "replaying a request after a 401"
                        );
                    }
                    let Some(request) = this.request.as_mut() else {
                        return Poll::Ready(Err(interrupted()));
                    };
                    request
                        .headers_mut()
                        .insert(AUTHORIZATION, lease.token.header().clone());
                    *this.generation = lease.generation;
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    let Some(service) = this.service.as_mut() else {
                        return Poll::Ready(Err(interrupted()));
                    };
                    if !*this.ready {
                        ready!(service.poll_ready(cx)).map_err(Into::into)?;
                    }
                    let (Some(mut service), Some(request)) =
                        (this.service.take(), this.request.take())
                    else {
                        return Poll::Ready(Err(interrupted()));
                    };
                    *this.ready = false;
                    let future = service.call(request);
                    this.state.set(State::Call { future });
                }
                StateProj::Call { future } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into)?;
                    let Some(auth) = this.auth.as_ref() else {
                        return Poll::Ready(Ok(response));
                    };
                    let generation = *this.generation;
                    if response.status() != StatusCode::UNAUTHORIZED {
                        auth.cache.accepted(generation);
                        return Poll::Ready(Ok(response));
                    }
                    let Some((request, service)) = this.replay.take() else {
                        // Not replayable, or already replayed: the next
                        // request gets a new token.
                        auth.cache.invalidate(generation);
                        return Poll::Ready(Ok(response));
                    };
                    *this.request = Some(request);
                    *this.service = Some(service);
                    let cache = auth.cache.clone();
                    let token: TokenFuture = Box::pin(async move { cache.renew(generation).await });
                    this.state.set(State::Token {
                        token,
                        held: Some(response),
                    });
                }
            }
        }
    }
}

fn interrupted() -> BoxError {
    Error::Interrupted.into()
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
