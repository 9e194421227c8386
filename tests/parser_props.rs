//! Property tests of the `/oauth` answer parser, through the public API: a
//! tower service stands in for the token endpoint and answers an arbitrary
//! status and body; a layer is built on it and `access_token()` is called once
//! in a fresh runtime per case. Whatever the answer, there is no panic (the
//! refresh runs on a spawned task, where a panic would surface as
//! `Error::Interrupted`), exactly one `/oauth` call, and either a token or a
//! typed error that keeps the status, never shows a secret and holds no
//! control character.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};
use tokio::time::Instant;
use volt_auth::{AccessToken, Credentials, Error, GrantType, VoltAuthLayer};

const CLIENT_SECRET: &str = "s3cr3t-client-Kq9w";
const PASSWORD: &str = "p4ss-word-Zx7v";
/// The largest `/oauth` answer the layer reads.
const CAP: usize = 64 * 1024;
/// The longest lifetime the layer believes.
const MAX_LIFETIME: f64 = 366.0 * 24.0 * 3600.0;
const HOUR: Duration = Duration::from_secs(3600);

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// What one `access_token()` call against a canned answer produced.
struct Run {
    status: StatusCode,
    body_len: usize,
    /// Whether the layer reads the body as a JSON object: one under the cap,
    /// after any byte order mark.
    object: bool,
    result: Result<AccessToken, Error>,
    calls: usize,
    before: Instant,
    after: Instant,
}

fn run(status: u16, body: Vec<u8>) -> Run {
    let calls = Arc::new(AtomicUsize::new(0));
    let body = Bytes::from(body);
    let body_len = body.len();
    let object = body_len <= CAP
        && serde_json::from_slice::<HashMap<String, Box<RawValue>>>(
            body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&body),
        )
        .is_ok();
    let status = StatusCode::from_u16(status).expect("a status in 100..=999");
    let transport = {
        let calls = calls.clone();
        tower::service_fn(move |_: Request<Full<Bytes>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut response = Response::new(Full::new(body.clone()));
            *response.status_mut() = status;
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let auth = VoltAuthLayer::builder(Credentials::new(
        "client-id",
        CLIENT_SECRET,
        "api-user",
        PASSWORD,
    ))
    .base_url("http://127.0.0.1:9")
    .build(transport)
    .expect("valid configuration");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (result, before, after) = runtime.block_on(async {
        let before = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), auth.access_token())
            .await
            .expect("access_token() did not return");
        (result, before, Instant::now())
    });
    Run {
        status,
        body_len,
        object,
        result,
        calls: calls.load(Ordering::SeqCst),
        before,
        after,
    }
}

/// What holds for every answer; returns the run for more specific checks.
/// Whether the server's code refuses the grant, as `/oauth` codes do.
fn rejects(response: &volt_auth::ErrorResponse) -> bool {
    response.code.as_deref().is_some_and(|code| {
        [
            "invalid_grant",
            "invalid_request",
            "invalid_client",
            "unauthorized_client",
            "unauthorised",
            "unauthorized",
            "400",
            "401",
            "403",
        ]
        .iter()
        .any(|rejecting| code.eq_ignore_ascii_case(rejecting))
    })
}

