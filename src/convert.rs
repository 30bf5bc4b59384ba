//! Conversions from PostgreSQL's text format to Rust values and to JSON.

use serde_json::Value as Json;

use crate::oid;

/// A Rust type that a column value converts into (`Option<T>` accepts NULL).
pub trait FromValue: Sized {
    /// Converts the text of a value of type `type_oid` (`None` is NULL).
    fn from_value(type_oid: u32, text: Option<&str>) -> Result<Self, String>;
}

fn non_null(text: Option<&str>) -> Result<&str, String> {
    text.ok_or_else(|| "value is NULL; use Option<T>".to_string())
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(type_oid: u32, text: Option<&str>) -> Result<Self, String> {
        text.map(|t| T::from_value(type_oid, Some(t))).transpose()
    }
}

macro_rules! from_str_value {
    ($($ty:ty),*) => {$(
        impl FromValue for $ty {
            fn from_value(_: u32, text: Option<&str>) -> Result<Self, String> {
                let text = non_null(text)?;
                text.parse().map_err(|e| format!("{text:?} is not a {}: {e}", stringify!($ty)))
            }
        }
    )*};
}
from_str_value!(i16, i32, i64, u32);

macro_rules! float_value {
    ($($ty:ty),*) => {$(
        impl FromValue for $ty {
            fn from_value(_: u32, text: Option<&str>) -> Result<Self, String> {
                match non_null(text)? {
                    "NaN" => Ok(<$ty>::NAN),
                    "Infinity" => Ok(<$ty>::INFINITY),
                    "-Infinity" => Ok(<$ty>::NEG_INFINITY),
                    t => t.parse().map_err(|e| format!("{t:?} is not a number: {e}")),
                }
            }
        }
    )*};
}
float_value!(f32, f64);

impl FromValue for bool {
    fn from_value(_: u32, text: Option<&str>) -> Result<Self, String> {
        match non_null(text)? {
            "t" | "true" => Ok(true),
            "f" | "false" => Ok(false),
            t => Err(format!("{t:?} is not a boolean")),
        }
    }
}

impl FromValue for String {
    fn from_value(_: u32, text: Option<&str>) -> Result<Self, String> {
        non_null(text).map(str::to_owned)
    }
}

impl FromValue for Vec<u8> {
    fn from_value(type_oid: u32, text: Option<&str>) -> Result<Self, String> {
        let text = non_null(text)?;
        if type_oid == oid::BYTEA { decode_bytea(text) } else { Ok(text.as_bytes().to_vec()) }
    }
}

impl FromValue for Json {
    fn from_value(type_oid: u32, text: Option<&str>) -> Result<Self, String> {
        Ok(to_json(type_oid, text))
    }
}

#[cfg(feature = "uuid")]
impl FromValue for uuid::Uuid {
    fn from_value(_: u32, text: Option<&str>) -> Result<Self, String> {
        non_null(text)?.parse().map_err(|e| format!("not a uuid: {e}"))
    }
}

#[cfg(feature = "chrono")]
mod chrono_values {
    use super::{FromValue, non_null};

    impl FromValue for chrono::NaiveDate {
        fn from_value(_: u32, text: Option<&str>) -> Result<Self, String> {
            chrono::NaiveDate::parse_from_str(non_null(text)?, "%Y-%m-%d").map_err(|e| e.to_string())
        }
    }

    impl FromValue for chrono::NaiveDateTime {
        fn from_value(_: u32, text: Option<&str>) -> Result<Self, String> {
            chrono::NaiveDateTime::parse_from_str(non_null(text)?, "%Y-%m-%d %H:%M:%S%.f").map_err(|e| e.to_string())
        }
    }

    /// Expects the server's `DateStyle` ISO output, e.g. `2024-01-02 03:04:05.6+00`.
    impl FromValue for chrono::DateTime<chrono::Utc> {
        fn from_value(_: u32, text: Option<&str>) -> Result<Self, String> {
            let text = non_null(text)?;
            chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|e| format!("{text:?}: {e}"))
        }
    }
}

/// Decodes `bytea` in the server's default `hex` output format (`\x0aff...`).
pub fn decode_bytea(text: &str) -> Result<Vec<u8>, String> {
    let hex =
        text.strip_prefix("\\x").ok_or_else(|| "bytea is not in hex format (bytea_output = 'hex')".to_string())?;
    if hex.len() % 2 != 0 {
        return Err("odd number of hex digits in bytea".into());
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string())).collect()
}

