//! Tower middleware that obtains, caches, refreshes and attaches the OAuth2
//! bearer token every call to [Volt](https://www.volt.io)'s open-banking API
//! needs.
//!
//! [`VoltAuthLayer`] wraps any tower HTTP service. Requests read the current
//! token lock-free; one refresh at a time runs in the background ahead of
//! expiry, using the refresh token and falling back to the password grant; a
//! 401 invalidates exactly the rejected token and replays the request once.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use volt_auth::VoltAuthLayer;
//! use volt_auth::mock::MockVolt;
//!
//! let volt = MockVolt::start().await?; // an embedded mock of Volt's API on 127.0.0.1
//! // Any tower HTTP client works; this one also carries the /oauth requests.
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//!
//! let auth = VoltAuthLayer::builder(volt.credentials()) // or VoltAuthLayer::from_env()?
//!     .base_url(&volt.url())                              // or .environment(Environment::Sandbox)
//!     .build(client.clone())?;
//! let mut api = ServiceBuilder::new().layer(auth.clone()).service(client);
//!
//! let request = http::Request::get(format!("{}/banks", volt.url())).body(Full::default())?;
//! let response = api.ready().await?.call(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(auth.stats().password.succeeded, 1);
//!
//! // The same cache, without tower:
//! let token = auth.access_token().await?;
//! assert_eq!(volt.oauth_calls(), 1);
//! # drop(token);
//! # Ok(()) }
//! ```
//!
//! [`Builder`] lists the settings and their defaults, [`VoltAuth`] what
//! happens to each request (401s included), and [`Error`] what a failed token
//! request tells you.
//!
//! # Features
//! - `mock`: `mock::MockVolt`, an embedded mock of Volt's API for tests and
//!   examples.
//! - `reqwest`: `reqwest::VoltAuthMiddleware` for `reqwest_middleware`
//!   clients, and `reqwest::ReqwestTransport` to send `/oauth` through
//!   reqwest (with `http2`).
//! - `client`: `client::https_client`, a ready hyper-util + rustls client, and
//!   `Builder::build_default`, which needs no transport.
//! - `http2`: for transports that speak HTTP/2, an `/oauth` request the server
//!   refused unprocessed (`REFUSED_STREAM`, or a graceful `GOAWAY` below its
//!   stream) is sent once more, as one whose connection closed unanswered is.
//!
//! Without a feature, bring any tower HTTP client (hyper-util's, tower-http's
//! stack over it, your own) and pass it to [`Builder::build`].
#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod config;
mod error;
mod future;
mod layer;
mod oauth;
mod replay;
mod service;

pub use cache::{GrantStats, Stats};
pub use config::{Api, ConfigError, Credentials, Endpoint, Environment};
pub use error::{Error, ErrorResponse, GrantType};
pub use future::ResponseFuture;
pub use layer::{AccessToken, Builder, VoltAuthLayer};
pub use replay::{DefaultReplay, NoReplay, ReplayPolicy};
pub use service::VoltAuth;

#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub mod mock;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
