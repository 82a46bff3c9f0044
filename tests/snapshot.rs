//! Whole-keyspace snapshots: a point-in-time stream out, a verified
//! replacement in; DKV's snapshot tests ported.

mod common;

use std::io::Read;

use common::disk::{Model, contents};
use common::*;
use dkv_cask::{ChangeApplier, Error, KvStore, Options, SyncMode, replicate_until_caught_up};

fn options() -> Options {
    Options {
        sync_mode: SyncMode::Always,
        ..test_options()
    }
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

/// Port of RocksDB's TestGetPutSnapshot (RT:643-670): loading a snapshot
/// replaces the keyspace; plain and expiring keys revert, later keys vanish.
#[test]
fn loading_a_snapshot_replaces_the_keyspace_with_its_contents() {
    let t = temp_store(options());
    let later = now() + 3600;
    for i in 0..100 {
        t.store
            .put(&[pair(format!("firSnapKey_{i}"), format!("v{i}"))])
            .unwrap();
        t.store
            .put(&[pair_ttl(
                format!("firSnapTTLKey_{i}"),
                format!("t{i}"),
                later,
            )])
            .unwrap();
    }
    let before = contents(&t.store);
    let stream = read_all(t.store.get_snapshot().unwrap());
    for i in 0..100 {
        t.store
            .put(&[pair(format!("firSnapKey_{i}"), "changed")])
            .unwrap();
        t.store
            .put(&[pair_ttl(format!("firSnapTTLKey_{i}"), "changed", later)])
            .unwrap();
        t.store
            .put(&[pair(format!("secSnapKey_{i}"), "new")])
            .unwrap();
    }
    t.store.put_snapshot(&mut &stream[..]).unwrap();
    assert_eq!(contents(&t.store), before);
    let got = t.store.get(&[b"firSnapTTLKey_7"]).unwrap();
    assert_eq!(got[0].expire_ts, later, "expiry travels with the snapshot");
    // The replaced store keeps working and survives a reopen.
    t.store.put(&[pair("after", "load")]).unwrap();
    t.store.close().unwrap();
    let again = reopen(t.dir.path(), options());
    assert_eq!(value_of(&again, "after"), Some(b"load".to_vec()));
    assert_eq!(value_of(&again, "firSnapKey_3"), Some(b"v3".to_vec()));
}

/// Port of RocksDB's TestGetPutSnapshotTTLOnly (RT:672-695).
#[test]
fn a_snapshot_of_expiring_keys_only_reverts_them() {
    let t = temp_store(options());
    let later = now() + 3600;
    for i in 0..100 {
        t.store
            .put(&[pair_ttl(format!("ttl_{i}"), format!("v{i}"), later)])
            .unwrap();
    }
    let before = contents(&t.store);
    let stream = read_all(t.store.get_snapshot().unwrap());
    for i in 0..100 {
        t.store
            .put(&[pair(format!("secSnapKey_{i}"), "x")])
            .unwrap();
        t.store.delete(format!("ttl_{i}").as_bytes()).unwrap();
    }
    t.store.put_snapshot(&mut &stream[..]).unwrap();
    assert_eq!(contents(&t.store), before);
}

/// The stream is the keyspace at the moment it was opened, however much is
/// written, overwritten or deleted while it is read.
#[test]
fn a_snapshot_stands_at_one_point_while_writers_keep_writing() {
    let t = temp_store(Options {
        segment_size: 16 << 10,
        ..options()
    });
    for i in 0..2000 {
        t.store
            .put(&[pair(format!("k{i:05}"), format!("v{i}"))])
            .unwrap();
    }
    t.store.delete(b"k00010").unwrap();
    let at_open = contents(&t.store);
    let mut reader = t.store.snapshot().unwrap();
    let at = reader.change_number();
    assert_eq!(at, t.store.last_change_number());
    let mut stream = Vec::new();
    let mut chunk = [0u8; 512];
    let mut i = 0;
    loop {
        let n = reader.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        stream.extend_from_slice(&chunk[..n]);
        // Meanwhile: overwrite, delete, create, on both sides of the cursor.
        let k = format!("k{:05}", (i * 37) % 2000);
        match i % 3 {
            0 => t.store.put(&[pair(&k, "overwritten")]).unwrap(),
            1 => t.store.delete(k.as_bytes()).unwrap(),
            _ => t.store.put(&[pair(format!("new{i}"), "x")]).unwrap(),
        }
        i += 1;
    }
    drop(reader);
    assert!(i > 10, "writes happened during the read");
    let other = temp_store(options());
    other.store.put_snapshot(&mut &stream[..]).unwrap();
    assert_eq!(contents(&other.store), at_open);
    assert_eq!(other.store.latest_applied_change_number().unwrap(), at);
}

#[test]
fn expiring_keys_empty_values_and_large_values_round_trip() {
    let roomy = Options {
        segment_size: 8 << 20,
        max_batch_bytes: 4 << 20,
        ..options()
    };
    let t = temp_store(roomy.clone());
    let big = vec![0xAB; 1 << 20];
    t.store.put(&[pair_ttl("soon", "s", now() + 3600)]).unwrap();
    t.store.put(&[pair_ttl("gone", "g", now() - 10)]).unwrap();
    t.store.put(&[pair("empty", "")]).unwrap();
    t.store.put(&[pair("big", &big)]).unwrap();
    let stream = read_all(t.store.get_snapshot().unwrap());
    let other = temp_store(roomy);
    other.store.put_snapshot(&mut &stream[..]).unwrap();
    assert_eq!(value_of(&other.store, "big"), Some(big));
    assert_eq!(value_of(&other.store, "empty"), Some(Vec::new()));
    assert_eq!(value_of(&other.store, "soon"), Some(b"s".to_vec()));
    assert_eq!(
        value_of(&other.store, "gone"),
        None,
        "expired keys are not in snapshots"
    );
    let expected: Model = contents(&t.store);
    assert_eq!(contents(&other.store), expected);
}

/// A slave bootstraps from a master's snapshot taken while writers go on,
/// then replicates from the snapshot's change number + 1.
#[test]
fn a_slave_bootstrapped_from_a_snapshot_resumes_replication_right_after_it() {
    let master = temp_store(options());
    for i in 0..300 {
        master
            .store
            .put(&[pair(format!("m{i}"), format!("{i}"))])
            .unwrap();
    }
    let reader = master.store.snapshot().unwrap();
    let at = reader.change_number();
    for i in 300..400 {
        master
            .store
            .put(&[pair(format!("m{i}"), format!("{i}"))])
            .unwrap();
        master
            .store
            .delete(format!("m{}", i - 300).as_bytes())
            .unwrap();
    }
    let stream = read_all(reader);
    let slave = temp_store(options());
    slave.store.put(&[pair("stale", "slave data")]).unwrap();
    slave.store.put_snapshot(&mut &stream[..]).unwrap();
    assert_eq!(slave.store.latest_applied_change_number().unwrap(), at);
    assert_eq!(value_of(&slave.store, "stale"), None);
    let p = replicate_until_caught_up(&master.store, &slave.store, 50, |_| {}).unwrap();
    assert_eq!(p.lag, 0);
    assert_eq!(contents(&slave.store), contents(&master.store));
}

fn sample_stream() -> (TempStore, Vec<u8>) {
    let t = temp_store(options());
    for i in 0..20 {
        t.store
            .put(&[pair(format!("key{i}"), format!("value-{i}"))])
            .unwrap();
    }
    let stream = read_all(t.store.get_snapshot().unwrap());
    (t, stream)
}

/// Loads `stream` into a store holding one key; the load must fail with a
/// typed error and leave the key alone.
fn refused(stream: &[u8], label: &str) {
    let t = temp_store(options());
    t.store.put(&[pair("keep", "me")]).unwrap();
    let before = t.store.last_change_number();
    let err = t.store.put_snapshot(&mut &stream[..]).expect_err(label);
    assert!(
        matches!(err, Error::InvalidSnapshot { .. }),
        "{label}: {err}"
    );
    assert_eq!(contents(&t.store).len(), 1, "{label}");
    assert_eq!(value_of(&t.store, "keep"), Some(b"me".to_vec()), "{label}");
    assert_eq!(t.store.last_change_number(), before, "{label}");
    // No staging folder is left beside the store.
    let parent = t.dir.path().parent().unwrap();
    let name = t
        .dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let leftovers = std::fs::read_dir(parent)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}."))
        })
        .count();
    assert_eq!(leftovers, 0, "{label}");
}

