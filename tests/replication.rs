//! The log as a replication feed: a master's `ChangePropagator` and a
//! slave's `ChangeApplier`, and DKV's slave loop over them. Change numbers
//! are log positions; a change record covers `[change_number,
//! change_number + number_of_trxns - 1]`, and the last number of each is the
//! end of the master's record.

mod common;

use common::disk::*;
use common::*;
use dkv_cask::serverpb::trxn_record::TrxnType;
use dkv_cask::serverpb::{ChangeRecord, TrxnRecord};
use dkv_cask::{
    ChangeApplier, ChangePropagator, Error, KvStore, Options, SEGMENT_HEADER_BYTES, Store,
    SyncMode, replicate, replicate_until_caught_up,
};

fn put_trxn(key: &str, value: &str) -> TrxnRecord {
    TrxnRecord {
        r#type: TrxnType::Put as i32,
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        expire_ts: 0,
    }
}

fn delete_trxn(key: &str) -> TrxnRecord {
    TrxnRecord {
        r#type: TrxnType::Delete as i32,
        key: key.as_bytes().to_vec(),
        ..TrxnRecord::default()
    }
}

/// A change as a master that sends only `trxns` (any DKV master) builds it.
fn change(change_number: u64, trxns: Vec<TrxnRecord>) -> ChangeRecord {
    ChangeRecord {
        serialised_form: Vec::new(),
        change_number,
        number_of_trxns: trxns.len() as u32,
        trxns,
    }
}

fn synced() -> Options {
    Options {
        sync_mode: SyncMode::Always,
        ..test_options()
    }
}

#[test]
fn an_empty_store_has_committed_and_applied_nothing() {
    let t = temp_store(synced());
    assert_eq!(t.store.latest_committed_change_number().unwrap(), 0);
    assert_eq!(t.store.latest_applied_change_number().unwrap(), 0);
    assert!(t.store.load_changes(1, 10).unwrap().is_empty());
    assert!(t.store.load_changes(0, 10).unwrap().is_empty());
}

/// Port of RocksDB's TestGetLatestChangeNumber (RT:280-297): the number
/// grows with writes and not with reads.
#[test]
fn the_committed_number_grows_with_writes_and_not_with_reads() {
    let t = temp_store(synced());
    let before = t.store.latest_committed_change_number().unwrap();
    for i in 0..5 {
        t.store.put(&[pair(format!("k{i}"), "v")]).unwrap();
    }
    let after_puts = t.store.latest_committed_change_number().unwrap();
    assert!(after_puts > before);
    for i in 0..5 {
        value_of(&t.store, format!("k{i}"));
    }
    assert_eq!(
        t.store.latest_committed_change_number().unwrap(),
        after_puts
    );
    assert_eq!(after_puts, t.store.last_change_number());
}

