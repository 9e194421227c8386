//! One `hyper_util::client::legacy::Client` carries the API calls *and* the
//! `/oauth` requests: no second HTTP stack.
//!
//! ```text
//! cargo run --example hyper --features client
//! ```
//!
//! With no `VOLT_*` variables it runs against the embedded mock server (and
//! shows a 401 recovery); with `VOLT_CLIENT_ID`, `VOLT_CLIENT_SECRET`,
//! `VOLT_USERNAME`, `VOLT_PASSWORD` and `VOLT_ENVIRONMENT` (or `VOLT_BASE_URL`)
//! set, it calls `GET /banks` on that Volt environment.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use volt_auth::VoltAuthLayer;
use volt_auth::mock::MockVolt;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Your own hyper-util client; here over rustls (ring, Mozilla's roots),
    // speaking https, and plain http for the mock on loopback.
    // (`volt_auth::client::https_client()` builds one like it, with a connect
    // timeout added.)
    let connector = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))?
        .https_or_http()
        .enable_http1()
        .build();
    // hyper-util reuses a connection idle for up to 90 s by default; a load
    // balancer that closes idle connections after 60 s could close one under
    // a request, which then fails. Give them up sooner.
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build::<_, Full<Bytes>>(connector);

    let (mock, builder) = if std::env::var_os("VOLT_CLIENT_ID").is_some() {
        (None, VoltAuthLayer::from_env()?)
    } else {
        let mock = MockVolt::start().await?;
        println!("mock Volt server listening on {}", mock.url());
        let builder = VoltAuthLayer::builder(mock.credentials()).base_url(&mock.url());
        (Some(mock), builder)
    };

    // The same client goes to `build` (for /oauth) and under the layer.
    let auth = builder.build(client.clone())?;
    let mut api = ServiceBuilder::new().layer(auth.clone()).service(client);
    let base = auth.endpoint().base_uri().to_string();

    let request = http::Request::get(format!("{base}banks")).body(Full::default())?;
    let response = api.ready().await?.call(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!("GET /banks -> {status}: {} bytes", body.len());

    if let Some(mock) = &mock {
        // Volt may revoke a token early: the layer renews it and replays the
        // payment once, with the same body.
        mock.revoke_access_tokens();
        let payment = r#"{"amount":1000,"currencyCode":"EUR","type":"SERVICES","uniqueReference":"example-1"}"#;
        let request = http::Request::post(format!("{base}v2/payments"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(payment.as_bytes())))?;
        let response = api.ready().await?.call(request).await?;
        println!(
            "POST /v2/payments after a revocation -> {} (the server saw the body {} times)",
            response.status(),
            mock.payment_bodies().len()
        );
        println!(
            "/oauth calls on the same client: {} ({} password, {} refresh)",
            mock.oauth_calls(),
            mock.password_grants(),
            mock.refresh_grants()
        );
    }
    let stats = auth.stats();
    println!(
        "tokens obtained: {}; requests replayed after a 401: {}",
        stats.refreshes, stats.replays
    );
    Ok(())
}
