//! [`ResponseFuture`]: wait for a token if needed, call, and after a 401 renew
//! the token and replay once.
//!
//! The future stays small on the hot path (a token was cached, the request was
//! sent in `call`): what only a wait for a token needs lives in a box.

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
        state: State<S::Future>,
        // Token handling; `None` for requests to other origins.
        auth: Option<Arc<Auth>>,
        // The token generation the last call carried.
        generation: u64,
        // A copy to replay after a 401, and an unused service to send it with.
        replay: Option<Box<(Request<B>, S)>>,
        slow: Option<Box<Slow<S, B, S::Response>>>,
    }
}

/// What waiting for a token needs.
struct Slow<S, B, R> {
    // The service for the next call: polled ready first unless `ready`.
    service: Option<S>,
    ready: bool,
    // The request for the next call.
    request: Option<Request<B>>,
    // The 401 being recovered from, returned if no newer token comes.
    held: Option<R>,
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Waiting for a token.
        Token { token: TokenFuture },
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
        Self {
            state: State::Call { future },
            auth: None,
            generation: 0,
            replay: None,
            slow: None,
        }
    }

    pub(crate) fn sent(
        future: S::Future,
        auth: Arc<Auth>,
        generation: u64,
        replay: Option<Box<(Request<B>, S)>>,
    ) -> Self {
        Self {
            state: State::Call { future },
            auth: Some(auth),
            generation,
            replay,
            slow: None,
        }
    }

    pub(crate) fn authorize(
        auth: Arc<Auth>,
        ready_service: S,
        request: Request<B>,
        replay: Option<Box<(Request<B>, S)>>,
    ) -> Self {
        let cache = auth.cache.clone();
        let token: TokenFuture = Box::pin(async move { cache.token().await.map(Some) });
        Self {
            state: State::Token { token },
            auth: Some(auth),
            generation: 0,
            replay,
            slow: Some(Box::new(Slow {
                service: Some(ready_service),
                ready: true,
                request: Some(request),
                held: None,
            })),
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
                StateProj::Token { token } => {
                    let outcome = ready!(token.as_mut().poll(cx));
                    let Some(slow) = this.slow.as_mut() else {
                        return Poll::Ready(Err(interrupted()));
                    };
                    let lease = match (outcome, slow.held.take()) {
                        (Ok(Some(lease)), held) => {
                            if held.is_some() {
                                if let Some(auth) = this.auth.as_ref() {
                                    auth.cache.record_replay();
                                }
                                tracing::debug!(
                                    generation = lease.generation,
                                    "replaying a request after a 401"
                                );
                            }
                            lease
                        }
                        // No newer token may be had yet, or none at all: the
                        // 401 goes back as it came.
                        (Ok(None), Some(held)) => {
                            tracing::debug!(
                                "a 401 came too soon after the last forced refresh; returning it"
                            );
                            return Poll::Ready(Ok(held));
                        }
                        (Err(error), Some(held)) => {
                            tracing::warn!(%error, "no new token after a 401; returning the 401");
                            return Poll::Ready(Ok(held));
                        }
                        (Ok(None), None) => return Poll::Ready(Err(interrupted())),
                        (Err(error), None) => return Poll::Ready(Err(error.into())),
                    };
                    let Some(request) = slow.request.as_mut() else {
                        return Poll::Ready(Err(interrupted()));
                    };
                    request
                        .headers_mut()
                        .insert(AUTHORIZATION, lease.token.header().clone());
                    *this.generation = lease.generation;
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    let Some(slow) = this.slow.as_mut() else {
                        return Poll::Ready(Err(interrupted()));
                    };
                    let Some(service) = slow.service.as_mut() else {
                        return Poll::Ready(Err(interrupted()));
                    };
                    if !slow.ready {
                        ready!(service.poll_ready(cx)).map_err(Into::into)?;
                    }
                    let (Some(mut service), Some(request)) =
                        (slow.service.take(), slow.request.take())
                    else {
                        return Poll::Ready(Err(interrupted()));
                    };
                    slow.ready = false;
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
                    let Some((request, service)) = this.replay.take().map(|replay| *replay) else {
                        // Not replayable, or already replayed: the next
                        // request gets a new token.
                        auth.cache.invalidate(generation);
                        return Poll::Ready(Ok(response));
                    };
                    let slow = this.slow.get_or_insert_with(|| {
                        Box::new(Slow {
                            service: None,
                            ready: false,
                            request: None,
                            held: None,
                        })
                    });
                    slow.request = Some(request);
                    slow.service = Some(service);
                    slow.ready = false;
                    slow.held = Some(response);
                    let cache = auth.cache.clone();
                    let token: TokenFuture = Box::pin(async move { cache.renew(generation).await });
                    this.state.set(State::Token { token });
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
