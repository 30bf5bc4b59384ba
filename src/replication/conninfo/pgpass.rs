//! The password file (`~/.pgpass`), matched as libpq matches it.
//!
//! Each line is `hostname:port:database:username:password`; `*` alone in a
//! field matches anything; `\` escapes a `:` or `\`; lines starting with `#`
//! are comments; the first matching line wins.

/// What a connection is matched on (libpq's rules: no host or the default
/// socket directory is `localhost`, no port is `5432`, no database is the
/// user name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    /// Host name, address or socket directory.
    pub host: &'a str,
    /// Port.
    pub port: &'a str,
    /// Database.
    pub dbname: &'a str,
    /// User.
    pub user: &'a str,
}

/// Why a password file is ignored (libpq ignores it with a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a regular file.
    NotAFile,
    /// Readable or writable by group or others.
    TooOpen,
}

/// Checks the file's type and permission bits as libpq does.
pub fn check(is_file: bool, mode: u32) -> Result<(), Refusal> {
    if !is_file {
        Err(Refusal::NotAFile)
    } else if mode & 0o077 != 0 {
        Err(Refusal::TooOpen)
    } else {
        Ok(())
    }
}

/// The password of the first line of `text` that matches `target`.
pub fn lookup(text: &str, target: &Target) -> Option<String> {
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let rest = [target.host, target.port, target.dbname, target.user]
            .into_iter()
            .try_fold(line, |rest, token| match_field(rest, token));
        if let Some(rest) = rest {
            return Some(unescape(rest));
        }
    }
    None
}

/// If the field at the start of `line` matches `token`, the rest of the
/// line after the field's `:` (libpq's `pwdfMatchesString`).
fn match_field<'a>(line: &'a str, token: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix("*:") {
        return Some(rest);
    }
    let mut token = token.chars();
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        let (c, escaped) = if c == '\\' {
            match chars.next() {
                Some((_, next)) => (next, true),
                None => return None,
            }
        } else {
            (c, false)
        };
        if c == ':' && !escaped {
            return token.next().is_none().then(|| &line[i + 1..]);
        }
        if token.next() != Some(c) {
            return None;
        }
    }
    None
}

/// The password field: up to an unescaped `:` or the end, escapes removed.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        match c {
            ':' => break,
            '\\' => match chars.next() {
                Some(next) => out.push(next),
                None => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Target = Target { host: "db.example", port: "5432", dbname: "shop", user: "ada" };

    #[test]
    fn first_matching_line_wins_with_wildcards() {
        let file = "# comment\n\
                    other:5432:shop:ada:no\n\
                    db.example:5432:shop:bob:no\n\
                    db.example:*:shop:ada:yes\n\
                    *:*:*:*:fallback\n";
        assert_eq!(lookup(file, &T).as_deref(), Some("yes"));
        assert_eq!(lookup(file, &Target { user: "eve", ..T }).as_deref(), Some("fallback"));
        assert_eq!(lookup("db.example:5432:shop:ada:x\r\n", &T).as_deref(), Some("x"));
        assert_eq!(lookup("db.example:5432:shop:ada\n", &T), None, "a line without a password field");
        assert_eq!(lookup("", &T), None);
        // `*` only as a whole field.
        assert_eq!(lookup("db.*:5432:shop:ada:x\n", &T), None);
        assert_eq!(lookup("*db.example:5432:shop:ada:x\n", &T), None);
    }

    #[test]
    fn escapes_in_fields_and_password() {
        let t = Target { host: "h:1", dbname: "a\\b", ..T };
        assert_eq!(lookup("h\\:1:5432:a\\\\b:ada:p\\:w\\\\d:ignored\n", &t).as_deref(), Some("p:w\\d"));
        // A literal `*` escaped matches only `*`.
        assert_eq!(lookup("\\*:5432:shop:ada:x\n", &T), None);
        assert_eq!(lookup("\\*:5432:shop:ada:x\n", &Target { host: "*", ..T }).as_deref(), Some("x"));
        // A prefix of the token does not match.
        assert_eq!(lookup("db:5432:shop:ada:x\n", &T), None);
        assert_eq!(lookup("db.example.org:5432:shop:ada:x\n", &T), None);
    }

    #[test]
    fn permissions_as_libpq_checks_them() {
        assert_eq!(check(true, 0o600), Ok(()));
        assert_eq!(check(true, 0o400), Ok(()));
        assert_eq!(check(true, 0o640), Err(Refusal::TooOpen));
        assert_eq!(check(true, 0o604), Err(Refusal::TooOpen));
        assert_eq!(check(false, 0o600), Err(Refusal::NotAFile));
    }
}
