//! The keydir file (`KEYDIR`): the whole index, written by a clean close so
//! that the next open loads it instead of reading every hint file and
//! scanning the active segment. Like a hint it is a cache: open uses it
//! only when every segment it names is on disk exactly as described, and
//! removes it before the store accepts a write.
//!
//! ```text
//! header (56 bytes)
//! 0       8         10         12              16                    24          32               40                  48                   52
//! | magic | version | reserved | segment count | change-start count | key count | applied number | last start position | last start segment | flags |
//! | 8 B   | u16 = 1 | u16 = 0  | u32           | u64                | u64       | u64            | u64                 | u32                | u32   |
//!   flags: bit 0 = the last-start fields hold a value; other bits zero
//! segment, repeated segment count times, in log order (52 bytes)
//! 0    4      6          8               16             24           32            40               48
//! | id | kind | reserved | base position | end position | end offset | file length | tombstone bytes | sample crc |
//! | u32| u16  | u16 = 0  | u64           | u64          | u64        | u64         | u64             | u32        |
//! change start, repeated change-start count times, ascending (20 bytes)
//! | log position u64 | segment id u32 | file offset u64 |
//! key, repeated key count times, in strictly ascending key order
//! 0         2         6        10       14          22              30
//! | key len | segment | offset | length | expire ts | change number | key |
//! | u16     | u32     | u32    | u32    | u64       | u64           |     |
//! trailer
//! | crc32 u32 of every byte before it |
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{FormatError, SegmentKind, take};
use crate::keydir::{KeyEntry, RecordPointer};
use crate::log::SegmentId;

/// Magic bytes that open the keydir file.
pub const KEYDIR_MAGIC: [u8; 8] = *b"DKVKDIR\0";
/// The keydir file version this build writes and reads.
pub const KEYDIR_VERSION: u16 = 1;
/// Length of the keydir file's header.
pub const KEYDIR_HEADER_LEN: usize = 56;
/// Length of one segment's description.
pub const KEYDIR_SEGMENT_LEN: usize = 52;
/// Length of one change start.
pub const KEYDIR_START_LEN: usize = 20;
/// Length of a key entry's fixed part (the key follows it).
pub const KEYDIR_ENTRY_LEN: usize = 30;

const FLAG_LAST_START: u32 = 1;

/// One segment as the keydir file saw it at close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeydirSegment {
    /// The segment's id.
    pub id: SegmentId,
    /// The segment's kind.
    pub kind: SegmentKind,
    /// Start of the log range it covers.
    pub base_position: u64,
    /// End of the log range it covers.
    pub end_position: u64,
    /// File offset just past its last record.
    pub end_offset: u64,
    /// The file's length (preallocated bytes included).
    pub file_len: u64,
    /// Bytes of delete operations in it.
    pub tombstones: u64,
    /// [`super::sample_crc`] of the file.
    pub sample_crc: u32,
}

/// Writes a keydir file: the header's counts are filled in by
/// [`KeydirFileBuilder::finish`].
#[derive(Debug)]
pub struct KeydirFileBuilder {
    buf: Vec<u8>,
    segments: u32,
    starts: u64,
    keys: u64,
    stage: u8,
}

