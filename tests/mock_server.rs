//! The mock Volt server over real TCP, spoken to the way Volt's page says:
//! form-encoded grants to `/oauth`, refresh-token rotation, bearer-protected
//! API calls.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use volt_auth::mock::{self, MockVolt};

type Http = Client<HttpConnector, Full<Bytes>>;

fn client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn oauth(client: &Http, volt: &MockVolt, fields: &[(&str, &str)]) -> (StatusCode, Value) {
    let body = serde_urlencoded::to_string(fields).unwrap();
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/oauth", volt.url()))
        .header(
            "content-type",
            "application/x-www-form-urlencoded;charset=UTF-8",
        )
        .body(Full::from(body))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

fn password_grant() -> Vec<(&'static str, &'static str)> {
    vec![
        ("client_id", mock::CLIENT_ID),
        ("client_secret", mock::CLIENT_SECRET),
        ("username", mock::USERNAME),
        ("password", mock::PASSWORD),
        ("grant_type", "password"),
    ]
}

fn refresh_grant(refresh_token: &str) -> Vec<(&str, &str)> {
    vec![
        ("client_id", mock::CLIENT_ID),
        ("client_secret", mock::CLIENT_SECRET),
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
    ]
}

async fn banks(client: &Http, volt: &MockVolt, token: &str) -> StatusCode {
    let request = Request::get(format!("{}/banks", volt.url()))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    client.request(request).await.unwrap().status()
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_is_rejected() {
    let volt = MockVolt::start().await.unwrap();
    let client = client();

    let (status, first) = oauth(&client, &volt, &password_grant()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 3600);
    let access = first["access_token"].as_str().unwrap();
    let refresh = first["refresh_token"].as_str().unwrap();
    assert_eq!(banks(&client, &volt, access).await, StatusCode::OK);

    let (status, second) = oauth(&client, &volt, &refresh_grant(refresh)).await;
    assert_eq!(status, StatusCode::OK);
    let rotated = second["refresh_token"].as_str().unwrap();
    assert_ne!(rotated, refresh);
    assert_ne!(second["access_token"], first["access_token"]);

    // The used refresh token no longer works; the rotated one does, once.
    let (status, reused) = oauth(&client, &volt, &refresh_grant(refresh)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reused["error"], "invalid_grant");
    let (status, _) = oauth(&client, &volt, &refresh_grant(rotated)).await;
    assert_eq!(status, StatusCode::OK);

    assert_eq!((volt.password_grants(), volt.refresh_grants()), (1, 3));
    assert_eq!(volt.oauth_calls(), 4);
}

#[tokio::test]
async fn wrong_credentials_and_missing_tokens_are_refused() {
    let volt = MockVolt::start().await.unwrap();
    let client = client();

    let mut wrong_secret = password_grant();
    wrong_secret[1] = ("client_secret", "not-the-secret");
    let (status, body) = oauth(&client, &volt, &wrong_secret).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );

    let mut wrong_password = password_grant();
    wrong_password[3] = ("password", "not-the-password");
    let (status, body) = oauth(&client, &volt, &wrong_password).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );

    assert_eq!(
        banks(&client, &volt, "made-up-token").await,
        StatusCode::UNAUTHORIZED
    );
    let (_, granted) = oauth(&client, &volt, &password_grant()).await;
    let access = granted["access_token"].as_str().unwrap();
    volt.revoke_access_tokens();
    assert_eq!(
        banks(&client, &volt, access).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!((volt.api_calls(), volt.unauthorized()), (2, 2));
}

/// A mock kept beyond the runtime that started it (a `static` shared by
/// several `#[tokio::test]`s, each on its own runtime): its server went with
/// that runtime, but its port stayed open, so requests were accepted by the
/// kernel and never answered, and `restart()` thought it was still
/// listening. Now the port closes with the runtime (connections are refused
/// at once), and `restart()` listens again on the caller's runtime, with the
/// same state.
#[test]
fn a_mock_whose_runtime_is_gone_refuses_connections_and_restarts() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let (volt, token) = first.block_on(async {
        let volt = MockVolt::start().await.unwrap();
        let (status, body) = oauth(&client(), &volt, &password_grant()).await;
        assert_eq!(status, StatusCode::OK);
        let token = body["access_token"].as_str().unwrap().to_owned();
        (volt, token)
    });
    let address = volt.url()["http://".len()..].to_owned();
    drop(first);

    runtime().block_on(async {
        let refused = tokio::net::TcpStream::connect(&address).await;
        assert_eq!(
            refused.map_err(|error| error.kind()).err(),
            Some(std::io::ErrorKind::ConnectionRefused),
            "the port of a mock whose runtime is gone still accepts connections"
        );
        volt.restart().await.unwrap();
        assert_eq!(volt.url(), format!("http://{address}"));
        assert_eq!(banks(&client(), &volt, &token).await, StatusCode::OK);
        assert_eq!(volt.oauth_calls(), 1);
        assert_eq!(volt.api_calls(), 1);
    });
}

/// `restart()` called from several tasks at once, on a multi-thread runtime:
/// exactly one listens, the others find it listening and return `Ok`. Each
/// used to check, then bind, then store, so that two could both find the
/// server stopped and the second bind failed with `AddrInUse`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_restarts_all_succeed() {
    let volt = std::sync::Arc::new(MockVolt::start().await.unwrap());
    let (status, body) = oauth(&client(), &volt, &password_grant()).await;
    assert_eq!(status, StatusCode::OK);
    let token = body["access_token"].as_str().unwrap().to_owned();
    for round in 0..2000 {
        volt.stop();
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
        let restarts: Vec<_> = (0..8)
            .map(|_| {
                let volt = volt.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    volt.restart().await
                })
            })
            .collect();
        for restart in restarts {
            let result = restart.await.unwrap();
            assert!(result.is_ok(), "round {round}: {result:?}");
        }
    }
    assert_eq!(banks(&client(), &volt, &token).await, StatusCode::OK);
    assert_eq!((volt.oauth_calls(), volt.api_calls()), (1, 1));
}

/// Dropping the mock while a request is held in it and another connection is
/// kept alive ends every task it spawned and closes its port: the held
/// request's client sees the connection close, and the runtime is back to the
/// tasks it had before the mock started.
#[tokio::test]
async fn dropping_the_mock_ends_its_tasks_and_connections() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let volt = MockVolt::start().await.unwrap();
    let address = volt.url()["http://".len()..].to_owned();
    // A kept-alive connection, idle after one answer.
    let (status, _) = oauth(&client(), &volt, &password_grant()).await;
    assert_eq!(status, StatusCode::OK);
    // A request held inside the server.
    let hold = volt.hold_oauth();
    let held = {
        let client = client();
        let request = Request::post(format!("{}/oauth", volt.url()))
            .body(Full::default())
            .unwrap();
        tokio::spawn(async move { client.request(request).await.map(|r| r.status()) })
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), hold.wait_for(1))
        .await
        .expect("the request is held");
    drop(volt);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(60), held)
        .await
        .expect("the held request ends")
        .unwrap();
    assert!(answer.is_err(), "{answer:?}");
    assert_eq!(hold.waiting(), 0);
    let refused = tokio::net::TcpStream::connect(&address).await;
    assert_eq!(
        refused.map_err(|error| error.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    // Aborted tasks are dropped when the runtime next gets to them.
    for _ in 0..1000 {
        if metrics.num_alive_tasks() == before {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), before);
}
