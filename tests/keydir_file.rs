//! The keydir file: a clean close saves the index, the next open loads it
//! in place of the hints and the active segment's scan, and gets exactly
//! the state that reading them would give. Open removes it before any
//! write; a stale, damaged, foreign or half-written one is never used.

mod common;

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use common::disk::*;
use common::*;
use dkv_cask::format::{KeydirFile, KeydirFileBuilder, KeydirSegment};
use dkv_cask::serverpb::KvPair;
use dkv_cask::{
    Backupable, ChangeApplier, ChangePropagator, FaultInjector, FileSystem, InjectedError,
    KEYDIR_FILE, KEYDIR_TMP_FILE, KeyEntry, KvStore, Options, SYNC_FAILED_FILE, SegmentId,
    StdFileSystem, Store, SyncMode,
};

/// Small segments, nothing kept for followers, merges only when called.
fn options(sync_mode: SyncMode) -> Options {
    Options {
        sync_mode,
        ..merge_test_options()
    }
}

/// Several segments of puts, overwrites, deletes and expiring keys, one
/// merge among them, and an active segment with records in it.
fn fill(store: &Store, tag: u8) {
    let value = |i: u32, round: u8| vec![tag ^ round ^ (i as u8); 90];
    for round in 0..3u8 {
        for i in 0..300u32 {
            let key = format!("key{i:04}");
            if round == 2 && i % 7 == 0 {
                store.delete(key.as_bytes()).expect("delete");
            } else if i % 11 == 0 {
                store
                    .put(&[pair_ttl(&key, value(i, round), now() + 3600)])
                    .expect("put with expiry");
            } else {
                store.put(&[pair(&key, value(i, round))]).expect("put");
            }
        }
        if round == 1 {
            store.merge().expect("merge");
        }
    }
}

/// Everything open rebuilds that a reader can see: the keyspace, the log
/// position, the replication feed, the applied number and the per-segment
/// figures.
#[derive(Debug)]
struct Seen {
    contents: Model,
    last: u64,
    applied: u64,
    feed: Vec<(u64, u32)>,
    /// Per segment: id, kind, range, bytes, live bytes and keys.
    segments: Vec<dkv_cask::SegmentStats>,
}

/// Asserts that two views agree, naming the first field that differs
/// (the contents are too long to print).
fn assert_same(a: &Seen, b: &Seen, label: &str) {
    assert!(a.contents == b.contents, "{label}: contents differ");
    assert_eq!(
        (a.last, a.applied, &a.segments),
        (b.last, b.applied, &b.segments),
        "{label}"
    );
    assert!(
        a.feed == b.feed,
        "{label}: replication feeds differ: {} changes from {:?} to {:?}, {} changes from {:?} to {:?}",
        a.feed.len(),
        a.feed.first(),
        a.feed.last(),
        b.feed.len(),
        b.feed.first(),
        b.feed.last()
    );
}

/// The whole replication feed the store still serves, from its oldest
/// change (a call may stop early, at a segment's end).
fn feed(store: &Store, max: usize) -> Vec<dkv_cask::serverpb::ChangeRecord> {
    let mut from = match store.load_changes(1, 1) {
        Err(dkv_cask::Error::ChangesCompacted {
            oldest_available, ..
        }) => oldest_available,
        _ => 1,
    };
    let mut all = Vec::new();
    while all.len() < max {
        let batch = store
            .load_changes(from, max - all.len())
            .expect("load changes");
        let Some(last) = batch.last() else { break };
        from = last.change_number + u64::from(last.number_of_trxns);
        all.extend(batch);
    }
    all
}

fn seen(store: &Store) -> Seen {
    // The feed serves durable changes only.
    store.sync().expect("sync");
    let feed = feed(store, 100_000)
        .iter()
        .map(|c| (c.change_number, c.number_of_trxns))
        .collect();
    Seen {
        contents: contents(store),
        last: store.last_change_number(),
        applied: store.latest_applied_change_number().expect("applied"),
        feed,
        segments: store.stats().expect("stats").segments,
    }
}

