//! Binary `COPY` data for the streaming apply's bulk steps, made from the
//! text values pgoutput sends.
//!
//! The engine spends most of a text `COPY` in the types' input functions:
//! a 200,000-row load of `(bigint, int, text, timestamptz)` took 0.47-0.79 s
//! in text and 0.30-0.45 s in binary (the engine alone, BENCHMARKS.md round
//! 11), most of the difference in parsing the timestamps. So the apply turns the remote's
//! text output into the binary form of the types whose text is one fixed,
//! simple format (the replication connection pins `DateStyle=ISO` and
//! `extra_float_digits`, see [`super::config::PINNED_OPTIONS`]). Anything
//! else, or a value not in the expected form, makes the step use the text
//! format as before: the result is the same, only slower.
//!
//! Written here rather than with a date crate: `chrono` is an optional
//! feature of this library, and only PostgreSQL's own ISO output has to be
//! read, strictly.

use bytes::{BufMut, BytesMut};
use postgres_protocol::types;

use super::pgoutput::Value;

/// A column type this module encodes in binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `text`, `varchar`, `char(n)`, `json`: the binary form is the text.
    Text,
    Jsonb,
    Bytea,
    Uuid,
    Numeric,
    Date,
    Timestamp,
    Timestamptz,
}

impl Kind {
    /// The kind of a column, by its type as `format_type` prints it.
    pub(super) fn of(type_name: &str) -> Option<Kind> {
        // A type modifier (`varchar(20)`, `timestamp(3) with time zone`)
        // is applied by the binary input functions as by the text ones.
        let base = match type_name.split_once('(') {
            Some((head, rest)) => {
                let tail = rest.split_once(')').map_or("", |(_, t)| t);
                format!("{}{tail}", head.trim_end())
            }
            None => type_name.to_owned(),
        };
        Some(match base.as_str() {
            "boolean" => Kind::Bool,
            "smallint" => Kind::Int2,
            "integer" => Kind::Int4,
            "bigint" => Kind::Int8,
            "real" => Kind::Float4,
            "double precision" => Kind::Float8,
            "text" | "character varying" | "character" | "json" => Kind::Text,
            "jsonb" => Kind::Jsonb,
            "bytea" => Kind::Bytea,
            "uuid" => Kind::Uuid,
            "numeric" => Kind::Numeric,
            "date" => Kind::Date,
            "timestamp without time zone" => Kind::Timestamp,
            "timestamp with time zone" => Kind::Timestamptz,
            _ => return None,
        })
    }

    /// The kinds of a table's columns, if every one has a binary form here.
    pub(super) fn of_all<'a>(type_names: impl IntoIterator<Item = &'a str>) -> Option<Vec<Kind>> {
        type_names.into_iter().map(Kind::of).collect()
    }
}

/// Rows (one value per kind) as binary `COPY` data, header and trailer
/// included; `None` if a value is not in the text form expected of its
/// kind (the caller then sends text).
pub(super) fn copy_data(rows: &[&[Value]], kinds: &[Kind]) -> Option<Vec<u8>> {
    let mut out = BytesMut::with_capacity(19 + rows.len() * (2 + kinds.len() * 12));
    out.put_slice(b"PGCOPY\n\xff\r\n\0");
    out.put_i32(0); // flags
    out.put_i32(0); // header extension length
    let fields = i16::try_from(kinds.len()).ok()?;
    for row in rows {
        if row.len() != kinds.len() {
            return None;
        }
        out.put_i16(fields);
        for (value, &kind) in row.iter().zip(kinds) {
            match value {
                Value::Null => out.put_i32(-1),
                Value::Text(text) => {
                    let at = out.len();
                    out.put_i32(0);
                    encode(kind, text, &mut out)?;
                    let len = i32::try_from(out.len() - at - 4).ok()?;
                    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
                }
                Value::Unchanged | Value::Binary(_) => return None,
            }
        }
    }
    out.put_i16(-1);
    Some(out.into())
}

