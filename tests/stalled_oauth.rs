//! `/oauth` answers whose body stalls: the timeout covers reading the body
//! (under tokio's paused clock). Then hostile or broken answers over real TCP
//! on 127.0.0.1, through the crate's own client, from a server that plays a
//! script of bytes without pauses: each ends in a token or a typed error
//! without a secret, never a hang. Last, which failures send the grant once
//! more: only a connection closed before any answer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Full;
use tokio::time::Instant;
use volt_auth::{Credentials, Error, GrantType, VoltAuthLayer};

mod common;

/// A body that yields `first` (if any) and then never ends.
struct Stalled {
    first: Option<Bytes>,
}

impl Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            None => Poll::Pending,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_oauth_body_times_out() {
    for first in [None, Some(Bytes::from_static(b"{\"access_token\":\"a"))] {
        let calls = Arc::new(AtomicUsize::new(0));
        let transport = {
            let calls = calls.clone();
            tower::service_fn(move |_: Request<Full<Bytes>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let first = first.clone();
                async move { Ok::<_, Infallible>(Response::new(Stalled { first })) }
            })
        };
        let auth = VoltAuthLayer::builder(Credentials::new("id", "secret-x", "user", "pass-x"))
            .base_url("http://127.0.0.1:9")
            .token_timeout(Duration::from_secs(5))
            .build(transport)
            .unwrap();
        let started = Instant::now();
        let err = auth.access_token().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Timeout {
                    grant: GrantType::Password,
                    timeout,
                    ..
                } if timeout == Duration::from_secs(5)
            ),
            "{err:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile answers over real TCP, through the crate's own HTTPS client
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "tcp-client-secret";
const PASSWORD: &str = "tcp-pass&word=+";

/// One step of a scripted answer.
#[derive(Clone)]
enum Step {
    Write(Vec<u8>),
    /// Writes `chunk` as a chunked-encoding chunk, for ever.
    ChunksForever(usize),
    /// Resets the connection (`SO_LINGER` 0, then closed): the client reads
    /// what was written, then `ConnectionReset`.
    Reset,
}

/// A TCP server on 127.0.0.1 that reads one request per connection and plays
/// back the connection's script (the last for all after it), then closes the
/// connection: an empty script closes it unanswered. Returns its base URL and
/// the raw requests it read.
async fn raw_server(scripts: Vec<Vec<Step>>) -> (String, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        for connection in 0.. {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let script = scripts[connection.min(scripts.len() - 1)].clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                // The head, then as many body bytes as Content-Length says.
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = read_some(&stream, &mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .map_or(0, |n| n.trim().parse().unwrap());
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
                seen.lock().unwrap().push(request);
                for step in script {
                    match step {
                        Step::Write(bytes) => {
                            if write_all(&stream, &bytes).await.is_err() {
                                return;
                            }
                        }
                        Step::ChunksForever(size) => {
                            let mut chunk = format!("{size:x}\r\n").into_bytes();
                            chunk.extend(std::iter::repeat_n(b'a', size));
                            chunk.extend_from_slice(b"\r\n");
                            while write_all(&stream, &chunk).await.is_ok() {}
                            return;
                        }
                        Step::Reset => {
                            // A zero linger does not block the drop.
                            #[allow(deprecated)]
                            let _ = stream.set_linger(Some(Duration::ZERO));
                            return;
                        }
                    }
                }
                // Dropped: the connection closes.
            });
        }
    });
    (url, requests)
}

async fn read_some(stream: &tokio::net::TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            result => return result,
        }
    }
}

