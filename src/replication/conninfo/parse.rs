//! libpq connection strings: `postgres://` URLs and `key=value` lists, read
//! into keyword → value pairs, and written back as a `key='value'` list.
//!
//! Error messages name keywords and positions, never values: a value may be
//! a password.

use std::collections::BTreeMap;

/// libpq keyword → value, as given (an empty value counts as given, as in
/// libpq).
pub type Params = BTreeMap<String, String>;

/// The keywords accepted: what libpq knows and the connection honours.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "passfile",
    "dbname",
    "options",
    "application_name",
    "connect_timeout",
    "sslmode",
    "sslrootcert",
    "sslnegotiation",
    "service",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "tcp_user_timeout",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// Whether `key` is a connection keyword we accept.
pub fn is_keyword(key: &str) -> bool {
    KEYWORDS.contains(&key)
}

/// Parses a URL (`postgres://` or `postgresql://`) or a `key=value` list.
pub fn parse(s: &str) -> Result<Params, String> {
    let trimmed = s.trim_start();
    for prefix in ["postgresql://", "postgres://"] {
        if let Some(rest) = trimmed.strip_prefix(prefix) {
            return parse_url(rest);
        }
    }
    parse_key_values(s)
}

/// `key = value` pairs separated by whitespace; values unquoted (a backslash
/// takes the next character literally) or in single quotes (with the same
/// backslash escapes). Later keys win.
fn parse_key_values(s: &str) -> Result<Params, String> {
    let mut params = Params::new();
    let mut chars = s.chars().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::Chars>| {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        if chars.peek().is_none() {
            return Ok(params);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_ws(&mut chars);
        if chars.next() != Some('=') {
            return Err(format!("missing \"=\" after \"{key}\" in connection string"));
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated quoted value of \"{key}\" in connection string")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        insert(&mut params, key, value)?;
    }
}

fn insert(params: &mut Params, key: String, value: String) -> Result<(), String> {
    if !is_keyword(&key) {
        return Err(format!("invalid connection option \"{key}\""));
    }
    params.insert(key, value);
    Ok(())
}

/// `[user[:password]@][host[:port][,host[:port]...]][/dbname][?key=value&...]`
/// after the scheme, percent-decoded, as libpq reads it.
fn parse_url(rest: &str) -> Result<Params, String> {
    let mut params = Params::new();
    let mut rest = rest;
    // Credentials end at the first '@' before any '/'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    if let Some(at) = rest[..authority_end].rfind('@') {
        let userinfo = &rest[..at];
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            params.insert("user".into(), decode(user, "user")?);
        }
        if let Some(password) = password {
            params.insert("password".into(), decode(password, "password")?);
        }
        rest = &rest[at + 1..];
    }
    // Hosts and ports, comma-separated; IPv6 addresses in brackets.
    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
    loop {
        let (host, after) = if let Some(v6) = rest.strip_prefix('[') {
            let close = v6.find(']').ok_or("missing \"]\" after an IPv6 host address in the URL")?;
            (&v6[..close], &v6[close + 1..])
        } else {
            let end = rest.find([':', '/', '?', ',']).unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        hosts.push(decode(host, "host")?);
        rest = after;
        let mut port = "";
        if let Some(p) = rest.strip_prefix(':') {
            let end = p.find(['/', '?', ',']).unwrap_or(p.len());
            port = &p[..end];
            rest = &p[end..];
        }
        ports.push(decode(port, "port")?);
        match rest.strip_prefix(',') {
            Some(next) => rest = next,
            None => break,
        }
    }
    if hosts.iter().any(|h| !h.is_empty()) {
        params.insert("host".into(), hosts.join(","));
    }
    if ports.iter().any(|p| !p.is_empty()) {
        params.insert("port".into(), ports.join(","));
    }
    if let Some(path) = rest.strip_prefix('/') {
        let end = path.find('?').unwrap_or(path.len());
        if end > 0 {
            params.insert("dbname".into(), decode(&path[..end], "dbname")?);
        }
        rest = &path[end..];
    }
    if let Some(query) = rest.strip_prefix('?') {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) =
                pair.split_once('=').ok_or("missing \"=\" in a URL query parameter (give key=value pairs)")?;
            let key = decode(key, "query parameter name")?;
            let value = decode(value, &key)?;
            // libpq's JDBC-compatible spelling.
            if key == "ssl" && value == "true" {
                params.insert("sslmode".into(), "require".into());
                continue;
            }
            insert(&mut params, key, value)?;
        }
    } else if !rest.is_empty() {
        return Err("unexpected characters after the host list in the URL".into());
    }
    Ok(params)
}

