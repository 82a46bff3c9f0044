//! Per-key linearizability: eight threads put, delete, compare-and-set and
//! get overlapping keys and compare-and-set increment a counter (while
//! another thread takes backups, restores and reads the first 16 of each
//! round, and merges),
//! recording when each call started and returned; every key's history,
//! each backup a read of every key during its call, must have an order,
//! consistent with real time, in which a register would give the same
//! answers (Wing and Gong's search, memoised), and the counter must hold
//! the number of increments that swapped.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use common::*;
use dkv_cask::{Backupable, KvStore, Options, Store, SyncMode};

#[derive(Clone, Debug)]
enum Call {
    /// Set the value (`None`: delete).
    Write(Option<u32>),
    /// Read, and what it returned.
    Read(Option<u32>),
    /// Compare-and-set from `old` (`None`: create) to `new`, and whether it
    /// swapped.
    Cas(Option<u32>, u32, bool),
}

#[derive(Clone, Debug)]
struct Event {
    key: u8,
    call: Call,
    start: Instant,
    end: Instant,
}

/// Applies `call` to a register holding `state`; `None` when the answer the
/// call got is impossible from that state.
fn step(state: Option<u32>, call: &Call) -> Option<Option<u32>> {
    match *call {
        Call::Write(v) => Some(v),
        Call::Read(seen) => (seen == state).then_some(state),
        Call::Cas(old, new, swapped) => {
            let holds = match old {
                None => state.is_none(),
                Some(o) => state == Some(o),
            };
            match (holds, swapped) {
                (true, true) => Some(Some(new)),
                (false, false) => Some(state),
                _ => None,
            }
        }
    }
}

/// Whether the events (one key's, at most 128) have a legal linear order.
fn linearizable(events: &[Event]) -> bool {
    assert!(events.len() <= 128);
    let mut seen: HashSet<(u128, Option<u32>)> = HashSet::new();
    fn search(
        events: &[Event],
        done: u128,
        state: Option<u32>,
        seen: &mut HashSet<(u128, Option<u32>)>,
    ) -> bool {
        if done.count_ones() as usize == events.len() {
            return true;
        }
        if !seen.insert((done, state)) {
            return false;
        }
        // Only a call that started before every pending call ended may go
        // next.
        let earliest_end = events
            .iter()
            .enumerate()
            .filter(|(i, _)| done & (1 << i) == 0)
            .map(|(_, e)| e.end)
            .min()
            .expect("a pending call");
        for (i, e) in events.iter().enumerate() {
            if done & (1 << i) != 0 || e.start > earliest_end {
                continue;
            }
            if let Some(next) = step(state, &e.call)
                && search(events, done | (1 << i), next, seen)
            {
                return true;
            }
        }
        false
    }
    search(events, 0, None, &mut seen)
}

fn decode(v: &[u8]) -> u32 {
    u32::from_le_bytes(v.try_into().expect("4-byte values"))
}

/// The value of key `k` in `store`.
fn read(store: &Store, k: &[u8]) -> Option<u32> {
    value_of(store, k).map(|v| decode(&v))
}

/// A timed compare-and-set of key `key` from `old` (`None`: create) to
/// `new`.
fn compare_and_set(store: &Store, key: u8, old: Option<u32>, new: u32) -> Event {
    let start = Instant::now();
    let swapped = store
        .compare_and_set(&cas(
            [b'k', key],
            old.map(|o| o.to_le_bytes().to_vec()).unwrap_or_default(),
            new.to_le_bytes(),
            0,
        ))
        .unwrap();
    Event {
        key,
        call: Call::Cas(old, new, swapped),
        start,
        end: Instant::now(),
    }
}

/// Backups restored and read per round, at most: each adds a read to every
/// key's history.
const BACKUPS_READ: usize = 16;

