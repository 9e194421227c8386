//! What the layer needs to know before it can authenticate: the API user's
//! [`Credentials`] and the [`Endpoint`] (which Volt API, which environment),
//! built in code or read from the `VOLT_*` environment variables.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

/// The credentials of a Volt API user: the application's client id and secret,
/// and the API user's name and password.
///
/// `Debug` shows the client id and the username; the secret and the password are
/// redacted, and both are zeroized when the last copy is dropped.
///
/// ```
/// use volt_auth::Credentials;
///
/// let credentials = Credentials::new("client-id", "client-secret", "api-user", "password");
/// assert!(!format!("{credentials:?}").contains("client-secret"));
/// ```
#[derive(Clone)]
pub struct Credentials {
    client_id: String,
    client_secret: SecretString,
    username: String,
    password: SecretString,
}

impl Credentials {
    /// Credentials from their four parts.
    pub fn new(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: secret(client_secret.into()),
            username: username.into(),
            password: secret(password.into()),
        }
    }

    /// Reads `VOLT_CLIENT_ID`, `VOLT_CLIENT_SECRET`, `VOLT_USERNAME` and
    /// `VOLT_PASSWORD`, without surrounding whitespace (such as the newline a
    /// secret file mounted into the environment often ends with). Use
    /// [`Credentials::new`] for values whose ends must be kept as they are.
    ///
    /// # Errors
    /// [`ConfigError::MissingVariable`] naming the first variable that is unset,
    /// blank or not unicode.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&env_lookup)
    }

    pub(crate) fn from_lookup(
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let get = |name: &'static str| {
            // Trimmed into a new string; the read one is wiped.
            let value = Zeroizing::new(lookup(name).unwrap_or_default());
            match value.trim() {
                "" => Err(ConfigError::MissingVariable(name)),
                trimmed => Ok(trimmed.to_owned()),
            }
        };
        Ok(Self::new(
            get("VOLT_CLIENT_ID")?,
            get("VOLT_CLIENT_SECRET")?,
            get("VOLT_USERNAME")?,
            get("VOLT_PASSWORD")?,
        ))
    }

    /// The application's client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The API user's name.
    pub fn username(&self) -> &str {
        &self.username
    }

    pub(crate) fn client_secret(&self) -> &str {
        self.client_secret.expose_secret()
    }

    /// What is wrong when one of the four parts is empty (Volt would refuse
    /// it, after a round trip and with a long wait before the next try).
    pub(crate) fn empty_part(&self) -> Option<&'static str> {
        [
            (&self.client_id[..], "the client id is empty"),
            (self.client_secret(), "the client secret is empty"),
            (&self.username[..], "the username is empty"),
            (self.password(), "the password is empty"),
        ]
        .into_iter()
        .find_map(|(part, problem)| part.is_empty().then_some(problem))
    }

    pub(crate) fn password(&self) -> &str {
        self.password.expose_secret()
    }

    /// Whether `other` holds the same four parts.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.client_id == other.client_id
            && self.username == other.username
            && self.client_secret() == other.client_secret()
            && self.password() == other.password()
    }
}

/// `text` as a secret, its buffer wiped. (`SecretString::from(String)` makes a
/// boxed `str`, which moves a string with spare capacity to a new allocation
/// and frees the old one unwiped.)
pub(crate) fn secret(text: String) -> SecretString {
    let text = Zeroizing::new(text);
    SecretString::from(text.as_str())
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// Which of Volt's two APIs to authenticate against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Api {
    /// The Gateway API (`api.volt.io`): `/oauth` takes a form-encoded body.
    #[default]
    Gateway,
    /// The Global API (`gateway.volt.io`): `/oauth` takes a JSON body.
    Global,
}

/// Volt's sandbox or production environment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Environment {
    /// Test money, test banks.
    #[default]
    Sandbox,
    /// Real money.
    Production,
}

/// Where the Volt API lives: its base URL and which [`Api`] it speaks.
///
/// The token endpoint is `<base>/oauth`; the base URL's origin is also the
/// origin that receives the bearer token.
///
/// ```
/// use volt_auth::{Api, Endpoint, Environment};
///
/// let endpoint = Endpoint::new(Api::Gateway, Environment::Sandbox);
/// assert_eq!(endpoint.token_uri(), "https://api.sandbox.volt.io/oauth");
///
/// // A plain-http URL is only accepted for loopback hosts, unless explicitly allowed.
/// assert!(Endpoint::custom("http://127.0.0.1:8080").is_ok());
/// assert!(Endpoint::custom("http://volt.example.com").is_err());
/// assert!(Endpoint::custom_insecure("http://volt.example.com").is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    base: Uri,
    api: Api,
    /// The environment of a preset; `None` for a custom base URL.
    environment: Option<Environment>,
}

impl Endpoint {
    /// One of Volt's four documented endpoints.
    pub fn new(api: Api, environment: Environment) -> Self {
        let host = match (api, environment) {
            (Api::Gateway, Environment::Sandbox) => "api.sandbox.volt.io",
            (Api::Gateway, Environment::Production) => "api.volt.io",
            (Api::Global, Environment::Sandbox) => "gateway.sandbox.volt.io",
            (Api::Global, Environment::Production) => "gateway.volt.io",
        };
        let base = Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(host)
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        Self {
            base,
            api,
            environment: Some(environment),
        }
    }