/// Port of RocksDB's TestLoadChanges (RT:299-336): from = latest + 1, three
/// puts, three records in order. Re-derived for our numbers: the first
/// record is the one whose range contains `from`, and each record's last
/// number (`change_number + number_of_trxns - 1`) is its end in the log.
#[test]
fn load_changes_returns_the_records_from_the_requested_number_in_order() {
    let t = temp_store(synced());
    t.store.put(&[pair("seed", "x")]).unwrap();
    let from = t.store.latest_committed_change_number().unwrap() + 1;
    for i in 1..=3 {
        t.store
            .put(&[pair(format!("bbKey_{i}"), format!("bbVal_{i}"))])
            .unwrap();
    }
    let changes = t.store.load_changes(from, 8).unwrap();
    assert_eq!(changes.len(), 3);
    assert!(changes[0].change_number >= from);
    for (i, c) in changes.iter().enumerate() {
        assert_eq!(c.number_of_trxns, 1);
        assert_eq!(c.trxns.len(), 1);
        assert_eq!(c.trxns[0].r#type, TrxnType::Put as i32);
        assert_eq!(c.trxns[0].key, format!("bbKey_{}", i + 1).as_bytes());
        assert_eq!(c.trxns[0].value, format!("bbVal_{}", i + 1).as_bytes());
        assert!(!c.serialised_form.is_empty());
    }
    // DKV's next request, `last + 1`, lands in the following record.
    for w in changes.windows(2) {
        let last = w[0].change_number + u64::from(w[0].number_of_trxns) - 1;
        assert_eq!(
            t.store.load_changes(last + 1, 1).unwrap(),
            vec![w[1].clone()]
        );
    }
    let last = changes[2].change_number + u64::from(changes[2].number_of_trxns) - 1;
    assert_eq!(last, t.store.latest_committed_change_number().unwrap());
}

#[test]
fn a_number_inside_a_record_starts_with_that_record_and_max_limits_the_count() {
    let t = temp_store(synced());
    t.store
        .put(&[pair("a", "1"), pair("b", "2"), pair("c", "3")])
        .unwrap();
    t.store.put(&[pair("d", "4")]).unwrap();
    let all = t.store.load_changes(0, 100).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].number_of_trxns, 3);
    // Any number up to the first record's last one starts with it.
    let last0 = all[0].change_number + 2;
    for from in 1..=last0 {
        let got = t.store.load_changes(from, 1).unwrap();
        assert_eq!(got, vec![all[0].clone()], "from {from}");
    }
    assert_eq!(
        t.store.load_changes(last0 + 1, 5).unwrap(),
        vec![all[1].clone()]
    );
    assert!(t.store.load_changes(0, 0).unwrap().is_empty());
    let latest = t.store.latest_committed_change_number().unwrap();
    assert!(t.store.load_changes(latest + 1, 5).unwrap().is_empty());
}

