//! Merge and hint files: space given back, the keyspace unchanged through
//! merges, crashes at every merge step and reopens, deleted keys that stay
//! deleted (the Bitcask resurrection bug), hints that are damaged or stale,
//! merges under load, and replication across a merge.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::disk::*;
use common::*;
use dkv_cask::format::SegmentKind;
use dkv_cask::serverpb::KvPair;
use dkv_cask::{
    Backupable, ChangePropagator, Error, KvStore, MergeOptions, MergeStep, Options, Retention,
    Store, SyncMode,
};

fn options() -> Options {
    merge_test_options()
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

/// Writes every key of `0..keys` `rounds` times with values naming the
/// round, deletes every `delete_every`-th key, and returns the model.
fn fill(store: &Store, keys: u64, rounds: u64, delete_every: u64) -> Model {
    let mut model = Model::new();
    for round in 0..rounds {
        for i in 0..keys {
            let v = format!("value-{i}-{round}-{}", "x".repeat(60)).into_bytes();
            store.put(&[pair(key(i), &v)]).unwrap();
            model.insert(key(i), v);
        }
    }
    for i in (0..keys).step_by(delete_every.max(1) as usize) {
        store.delete(&key(i)).unwrap();
        model.remove(&key(i));
    }
    model
}

#[test]
fn merge_gives_back_overwritten_and_deleted_space_and_keeps_every_live_key() {
    let t = temp_store(options());
    let model = fill(&t.store, 500, 3, 7);
    let before = t.store.stats().unwrap();
    let report = t.store.merge().unwrap();
    let after = t.store.stats().unwrap();
    assert!(report.runs >= 1, "{report:?}");
    assert!(
        after.disk_bytes() * 2 < before.disk_bytes(),
        "{} -> {} bytes",
        before.disk_bytes(),
        after.disk_bytes()
    );
    // What is left is live data, the merged framing (8 bytes per key) and
    // tombstones that still hide values in older segments.
    assert!(
        after.dead_bytes * 5 < after.live_bytes,
        "{} dead bytes beside {} live",
        after.dead_bytes,
        after.live_bytes
    );
    assert_eq!(after.keys, model.len() as u64);
    assert_eq!(after.merges, report.runs as u64);
    assert_eq!(contents(&t.store), model);
    // Merged segments are what is left, apart from the (new) active one.
    assert!(
        after
            .segments
            .iter()
            .all(|s| s.active || s.kind == SegmentKind::Merged)
    );
    // A merged segment gets no hint file: it is written in key order and
    // read whole when the keydir file a clean close saves is not there.
    for s in &after.segments {
        assert!(!s.id.hint_path_in(t.dir.path()).exists(), "{s:?}");
    }
    t.store.close().unwrap();
    fs::remove_file(t.dir.path().join(dkv_cask::KEYDIR_FILE)).unwrap();
    let reopened = reopen(t.dir.path(), options());
    assert_eq!(contents(&reopened), model);
    let r = reopened.recovery_report();
    assert_eq!(r.segments_scanned, r.segments, "{r:?}");
    assert_eq!(r.segments_from_hints, 0, "{r:?}");
    assert_eq!(r.hint_fallbacks, vec![], "{r:?}");
}

/// Merges everything and closes the store; how many segments are left,
/// and the merged ones among them.
fn merge_and_close(store: &Store) -> (usize, Vec<dkv_cask::SegmentStats>) {
    store.merge().unwrap();
    let segments = store.stats().unwrap().segments;
    store.close().unwrap();
    let left = segments.len();
    let merged = segments
        .into_iter()
        .filter(|s| s.kind == SegmentKind::Merged)
        .collect();
    (left, merged)
}

#[test]
fn a_hint_beside_a_merged_segment_is_removed_at_open_and_never_read() {
    // Older builds wrote one; a lying one must not change what opens.
    let t = temp_store(options());
    let model = fill(&t.store, 300, 2, 5);
    let (_, merged) = merge_and_close(&t.store);
    assert!(!merged.is_empty());
    for keydir_file in [true, false] {
        if !keydir_file {
            fs::remove_file(t.dir.path().join(dkv_cask::KEYDIR_FILE)).unwrap();
        }
        for s in &merged {
            fs::write(s.id.hint_path_in(t.dir.path()), b"not a hint at all").unwrap();
        }
        // `verify` names each as a leftover, not as damage.
        let verified = dkv_cask::verify(t.dir.path()).unwrap();
        assert_eq!(verified.hint_fallbacks.len(), merged.len(), "{verified:?}");
        assert!(
            verified
                .hint_fallbacks
                .iter()
                .all(|f| f.reason.contains("older build")),
            "{verified:?}"
        );
        assert!(verified.skipped.is_empty(), "{verified:?}");
        let reopened = reopen(t.dir.path(), options());
        for s in &merged {
            assert!(!s.id.hint_path_in(t.dir.path()).exists(), "{s:?}");
        }
        let r = reopened.recovery_report();
        assert_eq!(r.from_keydir_file, keydir_file, "{r:?}");
        assert_eq!(r.hint_fallbacks, vec![], "{r:?}");
        assert_eq!(contents(&reopened), model);
        reopened.close().unwrap();
    }
}

#[test]
fn per_segment_accounting_is_exact_after_writes_deletes_merges_and_reopen() {
    let t = temp_store(options());
    fill(&t.store, 300, 2, 5);
    let check = |store: &Store| {
        let stats = store.stats().unwrap();
        let live: u64 = stats.segments.iter().map(|s| s.live_bytes).sum();
        let keys: u64 = stats.segments.iter().map(|s| s.live_keys).sum();
        assert_eq!(keys, store.key_count() as u64);
        // Each live key's operation: 20-byte header, key, value.
        let expected: u64 = all_pairs(store)
            .iter()
            .map(|(k, v)| 20 + (k.len() + v.len()) as u64)
            .sum();
        assert_eq!(live, expected);
        for s in &stats.segments {
            assert_eq!(s.live_bytes + s.dead_bytes, s.bytes, "{s:?}");
        }
        stats
    };
    let first = check(&t.store);
    assert!(first.dead_bytes > first.live_bytes / 2);
    t.store.merge().unwrap();
    check(&t.store);
    t.store.close().unwrap();
    let reopened = reopen(t.dir.path(), options());
    check(&reopened);
    // Scanning instead of hints rebuilds the same figures.
    let with_hints = reopened.stats().unwrap();
    reopened.close().unwrap();
    remove_hints(t.dir.path());
    let scanned = reopen(t.dir.path(), options());
    assert_eq!(scanned.stats().unwrap().segments, with_hints.segments);
}

#[test]
fn expired_keys_count_as_dead_and_merge_drops_them() {
    let (clock, time) = manual_clock(1_000_000);
    let t = temp_store(Options { clock, ..options() });
    for i in 0..400 {
        t.store
            .put(&[pair_ttl(key(i), vec![7u8; 80], 1_000_010)])
            .unwrap();
    }
    t.store.put(&[pair("keeper", "v")]).unwrap();
    let live_before = t.store.stats().unwrap().live_bytes;
    time.store(1_000_010, Ordering::Relaxed);
    let stats = t.store.stats().unwrap();
    assert_eq!(stats.keys, 1);
    assert!(stats.live_bytes < live_before / 100);
    t.store.merge().unwrap();
    let after = t.store.stats().unwrap();
    assert!(after.disk_bytes() < 2048, "{after:?}");
    assert_eq!(
        all_pairs(&t.store),
        vec![(b"keeper".to_vec(), b"v".to_vec())]
    );
}

/// The Bitcask bug: a merge that drops a tombstone while an older value
/// survives brings the key back after a restart.
#[test]
fn a_deleted_key_stays_deleted_whichever_segment_is_merged_and_whenever_it_crashes() {
    for merge_tombstone_side in [true, false] {
        for stop_after in [MergeStep::Written, MergeStep::Committed, MergeStep::Applied] {
            let t = temp_store(options());
            let active = active_id;
            // The value in one segment...
            t.store.put(&[pair("k", "old value")]).unwrap();
            let value_segment = active(&t.store);
            fill_other_keys(&t.store, "a", 200);
            // ...the tombstone in a later one.
            let tombstone_segment = active(&t.store);
            t.store.delete(b"k").unwrap();
            fill_other_keys(&t.store, "b", 200);
            let sealed = sealed_ids(&t.store);
            assert!(sealed.contains(&value_segment) && sealed.contains(&tombstone_segment));
            assert_ne!(value_segment, tombstone_segment);
            let run = if merge_tombstone_side {
                tombstone_segment
            } else {
                value_segment
            };
            let mut crashed = None;
            let result = t.store.merge_segments(&[run], &mut |step| {
                if step == stop_after {
                    crashed = Some(copy_store(t.dir.path()));
                    return false;
                }
                true
            });
            assert!(result.is_err(), "the hook stops the merge");
            let image = crashed.expect("the hook ran");
            let label = format!("merged the {} side, crash after {stop_after:?}", {
                if merge_tombstone_side {
                    "tombstone"
                } else {
                    "value"
                }
            });
            let reopened = reopen(image.path(), options());
            assert_eq!(value_of(&reopened, "k"), None, "{label}");
            // And again after merging everything and reopening.
            reopened.merge().unwrap();
            reopened.close().unwrap();
            let again = reopen(image.path(), options());
            assert_eq!(value_of(&again, "k"), None, "{label}, then merged all");
            // The live store went on unharmed.
            assert_eq!(value_of(&t.store, "k"), None, "{label}: live store");
        }
    }
}

fn fill_other_keys(store: &Store, prefix: &str, n: u64) {
    for i in 0..n {
        store
            .put(&[pair(format!("{prefix}-{i:05}"), vec![b'v'; 100])])
            .unwrap();
    }
}

#[test]
fn a_crash_after_any_merge_step_reopens_to_the_same_keyspace() {
    let mut rng = Rng::from_env("merge_crash_steps");
    for round in 0..4 {
        let t = temp_store(options());
        let mut model = Model::new();
        // Values in older segments, tombstones and overwrites in newer ones.
        for i in 0..600u64 {
            let k = key(rng.below(200));
            match rng.below(4) {
                0 => {
                    t.store.delete(&k).unwrap();
                    model.remove(&k);
                }
                _ => {
                    let v = rng.bytes(20 + (i % 80) as usize);
                    t.store.put(&[pair(&k, &v)]).unwrap();
                    model.insert(k, v);
                }
            }
        }
        let mut images = Vec::new();
        t.store
            .merge_with_hook(&mut |step| {
                images.push((step, copy_store(t.dir.path())));
                true
            })
            .unwrap();
        assert!(images.len() >= 3, "round {round}: {} steps", images.len());
        for (step, image) in &images {
            let reopened = reopen(image.path(), options());
            assert_eq!(contents(&reopened), model, "round {round}, after {step:?}");
            let r = reopened.recovery_report().clone();
            if *step == MergeStep::Written {
                assert_eq!(r.unfinished_merges_removed, 1, "{r:?}");
            }
            reopened.close().unwrap();
            // A second reopen finds nothing left to settle.
            let again = reopen(image.path(), options());
            assert_eq!(again.recovery_report().superseded_removed, 0);
            assert_eq!(again.recovery_report().unfinished_merges_removed, 0);
            assert_eq!(contents(&again), model);
        }
        assert_eq!(contents(&t.store), model);
    }
}

#[test]
fn hints_that_are_missing_damaged_truncated_or_stale_fall_back_to_scanning() {
    let t = temp_store(options());
    let model = fill(&t.store, 400, 2, 9);
    t.store.close().unwrap();
    let hints: Vec<_> = fs::read_dir(t.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hint"))
        .collect();
    assert!(hints.len() >= 3, "{hints:?}");
    type Damage<'a> = &'a dyn Fn(&Path);
    let cases: [(&str, Damage); 4] = [
        ("missing", &|p| fs::remove_file(p).unwrap()),
        ("damaged", &|p| flip_bit(p, 70, 3)),
        ("truncated", &|p| {
            let len = fs::metadata(p).unwrap().len();
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }),
        ("older than its segment", &|p| {
            // The hint of another (shorter or longer) segment in its place.
            let other = hints.iter().find(|h| *h != p).unwrap();
            fs::copy(other, p).unwrap();
        }),
    ];
    // Without the keydir file a clean close saves, which open would use
    // instead of any hint.
    let without_keydir = |dir: &Path| fs::remove_file(dir.join(dkv_cask::KEYDIR_FILE)).unwrap();
    for (what, damage) in cases {
        let image = copy_store(t.dir.path());
        without_keydir(image.path());
        let victim = same_file_in(&hints[1], image.path());
        damage(&victim);
        let store = reopen(image.path(), options());
        assert_eq!(contents(&store), model, "{what}");
        let r = store.recovery_report();
        assert_eq!(r.hint_fallbacks.len(), 1, "{what}: {r:?}");
        assert_eq!(
            r.segments_scanned, 2,
            "{what}: the active one and the victim"
        );
        store.close().unwrap();
        // The hint was rebuilt: the next open uses it.
        without_keydir(image.path());
        let again = reopen(image.path(), options());
        assert!(again.recovery_report().hint_fallbacks.is_empty(), "{what}");
        assert_eq!(contents(&again), model, "{what}");
    }
}

#[test]
fn with_hints_open_trusts_sealed_values_and_a_damaged_one_fails_its_read_and_verify() {
    let t = temp_store(options());
    // In the middle of the segment: a hint is checked against checksums of
    // the segment's first and last 4 KiB, so damage there is found at open.
    fill_other_keys(&t.store, "w", 45);
    t.store.put(&[pair("target", vec![b'T'; 200])]).unwrap();
    fill_other_keys(&t.store, "x", 300);
    t.store.close().unwrap();
    let file = segment_files(t.dir.path()).remove(0);
    let bytes = fs::read(&file).unwrap();
    let at = bytes.windows(8).position(|w| w == [b'T'; 8]).unwrap();
    flip_bit(&file, at as u64 + 3, 1);
    let store = reopen(t.dir.path(), options());
    assert_eq!(store.recovery_report().hint_fallbacks, vec![]);
    match store.get(&[b"target".as_slice()]) {
        Err(Error::Corruption { file: f, .. }) => assert_eq!(f, file),
        other => panic!("read of the damaged value: {other:?}"),
    }
    assert_eq!(value_of(&store, "x-00001"), Some(vec![b'v'; 100]));
    store.close().unwrap();
    let report = dkv_cask::verify(t.dir.path()).unwrap();
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert_eq!(report.skipped[0].file, file);
    // The hint no longer matches its segment's checksum, which verify checks.
    assert_eq!(report.hint_fallbacks.len(), 1, "{report:?}");
    assert!(report.hint_fallbacks[0].reason.contains("checksum"));
}

#[test]
fn readers_and_writers_see_no_error_and_no_stale_value_during_merges() {
    let t = Arc::new(temp_store(options()));
    let writers_done = Arc::new(AtomicBool::new(false));
    const KEYS: u64 = 64;
    // Each writer owns keys and writes ever-increasing versions; readers
    // check that a key's version never goes back.
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                for version in 1..=150u64 {
                    for i in (w..KEYS).step_by(2) {
                        let v = format!("{version:08}-{}", "p".repeat(40));
                        t.store.put(&[pair(key(i), v)]).unwrap();
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let t = Arc::clone(&t);
            let done = Arc::clone(&writers_done);
            std::thread::spawn(move || {
                let mut seen = BTreeMap::new();
                let mut reads = 0u64;
                while !done.load(Ordering::Acquire) {
                    for i in 0..KEYS {
                        if let Some(v) = value_of(&t.store, key(i)) {
                            let version: u64 =
                                std::str::from_utf8(&v[..8]).unwrap().parse().unwrap();
                            let last = seen.entry(i).or_insert(0);
                            assert!(version >= *last, "key {i} went from {last} to {version}");
                            *last = version;
                            reads += 1;
                        }
                    }
                    let n = all_pairs(&t.store).len() as u64;
                    assert!(n <= KEYS);
                }
                reads
            })
        })
        .collect();
    let mut merges = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        merges += t.store.merge().unwrap().runs;
    }
    for w in writers {
        w.join().unwrap();
    }
    writers_done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert!(merges > 0);
    for i in 0..KEYS {
        let v = value_of(&t.store, key(i)).unwrap();
        assert_eq!(&v[..8], b"00000150");
    }
}

#[test]
fn a_snapshot_opened_before_a_merge_streams_the_keyspace_it_saw() {
    let t = temp_store(options());
    let model = fill(&t.store, 300, 2, 4);
    let mut snapshot = t.store.snapshot().unwrap();
    // Overwrite everything, then merge away every segment the snapshot reads.
    fill(&t.store, 300, 1, 1000);
    t.store.merge().unwrap();
    let other = temp_store(options());
    other.store.load_snapshot(&mut snapshot).unwrap();
    drop(snapshot);
    assert_eq!(contents(&other.store), model);
    // Once the snapshot is gone, merged-away files are removed.
    let files_after = segment_files(t.dir.path()).len();
    assert_eq!(files_after, t.store.stats().unwrap().segments.len());
}

#[test]
fn a_follower_behind_the_merged_log_gets_the_typed_too_old_error_and_one_within_keeps_going() {
    let t = temp_store(Options {
        retention: Retention {
            bytes: 40 << 10,
            age: Duration::ZERO,
            honour_pins: true,
        },
        ..options()
    });
    fill(&t.store, 400, 2, 10);
    let oldest_before = t.store.load_changes(0, 1).unwrap()[0].change_number;
    let floor = t.store.retained_from().unwrap();
    t.store.merge().unwrap();
    let latest = t.store.latest_committed_change_number().unwrap();
    // Behind the merged range: the typed error, never a silent jump.
    match t.store.load_changes(oldest_before, 10) {
        Err(Error::ChangesCompacted {
            requested,
            oldest_available,
        }) => {
            assert_eq!(requested, oldest_before);
            assert!(oldest_available > oldest_before && oldest_available <= floor);
        }
        other => panic!("expected ChangesCompacted, got {other:?}"),
    }
    // Within retention: every change from the floor on, without a gap
    // (each record starts where the one before ended).
    let mut next = floor;
    let mut previous_end = None;
    while next <= latest {
        let batch = t.store.load_changes(next, 50).unwrap();
        assert!(!batch.is_empty());
        for c in &batch {
            let end = c.change_number + u64::from(c.number_of_trxns) - 1;
            let start = end - c.serialised_form.len() as u64;
            match previous_end {
                None => assert!(start < floor && floor <= end),
                Some(p) => assert_eq!(start, p, "gap before {end}"),
            }
            previous_end = Some(end);
            next = end + 1;
        }
    }
    assert_eq!(previous_end, Some(latest));
}

#[test]
fn a_pinned_follower_keeps_its_log_from_being_merged() {
    let t = temp_store(Options {
        retention: Retention {
            bytes: 0,
            age: Duration::ZERO,
            honour_pins: true,
        },
        ..options()
    });
    fill(&t.store, 200, 1, 1000);
    let pin = t.store.latest_committed_change_number().unwrap() / 2;
    t.store.pin_changes("follower-1", pin);
    fill(&t.store, 200, 2, 1000);
    t.store.merge().unwrap();
    let changes = t.store.load_changes(pin, 5).unwrap();
    let first = &changes[0];
    let end = first.change_number + u64::from(first.number_of_trxns) - 1;
    assert!(end - first.serialised_form.len() as u64 <= pin && pin <= end);
    t.store.unpin_changes("follower-1");
    t.store.merge().unwrap();
    assert!(matches!(
        t.store.load_changes(pin, 5),
        Err(Error::ChangesCompacted { .. })
    ));
}

#[test]
fn background_merging_keeps_a_rewritten_store_bounded() {
    let t = temp_store(Options {
        merge: MergeOptions {
            automatic: true,
            dead_ratio: 0.5,
            check_interval: Duration::from_millis(5),
            ..MergeOptions::default()
        },
        ..options()
    });
    let mut model = Model::new();
    for _ in 0..20 {
        model = fill(&t.store, 200, 1, 1000);
    }
    // Wait for the merger to catch up with the last rollover.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = t.store.stats().unwrap();
        if stats.merges > 0 && stats.space_amplification() < 3.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "space amplification stayed at {}",
            stats.space_amplification()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(contents(&t.store), model);
}

#[test]
fn merge_of_segments_that_are_not_an_adjacent_sealed_run_is_refused() {
    let t = temp_store(options());
    fill(&t.store, 800, 1, 1000);
    let sealed = sealed_ids(&t.store);
    assert!(sealed.len() >= 3);
    for run in [&[sealed[0], sealed[2]][..], &[]] {
        let err = t.store.merge_segments(run, &mut |_| true).unwrap_err();
        assert!(matches!(err, Error::InvalidOptions(_)), "{run:?}: {err}");
    }
    let active = active_id(&t.store);
    assert!(t.store.merge_segments(&[active], &mut |_| true).is_err());
}

#[test]
fn merge_options_out_of_range_are_refused_at_open() {
    for merge in [
        MergeOptions {
            dead_ratio: 0.0,
            ..MergeOptions::default()
        },
        MergeOptions {
            space_amplification: 0.5,
            ..MergeOptions::default()
        },
        MergeOptions {
            check_interval: Duration::ZERO,
            ..MergeOptions::default()
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open(dir.path(), Options { merge, ..options() }).unwrap_err();
        assert!(matches!(err, Error::InvalidOptions(_)), "{err}");
    }
}

/// Regression (review of the first merge): a merge of a run that does not
/// start the log dropped an expired overwrite, and the older value came
/// back at the next open.
#[test]
fn an_expired_overwrite_merged_away_leaves_a_tombstone_so_the_older_value_stays_gone() {
    let (clock, time) = manual_clock(1_000_000);
    let opts = Options { clock, ..options() };
    let t = temp_store(opts.clone());
    t.store.put(&[pair("k", "v1-old")]).unwrap();
    fill_other_keys(&t.store, "a", 200);
    let s2 = active_id(&t.store);
    t.store
        .put(&[pair_ttl("k", "v2-expiring", 1_000_010)])
        .unwrap();
    fill_other_keys(&t.store, "b", 200);
    assert!(sealed_ids(&t.store).contains(&s2));
    time.store(1_000_020, Ordering::Relaxed);
    assert_eq!(value_of(&t.store, "k"), None, "expired, so absent");
    t.store.merge_segments(&[s2], &mut |_| true).unwrap();
    assert_eq!(
        value_of(&t.store, "k"),
        None,
        "still absent in the live store"
    );
    t.store.close().unwrap();
    let again = reopen(t.dir.path(), opts);
    assert_eq!(value_of(&again, "k"), None, "after reopen");
}

/// Zeroes the active segment of a copy of the store in `dir` from log
/// position `durable` on: what a power loss leaves when nothing after
/// `durable` reached the disk.
fn power_loss_image(store: &Store, durable: u64) -> tempfile::TempDir {
    let image = copy_store(store.dir());
    let stats = store.stats().unwrap();
    let active = stats.segments.iter().find(|s| s.active).unwrap();
    let path = image.path().join(active.id.file_name());
    let keep = 32 + durable.saturating_sub(active.base_position);
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    if len > keep {
        f.write_all_at(&vec![0u8; (len - keep) as usize], keep)
            .unwrap();
    }
    image
}

/// Regression (review of the first merge): a merge judged liveness from
/// index entries not yet durable (`SyncMode::Never`): it dropped a durable
/// value, or a durable tombstone, because an unsynced newer put shadowed
/// it, and a crash that lost the newer put left the oldest value.
#[test]
fn a_merge_never_drops_durable_data_for_a_newer_write_a_crash_could_still_erase() {
    for shadowed_is_a_delete in [false, true] {
        let opts = Options {
            sync_mode: SyncMode::Never,
            ..options()
        };
        let t = temp_store(opts.clone());
        t.store.put(&[pair("k", "v1")]).unwrap();
        fill_other_keys(&t.store, "a", 200);
        let s2 = active_id(&t.store);
        if shadowed_is_a_delete {
            t.store.delete(b"k").unwrap();
        } else {
            t.store.put(&[pair("k", "v2")]).unwrap();
        }
        fill_other_keys(&t.store, "b", 200);
        t.store.sync().unwrap();
        let before = t.store.durable_change_number();
        let expected_before = (!shadowed_is_a_delete).then(|| b"v2".to_vec());
        // The newer value, not synced.
        t.store.put(&[pair("k", "v3")]).unwrap();
        assert!(t.store.last_change_number() > before);
        // Stopped after writing its output, the merge changed nothing.
        let stopped = t
            .store
            .merge_segments(&[s2], &mut |step| step != MergeStep::Written);
        assert!(stopped.is_err());
        let image = power_loss_image(&t.store, before);
        let crashed = reopen(image.path(), opts.clone());
        assert_eq!(value_of(&crashed, "k"), expected_before);
        // Committed, it made every write it judged by durable first.
        let mut at_commit = None;
        t.store
            .merge_segments(&[s2], &mut |step| {
                if step == MergeStep::Committed {
                    at_commit = Some((
                        t.store.durable_change_number(),
                        t.store.last_change_number(),
                    ));
                }
                true
            })
            .unwrap();
        let (durable, written) = at_commit.unwrap();
        assert_eq!(durable, written, "unsynced writes when the merge committed");
        let image = power_loss_image(&t.store, durable);
        let crashed = reopen(image.path(), opts);
        assert_eq!(value_of(&crashed, "k"), Some(b"v3".to_vec()));
    }
}

/// Regression (review of the first merge): restoring a backup of another
/// store carried the old store's hint
/// files over (carry_over keeps non-store files); a hint whose id, length
/// and range match a restored segment is trusted.
#[test]
fn a_restore_never_trusts_hint_files_of_the_store_it_replaces() {
    let opts = options();
    let write = |store: &Store, prefix: &str| {
        for i in 0..300u64 {
            store
                .put(&[pair(format!("{prefix}-{i:05}"), vec![b'x'; 50])])
                .unwrap();
        }
    };
    let a = temp_store(opts.clone());
    write(&a.store, "a");
    let b = temp_store(opts.clone());
    write(&b.store, "b");
    let backup = tempfile::tempdir().unwrap();
    let bpath = backup.path().join("bk");
    b.store.backup_to(&bpath).unwrap();
    // Let A's hint jobs finish (close joins them), then reopen A and restore.
    let dir = a.dir.path().to_path_buf();
    a.store.close().unwrap();
    let hints: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "hint"))
        .collect();
    assert!(!hints.is_empty(), "A has hint files");
    let a2 = reopen(&dir, opts.clone());
    let restored = a2.restore_from(&bpath).unwrap();
    let r = restored.recovery_report().clone();
    eprintln!(
        "from hints: {} scanned: {}",
        r.segments_from_hints, r.segments_scanned
    );
    let got = contents(&restored);
    let want = contents(&b.store);
    assert_eq!(got.len(), want.len(), "restored key count");
    assert!(
        got.keys().all(|k| k.starts_with(b"b-")),
        "keys of the replaced store visible"
    );
}