    /// Any base URL: a proxy, the mock server. It speaks the Gateway API unless
    /// changed with [`Endpoint::with_api`].
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] for anything but an absolute `http`/`https` URL
    /// with a host and without user info or a query (and with a port from 0 to 65535, if any,
    /// written in digits without a sign or leading zeros; a host ending in a
    /// number written as an IPv4 address in dotted decimal, not `127.1` or
    /// `10.0.0.010`), or one ending in
    /// `/oauth` (the token endpoint itself, not the base URL), and
    /// [`ConfigError::InsecureUrl`] for `http` to a host that is not loopback
    /// (see [`Endpoint::custom_insecure`]).
    pub fn custom(url: &str) -> Result<Self, ConfigError> {
        Self::custom_insecure(url)?.secure()
    }

    /// Refuses plain `http` to a host that is not loopback.
    fn secure(self) -> Result<Self, ConfigError> {
        if self.base.scheme() == Some(&Scheme::HTTP) && !is_loopback(self.host()) {
            return Err(ConfigError::InsecureUrl(self.host().to_owned()));
        }
        Ok(self)
    }

    /// Like [`Endpoint::custom`], but also accepts plain `http` to any host.
    /// Passwords and tokens then travel in clear text: use it only on a network
    /// you trust.
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] for anything but an absolute `http`/`https` URL
    /// with a host and without user info or a query (and with a port from 0 to 65535, if any,
    /// written in digits without a sign or leading zeros; a host ending in a
    /// number written as an IPv4 address in dotted decimal, not `127.1` or
    /// `10.0.0.010`), or one ending in
    /// `/oauth`.
    pub fn custom_insecure(url: &str) -> Result<Self, ConfigError> {
        let endpoint = Self::parse(url)?;
        // `…/oauth` is the token endpoint itself: `…/oauth/oauth` would 404.
        if last_segment(endpoint.base.path()).is_some_and(|last| last.eq_ignore_ascii_case("oauth"))
        {
            return Err(ConfigError::InvalidUrl {
                url: redact_url(url),
                reason: "give the API's base URL, without /oauth: the token endpoint's path is added to it",
            });
        }
        Ok(endpoint)
    }

    /// An absolute `http`/`https` URL as [`Endpoint::custom_insecure`] takes it,
    /// whatever its path.
    fn parse(url: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &'static str| ConfigError::InvalidUrl {
            url: redact_url(url),
            reason,
        };
        let uri: Uri = url.trim().parse().map_err(|_| {
            invalid(if url.is_ascii() {
                "not a URL"
            } else {
                "not ASCII: write the host in punycode (xn--…)"
            })
        })?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("no scheme"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid("the scheme must be http or https"));
        }
        let mut authority = uri
            .authority()
            .filter(|authority| !authority.host().is_empty())
            .cloned()
            .ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user info is not allowed in the URL"));
        }
        // reqwest's URL parser (WHATWG's) and the system resolver (`inet_aton`)
        // read such a host as an IPv4 address, also in shorthand, octal or hex
        // (`10.0.0.010` is 10.0.0.8): another host than written, and one the
        // reqwest middleware's origin check sees rewritten.
        if ends_in_a_number(authority.host()) && authority.host().parse::<Ipv4Addr>().is_err() {
            return Err(invalid(
                "a host ending in a number must be an IPv4 address written as four decimal numbers without leading zeros",
            ));
        }
        // An empty port is the scheme's default (RFC 3986, section 6.2.3).
        if authority.as_str().strip_suffix(':') == Some(authority.host()) {
            authority = authority.host().parse().map_err(|_| invalid("not a URL"))?;
        }
        // `http` accepts any text after the colon; a password holding a `/`
        // would otherwise pass for one.
        if authority.as_str() != authority.host() && authority.port_u16().is_none() {
            return Err(invalid("the port is not a number from 0 to 65535"));
        }
        // `http` reads `+443` and `0443` as 443, but requests to the base URL
        // spelled so would not match its origin, and would get no token.
        let after_host = authority.as_str().get(authority.host().len()..);
        if let Some(port) = after_host.and_then(|rest| rest.strip_prefix(':')) {
            if !port.bytes().all(|byte| byte.is_ascii_digit())
                || (port.len() > 1 && port.starts_with('0'))
            {
                return Err(invalid(
                    "the port must be written in digits, without a sign or leading zeros",
                ));
            }
        }
        if uri.query().is_some() {
            return Err(invalid("a query is not allowed in the URL"));
        }
        let path = uri.path().trim_end_matches('/');
        let base = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(format!("{path}/"))
            .build()
            .map_err(|_| invalid("not a URL"))?;
        Ok(Self {
            base,
            api: Api::Gateway,
            environment: None,
        })
    }

    /// The same endpoint, speaking `api`. One of Volt's documented endpoints
    /// becomes that API's endpoint in the same environment (the two APIs have
    /// different hosts); a custom base URL is kept.
    ///
    /// ```
    /// use volt_auth::{Api, Endpoint, Environment};
    ///
    /// let production = Endpoint::new(Api::Gateway, Environment::Production);
    /// assert_eq!(production.clone().with_api(Api::Global).token_uri(), "https://gateway.volt.io/oauth");
    /// let proxy = Endpoint::custom("https://volt-proxy.internal").unwrap();
    /// assert_eq!(proxy.with_api(Api::Global).token_uri(), "https://volt-proxy.internal/oauth");
    ///
    /// // A custom base URL naming a preset's host is custom: it is kept, so it
    /// // does not equal the preset.
    /// let same_host = Endpoint::custom("https://api.volt.io").unwrap();
    /// assert_eq!(same_host.token_uri(), production.token_uri());
    /// assert_ne!(same_host, production);
    /// assert_eq!(same_host.with_api(Api::Global).token_uri(), "https://api.volt.io/oauth");
    /// ```
    #[must_use]
    pub fn with_api(self, api: Api) -> Self {
        match self.environment {
            Some(environment) => Self::new(api, environment),
            None => Self { api, ..self },
        }
    }

    /// Which API this endpoint speaks.
    pub fn api(&self) -> Api {
        self.api
    }

    /// The base URL, always ending in `/`.
    pub fn base_uri(&self) -> &Uri {
        &self.base
    }

    /// The token endpoint, `<base>/oauth`.
    pub fn token_uri(&self) -> Uri {
        let mut parts = self.base.clone().into_parts();
        let path = format!("{}oauth", self.base.path());
        parts.path_and_query = PathAndQuery::try_from(path).ok();
        Uri::from_parts(parts).unwrap_or_else(|_| self.base.clone())
    }

    /// The origin (scheme, host, port) of the base URL.
    pub(crate) fn origin(&self) -> Option<Origin> {
        Origin::of(&self.base)
    }

    fn host(&self) -> &str {
        self.base.host().unwrap_or_default()
    }

    /// Reads `VOLT_BASE_URL`, or else `VOLT_ENVIRONMENT` (`sandbox` or
    /// `production`), and `VOLT_API` (`gateway`, the default, or `global`).
    ///
    /// A blank variable counts as unset; one that is not unicode is read with
    /// its invalid bytes as `�`, so that it is refused as invalid rather than
    /// passed over for the next.
    ///
    /// # Errors
    /// [`ConfigError::MissingVariable`] when neither `VOLT_BASE_URL` nor
    /// `VOLT_ENVIRONMENT` is set, [`ConfigError::InvalidVariable`] for a value
    /// that is not one of the listed ones, and the errors of
    /// [`Endpoint::custom`].
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&env_lookup_lossy)
    }

    pub(crate) fn from_lookup(
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let api = match get("VOLT_API").map(|value| value.trim().to_ascii_lowercase()) {
            None => Api::Gateway,
            Some(value) if value == "gateway" => Api::Gateway,
            Some(value) if value == "global" => Api::Global,
            Some(value) => {
                return Err(ConfigError::InvalidVariable("VOLT_API", redact_url(&value)));
            }
        };
        if let Some(url) = get("VOLT_BASE_URL") {
            return Ok(Self::custom(&url)?.with_api(api));
        }
        let environment = get("VOLT_ENVIRONMENT")
            .ok_or(ConfigError::MissingVariable("VOLT_ENVIRONMENT"))?
            .trim()
            .to_ascii_lowercase();
        let environment = match environment.as_str() {
            "sandbox" => Environment::Sandbox,
            "production" => Environment::Production,
            _ => {
                return Err(ConfigError::InvalidVariable(
                    "VOLT_ENVIRONMENT",
                    redact_url(&environment),
                ));
            }
        };
        Ok(Self::new(api, environment))
    }
}

