//! The `/oauth` client: builds the password and refresh-token grants, sends them
//! through the user's HTTP service, and parses every answer shape Volt uses.
//!
//! One call, one grant (its request sent once more if it went unanswered: the
//! connection closed before any answer, or an HTTP/2 server refused it
//! unprocessed): caching and single flight live in [`crate::cache`].

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::iter::successors;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, DATE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;

use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt};

use crate::cache::{AnsweredElsewhere, Redirected};
use crate::config::{Api, Credentials, secret};

mod bearer;
mod scrub;
use crate::error::{Error, ErrorResponse, GrantType};
use bearer::Bearer;
use scrub::scrub;

/// The most of an `/oauth` answer that is read; anything longer is refused.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The lifetime assumed when an answer carries no `expires_in` (Volt documents an hour).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// The longest lifetime believed, so that a hostile `expires_in` cannot overflow the clock.
const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// The shortest lifetime accepted (Volt sends whole seconds).
const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// A grant to send, with the refresh token it presents.
pub(crate) enum Grant {
    Password,
    Refresh(SecretString),
}

impl Grant {
    pub(crate) fn kind(&self) -> GrantType {
        match self {
            Self::Password => GrantType::Password,
            Self::Refresh(_) => GrantType::RefreshToken,
        }
    }
}

/// An access token as Volt issued it, with the refresh token that came with it.
pub(crate) struct Token {
    access: SecretString,
    refresh: Option<SecretString>,
    header: Bearer,
    /// When the grant was sent (the first time, if sent again): `expires_in`
    /// counts from Volt's answer, which came later.
    sent_at: Instant,
    lifetime: Duration,
}

impl Token {
    /// The `Authorization` header: this thread's copy (see [`bearer`]).
    #[inline]
    pub(crate) fn header(&self) -> &HeaderValue {
        self.header.get()
    }

    pub(crate) fn secret(&self) -> &str {
        self.access.expose_secret()
    }

    pub(crate) fn refresh_token(&self) -> Option<&SecretString> {
        self.refresh.as_ref()
    }

    /// Keeps `previous` when this answer carried no refresh token of its own.
    pub(crate) fn inherit_refresh_token(&mut self, previous: Option<&SecretString>) {
        if self.refresh.is_none() {
            self.refresh = previous.cloned();
        }
    }

    pub(crate) fn lifetime(&self) -> Duration {
        self.lifetime
    }

    pub(crate) fn expires_at(&self) -> Instant {
        self.sent_at + self.lifetime
    }

    /// A token for tests: `Bearer <access>`, living `lifetime` from now.
    #[cfg(test)]
    pub(crate) fn for_test(access: &str, refresh: Option<&str>, lifetime: Duration) -> Self {
        let body = serde_json::json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
            "refresh_token": refresh,
        });
        let mut token = parse(
            GrantType::Password,
            StatusCode::OK,
            body.to_string().as_bytes(),
            &[],
        )
        .unwrap_or_else(|err| panic!("test token: {err}"));
        token.lifetime = lifetime;
        token
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"[redacted]")
            .field(
                "refresh_token",
                &self.refresh.as_ref().map(|_| "[redacted]"),
            )
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Parses an answer of `/oauth`. `secrets` are blanked out of any message kept.
pub(crate) fn parse(
    grant: GrantType,
    status: StatusCode,
    body: &[u8],
    secrets: &[&str],
) -> Result<Token, Error> {
    // A byte order mark, which JSON parsers may ignore (RFC 8259, section
    // 8.1): one a PHP file saved with it prints before the JSON.
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    if !status.is_success() {
        return Err(parse_failure(grant, status, body, secrets));
    }
    parse_success(grant, status, body).map_err(|invalid| {
        // An error body under a 2xx status: a rejection if its code says so
        // (so that a refused refresh token still falls back to the password
        // grant), else an answer that cannot be used.
        match failure_response(status, body, secrets) {
            (response, true) => Error::Rejected { grant, response },
            (_, false) => invalid,
        }
    })
}

fn parse_success(grant: GrantType, status: StatusCode, body: &[u8]) -> Result<Token, Error> {
    let invalid = |reason| Error::InvalidResponse {
        grant,
        status,
        reason,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid("the body is empty"));
    }
    // Values stay raw JSON text, so that a number beyond f64 (a hostile
    // `expires_in`) is capped rather than failing the whole answer.
    let Some(fields) = members(body) else {
        // JSON is UTF-8: `IgnoredAny` skips strings without checking it.
        let json = std::str::from_utf8(body)
            .is_ok_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok());
        return Err(if json {
            invalid("the body is not a JSON object")
        } else {
            invalid("the body is not JSON")
        });
    };
    let field = |name: &str| {
        fields
            .get(name)
            .map(|raw| raw.get())
            .filter(|raw| *raw != "null")
    };
    let string = |raw: &str| serde_json::from_str::<String>(raw).ok();
    let access_token = field("access_token")
        .and_then(string)
        .ok_or_else(|| invalid("the body has no access_token string"))?;
    if field("token_type")
        .is_some_and(|raw| !string(raw).is_some_and(|t| t.eq_ignore_ascii_case("bearer")))
    {
        return Err(invalid("the token_type is not bearer"));
    }
    if access_token.is_empty() {
        return Err(invalid("the access_token is empty"));
    }
    let lifetime = match field("expires_in") {
        None => DEFAULT_LIFETIME,
        Some(raw) => {
            let lifetime = seconds(raw)
                .ok_or_else(|| invalid("expires_in is not a positive number of seconds"))?;
            // Shorter than a round trip, a token is expired on arrival: every
            // caller would wait for the next refresh, forever. Refused, so the
            // backoff spaces the attempts.
            if lifetime < MIN_LIFETIME {
                return Err(invalid("expires_in is less than a second"));
            }
            lifetime
        }
    };
    let header = Bearer::new(&access_token)
        .ok_or_else(|| invalid("the access_token is not a valid header value"))?;
    // A refresh token that is not a non-empty string is ignored, not fatal:
    // the access token is still good, and the password grant still works.
    let refresh = field("refresh_token")
        .and_then(string)
        .filter(|token| !token.is_empty());
    Ok(Token {
        access: secret(access_token),
        refresh: refresh.map(secret),
        header,
        sent_at: Instant::now(),
        lifetime,
    })
}

