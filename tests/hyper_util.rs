//! One `hyper_util::client::legacy::Client` carries both the API calls and the
//! `/oauth` requests (no second HTTP stack), against the mock server over TCP
//! on 127.0.0.1.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use volt_auth::mock::{MockVolt, payment_digest};
use volt_auth::{VoltAuth, VoltAuthLayer};

type HyperClient = Client<HttpConnector, Full<Bytes>>;

const PAYMENT: &str =
    r#"{"amount":500,"currencyCode":"GBP","type":"BILL","uniqueReference":"inv-7"}"#;

async fn setup() -> (MockVolt, VoltAuthLayer, VoltAuth<HyperClient>) {
    let volt = MockVolt::start().await.unwrap();
    let client: HyperClient = Client::builder(TokioExecutor::new()).build_http();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(client.clone())
        .unwrap();
    let api = ServiceBuilder::new().layer(auth.clone()).service(client);
    (volt, auth, api)
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

fn get(volt: &MockVolt, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{}{path}", volt.url()))
        .body(Full::default())
        .unwrap()
}

fn pay(volt: &MockVolt) -> Request<Full<Bytes>> {
    Request::post(format!("{}/v2/payments", volt.url()))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(PAYMENT.as_bytes())))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_carries_the_api_calls_and_one_password_grant() {
    let (volt, auth, mut api) = setup().await;
    for _ in 0..10 {
        let response = api
            .ready()
            .await
            .unwrap()
            .call(get(&volt, "/banks"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let api = api.clone();
            let request = get(&volt, "/banks");
            tokio::spawn(async move { api.oneshot(request).await.unwrap().status() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }

    assert_eq!(volt.oauth_calls(), 1);
    assert_eq!(volt.password_grants(), 1);
    assert_eq!(volt.api_calls(), 60);
    let token = &volt.issued_access_tokens()[0];
    assert_eq!(volt.api_authorizations(), vec![bearer(token); 60]);
    assert_eq!(auth.stats().password.succeeded, 1);
    assert_eq!(auth.stats().refresh.attempts(), 0);
}

#[tokio::test]
async fn a_revoked_token_is_renewed_once_and_the_payment_replayed() {
    let (volt, auth, mut api) = setup().await;
    let response = api
        .ready()
        .await
        .unwrap()
        .call(get(&volt, "/banks"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    volt.revoke_access_tokens();

    let response = api.ready().await.unwrap().call(pay(&volt)).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let created: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(created["digest"], payment_digest(PAYMENT.as_bytes()));

    assert_eq!(
        volt.payment_bodies(),
        vec![Bytes::from(PAYMENT), Bytes::from(PAYMENT)]
    );
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(volt.password_grants(), 1);
    assert_eq!(volt.refresh_grants(), 1);
    assert_eq!(volt.unauthorized(), 1);
    let tokens = volt.issued_access_tokens();
    assert_eq!(
        volt.api_authorizations(),
        vec![bearer(&tokens[0]), bearer(&tokens[0]), bearer(&tokens[1])]
    );
    assert_eq!(auth.stats().replays, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_after_a_revocation_cost_one_refresh() {
    let (volt, auth, mut api) = setup().await;
    let response = api
        .ready()
        .await
        .unwrap()
        .call(get(&volt, "/banks"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    volt.revoke_access_tokens();

    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let api = api.clone();
            let request = pay(&volt);
            tokio::spawn(async move { api.oneshot(request).await.unwrap().status() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::CREATED);
    }
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(volt.refresh_grants(), 1);
    let rejected = volt.unauthorized();
    assert!(rejected >= 1);
    assert_eq!(auth.stats().replays, rejected as u64);
    assert_eq!(volt.payment_bodies().len(), 50 + rejected);
}

#[tokio::test]
async fn transport_errors_are_the_clients_and_token_errors_are_ours() {
    let (volt, _auth, mut api) = setup().await;
    volt.fail_oauth(
        1,
        StatusCode::BAD_REQUEST,
        r#"{"error":"invalid_grant","error_description":"bad credentials"}"#,
    );
    let error = api
        .ready()
        .await
        .unwrap()
        .call(get(&volt, "/banks"))
        .await
        .unwrap_err();
    let error = error.downcast_ref::<volt_auth::Error>().unwrap();
    assert!(error.is_rejected());
    assert_eq!(error.status(), Some(StatusCode::BAD_REQUEST));
    assert_eq!(volt.api_calls(), 0);

    // Another origin nobody listens on: the client's own error, untouched.
    // The port stays bound (and never listens) until the test ends: a port
    // freed here could be taken by a mock another test starts meanwhile.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = closed.local_addr().unwrap().port();
    let request = Request::get(format!("http://127.0.0.1:{port}/banks"))
        .body(Full::default())
        .unwrap();
    let error = api.ready().await.unwrap().call(request).await.unwrap_err();
    assert!(error.downcast_ref::<volt_auth::Error>().is_none());
    let error = error
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .unwrap();
    assert!(error.is_connect());
    assert_eq!(volt.oauth_calls(), 1);
    drop(closed);
}
