//! SPDY/3.1 framing, sans IO: the byte stream `kubectl port-forward`
//! tunnels through its WebSocket is a SPDY/3.1 connection in which kubectl
//! is the client (client-go's `tools/portforward`, spdystream's framer);
//! so is the upgraded connection the API server opens to a kubelet for
//! port-forward, exec and attach. `conn` (crate-internal) runs a
//! connection's frames over either transport.
//!
//! [`Decoder`] turns arriving bytes (any chunking) into [`Frame`]s;
//! [`Encoder`] turns frames into bytes. Each direction of a connection has
//! one zlib stream for all its header blocks (SYN_STREAM, SYN_REPLY,
//! HEADERS), compressed with the SPDY/3 [`HEADER_DICTIONARY`] and ended by
//! a sync flush, so one `Decoder` and one `Encoder` serve one connection
//! and must see every frame of their direction, in order.
//!
//! Frame layout (all integers big-endian):
//!
//! ```text
//! control: 1 | version (15) | type (16) | flags (8) | length (24) | payload
//! data:    0 | stream id (31)           | flags (8) | length (24) | payload
//! ```
//!
//! Limits — what a hostile peer can make the decoder hold — are checked
//! before anything is allocated: a control frame's payload is at most
//! [`MAX_CONTROL_PAYLOAD`], a data frame's at most [`MAX_DATA_PAYLOAD`]
//! (kubectl writes at most 32 KiB per frame), a header block decompresses
//! to at most [`MAX_HEADER_BLOCK`] bytes and holds at most [`MAX_HEADERS`]
//! pairs. Anything else wrong (version other than 3, truncated fixed
//! fields, stream id 0, bad compression, upper-case or duplicate header
//! names) is an error; errors are sticky, the decoder is then useless (the
//! connection should end with a GOAWAY).

use std::fmt;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The SPDY version spoken (and the only one accepted).
pub const VERSION: u16 = 3;
/// Largest control frame payload accepted (header blocks are small:
/// kubectl's compress to a few dozen bytes).
pub const MAX_CONTROL_PAYLOAD: usize = 256 * 1024;
/// Largest data frame payload accepted.
pub const MAX_DATA_PAYLOAD: usize = 1 << 20;
/// Largest decompressed header block accepted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Most name/value pairs accepted in one header block.
pub const MAX_HEADERS: usize = 256;
/// The 24-bit length field's limit: the largest payload that can be encoded.
pub const MAX_LENGTH: usize = (1 << 24) - 1;

pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_SETTINGS: u16 = 4;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const TYPE_HEADERS: u16 = 8;
pub const TYPE_WINDOW_UPDATE: u16 = 9;

/// FLAG_FIN on data frames, SYN_STREAM, SYN_REPLY and HEADERS.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// FLAG_SETTINGS_CLEAR_SETTINGS on SETTINGS.
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const UNSUPPORTED_VERSION: u32 = 4;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const INVALID_CREDENTIALS: u32 = 10;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// Why bytes are not (or cannot become) SPDY/3 frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpdyError {
    #[error("unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    #[error("{kind} frame of {length} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        kind: &'static str,
        length: usize,
        max: usize,
    },
    #[error("invalid {frame} frame: {reason}")]
    InvalidFrame {
        frame: &'static str,
        reason: &'static str,
    },
    #[error("invalid header block: {0}")]
    InvalidHeaders(String),
    #[error("header block decompresses to more than {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    #[error("header block compression: {0}")]
    Compression(String),
}

fn invalid(frame: &'static str, reason: &'static str) -> SpdyError {
    SpdyError::InvalidFrame { frame, reason }
}

