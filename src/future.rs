//! [`ResponseFuture`]: wait for a token if needed, call, and after a 401 renew
//! the token and replay once.
//!
//! The future stays small on the hot path (a token was cached, the request was
//! sent in `call`): what only a wait for a token needs lives in a box, and the
//! cache is reached through a [`Ticket`] rather than a reference count.

use std::fmt;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::AUTHORIZATION;
use http::{Extensions, HeaderMap, Method, Request, Response, Uri, Version};
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use crate::cache::{Lease, Ticket, TokenCache};
use crate::error::Error;

type TokenFuture = Pin<Box<dyn Future<Output = Result<Option<Lease>, Error>> + Send>>;

pin_project! {
    /// The response future of [`VoltAuth`](crate::VoltAuth).
    ///
    /// It does not keep the token cache alive: a 401 that arrives after every
    /// layer and service sharing the cache has been dropped is returned as it
    /// came, without a replay. Polled again after it has completed, it
    /// returns [`Error::Interrupted`](crate::Error::Interrupted) and sends
    /// nothing.
    #[project = Proj]
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        // The call in flight; `None` while a token is awaited and once the
        // call has answered.
        #[pin]
        call: Option<S::Future>,
        // What the call carried; `None` for requests to other origins.
        ticket: Option<Ticket>,
        // A copy to replay after a 401, and an unused service to send it with.
        replay: Spare<Replay<S, B>>,
        // A token being awaited and the call to make with it.
        wait: Spare<Wait<S, B, S::Response>>,
    }
}

/// A request kept to be sent again after a 401, and an unused clone of the
/// service to send it with.
pub(crate) struct Replay<S, B> {
    method: Method,
    uri: Uri,
    version: Version,
    // `None` for a request without headers: no map to make and drop.
    headers: Option<HeaderMap>,
    extensions: Extensions,
    body: B,
    service: S,
}

impl<S, B> Replay<S, B> {
    /// A copy of `request`, with `body` for its body.
    pub(crate) fn of(request: &Request<B>, body: B, service: S) -> Box<Self> {
        let headers = request.headers();
        Box::new(Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: (!headers.is_empty()).then(|| headers.clone()),
            extensions: request.extensions().clone(),
            body,
            service,
        })
    }

    fn unpack(self) -> (Request<B>, S) {
        let mut request = Request::new(self.body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        if let Some(headers) = self.headers {
            *request.headers_mut() = headers;
        }
        *request.extensions_mut() = self.extensions;
        (request, self.service)
    }
}

/// An optional box whose drop, when empty, is one inlined test: the hot path
/// leaves [`ResponseFuture`]'s boxes empty, and dropping what one holds is
/// out of line.
struct Spare<T>(Option<ManuallyDrop<Box<T>>>);

impl<T> Spare<T> {
    fn none() -> Self {
        Self(None)
    }

    fn some(boxed: Box<T>) -> Self {
        Self(Some(ManuallyDrop::new(boxed)))
    }

    fn of(boxed: Option<Box<T>>) -> Self {
        Self(boxed.map(ManuallyDrop::new))
    }

    fn is_some(&self) -> bool {
        self.0.is_some()
    }

    fn as_mut(&mut self) -> Option<&mut T> {
        self.0.as_deref_mut().map(|boxed| &mut **boxed)
    }

    fn take(&mut self) -> Option<Box<T>> {
        self.0.take().map(ManuallyDrop::into_inner)
    }

    fn set(&mut self, boxed: Box<T>) {
        self.clear();
        self.0 = Some(ManuallyDrop::new(boxed));
    }

    fn clear(&mut self) {
        if self.is_some() {
            drop_boxed(self.take());
        }
    }
}

impl<T> Drop for Spare<T> {
    #[inline]
    fn drop(&mut self) {
        self.clear();
    }
}

#[cold]
#[inline(never)]
fn drop_boxed<T>(boxed: Option<Box<T>>) {
    drop(boxed);
}

