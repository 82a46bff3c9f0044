//! Runs every fuzz target's body over its committed seed corpus, so the
//! properties the fuzzers check are also checked by `cargo test`.

use std::fs;
use std::path::Path;
use std::time::Duration;

use dkv_cask::format::{RecordBuilder, SegmentHeader, SegmentKind};
use dkv_cask::serverpb::KvPair;
use dkv_cask::{
    ChangePropagator, KvStore, MergeOptions, Options, Retention, SegmentId, Store, SyncMode,
    fuzzing,
};
use prost::Message;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.into_iter().map(|p| fs::read(p).unwrap()).collect()
}

/// The seeds: a segment header followed by records, a lone record, a lone
/// operation, and damaged copies of each.
fn seeds() -> Vec<Vec<u8>> {
    let header = SegmentHeader {
        kind: SegmentKind::Log,
        id: SegmentId(3),
        base_position: 4096,
    }
    .encode()
    .to_vec();
    let mut b = RecordBuilder::new(None);
    b.push_put(b"key", b"value", 0);
    b.push_delete(b"gone");
    let record = b.stamp(4096, 4000).1.to_vec();
    let mut b = RecordBuilder::new(Some(99));
    b.push_put(b"ttl", b"", 1_700_000_000);
    let applied = b.stamp(4096 + record.len() as u64, 4096).1.to_vec();
    let segment = [header.clone(), record.clone(), applied.clone()].concat();
    let op = record[40..].to_vec();
    let mut flipped = segment.clone();
    flipped[50] ^= 0x10;
    vec![
        segment,
        record,
        applied,
        op,
        flipped,
        header,
        Vec::new(),
        real_keydir_file(),
    ]
}

/// Puts `n` small pairs `k0`, `k1`, ...; every other one expires (far in
/// the future).
fn put_small_pairs(store: &Store, n: u8) {
    for i in 0..n {
        store
            .put(&[KvPair {
                key: vec![b'k', i],
                value: vec![i; 3],
                expire_ts: u64::from(i % 2) * 4_000_000_000,
            }])
            .unwrap();
    }
}

/// The keydir file a small real store saves when it is closed.
fn real_keydir_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Options::default()).unwrap();
    put_small_pairs(&store, 4);
    store.close().unwrap();
    let bytes = fs::read(dir.path().join(dkv_cask::KEYDIR_FILE)).unwrap();
    assert!(dkv_cask::format::KeydirFile::decode(&bytes).is_ok());
    bytes
}

#[test]
fn record_decode_holds_its_properties_over_the_seed_corpus() {
    if std::env::var_os("DKV_WRITE_CORPUS").is_some() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/record_decode");
        for (i, s) in seeds().iter().enumerate() {
            fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
    let corpus = corpus("record_decode");
    assert!(
        corpus.len() >= seeds().len(),
        "seed corpus is missing files"
    );
    for input in corpus.iter().chain(seeds().iter()) {
        fuzzing::record_decode(input);
        // Every prefix too: truncation must never panic either.
        for len in 0..input.len().min(256) {
            fuzzing::record_decode(&input[..len]);
        }
    }
}

/// A small real store: its records (segment header stripped), a snapshot
/// stream of it, and its change feed as length-delimited messages.
fn real_store_material() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        Options {
            sync_mode: SyncMode::Always,
            preallocate: false,
            ..Options::default()
        },
    )
    .unwrap();
    put_small_pairs(&store, 8);
    store.delete(&[b'k', 3]).unwrap();
    let mut snapshot = Vec::new();
    std::io::Read::read_to_end(&mut store.get_snapshot().unwrap(), &mut snapshot).unwrap();
    let mut feed = Vec::new();
    for c in store.load_changes(0, 100).unwrap() {
        c.encode_length_delimited(&mut feed).unwrap();
    }
    store.close().unwrap();
    let segment = fs::read(SegmentId(1).path_in(dir.path())).unwrap();
    (segment[32..].to_vec(), snapshot, feed)
}

/// Runs one fuzz body, which must stay quick: the fuzzers run it millions
/// of times. (Generous against a slow test machine; each takes a few ms.)
fn timed(body: impl FnOnce()) {
    let started = std::time::Instant::now();
    body();
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "one execution took {took:?}"
    );
}