/// `expires_in` from its raw JSON: a number (or, leniently, a numeric
/// string), positive, capped at [`MAX_LIFETIME`].
fn seconds(raw: &str) -> Option<Duration> {
    let secs = match serde_json::from_str::<String>(raw) {
        Ok(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|secs| secs.is_finite())?,
        // A JSON number; beyond f64 it parses as infinity and is capped.
        Err(_) => raw.parse::<f64>().ok()?,
    };
    if secs.is_nan() || secs <= 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(MAX_LIFETIME.as_secs_f64()),
    ))
}

fn parse_failure(grant: GrantType, status: StatusCode, body: &[u8], secrets: &[&str]) -> Error {
    let (response, code_rejects) = failure_response(status, body, secrets);
    let rejected = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => true,
        // Volt answers in JSON: a 403 that is not (a WAF's or CDN's page in
        // front of Volt, or nothing) does not say the grant is refused.
        StatusCode::FORBIDDEN => members(body).is_some(),
        StatusCode::TOO_MANY_REQUESTS => false,
        _ => status.is_client_error() && code_rejects,
    };
    if rejected {
        Error::Rejected { grant, response }
    } else {
        Error::Failed { grant, response }
    }
}

/// The error an answer's body describes, in any of the shapes Volt uses, and
/// whether its code refuses the grant (`invalid_grant`, `invalid_client`, …).
fn failure_response(status: StatusCode, body: &[u8], secrets: &[&str]) -> (ErrorResponse, bool) {
    // Read member by member, so that one of an unexpected type (a
    // framework's `"exception": "Class\\Name"`, a null `errorList`) costs
    // only itself. Members stay raw JSON text until read, so that a number
    // beyond `f64` (which a `Value` refuses) costs only its member too, as in
    // a token. A member given twice counts as its last, as for a token.
    let failure = members(body).unwrap_or_default();
    let exception = failure
        .get("exception")
        .and_then(|raw| members(raw.get().as_bytes()))
        .unwrap_or_default();
    // The first present and not null of `names`, then of the exception's
    // `key` (the shapes' spellings of one member); `None` if it is not text.
    let first = |names: [&str; 2], key: &str| {
        names
            .iter()
            .filter_map(|name| failure.get(*name))
            .chain(exception.get(key))
            .find(|raw| raw.get() != "null")
            .and_then(|raw| raw_text(raw))
    };
    let code = first(["error", "code"], "code");
    let mut message = first(["error_description", "message"], "message");
    let details: Vec<String> = exception
        .get("errorList")
        .and_then(|raw| serde_json::from_str::<Vec<Box<RawValue>>>(raw.get()).ok())
        .into_iter()
        .flatten()
        .filter_map(|field| {
            let Some(field) = members(field.get().as_bytes()) else {
                // A list of messages rather than of fields.
                return raw_text(&field);
            };
            let property = field.get("property").and_then(|raw| raw_text(raw));
            let detail = field.get("message").and_then(|raw| raw_text(raw))?;
            Some(match property {
                Some(property) => format!("{property}: {detail}"),
                None => detail,
            })
        })
        .collect();
    if !details.is_empty() {
        let joined = details.join("; ");
        message = Some(match message {
            Some(message) => format!("{message} ({joined})"),
            None => joined,
        });
    }
    // Read before it is scrubbed: a secret too short to find hides the code
    // shown, not what it means.
    let code_rejects = code.as_deref().is_some_and(|code| {
        matches!(
            code.to_ascii_lowercase().as_str(),
            "invalid_grant"
                | "invalid_request"
                | "invalid_client"
                | "unauthorized_client"
                | "unauthorised"
                | "unauthorized"
                // Volt's numeric shapes: `{"code":401,…}`, `{"exception":{"code":400,…}}`.
                | "400"
                | "401"
                | "403"
        )
    });
    let response = ErrorResponse {
        status,
        code: code.map(|code| scrub(&code, secrets)),
        message: message.map(|message| scrub(&message, secrets)),
        retry_after: None,
    };
    (response, code_rejects)
}

/// The members of a JSON object, as raw JSON text; `None` for anything else.
fn members(json: &[u8]) -> Option<HashMap<String, Box<RawValue>>> {
    serde_json::from_slice(json).ok()
}

/// [`text`] of a raw JSON value; `None` if it cannot be read (a number
/// beyond `f64`).
fn raw_text(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<Value>(raw.get())
        .ok()
        .as_ref()
        .and_then(text)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// The wait a `Retry-After` header asks for (RFC 9110, section 10.2.3):
/// delta-seconds (saturating beyond `u64`), or an HTTP-date in any of the
/// three formats, counted from the answer's `Date` so that this machine's
/// clock matters only when there is none (then from `now`). `None` when the
/// header is absent, repeated or malformed, or asks for no wait (`0`, or a
/// date not in the future).
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let mut values = headers.get_all(RETRY_AFTER).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = value.to_str().ok()?.trim_matches([' ', '\t']);
    let wait = if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        // Only digits: it fails to parse only beyond u64.
        Duration::from_secs(text.parse().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        let date = headers
            .get(DATE)
            .and_then(|date| date.to_str().ok())
            .and_then(|date| httpdate::parse_http_date(date.trim_matches([' ', '\t'])).ok())
            .unwrap_or(now);
        at.duration_since(date).ok()?
    };
    Some(wait).filter(|wait| !wait.is_zero())
}

/// Why a transport produced no readable answer.
pub(crate) enum FetchError {
    /// The service failed: no answer's head arrived.
    Transport(BoxError),
    /// Reading the body failed, after the answer's head arrived.
    Body(BoxError),
    /// The body was over [`MAX_RESPONSE_BYTES`]; the head of the answer.
    TooLarge(http::response::Parts),
}

/// The user's HTTP service, erased: a request with a complete body in, a
/// response with a complete (capped) body out.
pub(crate) type Transport = BoxCloneSyncService<Request<Bytes>, Response<Bytes>, FetchError>;

/// Wraps any tower HTTP service whose request body can be made from `Bytes`.
pub(crate) fn transport<S, ReqBody, ResBody>(service: S) -> Transport
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ReqBody: From<Bytes> + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    let service = service
        .map_request(|request: Request<Bytes>| request.map(ReqBody::from))
        .map_err(|err: S::Error| FetchError::Transport(err.into()))
        .and_then(|response: Response<ResBody>| async move {
            let (parts, body) = response.into_parts();
            match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
                Ok(collected) => Ok(Response::from_parts(parts, collected.to_bytes())),
                Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                    Err(FetchError::TooLarge(parts))
                }
                Err(err) => Err(FetchError::Body(err)),
            }
        });
    BoxCloneSyncService::new(service)
}

