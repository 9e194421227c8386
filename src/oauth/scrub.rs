//! [`scrub`]: a server's error text, shortened, without control characters
//! and without the secrets the grant sent.
//!
//! A server that refuses a grant may echo the request back, and not always as
//! it was sent: percent-encoded by another encoder, JSON- or HTML-escaped, or
//! in another case. Each secret is blanked out in every spelling it may come
//! back in before the text is kept in an error; a secret too short to be told
//! from ordinary words hides the whole text instead.

use zeroize::Zeroizing;

/// How much of a server's error message is kept.
const MAX_MESSAGE_CHARS: usize = 300;

/// The shortest secret blanked out where it occurs in a server's text; a
/// shorter one (`"abc"` would match ordinary words) hides the whole text.
const MIN_SCRUBBED: usize = 4;

/// Shortens a server's text, drops control characters and blanks out secrets,
/// in every spelling a server may echo them in (see [`spellings`]), ignoring
/// case (see [`redact`]). A secret too short to be told from ordinary text
/// (a spelling under [`MIN_SCRUBBED`] bytes) blanks out the whole text
/// instead.
pub(super) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut spellings: Vec<Zeroizing<String>> = secrets
        .iter()
        .flat_map(|secret| spellings(secret))
        .filter(|spelling| !spelling.is_empty())
        .collect();
    if spellings
        .iter()
        .any(|spelling| spelling.len() < MIN_SCRUBBED)
    {
        return "[redacted]".to_owned();
    }
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    // A spelling that several encodings leave alike is searched for once.
    spellings.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    spellings.dedup();
    let mut clean = redact(&clean, &spellings);
    if clean.chars().count() > MAX_MESSAGE_CHARS {
        clean = clean.chars().take(MAX_MESSAGE_CHARS).collect();
        clean.push('…');
    }
    clean
}

/// `secret` as sent and as a server may echo the request it was sent in:
/// percent-encoded as a form (`+` or `%20` for a space), as PHP's
/// `urlencode` does (`~` and `*` encoded), as RFC 3986 does (`~` kept, `*`
/// encoded), as Python's `quote` does (`/` also kept) and as JavaScript's
/// `encodeURIComponent` does (`!*'()~` kept), and the form body as sent
/// percent-encoded again (`&` as `%2526`); JSON-escaped (`/` also as `\/`),
/// also with every non-ASCII character as `\uXXXX` (PHP's `json_encode`,
/// Python's `json.dumps`), or with the characters HTML gives a meaning to as
/// `\uXXXX` too (Go's `encoding/json`, .NET's `System.Text.Json`);
/// HTML-escaped as the common escapers write it (see [`HTML_ESCAPES`]), as
/// sent or as the JSON body holds it; without control characters
/// (which [`scrub`] drops from the text); and without the whitespace around
/// it (which a server's text loses at its ends before it is scrubbed, see
/// [`text`](super::text)).
fn spellings(secret: &str) -> Vec<Zeroizing<String>> {
    let stripped: Zeroizing<String> =
        Zeroizing::new(secret.chars().filter(|c| !c.is_control()).collect());
    let trimmed = Zeroizing::new(stripped.trim().to_owned());
    let mut spellings = vec![
        Zeroizing::new(secret.to_owned()),
        Zeroizing::new(secret.trim().to_owned()),
        trimmed.clone(),
        stripped,
    ];
    // As the grant's form body holds it.
    let form = Zeroizing::new(percent_encoded(secret, b"*-._").replace("%20", "+"));
    // What each set keeps besides letters and digits: the form's
    // (`serde_urlencoded`, WHATWG's, as the grant is sent), PHP's
    // `urlencode`, RFC 3986's, Python's `quote`, and `encodeURIComponent`'s.
    for kept in [&b"*-._"[..], b"-._", b"-._~", b"/-._~", b"!'()*-._~"] {
        let encoded = percent_encoded(secret, kept);
        spellings.push(Zeroizing::new(encoded.replace("%20", "+")));
        spellings.push(encoded);
        // The form body as sent, encoded again: a server putting the raw
        // request into a URL or a percent-encoded log field.
        spellings.push(percent_encoded(&form, kept));
    }
    // As `serde_json` writes it, and with every non-ASCII character as
    // `\uXXXX` (PHP's `json_encode`, Python's `json.dumps`); each also with
    // `/` as `\/`.
    let json = json_escaped(secret, |_| false);
    for escaped in [json.clone(), json_escaped(secret, |c| !c.is_ascii())] {
        spellings.push(Zeroizing::new(escaped.replace('/', "\\/")));
        spellings.push(escaped);
    }
    // Go's `<`, `>`, `&`, U+2028 and U+2029; .NET's `"`, `&`, `'`, `+`, `<`,
    // `>`, `` ` `` and every non-ASCII character.
    spellings.push(json_escaped(secret, |c| {
        matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}')
    }));
    spellings.push(json_escaped(secret, |c| {
        !c.is_ascii() || matches!(c, '"' | '&' | '\'' | '+' | '<' | '>' | '`')
    }));
    // HTML-escaped, as sent and as the grant's JSON body holds it: an HTML
    // error page echoing a field, or the whole body. Only when escaping
    // changes the secret.
    if secret.contains(['&', '<', '>', '"', '\'', '+']) {
        for table in HTML_ESCAPES {
            spellings.push(html_escaped(&trimmed, table));
            spellings.push(html_escaped(&json, table));
        }
    }
    spellings
}

