//! Hint files (format in `format/hint.rs`): building one from a sealed
//! segment's bytes, writing it beside the segment, and reading it back.
//! A hint is a cache of what scanning the segment would find: it is written
//! without fsync (a torn or missing hint fails its checksum or is absent,
//! and the segment is scanned instead), and is trusted only when its header
//! matches the segment file. Must not decide what is live.

use std::fs;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::format::{
    Hint, HintBuilder, HintEntry, HintHeader, MergeHeader, OP_HEADER_LEN, RecordKind,
    SegmentHeader, SegmentKind, decode_record,
};
use crate::log::FileSystem;
use crate::log::SegmentId;
use crate::replication::ChangeIndex;

/// Builds the hint of a sealed segment from its whole file. `None` when
/// the bytes do not decode as a clean segment (then it is not hinted, and
/// every open scans it, reporting what is wrong).
pub(crate) fn build(bytes: &[u8]) -> Option<Vec<u8>> {
    let header = SegmentHeader::decode(bytes).ok()?;
    let (start, end, mut applied) = match header.kind {
        SegmentKind::Log => (header.kind.records_start(), None, 0),
        SegmentKind::Merged => {
            let m = MergeHeader::decode(bytes).ok()?;
            (header.kind.records_start(), Some(m.end_position), m.applied)
        }
    };
    let mut entries: Vec<HintEntry<'_>> = Vec::new();
    let mut changes = ChangeIndex::default();
    let mut at = start;
    while at < bytes.len() {
        let record = decode_record(&bytes[at..]).ok()?;
        let len = record.header.record_len() as usize;
        match (header.kind, record.header.kind) {
            (SegmentKind::Log, RecordKind::Batch) => {
                let expected = header.base_position + (at - start) as u64 + len as u64;
                if record.header.change_number != expected {
                    return None;
                }
                changes.note(expected - len as u64, header.id, at as u64);
            }
            (SegmentKind::Merged, RecordKind::Merged) => {}
            _ => return None,
        }
        if let Some(a) = record.applied {
            applied = applied.max(a);
        }
        for (off, cn, op) in record.entries() {
            entries.push(HintEntry {
                kind: op.kind,
                key: op.key,
                offset: u32::try_from(at + off as usize).ok()?,
                len: (OP_HEADER_LEN + op.key.len() + op.value.len()) as u32,
                expire_ts: op.expire_ts,
                change_number: cn,
            });
        }
        at += len;
    }
    // The newest operation of each key, in key order (the sort is stable:
    // of one key's operations the last written stays last).
    entries.sort_by(|a, b| a.key.cmp(b.key));
    let mut newest: Vec<HintEntry<'_>> = Vec::with_capacity(entries.len());
    for e in entries {
        match newest.last_mut() {
            Some(last) if last.key == e.key => *last = e,
            _ => newest.push(e),
        }
    }
    let end = end.unwrap_or(header.base_position + (bytes.len() - start) as u64);
    let mut b = HintBuilder::new(&HintHeader {
        kind: header.kind,
        segment: header.id,
        segment_len: bytes.len() as u64,
        base_position: header.base_position,
        end_position: end,
        applied,
        segment_crc: crate::format::crc32(bytes),
        sample_crc: crate::format::sample_crc(bytes),
    });
    for e in &newest {
        b.push(e);
    }
    let starts: Vec<u32> = changes
        .starts_in(header.id)
        .map(|(_, offset)| offset as u32)
        .collect();
    Some(b.finish(&starts))
}

/// Writes `bytes` as the hint of segment `id` in `dir`: a temp file renamed
/// into place, so a reader sees the old hint, the new one, or none.
pub(crate) fn write(fs: &dyn FileSystem, dir: &Path, id: SegmentId, bytes: &[u8]) -> Result<()> {
    let path = id.hint_path_in(dir);
    let tmp = path.with_extension("hint.tmp");
    crate::log::write_file(fs, &tmp, bytes).context(|| format!("write {}", tmp.display()))?;
    fs.rename(&tmp, &path)
        .context(|| format!("rename {}", tmp.display()))
}