fn write_seeds(target: &str, seeds: &[Vec<u8>]) {
    if std::env::var_os("DKV_WRITE_CORPUS").is_some() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
}

/// A real store's files at two moments: the bodies of its log segments
/// (headers stripped) before a merge; then the body of the merged segment
/// the merge wrote (both headers stripped), the end of the log range it
/// covers, and the body of the log segment written after.
struct MergedMaterial {
    logs: Vec<Vec<u8>>,
    merged: Vec<u8>,
    merged_end: u16,
    after: Vec<u8>,
}

fn merged_store_material() -> MergedMaterial {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        sync_mode: SyncMode::Never,
        segment_size: 4096,
        preallocate: false,
        retention: Retention::none(),
        merge: MergeOptions {
            automatic: false,
            ..MergeOptions::default()
        },
        ..Options::default()
    };
    let store = Store::open(dir.path(), options.clone()).unwrap();
    for round in 0..5u8 {
        for i in 0..24u8 {
            let expire_ts = match i % 6 {
                0 => 1_000, // long expired
                1 => 4_000_000_000,
                _ => 0,
            };
            store
                .put(&[KvPair {
                    key: vec![b'k', i],
                    value: vec![round; 40],
                    expire_ts,
                }])
                .unwrap();
        }
        store.delete(&[b'k', 3 + round]).unwrap();
    }
    store.sync().unwrap();
    let stats = store.stats().unwrap();
    assert!(stats.segments.len() >= 3, "{stats:?}");
    let header = SegmentKind::Log.records_start();
    let logs = stats
        .segments
        .iter()
        .map(|s| fs::read(s.id.path_in(dir.path())).unwrap()[header..].to_vec())
        .collect();
    let report = store.merge().unwrap();
    assert_eq!(report.runs, 1, "{report:?}");
    store
        .put(&[KvPair {
            key: b"k\x05".to_vec(),
            value: b"after the merge".to_vec(),
            expire_ts: 0,
        }])
        .unwrap();
    store.delete(b"k\x06").unwrap();
    store.sync().unwrap();
    let stats = store.stats().unwrap();
    let [merged, active] = &stats.segments[..] else {
        panic!("{stats:?}")
    };
    assert_eq!(merged.kind, SegmentKind::Merged);
    let start = SegmentKind::Merged.records_start();
    let material = MergedMaterial {
        logs,
        merged: fs::read(merged.id.path_in(dir.path())).unwrap()[start..].to_vec(),
        merged_end: u16::try_from(merged.end_position).unwrap(),
        after: fs::read(active.id.path_in(dir.path())).unwrap()[header..].to_vec(),
    };
    store.close().unwrap();
    material
}

/// `open_dir`'s first byte for the described layout: `files` segments
/// (1 to 4) and the recovery mode (0 strict, 1 torn tail, 2 any damage).
fn described(files: u8, mode: u8) -> Vec<u8> {
    vec![(mode << 6) | 0x04 | (files - 1)]
}

/// A hint file's `ctl` bits in `open_dir`'s described layout.
const NO_HINT: u8 = 0;
const RAW_HINT: u8 = 1 << 2;
const TRUE_HINT: u8 = 2 << 2;
const DOCTORED_HINT: u8 = 3 << 2;
const MADE_UP_HINT: u8 = 4 << 2;
const LOG: u8 = 1;
const MERGED: u8 = 2;
const MERGED_OVER_ALL: u8 = 3;
const LEFTOVERS: u8 = 0xe0;