#[test]
fn every_keys_history_is_linearizable_under_concurrent_writers_backups_and_merges() {
    let mut rng = Rng::from_env("linearizability");
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            sync_mode: if round % 2 == 0 {
                SyncMode::Always
            } else {
                SyncMode::Never
            },
            segment_size: 8 << 10,
            retention: dkv_cask::Retention::none(),
            ..test_options()
        };
        let store = Arc::new(Store::open(dir.path().join("db"), options.clone()).unwrap());
        let threads = 8u32;
        let per_thread = 30u32;
        // Keys `0..keys` take puts, deletes, gets and compare-and-sets; key
        // `counter` only compare-and-set increments.
        let keys = 4u8;
        let counter = keys;
        let barrier = Arc::new(Barrier::new(threads as usize + 1));
        let seed = rng.next_u64();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed ^ (u64::from(t + 1) * 0x9E37_79B9));
                    barrier.wait();
                    let mut events = Vec::new();
                    let mut increments = 0u32;
                    for i in 0..per_thread {
                        let key = rng.below(u64::from(keys)) as u8;
                        let k = [b'k', key];
                        let unique = t * 1000 + i + 1;
                        let start = Instant::now();
                        let call = match rng.below(12) {
                            0..=2 => {
                                store.put(&[pair(k, unique.to_le_bytes())]).unwrap();
                                Call::Write(Some(unique))
                            }
                            3 => {
                                store.delete(&k).unwrap();
                                Call::Write(None)
                            }
                            4..=6 => Call::Read(read(&store, &k)),
                            7..=9 => {
                                // Expect what a read just saw (or absence).
                                let seen = read(&store, &k);
                                let old = if rng.below(4) == 0 { None } else { seen };
                                events.push(compare_and_set(&store, key, old, unique));
                                continue;
                            }
                            _ => {
                                // An increment: read, then swap in one more.
                                let seen = read(&store, &[b'k', counter]);
                                let event = compare_and_set(
                                    &store,
                                    counter,
                                    seen,
                                    seen.map_or(1, |v| v + 1),
                                );
                                increments +=
                                    u32::from(matches!(event.call, Call::Cas(_, _, true)));
                                events.push(event);
                                continue;
                            }
                        };
                        events.push(Event {
                            key,
                            call,
                            start,
                            end: Instant::now(),
                        });
                    }
                    (events, increments)
                })
            })
            .collect();
        // Backups and merges (of everything sealed, the active segment
        // sealed first) run beside the writers until they finish. A
        // backup is a read of every key at some moment during its call:
        // restored, what it holds joins each key's history as such a read.
        barrier.wait();
        let mut b = 0;
        let mut backup_reads = Vec::new();
        while b < 2 || !handles.iter().all(|h| h.is_finished()) {
            let backup = dir.path().join(format!("backup-{}", b % 2));
            let start = Instant::now();
            store.backup_to(&backup).unwrap();
            let end = Instant::now();
            if b < BACKUPS_READ {
                let target = tempfile::tempdir().unwrap();
                let empty = Store::open(target.path().join("db"), options.clone()).unwrap();
                let restored = empty.restore_from(&backup).unwrap();
                for key in 0..=counter {
                    backup_reads.push(Event {
                        key,
                        call: Call::Read(read(&restored, &[b'k', key])),
                        start,
                        end,
                    });
                }
                restored.close().unwrap();
            }
            store.merge().unwrap();
            b += 1;
        }
        // Merged by these calls or by the background merger.
        let stats = store.stats().unwrap();
        assert!(
            stats
                .segments
                .iter()
                .any(|s| s.kind == dkv_cask::format::SegmentKind::Merged),
            "round {round}: nothing was merged"
        );
        let (mut events, mut increments) = (backup_reads, 0);
        for h in handles {
            let (mine, n) = h.join().unwrap();
            events.extend(mine);
            increments += n;
        }
        // No increment lost, none counted twice.
        let total = read(&store, &[b'k', counter]).unwrap_or(0);
        assert_eq!(total, increments, "round {round}: the counter");
        for key in 0..=counter {
            let mine: Vec<Event> = events.iter().filter(|e| e.key == key).cloned().collect();
            assert!(
                linearizable(&mine),
                "round {round}, key {key}: no legal order for {} calls: {mine:#?}",
                mine.len()
            );
        }
    }
}

#[test]
fn the_checker_rejects_a_history_no_register_could_give() {
    let t0 = Instant::now();
    let later = |n: u64| t0 + std::time::Duration::from_millis(n);
    // Write 1 finished before a read started, yet the read saw nothing.
    let stale = vec![
        Event {
            key: 0,
            call: Call::Write(Some(1)),
            start: later(0),
            end: later(1),
        },
        Event {
            key: 0,
            call: Call::Read(None),
            start: later(2),
            end: later(3),
        },
    ];
    assert!(!linearizable(&stale));
    // Overlapping, the same read is fine.
    let overlapping = vec![
        Event {
            key: 0,
            call: Call::Write(Some(1)),
            start: later(0),
            end: later(5),
        },
        Event {
            key: 0,
            call: Call::Read(None),
            start: later(2),
            end: later(3),
        },
    ];
    assert!(linearizable(&overlapping));
    // Two creates that both swapped: impossible.
    let double_create = vec![
        Event {
            key: 0,
            call: Call::Cas(None, 1, true),
            start: later(0),
            end: later(5),
        },
        Event {
            key: 0,
            call: Call::Cas(None, 2, true),
            start: later(0),
            end: later(5),
        },
    ];
    assert!(!linearizable(&double_create));
}