/// Reads the hint of segment `id`; `Err` says why it cannot be used.
pub(crate) fn read(dir: &Path, id: SegmentId) -> std::result::Result<Vec<u8>, String> {
    fs::read(id.hint_path_in(dir)).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no hint file".to_string(),
        _ => format!("hint unreadable: {e}"),
    })
}

/// Checks that a decoded hint describes this segment file (`segment` is
/// its whole, mapped, bytes; only the sampled ends are read).
pub(crate) fn matches(
    hint: &Hint<'_>,
    header: &SegmentHeader,
    merge: Option<&MergeHeader>,
    segment: &[u8],
) -> std::result::Result<(), String> {
    let file_len = segment.len() as u64;
    let h = &hint.header;
    if h.segment != header.id || h.kind != header.kind {
        return Err(format!(
            "hint describes {:?} segment {}, not {:?} segment {}",
            h.kind, h.segment, header.kind, header.id
        ));
    }
    if h.segment_len != file_len {
        return Err(format!(
            "hint is for a segment of {} bytes, the file has {file_len}: it is older than its segment",
            h.segment_len
        ));
    }
    let end = match merge {
        Some(m) => m.end_position,
        None => header.base_position + file_len - header.kind.records_start() as u64,
    };
    if h.base_position != header.base_position || h.end_position != end {
        return Err("hint's log range differs from its segment's".into());
    }
    if h.sample_crc != crate::format::sample_crc(segment) {
        return Err("hint describes another segment of the same name and size".into());
    }
    Ok(())
}

/// Checks the hint of segment `id` fully against the segment's whole file
/// `segment`: what open checks, and the checksum of the whole segment.
/// `Ok(false)` when the segment has no hint.
pub(crate) fn check(
    dir: &Path,
    id: SegmentId,
    segment: &[u8],
) -> std::result::Result<bool, String> {
    if !id.hint_path_in(dir).exists() {
        return Ok(false);
    }
    let bytes = read(dir, id)?;
    let hint = Hint::decode(&bytes).map_err(|e| format!("hint damaged: {e}"))?;
    let header = SegmentHeader::decode(segment).map_err(|e| format!("segment header: {e}"))?;
    let merge = match header.kind {
        SegmentKind::Log => None,
        SegmentKind::Merged => {
            Some(MergeHeader::decode(segment).map_err(|e| format!("merge header: {e}"))?)
        }
    };
    matches(&hint, &header, merge.as_ref(), segment)?;
    if hint.header.segment_crc != crate::format::crc32(segment) {
        return Err("the segment's checksum differs from the one its hint recorded".into());
    }
    Ok(true)
}

/// Removes the hint files in `dir` whose segment no longer exists or is
/// one of the `merged` segments (which older builds hinted; they are read
/// whole now), and temp files left by an interrupted hint write.
pub(crate) fn remove_orphans(dir: &Path, fs: &dyn FileSystem, merged: &[SegmentId]) -> Result<()> {
    for entry in fs::read_dir(dir).context(|| format!("list {}", dir.display()))? {
        let entry = entry.context(|| format!("list {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let orphan = if let Some(stem) = name.strip_suffix(".hint.tmp") {
            stem.len() == 10
        } else if let Some(stem) = name.strip_suffix(".hint") {
            stem.len() == 10
                && (stem
                    .parse::<u32>()
                    .is_ok_and(|n| merged.contains(&SegmentId(n)))
                    || !dir
                        .join(format!("{stem}.{}", crate::log::SEGMENT_EXTENSION))
                        .exists())
        } else {
            false
        };
        if orphan {
            let path = entry.path();
            fs.remove_file(&path)
                .context(|| format!("remove {}", path.display()))?;
        }
    }
    Ok(())
}
