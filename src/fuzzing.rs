//! Bodies of the cargo-fuzz targets in `fuzz/`. They live in the library so
//! that ordinary tests run them over the committed seed corpus, and each
//! asserts the property its target checks. Not part of the stable API.

use crate::format::{
    Hint, HintBuilder, MergeHeader, MergedBuilder, OP_HEADER_LEN, OpKind, RecordBuilder,
    RecordKind, SEGMENT_HEADER_LEN, SegmentHeader, decode_op, decode_record,
};

/// `record_decode`: arbitrary bytes as a segment header, a merge header, a
/// record (batch or merged), an operation, a hint file and a whole segment.
/// Decoding never panics, and whatever decodes re-encodes to exactly the
/// same bytes.
pub fn record_decode(data: &[u8]) {
    if let Ok(h) = SegmentHeader::decode(data) {
        if data[8..10] == crate::format::FORMAT_VERSION.to_le_bytes() {
            assert_eq!(&h.encode()[..], &data[..SEGMENT_HEADER_LEN]);
        } else {
            // An older version reads the same and is written as this one.
            assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
        }
    }
    if let Ok(m) = MergeHeader::decode(data) {
        assert_eq!(
            &m.encode()[..],
            &data[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + crate::format::MERGE_HEADER_LEN]
        );
    }
    if let Ok(hint) = Hint::decode(data) {
        let mut b = HintBuilder::new(&hint.header);
        for e in hint.entries() {
            b.push(&e);
        }
        let starts: Vec<u32> = hint.record_starts().collect();
        assert_eq!(b.finish(&starts), data);
    }
    if let Ok(record) = decode_record(data)
        && record.header.kind == RecordKind::Merged
    {
        let mut b = MergedBuilder::default();
        for (at, cn, op) in record.entries() {
            let at = at as usize;
            b.push(
                cn,
                &data[at..at + OP_HEADER_LEN + op.key.len() + op.value.len()],
            );
        }
        assert_eq!(b.finish(), record.bytes());
    } else if let Ok(record) = decode_record(data) {
        let mut b = RecordBuilder::new(record.applied);
        for (_, op) in record.ops() {
            match op.kind {
                OpKind::Put => b.push_put(op.key, op.value, op.expire_ts),
                OpKind::Delete => b.push_delete(op.key),
            };
        }
        let start = record.header.change_number - record.header.record_len();
        let (cn, bytes) = b.stamp(start, record.header.synced_position);
        assert_eq!(cn, record.header.change_number);
        assert_eq!(bytes, record.bytes());
    }
    if let Ok((op, len)) = decode_op(data) {
        let mut b = RecordBuilder::new(None);
        let at = match op.kind {
            OpKind::Put => b.push_put(op.key, op.value, op.expire_ts),
            OpKind::Delete => b.push_delete(op.key),
        } as usize;
        assert_eq!(&b.as_bytes()[at..at + len], &data[..len]);
    }
    // As a segment: read records one after another until one fails.
    let mut at = SEGMENT_HEADER_LEN.min(data.len());
    while let Ok(r) = decode_record(&data[at..]) {
        at += r.bytes().len();
    }
}

/// Options for the fuzz bodies' throwaway stores: small, unpreallocated
/// segments and no syncs, so one execution costs little.
fn scratch_options() -> crate::Options {
    crate::Options {
        sync_mode: crate::SyncMode::Never,
        segment_size: 16 << 10,
        preallocate: false,
        max_batch_bytes: 8 << 10,
        ..crate::Options::default()
    }
}