#[test]
fn open_dir_holds_its_properties_over_the_seed_corpus() {
    let (records, _, _) = real_store_material();
    let m = merged_store_material();
    let file = fuzzing::described_file;
    let mut damaged = m.merged.clone();
    damaged[100] ^= 0x08;
    let seeds = vec![
        [vec![0x40], records.clone()].concat(),
        [vec![0x81], records.clone(), records.clone()].concat(),
        [vec![0x02], records[..records.len() / 2].to_vec()].concat(),
        vec![0xc3; 300],
        vec![0x00],
        // A merged segment and the log after it, as a merge leaves them.
        [
            described(2, 1),
            file(MERGED | TRUE_HINT, &m.merged, m.merged_end, 0, &[]),
            file(LOG, &m.after, 0, 0, &[]),
        ]
        .concat(),
        // A crash after a merge committed, before its run was removed.
        [
            described(4, 0),
            file(LOG | TRUE_HINT, &m.logs[0], 0, 0, &[]),
            file(LOG | DOCTORED_HINT, &m.logs[1], 0, 0x5a, &[]),
            file(LOG | NO_HINT, &m.logs[2], 0, 0, &[]),
            file(MERGED_OVER_ALL | TRUE_HINT, &m.merged, m.merged_end, 7, &[]),
        ]
        .concat(),
        // Bytes that are no hint, as a merged segment's hint: never
        // read (merged segments are read whole), removed at open.
        [
            described(2, 1),
            file(MERGED | RAW_HINT, &m.merged, m.merged_end, 0, &m.after),
            file(LOG | LEFTOVERS, &m.after, 0, 0, &[]),
        ]
        .concat(),
        // Log segments with doctored and made-up hints.
        [
            described(4, 0),
            file(LOG | DOCTORED_HINT, &m.logs[0], 0, 0x15, &[]),
            file(LOG | MADE_UP_HINT, &m.logs[1], 0, 0x22, &[]),
            file(LOG | DOCTORED_HINT | LEFTOVERS, &m.logs[2], 0, 0x33, &[]),
            file(LOG, &m.logs[3..].concat(), 0, 0, &[]),
        ]
        .concat(),
        // A doctored merged hint, and a made-up one over a damaged merged
        // segment, opened tolerating damage.
        [
            described(3, 2),
            file(MERGED | DOCTORED_HINT, &m.merged, m.merged_end, 0xa3, &[]),
            file(LOG | MADE_UP_HINT, &m.after, 0, 0x3c, &[]),
            file(LOG, b"", 0, 0, &[]),
        ]
        .concat(),
        [
            described(2, 2),
            file(MERGED | MADE_UP_HINT, &damaged, m.merged_end, 0x01, &[]),
            file(LOG, &m.after, 0, 0, &[]),
        ]
        .concat(),
    ];
    write_seeds("open_dir", &seeds);
    for input in corpus("open_dir").iter().chain(seeds.iter()) {
        timed(|| fuzzing::open_dir(input));
    }
}

#[test]
fn snapshot_stream_holds_its_properties_over_the_seed_corpus() {
    let (_, snapshot, _) = real_store_material();
    let mut flipped = snapshot.clone();
    flipped[50] ^= 4;
    let seeds = vec![
        snapshot.clone(),
        snapshot[..snapshot.len() - 5].to_vec(),
        flipped,
        snapshot[..40].to_vec(),
    ];
    write_seeds("snapshot_stream", &seeds);
    for input in corpus("snapshot_stream").iter().chain(seeds.iter()) {
        fuzzing::snapshot_stream(input);
    }
}

#[test]
fn change_records_hold_their_properties_over_the_seed_corpus() {
    let (_, _, feed) = real_store_material();
    let mut flipped = feed.clone();
    let at = feed.len() / 2;
    flipped[at] ^= 0x10;
    let seeds = vec![
        feed.clone(),
        flipped,
        feed[..feed.len() / 3].to_vec(),
        vec![0x0a; 64],
    ];
    write_seeds("change_records", &seeds);
    for input in corpus("change_records").iter().chain(seeds.iter()) {
        fuzzing::change_records(input);
    }
}

/// `ops_model` steps that fill several segments: `n` puts of long values
/// over the eight keys, some expiring, every fifth a delete.
fn fill_steps(n: u8) -> Vec<u8> {
    let mut steps = Vec::new();
    for i in 0..n {
        if i % 5 == 4 {
            steps.extend_from_slice(&[5, i / 3 + 1]);
        } else {
            steps.extend_from_slice(&[i % 4, i, 39, i % 7]);
        }
    }
    steps
}

/// `ops_model`'s merge steps.
const MERGE: [u8; 2] = [9, 3];
const MERGE_AND_REOPEN: [u8; 2] = [9, 5];
fn merge_run(at: u8, len: u8) -> [u8; 4] {
    [9, 4, at, len - 1]
}
/// Merges a run and stops after `step` (0 written, 1 committed, 2
/// applied), then reopens.
fn crashed_merge_run(at: u8, len: u8, step: u8) -> [u8; 5] {
    [9, 6, at, len - 1, step]
}
fn crashed_merge(step: u8) -> [u8; 3] {
    [9, 7, step]
}

