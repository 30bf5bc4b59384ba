//! Framing of frontend messages after startup: a tag byte, a length, a body.
//! No I/O here beyond filling a buffer from a reader.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Message tags a client may send once the session is established. Anything
/// else is a protocol violation: the engine treats an unknown tag as FATAL
/// and would exit, so such bytes never reach it.
const FRONTEND_TAGS: &[u8] = b"QPBEDCSHFdcfX";

/// One complete frontend message: tag, length and body, as received.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub tag: u8,
    /// The whole message including tag and length.
    pub bytes: BytesMut,
}

impl Frame {
    /// The message body (after tag and length).
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// Why a message could not be framed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("invalid frontend message type {0}")]
    UnknownTag(u8),
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error("message of {0} bytes exceeds the server's limit of {1} bytes")]
    TooLarge(usize, usize),
}

/// Buffers bytes from the client and cuts them into frames.
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: BytesMut,
    max_message_size: usize,
}

impl FrameReader {
    pub fn new(max_message_size: usize) -> Self {
        FrameReader { buf: BytesMut::with_capacity(16 * 1024), max_message_size }
    }

    /// The next complete message already buffered, if any. The length is
    /// validated before the body arrives, so an oversized message is refused
    /// without buffering it.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        if !FRONTEND_TAGS.contains(&tag) {
            return Err(FrameError::UnknownTag(tag));
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(FrameError::BadLength(len));
        }
        let total = 1 + len as usize;
        if total > self.max_message_size {
            return Err(FrameError::TooLarge(total, self.max_message_size));
        }
        if self.buf.len() < total {
            // Room for the rest, but not all at once on the word of a
            // length field: memory grows with what actually arrives.
            self.buf.reserve((total - self.buf.len()).min(1 << 20));
            return Ok(None);
        }
        Ok(Some(Frame { tag, bytes: self.buf.split_to(total) }))
    }

    /// Reads more bytes from the client; `Ok(0)` means the client closed.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        reader.read_buf(&mut self.buf).await
    }

    /// Bytes received but not yet framed.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_complete_messages_and_waits_for_partial_ones() {
        let mut r = FrameReader::new(1024);
        r.buf.extend_from_slice(b"S\0\0\0\x04Q\0\0\0\x09SELE");
        let f = r.next_buffered().unwrap().unwrap();
        assert_eq!(f.tag, b'S');
        assert!(f.body().is_empty());
        assert!(r.next_buffered().unwrap().is_none());
        r.buf.extend_from_slice(b"\0");
        let f = r.next_buffered().unwrap().unwrap();
        assert_eq!(f.body(), b"SELE\0");
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn refuses_garbage_and_oversized_messages() {
        let mut r = FrameReader::new(1024);
        r.buf.extend_from_slice(b"Z\0\0\0\x05I");
        assert!(matches!(r.next_buffered(), Err(FrameError::UnknownTag(b'Z'))));
        let mut r = FrameReader::new(1024);
        r.buf.extend_from_slice(b"Q\0\x10\0\0");
        assert!(matches!(r.next_buffered(), Err(FrameError::TooLarge(..))));
        let mut r = FrameReader::new(1024);
        r.buf.extend_from_slice(b"Q\0\0\0\x02");
        assert!(matches!(r.next_buffered(), Err(FrameError::BadLength(2))));
    }
}