impl Default for Endpoint {
    fn default() -> Self {
        Self::new(Api::Gateway, Environment::Sandbox)
    }
}

/// Scheme, host and port: where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    host: String,
    port: u16,
    /// The scheme, and the spellings of the authority requests compare to.
    spelling: Spelling,
}

impl Origin {
    pub(crate) fn of(uri: &Uri) -> Option<Self> {
        let https = match uri.scheme()? {
            scheme if *scheme == Scheme::HTTPS => true,
            scheme if *scheme == Scheme::HTTP => false,
            _ => return None,
        };
        let authority: &Authority = uri.authority()?;
        let default_port = if https { 443 } else { 80 };
        let host = authority.host().to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(default_port);
        let with_port = format!("{host}:{port}");
        let first = if port == default_port {
            host.clone()
        } else {
            with_port.clone()
        };
        Some(Self {
            host,
            port,
            spelling: Spelling {
                https,
                authorities: [first, with_port],
            },
        })
    }

    /// An origin added with [`Builder::allow_origin`](crate::Builder::allow_origin):
    /// the URLs [`Endpoint::custom`] takes, whatever their path, and their origin.
    pub(crate) fn allowed(url: &str) -> Result<Self, ConfigError> {
        Endpoint::parse(url)?
            .secure()?
            .origin()
            .ok_or_else(|| ConfigError::InvalidUrl {
                url: redact_url(url),
                reason: "an origin needs an http or https scheme and a host",
            })
    }

    /// Whether `uri` goes to this origin. It runs per request: no parsing, no
    /// allocation; one exact comparison when the request spells the authority
    /// as the origin does, and case-insensitive ones only when it does not.
    #[inline]
    pub(crate) fn matches(&self, uri: &Uri) -> bool {
        let Some(authority) = uri.authority().map(Authority::as_str) else {
            return false;
        };
        self.spelling.scheme(uri.scheme_str())
            && (self.spelling.exact(authority) || self.matches_folded(authority))
    }

    /// What [`Origin::matches`] compares first.
    pub(crate) fn spelling(&self) -> &Spelling {
        &self.spelling
    }

    fn https(&self) -> bool {
        self.spelling.https
    }

    /// `host:port`.
    fn with_port(&self) -> &str {
        &self.spelling.authorities[1]
    }

    /// `host`, when the port is the scheme's default.
    fn without_port(&self) -> Option<&str> {
        let default_port = if self.https() { 443 } else { 80 };
        (self.port == default_port).then_some(self.spelling.authorities[0].as_str())
    }

    /// [`Origin::matches`] for other spellings: another case, an empty port
    /// (the scheme's default), or another spelling of an IPv6 address.
    #[cold]
    fn matches_folded(&self, authority: &str) -> bool {
        let default_port = authority.strip_suffix(':').unwrap_or(authority);
        authority.eq_ignore_ascii_case(self.with_port())
            || self
                .without_port()
                .is_some_and(|host| default_port.eq_ignore_ascii_case(host))
            || self.same_ipv6_authority(authority)
    }

    /// Whether `authority` is `[address]` and a port spelled as above, the
    /// address being this origin's IPv6 literal written otherwise (`[::1]`
    /// for `[0:0:0:0:0:0:0:1]`): clients that parse URLs write it in its
    /// canonical form, whatever the configuration said. No user info: the
    /// address must open the authority.
    fn same_ipv6_authority(&self, authority: &str) -> bool {
        let Some(end) = authority.find(']') else {
            return false;
        };
        let (host, port) = authority.split_at(end + 1);
        if !self.same_ipv6(host) {
            return false;
        }
        match port.strip_prefix(':') {
            None if port.is_empty() => self.without_port().is_some(),
            None => false,
            Some("") => self.without_port().is_some(),
            // `with_port` is `host:port`.
            Some(port) => self.with_port().get(self.host.len() + 1..) == Some(port),
        }
    }

    /// Whether `scheme://host[:port]` is this origin; `port` is `None` for the
    /// scheme's default. Allocation-free: it runs per request.
    #[cfg(feature = "reqwest")]
    pub(crate) fn matches_parts(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return false,
        };
        let default_port = if https { 443 } else { 80 };
        https == self.https()
            && port.unwrap_or(default_port) == self.port
            && (host.eq_ignore_ascii_case(&self.host) || self.same_ipv6(host))
    }

    /// Whether `host` is this origin's IPv6 literal host spelled otherwise:
    /// clients that parse URLs (reqwest's `Url`) write the address in its
    /// canonical form, whatever the spelling.
    #[cold]
    fn same_ipv6(&self, host: &str) -> bool {
        ipv6_literal(&self.host).is_some_and(|ours| ipv6_literal(host) == Some(ours))
    }
}

/// An origin's scheme and the spellings of its authority that
/// [`Origin::matches`] compares first (`host` alone for the scheme's default
/// port, then `host:port`; twice `host:port` for another port): what a
/// request to it most likely carries, compared inline before the full check.
/// The default spells no origin (a request's authority is never empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Spelling {
    https: bool,
    authorities: [String; 2],
}

impl Spelling {
    /// Whether a request with `scheme` and `authority` spells this origin
    /// exactly, with `http`'s standard scheme. A request this refuses may
    /// still match [`Origin::matches`] with another spelling.
    #[inline(always)]
    pub(crate) fn spelled_by(&self, scheme: Option<&str>, authority: &str) -> bool {
        self.scheme(scheme) && self.exact(authority)
    }