/// Sends grants to one token endpoint.
#[derive(Clone)]
pub(crate) struct OAuthClient {
    transport: Transport,
    token_uri: Uri,
    api: Api,
    /// Read once per grant; replaced by
    /// [`VoltAuthLayer::set_credentials`](crate::VoltAuthLayer::set_credentials).
    credentials: Arc<ArcSwap<Credentials>>,
    timeout: Duration,
}

impl OAuthClient {
    pub(crate) fn new(
        transport: Transport,
        token_uri: Uri,
        api: Api,
        credentials: Credentials,
        timeout: Duration,
    ) -> Self {
        Self {
            transport,
            token_uri,
            api,
            credentials: Arc::new(ArcSwap::from_pointee(credentials)),
            timeout,
        }
    }

    /// The credentials grants are sent with: storing others here makes the
    /// next grant send those.
    pub(crate) fn credentials(&self) -> Arc<ArcSwap<Credentials>> {
        self.credentials.clone()
    }

    /// Sends `grant` with `credentials` and parses the answer.
    async fn send(&self, grant: &Grant, credentials: &Credentials) -> Result<Token, Error> {
        let kind = grant.kind();
        let sent_at = Instant::now();
        let sent = tokio::time::timeout(self.timeout, self.exchange(grant, credentials));
        let response = match sent.await {
            Err(_) => {
                return Err(Error::Timeout {
                    grant: kind,
                    timeout: self.timeout,
                });
            }
            Ok(Err(FetchError::TooLarge(parts))) if parts.status.is_success() => {
                return Err(Error::InvalidResponse {
                    grant: kind,
                    status: parts.status,
                    reason: "the body is larger than 64 KiB",
                });
            }
            // An error answer is classified by its status (and headers): its
            // body would only have added details.
            Ok(Err(FetchError::TooLarge(parts))) => Response::from_parts(parts, Bytes::new()),
            Ok(Err(FetchError::Transport(source) | FetchError::Body(source))) => {
                return Err(Error::Transport {
                    grant: kind,
                    source: source.into(),
                });
            }
            Ok(Ok(response)) => response,
        };
        if response.extensions().get::<AnsweredElsewhere>().is_some() {
            // The transport followed a redirect to another origin (as a GET,
            // without the form): whatever answered is not the token endpoint.
            return Err(Error::InvalidResponse {
                grant: kind,
                status: response.status(),
                reason: "the answer came from another origin, after a redirect",
            });
        }
        if response.extensions().get::<Redirected>().is_some() {
            // One within the origin: whatever answered the GET did not
            // answer the grant (a 401 there refuses no credentials).
            return Err(Error::InvalidResponse {
                grant: kind,
                status: response.status(),
                reason: "the answer came after a redirect",
            });
        }
        let secrets = secrets(grant, credentials);
        let status = response.status();
        match parse(kind, status, response.body(), &secrets) {
            Err(Error::Failed {
                grant,
                response: mut failure,
            }) if matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            ) =>
            {
                failure.retry_after = retry_after(response.headers(), SystemTime::now());
                Err(Error::Failed {
                    grant,
                    response: failure,
                })
            }
            result => result.map(|token| Token { sent_at, ..token }),
        }
    }

    /// Sends `grant` once, and once more at once if it went unanswered (see
    /// [`unanswered`]): a pooled connection the server closed as the request
    /// was written on it, which hyper does not send again, or an HTTP/2
    /// stream the server refused unprocessed, which reqwest does not send
    /// again for a body it cannot clone (`ReqwestTransport`'s). A refresh
    /// grant the server did process is sent again too: the refresh token it
    /// presents was rotated, so it is rejected, and the cache falls back to
    /// the password grant in the same flight.
    async fn exchange(
        &self,
        grant: &Grant,
        credentials: &Credentials,
    ) -> Result<Response<Bytes>, FetchError> {
        let send = || {
            self.transport
                .clone()
                .oneshot(self.request(grant, credentials))
        };
        match send().await {
            Err(FetchError::Transport(error)) if unanswered(&*error) => {
                let cause = chain(&*error, &secrets(grant, credentials));
                tracing::debug!(
                    grant = %grant.kind(),
                    cause,
                    "the request went unanswered; sending the grant again"
                );
                send().await
            }
            result => result,
        }
    }

    fn request(&self, grant: &Grant, credentials: &Credentials) -> Request<Bytes> {
        let mut fields = vec![("grant_type", grant.kind().as_str())];
        match grant {
            Grant::Password => fields.extend([
                ("client_id", credentials.client_id()),
                ("client_secret", credentials.client_secret()),
                ("username", credentials.username()),
                ("password", credentials.password()),
            ]),
            Grant::Refresh(token) => fields.extend([
                ("refresh_token", token.expose_secret()),
                ("client_id", credentials.client_id()),
                ("client_secret", credentials.client_secret()),
            ]),
        }
        let (content_type, body) = match self.api {
            // As Volt documents it (FACTS.md).
            Api::Gateway => (
                "application/x-www-form-urlencoded;charset=UTF-8",
                serde_urlencoded::to_string(&fields)
                    .unwrap_or_default()
                    .into_bytes(),
            ),
            Api::Global => {
                let object: serde_json::Map<String, Value> = fields
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), Value::from(*value)))
                    .collect();
                (
                    "application/json",
                    Value::Object(object).to_string().into_bytes(),
                )
            }
        };
        let mut request = Request::new(Bytes::from(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.token_uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        request
    }
}

/// A grant's outcome, with what caused its error for the log (see
/// [`TokenSource::fetch`]).
pub(crate) type Fetched<'a> =
    Pin<Box<dyn Future<Output = (Result<Token, Error>, Option<String>)> + Send + 'a>>;

/// Where the token cache gets tokens from: the seam behind which a store shared
/// by several processes can later sit, without touching the hot path.
pub(crate) trait TokenSource: Send + Sync + 'static {
    /// Sends one grant and parses its answer; with it, what caused its error,
    /// for the log: the error's [`source`](std::error::Error::source) chain,
    /// without the secrets the grant was sent with (`None` when it has no
    /// cause).
    fn fetch<'a>(&'a self, grant: &'a Grant) -> Fetched<'a>;
}

