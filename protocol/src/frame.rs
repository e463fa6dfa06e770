//! Frames: a big-endian `u32` payload length, then the bincode 2 (standard config) encoding of
//! one [`Message`]. The length is checked against the cap before the payload is allocated or
//! read, and the payload must decode to exactly one message (no trailing bytes).

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Hello, Message, MAX_FRAME_BYTES, PROTOCOL_VERSION};

/// bincode configuration of every payload. The limit bounds what a length prefix inside the
/// payload may make the decoder allocate (frames are already capped, this is belt and braces).
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 64 << 20 }>()
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the cap of {cap} bytes")]
    TooLarge { size: u64, cap: usize },
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("protocol version mismatch: peer speaks version {got}, this side speaks {expected}")]
    VersionMismatch { got: u32, expected: u32 },
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// True when the peer went away cleanly between frames.
    pub fn is_closed(&self) -> bool {
        matches!(self, FrameError::Closed)
    }
}

/// Encodes any serde value as a bincode payload (no length prefix).
pub fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes one serde value from exactly `payload` (trailing bytes are an error).
pub fn decode_value<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (v, used): (T, usize) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Malformed(format!("{} trailing bytes after the message", payload.len() - used)));
    }
    Ok(v)
}

/// Encodes a message as a payload (no length prefix).
pub fn encode_payload(msg: &Message) -> Result<Vec<u8>, FrameError> {
    encode_value(msg)
}

/// Decodes a payload into a message, checking the protocol version of a `Hello`.
///
/// A `Hello` of another protocol version is reported as [`FrameError::VersionMismatch`] even
/// when the rest of it does not decode with this version's layout (variant 0 and its first
/// field, the version, are stable by contract).
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    match decode_value::<Message>(payload) {
        Ok(Message::Hello(Hello { protocol_version, .. })) if protocol_version != PROTOCOL_VERSION => {
            Err(FrameError::VersionMismatch { got: protocol_version, expected: PROTOCOL_VERSION })
        }
        Ok(m) => Ok(m),
        Err(e) => {
            // Peek at (variant index, first u32 field) of a Hello from another version.
            if let Ok(((0u32, v), _)) = bincode::serde::decode_from_slice::<(u32, u32), _>(payload, config()) {
                if v != PROTOCOL_VERSION {
                    return Err(FrameError::VersionMismatch { got: v, expected: PROTOCOL_VERSION });
                }
            }
            Err(e)
        }
    }
}

/// Encodes a message as a complete frame (length prefix + payload); refuses a payload over
/// `max_bytes`.
pub fn encode_frame(msg: &Message, max_bytes: usize) -> Result<Vec<u8>, FrameError> {
    let payload = encode_payload(msg)?;
    frame_payload(payload, max_bytes)
}

fn frame_payload(payload: Vec<u8>, max_bytes: usize) -> Result<Vec<u8>, FrameError> {
    let cap = max_bytes.min(u32::MAX as usize);
    if payload.len() > cap {
        return Err(FrameError::TooLarge { size: payload.len() as u64, cap });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks a frame's declared length against the cap (before any allocation).
fn check_len(len: u32, max_bytes: usize) -> Result<usize, FrameError> {
    if len as u64 > max_bytes as u64 {
        return Err(FrameError::TooLarge { size: len as u64, cap: max_bytes });
    }
    Ok(len as usize)
}

/// Decodes exactly one complete frame from `buf` (length prefix + payload, nothing after).
pub fn decode_frame(buf: &[u8], max_bytes: usize) -> Result<Message, FrameError> {
    if buf.len() < 4 {
        return Err(FrameError::Truncated { expected: 4, got: buf.len() });
    }
    let len = check_len(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]), max_bytes)?;
    let body = &buf[4..];
    if body.len() < len {
        return Err(FrameError::Truncated { expected: len, got: body.len() });
    }
    if body.len() > len {
        return Err(FrameError::Malformed(format!("{} bytes after the frame", body.len() - len)));
    }
    decode_payload(body)
}

/// Writes one frame with the default cap ([`MAX_FRAME_BYTES`]).
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, msg: &Message) -> Result<(), FrameError> {
    write_frame_capped(w, msg, MAX_FRAME_BYTES).await
}

/// Writes one frame, refusing a payload over `max_bytes`.
pub async fn write_frame_capped<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    msg: &Message,
    max_bytes: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg, max_bytes)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Any serde value as a frame (the tensor stream header).
pub(crate) fn encode_value_frame<T: Serialize>(value: &T, max_bytes: usize) -> Result<Vec<u8>, FrameError> {
    frame_payload(encode_value(value)?, max_bytes)
}

/// Reads exactly `buf.len()` bytes; Ok(n) with n < len on EOF.
async fn read_full<R: AsyncRead + Unpin + ?Sized>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads one frame's payload; Ok(None) on a clean end of stream before the first byte.
pub(crate) async fn read_payload<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    max_bytes: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len_buf = [0u8; 4];
    let got = read_full(r, &mut len_buf).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < 4 {
        return Err(FrameError::Truncated { expected: 4, got });
    }
    let len = check_len(u32::from_be_bytes(len_buf), max_bytes)?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload).await?;
    if got < len {
        return Err(FrameError::Truncated { expected: len, got });
    }
    Ok(Some(payload))
}

/// Reads one frame and decodes it; the declared length is checked against `max_bytes` before
/// anything is allocated. A clean end of stream before the frame is [`FrameError::Closed`].
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(r: &mut R, max_bytes: usize) -> Result<Message, FrameError> {
    read_frame_opt(r, max_bytes).await?.ok_or(FrameError::Closed)
}

/// As [`read_frame`], but a clean end of stream before the frame is `Ok(None)`.
pub async fn read_frame_opt<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    max_bytes: usize,
) -> Result<Option<Message>, FrameError> {
    match read_payload(r, max_bytes).await? {
        None => Ok(None),
        Some(p) => decode_payload(&p).map(Some),
    }
}
