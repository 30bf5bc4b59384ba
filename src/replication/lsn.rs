//! Log sequence numbers, the positions in the remote's write-ahead log.
//!
//! A thin wrapper over `postgres_types::PgLsn` (text form, SQL `pg_lsn`
//! values): the wrapper adds ordering, arithmetic on the raw `u64` (the
//! replication protocol's wire form) and a parse error that names the input.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::types::PgLsn;

/// A position in the remote's WAL, printed like PostgreSQL does (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`.
    pub const ZERO: Lsn = Lsn(0);

    /// Bytes from `self` forward to `later` (0 if `later` is not ahead).
    pub fn distance_to(self, later: Lsn) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        PgLsn::from(self.0).fmt(f)
    }
}

/// The text is not of the form `X/Y` with hexadecimal halves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers like 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.to_owned());
        let text = s.trim();
        // PgLsn would let a half wider than 32 bits spill into the other one.
        if !text.split_once('/').is_some_and(|(hi, lo)| hi.len() <= 8 && lo.len() <= 8) {
            return Err(err());
        }
        let lsn: PgLsn = text.parse().map_err(|_| err())?;
        Ok(Lsn(lsn.into()))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Lsn {
        Lsn(v)
    }
}

impl From<PgLsn> for Lsn {
    fn from(lsn: PgLsn) -> Lsn {
        Lsn(lsn.into())
    }
}

impl From<Lsn> for PgLsn {
    fn from(lsn: Lsn) -> PgLsn {
        PgLsn::from(lsn.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert!("16".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
        assert!("0/1FFFFFFFF".parse::<Lsn>().is_err());
        assert_eq!(PgLsn::from(lsn), "16/B374D848".parse::<PgLsn>().unwrap());
    }
}
