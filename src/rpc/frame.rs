//! The frame: how one request or reply travels on a connection. A frame is a
//! 4-byte big-endian length prefix, then a fixed header (kind, service id,
//! method id, call id, error code, error text length), then the error text
//! and the message bytes. The length counts everything after the prefix and
//! is checked against `max_frame_bytes` before any buffer grows, so a peer
//! cannot make us allocate by announcing a huge frame.
//!
//! ```text
//! offset  size  field
//!      0     4  frame_bytes: u32, the length of everything below
//!      4     1  kind: 1 = request, 2 = response
//!      5     4  service_id: u32
//!      9     4  method_id: u32
//!     13     8  call_id: u64, chosen by the caller, echoed in the reply
//!     21     4  error_code: u32, 0 = ok (see RpcCode)
//!     25     2  error_text_bytes: u16, at most MAX_ERROR_TEXT_BYTES
//!     27     n  error text (UTF-8), then the message bytes
//! ```

use std::fmt;
use std::io::{self, Read};

/// Size of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Size of the fixed header that follows the length prefix.
pub const HEADER_BYTES: usize = 23;
/// An error text longer than this is cut (at a character boundary) when
/// encoded and refused when decoded.
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;
/// The smallest `max_frame_bytes` that still fits a header and a full error
/// text, so that any error can always be reported.
pub const MIN_MAX_FRAME_BYTES: usize = HEADER_BYTES + MAX_ERROR_TEXT_BYTES;

/// Whether a frame asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
}

/// Why a call failed at the RPC layer (not at the application layer, which
/// answers with its own reply header). Carried in every response frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcCode {
    Ok,
    /// The server serves no service with the request's service id.
    UnknownService,
    /// The service has no method with the request's method id.
    UnknownMethod,
    /// The request bytes did not decode as the method's request message.
    BadRequest,
    /// The handler dropped its responder without answering.
    NoReply,
    /// The reply could not be encoded or exceeds the frame limit.
    ReplyFailed,
    /// The server is shutting down.
    ShuttingDown,
    /// A code this build does not know (sent by a newer peer).
    Unknown(u32),
}

impl RpcCode {
    /// The code's number on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            RpcCode::Ok => 0,
            RpcCode::UnknownService => 1,
            RpcCode::UnknownMethod => 2,
            RpcCode::BadRequest => 3,
            RpcCode::NoReply => 4,
            RpcCode::ReplyFailed => 5,
            RpcCode::ShuttingDown => 6,
            RpcCode::Unknown(code) => code,
        }
    }

    /// The code for a number read from the wire; never fails.
    pub fn from_u32(code: u32) -> RpcCode {
        match code {
            0 => RpcCode::Ok,
            1 => RpcCode::UnknownService,
            2 => RpcCode::UnknownMethod,
            3 => RpcCode::BadRequest,
            4 => RpcCode::NoReply,
            5 => RpcCode::ReplyFailed,
            6 => RpcCode::ShuttingDown,
            other => RpcCode::Unknown(other),
        }
    }
}

impl fmt::Display for RpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RpcCode::Ok => f.write_str("ok"),
            RpcCode::UnknownService => f.write_str("unknown service"),
            RpcCode::UnknownMethod => f.write_str("unknown method"),
            RpcCode::BadRequest => f.write_str("bad request"),
            RpcCode::NoReply => f.write_str("no reply from handler"),
            RpcCode::ReplyFailed => f.write_str("reply failed"),
            RpcCode::ShuttingDown => f.write_str("shutting down"),
            RpcCode::Unknown(code) => write!(f, "unknown error code {code}"),
        }
    }
}

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub service_id: u32,
    pub method_id: u32,
    pub call_id: u64,
    pub code: RpcCode,
}

impl FrameHeader {
    /// The header of a request.
    pub fn request(service_id: u32, method_id: u32, call_id: u64) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Request,
            service_id,
            method_id,
            call_id,
            code: RpcCode::Ok,
        }
    }

    /// The header of the response to a request with this header.
    pub fn response_to(request: &FrameHeader, code: RpcCode) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Response,
            code,
            ..*request
        }
    }
}