fn keydir_path(dir: &Path) -> std::path::PathBuf {
    dir.join(KEYDIR_FILE)
}

#[test]
fn a_clean_close_saves_the_index_and_the_next_open_loads_the_same_state_as_the_hints_give() {
    for (sync_mode, merge_last) in [
        (SyncMode::Never, false),
        (SyncMode::Always, false),
        (SyncMode::Never, true),
    ] {
        let t = temp_store(options(sync_mode));
        fill(&t.store, 1);
        // A follower's applied number travels through the file too.
        let follower_dir = scratch_dir();
        let follower = reopen(follower_dir.path(), options(sync_mode));
        let changes = feed(&t.store, 50);
        let (applied, result) = follower.save_changes(&changes);
        result.expect("apply");
        assert!(applied > 0);
        // A merge of everything last (it seals the active segment first),
        // as `dkv-cask compact` does: the change index's last noted start
        // then names a merged-away segment.
        if merge_last {
            fill(&t.store, 4);
            t.store.merge().expect("merge");
        }
        let before = seen(&t.store);
        t.store.close().expect("close");
        follower.close().expect("close follower");
        assert!(keydir_path(t.dir.path()).exists(), "{sync_mode:?}");

        let hinted_dir = copy_store(t.dir.path());
        fs::remove_file(keydir_path(hinted_dir.path())).expect("remove keydir file");
        let from_file = reopen(t.dir.path(), options(sync_mode));
        let from_hints = reopen(hinted_dir.path(), options(sync_mode));
        let report = from_file.recovery_report();
        assert!(report.from_keydir_file, "{sync_mode:?}: {report:?}");
        assert_eq!(
            (report.segments_from_hints, report.segments_scanned),
            (0, 0)
        );
        assert!(!from_hints.recovery_report().from_keydir_file);
        assert_same(&seen(&from_file), &before, &format!("{sync_mode:?}"));
        assert_same(&seen(&from_hints), &before, &format!("{sync_mode:?}"));

        let follower = reopen(follower_dir.path(), options(sync_mode));
        assert!(follower.recovery_report().from_keydir_file);
        assert_eq!(follower.latest_applied_change_number().unwrap(), applied);

        // And the store goes on as usual: writes, a merge, another reopen.
        fill(&from_file, 2);
        fill(&from_hints, 2);
        assert_same(&seen(&from_file), &seen(&from_hints), "after more writes");
        let after = seen(&from_file);
        from_file.close().expect("close");
        let again = reopen(t.dir.path(), options(sync_mode));
        assert!(again.recovery_report().from_keydir_file);
        assert_same(&seen(&again), &after, "");
    }
}

#[test]
fn open_removes_the_keydir_file_before_the_store_takes_a_write() {
    let t = temp_store(options(SyncMode::Always));
    fill(&t.store, 1);
    t.store.close().expect("close");
    fs::write(t.dir.path().join(KEYDIR_TMP_FILE), b"half written").unwrap();
    let store = reopen(t.dir.path(), options(SyncMode::Always));
    assert!(store.recovery_report().from_keydir_file);
    assert!(!keydir_path(t.dir.path()).exists());
    assert!(!t.dir.path().join(KEYDIR_TMP_FILE).exists());
}