    /// Whether a request's `scheme` is this origin's. `http` spells the two
    /// standard schemes in lower case, however the request did.
    #[inline(always)]
    fn scheme(&self, scheme: Option<&str>) -> bool {
        match scheme {
            Some("https") => self.https,
            Some("http") => !self.https,
            _ => false,
        }
    }

    /// Whether a request's `authority` is one of these spellings, exactly.
    #[inline(always)]
    fn exact(&self, authority: &str) -> bool {
        same(authority, &self.authorities[0]) || same(authority, &self.authorities[1])
    }
}

/// `a == b`, without a call to `bcmp` for strings of 8 to 32 bytes (most
/// authorities): two overlapping loads of each, compared as integers.
#[inline(always)]
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    match a.len() {
        8..=16 => a.first_chunk::<8>() == b.first_chunk() && a.last_chunk::<8>() == b.last_chunk(),
        17..=32 => {
            a.first_chunk::<16>() == b.first_chunk() && a.last_chunk::<16>() == b.last_chunk()
        }
        _ => a == b,
    }
}

/// The address of `[…]`, an IPv6 literal host.
fn ipv6_literal(host: &str) -> Option<std::net::Ipv6Addr> {
    host.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// The last segment of `path` that is not empty once its dot segments are
/// resolved, as reqwest and most servers resolve them (RFC 3986, section
/// 5.2.4; `%2e` is a dot too).
fn last_segment(path: &str) -> Option<&str> {
    let mut segments = Vec::new();
    for segment in path.split('/') {
        match segment.to_ascii_lowercase().replace("%2e", ".").as_str() {
            "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    segments
        .into_iter()
        .rev()
        .find(|segment| !segment.is_empty())
}

/// Whether a URL parser reads `host` as an IPv4 address (WHATWG's "ends in a
/// number"): its last label, a trailing dot aside, is decimal digits or `0x`
/// and hex digits.
fn ends_in_a_number(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let last = host.rsplit('.').next().unwrap_or(host);
    let hex = last
        .get(..2)
        .filter(|prefix| prefix.eq_ignore_ascii_case("0x"))
        .map(|_| &last[2..]);
    match hex {
        Some(digits) => digits.bytes().all(|byte| byte.is_ascii_hexdigit()),
        None => !last.is_empty() && last.bytes().all(|byte| byte.is_ascii_digit()),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `url` fit for an error message, whatever it holds: anything that could be
/// user info (up to the last `@`) becomes `***@`, and anything after the first
/// `?` or `#` becomes `…`. When a `?` or `#` comes before that `@` (a password
/// holding one, or a query holding an `@`), nothing after the scheme is kept.
/// A value without `@`, `?` and `#` is kept as it is.
pub(crate) fn redact_url(url: &str) -> String {
    let url = url.trim();
    // Only something shaped like a scheme counts as one, so that the `user`
    // of `user:pass@host://` is not kept.
    let start = match url.split_once("://") {
        Some((scheme, _)) if is_scheme(scheme) => scheme.len() + 3,
        _ => 0,
    };
    let (scheme, mut rest) = url.split_at(start);
    let mut redacted = String::from(scheme);
    if let Some(at) = rest.rfind('@') {
        redacted.push_str("***@");
        if rest[..at].contains(['?', '#']) {
            redacted.push('…');
            return redacted;
        }
        rest = &rest[at + 1..];
    }
    match rest.find(['?', '#']) {
        Some(cut) => {
            redacted.push_str(&rest[..=cut]);
            redacted.push('…');
        }
        None => redacted.push_str(rest),
    }
    redacted
}

/// RFC 3986: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(scheme: &str) -> bool {
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// [`env_lookup`], but a value that is not unicode is read with `�` for its
/// invalid bytes: for settings, where an unreadable value must not be taken
/// for an unset one. (Credentials are not guessed at: see
/// [`Credentials::from_env`].)
fn env_lookup_lossy(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

/// A configuration the layer cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required environment variable is unset, empty or not unicode.
    #[error("environment variable {0} is unset, blank or not unicode")]
    MissingVariable(&'static str),
    /// An environment variable has a value that is not one of the allowed ones
    /// (redacted as [`ConfigError::InvalidUrl`]'s URL is, in case it is a URL).
    #[error("environment variable {0} has an unsupported value {1:?}")]
    InvalidVariable(&'static str, String),
    /// The base URL, or an origin added with
    /// [`Builder::allow_origin`](crate::Builder::allow_origin), cannot be used.
    #[error("invalid URL {url:?}: {reason}")]
    #[non_exhaustive]
    InvalidUrl {
        /// The URL as given, without user info, query or fragment: those
        /// are replaced with `***@` and `…`, so that no password or token
        /// reaches a log.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Plain `http` to a host that is not loopback: a base URL without
    /// opting in ([`Endpoint::custom_insecure`]), or an origin added with
    /// [`Builder::allow_origin`](crate::Builder::allow_origin), which has no
    /// opt-in.
    #[error(
        "refusing to send credentials or tokens over plain http to {0}, which is not loopback: use https (for the base URL, Endpoint::custom_insecure opts in)"
    )]
    InsecureUrl(String),
    /// A setting is out of range, or a credential is empty.
    #[error("invalid setting: {0}")]
    InvalidSetting(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    const FULL: &[(&str, &str)] = &[
        ("VOLT_CLIENT_ID", "id-1"),
        ("VOLT_CLIENT_SECRET", "s3cret-value"),
        ("VOLT_USERNAME", "api-user"),
        ("VOLT_PASSWORD", "pa55word-value"),
        ("VOLT_ENVIRONMENT", "Production"),
    ];

    #[test]
    fn credentials_debug_redacts_secret_and_password() {
        let credentials = Credentials::new("id-1", "s3cret-value", "api-user", "pa55word-value");
        let debug = format!("{credentials:?} {credentials:#?}");
        assert!(debug.contains("id-1") && debug.contains("api-user"));
        assert!(!debug.contains("s3cret-value"));
        assert!(!debug.contains("pa55word-value"));
        assert_eq!(credentials.client_secret(), "s3cret-value");
        assert_eq!(credentials.password(), "pa55word-value");
    }

    #[test]
    fn credentials_are_the_same_only_if_all_four_parts_are() {
        let parts = ["id", "secret", "user", "password"];
        let make = |p: [&str; 4]| Credentials::new(p[0], p[1], p[2], p[3]);
        assert!(make(parts).same_as(&make(parts)));
        for part in 0..4 {
            let mut other = parts;
            other[part] = "other";
            assert!(!make(parts).same_as(&make(other)), "part {part}");
        }
    }

    #[test]
    fn presets_are_volts_documented_endpoints() {
        let cases = [
            (
                Api::Gateway,
                Environment::Sandbox,
                "https://api.sandbox.volt.io/oauth",
            ),
            (
                Api::Gateway,
                Environment::Production,
                "https://api.volt.io/oauth",
            ),
            (
                Api::Global,
                Environment::Sandbox,
                "https://gateway.sandbox.volt.io/oauth",
            ),
            (
                Api::Global,
                Environment::Production,
                "https://gateway.volt.io/oauth",
            ),
        ];
        for (api, environment, expected) in cases {
            let endpoint = Endpoint::new(api, environment);
            assert_eq!(endpoint.token_uri().to_string(), expected);
            assert_eq!(endpoint.api(), api);
        }
    }

    #[test]
    fn custom_urls_keep_their_path_prefix() {
        let endpoint = Endpoint::custom("https://proxy.example.com/volt/").unwrap();
        assert_eq!(
            endpoint.token_uri().to_string(),
            "https://proxy.example.com/volt/oauth"
        );
        let endpoint = Endpoint::custom("http://127.0.0.1:4000").unwrap();
        assert_eq!(
            endpoint.token_uri().to_string(),
            "http://127.0.0.1:4000/oauth"
        );
    }

    #[test]
    fn an_allowed_origin_refused_is_not_called_a_base_url_nor_sent_to_custom_insecure() {
        // `Builder::allow_origin` has no opt-in to plain http: the message
        // must not send its user to `Endpoint::custom_insecure`, which would
        // make the origin the base URL (and send it the credentials).
        let err = Origin::allowed("http://proxy.internal").unwrap_err();
        assert_eq!(err, ConfigError::InsecureUrl("proxy.internal".into()));
        assert_eq!(
            err.to_string(),
            "refusing to send credentials or tokens over plain http to proxy.internal, \
             which is not loopback: use https (for the base URL, \
             Endpoint::custom_insecure opts in)"
        );
        let err = Origin::allowed("https://proxy.internal/?a=1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid URL \"https://proxy.internal/?…\": a query is not allowed in the URL"
        );
    }

    #[test]
    fn a_url_that_is_not_ascii_is_called_so() {
        // `http` takes ASCII only; an internationalised host is a URL
        // nonetheless, and "not a URL" did not say what to change.
        for url in ["https://bücher.example", "https://bücher.example/volt"] {
            assert_eq!(
                Endpoint::custom(url),
                Err(ConfigError::InvalidUrl {
                    url: url.to_owned(),
                    reason: "not ASCII: write the host in punycode (xn--…)",
                }),
                "{url}"
            );
        }
        assert!(Endpoint::custom("https://xn--bcher-kva.example/volt").is_ok());
    }

    #[test]
    fn plain_http_is_refused_unless_loopback_or_opted_in() {
        for url in [
            "http://localhost:1234",
            "http://127.0.0.1",
            "http://[::1]:80/x",
            // IPv4's loopback, written as an IPv4-mapped IPv6 address.
            "http://[::ffff:127.0.0.1]:8080",
        ] {
            assert!(Endpoint::custom(url).is_ok(), "{url}");
        }
        assert_eq!(
            Endpoint::custom("http://[::ffff:10.0.0.8]"),
            Err(ConfigError::InsecureUrl("[::ffff:10.0.0.8]".into()))
        );
        assert_eq!(
            Endpoint::custom("http://api.volt.io"),
            Err(ConfigError::InsecureUrl("api.volt.io".into()))
        );
        assert_eq!(
            Endpoint::custom("http://10.0.0.8:80"),
            Err(ConfigError::InsecureUrl("10.0.0.8".into()))
        );
        assert!(Endpoint::custom_insecure("http://api.volt.io").is_ok());
        let message = Endpoint::custom("http://api.volt.io")
            .unwrap_err()
            .to_string();
        assert!(message.contains("custom_insecure"), "{message}");
    }

    #[test]
    fn malformed_urls_are_typed_errors() {
        for url in [
            "",
            "not a url",
            "/relative",
            "ftp://x.example",
            "https://u:p@x.example",
            "https://x.example/?q=1",
            "https://x.example:https/",
            "https://alice:pa/55@proxy.example",
        ] {
            assert!(
                matches!(Endpoint::custom(url), Err(ConfigError::InvalidUrl { .. })),
                "{url}"
            );
        }
        for url in [
            "https://x.example:8443/",
            "http://[::1]:8080",
            "http://[::1]",
        ] {
            assert!(Endpoint::custom(url).is_ok(), "{url}");
        }
    }

    /// Each hostile URL, the host its error must still name (if the URL
    /// leaves no doubt about it), and the secrets it must not show.
    const HOSTILE_URLS: &[(&str, Option<&str>, &[&str])] = &[
        (
            "https://alice:pa55@proxy.example",
            Some("proxy.example"),
            &["alice", "pa55"],
        ),
        (
            "https://:pa55@proxy.example:8443/volt/",
            Some("proxy.example:8443"),
            &["pa55"],
        ),
        (
            "https://alice:pa@55@proxy.example",
            Some("proxy.example"),
            &["alice", "pa@55"],
        ),
        (
            "alice:pa55@proxy.example",
            Some("proxy.example"),
            &["alice", "pa55"],
        ),
        (
            "https://x.example/?token=abc123",
            Some("x.example"),
            &["token", "abc123"],
        ),
        (
            "https://x.example/volt?a=1&secret=abc123#frag",
            Some("x.example/volt"),
            &["secret", "abc123", "frag"],
        ),
        (
            "https://alice:pa55@proxy.example/#frag-abc123",
            Some("proxy.example"),
            &["alice", "pa55", "abc123"],
        ),
        (
            "ftp://x.example/#access_token=abc123",
            Some("x.example"),
            &["access_token", "abc123"],
        ),
        // A `?` before the last `@`: a password holding a `?`, or a query
        // holding an `@`. Nothing after the scheme can be trusted.
        (
            "https://alice:pa?55@proxy.example",
            None,
            &["alice", "pa?55"],
        ),
        (
            "https://x.example/?email=a@b.example&token=abc123",
            None,
            &["token", "abc123"],
        ),
    ];

    #[test]
    fn url_errors_show_no_user_info_query_or_fragment() {
        for &(url, host, secrets) in HOSTILE_URLS {
            let err = Endpoint::custom(url).unwrap_err();
            assert!(
                matches!(err, ConfigError::InvalidUrl { .. }),
                "{url}: {err:?}"
            );
            let shown = format!("{err} {err:?} {err:#?}");
            for secret in secrets {
                assert!(!shown.contains(secret), "{url}: {shown}");
            }
            if let Some(host) = host {
                assert!(shown.contains(host), "{url}: {shown}");
            }
        }
        // A fragment alone is dropped, not refused: it never reaches a server.
        let endpoint = Endpoint::custom("https://x.example/volt#access_token=abc123").unwrap();
        assert_eq!(endpoint.base_uri().to_string(), "https://x.example/volt/");
        // The same from the environment.
        let err = Endpoint::from_lookup(&lookup(&[(
            "VOLT_BASE_URL",
            "https://alice:pa55@proxy.example",
        )]))
        .unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains("pa55") && shown.contains("proxy.example"),
            "{shown}"
        );
    }

    #[test]
    fn redacted_urls_keep_scheme_host_and_path_only() {
        for (url, redacted) in [
            ("https://proxy.example/volt", "https://proxy.example/volt"),
            ("staging", "staging"),
            (
                " https://alice:pa55@proxy.example/v ",
                "https://***@proxy.example/v",
            ),
            ("https://a:b@c@proxy.example", "https://***@proxy.example"),
            ("https://a:b/c@proxy.example", "https://***@proxy.example"),
            ("https://x.example/v?token=abc", "https://x.example/v?…"),
            ("https://x.example/v#abc?def", "https://x.example/v#…"),
            ("alice:pa55@proxy.example://x", "***@proxy.example://x"),
            ("https://alice:pa?55@proxy.example", "https://***@…"),
            ("https://x.example/?e=a@b.example&t=abc", "https://***@…"),
        ] {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn invalid_variable_errors_redact_a_url_pasted_into_them() {
        for name in ["VOLT_ENVIRONMENT", "VOLT_API"] {
            let url = "https://alice:pa55@proxy.example/?token=abc123";
            let vars = [(name, url), ("VOLT_ENVIRONMENT", "sandbox")];
            let err = Endpoint::from_lookup(&lookup(&vars)).unwrap_err();
            assert!(
                matches!(err, ConfigError::InvalidVariable(n, _) if n == name),
                "{err:?}"
            );
            let shown = format!("{err} {err:?}");
            for secret in ["alice", "pa55", "token", "abc123"] {
                assert!(!shown.contains(secret), "{shown}");
            }
            assert!(shown.contains("proxy.example"), "{shown}");
        }
    }

    #[test]
    fn origins_compare_scheme_host_and_default_port() {
        let origin = Endpoint::custom("https://API.volt.io")
            .unwrap()
            .origin()
            .unwrap();
        assert!(origin.matches(&"https://api.volt.io/banks".parse().unwrap()));
        assert!(origin.matches(&"https://api.volt.io:443/banks".parse().unwrap()));
        assert!(origin.matches(&"https://API.Volt.io/banks".parse().unwrap()));
        assert!(origin.matches(&"https://Api.volt.IO:443/banks".parse().unwrap()));
        assert!(!origin.matches(&"http://api.volt.io/banks".parse().unwrap()));
        assert!(!origin.matches(&"https://api.volt.io:8443/banks".parse().unwrap()));
        assert!(!origin.matches(&"https://api.volt.io.evil.example/banks".parse().unwrap()));
        assert!(!origin.matches(&"/banks".parse().unwrap()));
        assert!(!origin.matches(&"https://user@api.volt.io/banks".parse().unwrap()));
        let origin = Endpoint::custom("http://127.0.0.1:8080")
            .unwrap()
            .origin()
            .unwrap();
        assert!(origin.matches(&"http://127.0.0.1:8080/banks".parse().unwrap()));
        assert!(!origin.matches(&"http://127.0.0.1/banks".parse().unwrap()));
        assert!(!origin.matches(&"http://127.0.0.1:80/banks".parse().unwrap()));
        assert!(!origin.matches(&"http://127.0.0.1:/banks".parse().unwrap()));
    }

    #[test]
    fn the_exact_spelling_check_accepts_a_subset_of_matches() {
        let requests = [
            "https://api.volt.io/banks",
            "https://api.volt.io:443/banks",
            "https://API.Volt.io/banks",
            "https://api.volt.io:/banks",
            "HTTPS://api.volt.io/banks",
            "http://api.volt.io/banks",
            "https://api.volt.io:8443/banks",
            "https://api.volt.io.evil.example/banks",
            "https://user@api.volt.io/banks",
            "http://127.0.0.1:8080/banks",
            "http://127.0.0.1:80/banks",
            "http://127.0.0.1/banks",
            "http://[::1]/banks",
            "http://[0:0:0:0:0:0:0:1]:80/banks",
        ];
        for (base, exact) in [
            (
                "https://API.volt.io",
                &[
                    "https://api.volt.io/banks",
                    "https://api.volt.io:443/banks",
                    // `http` parses the scheme in any case as the standard one.
                    "HTTPS://api.volt.io/banks",
                ][..],
            ),
            ("http://127.0.0.1:8080", &["http://127.0.0.1:8080/banks"]),
            ("http://[::1]", &["http://[::1]/banks"]),
        ] {
            let nowhere = Spelling::default();
            let origin = Endpoint::custom(base).unwrap().origin().unwrap();
            for request in requests {
                let uri: Uri = request.parse().unwrap();
                let spelled = origin
                    .spelling()
                    .spelled_by(uri.scheme_str(), uri.authority().unwrap().as_str());
                assert_eq!(spelled, exact.contains(&request), "{base} {request}");
                assert!(!spelled || origin.matches(&uri), "{base} {request}");
                let authority = uri.authority().unwrap().as_str();
                assert!(!nowhere.spelled_by(uri.scheme_str(), authority));
            }
        }
    }

    #[test]
    fn same_is_string_equality_at_every_length() {
        for len in 0..=40 {
            let a: String = (0..len).map(|i| char::from(b'a' + i % 26)).collect();
            assert!(same(&a, &a.clone()), "{a}");
            assert!(!same(&a, &format!("{a}x")), "{a}");
            for at in 0..usize::from(len) {
                let mut b = a.clone().into_bytes();
                b[at] = b'-';
                let b = String::from_utf8(b).unwrap();
                assert!(!same(&a, &b), "{a} {b}");
            }
        }
    }

    #[test]
    fn an_empty_port_is_the_default_port() {
        for (url, base) in [
            ("https://x.example:", "https://x.example/"),
            ("https://X.example:/volt", "https://X.example/volt/"),
            ("http://127.0.0.1:", "http://127.0.0.1/"),
            ("http://[::1]:/", "http://[::1]/"),
        ] {
            let endpoint = Endpoint::custom(url).unwrap();
            assert_eq!(endpoint.base_uri(), base, "{url}");
            assert_eq!(Endpoint::custom(base).unwrap(), endpoint, "{url}");
        }
        // Requests spelled so go to the default port too.
        let origin = Endpoint::custom("https://api.volt.io")
            .unwrap()
            .origin()
            .unwrap();
        assert!(origin.matches(&"https://api.volt.io:/banks".parse().unwrap()));
        assert!(origin.matches(&"https://API.volt.io:/banks".parse().unwrap()));
    }

    #[test]
    fn env_configuration_reads_all_variables() {
        let credentials = Credentials::from_lookup(&lookup(FULL)).unwrap();
        assert_eq!(credentials.client_id(), "id-1");
        assert_eq!(credentials.username(), "api-user");
        let endpoint = Endpoint::from_lookup(&lookup(FULL)).unwrap();
        assert_eq!(
            endpoint,
            Endpoint::new(Api::Gateway, Environment::Production)
        );
    }

    #[test]
    fn env_credentials_lose_surrounding_whitespace() {
        let vars = [
            ("VOLT_CLIENT_ID", " id-1\n"),
            ("VOLT_CLIENT_SECRET", "s3cret\r\n"),
            ("VOLT_USERNAME", "\tapi-user "),
            ("VOLT_PASSWORD", "pass word\n"),
        ];
        let credentials = Credentials::from_lookup(&lookup(&vars)).unwrap();
        assert_eq!(credentials.client_id(), "id-1");
        assert_eq!(credentials.client_secret(), "s3cret");
        assert_eq!(credentials.username(), "api-user");
        // Only the ends: inner whitespace is part of the value.
        assert_eq!(credentials.password(), "pass word");
        // Given directly, values are kept exactly.
        let exact = Credentials::new(" id ", " secret\n", " user", "password ");
        assert_eq!(exact.client_id(), " id ");
        assert_eq!(exact.client_secret(), " secret\n");
        assert_eq!(exact.username(), " user");
        assert_eq!(exact.password(), "password ");
    }

    #[test]
    fn env_configuration_names_the_missing_variable() {
        for missing in [
            "VOLT_CLIENT_ID",
            "VOLT_CLIENT_SECRET",
            "VOLT_USERNAME",
            "VOLT_PASSWORD",
        ] {
            let vars: Vec<_> = FULL
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = Credentials::from_lookup(&lookup(&vars)).unwrap_err();
            assert_eq!(err, ConfigError::MissingVariable(missing));
            assert!(err.to_string().contains(missing));
            // Blank counts as missing.
            let vars: Vec<_> = FULL
                .iter()
                .map(|&(k, v)| if k == missing { (k, "  ") } else { (k, v) })
                .collect();
            assert_eq!(
                Credentials::from_lookup(&lookup(&vars)).unwrap_err(),
                ConfigError::MissingVariable(missing)
            );
        }
        assert_eq!(
            Endpoint::from_lookup(&lookup(&[])).unwrap_err(),
            ConfigError::MissingVariable("VOLT_ENVIRONMENT")
        );
    }

    #[test]
    fn a_base_url_that_is_already_the_token_endpoint_is_refused() {
        // Given the token endpoint's own URL, requests for a token went to
        // `…/oauth/oauth`, and every one failed as a 404 that did not point
        // at the URL.
        for url in [
            "https://api.sandbox.volt.io/oauth",
            "https://api.sandbox.volt.io/oauth/",
            "https://proxy.example/volt/OAuth",
            "http://127.0.0.1:8080/oauth",
            // Dot segments, which reqwest resolves (`%2e` is a dot too):
            // `…/oauth/./oauth` went to `…/oauth/oauth`.
            "https://proxy.example/oauth/.",
            "https://proxy.example/oauth/%2E/",
            "https://proxy.example/oauth/v/..",
        ] {
            assert_eq!(
                Endpoint::custom(url),
                Err(ConfigError::InvalidUrl {
                    url: url.to_owned(),
                    reason: "give the API's base URL, without /oauth: the token endpoint's path is added to it",
                }),
                "{url}"
            );
        }
        // Only an origin is taken from an allowed URL: its path may be anything.
        assert!(Origin::allowed("https://gateway.volt.io/oauth").is_ok());
        for url in [
            "https://proxy.example/oauth2",
            "https://proxy.example/myoauth",
            "https://proxy.example/v/oauth/..",
        ] {
            let endpoint = Endpoint::custom(url).unwrap();
            assert_eq!(endpoint.token_uri(), format!("{url}/oauth").as_str());
        }
    }

    #[test]
    fn a_port_out_of_range_is_not_called_a_non_number() {
        for url in ["https://x.example:99999", "https://x.example:https"] {
            assert_eq!(
                Endpoint::custom(url),
                Err(ConfigError::InvalidUrl {
                    url: url.to_owned(),
                    reason: "the port is not a number from 0 to 65535",
                }),
                "{url}"
            );
        }
    }

    #[test]
    fn a_port_with_a_sign_or_leading_zeros_is_refused() {
        // `http` reads such a port as its number, but the origin check compares
        // the authority as written: requests to the base URL, spelled as
        // given, went out without the token (and their 401s were not recovered).
        for url in [
            "https://x.example:+443",
            "https://x.example:0443",
            "http://127.0.0.1:+8080",
            "http://127.0.0.1:08080/volt",
            "http://[::1]:00",
        ] {
            assert_eq!(
                Endpoint::custom(url),
                Err(ConfigError::InvalidUrl {
                    url: url.to_owned(),
                    reason: "the port must be written in digits, without a sign or leading zeros",
                }),
                "{url}"
            );
        }
        for url in [
            "https://x.example:0",
            "http://127.0.0.1:8080",
            "http://[::1]:80",
        ] {
            let endpoint = Endpoint::custom(url).unwrap();
            assert!(
                endpoint
                    .origin()
                    .unwrap()
                    .matches(&format!("{url}/banks").parse().unwrap()),
                "{url}"
            );
        }
    }

    /// A host ending in a number is an IPv4 address to reqwest's URL parser
    /// (WHATWG's) and to the system resolver (`inet_aton`), also written in
    /// shorthand, octal or hex: `10.0.0.010` is 10.0.0.8. Taken as written,
    /// credentials went to another host than the one written, and the
    /// reqwest middleware, which sees the address rewritten, sent requests
    /// to the base URL without the token.
    #[test]
    fn a_host_ending_in_a_number_must_be_an_ipv4_address_in_dotted_decimal() {
        for url in [
            "https://127.1:8443",
            "https://10.0.0.010",
            "https://0x7f.0.0.1",
            "https://0X7F000001",
            "https://2130706433/volt",
            "https://127.0.0.1.:8443",
            "https://1.2.3.4.5",
            "https://volt.example.123",
            "https://volt.example.0x",
        ] {
            assert_eq!(
                Endpoint::custom(url),
                Err(ConfigError::InvalidUrl {
                    url: url.to_owned(),
                    reason: "a host ending in a number must be an IPv4 address written as four decimal numbers without leading zeros",
                }),
                "{url}"
            );
            assert!(Origin::allowed(url).is_err(), "{url}");
        }
        for url in [
            "https://10.0.0.8",
            "http://127.0.0.1:8080",
            "https://0.0.0.0",
            "https://api.volt.io",
            "https://v2.volt.example",
            "https://volt.example.1a",
            "https://volt.example.0xg",
            "https://[::1]:8443",
        ] {
            assert!(Endpoint::custom(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn a_blank_variable_is_not_reported_as_unset() {
        // `VOLT_PASSWORD=` in an env file, or an empty mounted secret: the
        // variable is set, and the message must not send the user looking
        // for a missing one.
        let vars: Vec<_> = FULL
            .iter()
            .map(|&(k, v)| {
                if k == "VOLT_PASSWORD" {
                    (k, " \n")
                } else {
                    (k, v)
                }
            })
            .collect();
        let err = Credentials::from_lookup(&lookup(&vars)).unwrap_err();
        assert_eq!(err, ConfigError::MissingVariable("VOLT_PASSWORD"));
        assert_eq!(
            err.to_string(),
            "environment variable VOLT_PASSWORD is unset, blank or not unicode"
        );
    }

    #[test]
    fn env_configuration_prefers_base_url_and_validates_values() {
        let vars = [
            ("VOLT_BASE_URL", "http://127.0.0.1:9999"),
            ("VOLT_ENVIRONMENT", "production"),
            ("VOLT_API", "global"),
        ];
        let endpoint = Endpoint::from_lookup(&lookup(&vars)).unwrap();
        assert_eq!(
            endpoint.token_uri().to_string(),
            "http://127.0.0.1:9999/oauth"
        );
        assert_eq!(endpoint.api(), Api::Global);
        assert_eq!(
            Endpoint::from_lookup(&lookup(&[("VOLT_ENVIRONMENT", "staging")])).unwrap_err(),
            ConfigError::InvalidVariable("VOLT_ENVIRONMENT", "staging".into())
        );
        assert!(matches!(
            Endpoint::from_lookup(&lookup(&[("VOLT_BASE_URL", "http://volt.internal")])),
            Err(ConfigError::InsecureUrl(_))
        ));
    }

    /// Runs `child` in a child process of this test binary (running only
    /// `test`), started with the environment variables `vars` (and no other
    /// `VOLT_*`): a process sets its environment only before it starts
    /// without `unsafe`. `case` tells the child which of a test's calls to run.
    #[cfg(unix)]
    fn in_child_with(test: &str, case: &str, vars: &[(&str, &[u8])], child: impl FnOnce()) {
        use std::os::unix::ffi::OsStrExt;

        const CASE: &str = "VOLT_AUTH_TEST_CASE";
        if let Some(running) = std::env::var_os(CASE) {
            if running == case {
                child();
            }
            return;
        }
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", test, "--test-threads=1"])
            .env(CASE, case);
        for name in [
            "VOLT_BASE_URL",
            "VOLT_ENVIRONMENT",
            "VOLT_API",
            "VOLT_CLIENT_ID",
            "VOLT_CLIENT_SECRET",
            "VOLT_USERNAME",
            "VOLT_PASSWORD",
        ] {
            command.env_remove(name);
        }
        for (name, value) in vars {
            command.env(name, std::ffi::OsStr::from_bytes(value));
        }
        let output = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{case}: {stdout}");
        // The filter matched the test: it ran there.
        assert!(stdout.contains("1 passed"), "{case}: {stdout}");
    }

    #[test]
    #[cfg(unix)]
    fn a_variable_that_is_not_unicode_is_invalid_not_unset() {
        // A `VOLT_BASE_URL` that could not be read was taken for an unset
        // one: the credentials went to `VOLT_ENVIRONMENT`'s Volt instead of
        // the base URL's, without a word. Likewise `VOLT_API` (the Gateway).
        const TEST: &str = "config::tests::a_variable_that_is_not_unicode_is_invalid_not_unset";
        let base_url: (&str, &[u8]) = ("VOLT_BASE_URL", b"https://proxy\xff.example");
        let production: (&str, &[u8]) = ("VOLT_ENVIRONMENT", b"production");
        in_child_with(TEST, "base_url", &[base_url, production], || {
            assert_eq!(
                Endpoint::from_env(),
                Err(ConfigError::InvalidUrl {
                    url: "https://proxy\u{fffd}.example".into(),
                    reason: "not ASCII: write the host in punycode (xn--…)",
                })
            );
        });
        let api: (&str, &[u8]) = ("VOLT_API", b"gl\xffobal");
        in_child_with(TEST, "api", &[api, production], || {
            assert_eq!(
                Endpoint::from_env(),
                Err(ConfigError::InvalidVariable(
                    "VOLT_API",
                    "gl\u{fffd}obal".into()
                ))
            );
        });
        let environment: (&str, &[u8]) = ("VOLT_ENVIRONMENT", b"sandb\xffox");
        in_child_with(TEST, "environment", &[environment], || {
            assert_eq!(
                Endpoint::from_env(),
                Err(ConfigError::InvalidVariable(
                    "VOLT_ENVIRONMENT",
                    "sandb\u{fffd}ox".into()
                ))
            );
        });
        // The credentials say the same as ever: not unicode, not usable.
        let secret: (&str, &[u8]) = ("VOLT_CLIENT_SECRET", b"s3cret\xff");
        let vars = [
            ("VOLT_CLIENT_ID", &b"id"[..]),
            secret,
            ("VOLT_USERNAME", b"user"),
            ("VOLT_PASSWORD", b"password"),
        ];
        in_child_with(TEST, "credentials", &vars, || {
            assert_eq!(
                Credentials::from_env().unwrap_err(),
                ConfigError::MissingVariable("VOLT_CLIENT_SECRET")
            );
        });
    }
}
