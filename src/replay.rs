//! Which request bodies can be sent again after a 401: [`ReplayPolicy`].

use bytes::Buf;
use http_body::Body;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{Empty, Full};

/// Decides whether, and how, a request body can be reproduced for a replay.
///
/// [`VoltAuth`](crate::VoltAuth) (and, for `reqwest::Body`, the reqwest
/// middleware) asks for a copy of every request that gets the token, *before*
/// sending it, as tower's `retry` does. A body it cannot
/// copy is sent once; a 401 to it goes back to the caller unchanged, and the
/// next request carries the new token. Set it with
/// [`Builder::replay`](crate::Builder::replay): [`DefaultReplay`] (the
/// default), [`NoReplay`], or a closure for your own body type.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use volt_auth::{DefaultReplay, ReplayPolicy};
///
/// let policy = DefaultReplay::new().max_size(1024);
/// assert!(policy.clone_body(&Full::new(Bytes::from_static(b"{}"))).is_some());
/// assert!(policy.clone_body(&Full::new(Bytes::from(vec![0; 2048]))).is_none());
///
/// // Any clonable body type, with a closure:
/// #[derive(Clone)]
/// struct MyBody(Bytes);
/// let clone_mine = |body: &MyBody| Some(body.clone());
/// assert!(clone_mine.clone_body(&MyBody(Bytes::new())).is_some());
/// ```
pub trait ReplayPolicy<B>: Clone {
    /// A body with the same bytes as `body`, or `None` when it cannot be
    /// reproduced (a stream) or should not be kept (too large).
    fn clone_body(&self, body: &B) -> Option<B>;
}

/// Replays the body types that can be reproduced cheaply and exactly —
/// [`Full`], [`Empty`], `String`, and `reqwest::Body` made from bytes (feature
/// `reqwest`) — up to a size (1 MiB unless changed), and the boxed bodies when
/// they are known to be empty. Never hyper's `Incoming`.
///
/// Those are the body types it is a [`ReplayPolicy`] for: with any other
/// (a `StreamBody`, a `Limited`, your own), a [`VoltAuth`](crate::VoltAuth)
/// with the default policy is not a `tower::Service`, and the compiler says
/// so in words that do not name the policy ("`VoltAuth<…>: Service<_>` is
/// not satisfied", or "expected a `Fn(&YourBody)` closure, found
/// `DefaultReplay`"). Build the layer with
/// [`.replay(NoReplay)`](crate::Builder::replay) or a closure for that body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultReplay {
    max_size: u64,
}

impl DefaultReplay {
    /// Replays bodies of up to 1 MiB.
    pub const fn new() -> Self {
        Self {
            max_size: 1024 * 1024,
        }
    }

    /// Replays bodies of up to `bytes` bytes.
    #[must_use]
    pub const fn max_size(mut self, bytes: u64) -> Self {
        self.max_size = bytes;
        self
    }

    pub(crate) fn fits<B: Body>(&self, body: &B) -> bool {
        body.size_hint()
            .upper()
            .is_some_and(|upper| upper <= self.max_size)
    }
}

impl Default for DefaultReplay {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Buf + Clone> ReplayPolicy<Full<D>> for DefaultReplay {
    fn clone_body(&self, body: &Full<D>) -> Option<Full<D>> {
        self.fits(body).then(|| body.clone())
    }
}

impl<D: Buf> ReplayPolicy<Empty<D>> for DefaultReplay {
    fn clone_body(&self, _: &Empty<D>) -> Option<Empty<D>> {
        Some(Empty::new())
    }
}

impl ReplayPolicy<String> for DefaultReplay {
    fn clone_body(&self, body: &String) -> Option<String> {
        self.fits(body).then(|| body.clone())
    }
}

impl<D: Buf + Send + 'static, E> ReplayPolicy<BoxBody<D, E>> for DefaultReplay {
    fn clone_body(&self, body: &BoxBody<D, E>) -> Option<BoxBody<D, E>> {
        (body.size_hint().exact() == Some(0)).then(BoxBody::default)
    }
}

impl<D: Buf + Send + 'static, E> ReplayPolicy<UnsyncBoxBody<D, E>> for DefaultReplay {
    fn clone_body(&self, body: &UnsyncBoxBody<D, E>) -> Option<UnsyncBoxBody<D, E>> {
        (body.size_hint().exact() == Some(0)).then(UnsyncBoxBody::default)
    }
}

impl ReplayPolicy<hyper::body::Incoming> for DefaultReplay {
    fn clone_body(&self, _: &hyper::body::Incoming) -> Option<hyper::body::Incoming> {
        None
    }
}

/// Never replays: a 401 goes back to the caller, and the next request carries
/// the new token. Works with every body type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoReplay;

impl<B> ReplayPolicy<B> for NoReplay {
    fn clone_body(&self, _: &B) -> Option<B> {
        None
    }
}

impl<B, F> ReplayPolicy<B> for F
where
    F: Fn(&B) -> Option<B> + Clone,
{
    fn clone_body(&self, body: &B) -> Option<B> {
        self(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    #[test]
    fn default_replay_copies_small_known_bodies() {
        let policy = DefaultReplay::new().max_size(4);
        assert!(
            policy
                .clone_body(&Full::new(Bytes::from_static(b"four")))
                .is_some()
        );
        assert!(
            policy
                .clone_body(&Full::new(Bytes::from_static(b"fives")))
                .is_none()
        );
        assert!(policy.clone_body(&String::from("abc")).is_some());
        assert!(policy.clone_body(&String::from("abcde")).is_none());
        assert!(policy.clone_body(&Empty::<Bytes>::new()).is_some());
    }

    #[test]
    fn boxed_bodies_replay_only_when_known_empty() {
        let policy = DefaultReplay::new();
        let empty: BoxBody<Bytes, std::convert::Infallible> = Empty::new().boxed();
        assert!(policy.clone_body(&empty).is_some());
        let full: BoxBody<Bytes, std::convert::Infallible> =
            Full::new(Bytes::from_static(b"x")).boxed();
        assert!(policy.clone_body(&full).is_none());
    }

    #[tokio::test]
    async fn copies_are_byte_for_byte() {
        let body = Full::new(Bytes::from_static(b"{\"amount\":100}"));
        let copy = DefaultReplay::new().clone_body(&body).unwrap();
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "{\"amount\":100}");
        assert!(NoReplay.clone_body(&body).is_none());
    }
}