async fn write_all(stream: &tokio::net::TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn write(bytes: impl AsRef<[u8]>) -> Step {
    Step::Write(bytes.as_ref().to_vec())
}

/// A head and body with an exact Content-Length.
fn answer(status: &str, headers: &str, body: &[u8]) -> Step {
    let mut bytes = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    Step::Write(bytes)
}

const TOKEN: &[u8] = br#"{"access_token":"at-tcp","token_type":"bearer","expires_in":3600,"refresh_token":"rt-tcp"}"#;

/// What one password grant against `script` ends in, within the guard.
async fn fetch_over_tcp(script: Vec<Step>) -> Result<String, Error> {
    fetch_over_connections(vec![script]).await.0
}

/// What one password grant against a server playing `scripts` (one per
/// connection) ends in, within the guard, and the requests the server read.
async fn fetch_over_connections(scripts: Vec<Vec<Step>>) -> (Result<String, Error>, Vec<Vec<u8>>) {
    let (url, requests) = raw_server(scripts).await;
    let auth = VoltAuthLayer::builder(Credentials::new("tcp-id", SECRET, "tcp-user", PASSWORD))
        .base_url(&url)
        // Long enough never to be what ends a case on a loaded machine: a
        // case that should end by itself and hangs fails its check with
        // `Error::Timeout`.
        .token_timeout(Duration::from_secs(30))
        .build(volt_auth::client::https_client().unwrap())
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(60), auth.access_token())
        .await
        .expect("an answer within the guard");
    if let Err(err) = &result {
        let shown = format!("{err} {err:?} {:?}", std::error::Error::source(err));
        assert!(
            !shown.contains(SECRET) && !shown.contains("pass&word") && !shown.contains("at-tcp"),
            "{shown}"
        );
    }
    let requests = requests.lock().unwrap().clone();
    (
        result.map(|token| token.expose_secret().to_owned()),
        requests,
    )
}

fn invalid(result: &Result<String, Error>, status: u16, expected: &str) {
    match result {
        Err(Error::InvalidResponse {
            status: got,
            reason,
            grant,
            ..
        }) => {
            assert_eq!(
                (*grant, got.as_u16(), *reason),
                (GrantType::Password, status, expected)
            );
        }
        other => panic!("expected InvalidResponse({expected}), got {other:?}"),
    }
}

fn transport(result: &Result<String, Error>) {
    assert!(
        matches!(
            result,
            Err(Error::Transport {
                grant: GrantType::Password,
                ..
            })
        ),
        "{result:?}"
    );
}

/// Checks what a grant ended in.
type Check = Box<dyn Fn(&Result<String, Error>)>;

