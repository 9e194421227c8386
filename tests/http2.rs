//! An `/oauth` request an HTTP/2 server refused unprocessed (RFC 9113,
//! section 8.7) is sent once more, as one whose connection closed unanswered
//! is: through `ReqwestTransport` (whose bodies reqwest cannot clone, so
//! reqwest does not send them again itself) and through hyper-util's client,
//! both speaking h2c to a server on 127.0.0.1 that plays a script, one step
//! per stream. An API request without a body is sent again by reqwest itself,
//! through either reqwest path.
#![cfg(feature = "reqwest")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use http::Response;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use volt_auth::reqwest::ReqwestTransport;
use volt_auth::{Credentials, Error, GrantType, VoltAuthLayer};

mod common;

const SECRET: &str = "h2-client-secret";
const PASSWORD: &str = "h2-password";
const TOKEN: &[u8] =
    br#"{"access_token":"at-h2","token_type":"bearer","expires_in":3600,"refresh_token":"rt-h2"}"#;

/// What the server does with one stream.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Reads the request, then resets the stream with this reason.
    Reset(Reason),
    /// Opens a connection: reads the request's headers, then sends `GOAWAY`
    /// with this reason and last stream id 0 (the request unprocessed), and
    /// reads until the client closes.
    GoAway(Reason),
    /// Reads the request and answers the token.
    Token,
}

/// The bodies of the requests the server read (`None` for one refused by a
/// `GOAWAY`, whose body is not read).
type Seen = Arc<Mutex<Vec<Option<Bytes>>>>;

/// An h2c server (prior knowledge) playing `script`, one step per stream in
/// the order they arrive, the last for all after it. Returns its base URL.
async fn server(script: Vec<Step>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Seen::default();
    let recorded = seen.clone();
    let streams = Arc::new(AtomicUsize::new(0));
    let step = move |n: usize| script[n.min(script.len() - 1)];
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            // The client sends one request at a time: the next stream is the
            // first on this connection.
            match step(streams.load(Ordering::SeqCst)) {
                Step::GoAway(reason) => {
                    streams.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(go_away(tcp, reason, recorded.clone()));
                }
                _ => {
                    let (step, streams, seen) = (step.clone(), streams.clone(), recorded.clone());
                    tokio::spawn(async move {
                        let mut connection = h2::server::handshake(tcp).await.unwrap();
                        while let Some(Ok((request, respond))) = connection.accept().await {
                            let step = step(streams.fetch_add(1, Ordering::SeqCst));
                            tokio::spawn(answer(request.into_body(), respond, step, seen.clone()));
                        }
                    });
                }
            }
        }
    });
    (url, seen)
}

/// Reads a stream's request body, records it, and plays `step` on it.
async fn answer(
    mut body: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
    step: Step,
    seen: Seen,
) {
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    seen.lock().unwrap().push(Some(Bytes::from(bytes)));
    match step {
        Step::Reset(reason) => respond.send_reset(reason),
        Step::Token => {
            let head = Response::builder()
                .header("content-type", "application/json")
                .body(())
                .unwrap();
            let mut send = respond.send_response(head, false).unwrap();
            send.send_data(Bytes::from_static(TOKEN), true).unwrap();
        }
        Step::GoAway(_) => panic!("a GOAWAY step opens a connection"),
    }
}

/// Plays HTTP/2 by hand, as h2's server cannot send a `GOAWAY` below a stream
/// it has read: the server's SETTINGS, the client's preface and frames up to
/// its request's HEADERS, then `GOAWAY` (last stream id 0, `reason`).
async fn go_away(mut tcp: TcpStream, reason: Reason, seen: Seen) {
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut preface = [0; 24];
    tcp.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    loop {
        let mut head = [0; 9];
        tcp.read_exact(&mut head).await.unwrap();
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; length];
        tcp.read_exact(&mut payload).await.unwrap();
        // HEADERS
        if head[3] == 1 {
            break;
        }
    }
    seen.lock().unwrap().push(None);
    // GOAWAY: length 8, type 7, no flags, stream 0; last stream id 0, reason.
    let mut frame = vec![0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    frame.extend_from_slice(&u32::from(reason).to_be_bytes());
    tcp.write_all(&frame).await.unwrap();
    // Everything the client sends is read, so that the close is no reset.
    let _ = tokio::io::copy(&mut tcp, &mut tokio::io::sink()).await;
}