/// Regression (review of the first merge): a backup racing a merge failed
/// with `Closed` when the merge retired a segment the backup had listed.
#[test]
fn backups_taken_while_merges_run_all_succeed() {
    let t = temp_store(options());
    fill_other_keys(&t.store, "a", 6000);
    let dir = t.dir.path().to_path_buf();
    t.store.close().unwrap();
    let store = Arc::new(reopen(&dir, options()));
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, stop2) = (Arc::clone(&store), Arc::clone(&stop));
    let merger = std::thread::spawn(move || {
        let mut n = 0;
        while !stop2.load(Ordering::Relaxed) {
            for id in sealed_ids(&s2) {
                if s2.merge_segments(&[id], &mut |_| true).is_ok() {
                    n += 1;
                }
            }
        }
        n
    });
    let mut failures = Vec::new();
    for round in 0..60 {
        let bdir = tempfile::tempdir().unwrap();
        if let Err(e) = store.backup_to(&bdir.path().join("b")) {
            failures.push(format!("round {round}: {e:?}"));
            if failures.len() > 3 {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let merges = merger.join().unwrap();
    eprintln!("merges: {merges}");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Regression (review of the first merge): close() held the `merger` mutex while joining the merge thread; the
/// merge thread waits for the writer lock (allocate_segment_id); a writer in
/// rollover holds the writer lock and waits for the `merger` mutex.
#[test]
fn close_returns_while_writers_roll_over_and_the_background_merge_runs() {
    let opts = Options {
        segment_size: 4096,
        merge: MergeOptions {
            automatic: true,
            dead_ratio: 0.01,
            check_interval: Duration::from_micros(50),
            ..MergeOptions::default()
        },
        retention: Retention::none(),
        ..test_options()
    };
    for round in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), opts.clone()).unwrap());
        let mut writers = Vec::new();
        for w in 0..4 {
            let s = Arc::clone(&store);
            writers.push(std::thread::spawn(move || {
                let mut i = 0u64;
                loop {
                    let k = format!("k{w}-{}", i % 20);
                    if s.put(&[pair(k, vec![b'v'; 300])]).is_err() {
                        break;
                    }
                    i += 1;
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(5 + round % 7));
        let s = Arc::clone(&store);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = s.close();
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!("round {round}: close did not return within 20 s (deadlock)");
        }
        for w in writers {
            w.join().unwrap();
        }
        std::mem::forget(dir);
    }
}

/// Regression (review of the first merge): first_expiry was a lower bound
/// never raised, and merged_estimate then
/// counts *all* expiring bytes as reclaimable: in a TTL workload the
/// background thread rewrites the same merged data each time one key expires.
#[test]
fn keys_expiring_one_by_one_do_not_make_the_background_merge_rewrite_a_segment_each_time() {
    let (clock, time) = manual_clock(1_000_000);
    let opts = Options {
        clock,
        segment_size: 64 << 10,
        merge: MergeOptions {
            automatic: true,
            check_interval: Duration::from_millis(10),
            ..MergeOptions::default()
        },
        retention: Retention::none(),
        ..test_options()
    };
    let t = temp_store(opts);
    for i in 0..400u64 {
        t.store
            .put(&[pair_ttl(format!("k{i:05}"), vec![b'v'; 80], 1_000_100 + i)])
            .unwrap();
    }
    t.store.merge().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let base = t.store.stats().unwrap();
    eprintln!(
        "after first merge: merges={} segs={}",
        base.merges,
        base.segments.len()
    );
    time.store(1_000_100, Ordering::Relaxed);
    let mut counts = Vec::new();
    for step in 1..=10u64 {
        time.store(1_000_100 + step, Ordering::Relaxed); // one more key expired
        std::thread::sleep(Duration::from_millis(150));
        let s = t.store.stats().unwrap();
        counts.push((s.merges, s.keys));
    }
    eprintln!("(merges, live keys) per step: {counts:?}");
    let extra = counts.last().unwrap().0 - base.merges;
    assert!(
        extra <= 1,
        "{extra} background merges to drop 10 of 400 keys"
    );
}

#[test]
fn a_rate_limited_merge_writes_no_faster_than_its_limit() {
    let t = temp_store(Options {
        merge: MergeOptions {
            automatic: false,
            bytes_per_second: 200_000,
            ..MergeOptions::default()
        },
        ..options()
    });
    fill_other_keys(&t.store, "r", 4000);
    let started = std::time::Instant::now();
    let report = t.store.merge().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    // A lower bound only: a slow machine can only make it take longer.
    let floor = report.bytes_after as f64 / 200_000.0;
    assert!(report.bytes_after > 400_000, "{report:?}");
    assert!(
        elapsed >= floor * 0.75,
        "wrote {} bytes in {elapsed:.2} s, limit allows no less than {floor:.2} s",
        report.bytes_after
    );
}

#[test]
fn an_explicit_merge_merges_every_sealed_segment_while_the_background_merger_runs() {
    // The background merger works at the same time (every 1 ms, at a low
    // dead ratio): a run it changes after `merge()` planned it must be
    // planned again, not skipped, or dead data stays behind.
    for round in 0..20 {
        let t = temp_store(Options {
            merge: MergeOptions {
                automatic: true,
                dead_ratio: 0.2,
                check_interval: Duration::from_millis(1),
                ..MergeOptions::default()
            },
            ..options()
        });
        let mut model = Model::new();
        for _ in 0..6 {
            model = fill(&t.store, 300, 1, 1000);
        }
        t.store.merge().unwrap();
        let stats = t.store.stats().unwrap();
        let unmerged: Vec<_> = stats
            .segments
            .iter()
            .filter(|s| !s.active && s.kind == SegmentKind::Log)
            .map(|s| s.id)
            .collect();
        assert!(
            unmerged.is_empty(),
            "round {round}: log segments {unmerged:?} left after merge()"
        );
        assert_eq!(contents(&t.store), model);
    }
}

#[test]
fn a_merged_segment_out_of_key_order_still_opens_to_its_last_operation_per_key() {
    // Merges write key order, and open counts on it only to skip a sort: a
    // merged segment in another order (written by hand, or damaged in a
    // way its checksums accept) opens the same as a sorted one would.
    use dkv_cask::SegmentId;
    use dkv_cask::format::{MergedBuilder, RECORD_HEADER_LEN, RecordBuilder};
    let op = |k: &[u8], v: &[u8]| {
        let mut b = RecordBuilder::new(None);
        b.push_put(k, v, 0);
        b.stamp(0, 0).1[RECORD_HEADER_LEN..].to_vec()
    };
    let mut first = MergedBuilder::default();
    first.push(3, &op(b"m", b"first m"));
    first.push(1, &op(b"c", b"c"));
    let mut second = MergedBuilder::default();
    second.push(4, &op(b"a", b"a"));
    second.push(5, &op(b"m", b"last m"));
    let segment = [
        merged_segment_headers(10),
        first.finish().to_vec(),
        second.finish().to_vec(),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    fs::write(SegmentId(1).path_in(dir.path()), &segment).unwrap();
    let store = Store::open(dir.path(), options()).unwrap();
    let expected: BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"a".to_vec(), b"a".to_vec()),
        (b"c".to_vec(), b"c".to_vec()),
        (b"m".to_vec(), b"last m".to_vec()),
    ]
    .into();
    assert_eq!(contents(&store), expected);
    assert_eq!(store.recovery_report().segments_scanned, 1);
}

#[test]
fn many_merged_segments_read_in_parallel_at_open_give_the_keyspace_and_name_the_damage() {
    // Open reads merged segments on several threads once they hold more
    // than 8 MiB; the result, and a damaged segment's error, must be what
    // one thread would give.
    let options = || Options {
        segment_size: 1 << 20,
        ..options()
    };
    let t = temp_store(options());
    let mut model = BTreeMap::new();
    let value = |i: u64, round: u64| format!("{i:08}-{round}-").repeat(10).into_bytes();
    // Each batch written twice, so every segment has half to give back.
    for first in (0..70_000u64).step_by(100) {
        for round in 0..2 {
            let batch: Vec<_> = (first..first + 100)
                .map(|i| KvPair {
                    key: key(i),
                    value: value(i, round),
                    expire_ts: 0,
                })
                .collect();
            t.store.put(&batch).unwrap();
            model.extend(batch.into_iter().map(|p| (p.key, p.value)));
        }
    }
    let (left, merged) = merge_and_close(&t.store);
    let bytes: u64 = merged.iter().map(|s| s.bytes).sum();
    assert!(
        merged.len() >= 2 && bytes > 8 << 20,
        "{} merged of {left}, {bytes} bytes",
        merged.len()
    );
    fs::remove_file(t.dir.path().join(dkv_cask::KEYDIR_FILE)).unwrap();
    let reopened = reopen(t.dir.path(), options());
    let r = reopened.recovery_report();
    assert_eq!(r.segments_scanned + r.segments_from_hints, left);
    assert!(r.segments_scanned >= merged.len());
    assert_eq!(contents(&reopened), model);
    reopened.close().unwrap();

    // One byte of a value in the middle segment flipped.
    fs::remove_file(t.dir.path().join(dkv_cask::KEYDIR_FILE)).unwrap();
    let damaged = merged[merged.len() / 2].id.path_in(t.dir.path());
    let file = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&damaged)
        .unwrap();
    let at = file.metadata().unwrap().len() / 2;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x20], at).unwrap();
    drop(file);
    let strict = Options {
        recovery_mode: dkv_cask::RecoveryMode::Strict,
        ..options()
    };
    match Store::open(t.dir.path(), strict) {
        Err(Error::Corruption { file, offset, .. }) => {
            assert_eq!(file, damaged);
            assert!(offset <= at, "{offset} > {at}");
        }
        other => panic!("{other:?}"),
    }
}
