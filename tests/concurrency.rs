//! Many threads on one store, mostly under `SyncMode::Always`:
//! compare-and-set is atomic (DKV's concurrent create and counter tests), no
//! update is lost, readers see whole values only, group commit shares
//! `fdatasync`s between writers, and neither readers nor writers racing
//! `close` see anything but their result or `Error::Closed`.
//!
//! The small segments of `test_options` make these workloads cross segment
//! rollovers while threads read and write.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::disk::scratch_dir;
use common::*;
use dkv_cask::{Error, IterationOptions, KvStore, Options, Store, SyncMode};

fn always_options() -> Options {
    Options {
        sync_mode: SyncMode::Always,
        ..test_options()
    }
}

fn counter_value(bytes: &[u8]) -> i64 {
    i64::from_le_bytes(bytes.try_into().expect("an 8-byte counter"))
}

/// Adds `delta` to the 8-byte little-endian counter at `key` with a get +
/// compare-and-set loop, keeping the key's expiry `expire_ts`. Returns how
/// many attempts lost a race.
fn add_with_cas(store: &Store, key: &[u8], delta: i64, expire_ts: u64) -> u64 {
    let mut lost = 0;
    loop {
        let current = store.get(&[key]).expect("get counter");
        assert_eq!(current.len(), 1, "the counter must exist");
        let old = &current[0].value;
        let new = (counter_value(old) + delta).to_le_bytes();
        if store
            .compare_and_set(&cas(key, old, new, expire_ts))
            .expect("compare_and_set")
        {
            return lost;
        }
        lost += 1;
    }
}