#[test]
fn a_keydir_file_older_than_the_segments_is_never_used() {
    type Change<'a> = &'a dyn Fn(&Store);
    let late_put: Change = &|s| s.put(&[pair("late", "write")]).unwrap();
    let appending_with_pwrite = Options {
        map_appends: false,
        ..options(SyncMode::Never)
    };
    let cases: [(&str, Options, Change, &str); 5] = [
        // Preallocated, or allocated ahead of the records for appends
        // through the map: the active file keeps its length and its
        // sampled ends, only its bytes after the recorded end show the new
        // record.
        (
            "appended in place",
            options(SyncMode::Always),
            late_put,
            "written after its recorded end",
        ),
        (
            "appended ahead",
            options(SyncMode::Never),
            late_put,
            "written after its recorded end",
        ),
        (
            "appended",
            appending_with_pwrite,
            late_put,
            "the file changed",
        ),
        (
            "rolled over",
            options(SyncMode::Never),
            &|s| fill(s, 3),
            "segments",
        ),
        (
            "merged",
            options(SyncMode::Never),
            &|s| {
                s.merge().unwrap();
            },
            "segment",
        ),
    ];
    for (what, options, change, why) in cases {
        let t = temp_store(options.clone());
        fill(&t.store, 1);
        t.store.close().unwrap();
        let stale = fs::read(keydir_path(t.dir.path())).unwrap();
        let store = reopen(t.dir.path(), options.clone());
        change(&store);
        let expected = seen(&store);
        store.close().unwrap();
        fs::write(keydir_path(t.dir.path()), &stale).unwrap();
        let store = reopen(t.dir.path(), options);
        let report = store.recovery_report();
        assert!(!report.from_keydir_file, "{what}");
        let reason = report.keydir_file_unused.as_deref().unwrap_or("");
        assert!(reason.contains(why), "{what}: {reason:?}");
        assert_same(&seen(&store), &expected, what);
    }
}

#[test]
fn a_damaged_or_truncated_keydir_file_is_ignored_and_the_reason_reported() {
    let t = temp_store(options(SyncMode::Never));
    fill(&t.store, 1);
    let expected = seen(&t.store);
    t.store.close().unwrap();
    let good = fs::read(keydir_path(t.dir.path())).unwrap();
    let mut rng = Rng::from_env("keydir_damage");
    let flipped = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x04;
        b
    };
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("cut in half".into(), good[..good.len() / 2].to_vec()),
        ("last byte cut".into(), good[..good.len() - 1].to_vec()),
        ("flipped in the header".into(), flipped(20)),
        ("flipped in the keys".into(), flipped(good.len() - 40)),
        (
            "flipped at random".into(),
            flipped(rng.below(good.len() as u64) as usize),
        ),
        ("garbage".into(), garbage(&mut rng, good.len())),
    ];
    for (what, bytes) in cases {
        let image = copy_store(t.dir.path());
        fs::write(keydir_path(image.path()), &bytes).unwrap();
        let store = reopen(image.path(), options(SyncMode::Never));
        let report = store.recovery_report();
        assert!(!report.from_keydir_file, "{what}");
        let reason = report.keydir_file_unused.as_deref().unwrap_or("");
        assert!(!reason.is_empty(), "{what}: {report:?}");
        assert_same(&seen(&store), &expected, &what);
    }
}

#[test]
fn the_keydir_file_of_another_store_with_the_same_shape_is_not_trusted() {
    let mine = temp_store(options(SyncMode::Never));
    let theirs = temp_store(options(SyncMode::Never));
    // Same keys, same value lengths, same segments: different bytes.
    fill(&mine.store, 1);
    fill(&theirs.store, 2);
    let expected = seen(&mine.store);
    mine.store.close().unwrap();
    theirs.store.close().unwrap();
    fs::copy(keydir_path(theirs.dir.path()), keydir_path(mine.dir.path())).unwrap();
    let store = reopen(mine.dir.path(), options(SyncMode::Never));
    let report = store.recovery_report();
    assert!(!report.from_keydir_file);
    assert!(
        report
            .keydir_file_unused
            .as_deref()
            .is_some_and(|r| r.contains("changed")),
        "{report:?}"
    );
    assert_same(&seen(&store), &expected, "");
}

/// Fails every rename onto the keydir file's name.
#[derive(Debug)]
struct NoKeydirRename;

