//! No secret and no token ever reaches a log line or a `Debug`/`Display`
//! string: all tracing output is captured at TRACE (a global subscriber, so
//! that the spawned refresh tasks log into it too) over representative runs,
//! and searched for the configured secrets and every token the mock issued.
//! Over TCP, hyper-util's own events are searched too: its `tracing`
//! feature is on for the tests.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::{Instant, sleep, sleep_until};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::trace::{DefaultMakeSpan, DefaultOnRequest, DefaultOnResponse, TraceLayer};
use tracing::Level;
use volt_auth::mock::{self, Broken, MockVolt};
use volt_auth::{Credentials, Error, VoltAuthLayer};

mod common;

use common::log::{capture, log_text};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
/// A wrong client secret configured on one layer: it must not leak either.
const WRONG_SECRET: &str = "wrong-client-secret-7f3a9c";

/// The secrets and every token `mock` issued.
fn secrets(mock: &MockVolt) -> Vec<String> {
    let mut secrets = vec![
        mock::CLIENT_SECRET.to_owned(),
        mock::PASSWORD.to_owned(),
        WRONG_SECRET.to_owned(),
    ];
    secrets.extend(mock.issued_access_tokens());
    secrets.extend(mock.issued_refresh_tokens());
    secrets
}

fn assert_no_secret(text: &str, secrets: &[String], what: &str) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} shows the secret {secret:?}:\n{text}"
        );
    }
}

/// Display, Debug and the Display of every source of an error.
fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{err} | {err:?}");
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(&format!(" | {err} | {err:?}"));
        source = err.source();
    }
    text
}

/// Sets up the next `/oauth` fault on the mock.
type Fault = Box<dyn Fn(&MockVolt)>;

/// Records whether each API request's `Authorization` header was sensitive.
type Seen = Arc<Mutex<Vec<bool>>>;

fn recording<S>(
    inner: S,
    seen: Seen,
) -> impl Service<Request<Full<Bytes>>, Response = S::Response, Error = S::Error, Future = impl Send>
+ Clone
+ Send
+ 'static
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send,
{
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        if let Some(value) = request.headers().get(AUTHORIZATION) {
            seen.lock().unwrap().push(value.is_sensitive());
        }
        inner.clone().oneshot(request)
    })
}

fn trace_layer()
-> TraceLayer<tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>>
{
    TraceLayer::new_for_http()
        .make_span_with(
            DefaultMakeSpan::new()
                .level(Level::TRACE)
                .include_headers(true),
        )
        .on_request(DefaultOnRequest::new().level(Level::TRACE))
        .on_response(
            DefaultOnResponse::new()
                .level(Level::TRACE)
                .include_headers(true),
        )
}

async fn send<S, B>(service: &S, request: Request<Full<Bytes>>) -> Result<StatusCode, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError> + Clone,
{
    let mut service = service.clone();
    let response = service.ready().await?.call(request).await?;
    Ok(response.status())
}

fn banks(base: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{base}/banks"))
        .body(Full::default())
        .unwrap()
}

