//! The auto traits and bounds a user's code relies on, checked at compile
//! time: a layer shared across tasks and threads, services and futures sent
//! to `tokio::spawn`, errors in a `BoxError` or an `anyhow::Error`. A change
//! that loses one of them fails to compile here, before a user finds out.
//!
//! Each assertion is a generic function called for its bounds (one test also
//! runs a wrapped service in a spawned task). A generic parameter stands for
//! any type with the bounds named: `service_is_send::<S, P>` compiling means
//! `VoltAuth<S, P>: Send` for every `S: Send` and `P: Send`.

use std::fmt::Debug;
use std::task::Context;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{BoxError, Layer, Service};
use volt_auth::mock::{Broken, MockBuilder, MockService, MockVolt, OAuthHold, OAuthRequest};
use volt_auth::{
    AccessToken, Api, Builder, ConfigError, Credentials, DefaultReplay, Endpoint, Environment,
    Error, ErrorResponse, GrantStats, GrantType, NoReplay, ReplayPolicy, ResponseFuture, Stats,
    VoltAuth, VoltAuthLayer,
};

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}
fn assert_clone<T: Clone>() {}
fn assert_copy<T: Copy>() {}
fn assert_debug<T: Debug>() {}
fn assert_static<T: 'static>() {}
/// What `BoxError`, `anyhow::Error` and `eyre::Report` take.
fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}

/// Shared by every task of a process, and cloned into each service.
fn layer<P: Clone + Send + Sync + 'static>() {
    assert_send::<VoltAuthLayer<P>>();
    assert_sync::<VoltAuthLayer<P>>();
    assert_clone::<VoltAuthLayer<P>>();
    assert_static::<VoltAuthLayer<P>>();
    assert_debug::<VoltAuthLayer<P>>();
}

#[test]
fn the_layer_is_clone_send_sync_and_static() {
    layer::<DefaultReplay>();
    layer::<NoReplay>();
    layer::<fn(&Full<Bytes>) -> Option<Full<Bytes>>>();
    assert_send::<Builder>();
    assert_sync::<Builder>();
    assert_debug::<Builder>();
    assert_clone::<Builder>();
    assert_clone::<Builder<NoReplay>>();
}

fn service_is_send<S: Send, P: Send>() {
    assert_send::<VoltAuth<S, P>>();
}

fn service_is_sync<S: Sync, P: Sync>() {
    assert_sync::<VoltAuth<S, P>>();
}

fn service_is_clone<S: Clone, P: Clone>() {
    assert_clone::<VoltAuth<S, P>>();
}

fn service_is_static<S: 'static, P: 'static>() {
    assert_static::<VoltAuth<S, P>>();
}

fn service_is_debug<S: Debug, P: Debug>() {
    assert_debug::<VoltAuth<S, P>>();
}

/// `VoltAuth<S>` is `Send`, `Sync`, `Clone`, `Debug` and `'static` whenever
/// `S` (and the replay policy) is.
#[test]
fn the_service_has_its_inner_services_auto_traits() {
    service_is_send::<std::cell::Cell<u8>, DefaultReplay>();
    service_is_sync::<std::sync::Mutex<u8>, NoReplay>();
    service_is_clone::<MockService, DefaultReplay>();
    service_is_static::<MockService, DefaultReplay>();
    service_is_debug::<MockService, DefaultReplay>();
}

/// What a response future needs to be sent to another thread: the inner
/// future, and the service clone, body copy and 401 response it may keep for
/// a replay.
fn future_is_send<S, B>()
where
    S: Service<Request<B>> + Send,
    S::Future: Send,
    S::Response: Send,
    B: Send,
{
    assert_send::<ResponseFuture<S, B>>();
    assert_debug::<ResponseFuture<S, B>>();
}

fn future_is_static<S, B>()
where
    S: Service<Request<B>> + 'static,
    B: 'static,
{
    assert_static::<ResponseFuture<S, B>>();
}

#[test]
fn the_response_future_is_send_when_the_inner_service_future_and_body_are() {
    future_is_send::<MockService, Full<Bytes>>();
    future_is_static::<MockService, Full<Bytes>>();
}

