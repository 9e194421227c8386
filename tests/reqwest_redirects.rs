//! Redirects that the `reqwest::Client` underneath `VoltAuthMiddleware` and
//! `ReqwestTransport` follows on its own. Everything binds 127.0.0.1.
#![cfg(feature = "reqwest")]

use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;
use tower::{Service, ServiceBuilder, ServiceExt};
use volt_auth::mock::MockVolt;
use volt_auth::reqwest::ReqwestTransport;
use volt_auth::{Credentials, GrantType, VoltAuthLayer};

/// A server on 127.0.0.1 that answers every request with `status` and
/// `Location: {location}{path}`, recording each request's head.
struct Redirector {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Redirector {
    fn start(status: &'static str, location: String) -> Redirector {
        Self::answering(move |path| {
            let head = format!("HTTP/1.1 {status}\r\nLocation: {location}{path}\r\n");
            (head, String::new())
        })
    }

    /// A server that answers a request for `path` with `answer(path)`: the
    /// status line and headers, and the body.
    fn answering(answer: impl Fn(&str) -> (String, String) + Send + Sync + 'static) -> Redirector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        let answer = Arc::new(answer);
        // Blocking threads: the server needs no runtime of the test's.
        std::thread::spawn(move || {
            loop {
                let Ok((mut socket, _)) = listener.accept() else {
                    return;
                };
                let seen = seen.clone();
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read the head, then the body by Content-Length.
                    let head_end = loop {
                        let n = socket.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let length = head
                        .lines()
                        .find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse::<usize>().ok())
                                .flatten()
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let n = socket.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    seen.lock().unwrap().push(head);
                    let (head, body) = answer(&path);
                    let response = format!(
                        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes());
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Redirector { url, heads }
    }

    fn authorizations(&self) -> Vec<Option<String>> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .map(|head| {
                head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("authorization")
                        .then(|| value.trim().to_owned())
                })
            })
            .collect()
    }
}

/// An allowed origin redirects to another origin (here the Volt mock itself on
/// its own port). reqwest strips `Authorization` on the cross-origin hop, so
/// the 401 comes from a server that never saw token T: it says nothing about
/// T, which is neither refreshed nor replayed with.
#[tokio::test]
async fn a_401_from_a_redirect_target_that_got_no_token_does_not_invalidate_it() {
    let volt = MockVolt::start().await.unwrap();
    let redirector = Redirector::start("302 Found", volt.url());
    let client = reqwest::Client::new();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .allow_origin(&redirector.url)
        .build(ReqwestTransport::new(client.clone()))
        .unwrap();
    let api = reqwest_middleware::ClientBuilder::new(client)
        .with(auth.middleware())
        .build();

    let response = api
        .get(format!("{}/banks", redirector.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.url().as_str(), format!("{}/banks", volt.url()));

    let token = volt.issued_access_tokens()[0].clone();
    // The allowed origin got the token once; the redirect target got none.
    assert_eq!(
        redirector.authorizations(),
        vec![Some(format!("Bearer {token}"))]
    );
    assert_eq!(volt.api_authorizations(), vec![None]);
    // Token T was never rejected: no forced refresh, no replay.
    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(auth.stats().replays, 0);
}

/// The same through a tower stack: `VoltAuth` over `ReqwestTransport`, whose
/// client follows the redirect. The 401 of the target that got no token
/// neither forces a refresh nor is replayed; the token keeps serving.
#[tokio::test]
async fn a_401_from_a_redirect_target_is_not_the_tokens_through_a_tower_stack() {
    let volt = MockVolt::start().await.unwrap();
    let redirector = Redirector::start("302 Found", volt.url());
    let transport = ReqwestTransport::new(reqwest::Client::new());
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .allow_origin(&redirector.url)
        .build(transport.clone())
        .unwrap();
    let mut api = ServiceBuilder::new().layer(auth.clone()).service(transport);
    let get = |url: String| {
        http::Request::get(format!("{url}/banks"))
            .body(reqwest::Body::from(""))
            .unwrap()
    };

    let redirected = api.ready().await.unwrap().call(get(redirector.url.clone()));
    assert_eq!(redirected.await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let token = volt.issued_access_tokens()[0].clone();
    assert_eq!(
        redirector.authorizations(),
        vec![Some(format!("Bearer {token}"))]
    );
    assert_eq!(volt.api_authorizations(), vec![None]);
    assert_eq!((volt.oauth_calls(), auth.stats().replays), (1, 0));

    // Straight to Volt, the token still serves.
    let direct = api.ready().await.unwrap().call(get(volt.url()));
    assert_eq!(direct.await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        volt.api_authorizations()[1],
        Some(format!("Bearer {token}"))
    );
    assert_eq!(volt.oauth_calls(), 1);
}

/// `/oauth` answers 302 to another origin, which reqwest follows with a GET
/// (without the form) and where a token is handed out. It is not Volt's
/// answer to the grant: no token from it is cached or sent to the API.
#[tokio::test]
async fn a_token_from_another_origin_after_a_redirect_is_not_taken() {
    let volt = MockVolt::start().await.unwrap();
    let foreign = Redirector::answering(|_| {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n".to_owned();
        let body = r#"{"access_token":"foreign","token_type":"Bearer","expires_in":3600}"#;
        (head, body.to_owned())
    });
    let redirector = Redirector::start("302 Found", foreign.url.clone());
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&redirector.url)
        .build(ReqwestTransport::new(reqwest::Client::new()))
        .unwrap();

    let error = auth.access_token().await.unwrap_err();
    assert!(
        matches!(
            error,
            volt_auth::Error::InvalidResponse {
                status: StatusCode::OK,
                reason: "the answer came from another origin, after a redirect",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!error.is_rejected());
    let heads = foreign.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].starts_with("GET /oauth "), "{}", heads[0]);
    assert_eq!(redirector.heads.lock().unwrap().len(), 1);
    let stats = auth.stats();
    assert_eq!((stats.password.failed, stats.failures), (1, 1));
}

/// `/oauth` answers 301, 302 or 303 to a path of its own origin, which
/// reqwest follows with a GET, without the form. Whatever answers that GET
/// did not answer the grant: a 401 is no refusal of the credentials (the GET
/// carried none), nor a 405 a failure of the token endpoint; the grant gets
/// `Error::InvalidResponse`, backed off as any failure.
#[tokio::test]
async fn an_answer_after_a_redirect_within_the_origin_is_not_the_grants() {
    let answers = [
        (
            "401 Unauthorized",
            r#"{"code":401,"message":"Unauthorized"}"#,
        ),
        (
            "405 Method Not Allowed",
            r#"{"code":405,"message":"Method Not Allowed"}"#,
        ),
    ];
    for (status, body) in answers {
        for redirect in ["301 Moved Permanently", "302 Found", "303 See Other"] {
            let origin = Redirector::answering(move |path| match path {
                "/oauth" => (
                    format!("HTTP/1.1 {redirect}\r\nLocation: /login\r\n"),
                    String::new(),
                ),
                _ => (
                    format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"),
                    body.to_owned(),
                ),
            });
            let credentials = Credentials::new("id", "the-client-secret", "user", "the-password");
            let auth = VoltAuthLayer::builder(credentials)
                .base_url(&origin.url)
                .build(ReqwestTransport::new(reqwest::Client::new()))
                .unwrap();

            let error = auth.access_token().await.unwrap_err();
            let case = format!("{redirect}, then {status}");
            assert!(
                matches!(
                    error,
                    volt_auth::Error::InvalidResponse {
                        grant: GrantType::Password,
                        reason: "the answer came after a redirect",
                        ..
                    }
                ),
                "{case}: {error:?}"
            );
            let heads = origin.heads.lock().unwrap().clone();
            assert_eq!(heads.len(), 2, "{case}");
            assert!(heads[0].starts_with("POST /oauth "), "{case}: {}", heads[0]);
            assert!(heads[1].starts_with("GET /login "), "{case}: {}", heads[1]);
            let stats = auth.stats();
            assert_eq!(
                (stats.password.rejected, stats.password.failed),
                (0, 1),
                "{case}"
            );
        }
    }
}

/// `ReqwestTransport` over a default `reqwest::Client` (as in the README and
/// the module docs), which follows redirects: a 307 from `/oauth` is a failed
/// attempt, as with a hyper client, and the form (client secret, password)
/// is not sent again to where it points.
#[tokio::test]
async fn oauth_credentials_are_not_resent_to_the_origin_of_a_307_redirect() {
    let elsewhere = MockVolt::start().await.unwrap();
    let redirector = Redirector::start("307 Temporary Redirect", elsewhere.url());
    let client = reqwest::Client::new();
    let auth = VoltAuthLayer::builder(elsewhere.credentials())
        .base_url(&redirector.url)
        .build(ReqwestTransport::new(client))
        .unwrap();

    let _ = auth.access_token().await;

    let heads = redirector.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].starts_with("POST /oauth "), "{}", heads[0]);
    // The other origin received the password grant, secret and password included.
    let leaked = elsewhere.oauth_requests();
    let secret = leaked.iter().any(|r| r.field("client_secret").is_some());
    assert!(
        !secret,
        "{} /oauth form(s) reached another origin",
        leaked.len()
    );
    assert_eq!(elsewhere.oauth_calls(), 0);
}

