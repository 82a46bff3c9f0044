//! Bodies of the cargo-fuzz targets in `fuzz/`. They live in the library so
//! that ordinary tests run them over the committed seed corpus, and each
//! asserts the property its target checks. Not part of the stable API.

use crate::format::{
    Hint, HintBuilder, HintEntry, HintHeader, MergeHeader, MergedBuilder, OP_HEADER_LEN, OpKind,
    RecordBuilder, RecordKind, SEGMENT_HEADER_LEN, SegmentHeader, SegmentKind, decode_op,
    decode_record,
};

/// `record_decode`: arbitrary bytes as a segment header, a merge header, a
/// record (batch or merged), an operation, a hint file, a keydir file and a
/// whole segment.
/// Decoding never panics, and whatever decodes re-encodes to exactly the
/// same bytes.
pub fn record_decode(data: &[u8]) {
    if let Ok(h) = SegmentHeader::decode(data) {
        if data[8..10] == crate::format::FORMAT_VERSION.to_le_bytes() {
            assert_eq!(&h.encode()[..], &data[..SEGMENT_HEADER_LEN]);
        } else {
            // An older version reads the same and is written as this one.
            assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
        }
    }
    if let Ok(m) = MergeHeader::decode(data) {
        assert_eq!(
            &m.encode()[..],
            &data[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + crate::format::MERGE_HEADER_LEN]
        );
    }
    if let Ok(hint) = Hint::decode(data) {
        let mut b = HintBuilder::new(&hint.header);
        for e in hint.entries() {
            b.push(&e);
        }
        let starts: Vec<u32> = hint.record_starts().collect();
        assert_eq!(b.finish(&starts), data);
    }
    if let Ok(record) = decode_record(data)
        && record.header.kind == RecordKind::Merged
    {
        let mut b = MergedBuilder::default();
        for (at, cn, op) in record.entries() {
            let at = at as usize;
            b.push(
                cn,
                &data[at..at + OP_HEADER_LEN + op.key.len() + op.value.len()],
            );
        }
        assert_eq!(b.finish(), record.bytes());
    } else if let Ok(record) = decode_record(data) {
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
    // Reading a verified record again without checks gives the same
    // record; on any other bytes it gives anything but a panic.
    let again = crate::format::decode_verified_record(data);
    if let Ok(record) = decode_record(data) {
        let again = again.expect("a verified record reads again");
        assert_eq!(again.header, record.header);
        assert_eq!(again.applied, record.applied);
        assert!(again.entries().eq(record.entries()));
    } else if let Some(r) = again {
        r.entries().for_each(drop);
    }
    if let Ok((op, len)) = decode_op(data) {
        let mut b = RecordBuilder::new(None);
        let at = match op.kind {
            OpKind::Put => b.push_put(op.key, op.value, op.expire_ts),
            OpKind::Delete => b.push_delete(op.key),
        } as usize;
        assert_eq!(&b.as_bytes()[at..at + len], &data[..len]);
    }
    keydir_file_round_trip(data);
    // As a segment: read records one after another until one fails.
    let mut at = SEGMENT_HEADER_LEN.min(data.len());
    while let Ok(r) = decode_record(&data[at..]) {
        at += r.bytes().len();
    }
}

/// `data` as a keydir file, as given and with its trailer set to the
/// checksum of the rest (so that the structure, not the checksum, is what
/// the fuzzer explores): what decodes re-encodes to the same bytes.
fn keydir_file_round_trip(data: &[u8]) {
    use crate::format::{KeydirFile, KeydirFileBuilder};
    let mut fixed = data.to_vec();
    if let Some(body) = fixed.len().checked_sub(4) {
        let crc = crate::format::crc32(&fixed[..body]);
        fixed[body..].copy_from_slice(&crc.to_le_bytes());
    }
    for bytes in [data, &fixed[..]] {
        let Ok(file) = KeydirFile::decode(bytes) else {
            continue;
        };
        let mut b = KeydirFileBuilder::new(file.applied, file.last_start, bytes.len());
        for s in &file.segments {
            b.segment(s);
        }
        for (position, segment, offset) in file.change_starts() {
            b.change_start(position, segment, offset);
        }
        for (key, entry) in file.entries() {
            b.key(key, &entry);
        }
        assert_eq!(b.finish(), bytes, "a keydir file re-encodes differently");
    }
}

/// Options for the fuzz bodies' throwaway stores: small, unpreallocated
/// segments, no syncs and no background merging, so one execution costs
/// little and does the same every time.
fn scratch_options() -> crate::Options {
    crate::Options {
        sync_mode: crate::SyncMode::Never,
        segment_size: 16 << 10,
        preallocate: false,
        max_batch_bytes: 8 << 10,
        merge: crate::MergeOptions {
            automatic: false,
            ..crate::MergeOptions::default()
        },
        ..crate::Options::default()
    }
}

/// A folder for a throwaway store, in memory (`/dev/shm`) where there is
/// one: a merge syncs its output and the folder, which on a disk costs
/// more than the rest of an execution.
fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return Ok(dir);
    }
    tempfile::tempdir()
}