/// A decoded frame, borrowing the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    /// Empty unless `header.code` is an error.
    pub error_text: &'a str,
    pub body: &'a [u8],
}

/// Why a frame could not be read or written.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection cleanly between two frames.
    Closed,
    /// No byte of a new frame arrived before the read timeout. Nothing was
    /// consumed, so the connection is still in a consistent state.
    Idle,
    /// The connection ended, or the read timed out, in the middle of a frame.
    Truncated {
        needed_bytes: usize,
        got_bytes: usize,
    },
    /// The frame is larger than the configured limit.
    TooLarge {
        frame_bytes: u64,
        max_frame_bytes: usize,
    },
    /// The bytes are not a frame.
    Malformed(String),
    /// Any other I/O failure.
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Closed => f.write_str("connection closed by peer"),
            FrameError::Idle => f.write_str("no frame arrived before the read timeout"),
            FrameError::Truncated {
                needed_bytes,
                got_bytes,
            } => write!(
                f,
                "truncated frame: needed {needed_bytes} bytes, got {got_bytes} before the \
                 connection ended or timed out"
            ),
            FrameError::TooLarge {
                frame_bytes,
                max_frame_bytes,
            } => write!(
                f,
                "frame of {frame_bytes} bytes exceeds the limit of {max_frame_bytes} bytes"
            ),
            FrameError::Malformed(what) => write!(f, "malformed frame: {what}"),
            FrameError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Starts a frame in `out` (clearing it): reserves the length prefix and the
/// header, so the caller can encode the message straight after them with no
/// copy. Finish with [`finish_frame`].
pub fn start_frame(out: &mut Vec<u8>) {
    out.clear();
    out.resize(LENGTH_PREFIX_BYTES + HEADER_BYTES, 0);
}

/// Completes a frame begun with [`start_frame`]: everything after the header
/// is the body. Fails, leaving `out` unspecified, when the frame would exceed
/// `max_frame_bytes`.
pub fn finish_frame(
    out: &mut [u8],
    header: &FrameHeader,
    max_frame_bytes: usize,
) -> Result<(), FrameError> {
    assert!(
        out.len() >= LENGTH_PREFIX_BYTES + HEADER_BYTES,
        "finish_frame without start_frame"
    );
    write_prefix_and_header(out, header, 0, max_frame_bytes)
}

/// Encodes a whole frame into `out` (clearing it first). The error text is cut
/// to [`MAX_ERROR_TEXT_BYTES`].
pub fn encode_frame(
    out: &mut Vec<u8>,
    header: &FrameHeader,
    error_text: &str,
    body: &[u8],
    max_frame_bytes: usize,
) -> Result<(), FrameError> {
    let error_text = truncate_text(error_text, MAX_ERROR_TEXT_BYTES);
    start_frame(out);
    out.extend_from_slice(error_text.as_bytes());
    out.extend_from_slice(body);
    write_prefix_and_header(out, header, error_text.len(), max_frame_bytes)
}

