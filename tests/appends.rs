//! How records reach the active segment (DESIGN.md 2.4): copied into a
//! shared map of the file (`Options::map_appends`, the default) or written
//! with `pwrite`. Either way an acknowledged write is in the file at once,
//! where a process crash cannot take it; an unpreallocated segment is
//! extended a step ahead of its records, and a full disk fails that step
//! with a typed error before any byte is copied.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use common::disk::*;
use common::*;
use dkv_cask::{Error, FaultInjector, InjectedError, KvStore, Options, Store, SyncMode};

/// The step an unpreallocated segment grows by ahead of its records.
const STEP: u64 = 1 << 20;

fn options(sync_mode: SyncMode, map_appends: bool) -> Options {
    Options {
        sync_mode,
        map_appends,
        segment_size: 64 << 10,
        max_batch_bytes: 32 << 10,
        ..Options::default()
    }
}

/// Single puts, a batch larger than the copy limit, and a batch larger
/// than a whole segment (which goes into a segment of its own, past the
/// segment's size).
fn write_all_sizes(store: &Store) -> Model {
    let mut model = Model::new();
    let mut put = |pairs: Vec<(String, Vec<u8>)>| {
        let batch: Vec<_> = pairs.iter().map(|(k, v)| pair(k, v)).collect();
        store.put(&batch).expect("put");
        for (k, v) in pairs {
            model.insert(k.into_bytes(), v);
        }
    };
    for i in 0..200u32 {
        put(vec![(format!("single-{i:04}"), vec![i as u8; 90])]);
    }
    put((0..30u32)
        .map(|i| (format!("batch-{i:02}"), vec![i as u8; 200]))
        .collect());
    put(vec![("big".to_string(), vec![7; 30 << 10])]);
    put(vec![("after-big".to_string(), b"small".to_vec())]);
    model
}

/// The length of the newest segment file in `dir`.
fn newest_segment_len(dir: &Path) -> u64 {
    let newest = segment_files(dir).pop().expect("a segment");
    fs::metadata(newest).expect("stat segment").len()
}

#[test]
fn every_acknowledged_write_is_in_the_files_at_once_so_a_process_crash_keeps_it() {
    for sync_mode in [SyncMode::Never, SyncMode::Always] {
        for map_appends in [true, false] {
            let label = format!("{sync_mode:?}, map_appends {map_appends}");
            let t = temp_store(options(sync_mode, map_appends));
            let model = write_all_sizes(&t.store);
            // Copying the files of the open store reads the page cache:
            // what a kill -9 at this moment would leave.
            let crashed = copy_store(t.dir.path());
            let store = reopen(crashed.path(), options(sync_mode, map_appends));
            assert!(contents(&store) == model, "{label}: the copy lost writes");
            assert!(store.recovery_report().skipped.is_empty(), "{label}");
            assert!(contents(&t.store) == model, "{label}: the store itself");
        }
    }
}

#[test]
fn an_unpreallocated_segment_grows_a_step_ahead_of_its_records_not_to_its_full_size() {
    let options = Options {
        sync_mode: SyncMode::Never,
        ..Options::default()
    };
    let t = temp_store(options.clone());
    t.store.put(&[pair("first", "value")]).unwrap();
    assert_eq!(newest_segment_len(t.dir.path()), STEP);
    // About 1.2 steps of records.
    for i in 0..10_000u32 {
        t.store.put(&[pair(format!("k{i:05}"), [1; 100])]).unwrap();
    }
    assert_eq!(newest_segment_len(t.dir.path()), 2 * STEP);
    let model = contents(&t.store);
    t.store.close().unwrap();

    // The zeros after the records are free space, not damage, whether the
    // next open reads the keydir file or scans the segment.
    let store = reopen(t.dir.path(), options.clone());
    assert!(store.recovery_report().from_keydir_file);
    assert!(contents(&store) == model);
    store.close().unwrap();
    remove_hints(t.dir.path());
    let store = reopen(t.dir.path(), options);
    let report = store.recovery_report();
    assert!(
        report.skipped.is_empty() && report.truncated.is_none(),
        "{report:?}"
    );
    assert!(contents(&store) == model);
}

#[test]
fn appending_with_pwrite_grows_the_file_record_by_record() {
    let t = temp_store(Options {
        sync_mode: SyncMode::Never,
        map_appends: false,
        ..Options::default()
    });
    t.store.put(&[pair("first", "value")]).unwrap();
    let after_one = newest_segment_len(t.dir.path());
    t.store.put(&[pair("second", "value")]).unwrap();
    let after_two = newest_segment_len(t.dir.path());
    assert!(after_one < 4096, "{after_one}");
    assert!(after_two > after_one);
}

#[test]
fn a_full_disk_while_extending_the_segment_fails_that_write_with_enospc_and_loses_nothing() {
    for kind in [InjectedError::NoSpace, InjectedError::Eio] {
        // Written with `pwrite`, the active segment ends at its records, so
        // the first append through the map must extend it first.
        let dir = scratch_dir();
        let store = Store::open(dir.path(), options(SyncMode::Never, false)).unwrap();
        let model = write_all_sizes(&store);
        store.close().unwrap();

        let faults = Arc::new(FaultInjector::new());
        let store = Store::open(
            dir.path(),
            Options {
                fault_injector: Some(Arc::clone(&faults)),
                ..options(SyncMode::Never, true)
            },
        )
        .unwrap();
        faults.fail_after(0, kind);
        let err = store.put(&[pair("refused", "value")]).unwrap_err();
        match &err {
            Error::Io { context, .. } => {
                assert!(context.contains("extend segment"), "{kind:?}: {err}");
            }
            other => panic!("{kind:?}: expected an I/O error, got {other}"),
        }
        assert_eq!(faults.fired(), 1);
        // The writer is poisoned, reads go on.
        assert!(matches!(
            store.put(&[pair("later", "value")]),
            Err(Error::Poisoned { .. })
        ));
        assert!(
            contents(&store) == model,
            "{kind:?}: reads after the failure"
        );
        assert!(matches!(store.close(), Err(Error::Poisoned { .. })));

        let store = reopen(dir.path(), options(SyncMode::Never, true));
        assert!(contents(&store) == model, "{kind:?}: after reopen");
        store.put(&[pair("accepted", "value")]).unwrap();
        assert_eq!(value_of(&store, "accepted"), Some(b"value".to_vec()));
    }
}