/// The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1),
/// byte for byte as spdystream's `spdy/dictionary.go` has it; its Adler-32
/// (the zlib dictionary id) is 0xe3c6a7c2.
pub const HEADER_DICTIONARY: [u8; 1423] = [
    0x00, 0x00, 0x00, 0x07, 0x6f, 0x70, 0x74, 0x69, 0x6f, 0x6e, 0x73, 0x00, 0x00, 0x00, 0x04, 0x68,
    0x65, 0x61, 0x64, 0x00, 0x00, 0x00, 0x04, 0x70, 0x6f, 0x73, 0x74, 0x00, 0x00, 0x00, 0x03, 0x70,
    0x75, 0x74, 0x00, 0x00, 0x00, 0x06, 0x64, 0x65, 0x6c, 0x65, 0x74, 0x65, 0x00, 0x00, 0x00, 0x05,
    0x74, 0x72, 0x61, 0x63, 0x65, 0x00, 0x00, 0x00, 0x06, 0x61, 0x63, 0x63, 0x65, 0x70, 0x74, 0x00,
    0x00, 0x00, 0x0e, 0x61, 0x63, 0x63, 0x65, 0x70, 0x74, 0x2d, 0x63, 0x68, 0x61, 0x72, 0x73, 0x65,
    0x74, 0x00, 0x00, 0x00, 0x0f, 0x61, 0x63, 0x63, 0x65, 0x70, 0x74, 0x2d, 0x65, 0x6e, 0x63, 0x6f,
    0x64, 0x69, 0x6e, 0x67, 0x00, 0x00, 0x00, 0x0f, 0x61, 0x63, 0x63, 0x65, 0x70, 0x74, 0x2d, 0x6c,
    0x61, 0x6e, 0x67, 0x75, 0x61, 0x67, 0x65, 0x00, 0x00, 0x00, 0x0d, 0x61, 0x63, 0x63, 0x65, 0x70,
    0x74, 0x2d, 0x72, 0x61, 0x6e, 0x67, 0x65, 0x73, 0x00, 0x00, 0x00, 0x03, 0x61, 0x67, 0x65, 0x00,
    0x00, 0x00, 0x05, 0x61, 0x6c, 0x6c, 0x6f, 0x77, 0x00, 0x00, 0x00, 0x0d, 0x61, 0x75, 0x74, 0x68,
    0x6f, 0x72, 0x69, 0x7a, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00, 0x0d, 0x63, 0x61, 0x63,
    0x68, 0x65, 0x2d, 0x63, 0x6f, 0x6e, 0x74, 0x72, 0x6f, 0x6c, 0x00, 0x00, 0x00, 0x0a, 0x63, 0x6f,
    0x6e, 0x6e, 0x65, 0x63, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00, 0x0c, 0x63, 0x6f, 0x6e, 0x74,
    0x65, 0x6e, 0x74, 0x2d, 0x62, 0x61, 0x73, 0x65, 0x00, 0x00, 0x00, 0x10, 0x63, 0x6f, 0x6e, 0x74,
    0x65, 0x6e, 0x74, 0x2d, 0x65, 0x6e, 0x63, 0x6f, 0x64, 0x69, 0x6e, 0x67, 0x00, 0x00, 0x00, 0x10,
    0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74, 0x2d, 0x6c, 0x61, 0x6e, 0x67, 0x75, 0x61, 0x67, 0x65,
    0x00, 0x00, 0x00, 0x0e, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74, 0x2d, 0x6c, 0x65, 0x6e, 0x67,
    0x74, 0x68, 0x00, 0x00, 0x00, 0x10, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74, 0x2d, 0x6c, 0x6f,
    0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00, 0x0b, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e,
    0x74, 0x2d, 0x6d, 0x64, 0x35, 0x00, 0x00, 0x00, 0x0d, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74,
    0x2d, 0x72, 0x61, 0x6e, 0x67, 0x65, 0x00, 0x00, 0x00, 0x0c, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e,
    0x74, 0x2d, 0x74, 0x79, 0x70, 0x65, 0x00, 0x00, 0x00, 0x04, 0x64, 0x61, 0x74, 0x65, 0x00, 0x00,
    0x00, 0x04, 0x65, 0x74, 0x61, 0x67, 0x00, 0x00, 0x00, 0x06, 0x65, 0x78, 0x70, 0x65, 0x63, 0x74,
    0x00, 0x00, 0x00, 0x07, 0x65, 0x78, 0x70, 0x69, 0x72, 0x65, 0x73, 0x00, 0x00, 0x00, 0x04, 0x66,
    0x72, 0x6f, 0x6d, 0x00, 0x00, 0x00, 0x04, 0x68, 0x6f, 0x73, 0x74, 0x00, 0x00, 0x00, 0x08, 0x69,
    0x66, 0x2d, 0x6d, 0x61, 0x74, 0x63, 0x68, 0x00, 0x00, 0x00, 0x11, 0x69, 0x66, 0x2d, 0x6d, 0x6f,
    0x64, 0x69, 0x66, 0x69, 0x65, 0x64, 0x2d, 0x73, 0x69, 0x6e, 0x63, 0x65, 0x00, 0x00, 0x00, 0x0d,
    0x69, 0x66, 0x2d, 0x6e, 0x6f, 0x6e, 0x65, 0x2d, 0x6d, 0x61, 0x74, 0x63, 0x68, 0x00, 0x00, 0x00,
    0x08, 0x69, 0x66, 0x2d, 0x72, 0x61, 0x6e, 0x67, 0x65, 0x00, 0x00, 0x00, 0x13, 0x69, 0x66, 0x2d,
    0x75, 0x6e, 0x6d, 0x6f, 0x64, 0x69, 0x66, 0x69, 0x65, 0x64, 0x2d, 0x73, 0x69, 0x6e, 0x63, 0x65,
    0x00, 0x00, 0x00, 0x0d, 0x6c, 0x61, 0x73, 0x74, 0x2d, 0x6d, 0x6f, 0x64, 0x69, 0x66, 0x69, 0x65,
    0x64, 0x00, 0x00, 0x00, 0x08, 0x6c, 0x6f, 0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00,
    0x0c, 0x6d, 0x61, 0x78, 0x2d, 0x66, 0x6f, 0x72, 0x77, 0x61, 0x72, 0x64, 0x73, 0x00, 0x00, 0x00,
    0x06, 0x70, 0x72, 0x61, 0x67, 0x6d, 0x61, 0x00, 0x00, 0x00, 0x12, 0x70, 0x72, 0x6f, 0x78, 0x79,
    0x2d, 0x61, 0x75, 0x74, 0x68, 0x65, 0x6e, 0x74, 0x69, 0x63, 0x61, 0x74, 0x65, 0x00, 0x00, 0x00,
    0x13, 0x70, 0x72, 0x6f, 0x78, 0x79, 0x2d, 0x61, 0x75, 0x74, 0x68, 0x6f, 0x72, 0x69, 0x7a, 0x61,
    0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00, 0x05, 0x72, 0x61, 0x6e, 0x67, 0x65, 0x00, 0x00, 0x00,
    0x07, 0x72, 0x65, 0x66, 0x65, 0x72, 0x65, 0x72, 0x00, 0x00, 0x00, 0x0b, 0x72, 0x65, 0x74, 0x72,
    0x79, 0x2d, 0x61, 0x66, 0x74, 0x65, 0x72, 0x00, 0x00, 0x00, 0x06, 0x73, 0x65, 0x72, 0x76, 0x65,
    0x72, 0x00, 0x00, 0x00, 0x02, 0x74, 0x65, 0x00, 0x00, 0x00, 0x07, 0x74, 0x72, 0x61, 0x69, 0x6c,
    0x65, 0x72, 0x00, 0x00, 0x00, 0x11, 0x74, 0x72, 0x61, 0x6e, 0x73, 0x66, 0x65, 0x72, 0x2d, 0x65,
    0x6e, 0x63, 0x6f, 0x64, 0x69, 0x6e, 0x67, 0x00, 0x00, 0x00, 0x07, 0x75, 0x70, 0x67, 0x72, 0x61,
    0x64, 0x65, 0x00, 0x00, 0x00, 0x0a, 0x75, 0x73, 0x65, 0x72, 0x2d, 0x61, 0x67, 0x65, 0x6e, 0x74,
    0x00, 0x00, 0x00, 0x04, 0x76, 0x61, 0x72, 0x79, 0x00, 0x00, 0x00, 0x03, 0x76, 0x69, 0x61, 0x00,
    0x00, 0x00, 0x07, 0x77, 0x61, 0x72, 0x6e, 0x69, 0x6e, 0x67, 0x00, 0x00, 0x00, 0x10, 0x77, 0x77,
    0x77, 0x2d, 0x61, 0x75, 0x74, 0x68, 0x65, 0x6e, 0x74, 0x69, 0x63, 0x61, 0x74, 0x65, 0x00, 0x00,
    0x00, 0x06, 0x6d, 0x65, 0x74, 0x68, 0x6f, 0x64, 0x00, 0x00, 0x00, 0x03, 0x67, 0x65, 0x74, 0x00,
    0x00, 0x00, 0x06, 0x73, 0x74, 0x61, 0x74, 0x75, 0x73, 0x00, 0x00, 0x00, 0x06, 0x32, 0x30, 0x30,
    0x20, 0x4f, 0x4b, 0x00, 0x00, 0x00, 0x07, 0x76, 0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e, 0x00, 0x00,
    0x00, 0x08, 0x48, 0x54, 0x54, 0x50, 0x2f, 0x31, 0x2e, 0x31, 0x00, 0x00, 0x00, 0x03, 0x75, 0x72,
    0x6c, 0x00, 0x00, 0x00, 0x06, 0x70, 0x75, 0x62, 0x6c, 0x69, 0x63, 0x00, 0x00, 0x00, 0x0a, 0x73,
    0x65, 0x74, 0x2d, 0x63, 0x6f, 0x6f, 0x6b, 0x69, 0x65, 0x00, 0x00, 0x00, 0x0a, 0x6b, 0x65, 0x65,
    0x70, 0x2d, 0x61, 0x6c, 0x69, 0x76, 0x65, 0x00, 0x00, 0x00, 0x06, 0x6f, 0x72, 0x69, 0x67, 0x69,
    0x6e, 0x31, 0x30, 0x30, 0x31, 0x30, 0x31, 0x32, 0x30, 0x31, 0x32, 0x30, 0x32, 0x32, 0x30, 0x35,
    0x32, 0x30, 0x36, 0x33, 0x30, 0x30, 0x33, 0x30, 0x32, 0x33, 0x30, 0x33, 0x33, 0x30, 0x34, 0x33,
    0x30, 0x35, 0x33, 0x30, 0x36, 0x33, 0x30, 0x37, 0x34, 0x30, 0x32, 0x34, 0x30, 0x35, 0x34, 0x30,
    0x36, 0x34, 0x30, 0x37, 0x34, 0x30, 0x38, 0x34, 0x30, 0x39, 0x34, 0x31, 0x30, 0x34, 0x31, 0x31,
    0x34, 0x31, 0x32, 0x34, 0x31, 0x33, 0x34, 0x31, 0x34, 0x34, 0x31, 0x35, 0x34, 0x31, 0x36, 0x34,
    0x31, 0x37, 0x35, 0x30, 0x32, 0x35, 0x30, 0x34, 0x35, 0x30, 0x35, 0x32, 0x30, 0x33, 0x20, 0x4e,
    0x6f, 0x6e, 0x2d, 0x41, 0x75, 0x74, 0x68, 0x6f, 0x72, 0x69, 0x74, 0x61, 0x74, 0x69, 0x76, 0x65,
    0x20, 0x49, 0x6e, 0x66, 0x6f, 0x72, 0x6d, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x32, 0x30, 0x34, 0x20,
    0x4e, 0x6f, 0x20, 0x43, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74, 0x33, 0x30, 0x31, 0x20, 0x4d, 0x6f,
    0x76, 0x65, 0x64, 0x20, 0x50, 0x65, 0x72, 0x6d, 0x61, 0x6e, 0x65, 0x6e, 0x74, 0x6c, 0x79, 0x34,
    0x30, 0x30, 0x20, 0x42, 0x61, 0x64, 0x20, 0x52, 0x65, 0x71, 0x75, 0x65, 0x73, 0x74, 0x34, 0x30,
    0x31, 0x20, 0x55, 0x6e, 0x61, 0x75, 0x74, 0x68, 0x6f, 0x72, 0x69, 0x7a, 0x65, 0x64, 0x34, 0x30,
    0x33, 0x20, 0x46, 0x6f, 0x72, 0x62, 0x69, 0x64, 0x64, 0x65, 0x6e, 0x34, 0x30, 0x34, 0x20, 0x4e,
    0x6f, 0x74, 0x20, 0x46, 0x6f, 0x75, 0x6e, 0x64, 0x35, 0x30, 0x30, 0x20, 0x49, 0x6e, 0x74, 0x65,
    0x72, 0x6e, 0x61, 0x6c, 0x20, 0x53, 0x65, 0x72, 0x76, 0x65, 0x72, 0x20, 0x45, 0x72, 0x72, 0x6f,
    0x72, 0x35, 0x30, 0x31, 0x20, 0x4e, 0x6f, 0x74, 0x20, 0x49, 0x6d, 0x70, 0x6c, 0x65, 0x6d, 0x65,
    0x6e, 0x74, 0x65, 0x64, 0x35, 0x30, 0x33, 0x20, 0x53, 0x65, 0x72, 0x76, 0x69, 0x63, 0x65, 0x20,
    0x55, 0x6e, 0x61, 0x76, 0x61, 0x69, 0x6c, 0x61, 0x62, 0x6c, 0x65, 0x4a, 0x61, 0x6e, 0x20, 0x46,
    0x65, 0x62, 0x20, 0x4d, 0x61, 0x72, 0x20, 0x41, 0x70, 0x72, 0x20, 0x4d, 0x61, 0x79, 0x20, 0x4a,
    0x75, 0x6e, 0x20, 0x4a, 0x75, 0x6c, 0x20, 0x41, 0x75, 0x67, 0x20, 0x53, 0x65, 0x70, 0x74, 0x20,
    0x4f, 0x63, 0x74, 0x20, 0x4e, 0x6f, 0x76, 0x20, 0x44, 0x65, 0x63, 0x20, 0x30, 0x30, 0x3a, 0x30,
    0x30, 0x3a, 0x30, 0x30, 0x20, 0x4d, 0x6f, 0x6e, 0x2c, 0x20, 0x54, 0x75, 0x65, 0x2c, 0x20, 0x57,
    0x65, 0x64, 0x2c, 0x20, 0x54, 0x68, 0x75, 0x2c, 0x20, 0x46, 0x72, 0x69, 0x2c, 0x20, 0x53, 0x61,
    0x74, 0x2c, 0x20, 0x53, 0x75, 0x6e, 0x2c, 0x20, 0x47, 0x4d, 0x54, 0x63, 0x68, 0x75, 0x6e, 0x6b,
    0x65, 0x64, 0x2c, 0x74, 0x65, 0x78, 0x74, 0x2f, 0x68, 0x74, 0x6d, 0x6c, 0x2c, 0x69, 0x6d, 0x61,
    0x67, 0x65, 0x2f, 0x70, 0x6e, 0x67, 0x2c, 0x69, 0x6d, 0x61, 0x67, 0x65, 0x2f, 0x6a, 0x70, 0x67,
    0x2c, 0x69, 0x6d, 0x61, 0x67, 0x65, 0x2f, 0x67, 0x69, 0x66, 0x2c, 0x61, 0x70, 0x70, 0x6c, 0x69,
    0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x2f, 0x78, 0x6d, 0x6c, 0x2c, 0x61, 0x70, 0x70, 0x6c, 0x69,
    0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x2f, 0x78, 0x68, 0x74, 0x6d, 0x6c, 0x2b, 0x78, 0x6d, 0x6c,
    0x2c, 0x74, 0x65, 0x78, 0x74, 0x2f, 0x70, 0x6c, 0x61, 0x69, 0x6e, 0x2c, 0x74, 0x65, 0x78, 0x74,
    0x2f, 0x6a, 0x61, 0x76, 0x61, 0x73, 0x63, 0x72, 0x69, 0x70, 0x74, 0x2c, 0x70, 0x75, 0x62, 0x6c,
    0x69, 0x63, 0x70, 0x72, 0x69, 0x76, 0x61, 0x74, 0x65, 0x6d, 0x61, 0x78, 0x2d, 0x61, 0x67, 0x65,
    0x3d, 0x67, 0x7a, 0x69, 0x70, 0x2c, 0x64, 0x65, 0x66, 0x6c, 0x61, 0x74, 0x65, 0x2c, 0x73, 0x64,
    0x63, 0x68, 0x63, 0x68, 0x61, 0x72, 0x73, 0x65, 0x74, 0x3d, 0x75, 0x74, 0x66, 0x2d, 0x38, 0x63,
    0x68, 0x61, 0x72, 0x73, 0x65, 0x74, 0x3d, 0x69, 0x73, 0x6f, 0x2d, 0x38, 0x38, 0x35, 0x39, 0x2d,
    0x31, 0x2c, 0x75, 0x74, 0x66, 0x2d, 0x2c, 0x2a, 0x2c, 0x65, 0x6e, 0x71, 0x3d, 0x30, 0x2e,
];