/// As the README says: reqwest reports only where a chain of redirects
/// ended, so one that leaves the origin and comes back (the token removed on
/// the way, and not put back) ends in a 401 taken for the token's. It costs
/// one refresh and one replay, which meets the same 401; the forced
/// refreshes that follow are throttled.
#[tokio::test]
async fn a_redirect_chain_back_to_the_origin_costs_one_refresh_and_one_replay() {
    let volt = MockVolt::start().await.unwrap();
    let back_to = Arc::new(Mutex::new(String::new()));
    let target = back_to.clone();
    let elsewhere = Redirector::answering(move |path| {
        let location = format!("{}{path}", target.lock().unwrap());
        (
            format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\n"),
            String::new(),
        )
    });
    let away = elsewhere.url.clone();
    let origin = Redirector::answering(move |path| match path {
        "/back" => ("HTTP/1.1 401 Unauthorized\r\n".to_owned(), String::new()),
        _ => (
            format!("HTTP/1.1 302 Found\r\nLocation: {away}/back\r\n"),
            String::new(),
        ),
    });
    *back_to.lock().unwrap() = origin.url.clone();
    let client = reqwest::Client::new();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .allow_origin(&origin.url)
        // A long backoff, so that the throttle holds however slow the machine.
        .backoff(Duration::from_secs(60), Duration::from_secs(120))
        .build(ReqwestTransport::new(client.clone()))
        .unwrap();
    let api = reqwest_middleware::ClientBuilder::new(client)
        .with(auth.middleware())
        .build();
    let banks = format!("{}/banks", origin.url);

    let response = api.get(&banks).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.url().as_str(), format!("{}/back", origin.url));
    let tokens = volt.issued_access_tokens();
    assert_eq!(tokens.len(), 2);
    let bearer = |token: &str| Some(format!("Bearer {token}"));
    assert_eq!(
        origin.authorizations(),
        vec![bearer(&tokens[0]), None, bearer(&tokens[1]), None]
    );
    assert_eq!(elsewhere.authorizations(), vec![None, None]);
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(volt.refresh_grants(), 1);
    assert_eq!(auth.stats().replays, 1);

    // The next such 401 is throttled: no refresh, no replay, the token kept.
    let response = api.get(&banks).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(origin.authorizations()[4..], [bearer(&tokens[1]), None]);
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 1);
}

