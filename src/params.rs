//! Query parameters: ordinary Rust values sent as `$1, $2, ...`.
//!
//! Values travel in PostgreSQL's text format. Rust integers, floats, booleans
//! and byte strings declare their type (so `SELECT $1` with an `i32` is an
//! `int4`); strings and JSON values are sent as `unknown`, exactly like a quoted
//! literal, so PostgreSQL infers their type from context (`$1` compared with a
//! `uuid` column is a `uuid`).

use std::fmt::Write;

use crate::oid;

/// One parameter value, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// SQL `NULL`.
    Null,
    /// Text whose type PostgreSQL infers from context (like a quoted literal).
    Untyped(String),
    /// Text in the input format of the type with this OID.
    Typed {
        /// The PostgreSQL type OID.
        oid: u32,
        /// The value in that type's text input format.
        text: String,
    },
}

impl Param {
    /// A value with an explicit type, e.g. `Param::typed(oid::UUID, "...")`.
    pub fn typed(oid: u32, text: impl Into<String>) -> Param {
        Param::Typed { oid, text: text.into() }
    }

    /// The type OID declared in `Parse` (0 lets the server infer it).
    pub(crate) fn type_oid(&self) -> u32 {
        match self {
            Param::Typed { oid, .. } => *oid,
            Param::Null | Param::Untyped(_) => 0,
        }
    }

    /// The text sent in `Bind`, `None` for NULL.
    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Param::Null => None,
            Param::Untyped(text) | Param::Typed { text, .. } => Some(text),
        }
    }
}

/// A Rust value that can be passed as a query parameter.
pub trait ToParam {
    /// Converts the value for sending.
    fn to_param(&self) -> Param;
}

impl<T: ToParam + ?Sized> ToParam for &T {
    fn to_param(&self) -> Param {
        (**self).to_param()
    }
}

impl ToParam for Param {
    fn to_param(&self) -> Param {
        self.clone()
    }
}

impl<T: ToParam> ToParam for Option<T> {
    fn to_param(&self) -> Param {
        self.as_ref().map_or(Param::Null, ToParam::to_param)
    }
}

macro_rules! typed_display {
    ($($ty:ty => $oid:expr),* $(,)?) => {$(
        impl ToParam for $ty {
            fn to_param(&self) -> Param {
                Param::Typed { oid: $oid, text: self.to_string() }
            }
        }
    )*};
}

typed_display! {
    i16 => oid::INT2,
    i32 => oid::INT4,
    i64 => oid::INT8,
    u32 => oid::OID,
}

impl ToParam for bool {
    fn to_param(&self) -> Param {
        Param::typed(oid::BOOL, if *self { "t" } else { "f" })
    }
}

fn float_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        // `{:?}` keeps the shortest text that round-trips exactly.
        format!("{v:?}")
    }
}

impl ToParam for f32 {
    fn to_param(&self) -> Param {
        Param::typed(oid::FLOAT4, float_text(f64::from(*self)))
    }
}

impl ToParam for f64 {
    fn to_param(&self) -> Param {
        Param::typed(oid::FLOAT8, float_text(*self))
    }
}

impl ToParam for str {
    fn to_param(&self) -> Param {
        Param::Untyped(self.to_owned())
    }
}

impl ToParam for String {
    fn to_param(&self) -> Param {
        Param::Untyped(self.clone())
    }
}

impl ToParam for [u8] {
    fn to_param(&self) -> Param {
        let mut text = String::with_capacity(2 + self.len() * 2);
        text.push_str("\\x");
        for byte in self {
            let _ = write!(text, "{byte:02x}");
        }
        Param::typed(oid::BYTEA, text)
    }
}

impl ToParam for Vec<u8> {
    fn to_param(&self) -> Param {
        self.as_slice().to_param()
    }
}

/// JSON scalars become the matching SQL scalar (a JSON string is plain text,
/// not a quoted JSON document); arrays and objects are sent as JSON text.
impl ToParam for serde_json::Value {
    fn to_param(&self) -> Param {
        use serde_json::Value;
        match self {
            Value::Null => Param::Null,
            Value::Bool(b) => b.to_param(),
            Value::Number(n) => Param::Untyped(n.to_string()),
            Value::String(s) => Param::Untyped(s.clone()),
            Value::Array(_) | Value::Object(_) => Param::Untyped(self.to_string()),
        }
    }
}

#[cfg(feature = "uuid")]
impl ToParam for uuid::Uuid {
    fn to_param(&self) -> Param {
        Param::typed(oid::UUID, self.to_string())
    }
}

#[cfg(feature = "chrono")]
mod chrono_params {
    use super::{Param, ToParam};
    use crate::oid;

    impl ToParam for chrono::NaiveDate {
        fn to_param(&self) -> Param {
            Param::typed(oid::DATE, self.format("%Y-%m-%d").to_string())
        }
    }

    impl ToParam for chrono::NaiveDateTime {
        fn to_param(&self) -> Param {
            Param::typed(oid::TIMESTAMP, self.format("%Y-%m-%d %H:%M:%S%.f").to_string())
        }
    }

    impl<Tz: chrono::TimeZone> ToParam for chrono::DateTime<Tz> {
        fn to_param(&self) -> Param {
            Param::typed(oid::TIMESTAMPTZ, self.to_rfc3339())
        }
    }
}

/// Builds a `Vec<Param>` from a list of values of different types:
/// `params![1_i32, "two", None::<i64>]`.
#[macro_export]
macro_rules! params {
    () => { ::std::vec::Vec::<$crate::Param>::new() };
    ($($value:expr),+ $(,)?) => {
        ::std::vec![$($crate::ToParam::to_param(&$value)),+]
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_encode_in_text_format() {
        assert_eq!(42_i32.to_param(), Param::typed(oid::INT4, "42"));
        assert_eq!(true.to_param(), Param::typed(oid::BOOL, "t"));
        assert_eq!(0.1_f64.to_param(), Param::typed(oid::FLOAT8, "0.1"));
        assert_eq!(f64::NEG_INFINITY.to_param(), Param::typed(oid::FLOAT8, "-Infinity"));
        assert_eq!(vec![0_u8, 255].to_param(), Param::typed(oid::BYTEA, "\\x00ff"));
        assert_eq!(None::<i32>.to_param(), Param::Null);
        assert_eq!("x'y".to_param(), Param::Untyped("x'y".into()));
    }

    #[test]
    fn json_scalars_are_plain_values() {
        let v = serde_json::json!({"a": [1, "b"]});
        assert_eq!(v.to_param(), Param::Untyped(r#"{"a":[1,"b"]}"#.into()));
        assert_eq!(serde_json::json!("s").to_param(), Param::Untyped("s".into()));
        assert_eq!(serde_json::json!(null).to_param(), Param::Null);
    }

    #[test]
    fn params_macro_mixes_types() {
        let p = crate::params![1_i64, "a", None::<bool>];
        assert_eq!(p.len(), 3);
        assert_eq!(p[2], Param::Null);
    }
}
