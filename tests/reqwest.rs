//! `VoltAuthMiddleware` in a `reqwest_middleware::ClientWithMiddleware`, with
//! `/oauth` carried by `ReqwestTransport` over the same `reqwest::Client`,
//! against the mock server over TCP on 127.0.0.1.
#![cfg(feature = "reqwest")]

use bytes::Bytes;
use http_body_util::Full;
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use reqwest_middleware::ClientWithMiddleware;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;
use volt_auth::mock::{MockVolt, payment_digest};
use volt_auth::reqwest::ReqwestTransport;

use volt_auth::{Builder, DefaultReplay, GrantType, NoReplay, ReplayPolicy, VoltAuthLayer};

mod common;

const PAYMENT: &str =
    r#"{"amount":12345,"currencyCode":"EUR","type":"SERVICES","uniqueReference":"order-42"}"#;

struct Setup<P = DefaultReplay> {
    volt: MockVolt,
    auth: VoltAuthLayer<P>,
    api: ClientWithMiddleware,
}

async fn setup() -> Setup {
    setup_with(|builder| builder).await
}

async fn setup_with<P>(configure: impl FnOnce(Builder) -> Builder<P>) -> Setup<P>
where
    P: ReplayPolicy<reqwest::Body> + Send + Sync + 'static,
{
    let volt = MockVolt::start().await.unwrap();
    let client = reqwest::Client::new();
    let auth = configure(VoltAuthLayer::builder(volt.credentials()).base_url(&volt.url()))
        .build(ReqwestTransport::new(client.clone()))
        .unwrap();
    let api = reqwest_middleware::ClientBuilder::new(client)
        .with(auth.middleware())
        .build();
    Setup { volt, auth, api }
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

impl<P> Setup<P> {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.volt.url())
    }

    async fn banks(&self) -> StatusCode {
        let response = self.api.get(self.url("/banks")).send().await.unwrap();
        response.status()
    }

    async fn pay(&self, body: reqwest::Body) -> reqwest::Response {
        self.api
            .post(self.url("/v2/payments"))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// After a first `GET /banks` and the revocation of its token: a
    /// payment with `body`, or `GET /banks` without one; its status.
    async fn after_revoking(&self, body: Option<&'static str>) -> StatusCode {
        assert_eq!(self.banks().await, StatusCode::OK);
        self.volt.revoke_access_tokens();
        match body {
            Some(body) => self.pay(reqwest::Body::from(body)).await.status(),
            None => self.banks().await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_password_grant_serves_sequential_and_concurrent_requests() {
    let s = setup().await;
    for _ in 0..10 {
        assert_eq!(s.banks().await, StatusCode::OK);
    }
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let api = s.api.clone();
            let url = s.url("/banks");
            tokio::spawn(async move { api.get(url).send().await.unwrap().status() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }

    assert_eq!(s.volt.oauth_calls(), 1);
    assert_eq!(s.volt.password_grants(), 1);
    assert_eq!(s.volt.refresh_grants(), 0);
    assert_eq!(s.volt.api_calls(), 60);
    assert_eq!(s.volt.unauthorized(), 0);
    let token = &s.volt.issued_access_tokens()[0];
    assert_eq!(s.volt.api_authorizations(), vec![bearer(token); 60]);
    // The /oauth request travelled through reqwest, form-encoded.
    let oauth = s.volt.oauth_requests();
    assert_eq!(oauth.len(), 1);
    assert_eq!(
        oauth[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded;charset=UTF-8")
    );
    assert_eq!(s.auth.stats().password.succeeded, 1);
    assert_eq!(s.auth.stats().replays, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_share_one_password_grant() {
    let s = setup().await;
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let api = s.api.clone();
            let url = s.url("/banks");
            tokio::spawn(async move { api.get(url).send().await.unwrap().status() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(s.volt.oauth_calls(), 1);
    assert_eq!(s.volt.password_grants(), 1);
    assert_eq!(s.volt.max_oauth_in_flight(), 1);
    let token = &s.volt.issued_access_tokens()[0];
    assert_eq!(s.volt.api_authorizations(), vec![bearer(token); 500]);
}

#[tokio::test]
async fn a_401_renews_once_and_replays_the_json_body_byte_for_byte() {
    let s = setup().await;
    assert_eq!(s.banks().await, StatusCode::OK);
    s.volt.revoke_access_tokens();

    let response = s.pay(reqwest::Body::from(PAYMENT)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(created["digest"], payment_digest(PAYMENT.as_bytes()));

    // The server saw the same body twice: 401, then 201.
    assert_eq!(
        s.volt.payment_bodies(),
        vec![Bytes::from(PAYMENT), Bytes::from(PAYMENT)]
    );
    assert_eq!(s.volt.unauthorized(), 1);
    // Exactly one extra /oauth call: the refresh grant.
    assert_eq!(s.volt.oauth_calls(), 2);
    assert_eq!(s.volt.password_grants(), 1);
    assert_eq!(s.volt.refresh_grants(), 1);
    let tokens = s.volt.issued_access_tokens();
    assert_eq!(
        s.volt.api_authorizations(),
        vec![bearer(&tokens[0]), bearer(&tokens[0]), bearer(&tokens[1])]
    );
    let stats = s.auth.stats();
    assert_eq!(stats.replays, 1);
    assert_eq!(stats.refresh.succeeded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_401s_cost_one_refresh() {
    let s = setup().await;
    assert_eq!(s.banks().await, StatusCode::OK);
    s.volt.revoke_access_tokens();

    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let api = s.api.clone();
            let url = s.url("/v2/payments");
            tokio::spawn(async move {
                api.post(url)
                    .header(CONTENT_TYPE, "application/json")
                    .body(PAYMENT)
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::CREATED);
    }
    assert_eq!(s.volt.oauth_calls(), 2);
    assert_eq!(s.volt.refresh_grants(), 1);
    // Every 401 was replayed once; requests sent after the refresh had none.
    let rejected = s.volt.unauthorized() as u64;
    assert!(rejected >= 1);
    assert_eq!(s.auth.stats().replays, rejected);
    assert_eq!(s.volt.payment_bodies().len() as u64, 40 + rejected);
    assert!(
        s.volt
            .payment_bodies()
            .iter()
            .all(|body| body == PAYMENT.as_bytes())
    );
}

#[tokio::test]
async fn a_streaming_body_is_sent_once_and_the_next_request_gets_a_new_token() {
    let s = setup().await;
    assert_eq!(s.banks().await, StatusCode::OK);
    s.volt.revoke_access_tokens();

    // `Body::wrap` makes a body reqwest cannot clone.
    let stream = reqwest::Body::wrap(Full::new(Bytes::from(PAYMENT)));
    assert!(stream.as_bytes().is_none());
    let response = s.pay(stream).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers().get("www-authenticate").unwrap(),
        "Bearer"
    );
    assert_eq!(s.volt.payment_bodies(), vec![Bytes::from(PAYMENT)]);
    assert_eq!(s.auth.stats().replays, 0);

    // The 401 invalidated the token; the next request waits for the refresh.
    assert_eq!(s.banks().await, StatusCode::OK);
    assert_eq!(s.volt.oauth_calls(), 2);
    assert_eq!(s.volt.refresh_grants(), 1);
    assert_eq!(s.volt.unauthorized(), 1);
    let tokens = s.volt.issued_access_tokens();
    assert_eq!(tokens.len(), 2);
    assert_eq!(
        s.volt.api_authorizations(),
        vec![bearer(&tokens[0]), bearer(&tokens[0]), bearer(&tokens[1])]
    );
}

#[tokio::test]
async fn replay_can_be_turned_off() {
    let volt = MockVolt::start().await.unwrap();
    let client = reqwest::Client::new();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(ReqwestTransport::new(client.clone()))
        .unwrap();
    let api = reqwest_middleware::ClientBuilder::new(client)
        .with(auth.middleware().replay(false))
        .build();
    let url = format!("{}/v2/payments", volt.url());
    let pay = || api.post(&url).body(PAYMENT).send();

    assert_eq!(pay().await.unwrap().status(), StatusCode::CREATED);
    volt.revoke_access_tokens();
    assert_eq!(pay().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(pay().await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(volt.payment_bodies().len(), 3);
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(auth.stats().replays, 0);
}

/// A layer built with `NoReplay` makes a middleware that replays nothing,
/// not even a request without a body: the 401 goes back as it came, the
/// server saw the request once, and the next request carries a new token.
/// (A layer each, as forced refreshes are throttled.)
#[tokio::test]
async fn a_no_replay_layer_s_middleware_replays_nothing() {
    for body in [Some(PAYMENT), None] {
        let s = setup_with(|builder| builder.replay(NoReplay)).await;
        assert_eq!(
            s.after_revoking(body).await,
            StatusCode::UNAUTHORIZED,
            "{body:?}"
        );
        assert_eq!(s.volt.api_calls(), 2, "{body:?}");
        assert_eq!(s.volt.unauthorized(), 1, "{body:?}");
        let payments: Vec<_> = body.map(Bytes::from).into_iter().collect();
        assert_eq!(s.volt.payment_bodies(), payments, "{body:?}");
        assert_eq!(s.volt.oauth_calls(), 1, "{body:?}");
        assert_eq!(s.auth.stats().replays, 0, "{body:?}");

        assert_eq!(s.banks().await, StatusCode::OK, "{body:?}");
        assert_eq!(s.volt.oauth_calls(), 2, "{body:?}");
        assert_eq!(s.volt.refresh_grants(), 1, "{body:?}");
    }
}

/// The default layer's middleware replays a request without a body, and one
/// with a body of bytes, once each with the renewed token.
#[tokio::test]
async fn a_default_layer_s_middleware_replays_with_and_without_a_body() {
    for body in [Some(PAYMENT), None] {
        let s = setup().await;
        let status = if body.is_some() {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        assert_eq!(s.after_revoking(body).await, status, "{body:?}");
        assert_eq!(s.volt.api_calls(), 3, "{body:?}");
        assert_eq!(s.volt.unauthorized(), 1, "{body:?}");
        let payments: Vec<_> = body.map(Bytes::from).into_iter().collect();
        assert_eq!(s.volt.payment_bodies(), [&payments[..], &payments].concat());
        assert_eq!(s.volt.oauth_calls(), 2, "{body:?}");
        assert_eq!(s.volt.refresh_grants(), 1, "{body:?}");
        assert_eq!(s.auth.stats().replays, 1, "{body:?}");
    }
}

/// The layer's size limit bounds what the middleware keeps: with
/// `max_size(4)`, a 5-byte body is sent once and its 401 goes back; a 4-byte
/// one is replayed, and the server receives the same bytes twice.
#[tokio::test]
async fn the_layer_s_size_limit_bounds_the_middleware_s_replays() {
    for (body, replayed) in [("fives", false), ("four", true)] {
        let s = setup_with(|builder| builder.replay(DefaultReplay::new().max_size(4))).await;
        let status = if replayed {
            StatusCode::CREATED
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(s.after_revoking(Some(body)).await, status, "{body}");
        let sent = 1 + usize::from(replayed);
        assert_eq!(s.volt.payment_bodies(), vec![Bytes::from(body); sent]);
        assert_eq!(s.volt.unauthorized(), 1, "{body}");
        assert_eq!(s.volt.oauth_calls(), sent, "{body}");
        assert_eq!(s.auth.stats().replays, u64::from(replayed), "{body}");
    }
}

/// The replay carries the body the layer's policy made, not another copy of
/// the request's.
#[tokio::test]
async fn the_middleware_replays_the_policy_s_copy() {
    let s =
        setup_with(|builder| builder.replay(|_: &reqwest::Body| Some(reqwest::Body::from("copy"))))
            .await;
    assert_eq!(s.after_revoking(Some(PAYMENT)).await, StatusCode::CREATED);
    assert_eq!(
        s.volt.payment_bodies(),
        vec![Bytes::from(PAYMENT), Bytes::from("copy")]
    );
    assert_eq!(s.auth.stats().replays, 1);
}

#[tokio::test]
async fn a_server_rejecting_every_token_gets_one_replay_and_no_storm() {
    // A long backoff, so that the throttle holds however slow the machine.
    let s =
        setup_with(|builder| builder.backoff(Duration::from_secs(60), Duration::from_secs(120)))
            .await;
    assert_eq!(s.banks().await, StatusCode::OK);
    s.volt.reject_all_tokens(true);

    // One replay with a renewed token, then the 401 goes back.
    assert_eq!(s.banks().await, StatusCode::UNAUTHORIZED);
    assert_eq!(s.volt.api_calls(), 3);
    assert_eq!(s.volt.oauth_calls(), 2);
    assert_eq!(s.auth.stats().replays, 1);

    // Renewals are throttled: more 401s cost no /oauth call and no replay.
    for _ in 0..5 {
        assert_eq!(s.banks().await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(s.volt.api_calls(), 8);
    assert_eq!(s.volt.oauth_calls(), 2);
    assert_eq!(s.auth.stats().replays, 1);
}

#[tokio::test]
async fn other_origins_get_no_token() {
    let s = setup().await;
    let other = MockVolt::start().await.unwrap();

    // Same host, another port: another origin.
    let response = s
        .api
        .get(format!("{}/banks", other.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(other.api_authorizations(), vec![None]);
    // The request did not even ask for a token.
    assert_eq!(s.volt.oauth_calls(), 0);
}

#[tokio::test]
async fn allowed_origins_get_the_token_too() {
    let other = MockVolt::start().await.unwrap();
    let s = setup_with(|builder| builder.allow_origin(&other.url())).await;
    let response = s
        .api
        .get(format!("{}/banks", other.url()))
        .send()
        .await
        .unwrap();
    // The other server does not know Volt's tokens, but it received them: the
    // first, then after its 401 a renewed one (one replay).
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let tokens = s.volt.issued_access_tokens();
    assert_eq!(
        other.api_authorizations(),
        vec![bearer(&tokens[0]), bearer(&tokens[1])]
    );
    assert_eq!(s.volt.oauth_calls(), 2);
    assert_eq!(s.auth.stats().replays, 1);
}

#[tokio::test]
async fn token_errors_downcast_to_volt_auth_error() {
    let s = setup().await;
    s.volt.fail_oauth(
        1,
        http::StatusCode::UNAUTHORIZED,
        r#"{"code":401,"message":"Invalid credentials"}"#,
    );
    let error = s.api.get(s.url("/banks")).send().await.unwrap_err();
    let reqwest_middleware::Error::Middleware(error) = error else {
        panic!("expected a middleware error, got {error:?}");
    };
    let error = error.downcast_ref::<volt_auth::Error>().unwrap();
    assert!(error.is_rejected());
    assert_eq!(error.grant(), Some(GrantType::Password));
    assert_eq!(s.volt.oauth_calls(), 1);
    assert_eq!(s.volt.api_calls(), 0);
}

#[tokio::test]
async fn the_transport_is_a_tower_service_and_refuses_relative_uris() {
    let transport = ReqwestTransport::new(reqwest::Client::new());
    let request = http::Request::get("/banks")
        .body(reqwest::Body::from(""))
        .unwrap();
    let error = transport.clone().oneshot(request).await.unwrap_err();
    assert!(error.is_builder());

    let volt = MockVolt::start().await.unwrap();
    let request = http::Request::get(format!("{}/banks", volt.url()))
        .body(reqwest::Body::from(""))
        .unwrap();
    let response = transport.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(volt.api_calls(), 1);
}

#[tokio::test]
async fn a_tower_stack_over_the_reqwest_transport_replays_reqwest_bodies() {
    use tower::{Service, ServiceBuilder};

    let volt = MockVolt::start().await.unwrap();
    let transport = ReqwestTransport::new(reqwest::Client::new());
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(transport.clone())
        .unwrap();
    let mut api = ServiceBuilder::new().layer(auth.clone()).service(transport);
    let pay = || {
        http::Request::post(format!("{}/v2/payments", volt.url()))
            .header(CONTENT_TYPE, "application/json")
            .body(reqwest::Body::from(PAYMENT))
            .unwrap()
    };

    let response = api.ready().await.unwrap().call(pay()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    volt.revoke_access_tokens();
    let response = api.ready().await.unwrap().call(pay()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    assert_eq!(volt.payment_bodies(), vec![Bytes::from(PAYMENT); 3]);
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(volt.refresh_grants(), 1);
    assert_eq!(auth.stats().replays, 1);
}

/// A middleware that runs `hook` on each request it passes on, and then, if
/// `fail_first` is above zero, fails that many sends with an error of its own
/// instead of sending them (a transient transport error).
#[derive(Clone)]
struct Hook<F> {
    hook: F,
    fail_first: Arc<AtomicUsize>,
}

fn hook<F>(hook: F) -> Hook<F> {
    Hook {
        hook,
        fail_first: Arc::default(),
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Tag(u32);

impl<F> reqwest_middleware::Middleware for Hook<F>
where
    F: Fn(&mut reqwest::Request, &mut http::Extensions) + Send + Sync + 'static,
{
    fn handle<'a, 'b, 'c, 'd>(
        &'a self,
        mut request: reqwest::Request,
        extensions: &'b mut http::Extensions,
        next: reqwest_middleware::Next<'c>,
    ) -> Pin<Box<dyn Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'd>>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        (self.hook)(&mut request, extensions);
        let fail = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            if fail {
                return Err(reqwest_middleware::Error::middleware(
                    std::io::Error::other("transient"),
                ));
            }
            next.run(request, extensions).await
        })
    }
}

/// `reqwest-retry`'s loop, reduced: sends a clone of the request, and again
/// (up to `attempts` in all) after an error or a status `retry` accepts.
#[derive(Clone)]
struct Retry {
    attempts: usize,
    retry: fn(StatusCode) -> bool,
}

impl reqwest_middleware::Middleware for Retry {
    fn handle<'a, 'b, 'c, 'd>(
        &'a self,
        request: reqwest::Request,
        extensions: &'b mut http::Extensions,
        next: reqwest_middleware::Next<'c>,
    ) -> Pin<Box<dyn Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'd>>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        Box::pin(async move {
            let mut attempt = 1;
            loop {
                let copy = request.try_clone().expect("a clonable request");
                let result = next.clone().run(copy, extensions).await;
                let again = match &result {
                    Ok(response) => (self.retry)(response.status()),
                    Err(_) => true,
                };
                if !again || attempt == self.attempts {
                    return result;
                }
                attempt += 1;
            }
        })
    }
}

fn authorization(request: &reqwest::Request) -> Option<String> {
    request
        .headers()
        .get(reqwest::header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap().to_owned())
}

/// Middlewares before the auth middleware see no token; those after it see
/// the token it attached, on the first send and on the replay after a 401,
/// with the same `Extensions` (set before the auth middleware) both times.
#[tokio::test]
async fn middlewares_around_it_and_extensions_on_the_replay() {
    type Seen = Arc<Mutex<Vec<(Option<String>, Option<Tag>)>>>;
    let volt = MockVolt::start().await.unwrap();
    let client = reqwest::Client::new();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(ReqwestTransport::new(client.clone()))
        .unwrap();
    let (before, after): (Seen, Seen) = Default::default();
    let (seen_before, seen_after) = (before.clone(), after.clone());
    let api = reqwest_middleware::ClientBuilder::new(client)
        .with(hook(
            move |request: &mut reqwest::Request, extensions: &mut http::Extensions| {
                extensions.insert(Tag(7));
                seen_before
                    .lock()
                    .unwrap()
                    .push((authorization(request), None));
            },
        ))
        .with(auth.middleware())
        .with(hook(
            move |request: &mut reqwest::Request, extensions: &mut http::Extensions| {
                seen_after
                    .lock()
                    .unwrap()
                    .push((authorization(request), extensions.get::<Tag>().cloned()));
            },
        ))
        .build();

    let banks = format!("{}/banks", volt.url());
    assert_eq!(api.get(&banks).send().await.unwrap().status(), 200);
    volt.revoke_access_tokens();
    let response = api
        .post(format!("{}/v2/payments", volt.url()))
        .header(CONTENT_TYPE, "application/json")
        .body(PAYMENT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    let tokens = volt.issued_access_tokens();
    assert_eq!(tokens.len(), 2);
    assert_eq!(*before.lock().unwrap(), vec![(None, None); 2]);
    assert_eq!(
        *after.lock().unwrap(),
        vec![
            (bearer(&tokens[0]), Some(Tag(7))),
            (bearer(&tokens[0]), Some(Tag(7))),
            (bearer(&tokens[1]), Some(Tag(7))),
        ]
    );
    assert_eq!(
        volt.api_authorizations(),
        vec![bearer(&tokens[0]), bearer(&tokens[0]), bearer(&tokens[1])]
    );
    assert_eq!(volt.oauth_calls(), 2);
    assert_eq!(volt.refresh_grants(), 1);
    assert_eq!(auth.stats().replays, 1);
}

/// A retry middleware inside the auth middleware resends the request as it
/// got it, token included; outside, each attempt gets the current token. A
/// transient error costs no `/oauth` call either way, and a 401 is renewed
/// and replayed once by the auth middleware, not by the retries.
#[tokio::test]
async fn under_and_over_a_retry_middleware() {
    for retry_outside in [false, true] {
        let volt = MockVolt::start().await.unwrap();
        let client = reqwest::Client::new();
        let auth = VoltAuthLayer::builder(volt.credentials())
            .base_url(&volt.url())
            .build(ReqwestTransport::new(client.clone()))
            .unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let seen = sent.clone();
        let flaky = hook(
            move |request: &mut reqwest::Request, _: &mut http::Extensions| {
                seen.lock().unwrap().push(authorization(request));
            },
        );
        let retry = Retry {
            attempts: 3,
            // Transient statuses only, as reqwest-retry's default policy.
            retry: |status| status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS,
        };
        let builder = reqwest_middleware::ClientBuilder::new(client);
        let api = if retry_outside {
            builder
                .with(retry)
                .with(auth.middleware())
                .with(flaky.clone())
        } else {
            builder
                .with(auth.middleware())
                .with(retry)
                .with(flaky.clone())
        }
        .build();
        let banks = format!("{}/banks", volt.url());

        // Two transient errors, then the answer.
        flaky.fail_first.store(2, Ordering::SeqCst);
        assert_eq!(
            api.get(&banks).send().await.unwrap().status(),
            200,
            "{retry_outside}"
        );
        let tokens = volt.issued_access_tokens();
        assert_eq!(*sent.lock().unwrap(), vec![bearer(&tokens[0]); 3]);
        assert_eq!(volt.api_authorizations(), vec![bearer(&tokens[0])]);
        assert_eq!(volt.oauth_calls(), 1);

        // A 401 is not retried: renewed and replayed once.
        volt.revoke_access_tokens();
        assert_eq!(
            api.get(&banks).send().await.unwrap().status(),
            200,
            "{retry_outside}"
        );
        let tokens = volt.issued_access_tokens();
        assert_eq!(
            volt.api_authorizations(),
            vec![bearer(&tokens[0]), bearer(&tokens[0]), bearer(&tokens[1])],
            "{retry_outside}"
        );
        assert_eq!(volt.oauth_calls(), 2);
        assert_eq!(volt.refresh_grants(), 1);
        assert_eq!(auth.stats().replays, 1);
    }
}

/// Callers that give up while the first token is on its way (a timeout, a
/// dropped future) do not cancel its refresh: the next request gets that
/// token, and the 300 abandoned ones cost no other `/oauth` call and reach
/// no API endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_giving_up_while_the_token_is_on_its_way_cancel_nothing() {
    let s = setup().await;
    let hold = s.volt.hold_oauth();
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let api = s.api.clone();
            let url = s.url("/banks");
            tokio::spawn(async move { api.get(url).send().await })
        })
        .collect();
    hold.wait_for(1).await;
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        assert!(task.await.unwrap_err().is_cancelled());
    }
    assert_eq!(s.volt.api_calls(), 0);
    hold.release();

    assert_eq!(s.banks().await, StatusCode::OK);
    assert_eq!(s.volt.oauth_calls(), 1);
    assert_eq!(s.volt.password_grants(), 1);
    let token = &s.volt.issued_access_tokens()[0];
    assert_eq!(s.volt.api_authorizations(), vec![bearer(token)]);
}

/// `GET /banks` through the middleware (`tower` is `None`) or through
/// `VoltAuth` over the same transport.
async fn get_banks(
    api: &ClientWithMiddleware,
    tower: Option<&mut volt_auth::VoltAuth<ReqwestTransport>>,
    banks: &str,
) -> StatusCode {
    use tower::Service;

    match tower {
        None => api.get(banks).send().await.unwrap().status(),
        Some(tower) => {
            let request = http::Request::get(banks)
                .body(reqwest::Body::default())
                .unwrap();
            let service = tower.ready().await.unwrap();
            service.call(request).await.unwrap().status()
        }
    }
}

/// As the README says of both paths, a 401 that goes back to its caller
/// because the forced refresh came too recently, or failed, is a DEBUG event
/// each: through the middleware as through `VoltAuth` over the same
/// transport, one event per such 401, with the same text.
#[tokio::test]
async fn a_401_given_back_unrenewed_is_logged_at_debug_as_through_tower() {
    use tower::Layer;

    const TOO_SOON: &str = "a 401 came too soon after the last forced refresh; returning it";
    const NO_TOKEN: &str = "no new token after a 401; returning the 401";
    for middleware in [true, false] {
        for fail in [false, true] {
            let (capture, _guard) = common::log::scoped();
            let volt = MockVolt::start().await.unwrap();
            let client = reqwest::Client::new();
            let auth = VoltAuthLayer::builder(volt.credentials())
                .base_url(&volt.url())
                // A long backoff, so that the throttle holds however slow the machine.
                .backoff(Duration::from_secs(60), Duration::from_secs(120))
                .build(ReqwestTransport::new(client.clone()))
                .unwrap();
            let api = reqwest_middleware::ClientBuilder::new(client.clone())
                .with(auth.middleware())
                .build();
            let mut service = auth.layer(ReqwestTransport::new(client));
            let mut tower = (!middleware).then_some(&mut service);
            let banks = format!("{}/banks", volt.url());
            let case = format!("middleware: {middleware}, fail: {fail}");
            let count = |text: &str| {
                common::log::events(&capture)
                    .iter()
                    .filter(|event| {
                        event.level == tracing::Level::DEBUG && event.text.contains(text)
                    })
                    .count()
            };

            assert_eq!(
                get_banks(&api, tower.as_deref_mut(), &banks).await,
                StatusCode::OK
            );
            if fail {
                // The renewal fails: the 401 goes back.
                volt.revoke_access_tokens();
                volt.fail_oauth(1, http::StatusCode::SERVICE_UNAVAILABLE, "{}");
                assert_eq!(
                    get_banks(&api, tower.as_deref_mut(), &banks).await,
                    StatusCode::UNAUTHORIZED,
                    "{case}"
                );
                assert_eq!(volt.oauth_calls(), 2, "{case}");
                assert_eq!((count(NO_TOKEN), count(TOO_SOON)), (1, 0), "{case}");
            } else {
                // One replay, then the renewals are throttled: each 401
                // goes back.
                volt.reject_all_tokens(true);
                for _ in 0..3 {
                    assert_eq!(
                        get_banks(&api, tower.as_deref_mut(), &banks).await,
                        StatusCode::UNAUTHORIZED,
                        "{case}"
                    );
                }
                assert_eq!(volt.oauth_calls(), 2, "{case}");
                assert_eq!((count(NO_TOKEN), count(TOO_SOON)), (0, 2), "{case}");
            }
            assert_eq!(auth.stats().replays, u64::from(!fail), "{case}");
        }
    }
}

/// A URL reqwest sends otherwise than it was written (a fragment, which is
/// not sent), or with an empty query or escapes, is not taken for a
/// redirect: the 401 to a payment (not idempotent, so checked for one) is
/// renewed and replayed once, as any other. (A layer each, as forced
/// refreshes are throttled.)
#[tokio::test]
async fn a_401_to_a_url_with_a_fragment_or_escapes_is_replayed() {
    for query in ["#list", "?", "?q=%2F%c3%A9#x", "?a%20b=&c"] {
        let s = setup().await;
        assert_eq!(s.banks().await, StatusCode::OK);
        s.volt.revoke_access_tokens();
        let response = s
            .api
            .post(s.url(&format!("/v2/payments{query}")))
            .header(CONTENT_TYPE, "application/json")
            .body(PAYMENT)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{query}");
        assert_eq!(s.auth.stats().replays, 1, "{query}");
        assert_eq!(s.volt.unauthorized(), 1, "{query}");
        assert_eq!(s.volt.payment_bodies(), vec![Bytes::from(PAYMENT); 2]);
        assert_eq!(s.volt.oauth_calls(), 2, "{query}");
    }
}