impl FileSystem for NoKeydirRename {
    fn create(&self, path: &Path, exclusive: bool) -> io::Result<fs::File> {
        StdFileSystem.create(path, exclusive)
    }
    fn write_at(&self, file: &fs::File, buf: &[u8], offset: u64) -> io::Result<()> {
        StdFileSystem.write_at(file, buf, offset)
    }
    fn sync_data(&self, file: &fs::File) -> io::Result<()> {
        StdFileSystem.sync_data(file)
    }
    fn sync_all(&self, file: &fs::File) -> io::Result<()> {
        StdFileSystem.sync_all(file)
    }
    fn set_len(&self, file: &fs::File, len: u64) -> io::Result<()> {
        StdFileSystem.set_len(file, len)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if to.file_name().is_some_and(|n| n == KEYDIR_FILE) {
            return Err(io::Error::from_raw_os_error(28));
        }
        StdFileSystem.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFileSystem.remove_file(path)
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        StdFileSystem.hard_link(original, link)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        StdFileSystem.create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        StdFileSystem.remove_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        StdFileSystem.sync_dir(path)
    }
}

#[test]
fn a_keydir_file_that_cannot_be_saved_leaves_close_successful_and_open_reads_the_hints() {
    let failing = Options {
        file_system: Arc::new(NoKeydirRename),
        ..options(SyncMode::Never)
    };
    let t = temp_store(failing.clone());
    fill(&t.store, 1);
    let expected = seen(&t.store);
    t.store.close().expect("close succeeds without its cache");
    assert!(!keydir_path(t.dir.path()).exists());
    let store = reopen(t.dir.path(), failing);
    let report = store.recovery_report();
    assert!(!report.from_keydir_file);
    assert!(report.segments_from_hints > 0, "{report:?}");
    assert!(!t.dir.path().join(KEYDIR_TMP_FILE).exists());
    assert_same(&seen(&store), &expected, "");
}

#[test]
fn a_restore_never_carries_a_keydir_file_into_the_restored_folder() {
    let t = temp_store(options(SyncMode::Never));
    fill(&t.store, 1);
    let backup = scratch_dir();
    let path = backup.path().join("b");
    t.store.backup_to(&path).expect("backup");
    let expected = contents(&t.store);
    fill(&t.store, 2);
    // A keydir file describing the replaced store (as a crash between
    // close and the swap could leave).
    t.store.close().unwrap();
    let live = reopen(t.dir.path(), options(SyncMode::Never));
    fs::write(keydir_path(t.dir.path()), b"of the replaced store").unwrap();
    let restored = live.restore_from(&path).expect("restore");
    let report = restored.recovery_report();
    assert!(!report.from_keydir_file);
    assert_eq!(report.keydir_file_unused, None, "{report:?}");
    assert_eq!(contents(&restored), expected);
}

#[test]
fn a_store_that_skipped_damage_saves_no_keydir_file_so_every_open_reports_it() {
    let t = temp_store(options(SyncMode::Never));
    fill(&t.store, 1);
    t.store.close().unwrap();
    remove_hints(t.dir.path());
    let first = segment_files(t.dir.path()).remove(0);
    overwrite(&first, 200, b"damage");
    let tolerant = Options {
        recovery_mode: dkv_cask::RecoveryMode::TolerateAnyCorruption,
        ..options(SyncMode::Never)
    };
    let store = reopen(t.dir.path(), tolerant.clone());
    assert_eq!(store.recovery_report().skipped.len(), 1);
    store
        .put(&[KvPair {
            key: b"after".to_vec(),
            value: b"damage".to_vec(),
            expire_ts: 0,
        }])
        .unwrap();
    store.close().unwrap();
    assert!(!keydir_path(t.dir.path()).exists());
    let store = reopen(t.dir.path(), tolerant);
    assert_eq!(store.recovery_report().skipped.len(), 1);
}

#[test]
fn with_save_keydir_off_close_saves_none_and_open_reads_the_hints() {
    let off = Options {
        save_keydir: false,
        ..options(SyncMode::Never)
    };
    let t = temp_store(off.clone());
    fill(&t.store, 1);
    let expected = seen(&t.store);
    t.store.close().unwrap();
    assert!(!keydir_path(t.dir.path()).exists());
    let store = reopen(t.dir.path(), off);
    let report = store.recovery_report();
    assert!(!report.from_keydir_file);
    assert!(report.segments_from_hints > 0, "{report:?}");
    assert_same(&seen(&store), &expected, "");
}