impl KeydirFileBuilder {
    /// Starts a file; `capacity` is a hint for the bytes it will hold.
    pub fn new(applied: u64, last_start: Option<(u64, SegmentId)>, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(KEYDIR_HEADER_LEN + 4));
        buf.extend_from_slice(&KEYDIR_MAGIC);
        buf.extend_from_slice(&KEYDIR_VERSION.to_le_bytes());
        buf.extend_from_slice(&[0; 2 + 4 + 8 + 8]);
        buf.extend_from_slice(&applied.to_le_bytes());
        let (position, segment) = last_start.map_or((0, 0), |(p, s)| (p, s.0));
        buf.extend_from_slice(&position.to_le_bytes());
        buf.extend_from_slice(&segment.to_le_bytes());
        let flags = if last_start.is_some() {
            FLAG_LAST_START
        } else {
            0
        };
        buf.extend_from_slice(&flags.to_le_bytes());
        debug_assert_eq!(buf.len(), KEYDIR_HEADER_LEN);
        KeydirFileBuilder {
            buf,
            segments: 0,
            starts: 0,
            keys: 0,
            stage: 0,
        }
    }

    /// Adds a segment; all segments come first, in log order.
    pub fn segment(&mut self, s: &KeydirSegment) {
        assert_eq!(self.stage, 0, "segments come before starts and keys");
        let b = &mut self.buf;
        b.extend_from_slice(&s.id.0.to_le_bytes());
        b.extend_from_slice(&(s.kind as u16).to_le_bytes());
        b.extend_from_slice(&[0; 2]);
        for v in [
            s.base_position,
            s.end_position,
            s.end_offset,
            s.file_len,
            s.tombstones,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&s.sample_crc.to_le_bytes());
        self.segments += 1;
    }

    /// Adds a change start; starts come after the segments, ascending.
    pub fn change_start(&mut self, position: u64, segment: SegmentId, offset: u64) {
        assert!(self.stage <= 1, "starts come before keys");
        self.stage = 1;
        self.buf.extend_from_slice(&position.to_le_bytes());
        self.buf.extend_from_slice(&segment.0.to_le_bytes());
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.starts += 1;
    }

    /// Adds a key; keys come last, strictly ascending, at most
    /// `u16::MAX` bytes each (the index holds no longer key).
    pub fn key(&mut self, key: &[u8], e: &KeyEntry) {
        self.stage = 2;
        let b = &mut self.buf;
        b.extend_from_slice(&(key.len() as u16).to_le_bytes());
        b.extend_from_slice(&e.pointer.segment.0.to_le_bytes());
        b.extend_from_slice(&e.pointer.offset.to_le_bytes());
        b.extend_from_slice(&e.pointer.len.to_le_bytes());
        b.extend_from_slice(&e.expire_ts.to_le_bytes());
        b.extend_from_slice(&e.change_number.to_le_bytes());
        b.extend_from_slice(key);
        self.keys += 1;
    }

    /// The finished file's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        LE::write_u32(&mut self.buf[12..16], self.segments);
        LE::write_u64(&mut self.buf[16..24], self.starts);
        LE::write_u64(&mut self.buf[24..32], self.keys);
        let crc = super::crc32(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// A decoded keydir file. Decoding checks the checksum and every length;
/// the keys' order and where their pointers point are the loader's to
/// check.
#[derive(Debug)]
pub struct KeydirFile<'a> {
    /// The highest applied number (replication) at close.
    pub applied: u64,
    /// The change index's last noted start: (log position, segment).
    pub last_start: Option<(u64, SegmentId)>,
    /// The segments, in log order.
    pub segments: Vec<KeydirSegment>,
    starts: &'a [u8],
    keys: &'a [u8],
    key_count: u64,
}

impl<'a> KeydirFile<'a> {
    /// Decodes and checks a whole keydir file.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let body_len = bytes.len().checked_sub(4).ok_or(FormatError::Truncated {
            needed: 4,
            available: bytes.len() as u64,
        })?;
        let (body, trailer) = bytes.split_at(body_len);
        if take::<8>(body, 0)? != KEYDIR_MAGIC {
            return Err(FormatError::Invalid("not a keydir file"));
        }
        let version = u16::from_le_bytes(take(body, 8)?);
        if version != KEYDIR_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        take::<KEYDIR_HEADER_LEN>(body, 0)?;
        if LE::read_u32(trailer) != super::crc32(body) {
            return Err(FormatError::Invalid("keydir file checksum mismatch"));
        }
        let u64_at = |at: usize| LE::read_u64(&body[at..at + 8]);
        let u32_at = |at: usize| LE::read_u32(&body[at..at + 4]);
        let flags = u32_at(52);
        if LE::read_u16(&body[10..12]) != 0 || flags & !FLAG_LAST_START != 0 {
            return Err(FormatError::NonZeroReserved);
        }
        let (segment_count, start_count, key_count) = (u32_at(12), u64_at(16), u64_at(24));
        let last_start = if flags & FLAG_LAST_START != 0 {
            Some((u64_at(40), SegmentId(u32_at(48))))
        } else if u64_at(40) != 0 || u32_at(48) != 0 {
            return Err(FormatError::NonZeroReserved);
        } else {
            None
        };
        let mut at = KEYDIR_HEADER_LEN;
        let mut segments = Vec::new();
        for _ in 0..segment_count {
            let s = take::<KEYDIR_SEGMENT_LEN>(body, at)?;
            let kind = SegmentKind::from_u16(LE::read_u16(&s[4..6]))?;
            if LE::read_u16(&s[6..8]) != 0 {
                return Err(FormatError::NonZeroReserved);
            }
            segments.push(KeydirSegment {
                id: SegmentId(LE::read_u32(&s[0..4])),
                kind,
                base_position: LE::read_u64(&s[8..16]),
                end_position: LE::read_u64(&s[16..24]),
                end_offset: LE::read_u64(&s[24..32]),
                file_len: LE::read_u64(&s[32..40]),
                tombstones: LE::read_u64(&s[40..48]),
                sample_crc: LE::read_u32(&s[48..52]),
            });
            at += KEYDIR_SEGMENT_LEN;
        }
        let starts_len = usize::try_from(start_count)
            .ok()
            .and_then(|n| n.checked_mul(KEYDIR_START_LEN))
            .filter(|&n| n <= body.len() - at)
            .ok_or(FormatError::Invalid("change-start count beyond the file"))?;
        let starts = &body[at..at + starts_len];
        let keys = &body[at + starts_len..];
        // Every key entry must fit, and the entries must end the body.
        let mut rest = keys;
        for _ in 0..key_count {
            let fixed = rest
                .get(..KEYDIR_ENTRY_LEN)
                .ok_or(FormatError::Invalid("key count beyond the file"))?;
            let len = KEYDIR_ENTRY_LEN + usize::from(LE::read_u16(fixed));
            rest = rest
                .get(len..)
                .ok_or(FormatError::Invalid("key beyond the file"))?;
        }
        if !rest.is_empty() {
            return Err(FormatError::Invalid("bytes after the last key"));
        }
        Ok(KeydirFile {
            applied: u64_at(32),
            last_start,
            segments,
            starts,
            keys,
            key_count,
        })
    }

    /// Number of keys.
    pub fn key_count(&self) -> u64 {
        self.key_count
    }

    /// The change index's noted starts: (log position, segment, file
    /// offset), as stored.
    pub fn change_starts(&self) -> impl Iterator<Item = (u64, SegmentId, u64)> + 'a {
        self.starts.chunks_exact(KEYDIR_START_LEN).map(|c| {
            (
                LE::read_u64(&c[0..8]),
                SegmentId(LE::read_u32(&c[8..12])),
                LE::read_u64(&c[12..20]),
            )
        })
    }

    /// The keys and their entries, as stored.
    pub fn entries(&self) -> KeydirEntries<'a> {
        KeydirEntries { rest: self.keys }
    }
}

