//! The default client (feature `client`): hyper-util + hyper-rustls, speaking
//! plain http to the mock server on 127.0.0.1 and https everywhere else.
#![cfg(feature = "client")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use volt_auth::client::{HttpsClient, https_client, https_client_with_native_roots};
use volt_auth::mock::MockVolt;
use volt_auth::{Credentials, VoltAuthLayer};

fn get(url: String) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

#[tokio::test]
async fn build_default_needs_no_transport() {
    let volt = MockVolt::start().await.unwrap();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build_default()
        .unwrap();
    assert_eq!(
        auth.access_token().await.unwrap().expose_secret(),
        volt.issued_access_tokens()[0]
    );

    let mut api = ServiceBuilder::new()
        .layer(auth.clone())
        .service(https_client().unwrap());
    for _ in 0..5 {
        let request = get(format!("{}/banks", volt.url()));
        let response = api.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(volt.password_grants(), 1);
    assert_eq!(volt.api_calls(), 5);
    assert_eq!(auth.stats().password.succeeded, 1);
}

#[tokio::test]
async fn one_client_serves_the_api_and_oauth_and_recovers_from_a_401() {
    let volt = MockVolt::start().await.unwrap();
    let client: HttpsClient = https_client().unwrap();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(client.clone())
        .unwrap();
    let mut api = ServiceBuilder::new().layer(auth.clone()).service(client);
    let response = api
        .ready()
        .await
        .unwrap()
        .call(get(format!("{}/banks", volt.url())))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    volt.revoke_access_tokens();
    let response = api
        .ready()
        .await
        .unwrap()
        .call(get(format!("{}/banks", volt.url())))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(volt.refresh_grants(), 1);
    assert_eq!(volt.api_calls(), 3);
    assert_eq!(auth.stats().replays, 1);
}

#[tokio::test]
async fn native_roots_work_too() {
    let volt = MockVolt::start().await.unwrap();
    let client = https_client_with_native_roots().unwrap();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(client.clone())
        .unwrap();
    let response = ServiceBuilder::new()
        .layer(auth)
        .service(client)
        .oneshot(get(format!("{}/banks", volt.url())))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(volt.oauth_calls(), 1);
}

#[tokio::test]
async fn https_urls_are_never_sent_in_plain_text() {
    let volt = MockVolt::start().await.unwrap();
    // The mock speaks plain http: a TLS handshake with it fails, and it never
    // sees an HTTP request.
    let https = volt.url().replacen("http://", "https://", 1);
    let error = https_client()
        .unwrap()
        .oneshot(get(format!("{https}/banks")))
        .await
        .unwrap_err();
    assert!(error.is_connect());
    assert_eq!(volt.api_calls(), 0);
    assert_eq!(volt.oauth_calls(), 0);

    // Nor is the token endpoint: the token request fails as a transport error.
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&https)
        .build_default()
        .unwrap();
    let error = auth.access_token().await.unwrap_err();
    assert!(
        matches!(error, volt_auth::Error::Transport { .. }),
        "{error:?}"
    );
    assert_eq!(volt.oauth_calls(), 0);
}

/// How long the idle-closing server keeps an idle connection: AWS's
/// Application Load Balancer's default idle timeout.
const SERVER_IDLE: Duration = Duration::from_secs(60);

/// What the idle-closing server saw.
#[derive(Clone, Default)]
struct Seen {
    connections: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    closed_on_arrival: Arc<AtomicUsize>,
}

