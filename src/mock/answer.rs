//! Answering a request, over TCP or through
//! [`MockService`](super::MockService): `/oauth` with its two grants, and the
//! Gateway routes.
//!
//! An `/oauth` call is recorded and counted once its body is in, then held,
//! delayed or answered from the `fail_oauth` and `break_oauth` budgets; only
//! then are its method, body and credentials checked. A call to an API route
//! with the right method is recorded and counted before its token is checked.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde::Serialize;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use tokio::time::Instant;

use super::{
    BODY_LIMIT, Broken, HeldGuard, InFlight, OAuthRequest, Shared, State, TOKEN_LEN, payment_digest,
};

enum BodyError {
    TooLarge,
    Failed,
}

async fn collect<B>(body: B) -> Result<Bytes, BodyError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Failed),
    }
}

pub(super) async fn handle<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path == "/oauth" {
        return oauth(shared, &parts, body).await;
    }
    let Some(route) = Api::route(path) else {
        return not_found();
    };
    let (method, allow) = route.method();
    if parts.method != method {
        return method_not_allowed(allow);
    }
    api(shared, &parts, body, route).await
}

fn not_found() -> Response<Full<Bytes>> {
    json(
        StatusCode::NOT_FOUND,
        r#"{"code":404,"message":"Not Found"}"#,
    )
}

fn header(parts: &Parts, name: http::header::HeaderName) -> Option<String> {
    parts
        .headers
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

pub(super) fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Parses a form or JSON body; `Err` means `invalid_request`.
fn parse_fields(content_type: Option<&str>, body: &[u8]) -> Result<Vec<(String, String)>, ()> {
    let essence = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase())
        .ok_or(())?;
    if essence == "application/x-www-form-urlencoded" {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).map_err(|_| ())
    } else if essence == "application/json" || essence.ends_with("+json") {
        let JsonFields(fields) = serde_json::from_slice(body).map_err(|_| ())?;
        Ok(fields
            .into_iter()
            .filter(|(_, value)| !value.is_null())
            .map(|(key, value)| match value {
                serde_json::Value::String(text) => (key, text),
                other => (key, other.to_string()),
            })
            .collect())
    } else {
        Err(())
    }
}

/// A JSON object's members in the order sent (`serde_json::Map` sorts them by
/// name); a repeated name keeps its first place and its last value.
struct JsonFields(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for JsonFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = JsonFields;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonFields, A::Error> {
                let mut fields: Vec<(String, serde_json::Value)> = Vec::new();
                // Where each name is, so that a body of many names takes no quadratic time.
                let mut places: HashMap<String, usize> = HashMap::new();
                while let Some((name, value)) = map.next_entry::<String, serde_json::Value>()? {
                    match places.get(&name).and_then(|&place| fields.get_mut(place)) {
                        Some(field) => field.1 = value,
                        None => {
                            places.insert(name.clone(), fields.len());
                            fields.push((name, value));
                        }
                    }
                }
                Ok(JsonFields(fields))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

async fn oauth<B>(shared: &Shared, parts: &Parts, body: B) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _in_flight = InFlight::enter(shared);
    let body = collect(body).await;
    if let Err(BodyError::Failed) = body {
        // The client went away mid-body: nothing was received, so nothing is counted,
        // recorded or taken from the fail/break budgets.
        return unreadable_body();
    }
    let content_type = header(parts, CONTENT_TYPE);
    let parsed = match &body {
        Ok(bytes) => parse_fields(content_type.as_deref(), bytes),
        Err(_) => Err(()),
    };
    let fields = parsed.clone().unwrap_or_default();
    let grant_type = field(&fields, "grant_type").map(str::to_owned);
    let record = OAuthRequest {
        grant_type: grant_type.clone(),
        content_type,
        accept: header(parts, ACCEPT),
        fields,
    };

    let holds = {
        let mut state = shared.state();
        state.oauth_requests.push(record);
        state.holds.clone()
    };
    shared.oauth_calls.fetch_add(1, Ordering::SeqCst);
    match grant_type.as_deref() {
        Some("password") => shared.password_grants.fetch_add(1, Ordering::SeqCst),
        Some("refresh_token") => shared.refresh_grants.fetch_add(1, Ordering::SeqCst),
        _ => 0,
    };

    // Hold: count ourselves as waiting on every active hold, then wait for each release.
    let held: Vec<HeldGuard> = holds.into_iter().map(HeldGuard::new).collect();
    for guard in &held {
        guard.released().await;
    }
    drop(held);

    let delay = shared.state().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    if let Some(response) = scripted(shared) {
        return response;
    }

    if parts.method != Method::POST {
        return method_not_allowed("POST");
    }
    let fields = match (body, parsed) {
        (Err(BodyError::TooLarge), _) => return payload_too_large(),
        (Ok(_), Ok(fields)) => fields,
        _ => return unreadable_body(),
    };
    match grant_type.as_deref() {
        Some("password") => password_grant(shared, &fields),
        Some("refresh_token") => refresh_grant(shared, &fields),
        _ => json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unsupported_grant_type","error_description":"The authorization grant type is not supported by the authorization server."}"#,
        ),
    }
}