/// `text` as a JSON string's content, every character `escaped` picks as
/// `\uXXXX`, the others as `serde_json` writes them.
fn json_escaped(text: &str, escaped: fn(char) -> bool) -> Zeroizing<String> {
    // A character of 1, 2, 3 or 4 bytes becomes at most 6, 6, 6 or 12.
    let mut json = Zeroizing::new(String::with_capacity(text.len() * 6));
    for c in text.chars() {
        match c {
            c if escaped(c) => push_unicode_escape(&mut json, c),
            '"' => json.push_str("\\\""),
            '\\' => json.push_str("\\\\"),
            '\n' => json.push_str("\\n"),
            '\r' => json.push_str("\\r"),
            '\t' => json.push_str("\\t"),
            '\u{8}' => json.push_str("\\b"),
            '\u{c}' => json.push_str("\\f"),
            c if c < ' ' => push_unicode_escape(&mut json, c),
            c => json.push(c),
        }
    }
    json
}

/// How common HTML escapers write `"`, `'` and `+`, besides `&`, `<` and `>`
/// as `&amp;`, `&lt;` and `&gt;`; a character not listed is kept.
const HTML_ESCAPES: [&[(char, &str)]; 8] = [
    // Python's `html.escape`, React.
    &[('"', "&quot;"), ('\'', "&#x27;")],
    // Rails' ERB, lodash's `escape`, .NET's `WebUtility.HtmlEncode`, Spring.
    &[('"', "&quot;"), ('\'', "&#39;")],
    // PHP's `htmlspecialchars` (`ENT_QUOTES`, its default since 8.1).
    &[('"', "&quot;"), ('\'', "&#039;")],
    // PHP's `htmlspecialchars` with `ENT_QUOTES | ENT_HTML5`, XML escapers.
    &[('"', "&quot;"), ('\'', "&apos;")],
    // Go's `html.EscapeString`, Jinja's MarkupSafe, OWASP's Java encoder.
    &[('"', "&#34;"), ('\'', "&#39;")],
    // Go's `html/template`.
    &[('"', "&#34;"), ('\'', "&#39;"), ('+', "&#43;")],
    // Apache Commons' `escapeHtml4`, PHP's `htmlspecialchars` before 8.1.
    &[('"', "&quot;")],
    // Python's `html.escape(quote=False)` and `saxutils.escape`.
    &[],
];

/// `text` with `&`, `<` and `>` as `&amp;`, `&lt;` and `&gt;`, and every
/// character `table` lists as its entity.
fn html_escaped(text: &str, table: &[(char, &str)]) -> Zeroizing<String> {
    // No entity is longer than 6 bytes.
    let mut html = Zeroizing::new(String::with_capacity(text.len() * 6));
    for c in text.chars() {
        match c {
            '&' => html.push_str("&amp;"),
            '<' => html.push_str("&lt;"),
            '>' => html.push_str("&gt;"),
            c => match table.iter().find(|(escaped, _)| *escaped == c) {
                Some((_, entity)) => html.push_str(entity),
                None => html.push(c),
            },
        }
    }
    html
}

/// `c` as `\uXXXX` (UTF-16, so a character beyond the BMP as a surrogate
/// pair).
fn push_unicode_escape(escaped: &mut String, c: char) {
    let mut units = [0u16; 2];
    for &mut unit in c.encode_utf16(&mut units) {
        escaped.push_str("\\u");
        for shift in [12, 8, 4, 0] {
            let digit = u32::from((unit >> shift) & 0xf);
            escaped.push(char::from_digit(digit, 16).unwrap_or('0'));
        }
    }
}

/// `text` with every byte but ASCII letters, digits and `kept` as `%XX`.
fn percent_encoded(text: &str, kept: &[u8]) -> Zeroizing<String> {
    // Sized for the worst case, so that no smaller buffer is left unwiped.
    let mut encoded = Zeroizing::new(String::with_capacity(text.len() * 3));
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || kept.contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            encoded.push('%');
            encoded.push(char::from(HEX[usize::from(byte >> 4)]));
            encoded.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    encoded
}

