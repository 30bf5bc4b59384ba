//! The startup phase of a connection, done by the server itself (the engine
//! already has its one session): SSL/GSS refusal, protocol version check,
//! authentication, and the greeting (`ParameterStatus`, `BackendKeyData`,
//! `ReadyForQuery`).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::backend;
use super::config::Admission;
use super::scram::{Exchange, ScramVerifier};

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
const PROTOCOL_3: i32 = 3;
/// Startup packets are small; PostgreSQL caps them at 10,000 bytes.
const MAX_STARTUP_PACKET: usize = 10_000;

/// How a connection's startup ended.
#[derive(Debug)]
pub(crate) enum Startup {
    /// The client is in session; the greeting has been sent.
    Session(StartupParams),
    /// The connection asked to cancel another connection's query.
    Cancel { pid: i32, key: i32 },
    /// The client left or was refused (an error was sent when it deserved one).
    Closed,
}

/// The parameters a client sent in its startup packet.
#[derive(Debug, Default, Clone)]
pub(crate) struct StartupParams {
    pub user: String,
    pub database: String,
    /// Every other `name=value`, e.g. `application_name`, `DateStyle`.
    pub settings: Vec<(String, String)>,
}

/// What the greeting needs to know.
#[derive(Debug)]
pub(crate) struct Greeting<'a> {
    pub password: Option<&'a ScramVerifier>,
    pub admission: Option<&'a Admission>,
    pub parameters: &'a [(String, String)],
    pub pid: i32,
    pub key: i32,
}

/// Runs the startup phase.
pub(crate) async fn handshake<S>(stream: &mut S, greeting: &Greeting<'_>) -> std::io::Result<Startup>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    let params = loop {
        let Some(packet) = read_startup_packet(stream).await? else {
            return Ok(Startup::Closed);
        };
        let Some(packet) = packet else {
            return refuse(stream, "08P01", "invalid length of startup packet").await;
        };
        let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
        match code {
            SSL_REQUEST | GSSENC_REQUEST => {
                stream.write_all(b"N").await?;
                continue;
            }
            CANCEL_REQUEST if packet.len() == 12 => {
                let pid = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                let key = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
                return Ok(Startup::Cancel { pid, key });
            }
            _ => {}
        }
        let (major, minor) = (code >> 16, code & 0xffff);
        if major != PROTOCOL_3 {
            let text = format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0");
            return refuse(stream, "0A000", &text).await;
        }
        let Some(params) = parse_params(&packet[4..]) else {
            return refuse(stream, "08P01", "invalid startup packet layout: expected terminator as last byte").await;
        };
        // Newer minor versions and protocol extensions are declined the way
        // PostgreSQL does: NegotiateProtocolVersion, then carry on with 3.0.
        let unrecognized: Vec<String> =
            params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
        if minor > 0 || !unrecognized.is_empty() {
            backend::negotiate_protocol_version(0, &unrecognized, &mut out);
        }
        break params;
    };
    let mut startup = StartupParams::default();
    for (name, value) in params {
        match name.as_str() {
            "user" => startup.user = value,
            "database" => startup.database = value,
            "replication" if value != "false" && value != "off" && value != "0" => {
                return refuse(stream, "0A000", "replication connections are not supported").await;
            }
            "options" => startup.settings.extend(command_line_settings(&value)),
            "replication" => {}
            n if n.starts_with("_pq_.") => {}
            _ => startup.settings.push((name, value)),
        }
    }
    if startup.user.is_empty() {
        return refuse(stream, "28000", "no PostgreSQL user name specified in startup packet").await;
    }
    if startup.database.is_empty() {
        startup.database = startup.user.clone();
    }
    if let Some(Err(message)) = greeting.admission.map(Admission::check) {
        return refuse(stream, "57P03", &message).await;
    }
    if let Some(verifier) = greeting.password {
        stream.write_all(&out).await?;
        out.clear();
        if !authenticate(stream, verifier, &startup.user).await? {
            return Ok(Startup::Closed);
        }
    }
    backend::authentication(0, &[], &mut out); // AuthenticationOk
    for (name, value) in greeting.parameters {
        let client_value = startup.settings.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
        let value = match name.as_str() {
            "application_name" => client_value.unwrap_or(value),
            "session_authorization" => &startup.user,
            _ => value,
        };
        backend::parameter_status(name, value, &mut out);
    }
    backend::backend_key_data(greeting.pid, greeting.key, &mut out);
    backend::ready_for_query(b'I', &mut out);
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(Startup::Session(startup))
}