fn unreadable_body() -> Response<Full<Bytes>> {
    json(
        StatusCode::BAD_REQUEST,
        r#"{"error":"invalid_request","error_description":"The request body could not be parsed."}"#,
    )
}

/// Consumes one unit of the `fail_oauth` or `break_oauth` budget, if any.
fn scripted(shared: &Shared) -> Option<Response<Full<Bytes>>> {
    let mut state = shared.state();
    if let Some(failure) = state.failure.as_mut() {
        let mut response = json(failure.status, failure.body.clone());
        // Replaces the defaults' values of the names it has (`Content-Type`).
        response.headers_mut().extend(failure.headers.clone());
        failure.remaining -= 1;
        if failure.remaining == 0 {
            state.failure = None;
        }
        return Some(response);
    }
    if let Some((remaining, broken)) = state.broken.as_mut() {
        let response = broken_response(*broken);
        *remaining -= 1;
        if *remaining == 0 {
            state.broken = None;
        }
        return Some(response);
    }
    None
}

fn broken_response(broken: Broken) -> Response<Full<Bytes>> {
    match broken {
        Broken::Empty => json(StatusCode::OK, Bytes::new()),
        Broken::Html => with_content_type(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\
             <body><h1>502 Bad Gateway</h1></body></html>\n",
        ),
        Broken::TruncatedJson => json(
            StatusCode::OK,
            r#"{"token_type":"Bearer","expires_in":3600,"access_token":"eyJ0eXAiOiJKV1Qi"#,
        ),
        Broken::Oversized => {
            let head = r#"{"token_type":"Bearer","expires_in":3600,"access_token":"oversized","refresh_token":"oversized","padding":""#;
            let tail = "\"}";
            let padding = BODY_LIMIT + 1 - head.len() - tail.len() + 1024;
            let mut body = String::with_capacity(head.len() + padding + tail.len());
            body.push_str(head);
            body.extend(std::iter::repeat_n('a', padding));
            body.push_str(tail);
            json(StatusCode::OK, body)
        }
        Broken::NotJson => with_content_type(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "access_token=not-json&token_type=bearer&expires_in=3600",
        ),
    }
}

fn client_ok(shared: &Shared, fields: &[(String, String)]) -> bool {
    field(fields, "client_id") == Some(shared.config.client_id.as_str())
        && field(fields, "client_secret") == Some(shared.config.client_secret.as_str())
}

fn invalid_client() -> Response<Full<Bytes>> {
    json(
        StatusCode::UNAUTHORIZED,
        r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
    )
}

fn password_grant(shared: &Shared, fields: &[(String, String)]) -> Response<Full<Bytes>> {
    if !client_ok(shared, fields) {
        return invalid_client();
    }
    if field(fields, "username") != Some(shared.config.username.as_str())
        || field(fields, "password") != Some(shared.config.password.as_str())
    {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_grant","error_description":"Invalid username and password combination"}"#,
        );
    }
    issue_tokens(shared, &mut shared.state())
}