fn payment(base: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("{base}/v2/payments"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn auth_error(err: &BoxError) -> Error {
    err.downcast_ref::<Error>()
        .cloned()
        .unwrap_or_else(|| panic!("not a volt_auth::Error: {err}"))
}

/// Lets the background refresh finish (the paused clock advances only once
/// every task is idle).
async fn settle() {
    sleep(MS).await;
}

#[tokio::test(start_paused = true)]
async fn tracing_over_a_representative_run_never_shows_a_secret_or_token() {
    capture();
    let mock = MockVolt::builder().in_process();
    let base = mock.url();
    let mut texts: Vec<(String, String)> = Vec::new();

    let builder = VoltAuthLayer::builder(mock.credentials())
        .base_url(&base)
        .token_timeout(2 * SEC)
        .backoff(SEC, 4 * SEC);
    texts.push(("Builder".into(), format!("{builder:?}")));
    // `/oauth` requests go through a TraceLayer that logs their headers too.
    let transport = ServiceBuilder::new()
        .layer(trace_layer())
        .service(mock.service());
    let auth = builder.build(transport).unwrap();
    let seen = Seen::default();
    // API requests pass a TraceLayer that logs every header, Authorization
    // included, after the auth layer.
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .layer(trace_layer())
        .service(recording(mock.service(), seen.clone()));

    // Password grant.
    assert_eq!(send(&api, banks(&base)).await.unwrap(), StatusCode::OK);
    let token = auth.access_token().await.unwrap();
    assert!(token.header_value().is_sensitive());

    // Two background refreshes (refresh_token grant), each rotating the
    // refresh token.
    for round in 0..2 {
        let token = auth.access_token().await.unwrap();
        sleep_until(token.expires_at() - Duration::from_secs(299)).await;
        assert_eq!(send(&api, banks(&base)).await.unwrap(), StatusCode::OK);
        settle().await;
        let presented = mock.oauth_requests().pop().unwrap();
        assert_eq!(presented.grant_type.as_deref(), Some("refresh_token"));
        assert_eq!(
            presented.field("refresh_token"),
            Some(mock.issued_refresh_tokens()[round].as_str())
        );
    }
    assert_eq!(send(&api, banks(&base)).await.unwrap(), StatusCode::OK);

    // 401 replay of a POST with a body.
    mock.revoke_access_tokens();
    sleep(10 * SEC).await;
    let body = r#"{"amount":1000,"currencyCode":"GBP","reference":"redaction"}"#;
    assert_eq!(
        send(&api, payment(&base, body)).await.unwrap(),
        StatusCode::CREATED
    );
    assert_eq!(auth.stats().replays, 1);

    // A 401, then a refresh token rejection whose body echoes the refresh
    // token and the client secret, then the password fallback and a replay.
    mock.revoke_access_tokens();
    sleep(10 * SEC).await;
    let current_refresh = mock.issued_refresh_tokens().pop().unwrap();
    mock.fail_oauth(
        1,
        StatusCode::BAD_REQUEST,
        format!(
            r#"{{"error":"invalid_grant","error_description":"refresh token {current_refresh} of client {} was revoked"}}"#,
            mock::CLIENT_SECRET
        ),
    );
    assert_eq!(send(&api, banks(&base)).await.unwrap(), StatusCode::OK);
    assert_eq!(auth.stats().replays, 2);
    assert_eq!(auth.stats().refresh.rejected, 1);

    // A failed background refresh whose 5xx body echoes everything it was sent.
    let token = auth.access_token().await.unwrap();
    sleep_until(token.expires_at() - Duration::from_secs(299)).await;
    let current_refresh = mock.issued_refresh_tokens().pop().unwrap();
    mock.fail_oauth(
        1,
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            r#"{{"code":503,"message":"upstream failed for secret={} password={} refresh_token={current_refresh}"}}"#,
            mock::CLIENT_SECRET,
            mock::PASSWORD
        ),
    );
    assert_eq!(send(&api, banks(&base)).await.unwrap(), StatusCode::OK);
    settle().await;
    assert_eq!(auth.stats().refresh.failed, 1);

    // A second layer without a token: timeouts, rejections echoing the
    // secret and the password in every failure shape, broken bodies, then
    // recovery. Every error is kept for its Display and Debug.
    let other = VoltAuthLayer::builder(mock.credentials())
        .base_url(&base)
        .token_timeout(2 * SEC)
        .backoff(SEC, 4 * SEC)
        .build(mock.service())
        .unwrap();
    let other_api = ServiceBuilder::new()
        .layer(other.clone())
        .service(recording(mock.service(), seen.clone()));
    let mut errors: Vec<BoxError> = Vec::new();
    let faults: Vec<Fault> = vec![
        Box::new(|mock| mock.set_oauth_delay(3 * SEC)),
        Box::new(|mock| {
            mock.set_oauth_delay(Duration::ZERO);
            mock.fail_oauth(
                1,
                StatusCode::UNAUTHORIZED,
                format!(
                    r#"{{"error":"invalid_client","error_description":"bad secret {}"}}"#,
                    mock::CLIENT_SECRET
                ),
            );
        }),
        Box::new(|mock| {
            mock.fail_oauth(
                1,
                StatusCode::BAD_REQUEST,
                format!(
                    r#"{{"exception":{{"code":400,"message":"Validation exception","errorList":[{{"property":"password","message":"{} is not the password"}},{{"property":"client_secret","message":"{}"}}]}}}}"#,
                    mock::PASSWORD,
                    mock::CLIENT_SECRET
                ),
            );
        }),
        Box::new(|mock| {
            mock.fail_oauth(
                1,
                StatusCode::UNAUTHORIZED,
                format!(
                    r#"{{"code":"UNAUTHORISED","message":"Unauthorised: {}/{}"}}"#,
                    mock::USERNAME,
                    mock::PASSWORD
                ),
            );
        }),
        Box::new(|mock| {
            mock.fail_oauth(
                1,
                StatusCode::BAD_GATEWAY,
                format!("<html>bad gateway for {}</html>", mock::CLIENT_SECRET),
            );
        }),
        Box::new(|mock| mock.break_oauth(1, Broken::TruncatedJson)),
        Box::new(|mock| mock.break_oauth(1, Broken::Oversized)),
    ];
    for fault in &faults {
        fault(&mock);
        let err = send(&other_api, banks(&base)).await.unwrap_err();
        errors.push(err);
        let err = other.access_token().await.unwrap_err();
        errors.push(Box::new(err));
        sleep(4 * SEC).await;
    }
    assert_eq!(
        send(&other_api, banks(&base)).await.unwrap(),
        StatusCode::OK
    );
    let kinds: Vec<&str> = errors
        .iter()
        .step_by(2)
        .map(|err| match auth_error(err) {
            Error::Timeout { .. } => "timeout",
            Error::Rejected { .. } => "rejected",
            Error::Failed { .. } => "failed",
            Error::InvalidResponse { .. } => "invalid",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "timeout", "rejected", "rejected", "rejected", "failed", "invalid", "invalid"
        ]
    );

    // A layer with a wrong client secret: the mock answers invalid_client.
    let wrong = VoltAuthLayer::builder(Credentials::new(
        mock::CLIENT_ID,
        WRONG_SECRET,
        mock::USERNAME,
        mock::PASSWORD,
    ))
    .base_url(&base)
    .build(mock.service())
    .unwrap();
    let err = wrong.access_token().await.unwrap_err();
    assert!(err.is_rejected());
    errors.push(Box::new(err));
    texts.push(("wrong layer".into(), format!("{wrong:?}")));

    // Nothing secret in the log, which did see all of the above.
    let log = log_text();
    let secrets = secrets(&mock);
    assert_eq!(mock.issued_access_tokens().len(), 6);
    assert!(!log.is_empty());
    assert_no_secret(&log, &secrets, "the tracing output");
    for expected in [
        "grant=password",
        "grant=refresh_token",
        "replaying a request after a 401",
        "[redacted]",
        "\"authorization\": Sensitive",
    ] {
        assert!(log.contains(expected), "the log lacks {expected:?}:\n{log}");
    }

    // Nor in any Debug or Display.
    for err in &errors {
        texts.push(("error".into(), error_text(err.as_ref())));
    }
    let token = auth.access_token().await.unwrap();
    texts.extend([
        ("layer".into(), format!("{auth:?}")),
        (
            "service".into(),
            format!("{:?}", auth.clone().layer(mock.service())),
        ),
        ("credentials".into(), format!("{:?}", mock.credentials())),
        ("access token".into(), format!("{token:?}")),
        ("header".into(), format!("{:?}", token.header_value())),
        ("stats".into(), format!("{:?}", auth.stats())),
        ("endpoint".into(), format!("{:?}", auth.endpoint())),
    ]);
    for (what, text) in &texts {
        assert_no_secret(text, &secrets, what);
    }

    // Every Authorization header the layer attached was marked sensitive.
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 8, "{seen:?}");
    assert!(seen.iter().all(|sensitive| *sensitive), "{seen:?}");
}

