//! The link state machine (`keel_sync::link::Link`, either side) driven by
//! arbitrary frames from the peer, interleaved with persistence, timeouts
//! and polling, against a real store: never panics, and the invariants in
//! `shared/link_driver.rs` hold for every input.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
mod driver {
    include!("../shared/link_driver.rs");
}

/// The fixture store, made once per process in a fresh directory under
/// the temporary directory (the `./dev test` fuzz step points that into
/// `fuzz/target` and removes it afterwards).
fn fixture() -> &'static driver::Fixture {
    static FX: OnceLock<driver::Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keel-fuzz-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the fixture directory");
        driver::Fixture::create(&dir)
    })
}

fuzz_target!(|data: &[u8]| {
    driver::drive(fixture(), data);
});
