//! The embedded mock Volt server against what FACTS.md says Volt does, and its
//! counters when a request never fully arrives.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tower::ServiceExt;
use volt_auth::mock::{self, MockVolt};

const FORM: &str = "application/x-www-form-urlencoded;charset=UTF-8";

fn password_form() -> String {
    serde_urlencoded::to_string([
        ("client_id", mock::CLIENT_ID),
        ("client_secret", mock::CLIENT_SECRET),
        ("username", mock::USERNAME),
        ("password", mock::PASSWORD),
        ("grant_type", "password"),
    ])
    .expect("form")
}

async fn send(
    volt: &MockVolt,
    request: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let Ok(response) = volt.service().oneshot(request).await;
    let (parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await;
    (parts.status, parts.headers, collected.to_bytes())
}

async fn login(volt: &MockVolt) -> String {
    let request = Request::post("/oauth")
        .header(CONTENT_TYPE, FORM)
        .body(Full::from(password_form()))
        .expect("request");
    let (status, _, body) = send(volt, request).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).expect("json");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

/// A body that yields its first bytes and then fails, as hyper's `Incoming` does when the
/// client disconnects in the middle of the body.
struct Interrupted(Option<Bytes>);

impl Body for Interrupted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Poll::Ready(Some(match self.0.take() {
            Some(bytes) => Ok(Frame::data(bytes)),
            None => Err(io::ErrorKind::ConnectionReset.into()),
        }))
    }
}

#[tokio::test]
async fn a_request_whose_body_never_arrives_is_not_counted_nor_scripted() {
    let volt = MockVolt::builder().in_process();
    let access = login(&volt).await;
    volt.fail_oauth(1, StatusCode::SERVICE_UNAVAILABLE, r#"{"code":503}"#);

    let form = password_form();
    let cut = Bytes::from(form[..form.len() / 2].to_owned());
    let request = Request::post("/oauth")
        .header(CONTENT_TYPE, FORM)
        .body(Interrupted(Some(cut)))
        .expect("request");
    let Ok(response) = volt.service_for::<Interrupted>().oneshot(request).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // Nothing was received: no call counted or recorded, and the scripted failure is still
    // there for the next real request.
    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(volt.password_grants(), 1);
    assert_eq!(volt.oauth_requests().len(), 1);
    let request = Request::post("/oauth")
        .header(CONTENT_TYPE, FORM)
        .body(Full::from(password_form()))
        .expect("request");
    let (status, _, body) = send(&volt, request).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, r#"{"code":503}"#);
    assert_eq!(volt.oauth_calls(), 2);

    // The same for a payment whose body is cut off.
    let request = Request::post("/v2/payments")
        .header(AUTHORIZATION, format!("Bearer {access}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Interrupted(Some(Bytes::from_static(b"{\"amount\":"))))
        .expect("request");
    let Ok(response) = volt.service_for::<Interrupted>().oneshot(request).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(volt.api_calls(), 0);
    assert_eq!(volt.unauthorized(), 0);
    assert!(volt.api_authorizations().is_empty());
    assert!(volt.payment_bodies().is_empty());
}

fn get(path: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::get(path);
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Full::default()).expect("request")
}

fn post(path: &str, token: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path).header(CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Full::from(body)).expect("request")
}