/// A power loss: `how % 3` 0 keeps only what was synced, 1 everything, 2
/// random prefixes of unsynced changes (seeded by `how`).
fn power_loss(how: u8) -> [u8; 3] {
    [9, 8, how]
}
/// The `n`-th next I/O call fails (EIO for even `n`, ENOSPC for odd) in a
/// put of key `key` (`what` 0), a merge (1) or a backup (2).
fn failing(n: u8, key: u8, what: u8) -> [u8; 5] {
    [9, 9, n, key, what]
}

#[test]
fn ops_model_holds_its_properties_over_the_seed_corpus() {
    // Every kind of step, including reopen, backup-restore and snapshot.
    let mut walk = Vec::new();
    for op in 0u8..30 {
        walk.extend_from_slice(&[op, op.wrapping_mul(7), op % 4, op % 3]);
    }
    let seeds = vec![
        walk,
        vec![0, 1, 5, 0, 6, 1, 1, 7, 1, 9, 1, 7, 1, 8],
        vec![9, 0, 9, 1, 9, 2, 4, 3, 8],
        (0u8..=255).collect(),
        // Merges of every kind between writes.
        [
            fill_steps(45),
            MERGE.to_vec(),
            fill_steps(45),
            merge_run(0, 2).to_vec(),
            fill_steps(45),
            merge_run(1, 1).to_vec(),
            MERGE_AND_REOPEN.to_vec(),
            fill_steps(30),
            vec![9, 1, 2], // backup and restore across merged segments
            merge_run(0, 3).to_vec(),
        ]
        .concat(),
        // Merges stopped after each step, as by a crash, and reopened.
        [
            fill_steps(50),
            crashed_merge(0).to_vec(),
            crashed_merge(1).to_vec(),
            fill_steps(45),
            crashed_merge_run(0, 2, 2).to_vec(),
            fill_steps(45),
            crashed_merge_run(1, 1, 1).to_vec(),
            crashed_merge_run(0, 2, 0).to_vec(),
            crashed_merge(2).to_vec(),
        ]
        .concat(),
        // A tombstone in a later segment than its value, merged on either
        // side, then everything.
        [
            vec![0, 2, 10, 2],
            fill_steps(50),
            vec![5, 2],
            fill_steps(50),
            merge_run(1, 1).to_vec(),
            vec![7, 2],
            merge_run(0, 1).to_vec(),
            vec![7, 2],
            MERGE_AND_REOPEN.to_vec(),
            vec![7, 2, 9, 2],
        ]
        .concat(),
        // Power losses of each kind, between writes and merges.
        [
            fill_steps(45),
            power_loss(0).to_vec(),
            fill_steps(20),
            power_loss(1).to_vec(),
            MERGE.to_vec(),
            fill_steps(30),
            power_loss(2).to_vec(),
            power_loss(5).to_vec(),
            fill_steps(30),
            crashed_merge(1).to_vec(),
            power_loss(0).to_vec(),
        ]
        .concat(),
        // A failing call at each of the first four of a put, a merge and
        // a backup.
        [
            fill_steps(30),
            failing(0, 1, 0).to_vec(),
            failing(1, 2, 0).to_vec(),
            failing(2, 3, 0).to_vec(),
            failing(3, 4, 0).to_vec(),
            fill_steps(30),
            failing(0, 0, 1).to_vec(),
            fill_steps(10),
            failing(1, 0, 1).to_vec(),
            fill_steps(10),
            failing(2, 0, 1).to_vec(),
            fill_steps(10),
            failing(3, 0, 1).to_vec(),
            failing(0, 0, 2).to_vec(),
            failing(1, 0, 2).to_vec(),
            failing(2, 0, 2).to_vec(),
            failing(3, 0, 2).to_vec(),
            power_loss(0).to_vec(),
        ]
        .concat(),
    ];
    write_seeds("ops_model", &seeds);
    for input in corpus("ops_model").iter().chain(seeds.iter()) {
        timed(|| fuzzing::ops_model(input));
    }
}