fn write_prefix_and_header(
    out: &mut [u8],
    header: &FrameHeader,
    error_text_bytes: usize,
    max_frame_bytes: usize,
) -> Result<(), FrameError> {
    let frame_bytes = out.len() - LENGTH_PREFIX_BYTES;
    if frame_bytes > max_frame_bytes || frame_bytes > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            frame_bytes: frame_bytes as u64,
            max_frame_bytes,
        });
    }
    debug_assert!(error_text_bytes <= MAX_ERROR_TEXT_BYTES);
    out[0..4].copy_from_slice(&(frame_bytes as u32).to_be_bytes());
    out[4] = header.kind as u8;
    out[5..9].copy_from_slice(&header.service_id.to_be_bytes());
    out[9..13].copy_from_slice(&header.method_id.to_be_bytes());
    out[13..21].copy_from_slice(&header.call_id.to_be_bytes());
    out[21..25].copy_from_slice(&header.code.to_u32().to_be_bytes());
    out[25..27].copy_from_slice(&(error_text_bytes as u16).to_be_bytes());
    Ok(())
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on a
/// character boundary.
fn truncate_text(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Decodes the frame in `bytes`, which holds exactly what follows the length
/// prefix (header, error text, body).
pub fn decode_frame(bytes: &[u8]) -> Result<Frame<'_>, FrameError> {
    if bytes.len() < HEADER_BYTES {
        return Err(FrameError::Malformed(format!(
            "{} bytes is shorter than the {HEADER_BYTES}-byte header",
            bytes.len()
        )));
    }
    let kind = match bytes[0] {
        1 => FrameKind::Request,
        2 => FrameKind::Response,
        other => return Err(FrameError::Malformed(format!("unknown frame kind {other}"))),
    };
    let u32_at =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut call_id = [0u8; 8];
    call_id.copy_from_slice(&bytes[9..17]);
    let header = FrameHeader {
        kind,
        service_id: u32_at(1),
        method_id: u32_at(5),
        call_id: u64::from_be_bytes(call_id),
        code: RpcCode::from_u32(u32_at(17)),
    };
    let error_text_bytes = u16::from_be_bytes([bytes[21], bytes[22]]) as usize;
    let rest = &bytes[HEADER_BYTES..];
    if error_text_bytes > MAX_ERROR_TEXT_BYTES || error_text_bytes > rest.len() {
        return Err(FrameError::Malformed(format!(
            "error text of {error_text_bytes} bytes does not fit (limit {MAX_ERROR_TEXT_BYTES}, \
             {} bytes left in the frame)",
            rest.len()
        )));
    }
    let (text, body) = rest.split_at(error_text_bytes);
    let error_text = std::str::from_utf8(text)
        .map_err(|e| FrameError::Malformed(format!("error text is not UTF-8: {e}")))?;
    Ok(Frame {
        header,
        error_text,
        body,
    })
}

/// Reads one frame from `reader` into `buf` (reusing its capacity) and
/// decodes it. The announced length is checked against `max_frame_bytes`
/// before `buf` grows, and `buf` then grows only as the bytes arrive. Returns [`FrameError::Closed`] on a clean end of
/// stream and [`FrameError::Idle`] on a read timeout, both only when no byte
/// of the frame had arrived.
pub fn read_frame<'a, R: Read>(
    reader: &mut R,
    buf: &'a mut Vec<u8>,
    max_frame_bytes: usize,
) -> Result<Frame<'a>, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    let got_bytes = read_full(reader, &mut prefix)?;
    if got_bytes == 0 {
        return Err(FrameError::Closed);
    }
    if got_bytes < LENGTH_PREFIX_BYTES {
        return Err(FrameError::Truncated {
            needed_bytes: LENGTH_PREFIX_BYTES,
            got_bytes,
        });
    }
    let frame_bytes = u32::from_be_bytes(prefix) as usize;
    if frame_bytes > max_frame_bytes {
        return Err(FrameError::TooLarge {
            frame_bytes: frame_bytes as u64,
            max_frame_bytes,
        });
    }
    if frame_bytes < HEADER_BYTES {
        return Err(FrameError::Malformed(format!(
            "length prefix {frame_bytes} is shorter than the {HEADER_BYTES}-byte header"
        )));
    }
    let got_bytes = read_body(reader, buf, frame_bytes)?;
    if got_bytes < frame_bytes {
        return Err(FrameError::Truncated {
            needed_bytes: LENGTH_PREFIX_BYTES + frame_bytes,
            got_bytes: LENGTH_PREFIX_BYTES + got_bytes,
        });
    }
    decode_frame(buf)
}

/// The first step of a frame buffer's growth; see [`read_body`].
const FIRST_BODY_CHUNK_BYTES: usize = 4096;

