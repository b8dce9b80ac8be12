//! Process-wide state through the host's shared data, kept exact across
//! Envoy's workers with compare-and-swap.
//!
//! Envoy runs one VM per worker; a budget or breaker that lived in one VM
//! would be one per worker, and a proxy with eight workers would allow eight
//! times the retries. Shared data is the one store all VMs of a process see,
//! and its CAS makes a read-modify-write exact. The policy modules describe
//! their state as bytes and a pure update function; `update` runs the CAS
//! loop against any `SharedStore`, so the same code is exercised natively in
//! tests (with `MemoryStore`) and in Envoy (with the host's store).

use std::cell::RefCell;
use std::collections::HashMap;

/// A CAS write lost the race: someone else wrote the key in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasMismatch;

/// The host's shared key-value store.
pub trait SharedStore {
    /// The value and its CAS token; `None` when the key does not exist.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes the value if `cas` still matches (or unconditionally when
    /// `cas` is `None`).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch>;
}

/// How many times a lost CAS race is retried before giving up. Losing this
/// often means the store is hot; the caller then takes its conservative path.
pub const MAX_CAS_ATTEMPTS: usize = 16;

/// Reads, modifies and writes `key` atomically with respect to every VM of
/// the process. `modify` gets the current bytes (`None` when the key is new
/// or its bytes are unreadable) and returns the new bytes and a result; it
/// may run several times and must be pure. Returns `None` only when every
/// attempt lost the race.
pub fn update<T>(
    store: &impl SharedStore,
    key: &str,
    mut modify: impl FnMut(Option<&[u8]>) -> (Vec<u8>, T),
) -> Option<T> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let current = store.get(key);
        let (bytes, result) = modify(current.as_ref().map(|(bytes, _)| bytes.as_slice()));
        // A missing key has no token; Envoy then writes unconditionally, so a
        // racing creator is detected on the next write instead. The first
        // writer of a fresh key stores an empty state, which is harmless.
        let cas = current.map(|(_, cas)| cas);
        if store.set(key, &bytes, cas).is_ok() {
            return Some(result);
        }
    }
    None
}

/// An in-memory store with Envoy's CAS rules, for native tests and benches.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: RefCell<u32>,
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.entries.borrow().get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        let mut entries = self.entries.borrow_mut();
        if let (Some(expected), Some((_, current))) = (cas, entries.get(key)) {
            if expected != *current {
                return Err(CasMismatch);
            }
        }
        let mut next = self.next_cas.borrow_mut();
        *next = next.wrapping_add(1).max(1);
        entries.insert(key.to_string(), (value.to_vec(), *next));
        Ok(())
    }
}

/// Creates `key` with `initial` if it does not exist yet. Called when a
/// configuration is applied, so that every later `update` on the request
/// path has a CAS token to guard it. Racing creators write the same initial
/// bytes, so the race is harmless.
pub fn ensure(store: &impl SharedStore, key: &str, initial: &[u8]) {
    if store.get(key).is_none() {
        let _ = store.set(key, initial, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_cas_token_is_refused() {
        let store = MemoryStore::default();
        store.set("k", b"a", None).unwrap_or_default();
        let (_, token) = store.get("k").unwrap_or_default();
        assert_eq!(store.set("k", b"b", Some(token)), Ok(()));
        assert_eq!(store.set("k", b"c", Some(token)), Err(CasMismatch));
        assert_eq!(store.get("k").map(|(bytes, _)| bytes), Some(b"b".to_vec()));
    }

    #[test]
    fn update_retries_until_its_write_lands() {
        /// A store where another writer slips in before the first two writes.
        struct Contended {
            inner: MemoryStore,
            interference: RefCell<u32>,
        }
        impl SharedStore for Contended {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                let found = self.inner.get(key);
                let mut left = self.interference.borrow_mut();
                if *left > 0 {
                    *left -= 1;
                    let value = found
                        .as_ref()
                        .map_or(0, |(bytes, _)| bytes.first().copied().unwrap_or(0));
                    let _ = self.inner.set(key, &[value + 1], None);
                }
                found
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
                self.inner.set(key, value, cas)
            }
        }
        let store = Contended {
            inner: MemoryStore::default(),
            interference: RefCell::new(2),
        };
        ensure(&store.inner, "n", &[0]);
        let mut runs = 0;
        let result = update(&store, "n", |bytes| {
            runs += 1;
            let value = bytes.and_then(|b| b.first().copied()).unwrap_or(0);
            (vec![value + 10], value)
        });
        // Two interfering increments, then our +10 on top of them: nothing lost.
        assert_eq!(result, Some(2));
        assert_eq!(runs, 3);
        assert_eq!(store.inner.get("n").map(|(bytes, _)| bytes), Some(vec![12]));
    }
}