fn retry_after(result: &Result<String, Error>) -> Option<Duration> {
    match result {
        Err(Error::Failed { response, .. }) => response.retry_after(),
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// Each ends in a token or a typed error of its own (not the timeout).
#[tokio::test]
async fn hostile_answers_over_tcp_end_in_a_typed_error_or_a_token() {
    let gzip = [
        31u8, 139, 8, 0, 0, 0, 0, 0, 2, 3, 171, 86, 74, 76, 78, 78, 45, 46,
    ];
    let cases: Vec<(&str, Vec<Step>, Check)> = vec![
        (
            "HTTP/1.0, body delimited by the close",
            vec![
                write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"),
                write(TOKEN),
            ],
            Box::new(|r| assert_eq!(r.as_deref().ok(), Some("at-tcp"), "{r:?}")),
        ),
        (
            "chunked, in small pieces",
            vec![
                write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
                write(format!("{:x}\r\n", 10)),
                write(&TOKEN[..10]),
                write(format!("\r\n{:x}\r\n", TOKEN.len() - 10)),
                write(&TOKEN[10..]),
                write(b"\r\n0\r\n\r\n"),
            ],
            Box::new(|r| assert_eq!(r.as_deref().ok(), Some("at-tcp"), "{r:?}")),
        ),
        (
            "chunked for ever",
            vec![
                write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
                Step::ChunksForever(8192),
            ],
            Box::new(|r| invalid(r, 200, "the body is larger than 64 KiB")),
        ),
        (
            "Content-Length of 10 GB",
            vec![
                write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n"),
                write(vec![b'a'; 70_000]),
            ],
            Box::new(|r| invalid(r, 200, "the body is larger than 64 KiB")),
        ),
        (
            "Content-Length longer than the body, then the close",
            vec![
                write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"),
                write(TOKEN),
            ],
            Box::new(transport),
        ),
        (
            "103 Early Hints, then the answer",
            vec![
                write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"),
                answer("200 OK", "", TOKEN),
            ],
            Box::new(|r| assert_eq!(r.as_deref().ok(), Some("at-tcp"), "{r:?}")),
        ),
        (
            "HTTP/1.1, no length, delimited by the close",
            vec![
                write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"),
                write(TOKEN),
            ],
            Box::new(|r| assert_eq!(r.as_deref().ok(), Some("at-tcp"), "{r:?}")),
        ),
        (
            // Sent twice: hyper reports an incomplete message, as for a
            // connection that closed before any answer.
            "the connection closed in the head",
            vec![write(b"HTTP/1.1 200 OK\r\nContent-Le")],
            Box::new(transport),
        ),
        (
            "Content-Length shorter than the body",
            vec![
                write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n"),
                write(TOKEN),
            ],
            Box::new(|r| invalid(r, 200, "the body is not JSON")),
        ),
        (
            "gzip-encoded",
            vec![answer(
                "200 OK",
                "Content-Encoding: gzip\r\nContent-Type: application/json\r\n",
                &gzip,
            )],
            Box::new(|r| invalid(r, 200, "the body is not JSON")),
        ),
        (
            "invalid UTF-8",
            vec![answer("200 OK", "", b"{\"access_token\":\"at-\xff\xfe\"}")],
            Box::new(|r| invalid(r, 200, "the body is not JSON")),
        ),
        (
            "duplicate members: the last counts",
            vec![answer(
                "200 OK",
                "",
                br#"{"access_token":"at-first","access_token":"at-tcp2"}"#,
            )],
            Box::new(|r| assert_eq!(r.as_deref().ok(), Some("at-tcp2"), "{r:?}")),
        ),
        (
            "a token that cannot be a header",
            vec![answer(
                "200 OK",
                "",
                br#"{"access_token":"at\r\nX-Evil: 1"}"#,
            )],
            Box::new(|r| invalid(r, 200, "the access_token is not a valid header value")),
        ),
        (
            "token_type mac",
            vec![answer(
                "200 OK",
                "",
                br#"{"access_token":"at-tcp","token_type":"mac"}"#,
            )],
            Box::new(|r| invalid(r, 200, "the token_type is not bearer")),
        ),
        (
            "an HTML error page",
            vec![answer(
                "502 Bad Gateway",
                "Content-Type: text/html\r\n",
                b"<html><body>502 Bad Gateway</body></html>",
            )],
            Box::new(|r| match r {
                Err(Error::Failed { response, .. }) => {
                    assert_eq!(response.status, 502);
                    assert_eq!(
                        (response.code.as_deref(), response.message.as_deref()),
                        (None, None)
                    );
                }
                other => panic!("{other:?}"),
            }),
        ),
        (
            "503 with Retry-After in seconds",
            vec![answer(
                "503 Service Unavailable",
                "Retry-After: 120\r\n",
                b"",
            )],
            Box::new(|r| assert_eq!(retry_after(r), Some(Duration::from_secs(120)), "{r:?}")),
        ),
        (
            "429 with Retry-After as an HTTP-date",
            vec![answer(
                "429 Too Many Requests",
                "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\nRetry-After: Sun, 06 Nov 1994 08:50:07 GMT\r\n",
                b"{\"message\":\"slow down\"}",
            )],
            Box::new(|r| assert_eq!(retry_after(r), Some(Duration::from_secs(30)), "{r:?}")),
        ),
    ];
    for (name, script, check) in cases {
        // Printed, so that a failing check names its case.
        eprintln!("case: {name}");
        check(&fetch_over_tcp(script).await);
    }
}

/// The request: a POST of exactly the documented form to the path, with the
/// form's Content-Type and `Accept: application/json`, no secret in the URL
/// and no `Authorization` header.
#[tokio::test]
async fn the_grant_sent_over_tcp_is_exactly_the_form() {
    let (url, requests) = raw_server(vec![vec![answer("200 OK", "", TOKEN)]]).await;
    let auth = VoltAuthLayer::builder(Credentials::new("tcp-id", SECRET, "tcp user", PASSWORD))
        .base_url(&url)
        .build(volt_auth::client::https_client().unwrap())
        .unwrap();
    assert_eq!(auth.access_token().await.unwrap().expose_secret(), "at-tcp");
    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    let request = String::from_utf8(requests[0].clone()).unwrap();
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("POST /oauth HTTP/1.1"));
    let mut headers: Vec<String> = lines.map(str::to_ascii_lowercase).collect();
    headers.sort();
    let host = format!("host: {}", &url["http://".len()..]);
    let mut expected = vec![
        "accept: application/json".to_owned(),
        format!("content-length: {}", body.len()),
        "content-type: application/x-www-form-urlencoded;charset=utf-8".to_owned(),
        host,
    ];
    expected.sort();
    assert_eq!(headers, expected);
    assert_eq!(
        body,
        "grant_type=password&client_id=tcp-id&client_secret=tcp-client-secret\
         &username=tcp+user&password=tcp-pass%26word%3D%2B"
    );
}

// ---------------------------------------------------------------------------------------------
// A connection closed before any answer: the grant is sent once more
// ---------------------------------------------------------------------------------------------

/// The bodies of raw requests.
fn bodies(requests: &[Vec<u8>]) -> Vec<&[u8]> {
    requests
        .iter()
        .map(|request| {
            let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            &request[end + 4..]
        })
        .collect()
}

/// The first connection reads the request and closes unanswered (what a
/// request crossing a kept-alive connection's close on the wire meets): the
/// same grant goes out again at once, and its answer is the token. The retry
/// is logged at DEBUG, without a secret; nothing at WARN.
#[tokio::test]
async fn a_connection_closed_before_any_answer_is_tried_once_more() {
    let (capture, _guard) = common::log::scoped();
    let (result, requests) =
        fetch_over_connections(vec![vec![], vec![answer("200 OK", "", TOKEN)]]).await;
    assert_eq!(result.as_deref().ok(), Some("at-tcp"), "{result:?}");
    let bodies = bodies(&requests);
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0], bodies[1]);
    assert!(bodies[0].starts_with(b"grant_type=password&"));
    let events = common::log::events(&capture);
    let retries: Vec<_> = events
        .iter()
        .filter(|event| event.text.contains("sending the grant again"))
        .collect();
    assert_eq!(retries.len(), 1, "{events:?}");
    assert_eq!(retries[0].level, tracing::Level::DEBUG);
    assert!(retries[0].text.contains("cause="), "{:?}", retries[0]);
    assert!(
        !events
            .iter()
            .any(|event| event.level <= tracing::Level::WARN),
        "{events:?}"
    );
    let log = capture.text();
    assert!(!log.contains(SECRET) && !log.contains("pass&word"), "{log}");
}

