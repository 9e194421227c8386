//! Configuration from the environment, and what to do when it is incomplete.
//!
//! ```text
//! VOLT_CLIENT_ID=… VOLT_CLIENT_SECRET=… VOLT_USERNAME=… VOLT_PASSWORD=… \
//! VOLT_ENVIRONMENT=sandbox cargo run --example env --features client
//! ```
//!
//! With every variable set, it authenticates and calls `GET /banks`. When one
//! is missing or invalid it says which (an unusable `VOLT_BASE_URL` by its
//! URL), lists them all and exits with status 2.

use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::Full;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use volt_auth::client::https_client;
use volt_auth::{Builder, ConfigError, Credentials, Endpoint, VoltAuthLayer};

const HELP: &str = "\
volt-auth reads its configuration from these variables:

  VOLT_CLIENT_ID      the application's client id            (required)
  VOLT_CLIENT_SECRET  the application's client secret        (required)
  VOLT_USERNAME       the API user's name                    (required)
  VOLT_PASSWORD       the API user's password                (required)
  VOLT_ENVIRONMENT    sandbox or production                  (required unless VOLT_BASE_URL is set)
  VOLT_BASE_URL       a custom base URL, e.g. a proxy or the mock server
                      (https, or http to a loopback address)
  VOLT_API            gateway (default) or global";

#[tokio::main]
async fn main() -> ExitCode {
    let builder = match configure() {
        Ok(builder) => builder,
        Err(ConfigError::MissingVariable(name)) => {
            eprintln!("{name} is unset, blank or not unicode.\n\n{HELP}");
            return ExitCode::from(2);
        }
        Err(error) => {
            eprintln!("{error}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match run(builder).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// What `VoltAuthLayer::from_env()` does, in two steps so that each part can be
/// shown. `Debug` of the credentials redacts the secret and the password.
fn configure() -> Result<Builder, ConfigError> {
    let credentials = Credentials::from_env()?;
    let endpoint = Endpoint::from_env()?;
    println!("credentials: {credentials:?}");
    println!(
        "endpoint: {} ({:?} API)",
        endpoint.base_uri(),
        endpoint.api()
    );
    Ok(VoltAuthLayer::builder(credentials).endpoint(endpoint))
}

async fn run(builder: Builder) -> Result<(), BoxError> {
    let client = https_client()?;
    let auth = builder.build(client.clone())?;
    let mut api = ServiceBuilder::new().layer(auth.clone()).service(client);
    let request = http::Request::get(format!("{}banks", auth.endpoint().base_uri()))
        .body(Full::<Bytes>::default())?;
    let response = api.ready().await?.call(request).await?;
    println!("GET /banks -> {}", response.status());
    if let Some(remaining) = auth.stats().remaining {
        println!("the token is valid for another {} s", remaining.as_secs());
    }
    Ok(())
}
