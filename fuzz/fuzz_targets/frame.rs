//! Sync frame decoder (`keel_sync::frame::decode_frame`, which counts list
//! lengths on the wire before decoding): never panics; a decoded frame is
//! within the list caps and round-trips (`shared/frame_check.rs`).
#![no_main]
use libfuzzer_sys::fuzz_target;

mod check {
    include!("../shared/frame_check.rs");
}

fuzz_target!(|data: &[u8]| {
    check::check_frame(data);
});
