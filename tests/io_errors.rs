//! Failed writes, syncs, truncations, creates and directory syncs, injected
//! through `Options::fault_injector`. A failure must reach the caller whose
//! write it broke, poison the writer (later writes fail with
//! `Error::Poisoned`, reads keep working), and lose nothing acknowledged: a
//! reopen without the fault holds every acknowledged write and the failed
//! write either whole or not at all, and takes writes again. Outside
//! `SyncMode::Always` a write is promised durable only once synced: after a
//! failed sync the reopen keeps what was durable before it.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::disk::*;
use common::*;
use dkv_cask::serverpb::CompareAndSetRequest;
use dkv_cask::{
    Error, FaultInjector, InjectedError, KvStore, Options, SYNC_FAILED_FILE, Store, SyncMode,
};

fn options(sync_mode: SyncMode, faults: Option<&Arc<FaultInjector>>) -> Options {
    Options {
        sync_mode,
        segment_size: 4096,
        max_batch_bytes: 1024,
        fault_injector: faults.cloned(),
        ..Options::default()
    }
}

fn errno(kind: InjectedError) -> i32 {
    match kind {
        InjectedError::Eio => 5,
        InjectedError::NoSpace => 28,
    }
}

/// Asserts that `err` is the injected I/O error.
fn assert_injected(err: &Error, kind: InjectedError, label: &str) {
    match err {
        Error::Io { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(errno(kind)), "{label}: {err}");
        }
        other => panic!("{label}: expected the injected I/O error, got {other}"),
    }
}

/// Single puts, three-pair batches and deletes of earlier keys, about two
/// segments' worth, so the workload rolls over at least once.
fn workload() -> Vec<Write> {
    let value = |i: usize| format!("{i:03}").repeat(33).into_bytes();
    (0..40)
        .map(|i| match i % 4 {
            0 | 1 => Write::Put(vec![pair(format!("single{i:03}"), value(i))]),
            2 => Write::Put(
                (0..3)
                    .map(|j| pair(format!("batch{i:03}-{j}"), value(i + j)))
                    .collect(),
            ),
            _ => Write::Delete(format!("single{:03}", i - 3).into_bytes()),
        })
        .collect()
}

/// How a run of the workload ended.
struct Outcome {
    /// Contents after every acknowledged write.
    acked: Model,
    /// The write that failed (its index) and its error.
    failed: Option<(usize, Error)>,
}

/// Runs `writes` until one fails.
fn run(store: &Store, writes: &[Write]) -> Outcome {
    let mut acked = Model::new();
    for (i, w) in writes.iter().enumerate() {
        match w.run(store) {
            Ok(()) => w.apply_to(&mut acked),
            Err(e) => {
                return Outcome {
                    acked,
                    failed: Some((i, e)),
                };
            }
        }
    }
    Outcome {
        acked,
        failed: None,
    }
}

/// Checks that later writes of every kind are refused as poisoned.
fn assert_writes_refused(store: &Store, acked: &Model, label: &str) {
    let put = store.put(&[pair("after-failure", "x")]);
    assert!(
        matches!(put, Err(Error::Poisoned { .. })),
        "{label}: put gave {put:?}"
    );
    if let Some((key, value)) = acked.iter().next() {
        let cas = store.compare_and_set(&CompareAndSetRequest {
            key: key.clone(),
            old_value: value.clone(),
            new_value: b"swapped".to_vec(),
            expire_ts: 0,
        });
        assert!(
            matches!(cas, Err(Error::Poisoned { .. })),
            "{label}: CAS gave {cas:?}"
        );
        let delete = store.delete(key);
        assert!(
            matches!(delete, Err(Error::Poisoned { .. })),
            "{label}: delete gave {delete:?}"
        );
    }
}

/// Reopens `dir` without faults; checks the contents are one of `allowed`,
/// that a write works and that it survives another reopen.
fn assert_reopen_recovers(dir: &Path, sync_mode: SyncMode, allowed: &[&Model], label: &str) {
    let store = Store::open(dir, options(sync_mode, None))
        .unwrap_or_else(|e| panic!("{label}: reopen failed: {e}"));
    let got = contents(&store);
    assert!(
        allowed.contains(&&got),
        "{label}: reopened with {} keys, expected one of {:?} keys",
        got.len(),
        allowed.iter().map(|m| m.len()).collect::<Vec<_>>()
    );
    store
        .put(&[pair("after-reopen", label)])
        .unwrap_or_else(|e| panic!("{label}: write after reopen failed: {e}"));
    store.close().expect("close");
    let store = Store::open(dir, options(sync_mode, None)).expect("second reopen");
    let mut want = got;
    want.insert(b"after-reopen".to_vec(), label.as_bytes().to_vec());
    assert!(contents(&store) == want, "{label}: write after reopen lost");
    store.close().expect("close");
}

