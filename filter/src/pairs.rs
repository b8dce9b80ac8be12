//! Reading the host's serialised header map in place.
//!
//! Envoy hands all request headers over in one buffer: a count, then a
//! (name length, value length) pair of little-endian `u32`s per header, then
//! each name and value followed by a NUL byte. Reading it costs one host call
//! per request instead of one per header (each of which is a second crossing
//! into the module's allocator), and no copy: lookups return slices of it.

/// How many headers are indexed when the pairs are read; a request with
/// more (rare: Envoy's own requests carry a dozen or two) has the rest looked
/// up in the buffer.
const INDEXED: usize = 48;

/// The header pairs of `request_header_pairs`, read in place: a count, then
/// a (name length, value length) pair per header, then each name and value
/// followed by a NUL byte. A malformed buffer reads as no headers, or as the
/// headers before the fault.
///
/// The buffer is walked once, into an index of name and value slices on the
/// stack: a request asks for a dozen headers (the service match, the rules,
/// the sticky key, the deadline, the headers the filter owns), and reading
/// the sizes again for each was most of the lookup's cost. A lookup compares
/// lengths before bytes.
#[derive(Debug, Clone)]
pub struct HeaderPairs<'a> {
    buffer: &'a [u8],
    index: [(&'a [u8], &'a [u8]); INDEXED],
    indexed: usize,
    /// The buffer holds more headers than the index.
    overflow: bool,
    /// Bit `n` is set when an indexed name is `n` bytes long (bit 63: 63
    /// or more). Most lookups are for headers a request does not carry (the
    /// nine `x-envoy-*` headers Sluice owns, the steering header, the
    /// deadline headers), and most of those have a length no header of the
    /// request has: they are answered without a scan. With it, the 18
    /// lookups of a realistic request cost 1,004 instructions instead of
    /// 1,663 (callgrind, native).
    lengths: u64,
}

/// A name length's bit in `HeaderPairs::lengths`.
fn length_bit(len: usize) -> u64 {
    1u64 << len.min(63)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

fn pairs_in(buffer: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let count = read_u32(buffer, 0).unwrap_or(0);
    // Each header takes at least 8 bytes of sizes and 2 NULs.
    let count = count.min(buffer.len() / 10);
    let mut data = 4usize.saturating_add(count.saturating_mul(8));
    (0..count).map_while(move |index| {
        let sizes = 4 + index * 8;
        let name_len = read_u32(buffer, sizes)?;
        let value_len = read_u32(buffer, sizes + 4)?;
        let name = buffer.get(data..data.checked_add(name_len)?)?;
        data = data.checked_add(name_len)?.checked_add(1)?;
        let value = buffer.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len)?.checked_add(1)?;
        Some((name, value))
    })
}

/// Names of the same length mostly differ in their first byte (`cookie` and
/// `accept`, `:authority` and `user-agent`): checking it first spares the
/// `memcmp` call a slice comparison is in wasm.
fn same_name(key: &[u8], name: &[u8]) -> bool {
    key.len() == name.len() && key.first() == name.first() && key == name
}

impl<'a> HeaderPairs<'a> {
    pub fn new(buffer: &'a [u8]) -> Self {
        let mut pairs = HeaderPairs {
            buffer,
            index: [(&[], &[]); INDEXED],
            indexed: 0,
            overflow: false,
            lengths: 0,
        };
        let mut all = pairs_in(buffer);
        for (slot, pair) in pairs.index.iter_mut().zip(all.by_ref()) {
            *slot = pair;
            pairs.indexed += 1;
            pairs.lengths |= length_bit(pair.0.len());
        }
        pairs.overflow = pairs.indexed == INDEXED && all.next().is_some();
        pairs
    }

    /// The first value of `name` (lower-case), as Envoy's own lookup does.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        let name = name.as_bytes();
        if self.lengths & length_bit(name.len()) == 0 && !self.overflow {
            return None;
        }
        let indexed = self.index.get(..self.indexed).unwrap_or_default();
        if let Some((_, value)) = indexed.iter().find(|(key, _)| same_name(key, name)) {
            return Some(value);
        }
        if !self.overflow {
            return None;
        }
        pairs_in(self.buffer)
            .skip(INDEXED)
            .find(|(key, _)| same_name(key, name))
            .map(|(_, value)| value)
    }

    /// The value of `name` when it appears exactly once; `None` when it is
    /// absent or repeated (a repeated header the proxy would have written
    /// once is not the proxy's).
    pub fn only(&self, name: &str) -> Option<&'a [u8]> {
        let key = name.as_bytes();
        let mut values = self
            .iter()
            .filter(|(known, _)| same_name(known, key))
            .map(|(_, value)| value);
        let first = values.next()?;
        values.next().is_none().then_some(first)
    }

    /// Whether `name` is present at all.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        pairs_in(self.buffer)
    }
}