/// `open_dir`: arbitrary bytes become the segment files of a store folder
/// (the first byte says how many, up to four; odd ones get a valid segment
/// header in front, so the record decoder is reached). `Store::open`
/// returns a store or a typed error, never panics; a store that opens can
/// be iterated and written, and reopens.
pub fn open_dir(data: &[u8]) {
    use crate::KvStore;
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let files = 1 + usize::from(first % 4);
    let chunk = rest.len() / files + 1;
    let mut base = 0u64;
    for (i, part) in rest.chunks(chunk).enumerate() {
        let id = crate::SegmentId(i as u32 + 1);
        let mut bytes = Vec::new();
        if i % 2 == 0 {
            bytes.extend_from_slice(
                &SegmentHeader {
                    kind: crate::format::SegmentKind::Log,
                    id,
                    base_position: base,
                }
                .encode(),
            );
        }
        bytes.extend_from_slice(part);
        base += part.len() as u64;
        if std::fs::write(id.path_in(dir.path()), &bytes).is_err() {
            return;
        }
    }
    let options = crate::Options {
        recovery_mode: match first >> 6 {
            0 => crate::RecoveryMode::Strict,
            1 => crate::RecoveryMode::TolerateTornTail,
            _ => crate::RecoveryMode::TolerateAnyCorruption,
        },
        ..scratch_options()
    };
    let Ok(store) = crate::Store::open(dir.path(), options.clone()) else {
        return;
    };
    let count = store
        .iter(&crate::IterationOptions::new())
        .map(|it| it.take(10_000).count())
        .unwrap_or(0);
    let _ = count;
    let wrote = store.put(&[crate::serverpb::KvPair {
        key: b"fuzz".to_vec(),
        value: b"ok".to_vec(),
        expire_ts: 0,
    }]);
    let _ = store.close();
    if wrote.is_ok() {
        let again =
            crate::Store::open(dir.path(), options).expect("a store that took a write reopens");
        let got = again.get(&[b"fuzz"]).expect("get after reopen");
        assert_eq!(got.len(), 1, "an acknowledged write survives a reopen");
    }
}

/// `snapshot_stream`: arbitrary bytes as a stream for `put_snapshot`. It
/// either loads or fails with a typed error; a failed load leaves the
/// store exactly as it was.
pub fn snapshot_stream(data: &[u8]) {
    use crate::KvStore;
    let Ok(dir) = tempfile::tempdir() else { return };
    let db = dir.path().join("db");
    let store = crate::Store::open(&db, scratch_options()).expect("open a scratch store");
    store
        .put(&[crate::serverpb::KvPair {
            key: b"keep".to_vec(),
            value: b"me".to_vec(),
            expire_ts: 0,
        }])
        .expect("seed the scratch store");
    let before = store.last_change_number();
    match store.put_snapshot(&mut &data[..]) {
        Ok(()) => {}
        Err(e) => {
            assert!(
                matches!(
                    e,
                    crate::Error::InvalidSnapshot { .. } | crate::Error::BatchTooLarge { .. }
                ),
                "untyped failure: {e}"
            );
            assert_eq!(store.last_change_number(), before, "a failed load wrote");
            let kept = store.get(&[b"keep"]).expect("get after a failed load");
            assert_eq!(kept.len(), 1, "a failed load changed the keyspace");
        }
    }
    let _ = store.close();
}

/// `change_records`: arbitrary bytes as length-delimited `ChangeRecord`s
/// for `save_changes`. No panic; the applied number never goes down, never
/// passes the last change's number, and a failure is a typed error.
pub fn change_records(data: &[u8]) {
    use crate::{ChangeApplier, KvStore};
    use prost::Message;
    let mut changes = Vec::new();
    let mut buf = data;
    while !buf.is_empty() && changes.len() < 64 {
        match crate::serverpb::ChangeRecord::decode_length_delimited(&mut buf) {
            Ok(c) => changes.push(c),
            Err(_) => break,
        }
    }
    let Ok(dir) = tempfile::tempdir() else { return };
    let store = crate::Store::open(dir.path(), scratch_options()).expect("open a scratch store");
    let (applied, result) = store.save_changes(&changes);
    let highest = changes
        .iter()
        .map(|c| {
            c.change_number
                .saturating_add(u64::from(c.number_of_trxns.max(1)) - 1)
        })
        .max()
        .unwrap_or(0);
    assert!(
        applied <= highest,
        "applied {applied} beyond the changes given"
    );
    assert_eq!(
        store.latest_applied_change_number().expect("applied"),
        applied
    );
    if let Err(e) = result {
        assert!(
            matches!(
                e,
                crate::Error::InvalidChange { .. } | crate::Error::BatchTooLarge { .. }
            ),
            "untyped failure: {e}"
        );
    }
    let _ = store.close();
}

