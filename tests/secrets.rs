//! Secrets a hostile or careless `/oauth` echoes back, in the spellings it
//! may echo them in: form-encoded, percent-encoded, JSON-escaped,
//! HTML-escaped, in another case. None may reach an error's `Display`/`Debug`
//! or the log.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use volt_auth::{Api, Credentials, Endpoint, Error, VoltAuthLayer};

mod common;

use common::log::{capture, log_text};

/// Strong secrets hold characters that form and JSON encodings change.
const CLIENT_SECRET: &str = "cs+Zm9v/YmFy=Q";
const PASSWORD: &str = "Pa55 w0rd/+&=\"q\\u!";
const REFRESH_TOKEN: &str = "rt+ab/cdEF==";
const ACCESS_TOKEN: &str = "at-ok-0123";

/// How the hostile server spells the request it echoes.
#[derive(Clone, Copy, Debug)]
enum Echo {
    /// The request body as it came (form-encoded or JSON text).
    Raw,
    /// The request body upper-cased.
    Upper,
    /// The body's fields decoded, then percent-encoded with `%20` and
    /// lower-case hex, as JavaScript's `encodeURIComponent` and many loggers do.
    Percent,
    /// The body's JSON text with `/` escaped, as PHP's `json_encode` writes it.
    PhpJson,
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02x}"),
        })
        .collect()
}

/// The fields of a form or JSON `/oauth` body.
fn fields(body: &[u8]) -> Vec<(String, String)> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        return map
            .into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
            .collect();
    }
    serde_urlencoded::from_bytes(body).unwrap()
}

fn echo(echo: Echo, body: &[u8]) -> String {
    let raw = String::from_utf8_lossy(body).into_owned();
    match echo {
        Echo::Raw => raw,
        Echo::Upper => raw.to_uppercase(),
        Echo::Percent => fields(body)
            .iter()
            .map(|(k, v)| format!("{k}={}", percent(v)))
            .collect::<Vec<_>>()
            .join("&"),
        Echo::PhpJson => raw.replace('/', "\\/"),
    }
}

/// A `/oauth` that issues one token (with a refresh token), then answers
/// every grant with a 400 whose every message field echoes the request.
fn layer(api: Api, how: Echo) -> VoltAuthLayer {
    let transport = token_then(move |body| {
        let echoed = echo(how, &body);
        let answer = serde_json::json!({
            "error": "invalid_grant",
            "error_description": format!("bad request: {echoed}"),
        });
        let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        Ok(response)
    });
    VoltAuthLayer::builder(Credentials::new("cid", CLIENT_SECRET, "user", PASSWORD))
        .endpoint(
            Endpoint::custom("http://127.0.0.1:9")
                .unwrap()
                .with_api(api),
        )
        .build(transport)
        .unwrap()
}

/// A `/oauth` transport that answers the first grant with a token (and a
/// refresh token), and every later one with `later` of the grant's body.
fn token_then<F>(
    later: F,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Outer,
    Future: Send,
> + Clone
+ Send
+ Sync
+ 'static
where
    F: Fn(Bytes) -> Result<Response<Full<Bytes>>, Outer> + Clone + Send + Sync + 'static,
{
    let calls = Arc::new(Mutex::new(0usize));
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        let (calls, later) = (calls.clone(), later.clone());
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let first = {
                let mut calls = calls.lock().unwrap();
                *calls += 1;
                *calls == 1
            };
            if !first {
                return later(body);
            }
            let token = serde_json::json!({
                "access_token": ACCESS_TOKEN,
                "token_type": "Bearer",
                "expires_in": 3600,
                "refresh_token": REFRESH_TOKEN,
            });
            Ok(Response::new(Full::new(Bytes::from(token.to_string()))))
        }
    })
}

/// Every spelling of `secret` that gives it away.
fn spellings(secret: &str) -> Vec<String> {
    let form = serde_urlencoded::to_string([("", secret)]).unwrap();
    let form = form.strip_prefix('=').unwrap().to_owned();
    let json = serde_json::to_string(secret).unwrap();
    let json = json[1..json.len() - 1].to_owned();
    vec![
        secret.to_owned(),
        secret.to_uppercase(),
        form.clone(),
        form.to_uppercase(),
        form.replace('+', "%20"),
        percent(secret),
        json.clone(),
        json.replace('/', "\\/"),
        json.to_uppercase(),
    ]
}

