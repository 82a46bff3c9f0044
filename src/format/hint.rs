//! Hint files: for one sealed segment, every operation's key, location,
//! change number and expiry, so that open rebuilds the index without
//! reading values. A hint is a cache: a missing or damaged one is ignored
//! and its segment scanned instead.
//!
//! ```text
//! header (60 bytes)
//! 0        8         10       12           16               24              32             40               48            52            56
//! | magic  | version | kind   | segment id | segment length | base position | end position | applied number | segment crc | entry count | sample crc |
//! | 8 B    | u16 = 1 | u16    | u32        | u64            | u64           | u64          | u64            | u32         | u32         | u32        |
//!   sample crc: crc32 of the segment's first and last 4 KiB (see `sample_crc`)
//! entry, repeated entry count times, in strictly ascending key order
//! (the segment's newest operation of each key)
//! 0      1          2         4        8        12          20              28
//! | kind | reserved | key len | offset | length | expire ts | change number | key |
//! | u8   | u8 = 0   | u16     | u32    | u32    | u64       | u64           |     |
//! change index, for log segments (see DESIGN.md 14)
//! | start count u32 | record start offset u32 × count |
//! trailer
//! | crc32 u32 of every byte before it |
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{FormatError, OpKind, SegmentKind, take};
use crate::log::SegmentId;

/// Magic bytes that open every hint file.
pub const HINT_MAGIC: [u8; 8] = *b"DKVHINT\0";
/// The hint file version this build writes and reads.
pub const HINT_VERSION: u16 = 1;
/// Length of the hint header in bytes.
pub const HINT_HEADER_LEN: usize = H_SAMPLE + 4;
/// Bytes at each end of a segment that its hint's sample checksum covers.
pub const HINT_SAMPLE_LEN: usize = 4096;
/// Length of a hint entry's fixed part in bytes.
pub const HINT_ENTRY_LEN: usize = E_CN + 8;

const H_MAGIC: usize = 0;
const H_VERSION: usize = H_MAGIC + 8;
const H_KIND: usize = H_VERSION + 2;
const H_ID: usize = H_KIND + 2;
const H_SEG_LEN: usize = H_ID + 4;
const H_BASE: usize = H_SEG_LEN + 8;
const H_END: usize = H_BASE + 8;
const H_APPLIED: usize = H_END + 8;
const H_SEG_CRC: usize = H_APPLIED + 8;
const H_COUNT: usize = H_SEG_CRC + 4;
const H_SAMPLE: usize = H_COUNT + 4;

const E_KIND: usize = 0;
const E_RESERVED: usize = E_KIND + 1;
const E_KEY_LEN: usize = E_RESERVED + 1;
const E_OFFSET: usize = E_KEY_LEN + 2;
const E_LEN: usize = E_OFFSET + 4;
const E_EXPIRE: usize = E_LEN + 4;
const E_CN: usize = E_EXPIRE + 8;

/// What a hint says about its segment; open uses a hint only when these
/// match the segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintHeader {
    /// The segment's kind.
    pub kind: SegmentKind,
    /// The segment's id.
    pub segment: SegmentId,
    /// The segment file's length in bytes when the hint was written.
    pub segment_len: u64,
    /// The segment's base position.
    pub base_position: u64,
    /// The end of the log range the segment covers.
    pub end_position: u64,
    /// The highest applied number (replication) in the segment.
    pub applied: u64,
    /// CRC-32 of the whole segment file (checked by `verify`, not by open).
    pub segment_crc: u32,
    /// [`sample_crc`] of the segment file: checked by open, so that a hint
    /// of another store's segment with the same id, length and range (left
    /// by a restore, say) is not trusted.
    pub sample_crc: u32,
}

impl HintHeader {
    /// The header's fields (its kind already decoded by the caller).
    fn read(h: &[u8; HINT_HEADER_LEN], kind: SegmentKind) -> Self {
        HintHeader {
            kind,
            segment: SegmentId(LE::read_u32(&h[H_ID..])),
            segment_len: LE::read_u64(&h[H_SEG_LEN..]),
            base_position: LE::read_u64(&h[H_BASE..]),
            end_position: LE::read_u64(&h[H_END..]),
            applied: LE::read_u64(&h[H_APPLIED..]),
            segment_crc: LE::read_u32(&h[H_SEG_CRC..]),
            sample_crc: LE::read_u32(&h[H_SAMPLE..]),
        }
    }
}

