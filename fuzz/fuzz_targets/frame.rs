//! Sync frame decoder: never panics; a decoded frame round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = keel_sync::frame::decode_frame(data) {
        let again = keel_sync::frame::decode_frame(&keel_sync::frame::encode_frame(&f));
        assert_eq!(again.as_ref(), Ok(&f));
    }
});
