//! reqwest: `VoltAuthMiddleware` in a `reqwest_middleware` client, with the
//! `/oauth` requests travelling through the same `reqwest::Client`
//! (`ReqwestTransport`), so no hyper client is needed.
//!
//! ```text
//! cargo run --example reqwest --features reqwest
//! ```
//!
//! With no `VOLT_*` variables it runs against the embedded mock server. With
//! them set it calls `GET /banks` on that Volt environment; Volt speaks https,
//! so your application must enable one of reqwest's TLS features (for example
//! `reqwest = { version = "0.13", features = ["rustls"] }`): volt-auth itself
//! enables none.

use std::process::ExitCode;

use reqwest::header::CONTENT_TYPE;
use volt_auth::VoltAuthLayer;
use volt_auth::mock::MockVolt;
use volt_auth::reqwest::ReqwestTransport;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            if format!("{error:?}").contains("https://") {
                eprintln!(
                    "note: Volt speaks https; this example's reqwest has no TLS feature. \
                     Enable one (for example `rustls`) in your application."
                );
            }
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let client = reqwest::Client::new();

    let (mock, builder) = if std::env::var_os("VOLT_CLIENT_ID").is_some() {
        (None, VoltAuthLayer::from_env()?)
    } else {
        let mock = MockVolt::start().await?;
        println!("mock Volt server listening on {}", mock.url());
        let builder = VoltAuthLayer::builder(mock.credentials()).base_url(&mock.url());
        (Some(mock), builder)
    };

    let auth = builder.build(ReqwestTransport::new(client.clone()))?;
    let api = reqwest_middleware::ClientBuilder::new(client)
        .with(auth.middleware())
        .build();
    let base = auth.endpoint().base_uri().to_string();

    let response = api.get(format!("{base}banks")).send().await?;
    println!("GET /banks -> {}", response.status());

    if let Some(mock) = &mock {
        mock.revoke_access_tokens();
        let response = api
            .post(format!("{base}v2/payments"))
            .header(CONTENT_TYPE, "application/json")
            .body(r#"{"amount":1000,"currencyCode":"EUR","type":"SERVICES","uniqueReference":"example-2"}"#)
            .send()
            .await?;
        println!(
            "POST /v2/payments after a revocation -> {} (replayed: the server saw the body {} times)",
            response.status(),
            mock.payment_bodies().len()
        );
        println!(
            "/oauth calls through reqwest: {} ({} password, {} refresh)",
            mock.oauth_calls(),
            mock.password_grants(),
            mock.refresh_grants()
        );
    }
    Ok(())
}