/// `text` with every occurrence of any of `secrets`, in any case, replaced
/// by `[redacted]`; occurrences that overlap (a secret holding another) are
/// blanked out as one. Characters are compared by the lower case of their
/// upper case, so that `ä` matches `Ä` and `ß` matches `SS`. That may change
/// lengths: each match in the folded text is mapped back to the characters
/// of `text` it comes from, whole.
fn redact(text: &str, secrets: &[Zeroizing<String>]) -> String {
    // Folding makes at most three bytes of one (`ΐ`, two bytes, folds to six).
    let mut folded = Zeroizing::new(String::with_capacity(text.len() * 3));
    // For each byte of `folded`, where in `text` its character begins.
    let mut origin = Vec::with_capacity(text.len());
    for (at, c) in text.char_indices() {
        folded.extend(fold(c));
        origin.resize(folded.len(), at);
    }
    // The spans of `text` to blank out.
    let mut spans = Vec::new();
    for secret in secrets {
        let mut wanted = Zeroizing::new(String::with_capacity(secret.len() * 3));
        wanted.extend(secret.chars().flat_map(fold));
        if wanted.is_empty() {
            continue;
        }
        let mut from = 0;
        while let Some(found) = folded[from..].find(wanted.as_str()) {
            let start = from + found;
            from = start + wanted.len();
            let last = origin[from - 1];
            let end = last + text[last..].chars().next().map_or(0, char::len_utf8);
            spans.push((origin[start], end));
        }
    }
    spans.sort_unstable();
    let mut redacted = String::with_capacity(text.len());
    let mut kept = 0;
    for (start, end) in spans {
        if start < kept {
            // Overlaps the span blanked out last: extends it.
            kept = kept.max(end);
            continue;
        }
        redacted.push_str(&text[kept..start]);
        redacted.push_str("[redacted]");
        kept = end;
    }
    redacted.push_str(&text[kept..]);
    redacted
}

