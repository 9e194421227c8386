//! The default client (feature `client`): hyper-util + hyper-rustls, speaking
//! plain http to the mock server on 127.0.0.1 and https everywhere else.
#![cfg(feature = "client")]

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tower::{Service, ServiceBuilder, ServiceExt};
use volt_auth::VoltAuthLayer;
use volt_auth::client::{HttpsClient, https_client, https_client_with_native_roots};
use volt_auth::mock::MockVolt;

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