/// Appends the binary form of `text`, a value of `kind` in its text output.
fn encode(kind: Kind, text: &[u8], out: &mut BytesMut) -> Option<()> {
    let s = std::str::from_utf8(text).ok()?;
    match kind {
        Kind::Bool => types::bool_to_sql(
            match s {
                "t" => true,
                "f" => false,
                _ => return None,
            },
            out,
        ),
        Kind::Int2 => types::int2_to_sql(s.parse().ok()?, out),
        Kind::Int4 => types::int4_to_sql(s.parse().ok()?, out),
        Kind::Int8 => types::int8_to_sql(s.parse().ok()?, out),
        // The remote prints the shortest text that reads back exactly;
        // Rust's parsing rounds correctly, as PostgreSQL's does.
        Kind::Float4 => types::float4_to_sql(float(s)?, out),
        Kind::Float8 => types::float8_to_sql(float(s)?, out),
        Kind::Text => out.extend_from_slice(text),
        Kind::Jsonb => {
            out.put_u8(1); // jsonb's binary format version
            out.extend_from_slice(text);
        }
        Kind::Bytea => out.extend_from_slice(&hex(s.strip_prefix("\\x")?)?),
        Kind::Uuid => {
            let digits: String = s.split('-').collect();
            if s.len() != 36 || digits.len() != 32 {
                return None;
            }
            out.extend_from_slice(&hex(&digits)?);
        }
        Kind::Numeric => numeric(s, out)?,
        Kind::Date => types::date_to_sql(date(s)?, out),
        Kind::Timestamp => types::timestamp_to_sql(timestamp(s, false)?, out),
        Kind::Timestamptz => types::timestamp_to_sql(timestamp(s, true)?, out),
    }
    Some(())
}

fn float<T: std::str::FromStr>(s: &str) -> Option<T> {
    // Rust also reads forms PostgreSQL never prints ("inf"); only its own
    // spellings of the special values are let through.
    let special = matches!(s, "NaN" | "Infinity" | "-Infinity");
    let plain = s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e'));
    if special || plain { s.parse().ok() } else { None }
}