#[test]
fn every_failing_io_call_of_a_synced_workload_poisons_the_writer_and_loses_no_acknowledged_write() {
    let writes = workload();
    // An unarmed run counts the workload's I/O calls.
    let faults = Arc::new(FaultInjector::new());
    let dir = scratch_dir();
    let store = Store::open(dir.path(), options(SyncMode::Always, Some(&faults))).expect("open");
    let at_open = faults.calls();
    let clean = run(&store, &writes);
    assert!(clean.failed.is_none());
    let calls = faults.calls() - at_open;
    assert!(
        segment_files(dir.path()).len() >= 3,
        "the workload should roll over twice"
    );
    store.close().expect("close");

    for n in 0..calls {
        for kind in [InjectedError::Eio, InjectedError::NoSpace] {
            let label = format!("failing call {n} of {calls} with {kind:?}");
            let faults = Arc::new(FaultInjector::new());
            let dir = scratch_dir();
            let store =
                Store::open(dir.path(), options(SyncMode::Always, Some(&faults))).expect("open");
            faults.fail_after(n, kind);
            let outcome = run(&store, &writes);
            assert_eq!(faults.fired(), 1, "{label}: the fault did not fire");
            let (failed, err) = outcome
                .failed
                .unwrap_or_else(|| panic!("{label}: no write reported the failure"));
            // The write that hit the failure is told the injected error
            // itself, whichever call failed (its append, its sync, a
            // rollover's create or sync): ENOSPC and EIO call for
            // different remedies. Only later writes get `Poisoned`.
            assert_injected(&err, kind, &format!("{label}, write {failed}"));
            let mut with_failed = outcome.acked.clone();
            writes[failed].apply_to(&mut with_failed);
            let allowed = [&outcome.acked, &with_failed];

            assert_writes_refused(&store, &outcome.acked, &label);
            let seen = contents(&store);
            assert!(allowed.contains(&&seen), "{label}: reads after the failure");
            // Point reads agree with the iterator, key by key.
            for key in outcome.acked.keys().chain(with_failed.keys()) {
                assert_eq!(value_of(&store, key).as_ref(), seen.get(key), "{label}");
            }
            let closed = store.close();
            assert!(
                matches!(closed, Err(Error::Poisoned { .. })),
                "{label}: close gave {closed:?}"
            );
            assert_reopen_recovers(dir.path(), SyncMode::Always, &allowed, &label);
        }
    }
}

/// Reads keep showing every acknowledged write, but the reopen keeps only
/// what the last successful sync made durable: under `SyncMode::Never` the
/// later writes were never promised durable, and after a failed sync the
/// page cache cannot vouch for them (DESIGN.md, "After a failed fsync").
/// (Updated with the `SYNC-FAILED` marker: the reopen used to recover the
/// unsynced writes from the page cache.)
#[test]
fn a_failed_explicit_sync_poisons_the_writer_and_reads_keep_working() {
    let faults = Arc::new(FaultInjector::new());
    let dir = scratch_dir();
    let store = Store::open(dir.path(), options(SyncMode::Never, Some(&faults))).expect("open");
    let writes = workload();
    let synced = run(&store, &writes[..5]);
    assert!(synced.failed.is_none());
    store.sync().expect("sync");
    let mut acked = synced.acked.clone();
    for w in &writes[5..10] {
        w.run(&store).expect("write");
        w.apply_to(&mut acked);
    }
    faults.fail_after(0, InjectedError::Eio);
    let err = store.sync().expect_err("the sync should fail");
    assert_injected(&err, InjectedError::Eio, "sync");
    assert_writes_refused(&store, &acked, "after a failed sync");
    let again = store.sync();
    assert!(
        matches!(again, Err(Error::Poisoned { .. })),
        "a second sync gave {again:?}"
    );
    assert!(contents(&store) == acked);
    assert!(matches!(store.close(), Err(Error::Poisoned { .. })));
    assert_reopen_recovers(dir.path(), SyncMode::Never, &[&synced.acked], "failed sync");
}