/// The h2c clients the layer is built with.
#[derive(Clone, Copy, Debug)]
enum Client {
    Reqwest,
    HyperUtil,
}

const CLIENTS: [Client; 2] = [Client::Reqwest, Client::HyperUtil];

/// What one password grant against `script` ends in, through `client`,
/// within the guard, and the bodies the server read.
async fn fetch(client: Client, script: Vec<Step>) -> (Result<String, Error>, Vec<Option<Bytes>>) {
    let (url, seen) = server(script).await;
    let builder = VoltAuthLayer::builder(Credentials::new("h2-id", SECRET, "h2-user", PASSWORD))
        .base_url(&url)
        // Never what ends a case on a loaded machine.
        .token_timeout(Duration::from_secs(30));
    let auth = match client {
        Client::Reqwest => {
            let client = reqwest::Client::builder()
                .http2_prior_knowledge()
                .no_proxy()
                .build()
                .unwrap();
            builder.build(ReqwestTransport::new(client))
        }
        Client::HyperUtil => builder.build(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http::<Full<Bytes>>(),
        ),
    }
    .unwrap();
    let result = tokio::time::timeout(common::GUARD, auth.access_token())
        .await
        .expect("an answer within the guard")
        .map(|token| token.expose_secret().to_owned());
    let seen = seen.lock().unwrap().clone();
    (result, seen)
}

fn transport(client: Client, result: &Result<String, Error>) {
    assert!(
        matches!(
            result,
            Err(Error::Transport {
                grant: GrantType::Password,
                ..
            })
        ),
        "{client:?}: {result:?}"
    );
}

/// The first stream is refused (`REFUSED_STREAM`), the second answered: the
/// same grant went out twice, byte for byte, and the token came back. The
/// retry is logged at DEBUG; nothing at WARN.
#[tokio::test]
async fn a_refused_stream_is_sent_once_more() {
    for client in CLIENTS {
        let (capture, _guard) = common::log::scoped();
        let (result, seen) = fetch(
            client,
            vec![Step::Reset(Reason::REFUSED_STREAM), Step::Token],
        )
        .await;
        assert_eq!(
            result.as_deref().ok(),
            Some("at-h2"),
            "{client:?}: {result:?}"
        );
        assert_eq!(seen.len(), 2, "{client:?}");
        let first = seen[0].as_ref().unwrap();
        assert!(first.starts_with(b"grant_type=password&"), "{first:?}");
        assert_eq!(seen[0], seen[1], "{client:?}");
        let events = common::log::events(&capture);
        let retries = events
            .iter()
            .filter(|event| event.text.contains("sending the grant again"))
            .count();
        assert_eq!(retries, 1, "{client:?}: {events:?}");
        assert!(
            !events
                .iter()
                .any(|event| event.level <= tracing::Level::WARN),
            "{client:?}: {events:?}"
        );
        let log = capture.text();
        assert!(!log.contains(SECRET) && !log.contains(PASSWORD), "{log}");
    }
}

/// Every stream refused: two requests, then the transport error.
#[tokio::test]
async fn a_grant_refused_every_time_is_sent_twice() {
    for client in CLIENTS {
        let (result, seen) = fetch(client, vec![Step::Reset(Reason::REFUSED_STREAM)]).await;
        transport(client, &result);
        assert_eq!(seen.len(), 2, "{client:?}");
    }
}

