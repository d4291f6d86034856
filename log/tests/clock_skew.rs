//! A peer's clock cannot drag this store's hybrid logical clock into the
//! future: replicated timestamps move it at most `max_clock_skew_ms` ahead
//! of the wall clock, live and after a restart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use keel_log::{
    Clock, Entry, Hlc, PayloadKind, Read, ReadLimits, Role, Store, StoreOptions, SystemClock,
};

#[derive(Debug)]
struct Ahead(u64);

impl Clock for Ahead {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms() + self.0
    }
}

fn last_hlc(store: &Store, stream: &str) -> u64 {
    match store.read(stream, 0, ReadLimits::default()).unwrap() {
        Read::Records(s) => s.records.last().unwrap().hlc,
        Read::Snapshot { .. } => panic!("no compaction here"),
    }
}

#[test]
fn a_peer_far_ahead_does_not_pin_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let day = 24 * 3600 * 1000;
    let peer = Store::open(
        dir.path().join("peer"),
        StoreOptions {
            clock: Arc::new(Ahead(day)),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    peer.create_stream("n/up", Role::Writer, 1).unwrap();
    peer.append("n/up", vec![Entry::new("n", "k", PayloadKind::Event, "x")])
        .unwrap();
    let remote = match peer.read("n/up", 0, ReadLimits::default()).unwrap() {
        Read::Records(s) => s.records,
        Read::Snapshot { .. } => panic!("no compaction here"),
    };
    assert!(Hlc::physical_ms(remote[0].hlc) > SystemClock.now_ms() + day / 2);

    let path = dir.path().join("local");
    let skew = StoreOptions::default().max_clock_skew_ms;
    let bound = || SystemClock.now_ms() + skew + 1000;
    {
        let local = Store::open(&path, StoreOptions::default()).unwrap();
        local.create_stream("n/up", Role::Replica, 1).unwrap();
        local.create_stream("cluster", Role::Writer, 1).unwrap();
        local.append_replicated("n/up", remote).unwrap();
        local
            .append(
                "cluster",
                vec![Entry::new("c", "k", PayloadKind::Event, "y")],
            )
            .unwrap();
        let own = Hlc::physical_ms(last_hlc(&local, "cluster"));
        assert!(
            own <= bound(),
            "own record stamped {own}, beyond {}",
            bound()
        );
        // The replicated record keeps its own timestamp (its hash covers it).
        assert!(Hlc::physical_ms(last_hlc(&local, "n/up")) > SystemClock.now_ms() + day / 2);
    }
    // After a restart the clock is seeded from the log, bounded the same way.
    let local = Store::open(&path, StoreOptions::default()).unwrap();
    local
        .append(
            "cluster",
            vec![Entry::new("c", "k", PayloadKind::Event, "z")],
        )
        .unwrap();
    let own = Hlc::physical_ms(last_hlc(&local, "cluster"));
    assert!(
        own <= bound(),
        "after restart: stamped {own}, beyond {}",
        bound()
    );
}

#[test]
fn observe_bounded_clamps_only_the_future() {
    let mut h = Hlc::default();
    h.observe_bounded(u64::MAX, 1_000, 10);
    assert_eq!(Hlc::physical_ms(h.last()), 1_010);
    let mut h = Hlc::default();
    let near = 1_005 << Hlc::LOGICAL_BITS;
    h.observe_bounded(near, 1_000, 10);
    assert_eq!(h.last(), near);
}
