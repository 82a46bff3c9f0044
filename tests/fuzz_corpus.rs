//! Runs every fuzz target's body over its committed seed corpus, so the
//! properties the fuzzers check are also checked by `cargo test`.

use std::fs;
use std::path::Path;

use dkv_cask::format::{RecordBuilder, SegmentHeader, SegmentKind};
use dkv_cask::{SegmentId, fuzzing};

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
