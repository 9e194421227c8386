//! The main job, end to end: authenticate, call `/banks` for a few token
//! lifetimes, and report what it cost in `/oauth` calls.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! With no `VOLT_*` variables it starts the embedded mock Volt server with
//! one-second tokens; with `VOLT_CLIENT_ID`, `VOLT_CLIENT_SECRET`,
//! `VOLT_USERNAME`, `VOLT_PASSWORD` and `VOLT_ENVIRONMENT` (or `VOLT_BASE_URL`)
//! set, it calls that Volt environment instead.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use volt_auth::VoltAuthLayer;
use volt_auth::client::https_client;
use volt_auth::mock::MockVolt;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // HTTPS for Volt, plain HTTP for the mock on loopback.
    let client = https_client()?;

    let (mock, builder, run_for) = if std::env::var_os("VOLT_CLIENT_ID").is_some() {
        (None, VoltAuthLayer::from_env()?, Duration::from_secs(3))
    } else {
        let mock = MockVolt::builder()
            .access_token_lifetime(Duration::from_secs(1))
            .refresh_token_lifetime(Duration::from_secs(2))
            .start()
            .await?;
        println!("mock Volt server listening on {}", mock.url());
        let builder = VoltAuthLayer::builder(mock.credentials()).base_url(&mock.url());
        (Some(mock), builder, Duration::from_millis(3500))
    };

    // `/oauth` requests travel through the same client as the API calls.
    let auth = builder.build(client.clone())?;
    let mut api = ServiceBuilder::new().layer(auth.clone()).service(client);
    let banks = format!("{}banks", auth.endpoint().base_uri());

    let started = tokio::time::Instant::now();
    let mut calls = 0u32;
    let mut revoked = false;
    while started.elapsed() < run_for {
        if let (Some(mock), false) = (&mock, revoked) {
            if started.elapsed() > run_for / 2 {
                // Volt may revoke a token early: the layer recovers from the 401.
                mock.revoke_access_tokens();
                revoked = true;
                println!("revoked every access token on the server");
            }
        }
        let request = http::Request::get(&banks).body(Full::default())?;
        let response = api.ready().await?.call(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        calls += 1;
        if calls == 1 {
            println!("GET /banks -> {status}: {}", String::from_utf8_lossy(&body));
        }
        if !status.is_success() {
            return Err(format!("GET /banks answered {status}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stats = auth.stats();
    println!(
        "made {calls} API calls in {:.1} s; they cost {} /oauth calls: {} password grant(s), {} refresh grant(s) ({} rejected, falling back to the password); {} request(s) replayed after a 401",
        started.elapsed().as_secs_f64(),
        stats.password.attempts() + stats.refresh.attempts(),
        stats.password.attempts(),
        stats.refresh.attempts(),
        stats.refresh.rejected,
        stats.replays,
    );
    if let Some(remaining) = stats.remaining {
        println!(
            "the current token expires in {:.1} s",
            remaining.as_secs_f64()
        );
    }
    if let Some(mock) = &mock {
        println!(
            "the mock saw {} /oauth calls and answered {} API calls with 401",
            mock.oauth_calls(),
            mock.unauthorized()
        );
    }
    Ok(())
}