fn check(run: &Run) {
    assert_eq!(run.calls, 1, "one access_token() call, one /oauth call");
    let success = run.status.is_success();
    match &run.result {
        Ok(token) => {
            assert!(success, "a token from HTTP {}", run.status);
            assert!(
                run.body_len <= CAP,
                "a token from a {} byte body",
                run.body_len
            );
            assert!(!token.expose_secret().is_empty());
            let header = token.header_value();
            assert!(header.is_sensitive());
            assert_eq!(
                header.as_bytes(),
                format!("Bearer {}", token.expose_secret()).as_bytes()
            );
            assert!(token.expires_at() >= run.before);
            let shown = format!("{token:?}");
            if token.expose_secret().len() >= 12 {
                assert!(!shown.contains(token.expose_secret()), "{shown}");
            }
        }
        Err(err) => {
            assert_eq!(err.grant(), Some(GrantType::Password), "{err:?}");
            match err {
                Error::InvalidResponse { status, .. } => {
                    assert_eq!(*status, run.status);
                    // An error status is classified by the status, whatever the body.
                    assert!(success, "{err:?}");
                }
                Error::Rejected { response, .. } | Error::Failed { response, .. } => {
                    assert_eq!(response.status, run.status);
                    // Under a 2xx, only an error body whose code refuses the
                    // grant is an error other than InvalidResponse.
                    assert!(
                        !success || (matches!(err, Error::Rejected { .. }) && rejects(response)),
                        "{err:?} from HTTP {}",
                        run.status
                    );
                    // Over the cap, an error status's body is not read.
                    assert!(
                        run.body_len <= CAP
                            || (!success && response.code.is_none() && response.message.is_none()),
                        "{err:?}"
                    );
                }
                other => panic!("not a parse outcome (a panic in the refresh?): {other:?}"),
            }
            assert_eq!(err.status(), Some(run.status));
            let shown = format!("{err} {err:?}");
            for secret in [CLIENT_SECRET, PASSWORD] {
                assert!(!shown.contains(secret), "{shown}");
            }
            let display = err.to_string();
            assert!(
                !display.chars().any(char::is_control),
                "a control character in {display:?}"
            );
            assert!(display.chars().count() < 1000, "{display}");
        }
    }
    if !success {
        let err = run
            .result
            .as_ref()
            .expect_err("an error for a non-2xx answer");
        // Whatever the body, and however long; a 403 only in JSON (Volt's,
        // not a WAF's or CDN's page in front of it).
        match err.status().map(|s| s.as_u16()) {
            Some(400 | 401) => assert!(err.is_rejected(), "{err:?}"),
            Some(403) => assert_eq!(err.is_rejected(), run.object, "{err:?}"),
            Some(500..=599) => assert!(matches!(err, Error::Failed { .. }), "{err:?}"),
            _ => {}
        }
    }
    if success && run.body_len > CAP {
        match &run.result {
            Err(Error::InvalidResponse { reason, .. }) => {
                assert_eq!(*reason, "the body is larger than 64 KiB")
            }
            other => panic!("a {} byte body gave {other:?}", run.body_len),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn any_status() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => 200..=299u16,
        2 => Just(200u16),
        1 => Just(400u16),
        1 => Just(401u16),
        1 => Just(403u16),
        1 => Just(429u16),
        2 => 500..=599u16,
        2 => 100..=999u16,
    ]
}

fn error_status() -> impl Strategy<Value = u16> {
    any_status().prop_filter("not 2xx", |status| !(200..=299).contains(status))
}

/// Text of every kind, the secrets and text around them included.
fn text() -> impl Strategy<Value = String> {
    let secret = prop_oneof![Just(CLIENT_SECRET), Just(PASSWORD)];
    prop_oneof![
        3 => ".{0,24}",
        2 => "[ -~]{0,24}",
        1 => "[\\x00-\\x1f\\x7f ]{0,6}",
        1 => Just(String::new()),
        2 => (".{0,8}", secret, "[\\x00-\\x1f]{0,2}", ".{0,8}")
            .prop_map(|(a, s, c, b)| format!("{a}{s}{c}{b}")),
        1 => "[a-z]{400,500}",
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{0,14}", inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// Whether a field value makes the answer usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Valid,
    Invalid,
    /// The parser may go either way (lenient or strict).
    Either,
}

/// A JSON member: `None` to leave it out, else its raw JSON text.
type Member = Option<String>;

fn raw(value: &Value) -> Member {
    Some(value.to_string())
}

fn is_b64token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
}

fn access_token() -> impl Strategy<Value = (Member, Verdict, Option<String>)> {
    let valid = prop_oneof![
        "[A-Za-z0-9._~+/=-]{1,120}",
        (
            "[A-Za-z0-9_-]{10,40}",
            "[A-Za-z0-9_-]{20,200}",
            "[A-Za-z0-9_-]{20,80}"
        )
            .prop_map(|(h, c, s)| format!("eyJ{h}.{c}.{s}")),
    ]
    .prop_map(|token| {
        (
            raw(&Value::from(token.clone())),
            Verdict::Valid,
            Some(token),
        )
    });
    let with_control = (
        "[A-Za-z0-9]{0,10}",
        "[\\x00-\\x08\\x0a-\\x1f\\x7f]",
        "[A-Za-z0-9]{0,10}",
    )
        .prop_map(|(a, c, b)| {
            let token = format!("{a}{c}{b}");
            (raw(&Value::from(token)), Verdict::Invalid, None)
        });
    let random = text().prop_map(|token| {
        let verdict = if is_b64token(&token) {
            Verdict::Valid
        } else if token.is_empty() || token.bytes().any(|b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
            Verdict::Invalid
        } else {
            Verdict::Either
        };
        let expected = (verdict == Verdict::Valid).then(|| token.clone());
        (raw(&Value::from(token)), verdict, expected)
    });
    let not_a_string = prop_oneof![
        Just(None),
        Just(raw(&Value::Null)),
        number().prop_map(|v| raw(&v)),
        any::<bool>().prop_map(|b| raw(&Value::Bool(b))),
        json_value()
            .prop_filter("not a string", |v| !v.is_string())
            .prop_map(|v| raw(&v)),
    ]
    .prop_map(|member| (member, Verdict::Invalid, None));
    prop_oneof![4 => valid, 1 => with_control, 2 => random, 2 => not_a_string]
}

fn token_type() -> impl Strategy<Value = (Member, Verdict)> {
    let bearer = prop::collection::vec(any::<bool>(), 6).prop_map(|upper| {
        let word: String = "bearer"
            .chars()
            .zip(upper)
            .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        (raw(&Value::from(word)), Verdict::Valid)
    });
    let other = prop_oneof![
        Just("mac"),
        Just("MAC"),
        Just("basic"),
        Just("Bearer2"),
        Just("pop"),
        Just("DPoP"),
    ]
    .prop_map(|word| (raw(&Value::from(word)), Verdict::Invalid));
    let random = "[a-zA-Z]{1,8}".prop_map(|word| {
        let verdict = if word.eq_ignore_ascii_case("bearer") {
            Verdict::Valid
        } else {
            Verdict::Invalid
        };
        (raw(&Value::from(word)), verdict)
    });
    prop_oneof![
        3 => bearer,
        2 => Just((None, Verdict::Valid)),
        1 => Just((raw(&Value::Null), Verdict::Valid)),
        2 => other,
        1 => random,
        1 => prop_oneof![Just(" bearer "), Just(""), Just("bearer\t")]
            .prop_map(|word| (raw(&Value::from(word)), Verdict::Either)),
        1 => json_value()
            .prop_filter("not a string or null", |v| !v.is_string() && !v.is_null())
            .prop_map(|v| (raw(&v), Verdict::Either)),
    ]
}

fn lifetime(secs: f64) -> Duration {
    Duration::from_secs_f64(secs.min(MAX_LIFETIME))
}

/// `expires_in`: the member, its verdict, and the lifetime it means.
fn expires_in() -> impl Strategy<Value = (Member, Verdict, Option<Duration>)> {
    let positive_int = prop_oneof![1..=100_000u64, 1..=u64::MAX].prop_map(|n| {
        (
            raw(&Value::from(n)),
            Verdict::Valid,
            Some(lifetime(n as f64)),
        )
    });
    let positive_float = prop_oneof![
        1e-3..1e7f64,
        Just(0.5f64),
        Just(1e300f64),
        Just(f64::MAX),
        Just(1e-300f64),
        Just(5e-324f64),
    ]
    // Below a second a token would be expired on arrival: refused.
    .prop_map(|f| {
        if f >= 1.0 {
            (raw(&Value::from(f)), Verdict::Valid, Some(lifetime(f)))
        } else {
            (raw(&Value::from(f)), Verdict::Invalid, None)
        }
    });
    // Number literals as a server could write them.
    let literal = prop_oneof![
        Just(("3600", 3600.0)),
        Just(("86400", 86400.0)),
        Just(("3.6e3", 3600.0)),
        Just(("1E+2", 100.0)),
        Just(("3600.000", 3600.0)),
        Just(("123456789012345678901234567890", 1.2345678901234568e29)),
    ]
    .prop_map(|(text, secs)| (Some(text.to_owned()), Verdict::Valid, Some(lifetime(secs))));
    let non_positive = prop_oneof![i64::MIN..=0i64, Just(0i64), Just(-1i64),]
        .prop_map(|n| (raw(&Value::from(n)), Verdict::Invalid, None));
    let non_positive_float = prop_oneof![Just(-0.5f64), Just(-1e300f64), -1e7..=0.0f64]
        .prop_map(|f| (raw(&Value::from(f)), Verdict::Invalid, None));
    let non_positive_literal = prop_oneof![
        Just("0"),
        Just("-0"),
        Just("0.0"),
        Just("-0.0"),
        Just("-1e400")
    ]
    .prop_map(|text| (Some(text.to_owned()), Verdict::Invalid, None));
    let numeric_string = (1..=100_000u64, "[ ]{0,2}").prop_map(|(n, pad)| {
        (
            raw(&Value::from(format!("{pad}{n}{pad}"))),
            Verdict::Either,
            Some(lifetime(n as f64)),
        )
    });
    let other = prop_oneof![
        text().prop_map(|t| raw(&Value::from(t))),
        any::<bool>().prop_map(|b| raw(&Value::Bool(b))),
        json_value()
            .prop_filter("an array or object", |v| v.is_array() || v.is_object())
            .prop_map(|v| raw(&v)),
    ]
    .prop_map(|member| (member, Verdict::Either, None));
    prop_oneof![
        2 => Just((None, Verdict::Valid, Some(HOUR))),
        1 => Just((raw(&Value::Null), Verdict::Valid, Some(HOUR))),
        3 => positive_int,
        2 => positive_float,
        2 => literal,
        1 => non_positive,
        1 => non_positive_float,
        1 => non_positive_literal,
        1 => numeric_string,
        1 => other,
    ]
}

/// `refresh_token`: absent, null or a string (other types: see
/// `a_refresh_token_of_another_type_keeps_the_access_token`).
fn refresh_token() -> impl Strategy<Value = Member> {
    prop_oneof![
        2 => Just(None),
        3 => "[A-Za-z0-9]{1,80}".prop_map(|t| raw(&Value::from(t))),
        1 => text().prop_map(|t| raw(&Value::from(t))),
        1 => Just(raw(&Value::Null)),
    ]
}

const KNOWN: [&str; 4] = ["access_token", "token_type", "expires_in", "refresh_token"];

fn extra_members() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (
            "[a-zA-Z_]{1,14}".prop_filter("an unknown member", |k| !KNOWN.contains(&k.as_str())),
            json_value(),
        ),
        0..4,
    )
    .prop_map(|members| {
        members
            .into_iter()
            .map(|(key, value)| (key, value.to_string()))
            .collect()
    })
}