/// Waiting for a token, then calling with it.
struct Wait<S, B, R> {
    token: Option<TokenFuture>,
    // Polled ready before the call unless `ready`.
    service: S,
    ready: bool,
    request: Request<B>,
    // The 401 being recovered from, returned if no newer token comes.
    held: Option<R>,
    // The call is a replay after a 401 (counted when it is made).
    replaying: bool,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn passthrough(future: S::Future) -> Self {
        Self {
            call: Some(future),
            ticket: None,
            replay: Spare::none(),
            wait: Spare::none(),
        }
    }

    pub(crate) fn sent(
        future: S::Future,
        ticket: Ticket,
        replay: Option<Box<Replay<S, B>>>,
    ) -> Self {
        Self {
            call: Some(future),
            ticket: Some(ticket),
            replay: Spare::of(replay),
            wait: Spare::none(),
        }
    }

    pub(crate) fn authorize(
        cache: TokenCache,
        ready_service: S,
        request: Request<B>,
        replay: Option<Box<Replay<S, B>>>,
    ) -> Self {
        Self {
            call: None,
            ticket: None,
            replay: Spare::of(replay),
            wait: Spare::some(Box::new(Wait {
                token: Some(token(cache)),
                service: ready_service,
                ready: true,
                request,
                held: None,
                replaying: false,
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

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.as_mut().project();
        // The hot path: the call made in `call` answers, and its status says
        // nothing about the token. The rest is out of line.
        if let Some(call) = this.call.as_mut().as_pin_mut() {
            let result = ready!(call.poll(cx));
            // Finished: polled again, the future neither polls the inner
            // future past its completion nor sends anything.
            this.call.set(None);
            let response = result.map_err(Into::into)?;
            return match *this.ticket {
                Some(ticket) if ticket.concerns(response.status()) => {
                    settle(self, cx, ticket, response)
                }
                // The ticket is left: nothing reads it once the call is done.
                _ => Poll::Ready(Ok(response)),
            };
        }
        drive(self, cx)
    }
}

/// A response that tells something about the token of `ticket` (a 401, or
/// any answer to a token not confirmed yet): settles it, and after a 401
/// with a copy to replay, goes on to the replay.
#[cold]
#[inline(never)]
fn settle<S, B, ResBody>(
    future: Pin<&mut ResponseFuture<S, B>>,
    cx: &mut Context<'_>,
    ticket: Ticket,
    response: Response<ResBody>,
) -> Poll<Result<Response<ResBody>, BoxError>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    let mut this = future.project();
    *this.ticket = None;
    if let Err(response) = replay(&mut this, ticket, response) {
        return Poll::Ready(Ok(response));
    }
    poll_rest(&mut this, cx)
}

/// Everything but the hot path: waits for a token, makes the call with it,
/// and settles its response, as often as a 401 and its replay take.
#[cold]
#[inline(never)]
fn drive<S, B, ResBody>(
    future: Pin<&mut ResponseFuture<S, B>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<ResBody>, BoxError>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    poll_rest(&mut future.project(), cx)
}

/// [`drive`]'s loop, also where [`settle`] goes on after a 401.
fn poll_rest<S, B, ResBody>(
    this: &mut Proj<'_, S, B>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<ResBody>, BoxError>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    loop {
        if let Some(call) = this.call.as_mut().as_pin_mut() {
            let result = ready!(call.poll(cx));
            this.call.set(None);
            let response = result.map_err(Into::into)?;
            let Some(ticket) = this.ticket.take() else {
                return Poll::Ready(Ok(response));
            };
            if let Err(response) = replay(this, ticket, response) {
                return Poll::Ready(Ok(response));
            }
        }
        if let Err(output) = ready!(wait(this, cx)) {
            // Nothing is left to send: polled again, the future sends
            // nothing more.
            this.wait.clear();
            return Poll::Ready(output);
        }
    }
}

/// Settles the response to the request of `ticket`, and after a 401 sets up
/// its replay with a renewed token; gives the response back when there is
/// nothing to replay.
fn replay<S, B, ResBody>(
    this: &mut Proj<'_, S, B>,
    ticket: Ticket,
    response: Response<ResBody>,
) -> Result<(), Response<ResBody>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    // A 401 without a copy to replay (or after the one replay) is settled
    // here: the next request gets a new token.
    let Some(cache) = ticket.settle_response(&response, this.replay.is_some()) else {
        return Err(response);
    };
    let Some((request, service)) = this.replay.take().map(|replay| replay.unpack()) else {
        return Err(response);
    };
    let generation = ticket.generation;
    this.wait.set(Box::new(Wait {
        token: Some(Box::pin(async move { cache.renew(generation).await })),
        service,
        ready: false,
        request,
        held: Some(response),
        replaying: true,
    }));
    Ok(())
}

/// Waits for the token, drives the service ready and makes the call; or
/// ends the future (`Err`) with the held 401 or an error.
#[cold]
fn wait<S, B, ResBody>(
    this: &mut Proj<'_, S, B>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Result<Response<ResBody>, BoxError>>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    let Some(wait) = this.wait.as_mut() else {
        return Poll::Ready(Err(Err(interrupted())));
    };
    if let Some(token) = wait.token.as_mut() {
        let outcome = ready!(token.as_mut().poll(cx));
        wait.token = None;
        // The 401 is let go once a token comes: its body may hold the
        // connection the replay is to be sent on (an HTTP/1 connection
        // behind a full `Buffer`, a pool of one), which the replay would then
        // wait for for ever. A second wait (below) that fails returns its
        // error.
        let lease = match (outcome, wait.held.take()) {
            (Ok(Some(lease)), _) => lease,
            // No newer token may be had yet, or none at all: the 401 goes
            // back as it came.
            (Ok(None), Some(held)) => {
                unrenewed(None);
                return Poll::Ready(Err(Ok(held)));
            }
            (Err(error), Some(held)) => {
                unrenewed(Some(&error));
                return Poll::Ready(Err(Ok(held)));
            }
            (Ok(None), None) => return Poll::Ready(Err(Err(interrupted()))),
            (Err(error), None) => return Poll::Ready(Err(Err(error.into()))),
        };
        wait.request
            .headers_mut()
            .insert(AUTHORIZATION, lease.token.header().clone());
        *this.ticket = Some(lease.ticket);
    }
    if !wait.ready {
        if let Err(error) = ready!(wait.service.poll_ready(cx)) {
            return Poll::Ready(Err(Err(error.into())));
        }
        wait.ready = true;
    }
    if wait.replaying {
        // With the token served now: getting ready may have taken a while (a
        // queue for a permit), and the token renewed before may be gone. If
        // there is none, the replay waits for the next, the service kept
        // ready; if none comes, the caller gets the refresh's error.
        if let Some(ticket) = this.ticket.as_mut() {
            if let Err(cache) = ticket.replaying(wait.request.headers_mut()) {
                wait.token = Some(token(cache));
                return Poll::Ready(Ok(()));
            }
        }
    }
    let Some(wait) = this.wait.take() else {
        return Poll::Ready(Err(Err(interrupted())));
    };
    let Wait {
        mut service,
        request,
        ..
    } = *wait;
    this.call.set(Some(service.call(request)));
    Poll::Ready(Ok(()))
}

/// A valid token from `cache`, waiting for the one refresh if needed.
fn token(cache: TokenCache) -> TokenFuture {
    Box::pin(async move { cache.token().await.map(Some) })
}

/// Logs why a 401 goes back to its caller as it came: no newer token may be
/// had yet (`None`), or the refresh failed. Debug, as every request in flight
/// with the rejected token comes here: the failed refresh itself was warned
/// of once.
pub(crate) fn unrenewed(error: Option<&Error>) {
    match error {
        None => tracing::debug!("a 401 came too soon after the last forced refresh; returning it"),
        Some(error) => tracing::debug!(%error, "no new token after a 401; returning the 401"),
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