/// Every connection closes unanswered: two requests, then the transport error.
#[tokio::test]
async fn a_grant_is_sent_at_most_twice() {
    let (result, requests) = fetch_over_connections(vec![vec![]]).await;
    transport(&result);
    assert_eq!(requests.len(), 2);
}

/// An answer's head arrived, then the connection closed in its body: the
/// server answered, so nothing is sent again.
#[tokio::test]
async fn a_connection_closed_in_the_body_is_not_tried_again() {
    let (result, requests) = fetch_over_connections(vec![vec![
        write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"),
        write(TOKEN),
    ]])
    .await;
    transport(&result);
    assert_eq!(requests.len(), 1);
}

/// An answer's head arrived, then the connection was reset in its body (a
/// reset anywhere else is sent again): nothing is sent again.
#[tokio::test]
async fn a_connection_reset_in_the_body_is_not_tried_again() {
    let (result, requests) = fetch_over_connections(vec![vec![
        write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"),
        write(TOKEN),
        Step::Reset,
    ]])
    .await;
    transport(&result);
    assert_eq!(requests.len(), 1);
}

/// A refused connection is not tried again: one call of the transport.
#[tokio::test]
async fn a_refused_connection_is_not_tried_again() {
    // Bound and never listening: refused. Kept bound, so that no other test
    // takes the port meanwhile.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let counting = {
        let calls = calls.clone();
        let client = volt_auth::client::https_client().unwrap();
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            client.request(request)
        })
    };
    let auth = VoltAuthLayer::builder(Credentials::new("id", SECRET, "user", PASSWORD))
        .base_url(&url)
        .build(counting)
        .unwrap();
    let result = auth.access_token().await.map(|_| String::new());
    transport(&result);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    drop(closed);
}
