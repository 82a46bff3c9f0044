//! Model-based property test: random sequences of puts, batch puts,
//! deletes, compare-and-sets, gets, iterations, clock moves, merges (all,
//! or a chosen run of adjacent segments, or all and then a reopen, with
//! background merging at random thresholds) and close-and-reopen, checked
//! step by step against a `BTreeMap`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use common::*;
use dkv_cask::serverpb::{CompareAndSetRequest, KvPair};
use dkv_cask::{Clock, IterationOptions, KvStore, MergeOptions, Options, Retention, Store};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Put(Vec<u8>, Vec<u8>, u64),
    Batch(Vec<(Vec<u8>, Vec<u8>, u64)>),
    Delete(Vec<u8>),
    Cas(Vec<u8>, Vec<u8>, Vec<u8>, u64),
    Get(Vec<Vec<u8>>),
    Iterate(Vec<u8>, Vec<u8>),
    AdvanceClock(u64),
    Reopen,
    Merge,
    /// Merges `len` adjacent sealed segments starting at the `at`-th.
    MergeRun(usize, usize),
    MergeAndReopen,
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'c']), 1..4)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(any::<u8>(), 200..900),
    ]
}

/// Expiry relative to the model's start time: never, past, or near future.
fn expiry() -> impl Strategy<Value = u64> {
    prop_oneof![3 => Just(0u64), 1 => START - 5..START + 20]
}

const START: u64 = 1_000_000;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (key(), value(), expiry()).prop_map(|(k, v, e)| Op::Put(k, v, e)),
        2 => prop::collection::vec((key(), value(), expiry()), 1..6).prop_map(Op::Batch),
        3 => key().prop_map(Op::Delete),
        3 => (key(), prop_oneof![Just(Vec::new()), value()], value(), expiry())
            .prop_map(|(k, o, n, e)| Op::Cas(k, o, n, e)),
        3 => prop::collection::vec(key(), 1..4).prop_map(Op::Get),
        2 => (prop::collection::vec(prop::sample::select(vec![b'a', b'b']), 0..2), key())
            .prop_map(|(p, s)| Op::Iterate(p, s)),
        1 => (0u64..10).prop_map(Op::AdvanceClock),
        1 => Just(Op::Reopen),
        1 => Just(Op::Merge),
        1 => (0usize..8, 1usize..4).prop_map(|(a, l)| Op::MergeRun(a, l)),
        1 => Just(Op::MergeAndReopen),
    ]
}

struct Model {
    map: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
}

impl Model {
    fn live(&self, k: &[u8], now: u64) -> Option<&(Vec<u8>, u64)> {
        self.map.get(k).filter(|(_, e)| *e == 0 || *e > now)
    }
}

fn options(clock: &Clock, dead_ratio: f64) -> Options {
    Options {
        segment_size: 8 << 10,
        max_batch_bytes: 6 << 10,
        clock: clock.clone(),
        // Nothing kept for followers: every sealed segment may be merged.
        retention: Retention::none(),
        merge: MergeOptions {
            automatic: true,
            dead_ratio,
            check_interval: std::time::Duration::from_millis(2),
            ..MergeOptions::default()
        },
        ..test_options()
    }
}

