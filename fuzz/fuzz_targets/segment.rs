//! Segment decoder (protobuf + chain verification): never panics; a
//! decoded segment round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = keel_log::wire::decode_segment(data) {
        let again = keel_log::wire::decode_segment(&keel_log::wire::encode_segment(&s));
        assert_eq!(again.as_ref(), Ok(&s));
    }
});