fn refresh_grant(shared: &Shared, fields: &[(String, String)]) -> Response<Full<Bytes>> {
    if !client_ok(shared, fields) {
        return invalid_client();
    }
    let Some(token) = field(fields, "refresh_token") else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_request","error_description":"The request is missing the refresh_token parameter."}"#,
        );
    };
    let mut state = shared.state();
    // Using a refresh token consumes it, whether or not it is still valid.
    match state.refresh_tokens.remove(token) {
        Some(expires) if Instant::now() < expires => issue_tokens(shared, &mut state),
        _ => json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_grant","error_description":"The refresh token is invalid."}"#,
        ),
    }
}

fn random_token(prefix: &str) -> String {
    let mut token = String::with_capacity(prefix.len() + TOKEN_LEN);
    token.push_str(prefix);
    token.extend(std::iter::repeat_with(fastrand::alphanumeric).take(TOKEN_LEN));
    token
}

#[derive(Serialize)]
struct TokenResponse<'a> {
    token_type: &'a str,
    expires_in: u64,
    access_token: &'a str,
    refresh_token: &'a str,
}

fn issue_tokens(shared: &Shared, state: &mut State) -> Response<Full<Bytes>> {
    let now = Instant::now();
    let access = random_token("mock_at_");
    let refresh = random_token("mock_rt_");
    state
        .access_tokens
        .insert(access.clone(), now + shared.config.access_lifetime);
    state
        .refresh_tokens
        .insert(refresh.clone(), now + shared.config.refresh_lifetime);
    state.issued_access.push(access.clone());
    state.issued_refresh.push(refresh.clone());
    let body = TokenResponse {
        token_type: "Bearer",
        expires_in: shared.config.access_lifetime.as_secs().max(1),
        access_token: &access,
        refresh_token: &refresh,
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => json(StatusCode::OK, bytes),
        Err(_) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"code":500,"message":"Internal Server Error"}"#,
        ),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api<'a> {
    Banks,
    Bank(&'a str),
    Payments,
    PaymentList,
    Payment(&'a str),
    Dropin,
}

impl<'a> Api<'a> {
    fn route(path: &'a str) -> Option<Self> {
        let item = |rest: &'a str| (!rest.is_empty() && !rest.contains('/')).then_some(rest);
        match path {
            "/banks" => Some(Api::Banks),
            "/v2/payments" => Some(Api::Payments),
            "/payments" => Some(Api::PaymentList),
            "/dropin" => Some(Api::Dropin),
            _ => {
                if let Some(id) = path.strip_prefix("/banks/") {
                    item(id).map(Api::Bank)
                } else {
                    path.strip_prefix("/payments/")
                        .and_then(item)
                        .map(Api::Payment)
                }
            }
        }
    }

    fn method(self) -> (Method, &'static str) {
        match self {
            Api::Payments | Api::Dropin => (Method::POST, "POST"),
            _ => (Method::GET, "GET"),
        }
    }
}

const BANKS: &str = r#"[{"id":"mock-bank-barclays","name":"Mock Barclays","country":"GB"},{"id":"mock-bank-hsbc","name":"Mock HSBC","country":"GB"},{"id":"mock-bank-monzo","name":"Mock Monzo","country":"GB"}]"#;

async fn api<B>(shared: &Shared, parts: &Parts, body: B, route: Api<'_>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = match route {
        Api::Payments | Api::Dropin => Some(collect(body).await),
        _ => None,
    };
    if let Some(Err(BodyError::Failed)) = body {
        // The client went away mid-body: nothing was received, nothing is counted.
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"code":400,"message":"Bad Request"}"#,
        );
    }
    let authorization = header(parts, AUTHORIZATION);
    let authorized = {
        let mut state = shared.state();
        state.api_authorizations.push(authorization.clone());
        if let (Api::Payments, Some(Ok(bytes))) = (route, &body) {
            state.payment_bodies.push(bytes.clone());
        }
        !shared.reject_all_tokens.load(Ordering::SeqCst)
            && bearer(authorization.as_deref())
                .and_then(|token| state.access_tokens.get(token))
                .is_some_and(|expires| Instant::now() < *expires)
    };
    shared.api_calls.fetch_add(1, Ordering::SeqCst);

    if !authorized {
        shared.unauthorized.fetch_add(1, Ordering::SeqCst);
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            r#"{"code":401,"message":"Unauthorized"}"#,
        );
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let bytes = match body {
        Some(Err(_)) => return payload_too_large(),
        Some(Ok(bytes)) => bytes,
        None => Bytes::new(),
    };
    match route {
        Api::Banks => json(StatusCode::OK, BANKS),
        Api::Bank(id) => {
            let banks: serde_json::Value = serde_json::from_str(BANKS).unwrap_or_default();
            let bank = banks
                .as_array()
                .and_then(|banks| banks.iter().find(|bank| bank["id"] == id));
            match bank {
                Some(bank) => json(StatusCode::OK, bank.to_string()),
                None => not_found(),
            }
        }
        Api::Payments => {
            let id = uuid_like();
            let created = serde_json::json!({
                "id": id,
                "checkoutUrl": format!("https://checkout.sandbox.volt.io/{id}"),
                "digest": payment_digest(&bytes),
                "size": bytes.len(),
            });
            shared.state().payments.push(created.clone());
            json(StatusCode::CREATED, created.to_string())
        }
        Api::PaymentList => {
            let list = serde_json::Value::Array(shared.state().payments.clone());
            json(StatusCode::OK, list.to_string())
        }
        Api::Payment(id) => {
            let payment = shared
                .state()
                .payments
                .iter()
                .find(|payment| payment["id"] == id)
                .cloned();
            match payment {
                Some(payment) => json(StatusCode::OK, payment.to_string()),
                None => not_found(),
            }
        }
        Api::Dropin => {
            let created = serde_json::json!({ "id": uuid_like() });
            json(StatusCode::CREATED, created.to_string())
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
fn bearer(value: Option<&str>) -> Option<&str> {
    let (scheme, token) = value?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn uuid_like() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        fastrand::u8(8..12),
        fastrand::u16(..0x1000),
        fastrand::u64(..1 << 48),
    )
}

fn with_content_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    with_content_type(status, "application/json", body)
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        r#"{"code":405,"message":"Method Not Allowed"}"#,
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn payload_too_large() -> Response<Full<Bytes>> {
    json(
        StatusCode::PAYLOAD_TOO_LARGE,
        r#"{"code":413,"message":"Payload Too Large"}"#,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::tests::{
        FORM, assert_error, banks, form, login, password_request, payment, refresh_request, send,
    };
    use crate::mock::{CLIENT_ID, CLIENT_SECRET, MockVolt, PASSWORD, USERNAME};
    use std::time::Duration;

    #[tokio::test]
    async fn password_grant_issues_bearer_tokens() {
        let mock = MockVolt::builder().in_process();
        let answer = send(&mock, password_request()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
        let body = answer.json();
        let object = body.as_object().expect("object");
        assert_eq!(object.len(), 4);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        let access = body["access_token"].as_str().expect("access_token");
        let refresh = body["refresh_token"].as_str().expect("refresh_token");
        assert!(access.starts_with("mock_at_") && access.len() == 8 + TOKEN_LEN);
        assert!(refresh.starts_with("mock_rt_") && refresh.len() == 8 + TOKEN_LEN);
        assert!(access[8..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(mock.issued_access_tokens(), vec![access.to_owned()]);
        assert_eq!(mock.issued_refresh_tokens(), vec![refresh.to_owned()]);
        assert_eq!(mock.oauth_calls(), 1);
        assert_eq!(mock.password_grants(), 1);
        assert_eq!(mock.refresh_grants(), 0);
        assert_eq!(mock.max_oauth_in_flight(), 1);

        let requests = mock.oauth_requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].grant_type.as_deref(), Some("password"));
        assert_eq!(requests[0].content_type.as_deref(), Some(FORM));
        assert_eq!(requests[0].accept, None);
        assert_eq!(requests[0].field("username"), Some(USERNAME));
        assert_eq!(requests[0].fields.len(), 5);

        // Each grant issues fresh tokens.
        let (second, _) = login(&mock).await;
        assert_ne!(second, access);
    }

    #[tokio::test]
    async fn bad_credentials_are_rejected() {
        let mock = MockVolt::builder().in_process();
        let wrong_secret = form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", "nope"),
            ("username", USERNAME),
            ("password", PASSWORD),
            ("grant_type", "password"),
        ]);
        let answer = send(&mock, wrong_secret).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
        assert_eq!(
            answer.text(),
            r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#
        );

        let wrong_password = form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("username", USERNAME),
            ("password", "nope"),
            ("grant_type", "password"),
        ]);
        let answer = send(&mock, wrong_password).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_grant");
        assert_eq!(
            answer.json()["error_description"],
            "Invalid username and password combination"
        );

        // Wrong client and wrong password: the client is checked first.
        let both = form(&[
            ("client_id", "other"),
            ("client_secret", CLIENT_SECRET),
            ("username", USERNAME),
            ("password", "nope"),
            ("grant_type", "password"),
        ]);
        assert_error(
            &send(&mock, both).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );
        assert!(mock.issued_access_tokens().is_empty());
        assert_eq!(mock.password_grants(), 3);
        assert_eq!(mock.oauth_calls(), 3);
    }

    #[tokio::test]
    async fn refresh_tokens_rotate() {
        let mock = MockVolt::builder().in_process();
        let (access, refresh) = login(&mock).await;

        let answer = send(&mock, refresh_request(&refresh)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let body = answer.json();
        assert_eq!(body["token_type"], "Bearer");
        let new_access = body["access_token"].as_str().expect("access_token");
        let new_refresh = body["refresh_token"].as_str().expect("refresh_token");
        assert_ne!(new_access, access);
        assert_ne!(new_refresh, refresh);
        assert_eq!(mock.issued_refresh_tokens().len(), 2);

        // Reusing the consumed refresh token fails.
        let answer = send(&mock, refresh_request(&refresh)).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_grant");
        assert_eq!(
            answer.text(),
            r#"{"error":"invalid_grant","error_description":"The refresh token is invalid."}"#
        );

        // Both access tokens still work; the new refresh token works once.
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);
        assert_eq!(send(&mock, banks(Some(new_access))).await.status, 200);
        assert_eq!(send(&mock, refresh_request(new_refresh)).await.status, 200);
        assert_eq!(mock.refresh_grants(), 3);
        assert_eq!(mock.password_grants(), 1);
    }

    #[tokio::test]
    async fn refresh_requires_client_credentials_and_a_known_token() {
        let mock = MockVolt::builder().in_process();
        let (_, refresh) = login(&mock).await;

        let without_client = form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)]);
        assert_error(
            &send(&mock, without_client).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );
        // A rejected client does not consume the refresh token.
        let unknown = refresh_request("mock_rt_unknown");
        assert_error(
            &send(&mock, unknown).await,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
        );
        let missing = form(&[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ]);
        assert_error(
            &send(&mock, missing).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
        assert_eq!(send(&mock, refresh_request(&refresh)).await.status, 200);
    }

    #[tokio::test]
    async fn json_bodies_are_accepted() {
        let mock = MockVolt::builder().in_process();
        let body = serde_json::json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "username": USERNAME,
            "password": PASSWORD,
            "grant_type": "password",
        });
        let request = Request::post("http://127.0.0.1:9/oauth")
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let answer = send(&mock, request).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let refresh = answer.json()["refresh_token"]
            .as_str()
            .expect("refresh_token")
            .to_owned();

        let request = Request::post("/oauth")
            .header(CONTENT_TYPE, "application/json; charset=utf-8")
            .body(Full::new(Bytes::from(
                serde_json::json!({
                    "grant_type": "refresh_token",
                    "refresh_token": refresh,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                })
                .to_string(),
            )))
            .expect("request");
        assert_eq!(send(&mock, request).await.status, StatusCode::OK);

        let requests = mock.oauth_requests();
        assert_eq!(
            requests[0].content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(requests[0].accept.as_deref(), Some("application/json"));
        assert_eq!(requests[0].field("password"), Some(PASSWORD));
        assert_eq!(requests[1].grant_type.as_deref(), Some("refresh_token"));
        assert_eq!(mock.password_grants(), 1);
        assert_eq!(mock.refresh_grants(), 1);

        // Non-string JSON values are recorded as JSON text (and do not match).
        let request = Request::post("/oauth")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"grant_type":"password","client_id":5,"client_secret":null}"#,
            )))
            .expect("request");
        assert_error(
            &send(&mock, request).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );
        let last = mock.oauth_requests().pop().expect("recorded");
        assert_eq!(last.field("client_id"), Some("5"));
        assert_eq!(last.field("client_secret"), None);
    }

    #[tokio::test]
    async fn json_fields_are_recorded_in_the_order_sent() {
        let mock = MockVolt::builder().in_process();
        let request = Request::post("/oauth")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"username":"u","grant_type":"password","client_id":"a","client_id":"b","scope":null}"#,
            )))
            .expect("request");
        send(&mock, request).await;
        let recorded = mock.oauth_requests().pop().expect("recorded");
        // A repeated name keeps its first place and its last value, as a JSON object does.
        let expected = [
            ("username", "u"),
            ("grant_type", "password"),
            ("client_id", "b"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        assert_eq!(recorded.fields, expected);
    }

    #[tokio::test]
    async fn malformed_oauth_requests() {
        let mock = MockVolt::builder().in_process();
        let cases: Vec<(Request<Full<Bytes>>, StatusCode, &str)> = vec![
            (
                form(&[("grant_type", "client_credentials")]),
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
            ),
            (
                form(&[("client_id", CLIENT_ID)]),
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
            ),
            (
                Request::post("/oauth")
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from_static(b"{\"grant_type\":")))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                Request::post("/oauth")
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from_static(b"[1,2]")))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                Request::post("/oauth")
                    .header(CONTENT_TYPE, "text/plain")
                    .body(Full::new(Bytes::from_static(b"grant_type=password")))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                Request::post("/oauth")
                    .body(Full::new(Bytes::from_static(b"grant_type=password")))
                    .expect("request"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
        ];
        let count = cases.len();
        for (request, status, error) in cases {
            assert_error(&send(&mock, request).await, status, error);
        }

        let get = Request::get("/oauth")
            .body(Full::default())
            .expect("request");
        let answer = send(&mock, get).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer.headers[ALLOW], "POST");

        let huge = Request::post("/oauth")
            .header(CONTENT_TYPE, FORM)
            .body(Full::new(Bytes::from(vec![b'a'; BODY_LIMIT + 1])))
            .expect("request");
        assert_eq!(
            send(&mock, huge).await.status,
            StatusCode::PAYLOAD_TOO_LARGE
        );

        assert_eq!(mock.oauth_calls(), count + 2);
        assert_eq!(mock.oauth_requests().len(), count + 2);
        assert!(mock.issued_access_tokens().is_empty());
    }

    #[tokio::test]
    async fn banks_require_a_valid_token() {
        let mock = MockVolt::builder().in_process();
        let answer = send(&mock, banks(None)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.headers[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(answer.text(), r#"{"code":401,"message":"Unauthorized"}"#);
        assert_eq!(send(&mock, banks(Some("made-up"))).await.status, 401);

        let (access, _) = login(&mock).await;
        let answer = send(&mock, banks(Some(&access))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
        let list = answer.json();
        let list = list.as_array().expect("array");
        assert_eq!(list.len(), 3);
        assert!(
            list.iter()
                .all(|bank| bank["id"].is_string() && bank["name"].is_string())
        );
        assert_eq!(list[0]["country"], "GB");

        // Absolute URI and lower-case scheme work too.
        let request = Request::get("http://127.0.0.1:9/banks")
            .header(AUTHORIZATION, format!("bearer {access}"))
            .body(Full::default())
            .expect("request");
        assert_eq!(send(&mock, request).await.status, StatusCode::OK);

        assert_eq!(mock.api_calls(), 4);
        assert_eq!(mock.unauthorized(), 2);
        assert_eq!(
            mock.api_authorizations(),
            vec![
                None,
                Some("Bearer made-up".to_owned()),
                Some(format!("Bearer {access}")),
                Some(format!("bearer {access}")),
            ]
        );

        // Routing: wrong method and unknown path.
        let post = Request::post("/banks")
            .body(Full::default())
            .expect("request");
        assert_eq!(send(&mock, post).await.status, 405);
        let other = Request::get("/refunds")
            .body(Full::default())
            .expect("request");
        assert_eq!(send(&mock, other).await.status, 404);
        assert_eq!(mock.api_calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire_on_tokio_clock() {
        let mock = MockVolt::builder()
            .access_token_lifetime(Duration::from_secs(60))
            .refresh_token_lifetime(Duration::from_secs(120))
            .in_process();
        let answer = send(&mock, password_request()).await;
        assert_eq!(answer.json()["expires_in"], 60);
        let access = answer.json()["access_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let refresh = answer.json()["refresh_token"]
            .as_str()
            .expect("token")
            .to_owned();

        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 401);

        // t = 60: the refresh token (valid until 120) still works.
        let answer = send(&mock, refresh_request(&refresh)).await;
        assert_eq!(answer.status, StatusCode::OK);
        let access = answer.json()["access_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let refresh = answer.json()["refresh_token"]
            .as_str()
            .expect("token")
            .to_owned();
        assert_eq!(send(&mock, banks(Some(&access))).await.status, 200);

        // t = 180: the new refresh token (issued at 60) has expired.
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_error(
            &send(&mock, refresh_request(&refresh)).await,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
        );
        assert_eq!(mock.unauthorized(), 1);
    }

    #[tokio::test]
    async fn payments_answer_digest_and_record_bodies() {
        assert_eq!(payment_digest(b""), "cbf29ce484222325");
        assert_eq!(payment_digest(b"a"), "af63dc4c8601ec8c");
        assert_eq!(payment_digest(b"foobar"), "85944171f73967e8");

        let mock = MockVolt::builder().in_process();
        let first: &'static [u8] = br#"{"amount":100,"currencyCode":"GBP"}"#;
        let answer = send(&mock, payment(None, first)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);

        let (access, _) = login(&mock).await;
        let second: &'static [u8] = br#"{"amount":250,"currencyCode":"EUR"}"#;
        let answer = send(&mock, payment(Some(&access), second)).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        let body = answer.json();
        let id = body["id"].as_str().expect("id");
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_eq!(
            body["checkoutUrl"],
            format!("https://checkout.sandbox.volt.io/{id}")
        );
        assert_eq!(body["digest"], payment_digest(second));
        assert_eq!(body["size"], second.len());

        assert_eq!(
            mock.payment_bodies(),
            vec![Bytes::from_static(first), Bytes::from_static(second)]
        );
        assert_eq!(mock.api_calls(), 2);
        assert_eq!(mock.unauthorized(), 1);

        let get = Request::get("/v2/payments")
            .body(Full::default())
            .expect("request");
        assert_eq!(send(&mock, get).await.status, 405);
        let huge = Request::post("/v2/payments")
            .header(AUTHORIZATION, format!("Bearer {access}"))
            .body(Full::new(Bytes::from(vec![b'x'; BODY_LIMIT + 1])))
            .expect("request");
        assert_eq!(
            send(&mock, huge).await.status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(mock.payment_bodies().len(), 2);
    }
}