/// `c` as [`redact`] compares it: the lower case of its upper case.
fn fold(c: char) -> impl Iterator<Item = char> {
    c.to_uppercase().flat_map(char::to_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_blanks_out_every_spelling_and_the_longest_secret_whole() {
        // A password holding the client secret: blanked whole, no tail left.
        let secrets = ["abcd", "abcd-efgh", "quote\"end\""];
        let shown = scrub("x abcd-efgh ABCD-EFGH y", &secrets);
        assert_eq!(shown, "x [redacted] [redacted] y");
        // A secret ending in a quote, echoed JSON-escaped.
        let shown = scrub(r#"{"password":"quote\"end\""}"#, &secrets);
        assert_eq!(shown, r#"{"password":"[redacted]"}"#);
        // Non-ASCII text around a match keeps its characters.
        assert_eq!(scrub("é abcd ü", &secrets), "é [redacted] ü");
    }

    /// A server echoing the request as it decoded it, re-encoded by another
    /// encoder than the one that sent it: JSON with every non-ASCII character
    /// escaped (PHP's `json_encode`, Python's `json.dumps`), percent-encoded
    /// keeping RFC 3986's `~` (Go's `QueryEscape`), also `/` (Python's
    /// `quote`), only `-._` (PHP's `urlencode`) or JavaScript's
    /// `encodeURIComponent` set (`!*'()~`).
    #[test]
    fn scrub_blanks_out_ascii_escaped_json_and_other_percent_encodings() {
        let secrets = ["p\u{e4}ss/w\u{f6}rd-\u{1f600}", "Pa55 w0rd~(x)*!"];
        for echoed in [
            r#"{"password":"p\u00e4ss\/w\u00f6rd-\ud83d\ude00"}"#,
            r#"{"password":"p\u00E4ss/w\u00F6rd-\uD83D\uDE00"}"#,
        ] {
            assert_eq!(scrub(echoed, &secrets), r#"{"password":"[redacted]"}"#);
        }
        for echoed in [
            "password=Pa55%20w0rd~%28x%29%2A%21",
            "password=Pa55+w0rd~%28x%29%2a%21",
            "password=Pa55%20w0rd~(x)*!",
            // PHP's `urlencode` and `http_build_query`: `~` and `*` encoded.
            "password=Pa55+w0rd%7E%28x%29%2A%21",
            // Python's `quote`: `/` kept.
            "password=p%C3%A4ss/w%C3%B6rd-%F0%9F%98%80",
        ] {
            assert_eq!(scrub(echoed, &secrets), "password=[redacted]", "{echoed}");
        }
    }

    /// An HTML page (or text meant for one) echoing a secret as the common
    /// escapers write it: `&`, `<` and `>` as named entities, `"` as
    /// `&quot;` or `&#34;` or kept, `'` as `&#x27;`, `&#39;`, `&#039;`,
    /// `&apos;` or kept, and, by Go's `html/template`, `+` as `&#43;`.
    #[test]
    fn scrub_blanks_out_html_escaped_secrets() {
        let secrets = ["p&ss<w>\"rd'", "Zm9v+YmFy/Q=='"];
        for echoed in [
            // Python's `html.escape`, React.
            "p&amp;ss&lt;w&gt;&quot;rd&#x27;",
            // Go's `html.EscapeString`, Jinja's MarkupSafe.
            "p&amp;ss&lt;w&gt;&#34;rd&#39;",
            // Rails' ERB, lodash, .NET's `WebUtility.HtmlEncode`.
            "p&amp;ss&lt;w&gt;&quot;rd&#39;",
            // PHP's `htmlspecialchars`, ENT_QUOTES and with ENT_HTML5.
            "p&amp;ss&lt;w&gt;&quot;rd&#039;",
            "p&amp;ss&lt;w&gt;&quot;rd&apos;",
            // Apache Commons' `escapeHtml4`: `'` kept.
            "p&amp;ss&lt;w&gt;&quot;rd'",
            // Python's `html.escape(quote=False)`: both quotes kept.
            "p&amp;ss&lt;w&gt;\"rd'",
            // Go's `html/template`.
            "Zm9v&#43;YmFy/Q==&#39;",
            // Any case.
            "P&AMP;SS&LT;W&GT;&QUOT;RD&#X27;",
        ] {
            let text = format!("<p>Wrong password {echoed} for alice.</p>");
            assert_eq!(
                scrub(&text, &secrets),
                "<p>Wrong password [redacted] for alice.</p>",
                "{echoed}"
            );
        }
    }

    /// An HTML page echoing the JSON body the grant was sent in: the secret
    /// JSON-escaped, then HTML-escaped.
    #[test]
    fn scrub_blanks_out_the_json_body_html_escaped() {
        let secrets = ["the-client-secret", "p&ss<w>\"rd'"];
        let echoed =
            "<pre>{&quot;password&quot;:&quot;p&amp;ss&lt;w&gt;\\&quot;rd&#39;&quot;}</pre>";
        assert_eq!(
            scrub(echoed, &secrets),
            "<pre>{&quot;password&quot;:&quot;[redacted]&quot;}</pre>"
        );
    }

    /// The form body as sent, percent-encoded again (`&` as `%2526`), as a
    /// server that puts the raw request into a URL or a percent-encoded log
    /// field writes it, keeping `*` or not.
    #[test]
    fn scrub_blanks_out_the_form_body_percent_encoded_again() {
        let secrets = ["the-client-secret", "p&ss+w rd*/"];
        for echoed in ["p%2526ss%252Bw%2Brd*%252F", "p%2526ss%252Bw%2Brd%2A%252F"] {
            let text = format!("see /error?body=password%3D{echoed}%26username%3Dalice");
            assert_eq!(
                scrub(&text, &secrets),
                "see /error?body=password%3D[redacted]%26username%3Dalice",
                "{echoed}"
            );
        }
    }

    /// With nothing picked, [`json_escaped`] writes what `serde_json` writes
    /// inside the quotes: control characters, quotes, backslashes and all.
    #[test]
    fn json_escaped_writes_what_serde_json_writes() {
        let text: String = (0..0x80u8)
            .map(char::from)
            .chain(['\u{e9}', '\u{2028}', '\u{1f600}'])
            .collect();
        let json = serde_json::to_string(&text).unwrap();
        assert_eq!(*json_escaped(&text, |_| false), json[1..json.len() - 1]);
    }

    /// Any letter's case: a server that upper- or lower-cases what it
    /// echoes changes `ä` and `ß` too. A match is blanked out in whole
    /// characters, and secrets that overlap as one.
    #[test]
    fn scrub_ignores_the_case_of_every_letter() {
        let secrets = ["Stra\u{df}e-\u{fc}n\u{ef}", "abcd-efgh", "efgh-ijkl"];
        for echoed in [
            "x STRASSE-\u{dc}N\u{cf} y",
            "x strasse-\u{fc}n\u{ef} y",
            "x Stra\u{df}e-\u{fc}N\u{ef} y",
            "x abcd-EFGH-ijkl y",
        ] {
            assert_eq!(scrub(echoed, &secrets), "x [redacted] y", "{echoed}");
        }
        // A match that begins inside a character's folding takes it whole.
        assert_eq!(
            scrub("\u{e9} \u{df}-1234 \u{fc}", &["s-1234"]),
            "\u{e9} [redacted] \u{fc}"
        );
    }
}
