//! The in-memory index through its public API: `KeyDir` behaves as an
//! ordered map from key to `KeyEntry` (get, insert, remove, and scans from
//! any key, inclusive or exclusive, in ascending bytewise order), whatever
//! the keys look like and however its leaves split, empty and refill.

mod common;

use std::collections::BTreeMap;
use std::ops::Bound;

use common::*;
use dkv_cask::{KeyDir, KeyEntry, RecordPointer, SegmentId};

/// A distinct entry for step `n`.
fn entry(n: u64) -> KeyEntry {
    KeyEntry {
        pointer: RecordPointer {
            segment: SegmentId(n as u32),
            offset: n as u32,
            len: 1,
        },
        expire_ts: 0,
        change_number: n,
    }
}

/// Random operations, checked step by step against a `BTreeMap`, over six
/// key shapes that stress the packed leaves: shared prefixes longer than
/// the leaves' 4-byte search hints and the 22-byte inline fence keys, runs
/// of zero and 0xff bytes, and keys that are prefixes of each other; with
/// most keys drained now and then so that leaves empty out entirely and
/// refill, and scans from present and absent keys.
#[test]
fn the_keydir_agrees_with_a_btreemap_under_adversarial_keys() {
    let mut rng = Rng::from_env("keydir_model");
    for shape in 0..6u64 {
        let mut kd = KeyDir::new();
        let mut model: BTreeMap<Vec<u8>, KeyEntry> = BTreeMap::new();
        let base: Vec<u8> = match shape {
            0 => vec![],
            1 => vec![b'p'; 30],
            2 => vec![0u8; 300],
            3 => vec![0xff; 3000],
            4 => (0..100).map(|i| i as u8).collect(),
            _ => vec![b'a'; 5],
        };
        let alphabet: &[u8] = &[0, 1, b'a', b'b', 0xfe, 0xff];
        // A prefix of `base` (usually all of it) and a short random tail.
        let key = |rng: &mut Rng| {
            let mut k = base[..rng.below(base.len() as u64 + 1) as usize].to_vec();
            if rng.below(4) != 0 {
                k = base.clone();
            }
            let n = rng.below(if shape == 3 { 3 } else { 12 }) as usize;
            for _ in 0..n {
                k.push(alphabet[rng.below(alphabet.len() as u64) as usize]);
            }
            if k.is_empty() {
                k.push(0);
            }
            k
        };
        for step in 0..40_000u64 {
            let k = key(&mut rng);
            match rng.below(10) {
                0..=4 => assert_eq!(
                    kd.insert(&k, entry(step)),
                    model.insert(k, entry(step)),
                    "insert, step {step} of shape {shape}"
                ),
                5..=7 => assert_eq!(
                    kd.remove(&k),
                    model.remove(&k),
                    "remove, step {step} of shape {shape}"
                ),
                8 => assert_eq!(
                    kd.get(&k),
                    model.get(&k).copied(),
                    "get, step {step} of shape {shape}"
                ),
                _ => {
                    let exclusive = rng.below(2) == 0;
                    let mut got = Vec::new();
                    kd.scan_from(&k, exclusive, |key, _| {
                        got.push(key.to_vec());
                        got.len() < 50
                    });
                    let from = if exclusive {
                        Bound::Excluded(&k)
                    } else {
                        Bound::Included(&k)
                    };
                    let want: Vec<Vec<u8>> = model
                        .range::<Vec<u8>, _>((from, Bound::Unbounded))
                        .take(50)
                        .map(|(k, _)| k.clone())
                        .collect();
                    assert_eq!(got, want, "scan, step {step} of shape {shape}");
                }
            }
            // Now and then drain most keys, so leaves empty out and refill.
            if step % 9_000 == 8_999 {
                let keys: Vec<_> = model.keys().cloned().collect();
                for k in keys.iter().filter(|_| rng.below(10) != 0) {
                    assert_eq!(kd.remove(k), model.remove(k), "drain of shape {shape}");
                }
            }
        }
        assert_eq!(kd.len(), model.len(), "shape {shape}");
        assert_eq!(
            kd.key_bytes(),
            model.keys().map(Vec::len).sum::<usize>(),
            "shape {shape}"
        );
        let mut all = Vec::new();
        kd.scan_from(b"", false, |k, e| {
            all.push((k.to_vec(), e));
            true
        });
        assert_eq!(all, model.into_iter().collect::<Vec<_>>(), "shape {shape}");
    }
}