/// The ABI's header map encoding: the count, each pair's two lengths, then
/// each name and value followed by a NUL byte; every number a LE `u32`.
pub fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let text: usize = pairs
        .iter()
        .map(|(name, value)| name.len() + value.len() + 2)
        .sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + text);
    let length = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&length(pairs.len()));
    for (name, value) in pairs {
        out.extend_from_slice(&length(name.len()));
        out.extend_from_slice(&length(value.len()));
    }
    for (name, value) in pairs {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_pair_and_the_first_value_of_a_repeated_header() {
        let buffer = serialize(&[
            (b":authority", b"shop.local"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"x-empty", b""),
            (b"x-bin", &[0xff, 0x00, 0x80]),
        ]);
        let pairs = HeaderPairs::new(&buffer);
        assert_eq!(pairs.iter().count(), 5);
        assert_eq!(pairs.get(":authority"), Some(&b"shop.local"[..]));
        assert_eq!(pairs.get("cookie"), Some(&b"a=1"[..]));
        assert_eq!(pairs.get("x-empty"), Some(&b""[..]));
        assert_eq!(pairs.get("x-bin"), Some(&[0xff, 0x00, 0x80][..]));
        assert!(pairs.contains("x-empty"));
        assert!(!pairs.contains("x-missing"));
        assert_eq!(pairs.only(":authority"), Some(&b"shop.local"[..]));
        assert_eq!(pairs.only("cookie"), None, "repeated");
        assert_eq!(pairs.only("x-missing"), None);
    }

    #[test]
    fn headers_beyond_the_index_are_found_and_first_values_win() {
        let names: Vec<String> = (0..INDEXED + 10).map(|n| format!("x-h{n}")).collect();
        let mut pairs: Vec<(&[u8], &[u8])> = names
            .iter()
            .map(|name| (name.as_bytes(), name.as_bytes()))
            .collect();
        // A repeated header: its first copy inside the index, the second past it.
        pairs.push((b"x-h3", b"late"));
        pairs.push((b"x-last", b"found"));
        let buffer = serialize(&pairs);
        let read = HeaderPairs::new(&buffer);
        assert_eq!(read.iter().count(), INDEXED + 12);
        assert_eq!(read.get("x-h0"), Some(&b"x-h0"[..]));
        assert_eq!(read.get("x-h3"), Some(&b"x-h3"[..]));
        let past = format!("x-h{}", INDEXED + 5);
        assert_eq!(read.get(&past), Some(past.as_bytes()));
        assert_eq!(read.get("x-last"), Some(&b"found"[..]));
        assert_eq!(read.get("x-missing"), None);
    }

    #[test]
    fn lookups_agree_with_a_scan_of_every_pair_whatever_the_name_lengths() {
        // Names of every length up to past the last length bit (63 and more
        // share it), each present or absent.
        let names: Vec<Vec<u8>> = (0..=100usize)
            .map(|len| (0..len).map(|i| b'a' + (i % 26) as u8).collect())
            .collect();
        for (seed, stride) in [(0usize, 3usize), (1, 5), (2, 7), (61, 1)] {
            let present: Vec<(&[u8], &[u8])> = names
                .iter()
                .skip(seed)
                .step_by(stride)
                .map(|name| (name.as_slice(), &b"v"[..]))
                .collect();
            let buffer = serialize(&present);
            let pairs = HeaderPairs::new(&buffer);
            for name in &names {
                let Ok(text) = std::str::from_utf8(name) else {
                    continue;
                };
                let scanned = pairs
                    .iter()
                    .find(|(key, _)| *key == name.as_slice())
                    .map(|(_, value)| value);
                assert_eq!(pairs.get(text), scanned, "length {}", name.len());
            }
        }
    }

    #[test]
    fn malformed_buffers_read_as_fewer_or_no_headers() {
        let good = serialize(&[(b"a", b"1"), (b"b", b"2")]);
        for cut in 0..good.len() {
            let pairs = HeaderPairs::new(&good[..cut]);
            assert!(pairs.iter().count() <= 2);
        }
        // A count far larger than the buffer.
        let mut lying = good.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderPairs::new(&lying).iter().count() <= 2);
        // Lengths that overflow.
        let mut huge = good;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderPairs::new(&huge).get("b"), None);
        assert_eq!(HeaderPairs::new(&[]).iter().count(), 0);
    }
}
