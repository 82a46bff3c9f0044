//! Damaged bytes on disk: what each recovery mode does with a flipped bit in
//! a sealed segment, with damage in the newest segment that later records
//! prove was synced, with torn tails, foreign format versions, garbage
//! headers and missing segments; that reads verify what they return; and
//! that no file content, however mangled, makes `open` panic.

mod common;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use common::disk::*;
use common::*;
use dkv_cask::{Error, KvStore, Options, RecoveryMode, SEGMENT_HEADER_BYTES, Store, SyncMode};

const MODES: [RecoveryMode; 3] = [
    RecoveryMode::Strict,
    RecoveryMode::TolerateTornTail,
    RecoveryMode::TolerateAnyCorruption,
];

fn options(recovery_mode: RecoveryMode) -> Options {
    Options {
        sync_mode: SyncMode::Never,
        recovery_mode,
        segment_size: 4096 * 4,
        max_batch_bytes: 4096,
        ..Options::default()
    }
}

/// A closed store of random writes spread over at least `segments`
/// segment files.
fn store_with_segments(rng: &mut Rng, segments: usize) -> (tempfile::TempDir, History) {
    let t = temp_store(options(RecoveryMode::TolerateTornTail));
    let mut h = History::new(&t.store);
    while segment_files(t.dir.path()).len() < segments {
        let w = Write::random(rng, &h.model, 60, 300);
        h.run(&t.store, w).expect("write");
    }
    for _ in 0..5 {
        let w = Write::random(rng, &h.model, 60, 300);
        h.run(&t.store, w).expect("write");
    }
    t.store.close().expect("close");
    (t.dir, h)
}

/// Records (history index and extent) that lie in sealed segments.
fn sealed_records(dir: &Path, h: &History) -> Vec<(usize, Extent)> {
    let newest = segment_files(dir).pop().expect("segment");
    h.records
        .iter()
        .enumerate()
        .map(|(i, r)| (i, locate(dir, r.start, r.end)))
        .filter(|(_, e)| e.file != newest)
        .collect()
}

/// Some of `records`: the first, the last, and random ones in between.
fn sample<T: Clone>(rng: &mut Rng, records: &[T], n: usize) -> Vec<T> {
    let mut picked = vec![records[0].clone(), records[records.len() - 1].clone()];
    for _ in 0..n {
        picked.push(records[rng.below(records.len() as u64) as usize].clone());
    }
    picked
}

/// Copies the store at `src` and flips one random bit inside `extent` of
/// the copy; returns the copy, the damaged file and the damaged offset.
fn flip_in_copy(
    rng: &mut Rng,
    src: &Path,
    extent: &Extent,
) -> (tempfile::TempDir, std::path::PathBuf, u64) {
    let image = copy_store(src);
    // Without hints, open reads every sealed record (with them, damage is
    // found by the read that meets it, and by `verify`: see below).
    remove_hints(image.path());
    let file = same_file_in(&extent.file, image.path());
    let offset = extent.start + rng.below(extent.end - extent.start);
    flip_bit(&file, offset, rng.below(8) as u8);
    (image, file, offset)
}

fn open(dir: &Path, mode: RecoveryMode) -> dkv_cask::Result<Store> {
    Store::open(dir, options(mode))
}

#[test]
fn a_flipped_bit_in_a_sealed_segment_is_corruption_naming_the_file_and_the_damaged_record() {
    let mut rng = Rng::from_env("sealed_bit_flip");
    let (dir, h) = store_with_segments(&mut rng, 4);
    let sealed = sealed_records(dir.path(), &h);
    for (i, extent) in sample(&mut rng, &sealed, 12) {
        let (image, file, offset) = flip_in_copy(&mut rng, dir.path(), &extent);
        for mode in [RecoveryMode::TolerateTornTail, RecoveryMode::Strict] {
            match open(image.path(), mode) {
                Err(Error::Corruption {
                    file: f,
                    offset: at,
                    ..
                }) => {
                    assert_eq!(f, file, "record {i}, {mode:?}");
                    assert!(
                        (extent.start..extent.end).contains(&at),
                        "record {i} spans {}..{}, reported offset {at}, {mode:?}",
                        extent.start,
                        extent.end
                    );
                }
                Err(e) => panic!("record {i}, flip at {offset}, {mode:?}: wrong error {e}"),
                Ok(_) => panic!("record {i}, flip at {offset}, {mode:?}: damage went unnoticed"),
            }
        }
    }
}

