//! `/oauth` answers whose body stalls: the timeout covers reading the body.
//! Under tokio's paused clock.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Full;
use tokio::time::Instant;
use volt_auth::{Credentials, Error, GrantType, VoltAuthLayer};

/// A body that yields `first` (if any) and then never ends.
struct Stalled {
    first: Option<Bytes>,
}

impl Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            None => Poll::Pending,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_oauth_body_times_out() {
    for first in [None, Some(Bytes::from_static(b"{\"access_token\":\"a"))] {
        let calls = Arc::new(AtomicUsize::new(0));
        let transport = {
            let calls = calls.clone();
            tower::service_fn(move |_: Request<Full<Bytes>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let first = first.clone();
                async move { Ok::<_, Infallible>(Response::new(Stalled { first })) }
            })
        };
        let auth = VoltAuthLayer::builder(Credentials::new("id", "secret-x", "user", "pass-x"))
            .base_url("http://127.0.0.1:9")
            .token_timeout(Duration::from_secs(5))
            .build(transport)
            .unwrap();
        let started = Instant::now();
        let err = auth.access_token().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Timeout {
                    grant: GrantType::Password,
                    timeout
                } if timeout == Duration::from_secs(5)
            ),
            "{err:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
