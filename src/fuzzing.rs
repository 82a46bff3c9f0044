//! Bodies of the cargo-fuzz targets in `fuzz/`. They live in the library so
//! that ordinary tests run them over the committed seed corpus, and each
//! asserts the property its target checks. Not part of the stable API.

use crate::format::{
    OpKind, RecordBuilder, SEGMENT_HEADER_LEN, SegmentHeader, decode_op, decode_record,
};

/// `record_decode`: arbitrary bytes as a segment header, a record, an
/// operation and a whole segment. Decoding never panics, and whatever
/// decodes re-encodes to exactly the same bytes.
pub fn record_decode(data: &[u8]) {
    if let Ok(h) = SegmentHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..SEGMENT_HEADER_LEN]);
    }
    if let Ok(record) = decode_record(data) {
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