#[test]
fn tolerating_any_corruption_skips_only_the_damaged_sealed_record_and_reports_its_range() {
    let mut rng = Rng::from_env("sealed_bit_flip_tolerated");
    let (dir, h) = store_with_segments(&mut rng, 4);
    let sealed = sealed_records(dir.path(), &h);
    for (i, extent) in sample(&mut rng, &sealed, 12) {
        let (image, file, offset) = flip_in_copy(&mut rng, dir.path(), &extent);
        let label = format!("record {i}, flip at {offset}");
        let store = open(image.path(), RecoveryMode::TolerateAnyCorruption)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let report = store.recovery_report();
        assert_eq!(report.skipped.len(), 1, "{label}: {:?}", report.skipped);
        let skipped = &report.skipped[0];
        assert_eq!(
            (&skipped.file, skipped.start, skipped.end),
            (&file, extent.start, extent.end),
            "{label}"
        );
        assert_eq!(report.truncated, None, "{label}");

        let damaged_keys = h.records[i].write.keys();
        for n in 0..60 {
            let key = format!("key{n:03}").into_bytes();
            if !damaged_keys.contains(&key) {
                assert_eq!(
                    value_of(&store, &key).as_ref(),
                    h.model.get(&key),
                    "{label}: key {} not written by the damaged record changed",
                    String::from_utf8_lossy(&key)
                );
            }
        }
        assert!(
            contents(&store) == h.replay_without(i),
            "{label}: contents are not those of the log without the damaged record"
        );
        store.put(&[pair("after", "open")]).expect("write");
        store.close().expect("close");
        let store = open(image.path(), RecoveryMode::TolerateAnyCorruption).expect("reopen");
        assert_eq!(store.recovery_report().skipped.len(), 1, "{label}");
        assert_eq!(value_of(&store, "after"), Some(b"open".to_vec()), "{label}");
    }
}

#[test]
fn damage_in_the_newest_segment_before_a_later_records_synced_position_is_corruption_not_a_torn_tail()
 {
    let mut rng = Rng::from_env("newest_synced_damage");
    let t = temp_store(options(RecoveryMode::TolerateTornTail));
    let mut h = History::new(&t.store);
    for _ in 0..12 {
        let w = Write::random(&mut rng, &h.model, 20, 40);
        h.run(&t.store, w).expect("write");
        t.store.sync().expect("sync");
    }
    t.store.close().expect("close");
    assert_eq!(segment_files(t.dir.path()).len(), 1);
    let last = h.records.len() - 1;
    for (i, r) in h.records[..last].iter().enumerate() {
        let extent = locate(t.dir.path(), r.start, r.end);
        let (image, file, offset) = flip_in_copy(&mut rng, t.dir.path(), &extent);
        let label = format!("record {i}, flip at {offset}");
        let before = fs::read(&file).expect("read");
        for mode in [RecoveryMode::TolerateTornTail, RecoveryMode::Strict] {
            match open(image.path(), mode) {
                Err(Error::Corruption {
                    file: f,
                    offset: at,
                    ..
                }) => {
                    assert_eq!(f, file, "{label}, {mode:?}");
                    assert!((extent.start..extent.end).contains(&at), "{label}: at {at}");
                }
                Err(e) => panic!("{label}, {mode:?}: wrong error {e}"),
                Ok(s) => panic!(
                    "{label}, {mode:?}: synced damage accepted, truncated {:?}",
                    s.recovery_report().truncated
                ),
            }
            assert!(
                fs::read(&file).expect("read") == before,
                "{label}: file changed"
            );
        }
        let store = open(image.path(), RecoveryMode::TolerateAnyCorruption)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let report = store.recovery_report();
        assert_eq!(report.truncated, None, "{label}");
        assert_eq!(report.skipped.len(), 1, "{label}");
        assert_eq!(
            (report.skipped[0].start, report.skipped[0].end),
            (extent.start, extent.end),
            "{label}"
        );
        assert!(contents(&store) == h.replay_without(i), "{label}");
    }
}