fn run(ops: Vec<Op>, dead_ratio: f64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(START);
    let Clock::Manual(time) = &clock else {
        unreachable!()
    };
    let options = |clock: &Clock| options(clock, dead_ratio);
    let mut store = Store::open(dir.path(), options(&clock)).unwrap();
    let mut model = Model {
        map: BTreeMap::new(),
    };
    for (step, op) in ops.into_iter().enumerate() {
        let now = time.load(Ordering::Relaxed);
        match op {
            Op::Put(k, v, e) => {
                store.put(&[pair_ttl(&k, &v, e)]).unwrap();
                model.map.insert(k, (v, e));
            }
            Op::Batch(pairs) => {
                let batch: Vec<KvPair> = pairs.iter().map(|(k, v, e)| pair_ttl(k, v, *e)).collect();
                store.put(&batch).unwrap();
                for (k, v, e) in pairs {
                    model.map.insert(k, (v, e));
                }
            }
            Op::Delete(k) => {
                store.delete(&k).unwrap();
                model.map.remove(&k);
            }
            Op::Cas(k, old, new, e) => {
                let expected = match model.live(&k, now) {
                    None => old.is_empty(),
                    Some(_) if old.is_empty() => false,
                    Some((v, _)) => *v == old,
                };
                let swapped = store
                    .compare_and_set(&CompareAndSetRequest {
                        key: k.clone(),
                        old_value: old,
                        new_value: new.clone(),
                        expire_ts: e,
                    })
                    .unwrap();
                prop_assert_eq!(swapped, expected, "step {}: cas of {:?}", step, k);
                if swapped {
                    model.map.insert(k, (new, e));
                }
            }
            Op::Get(keys) => {
                let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                let got: Vec<(Vec<u8>, Vec<u8>, u64)> = store
                    .get(&refs)
                    .unwrap()
                    .into_iter()
                    .map(|p| (p.key, p.value, p.expire_ts))
                    .collect();
                let want: Vec<(Vec<u8>, Vec<u8>, u64)> = keys
                    .iter()
                    .filter_map(|k| model.live(k, now).map(|(v, e)| (k.clone(), v.clone(), *e)))
                    .collect();
                prop_assert_eq!(got, want, "step {}", step);
            }
            Op::Iterate(prefix, start) => {
                let mut options = IterationOptions::new().with_prefix(prefix.clone());
                let start_ok = prefix.is_empty() || start.starts_with(&prefix);
                if start_ok {
                    options = options.with_start_key(start.clone());
                }
                let got: Vec<(Vec<u8>, Vec<u8>)> = store
                    .iter(&options)
                    .unwrap()
                    .map(|p| p.map(|p| (p.key, p.value)).unwrap())
                    .collect();
                let mut lent = Vec::new();
                store
                    .scan(&options, |p| {
                        lent.push((p.key.to_vec(), p.value.to_vec()));
                        true
                    })
                    .unwrap();
                prop_assert_eq!(&lent, &got, "scan, step {}", step);
                let from = if start_ok { start } else { Vec::new() };
                let want: Vec<(Vec<u8>, Vec<u8>)> = model
                    .map
                    .range(from..)
                    .filter(|(k, (_, e))| k.starts_with(&prefix) && (*e == 0 || *e > now))
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(got, want, "step {}", step);
            }
            Op::AdvanceClock(secs) => {
                time.fetch_add(secs, Ordering::Relaxed);
            }
            Op::Reopen => {
                store.close().unwrap();
                store = Store::open(dir.path(), options(&clock)).unwrap();
            }
            Op::Merge => {
                store.merge().unwrap();
            }
            Op::MergeRun(at, len) => {
                let sealed = sealed_ids(&store);
                if let Some(run) = sealed.get(at..(at + len).min(sealed.len()))
                    && !run.is_empty()
                {
                    // The background merge may have taken the run first.
                    match store.merge_segments(run, &mut |_| true) {
                        Ok(_) | Err(dkv_cask::Error::InvalidOptions(_)) => {}
                        Err(e) => panic!("step {step}: merge of {run:?}: {e}"),
                    }
                }
            }
            Op::MergeAndReopen => {
                store.merge().unwrap();
                store.close().unwrap();
                store = Store::open(dir.path(), options(&clock)).unwrap();
            }
        }
    }
    // Whatever happened, a final reopen shows the model's live state.
    store.close().unwrap();
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    let now = time.load(Ordering::Relaxed);
    let want: Vec<(Vec<u8>, Vec<u8>)> = model
        .map
        .iter()
        .filter(|(_, (_, e))| *e == 0 || *e > now)
        .map(|(k, (v, _))| (k.clone(), v.clone()))
        .collect();
    prop_assert_eq!(all_pairs(&store), want);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn the_store_agrees_with_a_btreemap_model_through_every_step(
        ops in prop::collection::vec(op(), 1..80),
        dead_ratio in 0.05f64..1.0,
    ) {
        run(ops, dead_ratio)?;
    }
}
