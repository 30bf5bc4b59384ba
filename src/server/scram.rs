//! Server side of SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL uses it, without
//! channel binding since the server has no TLS).
//!
//! The server keeps only a verifier (salt, iteration count, StoredKey,
//! ServerKey), in the format of `pg_authid.rolpassword`. The exchange itself
//! is a pure state machine over the client's messages, so it is unit-tested
//! against `postgres-protocol`'s client implementation.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};

/// A SCRAM-SHA-256 verifier: what the server needs to check a password
/// without storing it.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

/// A verifier string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid SCRAM-SHA-256 verifier: expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")]
pub struct InvalidVerifier;

impl ScramVerifier {
    /// A verifier for `password` with a random salt (4096 iterations, as
    /// PostgreSQL does).
    pub fn from_password(password: &str) -> ScramVerifier {
        postgres_protocol::password::scram_sha_256(password.as_bytes())
            .parse()
            .expect("postgres-protocol produces valid verifiers")
    }
}

impl std::str::FromStr for ScramVerifier {
    type Err = InvalidVerifier;

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// (what PostgreSQL stores for a role, base64 fields).
    fn from_str(s: &str) -> Result<Self, InvalidVerifier> {
        let rest = s.trim().strip_prefix("SCRAM-SHA-256$").ok_or(InvalidVerifier)?;
        let (params, keys) = rest.split_once('$').ok_or(InvalidVerifier)?;
        let (iterations, salt) = params.split_once(':').ok_or(InvalidVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(InvalidVerifier)?;
        let key = |b64: &str| -> Result<[u8; 32], InvalidVerifier> {
            STANDARD.decode(b64).map_err(|_| InvalidVerifier)?.try_into().map_err(|_| InvalidVerifier)
        };
        Ok(ScramVerifier {
            iterations: iterations.parse().map_err(|_| InvalidVerifier)?,
            salt: STANDARD.decode(salt).map_err(|_| InvalidVerifier)?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }
}

/// Why an exchange failed. Clients only ever learn "authentication failed".
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("wrong password")]
    WrongPassword,
}

/// An exchange after the server-first message was produced.
pub(crate) struct Exchange<'a> {
    verifier: &'a ScramVerifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl<'a> Exchange<'a> {
    /// Reads the client-first message and returns the exchange and the
    /// server-first message to send.
    pub fn start(verifier: &'a ScramVerifier, client_first: &[u8]) -> Result<(Exchange<'a>, String), ScramError> {
        let client_first = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = client_first.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let (_authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        let gs2_header = client_first[..client_first.len() - bare.len()].to_owned();
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("no client nonce"))?;
        let mut random = [0u8; 18];
        rand::rng().fill_bytes(&mut random);
        let nonce = format!("{client_nonce}{}", STANDARD.encode(random));
        let server_first = format!("r={nonce},s={},i={}", STANDARD.encode(&verifier.salt), verifier.iterations);
        let exchange = Exchange {
            verifier,
            gs2_header,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final message; on success returns the server-final
    /// message (`v=<ServerSignature>`).
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let client_final = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = client_final.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                binding = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        if binding != Some(STANDARD.encode(self.gs2_header.as_bytes()).as_str()) {
            return Err(ScramError::Malformed("channel binding data does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] =
            STANDARD.decode(proof).ok().and_then(|p| p.try_into().ok()).ok_or(ScramError::Malformed("bad proof"))?;
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored_key, &self.verifier.stored_key) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)))
    }
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any size");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = ScramVerifier::from_password(server_password);
        let mut client = ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = Exchange::start(&verifier, client.message())?;
        client.update(server_first.as_bytes()).unwrap();
        let server_final = exchange.finish(client.message())?;
        client.finish(server_final.as_bytes()).expect("client accepts the server signature");
        Ok(())
    }

    #[test]
    fn accepts_the_right_password_and_proves_the_server_knows_it() {
        run("s3cret", "s3cret").unwrap();
    }

    #[test]
    fn refuses_a_wrong_password() {
        assert!(matches!(run("s3cret", "guess"), Err(ScramError::WrongPassword)));
    }

    #[test]
    fn parses_postgres_verifiers() {
        let v: ScramVerifier = "SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            .parse()
            .unwrap();
        assert_eq!(v.iterations, 4096);
        assert!("md5abc".parse::<ScramVerifier>().is_err());
    }

    #[test]
    fn refuses_channel_binding_requests() {
        let verifier = ScramVerifier::from_password("x");
        assert!(matches!(
            Exchange::start(&verifier, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        ));
    }
}