fn assert_hidden(text: &str, what: &str) {
    for secret in [CLIENT_SECRET, PASSWORD, REFRESH_TOKEN] {
        for spelling in spellings(secret) {
            assert!(
                !text.contains(&spelling),
                "{what} shows {secret:?} as {spelling:?}:\n{text}"
            );
        }
    }
    assert!(!text.contains(ACCESS_TOKEN), "{what}:\n{text}");
}

async fn run(api: Api, how: Echo) {
    capture();
    let auth = layer(api, how);
    let token = auth.access_token().await.unwrap();
    // A 401 outside the layer: the refresh grant (refresh token, client
    // secret) is rejected, then the password grant (client secret, password).
    auth.reject(&token);
    drop(token);
    let err = auth.access_token().await.unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    let Error::Rejected { response, .. } = &err else {
        unreachable!()
    };
    let message = response.message.clone().unwrap_or_default();
    assert!(message.contains("[redacted]"), "{message}");
    let what = format!("{api:?}/{how:?}");
    assert_hidden(&format!("{err} | {err:?}"), &format!("{what}: the error"));
    let log = log_text();
    // The log did see this rejection, with the server's message.
    assert!(log.contains(&format!("error={err}")), "{what}:\n{log}");
    assert_hidden(&log, &format!("{what}: the log"));
}

#[tokio::test]
async fn form_body_echoed_as_sent_is_scrubbed() {
    run(Api::Gateway, Echo::Raw).await;
}

#[tokio::test]
async fn json_body_echoed_as_sent_is_scrubbed() {
    run(Api::Global, Echo::Raw).await;
}

#[tokio::test]
async fn json_body_echoed_with_php_slashes_is_scrubbed() {
    run(Api::Global, Echo::PhpJson).await;
}

#[tokio::test]
async fn fields_echoed_percent_encoded_are_scrubbed() {
    run(Api::Gateway, Echo::Percent).await;
}

#[tokio::test]
async fn form_body_echoed_upper_case_is_scrubbed() {
    run(Api::Gateway, Echo::Upper).await;
}

#[tokio::test]
async fn json_body_echoed_upper_case_is_scrubbed() {
    run(Api::Global, Echo::Upper).await;
}

/// A password grant whose `/oauth` answers 400 `invalid_grant`, with
/// `describe(request body)` as the `error_description`: the error's
/// `Display`, `Debug` and pretty `Debug`, the stats, and the log.
async fn rejection<F>(credentials: Credentials, api: Api, describe: F) -> String
where
    F: Fn(&[u8]) -> String + Clone + Send + Sync + 'static,
{
    capture();
    let transport = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let describe = describe.clone();
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let answer = serde_json::json!({
                "error": "invalid_grant",
                "error_description": describe(&body),
            });
            let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let auth = VoltAuthLayer::builder(credentials)
        .endpoint(
            Endpoint::custom("http://127.0.0.1:9")
                .unwrap()
                .with_api(api),
        )
        .build(transport)
        .unwrap();
    let err = auth.access_token().await.unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    let log = log_text();
    // The log did see this rejection, with the server's message.
    assert!(log.contains(&format!("error={err}")), "{log}");
    format!("{err} | {err:?} | {err:#?} | {:?} | {log}", auth.stats())
}

/// `Credentials::new` keeps the whitespace around a secret, but a server's
/// message loses the whitespace at its ends before it is scrubbed: a secret
/// echoed at the start or the end of the message no longer matched, and
/// showed without that whitespace.
#[tokio::test]
async fn a_secret_echoed_at_an_end_of_the_message_is_scrubbed() {
    const SECRET: &str = "cs-trailing-7c1f \n";
    const PASSWORD: &str = "  pw-leading-9e2a";
    let credentials = Credentials::new("cid", SECRET, "user", PASSWORD);
    let shown = rejection(credentials, Api::Gateway, |body| {
        let fields = fields(body);
        let field = |name: &str| {
            fields
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
                .unwrap()
        };
        format!(
            "{} is not the password of user; nor is this the secret: {}",
            field("password"),
            field("client_secret")
        )
    })
    .await;
    for secret in ["cs-trailing-7c1f", "pw-leading-9e2a"] {
        assert!(!shown.contains(secret), "shows {secret:?}:\n{shown}");
    }
    assert!(shown.contains("is not the password of user"), "{shown}");
}