/// A store of `fill` closed cleanly, and its keydir file's bytes.
/// The whole preallocated tail after the active segment's recorded end is
/// checked, not just the bytes next to it: a record that reached the disk
/// further on (a later block written back before an earlier one) refuses
/// the file too. The stray bytes lie beyond the file's sampled ends, so
/// only the zero check can see them. (Regression: the check covered only
/// the 40 bytes after the recorded end.)
#[test]
fn bytes_anywhere_in_the_active_segments_tail_refuse_the_keydir_file() {
    let options = Options {
        segment_size: 1 << 20,
        ..options(SyncMode::Always)
    };
    let t = temp_store(options.clone());
    fill(&t.store, 1);
    let expected = seen(&t.store);
    t.store.close().unwrap();
    let file = fs::read(keydir_path(t.dir.path())).unwrap();
    let segments = KeydirFile::decode(&file).unwrap().segments;
    // The active segment: the one whose end is not its length.
    let active = *segments
        .iter()
        .find(|s| s.end_offset < s.file_len)
        .expect("an active segment with room");
    let sample = dkv_cask::format::HINT_SAMPLE_LEN as u64;
    for gap in [41, 4096, 100_000] {
        let at = active.end_offset + gap;
        assert!(
            at >= sample && at + 8 <= active.file_len - sample,
            "gap {gap}"
        );
        let image = copy_store(t.dir.path());
        let segment = image.path().join(active.id.file_name());
        let f = fs::OpenOptions::new().write(true).open(&segment).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"stray!!!", at).unwrap();
        drop(f);
        let store = reopen(image.path(), options.clone());
        let report = store.recovery_report();
        assert!(!report.from_keydir_file, "gap {gap}");
        let reason = report.keydir_file_unused.as_deref().unwrap_or("");
        assert!(reason.contains("written after"), "gap {gap}: {reason:?}");
        assert_same(&seen(&store), &expected, &format!("gap {gap}"));
    }
}

fn closed_store_with_keydir(sync_mode: SyncMode) -> (tempfile::TempDir, Vec<u8>) {
    let t = temp_store(options(sync_mode));
    fill(&t.store, 1);
    t.store.close().unwrap();
    let bytes = fs::read(keydir_path(t.dir.path())).unwrap();
    (t.dir, bytes)
}

/// The parts of a keydir file, to edit.
struct Parts {
    segments: Vec<KeydirSegment>,
    starts: Vec<(u64, SegmentId, u64)>,
    keys: Vec<(Vec<u8>, KeyEntry)>,
    last: Option<(u64, SegmentId)>,
}

/// Re-encodes a keydir file with `edit` applied to its parts: a file whose
/// checksum holds and whose content lies.
fn forged(bytes: &[u8], edit: &dyn Fn(&mut Parts)) -> Vec<u8> {
    let file = KeydirFile::decode(bytes).expect("a real keydir file decodes");
    let mut p = Parts {
        segments: file.segments.clone(),
        starts: file.change_starts().collect(),
        keys: file.entries().map(|(k, e)| (k.to_vec(), e)).collect(),
        last: file.last_start,
    };
    edit(&mut p);
    let mut b = KeydirFileBuilder::new(file.applied, p.last, bytes.len());
    for s in &p.segments {
        b.segment(s);
    }
    for &(position, segment, offset) in &p.starts {
        b.change_start(position, segment, offset);
    }
    for (key, entry) in &p.keys {
        b.key(key, entry);
    }
    b.finish()
}