#[test]
fn strict_mode_refuses_a_torn_tail_that_the_default_mode_cuts() {
    let mut rng = Rng::from_env("strict_torn_tail");
    let t = temp_store(options(RecoveryMode::TolerateTornTail));
    let mut h = History::new(&t.store);
    for _ in 0..8 {
        let w = Write::random(&mut rng, &h.model, 20, 40);
        h.run(&t.store, w).expect("write");
    }
    t.store.close().expect("close");

    // Preallocated zeros after the last record are not damage, even to Strict.
    let clean = copy_store(t.dir.path());
    let store = open(clean.path(), RecoveryMode::Strict).expect("strict open of a clean store");
    assert!(contents(&store) == h.model);
    assert_eq!(store.recovery_report().truncated, None);
    drop(store);

    let last = h.records.last().expect("record");
    let extent = locate(t.dir.path(), last.start, last.end);
    let cut_at = extent.start + 1 + rng.below(extent.end - extent.start - 1);
    let image = copy_store(t.dir.path());
    let file = same_file_in(&extent.file, image.path());
    let bytes = fs::read(&file).expect("read");
    fs::write(&file, &bytes[..cut_at as usize]).expect("cut");

    match open(image.path(), RecoveryMode::Strict) {
        Err(Error::Corruption {
            file: f, offset, ..
        }) => {
            assert_eq!((f, offset), (file.clone(), extent.start), "cut at {cut_at}");
        }
        Err(e) => panic!("cut at {cut_at}: wrong error {e}"),
        Ok(_) => panic!("cut at {cut_at}: Strict accepted a torn tail"),
    }
    assert_eq!(
        fs::metadata(&file).expect("stat").len(),
        cut_at,
        "Strict changed the file"
    );

    let store = open(image.path(), RecoveryMode::TolerateTornTail).expect("default open");
    let truncated = store.recovery_report().truncated.clone().expect("a cut");
    assert_eq!((truncated.file, truncated.offset), (file, extent.start));
    // Trailing zeros of the torn record cannot be told from preallocation.
    let torn = &bytes[extent.start as usize..cut_at as usize];
    assert_eq!(truncated.bytes, data_end(torn) as u64);
    assert!(contents(&store) == *h.state_at(last.start));
}

#[test]
fn a_segment_header_with_another_format_version_is_an_unsupported_version_in_every_mode() {
    let mut rng = Rng::from_env("other_version");
    let (dir, _) = store_with_segments(&mut rng, 3);
    let files = segment_files(dir.path());
    for victim in [&files[0], files.last().expect("segment")] {
        for version in [0u16, 3, u16::MAX] {
            let image = copy_store(dir.path());
            let file = same_file_in(victim, image.path());
            let mut header = fs::read(&file).expect("read")[..32].to_vec();
            header[8..10].copy_from_slice(&version.to_le_bytes());
            let crc = crc32fast::hash(&header[..28]);
            header[28..32].copy_from_slice(&crc.to_le_bytes());
            overwrite(&file, 0, &header);
            for mode in MODES {
                match open(image.path(), mode) {
                    Err(Error::UnsupportedVersion {
                        file: f,
                        found,
                        supported,
                    }) => {
                        assert_eq!(
                            (f, found, supported),
                            (file.clone(), version, dkv_cask::format::FORMAT_VERSION)
                        );
                    }
                    Err(e) => panic!("version {version}, {mode:?}: wrong error {e}"),
                    Ok(_) => panic!("version {version}, {mode:?}: opened"),
                }
            }
        }
    }
}

#[test]
fn a_damaged_header_of_an_older_segment_is_corruption_at_offset_zero() {
    let mut rng = Rng::from_env("older_header_damage");
    let (dir, _) = store_with_segments(&mut rng, 3);
    let victim = segment_files(dir.path())[1].clone();
    let mut damages: Vec<Vec<(u64, u8)>> = (0..32 * 8)
        .map(|bit| vec![(bit / 8, (bit % 8) as u8)])
        .collect();
    damages.push((0..32).map(|at| (at, 0xff)).collect());
    for (n, damage) in damages.iter().enumerate() {
        let image = copy_store(dir.path());
        let file = same_file_in(&victim, image.path());
        if damage.len() == 1 {
            flip_bit(&file, damage[0].0, damage[0].1);
        } else {
            overwrite(&file, 0, &garbage(&mut rng, 32));
        }
        for mode in [RecoveryMode::TolerateTornTail, RecoveryMode::Strict] {
            match open(image.path(), mode) {
                Err(Error::Corruption {
                    file: f, offset, ..
                }) => {
                    assert_eq!((f, offset), (file.clone(), 0), "damage {n}");
                }
                Err(e) => panic!("damage {n}, {mode:?}: wrong error {e}"),
                Ok(_) => panic!("damage {n}, {mode:?}: opened"),
            }
        }
    }
}