/// [`scratch_options`] with nothing kept for followers, so that `merge()`
/// may merge every sealed segment, and a fixed clock.
fn merging_options(now: u64) -> crate::Options {
    crate::Options {
        clock: crate::Clock::manual(now),
        retention: crate::Retention::none(),
        ..scratch_options()
    }
}

/// Every pair the store iterates (at most 10,000), in order.
fn all_pairs(store: &crate::Store) -> crate::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    store
        .iter(&crate::IterationOptions::new())?
        .take(10_000)
        .map(|p| p.map(|p| (p.key, p.value)))
        .collect()
}

/// The clock of `open_dir`'s stores: keys expiring before it are dead.
const OPEN_DIR_NOW: u64 = 2_000_000_000;

/// `open_dir`: arbitrary bytes become the files of a store folder. The
/// first byte says how many segments (bits 0-1, up to four), the recovery
/// mode (bits 6-7), and (bits 2-5) whether the rest is cut into equal
/// parts, the odd ones behind a valid log segment header, or read as
/// described files (see `write_described_files`): log or merged segments, with
/// or without a hint file (raw bytes, the true hint, a doctored one, or
/// one made up), and leftovers of an unfinished merge or hint write. With
/// described files, bit 5 also merges the newest sealed segment alone
/// before everything is merged (a run that does not start the log, so
/// tombstones must be kept).
///
/// `Store::open` returns a store or a typed error, never panics; a store
/// that opens can be iterated, written, merged (everything, as nothing is
/// retained) and reopened, and holds the same pairs through the merges
/// and the reopen; an acknowledged write survives both. Open trusts a hint
/// that matches its segment's headers and sampled bytes (a hint is the
/// engine's own cache; checking every entry would mean reading the whole
/// segment), so where the body wrote a well-formed hint whose entries lie
/// about its segment (an expiry the operation does not have, say), the
/// pairs may differ once the store is reopened after a merge: then they are
/// compared only before the reopen. When the input's last byte has its top
/// bit set, the keydir file the first clean close saves is doctored (the
/// byte at the offset the two bytes before it name, checksum fixed up):
/// open refuses it or loads its lie, and every call still returns a value
/// or a typed error.
pub fn open_dir(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(dir) = scratch_dir() else { return };
    let files = 1 + usize::from(first % 4);
    let plain = first & 0x3c == 0;
    let written = if plain {
        write_equal_parts(dir.path(), files, rest).map(|()| false)
    } else {
        write_described_files(dir.path(), files, rest)
    };
    let Ok(hints_lie) = written else { return };
    let options = crate::Options {
        recovery_mode: match first >> 6 {
            0 => crate::RecoveryMode::Strict,
            1 => crate::RecoveryMode::TolerateTornTail,
            _ => crate::RecoveryMode::TolerateAnyCorruption,
        },
        ..merging_options(OPEN_DIR_NOW)
    };
    // The last bytes may also say how to doctor the keydir file the first
    // clean close saves: a byte changed and its checksum made to hold.
    let doctor = match data {
        [.., a, b, c] if c & 0x80 != 0 => Some((usize::from(u16::from_le_bytes([*a, *b])), c | 1)),
        _ => None,
    };
    check_open_dir(
        dir.path(),
        &options,
        !plain && first & 0x20 != 0,
        !hints_lie,
        doctor,
    );
}

/// Changes the byte at `at` (modulo the body) of the keydir file in `dir`
/// by `xor`, and rewrites its trailer so the checksum holds: a lying file
/// that only the content checks can catch. Whether there was one.
fn doctor_keydir_file(dir: &std::path::Path, at: usize, xor: u8) -> bool {
    let path = dir.join(crate::KEYDIR_FILE);
    let Ok(mut bytes) = std::fs::read(&path) else {
        return false;
    };
    let Some(body) = bytes.len().checked_sub(4).filter(|&n| n > 0) else {
        return false;
    };
    bytes[at % body] ^= xor;
    let crc = crate::format::crc32(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).is_ok()
}

/// Whether `e` is one of the errors that damaged files may cause.
fn is_damage(e: &crate::Error) -> bool {
    matches!(
        e,
        crate::Error::Corruption { .. } | crate::Error::UnsupportedVersion { .. }
    )
}

