//! [`Ticket`]: what a request in flight keeps of its token cache.
//!
//! A response future must reach the cache when its response is a 401, yet
//! holding a reference would cost two atomic writes per request to a counter
//! every core shares. A ticket holds the cache's id instead, and the rare
//! response that needs the cache looks it up in a process-wide registry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use http::{HeaderMap, Response, StatusCode};

use super::{Entry, Shared, TokenCache};

/// Every live cache by id. Ids are never reused, so a ticket that outlives its
/// cache finds nothing rather than another cache.
static CACHES: Mutex<BTreeMap<u64, Weak<Shared>>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn caches() -> MutexGuard<'static, BTreeMap<u64, Weak<Shared>>> {
    CACHES.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

pub(super) fn register(shared: &Arc<Shared>) {
    caches().insert(shared.id, Arc::downgrade(shared));
}

pub(super) fn unregister(id: u64) {
    caches().remove(&id);
}

/// Whether the cache `id` is in the registry.
#[cfg(test)]
pub(super) fn registered(id: u64) -> bool {
    caches().contains_key(&id)
}

/// The request's token generation and where to report its response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(super) cache: u64,
    pub(crate) generation: u64,
    /// The token came from a refresh a 401 forced and no response has
    /// accepted it yet.
    unconfirmed: bool,
}

impl Entry {
    /// The ticket of a request that carries this entry's token.
    #[inline]
    pub(super) fn ticket(&self) -> Ticket {
        Ticket {
            cache: self.cache,
            generation: self.generation,
            unconfirmed: self.unconfirmed.load(Ordering::Acquire),
        }
    }
}

/// A response extension set by a transport that followed a redirect to
/// another origin on its own (dropping the token and any body on the way):
/// the answer says nothing about the token, and is not the token endpoint's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AnsweredElsewhere;

/// A response extension set on the answer to a request that is not
/// idempotent, by a transport that followed a redirect within the origin on
/// its own (keeping the token): a 401 is the token's, but the server may have
/// acted on the request (a payment answered 303, say), so it is not sent
/// again; and no answer is the token endpoint's to a grant (the form was not
/// sent to where the redirect pointed).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Redirected;

/// Whether an answer other than 401 shows that the server took the token: not
/// one a gateway, the edge or a proxy may give without checking it (a 5xx, a
/// 429 or 408, a 407), which must not end the throttle's escalation while
/// Volt keeps rejecting new tokens.
fn vouches(status: StatusCode) -> bool {
    !(status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::PROXY_AUTHENTICATION_REQUIRED)
}

impl Ticket {
    /// Reports the response to the request this ticket went with. A 401 that
    /// may be `replayable` returns the cache to renew the token through
    /// ([`TokenCache::renew`]); any other 401 invalidates the token, and any
    /// other status a token check stands behind (see [`vouches`]) confirms a
    /// token a 401 forced.
    #[cfg(any(feature = "reqwest", test))]
    #[inline]
    pub(crate) fn settle(self, status: StatusCode, replayable: bool) -> Option<TokenCache> {
        if !self.concerns(status) {
            return None;
        }
        self.settle_rare(status, replayable)
    }

    /// [`Ticket::settle`] with `response`, unless it is marked
    /// [`AnsweredElsewhere`]; one marked [`Redirected`] is not replayable.
    #[inline]
    pub(crate) fn settle_response<B>(
        self,
        response: &Response<B>,
        replayable: bool,
    ) -> Option<TokenCache> {
        if !self.concerns(response.status())
            || response.extensions().get::<AnsweredElsewhere>().is_some()
        {
            return None;
        }
        let replayable = replayable && response.extensions().get::<Redirected>().is_none();
        self.settle_rare(response.status(), replayable)
    }

    /// Whether a response of `status` tells anything about the token.
    #[inline(always)]
    pub(crate) fn concerns(&self, status: StatusCode) -> bool {
        status == StatusCode::UNAUTHORIZED || self.unconfirmed
    }

    #[cold]
    fn settle_rare(self, status: StatusCode, replayable: bool) -> Option<TokenCache> {
        if status != StatusCode::UNAUTHORIZED {
            if vouches(status) {
                if let Some(cache) = self.cache() {
                    cache.accepted(self.generation);
                }
            }
            return None;
        }
        // A cache that is gone has no token left to invalidate.
        let cache = self.cache()?;
        if replayable {
            return Some(cache);
        }
        cache.invalidate(self.generation);
        None
    }

    /// Just before a replay renewed with this ticket's token is sent with
    /// `headers`: the replay goes with the token the cache serves now, which
    /// becomes this ticket's. That is the renewed one, or a newer one if the
    /// renewed one was replaced while the replay waited for the inner service
    /// (rejected by another request, say). Counts the replay
    /// ([`TokenCache::replayed`]), if the cache is still there.
    ///
    /// Whether the token is still served is the clock's to say, as for
    /// [`TokenCache::token`]: a token whose timer went with its runtime is
    /// served while valid, and one whose timer lags is not served past its
    /// expiry margin.
    ///
    /// # Errors
    /// The cache, when it serves no token now (the renewed one was rejected
    /// or expired and its successor is on its way): the replay must wait for
    /// [`TokenCache::token`] and come back here, rather than go with a token
    /// known to be refused.
    #[cold]
    pub(crate) fn replaying(&mut self, headers: &mut HeaderMap) -> Result<(), TokenCache> {
        let Some(cache) = self.cache() else {
            return Ok(());
        };
        *self = cache
            .attach_by_clock(headers)
            .ok_or_else(|| cache.clone())?;
        cache.replayed(self.generation);
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn unconfirmed(&self) -> bool {
        self.unconfirmed
    }

    fn cache(&self) -> Option<TokenCache> {
        // Upgraded after the lock is released: if this were the last
        // reference, dropping it would unregister under the same lock.
        let weak = caches().get(&self.cache).cloned()?;
        Some(TokenCache {
            shared: weak.upgrade()?,
        })
    }
}