#[test]
fn a_newest_segment_that_is_empty_zeroed_or_torn_in_its_header_is_removed_and_the_store_opens_as_before()
 {
    let mut rng = Rng::from_env("torn_new_segment");
    let (dir, h) = store_with_segments(&mut rng, 2);
    let files = segment_files(dir.path());
    let next_id = files.len() as u32 + 1;
    let header = segment_header(next_id, h.end());
    let size = options(RecoveryMode::TolerateTornTail).segment_size as usize;
    let mut images: Vec<(String, Vec<u8>)> = vec![
        ("an empty file".into(), Vec::new()),
        ("all zeros".into(), vec![0; size]),
    ];
    for k in 1..header.len() {
        images.push((format!("{k} header bytes"), header[..k].to_vec()));
        let mut padded = header[..k].to_vec();
        padded.resize(size, 0);
        images.push((format!("{k} header bytes, then zeros"), padded));
    }
    for (what, bytes) in images {
        let image = copy_store(dir.path());
        let file = image.path().join(format!("{next_id:010}.seg"));
        fs::write(&file, &bytes).expect("write");
        let store = open(image.path(), RecoveryMode::TolerateTornTail)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(contents(&store) == h.model, "{what}");
        assert_eq!(store.last_change_number(), h.end(), "{what}");
        let truncated = store.recovery_report().truncated.clone();
        let truncated = truncated.unwrap_or_else(|| panic!("{what}: removal not reported"));
        assert_eq!((&truncated.file, truncated.offset), (&file, 0), "{what}");
        assert!(!file.exists(), "{what}: torn segment left in place");
        store.put(&[pair("after", &what)]).expect("write");
        store.close().expect("close");
        let store = open(image.path(), RecoveryMode::TolerateTornTail).expect("reopen");
        assert_eq!(store.recovery_report().truncated, None, "{what}");
        assert_eq!(value_of(&store, "after"), Some(what.into_bytes()));
    }

    // A whole header and no records is a valid, empty newest segment.
    let image = copy_store(dir.path());
    let file = image.path().join(format!("{next_id:010}.seg"));
    let mut whole = header.clone();
    whole.resize(size, 0);
    fs::write(&file, &whole).expect("write");
    let store = open(image.path(), RecoveryMode::Strict).expect("open");
    assert!(contents(&store) == h.model);
    assert_eq!(store.recovery_report().truncated, None);
    assert!(file.exists());
}