#[test]
fn a_failed_background_sync_poisons_the_writer_and_the_next_write_reports_it() {
    let faults = Arc::new(FaultInjector::new());
    let dir = scratch_dir();
    let mode = SyncMode::Interval(Duration::from_millis(5));
    let store = Store::open(dir.path(), options(mode, Some(&faults))).expect("open");
    let before = run(&store, &workload()[..4]);
    assert!(before.failed.is_none());
    // With everything synced the syncer makes no call, so the next call is
    // this put's append and the one after it the syncer's sync.
    store.sync().expect("sync");
    faults.fail_after(1, InjectedError::NoSpace);
    store.put(&[pair("unsynced", "u")]).expect("put");
    let deadline = Instant::now() + Duration::from_secs(10);
    while faults.fired() == 0 {
        assert!(Instant::now() < deadline, "the background sync never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The failed sync may still be recording itself; a sync waits for it
    // (and never runs a second fsync after a failed one).
    let sync = store.sync();
    assert!(sync.is_err(), "a sync after the failed one gave {sync:?}");
    let put = store.put(&[pair("refused", "r")]);
    assert!(
        matches!(put, Err(Error::Poisoned { .. })),
        "put gave {put:?}"
    );
    let mut with_unsynced = before.acked.clone();
    with_unsynced.insert(b"unsynced".to_vec(), b"u".to_vec());
    assert!(contents(&store) == with_unsynced);
    assert!(matches!(store.close(), Err(Error::Poisoned { .. })));
    // An interval sync may lose the writes of its interval, never more.
    assert_reopen_recovers(
        dir.path(),
        mode,
        &[&before.acked, &with_unsynced],
        "failed background sync",
    );
}

/// Builds the folders an open has I/O work for: a new store, a torn tail
/// to cut, and a torn new segment to remove. Returns each with the contents
/// a successful open must show.
fn open_scenarios() -> Vec<(&'static str, tempfile::TempDir, Model)> {
    let writes = workload();
    let dir = scratch_dir();
    let store = Store::open(dir.path(), options(SyncMode::Never, None)).expect("open");
    let mut h = History::new(&store);
    for w in &writes[..30] {
        h.run(&store, w.clone()).expect("write");
    }
    store.close().expect("close");

    let torn_tail = copy_store(dir.path());
    let newest = segment_files(torn_tail.path()).pop().expect("segment");
    let last = h.records.last().expect("record");
    let extent = locate(torn_tail.path(), last.start, last.end);
    overwrite(&newest, extent.end - 3, &[0; 3]);

    let torn_segment = copy_store(dir.path());
    let next = segment_files(torn_segment.path()).len() + 1;
    let header = segment_header(next as u32, h.end());
    std::fs::write(
        torn_segment.path().join(format!("{next:010}.seg")),
        &header[..20],
    )
    .expect("write");

    vec![
        ("a new store", scratch_dir(), Model::new()),
        ("a torn tail", torn_tail, h.state_at(last.start).clone()),
        ("a torn new segment", torn_segment, h.model.clone()),
    ]
}

#[test]
fn a_failing_io_call_while_opening_fails_the_open_and_a_later_open_recovers_everything() {
    for (what, dir, want) in open_scenarios() {
        let unarmed = copy_store(dir.path());
        let faults = Arc::new(FaultInjector::new());
        let store =
            Store::open(unarmed.path(), options(SyncMode::Always, Some(&faults))).expect("open");
        assert!(contents(&store) == want, "{what}");
        let calls = faults.calls();
        assert!(calls > 0, "{what}: opening did no I/O to fail");
        drop(store);

        for n in 0..calls {
            for kind in [InjectedError::Eio, InjectedError::NoSpace] {
                let label = format!("{what}, failing call {n} of {calls} with {kind:?}");
                let image = copy_store(dir.path());
                let faults = Arc::new(FaultInjector::new());
                faults.fail_after(n, kind);
                match Store::open(image.path(), options(SyncMode::Always, Some(&faults))) {
                    Err(e) => assert_injected(&e, kind, &label),
                    Ok(_) => panic!("{label}: open succeeded"),
                }
                assert_eq!(faults.fired(), 1, "{label}");
                assert_reopen_recovers(image.path(), SyncMode::Always, &[&want], &label);
            }
        }
    }
}

/// The caller whose write hit `ENOSPC` needs to know it was `ENOSPC` (free
/// space) and not `EIO` (replace the disk). The write whose record
/// failed to append used to get `Error::Poisoned`, whose text named neither the
/// errno nor had a source, as if an earlier write had failed.
/// (Regression: the failed record's writers got `Poisoned`; now they get the
/// I/O error with its OS code.)
#[test]
fn the_write_whose_append_fails_gets_the_injected_io_error_itself() {
    for kind in [InjectedError::Eio, InjectedError::NoSpace] {
        let faults = Arc::new(FaultInjector::new());
        let dir = scratch_dir();
        let store =
            Store::open(dir.path(), options(SyncMode::Always, Some(&faults))).expect("open");
        faults.fail_after(0, kind);
        let err = store
            .put(&[pair("key", "value")])
            .expect_err("the append should fail");
        assert_injected(&err, kind, &format!("{kind:?}"));
    }
}

/// A model holding `pairs`.
fn model_of(pairs: &[(&str, &str)]) -> Model {
    pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// After a failed `fdatasync` the page cache may hold records the disk
/// never got, and Linux reports such a failure once only: a later open
/// reads those records back and its own sync succeeds. (Regression: the
/// reopen recovered `b`, whose sync had failed, declared it durable and
/// stamped later records as synced past it; a power loss that took `b`
/// then made the store refuse to open, acknowledged `c` and all. The failed
/// sync now leaves a `SYNC-FAILED` marker holding the last durable log
/// position, and the next open cuts everything after it.)
#[test]
fn a_failed_fsync_makes_the_next_open_cut_everything_that_was_never_durable() {
    let faults = Arc::new(FaultInjector::new());
    let dir = scratch_dir();
    let marker = dir.path().join(SYNC_FAILED_FILE);
    let store = Store::open(dir.path(), options(SyncMode::Always, Some(&faults))).expect("open");
    store.put(&[pair("a", "acked-before")]).expect("put a");
    let b_start = store.last_change_number();
    // The append succeeds, the fdatasync after it fails.
    faults.fail_after(1, InjectedError::Eio);
    let err = store
        .put(&[pair("b", "sync-failed")])
        .expect_err("b's sync fails");
    assert_injected(&err, InjectedError::Eio, "b");
    let b_end = store.last_change_number();
    assert!(b_end > b_start, "b was appended");
    assert!(marker.exists(), "the failed sync left no marker");
    assert!(matches!(store.close(), Err(Error::Poisoned { .. })));
    let b = locate(dir.path(), b_start, b_end);

    // What the disk holds if the power fails now: the marker (synced when
    // the sync failed), and zeros where b was going.
    let power_loss = copy_store(dir.path());
    overwrite(
        &same_file_in(&b.file, power_loss.path()),
        b.start,
        &vec![0; (b.end - b.start) as usize],
    );

    // The page cache still shows b whole; the reopen must not believe it.
    let store = Store::open(dir.path(), options(SyncMode::Always, None)).expect("reopen");
    let cut = store
        .recovery_report()
        .truncated
        .clone()
        .expect("the cut of b is reported");
    assert_eq!((&cut.file, cut.offset), (&b.file, b.start));
    assert!(cut.reason.contains("fsync"), "reason: {}", cut.reason);
    assert!(!marker.exists(), "the marker outlived the cut");
    assert!(contents(&store) == model_of(&[("a", "acked-before")]));
    store.put(&[pair("c", "acked-after")]).expect("put c");
    store.close().expect("close");

    let store = Store::open(dir.path(), options(SyncMode::Always, None)).expect("second reopen");
    assert_eq!(
        store.recovery_report().truncated,
        None,
        "the cut was not durable"
    );
    let a_and_c = model_of(&[("a", "acked-before"), ("c", "acked-after")]);
    assert!(contents(&store) == a_and_c);
    store.close().expect("close");

    // The power-loss image opens (c cannot be written there before the
    // open, since the cut gives b's log positions to the next record).
    let store = Store::open(power_loss.path(), options(SyncMode::Always, None))
        .expect("open after the power loss");
    assert!(contents(&store) == model_of(&[("a", "acked-before")]));
    assert!(!power_loss.path().join(SYNC_FAILED_FILE).exists());
    store.put(&[pair("c", "acked-after")]).expect("put c");
    store.close().expect("close");
    let store = Store::open(power_loss.path(), options(SyncMode::Always, None))
        .expect("reopen after the power loss");
    assert_eq!(store.recovery_report().truncated, None);
    assert!(contents(&store) == a_and_c);
}

/// Under `SyncMode::Always` a write counts only once durable, so readers
/// must not see it earlier: a put whose sync failed was reported to its
/// writer as failed, and a power loss may take it. (Regression: records
/// were published to the index before their `fdatasync` and never
/// withdrawn, so `get` returned the value of the failed put. Records are
/// now published only once their group's sync succeeded.)
#[test]
fn a_put_whose_sync_failed_is_not_visible_to_readers() {
    let faults = Arc::new(FaultInjector::new());
    let dir = scratch_dir();
    let store = Store::open(dir.path(), options(SyncMode::Always, Some(&faults))).expect("open");
    store.put(&[pair("k", "v1")]).expect("put v1");
    // The append succeeds, the fdatasync after it fails.
    faults.fail_after(1, InjectedError::Eio);
    let err = store
        .put(&[pair("k", "v2"), pair("new", "n")])
        .expect_err("the sync of v2 fails");
    assert_injected(&err, InjectedError::Eio, "put v2");
    assert_eq!(value_of(&store, "k"), Some(b"v1".to_vec()));
    assert_eq!(value_of(&store, "new"), None);
    assert!(contents(&store) == model_of(&[("k", "v1")]));
}

/// A merge that meets an I/O error at any of its calls reports it, leaves
/// no output behind, and changes nothing the store holds; a failure to sync
/// the folder after its rename poisons the writer (whether the commit is
/// durable is then unknown), and the reopen settles it either way.
#[test]
fn a_merge_failing_at_any_io_call_changes_nothing_and_leaves_no_output() {
    for kind in [InjectedError::Eio, InjectedError::NoSpace] {
        for n in 0.. {
            let faults = Arc::new(FaultInjector::new());
            let dir = tempfile::tempdir().unwrap();
            let mut opts = options(SyncMode::Never, Some(&faults));
            opts.retention = dkv_cask::Retention::none();
            opts.merge.automatic = false;
            let store = Store::open(dir.path(), opts.clone()).unwrap();
            let mut model = Model::new();
            for round in 0..3 {
                for i in 0..60 {
                    let v = format!("{round}-{i}").repeat(10).into_bytes();
                    store.put(&[pair(format!("k{i:02}"), &v)]).unwrap();
                    model.insert(format!("k{i:02}").into_bytes(), v);
                }
            }
            let sealed = sealed_ids(&store);
            assert!(sealed.len() >= 3);
            // Everything durable first: a failed sync of the log inside the
            // merge may then cost nothing (under `Never`, unsynced writes
            // are not promised to survive one).
            store.sync().unwrap();
            let calls_before = faults.calls();
            faults.fail_after(n, kind);
            let result = store.merge_segments(&sealed[..2], &mut |_| true);
            let fired = faults.fired() > 0;
            faults.disarm();
            if !fired {
                // Past the merge's last I/O call: it succeeded.
                result.unwrap();
                assert!(faults.calls() - calls_before <= n + 1);
                assert_eq!(contents(&store), model, "{kind:?}: the merge");
                break;
            }
            let label = format!("{kind:?}, I/O call {n} of the merge");
            let err = match result {
                Err(e) => e,
                Ok(_) => {
                    // The call that failed came after the commit, in a
                    // best-effort step (removing the merged-away files,
                    // writing the hint): the merge stands.
                    assert_eq!(contents(&store), model, "{label}");
                    drop(store);
                    let reopened = Store::open(dir.path(), opts).unwrap();
                    assert_eq!(contents(&reopened), model, "{label}: after reopen");
                    continue;
                }
            };
            assert_injected(&err, kind, &label);
            assert_eq!(contents(&store), model, "{label}: reads after the failure");
            let leftovers: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "merging"))
                .collect();
            assert!(leftovers.is_empty(), "{label}: {leftovers:?}");
            drop(store);
            let reopened = Store::open(dir.path(), opts).unwrap();
            assert_eq!(contents(&reopened), model, "{label}: after reopen");
            assert!(n < 50, "the merge never stopped failing");
        }
    }
}
