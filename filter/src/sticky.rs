//! Sticky buckets: a user key hashed to a bucket in `[0, 10_000)`.
//!
//! A request goes to canary when its bucket is below the weight in basis
//! points, so the same key always lands on the same side, and raising the
//! weight only moves users from stable to canary. The hash is salted with the
//! service name so that the canary cohorts of two services are independent.
//!
//! The function is part of the contract: every proxy of a fleet, whatever its
//! build, must put a user in the same bucket, so it is spelled out here (FNV-1a
//! over salt, a separator and the key, then the SplitMix64 finaliser to spread
//! FNV's weak low bits) rather than taken from `std`, whose hasher may change.

use crate::codec::{FNV_OFFSET, FNV_PRIME};

/// Number of buckets; one bucket is one basis point of traffic.
pub const BUCKETS: u64 = 10_000;

/// The bucket of `key` for the service salted by `salt`.
pub fn bucket(salt: &[u8], key: &[u8]) -> u16 {
    let mut hash = FNV_OFFSET;
    for &byte in salt.iter().chain(&[0xff]).chain(key) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    // BUCKETS fits a u16, so the remainder does too.
    (mix(hash) % BUCKETS) as u16
}

/// A uniformly random bucket from a random word, for requests without a key.
pub fn random_bucket(random: u64) -> u16 {
    (mix(random) % BUCKETS) as u16
}

/// SplitMix64's finaliser: every input bit affects every output bit.
pub fn mix(mut value: u64) -> u64 {
    value ^= value >> 30;
    value = value.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value ^= value >> 27;
    value = value.wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// A small, fast generator for per-request randomness (xorshift64*); seeded
/// once per VM, it costs no host call per request.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at zero.
        Rng(mix(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_function_is_stable_across_builds() {
        // Changing these values reshuffles every user of every fleet.
        assert_eq!(bucket(b"shop", b"user-1"), bucket(b"shop", b"user-1"));
        let pinned: Vec<u16> = ["alice", "bob", "carol", ""]
            .iter()
            .map(|key| bucket(b"shop", key.as_bytes()))
            .collect();
        assert_eq!(pinned, PINNED);
    }

    const PINNED: [u16; 4] = [6746, 6742, 6788, 4632];

    #[test]
    fn buckets_are_uniform() {
        let mut counts = [0u32; 10];
        for user in 0..100_000 {
            let b = bucket(b"shop", format!("user-{user}").as_bytes());
            assert!(u64::from(b) < BUCKETS);
            counts[usize::from(b / 1000)] += 1;
        }
        for count in counts {
            assert!((9_500..=10_500).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn the_salt_separates_services() {
        let same = (0..10_000)
            .filter(|user| {
                let key = format!("user-{user}");
                (bucket(b"shop", key.as_bytes()) < 1000) == (bucket(b"cart", key.as_bytes()) < 1000)
            })
            .count();
        // Independent 10 % cohorts agree on about 82 % of users; identical ones on all.
        assert!(same < 8_600, "{same}");
    }

    #[test]
    fn random_buckets_are_uniform() {
        let mut rng = Rng::new(7);
        let below = (0..100_000)
            .filter(|_| random_bucket(rng.next_u64()) < 2_500)
            .count();
        assert!((24_000..=26_000).contains(&below), "{below}");
    }
}