/// A JSON object text from members in the given order.
fn object(members: &[(String, String)]) -> String {
    let inner: Vec<String> = members
        .iter()
        .map(|(key, raw)| format!("{}:{raw}", Value::from(key.as_str())))
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[derive(Debug, Clone)]
struct TokenAnswer {
    status: u16,
    body: String,
    verdict: Verdict,
    token: Option<String>,
    lifetime: Option<Duration>,
}

fn token_answer() -> impl Strategy<Value = TokenAnswer> {
    (
        200..=299u16,
        access_token(),
        token_type(),
        expires_in(),
        refresh_token(),
        extra_members(),
        "[ \\n\\t]{0,2}",
    )
        .prop_flat_map(|(status, at, tt, ei, rt, extra, ws)| {
            let (at_member, at_verdict, token) = at;
            let (tt_member, tt_verdict) = tt;
            let (ei_member, ei_verdict, lifetime) = ei;
            let mut members = extra;
            for (key, member) in [
                ("access_token", at_member),
                ("token_type", tt_member),
                ("expires_in", ei_member),
                ("refresh_token", rt),
            ] {
                if let Some(raw) = member {
                    members.push((key.to_owned(), raw));
                }
            }
            let verdicts = [at_verdict, tt_verdict, ei_verdict];
            let verdict = if verdicts.contains(&Verdict::Invalid) {
                Verdict::Invalid
            } else if verdicts.contains(&Verdict::Either) {
                Verdict::Either
            } else {
                Verdict::Valid
            };
            Just(members)
                .prop_shuffle()
                .prop_map(move |members| TokenAnswer {
                    status,
                    body: format!("{ws}{}{ws}", object(&members)),
                    verdict,
                    token: token.clone(),
                    lifetime,
                })
        })
}

/// An error answer in one of Volt's shapes, with random fields; the code a
/// parser must find, when it is a plain string.
fn failure_body() -> impl Strategy<Value = (String, Option<String>)> {
    let code = prop_oneof![
        Just("invalid_grant"),
        Just("invalid_client"),
        Just("invalid_request"),
        Just("unauthorized_client"),
        Just("server_error"),
        Just("temporarily_unavailable"),
    ];
    let field = || {
        prop_oneof![
            3 => text().prop_map(Value::from),
            1 => json_value(),
            1 => Just(Value::Null),
        ]
    };
    let maybe = |strategy: BoxedStrategy<Value>| prop::option::weighted(0.8, strategy);
    let oauth2 = (code, maybe(field().boxed())).prop_map(|(code, description)| {
        let mut map = Map::new();
        map.insert("error".into(), Value::from(code));
        if let Some(description) = description {
            map.insert("error_description".into(), description);
        }
        (Value::Object(map).to_string(), Some(code.to_owned()))
    });
    let oauth2_random = (field(), maybe(field().boxed())).prop_map(|(error, description)| {
        let mut map = Map::new();
        map.insert("error".into(), error);
        if let Some(description) = description {
            map.insert("error_description".into(), description);
        }
        (Value::Object(map).to_string(), None)
    });
    let volt = (
        prop_oneof![(100..600i64).prop_map(Value::from), field()],
        maybe(field().boxed()),
    )
        .prop_map(|(code, message)| {
            let mut map = Map::new();
            map.insert("code".into(), code);
            if let Some(message) = message {
                map.insert("message".into(), message);
            }
            (Value::Object(map).to_string(), None)
        });
    let global = (
        prop_oneof![
            Just("UNAUTHORISED"),
            Just("FORBIDDEN"),
            Just("VALIDATION_ERROR")
        ],
        maybe(field().boxed()),
    )
        .prop_map(|(code, message)| {
            let mut map = Map::new();
            map.insert("code".into(), Value::from(code));
            if let Some(message) = message {
                map.insert("message".into(), message);
            }
            (Value::Object(map).to_string(), Some(code.to_owned()))
        });
    let entry = (maybe(field().boxed()), maybe(field().boxed())).prop_map(|(property, message)| {
        let mut map = Map::new();
        if let Some(property) = property {
            map.insert("property".into(), property);
        }
        if let Some(message) = message {
            map.insert("message".into(), message);
        }
        Value::Object(map)
    });
    let gateway = (
        maybe(prop_oneof![(100..600i64).prop_map(Value::from), field()].boxed()),
        maybe(field().boxed()),
        prop::option::weighted(
            0.8,
            prop_oneof![
                4 => prop::collection::vec(entry, 0..5).prop_map(Value::Array),
                1 => json_value(),
            ],
        ),
    )
        .prop_map(|(code, message, list)| {
            let mut exception = Map::new();
            if let Some(code) = code {
                exception.insert("code".into(), code);
            }
            if let Some(message) = message {
                exception.insert("message".into(), message);
            }
            if let Some(list) = list {
                exception.insert("errorList".into(), list);
            }
            let body = serde_json::json!({ "exception": exception });
            (body.to_string(), None)
        });
    let other = prop_oneof![
        Just("".to_owned()),
        Just("<html><body><h1>502 Bad Gateway</h1></body></html>".to_owned()),
        Just(r#"{"error":"invalid_cl"#.to_owned()),
        text(),
    ]
    .prop_map(|body| (body, None));
    prop_oneof![
        3 => oauth2,
        2 => oauth2_random,
        2 => volt,
        2 => global,
        3 => gateway,
        1 => other,
        1 => json_value().prop_map(|v| (v.to_string(), None)),
    ]
}

fn padded_token(len: usize) -> Vec<u8> {
    let head = r#"{"access_token":"eyJpad","token_type":"Bearer","expires_in":3600,"padding":""#;
    let tail = r#""}"#;
    let mut body = String::with_capacity(len);
    body.push_str(head);
    body.extend(std::iter::repeat_n('x', len - head.len() - tail.len()));
    body.push_str(tail);
    assert_eq!(body.len(), len);
    body.into_bytes()
}

const GOOD: &str = r#"{"access_token":"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln","token_type":"Bearer","expires_in":3600,"refresh_token":"def50200abc"}"#;

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary bytes, with any status: a token or a typed error, no panic.
    #[test]
    fn arbitrary_bytes_yield_a_token_or_a_typed_error(
        status in any_status(),
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let run = run(status, body);
        check(&run);
        // Random bytes are never a JSON object with an access token.
        prop_assert!(run.result.is_err());
    }

    /// A published answer with random bytes overwritten.
    #[test]
    fn corrupted_answers_yield_a_token_or_a_typed_error(
        status in any_status(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut body = GOOD.as_bytes().to_vec();
        for (index, byte) in edits {
            let at = index.index(body.len());
            body[at] = byte;
        }
        check(&run(status, body));
    }

    /// Arbitrary JSON, with any status.
    #[test]
    fn arbitrary_json_yields_a_token_or_a_typed_error(
        status in any_status(),
        value in json_value(),
    ) {
        let run = run(status, value.to_string().into_bytes());
        check(&run);
        if !value.get("access_token").is_some_and(Value::is_string) {
            prop_assert!(run.result.is_err());
        }
    }

    /// Token-shaped objects with random members of random types, in random
    /// order: a valid access token, a bearer (or absent) token type and a
    /// positive (or absent) `expires_in` give exactly that token and lifetime;
    /// an unusable member gives `InvalidResponse`.
    #[test]
    fn token_shaped_answers_are_parsed_exactly(answer in token_answer()) {
        let run = run(answer.status, answer.body.clone().into_bytes());
        check(&run);
        match (answer.verdict, &run.result) {
            (Verdict::Valid, Ok(token)) => {
                prop_assert_eq!(Some(token.expose_secret()), answer.token.as_deref());
                let lifetime = answer.lifetime.expect("a lifetime for a valid answer");
                let slack = Duration::from_secs(1);
                prop_assert!(
                    token.expires_at() + slack >= run.before + lifetime
                        && token.expires_at() <= run.after + lifetime + slack,
                    "expires {:?} after the call, expected {:?}",
                    token.expires_at().saturating_duration_since(run.before),
                    lifetime
                );
            }
            (Verdict::Valid, Err(err)) => {
                prop_assert!(false, "{} gave {:?}", answer.body, err);
            }
            (Verdict::Invalid, Ok(_)) => {
                prop_assert!(false, "{} gave a token", answer.body);
            }
            (Verdict::Invalid, Err(err)) => {
                prop_assert!(matches!(err, Error::InvalidResponse { .. }), "{:?}", err);
            }
            (Verdict::Either, Ok(token)) => {
                prop_assert!(!token.expose_secret().is_empty());
            }
            (Verdict::Either, Err(err)) => {
                prop_assert!(matches!(err, Error::InvalidResponse { .. }), "{:?}", err);
            }
        }
    }

    /// Every failure shape of FACTS.md, with random fields and any non-2xx
    /// status: an error with that status, the code when it is a plain
    /// string, and no secret however the body echoes it.
    #[test]
    fn failure_answers_keep_the_status_and_code(
        status in error_status(),
        (body, code) in failure_body(),
    ) {
        let run = run(status, body.clone().into_bytes());
        check(&run);
        let err = run.result.as_ref().expect_err("an error");
        prop_assert_eq!(err.status().map(|s| s.as_u16()), Some(status));
        if let Some(code) = code {
            match err {
                Error::Rejected { response, .. } | Error::Failed { response, .. } => {
                    prop_assert_eq!(response.code.as_deref(), Some(code.as_str()), "{}", body);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }

    /// A published answer cut short anywhere is an `InvalidResponse`.
    #[test]
    fn truncated_answers_are_invalid(status in 200..=299u16, index in any::<prop::sample::Index>()) {
        let cut = index.index(GOOD.len());
        let run = run(status, GOOD.as_bytes()[..cut].to_vec());
        check(&run);
        prop_assert!(matches!(run.result, Err(Error::InvalidResponse { .. })), "{:?}", run.result);
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// The 64 KiB cap is exact: a valid answer up to it is read, one byte
    /// more is refused; an error status over it is classified by the status.
    #[test]
    fn answers_over_64_kib_are_refused(len in (CAP - 8)..=(CAP + 8), status in any_status()) {
        let run = run(status, padded_token(len));
        check(&run);
        let success = (200..=299).contains(&status);
        match &run.result {
            Ok(token) => prop_assert_eq!(token.expose_secret(), "eyJpad"),
            Err(Error::InvalidResponse { reason, .. }) if len > CAP => {
                prop_assert!(success);
                prop_assert_eq!(*reason, "the body is larger than 64 KiB")
            }
            Err(Error::Rejected { response, .. } | Error::Failed { response, .. }) if len > CAP => {
                prop_assert!(!success);
                prop_assert_eq!(response.status.as_u16(), status);
                prop_assert_eq!((&response.code, &response.message), (&None, &None));
            }
            Err(err) => prop_assert!(!success, "{} bytes: {:?}", len, err),
        }
        prop_assert_eq!(run.result.is_ok(), success && len <= CAP);
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// `refresh_token` is optional: a value of another type is no reason to
    /// throw away a valid access token (the next refresh falls back to the
    /// password grant anyway).
    #[test]
    fn a_refresh_token_of_another_type_keeps_the_access_token(
        refresh in json_value().prop_filter("not a string or null", |v| !v.is_string() && !v.is_null()),
    ) {
        let body = format!(
            r#"{{"access_token":"eyJhbGciOiJSUzI1NiJ9.e30.c2ln","token_type":"Bearer","expires_in":3600,"refresh_token":{refresh}}}"#
        );
        let run = run(200, body.clone().into_bytes());
        check(&run);
        match &run.result {
            Ok(token) => prop_assert_eq!(token.expose_secret(), "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"),
            Err(err) => prop_assert!(false, "{} gave {:?}", body, err),
        }
    }
}

/// A huge `expires_in` is capped, even one beyond the range of an `f64`
/// (valid JSON: the grammar puts no limit on exponents).
#[test]
fn expires_in_beyond_f64_range_is_capped() {
    for literal in ["1e400", "1E999", "123456789e999"] {
        let body =
            format!(r#"{{"access_token":"eyJhuge","token_type":"Bearer","expires_in":{literal}}}"#);
        let run = run(200, body.clone().into_bytes());
        check(&run);
        match &run.result {
            Ok(token) => {
                let lifetime = lifetime(f64::INFINITY);
                assert!(
                    token.expires_at() >= run.before + lifetime
                        && token.expires_at() <= run.after + lifetime,
                    "{body}"
                );
            }
            Err(err) => panic!("{body} gave {err:?}"),
        }
    }
}

/// 429 means "slow down": a failure to retry after the backoff, not a
/// rejection of the credentials (as `Error::Failed` documents), whatever
/// OAuth2 code the body carries.
#[test]
fn rate_limited_answers_are_failures_whatever_their_code() {
    for body in [
        r#"{"message":"slow down"}"#,
        "",
        r#"{"error":"invalid_request","error_description":"Too many requests"}"#,
        r#"{"error":"invalid_grant"}"#,
        r#"{"error":"invalid_client"}"#,
        r#"{"code":"UNAUTHORISED","message":"Too many attempts"}"#,
    ] {
        let run = run(429, body.as_bytes().to_vec());
        check(&run);
        match &run.result {
            Err(err @ Error::Failed { .. }) => {
                assert!(!err.is_rejected());
                assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
            }
            other => panic!("429 {body} gave {other:?}"),
        }
    }
}

/// The three answers Volt publishes, through the same path.
#[test]
fn published_answers_are_tokens() {
    for body in [
        r#"{"access_token":"eyJ.a.b","token_type":"bearer","expires_in":3600,"refresh_token":"def50200"}"#,
        r#"{"token_type":"Bearer","expires_in":3600,"access_token":"eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIs","refresh_token":"def50200"}"#,
        r#"{"access_token":"eyJ0eXAiOi","token_type":"Bearer","expires_in":86400,"refresh_token":"50679c5d"}"#,
    ] {
        let run = run(200, body.as_bytes().to_vec());
        check(&run);
        let token = run.result.as_ref().expect("a token");
        let expected: Value = serde_json::from_str(body).unwrap();
        assert_eq!(token.expose_secret(), expected["access_token"]);
        let lifetime = Duration::from_secs(expected["expires_in"].as_u64().unwrap());
        assert!(
            token.expires_at() >= run.before + lifetime
                && token.expires_at() <= run.after + lifetime
        );
    }
}