/// Port of DKV `TestAtomicKeyCreation` (rocksdb RT:803-845, badger
/// BT:178-221, service `testAtomicKeyCreation`).
#[test]
fn exactly_one_of_ten_concurrent_creates_wins() {
    let t = temp_store(always_options());
    let start = Barrier::new(10);
    let results: Vec<(u8, bool)> = thread::scope(|s| {
        let handles: Vec<_> = (0..10u8)
            .map(|i| {
                let (store, start) = (&t.store, &start);
                s.spawn(move || {
                    start.wait();
                    let created = store.compare_and_set(&cas("casKey", "", [i], 0)).unwrap();
                    (i, created)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<u8> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert_eq!(value_of(&t.store, "casKey"), Some(vec![winners[0]]));
}

/// Port of DKV `TestAtomicIncrDecr` (RT:847-892, BT:223-268, service
/// `testAtomicIncrDecr`): even threads add one, odd threads subtract one,
/// each through get + compare-and-set retried until it succeeds.
#[test]
fn concurrent_increments_and_decrements_through_cas_cancel_out_exactly() {
    const THREADS: i64 = 10;
    const ROUNDS: usize = 100;
    let t = temp_store(always_options());
    t.store.put(&[pair("ctrKey", 0i64.to_le_bytes())]).unwrap();
    let start = Barrier::new(THREADS as usize);
    thread::scope(|s| {
        for i in 0..THREADS {
            let (store, start) = (&t.store, &start);
            s.spawn(move || {
                let delta = if i % 2 == 0 { 1 } else { -1 };
                start.wait();
                for _ in 0..ROUNDS {
                    add_with_cas(store, b"ctrKey", delta, 0);
                }
            });
        }
    });
    assert_eq!(
        value_of(&t.store, "ctrKey"),
        Some(0i64.to_le_bytes().to_vec())
    );
}

/// Port of DKV's service test `testAtomicIncrDecrWithTTL` (MT:225-272): the
/// counter has an expiry 5 minutes ahead and every CAS passes the same one.
#[test]
fn concurrent_cas_increments_on_a_key_with_expiry_are_exact_and_keep_the_expiry() {
    const THREADS: i64 = 10;
    const ROUNDS: usize = 50;
    let t = temp_store(always_options());
    let expire_ts = now() + 300;
    t.store
        .put(&[pair_ttl("ttlCtrKey", 0i64.to_le_bytes(), expire_ts)])
        .unwrap();
    thread::scope(|s| {
        for i in 0..THREADS {
            let store = &t.store;
            s.spawn(move || {
                let delta = if i % 2 == 0 { 1 } else { -1 };
                for _ in 0..ROUNDS {
                    add_with_cas(store, b"ttlCtrKey", delta, expire_ts);
                }
            });
        }
    });
    assert_eq!(
        t.store.get(&[b"ttlCtrKey"]).unwrap(),
        vec![pair_ttl("ttlCtrKey", 0i64.to_le_bytes(), expire_ts)]
    );
}

/// Eight threads share one counter and each also owns a counter and a
/// key: contended and uncontended CAS, puts and gets interleave, and not
/// one increment or write is lost.
#[test]
fn threads_mixing_shared_and_private_keys_lose_no_update() {
    const THREADS: usize = 8;
    const ROUNDS: u64 = 200;
    let t = temp_store(always_options());
    t.store.put(&[pair("shared", 0i64.to_le_bytes())]).unwrap();
    for i in 0..THREADS {
        t.store
            .put(&[pair(format!("own{i}"), 0i64.to_le_bytes())])
            .unwrap();
    }
    let retries = AtomicU64::new(0);
    let start = Barrier::new(THREADS);
    thread::scope(|s| {
        for i in 0..THREADS {
            let (store, start, retries) = (&t.store, &start, &retries);
            s.spawn(move || {
                let own = format!("own{i}");
                let mine = format!("mine{i}");
                start.wait();
                for round in 0..ROUNDS {
                    let lost = add_with_cas(store, b"shared", 1, 0);
                    retries.fetch_add(lost, Ordering::Relaxed);
                    // Nobody else touches `own{i}`: its CAS never loses.
                    assert_eq!(add_with_cas(store, own.as_bytes(), 1, 0), 0);
                    let value = format!("{i}:{round}");
                    store.put(&[pair(&mine, &value)]).unwrap();
                    assert_eq!(value_of(store, &mine), Some(value.into_bytes()));
                }
            });
        }
    });
    eprintln!(
        "shared counter: {} lost CAS races",
        retries.load(Ordering::Relaxed)
    );
    let shared = value_of(&t.store, "shared").unwrap();
    assert_eq!(counter_value(&shared), (THREADS as u64 * ROUNDS) as i64);
    for i in 0..THREADS {
        let own = value_of(&t.store, format!("own{i}")).unwrap();
        assert_eq!(counter_value(&own), ROUNDS as i64, "own{i}");
        assert_eq!(
            value_of(&t.store, format!("mine{i}")),
            Some(format!("{i}:{}", ROUNDS - 1).into_bytes())
        );
    }
}

/// A value that proves it is whole: `generation` as 8 little-endian bytes,
/// repeated a generation-dependent number of times.
fn versioned_value(generation: u64) -> Vec<u8> {
    let copies = 1 + (generation % 97) as usize * 5;
    generation.to_le_bytes().repeat(copies)
}

/// The generation of a value written by `versioned_value`, or a panic if
/// the value is torn.
fn generation_of(key: &[u8], value: &[u8]) -> u64 {
    assert!(
        !value.is_empty() && value.len().is_multiple_of(8),
        "torn value for {key:?}: {} bytes",
        value.len()
    );
    let generation = u64::from_le_bytes(value[..8].try_into().unwrap());
    assert_eq!(value, versioned_value(generation), "torn value for {key:?}");
    generation
}

/// Each key has one writer that bumps its generation; readers (get and
/// iterate) must see only whole values, never an error, and never a
/// generation older than one they already saw.
#[test]
fn readers_see_only_whole_old_or_new_values_while_writers_write() {
    const KEYS: usize = 4;
    const GENERATIONS: u64 = 400;
    let t = temp_store(always_options());
    let keys: Vec<Vec<u8>> = (0..KEYS).map(|i| format!("rw{i}").into_bytes()).collect();
    for key in &keys {
        t.store.put(&[pair(key, versioned_value(0))]).unwrap();
    }
    let writers_done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    thread::scope(|s| {
        let writers: Vec<_> = keys
            .iter()
            .map(|key| {
                let store = &t.store;
                s.spawn(move || {
                    for generation in 1..=GENERATIONS {
                        store
                            .put(&[pair(key, versioned_value(generation))])
                            .unwrap();
                    }
                })
            })
            .collect();
        for _ in 0..2 {
            let (store, keys, done, reads) = (&t.store, &keys, &writers_done, &reads);
            s.spawn(move || {
                let mut seen = vec![0u64; KEYS];
                let request: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let found = store.get(&request).expect("get while writing");
                    assert_eq!(found.len(), KEYS);
                    for (i, p) in found.iter().enumerate() {
                        let generation = generation_of(&p.key, &p.value);
                        assert!(generation >= seen[i], "key {i} went back in time");
                        seen[i] = generation;
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    if finished {
                        break;
                    }
                }
                assert_eq!(seen, vec![GENERATIONS; KEYS]);
            });
        }
        {
            let (store, done, reads) = (&t.store, &writers_done, &reads);
            s.spawn(move || {
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let mut count = 0;
                    for item in store.iter(&IterationOptions::new()).expect("iter") {
                        let p = item.expect("iteration item while writing");
                        generation_of(&p.key, &p.value);
                        count += 1;
                    }
                    assert_eq!(count, KEYS);
                    reads.fetch_add(1, Ordering::Relaxed);
                    if finished {
                        break;
                    }
                }
            });
        }
        for w in writers {
            w.join().unwrap();
        }
        writers_done.store(true, Ordering::Release);
    });
    assert!(reads.load(Ordering::Relaxed) >= 3);
}

/// Under `SyncMode::Always` a write returns only once durable, and
/// concurrent writers share syncs: with 16 threads x 50 puts, at least two
/// writes must have shared one `fdatasync`.
#[test]
fn group_commit_shares_syncs_between_concurrent_writers() {
    const THREADS: usize = 16;
    const PUTS: usize = 50;
    let t = temp_store(always_options());
    let start = Barrier::new(THREADS);
    thread::scope(|s| {
        for i in 0..THREADS {
            let (store, start) = (&t.store, &start);
            s.spawn(move || {
                start.wait();
                for j in 0..PUTS {
                    let written_before = store.last_change_number();
                    store
                        .put(&[pair(format!("gc{i:02}_{j:03}"), [b'v'; 64])])
                        .unwrap();
                    // Our record ends after `written_before` and is durable.
                    assert!(store.durable_change_number() > written_before);
                }
            });
        }
    });
    let writes = (THREADS * PUTS) as u64;
    let syncs = t.store.group_commit_syncs();
    eprintln!("group commit: {writes} writes, {syncs} syncs");
    assert!(syncs > 0);
    assert!(syncs < writes, "{syncs} syncs for {writes} writes");
    assert_eq!(
        t.store.durable_change_number(),
        t.store.last_change_number()
    );
    assert_eq!(all_pairs(&t.store).len(), THREADS * PUTS);
}

/// A read that overlaps `close` may return the key or fail with
/// `Error::Closed`, but must never take the closed store for an empty one.
/// (Regression: `get` and the iterator checked the closed flag and then
/// took the index lock, while `close` set the flag and then emptied the
/// index; a read in between returned no pairs and no error for a key that
/// exists. The flag is now checked again under the index lock.)
#[test]
fn reads_racing_close_return_the_key_or_closed_never_an_empty_result() {
    const ROUNDS: u32 = 100;
    const READERS: usize = 4;
    let mut empty = 0;
    for _ in 0..ROUNDS {
        let dir = scratch_dir();
        let store = Store::open(dir.path(), test_options()).expect("open");
        store.put(&[pair("k", "v")]).expect("put");
        let start = Barrier::new(READERS + 1);
        empty += thread::scope(|s| {
            let readers: Vec<_> = (0..READERS)
                .map(|r| {
                    let (store, start) = (&store, &start);
                    s.spawn(move || {
                        start.wait();
                        let mut empty = 0;
                        // Every read after `close` fails, so the loop ends.
                        loop {
                            let found = if r % 2 == 0 {
                                store.get(&[b"k"])
                            } else {
                                store
                                    .iter(&IterationOptions::new())
                                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                            };
                            match found {
                                Ok(pairs) if pairs.is_empty() => empty += 1,
                                Ok(pairs) => assert_eq!(pairs, vec![pair("k", "v")]),
                                Err(Error::Closed) => return empty,
                                Err(e) => panic!("read racing close: {e}"),
                            }
                        }
                    })
                })
                .collect();
            start.wait();
            thread::sleep(Duration::from_micros(100));
            store.close().expect("close");
            readers.into_iter().map(|r| r.join().unwrap()).sum::<u32>()
        });
    }
    assert_eq!(
        empty, 0,
        "in {ROUNDS} rounds, {empty} reads racing close found a present key missing"
    );
}

/// Writes of every kind from many threads, with segments so small that a
/// rollover happens every few groups, under both synced modes, then a
/// `close` racing the writers. Guards the write queue's hand-over of the
/// lead (a lost wake-up hangs a writer forever) and group commit across
/// rollovers: every acknowledged write survives a reopen, and nothing
/// unacknowledged appears there.
#[test]
fn writers_racing_rollovers_and_close_never_hang_and_every_acknowledged_write_survives_a_reopen() {
    const ROUNDS: u64 = 20;
    const THREADS: usize = 8;
    for round in 0..ROUNDS {
        let dir = scratch_dir();
        let opts = Options {
            sync_mode: if round % 2 == 0 {
                SyncMode::Always
            } else {
                SyncMode::Interval(Duration::from_millis(1))
            },
            segment_size: 4096,
            max_batch_bytes: 1024,
            ..Options::default()
        };
        let store = Arc::new(Store::open(dir.path(), opts.clone()).expect("open"));
        let start = Arc::new(Barrier::new(THREADS + 1));
        let done = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, start, done) =
                    (Arc::clone(&store), Arc::clone(&start), Arc::clone(&done));
                thread::spawn(move || {
                    // The last acknowledged state of each of this thread's
                    // keys: a value, or deleted.
                    let mut acked: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
                    start.wait();
                    for i in 0..400u64 {
                        let key = format!("t{t}-k{}", i % 7).into_bytes();
                        let value = format!("t{t}-v{i}-{}", "x".repeat((i % 50) as usize));
                        let value = value.into_bytes();
                        let written = match i % 5 {
                            0 => store.delete(&key).map(|()| Some(None)),
                            1 => {
                                let old = acked.get(&key).cloned().flatten().unwrap_or_default();
                                store
                                    .compare_and_set(&cas(&key, old, &value, 0))
                                    .map(|swapped| swapped.then(|| Some(value.clone())))
                            }
                            2 => {
                                if let Ok(it) = store.iter(&IterationOptions::new()) {
                                    for item in it {
                                        if item.is_err() {
                                            break;
                                        }
                                    }
                                }
                                continue;
                            }
                            _ => store
                                .put(&[pair(&key, &value)])
                                .map(|()| Some(Some(value.clone()))),
                        };
                        match written {
                            Ok(Some(state)) => {
                                acked.insert(key, state);
                            }
                            Ok(None) => {} // a failed CAS changes nothing
                            Err(Error::Closed) => break,
                            Err(e) => panic!("round {round}, thread {t}: {e}"),
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    acked
                })
            })
            .collect();
        start.wait();
        thread::sleep(Duration::from_millis(2 + round));
        store.close().expect("close");
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(Ordering::SeqCst) < THREADS as u64 {
            assert!(Instant::now() < deadline, "round {round}: a writer hangs");
            thread::sleep(Duration::from_millis(1));
        }
        let acked: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        drop(store);
        let store = Store::open(dir.path(), opts).expect("reopen");
        for (k, v) in acked.iter().flatten() {
            assert_eq!(
                value_of(&store, k).as_ref(),
                v.as_ref(),
                "round {round}: key {}",
                String::from_utf8_lossy(k)
            );
        }
        store.close().expect("close");
    }
}