#[test]
fn a_record_damaged_on_disk_after_open_reads_as_corruption_not_as_wrong_data() {
    let mut rng = Rng::from_env("damage_after_open");
    let t = temp_store(options(RecoveryMode::TolerateTornTail));
    let mut h = History::new(&t.store);
    for n in 0..60 {
        h.run(&t.store, Write::Put(vec![pair(format!("key{n:03}"), "v")]))
            .expect("write");
    }
    while segment_files(t.dir.path()).len() < 3 {
        let w = Write::random(&mut rng, &h.model, 60, 300);
        h.run(&t.store, w).expect("write");
    }
    for n in 0..5 {
        let w = Write::Put(vec![pair(format!("active{n}"), "in the newest segment")]);
        h.run(&t.store, w).expect("write");
    }
    let newest = segment_files(t.dir.path()).pop().expect("segment");
    // The newest single-pair record of each live key, with where it is.
    let mut victims: Vec<(Vec<u8>, Extent)> = Vec::new();
    for key in h.model.keys() {
        let r = h
            .records
            .iter()
            .rev()
            .find(|r| r.write.keys().contains(key))
            .expect("a record");
        if let Write::Put(pairs) = &r.write
            && pairs.len() == 1
        {
            victims.push((key.clone(), locate(t.dir.path(), r.start, r.end)));
        }
    }
    let sealed = victims.iter().find(|(_, e)| e.file != newest);
    let active = victims.iter().find(|(_, e)| e.file == newest);
    let (sealed, active) = (
        sealed.expect("a sealed victim"),
        active.expect("an active one"),
    );
    let mut damaged: Vec<&Vec<u8>> = Vec::new();
    for (key, extent) in [sealed, active] {
        damaged.push(key);
        // The value's last byte, changed to another printable byte.
        let at = extent.end - 1;
        let mut b = fs::read(&extent.file).expect("read")[at as usize];
        b ^= 0x20;
        overwrite(&extent.file, at, &[b]);
        let label = format!(
            "{} in {}",
            String::from_utf8_lossy(key),
            extent.file.display()
        );
        match t.store.get(&[key.as_slice()]) {
            Err(Error::Corruption { file, offset, .. }) => {
                assert_eq!(file, extent.file, "{label}");
                assert!((extent.start..extent.end).contains(&offset), "{label}");
            }
            Err(e) => panic!("{label}: wrong error {e}"),
            Ok(found) => panic!("{label}: read returned {found:?}"),
        }
        let scan: Vec<_> = t
            .store
            .iter(&dkv_cask::IterationOptions::new().with_start_key(key.clone()))
            .expect("iterate")
            .take(1)
            .collect();
        assert!(
            matches!(scan.as_slice(), [Err(Error::Corruption { .. })]),
            "{label}: iteration gave {scan:?}"
        );
        // An iteration from the start yields every pair before the first
        // damaged one, then the error, then nothing.
        let first = damaged.iter().min().expect("a damaged key");
        let before: Vec<Vec<u8>> = h.model.keys().filter(|k| k < first).cloned().collect();
        let mut items = t
            .store
            .iter(&dkv_cask::IterationOptions::new())
            .expect("iterate");
        let mut yielded = Vec::new();
        let mut error = None;
        for item in items.by_ref() {
            match item {
                Ok(p) => yielded.push(p.key),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        assert_eq!(yielded, before, "{label}: iteration before the damage");
        assert!(
            matches!(error, Some(Error::Corruption { .. })),
            "{label}: iteration ended with {error:?}"
        );
        assert!(items.next().is_none(), "{label}: iteration went on");
        // A lent scan visits every pair before the first damaged one, then
        // ends with the error.
        let mut visited = Vec::new();
        let lent = t.store.scan(&dkv_cask::IterationOptions::new(), |p| {
            visited.push(p.key.to_vec());
            true
        });
        assert!(
            matches!(lent, Err(Error::Corruption { .. })),
            "{label}: {lent:?}"
        );
        assert_eq!(visited, before, "{label}");
    }
    // Keys whose records are untouched still read.
    for key in h.model.keys() {
        if key != &sealed.0 && key != &active.0 {
            assert_eq!(value_of(&t.store, key).as_ref(), h.model.get(key));
        }
    }
}

#[test]
fn a_missing_middle_segment_is_corruption_naming_the_segment_after_the_gap() {
    let mut rng = Rng::from_env("missing_segment");
    let (dir, _) = store_with_segments(&mut rng, 4);
    let files = segment_files(dir.path());
    let image = copy_store(dir.path());
    fs::remove_file(same_file_in(&files[1], image.path())).expect("remove");
    for mode in [RecoveryMode::TolerateTornTail, RecoveryMode::Strict] {
        match open(image.path(), mode) {
            Err(Error::Corruption { file, offset, .. }) => {
                assert_eq!((file, offset), (same_file_in(&files[2], image.path()), 0));
            }
            Err(e) => panic!("{mode:?}: wrong error {e}"),
            Ok(_) => panic!("{mode:?}: a missing segment went unnoticed"),
        }
    }
}

/// Regression guard for silent loss: in the tolerant mode a missing
/// segment may be skipped, but the caller must learn that records were lost.
#[test]
fn tolerating_any_corruption_reports_the_records_of_a_missing_segment_as_skipped() {
    let mut rng = Rng::from_env("missing_segment_tolerated");
    let (dir, h) = store_with_segments(&mut rng, 4);
    let files = segment_files(dir.path());
    let image = copy_store(dir.path());
    fs::remove_file(same_file_in(&files[1], image.path())).expect("remove");
    let store = open(image.path(), RecoveryMode::TolerateAnyCorruption).expect("open");
    let lost = contents(&store) != h.model;
    assert!(lost, "test wants the missing segment to hold live data");
    assert!(
        !store.recovery_report().skipped.is_empty(),
        "records were lost but the report says nothing was skipped: {:?}",
        store.recovery_report()
    );
}

/// Salvage must open even when nothing readable is left: the first segment
/// is skipped for a damaged header and the newest is removed as torn. The
/// store then takes writes in a new segment, and they survive another
/// tolerant open that skips the damaged segment again. (Regression: with
/// no segment left, open created segment 1 at log position 0, whose file
/// name was the skipped segment's, and failed. New segments are now
/// numbered above every segment file found, skipped ones included.)
#[test]
fn tolerating_any_corruption_opens_a_store_whose_first_segment_is_skipped_and_newest_is_torn() {
    let mut rng = Rng::from_env("skipped_first_torn_newest");
    let (dir, _) = store_with_segments(&mut rng, 2);
    let files = segment_files(dir.path());
    for f in &files[1..] {
        fs::remove_file(f).expect("remove");
    }
    flip_bit(&files[0], 3, 0);
    fs::write(&files[1], b"").expect("write");

    let store = open(dir.path(), RecoveryMode::TolerateAnyCorruption)
        .unwrap_or_else(|e| panic!("salvage open failed: {e}"));
    let report = store.recovery_report().clone();
    assert!(
        report.skipped.iter().any(|r| r.file == files[0]),
        "the damaged first segment is not reported skipped: {report:?}"
    );
    assert!(contents(&store).is_empty());
    assert!(files[0].exists(), "the damaged segment must be kept");
    store.put(&[pair("after", "salvage")]).expect("write");
    store.delete(b"after").expect("delete");
    store.put(&[pair("kept", "k")]).expect("write");
    store.close().expect("close");

    let store = open(dir.path(), RecoveryMode::TolerateAnyCorruption).expect("reopen");
    let mut want = Model::new();
    want.insert(b"kept".to_vec(), b"k".to_vec());
    assert!(contents(&store) == want);
    assert!(
        store
            .recovery_report()
            .skipped
            .iter()
            .any(|r| r.file == files[0])
    );
}

#[test]
fn random_garbage_segment_files_never_make_open_panic() {
    let mut rng = Rng::from_env("garbage_segments");
    let mut opened = 0;
    for case in 0..400 {
        let len = match rng.below(4) {
            0 => rng.below(64) as usize,
            1 => rng.below(200) as usize,
            _ => rng.below(3 * 4096) as usize,
        };
        let mut bytes = garbage(&mut rng, len);
        let prefix = match rng.below(3) {
            0 => Vec::new(),
            1 => segment_header(1, 0),
            // Any id, and a base position with room for the log to grow.
            _ => segment_header(rng.below(4) as u32, rng.below(1 << 40)),
        };
        let keep = prefix.len().min(bytes.len());
        bytes[..keep].copy_from_slice(&prefix[..keep]);
        if rng.below(2) == 0 && bytes.len() > 40 {
            // Long zero runs, as in preallocated space.
            let from = 32 + rng.below(bytes.len() as u64 - 32) as usize;
            let to = from + rng.below((bytes.len() - from) as u64) as usize;
            bytes[from..to].fill(0);
        }
        let mode = MODES[case % 3];
        let dir = scratch_dir();
        fs::write(dir.path().join("0000000001.seg"), &bytes).expect("write");
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let store = Store::open(
                dir.path(),
                Options {
                    segment_size: 4096,
                    max_batch_bytes: 1024,
                    ..options(mode)
                },
            )?;
            let pairs: dkv_cask::Result<Vec<_>> =
                store.iter(&dkv_cask::IterationOptions::new())?.collect();
            store.close()?;
            pairs
        }));
        match outcome {
            Err(_) => panic!("case {case} ({mode:?}, {len} bytes) panicked"),
            Ok(Ok(_)) => opened += 1,
            Ok(Err(Error::Corruption { .. } | Error::UnsupportedVersion { .. })) => {}
            Ok(Err(e)) => panic!("case {case} ({mode:?}): unexpected error {e}"),
        }
    }
    assert!(
        opened > 0,
        "no garbage file opened: the test exercises nothing"
    );
}

