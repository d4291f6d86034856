//! Stored-record decoder: any bytes give a record or an error, never a
//! panic; a decoded record re-encodes to bytes that decode to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = keel_log::codec::decode_record(data) {
        let again = keel_log::codec::decode_record(&keel_log::codec::encode_record(&r));
        assert_eq!(again.as_ref(), Ok(&r));
    }
});
