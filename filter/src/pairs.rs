//! Reading the host's serialised header map in place.
//!
//! Envoy hands all request headers over in one buffer: a count, then a
//! (name length, value length) pair of little-endian `u32`s per header, then
//! each name and value followed by a NUL byte. Reading it costs one host call
//! per request instead of one per header (each of which is a second crossing
//! into the module's allocator), and no copy: lookups return slices of it.

/// The header pairs of `request_header_pairs`, read in place: a count, then
/// a (name length, value length) pair per header, then each name and value
/// followed by a NUL byte. A malformed buffer reads as no headers.
#[derive(Debug, Clone, Copy)]
pub struct HeaderPairs<'a> {
    buffer: &'a [u8],
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

impl<'a> HeaderPairs<'a> {
    pub fn new(buffer: &'a [u8]) -> Self {
        HeaderPairs { buffer }
    }

    /// The first value of `name` (lower-case), as Envoy's own lookup does.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter()
            .find(|(key, _)| *key == name.as_bytes())
            .map(|(_, value)| value)
    }

    /// Whether `name` is present at all.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let buffer = self.buffer;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (name, value) in pairs {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        }
        for (name, value) in pairs {
            out.extend_from_slice(name);
            out.push(0);
            out.extend_from_slice(value);
            out.push(0);
        }
        out
    }

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