impl TokenSource for OAuthClient {
    /// A transport's errors say why `/oauth` could not be reached (a refused
    /// connection, a name that does not resolve, a certificate); the
    /// transport is any service, so its text is scrubbed as a server's is,
    /// of the credentials the grant was sent with (not of others that
    /// replaced them while it was under way).
    fn fetch<'a>(&'a self, grant: &'a Grant) -> Fetched<'a> {
        Box::pin(async move {
            // One set of credentials per grant, the same to send and to scrub.
            let credentials = self.credentials.load_full();
            let result = self.send(grant, &credentials).await;
            let causes = match &result {
                Err(error) => causes(error, &secrets(grant, &credentials)),
                Ok(_) => None,
            };
            (result, causes)
        })
    }
}

/// The secrets `grant` sends with `credentials`.
fn secrets<'a>(grant: &'a Grant, credentials: &'a Credentials) -> [&'a str; 3] {
    let refresh = match grant {
        Grant::Refresh(token) => token.expose_secret(),
        Grant::Password => "",
    };
    [credentials.client_secret(), credentials.password(), refresh]
}

/// `error`'s source chain, scrubbed of `secrets`; `None` without a source.
fn causes(error: &Error, secrets: &[&str]) -> Option<String> {
    StdError::source(error).map(|cause| chain(cause, secrets))
}

/// `error` and its source chain, scrubbed of `secrets`.
fn chain(error: &(dyn StdError + 'static), secrets: &[&str]) -> String {
    let text: Vec<String> = successors(Some(error), |&e| e.source())
        .map(ToString::to_string)
        .collect();
    scrub(&text.join(": "), secrets)
}

/// Whether a transport's error says the connection closed before any answer
/// came (hyper's incomplete message, or a reset or broken pipe), or, with the
/// `http2` feature, that an HTTP/2 server refused the request unprocessed
/// (see [`refused`]): the server did not answer the request, so it may be
/// sent again.
fn unanswered(error: &(dyn StdError + 'static)) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    successors(Some(error), |&e| e.source()).any(|e| {
        #[cfg(feature = "http2")]
        if e.downcast_ref::<h2::Error>().is_some_and(refused) {
            return true;
        }
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
            || e.downcast_ref::<std::io::Error>().is_some_and(|e| {
                matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
            })
    })
}