/// Reads up to `frame_bytes` into `buf` (cleared first) and returns how many
/// arrived. The buffer grows with the data, doubling from
/// [`FIRST_BODY_CHUNK_BYTES`], and never past `frame_bytes`: a peer that
/// announces a large frame and then sends little or nothing costs only what
/// it sent, not what it announced.
fn read_body<R: Read>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    frame_bytes: usize,
) -> Result<usize, FrameError> {
    buf.clear();
    let mut filled = 0;
    while filled < frame_bytes {
        let target = frame_bytes.min((filled * 2).max(FIRST_BODY_CHUNK_BYTES));
        buf.reserve_exact(target - buf.len());
        buf.resize(target, 0);
        // The prefix has arrived, so a timeout now is in the middle of a frame.
        let got_bytes = match read_full(reader, &mut buf[filled..]) {
            Err(FrameError::Idle) => 0,
            other => other?,
        };
        filled += got_bytes;
        if filled < target {
            break;
        }
    }
    buf.truncate(filled);
    Ok(filled)
}

/// Fills `buf` from `reader`; returns how many bytes arrived before the end of
/// stream. A timeout before the first byte is `Idle`; a timeout after it
/// counts as the end of stream, since the frame cannot be completed.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                if filled == 0 {
                    return Err(FrameError::Idle);
                }
                break;
            }
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(filled)
}

