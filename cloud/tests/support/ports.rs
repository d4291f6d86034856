//! Loopback ports for the peers a test starts, shared by every test that
//! starts processes.
//!
//! A port is picked below the kernel's ephemeral range
//! (`net.ipv4.ip_local_port_range`). A port the kernel hands out for
//! `bind(0)` lies inside that range, so between the pick and the peer's own
//! bind, an outgoing connection of a test running in parallel (kubectl, a
//! node, a client) could take it, and the peer would exit with "address in
//! use". Below the range only listeners live. One process never hands out
//! the same port twice, and each process starts at its own offset, so tests
//! and test binaries running at once do not pick the same ports.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port a test uses.
const LOW: u32 = 10_000;

/// The first port of the kernel's ephemeral range (32768 if unknown).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&p: &u32| p > LOW + 1_000 && p <= u32::from(u16::MAX))
        .unwrap_or(32_768)
}

fn bindable(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

fn pick() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = ephemeral_low() - LOW;
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + offset.wrapping_add(n) % span;
        let port = u16::try_from(port).expect("ports are below 65536");
        if bindable(port) {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range");
}

/// A loopback port that is free for TCP.
pub fn free_port() -> u16 {
    pick()
}

/// A loopback port that is free for UDP (QUIC).
pub fn free_udp_port() -> u16 {
    pick()
}