/// Whether an HTTP/2 server refused a stream it did not process (RFC 9113,
/// section 8.7): a reset with `REFUSED_STREAM`, or a graceful `GOAWAY`
/// (`NO_ERROR`) whose last stream id is below it. Both come from the server;
/// nothing else from HTTP/2 counts.
#[cfg(feature = "http2")]
fn refused(error: &h2::Error) -> bool {
    use h2::Reason;
    error.is_remote()
        && match error.reason() {
            Some(Reason::REFUSED_STREAM) => error.is_reset(),
            Some(Reason::NO_ERROR) => error.is_go_away(),
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const SECRETS: &[&str] = &["the-client-secret", "the-password"];

    fn ok(body: &str) -> Result<Token, Error> {
        parse(
            GrantType::Password,
            StatusCode::OK,
            body.as_bytes(),
            SECRETS,
        )
    }

    fn fail(status: u16, body: &str) -> Error {
        let status = StatusCode::from_u16(status).unwrap();
        match parse(GrantType::RefreshToken, status, body.as_bytes(), SECRETS) {
            Ok(token) => panic!("expected an error, got {token:?}"),
            Err(err) => err,
        }
    }

    #[test]
    fn parses_every_published_success_shape() {
        let bodies = [
            (
                r#"{"access_token":"eyJabc","token_type":"bearer","expires_in":3600,"refresh_token":"def50200aa"}"#,
                3600,
            ),
            (
                r#"{"token_type":"Bearer","expires_in":3600,"access_token":"eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIs","refresh_token":"def50200bb"}"#,
                3600,
            ),
            (
                r#"{"access_token":"eyJ0eXAiOi","token_type":"Bearer","expires_in":86400,"refresh_token":"50679c5d"}"#,
                86400,
            ),
        ];
        for (body, secs) in bodies {
            let token = ok(body).unwrap();
            assert_eq!(token.lifetime(), Duration::from_secs(secs));
            assert!(token.header().is_sensitive());
            assert_eq!(
                token.header().to_str().unwrap(),
                format!("Bearer {}", token.secret())
            );
            assert!(token.refresh_token().is_some());
        }
    }

    #[test]
    fn defaults_and_leniency() {
        // No expires_in: the documented hour. Unknown fields ignored. No refresh token.
        let token =
            ok(r#"{"access_token":"abc","token_type":"Bearer","scope":"x","extra":{"a":1}}"#)
                .unwrap();
        assert_eq!(token.lifetime(), DEFAULT_LIFETIME);
        assert!(token.refresh_token().is_none());
        // No token_type: taken as bearer. expires_in as a string.
        let token = ok(r#"{"access_token":"abc","expires_in":"120"}"#).unwrap();
        assert_eq!(token.lifetime(), Duration::from_secs(120));
        // A huge expires_in is capped rather than overflowing the clock.
        let token = ok(r#"{"access_token":"abc","expires_in":1e300}"#).unwrap();
        assert_eq!(token.lifetime(), MAX_LIFETIME);
    }

    /// JSON is UTF-8: an object with a string that is not (which serde's
    /// `IgnoredAny` skips unchecked) is no JSON object.
    #[test]
    fn a_body_of_invalid_utf8_is_not_json() {
        let body = b"{\"access_token\":\"at-\xff\xfe\"}";
        match parse(GrantType::Password, StatusCode::OK, body, SECRETS) {
            Err(Error::InvalidResponse { reason, .. }) => {
                assert_eq!(reason, "the body is not JSON");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A body that begins with a UTF-8 byte order mark (a PHP file saved
    /// with one, before the JSON it prints) is read without it, as RFC 8259
    /// (section 8.1) lets parsers do: a token, and an error's code.
    #[test]
    fn a_byte_order_mark_before_the_json_is_ignored() {
        let token = parse(
            GrantType::Password,
            StatusCode::OK,
            b"\xef\xbb\xbf{\"access_token\":\"abc\",\"expires_in\":60}",
            SECRETS,
        )
        .unwrap();
        assert_eq!(token.secret(), "abc");
        assert_eq!(token.lifetime(), Duration::from_secs(60));
        for status in [401, 200] {
            let status = StatusCode::from_u16(status).unwrap();
            let err = parse(
                GrantType::RefreshToken,
                status,
                b"\xef\xbb\xbf{\"error\":\"invalid_grant\"}",
                SECRETS,
            )
            .unwrap_err();
            let Error::Rejected { response, .. } = &err else {
                panic!("{status}: expected a rejection, got {err:?}");
            };
            assert_eq!(response.code.as_deref(), Some("invalid_grant"));
        }
        // Only one, and only first.
        for body in [&b"\xef\xbb\xbf\xef\xbb\xbf{}"[..], b" \xef\xbb\xbf{}"] {
            match parse(GrantType::Password, StatusCode::OK, body, SECRETS) {
                Err(Error::InvalidResponse { reason, .. }) => {
                    assert_eq!(reason, "the body is not JSON")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn rejects_unusable_successes() {
        let cases = [
            ("", "the body is empty"),
            ("<html>proxy</html>", "the body is not JSON"),
            (r#"{"access_token":"abc","#, "the body is not JSON"),
            ("[1,2]", "the body is not a JSON object"),
            (
                r#"{"token_type":"Bearer"}"#,
                "the body has no access_token string",
            ),
            (
                r#"{"access_token":42}"#,
                "the body has no access_token string",
            ),
            (
                r#"{"access_token":"abc","token_type":"mac"}"#,
                "the token_type is not bearer",
            ),
            (r#"{"access_token":""}"#, "the access_token is empty"),
            (
                r#"{"access_token":"abc","expires_in":0}"#,
                "expires_in is not a positive number of seconds",
            ),
            (
                r#"{"access_token":"abc","expires_in":-5}"#,
                "expires_in is not a positive number of seconds",
            ),
            (
                r#"{"access_token":"abc","expires_in":0.5}"#,
                "expires_in is less than a second",
            ),
            (
                r#"{"access_token":"abc","expires_in":1e-300}"#,
                "expires_in is less than a second",
            ),
            (
                r#"{"access_token":"abc","expires_in":"soon"}"#,
                "expires_in is not a positive number of seconds",
            ),
            (
                "{\"access_token\":\"a\\nb\"}",
                "the access_token is not a valid header value",
            ),
        ];
        for (body, expected) in cases {
            match ok(body) {
                Err(Error::InvalidResponse {
                    reason,
                    status,
                    grant,
                }) => {
                    assert_eq!(reason, expected, "{body}");
                    assert_eq!(status, StatusCode::OK);
                    assert_eq!(grant, GrantType::Password);
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn parses_every_failure_shape() {
        let err = fail(
            400,
            r#"{"error":"invalid_grant","error_description":"Refresh token expired"}"#,
        );
        assert!(err.is_rejected());
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
        assert_eq!(err.grant(), Some(GrantType::RefreshToken));
        assert_eq!(
            err.to_string(),
            "Volt rejected the refresh_token grant: HTTP 400 invalid_grant: Refresh token expired"
        );

        let err = fail(401, r#"{"code":401,"message":"Invalid credentials"}"#);
        let Error::Rejected { response, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(response.code.as_deref(), Some("401"));
        assert_eq!(response.message.as_deref(), Some("Invalid credentials"));

        let err = fail(
            400,
            r#"{"exception":{"code":400,"message":"Validation exception","errorList":[{"property":"username","message":"This value should not be blank."}]}}"#,
        );
        let Error::Rejected { response, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(response.code.as_deref(), Some("400"));
        assert_eq!(
            response.message.as_deref(),
            Some("Validation exception (username: This value should not be blank.)")
        );

        let err = fail(401, r#"{"code":"UNAUTHORISED","message":"Unauthorised."}"#);
        let Error::Rejected { response, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(response.code.as_deref(), Some("UNAUTHORISED"));
    }

    #[test]
    fn classifies_rejections_and_failures_by_status_and_code() {
        // Some servers answer an expired refresh token with invalid_request.
        assert!(fail(400, r#"{"error":"invalid_request"}"#).is_rejected());
        assert!(fail(422, r#"{"error":"invalid_grant"}"#).is_rejected());
        for (status, body) in [
            (500, r#"{"error":"server_error"}"#),
            (502, "<html><body>Bad gateway</body></html>"),
            (503, ""),
            (429, r#"{"message":"slow down"}"#),
            (404, "not found"),
        ] {
            let err = fail(status, body);
            assert!(matches!(err, Error::Failed { .. }), "{status}: {err:?}");
            assert_eq!(err.status().map(|s| s.as_u16()), Some(status));
        }
        // A body that is none of the shapes keeps the status and no details.
        let Error::Failed { response, .. } = fail(502, "<html>") else {
            panic!()
        };
        assert_eq!((response.code, response.message), (None, None));
        let Error::Rejected { response, .. } = fail(401, r#"{"error":"invalid_cl"#) else {
            panic!()
        };
        assert_eq!(response.code, None);
    }

    /// A 403 whose body is not a JSON object (the page of a WAF or CDN in
    /// front of Volt, or nothing) is not Volt refusing the grant: it fails,
    /// so a refresh token is not given up for it nor a password grant backed
    /// off as refused. A 403 in JSON, Volt's, still refuses it.
    #[test]
    fn a_403_without_a_json_object_fails_rather_than_rejects() {
        for body in [
            "<html><head><title>403 Forbidden</title></head><body>Request blocked</body></html>",
            "",
            "Forbidden",
            r#""Forbidden""#,
            r#"[{"code":403}]"#,
            r#"{"code":403,"#,
        ] {
            let err = fail(403, body);
            let Error::Failed { response, .. } = &err else {
                panic!("{body:?}: expected Failed, got {err:?}");
            };
            assert_eq!(response.status, StatusCode::FORBIDDEN);
            assert_eq!((&response.code, &response.message), (&None, &None));
        }
        for body in [
            r#"{"code":403,"message":"Forbidden"}"#,
            r#"{"error":"access_denied"}"#,
            r#"{"code":"FORBIDDEN","message":"Forbidden."}"#,
            "\u{feff}{}",
        ] {
            let err = fail(403, body);
            assert!(err.is_rejected(), "{body}: {err:?}");
        }
    }

    fn retry_after_of(values: &[&'static str], date: Option<&'static str>) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(RETRY_AFTER, HeaderValue::from_static(value));
        }
        if let Some(date) = date {
            headers.insert(DATE, HeaderValue::from_static(date));
        }
        // This machine's clock, for answers without a usable Date.
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:00 GMT").unwrap();
        retry_after(&headers, now)
    }

    #[test]
    fn retry_after_reads_delta_seconds_and_http_dates() {
        let secs = |n| Some(Duration::from_secs(n));
        let date = Some("Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(retry_after_of(&["30"], None), secs(30));
        assert_eq!(retry_after_of(&[" 120\t"], date), secs(120));
        assert_eq!(retry_after_of(&["999999999"], None), secs(999_999_999));
        assert_eq!(
            retry_after_of(&["99999999999999999999"], None),
            secs(u64::MAX)
        );
        // The three HTTP-date formats, counted from the answer's Date.
        for value in [
            "Sun, 06 Nov 1994 08:50:22 GMT",
            "Sunday, 06-Nov-94 08:50:22 GMT",
            "Sun Nov  6 08:50:22 1994",
        ] {
            assert_eq!(retry_after_of(&[value], date), secs(45), "{value}");
            // Without a Date (or with a malformed one), from this machine's clock.
            assert_eq!(retry_after_of(&[value], None), secs(82), "{value}");
            assert_eq!(retry_after_of(&[value], Some("yesterday")), secs(82));
        }
        // Ignored: absent, repeated, malformed, no wait, or a date not after Date.
        let none: &[(&[&'static str], Option<&'static str>)] = &[
            (&[], None),
            (&["30", "30"], None),
            (&["-5"], None),
            (&["+5"], None),
            (&["1.5"], None),
            (&["30s"], None),
            (&["3 0"], None),
            (&[""], None),
            (&["soon"], None),
            (&["0"], None),
            (&["Sun, 06 Nov 1994 08:49:37 GMT"], date),
            (&["Sun, 06 Nov 1994 08:49:36 GMT"], date),
            (&["Sun, 06 Nov 1994 08:48:59 GMT"], None),
            (&["Sun, 06 Nov 1994 25:00:00 GMT"], date),
        ];
        for (values, date) in none {
            assert_eq!(retry_after_of(values, *date), None, "{values:?} {date:?}");
        }
    }

    #[test]
    fn error_messages_never_echo_secrets_and_stay_short() {
        let body = format!(
            r#"{{"error":"invalid_client","error_description":"bad secret the-client-secret for the-password {}"}}"#,
            "x".repeat(5000)
        );
        let err = fail(401, &body);
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("the-client-secret") && !shown.contains("the-password"));
        assert!(shown.contains("[redacted]"));
        assert!(err.to_string().chars().count() < 500);
    }

    #[test]
    fn a_secret_too_short_to_find_hides_the_whole_text() {
        // A 3-character password, echoed: nothing of the text is kept.
        let shown = scrub("wrong password pwd for alice", &["client-secret", "pwd"]);
        assert_eq!(shown, "[redacted]");
        // An empty secret (the password grant has no refresh token) hides
        // nothing.
        let shown = scrub(
            "wrong password for alice",
            &["client-secret", "password1", ""],
        );
        assert_eq!(shown, "wrong password for alice");
        // Long, but short once its control characters are dropped.
        assert_eq!(scrub("a ab b", &["\n\n\nab"]), "[redacted]");
        // Through the parser: code and message both hidden, status kept.
        let err = parse(
            GrantType::Password,
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_grant","error_description":"bad password x1"}"#,
            &["client-secret", "x1"],
        )
        .unwrap_err();
        let Error::Rejected { response, .. } = &err else {
            panic!("expected a rejection, got {err:?}");
        };
        assert_eq!(response.code.as_deref(), Some("[redacted]"));
        assert_eq!(response.message.as_deref(), Some("[redacted]"));
        assert!(!format!("{err} {err:?}").contains("x1"));
    }

    /// A secret too short to find hides the code shown, but not the
    /// code's meaning: a refusing code still refuses the grant under a status
    /// that does not (422, or a 2xx), so a refused refresh token still falls
    /// back to the password grant.
    #[test]
    fn a_code_hidden_for_a_short_secret_still_refuses_the_grant() {
        for (status, body) in [
            (
                422,
                r#"{"error":"invalid_grant","error_description":"bad x1"}"#,
            ),
            (200, r#"{"code":401,"message":"Invalid credentials"}"#),
            (200, r#"{"code":"UNAUTHORISED","message":"Unauthorised."}"#),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            let err = parse(
                GrantType::RefreshToken,
                status,
                body.as_bytes(),
                &["client-secret", "x1"],
            )
            .unwrap_err();
            let Error::Rejected { response, .. } = &err else {
                panic!("{status} {body}: expected a rejection, got {err:?}");
            };
            assert_eq!(response.code.as_deref(), Some("[redacted]"), "{body}");
        }
    }

    #[test]
    fn token_debug_is_redacted() {
        let token =
            ok(r#"{"access_token":"at-very-secret","refresh_token":"rt-very-secret"}"#).unwrap();
        let shown = format!("{token:?} {:?}", token.header());
        assert!(
            !shown.contains("at-very-secret") && !shown.contains("rt-very-secret"),
            "{shown}"
        );
    }

    /// A transport that records requests and answers a fixed response.
    #[derive(Clone)]
    struct Recorder {
        seen: Arc<Mutex<Vec<Request<Bytes>>>>,
        status: StatusCode,
        headers: HeaderMap,
        body: &'static str,
    }

    /// Takes `Bytes` bodies: a transport needs only `From<Bytes>`.
    impl Service<Request<Bytes>> for Recorder {
        type Response = Response<http_body_util::Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Bytes>) -> Self::Future {
            self.seen.lock().unwrap().push(request);
            let mut response = Response::new(http_body_util::Full::from(self.body));
            *response.status_mut() = self.status;
            *response.headers_mut() = self.headers.clone();
            std::future::ready(Ok(response))
        }
    }

    fn client(
        api: Api,
        status: StatusCode,
        body: &'static str,
    ) -> (OAuthClient, Arc<Mutex<Vec<Request<Bytes>>>>) {
        client_with_headers(api, status, HeaderMap::new(), body)
    }

    fn client_with_headers(
        api: Api,
        status: StatusCode,
        headers: HeaderMap,
        body: &'static str,
    ) -> (OAuthClient, Arc<Mutex<Vec<Request<Bytes>>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            seen: seen.clone(),
            status,
            headers,
            body,
        };
        let credentials = Credentials::new("cid", "the-client-secret", "user name", "the-password");
        let client = OAuthClient::new(
            transport(recorder),
            "https://api.sandbox.volt.io/oauth".parse().unwrap(),
            api,
            credentials,
            Duration::from_secs(5),
        );
        (client, seen)
    }

    const GOOD: &str =
        r#"{"access_token":"at1","token_type":"Bearer","expires_in":60,"refresh_token":"rt1"}"#;

    /// `expires_in` counts from when Volt answered, which is some time after
    /// the grant was sent: counted from the answer's arrival, a token that
    /// took long to come (within a token timeout of up to 5 minutes) was
    /// taken for valid past its expiry, beyond the expiry margin.
    #[tokio::test(start_paused = true)]
    async fn a_token_s_lifetime_counts_from_when_the_grant_was_sent() {
        let slow = tower::service_fn(|_: Request<Bytes>| async {
            tokio::time::sleep(Duration::from_secs(40)).await;
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                Bytes::from(GOOD),
            )))
        });
        let client = OAuthClient::new(
            transport(slow),
            "https://api.sandbox.volt.io/oauth".parse().unwrap(),
            Api::Gateway,
            Credentials::new("cid", "the-client-secret", "user name", "the-password"),
            Duration::from_secs(300),
        );
        let sent_at = Instant::now();
        let token = client.fetch(&Grant::Password).await.0.unwrap();
        assert_eq!(Instant::now() - sent_at, Duration::from_secs(40));
        assert_eq!(token.expires_at(), sent_at + Duration::from_secs(60));
    }

    #[tokio::test]
    async fn password_grant_is_form_encoded_as_documented() {
        let (client, seen) = client(Api::Gateway, StatusCode::OK, GOOD);
        let token = client.fetch(&Grant::Password).await.0.unwrap();
        assert_eq!(token.secret(), "at1");
        let seen = seen.lock().unwrap();
        let request = &seen[0];
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "https://api.sandbox.volt.io/oauth");
        // As FACTS.md documents it, charset included.
        assert_eq!(
            request.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded;charset=UTF-8"
        );
        assert_eq!(request.headers()[ACCEPT], "application/json");
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(request.body()).unwrap();
        let expected = [
            ("grant_type", "password"),
            ("client_id", "cid"),
            ("client_secret", "the-client-secret"),
            ("username", "user name"),
            ("password", "the-password"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(fields, expected);
    }

    #[tokio::test]
    async fn refresh_grant_sends_the_client_credentials_too() {
        let (client, seen) = client(Api::Gateway, StatusCode::OK, GOOD);
        client
            .fetch(&Grant::Refresh(SecretString::from("rt0".to_owned())))
            .await
            .0
            .unwrap();
        let seen = seen.lock().unwrap();
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(seen[0].body()).unwrap();
        let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["grant_type", "refresh_token", "client_id", "client_secret"]
        );
        assert_eq!(fields[0].1, "refresh_token");
        assert_eq!(fields[1].1, "rt0");
    }

    #[tokio::test]
    async fn global_api_sends_json() {
        let (client, seen) = client(Api::Global, StatusCode::OK, GOOD);
        client.fetch(&Grant::Password).await.0.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].headers()[CONTENT_TYPE], "application/json");
        let body: Value = serde_json::from_slice(seen[0].body()).unwrap();
        assert_eq!(body["grant_type"], "password");
        assert_eq!(body["username"], "user name");
        assert_eq!(body["client_secret"], "the-client-secret");
    }

    #[tokio::test]
    async fn failures_keep_status_and_redact() {
        let (client, _) = client(
            Api::Gateway,
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid_client","error_description":"the-client-secret is wrong"}"#,
        );
        let err = client.fetch(&Grant::Password).await.0.unwrap_err();
        assert!(err.is_rejected());
        assert!(!format!("{err} {err:?}").contains("the-client-secret"));
    }

    #[tokio::test]
    async fn only_a_429_or_503_carries_the_servers_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("30"));
        for (status, expected) in [
            (429, Some(Duration::from_secs(30))),
            (503, Some(Duration::from_secs(30))),
            (500, None),
            (502, None),
            (404, None),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            let (client, _) = client_with_headers(
                Api::Gateway,
                status,
                headers.clone(),
                r#"{"message":"slow down"}"#,
            );
            match client.fetch(&Grant::Password).await.0 {
                Err(Error::Failed { response, .. }) => {
                    assert_eq!(response.status, status);
                    assert_eq!(response.retry_after(), expected, "{status}");
                    assert_eq!(response.message.as_deref(), Some("slow down"));
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        // A rejection and a token ignore it.
        let (client, _) = client_with_headers(
            Api::Gateway,
            StatusCode::UNAUTHORIZED,
            headers.clone(),
            r#"{"error":"invalid_client"}"#,
        );
        let err = client.fetch(&Grant::Password).await.0.unwrap_err();
        assert!(err.is_rejected());
        assert_eq!(err.retry_after(), None);
        let (client, _) = client_with_headers(Api::Gateway, StatusCode::OK, headers, GOOD);
        assert!(client.fetch(&Grant::Password).await.0.is_ok());
    }

    /// An error body under a 2xx status in Volt's numeric shapes refuses the
    /// grant as its named codes do (so a refused refresh token falls back to
    /// the password grant); any other is an unusable answer.
    #[test]
    fn a_2xx_error_body_with_a_refusing_numeric_code_is_a_rejection() {
        let parsed = |body: &str| {
            parse(
                GrantType::RefreshToken,
                StatusCode::OK,
                body.as_bytes(),
                &[],
            )
        };
        for body in [
            r#"{"code":401,"message":"Invalid credentials"}"#,
            r#"{"code":"401","message":"Invalid credentials"}"#,
            r#"{"code":403,"message":"Forbidden"}"#,
            r#"{"exception":{"code":400,"message":"Validation exception","errorList":[]}}"#,
            r#"{"code":"UNAUTHORIZED","message":"Unauthorized."}"#,
        ] {
            let err = parsed(body);
            assert!(
                matches!(err, Err(Error::Rejected { .. })),
                "{body}: {err:?}"
            );
        }
        for body in [
            r#"{"code":500,"message":"Internal error"}"#,
            r#"{"code":429,"message":"Too many requests"}"#,
            r#"{"code":"4010"}"#,
        ] {
            let err = parsed(body);
            assert!(
                matches!(err, Err(Error::InvalidResponse { .. })),
                "{body}: {err:?}"
            );
        }
    }

    /// A member of an unexpected type (a framework's debug `exception`
    /// string, a null `errorList`, a list of strings) costs that member only,
    /// not the code and message the rest of the body carries.
    #[test]
    fn a_member_of_an_unexpected_type_keeps_the_rest_of_a_failure() {
        let shown = |status: u16, body: &str| {
            let status = StatusCode::from_u16(status).unwrap();
            match parse(GrantType::RefreshToken, status, body.as_bytes(), SECRETS) {
                Err(Error::Rejected { response, .. }) => (true, response.code, response.message),
                Err(Error::Failed { response, .. }) => (false, response.code, response.message),
                other => panic!("{body}: {other:?}"),
            }
        };
        let some = |text: &str| Some(text.to_owned());
        assert_eq!(
            shown(
                400,
                r#"{"exception":{"code":400,"message":"Validation exception","errorList":null}}"#
            ),
            (true, some("400"), some("Validation exception"))
        );
        assert_eq!(
            shown(
                400,
                r#"{"exception":{"code":400,"message":"Validation exception","errorList":["username: blank",{"property":"password","message":"blank"},7]}}"#
            ),
            (
                true,
                some("400"),
                some("Validation exception (username: blank; password: blank; 7)")
            )
        );
        assert_eq!(
            shown(
                401,
                r#"{"message":"Unauthenticated.","exception":"Illuminate\\Auth\\AuthenticationException"}"#
            ),
            (true, None, some("Unauthenticated."))
        );
        // Its code still refuses the grant under a status that does not.
        for status in [422, 200] {
            assert_eq!(
                shown(
                    status,
                    r#"{"code":401,"message":"Invalid credentials","exception":"X"}"#
                ),
                (true, some("401"), some("Invalid credentials")),
                "{status}"
            );
        }
        // A member given twice: the last, as for a token.
        assert_eq!(
            shown(
                500,
                r#"{"error":"server_error","error":"temporarily_unavailable"}"#
            ),
            (false, some("temporarily_unavailable"), None)
        );
    }

    /// A number beyond `f64` (`1e400`, which a `serde_json::Value` refuses)
    /// in any member costs at most that member, as in a token and as before
    /// the body was read into `Value`s: the code and message still count, and
    /// a refusing code still refuses under a status that does not.
    #[test]
    fn a_number_beyond_f64_keeps_the_rest_of_a_failure() {
        for status in [200, 422] {
            let status = StatusCode::from_u16(status).unwrap();
            for (body, message) in [
                (
                    r#"{"code":401,"message":"Invalid credentials","trace":1e400}"#,
                    "Invalid credentials",
                ),
                (
                    r#"{ "error" : null , "code" : 401 , "message" : "Invalid credentials" , "at" : 1e400 }"#,
                    "Invalid credentials",
                ),
                (
                    r#"{"exception":{"code":400,"message":"Validation exception","line":-1e999,"errorList":[{"property":"password","message":"blank","max":2e308}]}}"#,
                    "Validation exception (password: blank)",
                ),
            ] {
                let err =
                    parse(GrantType::RefreshToken, status, body.as_bytes(), SECRETS).unwrap_err();
                let Error::Rejected { response, .. } = &err else {
                    panic!("{status} {body}: expected a rejection, got {err:?}");
                };
                assert_eq!(response.message.as_deref(), Some(message), "{body}");
            }
        }
    }

    /// An error answer whose body is over the limit (a proxy's error page) is
    /// classified by its status, as with a body of none of Volt's shapes; only
    /// a 2xx needs its body.
    #[tokio::test]
    async fn an_oversized_error_answer_is_classified_by_its_status() {
        let page: &'static str = format!("<html>{}</html>", "x".repeat(MAX_RESPONSE_BYTES)).leak();
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("30"));
        let fetch = |status: u16| {
            let status = StatusCode::from_u16(status).unwrap();
            let (client, _) = client_with_headers(Api::Gateway, status, headers.clone(), page);
            async move { client.fetch(&Grant::Password).await.0.unwrap_err() }
        };
        let Error::Failed { response, .. } = fetch(503).await else {
            panic!("503 not Failed")
        };
        assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.retry_after(), Some(Duration::from_secs(30)));
        assert_eq!((response.code, response.message), (None, None));
        let err = fetch(502).await;
        assert!(matches!(err, Error::Failed { .. }), "{err:?}");
        assert_eq!(err.status(), Some(StatusCode::BAD_GATEWAY));
        let err = fetch(401).await;
        assert!(err.is_rejected(), "{err:?}");
        // A 2xx without its whole body has no token.
        match fetch(200).await {
            Error::InvalidResponse { status, reason, .. } => {
                assert_eq!(status, StatusCode::OK);
                assert_eq!(reason, "the body is larger than 64 KiB");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A transport error wrapping an I/O error, as clients do.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("client error")
        }
    }

    impl StdError for Wrapped {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    /// A connection reset, aborted or broken before any answer is tried once
    /// more; any other transport error is not.
    #[tokio::test]
    async fn only_a_connection_closed_unanswered_is_sent_again() {
        use std::io::ErrorKind::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cases = [
            (ConnectionReset, 2),
            (ConnectionAborted, 2),
            (BrokenPipe, 2),
            (ConnectionRefused, 1),
            (TimedOut, 1),
            (Other, 1),
        ];
        for (kind, sent) in cases {
            let calls = Arc::new(AtomicUsize::new(0));
            let counted = calls.clone();
            let failing = tower::service_fn(move |_: Request<Bytes>| {
                counted.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Err::<Response<http_body_util::Full<Bytes>>, _>(Wrapped(
                    kind.into(),
                )))
            });
            let client = OAuthClient::new(
                transport(failing),
                "https://api.sandbox.volt.io/oauth".parse().unwrap(),
                Api::Gateway,
                Credentials::new("cid", "the-client-secret", "user", "the-password"),
                Duration::from_secs(5),
            );
            let err = client.fetch(&Grant::Password).await.0.unwrap_err();
            assert!(matches!(err, Error::Transport { .. }), "{err:?}");
            assert_eq!(calls.load(Ordering::SeqCst), sent, "{kind:?}");
        }
    }

    /// Only a refusal received from the server counts: h2's own
    /// `REFUSED_STREAM` or `NO_ERROR` (not from a frame) is no refusal.
    /// (tests/http2.rs covers the server's, over h2c.)
    #[cfg(feature = "http2")]
    #[test]
    fn an_http2_reason_not_from_the_server_is_not_unanswered() {
        for reason in [h2::Reason::REFUSED_STREAM, h2::Reason::NO_ERROR] {
            assert!(!unanswered(&h2::Error::from(reason)), "{reason:?}");
        }
    }
}
