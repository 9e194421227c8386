//! Prints a Volt bearer token, from the `VOLT_*` variables, for use with curl:
//!
//! ```text
//! export VOLT_CLIENT_ID=… VOLT_CLIENT_SECRET=… VOLT_USERNAME=… VOLT_PASSWORD=… VOLT_ENVIRONMENT=sandbox
//! TOKEN=$(cargo run -q --example token --features client) &&
//!   curl -H "Authorization: Bearer $TOKEN" https://api.sandbox.volt.io/banks
//! ```
//!
//! Only the token goes to stdout; errors go to stderr, with exit status 2 for
//! a configuration error and 1 when no token could be had.

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;

use volt_auth::VoltAuthLayer;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let auth = match VoltAuthLayer::from_env().and_then(|builder| builder.build_default()) {
        Ok(auth) => auth,
        Err(error) => {
            eprintln!("error: {error}");
            eprintln!(
                "set VOLT_CLIENT_ID, VOLT_CLIENT_SECRET, VOLT_USERNAME, VOLT_PASSWORD and \
                 VOLT_ENVIRONMENT (sandbox or production) or VOLT_BASE_URL"
            );
            return ExitCode::from(2);
        }
    };
    let token = match auth.access_token().await {
        Ok(token) => token,
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", token.expose_secret()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: could not write the token: {error}");
            ExitCode::FAILURE
        }
    }
}