#[test]
fn mutated_copies_of_a_real_segment_never_panic_never_invent_data_and_open_the_same_twice() {
    let mut rng = Rng::from_env("mutated_segments");
    let t = temp_store(Options {
        segment_size: 8192,
        ..options(RecoveryMode::TolerateTornTail)
    });
    let mut h = History::new(&t.store);
    for _ in 0..25 {
        let w = Write::random(&mut rng, &h.model, 20, 60);
        h.run(&t.store, w).expect("write");
    }
    t.store.close().expect("close");
    let [segment] = segment_files(t.dir.path()).try_into().expect("one segment");
    let original = fs::read(&segment).expect("read");
    let data_len = data_end(&original);
    let written: std::collections::BTreeSet<(Vec<u8>, Vec<u8>)> = h
        .records
        .iter()
        .flat_map(|r| match &r.write {
            Write::Put(pairs) => pairs
                .iter()
                .map(|p| (p.key.clone(), p.value.clone()))
                .collect(),
            Write::Delete(_) => Vec::new(),
        })
        .collect();
    for case in 0..300 {
        let mut bytes = original.clone();
        for _ in 0..1 + rng.below(3) {
            let at = (rng.below(data_len as u64 + 16) as usize).min(bytes.len());
            let n = (1 + rng.below(64) as usize).min(bytes.len().saturating_sub(at));
            match rng.below(5) {
                0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
                1 => bytes.truncate(at),
                2 => bytes[at..at + n].fill(0),
                3 => {
                    let g = garbage(&mut rng, n);
                    bytes[at..at + n].copy_from_slice(&g);
                }
                _ => {
                    // A stale copy of other bytes of the segment.
                    let from = rng.below(data_len as u64) as usize;
                    let n = n.min(original.len() - from);
                    bytes[at..at + n].copy_from_slice(&original[from..from + n]);
                }
            }
        }
        let mode = MODES[case % 3];
        let image = copy_store(t.dir.path());
        fs::write(same_file_in(&segment, image.path()), &bytes).expect("write");
        let label = format!("case {case} ({mode:?})");
        let first = catch_unwind(AssertUnwindSafe(|| -> dkv_cask::Result<Model> {
            let store = open(image.path(), mode)?;
            let got = contents(&store);
            store.close()?;
            Ok(got)
        }))
        .unwrap_or_else(|_| panic!("{label}: open panicked"));
        let got = match first {
            Ok(got) => got,
            Err(Error::Corruption { .. }) => continue,
            Err(e) => panic!("{label}: unexpected error {e}"),
        };
        for (k, v) in &got {
            assert!(
                written.contains(&(k.clone(), v.clone())),
                "{label}: invented pair {}",
                String::from_utf8_lossy(k)
            );
        }
        if mode != RecoveryMode::TolerateAnyCorruption {
            assert!(
                got == h.initial || h.records.iter().any(|r| r.after == got),
                "{label}: recovered {}",
                h.describe(&got)
            );
        }
        let store = open(image.path(), mode).unwrap_or_else(|e| panic!("{label}: reopen: {e}"));
        assert_eq!(store.recovery_report().truncated, None, "{label}");
        assert!(contents(&store) == got, "{label}: the second open differs");
    }
}