/// The properties of `open_dir` over the folder `dir`: `partial` merges
/// the newest sealed segment alone first; `hints_true` says whether the
/// pairs must also stay the same through reopens; `doctor` changes a byte
/// of the keydir file the first close saves (see [`doctor_keydir_file`]):
/// then the reopened store may hold what the lie says, but every call
/// still returns a value or a typed error.
fn check_open_dir(
    dir: &std::path::Path,
    options: &crate::Options,
    partial: bool,
    hints_true: bool,
    doctor: Option<(usize, u8)>,
) {
    use crate::KvStore;
    use std::collections::BTreeMap;
    type Pairs = BTreeMap<Vec<u8>, Vec<u8>>;
    let store = match crate::Store::open(dir, options.clone()) {
        Ok(store) => store,
        Err(e) => {
            assert!(is_damage(&e), "open failed with an untyped error: {e}");
            return;
        }
    };
    // What the store holds, unless reading it hits damage (a value whose
    // checksum fails, an index entry a hint made up).
    let pairs = |store: &crate::Store, when: &str| -> Option<Pairs> {
        match all_pairs(store) {
            Ok(pairs) => {
                assert!(
                    pairs.windows(2).all(|w| w[0].0 < w[1].0),
                    "iteration {when} is not in strictly ascending key order"
                );
                Some(pairs.into_iter().collect())
            }
            Err(e) => {
                assert!(is_damage(&e), "iteration {when} failed untyped: {e}");
                None
            }
        }
    };
    let mut before = pairs(&store, "after open");
    store
        .put(&[crate::serverpb::KvPair {
            key: b"fuzz".to_vec(),
            value: b"ok".to_vec(),
            expire_ts: 0,
        }])
        .expect("a store that opened takes a write");
    if let Some(b) = &mut before {
        b.insert(b"fuzz".to_vec(), b"ok".to_vec());
    }
    // Once the pairs could be read, they can be read after each merge and
    // are the same, whether or not the merge failed on damage.
    let same = |now: Option<Pairs>, when: &str| {
        if let Some(before) = &before {
            let now = now.unwrap_or_else(|| panic!("the pairs cannot be read {when}"));
            assert_eq!(&now, before, "the pairs changed {when}");
        }
    };
    if partial {
        let sealed = sealed_ids(&store);
        if let Some(newest) = sealed.last() {
            if let Err(e) = store.merge_segments(&[*newest], &mut |_| true) {
                assert!(is_damage(&e), "merge of {newest} failed untyped: {e}");
            }
            same(
                pairs(&store, "after a partial merge"),
                "after a partial merge",
            );
        }
    }
    if let Err(e) = store.merge() {
        assert!(is_damage(&e), "merge failed with an untyped error: {e}");
    }
    same(pairs(&store, "after the merge"), "after the merge");
    store.close().expect("close");
    let lied = doctor.is_some_and(|(at, xor)| doctor_keydir_file(dir, at, xor));
    let again =
        crate::Store::open(dir, options.clone()).expect("a store that took a write reopens");
    let used_lie = lied && again.recovery_report().from_keydir_file;
    match again.get(&[b"fuzz"]) {
        Ok(got) if !used_lie => assert_eq!(
            got.into_iter().next().map(|p| p.value),
            Some(b"ok".to_vec()),
            "an acknowledged write survives a merge and a reopen"
        ),
        Ok(_) => {}
        Err(e) => assert!(used_lie && is_damage(&e), "get after reopen failed: {e}"),
    }
    let after = pairs(&again, "after the reopen");
    if hints_true && !used_lie {
        same(after.clone(), "after the merge and a reopen");
    }
    // The merged folder opens again the same (with the hints the first
    // reopen wrote for its log segments).
    again.close().expect("close");
    let third = crate::Store::open(dir, options.clone()).expect("a merged store reopens");
    if let Some(after) = after {
        let now = pairs(&third, "after a second reopen");
        assert_eq!(
            now.as_ref(),
            Some(&after),
            "a second reopen changed the pairs"
        );
    }
    let _ = third.close();
}

/// `open_dir`'s first layout: `rest` cut into `files` equal parts, the odd
/// ones behind a valid log segment header.
fn write_equal_parts(dir: &std::path::Path, files: usize, rest: &[u8]) -> std::io::Result<()> {
    let chunk = rest.len() / files + 1;
    let mut base = 0u64;
    for (i, part) in rest.chunks(chunk).enumerate() {
        let id = crate::SegmentId(i as u32 + 1);
        let mut bytes = Vec::new();
        if i % 2 == 0 {
            bytes.extend_from_slice(
                &SegmentHeader {
                    kind: SegmentKind::Log,
                    id,
                    base_position: base,
                }
                .encode(),
            );
        }
        bytes.extend_from_slice(part);
        base += part.len() as u64;
        std::fs::write(id.path_in(dir), &bytes)?;
    }
    Ok(())
}

/// Length of a file's description in `open_dir`'s second layout.
pub const DESCRIBED_FILE_LEN: usize = 8;