/// Secrets holding the characters that HTML-safe JSON encoders escape.
const HTML_SECRET: &str = "cs+<Zm9v>&'q`";
const HTML_PASSWORD: &str = "Pa55&w0rd<\"é\">+";

/// A JSON object of the request's fields, as an encoder that writes every
/// character `escaped` picks as `\uXXXX` (hex in `case`) would.
fn html_safe_json(body: &[u8], escaped: fn(char) -> bool, upper_hex: bool) -> String {
    let members: Vec<String> = fields(body)
        .iter()
        .map(|(name, value)| {
            let mut text = String::new();
            for c in value.chars() {
                if escaped(c) {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        text.push_str(&if upper_hex {
                            format!("\\u{unit:04X}")
                        } else {
                            format!("\\u{unit:04x}")
                        });
                    }
                } else if c == '"' || c == '\\' {
                    text.push('\\');
                    text.push(c);
                } else {
                    text.push(c);
                }
            }
            format!("\"{name}\":\"{text}\"")
        })
        .collect();
    format!("{{{}}}", members.join(","))
}

/// Go's `encoding/json` escapes `<`, `>` and `&` (and U+2028, U+2029) as
/// `\u003c`, `\u003e`, `\u0026`: a server in Go that puts the request it
/// could not take into its message writes a secret so.
#[tokio::test]
async fn json_echoed_html_safe_as_go_writes_it_is_scrubbed() {
    let escaped = |c: char| matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}');
    let credentials = Credentials::new("cid", HTML_SECRET, "user", HTML_PASSWORD);
    let shown = rejection(credentials, Api::Global, move |body| {
        format!("cannot decode {}", html_safe_json(body, escaped, false))
    })
    .await;
    for secret in [
        "cs+\\u003cZm9v\\u003e\\u0026'q`",
        "Pa55\\u0026w0rd\\u003c\\\"é\\\"\\u003e+",
    ] {
        assert!(!shown.contains(secret), "shows {secret:?}:\n{shown}");
    }
    assert!(shown.contains("cannot decode"), "{shown}");
}

/// .NET's `System.Text.Json` escapes `"`, `&`, `'`, `+`, `<`, `>`, `` ` ``
/// and every non-ASCII character as `\uXXXX` with upper-case hex.
#[tokio::test]
async fn json_echoed_html_safe_as_dotnet_writes_it_is_scrubbed() {
    let escaped = |c: char| !c.is_ascii() || "\"&'+<>`".contains(c);
    let credentials = Credentials::new("cid", HTML_SECRET, "user", HTML_PASSWORD);
    let shown = rejection(credentials, Api::Gateway, move |body| {
        format!("cannot decode {}", html_safe_json(body, escaped, true))
    })
    .await;
    for secret in [
        "cs\\u002B\\u003CZm9v\\u003E\\u0026\\u0027q\\u0060",
        "Pa55\\u0026w0rd\\u003C\\u0022\\u00E9\\u0022\\u003E\\u002B",
    ] {
        assert!(!shown.contains(secret), "shows {secret:?}:\n{shown}");
    }
    assert!(shown.contains("cannot decode"), "{shown}");
}

/// `text` HTML-escaped: `&`, `<` and `>` as named entities, and each
/// character of `table` as its entity.
fn html_escaped(text: &str, table: &[(char, &str)]) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            c => table
                .iter()
                .find(|(escaped, _)| *escaped == c)
                .map_or_else(|| c.to_string(), |(_, entity)| (*entity).to_owned()),
        })
        .collect()
}