#[tokio::test]
async fn tracing_over_tcp_never_shows_a_secret_or_token() {
    capture();
    let mock = MockVolt::start().await.unwrap();
    let base = mock.url();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let transport = ServiceBuilder::new()
        .layer(trace_layer())
        .service(client.clone());
    let auth = VoltAuthLayer::builder(mock.credentials())
        .base_url(&base)
        .backoff(MS, 5 * MS)
        .build(transport)
        .unwrap();
    let seen = Seen::default();
    let api = ServiceBuilder::new()
        .layer(auth.clone())
        .layer(trace_layer())
        .service(recording(client, seen.clone()));

    assert_eq!(send(&api, banks(&base)).await.unwrap(), StatusCode::OK);
    mock.revoke_access_tokens();
    let body = r#"{"amount":1,"currencyCode":"EUR"}"#;
    assert_eq!(
        send(&api, payment(&base, body)).await.unwrap(),
        StatusCode::CREATED
    );
    assert_eq!(auth.stats().replays, 1);

    // Refused connections for a layer with no token, then recovery.
    let other = VoltAuthLayer::builder(mock.credentials())
        .base_url(&base)
        .backoff(MS, 5 * MS)
        .build(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>())
        .unwrap();
    mock.stop();
    let err = other.access_token().await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    let refused = error_text(&err);
    mock.restart().await.unwrap();
    let mut rounds = 0;
    while other.access_token().await.is_err() {
        rounds += 1;
        assert!(rounds < 1_000_000, "no recovery");
        tokio::task::yield_now().await;
    }

    let log = log_text();
    let secrets = secrets(&mock);
    assert_eq!(mock.issued_access_tokens().len(), 3);
    assert_no_secret(&log, &secrets, "the tracing output");
    assert_no_secret(&refused, &secrets, "a transport error");
    assert!(log.contains("grant=password"), "{log}");
    // The client's own events were searched too (hyper-util's `tracing`
    // feature is on for the tests): its connection to /oauth, at debug.
    assert!(
        log.contains("hyper_util::client::legacy::connect::http: connecting to 127.0.0.1"),
        "{log}"
    );
    assert!(log.contains("\"authorization\": Sensitive"), "{log}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|sensitive| *sensitive), "{seen:?}");
}

#[tokio::test]
async fn debug_of_every_public_type_is_redacted() {
    capture();
    let credentials = Credentials::new(
        mock::CLIENT_ID,
        mock::CLIENT_SECRET,
        mock::USERNAME,
        mock::PASSWORD,
    );
    let secrets = [mock::CLIENT_SECRET.to_owned(), mock::PASSWORD.to_owned()];
    let shown = format!("{credentials:?}");
    assert!(
        shown.contains(mock::CLIENT_ID) && shown.contains(mock::USERNAME),
        "{shown}"
    );
    assert_no_secret(&shown, &secrets, "Credentials");
    let builder = VoltAuthLayer::builder(credentials.clone()).base_url("http://127.0.0.1:9");
    assert_no_secret(&format!("{builder:?}"), &secrets, "Builder");
    let started = Instant::now();
    let auth = builder
        .build(tower::service_fn(|_: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                br#"{"access_token":"at-3b1f0c9e","token_type":"Bearer","expires_in":60,"refresh_token":"rt-77aa01de"}"#,
            ))))
        }))
        .unwrap();
    let token = auth.access_token().await.unwrap();
    assert_eq!(token.expose_secret(), "at-3b1f0c9e");
    assert!(token.expires_at() >= started + 60 * SEC);
    let secrets = [
        mock::CLIENT_SECRET.to_owned(),
        mock::PASSWORD.to_owned(),
        "at-3b1f0c9e".to_owned(),
        "rt-77aa01de".to_owned(),
    ];
    for (what, text) in [
        ("layer", format!("{auth:?}")),
        ("access token", format!("{token:?}")),
        ("header", format!("{:?}", token.header_value())),
        ("stats", format!("{:?}", auth.stats())),
        ("log", log_text()),
    ] {
        assert_no_secret(&text, &secrets, what);
    }
    assert!(token.header_value().is_sensitive());
    assert_eq!(
        token.header_value().as_bytes(),
        b"Bearer at-3b1f0c9e".as_slice()
    );
}