/// Converts a value to JSON by its type: booleans, integers and finite floats
/// become JSON booleans and numbers; `json`/`jsonb` are parsed; arrays of
/// built-in types become JSON arrays; everything else (numeric, to keep its
/// precision, dates, uuids, bytea as `\x..` text, enums...) is a JSON string.
pub fn to_json(type_oid: u32, text: Option<&str>) -> Json {
    let Some(text) = text else { return Json::Null };
    match type_oid {
        oid::BOOL => Json::Bool(text == "t"),
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            text.parse::<i64>().map(Json::from).unwrap_or_else(|_| Json::String(text.into()))
        }
        oid::FLOAT4 | oid::FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Json::String(text.into()), Json::Number),
        oid::JSON | oid::JSONB => serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.into())),
        other => match oid::array_element(other) {
            Some(element) => {
                parse_array(text).map(|a| array_to_json(&a, element)).unwrap_or_else(|_| Json::String(text.into()))
            }
            None => Json::String(text.into()),
        },
    }
}

/// A parsed array literal: nested arrays of (possibly NULL) element texts.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayItem {
    /// A nested dimension.
    Array(Vec<ArrayItem>),
    /// An element's text, `None` for NULL.
    Element(Option<String>),
}

fn array_to_json(items: &[ArrayItem], element: u32) -> Json {
    Json::Array(
        items
            .iter()
            .map(|item| match item {
                ArrayItem::Array(inner) => array_to_json(inner, element),
                ArrayItem::Element(text) => to_json(element, text.as_deref()),
            })
            .collect(),
    )
}

/// Parses an array literal in PostgreSQL's output format, e.g.
/// `{1,NULL,"a \"b\""}` or `{{1,2},{3,4}}` (with `,` as the delimiter, which
/// every built-in type but `box` uses). Lower bounds (`[0:1]={...}`) are
/// skipped.
pub fn parse_array(text: &str) -> Result<Vec<ArrayItem>, String> {
    let text = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let mut chars = text.chars().peekable();
    let items = parse_dimension(&mut chars)?;
    if chars.next().is_some() {
        return Err("trailing characters after array literal".into());
    }
    Ok(items)
}

fn parse_dimension(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<Vec<ArrayItem>, String> {
    if chars.next() != Some('{') {
        return Err("array literal must start with '{'".into());
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Ok(items);
    }
    loop {
        match chars.peek() {
            Some('{') => items.push(ArrayItem::Array(parse_dimension(chars)?)),
            Some('"') => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => s.push(chars.next().ok_or("unterminated escape")?),
                        Some('"') => break,
                        Some(c) => s.push(c),
                        None => return Err("unterminated quoted element".into()),
                    }
                }
                items.push(ArrayItem::Element(Some(s)));
            }
            Some(_) => {
                let mut s = String::new();
                let mut escaped = false;
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    chars.next();
                    if c == '\\' {
                        s.push(chars.next().ok_or("unterminated escape")?);
                        escaped = true;
                    } else {
                        s.push(c);
                    }
                }
                let is_null = !escaped && s == "NULL";
                items.push(ArrayItem::Element(if is_null { None } else { Some(s) }));
            }
            None => return Err("unterminated array literal".into()),
        }
        match chars.next() {
            Some(',') => continue,
            Some('}') => return Ok(items),
            _ => return Err("expected ',' or '}' in array literal".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arrays_parse_with_quotes_nulls_and_nesting() {
        assert_eq!(to_json(1007, Some("{1,NULL,3}")), json!([1, null, 3]));
        assert_eq!(
            to_json(1009, Some(r#"{"a b","q\"x","NULL",NULL,c\\d}"#)),
            json!(["a b", "q\"x", "NULL", null, "c\\d"])
        );
        assert_eq!(to_json(1007, Some("{{1,2},{3,4}}")), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(1007, Some("{}")), json!([]));
        assert_eq!(to_json(1007, Some("[0:1]={5,6}")), json!([5, 6]));
        assert!(parse_array("{1,2").is_err());
    }

    #[test]
    fn scalars_to_json() {
        assert_eq!(to_json(oid::BOOL, Some("t")), json!(true));
        assert_eq!(to_json(oid::INT8, Some("-9007199254740993")), json!(-9007199254740993_i64));
        assert_eq!(to_json(oid::FLOAT8, Some("NaN")), json!("NaN"));
        assert_eq!(to_json(oid::NUMERIC, Some("1.10")), json!("1.10"));
        assert_eq!(to_json(oid::JSONB, Some(r#"{"a": 1}"#)), json!({"a": 1}));
        assert_eq!(to_json(oid::TEXT, None), json!(null));
    }

    #[test]
    fn bytea_hex_round_trip() {
        assert_eq!(decode_bytea("\\x00ff10").unwrap(), vec![0, 255, 16]);
        assert!(decode_bytea("\\x0").is_err());
        assert!(decode_bytea("abc").is_err());
    }

    #[test]
    fn typed_conversions() {
        assert_eq!(i32::from_value(oid::INT4, Some("-5")), Ok(-5));
        assert!(f64::from_value(oid::FLOAT8, Some("Infinity")).unwrap().is_infinite());
        assert_eq!(Option::<i32>::from_value(oid::INT4, None), Ok(None));
        assert!(i32::from_value(oid::INT4, None).is_err());
        assert!(bool::from_value(oid::BOOL, Some("x")).is_err());
    }
}