/// An HTML error page echoing the fields it could not take, as Python's
/// `html.escape` (`&quot;`, `&#x27;`) and Go's `html/template` (`&#34;`,
/// `&#39;`, `&#43;`) write them.
#[tokio::test]
async fn fields_echoed_html_escaped_are_scrubbed() {
    const PYTHON: &[(char, &str)] = &[('"', "&quot;"), ('\'', "&#x27;")];
    const GO: &[(char, &str)] = &[('"', "&#34;"), ('\'', "&#39;"), ('+', "&#43;")];
    let credentials = Credentials::new("cid", HTML_SECRET, "user", HTML_PASSWORD);
    let shown = rejection(credentials, Api::Gateway, |body| {
        let fields: Vec<String> = fields(body)
            .iter()
            .filter(|(name, _)| name == "client_secret" || name == "password")
            .map(|(name, value)| {
                format!(
                    "<dt>{name}</dt><dd>{}</dd><dd>{}</dd>",
                    html_escaped(value, PYTHON),
                    html_escaped(value, GO)
                )
            })
            .collect();
        format!("<p>Bad request</p><dl>{}</dl>", fields.concat())
    })
    .await;
    for secret in [HTML_SECRET, HTML_PASSWORD] {
        for table in [PYTHON, GO] {
            let spelling = html_escaped(secret, table);
            assert!(!shown.contains(&spelling), "shows {spelling:?}:\n{shown}");
        }
    }
    assert!(shown.contains("<p>Bad request</p>"), "{shown}");
}

/// A server that changes the case of the request it echoes changes that of
/// non-ASCII letters too: `ä` becomes `Ä`, `ß` becomes `SS`. Secrets were
/// matched ignoring ASCII case only.
#[tokio::test]
async fn non_ascii_secrets_echoed_in_another_case_are_scrubbed() {
    const SECRET: &str = "Clé-Secrète-Ünï-4";
    const PASSWORD: &str = "Pässwörd-Straße-7";
    type Change = fn(&str) -> String;
    let changes: [(Change, &str); 2] = [(str::to_uppercase, "upper"), (str::to_lowercase, "lower")];
    for (change, how) in changes {
        let credentials = Credentials::new("cid", SECRET, "user", PASSWORD);
        let shown = rejection(credentials, Api::Global, move |body| {
            format!("bad request: {}", change(&String::from_utf8_lossy(body)))
        })
        .await;
        for secret in [SECRET, PASSWORD] {
            for spelling in [secret.to_uppercase(), secret.to_lowercase()] {
                assert!(
                    !shown.contains(&spelling),
                    "{how}: shows {secret:?} as {spelling:?}:\n{shown}"
                );
            }
        }
        assert!(shown.to_lowercase().contains("bad request"), "{shown}");
    }
}

/// The reqwest middleware and `ReqwestTransport` over TCP: every
/// `Authorization` the middleware attaches (first token, cached token,
/// replay after a 401) is sensitive, `Debug` of the requests hides it, and
/// neither the log nor a hostile `/oauth`'s error shows a secret or a token.
#[cfg(feature = "reqwest")]
mod reqwest_path {
    use std::sync::{Arc, Mutex};

    use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
    use reqwest_middleware::{Middleware, Next};
    use volt_auth::VoltAuthLayer;
    use volt_auth::mock::{self, MockVolt};
    use volt_auth::reqwest::ReqwestTransport;

    use super::{capture, log_text};

