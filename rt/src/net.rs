//! A free TCP port on loopback for a child process to listen on, chosen
//! below the kernel's ephemeral range: a port picked by binding port 0 is
//! an ephemeral one, and between releasing it and the child binding it,
//! any outgoing connection on the machine may take it (under a busy test
//! run, one does).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;

/// The ports tried: below Linux's default ephemeral range (32768–60999)
/// and above the well-known and most registered ones.
const RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A TCP port on 127.0.0.1 that nothing listens on now, outside the
/// ephemeral range; falls back to an ephemeral one if none is found.
pub fn free_port() -> std::io::Result<u16> {
    for _ in 0..200 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(0);
        let port = RANGE.start + (hasher.finish() % u64::from(RANGE.end - RANGE.start)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_is_outside_the_ephemeral_range_and_bindable() {
        let port = free_port().unwrap();
        assert!(RANGE.contains(&port), "{port}");
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
