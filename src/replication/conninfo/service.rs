//! Connection service files (`pg_service.conf`), read as libpq reads them:
//! `[name]` starts a service, `key=value` lines inside it are connection
//! keywords, `#` starts a comment line, blanks around lines are ignored.

use super::parse::{Params, is_keyword};

/// The service's settings from one file, `Ok(None)` if the file does not
/// define it. `file` names the file in errors.
pub fn lookup(text: &str, service: &str, file: &str) -> Result<Option<Params>, String> {
    let mut found: Option<Params> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            if found.is_some() {
                break;
            }
            if name.strip_suffix(']') == Some(service) {
                found = Some(Params::new());
            }
            continue;
        }
        let Some(params) = found.as_mut() else { continue };
        let line_no = n + 1;
        let (key, value) =
            line.split_once('=').ok_or_else(|| format!("syntax error in service file \"{file}\", line {line_no}"))?;
        let key = key.trim();
        if key == "service" {
            return Err(format!(
                "nested service specifications not supported in service file \"{file}\", line {line_no}"
            ));
        }
        if !is_keyword(key) {
            return Err(format!("syntax error in service file \"{file}\", line {line_no}"));
        }
        // libpq: the first setting of a keyword in the service wins.
        params.entry(key.to_owned()).or_insert_with(|| value.trim().to_owned());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# services\n\
        [other]\nhost=elsewhere\n\n\
        [shop]\n  host = db.example \nport=6543\n# comment\ndbname=shop\nport=1\n\
        [after]\nhost=x\n";

    #[test]
    fn reads_the_named_service_only() {
        let shop = lookup(FILE, "shop", "f").unwrap().unwrap();
        let pairs: Vec<(&str, &str)> = shop.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("dbname", "shop"), ("host", "db.example"), ("port", "6543")]);
        assert_eq!(lookup(FILE, "missing", "f").unwrap(), None);
        assert_eq!(lookup("", "shop", "f").unwrap(), None);
    }

    #[test]
    fn bad_lines_in_the_service_are_errors() {
        let e = lookup("[s]\nhost\n", "s", "/etc/pg_service.conf").unwrap_err();
        assert_eq!(e, "syntax error in service file \"/etc/pg_service.conf\", line 2");
        assert!(lookup("[s]\nservice=t\n", "s", "f").unwrap_err().contains("nested service"));
        assert!(lookup("[s]\nbogus=1\n", "s", "f").unwrap_err().contains("line 2"));
        // Lines of other services are not checked.
        assert!(lookup("[t]\nbogus\n[s]\nhost=h\n", "s", "f").unwrap().is_some());
    }
}