/// A header whose base position leaves no room for the log is damage like
/// any other; taking it at its word made log positions overflow.
#[test]
fn a_segment_whose_base_position_leaves_no_room_for_records_is_rejected_or_stays_consistent() {
    let mut rng = Rng::from_env("huge_base_position");
    for base in [u64::MAX - 100, u64::MAX - SEGMENT_HEADER_BYTES] {
        // Damage after such a header must be classified without overflowing.
        let dir = scratch_dir();
        let mut bytes = segment_header(1, base);
        bytes.extend(garbage(&mut rng, 200));
        fs::write(dir.path().join("0000000001.seg"), &bytes).expect("write");
        let opened = catch_unwind(AssertUnwindSafe(|| {
            open(dir.path(), RecoveryMode::TolerateAnyCorruption).map(drop)
        }));
        assert!(
            opened.is_ok(),
            "base {base}: open of a damaged segment panicked"
        );

        let dir = scratch_dir();
        let mut bytes = segment_header(1, base);
        bytes.resize(4096, 0);
        fs::write(dir.path().join("0000000001.seg"), &bytes).expect("write");
        let Ok(store) = open(dir.path(), RecoveryMode::TolerateTornTail) else {
            continue;
        };
        let write = catch_unwind(AssertUnwindSafe(|| store.put(&[pair("key", "value")])));
        let Ok(Ok(())) = write else {
            assert!(write.is_ok(), "base {base}: a write panicked");
            continue;
        };
        assert!(
            store.last_change_number() > base,
            "base {base}: change number wrapped to {}",
            store.last_change_number()
        );
        store.close().expect("close");
        let store = open(dir.path(), RecoveryMode::TolerateTornTail).expect("reopen");
        assert_eq!(
            value_of(&store, "key"),
            Some(b"value".to_vec()),
            "base {base}: an acknowledged write was lost at reopen ({:?})",
            store.recovery_report().truncated
        );
    }
}

#[test]
fn a_segment_longer_than_a_record_offset_can_address_is_corruption_not_a_panic() {
    // Record offsets are 32-bit, so no segment the engine writes passes
    // 4 GiB; a longer file (sparse here) is refused in every mode.
    let mut rng = Rng::from_env("segment_over_4_gib");
    let (dir, _) = store_with_segments(&mut rng, 3);
    let files = segment_files(dir.path());
    let image = copy_store(dir.path());
    let grown = same_file_in(&files[0], image.path());
    fs::OpenOptions::new()
        .write(true)
        .open(&grown)
        .and_then(|f| f.set_len((4 << 30) + 4096))
        .expect("extend the segment (sparse)");
    for mode in [
        RecoveryMode::Strict,
        RecoveryMode::TolerateTornTail,
        RecoveryMode::TolerateAnyCorruption,
    ] {
        match open(image.path(), mode) {
            Err(Error::Corruption { file, reason, .. }) => {
                assert_eq!(file, grown, "{mode:?}");
                assert!(reason.contains("4 GiB"), "{mode:?}: {reason}");
            }
            other => panic!("{mode:?}: {:?}", other.map(|_| "opened")),
        }
    }
}