/// Reads one untagged startup packet. `Ok(None)`: the client closed;
/// `Ok(Some(None))`: a bad length.
async fn read_startup_packet<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Option<Option<Vec<u8>>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = i32::from_be_bytes(len);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Ok(Some(None));
    }
    let mut body = vec![0u8; len as usize - 4];
    match stream.read_exact(&mut body).await {
        Ok(_) => Ok(Some(Some(body))),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// `name\0value\0...\0` into pairs; `None` if not terminated properly.
fn parse_params(body: &[u8]) -> Option<Vec<(String, String)>> {
    let (&last, body) = body.split_last()?;
    if last != 0 {
        return None;
    }
    let mut fields = body.split(|&b| b == 0);
    let mut params = Vec::new();
    while let Some(name) = fields.next() {
        if name.is_empty() {
            break;
        }
        let value = fields.next()?;
        params.push((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()));
    }
    Some(params)
}

/// `-c name=value` and `--name=value` from the `options` startup parameter
/// (what `PGOPTIONS` sets). Backslash escapes a space, as in PostgreSQL.
fn command_line_settings(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let pair = if word == "-c" {
            words.next()
        } else {
            word.strip_prefix("-c").or_else(|| word.strip_prefix("--")).map(str::to_owned)
        };
        if let Some((name, value)) = pair.as_deref().and_then(|p| p.split_once('=')) {
            settings.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    settings
}

/// Sends a FATAL error and ends the connection.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, code: &str, text: &str) -> std::io::Result<Startup> {
    let mut out = BytesMut::new();
    backend::error_response("FATAL", code, text, &mut out);
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(Startup::Closed)
}

/// SCRAM-SHA-256. Returns whether the client proved it knows the password
/// (a FATAL error has been sent when not).
async fn authenticate<S>(stream: &mut S, verifier: &ScramVerifier, user: &str) -> std::io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let failed = format!("password authentication failed for user \"{user}\"");
    let mut out = BytesMut::new();
    backend::authentication(10, b"SCRAM-SHA-256\0\0", &mut out); // AuthenticationSASL
    stream.write_all(&out).await?;
    stream.flush().await?;
    // SASLInitialResponse: mechanism, length of the data, data.
    let Some(initial) = read_password_message(stream).await? else {
        return Ok(false);
    };
    let Some((mechanism, rest)) = split_cstr(&initial) else {
        refuse(stream, "08P01", "malformed SASLInitialResponse").await?;
        return Ok(false);
    };
    if mechanism != b"SCRAM-SHA-256" || rest.len() < 4 {
        refuse(stream, "28000", "client selected an invalid SASL authentication mechanism").await?;
        return Ok(false);
    }
    let exchange = match Exchange::start(verifier, &rest[4..]) {
        Ok((exchange, server_first)) => {
            out.clear();
            backend::authentication(11, server_first.as_bytes(), &mut out); // SASLContinue
            stream.write_all(&out).await?;
            stream.flush().await?;
            exchange
        }
        Err(e) => {
            tracing::debug!(error = %e, "SCRAM exchange refused");
            refuse(stream, "28P01", &failed).await?;
            return Ok(false);
        }
    };
    let Some(client_final) = read_password_message(stream).await? else {
        return Ok(false);
    };
    match exchange.finish(&client_final) {
        Ok(server_final) => {
            out.clear();
            backend::authentication(12, server_final.as_bytes(), &mut out); // SASLFinal
            stream.write_all(&out).await?;
            Ok(true)
        }
        Err(e) => {
            tracing::info!(%user, error = %e, "password authentication failed");
            refuse(stream, "28P01", &failed).await?;
            Ok(false)
        }
    }
}

/// Reads a `p` message (password/SASL response); `None` if the client left
/// or sent something else (after sending it an error).
async fn read_password_message<S>(stream: &mut S) -> std::io::Result<Option<Vec<u8>>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut header = [0u8; 5];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if header[0] != b'p' || len < 4 || len as usize > MAX_STARTUP_PACKET {
        refuse(stream, "08P01", "expected SASL response").await?;
        return Ok(None);
    }
    let mut body = vec![0u8; len as usize - 4];
    match stream.read_exact(&mut body).await {
        Ok(_) => Ok(Some(body)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

fn split_cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_startup_parameters() {
        let params = parse_params(b"user\0ada\0database\0app\0\0").unwrap();
        assert_eq!(params, vec![("user".into(), "ada".into()), ("database".into(), "app".into())]);
        assert!(parse_params(b"user\0ada").is_none());
    }

    #[test]
    fn reads_settings_from_options() {
        assert_eq!(
            command_line_settings("-c search_path=app  --work-mem=8MB -capplication_name=a\\ b"),
            vec![
                ("search_path".into(), "app".into()),
                ("work_mem".into(), "8MB".into()),
                ("application_name".into(), "a b".into())
            ]
        );
    }
}