/// `open_dir`'s second layout: `files` segments (ids 1, 2, ...), each an
/// 8-byte description followed by its body and, for a raw hint, the hint:
///
/// ```text
/// 0      1          3           5      7
/// | ctl  | body len | hint len  | span | aux |
/// | u8   | u16      | u16       | u16  | u8  |
/// ctl bits 0-1: 0 no header, 1 log segment header, 2 merged segment
///               headers covering (base, base + span], 3 merged headers
///               covering (0, span] (a merge that committed over the
///               segments before it, which were not yet removed)
///     bits 2-4: hint file: 0 none, 1 the next `hint len` bytes, 2 the
///               true hint, 3 the true hint doctored as `aux` says, 4 a
///               hint that fits the segment, with entries made up from
///               its body; 5-7 none
///     bit 5:    also an unfinished merge output (`.merging`)
///     bit 6:    also a hint whose segment does not exist
///     bit 7:    also a hint write's leftover temp file
/// aux: the merged segment's applied number; how the hint is doctored
/// ```
///
/// Log segments start where the previous segment ended (the first at 0);
/// so real segment bodies laid end to end open as they were.
///
/// Returns whether a hint file that open may use lies about its segment.
fn write_described_files(
    dir: &std::path::Path,
    files: usize,
    mut rest: &[u8],
) -> std::io::Result<bool> {
    let mut take = |n: usize| {
        let (now, later) = rest.split_at(n.min(rest.len()));
        rest = later;
        now
    };
    let mut base = 0u64;
    let mut lies = false;
    for i in 0..files {
        let d = take(DESCRIBED_FILE_LEN);
        let byte = |k: usize| d.get(k).copied().unwrap_or(0);
        let u16_at = |k: usize| u16::from_le_bytes([byte(k), byte(k + 1)]);
        let (ctl, aux) = (byte(0), byte(7));
        let span = u64::from(u16_at(5));
        let body = take(usize::from(u16_at(1)));
        let raw_hint = if (ctl >> 2) & 7 == 1 {
            take(usize::from(u16_at(3)))
        } else {
            &[]
        };
        let id = crate::SegmentId(i as u32 + 1);
        let mut bytes = Vec::with_capacity(body.len() + 64);
        let segment = |kind, base_position| SegmentHeader {
            kind,
            id,
            base_position,
        };
        let merge = |end_position| MergeHeader {
            end_position,
            applied: u64::from(aux),
        };
        match ctl & 3 {
            0 => base += body.len() as u64,
            1 => {
                bytes.extend_from_slice(&segment(SegmentKind::Log, base).encode());
                base += body.len() as u64;
            }
            2 => {
                bytes.extend_from_slice(&segment(SegmentKind::Merged, base).encode());
                bytes.extend_from_slice(&merge(base + span).encode());
                base += span;
            }
            _ => {
                bytes.extend_from_slice(&segment(SegmentKind::Merged, 0).encode());
                bytes.extend_from_slice(&merge(span).encode());
                base = span;
            }
        }
        bytes.extend_from_slice(body);
        std::fs::write(id.path_in(dir), &bytes)?;
        let hint = match (ctl >> 2) & 7 {
            1 => Some(raw_hint.to_vec()),
            2 => crate::hint::build(&bytes),
            3 => crate::hint::build(&bytes).and_then(|h| doctor_hint(&h, aux)),
            4 => made_up_hint(&bytes, aux),
            _ => None,
        };
        if let Some(hint) = &hint {
            std::fs::write(id.hint_path_in(dir), hint)?;
            // A hint lies if open may take it (it decodes, and its header
            // is the true hint's) but it is not the true hint.
            let truth = crate::hint::build(&bytes);
            lies |= match (Hint::decode(hint), truth.as_deref().map(Hint::decode)) {
                (Err(_), _) => false,
                (Ok(h), Some(Ok(t))) => h.header == t.header && Some(hint) != truth.as_ref(),
                (Ok(_), _) => true,
            };
        }
        if ctl & 0x20 != 0 {
            let unfinished = crate::SegmentId(id.0 + 8).merging_path_in(dir);
            std::fs::write(unfinished, &bytes)?;
        }
        if ctl & 0x40 != 0 {
            let orphan = crate::SegmentId(id.0 + 16).hint_path_in(dir);
            std::fs::write(orphan, hint.as_deref().unwrap_or(raw_hint))?;
        }
        if ctl & 0x80 != 0 {
            let leftover = id.hint_path_in(dir).with_extension("hint.tmp");
            std::fs::write(leftover, hint.as_deref().unwrap_or(body))?;
        }
    }
    Ok(lies)
}

/// The store's sealed segments, in log order.
fn sealed_ids(store: &crate::Store) -> Vec<crate::SegmentId> {
    store
        .stats()
        .expect("stats")
        .segments
        .into_iter()
        .filter(|s| !s.active)
        .map(|s| s.id)
        .collect()
}

/// A small pseudo-random sequence (xorshift) from a fuzz byte.
fn xorshift(seed: u8) -> impl FnMut() -> u32 {
    let mut x = 0x9e37_79b9u32 ^ (u32::from(seed) << 8 | u32::from(seed));
    move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    }
}