#[test]
fn a_keydir_file_whose_checksum_holds_but_whose_content_lies_is_refused() {
    let (dir, good) = closed_store_with_keydir(SyncMode::Always);
    let expected = {
        let image = copy_store(dir.path());
        let store = reopen(image.path(), options(SyncMode::Always));
        assert!(store.recovery_report().from_keydir_file);
        seen(&store)
    };
    type Edit = Box<dyn Fn(&mut Parts)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "a key past its segment's records",
            Box::new(|p| {
                let e = &mut p.keys[0].1;
                let end = p
                    .segments
                    .iter()
                    .find(|s| s.id == e.pointer.segment)
                    .unwrap()
                    .end_offset;
                e.pointer.offset = end as u32;
            }),
            "points outside",
        ),
        (
            "a key in a segment that is not there",
            Box::new(|p| p.keys[5].1.pointer.segment = SegmentId(9999)),
            "points outside",
        ),
        (
            "a key shorter than its operation",
            Box::new(|p| p.keys[7].1.pointer.len = 3),
            "points outside",
        ),
        (
            "keys out of order",
            Box::new(|p| p.keys.swap(2, 3)),
            "out of order",
        ),
        (
            "a change start that is no record start",
            Box::new(|p| p.starts[0].0 += 1),
            "no record start",
        ),
        (
            "a last start beyond the log",
            Box::new(|p| p.last = Some((u64::MAX, SegmentId(1)))),
            "beyond the log",
        ),
        (
            "a sealed segment's end moved",
            Box::new(|p| p.segments[0].end_position += 1),
            "not the file's end",
        ),
        (
            "the active segment's end past the file",
            Box::new(|p| {
                let a = p.segments.last_mut().unwrap();
                a.end_offset = a.file_len + 100;
                a.end_position += a.file_len + 100;
            }),
            "does not fit",
        ),
        (
            "the active segment's end moved back",
            Box::new(|p| {
                let a = p.segments.last_mut().unwrap();
                a.end_offset -= 1;
                a.end_position -= 1;
            }),
            "written after",
        ),
        (
            "more tombstones than bytes",
            Box::new(|p| p.segments[0].tombstones = u64::MAX),
            "tombstone",
        ),
        (
            "a segment missing",
            Box::new(|p| {
                p.segments.remove(0);
            }),
            "segments",
        ),
    ];
    for (what, edit, why) in cases {
        let image = copy_store(dir.path());
        fs::write(keydir_path(image.path()), forged(&good, &*edit)).unwrap();
        let store = reopen(image.path(), options(SyncMode::Always));
        let report = store.recovery_report();
        assert!(!report.from_keydir_file, "{what}");
        let reason = report.keydir_file_unused.as_deref().unwrap_or("");
        assert!(reason.contains(why), "{what}: {reason:?}");
        assert_same(&seen(&store), &expected, what);
    }
    // The unedited re-encoding is used: each forgery fails on its lie.
    let image = copy_store(dir.path());
    fs::write(keydir_path(image.path()), forged(&good, &|_| {})).unwrap();
    let store = reopen(image.path(), options(SyncMode::Always));
    assert!(store.recovery_report().from_keydir_file);
}

#[test]
fn a_poisoned_store_saves_no_keydir_file_and_a_sync_failure_marker_disables_one() {
    let faults = Arc::new(FaultInjector::new());
    let failing = Options {
        fault_injector: Some(Arc::clone(&faults)),
        ..options(SyncMode::Always)
    };
    let t = temp_store(failing);
    fill(&t.store, 1);
    faults.fail_after(0, InjectedError::Eio);
    assert!(t.store.put(&[pair("lost", "write")]).is_err());
    assert!(t.store.close().is_err(), "a poisoned close reports it");
    assert!(!keydir_path(t.dir.path()).exists());

    // A keydir file beside a sync-failure marker (which no clean close
    // leaves) is not trusted: the marker's cut comes first.
    let (dir, good) = closed_store_with_keydir(SyncMode::Never);
    let last = {
        let image = copy_store(dir.path());
        reopen(image.path(), options(SyncMode::Never)).last_change_number()
    };
    fs::write(keydir_path(dir.path()), &good).unwrap();
    fs::write(dir.path().join(SYNC_FAILED_FILE), last.to_string()).unwrap();
    let store = reopen(dir.path(), options(SyncMode::Never));
    assert!(!store.recovery_report().from_keydir_file);
    assert_eq!(store.last_change_number(), last);
}