/// CRC-32 of the first and the last [`HINT_SAMPLE_LEN`] bytes of a segment
/// file (overlapping for short files).
pub fn sample_crc(segment: &[u8]) -> u32 {
    let n = segment.len().min(HINT_SAMPLE_LEN);
    let mut h = crc32fast::Hasher::new();
    h.update(&segment[..n]);
    h.update(&segment[segment.len() - n..]);
    h.finalize()
}

/// One operation of the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintEntry<'a> {
    /// Put or delete (a tombstone).
    pub kind: OpKind,
    /// The key.
    pub key: &'a [u8],
    /// File offset of the operation in the segment.
    pub offset: u32,
    /// The operation's encoded length.
    pub len: u32,
    /// Expiry in Unix seconds, 0 = never.
    pub expire_ts: u64,
    /// The operation's change number.
    pub change_number: u64,
}

/// Encodes a hint file.
#[derive(Debug)]
pub struct HintBuilder {
    buf: Vec<u8>,
    count: u32,
}

impl HintBuilder {
    /// A hint for the segment described by `header`.
    pub fn new(header: &HintHeader) -> Self {
        let mut buf = vec![0u8; HINT_HEADER_LEN];
        buf[H_MAGIC..H_VERSION].copy_from_slice(&HINT_MAGIC);
        LE::write_u16(&mut buf[H_VERSION..], HINT_VERSION);
        LE::write_u16(&mut buf[H_KIND..], header.kind as u16);
        LE::write_u32(&mut buf[H_ID..], header.segment.0);
        LE::write_u64(&mut buf[H_SEG_LEN..], header.segment_len);
        LE::write_u64(&mut buf[H_BASE..], header.base_position);
        LE::write_u64(&mut buf[H_END..], header.end_position);
        LE::write_u64(&mut buf[H_APPLIED..], header.applied);
        LE::write_u32(&mut buf[H_SEG_CRC..], header.segment_crc);
        LE::write_u32(&mut buf[H_SAMPLE..], header.sample_crc);
        HintBuilder { buf, count: 0 }
    }

    /// Appends one operation; keys must come in strictly ascending order
    /// (the decoder refuses anything else).
    pub fn push(&mut self, e: &HintEntry<'_>) {
        let mut h = [0u8; HINT_ENTRY_LEN];
        h[E_KIND] = e.kind as u8;
        LE::write_u16(&mut h[E_KEY_LEN..], e.key.len() as u16);
        LE::write_u32(&mut h[E_OFFSET..], e.offset);
        LE::write_u32(&mut h[E_LEN..], e.len);
        LE::write_u64(&mut h[E_EXPIRE..], e.expire_ts);
        LE::write_u64(&mut h[E_CN..], e.change_number);
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(e.key);
        self.count += 1;
    }