async fn expect_401(volt: &MockVolt, token: Option<&str>) {
    let batch = vec![
        get("/banks", token),
        get("/banks/mock-bank-hsbc", token),
        post("/v2/payments", token, r#"{"amount":1}"#),
        get("/payments", token),
        get("/payments/00000000-0000-4000-8000-000000000000", token),
        post("/dropin", token, r#"{"amount":1}"#),
    ];
    for request in batch {
        let path = request.uri().path().to_owned();
        let (status, headers, body) = send(volt, request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(headers[WWW_AUTHENTICATE], "Bearer", "{path}");
        assert_eq!(body, r#"{"code":401,"message":"Unauthorized"}"#, "{path}");
    }
}

/// FACTS.md lists GET /banks, GET /banks/{id}, POST /v2/payments, GET /payments,
/// GET /payments/{id} and POST /dropin for the mock; any of them answers 401 for an
/// expired or revoked token.
#[tokio::test(start_paused = true)]
async fn every_documented_api_call_answers_401_for_a_missing_expired_or_revoked_token() {
    let volt = MockVolt::builder()
        .access_token_lifetime(Duration::from_secs(60))
        .in_process();
    expect_401(&volt, None).await;
    expect_401(&volt, Some("made-up")).await;
    let expiring = login(&volt).await;
    tokio::time::advance(Duration::from_secs(60)).await;
    expect_401(&volt, Some(&expiring)).await;
    let revoked = login(&volt).await;
    volt.revoke_access_tokens();
    expect_401(&volt, Some(&revoked)).await;
    assert_eq!(volt.api_calls(), 24);
    assert_eq!(volt.unauthorized(), 24);

    // With a valid token each answers.
    let access = login(&volt).await;
    let (status, _, body) = send(&volt, get("/banks/mock-bank-hsbc", Some(&access))).await;
    assert_eq!(status, StatusCode::OK);
    let bank: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(bank["id"], "mock-bank-hsbc");
    assert_eq!(bank["name"], "Mock HSBC");
    let (status, _, _) = send(&volt, get("/banks/no-such-bank", Some(&access))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _, body) = send(
        &volt,
        post("/v2/payments", Some(&access), r#"{"amount":7}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let created: Value = serde_json::from_slice(&body).expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let (status, _, body) = send(&volt, get(&format!("/payments/{id}"), Some(&access))).await;
    assert_eq!(status, StatusCode::OK);
    let payment: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(payment["id"], id.as_str());
    assert_eq!(payment["checkoutUrl"], created["checkoutUrl"]);
    let (status, _, body) = send(&volt, get("/payments", Some(&access))).await;
    assert_eq!(status, StatusCode::OK);
    let list: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], id.as_str());
    let (status, _, _) = send(
        &volt,
        get(
            "/payments/00000000-0000-4000-8000-000000000000",
            Some(&access),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = send(&volt, post("/dropin", Some(&access), r#"{"amount":7}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    let dropin: Value = serde_json::from_slice(&body).expect("json");
    assert!(dropin["id"].is_string());

    // Wrong methods are 405 with Allow, not counted as API calls.
    let calls = volt.api_calls();
    let (status, headers, _) = send(&volt, post("/payments", Some(&access), "{}")).await;
    assert_eq!(
        (status, &headers[ALLOW]),
        (StatusCode::METHOD_NOT_ALLOWED, &"GET".parse().unwrap())
    );
    let (status, headers, _) = send(&volt, get("/dropin", Some(&access))).await;
    assert_eq!(
        (status, &headers[ALLOW]),
        (StatusCode::METHOD_NOT_ALLOWED, &"POST".parse().unwrap())
    );
    let (status, _, _) = send(&volt, get("/banks/a/b", Some(&access))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(volt.api_calls(), calls);
}

#[tokio::test]
async fn oauth_requests_debug_redacts_the_secret_password_and_refresh_token() {
    let volt = MockVolt::builder().in_process();
    let request = Request::post("/oauth")
        .header(CONTENT_TYPE, FORM)
        .body(Full::from(password_form()))
        .expect("request");
    let (status, _, body) = send(&volt, request).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).expect("json");
    let refresh = body["refresh_token"].as_str().expect("refresh_token");
    // The refresh grant as JSON (the Global API's shape).
    let refresh_grant = serde_json::json!({
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "client_id": mock::CLIENT_ID,
        "client_secret": mock::CLIENT_SECRET,
    });
    let request = Request::post("/oauth")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::from(refresh_grant.to_string()))
        .expect("request");
    assert_eq!(send(&volt, request).await.0, StatusCode::OK);

    let requests = volt.oauth_requests();
    assert_eq!(requests.len(), 2);
    // The values are kept as sent...
    assert_eq!(requests[0].field("password"), Some(mock::PASSWORD));
    assert_eq!(requests[1].field("refresh_token"), Some(refresh));
    // ...and `Debug` shows none of them: each carried two, the client
    // secret and the password or refresh token.
    for request in &requests {
        let debug = format!("{request:?}");
        for secret in [mock::CLIENT_SECRET, mock::PASSWORD, refresh] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert_eq!(debug.matches("\"[redacted]\"").count(), 2, "{debug}");
        assert!(debug.contains(mock::CLIENT_ID), "{debug}");
    }
    assert!(format!("{:?}", requests[0]).contains(mock::USERNAME));
}

/// A body that is not the grant it should be (JSON labelled as a form, an
/// unencoded `&` in the password) puts secrets in field names: `Debug` shows
/// those neither.
#[tokio::test]
async fn oauth_requests_debug_redacts_secrets_in_malformed_bodies() {
    let volt = MockVolt::builder().in_process();
    let json = serde_json::json!({
        "grant_type": "password",
        "client_id": mock::CLIENT_ID,
        "client_secret": mock::CLIENT_SECRET,
        "username": mock::USERNAME,
        "password": mock::PASSWORD,
    });
    let unencoded = format!(
        "grant_type=password&client_id={}&client_secret={}&username={}&password=pass&Xq9z",
        mock::CLIENT_ID,
        mock::CLIENT_SECRET,
        mock::USERNAME
    );
    for body in [json.to_string(), unencoded] {
        let request = Request::post("/oauth")
            .header(CONTENT_TYPE, FORM)
            .body(Full::from(body))
            .expect("request");
        send(&volt, request).await;
    }
    let requests = volt.oauth_requests();
    let debug = format!("{requests:?}");
    for secret in [mock::CLIENT_SECRET, mock::PASSWORD, "Xq9z"] {
        assert!(!debug.contains(secret), "{secret}: {debug}");
    }
    // The names Volt's grants use, and the values that are not secret, still show.
    assert!(debug.contains(r#"("grant_type", "password")"#), "{debug}");
    assert!(debug.contains(r#"("password", "[redacted]")"#), "{debug}");
}