#[test]
fn overlapping_log_ranges_never_make_a_write_reuse_a_position_or_a_merge_cover_a_segment() {
    // Two log segments over one log range, which only damage makes (here:
    // two stores' first segments side by side), opened tolerating any
    // corruption. The last segment by range (2) ends below segment 1: new
    // writes must go after the highest end, not into segment 2, whose
    // positions segment 1 also covers. And a merged segment supersedes, at
    // the next open, every segment starting inside its range: merging
    // either segment alone would make the next open remove the other.
    use dkv_cask::SegmentId;
    use dkv_cask::format::{SegmentHeader, SegmentKind};
    let options = Options {
        sync_mode: SyncMode::Always,
        recovery_mode: RecoveryMode::TolerateAnyCorruption,
        preallocate: false,
        map_appends: false,
        retention: dkv_cask::Retention::none(),
        merge: dkv_cask::MergeOptions {
            automatic: false,
            ..dkv_cask::MergeOptions::default()
        },
        ..Options::default()
    };
    // Every key written twice, so both segments have space to give back.
    let first_segment = |prefix: &str, keys: usize| {
        let t = temp_store(options.clone());
        for round in 0..2 {
            for i in 0..keys {
                let value = format!("{prefix}{i}-{round}");
                t.store
                    .put(&[pair(format!("{prefix}{i:03}"), value)])
                    .unwrap();
            }
        }
        t.store.close().unwrap();
        fs::read(SegmentId(1).path_in(t.dir.path())).unwrap()
    };
    let a = first_segment("a", 30);
    let b = first_segment("b", 20);
    let dir = tempfile::tempdir().unwrap();
    fs::write(SegmentId(1).path_in(dir.path()), &a).unwrap();
    let header = SegmentHeader {
        kind: SegmentKind::Log,
        id: SegmentId(2),
        base_position: 0,
    };
    let b = [&header.encode()[..], &b[SEGMENT_HEADER_BYTES as usize..]].concat();
    fs::write(SegmentId(2).path_in(dir.path()), &b).unwrap();

    let store = Store::open(dir.path(), options.clone()).unwrap();
    assert!(!store.recovery_report().skipped.is_empty());
    let mut expected = contents(&store);
    assert_eq!(expected.len(), 50);
    store.put(&[pair("after", "acknowledged")]).unwrap();
    expected.insert(b"after".to_vec(), b"acknowledged".to_vec());
    let segments = store.stats().unwrap().segments;
    let highest = segments
        .iter()
        .filter(|s| !s.active)
        .map(|s| s.end_position)
        .max()
        .unwrap();
    let active = segments.iter().find(|s| s.active).unwrap();
    assert_eq!(active.base_position, highest, "{segments:?}");
    assert!(active.id.0 > 2, "{segments:?}");

    for id in [1, 2] {
        match store.merge_segments(&[SegmentId(id)], &mut |_| true) {
            Err(Error::Corruption { reason, .. }) => {
                assert!(reason.contains("overlap"), "{reason}")
            }
            other => panic!("merge of segment {id} alone: {other:?}"),
        }
    }
    // A whole merge leaves the two alone and goes on with the rest.
    store.merge().unwrap();
    store.close().unwrap();
    let reopened = Store::open(dir.path(), options).unwrap();
    assert_eq!(contents(&reopened), expected);
}

#[test]
fn a_merged_segment_ending_near_the_top_of_the_log_is_corruption_not_an_overflow() {
    // The log goes on after the highest end; an end with no room after it
    // would overflow the next change number.
    use dkv_cask::SegmentId;
    let dir = tempfile::tempdir().unwrap();
    let segment = merged_segment_headers(u64::MAX - 10);
    fs::write(SegmentId(1).path_in(dir.path()), &segment).unwrap();
    for mode in MODES {
        match open(dir.path(), mode) {
            Err(Error::Corruption { reason, .. }) => {
                assert!(reason.contains("no room"), "{mode:?}: {reason}")
            }
            other => panic!("{mode:?}: {:?}", other.map(|_| "opened")),
        }
    }
}