/// A payment (a POST, not idempotent) answered `303 See Other` (the server
/// acted on it) whose target, on the same origin, answers 401 to the token
/// reqwest carried there: the 401 is the token's, but it is not the
/// payment's answer, so the payment is not sent again. The token is dropped,
/// and the next request carries a new one; through the middleware as through
/// `VoltAuth` over `ReqwestTransport`. (A GET is replayed after a redirect, as
/// in the chain above.)
#[tokio::test]
async fn a_request_answered_by_a_redirect_is_not_replayed_after_its_targets_401() {
    for middleware in [true, false] {
        let volt = MockVolt::start().await.unwrap();
        let origin = Redirector::answering(|path| match path {
            "/v2/payments" => (
                "HTTP/1.1 303 See Other\r\nLocation: /v2/payments/1\r\n".to_owned(),
                String::new(),
            ),
            "/v2/payments/1" => ("HTTP/1.1 401 Unauthorized\r\n".to_owned(), String::new()),
            _ => ("HTTP/1.1 200 OK\r\n".to_owned(), String::new()),
        });
        let client = reqwest::Client::new();
        let auth = VoltAuthLayer::builder(volt.credentials())
            .base_url(&volt.url())
            .allow_origin(&origin.url)
            .build(ReqwestTransport::new(client.clone()))
            .unwrap();
        let api = reqwest_middleware::ClientBuilder::new(client.clone())
            .with(auth.middleware())
            .build();
        let mut tower = ServiceBuilder::new()
            .layer(auth.clone())
            .service(ReqwestTransport::new(client));
        let mut send = async |method: http::Method, path: &str, body: &'static str| {
            let url = format!("{}{path}", origin.url);
            if middleware {
                let request = api.request(method, url).body(body);
                request.send().await.unwrap().status()
            } else {
                let request = http::Request::builder()
                    .method(method)
                    .uri(url)
                    .body(reqwest::Body::from(body))
                    .unwrap();
                let service = tower.ready().await.unwrap();
                service.call(request).await.unwrap().status()
            }
        };

        let status = send(http::Method::POST, "/v2/payments", "{\"amount\":1}").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "middleware: {middleware}");
        let status = send(http::Method::GET, "/banks", "").await;
        assert_eq!(status, StatusCode::OK, "middleware: {middleware}");

        let tokens = volt.issued_access_tokens();
        assert_eq!(tokens.len(), 2, "middleware: {middleware}");
        let bearer = |token: &str| Some(format!("Bearer {token}"));
        let lines: Vec<_> = origin
            .heads
            .lock()
            .unwrap()
            .iter()
            .map(|head| head.lines().next().unwrap().to_owned())
            .collect();
        assert_eq!(
            lines,
            [
                "POST /v2/payments HTTP/1.1",
                "GET /v2/payments/1 HTTP/1.1",
                "GET /banks HTTP/1.1"
            ],
            "middleware: {middleware}"
        );
        assert_eq!(
            origin.authorizations(),
            [bearer(&tokens[0]), bearer(&tokens[0]), bearer(&tokens[1])],
            "middleware: {middleware}"
        );
        assert_eq!(auth.stats().replays, 0, "middleware: {middleware}");
        assert_eq!(volt.oauth_calls(), 2, "middleware: {middleware}");
    }
}
