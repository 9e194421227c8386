//! The token without tower: `VoltAuthLayer::access_token` returns a valid
//! token from the same cache the layer's services use, for any other client.
//!
//! ```text
//! cargo run --example standalone --features client
//! ```
//!
//! With no `VOLT_*` variables it runs against the embedded mock server; with
//! them set, against that Volt environment.

use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http_body_util::Full;
use tower::BoxError;
use volt_auth::VoltAuthLayer;
use volt_auth::client::https_client;
use volt_auth::mock::MockVolt;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (_mock, builder) = if std::env::var_os("VOLT_CLIENT_ID").is_some() {
        (None, VoltAuthLayer::from_env()?)
    } else {
        let mock = MockVolt::builder()
            .access_token_lifetime(Duration::from_secs(3600))
            .start()
            .await?;
        println!("mock Volt server listening on {}", mock.url());
        let builder = VoltAuthLayer::builder(mock.credentials()).base_url(&mock.url());
        (Some(mock), builder)
    };
    // No transport argument: the layer brings its own HTTPS client for /oauth.
    let auth = builder.build_default()?;

    // Waits for the first token; later calls return the cached one at once,
    // and a refresh runs in the background before it expires.
    let token = auth.access_token().await?;
    println!("{token:?}"); // redacted
    let again = auth.access_token().await?;
    assert_eq!(token.expose_secret(), again.expose_secret());

    // Use it with any client: here hyper-util's own `request` method.
    let client = https_client()?;
    let request = http::Request::get(format!("{}banks", auth.endpoint().base_uri()))
        .header(AUTHORIZATION, token.header_value().clone()) // marked sensitive
        .body(Full::<Bytes>::default())?;
    let response = client.request(request).await?;
    println!("GET /banks -> {}", response.status());
    if response.status() == http::StatusCode::UNAUTHORIZED {
        // Revoked early: the cache drops it, and the next access_token()
        // waits for a new one.
        auth.reject(&token);
    }

    let stats = auth.stats();
    println!(
        "/oauth calls: {} password grant(s), {} refresh grant(s)",
        stats.password.attempts(),
        stats.refresh.attempts()
    );
    Ok(())
}