/// A header block: lower-case names, each with a value that may hold
/// several values separated by NUL bytes. Order is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    /// Adds a pair; the name is lower-cased (SPDY/3 names are lower case).
    pub fn with(mut self, name: &str, value: &str) -> Headers {
        self.0.push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// The first value of `name` (up to the first NUL), as Go's
    /// `http.Header.Get` gives it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.split('\0').next())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    /// 24 bits.
    pub id: u32,
    pub value: u32,
}

/// A SPDY/3 frame, unpacked. Stream ids are 31 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 3 bits.
        priority: u8,
        slot: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        settings: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        /// 0 for the session's window (SPDY/3.1).
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    /// A control frame of a type this codec does not know (decoded only;
    /// SPDY says to ignore them). Its payload is skipped.
    Unknown {
        kind: u16,
        flags: u8,
    },
}

/// Reads fixed fields from a payload; running short is an error.
struct Reader<'a> {
    frame: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(frame: &'static str, buf: &'a [u8]) -> Self {
        Reader { frame, buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SpdyError> {
        let (head, rest) = self
            .buf
            .split_at_checked(n)
            .ok_or_else(|| invalid(self.frame, "truncated"))?;
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, SpdyError> {
        let b = self.take(1)?;
        b.first()
            .copied()
            .ok_or_else(|| invalid(self.frame, "truncated"))
    }

    fn u32(&mut self) -> Result<u32, SpdyError> {
        let b = self.take(4)?;
        <[u8; 4]>::try_from(b)
            .map(u32::from_be_bytes)
            .map_err(|_| invalid(self.frame, "truncated"))
    }

    /// A 31-bit stream id that must not be 0.
    fn stream_id(&mut self) -> Result<u32, SpdyError> {
        match self.u32()? & 0x7fff_ffff {
            0 => Err(invalid(self.frame, "stream id 0")),
            id => Ok(id),
        }
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn len(&self) -> usize {
        self.buf.len()
    }
}

/// Parses frames out of a growing byte buffer.
pub struct Decoder {
    buf: BytesMut,
    inflate: Decompress,
    dictionary_set: bool,
    failed: Option<SpdyError>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("buffered", &self.buf.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            inflate: Decompress::new(true),
            dictionary_set: false,
            failed: None,
        }
    }

    /// Appends arriving bytes. Calling [`Decoder::next_frame`] until it
    /// gives `Ok(None)` after each push keeps the buffer at most one
    /// partial frame (bounded by the frame limits) plus the last push.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes held that are not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. Errors
    /// are sticky.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SpdyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.parse();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
            self.buf = BytesMut::new();
        }
        r
    }

    fn parse(&mut self) -> Result<Option<Frame>, SpdyError> {
        let Some(head) = self.buf.get(..8).and_then(|h| <[u8; 8]>::try_from(h).ok()) else {
            return Ok(None);
        };
        let [w0, w1, w2, w3, flags, l0, l1, l2] = head;
        let word = u32::from_be_bytes([w0, w1, w2, w3]);
        let length = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
        let control = word & 0x8000_0000 != 0;
        // Limits first: nothing is buffered waiting for a frame that will
        // be refused anyway.
        if control {
            let version = ((word >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(SpdyError::UnsupportedVersion(version));
            }
            if length > MAX_CONTROL_PAYLOAD {
                return Err(SpdyError::FrameTooLarge {
                    kind: "control",
                    length,
                    max: MAX_CONTROL_PAYLOAD,
                });
            }
        } else if length > MAX_DATA_PAYLOAD {
            return Err(SpdyError::FrameTooLarge {
                kind: "data",
                length,
                max: MAX_DATA_PAYLOAD,
            });
        }
        if self.buf.len() < 8 + length {
            return Ok(None);
        }
        self.buf.advance(8);
        let payload = self.buf.split_to(length).freeze();
        if control {
            self.control((word & 0xffff) as u16, flags, &payload)
                .map(Some)
        } else {
            match word & 0x7fff_ffff {
                0 => Err(invalid("DATA", "stream id 0")),
                stream_id => Ok(Some(Frame::Data {
                    stream_id,
                    fin: flags & FLAG_FIN != 0,
                    data: payload,
                })),
            }
        }
    }

    fn control(&mut self, kind: u16, flags: u8, payload: &[u8]) -> Result<Frame, SpdyError> {
        let fin = flags & FLAG_FIN != 0;
        let exact = |frame: &'static str, n: usize| {
            if payload.len() == n {
                Ok(Reader::new(frame, payload))
            } else {
                Err(invalid(frame, "wrong length"))
            }
        };
        Ok(match kind {
            TYPE_SYN_STREAM => {
                let mut r = Reader::new("SYN_STREAM", payload);
                let stream_id = r.stream_id()?;
                let associated_to = r.u32()? & 0x7fff_ffff;
                let priority = r.u8()? >> 5;
                let slot = r.u8()?;
                let headers = self.headers(r.rest())?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    slot,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                }
            }
            TYPE_SYN_REPLY => {
                let mut r = Reader::new("SYN_REPLY", payload);
                let stream_id = r.stream_id()?;
                let headers = self.headers(r.rest())?;
                Frame::SynReply {
                    stream_id,
                    fin,
                    headers,
                }
            }
            TYPE_HEADERS => {
                let mut r = Reader::new("HEADERS", payload);
                let stream_id = r.stream_id()?;
                let headers = self.headers(r.rest())?;
                Frame::Headers {
                    stream_id,
                    fin,
                    headers,
                }
            }
            TYPE_RST_STREAM => {
                let mut r = exact("RST_STREAM", 8)?;
                let stream_id = r.stream_id()?;
                match r.u32()? {
                    0 => return Err(invalid("RST_STREAM", "status 0")),
                    status => Frame::RstStream { stream_id, status },
                }
            }
            TYPE_SETTINGS => {
                let mut r = Reader::new("SETTINGS", payload);
                let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
                if count.checked_mul(8) != Some(r.len()) {
                    return Err(invalid("SETTINGS", "wrong length"));
                }
                let mut settings = Vec::with_capacity(count);
                for _ in 0..count {
                    let w = r.u32()?;
                    settings.push(Setting {
                        flags: (w >> 24) as u8,
                        id: w & 0x00ff_ffff,
                        value: r.u32()?,
                    });
                }
                Frame::Settings {
                    clear: flags & FLAG_SETTINGS_CLEAR != 0,
                    settings,
                }
            }
            TYPE_PING => Frame::Ping {
                id: exact("PING", 4)?.u32()?,
            },
            TYPE_GOAWAY => {
                let mut r = exact("GOAWAY", 8)?;
                Frame::GoAway {
                    last_good_stream_id: r.u32()? & 0x7fff_ffff,
                    status: r.u32()?,
                }
            }
            TYPE_WINDOW_UPDATE => {
                let mut r = exact("WINDOW_UPDATE", 8)?;
                Frame::WindowUpdate {
                    stream_id: r.u32()? & 0x7fff_ffff,
                    delta: r.u32()? & 0x7fff_ffff,
                }
            }
            kind => Frame::Unknown { kind, flags },
        })
    }

    fn headers(&mut self, compressed: &[u8]) -> Result<Headers, SpdyError> {
        let block = self.inflate(compressed)?;
        parse_header_block(&block)
    }

    /// Inflates one header block: all of `input`, on the connection's one
    /// zlib stream, into at most [`MAX_HEADER_BLOCK`] bytes.
    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let compression = |e: &dyn fmt::Display| SpdyError::Compression(e.to_string());
        let mut out: Vec<u8> =
            Vec::with_capacity(input.len().saturating_mul(4).clamp(256, MAX_HEADER_BLOCK));
        let mut pos = 0usize;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(SpdyError::HeaderBlockTooLarge);
                }
                let more = out.len().max(1024).min(MAX_HEADER_BLOCK - out.len());
                out.reserve_exact(more);
            }
            let rest = input.get(pos..).unwrap_or_default();
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let result = self
                .inflate
                .decompress_vec(rest, &mut out, FlushDecompress::Sync);
            let consumed = self.inflate.total_in().saturating_sub(in0);
            let produced = self.inflate.total_out().saturating_sub(out0);
            pos = pos.saturating_add(usize::try_from(consumed).unwrap_or(usize::MAX));
            match result {
                Ok(Status::StreamEnd) => {
                    return Err(SpdyError::Compression("the zlib stream ended".into()));
                }
                Ok(Status::Ok | Status::BufError) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(id) if !self.dictionary_set => {
                        let ours = self
                            .inflate
                            .set_dictionary(&HEADER_DICTIONARY)
                            .map_err(|e| compression(&e))?;
                        if ours != id {
                            return Err(SpdyError::Compression(format!(
                                "unknown dictionary {id:#010x}"
                            )));
                        }
                        self.dictionary_set = true;
                        continue;
                    }
                    _ => return Err(compression(&e)),
                },
            }
            if out.len() > MAX_HEADER_BLOCK {
                return Err(SpdyError::HeaderBlockTooLarge);
            }
            if pos >= input.len() && (out.len() < out.capacity() || produced == 0) {
                return Ok(out);
            }
            if consumed == 0 && produced == 0 {
                return Err(SpdyError::Compression("no progress".into()));
            }
        }
    }
}

