//! Helpers shared by the integration tests: stores in temporary folders,
//! pair builders, and a deterministic random generator that prints its seed.

#![allow(dead_code)]

pub mod disk;

use std::path::Path;

use dkv_cask::serverpb::KvPair;
use dkv_cask::{KvStore, Options, Store, SyncMode};

/// A store in a fresh temporary folder, kept alive with it.
pub struct TempStore {
    pub dir: tempfile::TempDir,
    pub store: Store,
}

/// Options for tests: small segments so rollover is exercised, no sync.
pub fn test_options() -> Options {
    Options {
        sync_mode: SyncMode::Never,
        segment_size: 64 << 10,
        preallocate: true,
        max_batch_bytes: 32 << 10,
        ..Options::default()
    }
}

/// [`test_options`] with small segments, nothing kept for followers and
/// no background merging (a test merges when it says so).
pub fn merge_test_options() -> Options {
    Options {
        segment_size: 16 << 10,
        retention: dkv_cask::Retention::none(),
        merge: dkv_cask::MergeOptions {
            automatic: false,
            ..dkv_cask::MergeOptions::default()
        },
        ..test_options()
    }
}

/// Opens a store with `options` in a new temporary folder.
pub fn temp_store(options: Options) -> TempStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), options).expect("open store");
    TempStore { dir, store }
}

/// Reopens the store at `path`.
pub fn reopen(path: &Path, options: Options) -> Store {
    Store::open(path, options).expect("reopen store")
}

/// A pair without expiry.
pub fn pair(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> KvPair {
    KvPair {
        key: key.as_ref().to_vec(),
        value: value.as_ref().to_vec(),
        expire_ts: 0,
    }
}

/// A pair expiring at `expire_ts`.
pub fn pair_ttl(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, expire_ts: u64) -> KvPair {
    KvPair {
        expire_ts,
        ..pair(key, value)
    }
}

/// The value of `key`, if live.
pub fn value_of(store: &impl KvStore, key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
    let mut found = store.get(&[key.as_ref()]).expect("get");
    assert!(found.len() <= 1);
    found.pop().map(|p| p.value)
}

/// A compare-and-set request.
pub fn cas(
    key: impl AsRef<[u8]>,
    old_value: impl AsRef<[u8]>,
    new_value: impl AsRef<[u8]>,
    expire_ts: u64,
) -> dkv_cask::serverpb::CompareAndSetRequest {
    dkv_cask::serverpb::CompareAndSetRequest {
        key: key.as_ref().to_vec(),
        old_value: old_value.as_ref().to_vec(),
        new_value: new_value.as_ref().to_vec(),
        expire_ts,
    }
}

/// Now in Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every live pair of the store, in iteration order.
pub fn all_pairs(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .iter(&dkv_cask::IterationOptions::new())
        .expect("iterate")
        .map(|p| {
            let p = p.expect("iteration item");
            (p.key, p.value)
        })
        .collect()
}

/// A seeded xorshift generator; `from_env` prints the seed so a failure can
/// be replayed with `DKV_TEST_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn from_env(test: &str) -> Self {
        let seed = std::env::var("DKV_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{test}: DKV_TEST_SEED={seed}");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// The handle that moves a manual clock: Unix seconds, set with
/// `handle.store(t, Ordering::Relaxed)`.
pub type ClockHandle = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// A manual clock starting at `now` Unix seconds, for deterministic expiry,
/// and the handle that moves it.
pub fn manual_clock(now: u64) -> (dkv_cask::Clock, ClockHandle) {
    let clock = dkv_cask::Clock::manual(now);
    let dkv_cask::Clock::Manual(seconds) = &clock else {
        unreachable!("Clock::manual builds a manual clock")
    };
    let handle = std::sync::Arc::clone(seconds);
    (clock, handle)
}

/// The ids of the store's sealed segments, in log order.
pub fn sealed_ids(store: &Store) -> Vec<dkv_cask::SegmentId> {
    store
        .stats()
        .expect("stats")
        .segments
        .into_iter()
        .filter(|s| !s.active)
        .map(|s| s.id)
        .collect()
}

/// The id of the store's active segment.
pub fn active_id(store: &Store) -> dkv_cask::SegmentId {
    store
        .stats()
        .expect("stats")
        .segments
        .into_iter()
        .find(|s| s.active)
        .expect("an active segment")
        .id
}