#[test]
fn the_feed_spans_segments_and_survives_reopen() {
    let t = temp_store(Options {
        segment_size: 4096,
        ..synced()
    });
    for i in 0..200 {
        t.store
            .put(&[pair(format!("key{i:04}"), vec![b'v'; 60])])
            .unwrap();
    }
    t.store.delete(b"key0007").unwrap();
    let before = t.store.load_changes(0, 1000).unwrap();
    assert_eq!(before.len(), 201);
    t.store.close().unwrap();
    let store = reopen(t.dir.path(), synced());
    assert_eq!(store.load_changes(0, 1000).unwrap(), before);
    assert_eq!(
        store.load_changes(before[150].change_number, 10).unwrap(),
        before[150..160].to_vec()
    );
    let del = &before[200];
    assert_eq!(del.trxns[0].r#type, TrxnType::Delete as i32);
    assert_eq!(del.trxns[0].key, b"key0007");
}

/// Port of Badger's TestSaveChangesForPutAndDelete (BT:270-316).
#[test]
fn save_changes_applies_puts_then_deletes_and_returns_the_last_number() {
    let t = temp_store(synced());
    let n = t.store.latest_applied_change_number().unwrap();
    let puts: Vec<ChangeRecord> = (1..=10)
        .map(|i| {
            change(
                n + i,
                vec![put_trxn(&format!("KSC_{i}"), &format!("VSC_{i}"))],
            )
        })
        .collect();
    let (applied, result) = t.store.save_changes(&puts);
    result.unwrap();
    assert_eq!(applied, n + 10);
    let deletes: Vec<ChangeRecord> = (1..=5)
        .map(|i| change(n + 10 + i, vec![delete_trxn(&format!("KSC_{i}"))]))
        .collect();
    let (applied, result) = t.store.save_changes(&deletes);
    result.unwrap();
    assert_eq!(applied, n + 15);
    for i in 1..=5 {
        assert_eq!(value_of(&t.store, format!("KSC_{i}")), None);
    }
    for i in 6..=10 {
        assert_eq!(
            value_of(&t.store, format!("KSC_{i}")),
            Some(format!("VSC_{i}").into_bytes())
        );
    }
    assert_eq!(t.store.latest_applied_change_number().unwrap(), n + 15);
    t.store.close().unwrap();
    let store = reopen(t.dir.path(), synced());
    assert_eq!(store.latest_applied_change_number().unwrap(), n + 15);
    assert_eq!(value_of(&store, "KSC_1"), None);
    assert_eq!(value_of(&store, "KSC_6"), Some(b"VSC_6".to_vec()));
}

/// Port of Badger's TestSaveChangesForInterleavedPutAndDelete (BT:318-353).
#[test]
fn interleaved_puts_and_deletes_of_the_same_keys_leave_nothing() {
    let t = temp_store(synced());
    let changes = vec![
        change(1, vec![put_trxn("k0", "v")]),
        change(2, vec![delete_trxn("k0")]),
        change(3, vec![put_trxn("k1", "v")]),
        change(4, vec![delete_trxn("k1")]),
    ];
    let (applied, result) = t.store.save_changes(&changes);
    result.unwrap();
    assert_eq!(applied, 4);
    assert!(all_pairs(&t.store).is_empty());
}

/// Port of RocksDB's TestSaveChanges (RT:338-367) with RocksDB's own
/// numbering: dense per operation, a plain put costing two numbers.
#[test]
fn records_numbered_the_rocksdb_way_apply_and_advance_by_their_trxn_count() {
    let t = temp_store(synced());
    t.store
        .put(&[
            pair("ccKey_1", "x"),
            pair("ccKey_2", "x"),
            pair("ccKey_3", "x"),
        ])
        .unwrap();
    let mut start = 41;
    let mut changes = Vec::new();
    for i in 1..=3 {
        // A RocksDB master ships a put as [Delete(ttl CF), Put] and numbers
        // the batch by its first operation.
        let mut c = change(
            start,
            vec![
                delete_trxn(&format!("ccKey_{i}")),
                put_trxn(&format!("ddKey_{i}"), "v"),
            ],
        );
        // It also ships its own WriteBatch bytes, which we cannot verify and
        // must not mistake for ours.
        c.serialised_form = vec![0u8; 12 + i];
        start += 2;
        changes.push(c);
    }
    let (applied, result) = t.store.save_changes(&changes);
    result.unwrap();
    assert_eq!(applied, 41 + 2 * 3 - 1);
    for i in 1..=3 {
        assert_eq!(value_of(&t.store, format!("ccKey_{i}")), None);
        assert_eq!(
            value_of(&t.store, format!("ddKey_{i}")),
            Some(b"v".to_vec())
        );
    }
    // The next change the DKV loop asks for is `applied + 1`.
    assert_eq!(t.store.latest_applied_change_number().unwrap(), 46);
}

#[test]
fn changes_already_applied_are_skipped_when_delivered_again() {
    let t = temp_store(synced());
    let first = vec![
        change(1, vec![put_trxn("a", "1")]),
        change(2, vec![put_trxn("b", "2")]),
    ];
    t.store.save_changes(&first).1.unwrap();
    t.store.put(&[pair("a", "local")]).unwrap();
    let before = t.store.last_change_number();
    // Redelivery of 1..2 plus one new change.
    let mut again = first.clone();
    again.push(change(3, vec![put_trxn("c", "3")]));
    let (applied, result) = t.store.save_changes(&again);
    result.unwrap();
    assert_eq!(applied, 3);
    assert_eq!(
        value_of(&t.store, "a"),
        Some(b"local".to_vec()),
        "not re-applied"
    );
    assert!(t.store.last_change_number() > before);
    let (applied, result) = t.store.save_changes(&again);
    result.unwrap();
    assert_eq!(applied, 3);
}

#[test]
fn a_store_is_master_and_slave_at_once_and_keeps_both_numbers_apart() {
    let master = temp_store(synced());
    let middle = temp_store(synced());
    let leaf = temp_store(synced());
    for i in 0..20 {
        master
            .store
            .put(&[pair(format!("k{i}"), format!("v{i}"))])
            .unwrap();
    }
    master.store.delete(b"k3").unwrap();
    replicate_until_caught_up(&master.store, &middle.store, 7, |_| {}).unwrap();
    replicate_until_caught_up(&middle.store, &leaf.store, 5, |_| {}).unwrap();
    assert_eq!(all_pairs(&leaf.store), all_pairs(&master.store));
    assert_eq!(
        middle.store.latest_applied_change_number().unwrap(),
        master.store.latest_committed_change_number().unwrap()
    );
    // The middle store's own numbers are its own log positions.
    assert_eq!(
        leaf.store.latest_applied_change_number().unwrap(),
        middle.store.latest_committed_change_number().unwrap()
    );
    assert_ne!(
        middle.store.latest_committed_change_number().unwrap(),
        master.store.latest_committed_change_number().unwrap()
    );
}

/// Port of DKV's slave loop test (SLT:595-639), with our numbers: ten puts,
/// pulled in batches of 2, 4 and 10; the lag goes to 0.
#[test]
fn the_slave_loop_reports_a_shrinking_lag_that_reaches_zero() {
    let master = temp_store(synced());
    let slave = temp_store(synced());
    for i in 1..=10 {
        master
            .store
            .put(&[pair(format!("K{i}"), format!("V{i}"))])
            .unwrap();
    }
    let latest = master.store.latest_committed_change_number().unwrap();
    let changes = master.store.load_changes(0, 100).unwrap();
    let last_of = |i: usize| changes[i].change_number + u64::from(changes[i].number_of_trxns) - 1;
    let p = replicate(&master.store, &slave.store, 2).unwrap();
    assert_eq!(
        (p.changes, p.applied, p.lag),
        (2, last_of(1), latest - last_of(1))
    );
    let p = replicate(&master.store, &slave.store, 4).unwrap();
    assert_eq!(
        (p.changes, p.applied, p.lag),
        (4, last_of(5), latest - last_of(5))
    );
    let p = replicate(&master.store, &slave.store, 10).unwrap();
    assert_eq!((p.changes, p.applied, p.lag), (4, latest, 0));
    let p = replicate(&master.store, &slave.store, 10).unwrap();
    assert_eq!((p.changes, p.lag), (0, 0), "a caught-up slave gets nothing");
    assert_eq!(all_pairs(&slave.store), all_pairs(&master.store));
}

#[test]
fn a_master_behind_its_slave_is_reported_as_dkv_does() {
    let master = temp_store(synced());
    let slave = temp_store(synced());
    slave
        .store
        .save_changes(&[change(100, vec![put_trxn("a", "1")])])
        .1
        .unwrap();
    master.store.put(&[pair("x", "y")]).unwrap();
    let err = replicate(&master.store, &slave.store, 10).unwrap_err();
    assert!(matches!(err, Error::MasterBehind { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("change number of the master node can not be lesser than the change number of the slave node")
    );
}

#[test]
fn changes_older_than_the_log_holds_are_a_typed_error_naming_the_oldest() {
    let t = temp_store(Options {
        segment_size: 4096,
        ..synced()
    });
    for i in 0..100 {
        t.store
            .put(&[pair(format!("key{i:03}"), vec![b'v'; 80])])
            .unwrap();
    }
    let all = t.store.load_changes(0, 1000).unwrap();
    t.store.close().unwrap();
    // An operator (or, later, merge) removed the oldest segment.
    let oldest = std::fs::read_dir(t.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .min()
        .unwrap();
    std::fs::remove_file(oldest).unwrap();
    let store = reopen(t.dir.path(), synced());
    let err = store.load_changes(1, 10).unwrap_err();
    let Error::ChangesCompacted {
        requested,
        oldest_available,
    } = err
    else {
        panic!("expected ChangesCompacted, got {err}");
    };
    assert_eq!(requested, 1);
    assert!(oldest_available > 1);
    // From the oldest available on, the feed is intact and matches.
    let rest = store.load_changes(oldest_available, 1000).unwrap();
    let last = rest[0].change_number + u64::from(rest[0].number_of_trxns) - 1;
    assert!(
        last >= oldest_available,
        "the first record holds the oldest number"
    );
    assert_eq!(rest.last(), all.last());
    // `from == 0` means "the oldest available".
    assert_eq!(store.load_changes(0, 1).unwrap()[0], rest[0]);
}

#[test]
fn a_corrupted_serialised_form_is_refused_and_nothing_is_applied() {
    let master = temp_store(synced());
    master.store.put(&[pair("a", "1"), pair("b", "2")]).unwrap();
    let good = master.store.load_changes(0, 1).unwrap().remove(0);
    let slave = temp_store(synced());
    let mut cases: Vec<(&str, ChangeRecord)> = Vec::new();
    let mut flipped = good.clone();
    let at = flipped.serialised_form.len() - 3;
    flipped.serialised_form[at] ^= 0x40;
    cases.push(("bad checksum", flipped));
    let mut truncated = good.clone();
    truncated.serialised_form.truncate(60);
    truncated.trxns.clear();
    cases.push(("truncated", truncated));
    let mut lying = good.clone();
    // Payload length claims more than there is (header checksum then fails).
    lying.serialised_form[4] = 0xff;
    cases.push(("lying length", lying));
    let mut unknown = change(1, vec![put_trxn("a", "1")]);
    unknown.trxns[0].r#type = 7;
    cases.push(("unknown trxn type", unknown));
    let mut empty_key = change(1, vec![put_trxn("", "1")]);
    empty_key.trxns[0].key.clear();
    cases.push(("empty key", empty_key));
    cases.push(("nothing at all", change(1, vec![])));
    for (label, bad) in cases {
        let before = slave.store.last_change_number();
        let (applied, result) = slave.store.save_changes(&[bad]);
        let err = result.expect_err(label);
        assert!(matches!(err, Error::InvalidChange { .. }), "{label}: {err}");
        assert_eq!(applied, 0, "{label}");
        assert_eq!(
            slave.store.last_change_number(),
            before,
            "{label}: something was written"
        );
        assert!(all_pairs(&slave.store).is_empty(), "{label}");
    }
    // The intact record applies.
    slave.store.save_changes(&[good]).1.unwrap();
    assert_eq!(all_pairs(&slave.store).len(), 2);
}

#[test]
fn the_first_bad_change_stops_the_call_and_keeps_what_came_before() {
    let slave = temp_store(synced());
    let mut bad = change(3, vec![put_trxn("c", "3")]);
    bad.trxns[0].r#type = 9;
    let changes = vec![
        change(1, vec![put_trxn("a", "1")]),
        change(2, vec![put_trxn("b", "2")]),
        bad,
        change(4, vec![put_trxn("d", "4")]),
    ];
    let (applied, result) = slave.store.save_changes(&changes);
    assert!(matches!(
        result,
        Err(Error::InvalidChange {
            change_number: 3,
            ..
        })
    ));
    assert_eq!(applied, 2);
    assert_eq!(slave.store.latest_applied_change_number().unwrap(), 2);
    assert_eq!(value_of(&slave.store, "b"), Some(b"2".to_vec()));
    assert_eq!(value_of(&slave.store, "d"), None);
}

#[test]
fn a_change_of_only_unknown_operations_still_advances_the_applied_number() {
    let slave = temp_store(synced());
    let unknown = TrxnRecord::default();
    let (applied, result) = slave
        .store
        .save_changes(&[change(5, vec![unknown.clone(), unknown])]);
    result.unwrap();
    assert_eq!(applied, 6);
    slave.store.close().unwrap();
    let store = reopen(slave.dir.path(), synced());
    assert_eq!(store.latest_applied_change_number().unwrap(), 6);
    // Chained on, it is one unknown operation ending at its record's end.
    let feed = store.load_changes(0, 10).unwrap();
    assert_eq!(feed.len(), 1);
    assert_eq!(feed[0].number_of_trxns, 1);
    assert_eq!(feed[0].trxns[0].r#type, TrxnType::Unknown as i32);
    assert_eq!(
        feed[0].change_number,
        store.latest_committed_change_number().unwrap()
    );
}

/// Records a master never synced are not served: their numbers could be
/// given to other records after a crash.
#[test]
fn the_feed_serves_only_durable_records() {
    let t = temp_store(test_options()); // SyncMode::Never
    t.store.put(&[pair("a", "1")]).unwrap();
    assert_eq!(t.store.latest_committed_change_number().unwrap(), 0);
    assert!(t.store.load_changes(0, 10).unwrap().is_empty());
    t.store.sync().unwrap();
    assert_eq!(t.store.load_changes(0, 10).unwrap().len(), 1);
    assert_eq!(
        t.store.latest_committed_change_number().unwrap(),
        t.store.last_change_number()
    );
}

/// One random master write: a put (maybe expiring), a batch, a delete of a
/// live key, or a compare-and-set (create or swap).
fn random_master_write(rng: &mut Rng, store: &Store) {
    let key = |rng: &mut Rng| format!("k{:02}", rng.below(40));
    let value = |rng: &mut Rng| {
        let len = rng.below(60) as usize;
        (0..len)
            .map(|_| b'a' + rng.below(26) as u8)
            .collect::<Vec<u8>>()
    };
    // Expiry an hour in the past (invisible at once) or a day ahead.
    let expiry = |rng: &mut Rng| match rng.below(6) {
        0 => now() - 3600,
        1 => now() + 86_400,
        _ => 0,
    };
    match rng.below(10) {
        0..=3 => {
            let (k, v, e) = (key(rng), value(rng), expiry(rng));
            store.put(&[pair_ttl(k, v, e)]).unwrap();
        }
        4..=5 => {
            let batch: Vec<_> = (0..1 + rng.below(5))
                .map(|_| pair_ttl(key(rng), value(rng), expiry(rng)))
                .collect();
            store.put(&batch).unwrap();
        }
        6..=7 => {
            store.delete(key(rng).as_bytes()).unwrap();
        }
        _ => {
            let k = key(rng);
            let old = value_of(store, &k).unwrap_or_default();
            let old = if rng.below(4) == 0 {
                b"stale".to_vec()
            } else {
                old
            };
            store
                .compare_and_set(&dkv_cask::serverpb::CompareAndSetRequest {
                    key: k.into_bytes(),
                    old_value: old,
                    new_value: value(rng),
                    expire_ts: expiry(rng),
                })
                .unwrap();
        }
    }
}

/// Runs DKV's loop by hand once, so the test sees every record received.
fn pull(master: &Store, slave: &Store, batch: usize, received: &mut Vec<ChangeRecord>) -> usize {
    let applied = slave.latest_applied_change_number().unwrap();
    let from = applied + 1;
    if from > master.latest_committed_change_number().unwrap() {
        return 0;
    }
    let changes = master.load_changes(from, batch).unwrap();
    if let Some(first) = changes.first() {
        // The first record is the one whose range holds `from`.
        let last = first.change_number + u64::from(first.number_of_trxns) - 1;
        assert!(
            last >= from,
            "record ending at {last} was already applied ({applied})"
        );
    }
    let (now_applied, result) = slave.save_changes(&changes);
    result.unwrap();
    if let Some(last) = changes.last() {
        assert_eq!(
            now_applied,
            last.change_number + u64::from(last.number_of_trxns) - 1
        );
    }
    received.extend(changes.iter().cloned());
    changes.len()
}

#[test]
fn random_workloads_replicate_exactly_across_reopens_without_a_gap_or_a_repeat() {
    let mut rng = Rng::from_env("replication property");
    for round in 0..12 {
        let options = Options {
            segment_size: 8 << 10,
            ..synced()
        };
        let master_dir = scratch_dir();
        let slave_dir = scratch_dir();
        let mut master = Store::open(master_dir.path(), options.clone()).unwrap();
        let mut slave = Store::open(slave_dir.path(), options.clone()).unwrap();
        let mut received = Vec::new();
        for _ in 0..250 {
            match rng.below(20) {
                0..=11 => random_master_write(&mut rng, &master),
                12..=16 => {
                    let batch = 1 + rng.below(12) as usize;
                    pull(&master, &slave, batch, &mut received);
                }
                17 => {
                    master.close().unwrap();
                    master = Store::open(master_dir.path(), options.clone()).unwrap();
                }
                _ => {
                    slave.close().unwrap();
                    slave = Store::open(slave_dir.path(), options.clone()).unwrap();
                }
            }
        }
        while pull(&master, &slave, 1 + rng.below(30) as usize, &mut received) > 0 {}
        assert_eq!(
            slave.latest_applied_change_number().unwrap(),
            master.latest_committed_change_number().unwrap(),
            "round {round}"
        );
        assert_eq!(contents(&slave), contents(&master), "round {round}");
        // Every record of the master's log was received exactly once.
        assert_eq!(
            received,
            master.load_changes(0, usize::MAX).unwrap(),
            "round {round}"
        );
    }
}

#[test]
fn a_slave_that_crashes_mid_save_changes_resumes_from_what_its_data_holds() {
    let master = temp_store(synced());
    let mut history = History::new(&master.store);
    let mut rng = Rng::from_env("slave crash");
    for _ in 0..60 {
        let w = Write::random(&mut rng, &history.model, 30, 40);
        history.run(&master.store, w).unwrap();
    }
    let options = Options {
        segment_size: 8 << 10,
        ..synced()
    };
    let slave_dir = scratch_dir();
    {
        let slave = Store::open(slave_dir.path(), options.clone()).unwrap();
        replicate_until_caught_up(&master.store, &slave, 7, |_| {}).unwrap();
        slave.close().unwrap();
    }
    let newest = segment_files(slave_dir.path()).pop().unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    let end = data_end(&bytes);
    // Every cut across the last records the slave appended.
    let from = end.saturating_sub(700).max(SEGMENT_HEADER_BYTES as usize);
    for cut in from..=end {
        let image = copy_store(slave_dir.path());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(same_file_in(&newest, image.path()))
            .unwrap();
        file.set_len(cut as u64).unwrap();
        drop(file);
        let slave = Store::open(image.path(), options.clone()).unwrap();
        let applied = slave.latest_applied_change_number().unwrap();
        assert!(history.is_boundary(applied), "cut {cut}: applied {applied}");
        assert_eq!(
            contents(&slave),
            *history.state_at(applied),
            "cut {cut}: the data does not match applied number {applied}"
        );
        replicate_until_caught_up(&master.store, &slave, 5, |_| {}).unwrap();
        assert_eq!(
            contents(&slave),
            history.model,
            "cut {cut}: did not converge"
        );
    }
}

#[test]
fn retention_keeps_what_bytes_age_and_pins_ask_for() {
    use dkv_cask::Retention;
    use std::time::Duration;
    let keep_nothing = Retention {
        bytes: 0,
        age: Duration::ZERO,
        honour_pins: true,
    };
    let t = temp_store(Options {
        retention: keep_nothing.clone(),
        segment_size: 4096,
        ..synced()
    });
    for i in 0..100 {
        t.store
            .put(&[pair(format!("k{i:03}"), vec![b'v'; 50])])
            .unwrap();
    }
    let durable = t.store.durable_change_number();
    // Nothing is wanted: everything up to the durable end may go.
    assert_eq!(t.store.retained_from().unwrap(), durable + 1);
    // A pinned follower keeps what it has not confirmed.
    t.store.pin_changes("slave-a", 500);
    t.store.pin_changes("slave-b", 900);
    assert_eq!(t.store.retained_from().unwrap(), 500);
    t.store.unpin_changes("slave-a");
    assert_eq!(t.store.retained_from().unwrap(), 900);
    t.store.close().unwrap();

    // The byte rule keeps the newest `bytes` of log.
    let store = reopen(
        t.dir.path(),
        Options {
            retention: Retention {
                bytes: 1000,
                ..keep_nothing.clone()
            },
            segment_size: 4096,
            ..synced()
        },
    );
    assert_eq!(store.retained_from().unwrap(), durable - 1000 + 1);
    store.close().unwrap();

    // The age rule keeps every segment written within the hour: all of them.
    let store = reopen(
        t.dir.path(),
        Options {
            retention: Retention {
                age: Duration::from_secs(3600),
                ..keep_nothing
            },
            segment_size: 4096,
            ..synced()
        },
    );
    assert_eq!(store.retained_from().unwrap(), 1);
    // Pins are ignored when the options say so.
    let ignoring = temp_store(Options {
        retention: Retention::none(),
        ..synced()
    });
    ignoring.store.put(&[pair("a", "b")]).unwrap();
    ignoring.store.pin_changes("slave", 1);
    assert_eq!(
        ignoring.store.retained_from().unwrap(),
        ignoring.store.durable_change_number() + 1
    );
}

/// A change record the master serves, encoded with prost, carries DKV's
/// field numbers (`serverpb.ChangeRecord`: serialisedForm = 1,
/// changeNumber = 2, numberOfTrxns = 3, trxns = 4; `TrxnRecord`: type = 1,
/// key = 2, value = 3, expireTS = 4), checked against a hand-built encoding.
#[test]
fn served_change_records_encode_with_dkv_field_numbers() {
    use prost::Message;
    let t = temp_store(synced());
    t.store.put(&[pair_ttl("k", "v", 300)]).unwrap();
    let c = t.store.load_changes(0, 1).unwrap().remove(0);
    let form = &c.serialised_form;
    let varint = |mut n: u64| {
        let mut out = Vec::new();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out
    };
    let trxn = [
        &[0x08, 1][..],      // type = Put
        &[0x12, 1, b'k'],    // key
        &[0x1a, 1, b'v'],    // value
        &[0x20, 0xac, 0x02], // expireTS = 300
    ]
    .concat();
    let mut expected = vec![0x0a];
    expected.extend(varint(form.len() as u64));
    expected.extend(form);
    expected.push(0x10);
    expected.extend(varint(c.change_number));
    expected.extend([0x18, 1, 0x22, trxn.len() as u8]);
    expected.extend(trxn);
    assert_eq!(c.encode_to_vec(), expected);
    assert_eq!(ChangeRecord::decode(&expected[..]).unwrap(), c);
}

/// The feed stops at the durable position without reading past it: the
/// bytes after it may be a group being copied in at this very moment (at
/// every rollover the old segment's end becomes durable while the new
/// segment's first record is copied), and a half-copied record header used
/// to be reported as corruption. Here the record after the durable position
/// is garbage, as a half-done copy would leave it.
#[test]
fn the_feed_never_reads_past_the_durable_position() {
    let dir = scratch_dir();
    let store = Store::open(
        dir.path(),
        Options {
            sync_mode: SyncMode::Never,
            ..Options::default()
        },
    )
    .unwrap();
    store.put(&[pair("durable", "value")]).unwrap();
    store.sync().unwrap();
    let durable = store.latest_committed_change_number().unwrap();
    store.put(&[pair("written", "value")]).unwrap();
    assert_eq!(store.latest_committed_change_number().unwrap(), durable);
    // The unsynced record's header, torn.
    let segment = segment_files(dir.path()).pop().unwrap();
    let offset = SEGMENT_HEADER_BYTES + durable - segment_base(&segment);
    overwrite(&segment, offset, &[0xA5; 16]);

    let changes = store.load_changes(1, 100).expect("the feed ends cleanly");
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].change_number, durable);
}