/// A valid hint that differs from the true hint `true_hint` in one entry,
/// as `how` chooses (bits 0-2 what, the rest which entry): dropped,
/// duplicated, turned from put into delete (or back), given another
/// entry's change number, location or an expiry in the past; 7 changes
/// nothing.
fn doctor_hint(true_hint: &[u8], how: u8) -> Option<Vec<u8>> {
    let hint = Hint::decode(true_hint).ok()?;
    let entries: Vec<HintEntry<'_>> = hint.entries().collect();
    let n = entries.len().max(1);
    let which = usize::from(how >> 3) % n;
    let other = entries.get((which + 1) % n).copied();
    let mut b = HintBuilder::new(&hint.header);
    for (i, e) in entries.iter().enumerate() {
        let mut e = *e;
        if i == which
            && let Some(other) = other
        {
            match how & 7 {
                0 => continue,
                1 => b.push(&e),
                2 => {
                    e.kind = match e.kind {
                        OpKind::Put => OpKind::Delete,
                        OpKind::Delete => OpKind::Put,
                    }
                }
                3 => e.change_number = other.change_number,
                4 => (e.offset, e.len) = (other.offset, other.len),
                5 => e.expire_ts = 1,
                6 => e.change_number = hint.header.base_position + 1,
                _ => {}
            }
        }
        b.push(&e);
    }
    let starts: Vec<u32> = hint.record_starts().collect();
    Some(b.finish(&starts))
}

/// A hint whose header fits the segment file `bytes` (so open trusts it),
/// with entries made up from the segment's bytes: keys of one or two
/// bytes (in order, one entry each), locations and change numbers inside
/// the segment's.
fn made_up_hint(bytes: &[u8], seed: u8) -> Option<Vec<u8>> {
    let header = SegmentHeader::decode(bytes).ok()?;
    let start = header.kind.records_start();
    let end = match header.kind {
        SegmentKind::Log => header.base_position + (bytes.len().max(start) - start) as u64,
        SegmentKind::Merged => MergeHeader::decode(bytes).ok()?.end_position,
    };
    let mut b = HintBuilder::new(&HintHeader {
        kind: header.kind,
        segment: header.id,
        segment_len: bytes.len() as u64,
        base_position: header.base_position,
        end_position: end,
        applied: 0,
        segment_crc: crate::format::crc32(bytes),
        sample_crc: crate::format::sample_crc(bytes),
    });
    let mut rng = xorshift(seed);
    let keys: Vec<[u8; 2]> = bytes[start.min(bytes.len())..]
        .chunks(2)
        .take(32)
        .map(|c| [c[0], c.get(1).copied().unwrap_or(0)])
        .collect();
    let room = (bytes.len() as u64).saturating_sub(SEGMENT_HEADER_LEN as u64);
    let range = end.saturating_sub(header.base_position).max(1);
    // One entry per key, in key order, as a hint holds them.
    let mut entries = std::collections::BTreeMap::new();
    for k in &keys {
        let r = u64::from(rng());
        let key = &k[..1 + (r & 1) as usize];
        let len = (OP_HEADER_LEN + key.len()) as u64 + (r >> 20) % 16;
        let offset = SEGMENT_HEADER_LEN as u64 + (r >> 1) % room.saturating_sub(len).max(1);
        entries.insert(
            key,
            HintEntry {
                kind: if r & 2 == 0 {
                    OpKind::Put
                } else {
                    OpKind::Delete
                },
                key,
                offset: offset as u32,
                len: len as u32,
                expire_ts: 0,
                change_number: header.base_position + 1 + (r >> 3) % range,
            },
        );
    }
    for e in entries.values() {
        b.push(e);
    }
    Some(b.finish(&[]))
}

/// One file of `open_dir`'s second layout: its description, its body and
/// (when `ctl` asks for a raw hint) the hint, for building seeds.
pub fn described_file(ctl: u8, body: &[u8], span: u16, aux: u8, raw_hint: &[u8]) -> Vec<u8> {
    let mut out = vec![ctl];
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(&(raw_hint.len() as u16).to_le_bytes());
    out.extend_from_slice(&span.to_le_bytes());
    out.push(aux);
    out.extend_from_slice(body);
    out.extend_from_slice(raw_hint);
    out
}