/// `ops_model`: arbitrary bytes as a sequence of puts, batches, deletes,
/// compare-and-sets, gets, iterations, reopens, backup-and-restore and
/// snapshot round trips, checked against a `BTreeMap` model after every
/// step. (Crashes and injected I/O failures need the simulated file system
/// the reliability harness adds.)
pub fn ops_model(data: &[u8]) {
    use crate::serverpb::{CompareAndSetRequest, KvPair};
    use crate::{Backupable, IterationOptions, KvStore};
    use std::collections::BTreeMap;

    const NOW: u64 = 1_000_000;
    let key = |b: Option<u8>| vec![b'k', b.unwrap_or(0) % 8];
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let Ok(dir) = tempfile::tempdir() else { return };
    let db = dir.path().join("db");
    let options = crate::Options {
        clock: crate::Clock::manual(NOW),
        ..scratch_options()
    };
    let mut store = crate::Store::open(&db, options.clone()).expect("open");
    let mut model: BTreeMap<Vec<u8>, (Vec<u8>, u64)> = BTreeMap::new();
    let live = |m: &BTreeMap<Vec<u8>, (Vec<u8>, u64)>, k: &[u8]| {
        m.get(k)
            .filter(|(_, e)| *e == 0 || *e > NOW)
            .map(|(v, _)| v.clone())
    };
    let mut steps = 0;
    while let Some(op) = next() {
        steps += 1;
        if steps > 200 {
            break;
        }
        match op % 10 {
            0..=3 => {
                let k = key(next());
                let len = usize::from(next().unwrap_or(0) % 40);
                let v: Vec<u8> = (0..len).map(|i| i as u8 ^ op).collect();
                let e = match next().unwrap_or(0) % 4 {
                    0 => NOW - 10,
                    1 => NOW + 1000,
                    _ => 0,
                };
                store
                    .put(&[KvPair {
                        key: k.clone(),
                        value: v.clone(),
                        expire_ts: e,
                    }])
                    .expect("put");
                model.insert(k, (v, e));
            }
            4 => {
                let n = 1 + next().unwrap_or(0) % 4;
                let batch: Vec<KvPair> = (0..n)
                    .map(|i| KvPair {
                        key: key(next()),
                        value: vec![i; usize::from(i)],
                        expire_ts: 0,
                    })
                    .collect();
                store.put(&batch).expect("batch");
                for p in batch {
                    model.insert(p.key, (p.value, 0));
                }
            }
            5 => {
                let k = key(next());
                store.delete(&k).expect("delete");
                model.remove(&k);
            }
            6 => {
                let k = key(next());
                let current = live(&model, &k);
                let old = match next().unwrap_or(0) % 3 {
                    0 => Vec::new(),
                    1 => current.clone().unwrap_or_default(),
                    _ => b"stale".to_vec(),
                };
                let expected = match &current {
                    None => old.is_empty(),
                    Some(_) if old.is_empty() => false,
                    Some(v) => *v == old,
                };
                let new = vec![op; 3];
                let swapped = store
                    .compare_and_set(&CompareAndSetRequest {
                        key: k.clone(),
                        old_value: old,
                        new_value: new.clone(),
                        expire_ts: 0,
                    })
                    .expect("cas");
                assert_eq!(swapped, expected, "compare-and-set of {k:?}");
                if swapped {
                    model.insert(k, (new, 0));
                }
            }
            7 => {
                let k = key(next());
                let got = store.get(&[&k]).expect("get").pop().map(|p| p.value);
                assert_eq!(got, live(&model, &k), "get of {k:?}");
            }
            8 => {
                let got: Vec<(Vec<u8>, Vec<u8>)> = store
                    .iter(&IterationOptions::new().with_prefix(b"k".to_vec()))
                    .expect("iterate")
                    .map(|p| p.map(|p| (p.key, p.value)).expect("item"))
                    .collect();
                let want: Vec<(Vec<u8>, Vec<u8>)> = model
                    .iter()
                    .filter(|(_, (_, e))| *e == 0 || *e > NOW)
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(got, want, "iteration");
            }
            _ => match next().unwrap_or(0) % 3 {
                0 => {
                    store.close().expect("close");
                    store = crate::Store::open(&db, options.clone()).expect("reopen");
                }
                1 => {
                    let backup = dir.path().join("backup");
                    store.backup_to(&backup).expect("backup");
                    let saved = model.clone();
                    let k = key(next());
                    store
                        .put(&[KvPair {
                            key: k.clone(),
                            value: b"after".to_vec(),
                            expire_ts: 0,
                        }])
                        .expect("put after backup");
                    store = store.restore_from(&backup).expect("restore");
                    model = saved;
                }
                _ => {
                    let mut stream = Vec::new();
                    std::io::Read::read_to_end(
                        &mut store.get_snapshot().expect("snapshot"),
                        &mut stream,
                    )
                    .expect("read snapshot");
                    let saved: BTreeMap<_, _> = model
                        .iter()
                        .filter(|(_, (_, e))| *e == 0 || *e > NOW)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    store.delete(b"k\x01").expect("delete");
                    store.put_snapshot(&mut &stream[..]).expect("load snapshot");
                    model = saved;
                }
            },
        }
    }
    let _ = store.close();
}