/// Whether `error` is a socket read or write timeout (Unix reports
/// `WouldBlock`, Windows `TimedOut`).
pub fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    fn request_header() -> FrameHeader {
        FrameHeader::request(7, 3, 0x0102_0304_0506_0708)
    }

    fn encoded(header: &FrameHeader, text: &str, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, header, text, body, MAX).unwrap();
        out
    }

    #[test]
    fn round_trip_request_and_error_response() {
        let header = request_header();
        let bytes = encoded(&header, "", b"hello");
        assert_eq!(bytes.len(), LENGTH_PREFIX_BYTES + HEADER_BYTES + 5);
        let mut buf = Vec::new();
        let frame = read_frame(&mut &bytes[..], &mut buf, MAX).unwrap();
        assert_eq!(frame.header, header);
        assert_eq!(frame.body, b"hello");
        assert_eq!(frame.error_text, "");

        let response = FrameHeader::response_to(&header, RpcCode::BadRequest);
        let bytes = encoded(&response, "cannot decode", b"");
        let frame = read_frame(&mut &bytes[..], &mut buf, MAX).unwrap();
        assert_eq!(frame.header.kind, FrameKind::Response);
        assert_eq!(frame.header.call_id, header.call_id);
        assert_eq!(frame.header.code, RpcCode::BadRequest);
        assert_eq!(frame.error_text, "cannot decode");
    }

    #[test]
    fn start_and_finish_frame_match_encode_frame() {
        let header = request_header();
        let mut out = Vec::new();
        start_frame(&mut out);
        out.extend_from_slice(b"body bytes");
        finish_frame(&mut out, &header, MAX).unwrap();
        assert_eq!(out, encoded(&header, "", b"body bytes"));
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut stream = encoded(&request_header(), "", b"one");
        stream.extend(encoded(&FrameHeader::request(1, 1, 2), "", b"two"));
        let mut reader = &stream[..];
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut reader, &mut buf, MAX).unwrap().body, b"one");
        assert_eq!(read_frame(&mut reader, &mut buf, MAX).unwrap().body, b"two");
        assert!(matches!(
            read_frame(&mut reader, &mut buf, MAX),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn huge_length_prefix_is_refused_before_allocating() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let mut buf = Vec::new();
        let error = read_frame(&mut &bytes[..], &mut buf, MAX).unwrap_err();
        assert!(matches!(
            error,
            FrameError::TooLarge {
                frame_bytes: 0xffff_ffff,
                max_frame_bytes: MAX
            }
        ));
        assert_eq!(buf.capacity(), 0, "no buffer may grow for a refused frame");
    }

    #[test]
    fn an_announced_frame_costs_only_the_bytes_that_arrive() {
        // Regression: the buffer was sized to the announced length before
        // any byte of the body came, so connections announcing frames just
        // under the limit and sending nothing held that much memory each.
        let mut bytes = (MAX as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1u8; 100]);
        let mut buf = Vec::new();
        let error = read_frame(&mut &bytes[..], &mut buf, MAX).unwrap_err();
        assert!(matches!(
            error,
            FrameError::Truncated { got_bytes: 104, .. }
        ));
        assert!(
            buf.capacity() <= FIRST_BODY_CHUNK_BYTES,
            "{}",
            buf.capacity()
        );
        // A whole large frame still arrives, in a buffer no larger than it.
        let body = vec![7u8; MAX - HEADER_BYTES];
        let bytes = encoded(&request_header(), "", &body);
        let frame = read_frame(&mut &bytes[..], &mut buf, MAX).unwrap();
        assert_eq!(frame.body, &body[..]);
        assert!(buf.capacity() <= MAX);
    }

    #[test]
    fn encoding_over_the_limit_is_refused() {
        let mut out = Vec::new();
        let body = vec![0u8; 100];
        let error = encode_frame(&mut out, &request_header(), "", &body, 50).unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { .. }));
    }

    #[test]
    fn truncated_input_at_every_length_is_an_error() {
        let bytes = encoded(&request_header(), "text", b"payload");
        let mut buf = Vec::new();
        for cut in 1..bytes.len() {
            match read_frame(&mut &bytes[..cut], &mut buf, MAX) {
                Err(FrameError::Truncated {
                    needed_bytes,
                    got_bytes,
                }) => {
                    assert_eq!(got_bytes, cut);
                    assert!(needed_bytes > got_bytes);
                }
                other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let mut buf = Vec::new();
        // A short length prefix.
        let short = [0, 0, 0, 3, 1, 2, 3];
        assert!(matches!(
            read_frame(&mut &short[..], &mut buf, MAX),
            Err(FrameError::Malformed(_))
        ));
        // An unknown kind.
        let mut bad_kind = encoded(&request_header(), "", b"x");
        bad_kind[4] = 9;
        assert!(matches!(
            read_frame(&mut &bad_kind[..], &mut buf, MAX),
            Err(FrameError::Malformed(_))
        ));
        // An error text longer than the frame.
        let mut bad_text = encoded(&request_header(), "", b"xy");
        bad_text[25..27].copy_from_slice(&500u16.to_be_bytes());
        assert!(matches!(
            read_frame(&mut &bad_text[..], &mut buf, MAX),
            Err(FrameError::Malformed(_))
        ));
        // Error text that is not UTF-8.
        let mut bad_utf8 = encoded(&request_header(), "ab", b"");
        bad_utf8[27] = 0xff;
        assert!(matches!(
            read_frame(&mut &bad_utf8[..], &mut buf, MAX),
            Err(FrameError::Malformed(_))
        ));
        // Pseudo-random bytes: whatever happens, no panic and no huge buffer.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let garbage: Vec<u8> = (0..64)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = read_frame(&mut &garbage[..], &mut buf, MAX);
            assert!(buf.capacity() <= MAX);
        }
    }

    #[test]
    fn long_error_text_is_cut_at_a_character_boundary() {
        let text = "é".repeat(MAX_ERROR_TEXT_BYTES);
        let header = FrameHeader::response_to(&request_header(), RpcCode::ReplyFailed);
        let bytes = encoded(&header, &text, b"");
        let mut buf = Vec::new();
        let frame = read_frame(&mut &bytes[..], &mut buf, MAX).unwrap();
        assert_eq!(frame.error_text.len(), MAX_ERROR_TEXT_BYTES);
        assert!(frame.error_text.chars().all(|c| c == 'é'));
    }

    #[test]
    fn rpc_codes_round_trip() {
        for code in 0..10 {
            assert_eq!(RpcCode::from_u32(code).to_u32(), code);
        }
    }
}