/// `snapshot_stream`: arbitrary bytes as a stream for `put_snapshot`. It
/// either loads or fails with a typed error; a failed load leaves the
/// store exactly as it was.
pub fn snapshot_stream(data: &[u8]) {
    use crate::KvStore;
    let Ok(dir) = scratch_dir() else { return };
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
/// passes the last change's number, and a failure is a typed error. The
/// store holds exactly the changes applied (each change beyond the number
/// reached so far, in order, up to the applied number), nothing of the
/// change that stopped the call or of any after it.
pub fn change_records(data: &[u8]) {
    use crate::replication::{ChangeOp, change_ops, last_number};
    use crate::{ChangeApplier, KvStore};
    use prost::Message;
    use std::collections::BTreeMap;
    const NOW: u64 = 2_000_000_000;
    let mut changes = Vec::new();
    let mut buf = data;
    while !buf.is_empty() && changes.len() < 64 {
        match crate::serverpb::ChangeRecord::decode_length_delimited(&mut buf) {
            Ok(c) => changes.push(c),
            Err(_) => break,
        }
    }
    let Ok(dir) = scratch_dir() else { return };
    let options = crate::Options {
        clock: crate::Clock::manual(NOW),
        ..scratch_options()
    };
    let store = crate::Store::open(dir.path(), options).expect("open a scratch store");
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
    // The changes the store applied, into a model of its live pairs.
    let mut model = BTreeMap::new();
    let mut reached = 0;
    let mut stopped = false;
    for c in &changes {
        let last = match last_number(c) {
            Ok(last) if last <= reached => continue, // Already applied.
            Ok(last) => Some(last),
            Err(_) => None,
        };
        if reached == applied {
            // The first change not applied: the call stopped here.
            stopped = true;
            break;
        }
        let last = last.expect("a change with a bad number was applied over");
        for op in change_ops(c).expect("a change that does not decode was applied over") {
            match op {
                ChangeOp::Put {
                    key,
                    value,
                    expire_ts,
                } if expire_ts == 0 || expire_ts > NOW => {
                    model.insert(key, value);
                }
                ChangeOp::Put { key, .. } | ChangeOp::Delete { key } => {
                    model.remove(&key);
                }
            }
        }
        reached = last;
    }
    assert_eq!(
        reached, applied,
        "the applied number is no applied change's end"
    );
    assert_eq!(
        stopped,
        result.is_err(),
        "a call stopped without an error, or the reverse"
    );
    let got = all_pairs(&store).expect("iterate");
    let want: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
    assert_eq!(
        got, want,
        "the store does not hold exactly the applied changes"
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

/// `ops_model`: arbitrary bytes as a sequence of puts, batches, deletes,
/// compare-and-sets, gets, iterations, reopens, backup-and-restore and
/// snapshot round trips, merges (everything; an adjacent run of sealed
/// segments; either stopped after a chosen step as by a crash, then
/// reopened; everything and then a reopen), checked against a `BTreeMap`
/// model after every step, and the store's figures (`stats()`) against
/// the model after every merge; power losses (the store's folder replaced
/// by a crash image from [`crate::crash`]: only what was synced, all of it,
/// random prefixes of unsynced changes with a torn write, or unsynced
/// blocks written back out of order) and a failing
/// next I/O call (EIO or ENOSPC in a put, a merge or a backup), each
/// followed by a reopen. Writes are `SyncMode::Always`, so nothing
/// acknowledged may be lost. Nothing is retained for followers, so merges
/// merge.
pub fn ops_model(data: &[u8]) {
    use crate::serverpb::{CompareAndSetRequest, KvPair};
    use crate::{Backupable, IterationOptions, KvStore, MergeStep};
    use std::collections::BTreeMap;

    type Model = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;
    const NOW: u64 = 1_000_000;
    let key = |b: Option<u8>| vec![b'k', b.unwrap_or(0) % 8];
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let Ok(mut dir) = scratch_dir() else { return };
    // Every change goes through a crash recorder (for the power-loss
    // step) behind a fault injector (for the failing-call step).
    let faults = std::sync::Arc::new(crate::FaultInjector::new());
    let Ok(recorder) = crate::crash::Recorder::new(dir.path()) else {
        return;
    };
    let mut options = crate::Options {
        // Every acknowledged write is durable, so a power loss between
        // steps loses nothing the model holds.
        sync_mode: crate::SyncMode::Always,
        // The smallest segments, so that a few steps fill several.
        segment_size: 4096,
        file_system: recorder.clone(),
        fault_injector: Some(std::sync::Arc::clone(&faults)),
        ..merging_options(NOW)
    };
    let mut recorder = recorder;
    let mut db = dir.path().join("db");
    let mut store = crate::Store::open(&db, options.clone()).expect("open");
    let mut model: Model = BTreeMap::new();
    let live = |m: &Model, k: &[u8]| {
        m.get(k)
            .filter(|(_, e)| *e == 0 || *e > NOW)
            .map(|(v, _)| v.clone())
    };
    let live_pairs = |m: &Model| -> Vec<(Vec<u8>, Vec<u8>)> {
        m.iter()
            .filter(|(_, (_, e))| *e == 0 || *e > NOW)
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    };
    let reopen = |store: crate::Store, db: &std::path::Path, options: &crate::Options| {
        store.close().expect("close");
        crate::Store::open(db, options.clone()).expect("reopen")
    };
    // A merge stopped by its hook after `step`, as a crash would stop it.
    let stop_after = |step: MergeStep| move |s: MergeStep| s != step;
    let steps = [MergeStep::Written, MergeStep::Committed, MergeStep::Applied];
    let mut steps_taken = 0;
    // Reopens, backups, snapshots and merges cost most: at most this many
    // per execution.
    let mut heavy_left = 24;
    while let Some(op) = next() {
        steps_taken += 1;
        if steps_taken > 200 {
            break;
        }
        let mut merged = false;
        let heavy = op % 10 == 9 && heavy_left > 0;
        heavy_left -= usize::from(heavy);
        match op % 10 {
            0..=3 => {
                let k = key(next());
                let len = usize::from(next().unwrap_or(0) % 40);
                let v: Vec<u8> = (0..len).map(|i| i as u8 ^ op).collect();
                let e = match next().unwrap_or(0) % 4 {
                    0 => NOW - 10,
                    1 => NOW + 1000,
                    _ => 0,
                };
                store
                    .put(&[KvPair {
                        key: k.clone(),
                        value: v.clone(),
                        expire_ts: e,
                    }])
                    .expect("put");
                model.insert(k, (v, e));
            }
            4 => {
                let n = 1 + next().unwrap_or(0) % 4;
                let batch: Vec<KvPair> = (0..n)
                    .map(|i| KvPair {
                        key: key(next()),
                        value: vec![i; usize::from(i)],
                        expire_ts: 0,
                    })
                    .collect();
                store.put(&batch).expect("batch");
                for p in batch {
                    model.insert(p.key, (p.value, 0));
                }
            }
            5 => {
                let k = key(next());
                store.delete(&k).expect("delete");
                model.remove(&k);
            }
            6 => {
                let k = key(next());
                let current = live(&model, &k);
                let old = match next().unwrap_or(0) % 3 {
                    0 => Vec::new(),
                    1 => current.clone().unwrap_or_default(),
                    _ => b"stale".to_vec(),
                };
                let expected = match &current {
                    None => old.is_empty(),
                    Some(_) if old.is_empty() => false,
                    Some(v) => *v == old,
                };
                let new = vec![op; 3];
                let swapped = store
                    .compare_and_set(&CompareAndSetRequest {
                        key: k.clone(),
                        old_value: old,
                        new_value: new.clone(),
                        expire_ts: 0,
                    })
                    .expect("cas");
                assert_eq!(swapped, expected, "compare-and-set of {k:?}");
                if swapped {
                    model.insert(k, (new, 0));
                }
            }
            7 => {
                let k = key(next());
                let got = store.get(&[&k]).expect("get").pop().map(|p| p.value);
                assert_eq!(got, live(&model, &k), "get of {k:?}");
            }
            8 => {
                let got: Vec<(Vec<u8>, Vec<u8>)> = store
                    .iter(&IterationOptions::new().with_prefix(b"k".to_vec()))
                    .expect("iterate")
                    .map(|p| p.map(|p| (p.key, p.value)).expect("item"))
                    .collect();
                assert_eq!(got, live_pairs(&model), "iteration");
                let mut lent = Vec::new();
                store
                    .scan(&IterationOptions::new().with_prefix(b"k".to_vec()), |p| {
                        lent.push((p.key.to_vec(), p.value.to_vec()));
                        true
                    })
                    .expect("scan");
                assert_eq!(lent, got, "scan");
            }
            _ if !heavy => {}
            _ => match next().unwrap_or(0) % 10 {
                0 => store = reopen(store, &db, &options),
                1 => {
                    let backup = dir.path().join("backup");
                    store.backup_to(&backup).expect("backup");
                    let saved = model.clone();
                    let k = key(next());
                    store
                        .put(&[KvPair {
                            key: k.clone(),
                            value: b"after".to_vec(),
                            expire_ts: 0,
                        }])
                        .expect("put after backup");
                    store = store.restore_from(&backup).expect("restore");
                    model = saved;
                }
                2 => {
                    let mut stream = Vec::new();
                    std::io::Read::read_to_end(
                        &mut store.get_snapshot().expect("snapshot"),
                        &mut stream,
                    )
                    .expect("read snapshot");
                    let saved: Model = model
                        .iter()
                        .filter(|(_, (_, e))| *e == 0 || *e > NOW)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    store.delete(b"k\x01").expect("delete");
                    store.put_snapshot(&mut &stream[..]).expect("load snapshot");
                    model = saved;
                }
                3 => {
                    store.merge().expect("merge");
                    merged = true;
                }
                sub @ (4 | 6) => {
                    // An adjacent run of sealed segments, in log order.
                    let sealed = sealed_ids(&store);
                    let at = usize::from(next().unwrap_or(0) % 8);
                    let len = 1 + usize::from(next().unwrap_or(0) % 3);
                    let run = sealed.get(at..(at + len).min(sealed.len()));
                    if let Some(run) = run.filter(|r| !r.is_empty()) {
                        if sub == 4 {
                            store.merge_segments(run, &mut |_| true).expect("merge run");
                        } else {
                            let step = steps[usize::from(next().unwrap_or(0) % 3)];
                            let stopped = store.merge_segments(run, &mut stop_after(step));
                            assert!(stopped.is_err(), "the hook stops the merge");
                            store = reopen(store, &db, &options);
                        }
                        merged = true;
                    }
                }
                5 => {
                    store.merge().expect("merge");
                    store = reopen(store, &db, &options);
                    merged = true;
                }
                7 => {
                    let step = steps[usize::from(next().unwrap_or(0) % 3)];
                    // Stopped only if some run is merged.
                    let _ = store.merge_with_hook(&mut stop_after(step));
                    store = reopen(store, &db, &options);
                    merged = true;
                }
                8 => {
                    // Power loss now: the image of what is durable (and,
                    // as chosen, some unsynced changes), opened as a new
                    // store, must hold everything acknowledged.
                    let how = next().unwrap_or(0);
                    // The step number widens the seed beyond one byte; the
                    // high bit picks reordered blocks over a prefix, so
                    // that inputs written before it still mean a prefix
                    // half of the time.
                    let seed = u64::from(how) | (steps_taken as u64) << 8;
                    let loss = match how % 3 {
                        0 => crate::crash::Loss::AllUnsynced,
                        1 => crate::crash::Loss::Nothing,
                        _ if how & 0x80 != 0 => crate::crash::Loss::Reordered { seed },
                        _ => crate::crash::Loss::RandomPrefix { seed },
                    };
                    let mut replay = recorder.replay();
                    replay.advance_to(replay.len());
                    let image = replay.image(loss);
                    drop(store);
                    assert_eq!(recorder.untracked(), 0, "a change bypassed the recorder");
                    dir = scratch_dir().expect("scratch folder");
                    image.write_to(dir.path()).expect("write the image");
                    recorder = crate::crash::Recorder::new(dir.path()).expect("recorder");
                    options.file_system = recorder.clone();
                    db = dir.path().join("db");
                    store = crate::Store::open(&db, options.clone())
                        .unwrap_or_else(|e| panic!("the image after {loss:?} does not open: {e}"));
                }
                _ => {
                    // The next I/O call of a put, a merge or a backup
                    // fails: a typed error, then a reopen holds the model
                    // (plus the failed put, whole, or not at all).
                    let n = u64::from(next().unwrap_or(0) % 4);
                    let kind = if n % 2 == 0 {
                        crate::InjectedError::Eio
                    } else {
                        crate::InjectedError::NoSpace
                    };
                    let k = key(next());
                    let what = next().unwrap_or(0) % 3;
                    faults.fail_after(n, kind);
                    let result = match what {
                        0 => store.put(&[KvPair {
                            key: k.clone(),
                            value: b"failing".to_vec(),
                            expire_ts: 0,
                        }]),
                        1 => store.merge().map(|_| ()),
                        _ => store.backup_to(&dir.path().join("backup")).map(|_| ()),
                    };
                    let fired = faults.fired() > 0;
                    faults.disarm();
                    if let Err(e) = &result {
                        assert!(fired, "{e} without an injected fault");
                        let text = e.chain();
                        assert!(
                            text.contains("os error 5")
                                || text.contains("os error 28")
                                || matches!(e, crate::Error::Poisoned { .. }),
                            "an untyped failure: {text}"
                        );
                    }
                    if what == 0 && result.is_ok() {
                        model.insert(k.clone(), (b"failing".to_vec(), 0));
                    }
                    drop(store);
                    store = crate::Store::open(&db, options.clone()).expect("reopen after a fault");
                    if what == 0 && result.is_err() {
                        // Whole or not at all.
                        let got = store.get(&[&k]).expect("get").pop().map(|p| p.value);
                        if got.as_deref() == Some(b"failing") {
                            model.insert(k, (b"failing".to_vec(), 0));
                        }
                    }
                    merged = what == 1;
                }
            },
        }
        // After every step the store holds what the model holds...
        let got = all_pairs(&store).expect("iterate");
        assert_eq!(got, live_pairs(&model), "after step {steps_taken}");
        // ...and after a merge its figures add up.
        if merged {
            check_stats(&store, &got);
        }
    }
    let _ = store.close();
    let store = crate::Store::open(&db, options).expect("final reopen");
    assert_eq!(
        all_pairs(&store).expect("iterate"),
        live_pairs(&model),
        "after the final reopen"
    );
    let _ = store.close();
}

/// The store's `stats()` against its live pairs `pairs`: the live keys,
/// their bytes (each an operation of a 20-byte header, key and value), and
/// every segment's live and dead bytes adding up to its size.
fn check_stats(store: &crate::Store, pairs: &[(Vec<u8>, Vec<u8>)]) {
    let stats = store.stats().expect("stats");
    assert_eq!(stats.keys, pairs.len() as u64, "live keys in {stats:?}");
    let live: u64 = pairs
        .iter()
        .map(|(k, v)| (OP_HEADER_LEN + k.len() + v.len()) as u64)
        .sum();
    assert_eq!(stats.live_bytes, live, "live bytes in {stats:?}");
    for s in &stats.segments {
        assert_eq!(s.live_bytes + s.dead_bytes, s.bytes, "{s:?}");
    }
    assert_eq!(
        stats.segments.iter().map(|s| s.live_bytes).sum::<u64>(),
        stats.live_bytes
    );
    assert_eq!(stats.segments.iter().filter(|s| s.active).count(), 1);
}