    /// Appends the change index's record starts and the trailer; returns
    /// the file's bytes.
    pub fn finish(mut self, record_starts: &[u32]) -> Vec<u8> {
        LE::write_u32(&mut self.buf[H_COUNT..], self.count);
        self.buf
            .extend_from_slice(&(record_starts.len() as u32).to_le_bytes());
        for s in record_starts {
            self.buf.extend_from_slice(&s.to_le_bytes());
        }
        let crc = super::crc32(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// A verified hint file borrowing from its bytes.
#[derive(Clone, Debug)]
pub struct Hint<'a> {
    /// The header.
    pub header: HintHeader,
    entries: &'a [u8],
    count: u32,
    starts: &'a [u8],
}

impl<'a> Hint<'a> {
    /// Decodes and fully verifies a hint file: checksum first, then the
    /// header and the framing of every entry.
    pub fn decode(buf: &'a [u8]) -> Result<Self, FormatError> {
        let body_len = buf.len().checked_sub(4).ok_or(FormatError::Truncated {
            needed: 4,
            available: buf.len() as u64,
        })?;
        let (body, crc) = buf.split_at(body_len);
        if super::crc32(body) != LE::read_u32(crc) {
            return Err(FormatError::BadPayloadChecksum);
        }
        let h: [u8; HINT_HEADER_LEN] = take(body, 0)?;
        if h[H_MAGIC..H_VERSION] != HINT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = LE::read_u16(&h[H_VERSION..]);
        if version != HINT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let kind = match LE::read_u16(&h[H_KIND..]) {
            1 => SegmentKind::Log,
            2 => SegmentKind::Merged,
            other => return Err(FormatError::UnknownSegmentKind(other)),
        };
        let header = HintHeader::read(&h, kind);
        let count = LE::read_u32(&h[H_COUNT..]);
        let mut at = HINT_HEADER_LEN;
        let mut previous: Option<&[u8]> = None;
        for _ in 0..count {
            let e: [u8; HINT_ENTRY_LEN] = take(body, at)?;
            let key_len = usize::from(LE::read_u16(&e[E_KEY_LEN..]));
            if key_len == 0 || e[E_RESERVED] != 0 {
                return Err(FormatError::Invalid("hint entry with an empty key"));
            }
            if !matches!(e[E_KIND], 1 | 2) {
                return Err(FormatError::UnknownOpKind(e[E_KIND]));
            }
            let offset = u64::from(LE::read_u32(&e[E_OFFSET..]));
            let len = u64::from(LE::read_u32(&e[E_LEN..]));
            if len < (super::OP_HEADER_LEN + key_len) as u64
                || offset < super::SEGMENT_HEADER_LEN as u64
                || offset + len > header.segment_len
            {
                return Err(FormatError::Invalid("hint entry lies outside its segment"));
            }
            let cn = LE::read_u64(&e[E_CN..]);
            if cn <= header.base_position || cn > header.end_position {
                return Err(FormatError::Invalid(
                    "hint entry's change number outside its segment's range",
                ));
            }
            let key = body
                .get(at + HINT_ENTRY_LEN..at + HINT_ENTRY_LEN + key_len)
                .ok_or(FormatError::Truncated {
                    needed: (at + HINT_ENTRY_LEN + key_len) as u64,
                    available: body.len() as u64,
                })?;
            if previous.is_some_and(|p| p >= key) {
                return Err(FormatError::Invalid(
                    "hint entries are not in ascending key order",
                ));
            }
            previous = Some(key);
            at += HINT_ENTRY_LEN + key_len;
        }
        let entries = &body[HINT_HEADER_LEN..at];
        let n = LE::read_u32(&take::<4>(body, at)?) as usize;
        let starts = body
            .get(at + 4..)
            .filter(|s| Some(s.len()) == n.checked_mul(4))
            .ok_or(FormatError::Invalid(
                "hint's change index does not fill the file",
            ))?;
        if starts
            .chunks_exact(4)
            .map(LE::read_u32)
            .any(|s| (s as usize) < super::SEGMENT_HEADER_LEN || u64::from(s) >= header.segment_len)
        {
            return Err(FormatError::Invalid(
                "hint's change index points outside its segment",
            ));
        }
        Ok(Hint {
            header,
            entries,
            count,
            starts,
        })
    }

    /// Reads the header of a hint that [`decode`](Self::decode) already
    /// accepted, without checking it again (open decodes each hint once to
    /// choose it, and again to read it). Never panics on other bytes: its
    /// entries then just end early.
    pub fn decode_verified(buf: &'a [u8]) -> Result<Self, FormatError> {
        let body = &buf[..buf.len().saturating_sub(4)];
        let h: [u8; HINT_HEADER_LEN] = take(body, 0)?;
        let kind = if LE::read_u16(&h[H_KIND..]) == 2 {
            SegmentKind::Merged
        } else {
            SegmentKind::Log
        };
        let header = HintHeader::read(&h, kind);
        Ok(Hint {
            header,
            entries: &body[HINT_HEADER_LEN..],
            count: LE::read_u32(&h[H_COUNT..]),
            starts: &[],
        })
    }

    /// Number of entries.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the hint holds no entry.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries, in ascending key order.
    pub fn entries(&self) -> impl Iterator<Item = HintEntry<'a>> + use<'a> {
        let bytes = self.entries;
        let mut at = 0usize;
        let mut left = self.count;
        std::iter::from_fn(move || {
            left = left.checked_sub(1)?;
            // Framing was verified by `decode`.
            let e = bytes.get(at..at + HINT_ENTRY_LEN)?;
            let key_len = usize::from(LE::read_u16(&e[E_KEY_LEN..]));
            let key = bytes.get(at + HINT_ENTRY_LEN..at + HINT_ENTRY_LEN + key_len)?;
            at += HINT_ENTRY_LEN + key_len;
            Some(HintEntry {
                kind: if e[E_KIND] == 1 {
                    OpKind::Put
                } else {
                    OpKind::Delete
                },
                key,
                offset: LE::read_u32(&e[E_OFFSET..]),
                len: LE::read_u32(&e[E_LEN..]),
                expire_ts: LE::read_u64(&e[E_EXPIRE..]),
                change_number: LE::read_u64(&e[E_CN..]),
            })
        })
    }

    /// File offsets of the record starts the change index keeps.
    pub fn record_starts(&self) -> impl Iterator<Item = u32> + use<'a> {
        self.starts.chunks_exact(4).map(LE::read_u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> HintHeader {
        HintHeader {
            kind: SegmentKind::Log,
            segment: SegmentId(3),
            segment_len: 1000,
            base_position: 64,
            end_position: 1032,
            applied: 9,
            segment_crc: 0xAABB_CCDD,
            sample_crc: 0x1122_3344,
        }
    }

    fn sample() -> Vec<u8> {
        let mut b = HintBuilder::new(&header());
        b.push(&HintEntry {
            kind: OpKind::Put,
            key: b"ab",
            offset: 72,
            len: 25,
            expire_ts: 5,
            change_number: 200,
        });
        b.push(&HintEntry {
            kind: OpKind::Delete,
            key: b"c",
            offset: 140,
            len: 21,
            expire_ts: 0,
            change_number: 300,
        });
        b.finish(&[32])
    }

    #[test]
    fn hint_encodes_to_the_documented_golden_bytes() {
        let mut e = Vec::new();
        e.extend_from_slice(b"DKVHINT\0");
        e.extend_from_slice(&[1, 0, 1, 0]); // version 1, kind Log
        e.extend_from_slice(&3u32.to_le_bytes());
        e.extend_from_slice(&1000u64.to_le_bytes());
        e.extend_from_slice(&64u64.to_le_bytes());
        e.extend_from_slice(&1032u64.to_le_bytes());
        e.extend_from_slice(&9u64.to_le_bytes());
        e.extend_from_slice(&0xAABB_CCDDu32.to_le_bytes());
        e.extend_from_slice(&2u32.to_le_bytes()); // entries
        e.extend_from_slice(&0x1122_3344u32.to_le_bytes()); // sample crc
        e.extend_from_slice(&[1, 0, 2, 0]);
        e.extend_from_slice(&72u32.to_le_bytes());
        e.extend_from_slice(&25u32.to_le_bytes());
        e.extend_from_slice(&5u64.to_le_bytes());
        e.extend_from_slice(&200u64.to_le_bytes());
        e.extend_from_slice(b"ab");
        e.extend_from_slice(&[2, 0, 1, 0]);
        e.extend_from_slice(&140u32.to_le_bytes());
        e.extend_from_slice(&21u32.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes());
        e.extend_from_slice(&300u64.to_le_bytes());
        e.extend_from_slice(b"c");
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&32u32.to_le_bytes());
        let crc = crc32fast::hash(&e);
        e.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(sample(), e);
        assert_eq!((HINT_HEADER_LEN, HINT_ENTRY_LEN), (60, 28));
    }

    #[test]
    fn hint_round_trips() {
        let bytes = sample();
        let h = Hint::decode(&bytes).unwrap();
        assert_eq!(h.header, header());
        let e: Vec<_> = h.entries().collect();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].key, e[0].change_number), (&b"ab"[..], 200));
        assert_eq!((e[1].kind, e[1].offset), (OpKind::Delete, 140));
        assert_eq!(h.record_starts().collect::<Vec<_>>(), vec![32]);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() {
        let bytes = sample();
        for len in 0..bytes.len() {
            assert!(Hint::decode(&bytes[..len]).is_err(), "len {len}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut c = bytes.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(Hint::decode(&c).is_err(), "bit {bit} undetected");
        }
    }
}