/// The keys of a [`KeydirFile`], in stored order.
#[derive(Debug)]
pub struct KeydirEntries<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for KeydirEntries<'a> {
    type Item = (&'a [u8], KeyEntry);

    fn next(&mut self) -> Option<Self::Item> {
        // `decode` checked that every entry fits.
        let fixed = self.rest.get(..KEYDIR_ENTRY_LEN)?;
        let end = KEYDIR_ENTRY_LEN + usize::from(LE::read_u16(fixed));
        let key = self.rest.get(KEYDIR_ENTRY_LEN..end)?;
        let entry = KeyEntry {
            pointer: RecordPointer {
                segment: SegmentId(LE::read_u32(&fixed[2..6])),
                offset: LE::read_u32(&fixed[6..10]),
                len: LE::read_u32(&fixed[10..14]),
            },
            expire_ts: LE::read_u64(&fixed[14..22]),
            change_number: LE::read_u64(&fixed[22..30]),
        };
        self.rest = &self.rest[end..];
        Some((key, entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(segment: u32, offset: u32) -> KeyEntry {
        KeyEntry {
            pointer: RecordPointer {
                segment: SegmentId(segment),
                offset,
                len: 60,
            },
            expire_ts: u64::from(offset) * 3,
            change_number: u64::from(offset) + 7,
        }
    }

    fn sample() -> Vec<u8> {
        let mut b = KeydirFileBuilder::new(42, Some((900, SegmentId(2))), 0);
        for (id, kind) in [(1, SegmentKind::Merged), (2, SegmentKind::Log)] {
            b.segment(&KeydirSegment {
                id: SegmentId(id),
                kind,
                base_position: u64::from(id) * 100,
                end_position: u64::from(id) * 100 + 50,
                end_offset: 4000,
                file_len: 8192,
                tombstones: u64::from(id),
                sample_crc: 0xdead_beef ^ id,
            });
        }
        b.change_start(200, SegmentId(2), 32);
        b.change_start(900, SegmentId(2), 700);
        b.key(b"a", &entry(1, 64));
        b.key(b"bb", &entry(2, 96));
        b.key(&[7; 300], &entry(2, 200));
        b.finish()
    }

    #[test]
    fn what_is_written_decodes_to_the_same_index() {
        let bytes = sample();
        let f = KeydirFile::decode(&bytes).expect("decode");
        assert_eq!(f.applied, 42);
        assert_eq!(f.last_start, Some((900, SegmentId(2))));
        assert_eq!(f.segments.len(), 2);
        assert_eq!(f.segments[0].kind, SegmentKind::Merged);
        assert_eq!(f.segments[1].sample_crc, 0xdead_beef ^ 2);
        assert_eq!(
            f.change_starts().collect::<Vec<_>>(),
            vec![(200, SegmentId(2), 32), (900, SegmentId(2), 700)]
        );
        let keys: Vec<_> = f.entries().collect();
        assert_eq!(f.key_count(), 3);
        assert_eq!(keys[0], (&b"a"[..], entry(1, 64)));
        assert_eq!(keys[2], (&[7u8; 300][..], entry(2, 200)));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(KeydirFile::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x10;
            assert!(KeydirFile::decode(&b).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn counts_that_promise_more_than_the_file_holds_are_refused() {
        for (at, len) in [(12, 4), (16, 8), (24, 8)] {
            let mut b = sample();
            b[at..at + len].fill(0xff);
            let body = b.len() - 4;
            let crc = crc32fast::hash(&b[..body]);
            b[body..].copy_from_slice(&crc.to_le_bytes());
            assert!(KeydirFile::decode(&b).is_err(), "count at {at}");
        }
    }
}
