//! The error every token request can end in.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// Which OAuth2 grant a request to `/oauth` used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GrantType {
    /// `grant_type=password`: the API user's credentials.
    Password,
    /// `grant_type=refresh_token`: the latest refresh token Volt issued (kept
    /// from an earlier answer while later ones carry none).
    RefreshToken,
}

impl GrantType {
    /// The `grant_type` value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Password => "password",
            Self::RefreshToken => "refresh_token",
        }
    }
}

impl fmt::Display for GrantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why no access token could be had.
///
/// Cheap to clone: one failed refresh is shared by every request that waited
/// for it. Neither `Display` nor `Debug` ever contains a secret or a token,
/// but for [`Transport`](Self::Transport)'s `Debug`, which shows the
/// transport's own error as it is (hyper's and reqwest's never hold the
/// request's body; a transport of your own should not either).
///
/// Errors from [`VoltAuth`](crate::VoltAuth) arrive as a `BoxError`; downcast
/// to tell them from the inner service's errors:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// use http_body_util::Full;
/// use tower::{Layer, ServiceExt};
/// use volt_auth::mock::{self, MockVolt};
/// use volt_auth::{Credentials, Error, GrantType, VoltAuthLayer};
///
/// let volt = MockVolt::builder().in_process();
/// let wrong = Credentials::new(mock::CLIENT_ID, mock::CLIENT_SECRET, mock::USERNAME, "wrong");
/// let auth = VoltAuthLayer::builder(wrong)
///     .base_url(&volt.url())
///     .build(volt.service())?;
/// let request = http::Request::get(format!("{}/banks", volt.url())).body(Full::default())?;
///
/// let err = auth.layer(volt.service()).oneshot(request).await.unwrap_err();
/// let Some(auth_error) = err.downcast_ref::<Error>() else {
///     panic!("not the token's error: {err}"); // the inner service's own
/// };
/// assert!(auth_error.is_rejected()); // fix the credentials
/// assert_eq!(auth_error.grant(), Some(GrantType::Password));
/// assert_eq!(auth_error.status(), Some(http::StatusCode::BAD_REQUEST)); // invalid_grant
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Volt refused the credentials or the refresh token (HTTP 400/401 from
    /// `/oauth`, a 403 whose body is a JSON object, or another 4xx but 429
    /// with a code such as `invalid_client` or `401`, or a 2xx whose body is
    /// such an error instead of a token). Retrying the same grant will not
    /// help. A 403 that is not JSON (a WAF's or CDN's page) is
    /// [`Failed`](Self::Failed).
    #[error("Volt rejected the {grant} grant: {response}")]
    #[non_exhaustive]
    Rejected {
        /// The grant that was refused.
        grant: GrantType,
        /// What Volt answered.
        response: ErrorResponse,
    },
    /// The token endpoint answered with an error that is not a rejection (5xx,
    /// 429, an unexpected status): try again later, not before
    /// [`ErrorResponse::retry_after`] if the server said when.
    #[error("Volt's token endpoint failed the {grant} grant: {response}")]
    #[non_exhaustive]
    Failed {
        /// The grant that was attempted.
        grant: GrantType,
        /// What Volt answered.
        response: ErrorResponse,
    },
    /// A 2xx answer could not be understood: not JSON, truncated, too large,
    /// missing the token, an unsupported token type, or a token already past
    /// its expiry margin when it arrived (status 200, for any 2xx). (An error
    /// status is a [`Rejected`](Self::Rejected) or [`Failed`](Self::Failed)
    /// whatever its body.) Also any answer reached by a redirect the transport followed on
    /// its own (from another origin, or within the token endpoint's, whose
    /// target got a GET without the form).
    #[error("unusable answer to the {grant} grant (HTTP {status}): {reason}")]
    #[non_exhaustive]
    InvalidResponse {
        /// The grant that was attempted.
        grant: GrantType,
        /// The HTTP status of the answer.
        status: StatusCode,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// The token endpoint did not answer in time.
    #[error("the token endpoint did not answer the {grant} grant within {timeout:?}")]
    #[non_exhaustive]
    Timeout {
        /// The grant that was attempted.
        grant: GrantType,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The request to the token endpoint failed before a whole answer arrived:
    /// no connection, or one that broke before the answer's end (a body
    /// shorter than its `Content-Length`, say). A request whose connection
    /// closed before any answer (a kept-alive one the server was closing), or,
    /// with the `http2` feature, that an HTTP/2 server refused unprocessed, is
    /// sent once more first.
    #[error("could not reach the token endpoint for the {grant} grant")]
    #[non_exhaustive]
    Transport {
        /// The grant that was attempted.
        grant: GrantType,
        /// The transport's error, as it is: kept for downcasting (to
        /// `hyper_util`'s or `reqwest`'s error, say), so not scrubbed. The
        /// warning logged for the failed attempt carries its text scrubbed.
        #[source]
        source: Arc<dyn StdError + Send + Sync>,
    },
    /// No answer will come: the token refresh panicked (backed off like any
    /// failure), or a [`ResponseFuture`](crate::ResponseFuture) was polled
    /// again after it had completed. A refresh dropped with its runtime is no
    /// error: the next caller starts another.
    #[error("the token refresh stopped before it finished")]
    Interrupted,
    /// There is no Tokio runtime to run the token refresh on: a request that
    /// needed a refresh (or [`access_token`](crate::VoltAuthLayer::access_token))
    /// was made outside one, or while its runtime was shutting down.
    #[error("volt-auth needs a Tokio runtime to refresh tokens")]
    NoRuntime,
}

impl Error {
    /// Whether Volt refused the grant: the credentials (or refresh token) are
    /// wrong, expired or revoked.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Rejected { .. })
    }

    /// The grant that failed, when one was sent.
    pub fn grant(&self) -> Option<GrantType> {
        match self {
            Self::Rejected { grant, .. }
            | Self::Failed { grant, .. }
            | Self::InvalidResponse { grant, .. }
            | Self::Timeout { grant, .. }
            | Self::Transport { grant, .. } => Some(*grant),
            Self::Interrupted | Self::NoRuntime => None,
        }
    }

    /// The HTTP status the token endpoint answered, when it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Rejected { response, .. } | Self::Failed { response, .. } => {
                Some(response.status)
            }
            Self::InvalidResponse { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's [`ErrorResponse::retry_after`], if it answered with one.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rejected { response, .. } | Self::Failed { response, .. } => response.retry_after,
            _ => None,
        }
    }

    /// A short name of the outcome, for logs and counters.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Rejected { .. } => "rejected",
            Self::Failed { .. } => "failed",
            Self::InvalidResponse { .. } => "invalid_response",
            Self::Timeout { .. } => "timeout",
            Self::Transport { .. } => "transport",
            Self::Interrupted => "interrupted",
            Self::NoRuntime => "no_runtime",
        }
    }
}

/// An error answer of the token endpoint, in whichever of Volt's shapes it came.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorResponse {
    /// The HTTP status.
    pub status: StatusCode,
    /// The server's error code (`invalid_grant`, `UNAUTHORISED`, `401`, …), if any.
    pub code: Option<String>,
    /// The server's message, if any (shortened, with any secret the request
    /// carried blanked out).
    pub message: Option<String>,
    /// See [`ErrorResponse::retry_after`].
    pub(crate) retry_after: Option<Duration>,
}

impl ErrorResponse {
    /// How long the server asked to wait before the next attempt: the
    /// `Retry-After` of a 429 or 503 answer, as delta-seconds (saturating
    /// beyond `u64`) or as an HTTP-date counted from the answer's `Date`
    /// (from this machine's clock when there is none). `None` when there was
    /// none, or it was malformed, repeated or not in the future.
    ///
    /// The token cache starts the next attempt no earlier than this, nor
    /// later than the backoff maximum
    /// ([`Builder::backoff`](crate::Builder::backoff)) allows, unless the
    /// ordinary backoff is longer.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status.as_u16())?;
        if let Some(code) = &self.code {
            write!(f, " {code}")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}
