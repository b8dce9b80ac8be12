//! Byte encodings shared by the state kept in host shared data: a reader of
//! little-endian fields, and the fingerprint that ties a state key to the
//! config block it was made under.
//!
//! Both are part of the stored format: a changed fingerprint moves every
//! state key (a config push would reset the breakers, budgets and rollouts
//! of a running fleet), so they are spelled out here, not taken from `std`.

use crate::sticky::mix;

/// FNV-1a's offset basis and prime (64-bit), for every FNV hash in the crate:
/// the sticky buckets, the host tables and `Fingerprint`.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub(crate) const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Little-endian fields off the front of a byte string; `None` when short.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(first)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.rest.split_first_chunk::<2>()?;
        self.rest = rest;
        Some(u16::from_le_bytes(*head))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.rest.split_first_chunk::<4>()?;
        self.rest = rest;
        Some(u32::from_le_bytes(*head))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.rest.split_first_chunk::<8>()?;
        self.rest = rest;
        Some(u64::from_le_bytes(*head))
    }

    pub(crate) fn u128(&mut self) -> Option<u128> {
        let (head, rest) = self.rest.split_first_chunk::<16>()?;
        self.rest = rest;
        Some(u128::from_le_bytes(*head))
    }
}

/// FNV-1a over fields, finished with SplitMix64: a digest that is the same
/// in every build, unlike std's hasher.
pub(crate) struct Fingerprint(u64);

impl Fingerprint {
    pub(crate) fn new() -> Self {
        Fingerprint(FNV_OFFSET)
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    /// A length-prefixed string, so that ("ab", "c") and ("a", "bc") differ.
    pub(crate) fn text(&mut self, text: &str) {
        self.u64(text.len() as u64);
        self.bytes(text.as_bytes());
    }

    pub(crate) fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    pub(crate) fn finish(&self) -> u64 {
        mix(self.0)
    }
}