/// Parses an uncompressed header block: u32 count, then per pair u32
/// name length, name, u32 value length, value.
fn parse_header_block(block: &[u8]) -> Result<Headers, SpdyError> {
    let bad = |m: String| SpdyError::InvalidHeaders(m);
    let mut r = Reader::new("header block", block);
    let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
    if count > MAX_HEADERS {
        return Err(bad(format!(
            "{count} headers exceed the limit of {MAX_HEADERS}"
        )));
    }
    if count.saturating_mul(8) > r.len() {
        return Err(bad(format!(
            "{count} headers cannot fit in {} bytes",
            r.len()
        )));
    }
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(count);
    for _ in 0..count {
        let n = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
        let name = r.take(n)?;
        let n = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
        let value = r.take(n)?;
        let name = std::str::from_utf8(name).map_err(|_| bad("a name is not UTF-8".into()))?;
        if name.is_empty() {
            return Err(bad("an empty name".into()));
        }
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(format!("name {name:?} is not lower case")));
        }
        if pairs.iter().any(|(n, _)| n == name) {
            return Err(bad(format!("name {name:?} repeated")));
        }
        pairs.push((name.to_owned(), String::from_utf8_lossy(value).into_owned()));
    }
    if r.len() != 0 {
        return Err(bad(format!("{} bytes after the last header", r.len())));
    }
    Ok(Headers(pairs))
}

/// Encodes frames; header blocks go through the connection's one zlib
/// stream (best compression, the SPDY/3 dictionary, a sync flush after
/// each block), as spdystream's framer writes them.
pub struct Encoder {
    deflate: Compress,
    dictionary: bool,
    started: bool,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("dictionary", &self.dictionary)
            .finish_non_exhaustive()
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder {
            deflate: Compress::new(Compression::best(), true),
            dictionary: true,
            started: false,
        }
    }

    /// An encoder whose zlib stream does not use the dictionary (a valid
    /// SPDY/3 stream too: the zlib header says so, and readers inflate it
    /// without one).
    pub fn without_dictionary() -> Encoder {
        Encoder {
            dictionary: false,
            ..Encoder::new()
        }
    }

    /// Appends `frame` to `out`. `Frame::Unknown`, stream ids 0 (or over
    /// 31 bits) on stream frames, and payloads over [`MAX_LENGTH`] are
    /// errors; nothing is appended then.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), SpdyError> {
        let flag = |on: bool, f: u8| if on { f } else { 0 };
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                slot,
                fin,
                unidirectional,
                headers,
            } => {
                let id = stream_id_of("SYN_STREAM", *stream_id)?;
                let block = self.compress(headers)?;
                control_head(
                    out,
                    TYPE_SYN_STREAM,
                    flag(*fin, FLAG_FIN) | flag(*unidirectional, FLAG_UNIDIRECTIONAL),
                    10 + block.len(),
                )?;
                out.put_u32(id);
                out.put_u32(associated_to & 0x7fff_ffff);
                out.put_u8((priority & 0x07) << 5);
                out.put_u8(*slot);
                out.extend_from_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
            | Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                let (name, kind) = match frame {
                    Frame::SynReply { .. } => ("SYN_REPLY", TYPE_SYN_REPLY),
                    _ => ("HEADERS", TYPE_HEADERS),
                };
                let id = stream_id_of(name, *stream_id)?;
                let block = self.compress(headers)?;
                control_head(out, kind, flag(*fin, FLAG_FIN), 4 + block.len())?;
                out.put_u32(id);
                out.extend_from_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                let id = stream_id_of("RST_STREAM", *stream_id)?;
                control_head(out, TYPE_RST_STREAM, 0, 8)?;
                out.put_u32(id);
                out.put_u32(*status);
            }
            Frame::Settings { clear, settings } => {
                let count = u32::try_from(settings.len())
                    .map_err(|_| invalid("SETTINGS", "too many settings"))?;
                control_head(
                    out,
                    TYPE_SETTINGS,
                    flag(*clear, FLAG_SETTINGS_CLEAR),
                    4 + 8 * settings.len(),
                )?;
                out.put_u32(count);
                for s in settings {
                    out.put_u32(u32::from(s.flags) << 24 | (s.id & 0x00ff_ffff));
                    out.put_u32(s.value);
                }
            }
            Frame::Ping { id } => {
                control_head(out, TYPE_PING, 0, 4)?;
                out.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control_head(out, TYPE_GOAWAY, 0, 8)?;
                out.put_u32(last_good_stream_id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control_head(out, TYPE_WINDOW_UPDATE, 0, 8)?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                let id = stream_id_of("DATA", *stream_id)?;
                if data.len() > MAX_LENGTH {
                    return Err(SpdyError::FrameTooLarge {
                        kind: "data",
                        length: data.len(),
                        max: MAX_LENGTH,
                    });
                }
                out.reserve(8 + data.len());
                out.put_u32(id);
                out.put_u32(u32::from(flag(*fin, FLAG_FIN)) << 24 | data.len() as u32);
                out.extend_from_slice(data);
            }
            Frame::Unknown { .. } => return Err(invalid("unknown", "cannot be encoded")),
        }
        Ok(())
    }

    /// Serializes and compresses one header block, ending with a sync flush.
    fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        let too_long = || SpdyError::InvalidHeaders("a header block field over 4 GiB".into());
        let mut raw = Vec::new();
        raw.put_u32(u32::try_from(headers.0.len()).map_err(|_| too_long())?);
        for (name, value) in &headers.0 {
            raw.put_u32(u32::try_from(name.len()).map_err(|_| too_long())?);
            raw.extend_from_slice(name.as_bytes());
            raw.put_u32(u32::try_from(value.len()).map_err(|_| too_long())?);
            raw.extend_from_slice(value.as_bytes());
        }
        if raw.len() > MAX_LENGTH {
            return Err(SpdyError::FrameTooLarge {
                kind: "header block",
                length: raw.len(),
                max: MAX_LENGTH,
            });
        }
        let failed = |e: flate2::CompressError| SpdyError::Compression(e.to_string());
        if !self.started {
            self.started = true;
            if self.dictionary {
                self.deflate
                    .set_dictionary(&HEADER_DICTIONARY)
                    .map_err(failed)?;
            }
        }
        let mut out = Vec::with_capacity(raw.len() / 2 + 64);
        let mut pos = 0usize;
        loop {
            if out.len() == out.capacity() {
                out.reserve(raw.len().max(64));
            }
            let rest = raw.get(pos..).unwrap_or_default();
            let (in0, out0) = (self.deflate.total_in(), self.deflate.total_out());
            self.deflate
                .compress_vec(rest, &mut out, FlushCompress::Sync)
                .map_err(failed)?;
            let consumed = self.deflate.total_in().saturating_sub(in0);
            let produced = self.deflate.total_out().saturating_sub(out0);
            pos = pos.saturating_add(usize::try_from(consumed).unwrap_or(usize::MAX));
            if pos >= raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if consumed == 0 && produced == 0 {
                return Err(SpdyError::Compression("no progress".into()));
            }
        }
    }
}

fn stream_id_of(frame: &'static str, id: u32) -> Result<u32, SpdyError> {
    if id == 0 || id & 0x8000_0000 != 0 {
        return Err(invalid(frame, "stream id must be 1..2^31"));
    }
    Ok(id)
}

fn control_head(out: &mut BytesMut, kind: u16, flags: u8, length: usize) -> Result<(), SpdyError> {
    if length > MAX_LENGTH {
        return Err(SpdyError::FrameTooLarge {
            kind: "control",
            length,
            max: MAX_LENGTH,
        });
    }
    out.reserve(8 + length);
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u32(u32::from(flags) << 24 | length as u32);
    Ok(())
}

