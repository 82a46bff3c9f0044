//! Backups (hard links of sealed segments plus a checksummed manifest) and
//! verified, crash-safe restores; DKV's `Backupable` tests ported.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::disk::{Model, contents};
use common::*;
use dkv_cask::{
    BACKUP_MANIFEST, Backupable, ChangePropagator, Error, FaultInjector, InjectedError, KvStore,
    Options, RestoreStep, Store, SyncMode, restore_with_hook, verify_backup,
    verify_backup_with_progress,
};

fn options() -> Options {
    Options {
        sync_mode: SyncMode::Always,
        ..test_options()
    }
}

fn put_keys(store: &Store, prefix: &str, n: usize) {
    for i in 1..=n {
        store
            .put(&[pair(format!("{prefix}_{i}"), format!("{prefix}-value-{i}"))])
            .unwrap();
    }
}

fn has_keys(store: &Store, prefix: &str, n: usize) -> bool {
    (1..=n).all(|i| {
        value_of(store, format!("{prefix}_{i}")) == Some(format!("{prefix}-value-{i}").into_bytes())
    })
}

fn no_keys(store: &Store, prefix: &str, n: usize) -> bool {
    (1..=n).all(|i| value_of(store, format!("{prefix}_{i}")).is_none())
}

/// Port of RocksDB's TestBackupAndRestore (RT:622-641): back up into a
/// folder inside the store's own, write more, restore.
#[test]
fn a_restore_brings_back_the_backup_and_drops_later_writes() {
    let t = temp_store(options());
    put_keys(&t.store, "brKey", 5);
    let backup = t.dir.path().join("backup");
    let info = t.store.backup_to(&backup).unwrap();
    assert!(info.change_number > 0);
    put_keys(&t.store, "mbrKey", 5);
    let restored = t.store.restore_from(&backup).unwrap();
    assert!(has_keys(&restored, "brKey", 5));
    assert!(no_keys(&restored, "mbrKey", 5));
    assert_eq!(restored.last_change_number(), info.change_number);
    // The old handle is closed; the backup inside the folder survived.
    assert!(matches!(t.store.get(&[b"brKey_1"]), Err(Error::Closed)));
    assert!(backup.join(BACKUP_MANIFEST).exists());
    verify_backup(&backup).unwrap();
    // Iteration after restore (RocksDB TestIterationOnExplicitSnapshot's
    // intent at the service level): exactly the backed-up keys.
    let keys: Vec<Vec<u8>> = all_pairs(&restored).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 5);
    // The restored store takes writes and keeps them.
    restored.put(&[pair("after", "restore")]).unwrap();
    restored.close().unwrap();
    let again = reopen(t.dir.path(), options());
    assert_eq!(value_of(&again, "after"), Some(b"restore".to_vec()));
}

/// Port of RocksDB's TestBackupFolderValidity (RT:607-613) under our rules.
#[test]
fn backup_paths_follow_dkv_rules() {
    let t = temp_store(options());
    let p = |s: &str| t.dir.path().join(s);
    assert!(matches!(
        t.store.backup_to(Path::new("")),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        t.store.backup_to(Path::new("  ")),
        Err(Error::InvalidPath { .. })
    ));
    let missing_parent = t.store.backup_to(&p("missing/backup")).unwrap_err();
    assert!(
        matches!(missing_parent, Error::Io { .. }),
        "{missing_parent}"
    );
    fs::write(p("a-file"), b"x").unwrap();
    assert!(matches!(
        t.store.backup_to(&p("a-file")),
        Err(Error::InvalidPath { .. })
    ));
    // A store's own folder is refused; a new folder and an existing one work.
    assert!(matches!(
        t.store.backup_to(t.dir.path()),
        Err(Error::InvalidPath { .. })
    ));
    t.store.backup_to(&p("new")).unwrap();
    fs::create_dir(p("existing")).unwrap();
    t.store.backup_to(&p("existing")).unwrap();
}