    /// After the auth middleware: records each request's `Authorization`
    /// sensitivity and its `Debug`.
    /// Per request: whether its `Authorization` was sensitive, and its `Debug`.
    type Seen = Vec<(Option<bool>, String)>;

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Seen>>);

    impl Middleware for Recorder {
        fn handle<'a, 'b, 'c, 'd>(
            &'a self,
            request: reqwest::Request,
            extensions: &'b mut http::Extensions,
            next: Next<'c>,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = reqwest_middleware::Result<reqwest::Response>>
                    + Send
                    + 'd,
            >,
        >
        where
            'a: 'd,
            'b: 'd,
            'c: 'd,
            Self: 'd,
        {
            let sensitive = request
                .headers()
                .get(AUTHORIZATION)
                .map(|v| v.is_sensitive());
            self.0
                .lock()
                .unwrap()
                .push((sensitive, format!("{request:?}")));
            Box::pin(next.run(request, extensions))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reqwest_headers_are_sensitive_and_nothing_leaks() {
        capture();
        let volt = MockVolt::start().await.unwrap();
        let client = reqwest::Client::new();
        let auth = VoltAuthLayer::builder(volt.credentials())
            .base_url(&volt.url())
            .build(ReqwestTransport::new(client.clone()))
            .unwrap();
        let recorder = Recorder::default();
        let api = reqwest_middleware::ClientBuilder::new(client.clone())
            .with(auth.middleware())
            .with(recorder.clone())
            .build();
        let banks = format!("{}/banks", volt.url());
        // First token (waits for the grant), then the cached one.
        for _ in 0..2 {
            let response = api.get(&banks).send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
        // A 401, then the replay with the new token.
        volt.revoke_access_tokens();
        let response = api
            .post(format!("{}/v2/payments", volt.url()))
            .header(CONTENT_TYPE, "application/json")
            .body(r#"{"amount":1,"currencyCode":"EUR"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(auth.stats().replays, 1);

        // A hostile `/oauth` echoing everything, on a layer with no token.
        let other = VoltAuthLayer::builder(volt.credentials())
            .base_url(&volt.url())
            .build(ReqwestTransport::new(client.clone()))
            .unwrap();
        let other_api = reqwest_middleware::ClientBuilder::new(client)
            .with(other.middleware())
            .build();
        volt.fail_oauth(
            1,
            http::StatusCode::UNAUTHORIZED,
            format!(
                r#"{{"error":"invalid_client","error_description":"secret {} password {}"}}"#,
                mock::CLIENT_SECRET,
                mock::PASSWORD
            ),
        );
        let err = other_api.get(&banks).send().await.unwrap_err();
        let shown = format!("{err} | {err:?} | {err:#?}");

        let recorded = recorder.0.lock().unwrap().clone();
        assert_eq!(recorded.len(), 4, "{recorded:?}");
        let mut secrets = vec![mock::CLIENT_SECRET.to_owned(), mock::PASSWORD.to_owned()];
        secrets.extend(volt.issued_access_tokens());
        secrets.extend(volt.issued_refresh_tokens());
        let log = log_text();
        for (sensitive, debug) in &recorded {
            assert_eq!(*sensitive, Some(true), "{debug}");
            for secret in &secrets {
                assert!(!debug.contains(secret.as_str()), "{debug}");
            }
        }
        for secret in &secrets {
            assert!(!shown.contains(secret.as_str()), "{shown}");
            assert!(!log.contains(secret.as_str()), "{log}");
        }
        assert!(shown.contains("[redacted]"), "{shown}");
    }
}

/// The mock records what each `/oauth` request carried; its `Debug` (printed
/// by any failing assertion that shows the records) hides the secrets.
#[tokio::test]
async fn mock_oauth_request_debug_hides_secrets() {
    use volt_auth::mock::{self, MockVolt};
    let volt = MockVolt::builder().in_process();
    let auth = VoltAuthLayer::builder(volt.credentials())
        .base_url(&volt.url())
        .build(volt.service())
        .unwrap();
    let token = auth.access_token().await.unwrap();
    auth.reject(&token);
    drop(token);
    auth.access_token().await.unwrap();
    let requests = volt.oauth_requests();
    assert_eq!(requests.len(), 2);
    // The values stay reachable for assertions.
    assert_eq!(requests[0].field("password"), Some(mock::PASSWORD));
    let shown = format!("{requests:?} {requests:#?}");
    let mut secrets = vec![mock::CLIENT_SECRET.to_owned(), mock::PASSWORD.to_owned()];
    secrets.extend(volt.issued_refresh_tokens());
    for secret in &secrets {
        assert!(!shown.contains(secret.as_str()), "{secret}: {shown}");
    }
    assert!(
        shown.contains("grant_type") && shown.contains(mock::CLIENT_ID),
        "{shown}"
    );
}

/// A transport's error with a cause, as clients nest them: its own text,
/// and the I/O error under it.
#[derive(Debug)]
struct Outer(&'static str, std::io::Error);

impl std::fmt::Display for Outer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Outer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.1)
    }
}

/// A transport error says why `/oauth` could not be reached only in its
/// causes: the attempt's warning carries them, scrubbed, as the transport
/// is any service and may describe the request it failed to send.
#[tokio::test]
async fn a_transport_errors_causes_are_logged_without_the_secrets() {
    capture();
    let transport = tower::service_fn(|request: Request<Full<Bytes>>| async move {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let careless = format!(
            "tcp connect error 7f3e: refused, sent {}",
            String::from_utf8_lossy(&body)
        );
        Err::<Response<Full<Bytes>>, _>(Outer(
            "client error (Connect)",
            std::io::Error::other(careless),
        ))
    });
    let auth = VoltAuthLayer::builder(Credentials::new("id", CLIENT_SECRET, "user", PASSWORD))
        .base_url("http://127.0.0.1:9")
        .build(transport)
        .unwrap();
    let err = auth.access_token().await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    let log = log_text();
    let line = log
        .lines()
        .find(|line| line.contains("tcp connect error 7f3e"))
        .unwrap_or_else(|| panic!("no warning with the cause:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("cause=\"client error (Connect): tcp connect error 7f3e: refused, sent"),
        "{line}"
    );
    assert!(line.contains("[redacted]"), "{line}");
    assert_hidden(line, "the warning");
}

/// Credentials replaced while a grant is at the transport: the grant's
/// transport error is scrubbed of the secret and password it was sent with,
/// not of the new ones (which it never saw).
#[tokio::test]
async fn a_transport_errors_causes_are_scrubbed_of_the_credentials_they_were_sent_with() {
    capture();
    let (arrived_tx, arrived_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let gates = Arc::new(Mutex::new(Some((arrived_tx, release_rx))));
    let transport = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let gate = gates.lock().unwrap().take();
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            if let Some((arrived, release)) = gate {
                arrived.send(()).unwrap();
                release.await.unwrap();
            }
            let careless = format!(
                "tcp connect error 9c1d: refused, sent {}",
                String::from_utf8_lossy(&body)
            );
            Err::<Response<Full<Bytes>>, _>(std::io::Error::other(careless))
        }
    });
    let auth = VoltAuthLayer::builder(Credentials::new("id", CLIENT_SECRET, "user", PASSWORD))
        .base_url("http://127.0.0.1:9")
        .build(transport)
        .unwrap();
    let waiting = tokio::spawn({
        let auth = auth.clone();
        async move { auth.access_token().await }
    });
    arrived_rx.await.unwrap();
    // Rotated while the first grant is at the transport.
    auth.set_credentials(Credentials::new(
        "id",
        "new-client-secret-1",
        "user",
        "new-password-1",
    ));
    release_tx.send(()).unwrap();
    let err = waiting.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    let log = log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("tcp connect error 9c1d"))
        .collect();
    // The first grant's warning, sent with the old credentials; the password
    // grant with the new ones that the rotation started may have failed too.
    assert!(!lines.is_empty(), "no warning with the cause:\n{log}");
    for line in lines {
        assert!(line.contains("[redacted]"), "{line}");
        assert_hidden(line, "the warning");
        assert!(!line.contains("new-password-1"), "{line}");
    }
}