/// A keep-alive HTTP/1.1 server on 127.0.0.1 that closes a connection once it
/// has been idle for `idle` ([`SERVER_IDLE`], as load balancers do). It
/// notices when the next request arrives and closes the connection then,
/// unanswered: what a client sees when its request crosses the server's close
/// on the wire.
/// Every request is answered `200` with a token response (`token-1`,
/// `token-2`, …), so it serves `/oauth` and API calls alike. Its timing is
/// tokio's clock, so paused in `start_paused` tests.
async fn idle_closing_server(idle: Duration) -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Seen::default();
    let server = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            server.connections.fetch_add(1, Ordering::SeqCst);
            let seen = server.clone();
            let idle_since = Arc::new(Mutex::new(Instant::now()));
            let service = service_fn(move |_: Request<Incoming>| {
                let seen = seen.clone();
                let idle_since = Arc::clone(&idle_since);
                async move {
                    let mut idle_since = idle_since.lock().unwrap();
                    if idle_since.elapsed() >= idle {
                        seen.closed_on_arrival.fetch_add(1, Ordering::SeqCst);
                        // A service error makes hyper close the connection
                        // without writing anything.
                        return Err("idle timeout");
                    }
                    *idle_since = Instant::now();
                    let n = seen.answered.fetch_add(1, Ordering::SeqCst) + 1;
                    let body = format!(
                        r#"{{"access_token":"token-{n}","token_type":"Bearer","expires_in":3600,"refresh_token":"refresh-{n}"}}"#
                    );
                    Ok(http::Response::builder()
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap())
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (url, seen)
}

#[tokio::test(start_paused = true)]
async fn idle_connections_are_reused_until_a_load_balancer_may_have_closed_them() {
    let (url, seen) = idle_closing_server(SERVER_IDLE).await;
    let client = https_client().unwrap();
    let banks = || get(format!("{url}/banks"));
    let response = client.clone().oneshot(banks()).await.unwrap();
    response.into_body().collect().await.unwrap();

    tokio::time::sleep(Duration::from_secs(20)).await;
    let response = client.clone().oneshot(banks()).await.unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);

    // hyper-util's default pool keeps it for 90 s: the request would go out
    // on it and fail with `IncompleteMessage`, not sent again.
    tokio::time::sleep(SERVER_IDLE + Duration::from_secs(10)).await;
    let response = client.oneshot(banks()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.closed_on_arrival.load(Ordering::SeqCst), 0);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    assert_eq!(seen.answered.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn an_oauth_request_after_a_minute_idle_goes_over_a_new_connection() {
    let (url, seen) = idle_closing_server(SERVER_IDLE).await;
    let client = https_client().unwrap();
    let auth = VoltAuthLayer::builder(Credentials::new("id", "secret", "user", "password"))
        .base_url(&url)
        .build(client.clone())
        .unwrap();
    let first = auth.access_token().await.unwrap();
    assert_eq!(first.expose_secret(), "token-1");

    // A 401 after a quiet minute: the renewal's /oauth request is the
    // client's first request since, and failed as a transport error when it
    // went out on the connection the server had closed.
    tokio::time::sleep(SERVER_IDLE + Duration::from_secs(10)).await;
    auth.reject(&first);
    let second = auth.access_token().await.unwrap();
    assert_eq!(second.expose_secret(), "token-2");
    assert_eq!(seen.closed_on_arrival.load(Ordering::SeqCst), 0);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    assert_eq!(auth.stats().refresh.succeeded, 1);
}

/// A server that closes connections idle for 5 s (Node.js's and Apache's
/// default), sooner than the pool gives them up: a refresh after 10 s idle
/// goes out on the pooled connection and meets its close, unanswered; the
/// grant is sent again at once, over a new connection, and succeeds.
#[tokio::test(start_paused = true)]
async fn an_oauth_request_crossing_a_servers_close_is_sent_again() {
    let (url, seen) = idle_closing_server(Duration::from_secs(5)).await;
    let auth = VoltAuthLayer::builder(Credentials::new("id", "secret", "user", "password"))
        .base_url(&url)
        .build(https_client().unwrap())
        .unwrap();
    let first = auth.access_token().await.unwrap();
    assert_eq!(first.expose_secret(), "token-1");

    tokio::time::sleep(Duration::from_secs(10)).await;
    auth.reject(&first);
    let second = auth.access_token().await.unwrap();
    assert_eq!(second.expose_secret(), "token-2");
    assert_eq!(seen.closed_on_arrival.load(Ordering::SeqCst), 1);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    let stats = auth.stats();
    assert_eq!((stats.refresh.succeeded, stats.refresh.failed), (1, 0));
    assert_eq!(stats.failures, 0);
}
