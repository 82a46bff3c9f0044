//! Runs every fuzz target's body over its committed seed corpus, so the
//! properties the fuzzers check are also checked by `cargo test`.

use std::fs;
use std::path::Path;

use dkv_cask::format::{RecordBuilder, SegmentHeader, SegmentKind};
use dkv_cask::serverpb::KvPair;
use dkv_cask::{ChangePropagator, KvStore, Options, SegmentId, Store, SyncMode, fuzzing};
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
    vec![segment, record, applied, op, flipped, header, Vec::new()]
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
    for i in 0..8u8 {
        store
            .put(&[KvPair {
                key: vec![b'k', i],
                value: vec![i; 3],
                expire_ts: u64::from(i % 2) * 4_000_000_000,
            }])
            .unwrap();
    }
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

#[test]
fn open_dir_holds_its_properties_over_the_seed_corpus() {
    let (records, _, _) = real_store_material();
    let seeds = vec![
        [vec![0x40], records.clone()].concat(),
        [vec![0x81], records.clone(), records.clone()].concat(),
        [vec![0x02], records[..records.len() / 2].to_vec()].concat(),
        vec![0xc3; 300],
        vec![0x00],
    ];
    write_seeds("open_dir", &seeds);
    for input in corpus("open_dir").iter().chain(seeds.iter()) {
        fuzzing::open_dir(input);
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
    ];
    write_seeds("ops_model", &seeds);
    for input in corpus("ops_model").iter().chain(seeds.iter()) {
        fuzzing::ops_model(input);
    }
}