/// `numeric`'s binary form: digit count, weight (of the first digit, in
/// powers of 10,000), sign, display scale, then base-10,000 digits without
/// leading or trailing zeros. The text is `[-]digits[.digits]` (PostgreSQL
/// prints exactly the display scale's digits after the point) or a special
/// value.
fn numeric(s: &str, out: &mut BytesMut) -> Option<()> {
    const POSITIVE: u16 = 0x0000;
    const NEGATIVE: u16 = 0x4000;
    let special = match s {
        "NaN" => Some(0xC000u16),
        "Infinity" => Some(0xD000),
        "-Infinity" => Some(0xF000),
        _ => None,
    };
    if let Some(sign) = special {
        out.put_i16(0);
        out.put_i16(0);
        out.put_u16(sign);
        out.put_u16(0);
        return Some(());
    }
    let (sign, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (NEGATIVE, rest),
        None => (POSITIVE, s),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) || (unsigned.contains('.') && frac.is_empty()) {
        return None;
    }
    let dscale = u16::try_from(frac.len()).ok().filter(|&d| d <= 0x3FFF)?;
    // Integer digits padded on the left, fraction digits on the right, to
    // groups of four.
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let padded: Vec<u8> = std::iter::repeat_n(b'0', int_pad)
        .chain(int.bytes())
        .chain(frac.bytes())
        .chain(std::iter::repeat_n(b'0', frac_pad))
        .collect();
    let groups: Vec<i16> =
        padded.chunks(4).map(|g| g.iter().fold(0i16, |n, &d| n * 10 + i16::from(d - b'0'))).collect();
    let mut weight = i32::try_from((int.len() + int_pad) / 4).ok()? - 1;
    let first = groups.iter().position(|&g| g != 0);
    let last = groups.iter().rposition(|&g| g != 0);
    let digits = match (first, last) {
        (Some(first), Some(last)) => {
            weight -= i32::try_from(first).ok()?;
            &groups[first..=last]
        }
        _ => {
            weight = 0; // zero: no digits
            &groups[..0]
        }
    };
    out.put_i16(i16::try_from(digits.len()).ok()?);
    out.put_i16(i16::try_from(weight).ok()?);
    out.put_u16(if digits.is_empty() { POSITIVE } else { sign });
    out.put_u16(dscale);
    for &d in digits {
        out.put_i16(d);
    }
    Some(())
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    s.as_bytes().chunks(2).map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

/// Days between 2000-01-01 and `YYYY-MM-DD` (ISO output, AD, year of four
/// or more digits), or the infinities.
fn date(s: &str) -> Option<i32> {
    match s {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (year, rest) = s.split_once('-')?;
    let (month, day) = rest.split_once('-')?;
    if year.len() < 4 || month.len() != 2 || day.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (digits(year)?, digits(month)? as u32, digits(day)? as u32);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    i32::try_from(days_from_civil(y, m, d) - days_from_civil(2000, 1, 1)).ok()
}

/// Microseconds since 2000-01-01 00:00:00 (UTC for `with time zone`) of
/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]]`, or the infinities.
fn timestamp(s: &str, zoned: bool) -> Option<i64> {
    match s {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (day, time) = s.split_once(' ')?;
    let days = i64::from(date(day)?);
    let (clock, offset_secs) = if zoned {
        let at = time.rfind(['+', '-'])?;
        (&time[..at], offset(&time[at..])?)
    } else {
        (time, 0)
    };
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) if (1..=6).contains(&f.len()) => (hms, digits(f)? * 10i64.pow(6 - f.len() as u32)),
        Some(_) => return None,
        None => (clock, 0),
    };
    let secs = hh_mm_ss(hms, true)?;
    if secs >= 86_400 {
        return None;
    }
    let micros =
        days.checked_mul(86_400)?.checked_add(secs - offset_secs)?.checked_mul(1_000_000)?.checked_add(fraction)?;
    // Never one of the infinities' own values.
    (micros != i64::MAX && micros != i64::MIN).then_some(micros)
}

/// `+HH`, `+HH:MM` or `+HH:MM:SS` (east of UTC is positive), in seconds.
fn offset(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    Some(sign * hh_mm_ss(rest, false)?)
}

/// `HH:MM:SS` in seconds; with `all` false, `HH` and `HH:MM` too.
fn hh_mm_ss(s: &str, all: bool) -> Option<i64> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.iter().any(|p| p.len() != 2) || parts.len() > 3 || (all && parts.len() != 3) {
        return None;
    }
    let mut secs = 0;
    for (i, part) in parts.iter().enumerate() {
        let n = digits(part)?;
        if i > 0 && n >= 60 {
            return None;
        }
        secs += n * [3600, 60, 1][i];
    }
    Some(secs)
}

/// ASCII digits only (no sign), as a number.
fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`), the calendar PostgreSQL uses for every date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn one(kind: Kind, text: &str) -> Option<Vec<u8>> {
        let mut out = BytesMut::new();
        encode(kind, text.as_bytes(), &mut out).map(|()| out.to_vec())
    }

    #[test]
    fn kinds_follow_format_type_names() {
        assert_eq!(Kind::of("character varying(20)"), Some(Kind::Text));
        assert_eq!(Kind::of("timestamp(3) with time zone"), Some(Kind::Timestamptz));
        assert_eq!(Kind::of("timestamp without time zone"), Some(Kind::Timestamp));
        assert_eq!(Kind::of("numeric(12,3)"), Some(Kind::Numeric));
        assert_eq!(Kind::of("integer[]"), None);
        assert_eq!(Kind::of("mood"), None);
        assert_eq!(Kind::of_all(["integer", "text"]), Some(vec![Kind::Int4, Kind::Text]));
        assert_eq!(Kind::of_all(["integer", "money"]), None);
    }

    #[test]
    fn dates_and_timestamps_count_from_2000() {
        assert_eq!(date("2000-01-01"), Some(0));
        assert_eq!(date("1999-12-31"), Some(-1));
        assert_eq!(date("2024-02-29"), Some(8825));
        assert_eq!(date("2023-02-29"), None);
        assert_eq!(date("12345-01-01"), Some((days_from_civil(12345, 1, 1) - days_from_civil(2000, 1, 1)) as i32));
        assert_eq!(date("0044-03-15 BC"), None);
        assert_eq!(date("infinity"), Some(i32::MAX));
        assert_eq!(timestamp("2000-01-01 00:00:01", false), Some(1_000_000));
        assert_eq!(timestamp("2000-01-01 00:00:00.5+00", true), Some(500_000));
        assert_eq!(timestamp("2000-01-01 00:00:00.000001+00", true), Some(1));
        // East of UTC: earlier in UTC.
        assert_eq!(timestamp("2000-01-01 05:45:00+05:45", true), Some(0));
        assert_eq!(timestamp("1999-12-31 20:00:00-04", true), Some(0));
        assert_eq!(timestamp("1900-01-01 05:41:16+05:41:16", true), timestamp("1900-01-01 00:00:00+00", true));
        assert_eq!(timestamp("-infinity", true), Some(i64::MIN));
        // Past i64's microseconds (PostgreSQL never prints such a year): refused.
        assert_eq!(timestamp("999999999999-01-01 00:00:00+00", true), None);
    }

    #[test]
    fn unexpected_text_is_refused_not_guessed() {
        for (kind, text) in [
            (Kind::Timestamptz, "2000-01-01 00:00:00"),          // no offset
            (Kind::Timestamptz, "Sat Jan 01 00:00:00 2000 UTC"), // DateStyle Postgres
            (Kind::Timestamp, "2000-01-01 24:00:00"),
            (Kind::Timestamp, "2000-01-01 00:00:00.1234567"),
            (Kind::Date, "01/02/2000"),
            (Kind::Bool, "true"),
            (Kind::Int4, "99999999999"),
            (Kind::Float8, "inf"),
            (Kind::Bytea, "\\001abc"), // escape format
            (Kind::Uuid, "a0eebc999c0b4ef8bb6d6bb9bd380a11"),
        ] {
            assert_eq!(one(kind, text), None, "{kind:?} {text:?}");
        }
    }

    #[test]
    fn values_take_their_binary_form() {
        assert_eq!(one(Kind::Bool, "t"), Some(vec![1]));
        assert_eq!(one(Kind::Int2, "-2"), Some((-2i16).to_be_bytes().to_vec()));
        assert_eq!(one(Kind::Int8, "9223372036854775807"), Some(i64::MAX.to_be_bytes().to_vec()));
        assert_eq!(one(Kind::Float8, "-0"), Some((-0.0f64).to_be_bytes().to_vec()));
        assert_eq!(one(Kind::Float4, "1.1"), Some(1.1f32.to_be_bytes().to_vec()));
        assert_eq!(one(Kind::Float8, "Infinity"), Some(f64::INFINITY.to_be_bytes().to_vec()));
        assert_eq!(one(Kind::Jsonb, "{}"), Some(b"\x01{}".to_vec()));
        assert_eq!(one(Kind::Bytea, "\\x00ff"), Some(vec![0, 255]));
        assert_eq!(one(Kind::Bytea, "\\x"), Some(vec![]));
        let uuid = one(Kind::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        assert_eq!(uuid[..4], [0xa0, 0xee, 0xbc, 0x99]);
        assert_eq!(uuid.len(), 16);
    }

    #[test]
    fn numerics_become_base_10000_digits() {
        // (digit count, weight, sign, display scale, digits)
        let parts = |text: &str| {
            let b = one(Kind::Numeric, text)?;
            let word = |i: usize| i16::from_be_bytes([b[2 * i], b[2 * i + 1]]);
            let n = word(0) as usize;
            Some((word(0), word(1), word(2) as u16, word(3), (0..n).map(|i| word(4 + i)).collect::<Vec<_>>()))
        };
        assert_eq!(parts("12345.678"), Some((3, 1, 0, 3, vec![1, 2345, 6780])));
        assert_eq!(parts("-0.00001"), Some((1, -2, 0x4000, 5, vec![1000])));
        assert_eq!(parts("10000"), Some((1, 1, 0, 0, vec![1])));
        assert_eq!(parts("0.000"), Some((0, 0, 0, 3, vec![])));
        assert_eq!(parts("-0"), Some((0, 0, 0, 0, vec![])));
        assert_eq!(parts("NaN"), Some((0, 0, 0xC000, 0, vec![])));
        assert_eq!(parts("-Infinity"), Some((0, 0, 0xF000, 0, vec![])));
        assert_eq!(parts("1e5"), None);
        assert_eq!(parts(".5"), None);
        assert_eq!(parts("5."), None);
    }

    #[test]
    fn copy_data_frames_rows_and_nulls() {
        let row = [Value::Text(Bytes::from_static(b"7")), Value::Null];
        let data = copy_data(&[&row], &[Kind::Int4, Kind::Text]).unwrap();
        let mut want = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        want.extend_from_slice(&[0, 2, 0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(data, want);
        // One value the module cannot read: the whole step goes in text.
        let odd = [Value::Text(Bytes::from_static(b"x")), Value::Null];
        assert_eq!(copy_data(&[&row, &odd], &[Kind::Int4, Kind::Text]), None);
    }
}
