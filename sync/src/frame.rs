//! Sync frames: the internal form of `keel.v1.Frame` and its codec. Every
//! frame from a peer passes through [`decode_frame`], which checks size,
//! shape and (for segments) the hash chain before anything acts on it.

use bytes::Bytes;
use keel_log::wire::{
    WireError, cursor_from_proto, cursor_to_proto, segment_from_proto, segment_to_proto,
    snapshot_from_proto, snapshot_to_proto,
};
use keel_log::{Cursor, Segment, Snapshot};
use prost::Message;

/// Largest encoded frame accepted.
pub const MAX_FRAME_BYTES: usize = 32 << 20;

/// Why bytes from a peer are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("protobuf: {0}")]
    Decode(String),
    #[error("frame has no body")]
    Empty,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("field {0} is invalid")]
    Invalid(&'static str),
}

/// `Hello`: protocol version, node, and the sender's cursors for the
/// streams it receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub node: String,
    pub cursors: Vec<(String, Cursor)>,
    pub window_records: u32,
    pub window_bytes: u64,
}

/// Error codes carried by [`Frame::Error`].
pub use keel_proto::ErrorCode;

/// One sync frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Segment(Segment),
    Ack {
        stream: String,
        cursor: Cursor,
    },
    Snapshot {
        stream: String,
        snapshot: Snapshot,
        chunk: u32,
        last: bool,
    },
    Ping(u64),
    Pong(u64),
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Frame {
    /// Control frames (everything but segments and snapshots) must never
    /// wait behind bulk data.
    pub fn is_control(&self) -> bool {
        !matches!(self, Frame::Segment(_) | Frame::Snapshot { .. })
    }
}

/// Longest node name accepted (a DNS subdomain, as Kubernetes requires).
const MAX_NODE_NAME: usize = 253;

pub fn frame_to_proto(f: &Frame) -> keel_proto::Frame {
    use keel_proto::frame::Body;
    let body = match f {
        Frame::Hello(h) => Body::Hello(keel_proto::Hello {
            protocol_version: h.protocol_version,
            node: h.node.clone(),
            cursors: h
                .cursors
                .iter()
                .map(|(s, c)| cursor_to_proto(s, c))
                .collect(),
            window_records: h.window_records,
            window_bytes: h.window_bytes,
        }),
        Frame::Segment(s) => Body::Segment(segment_to_proto(s)),
        Frame::Ack { stream, cursor } => Body::Ack(keel_proto::Ack {
            cursor: Some(cursor_to_proto(stream, cursor)),
        }),
        Frame::Snapshot {
            stream,
            snapshot,
            chunk,
            last,
        } => Body::Snapshot(snapshot_to_proto(stream, snapshot, *chunk, *last)),
        Frame::Ping(n) => Body::Ping(keel_proto::Ping { nonce: *n }),
        Frame::Pong(n) => Body::Pong(keel_proto::Pong { nonce: *n }),
        Frame::Error { code, message } => Body::Error(keel_proto::Error {
            code: *code as i32,
            message: message.clone(),
        }),
    };
    keel_proto::Frame { body: Some(body) }
}

/// Checks and converts a protobuf frame.
pub fn frame_from_proto(p: keel_proto::Frame) -> Result<Frame, FrameError> {
    use keel_proto::frame::Body;
    Ok(match p.body.ok_or(FrameError::Empty)? {
        Body::Hello(h) => {
            if h.node.is_empty()
                || h.node.len() > MAX_NODE_NAME
                || h.node.chars().any(char::is_control)
            {
                return Err(FrameError::Invalid("hello.node"));
            }
            let cursors = h
                .cursors
                .iter()
                .map(cursor_from_proto)
                .collect::<Result<Vec<_>, _>>()?;
            Frame::Hello(Hello {
                protocol_version: h.protocol_version,
                node: h.node,
                cursors,
                window_records: h.window_records,
                window_bytes: h.window_bytes,
            })
        }
        Body::Segment(s) => Frame::Segment(segment_from_proto(s)?),
        Body::Ack(a) => {
            let (stream, cursor) =
                cursor_from_proto(a.cursor.as_ref().ok_or(FrameError::Invalid("ack.cursor"))?)?;
            Frame::Ack { stream, cursor }
        }
        Body::Snapshot(s) => {
            let (chunk, last) = (s.chunk, s.last);
            let (stream, snapshot) = snapshot_from_proto(s)?;
            Frame::Snapshot {
                stream,
                snapshot,
                chunk,
                last,
            }
        }
        Body::Ping(p) => Frame::Ping(p.nonce),
        Body::Pong(p) => Frame::Pong(p.nonce),
        Body::Error(e) => Frame::Error {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
        },
    })
}

/// Encodes a frame (without any length prefix; the transport frames it).
pub fn encode_frame(f: &Frame) -> Bytes {
    Bytes::from(frame_to_proto(f).encode_to_vec())
}

/// Decodes and checks a frame received from a peer.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let p = keel_proto::Frame::decode(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    frame_from_proto(p)
}