/// The byte transports a SPDY connection runs on (server role), and the
/// task that writes its frames: shared by port-forward (over kubectl's
/// WebSocket, or a raw upgraded connection from the API server) and
/// remotecommand (raw). So is the rest of a session that is not about its
/// streams: the client's side ([`Peer`](conn::Peer): decoding, stream ids,
/// replies, the final GOAWAY), the frames a session does not see
/// ([`handle_frames`](conn::handle_frames): PING, GOAWAY, SETTINGS, ...; the
/// streams' frames go to its [`Streams`](conn::Streams)), and why it ended
/// ([`End`](conn::End)). The codec above stays sans IO.
pub(crate) mod conn {
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use futures::stream::{SplitSink, SplitStream};
    use futures::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
    use tokio::io::{ReadHalf, WriteHalf};
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
    use tracing::{Instrument as _, debug, warn};

    use super::{Decoder, Encoder, Frame, Headers, SpdyError, goaway, rst};

    /// Frames batched into one write (one WebSocket message) up to about
    /// this many bytes.
    const BATCH: usize = 64 * 1024;
    /// Bytes read from a raw connection at a time.
    const READ_CHUNK: usize = 16 * 1024;
    /// How long the last frames (GOAWAY, close) may take when a session
    /// ends, and how long the peer then has to close its side.
    pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

    /// What the transport delivered.
    #[derive(Debug)]
    pub(crate) enum Incoming {
        Bytes(Bytes),
        /// The peer closed the transport, or it failed.
        Closed,
        /// Something that cannot carry SPDY bytes (a WebSocket text message).
        Invalid(&'static str),
    }

    /// The receiving half of a transport.
    pub(crate) enum Inbound<IO> {
        WebSocket(SplitStream<WebSocketStream<IO>>),
        Raw(ReadHalf<IO>, BytesMut),
    }

    impl<IO> std::fmt::Debug for Inbound<IO> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(match self {
                Inbound::WebSocket(_) => "Inbound::WebSocket",
                Inbound::Raw(..) => "Inbound::Raw",
            })
        }
    }

    /// The sending half of a transport.
    pub(crate) enum Outbound<IO> {
        WebSocket(SplitSink<WebSocketStream<IO>, Message>),
        Raw(WriteHalf<IO>),
    }

    /// A WebSocket (already past the HTTP handshake, server role) whose
    /// binary messages carry the SPDY bytes, messages of at most
    /// `max_message` bytes.
    pub(crate) async fn websocket<IO>(io: IO, max_message: usize) -> (Inbound<IO>, Outbound<IO>)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(max_message);
        config.max_frame_size = Some(max_message);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let (sink, source) = ws.split();
        (Inbound::WebSocket(source), Outbound::WebSocket(sink))
    }

    /// A raw connection (an upgraded HTTP/1.1 connection) carrying the
    /// SPDY bytes as they are.
    pub(crate) fn raw<IO>(io: IO) -> (Inbound<IO>, Outbound<IO>)
    where
        IO: AsyncRead + AsyncWrite,
    {
        let (rd, wr) = tokio::io::split(io);
        (Inbound::Raw(rd, BytesMut::new()), Outbound::Raw(wr))
    }

    impl<IO: AsyncRead + AsyncWrite + Unpin> Inbound<IO> {
        /// The next bytes. Cancel safe: nothing is lost when the future is
        /// dropped before it completes.
        pub(crate) async fn next(&mut self) -> Incoming {
            match self {
                Inbound::WebSocket(source) => loop {
                    match source.next().await {
                        Some(Ok(Message::Binary(b))) => return Incoming::Bytes(b),
                        Some(Ok(Message::Text(_))) => return Incoming::Invalid("a text message"),
                        Some(Ok(Message::Close(_)) | Err(_)) | None => return Incoming::Closed,
                        // Pings are answered by tungstenite.
                        Some(Ok(_)) => {}
                    }
                },
                Inbound::Raw(rd, buf) => {
                    buf.reserve(READ_CHUNK);
                    match rd.read_buf(buf).await {
                        Ok(1..) => Incoming::Bytes(buf.split().freeze()),
                        Ok(0) | Err(_) => Incoming::Closed,
                    }
                }
            }
        }

        /// After the last frames went out: waits (at most [`CLOSE_TIMEOUT`])
        /// for the peer to close a raw connection, dropping what it still
        /// sends, so that closing ours does not reset the connection while
        /// those frames are in flight (a socket closed with unread bytes
        /// is reset). A WebSocket has its close handshake instead.
        pub(crate) async fn drain(&mut self) {
            if let Inbound::WebSocket(_) = self {
                return;
            }
            let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while let Incoming::Bytes(_) = self.next().await {}
            })
            .await;
            if drained.is_err() {
                debug!("the peer did not close the connection in time");
            }
        }
    }

    impl<IO: AsyncRead + AsyncWrite + Unpin> Outbound<IO> {
        async fn write(&mut self, bytes: Bytes) -> bool {
            match self {
                Outbound::WebSocket(sink) => sink.send(Message::Binary(bytes)).await.is_ok(),
                Outbound::Raw(wr) => wr.write_all(&bytes).await.is_ok() && wr.flush().await.is_ok(),
            }
        }

        /// Closes normally: a WebSocket close (kubectl reads it as the end
        /// of every stream), or a shutdown of our side of the connection.
        async fn close(&mut self) {
            match self {
                Outbound::WebSocket(sink) => crate::exec::close_normally(sink).await,
                Outbound::Raw(wr) => {
                    let _ = wr.shutdown().await;
                }
            }
        }
    }

    /// Encodes frames on the connection's one [`Encoder`] and writes them
    /// (batching what is queued) until every sender is gone, then closes
    /// the transport normally; stops at the first failed write.
    pub(crate) async fn write_frames<IO>(mut out: Outbound<IO>, mut frames: mpsc::Receiver<Frame>)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut encoder = Encoder::new();
        let mut buf = BytesMut::new();
        while let Some(frame) = frames.recv().await {
            let mut next = Some(frame);
            while let Some(frame) = next.take() {
                if let Err(e) = encoder.encode(&frame, &mut buf) {
                    warn!(error = %e, "cannot encode a SPDY frame");
                    return;
                }
                if buf.len() < BATCH {
                    next = frames.try_recv().ok();
                }
            }
            if !out.write(buf.split().freeze()).await {
                return;
            }
        }
        out.close().await;
    }

    /// Ends a connection once every sender of its writer's queue is gone:
    /// waits (at most [`CLOSE_TIMEOUT`]) for the writer to flush and close,
    /// then for the peer to close ([`Inbound::drain`]).
    async fn finish<IO>(writer: JoinHandle<()>, inbound: &mut Inbound<IO>)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stop_writer = writer.abort_handle();
        if tokio::time::timeout(CLOSE_TIMEOUT, writer).await.is_err() {
            stop_writer.abort();
            return;
        }
        inbound.drain().await;
    }

    /// A session's connection: the transport's receiving half and the task
    /// writing the frames queued for the client.
    #[derive(Debug)]
    pub(crate) struct Connection<IO> {
        inbound: Inbound<IO>,
        writer: JoinHandle<()>,
    }

    /// Starts a session on a transport: its writer (a queue of `queue`
    /// frames, written by [`write_frames`]) and the client's side.
    pub(crate) fn start<IO>(
        (inbound, outbound): (Inbound<IO>, Outbound<IO>),
        queue: usize,
    ) -> (Connection<IO>, Peer)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (out, frames) = mpsc::channel(queue);
        let writer = tokio::spawn(write_frames(outbound, frames).in_current_span());
        (Connection { inbound, writer }, Peer::new(out))
    }

    impl<IO: AsyncRead + AsyncWrite + Unpin> Connection<IO> {
        /// The transport's receiving half.
        pub(crate) fn inbound(&mut self) -> &mut Inbound<IO> {
            &mut self.inbound
        }

        /// Ends the connection once every sender of the writer's queue is
        /// gone (see [`finish`]).
        pub(crate) async fn finish(mut self) {
            finish(self.writer, &mut self.inbound).await;
        }
    }

    /// Why a session ended.
    #[derive(Debug)]
    pub(crate) enum End {
        /// Remotecommand: the exec finished and its outcome was sent.
        Done,
        /// The client sent GOAWAY or closed the connection.
        Client,
        /// Writing to the client failed.
        WriterGone,
        /// Remotecommand: the client did not open its streams in time.
        Timeout,
        /// Remotecommand: no frame either way for
        /// [`IDLE_TIMEOUT`](crate::remotecommand::IDLE_TIMEOUT).
        Idle,
        Protocol(String),
    }

    impl From<SpdyError> for End {
        fn from(e: SpdyError) -> Self {
            End::Protocol(e.to_string())
        }
    }

    impl End {
        /// Logs why the `session` ended: the GOAWAY status that says so.
        fn goaway_status(&self, session: &str) -> u32 {
            match self {
                End::Done => debug!("exec finished"),
                End::Client => debug!("client left"),
                End::WriterGone => debug!("connection closed"),
                End::Timeout => warn!("timed out waiting for client to create streams"),
                End::Idle => debug!("connection idle for too long"),
                End::Protocol(e) => {
                    warn!(error = %e, "{session} protocol error");
                    return goaway::PROTOCOL_ERROR;
                }
            }
            goaway::OK
        }
    }

    /// The client's side of a session: its frames, decoded from what the
    /// transport delivers, and the queue of frames to it.
    #[derive(Debug)]
    pub(crate) struct Peer {
        /// Frames to the client (the writer's queue).
        pub(crate) out: mpsc::Sender<Frame>,
        decoder: Decoder,
        /// The highest stream id the client opened (ids must grow, odd).
        last_stream_id: u32,
    }

    impl Peer {
        pub(crate) fn new(out: mpsc::Sender<Frame>) -> Peer {
            Peer {
                out,
                decoder: Decoder::new(),
                last_stream_id: 0,
            }
        }

        /// What the transport delivered: bytes are kept for decoding, the
        /// rest ends the session.
        pub(crate) fn receive(&mut self, incoming: Incoming) -> Result<(), End> {
            match incoming {
                Incoming::Bytes(b) => {
                    self.decoder.push(&b);
                    Ok(())
                }
                Incoming::Closed => Err(End::Client),
                Incoming::Invalid(what) => Err(End::Protocol(what.into())),
            }
        }

        /// The next whole frame received, `None` until more bytes come.
        pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, End> {
            Ok(self.decoder.next_frame()?)
        }

        pub(crate) async fn send(&self, frame: Frame) -> Result<(), End> {
            self.out.send(frame).await.map_err(|_| End::WriterGone)
        }

        /// Accepts a stream the client opens (a SYN_REPLY).
        pub(crate) async fn reply(&self, stream_id: u32) -> Result<(), End> {
            self.send(Frame::SynReply {
                stream_id,
                fin: false,
                headers: Headers::new(),
            })
            .await
        }

        /// Refuses a stream the client opens (RST_STREAM, REFUSED_STREAM).
        pub(crate) async fn refuse(&self, stream_id: u32) -> Result<(), End> {
            self.send(Frame::RstStream {
                stream_id,
                status: rst::REFUSED_STREAM,
            })
            .await
        }

        /// Tells the client why the `session` ends (logged): a GOAWAY naming
        /// the last stream it opened, queued within [`CLOSE_TIMEOUT`].
        pub(crate) async fn goaway(&self, end: &End, session: &str) {
            let goaway = Frame::GoAway {
                last_good_stream_id: self.last_stream_id,
                status: end.goaway_status(session),
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.out.send(goaway)).await;
        }
    }

    /// What a session does with the client's streams; [`handle`] answers
    /// the connection's other frames.
    pub(crate) trait Streams {
        fn peer(&mut self) -> &mut Peer;

        /// Whether frames are handled now; while not, nothing more is read
        /// (backpressure on the whole session).
        fn reading(&self) -> bool {
            true
        }

        /// A frame came (before it is handled).
        fn received(&mut self) {}

        /// A SYN_STREAM, its id checked (odd, above every earlier one): to
        /// be answered with [`Peer::reply`] or [`Peer::refuse`].
        async fn open(&mut self, stream_id: u32, fin: bool, headers: &Headers) -> Result<(), End>;

        /// A data frame.
        async fn data(&mut self, stream_id: u32, fin: bool, data: Bytes) -> Result<(), End>;

        /// RST_STREAM from the client.
        async fn reset(&mut self, stream_id: u32) -> Result<(), End>;
    }

    /// Reads and handles the client's frames until the session ends, for a
    /// session that waits for nothing else.
    pub(crate) async fn serve<S, IO>(session: &mut S, connection: &mut Connection<IO>) -> End
    where
        S: Streams,
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            if let Err(end) = handle_frames(session).await {
                return end;
            }
            if let Err(end) = session.peer().receive(connection.inbound.next().await) {
                return end;
            }
        }
    }

    /// Handles every whole frame received so far, while `session` is
    /// [reading](Streams::reading).
    pub(crate) async fn handle_frames<S: Streams>(session: &mut S) -> Result<(), End> {
        while session.reading()
            && let Some(frame) = session.peer().next_frame()?
        {
            session.received();
            handle(session, frame).await?;
        }
        Ok(())
    }

    /// Handles a frame from the client: stream frames go to `session`,
    /// client pings are answered, GOAWAY ends the session, and anything
    /// else (SETTINGS, WINDOW_UPDATE: flow control is not used) is ignored.
    async fn handle<S: Streams>(session: &mut S, frame: Frame) -> Result<(), End> {
        match frame {
            Frame::SynStream {
                stream_id,
                fin,
                headers,
                ..
            } => {
                let peer = session.peer();
                if stream_id.is_multiple_of(2) || stream_id <= peer.last_stream_id {
                    return Err(End::Protocol(format!(
                        "stream id {stream_id} after {} (client stream ids are odd and grow)",
                        peer.last_stream_id
                    )));
                }
                peer.last_stream_id = stream_id;
                session.open(stream_id, fin, &headers).await
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => session.data(stream_id, fin, data).await,
            Frame::RstStream { stream_id, status } => {
                debug!(stream_id, status, "client reset a stream");
                session.reset(stream_id).await
            }
            // Client pings have odd ids; even ones would answer ours.
            Frame::Ping { id } if !id.is_multiple_of(2) => {
                session.peer().send(Frame::Ping { id }).await
            }
            Frame::GoAway { .. } => Err(End::Client),
            other => {
                debug!(frame = ?other, "ignored");
                Ok(())
            }
        }
    }

    /// An empty data frame with FIN.
    pub(crate) fn fin(stream_id: u32) -> Frame {
        Frame::Data {
            stream_id,
            fin: true,
            data: Bytes::new(),
        }
    }
}