/// A connection reset before any answer sends the grant once more and logs
/// that at DEBUG with the transport error's causes: scrubbed, as the
/// attempt's warning is, of the secrets the grant was sent with (the refresh
/// token too, on a refresh grant).
#[tokio::test]
async fn the_causes_logged_when_a_grant_is_sent_again_are_scrubbed() {
    capture();
    // The first grant gets a token with a refresh token; every later request
    // meets a reset whose text carries the body it was sent with.
    let transport = token_then(|body| {
        let careless = format!(
            "connection reset 5e2a, sent {}",
            String::from_utf8_lossy(&body)
        );
        Err(Outer(
            "client error (SendRequest)",
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, careless),
        ))
    });
    let auth = VoltAuthLayer::builder(Credentials::new("id", CLIENT_SECRET, "user", PASSWORD))
        .base_url("http://127.0.0.1:9")
        .build(transport)
        .unwrap();
    let token = auth.access_token().await.unwrap();
    auth.reject(&token);
    let err = auth.access_token().await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    let log = log_text();
    let retries: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("5e2a") && line.contains("sending the grant again"))
        .collect();
    assert_eq!(retries.len(), 1, "{log}");
    let line = retries[0];
    assert!(line.contains("DEBUG"), "{line}");
    assert!(line.contains("grant=refresh_token"), "{line}");
    assert!(
        line.contains("cause=\"client error (SendRequest): connection reset 5e2a, sent"),
        "{line}"
    );
    assert!(line.contains("[redacted]"), "{line}");
    assert_hidden(line, "the retry's event");
}