/// Port of RocksDB's TestRestoreFolderValidity (RT:615-620).
#[test]
fn restore_paths_follow_dkv_rules_and_leave_the_store_open() {
    let t = temp_store(options());
    t.store.put(&[pair("k", "v")]).unwrap();
    assert!(matches!(
        t.store.restore_from(Path::new("")),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        t.store.restore_from(&t.dir.path().join("missing")),
        Err(Error::Io { .. })
    ));
    fs::write(t.dir.path().join("f"), b"x").unwrap();
    assert!(matches!(
        t.store.restore_from(&t.dir.path().join("f")),
        Err(Error::InvalidPath { .. })
    ));
    let empty = t.dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(matches!(
        t.store.restore_from(&empty),
        Err(Error::InvalidBackup { .. })
    ));
    // Nothing was touched.
    assert_eq!(value_of(&t.store, "k"), Some(b"v".to_vec()));
}

/// Ports of TestPreventParallelBackups / TestPreventParallelRestores
/// (RT:736-801): of five at once, at most one succeeds, with DKV's text.
#[test]
fn concurrent_backups_and_restores_are_refused_with_dkvs_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("db"), options()).unwrap());
    for i in 0..500 {
        store
            .put(&[pair(format!("k{i}"), vec![b'v'; 100])])
            .unwrap();
    }
    let barrier = Arc::new(Barrier::new(5));
    let handles: Vec<_> = (0..5)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let path = dir.path().join(format!("backup-{i}"));
            std::thread::spawn(move || {
                barrier.wait();
                store.backup_to(&path).map(|_| ())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(ok >= 1, "{results:?}");
    for e in &refused {
        assert!(matches!(e, Error::GlobalMutationInProgress));
        assert_eq!(
            e.to_string(),
            "Another global keyspace mutation is in progress"
        );
    }
    // A restore while a "backup" holds the flag is refused at once; hold
    // the flag deterministically with a restore paused at its first step.
    let good = dir.path().join("backup-good");
    store.backup_to(&good).unwrap();
    let mut inner_result = None;
    let outer = restore_with_hook(&store, &good, &mut |step| {
        if step == RestoreStep::Verified {
            inner_result = Some(store.backup_to(&dir.path().join("during")).map(|_| ()));
            false
        } else {
            true
        }
    });
    assert!(outer.is_err(), "the hook stopped the restore");
    assert!(matches!(
        inner_result,
        Some(Err(Error::GlobalMutationInProgress))
    ));
    // The flag is released afterwards.
    store.backup_to(&dir.path().join("after")).unwrap();
}

/// The backup stands at exactly its change number while writers keep
/// writing: the restored store equals the log replayed up to it.
#[test]
fn a_backup_taken_while_writers_write_restores_exactly_its_change_number() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let store = Arc::new(
        Store::open(
            &db,
            Options {
                segment_size: 16 << 10,
                ..options()
            },
        )
        .unwrap(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("t{t}-k{}", i % 50);
                    if i % 7 == 3 {
                        store.delete(key.as_bytes()).unwrap();
                    } else {
                        store.put(&[pair(&key, format!("{i}"))]).unwrap();
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let backup = dir.path().join("backup");
    let info = store.backup_to(&backup).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    // The model: the live log replayed up to the backup's change number.
    let mut model = Model::new();
    for c in store.load_changes(0, usize::MAX).unwrap() {
        let last = c.change_number + u64::from(c.number_of_trxns) - 1;
        if last > info.change_number {
            break;
        }
        for t in &c.trxns {
            if t.r#type == 1 {
                model.insert(t.key.clone(), t.value.clone());
            } else {
                model.remove(&t.key);
            }
        }
    }
    assert!(
        store.last_change_number() > info.change_number,
        "writes continued"
    );
    let Ok(store) = Arc::try_unwrap(store) else {
        panic!("the writers still hold the store")
    };
    let restored = store.restore_from(&backup).unwrap();
    assert_eq!(contents(&restored), model);
    assert_eq!(restored.last_change_number(), info.change_number);
}

/// Hard links share inodes, and sealed segments are never written again,
/// so later writes to the live store never change a backup.
#[test]
fn later_writes_never_change_a_backup_made_of_hard_links() {
    let t = temp_store(Options {
        segment_size: 8 << 10,
        ..options()
    });
    for i in 0..200 {
        t.store
            .put(&[pair(format!("k{i:03}"), vec![b'a'; 60])])
            .unwrap();
    }
    let backup = t.dir.path().join("backup");
    let info = t.store.backup_to(&backup).unwrap();
    assert_eq!(info.linked, info.files.len(), "every file was linked");
    for f in &info.files {
        let live = fs::metadata(t.dir.path().join(&f.name)).unwrap();
        let copy = fs::metadata(backup.join(&f.name)).unwrap();
        assert_eq!(live.ino(), copy.ino(), "{} is a hard link", f.name);
        assert!(copy.nlink() >= 2);
    }
    for i in 0..400 {
        t.store
            .put(&[pair(format!("k{i:03}"), vec![b'b'; 60])])
            .unwrap();
        if i % 50 == 0 {
            t.store.delete(format!("k{i:03}").as_bytes()).unwrap();
        }
    }
    t.store.close().unwrap();
    // Reopening the live store (recovery may cut a torn tail) and writing
    // more does not touch the backup either.
    let live = reopen(t.dir.path(), options());
    live.put(&[pair("more", "x")]).unwrap();
    assert_eq!(verify_backup(&backup).unwrap().files, info.files);
}

/// A crash at each step of a restore leaves, after reopen, the old store or
/// the restored one, complete.
#[test]
fn a_crash_at_any_step_of_a_restore_reopens_as_the_old_or_the_new_store() {
    let steps = [
        RestoreStep::Verified,
        RestoreStep::Staged,
        RestoreStep::MarkedComplete,
        RestoreStep::MovedAside,
        RestoreStep::SwappedIn,
    ];
    for (i, crash_at) in steps.iter().enumerate() {
        let parent = tempfile::tempdir().unwrap();
        let db = parent.path().join("db");
        let store = Store::open(
            &db,
            Options {
                segment_size: 8 << 10,
                ..options()
            },
        )
        .unwrap();
        put_keys(&store, "old", 50);
        let backup = parent.path().join("backup");
        store.backup_to(&backup).unwrap();
        put_keys(&store, "newer", 50);
        let old_state = contents(&store);
        let mut seen = 0;
        let result = restore_with_hook(&store, &backup, &mut |step| {
            seen += 1;
            step != *crash_at
        });
        assert!(result.is_err(), "step {crash_at:?}");
        assert_eq!(seen, i + 1);
        drop(store); // the process dies
        let reopened = Store::open(&db, options()).unwrap();
        let got = contents(&reopened);
        let restored = has_keys(&reopened, "old", 50) && no_keys(&reopened, "newer", 50);
        if i < 3 {
            assert_eq!(got, old_state, "crash after {crash_at:?}: the old store");
        } else {
            assert!(restored, "crash after {crash_at:?}: the restored store");
        }
        // No staging or moved-aside folder is left behind.
        let leftovers: Vec<_> = fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("db."))
            .collect();
        assert!(leftovers.is_empty(), "{crash_at:?}: {leftovers:?}");
    }
}

fn damaged_backup_is_refused(damage: impl Fn(&Path), label: &str) {
    let t = temp_store(Options {
        segment_size: 8 << 10,
        ..options()
    });
    put_keys(&t.store, "k", 200);
    let backup = t.dir.path().join("backup");
    t.store.backup_to(&backup).unwrap();
    t.store.put(&[pair("live", "yes")]).unwrap();
    damage(&backup);
    let err = t.store.restore_from(&backup).expect_err(label);
    assert!(
        matches!(
            err,
            Error::InvalidBackup { .. } | Error::UnsupportedVersion { .. }
        ),
        "{label}: {err}"
    );
    assert!(verify_backup(&backup).is_err(), "{label}");
    // The live store is untouched and still open.
    assert_eq!(value_of(&t.store, "live"), Some(b"yes".to_vec()), "{label}");
    assert!(has_keys(&t.store, "k", 200), "{label}");
}

fn first_segment(backup: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = fs::read_dir(backup)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.remove(0)
}

#[test]
fn damaged_backups_are_refused_and_the_live_store_stays_as_it_was() {
    damaged_backup_is_refused(
        |b| fs::remove_file(first_segment(b)).unwrap(),
        "missing file",
    );
    damaged_backup_is_refused(
        |b| {
            let f = first_segment(b);
            let len = fs::metadata(&f).unwrap().len();
            // Break the link first: damage only the backup's copy.
            let bytes = fs::read(&f).unwrap();
            fs::remove_file(&f).unwrap();
            fs::write(&f, &bytes[..len as usize - 10]).unwrap();
        },
        "truncated file",
    );
    damaged_backup_is_refused(
        |b| {
            let f = first_segment(b);
            let mut bytes = fs::read(&f).unwrap();
            bytes[100] ^= 1;
            fs::remove_file(&f).unwrap();
            fs::write(&f, &bytes).unwrap();
        },
        "flipped byte",
    );
    damaged_backup_is_refused(
        |b| {
            let m = b.join(BACKUP_MANIFEST);
            let text = fs::read_to_string(&m)
                .unwrap()
                .replace("change-number ", "change-number 9");
            fs::write(&m, text).unwrap();
        },
        "tampered manifest",
    );
    damaged_backup_is_refused(
        |b| fs::remove_file(b.join(BACKUP_MANIFEST)).unwrap(),
        "unfinished",
    );
    damaged_backup_is_refused(
        |b| {
            let m = b.join(BACKUP_MANIFEST);
            let text = fs::read_to_string(&m).unwrap();
            let body: String = text
                .lines()
                .filter(|l| !l.starts_with("crc32"))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                .replace("dkv-cask-backup 1", "dkv-cask-backup 2");
            let crc = crc32fast::hash(body.as_bytes());
            fs::write(&m, format!("{body}crc32 {crc:08x}\n")).unwrap();
        },
        "another format version",
    );
}

#[test]
fn a_backup_folder_cannot_be_opened_as_a_store() {
    let t = temp_store(options());
    t.store.put(&[pair("k", "v")]).unwrap();
    let backup = t.dir.path().join("backup");
    t.store.backup_to(&backup).unwrap();
    assert!(matches!(
        Store::open(&backup, options()),
        Err(Error::InvalidPath { .. })
    ));
}

#[test]
fn a_second_backup_into_the_same_folder_replaces_the_first() {
    let t = temp_store(Options {
        segment_size: 8 << 10,
        ..options()
    });
    put_keys(&t.store, "a", 100);
    let backup = t.dir.path().join("backup");
    let first = t.store.backup_to(&backup).unwrap();
    put_keys(&t.store, "b", 100);
    let second = t.store.backup_to(&backup).unwrap();
    assert!(second.change_number > first.change_number);
    assert_eq!(verify_backup(&backup).unwrap().files, second.files);
    let restored = t.store.restore_from(&backup).unwrap();
    assert!(has_keys(&restored, "a", 100) && has_keys(&restored, "b", 100));
}

#[test]
fn an_empty_store_backs_up_and_restores_to_an_empty_store() {
    let t = temp_store(options());
    let backup = t.dir.path().join("backup");
    let info = t.store.backup_to(&backup).unwrap();
    assert_eq!(info.change_number, 0);
    let restored = t.store.restore_from(&backup).unwrap();
    assert!(all_pairs(&restored).is_empty());
    restored.put(&[pair("k", "v")]).unwrap();
}

/// Port of RocksDB's TestPreventParallelRestores (RT:767-801): five
/// restores at once on one handle; at most one succeeds, the others are
/// refused (busy, or the handle was already closed by the winner).
#[test]
fn of_five_concurrent_restores_at_most_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("db"), options()).unwrap());
    put_keys(&store, "k", 500);
    let backup = dir.path().join("backup");
    store.backup_to(&backup).unwrap();
    let barrier = Arc::new(Barrier::new(5));
    let handles: Vec<_> = (0..5)
        .map(|_| {
            let (store, barrier, backup) =
                (Arc::clone(&store), Arc::clone(&barrier), backup.clone());
            std::thread::spawn(move || {
                barrier.wait();
                store.restore_from(&backup).map(|s| {
                    s.close().unwrap();
                })
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(ok <= 1, "{results:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(e, Error::GlobalMutationInProgress | Error::Closed),
            "{e}"
        );
    }
    let reopened = Store::open(dir.path().join("db"), options()).unwrap();
    assert!(has_keys(&reopened, "k", 500));
}

/// Where a hard link is impossible (another file system), the backup copies.
#[test]
fn a_backup_on_another_file_system_is_copied_and_restores() {
    let shm = Path::new("/dev/shm");
    let disk = tempfile::tempdir().unwrap();
    let same_fs =
        fs::metadata(shm).map(|m| m.dev()).ok() == Some(fs::metadata(disk.path()).unwrap().dev());
    if !shm.is_dir() || same_fs {
        eprintln!("no second file system here; skipping the copy path");
        return;
    }
    let other = tempfile::tempdir_in(shm).unwrap();
    let store = Store::open(
        disk.path().join("db"),
        Options {
            segment_size: 8 << 10,
            ..options()
        },
    )
    .unwrap();
    put_keys(&store, "x", 300);
    let backup = other.path().join("backup");
    let info = store.backup_to(&backup).unwrap();
    assert_eq!(info.linked, 0, "nothing can be linked across file systems");
    assert!(info.files.len() > 1);
    verify_backup(&backup).unwrap();
    put_keys(&store, "y", 10);
    let restored = store.restore_from(&backup).unwrap();
    assert!(has_keys(&restored, "x", 300) && no_keys(&restored, "y", 10));
}

#[test]
fn backup_verify_and_restore_report_progress_up_to_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path().join("db"),
        Options {
            segment_size: 8 << 10,
            ..test_options()
        },
    )
    .unwrap();
    for i in 0..200 {
        store.put(&[pair(format!("k{i}"), [7u8; 100])]).unwrap();
    }
    let calls = |f: &mut dyn FnMut(dkv_cask::Progress<'_>)| {
        let mut seen: Vec<(u64, u64)> = Vec::new();
        f(&mut |done, total| seen.push((done, total)));
        assert!(seen.len() > 1, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
        let (done, total) = *seen.last().unwrap();
        assert!(total > 0 && done == total, "{seen:?}");
        seen
    };
    let backup = dir.path().join("backup");
    let mut info = None;
    calls(&mut |p| info = Some(store.backup_with_progress(&backup, p).unwrap()));
    let info = info.unwrap();
    let seen = calls(&mut |p| {
        verify_backup_with_progress(&backup, p).unwrap();
    });
    assert_eq!(seen.last().unwrap().1, info.bytes());
    let mut restored = None;
    calls(&mut |p| restored = Some(store.restore_with_progress(&backup, p).unwrap()));
    let restored = restored.unwrap();
    restored.close().unwrap();
    calls(&mut |p| {
        dkv_cask::verify_with_progress(&dir.path().join("db"), p).unwrap();
    });
}

/// Regression (found by the `ops_model` fuzzer's failing-call step): a
/// backup into a folder holding an earlier backup, whose hard link failed,
/// fell back to a copy that opened the destination with truncation. That
/// destination was the earlier backup's hard link to the live segment, so
/// the copy emptied the store's own segment. Now a copy goes to a new file
/// renamed over the destination. Checked at every failing call of a second
/// backup, with EIO and ENOSPC.
#[test]
fn a_failing_call_in_a_repeated_backup_never_damages_the_store_or_the_earlier_backup() {
    for kind in [InjectedError::Eio, InjectedError::NoSpace] {
        for n in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let faults = Arc::new(FaultInjector::new());
            let opts = Options {
                fault_injector: Some(Arc::clone(&faults)),
                ..options()
            };
            let store = Store::open(dir.path().join("db"), opts.clone()).unwrap();
            put_keys(&store, "a", 50);
            let backup = dir.path().join("backup");
            store.backup_to(&backup).unwrap();
            put_keys(&store, "b", 50);
            let want = contents(&store);
            faults.fail_after(n, kind);
            let result = store.backup_to(&backup);
            let fired = faults.fired() > 0;
            faults.disarm();
            drop(store);
            let label = format!("{kind:?} at call {n} of the second backup");
            let store = Store::open(dir.path().join("db"), options())
                .unwrap_or_else(|e| panic!("{label}: reopen: {e}"));
            assert_eq!(contents(&store), want, "{label}");
            if result.is_ok() {
                verify_backup(&backup).unwrap_or_else(|e| panic!("{label}: {e}"));
            }
            store.close().unwrap();
            if !fired {
                break;
            }
            assert!(n < 100, "the backup never stopped failing");
        }
    }
}
