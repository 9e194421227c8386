//! A ready HTTP client for users who have none: hyper-util's legacy client
//! over hyper-rustls (ring, HTTP/1.1), with Mozilla's root certificates
//! ([`https_client`]) or the platform's ([`https_client_with_native_roots`]).
//!
//! It speaks `https`, and plain `http` too (for the mock server on loopback,
//! or a proxy you chose with
//! [`Endpoint::custom_insecure`](crate::Endpoint::custom_insecure)). One
//! client can carry both the API calls and the `/oauth` requests;
//! [`Builder::build_default`] makes one for `/oauth` when you do not pass it
//! your own.
//!
//! It speaks HTTP/1.1 only (its TLS handshake offers no ALPN protocol, so
//! servers answer in HTTP/1.1) over a pool of kept-alive connections:
//! concurrent requests each take a connection of their own. A connection idle
//! for 30 s is not used again (and is closed within another 30 s), so a load
//! balancer that closes idle connections after a minute never closes one
//! under a request.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use volt_auth::VoltAuthLayer;
//! use volt_auth::client::https_client;
//! use volt_auth::mock::MockVolt;
//!
//! let volt = MockVolt::start().await?;
//! let client = https_client()?;
//! let auth = VoltAuthLayer::builder(volt.credentials())
//!     .base_url(&volt.url()) // for Volt: .environment(Environment::Sandbox)
//!     .build(client.clone())?;
//! let mut api = ServiceBuilder::new().layer(auth).service(client);
//!
//! let request = http::Request::get(format!("{}/banks", volt.url())).body(Full::<Bytes>::default())?;
//! let response = api.ready().await?.call(request).await?;
//! assert_eq!(response.status(), 200);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::crypto::CryptoProvider;

use crate::config::ConfigError;
use crate::layer::{Builder, VoltAuthLayer};

/// How long opening the TCP connection may take before the request fails,
/// shared among the addresses a name resolves to. Not the name's resolution nor
/// the TLS handshake: the layer's token timeout bounds an `/oauth` request
/// whole, and only the caller's own timeout bounds an API call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may sit idle in the pool and still be used (the
/// pool's timer closes it within as long again): half the 60 s after which
/// load balancers commonly close an idle connection (AWS's Application Load
/// Balancer by default; nginx after 75 s). A request sent just as the server
/// closes the connection crosses its close on the wire and fails
/// (`IncompleteMessage`), and hyper does not send it again; giving the
/// connection up first, the client never races the server. hyper-util's
/// default, 90 s, is longer than those servers wait. A server that closes
/// sooner (Node.js and Apache after 5 s by default) can still be raced: the
/// layer sends an `/oauth` request that failed so once more, at once, within
/// the same token timeout; an API call gets the error.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The client [`https_client`] makes: hyper-util's legacy client over an
/// `https`-or-`http` rustls connector, sending `B` bodies (`Full<Bytes>` unless
/// chosen otherwise). A tower service, ready for
/// `ServiceBuilder::new().layer(auth).service(client)`.
pub type HttpsClient<B = Full<Bytes>> = Client<HttpsConnector<HttpConnector>, B>;

/// An HTTPS (and plain HTTP) client trusting Mozilla's root certificates, as
/// shipped in the `webpki-roots` crate: the same on every platform, compiled
/// in (a root added or removed since reaches you with `cargo update`).
///
/// # Errors
/// [`ClientError::Tls`] if rustls refuses its own default configuration
/// (not expected with the ring provider this uses).
pub fn https_client() -> Result<HttpsClient, ClientError> {
    let builder = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider())
        .map_err(|error| ClientError::Tls(Box::new(error)))?;
    Ok(client(builder))
}

/// An HTTPS (and plain HTTP) client trusting the platform's root certificates
/// (for example a corporate proxy's CA installed in the system store), read
/// once, when the client is made. `SSL_CERT_FILE` or `SSL_CERT_DIR`, when set,
/// name PEM files to read instead of the system store.
///
/// # Errors
/// [`ClientError::NativeRoots`] when the platform's certificates cannot be
/// loaded or none are found.
pub fn https_client_with_native_roots() -> Result<HttpsClient, ClientError> {
    let builder = HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider())
        .map_err(ClientError::NativeRoots)?;
    Ok(client(builder))
}

/// ring, explicitly: rustls' process default panics when several providers are
/// compiled in and none was installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client(
    builder: HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    let connector = builder.https_or_http().enable_http1().wrap_connector(http);
    // The pool never picks a connection idle past its timeout nor one the
    // server was seen closing; the timer makes it also close such connections
    // on time rather than when it next looks for one.
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// Why [`https_client`] or [`https_client_with_native_roots`] could not make a
/// client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The platform's root certificates could not be loaded, or there are none.
    #[error("could not load the platform's root certificates")]
    NativeRoots(#[source] std::io::Error),
    /// rustls refused the TLS configuration.
    #[error("could not configure TLS")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl<P> Builder<P> {
    /// Builds the layer with its own [`https_client`] for the `/oauth`
    /// requests, so no transport needs to be passed. Use
    /// [`Builder::build`] to share one client with the API calls, or to trust
    /// the platform's roots (`build(https_client_with_native_roots()?)`).
    ///
    /// # Errors
    /// The [`ConfigError`]s of [`Builder::build`], and
    /// [`ConfigError::InvalidSetting`] if rustls refuses its default TLS
    /// configuration (not expected).
    pub fn build_default(self) -> Result<VoltAuthLayer<P>, ConfigError> {
        let client = https_client().map_err(|error| {
            // The error type has no room for the cause; the log keeps it.
            let cause = std::error::Error::source(&error).map(ToString::to_string);
            tracing::error!(%error, cause, "no HTTPS client for /oauth");
            ConfigError::InvalidSetting("rustls refused its default TLS configuration")
        })?;
        self.build(client)
    }
}