/// A `VoltAuth` over a `Send` client can be called from a spawned task: the
/// whole call, readiness and future, crosses threads.
fn spawn<S, B, R>(
    service: S,
    request: Request<B>,
) -> tokio::task::JoinHandle<Result<Response<R>, BoxError>>
where
    S: Service<Request<B>, Response = Response<R>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    R: Send + 'static,
{
    tokio::spawn(async move {
        let mut service = service;
        std::future::poll_fn(|cx: &mut Context<'_>| service.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        service.call(request).await.map_err(Into::into)
    })
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_wrapped_service_runs_in_a_spawned_task() -> Result<(), BoxError> {
    let volt = MockVolt::builder().in_process();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(volt.service())?;
    let request = Request::get(format!("{}/banks", volt.url())).body(Full::<Bytes>::default())?;
    let response = spawn(auth.layer(volt.service()), request).await??;
    assert_eq!(response.status(), 200);
    assert_eq!(volt.api_authorizations().len(), 1);
    assert!(volt.api_authorizations()[0].is_some());
    Ok(())
}

#[test]
fn errors_fit_box_error_and_anyhow_and_are_clone() {
    assert_error::<Error>();
    assert_clone::<Error>();
    assert_error::<ConfigError>();
    assert_clone::<ConfigError>();
    fn boxed<T: Into<BoxError>>() {}
    boxed::<Error>();
    boxed::<ConfigError>();
    assert_send::<ErrorResponse>();
    assert_sync::<ErrorResponse>();
    assert_clone::<ErrorResponse>();
    assert_debug::<ErrorResponse>();
    assert_copy::<GrantType>();
    assert_send::<GrantType>();
    assert_sync::<GrantType>();
}

/// Values handed out or taken in: kept in a struct shared between tasks,
/// moved into spawned ones, printed.
fn value<T: Clone + Send + Sync + Debug + 'static>() {}

#[test]
fn values_are_clone_send_sync_debug_and_static() {
    value::<AccessToken>();
    value::<Credentials>();
    value::<Endpoint>();
    value::<Stats>();
    value::<GrantStats>();
    value::<DefaultReplay>();
    value::<NoReplay>();
    assert_copy::<Api>();
    assert_copy::<Environment>();
    assert_copy::<DefaultReplay>();
    assert_copy::<NoReplay>();
    assert_copy::<GrantStats>();
}

fn policy<P: ReplayPolicy<B>, B>() {}

#[test]
fn the_replay_policies_cover_the_documented_bodies() {
    policy::<DefaultReplay, Full<Bytes>>();
    policy::<DefaultReplay, http_body_util::Empty<Bytes>>();
    policy::<DefaultReplay, String>();
    policy::<DefaultReplay, http_body_util::combinators::BoxBody<Bytes, BoxError>>();
    policy::<DefaultReplay, http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>>();
    policy::<DefaultReplay, hyper::body::Incoming>();
    policy::<NoReplay, http_body_util::StreamBody<()>>();
    policy::<fn(&Vec<u8>) -> Option<Vec<u8>>, Vec<u8>>();
}

/// A mock shared by a test's tasks (`Arc<MockVolt>`), its service the layer's
/// transport (which `Builder::build` wants `Clone + Send + Sync + 'static`).
#[test]
fn the_mock_is_send_and_sync() {
    assert_send::<MockVolt>();
    assert_sync::<MockVolt>();
    assert_debug::<MockVolt>();
    assert_static::<MockVolt>();
    value::<MockService>();
    value::<MockService<String>>();
    // A body type that is neither `Send` nor `Sync` does not make the
    // service lose them.
    value::<MockService<std::rc::Rc<u8>>>();
    assert_clone::<MockBuilder>();
    assert_send::<MockBuilder>();
    assert_sync::<MockBuilder>();
    assert_debug::<MockBuilder>();
    assert_send::<OAuthHold>();
    assert_sync::<OAuthHold>();
    assert_debug::<OAuthHold>();
    value::<OAuthRequest>();
    assert_copy::<Broken>();
}

#[test]
fn the_client_feature_types_are_send_and_sync() {
    value::<volt_auth::client::HttpsClient>();
    assert_error::<volt_auth::client::ClientError>();
}

#[cfg(feature = "reqwest")]
#[test]
fn the_reqwest_feature_types_are_send_and_sync() {
    use volt_auth::reqwest::{ReqwestTransport, VoltAuthMiddleware};

    value::<VoltAuthMiddleware>();
    value::<ReqwestTransport>();
    let _: fn(ReqwestTransport) -> reqwest::Client = ReqwestTransport::into_inner;
    assert_send::<volt_auth::reqwest::ResponseFuture>();
    assert_static::<volt_auth::reqwest::ResponseFuture>();
    fn middleware<M: reqwest_middleware::Middleware>() {}
    middleware::<VoltAuthMiddleware>();
    policy::<DefaultReplay, reqwest::Body>();
}
