// The frame target's check, shared word for word by the fuzz target
// (fuzz/fuzz_targets/frame.rs) and the corpus replay test
// (sync/tests/fuzz_corpus.rs), both of which `include!` it.
//
// Any bytes give a frame or an error, never a panic, and the same from
// both decoders (the general one and the receive path's); an error has a
// message; a decoded frame is within the list caps `decode_frame` counts
// on the wire before decoding, and round-trips through `encode_frame`.

use keel_sync::frame::{
    Frame, MAX_CHUNK_OBJECTS, MAX_HELLO_CURSORS, MAX_SEGMENT_RECORDS, decode_frame,
    decode_frame_shared, encode_frame,
};

/// Checks one input; whether it decoded.
pub fn check_frame(data: &[u8]) -> bool {
    let decoded = decode_frame(data);
    // The receive path's decoder (segments without prost where it can)
    // gives exactly what the general one gives, errors included.
    assert_eq!(decode_frame_shared(data.to_vec().into()), decoded);
    match decoded {
        Ok(f) => {
            match &f {
                Frame::Hello(h) => assert!(h.cursors.len() <= MAX_HELLO_CURSORS),
                Frame::Segment(s) => assert!(s.records.len() <= MAX_SEGMENT_RECORDS),
                Frame::Snapshot { snapshot, .. } => {
                    assert!(snapshot.objects.len() <= MAX_CHUNK_OBJECTS);
                }
                _ => {}
            }
            assert_eq!(decode_frame(&encode_frame(&f)).as_ref(), Ok(&f));
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}