/// A SPDY client for tests: frames over a WebSocket (as kubectl's tunnel)
/// or a raw connection (as the API server's upgrade), encoded and decoded
/// with this codec (header blocks compressed with the dictionary, as Go's
/// framer does).
#[cfg(test)]
pub(crate) mod testing {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use std::collections::{HashMap, HashSet};
    use std::time::Duration;

    use bytes::BytesMut;
    use futures::stream::{SplitSink, SplitStream};
    use futures::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream, ReadHalf, WriteHalf};
    use tokio::task::JoinHandle;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;

    use super::{Decoder, Encoder, Frame, Headers};

    type Ws = WebSocketStream<DuplexStream>;

    /// The client's sending half.
    pub(crate) struct Tx {
        to: To,
        encoder: Encoder,
    }

    enum To {
        WebSocket(SplitSink<Ws, Message>),
        Raw(WriteHalf<DuplexStream>),
    }

    impl Tx {
        pub(crate) fn over_websocket(sink: SplitSink<Ws, Message>) -> Tx {
            Tx {
                to: To::WebSocket(sink),
                encoder: Encoder::new(),
            }
        }

        pub(crate) fn over_raw(wr: WriteHalf<DuplexStream>) -> Tx {
            Tx {
                to: To::Raw(wr),
                encoder: Encoder::new(),
            }
        }

        /// Sends a frame in three parts, as spdystream's framer writes
        /// them (one write per field group): over a WebSocket, one binary
        /// message each.
        pub(crate) async fn send(&mut self, frame: Frame) {
            let mut b = BytesMut::new();
            self.encoder.encode(&frame, &mut b).unwrap();
            let b = b.freeze();
            for part in [b.slice(..4), b.slice(4..8), b.slice(8..)] {
                if !part.is_empty() {
                    self.raw(&part).await;
                }
            }
        }

        pub(crate) async fn raw(&mut self, bytes: &[u8]) {
            match &mut self.to {
                To::WebSocket(sink) => sink
                    .send(Message::Binary(bytes::Bytes::copy_from_slice(bytes)))
                    .await
                    .unwrap(),
                To::Raw(wr) => wr.write_all(bytes).await.unwrap(),
            }
        }

        /// Closes the client's side (a raw connection's write half).
        pub(crate) async fn close(&mut self) {
            match &mut self.to {
                To::WebSocket(sink) => {
                    let _ = sink.close().await;
                }
                To::Raw(wr) => {
                    let _ = wr.shutdown().await;
                }
            }
        }
    }

    /// The client's receiving half.
    pub(crate) struct Rx {
        from: From,
        decoder: Decoder,
        /// How long to wait for a frame before failing the test.
        pub(crate) wait: Option<Duration>,
    }

    enum From {
        WebSocket(SplitStream<Ws>),
        Raw(ReadHalf<DuplexStream>),
    }

    impl Rx {
        pub(crate) fn over_websocket(stream: SplitStream<Ws>, wait: Option<Duration>) -> Rx {
            Rx {
                from: From::WebSocket(stream),
                decoder: Decoder::new(),
                wait,
            }
        }

        pub(crate) fn over_raw(rd: ReadHalf<DuplexStream>, wait: Option<Duration>) -> Rx {
            Rx {
                from: From::Raw(rd),
                decoder: Decoder::new(),
                wait,
            }
        }

        /// The next bytes; `None` once the connection closes.
        async fn bytes(&mut self) -> Option<Vec<u8>> {
            match &mut self.from {
                From::WebSocket(stream) => match stream.next().await {
                    Some(Ok(Message::Binary(b))) => Some(b.to_vec()),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => None,
                    Some(Ok(other)) => panic!("unexpected message {other:?}"),
                },
                From::Raw(rd) => {
                    let mut buf = vec![0; 16 * 1024];
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some(buf)
                        }
                    }
                }
            }
        }

        /// The next frame from the server; `None` once the connection closes.
        pub(crate) async fn frame(&mut self) -> Option<Frame> {
            loop {
                if let Some(f) = self.decoder.next_frame().unwrap() {
                    return Some(f);
                }
                let next = match self.wait {
                    Some(d) => tokio::time::timeout(d, self.bytes())
                        .await
                        .expect("no frame in time"),
                    None => self.bytes().await,
                };
                self.decoder.push(&next?);
            }
        }

        pub(crate) async fn reply(&mut self, stream_id: u32) {
            assert_eq!(
                self.frame().await,
                Some(Frame::SynReply {
                    stream_id,
                    fin: false,
                    headers: Headers::new()
                })
            );
        }

        /// Data frames until each of `ids` is FINed: the bytes of each.
        pub(crate) async fn until_fin(&mut self, ids: &[u32]) -> HashMap<u32, Vec<u8>> {
            let mut got: HashMap<u32, Vec<u8>> = ids.iter().map(|i| (*i, Vec::new())).collect();
            let mut open: HashSet<u32> = ids.iter().copied().collect();
            while !open.is_empty() {
                match self.frame().await.expect("session ended") {
                    Frame::Data {
                        stream_id,
                        fin,
                        data,
                    } => {
                        assert!(open.contains(&stream_id), "data on stream {stream_id}");
                        got.get_mut(&stream_id).unwrap().extend_from_slice(&data);
                        if fin {
                            open.remove(&stream_id);
                        }
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
            }
            got
        }
    }

    /// Waits (at most 5 s) for the server's session task to end.
    pub(crate) async fn ended(server: JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }

    /// The session's end as the client sees it: GOAWAY, then (once the
    /// client closes its side) the end of the connection and the session.
    pub(crate) async fn ends_with_goaway(
        mut tx: Tx,
        mut rx: Rx,
        server: JoinHandle<()>,
        last_good_stream_id: u32,
        status: u32,
    ) {
        assert_eq!(
            rx.frame().await,
            Some(Frame::GoAway {
                last_good_stream_id,
                status
            })
        );
        assert_eq!(rx.frame().await, None);
        tx.close().await;
        ended(server).await;
    }

    /// A raw connection's client halves and the server's end.
    pub(crate) fn raw_pair(wait: Option<Duration>) -> (Tx, Rx, DuplexStream) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (rd, wr) = tokio::io::split(client);
        (Tx::over_raw(wr), Rx::over_raw(rd, wait), server)
    }

    /// A SYN_STREAM with these headers.
    pub(crate) fn syn_stream(stream_id: u32, headers: Headers) -> Frame {
        Frame::SynStream {
            stream_id,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Frames written by spdystream's framer (Go, `spdy.NewFramer`), as
    /// kubectl writes them: error and data streams of request 0 for port
    /// 8080, FIN, data, PING, RST_STREAM, then one of every other type.
    const GO_FRAMES: &str = "800300010000003e0000000100000000000078f9e3c6a7c202253a48f95b044eea160616060c0c0c9c4590f8ca04a5634603704a2c294a4dcc851636aca9a0a800000000ffff0000000101000000800300010000001a00000003000000000000826a26a418543225a25b02000000ffff000000030000000568656c6c6f800300060000000400000001000000030100000080030003000000080000000300000005800300020000000e000000026260606000000000ffff800300080000001a0000000302290765860adddcd29c924c7091cc9004000000ffff800300040000000c000000010100000700010000800300090000000800000003000003e880030007000000080000000300000000";

    fn decode_all(chunks: &[&[u8]]) -> Result<Vec<Frame>, SpdyError> {
        let mut d = Decoder::new();
        let mut frames = Vec::new();
        for c in chunks {
            d.push(c);
            while let Some(f) = d.next_frame()? {
                frames.push(f);
            }
        }
        Ok(frames)
    }

    fn encode_all(e: &mut Encoder, frames: &[Frame]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for f in frames {
            e.encode(f, &mut out).unwrap();
        }
        out.to_vec()
    }

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        b << 16 | a
    }

    fn kubectl_headers(kind: &str) -> Headers {
        Headers::new()
            .with("streamtype", kind)
            .with("port", "8080")
            .with("requestid", "0")
    }

    #[test]
    fn dictionary_is_the_spdy3_one() {
        assert_eq!(HEADER_DICTIONARY.len(), 1423);
        assert_eq!(adler32(&HEADER_DICTIONARY), 0xe3c6_a7c2);
        assert!(HEADER_DICTIONARY.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(HEADER_DICTIONARY.ends_with(b"utf-,*,enq=0."));
    }

    #[test]
    fn frames_written_by_go_parse_in_any_chunking() {
        let wire = hex(GO_FRAMES);
        let frames = decode_all(&[&wire]).unwrap();
        assert_eq!(frames.len(), 12);
        for (i, (kind, id)) in [("error", 1), ("data", 3)].into_iter().enumerate() {
            let Frame::SynStream { headers, .. } = &frames[i * 2] else {
                panic!("{:?}", frames[i * 2]);
            };
            assert_eq!(frames[i * 2], testing::syn_stream(id, headers.clone()));
            assert_eq!(headers.len(), 3);
            assert_eq!(headers.get("streamtype"), Some(kind));
            assert_eq!(headers.get("port"), Some("8080"));
            assert_eq!(headers.get("requestid"), Some("0"));
        }
        let data = |stream_id, fin, data: &'static [u8]| Frame::Data {
            stream_id,
            fin,
            data: Bytes::from_static(data),
        };
        assert_eq!(frames[1], data(1, true, b""));
        assert_eq!(frames[3], data(3, false, b"hello"));
        assert_eq!(frames[4], Frame::Ping { id: 1 });
        assert_eq!(frames[5], data(3, true, b""));
        assert_eq!(
            frames[6],
            Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL
            }
        );
        assert_eq!(
            frames[7],
            Frame::SynReply {
                stream_id: 2,
                fin: false,
                headers: Headers::new()
            }
        );
        let Frame::Headers { headers, .. } = &frames[8] else {
            panic!("{:?}", frames[8]);
        };
        assert_eq!(headers.get("x-multi"), Some("a"));
        assert_eq!(headers.iter().next(), Some(("x-multi", "a\0b")));
        assert_eq!(
            frames[9],
            Frame::Settings {
                clear: false,
                settings: vec![Setting {
                    flags: 1,
                    id: 7,
                    value: 65536
                }]
            }
        );
        assert_eq!(
            frames[10],
            Frame::WindowUpdate {
                stream_id: 3,
                delta: 1000
            }
        );
        assert_eq!(
            frames[11],
            Frame::GoAway {
                last_good_stream_id: 3,
                status: goaway::OK
            }
        );
        // Any two-chunk split, and one byte at a time, give the same frames.
        for cut in 0..=wire.len() {
            assert_eq!(
                decode_all(&[&wire[..cut], &wire[cut..]]).unwrap(),
                frames,
                "{cut}"
            );
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&bytes).unwrap(), frames);
    }

    #[test]
    fn our_frames_round_trip_with_and_without_the_dictionary() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 7,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: kubectl_headers("error"),
            },
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: Headers::new(),
            },
            Frame::SynReply {
                stream_id: 3,
                fin: true,
                headers: Headers::new().with("X-Upper", "v"),
            },
            Frame::Data {
                stream_id: 3,
                fin: true,
                data: Bytes::from(vec![7u8; 70_000]),
            },
        ];
        for mut e in [Encoder::new(), Encoder::without_dictionary()] {
            let wire = encode_all(&mut e, &frames);
            let back = decode_all(&[&wire]).unwrap();
            assert_eq!(back, frames);
            assert_eq!(
                back[2],
                Frame::SynReply {
                    stream_id: 3,
                    fin: true,
                    headers: Headers::new().with("x-upper", "v")
                }
            );
        }
        // With the dictionary the zlib header says so (FDICT, dictionary id),
        // as Go's reader expects.
        let wire = encode_all(&mut Encoder::new(), &frames[1..2]);
        assert_eq!(&wire[12..18], &[0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2]);
    }

    #[test]
    fn limits_are_checked_before_the_payload_arrives() {
        let mut d = Decoder::new();
        d.push(&[0x80, 0x02, 0x00, 0x01, 0, 0, 0, 10]);
        assert_eq!(d.next_frame(), Err(SpdyError::UnsupportedVersion(2)));
        // Sticky: even good bytes are refused now.
        d.push(&hex(GO_FRAMES));
        assert!(d.next_frame().is_err());
        assert_eq!(d.buffered(), 0);

        let mut d = Decoder::new();
        d.push(&[0x80, 0x03, 0x00, 0x01, 0, 0x04, 0, 1]);
        assert!(matches!(
            d.next_frame(),
            Err(SpdyError::FrameTooLarge {
                kind: "control",
                ..
            })
        ));
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 1, 0, 0x10, 0, 1]);
        assert!(matches!(
            d.next_frame(),
            Err(SpdyError::FrameTooLarge { kind: "data", .. })
        ));
        // Within the limits, a partial frame just waits.
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 1, 0, 0x10, 0, 0]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&vec![1; 1 << 20]);
        assert!(matches!(d.next_frame(), Ok(Some(Frame::Data { .. }))));
    }

    /// A SYN_STREAM (id 1) whose header block is `raw`, compressed as Go
    /// does (dictionary, sync flush), or with another dictionary.
    fn syn_stream_with(raw: &[u8], dictionary: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::best(), true);
        c.set_dictionary(dictionary).unwrap();
        let mut block = Vec::with_capacity(raw.len() + 1024);
        c.compress_vec(raw, &mut block, FlushCompress::Sync)
            .unwrap();
        let mut out = BytesMut::new();
        control_head(&mut out, TYPE_SYN_STREAM, 0, 10 + block.len()).unwrap();
        out.put_u32(1);
        out.put_u32(0);
        out.put_u16(0);
        out.extend_from_slice(&block);
        out.to_vec()
    }

    fn raw_block(pairs: &[(&[u8], &[u8])], count: u32) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.put_u32(count);
        for (n, v) in pairs {
            raw.put_u32(n.len() as u32);
            raw.extend_from_slice(n);
            raw.put_u32(v.len() as u32);
            raw.extend_from_slice(v);
        }
        raw
    }

    #[test]
    fn hostile_header_blocks_are_errors() {
        let parse = |wire: Vec<u8>| decode_all(&[&wire]);
        let ok = raw_block(&[(b"port", b"80")], 1);
        assert!(parse(syn_stream_with(&ok, &HEADER_DICTIONARY)).is_ok());
        // Another dictionary.
        assert!(matches!(
            parse(syn_stream_with(&ok, b"not the spdy dictionary")),
            Err(SpdyError::Compression(_))
        ));
        let bad = |raw: Vec<u8>| {
            let r = parse(syn_stream_with(&raw, &HEADER_DICTIONARY));
            assert!(r.is_err(), "{r:?}");
        };
        bad(raw_block(&[(b"Port", b"80")], 1));
        bad(raw_block(&[(b"port", b"80"), (b"port", b"81")], 2));
        bad(raw_block(&[(b"", b"80")], 1));
        bad(raw_block(&[(b"port", b"80")], 2));
        bad(raw_block(&[(b"port", b"80")], 1_000_000));
        bad(raw_block(&[(b"port", b"80")], 0));
        bad(raw_block(&[], 0)[..2].to_vec());
        let many: Vec<(Vec<u8>, Vec<u8>)> = (0..=MAX_HEADERS)
            .map(|i| (format!("h{i}").into_bytes(), Vec::new()))
            .collect();
        let many: Vec<(&[u8], &[u8])> = many.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        bad(raw_block(&many, many.len() as u32));
        // A name length past the end of the block.
        let mut lying = raw_block(&[(b"port", b"80")], 1);
        lying[7] = 200;
        bad(lying);
        // A decompression bomb: 1 MiB of zeros compresses to ~1 KiB.
        let huge = vec![b'0'; 1 << 20];
        let bomb = syn_stream_with(&raw_block(&[(b"x", &huge)], 1), &HEADER_DICTIONARY);
        assert!(bomb.len() < 8 * 1024);
        assert_eq!(parse(bomb), Err(SpdyError::HeaderBlockTooLarge));
        // The same through our encoder.
        let big = Frame::SynReply {
            stream_id: 1,
            fin: false,
            headers: Headers::new().with("x", &"0".repeat(MAX_HEADER_BLOCK)),
        };
        let wire = encode_all(&mut Encoder::new(), &[big]);
        assert_eq!(parse(wire), Err(SpdyError::HeaderBlockTooLarge));
        // A header block cut short (well before its end: the last bytes are
        // the sync flush, an empty stored block, without which the block
        // still inflates whole), or not zlib at all.
        let wire = syn_stream_with(&ok, &HEADER_DICTIONARY);
        assert!(wire.ends_with(&[0, 0, 0xff, 0xff]));
        for cut in 18..wire.len() - 8 {
            let mut w = wire[..cut].to_vec();
            let len = (cut - 8) as u8;
            w[7] = len;
            assert!(parse(w).is_err(), "{cut}");
        }
        let mut garbage = wire.clone();
        for b in &mut garbage[18..] {
            *b = 0xa5;
        }
        assert!(parse(garbage).is_err());
    }

    #[test]
    fn malformed_control_frames_are_errors_and_unknown_types_skipped() {
        let frame = |kind: u16, flags: u8, payload: &[u8]| {
            let mut out = BytesMut::new();
            control_head(&mut out, kind, flags, payload.len()).unwrap();
            out.extend_from_slice(payload);
            out.to_vec()
        };
        for (kind, payload) in [
            (TYPE_RST_STREAM, &[0, 0, 0, 1, 0, 0, 0, 0][..]),
            (TYPE_RST_STREAM, &[0, 0, 0, 0, 0, 0, 0, 5][..]),
            (TYPE_RST_STREAM, &[0, 0, 0, 1, 0, 0, 0][..]),
            (TYPE_PING, &[0, 0, 0, 1, 0][..]),
            (TYPE_GOAWAY, &[0, 0, 0, 1][..]),
            (TYPE_WINDOW_UPDATE, &[0, 0, 0, 1, 0, 0, 0, 1, 0][..]),
            (TYPE_SETTINGS, &[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1][..]),
            (TYPE_SETTINGS, &[0xff, 0xff, 0xff, 0xff][..]),
            (TYPE_SETTINGS, &[][..]),
            (TYPE_SYN_STREAM, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]),
            (TYPE_SYN_STREAM, &[0, 0, 0, 1, 0, 0][..]),
            (TYPE_SYN_REPLY, &[0, 0, 0, 1][..]),
            (TYPE_HEADERS, &[][..]),
        ] {
            let r = decode_all(&[&frame(kind, 0, payload)]);
            assert!(r.is_err(), "type {kind} {payload:?}: {r:?}");
        }
        assert!(decode_all(&[&[0, 0, 0, 0, 0, 0, 0, 0]]).is_err());
        let mut wire = frame(10, 3, b"credential");
        wire.extend(frame(TYPE_PING, 0, &[0, 0, 0, 9]));
        assert_eq!(
            decode_all(&[&wire]).unwrap(),
            vec![Frame::Unknown { kind: 10, flags: 3 }, Frame::Ping { id: 9 }]
        );
    }

    #[test]
    fn encoder_refuses_what_it_cannot_write() {
        let mut e = Encoder::new();
        let mut out = BytesMut::new();
        for f in [
            Frame::Data {
                stream_id: 0,
                fin: false,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 1 << 31,
                status: 1,
            },
            Frame::Unknown { kind: 10, flags: 0 },
            Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::from(vec![0; MAX_LENGTH + 1]),
            },
        ] {
            assert!(e.encode(&f, &mut out).is_err());
            assert!(out.is_empty());
        }
    }

    fn headers() -> impl Strategy<Value = Headers> {
        prop::collection::btree_map("[a-z][a-z0-9-]{0,12}", "[ -~\0]{0,30}", 0..6).prop_map(|m| {
            m.into_iter()
                .fold(Headers::new(), |h, (n, v)| h.with(&n, &v))
        })
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let id = 1u32..(1 << 31);
        prop_oneof![
            (
                id.clone(),
                0u32..(1 << 31),
                0u8..8,
                any::<u8>(),
                any::<bool>(),
                any::<bool>(),
                headers()
            )
                .prop_map(
                    |(stream_id, associated_to, priority, slot, fin, unidirectional, headers)| {
                        Frame::SynStream {
                            stream_id,
                            associated_to,
                            priority,
                            slot,
                            fin,
                            unidirectional,
                            headers,
                        }
                    }
                ),
            (id.clone(), any::<bool>(), headers()).prop_map(|(stream_id, fin, headers)| {
                Frame::SynReply {
                    stream_id,
                    fin,
                    headers,
                }
            }),
            (id.clone(), any::<bool>(), headers()).prop_map(|(stream_id, fin, headers)| {
                Frame::Headers {
                    stream_id,
                    fin,
                    headers,
                }
            }),
            (id.clone(), 1u32..)
                .prop_map(|(stream_id, status)| Frame::RstStream { stream_id, status }),
            (
                any::<bool>(),
                prop::collection::vec((any::<u8>(), 0u32..(1 << 24), any::<u32>()), 0..4)
            )
                .prop_map(|(clear, s)| Frame::Settings {
                    clear,
                    settings: s
                        .into_iter()
                        .map(|(flags, id, value)| Setting { flags, id, value })
                        .collect(),
                }),
            any::<u32>().prop_map(|id| Frame::Ping { id }),
            (0u32..(1 << 31), any::<u32>()).prop_map(|(last_good_stream_id, status)| {
                Frame::GoAway {
                    last_good_stream_id,
                    status,
                }
            }),
            (0u32..(1 << 31), 0u32..(1 << 31))
                .prop_map(|(stream_id, delta)| Frame::WindowUpdate { stream_id, delta }),
            (
                id,
                any::<bool>(),
                prop::collection::vec(any::<u8>(), 0..3000)
            )
                .prop_map(|(stream_id, fin, data)| Frame::Data {
                    stream_id,
                    fin,
                    data: data.into()
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any frames, encoded on one connection and cut anywhere, parse back.
        #[test]
        fn frames_round_trip_in_any_chunking(
            frames in prop::collection::vec(frame(), 1..10),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            dictionary in any::<bool>(),
        ) {
            let mut e = if dictionary { Encoder::new() } else { Encoder::without_dictionary() };
            let wire = encode_all(&mut e, &frames);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            at.push(0);
            at.push(wire.len());
            at.sort_unstable();
            let chunks: Vec<&[u8]> = at.windows(2).map(|w| &wire[w[0]..w[1]]).collect();
            prop_assert_eq!(decode_all(&chunks).unwrap(), frames);
        }

        /// Random bytes are frames or an error, never a panic.
        #[test]
        fn random_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..4096),
            chunk in 1usize..64,
            control in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if control && bytes.len() >= 8 {
                // Make it a plausible SPDY/3 control frame more often.
                bytes[0] = 0x80;
                bytes[1] = 3;
                bytes[2] = 0;
                bytes[3] %= 10;
                bytes[5] = 0;
            }
            let chunks: Vec<&[u8]> = bytes.chunks(chunk).collect();
            let _ = decode_all(&chunks);
        }

        /// Valid traffic with bytes changed is frames or an error, never a panic.
        #[test]
        fn corrupted_frames_never_panic(
            frames in prop::collection::vec(frame(), 1..6),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut wire = encode_all(&mut Encoder::new(), &frames);
            for (i, b) in flips {
                let i = i.index(wire.len());
                wire[i] ^= b;
            }
            let _ = decode_all(&[&wire]);
        }
    }
}