#[test]
fn malformed_streams_are_refused_and_change_nothing() {
    let (_t, good) = sample_stream();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    refused(&bad_magic, "bad magic");
    let mut version = good.clone();
    version[8] = 2;
    refused(&version, "bad version (header checksum)");
    let mut lying = good.clone();
    lying[40..44].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
    refused(&lying, "lying length");
    let mut flipped = good.clone();
    flipped[60] ^= 0x20;
    refused(&flipped, "bad checksum");
    let n = good.len();
    let mut count = good.clone();
    count[n - 12] ^= 1;
    refused(&count, "count mismatch");
    let mut extra = good.clone();
    extra.push(0);
    refused(&extra, "bytes after the trailer");
    for len in [0, 10, 39, 40, 45, 60, n - 13, n - 1] {
        refused(&good[..len], &format!("truncated at {len}"));
    }
}

#[test]
fn random_and_mutated_streams_never_panic_and_never_change_the_store() {
    let (_t, good) = sample_stream();
    let target = temp_store(options());
    target.store.put(&[pair("keep", "me")]).unwrap();
    let mut rng = Rng::from_env("snapshot fuzz");
    for round in 0..300 {
        let stream = match round % 3 {
            0 => {
                let len = rng.below(200) as usize;
                rng.bytes(len)
            }
            1 => {
                let mut s = good.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(s.len() as u64) as usize;
                    s[at] = rng.next_u64() as u8;
                }
                s
            }
            _ => good[..rng.below(good.len() as u64) as usize].to_vec(),
        };
        if stream == good {
            continue;
        }
        let result = target.store.put_snapshot(&mut &stream[..]);
        assert!(result.is_err(), "round {round}: a damaged stream loaded");
        assert_eq!(contents(&target.store).len(), 1, "round {round}");
    }
}

#[test]
fn a_snapshot_load_refuses_to_run_beside_a_backup() {
    let (_t, good) = sample_stream();
    let t = temp_store(options());
    // A restore paused at its first step holds the global flag.
    let backup = t.dir.path().join("backup");
    dkv_cask::Backupable::backup_to(&t.store, &backup).unwrap();
    let mut inner = None;
    let _ = dkv_cask::restore_with_hook(&t.store, &backup, &mut |_| {
        inner = Some(t.store.put_snapshot(&mut &good[..]));
        false
    });
    assert!(matches!(inner, Some(Err(Error::GlobalMutationInProgress))));
    t.store.put_snapshot(&mut &good[..]).unwrap();
    assert_eq!(contents(&t.store).len(), 20);
}