/// A reset for any other reason may come after the server acted on the
/// request: one request, the transport error.
#[tokio::test]
async fn a_stream_reset_for_another_reason_is_not_sent_again() {
    for client in CLIENTS {
        for reason in [Reason::INTERNAL_ERROR, Reason::CANCEL] {
            let (result, seen) = fetch(client, vec![Step::Reset(reason)]).await;
            transport(client, &result);
            assert_eq!(seen.len(), 1, "{client:?} {reason:?}");
        }
    }
}

/// A graceful `GOAWAY` whose last stream id is below the request's: sent
/// again on a new connection, which answers the token.
#[tokio::test]
async fn a_stream_a_graceful_goaway_left_unprocessed_is_sent_once_more() {
    for client in CLIENTS {
        let (result, seen) = fetch(client, vec![Step::GoAway(Reason::NO_ERROR), Step::Token]).await;
        assert_eq!(
            result.as_deref().ok(),
            Some("at-h2"),
            "{client:?}: {result:?}"
        );
        assert_eq!(seen.len(), 2, "{client:?}");
    }
}

/// A `GOAWAY` for an error is no graceful shutdown: one request, the transport
/// error.
#[tokio::test]
async fn a_goaway_for_an_error_is_not_sent_again() {
    for client in CLIENTS {
        let (result, seen) = fetch(
            client,
            vec![Step::GoAway(Reason::INTERNAL_ERROR), Step::Token],
        )
        .await;
        transport(client, &result);
        assert_eq!(seen.len(), 1, "{client:?}");
    }
}

/// An API request an HTTP/2 server refused unprocessed is sent again by
/// reqwest itself when it can clone the body: a request without a body, as
/// through `VoltAuthMiddleware`, so through `VoltAuth` over `ReqwestTransport`
/// (which makes only bodies with bytes ones reqwest cannot clone). One token,
/// no 401, no replay: three streams (the grant, the refused request, and the
/// request again).
#[tokio::test]
async fn an_api_request_without_a_body_refused_unprocessed_is_sent_again_either_way() {
    use tower::{Service, ServiceBuilder, ServiceExt};

    for middleware in [true, false] {
        let (url, seen) = server(vec![
            Step::Token,
            Step::Reset(Reason::REFUSED_STREAM),
            Step::Token,
        ])
        .await;
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .no_proxy()
            .build()
            .unwrap();
        let auth = VoltAuthLayer::builder(Credentials::new("h2-id", SECRET, "h2-user", PASSWORD))
            .base_url(&url)
            .token_timeout(Duration::from_secs(30))
            .build(ReqwestTransport::new(client.clone()))
            .unwrap();
        let banks = format!("{url}/banks");
        let status = if middleware {
            let api = reqwest_middleware::ClientBuilder::new(client)
                .with(auth.middleware())
                .build();
            tokio::time::timeout(common::GUARD, api.get(&banks).send())
                .await
                .expect("an answer within the guard")
                .map(|response| response.status())
                .map_err(|error| format!("{error:?}"))
        } else {
            let mut api = ServiceBuilder::new()
                .layer(auth.clone())
                .service(ReqwestTransport::new(client));
            let request = http::Request::get(&banks)
                .body(reqwest::Body::default())
                .unwrap();
            let api = api.ready().await.unwrap();
            tokio::time::timeout(common::GUARD, api.call(request))
                .await
                .expect("an answer within the guard")
                .map(|response| response.status())
                .map_err(|error| format!("{error:?}"))
        };
        assert_eq!(status, Ok(http::StatusCode::OK), "middleware: {middleware}");
        assert_eq!(seen.lock().unwrap().len(), 3, "middleware: {middleware}");
        assert_eq!(
            auth.stats().password.succeeded,
            1,
            "middleware: {middleware}"
        );
        assert_eq!(auth.stats().replays, 0, "middleware: {middleware}");
    }
}