/// Percent-decoding; `what` names the part in the error, never its value.
fn decode(s: &str, what: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = s
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .filter(|b| *b != 0)
                .ok_or_else(|| format!("invalid percent-encoded token in the URL's {what}"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the URL's {what} is not valid UTF-8 once decoded"))
}

/// Writes `params` as a `key='value'` list (skipping empty values, which
/// mean "not set" to the connection).
pub fn render<'a>(params: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut out = String::new();
    for (key, value) in params {
        if value.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(key);
        out.push_str("='");
        for c in value.chars() {
            if c == '\'' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('\'');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn urls_as_libpq_reads_them() {
        assert_eq!(
            parse("postgres://ada:s%40cret@db.example:6543/shop?sslmode=disable&application_name=x%20y").unwrap(),
            p(&[
                ("user", "ada"),
                ("password", "s@cret"),
                ("host", "db.example"),
                ("port", "6543"),
                ("dbname", "shop"),
                ("sslmode", "disable"),
                ("application_name", "x y")
            ])
        );
        assert_eq!(parse("postgresql://").unwrap(), p(&[]));
        assert_eq!(parse("postgres:///db").unwrap(), p(&[("dbname", "db")]));
        assert_eq!(
            parse("postgres://%2Ftmp%2Fpg:5433/db").unwrap(),
            p(&[("host", "/tmp/pg"), ("port", "5433"), ("dbname", "db")])
        );
        assert_eq!(
            parse("postgres://u@[::1]:1,h2/db?ssl=true").unwrap(),
            p(&[("user", "u"), ("host", "::1,h2"), ("port", "1,"), ("dbname", "db"), ("sslmode", "require")])
        );
        assert_eq!(parse("postgres://u:@h").unwrap(), p(&[("user", "u"), ("password", ""), ("host", "h")]));
    }

    #[test]
    fn key_value_lists_as_libpq_reads_them() {
        assert_eq!(
            parse(" host=h port = 5 password='it\\'s' dbname='a b' user=x\\ y application_name= ").unwrap(),
            p(&[
                ("host", "h"),
                ("port", "5"),
                ("password", "it's"),
                ("dbname", "a b"),
                ("user", "x y"),
                ("application_name", "")
            ])
        );
        assert_eq!(parse("").unwrap(), p(&[]));
        assert_eq!(parse("host=a host=b").unwrap(), p(&[("host", "b")]));
    }

    #[test]
    fn errors_never_show_values() {
        for bad in [
            "postgres://u:se%ZZcret@h/db",
            "postgres://u:secret@h/db?nope=secret",
            "postgres://u:secret@[::1/db",
            "password='secret",
            "bogus=secret",
            "password secret",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }

    #[test]
    fn render_round_trips() {
        let params = p(&[("password", "a'b\\c d"), ("host", "h"), ("dbname", "")]);
        let text = render(&params);
        assert_eq!(text, "host='h' password='a\\'b\\\\c d'");
        let mut back = parse(&text).unwrap();
        back.insert("dbname".into(), String::new());
        assert_eq!(back, params);
        // tokio-postgres reads the same list the same way.
        let config: tokio_postgres::Config = text.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"a'b\\c d"[..]));
    }
}
